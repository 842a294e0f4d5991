//! `wasmrpc topology delete`: remove what a fleet declared on its broker,
//! after a trial.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::common::{Failure, Global};
use crate::amqp::{self, Deleted};
use crate::client::{Client, ClientError};
use crate::names::ModuleName;
use crate::watch::module_stem;
use crate::wire::Topology;

/// What a fleet declared on its broker: its exchanges and queues.
///
/// Example: `wasmrpc topology delete --modules modules` once every node of
/// the fleet has stopped
#[derive(Debug, Args)]
pub(super) struct TopologyArgs {
    #[command(subcommand)]
    command: TopologyCommand,
}

#[derive(Debug, Subcommand)]
enum TopologyCommand {
    Delete(DeleteArgs),
}

/// Delete a fleet's exchanges and queues from the broker, after a trial.
///
/// Deletes the exchange (`--exchange`) and every name that derives from it:
/// the unrouted, dead-letter and control exchanges, the unrouted and
/// dead-letter queues, and the queue of each module named with `--module`
/// or found in `--modules` (a broker does not say which modules had queues).
/// The requests and dead letters they hold are gone with them; it says how
/// many. It refuses while a node of the fleet answers, unless `--force`.
///
/// Exit codes: 0 deleted, 1 nodes still answer, 2 bad usage, 4 broker
/// unreachable or refused (the user needs configure rights).
///
/// Example: `wasmrpc topology delete --modules modules --module greet`
#[derive(Debug, Args)]
struct DeleteArgs {
    /// A module whose queue to delete; repeat it, or separate with commas.
    #[arg(long = "module", value_delimiter = ',')]
    modules: Vec<String>,

    /// A modules directory whose `NAME.wasm` files name more modules.
    #[arg(long = "modules", env = "WASMRPC_MODULES", default_value = "modules")]
    modules_dir: PathBuf,

    /// Delete even while nodes answer (they declare it all again when they
    /// reconnect).
    #[arg(long)]
    force: bool,
}

pub(super) async fn run(args: TopologyArgs, global: &Global) -> Result<(), Failure> {
    let TopologyCommand::Delete(args) = args.command;
    let usage = |message: String| Failure::Usage(anyhow::anyhow!(message));
    let mut modules: Vec<ModuleName> = args
        .modules
        .iter()
        .map(|name| name.parse().map_err(|error| usage(format!("{error}"))))
        .collect::<Result<_, _>>()?;
    if let Ok(entries) = std::fs::read_dir(&args.modules_dir) {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "wasm")
                && let Some(name) = module_stem(&path).and_then(|stem| stem.parse().ok())
            {
                modules.push(name);
            }
        }
    }
    modules.sort();
    modules.dedup();
    let brokers = global.brokers()?;
    if !args.force {
        let client = Client::connect(&brokers, &global.exchange)
            .await
            .map_err(Failure::Broker)?;
        match client.fleet(Duration::from_secs(1)).await {
            Ok(nodes) if !nodes.is_empty() => {
                return Err(Failure::Failed(anyhow::anyhow!(
                    "{} node(s) still serve on exchange {:?}: stop them first (or --force)",
                    nodes.len(),
                    global.exchange
                )));
            }
            Ok(_) | Err(ClientError::NoExchange(_)) => {}
            Err(error) => return Err(Failure::Broker(error.into())),
        }
    }
    let (connection, _) = brokers
        .connect(0, "wasmrpc topology")
        .await
        .map_err(|error| Failure::Broker(error.into()))?;
    let deleted = amqp::delete_topology(&connection, &Topology::new(&global.exchange), &modules)
        .await
        .map_err(Failure::Broker)?;
    for line in &deleted {
        match line {
            Deleted::Queue { name, messages } => {
                println!("deleted queue {name} ({messages} messages in it)")
            }
            Deleted::Exchange(name) => println!("deleted exchange {name}"),
            Deleted::Absent(name) => println!("no queue {name}"),
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
