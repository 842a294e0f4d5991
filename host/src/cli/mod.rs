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
mod common;
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

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

use self::common::{Failure, Global, LogFormatArg, block_on};
use crate::logging::{self, LogFormat};

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
        Command::Completions(args) => completions::run(args, Cli::command()),
    }
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
