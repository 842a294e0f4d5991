//! A wasmrpc node against a native lapin peer with the same guarantees, in
//! one run against one broker: what `scripts/bench` prints. The table and
//! how each figure is made live in `tests/integration/support/compare.rs`,
//! which the test suite runs in quick mode.
//!
//! `cargo bench --bench compare [-- --quick]` (build the peer first:
//! `cargo build --release --example native_peer`).

#[path = "../../tests/integration/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::time::Duration;

use support::compare::{Settings, run};

/// A few minutes on 2 cores.
const FULL: Settings = Settings {
    duration: Duration::from_secs(5),
    cpu_calls: 20_000,
    sandbox_calls: 5_000,
    modules: 200,
    burst: 400,
    fan_out_jobs: 10,
    part_ms: 100,
    child_calls: 1000,
};

fn main() -> std::process::ExitCode {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let settings = if quick { Settings::QUICK } else { FULL };
    let tokio = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let comparison = tokio.block_on(run(settings));
    print!("{}", comparison.table());
    let unclean: Vec<_> = comparison
        .reports
        .iter()
        .filter(|report| !report.clean())
        .collect();
    if unclean.is_empty() {
        return std::process::ExitCode::SUCCESS;
    }
    for report in unclean {
        eprintln!("calls that were not answered right:\n{report}");
    }
    std::process::ExitCode::FAILURE
}
