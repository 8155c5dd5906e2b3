//! Docker and Podman benchmark (printed, not asserted): wall time of
//! `run --rm --network=none IMAGE true`, p50/p99 over N runs, for each
//! engine under runc and, when asked, under a second runtime in the same
//! run. The engines are the tests' private ones (tests/src/engines.rs), in
//! a network namespace of their own; each engine's first run is a warm-up
//! and is not counted.
//!
//! `cargo run -p nutshell-tests --example engine_bench [RUNS] [second]`
//! (as root; `second` adds the runtime at `$NUTSHELL_RUNC_BIN`, by default
//! the workspace's nutshell-runc, twice: booting cold, and claiming from a
//! warm pool of the engine's own, each run once the pool has refilled;
//! `tools/bench/engines.sh` builds and runs it).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nutshell_tests::containerd::{runc_cli_binary, TEST_POOL_ENV};
use nutshell_tests::engines::{text, Engine, Kind, Runtime, RUNC};
use nutshell_tests::{host_summary, percentile_ms};

/// The first line of `program --version`.
fn version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| text(&o.stdout).lines().next().unwrap_or("?").to_string())
        .unwrap_or_else(|e| format!("{program}: {e}"))
}

/// `runs` timed runs of `true` on a fresh engine, after one warm-up run.
fn measure(kind: Kind, runtime: Runtime, runs: usize) -> Result<Vec<Duration>, String> {
    let e = Engine::start(kind, runtime).ok_or("a prerequisite is missing (see SKIP above)")?;
    let args = e.run_args(&["--rm", "--network=none"], &["true"]);
    let mut times = Vec::with_capacity(runs);
    for i in 0..=runs {
        e.wait_pool_warm()?;
        // Not through Engine::output, whose polling would round the times.
        let t = Instant::now();
        let out = e.cmd(&args).output().map_err(|err| err.to_string())?;
        let took = t.elapsed();
        if !out.status.success() {
            return Err(format!(
                "{} run {i} failed ({}): {}\n{}",
                e.name(),
                out.status,
                text(&out.stderr),
                e.log_tail(20)
            ));
        }
        if i > 0 {
            times.push(took);
        }
    }
    if let Some(claims) = e.pool_claims() {
        if claims < runs + 1 {
            return Err(format!(
                "{}: {claims} of {} runs claimed a warm VM",
                e.name(),
                runs + 1
            ));
        }
    }
    e.finish();
    Ok(times)
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let runs: usize = match args.next() {
        Some(a) => a
            .parse()
            .map_err(|_| format!("RUNS must be a number: {a:?}"))?,
        None => 20,
    };
    let mut runtimes = vec![(Runtime::Runc, RUNC.to_string(), false)];
    if args.next().as_deref() == Some("second") {
        let bin = runc_cli_binary().ok_or("no second runtime: set NUTSHELL_RUNC_BIN")?;
        let bin = bin.display().to_string();
        runtimes.push((Runtime::Nutshell, bin.clone(), false));
        runtimes.push((Runtime::Nutshell, bin, true));
    }
    println!("host: {}", host_summary());
    println!("{}; {}", version("podman"), version("dockerd"));
    println!(
        "\n{:<7} {:<60} {:>8} {:>8}  (run --rm --network=none IMAGE true, {runs} runs each)",
        "engine", "runtime", "p50_ms", "p99_ms"
    );
    for kind in [Kind::Podman, Kind::Docker] {
        for (runtime, path, pool) in &runtimes {
            // Read by Engine::start (with_test_pool); one thread so far.
            if *pool {
                std::env::set_var(TEST_POOL_ENV, "1");
            } else {
                std::env::remove_var(TEST_POOL_ENV);
            }
            let mut times = measure(kind, *runtime, runs)?;
            let name = Path::new(path)
                .file_name()
                .map_or(path.as_str(), |n| n.to_str().unwrap_or(path.as_str()));
            let how = match (runtime, pool) {
                (Runtime::Runc, _) => "",
                (_, false) => " cold",
                (_, true) => " pool",
            };
            println!(
                "{:<7} {:<60} {:>8.0} {:>8.0}",
                format!("{kind:?}").to_lowercase(),
                format!("{name}{how} ({path})"),
                percentile_ms(&mut times, 50),
                percentile_ms(&mut times, 99)
            );
        }
    }
    Ok(())
}
