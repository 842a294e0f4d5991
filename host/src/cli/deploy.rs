//! `wasmrpc keygen`, `deploy` and `undeploy`: put a module on every node
//! that takes deploys, or take it off, over the broker.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{Failure, Global};
use crate::client::Client;
use crate::deploy::{Ack, Action, Order, SecretKey};
use crate::names::ModuleName;
use crate::units::parse_duration;

/// Make a key pair for signing deploys.
///
/// Writes the secret key to `PATH` (readable by you only) and the public key
/// to `PATH.pub`. List the public key in the file a node is given with
/// `serve --accept-deploys`, and sign with `deploy --key PATH`.
///
/// Example: `wasmrpc keygen --out ~/.config/wasmrpc/deploy.key`
#[derive(Debug, Args)]
pub(super) struct KeygenArgs {
    /// Where to write the secret key; the public key goes beside it, in `PATH.pub`.
    #[arg(long, default_value = "wasmrpc-deploy.key")]
    out: PathBuf,
}

/// Put a module on every node that takes deploys, signed with your key.
///
/// Sends the module, its name and its manifest, signed together, to every
/// node on the exchange. A node started with `--accept-deploys` checks the
/// signature and that the module compiles, then writes it into its modules
/// directory (so it serves it, and a restart keeps it) and answers with the
/// version; nodes without that flag ignore deploys. Prints which nodes took
/// it and which refused and why.
///
/// Exit codes: 0 every node that answered took it, 1 some refused, 2 bad
/// usage, 3 no node answered within --wait, 4 broker unreachable.
///
/// Example: `wasmrpc deploy target/wasm32-wasip2/release/greet.wasm --key deploy.key`
#[derive(Debug, Args)]
pub(super) struct DeployArgs {
    /// The module file, e.g. `greet.wasm`.
    file: PathBuf,

    /// The module's name [default: the file's stem].
    #[arg(long)]
    name: Option<String>,

    /// Its manifest (limits, content type) [default: `NAME.toml` beside the
    /// file, if there is one].
    #[arg(long)]
    manifest: Option<PathBuf>,

    #[command(flatten)]
    signing: Signing,
}

/// Take a module off every node that takes deploys, signed with your key.
///
/// Exit codes as for `deploy`.
///
/// Example: `wasmrpc undeploy greet --key deploy.key`
#[derive(Debug, Args)]
pub(super) struct UndeployArgs {
    /// The module's name.
    name: String,

    #[command(flatten)]
    signing: Signing,
}

#[derive(Debug, Args)]
struct Signing {
    /// The secret key to sign with, made by `wasmrpc keygen`.
    #[arg(long, env = "WASMRPC_DEPLOY_KEY")]
    key: PathBuf,

    /// How long to wait for the nodes' answers (they compile the module first).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    wait: Duration,
}

pub(super) fn keygen(args: KeygenArgs) -> Result<(), Failure> {
    let key = SecretKey::generate().map_err(Failure::Failed)?;
    let public = PathBuf::from(format!("{}.pub", args.out.display()));
    let write = |path: &PathBuf, text: String, mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()))
            .map_err(|error| {
                Failure::Failed(anyhow::anyhow!(
                    "failed to write {}: {error}",
                    path.display()
                ))
            })
    };
    write(&args.out, format!("{}\n", key.to_hex()), 0o600)?;
    write(&public, format!("{}\n", key.public()), 0o644)?;
    println!("secret key: {} (keep it secret)", args.out.display());
    println!("public key: {} ({})", public.display(), key.public());
    Ok(())
}

pub(super) async fn deploy(args: DeployArgs, global: &Global) -> Result<(), Failure> {
    let usage = |error: anyhow::Error| Failure::Usage(error);
    let module = std::fs::read(&args.file).map_err(|error| {
        usage(anyhow::anyhow!(
            "failed to read {}: {error}",
            args.file.display()
        ))
    })?;
    let stem = args
        .file
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or_default();
    let name = parse_name(args.name.as_deref().unwrap_or(stem))?;
    let manifest_path = args
        .manifest
        .clone()
        .or_else(|| Some(args.file.with_extension("toml")).filter(|path| path.is_file()));
    let manifest = match manifest_path {
        Some(path) => Some(std::fs::read_to_string(&path).map_err(|error| {
            usage(anyhow::anyhow!(
                "failed to read {}: {error}",
                path.display()
            ))
        })?),
        None => None,
    };
    let order = Order::new(Action::Deploy, name, module, manifest);
    send(order, args.signing, global).await
}

pub(super) async fn undeploy(args: UndeployArgs, global: &Global) -> Result<(), Failure> {
    let order = Order::new(Action::Undeploy, parse_name(&args.name)?, Vec::new(), None);
    send(order, args.signing, global).await
}

fn parse_name(name: &str) -> Result<ModuleName, Failure> {
    name.parse()
        .map_err(|invalid| Failure::Usage(anyhow::anyhow!("{invalid}")))
}

async fn send(order: Order, signing: Signing, global: &Global) -> Result<(), Failure> {
    let key = SecretKey::read(&signing.key).map_err(Failure::Usage)?;
    let signed = order.sign(&key);
    let brokers = global.brokers()?;
    let client = Client::connect(&brokers, &global.exchange)
        .await
        .map_err(Failure::Broker)?;
    let acks = client
        .order(&order, &signed, signing.wait)
        .await
        .map_err(|error| Failure::Broker(error.into()))?;
    print!("{}", table(&acks));
    let action = order.action.as_str();
    if acks.is_empty() {
        return Err(Failure::Timeout(anyhow::anyhow!(
            "no node that takes deploys answered within {:.1} s on exchange {:?}",
            signing.wait.as_secs_f64(),
            global.exchange
        )));
    }
    let refused = acks.iter().filter(|ack| !ack.accepted).count();
    if refused > 0 {
        return Err(Failure::Failed(anyhow::anyhow!(
            "{refused} of {} nodes refused the {action} of {}",
            acks.len(),
            order.name
        )));
    }
    Ok(())
}

fn table(acks: &[Ack]) -> String {
    let rows = acks.iter().map(|ack| {
        vec![
            ack.node.clone(),
            ack.host.clone(),
            if ack.accepted { "took it" } else { "refused" }.to_owned(),
            ack.reason
                .clone()
                .or_else(|| ack.version.clone())
                .unwrap_or_default(),
        ]
    });
    super::fleet::table(&["NODE", "HOST", "RESULT", "VERSION OR REASON"], rows)
}
