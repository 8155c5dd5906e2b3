//! The spec's seccomp profile: compiled to BPF by the agent with
//! `seccompiler` (pure Rust, no libseccomp), installed by the init.
//!
//! OCI profiles give each syscall rule its own action; a `seccompiler`
//! filter has one match and one mismatch action. The profile becomes a
//! stack of filters, which the kernel evaluates together, taking the most
//! severe result:
//! - a base filter: every listed syscall (with its argument conditions)
//!   → allow, anything else → the default action;
//! - per non-allow action, a filter: its syscalls → that action, anything
//!   else → allow.
//!
//! Syscall names this architecture lacks are dropped, as libseccomp does.
//! Only x86_64 programs are built; other architectures' syscalls hit the
//! filters' architecture check.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{SeccompAction, TargetArch};
use serde_json::{json, Value};

use super::config::BpfInsn;
use super::init::{InitError, InitResult};

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, String> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActTrace => {
            SeccompAction::Trace(errno.unwrap_or(libc::EPERM as u32))
        }
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActNotify => {
            return Err("seccomp action SCMP_ACT_NOTIFY is not supported".into())
        }
    })
}

fn action_json(a: &SeccompAction) -> Value {
    match a {
        SeccompAction::Allow => json!("allow"),
        SeccompAction::Errno(n) => json!({ "errno": n }),
        SeccompAction::KillThread => json!("kill_thread"),
        SeccompAction::KillProcess => json!("kill_process"),
        SeccompAction::Log => json!("log"),
        SeccompAction::Trace(n) => json!({ "trace": n }),
        SeccompAction::Trap => json!("trap"),
    }
}

/// A syscall rule: `None` conditions mean "always".
type Rules = BTreeMap<String, Option<Vec<Vec<Value>>>>;

fn add_rule(rules: &mut Rules, name: &str, conds: Option<Vec<Value>>) {
    let entry = rules
        .entry(name.to_string())
        .or_insert_with(|| Some(Vec::new()));
    match (entry.as_mut(), conds) {
        // An unconditional rule wins over conditional ones.
        (_, None) => *entry = None,
        (Some(list), Some(c)) => list.push(c),
        (None, Some(_)) => {}
    }
}

fn rules_json(rules: &Rules) -> Vec<Value> {
    let mut out = Vec::new();
    for (name, conds) in rules {
        match conds {
            None => out.push(json!({ "syscall": name })),
            Some(list) if list.is_empty() => out.push(json!({ "syscall": name })),
            Some(list) => out.extend(list.iter().map(|c| json!({ "syscall": name, "args": c }))),
        }
    }
    out
}

fn compile_one(
    mismatch: &SeccompAction,
    matched: &SeccompAction,
    rules: &mut Rules,
) -> Result<Vec<BpfInsn>, String> {
    // Drop names this architecture does not know, one at a time.
    for _ in 0..1024 {
        let doc = json!({ "f": { "mismatch_action": action_json(mismatch), "match_action": action_json(matched), "filter": rules_json(rules) } });
        let text = doc.to_string();
        match seccompiler::compile_from_json(text.as_bytes(), TargetArch::x86_64) {
            Ok(mut map) => {
                let prog = map.remove("f").unwrap_or_default();
                return Ok(prog.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect());
            }
            // seccompiler does not export its frontend error type nor its
            // syscall table, so the unknown name is read off the message.
            Err(seccompiler::Error::JsonFrontend(e))
                if unknown_syscall(&e.to_string()).is_some() =>
            {
                let msg = e.to_string();
                let name = unknown_syscall(&msg).unwrap_or_default();
                if rules.remove(name).is_none() {
                    return Err(format!("seccomp: unknown syscall {name}"));
                }
            }
            Err(e) => return Err(format!("compiling the seccomp profile: {e}")),
        }
    }
    Err("compiling the seccomp profile: too many unknown syscalls".into())
}

fn unknown_syscall(msg: &str) -> Option<&str> {
    msg.strip_prefix("Invalid syscall name: ")?
        .split(" for given arch")
        .next()
}

