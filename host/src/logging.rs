//! Log output on stderr, filtered like `RUST_LOG`: lines for people, or
//! JSON objects for a log shipper.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-11-25T21:46:33Z  INFO request{module=fib ...}: served`
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `message` and
    /// the event's fields at the top level, and the fields of the spans it
    /// happened in (a request's `module`, `correlation_id`, `version`,
    /// `trace_id`) under `span`.
    Json,
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax
/// (`info`, `wasmrpc=debug,lapin=warn`, ...).
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|error| anyhow::anyhow!("invalid log filter {filter:?}: {error}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // By default a failed write is reported with `eprintln!`, which
        // panics when stderr is a closed pipe: a node must outlive its log reader.
        .log_internal_errors(false);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            // The request's fields merged from all its spans, in one object.
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("failed to install the logger: {error}"))
}
