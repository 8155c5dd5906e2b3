//! Start-up timing for the benchmark: how long from process start to the
//! first `KVM_RUN`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();
static REPORT: AtomicBool = AtomicBool::new(false);
static REPORTED: AtomicBool = AtomicBool::new(false);

/// Records the process start (call first thing in `main`).
pub fn mark_process_start() {
    let _ = START.set(Instant::now());
}

/// Whether to print the time of the first `KVM_RUN` on stderr.
pub fn set_report_first_run(on: bool) {
    REPORT.store(on, Ordering::Relaxed);
}

/// Called by each vCPU right before its first `KVM_RUN`; reports once.
pub fn first_run() {
    if REPORT.load(Ordering::Relaxed) && !REPORTED.swap(true, Ordering::Relaxed) {
        if let Some(s) = START.get() {
            eprintln!("first KVM_RUN {} us after start", s.elapsed().as_micros());
        }
    }
}

/// Prints `what` with the time since process start (with `--print-timing`).
pub fn report(what: &str) {
    if REPORT.load(Ordering::Relaxed) {
        if let Some(s) = START.get() {
            eprintln!("{what} {} us after start", s.elapsed().as_micros());
        }
    }
}
