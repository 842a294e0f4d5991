//! Log output: human-readable lines on stderr, filtered like `RUST_LOG`.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax
/// (`info`, `wasmrpc=debug,lapin=warn`, ...).
pub fn init(filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|error| anyhow::anyhow!("invalid log filter {filter:?}: {error}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // By default a failed write is reported with `eprintln!`, which
        // panics when stderr is a closed pipe: a node must outlive its log reader.
        .log_internal_errors(false)
        .try_init()
        .map_err(|error| anyhow::anyhow!("failed to install the logger: {error}"))
}
