//! The spec's process settings take effect, or are refused with an error
//! that names them: seccomp, capabilities, user and groups, cwd, env,
//! umask, rlimits and oomScoreAdj; and what every process gets whatever
//! the spec says, such as address space randomization.

use serde_json::json;

use crate::agent::{sh, status_of, Agent, ALL_CAPS};
use crate::procfs::cap_sys_resource;

#[tokio::test]
async fn seccomp_rule_denies_mkdir_with_eperm() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let mut s = sh(&a, "mkdir /tmp/denied");
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{ "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }]
    });
    let (exit, _, err) = a.run_to_end("sec", &s).await;
    assert_eq!(exit.exit_status, 1);
    assert!(err.contains("Operation not permitted"), "stderr: {err:?}");
    let (exit, _, _) = a.run_to_end("nosec", &sh(&a, "mkdir /tmp/allowed")).await;
    assert_eq!(exit.exit_status, 0);
}

/// The agent starts each container init without address space
/// randomization, so that TCG reuses its translated code; the init must turn
/// it back on before it executes the container's process or an exec.
#[tokio::test]
async fn containers_and_execs_run_with_address_randomization() {
    let Some(a) = Agent::start().await else {
        return;
    };
    // 0x0040000 is ADDR_NO_RANDOMIZE; 00000000 is plain Linux.
    let show = "cat /proc/self/personality";
    let (exit, out, err) = a.run_to_end("aslr", &sh(&a, show)).await;
    assert_eq!((exit.exit_status, out.as_str()), (0, "00000000\n"), "{err}");
    a.run("aslr-exec", &sh(&a, "exec sleep 100")).await;
    a.exec("aslr-exec", "e", &["sh", "-c", show], false)
        .await
        .unwrap();
    assert_eq!(a.read_all("aslr-exec", "e", false).await, "00000000\n");
    assert_eq!(a.wait("aslr-exec", "e").await.exit_status, 0);
    a.signal("aslr-exec", "", 9).await;
    a.wait("aslr-exec", "").await;
    a.remove("aslr-exec").await;
}

#[tokio::test]
async fn a_dropped_cap_chown_prevents_chown() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let script = "touch /tmp/f && chown 65534 /tmp/f";
    let (exit, _, _) = a.run_to_end("chown-ok", &sh(&a, script)).await;
    assert_eq!(exit.exit_status, 0, "chown works with CAP_CHOWN");
    let mut s = sh(&a, script);
    let caps: Vec<&str> = ALL_CAPS
        .iter()
        .copied()
        .filter(|c| *c != "CAP_CHOWN")
        .collect();
    for set in ["bounding", "effective", "permitted"] {
        s["process"]["capabilities"][set] = json!(caps);
    }
    let (exit, _, err) = a.run_to_end("chown-denied", &s).await;
    assert_ne!(exit.exit_status, 0);
    assert!(err.contains("Operation not permitted"), "stderr: {err:?}");
}

#[tokio::test]
async fn user_groups_cwd_env_umask_and_rlimits_apply() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let mut s = sh(
        &a,
        "id -u; id -g; id -G; pwd; echo $FOO; umask; ulimit -n; grep CapEff /proc/self/status",
    );
    s["process"]["user"] =
        json!({ "uid": 65534, "gid": 65534, "additionalGids": [10, 20], "umask": 23 });
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    s["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "hard": 512, "soft": 256 }]);
    s["process"]["capabilities"] = json!({
        "bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"],
        // A non-root process keeps capabilities across execve only as ambient.
        "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]
    });
    let (exit, out, err) = a.run_to_end("user", &s).await;
    assert_eq!(exit.exit_status, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..7],
        [
            "65534",
            "65534",
            "65534 10 20",
            "/tmp",
            "bar",
            "0027",
            "256"
        ],
        "{out}"
    );
    // CAP_KILL is bit 5.
    assert_eq!(
        lines[7].split_whitespace().nth(1),
        Some("0000000000000020"),
        "{out}"
    );
}

#[tokio::test]
async fn a_refused_rlimit_raise_is_an_error_naming_it() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", a.pid())).unwrap();
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| h.parse().ok())
        .unwrap();
    let mut s = sh(&a, "ulimit -Hn");
    s["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "hard": hard + 1, "soft": 1024 }]);
    if cap_sys_resource(a.pid()) {
        let (exit, out, _) = a.run_to_end("rlimit", &s).await;
        assert_eq!(
            (exit.exit_status, out.trim().to_string()),
            (0, (hard + 1).to_string())
        );
    } else {
        let (code, msg) = status_of(&a.create("rlimit", &s, false).await.unwrap_err());
        assert!(
            msg.contains("RLIMIT_NOFILE") && msg.contains("CAP_SYS_RESOURCE"),
            "{code:?} {msg}"
        );
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
        a.health().await;
    }
}

#[tokio::test]
async fn a_refused_oom_score_adj_is_an_error_naming_it() {
    let Some(a) = Agent::start().await else {
        return;
    };
    let mut s = sh(&a, "cat /proc/self/oom_score_adj");
    s["process"]["oomScoreAdj"] = json!(-999);
    if cap_sys_resource(a.pid()) {
        let (exit, out, _) = a.run_to_end("oom", &s).await;
        assert_eq!((exit.exit_status, out.trim()), (0, "-999"));
    } else {
        let (code, msg) = status_of(&a.create("oom", &s, false).await.unwrap_err());
        assert!(
            msg.contains("oomScoreAdj") && msg.contains("-999"),
            "{code:?} {msg}"
        );
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
        a.health().await;
    }
}
