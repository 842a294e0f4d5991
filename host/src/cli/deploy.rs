//! `wasmrpc keygen`, `deploy` and `undeploy`: put a module on every node
//! that takes deploys, or take it off, over the broker.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::common::{Failure, Global};
use crate::amqp::ControlLimit;
use crate::client::{Answer, Client, FleetAnswers};
use crate::deploy::{Ack, Action, Order, SecretKey};
use crate::names::ModuleName;
use crate::units::Bytes;
use crate::units::parse_duration;
use crate::wire::NodeStatus;

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

    /// The most to wait for the nodes that take deploys to answer (they
    /// compile the module first: a Python one takes seconds); `deploy`
    /// returns as soon as each has.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
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
    write(&args.out, key.file_text(), 0o600)?;
    write(&public, key.public().file_text(), 0o644)?;
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

/// How long `deploy` asks the fleet which nodes take deploys, before it
/// sends the order.
const FLEET_WAIT: Duration = Duration::from_secs(1);

async fn send(order: Order, signing: Signing, global: &Global) -> Result<(), Failure> {
    let key = SecretKey::read(&signing.key).map_err(Failure::Usage)?;
    let signed = order.sign(&key);
    let brokers = global.brokers()?;
    let client = Client::connect(&brokers, &global.exchange)
        .await
        .map_err(Failure::Broker)?;
    let broker = |error: crate::client::ClientError| Failure::Broker(error.into());
    // First, who takes deploys: then the order waits for each of them, and
    // no longer.
    let takers: Vec<Answer<NodeStatus>> = client
        .fleet_vouched(FLEET_WAIT)
        .await
        .map_err(broker)?
        .into_iter()
        .filter(|node| node.value.accepts() && vouched(&node.user, &signing.node_user).is_ok())
        .collect();
    if takers.is_empty() {
        return Err(Failure::Timeout(anyhow::anyhow!(
            "no node that takes deploys answers on exchange {:?} (a node takes them when started \
             with --accept-deploys)",
            global.exchange
        )));
    }
    // An order too large for a node's control queue never reaches it.
    let reaches = |node: &NodeStatus| {
        node.deploy_limit
            .is_none_or(|limit| ControlLimit::for_deploys(limit).lets_in(order.module.len() as u64))
    };
    let expected: Vec<String> = takers
        .iter()
        .filter(|node| reaches(&node.value))
        .map(|node| node.value.node.clone())
        .collect();
    let done = |answers: &[Answer<Ack>]| {
        expected.iter().all(|node| {
            answers.iter().any(|answer| {
                answer.value.node == *node
                    && !answer.value.pending
                    && !matches!(
                        judge(answer, &order, &signing.node_user),
                        Verdict::Ignored(_)
                    )
            })
        })
    };
    let FleetAnswers { answers, refused } = client
        .order(&order, &signed, signing.wait, done)
        .await
        .map_err(broker)?;
    let mut rows = rows(&takers, &answers, &order, &signing.node_user);
    for row in &mut rows {
        let taker = takers.iter().find(|node| node.value.node == row.node);
        if let (Some(taker), Verdict::NoAnswer) = (taker, &row.verdict)
            && !reaches(&taker.value)
        {
            row.verdict = Verdict::Refused(format!(
                "the broker keeps the {} from this node: more than twice its deploy limit of {}",
                order.action.as_str(),
                Bytes(taker.value.deploy_limit.unwrap_or_default())
            ));
        }
    }
    print!("{}", table(&rows));

    let action = order.action.as_str();
    let count =
        |wanted: fn(&Verdict) -> bool| rows.iter().filter(|row| wanted(&row.verdict)).count();
    let refusals = count(|verdict| matches!(verdict, Verdict::Refused(_)));
    let unfinished = count(|verdict| matches!(verdict, Verdict::Compiling | Verdict::NoAnswer));
    let compiling = count(|verdict| matches!(verdict, Verdict::Compiling));
    if refusals > 0 || refused {
        let mut message = format!(
            "{refusals} of {} nodes refused the {action} of {}",
            takers.len(),
            order.name
        );
        if refused {
            message.push_str(&format!(
                "; the broker turned the {action} away from some node: it is more than twice \
                 that node's --deploy-limit"
            ));
        }
        return Err(Failure::Failed(anyhow::anyhow!(message)));
    }
    if unfinished > 0 {
        return Err(Failure::Timeout(anyhow::anyhow!(
            "{unfinished} of {} nodes did not finish the {action} of {} within {:.1} s \
             ({compiling} still compiling it): see them with `wasmrpc modules`",
            takers.len(),
            order.name,
            signing.wait.as_secs_f64(),
        )));
    }
    Ok(())
}

