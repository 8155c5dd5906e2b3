//! Reliability under load: eight pods at once through one private
//! containerd. Each `ctr run --rm` boots its own microVM (here QEMU/TCG,
//! 256 MiB and about 1 s of CPU to boot), computes its own output and exits
//! with its own status. All eight must be right, and nothing may be left
//! behind: no task, container, VM process, mount or state directory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nutshell_tests::containerd::{start_test, test_nutshell_config_dialing, Footprint};

const PODS: u32 = 8;

/// Eight TCG boots share the 2 cores of these machines, so each takes up to
/// eight times as long to reach its agent as one alone (1–2 s). Below the
/// 180 s that `run_nutshell` gives `ctr`, so a slow agent is the shim's
/// clear error rather than a killed `ctr`.
const DIAL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long nutshell gets to clean up eight pods before the leak check.
const SETTLE: Duration = Duration::from_secs(60);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Counts the QEMU processes serving pods every 200 ms until `done`;
/// returns the most seen at once.
fn peak_vms(done: &AtomicBool) -> usize {
    let mut peak = 0;
    while !done.load(Ordering::Relaxed) {
        let vms = Footprint::now()
            .processes
            .iter()
            .filter(|(_, name)| name == "qemu-system-x86_64")
            .count();
        peak = peak.max(vms);
        std::thread::sleep(Duration::from_millis(200));
    }
    peak
}

#[test]
fn eight_pods_at_once_each_get_their_own_output_and_exit_code() {
    let Some((_g, c, before)) = start_test(&test_nutshell_config_dialing("", DIAL_TIMEOUT)) else {
        return;
    };
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let (results, peak) = std::thread::scope(|s| {
        let watcher = s.spawn(|| peak_vms(&done));
        let pods: Vec<_> = (1..=PODS)
            .map(|n| {
                let c = &c;
                s.spawn(move || {
                    let script = format!("echo $(({n} * {n})); exit {n}");
                    let t0 = Instant::now();
                    let out = c.run_nutshell(&format!("parallel{n}"), &[], &["sh", "-c", &script]);
                    (n, out, t0.elapsed())
                })
            })
            .collect();
        let results: Vec<_> = pods
            .into_iter()
            .map(|p| p.join().expect("pod thread"))
            .collect();
        done.store(true, Ordering::Relaxed);
        (results, watcher.join().expect("watcher thread"))
    });
    let wall = start.elapsed();

    for (n, out, took) in &results {
        let out = out
            .as_ref()
            .unwrap_or_else(|e| panic!("pod {n} after {took:?}: {e}\n{}", c.log_tail(80)));
        assert_eq!(
            out.status.code(),
            Some(*n as i32),
            "pod {n}: the exit status is the pod's own; stderr: {}\n{}",
            text(&out.stderr),
            c.log_tail(80)
        );
        assert_eq!(
            text(&out.stdout).trim(),
            (n * n).to_string(),
            "pod {n}: the output is the pod's own; stderr: {}",
            text(&out.stderr)
        );
    }
    let mut took: Vec<f64> = results.iter().map(|(_, _, t)| t.as_secs_f64()).collect();
    took.sort_by(f64::total_cmp);
    eprintln!(
        "{PODS} pods at once on {} CPUs: wall {:.1} s; per pod min {:.1} s, max {:.1} s; \
         at most {peak} VMs at once",
        std::thread::available_parallelism().map_or(0, usize::from),
        wall.as_secs_f64(),
        took[0],
        took[took.len() - 1],
    );
    assert!(
        peak > 1,
        "the pods ran one after another (at most {peak} VM at once), not in parallel"
    );

    assert_eq!(
        c.ctr_ok(&["tasks", "ls", "-q"]).unwrap().trim(),
        "",
        "tasks left"
    );
    assert_eq!(
        c.ctr_ok(&["containers", "ls", "-q"]).unwrap().trim(),
        "",
        "containers left"
    );
    c.assert_left_nothing(&before, SETTLE);
}
