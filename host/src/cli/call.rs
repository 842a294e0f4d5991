//! `wasmrpc call`: call a module once and print its reply.

use std::time::Duration;

use clap::Args;

use super::common::{Failure, Global, print_body, read_input};
use crate::client::{CallOptions, Client, ClientError};
use crate::trace::TraceParent;
use crate::units::parse_duration;

/// Call a module and print its reply.
///
/// The reply body goes to stdout. An error reply prints its kind and message
/// to stderr. The request carries a W3C `traceparent` (a new trace, or the
/// one given), so the node's log lines of the call carry its trace id.
///
/// Exit codes: 0 answered, 1 error reply, 2 bad usage, 3 no reply within
/// --timeout, 4 broker unreachable or request refused.
///
/// Examples: `wasmrpc call fib 30`; `echo 30 | wasmrpc call fib -`
#[derive(Debug, Args)]
pub(super) struct CallArgs {
    /// Module to call, e.g. `fib`.
    module: String,

    /// The request body, e.g. `30`. `-` reads it from stdin; omitted, the body is empty.
    #[arg(allow_hyphen_values = true)]
    arg: Option<String>,

    /// How long to wait for the reply, e.g. `30s`, `500ms`, `2m`.
    #[arg(long, env = "WASMRPC_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,

    /// Print the reply body exactly, without adding a final newline.
    #[arg(long)]
    raw: bool,

    /// Make the call part of this trace (a W3C `traceparent` value) instead
    /// of starting a new one.
    #[arg(long, env = "TRACEPARENT")]
    traceparent: Option<TraceParent>,
}

pub(super) async fn run(args: CallArgs, global: &Global) -> Result<(), Failure> {
    let brokers = global.brokers()?;
    let input = read_input(args.arg.as_deref())?;
    let client = Client::connect(&brokers, &global.exchange)
        .await
        .map_err(Failure::Broker)?;
    let options = CallOptions {
        traceparent: Some(args.traceparent.unwrap_or_else(TraceParent::new_trace)),
        ..CallOptions::default()
    };
    let reply = client
        .call_with(&args.module, &input, args.timeout, &options)
        .await
        .map_err(|error| match error {
            ClientError::Timeout(_) => Failure::Timeout(anyhow::anyhow!(
                "{error} from module {:?}: is a wasmrpc node running on {brokers}?",
                args.module,
            )),
            ClientError::Refused(why) => Failure::Broker(anyhow::anyhow!(
                "the broker refused the call of module {:?}: {why}",
                args.module,
            )),
            error => Failure::Broker(error.into()),
        })?;
    match reply.error {
        None => print_body(&reply.body, args.raw),
        Some(kind) => Err(Failure::Reply {
            kind,
            message: String::from_utf8_lossy(&reply.body).into_owned(),
        }),
    }
}
