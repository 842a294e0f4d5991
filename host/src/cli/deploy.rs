//! `wasmrpc keygen`, `deploy` and `undeploy`: put a module on every node
//! that takes deploys, or take it off, over the broker.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{Failure, Global};
use crate::client::{Answer, Client, FleetAnswers};
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
/// Sends the module, its name and its manifest, signed together with the
/// exchange and a new order id, to every node on the exchange. A node
/// started with `--accept-deploys` checks the signature, that the order is
/// newer than the last it took for the module, and that the module compiles,
/// then writes it into its modules directory (so it serves it, and a restart
/// keeps it) and answers with the version; nodes without that flag ignore
/// deploys. Prints every answer, with the broker user that sent it (the
/// broker vouches for it): answers the broker does not vouch for, or from a
/// user other than `--node-user`, are shown as ignored and do not count.
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

    /// The broker user(s) your nodes log in as: answers sent by any other
    /// user are ignored [default: count every answer the broker vouches for].
    #[arg(long, env = "WASMRPC_NODE_USER", value_delimiter = ',')]
    node_user: Vec<String>,
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
    let order = Order::new(Action::Deploy, &global.exchange, name, module, manifest);
    send(order, args.signing, global).await
}

pub(super) async fn undeploy(args: UndeployArgs, global: &Global) -> Result<(), Failure> {
    let name = parse_name(&args.name)?;
    let order = Order::new(Action::Undeploy, &global.exchange, name, Vec::new(), None);
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
    let FleetAnswers { answers, refused } = client
        .order(&order, &signed, signing.wait)
        .await
        .map_err(|error| Failure::Broker(error.into()))?;
    let turned_away = refused.then(|| {
        format!(
            "the broker turned the {} away from some node: it is more than twice that node's --deploy-limit",
            order.action.as_str()
        )
    });
    let verdicts: Vec<Verdict> = answers
        .iter()
        .map(|answer| judge(answer, &order, &signing.node_user))
        .collect();
    print!("{}", table(&answers, &verdicts));
    let action = order.action.as_str();
    let counted = verdicts
        .iter()
        .filter(|verdict| !matches!(verdict, Verdict::Ignored(_)))
        .count();
    if let Some(why) = &turned_away
        && counted == 0
    {
        return Err(Failure::Failed(anyhow::anyhow!("{why}")));
    }
    if counted == 0 {
        let ignored = match answers.len() {
            0 => String::new(),
            n => format!(" ({n} answers ignored)"),
        };
        return Err(Failure::Timeout(anyhow::anyhow!(
            "no node that takes deploys answered within {:.1} s on exchange {:?}{ignored}",
            signing.wait.as_secs_f64(),
            global.exchange
        )));
    }
    let refused = verdicts
        .iter()
        .filter(|verdict| matches!(verdict, Verdict::Refused))
        .count();
    if refused > 0 || turned_away.is_some() {
        let mut message = format!(
            "{refused} of {counted} nodes refused the {action} of {}",
            order.name
        );
        if let Some(why) = turned_away {
            message = format!("{message}; {why}");
        }
        return Err(Failure::Failed(anyhow::anyhow!(message)));
    }
    Ok(())
}

/// What an answer counts for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Took,
    Refused,
    /// Not counted, and why: it is not vouched for, or not about this order.
    Ignored(String),
}

/// Whether an answer counts: the broker vouches for its sender (one of
/// `node_users`, if given), it answers this very order, and a deploy taken
/// names the version this module is.
fn judge(answer: &Answer<Ack>, order: &Order, node_users: &[String]) -> Verdict {
    let ack = &answer.value;
    match &answer.user {
        None => return Verdict::Ignored("not vouched for by the broker (no user_id)".into()),
        Some(user) if !node_users.is_empty() && !node_users.contains(user) => {
            return Verdict::Ignored(format!("sent by broker user {user:?}, not a node user"));
        }
        Some(_) => {}
    }
    if ack.order != order.stamp.order {
        return Verdict::Ignored("answers another order".into());
    }
    if !ack.accepted {
        return Verdict::Refused;
    }
    let version = order.version();
    match (order.action, &ack.version) {
        (Action::Deploy, Some(claimed)) if *claimed != version => Verdict::Ignored(format!(
            "claims version {claimed}, but the module is {version}"
        )),
        _ => Verdict::Took,
    }
}

fn table(answers: &[Answer<Ack>], verdicts: &[Verdict]) -> String {
    let rows = answers.iter().zip(verdicts).map(|(answer, verdict)| {
        let ack = &answer.value;
        let (result, detail) = match verdict {
            Verdict::Took => ("took it", ack.version.clone().unwrap_or_default()),
            Verdict::Refused => ("refused", ack.reason.clone().unwrap_or_default()),
            Verdict::Ignored(why) => ("ignored", why.clone()),
        };
        vec![
            ack.node.clone(),
            ack.host.clone(),
            answer.user.clone().unwrap_or_else(|| "?".into()),
            result.to_owned(),
            detail,
        ]
    });
    super::fleet::table(
        &["NODE", "HOST", "USER", "RESULT", "VERSION OR REASON"],
        rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(order: &Order, user: Option<&str>, accepted: bool) -> Answer<Ack> {
        Answer {
            value: Ack {
                node: "n".into(),
                host: "h".into(),
                order: order.stamp.order.clone(),
                accepted,
                version: accepted.then(|| order.version()),
                reason: (!accepted).then(|| "no".into()),
            },
            user: user.map(str::to_owned),
        }
    }

    #[test]
    fn only_answers_the_broker_vouches_for_about_this_order_count() {
        let order = Order::new(
            Action::Deploy,
            "fleet",
            "fib".parse().unwrap(),
            b"\0asm".to_vec(),
            None,
        );
        let nodes = ["wasmrpc-node".to_owned()];
        let good = answer(&order, Some("wasmrpc-node"), true);
        assert_eq!(judge(&good, &order, &nodes), Verdict::Took);
        assert_eq!(judge(&good, &order, &[]), Verdict::Took);
        let refused = answer(&order, Some("wasmrpc-node"), false);
        assert_eq!(judge(&refused, &order, &nodes), Verdict::Refused);

        let unvouched = answer(&order, None, true);
        assert!(matches!(
            judge(&unvouched, &order, &[]),
            Verdict::Ignored(_)
        ));
        let stranger = answer(&order, Some("alice"), true);
        assert!(matches!(
            judge(&stranger, &order, &nodes),
            Verdict::Ignored(_)
        ));
        let mut elsewhere = good.clone();
        elsewhere.value.order = "0".repeat(32);
        assert!(matches!(
            judge(&elsewhere, &order, &nodes),
            Verdict::Ignored(_)
        ));
        let mut wrong = good.clone();
        wrong.value.version = Some("0000000000000000".into());
        assert!(matches!(judge(&wrong, &order, &nodes), Verdict::Ignored(_)));
    }
}
