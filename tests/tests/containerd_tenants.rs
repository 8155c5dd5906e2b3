//! Pods that share an id but not an owner: the same container id in two
//! namespaces of one containerd, and under two containerds, started at
//! once. Each runs in its own VM with its own state and gives its own
//! output, and nothing is left afterwards.

use std::process::{Output, Stdio};
use std::time::Duration;

use nutshell_tests::containerd::{
    output_with_timeout, start_test, test_nutshell_config, Containerd, BUSYBOX_IMAGE,
    NUTSHELL_RUNTIME,
};

/// How long a test gives nutshell to clean up before checking.
const SETTLE: Duration = Duration::from_secs(30);

/// The id every pod of these tests has.
const ID: &str = "same";

/// `ctr -n ns run --rm` of `echo <word>` as task [`ID`].
fn run_echo(c: &Containerd, ns: &str, word: &str) -> Output {
    let args = [
        "run",
        "--rm",
        "--runtime",
        NUTSHELL_RUNTIME,
        BUSYBOX_IMAGE,
        ID,
        "echo",
        word,
    ];
    output_with_timeout(
        c.ctr_in(ns, &args).stdin(Stdio::null()),
        Duration::from_secs(300),
    )
    .expect("ctr run finishes")
}

fn assert_echoed(out: &Output, word: &str, c: &Containerd) {
    assert!(
        out.status.success(),
        "{word}: ctr run failed: {}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.log_tail(80)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), word);
}

#[test]
fn one_id_in_two_namespaces_runs_twice_at_once() {
    let Some((_g, c, before)) = start_test(&test_nutshell_config("")) else {
        return;
    };
    for ns in ["alpha", "beta"] {
        c.import_images(ns).expect("images import");
    }
    assert_ne!(c.pod_dir("alpha", ID), c.pod_dir("beta", ID));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_echo(&c, "alpha", "from-alpha"));
        let b = s.spawn(|| run_echo(&c, "beta", "from-beta"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_echoed(&a, "from-alpha", &c);
    assert_echoed(&b, "from-beta", &c);
    c.assert_left_nothing(&before, SETTLE);
}

#[test]
fn one_id_in_one_namespace_of_two_containerds_runs_twice_at_once() {
    let Some((_g, c1, before)) = start_test(&test_nutshell_config("")) else {
        return;
    };
    let c2 = Containerd::start(&test_nutshell_config("")).expect("a second containerd starts");
    let ns = nutshell_tests::containerd::NAMESPACE;
    assert_ne!(c1.pod_dir(ns, ID), c2.pod_dir(ns, ID));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_echo(&c1, ns, "from-first"));
        let b = s.spawn(|| run_echo(&c2, ns, "from-second"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_echoed(&a, "from-first", &c1);
    assert_echoed(&b, "from-second", &c2);
    drop(c2);
    c1.assert_left_nothing(&before, SETTLE);
}
