//! What every subcommand shares: the global flags ([`Global`]), the one
//! way a command fails ([`Failure`], which alone decides the exit status),
//! the async runtime, and reading a request body and printing a reply.

use std::io::{IsTerminal as _, Read as _};
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use crate::amqp::{self, Broker, Brokers};
use crate::units::Bytes;
use crate::wire;

/// The flags every subcommand takes.
#[derive(Debug, Args)]
pub(super) struct Global {
    /// Broker to connect to. Give several (repeat the flag, or separate them
    /// with commas) for the nodes of a RabbitMQ cluster: they are tried in
    /// turn, at start and whenever the connection is lost. A URL without
    /// `?heartbeat=N` gets a 5 s heartbeat, so a dead connection is noticed
    /// within 12.5 s.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        value_delimiter = ',',
        default_value = amqp::DEFAULT_URL,
        value_parser = clap::value_parser!(Broker),
    )]
    pub(super) amqp_url: Vec<Broker>,

    /// Exchange that requests are published to; every name the node declares
    /// on the broker derives from it.
    #[arg(long, global = true, env = "WASMRPC_EXCHANGE", default_value = wire::DEFAULT_EXCHANGE)]
    pub(super) exchange: String,

    /// Log filter, in RUST_LOG syntax (e.g. `debug`, `wasmrpc=debug,lapin=warn`).
    /// Defaults to `info,lapin=off` for `serve` and `warn,lapin=off` otherwise.
    #[arg(long, global = true, env = "RUST_LOG")]
    pub(super) log: Option<String>,

    /// Log lines as text for people, or as JSON objects (one a line, with
    /// the fields of their spans: a request's module, correlation id,
    /// version and trace id) for a log shipper.
    #[arg(long, global = true, env = "WASMRPC_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Text)]
    pub(super) log_format: LogFormatArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum LogFormatArg {
    Text,
    Json,
}

impl Global {
    /// The brokers, checked: a malformed URL is bad usage.
    pub(super) fn brokers(&self) -> Result<Brokers, Failure> {
        Brokers::try_from(self.amqp_url.clone())
            .map_err(|error| Failure::Usage(anyhow::anyhow!("--amqp-url: {error}")))
    }
}

/// Why a command failed. The only place that turns a failure into an exit
/// status and an error message.
#[derive(Debug)]
pub(super) enum Failure {
    /// The module (or the node for it) answered with an error reply: exit 1,
    /// `error (KIND): MESSAGE` on stderr.
    Reply { kind: String, message: String },
    /// The command could not do its work: exit 1.
    Failed(anyhow::Error),
    /// The command line or its input is wrong: exit 2.
    Usage(anyhow::Error),
    /// Nothing answered in time: exit 3.
    Timeout(anyhow::Error),
    /// The broker could not be reached or refused the request: exit 4.
    Broker(anyhow::Error),
    /// A second stop signal cut a node's drain short: exit 130, as a shell
    /// reports a process ended by SIGINT.
    Interrupted,
}

impl Failure {
    pub(super) fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Failure::Reply { .. } | Failure::Failed(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Timeout(_) => 3,
            Failure::Broker(_) => 4,
            Failure::Interrupted => 130,
        })
    }

    pub(super) fn report(&self) {
        match self {
            Failure::Reply { kind, message } => eprintln!("error ({kind}): {message}"),
            Failure::Interrupted => {}
            Failure::Failed(error)
            | Failure::Usage(error)
            | Failure::Timeout(error)
            | Failure::Broker(error) => eprintln!("error: {error:#}"),
        }
    }
}

/// Runs a command on a multi-threaded runtime of the default size.
pub(super) fn block_on(command: impl Future<Output = Result<(), Failure>>) -> Result<(), Failure> {
    runtime(None)?.block_on(command)
}

pub(super) fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, Failure> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    builder.enable_all().build().map_err(|error| {
        Failure::Failed(anyhow::anyhow!(
            "failed to start the async runtime: {error}"
        ))
    })
}

pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    Bytes::parse(text).map(|Bytes(n)| n)
}

/// The request body: the argument, `-` for stdin, or empty.
pub(super) fn read_input(arg: Option<&str>) -> Result<Vec<u8>, Failure> {
    match arg {
        Some("-") => {
            let mut stdin = std::io::stdin().lock();
            if stdin.is_terminal() {
                eprintln!("reading the request body from stdin; end it with Ctrl-D");
            }
            let mut input = Vec::new();
            stdin.read_to_end(&mut input).map_err(|error| {
                Failure::Usage(anyhow::anyhow!(
                    "failed to read the request body from stdin: {error}"
                ))
            })?;
            Ok(input)
        }
        Some(arg) => Ok(arg.as_bytes().to_vec()),
        None => Ok(Vec::new()),
    }
}

/// Prints a reply body: exactly with `raw`, else with a final newline.
pub(super) fn print_body(body: &[u8], raw: bool) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let newline = !raw && !body.ends_with(b"\n");
    stdout
        .write_all(body)
        .and_then(|()| {
            if newline {
                stdout.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| stdout.flush())
        .map_err(|error| Failure::Failed(anyhow::anyhow!("failed to write the reply: {error}")))
}
