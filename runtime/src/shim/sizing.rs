//! How big a pod's VM is.
//!
//! The config's `vm.vcpus` and `vm.memory_mib` are the base a pod gets when
//! it asks for nothing. On top come, first match wins:
//! - explicit totals in the annotations `io.nutshell.vm.vcpus` and
//!   `io.nutshell.vm.memory_mib` (CRI passes pod annotations matching the
//!   runtime's `pod_annotations`);
//! - the pod's limits as containerd's CRI announces them
//!   (`io.kubernetes.cri.sandbox-cpu-quota`/`-period`, `-memory`);
//! - a lone container's own limits (`linux.resources` of its spec).
//!
//! The result always stays within `vm.max_vcpus` and `vm.max_memory_mib`:
//! a pod cannot make the host give it more than the operator allowed.

use std::collections::HashMap;

use oci_spec::runtime::LinuxResources;

use crate::config::VmSettings;

pub const ANNOTATION_VCPUS: &str = "io.nutshell.vm.vcpus";
pub const ANNOTATION_MEMORY_MIB: &str = "io.nutshell.vm.memory_mib";
const CRI_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const CRI_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
const CRI_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// Smallest guest that boots.
const MIN_MEMORY_MIB: u32 = 64;

/// The VM size chosen for a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// Picks the VM size for a pod from its owner container's annotations and
/// resources.
pub fn size_for(
    cfg: &VmSettings,
    annotations: &HashMap<String, String>,
    resources: Option<&LinuxResources>,
) -> VmSize {
    let num = |k: &str| {
        annotations
            .get(k)
            .and_then(|v| v.trim().parse::<i64>().ok())
    };

    let (quota, period) = match (num(CRI_CPU_QUOTA), num(CRI_CPU_PERIOD)) {
        (Some(q), Some(p)) => (Some(q), Some(p)),
        _ => {
            let cpu = resources.and_then(|r| r.cpu().as_ref());
            (
                cpu.and_then(|c| c.quota()),
                cpu.and_then(|c| c.period())
                    .and_then(|p| i64::try_from(p).ok()),
            )
        }
    };
    let extra_vcpus = match (quota, period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => u32::try_from((q + p - 1) / p).unwrap_or(u32::MAX),
        _ => 0,
    };
    let vcpus = match num(ANNOTATION_VCPUS) {
        Some(v) => u32::try_from(v).unwrap_or(0),
        None => cfg.vcpus.saturating_add(extra_vcpus),
    };

    let limit_bytes = num(CRI_MEMORY).or_else(|| {
        resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
    });
    let extra_mib = limit_bytes
        .filter(|b| *b > 0)
        .map(|b| u32::try_from((b + (1 << 20) - 1) >> 20).unwrap_or(u32::MAX))
        .unwrap_or(0);
    let memory_mib = match num(ANNOTATION_MEMORY_MIB) {
        Some(m) => u32::try_from(m).unwrap_or(0),
        None => cfg.memory_mib.saturating_add(extra_mib),
    };

    VmSize {
        vcpus: vcpus.clamp(1, cfg.max_vcpus.max(1)),
        memory_mib: memory_mib.clamp(MIN_MEMORY_MIB, cfg.max_memory_mib.max(MIN_MEMORY_MIB)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder};

    fn cfg() -> VmSettings {
        let mut c = Config::embedded().vm;
        c.vcpus = 1;
        c.memory_mib = 256;
        c.max_vcpus = 4;
        c.max_memory_mib = 1024;
        c
    }

    fn ann(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nothing_asked_gives_the_base() {
        assert_eq!(
            size_for(&cfg(), &HashMap::new(), None),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
    }

    #[test]
    fn cri_sandbox_limits_add_to_the_base() {
        let a = ann(&[
            (CRI_CPU_QUOTA, "150000"),
            (CRI_CPU_PERIOD, "100000"),
            (CRI_MEMORY, "134217728"),
        ]);
        assert_eq!(
            size_for(&cfg(), &a, None),
            VmSize {
                vcpus: 3,
                memory_mib: 384
            }
        );
    }

    #[test]
    fn a_lone_containers_limits_count() {
        let r = LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .quota(200000i64)
                    .period(100000u64)
                    .build()
                    .unwrap(),
            )
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(64i64 << 20)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        assert_eq!(
            size_for(&cfg(), &HashMap::new(), Some(&r)),
            VmSize {
                vcpus: 3,
                memory_mib: 320
            }
        );
    }

    #[test]
    fn explicit_annotations_win_but_stay_within_limits() {
        let a = ann(&[(ANNOTATION_VCPUS, "2"), (ANNOTATION_MEMORY_MIB, "512")]);
        assert_eq!(
            size_for(&cfg(), &a, None),
            VmSize {
                vcpus: 2,
                memory_mib: 512
            }
        );
        let a = ann(&[(ANNOTATION_VCPUS, "64"), (ANNOTATION_MEMORY_MIB, "999999")]);
        assert_eq!(
            size_for(&cfg(), &a, None),
            VmSize {
                vcpus: 4,
                memory_mib: 1024
            }
        );
        let a = ann(&[(ANNOTATION_VCPUS, "-3"), (ANNOTATION_MEMORY_MIB, "1")]);
        assert_eq!(
            size_for(&cfg(), &a, None),
            VmSize {
                vcpus: 1,
                memory_mib: 64
            }
        );
    }

    #[test]
    fn garbage_annotations_are_ignored() {
        let a = ann(&[
            (CRI_CPU_QUOTA, "lots"),
            (CRI_CPU_PERIOD, "100000"),
            (CRI_MEMORY, "x"),
        ]);
        assert_eq!(
            size_for(&cfg(), &a, None),
            size_for(&cfg(), &HashMap::new(), None)
        );
    }
}