/// Compiles the spec's profile to a stack of BPF programs (agent side; an
/// error here is the caller's INVALID_ARGUMENT).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<Vec<BpfInsn>>, String> {
    if profile.listener_path().is_some() {
        return Err("seccomp listenerPath (user notification) is not supported".into());
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut all: Rules = BTreeMap::new();
    let mut groups: Vec<(SeccompAction, Rules)> = Vec::new();
    for sc in profile.syscalls().as_deref().unwrap_or_default() {
        let act = action(sc.action(), sc.errno_ret())?;
        let conds = match sc.args() {
            None => None,
            Some(args) if args.is_empty() => None,
            Some(args) => Some(
                args.iter()
                    .map(|a| {
                        let (op, val) = match a.op() {
                            LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), a.value()),
                            LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), a.value()),
                            LinuxSeccompOperator::ScmpCmpLe => (json!("le"), a.value()),
                            LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), a.value()),
                            LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), a.value()),
                            LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), a.value()),
                            LinuxSeccompOperator::ScmpCmpMaskedEq => (
                                json!({ "masked_eq": a.value() }),
                                a.value_two().unwrap_or(0),
                            ),
                        };
                        json!({ "index": a.index(), "type": "qword", "op": op, "val": val })
                    })
                    .collect::<Vec<_>>(),
            ),
        };
        for name in sc.names() {
            add_rule(&mut all, name, conds.clone());
            if act != SeccompAction::Allow {
                let idx = match groups.iter().position(|(a, _)| *a == act) {
                    Some(i) => i,
                    None => {
                        groups.push((act.clone(), BTreeMap::new()));
                        groups.len() - 1
                    }
                };
                add_rule(&mut groups[idx].1, name, conds.clone());
            }
        }
    }
    let mut progs = Vec::new();
    if default != SeccompAction::Allow {
        progs.push(compile_one(&default, &SeccompAction::Allow, &mut all)?);
    }
    for (act, mut rules) in groups {
        progs.push(compile_one(&SeccompAction::Allow, &act, &mut rules)?);
    }
    Ok(progs)
}

/// Installs the programs (init side). Hand-written instead of
/// `seccompiler::apply_filter`, which always sets no_new_privileges: the
/// spec decides that, and without it CAP_SYS_ADMIN lets us install.
pub fn apply(progs: &[Vec<BpfInsn>]) -> InitResult<()> {
    for prog in progs {
        let insns: Vec<libc::sock_filter> = prog
            .iter()
            .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
            .collect();
        let len = u16::try_from(insns.len())
            .map_err(|_| InitError::invalid("the seccomp program is too long"))?;
        let fprog = libc::sock_fprog {
            len,
            filter: insns.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the kernel copies the program from `fprog`, which points
        // at `insns`, alive for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(InitError::internal(format!(
                "installing the seccomp filter: {}",
                nix::Error::last()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_compiles_to_stacked_filters() {
        let profile: LinuxSeccomp = serde_json::from_value(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                { "names": ["mkdir", "mkdirat", "no_such_syscall_xyz"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 },
                { "names": ["personality"], "action": "SCMP_ACT_ERRNO", "args": [{ "index": 0, "value": 8, "op": "SCMP_CMP_EQ" }] }
            ]
        }))
        .expect("profile");
        let progs = compile(&profile).expect("compiles");
        assert_eq!(progs.len(), 1, "allow default: only the errno group");
        assert!(progs[0].len() > 5);

        let deny_default: LinuxSeccomp = serde_json::from_value(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{ "names": ["read", "write"], "action": "SCMP_ACT_ALLOW" }]
        }))
        .expect("profile");
        assert_eq!(compile(&deny_default).expect("compiles").len(), 1);
    }

    #[test]
    fn notify_is_refused() {
        let p: LinuxSeccomp =
            serde_json::from_value(json!({ "defaultAction": "SCMP_ACT_NOTIFY" })).expect("profile");
        assert!(compile(&p).unwrap_err().contains("NOTIFY"));
    }
}
