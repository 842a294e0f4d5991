//! `wasmrpc broker-permissions`: the RabbitMQ permissions of a role, as
//! `rabbitmqctl` lines to run (see `crate::permissions`).

use clap::{Args, ValueEnum};

use super::common::{Failure, Global};
use crate::names::ModuleName;
use crate::permissions::{self, Role};
use crate::wire::Topology;

/// Print the rabbitmqctl lines that give a broker user one role in the fleet.
///
/// On a broker shared by teams, give each kind of client its own user:
/// `node` (what `wasmrpc serve` logs in as: declares the fleet's queues,
/// consumes them, publishes replies), `caller` (calls the modules given with
/// --modules and nothing else; it cannot read a module's queue nor publish
/// to the control exchange) and `deployer` (sends deploy orders and fleet
/// questions). The lines name only this fleet's exchange and the queues that
/// derive from it. Create the user first (`rabbitmqctl add_user USER`).
///
/// Examples: `wasmrpc broker-permissions caller --user alice --modules fib,sum`;
/// `wasmrpc broker-permissions node --user wasmrpc-node | sh`
#[derive(Debug, Args)]
pub(super) struct PermissionsArgs {
    /// What the user does in the fleet.
    #[arg(value_enum)]
    role: RoleArg,

    /// The broker user.
    #[arg(long)]
    user: String,

    /// For a caller: the modules it may call, comma-separated, or `*` for all.
    #[arg(long, value_delimiter = ',')]
    modules: Vec<String>,

    /// The RabbitMQ virtual host the fleet is on.
    #[arg(long, default_value = "/")]
    vhost: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    Node,
    Caller,
    Deployer,
}

pub(super) fn run(args: PermissionsArgs, global: &Global) -> Result<(), Failure> {
    let usage = |message: String| Failure::Usage(anyhow::anyhow!(message));
    let role = match args.role {
        RoleArg::Caller if args.modules.is_empty() => {
            return Err(usage(
                "name the modules a caller may call: --modules fib,sum (or '*' for every module)"
                    .into(),
            ));
        }
        RoleArg::Caller if args.modules.iter().any(|module| module == "*") => Role::Caller(None),
        RoleArg::Caller => Role::Caller(Some(
            args.modules
                .iter()
                .map(|name| {
                    name.parse::<ModuleName>()
                        .map_err(|error| usage(error.to_string()))
                })
                .collect::<Result<_, _>>()?,
        )),
        _ if !args.modules.is_empty() => {
            return Err(usage("--modules is for the caller role only".into()));
        }
        RoleArg::Node => Role::Node,
        RoleArg::Deployer => Role::Deployer,
    };
    let topology = Topology::new(&global.exchange);
    let grant = permissions::grant(&role, &topology, &args.user, &args.vhost);
    let what = match &role {
        Role::Node => "a wasmrpc node".to_owned(),
        Role::Caller(None) => "a caller of every module".to_owned(),
        Role::Caller(Some(names)) => format!(
            "a caller of {}",
            names
                .iter()
                .map(ModuleName::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Role::Deployer => "a deployer".to_owned(),
    };
    println!(
        "# broker user {:?} as {what} on exchange {:?}, vhost {:?}; create the user first",
        args.user,
        topology.exchange(),
        args.vhost
    );
    print!("{}", grant.rabbitmqctl());
    Ok(())
}