/// What a node's answers to an order come to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// Taken: the version now served (none for an undeploy).
    Took(Option<String>),
    Refused(String),
    /// It said it was compiling, and said nothing more in time.
    Compiling,
    /// A node that takes deploys said nothing in time.
    NoAnswer,
    /// Not counted, and why: it is not vouched for, or not about this order.
    Ignored(String),
}

/// One line of `deploy`'s table.
#[derive(Debug)]
struct Row {
    node: String,
    host: String,
    user: Option<String>,
    verdict: Verdict,
}

/// Whether the broker vouches for `user` as a node's (one of `node_users`,
/// if given).
fn vouched(user: &Option<String>, node_users: &[String]) -> Result<(), String> {
    match user {
        None => Err("not vouched for by the broker (no user_id)".into()),
        Some(user) if !node_users.is_empty() && !node_users.contains(user) => {
            Err(format!("sent by broker user {user:?}, not a node user"))
        }
        Some(_) => Ok(()),
    }
}

/// What one answer counts for: the broker vouches for its sender, it
/// answers this very order, and a deploy taken names the version this
/// module is.
fn judge(answer: &Answer<Ack>, order: &Order, node_users: &[String]) -> Verdict {
    let ack = &answer.value;
    if let Err(why) = vouched(&answer.user, node_users) {
        return Verdict::Ignored(why);
    }
    if ack.order != order.stamp.order {
        return Verdict::Ignored("answers another order".into());
    }
    if ack.pending {
        return Verdict::Compiling;
    }
    if !ack.accepted {
        return Verdict::Refused(ack.reason.clone().unwrap_or_default());
    }
    let version = order.version();
    match (order.action, &ack.version) {
        (Action::Deploy, Some(claimed)) if *claimed != version => Verdict::Ignored(format!(
            "claims version {claimed}, but the module is {version}"
        )),
        (Action::Deploy, claimed) => Verdict::Took(claimed.clone()),
        (Action::Undeploy, _) => Verdict::Took(None),
    }
}

/// A line per node that takes deploys, with its last word, then one per
/// other answer (a node that started since, or one that is ignored).
fn rows(
    takers: &[Answer<NodeStatus>],
    answers: &[Answer<Ack>],
    order: &Order,
    node_users: &[String],
) -> Vec<Row> {
    let mut rows: Vec<Row> = takers
        .iter()
        .map(|node| Row {
            node: node.value.node.clone(),
            host: node.value.host.clone(),
            user: node.user.clone(),
            verdict: Verdict::NoAnswer,
        })
        .collect();
    for answer in answers {
        let verdict = judge(answer, order, node_users);
        let known = rows
            .iter_mut()
            .find(|row| row.node == answer.value.node && row.user == answer.user);
        match (known, &verdict) {
            // A node's later word wins over its "compiling".
            (Some(row), verdict) if !matches!(verdict, Verdict::Ignored(_)) => {
                if !matches!(
                    (&row.verdict, verdict),
                    (Verdict::Took(_) | Verdict::Refused(_), Verdict::Compiling)
                ) {
                    row.verdict = verdict.clone();
                }
            }
            _ => rows.push(Row {
                node: answer.value.node.clone(),
                host: answer.value.host.clone(),
                user: answer.user.clone(),
                verdict,
            }),
        }
    }
    rows
}

