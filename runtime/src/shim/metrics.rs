//! The agent's container statistics as containerd's cgroups v2 `Metrics`
//! (`io.containerd.cgroups.v2.Metrics`), which `ctr task metrics` and the
//! CRI plugin's ContainerStats decode. The agent reads the guest's cgroup v2
//! files; its message is shaped after this one, so the mapping is field for
//! field.

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use nutshell_protocol::agent::StatsContainerResponse;

/// The type URL containerd's typeurl registry knows the v2 metrics by.
pub const METRICS_V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// Most io.stat entries passed on: the guest has a handful of devices; a
/// longer list is a misbehaving guest.
const MAX_IO_ENTRIES: usize = 64;

/// Converts the agent's statistics.
pub fn to_metrics(s: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = MessageField::some(CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        m.memory = MessageField::some(MemoryStat {
            usage: mem.usage,
            usage_limit: mem.usage_limit,
            swap_usage: mem.swap_usage,
            swap_limit: mem.swap_limit,
            anon: mem.anon,
            file: mem.file,
            kernel_stack: mem.kernel_stack,
            slab: mem.slab,
            sock: mem.sock,
            shmem: mem.shmem,
            file_mapped: mem.file_mapped,
            file_dirty: mem.file_dirty,
            file_writeback: mem.file_writeback,
            active_anon: mem.active_anon,
            inactive_anon: mem.inactive_anon,
            active_file: mem.active_file,
            inactive_file: mem.inactive_file,
            unevictable: mem.unevictable,
            pgfault: mem.pgfault,
            pgmajfault: mem.pgmajfault,
            ..Default::default()
        });
    }
    if let Some(ev) = s.memory_events.as_ref() {
        m.memory_events = MessageField::some(MemoryEvents {
            low: ev.low,
            high: ev.high,
            max: ev.max,
            oom: ev.oom,
            oom_kill: ev.oom_kill,
            ..Default::default()
        });
    }
    if let Some(p) = s.pids.as_ref() {
        m.pids = MessageField::some(PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    if let Some(io) = s.io.as_ref() {
        m.io = MessageField::some(IOStat {
            usage: io
                .usage
                .iter()
                .take(MAX_IO_ENTRIES)
                .map(|e| IOEntry {
                    major: e.major,
                    minor: e.minor,
                    rbytes: e.rbytes,
                    wbytes: e.wbytes,
                    rios: e.rios,
                    wios: e.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    m
}

/// The statistics packed the way containerd expects them in
/// `StatsResponse.stats`.
pub fn to_any(s: &StatsContainerResponse) -> Result<Any, containerd_shim_protos::protobuf::Error> {
    Ok(Any {
        type_url: METRICS_V2_TYPE_URL.to_string(),
        value: to_metrics(s).write_to_bytes()?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nutshell_protocol::agent::{CpuStats, IoEntry, IoStats, MemoryStats, PidsStats};

    fn sample() -> StatsContainerResponse {
        StatsContainerResponse {
            cpu: MessageField::some(CpuStats {
                usage_usec: 1500,
                user_usec: 1000,
                system_usec: 500,
                nr_throttled: 2,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStats {
                usage: 4 << 20,
                usage_limit: u64::MAX,
                anon: 1 << 20,
                pgfault: 77,
                ..Default::default()
            }),
            pids: MessageField::some(PidsStats {
                current: 3,
                limit: 100,
                ..Default::default()
            }),
            io: MessageField::some(IoStats {
                usage: (0..100)
                    .map(|i| IoEntry {
                        major: 254,
                        minor: i,
                        rbytes: 4096,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn fields_map_one_to_one() {
        let m = to_metrics(&sample());
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.cpu.user_usec, 1000);
        assert_eq!(m.cpu.system_usec, 500);
        assert_eq!(m.cpu.nr_throttled, 2);
        assert_eq!(m.memory.usage, 4 << 20);
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(m.memory.anon, 1 << 20);
        assert_eq!(m.memory.pgfault, 77);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.pids.limit, 100);
        assert!(m.memory_events.is_none(), "absent sections stay absent");
    }

    #[test]
    fn io_entries_are_bounded() {
        let m = to_metrics(&sample());
        assert_eq!(m.io.usage.len(), MAX_IO_ENTRIES);
        assert_eq!(m.io.usage[3].minor, 3);
        assert_eq!(m.io.usage[3].rbytes, 4096);
    }

    #[test]
    fn any_round_trips_with_containerd_type_url() {
        let any = to_any(&sample()).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let back = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.cpu.usage_usec, 1500);
        assert_eq!(back.memory.usage, 4 << 20);
    }
}
