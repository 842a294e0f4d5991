//! `scripts/bench` in quick mode, end to end: every figure is made, and
//! every call the bench made was answered right. It asserts no timing: the
//! numbers are for people, on a quiet machine (`scripts/bench`).

use crate::support::compare::{self, Settings};

#[tokio::test(flavor = "multi_thread")]
async fn the_bench_runs_end_to_end_and_every_reply_is_right() {
    let comparison = compare::run(Settings::QUICK).await;
    let table = comparison.table();
    for report in &comparison.reports {
        assert!(report.calls > 0, "a bench made no call:\n{table}");
        assert!(report.clean(), "{report}\n{table}");
    }
    for row in [
        "calls/s, 64 in flight, fib(10)",
        "p50 latency ms, 1 in flight",
        "naive recursive fib(25)",
        "CPU µs per call",
        "sandbox µs per call in-process, import-free",
        "RSS MiB, idle",
        "peak RSS MiB per request",
        "burst",
    ] {
        assert!(table.contains(row), "no row {row:?} in\n{table}");
    }
    println!("{table}");
}