fn table(rows: &[Row]) -> String {
    let lines = rows.iter().map(|row| {
        let (result, detail) = match &row.verdict {
            Verdict::Took(version) => ("took it", version.clone().unwrap_or_default()),
            Verdict::Refused(reason) => ("refused", reason.clone()),
            Verdict::Compiling => ("compiling", "still compiling the module".to_owned()),
            Verdict::NoAnswer => ("no answer", String::new()),
            Verdict::Ignored(why) => ("ignored", why.clone()),
        };
        vec![
            row.node.clone(),
            row.host.clone(),
            row.user.clone().unwrap_or_else(|| "?".into()),
            result.to_owned(),
            detail,
        ]
    });
    super::fleet::table(
        &["NODE", "HOST", "USER", "RESULT", "VERSION OR REASON"],
        lines,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Order {
        Order::new(
            Action::Deploy,
            "fleet",
            "fib".parse().unwrap(),
            b"\0asm".to_vec(),
            None,
        )
    }

    fn answer(order: &Order, node: &str, user: Option<&str>, accepted: bool) -> Answer<Ack> {
        Answer {
            value: Ack {
                node: node.into(),
                host: "h".into(),
                order: order.stamp.order.clone(),
                accepted,
                pending: false,
                version: accepted.then(|| order.version()),
                reason: (!accepted).then(|| "no".into()),
            },
            user: user.map(str::to_owned),
        }
    }

    fn taker(node: &str) -> Answer<NodeStatus> {
        Answer {
            value: NodeStatus {
                node: node.into(),
                host: "h".into(),
                version: "0".into(),
                uptime_ms: 0,
                concurrency: 1,
                instances: 4,
                running: 0,
                accepts_deploys: true,
                takes_deploys: true,
                deploy_limit: Some(64 << 20),
                modules: Vec::new(),
            },
            user: Some("wasmrpc-node".into()),
        }
    }

    #[test]
    fn only_answers_the_broker_vouches_for_about_this_order_count() {
        let order = order();
        let nodes = ["wasmrpc-node".to_owned()];
        let good = answer(&order, "a", Some("wasmrpc-node"), true);
        assert_eq!(
            judge(&good, &order, &nodes),
            Verdict::Took(Some(order.version()))
        );
        assert_eq!(
            judge(&good, &order, &[]),
            Verdict::Took(Some(order.version()))
        );
        let refused = answer(&order, "a", Some("wasmrpc-node"), false);
        assert_eq!(
            judge(&refused, &order, &nodes),
            Verdict::Refused("no".into())
        );

        let unvouched = answer(&order, "a", None, true);
        assert!(matches!(
            judge(&unvouched, &order, &[]),
            Verdict::Ignored(_)
        ));
        let stranger = answer(&order, "a", Some("alice"), true);
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

    #[test]
    fn each_node_that_takes_deploys_gets_its_last_word() {
        let order = order();
        let mut compiling = answer(&order, "a", Some("wasmrpc-node"), false);
        compiling.value.pending = true;
        compiling.value.reason = None;
        let took = answer(&order, "a", Some("wasmrpc-node"), true);
        let forged = answer(&order, "b", None, true);
        let table = rows(
            &[taker("a"), taker("b"), taker("c")],
            &[compiling.clone(), forged, took],
            &order,
            &[],
        );
        let verdicts: Vec<(&str, &Verdict)> = table
            .iter()
            .map(|row| (row.node.as_str(), &row.verdict))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("a", &Verdict::Took(Some(order.version()))),
                ("b", &Verdict::NoAnswer),
                ("c", &Verdict::NoAnswer),
                (
                    "b",
                    &Verdict::Ignored("not vouched for by the broker (no user_id)".into())
                ),
            ]
        );
        // Only "compiling" in time: said so, not "no answer".
        let table = rows(&[taker("a")], &[compiling], &order, &[]);
        assert_eq!(table[0].verdict, Verdict::Compiling);
    }
}
