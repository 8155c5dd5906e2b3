//! The process's rlimits (init side). A refused raise (raising a hard limit
//! needs CAP_SYS_RESOURCE) is an error that names the limit.

use oci_spec::runtime::{PosixRlimitType, Process};

use super::channel::InitErrorKind;
use super::init::{InitError, InitResult};

fn resource(t: PosixRlimitType) -> Option<libc::__rlimit_resource_t> {
    Some(match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

/// Sets every rlimit of `process`.
pub fn apply(process: &Process) -> InitResult<()> {
    for r in process.rlimits().as_deref().unwrap_or_default() {
        let name = serde_json::to_string(&r.typ())
            .unwrap_or_default()
            .trim_matches('"')
            .to_string();
        let res = resource(r.typ())
            .ok_or_else(|| InitError::unsupported(format!("rlimit {name} is not supported")))?;
        let lim = libc::rlimit {
            rlim_cur: r.soft(),
            rlim_max: r.hard(),
        };
        // SAFETY: setrlimit reads the rlimit struct we own.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            let e = nix::Error::last();
            let (kind, hint) = if e == nix::Error::EPERM {
                (
                    InitErrorKind::PermissionDenied,
                    " (raising a hard limit needs CAP_SYS_RESOURCE)",
                )
            } else {
                (InitErrorKind::Invalid, "")
            };
            return Err(InitError::new(
                kind,
                format!(
                    "setting {name} to soft {} hard {} was refused: {e}{hint}",
                    r.soft(),
                    r.hard()
                ),
            ));
        }
    }
    Ok(())
}
