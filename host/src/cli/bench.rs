//! `wasmrpc bench`: put a module under load and report.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::common::{Failure, Global};
use crate::bench::BenchConfig;
use crate::client::Client;
use crate::units::parse_duration;

/// Put a module under load: calls/s, latency percentiles, errors.
///
/// Runs `--concurrency` callers, each waiting for its reply before its next
/// call, for `--requests` calls in all or for `--duration`, and prints calls
/// answered a second, latency p50/p90/p99/max, errors by kind and replies
/// other than `--expect`. Requests go out with publisher confirms and a
/// `traceparent` each, and replies come by direct reply-to, as for `call`.
/// A progress bar shows on a terminal.
///
/// Example: `wasmrpc bench fib 10 --concurrency 64 --duration 10s --expect 55`
///
/// Exit codes: 0 every call answered right, 1 some were not, 2 bad usage,
/// 4 broker unreachable.
#[derive(Debug, Args)]
pub(super) struct BenchArgs {
    /// Module to call, e.g. `fib`.
    module: String,

    /// The request body of every call, e.g. `10`; omitted, the body is empty.
    #[arg(allow_hyphen_values = true)]
    arg: Option<String>,

    /// Calls to make in all, instead of calling for `--duration`.
    #[arg(short = 'n', long, conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,

    /// How long to call, e.g. `10s`, `1m`.
    #[arg(short = 'd', long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// Calls in flight at once.
    #[arg(long, short = 'c', default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,

    /// The reply every call should get; any other is counted wrong.
    #[arg(long)]
    expect: Option<String>,

    /// How long one call may wait for its reply.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,

    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(args: BenchArgs, global: &Global) -> Result<(), Failure> {
    let brokers = global.brokers()?;
    let client = Client::connect(&brokers, &global.exchange)
        .await
        .map_err(Failure::Broker)?;
    let config = BenchConfig {
        module: args.module,
        input: args.arg.unwrap_or_default().into_bytes(),
        requests: args.requests,
        duration: args.duration,
        concurrency: args.concurrency,
        expect: args.expect.map(String::into_bytes),
        timeout: args.timeout,
    };
    let bar = progress_bar(config.requests);
    let report = {
        let bar = bar.clone();
        crate::bench::run(Arc::new(client), &config, move || bar.inc(1)).await
    };
    bar.finish_and_clear();
    let summary = if args.json {
        serde_json::to_string_pretty(&report).expect("a report is JSON")
    } else {
        report.to_string()
    };
    // A reader that went away (`| head`) is no reason to panic.
    let _ = writeln!(std::io::stdout(), "{summary}");
    if report.clean() {
        Ok(())
    } else {
        Err(Failure::Failed(anyhow::anyhow!(
            "not every call was answered as expected"
        )))
    }
}

/// A bar on a terminal, nothing otherwise.
fn progress_bar(requests: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match requests {
        Some(requests) => ProgressBar::new(requests).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} calls, {per_sec}, {eta} left")
                .expect("a valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {elapsed} {pos} calls, {per_sec}")
                .expect("a valid template"),
        ),
    };
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}
