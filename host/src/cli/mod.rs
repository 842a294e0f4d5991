//! The `wasmrpc` command line: flags and environment variables become a
//! validated configuration here, and nowhere else. One file per subcommand;
//! each returns `Result<(), Failure>`, and [`Failure`] alone decides the
//! exit status and prints the error.
//!
//! Exit statuses (also in README.md): 0 success; 1 the module answered with
//! an error, or the command failed (a node that stopped on an error, a bench
//! with wrong replies, a node not ready); 2 bad usage; 3 nothing answered in
//! time; 4 the broker could not be reached or refused the request.

mod bench;
mod call;
mod completions;
mod dead;
mod deploy;
mod fleet;
mod health;
mod new;
mod permissions;
mod run;
mod serve;
mod topology;

use std::io::{IsTerminal as _, Read as _};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::amqp::{self, Broker, Brokers};
use crate::logging::{self, LogFormat};
use crate::units::Bytes;
use crate::wire;

/// WebAssembly compute over RabbitMQ: serve modules as RPC, or call them.
///
/// A node consumes requests whose routing key names a module, runs that
/// module in a fresh sandbox and replies to the request's `reply_to` with its
/// `correlation_id`. Any AMQP client can call it; see README.md for the wire
/// contract.
///
/// Example: `wasmrpc serve --modules modules` on each machine, then `wasmrpc call fib 30`.
#[derive(Debug, Parser)]
#[command(name = "wasmrpc", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,

    #[command(flatten)]
    global: Global,
}

/// The flags every subcommand takes.
#[derive(Debug, Args)]
struct Global {
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
    amqp_url: Vec<Broker>,

    /// Exchange that requests are published to; every name the node declares
    /// on the broker derives from it.
    #[arg(long, global = true, env = "WASMRPC_EXCHANGE", default_value = wire::DEFAULT_EXCHANGE)]
    exchange: String,

    /// Log filter, in RUST_LOG syntax (e.g. `debug`, `wasmrpc=debug,lapin=warn`).
    /// Defaults to `info,lapin=off` for `serve` and `warn,lapin=off` otherwise.
    #[arg(long, global = true, env = "RUST_LOG")]
    log: Option<String>,

    /// Log lines as text for people, or as JSON objects (one a line, with
    /// the fields of their spans: a request's module, correlation id,
    /// version and trace id) for a log shipper.
    #[arg(long, global = true, env = "WASMRPC_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl Global {
    /// The brokers, checked: a malformed URL is bad usage.
    fn brokers(&self) -> Result<Brokers, Failure> {
        Brokers::try_from(self.amqp_url.clone())
            .map_err(|error| Failure::Usage(anyhow::anyhow!("--amqp-url: {error}")))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    Serve(serve::ServeArgs),
    Call(call::CallArgs),
    Run(run::RunArgs),
    Bench(bench::BenchArgs),
    Ping(fleet::PingArgs),
    Modules(fleet::ModulesArgs),
    Health(health::HealthArgs),
    New(new::NewArgs),
    Keygen(deploy::KeygenArgs),
    Deploy(deploy::DeployArgs),
    Undeploy(deploy::UndeployArgs),
    BrokerPermissions(permissions::PermissionsArgs),
    Dead(dead::DeadArgs),
    Topology(topology::TopologyArgs),
    Completions(completions::CompletionsArgs),
}

/// Why a command failed. The only place that turns a failure into an exit
/// status and an error message.
#[derive(Debug)]
enum Failure {
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
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Failure::Reply { .. } | Failure::Failed(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Timeout(_) => 3,
            Failure::Broker(_) => 4,
            Failure::Interrupted => 130,
        })
    }

    fn report(&self) {
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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        // lapin logs every broker error as it sees it; the node logs what it
        // did about each, once.
        Command::Serve(_) => "info,lapin=off",
        // The command reports its own errors; lapin would repeat them.
        _ => "warn,lapin=off",
    };
    let format = match cli.global.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    };
    let filter = cli.global.log.as_deref().unwrap_or(default_log);
    let outcome = logging::init(filter, format)
        .map_err(Failure::Usage)
        .and_then(|()| dispatch(cli.command, &cli.global));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            failure.report();
            failure.exit_code()
        }
    }
}

fn dispatch(command: Command, global: &Global) -> Result<(), Failure> {
    match command {
        Command::Serve(args) => serve::run(args, global),
        Command::Call(args) => block_on(call::run(args, global)),
        Command::Run(args) => block_on(run::run(args)),
        Command::Bench(args) => block_on(bench::run(args, global)),
        Command::Ping(args) => block_on(fleet::run(args.flags, global, false)),
        Command::Modules(args) => block_on(fleet::run(args.flags, global, true)),
        Command::Health(args) => health::run(args),
        Command::New(args) => new::run(args),
        Command::Keygen(args) => deploy::keygen(args),
        Command::Deploy(args) => block_on(deploy::deploy(args, global)),
        Command::Undeploy(args) => block_on(deploy::undeploy(args, global)),
        Command::BrokerPermissions(args) => permissions::run(args, global),
        Command::Dead(args) => block_on(dead::run(args, global)),
        Command::Topology(args) => block_on(topology::run(args, global)),
        Command::Completions(args) => completions::run(args),
    }
}

/// Runs a command on a multi-threaded runtime of the default size.
fn block_on(command: impl Future<Output = Result<(), Failure>>) -> Result<(), Failure> {
    runtime(None)?.block_on(command)
}

fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, Failure> {
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

fn parse_size(text: &str) -> Result<u64, String> {
    Bytes::parse(text).map(|Bytes(n)| n)
}

/// The request body: the argument, `-` for stdin, or empty.
fn read_input(arg: Option<&str>) -> Result<Vec<u8>, Failure> {
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
fn print_body(body: &[u8], raw: bool) -> Result<(), Failure> {
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_shows_an_example() {
        let mut cli = Cli::command();
        cli.build();
        for sub in cli.get_subcommands().filter(|sub| sub.get_name() != "help") {
            let help = sub.clone().render_long_help().to_string();
            assert!(
                help.contains("Example"),
                "`wasmrpc {} --help` shows no example:\n{help}",
                sub.get_name()
            );
        }
    }
}
