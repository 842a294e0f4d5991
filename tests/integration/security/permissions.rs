//! The broker decides who may do what: on a private RabbitMQ node with real
//! users, given the permissions `wasmrpc broker-permissions` prints, a node,
//! a caller and a deployer each do their part and nothing more, and no
//! other user can pass for a node in its answers.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ExchangeKind};
use wasmrpc::deploy::Ack;
use wasmrpc::wire::Topology;

use super::{Keys, Spy, write};
use crate::cli::{run, text, wasmrpc};
use crate::support::broker::PrivateBroker;
use crate::support::raw::{self, RawClient};
use crate::support::{TestNode, amqp_url, guests, unique};

const PASSWORD: &str = "secret";

/// `wasmrpc broker-permissions ARGS` on `exchange`: the lines it prints.
async fn permissions(exchange: &str, args: &[&str]) -> String {
    let mut all = vec!["broker-permissions"];
    all.extend(args);
    let output = run(wasmrpc(exchange, &all)).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    text(&output.stdout)
}

/// Runs `wasmrpc ARGS` as broker user `user`, with a deadline: a refusal
/// must not look like a hang.
async fn as_user(
    broker: &PrivateBroker,
    user: &str,
    exchange: &str,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let mut command = wasmrpc(exchange, args);
    command.env("AMQP_URL", broker.url_as(user, PASSWORD));
    let output = tokio::time::timeout(Duration::from_secs(30), run(command))
        .await
        .unwrap_or_else(|_| panic!("`wasmrpc {}` as {user} hung", args.join(" ")));
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// Whether the broker refuses `user` an operation: the error is RabbitMQ's
/// ACCESS_REFUSED.
fn access_refused<T: std::fmt::Debug>(result: Result<T, lapin::Error>) -> bool {
    match result {
        Err(error) => error.to_string().contains("ACCESS_REFUSED"),
        Ok(value) => panic!("allowed: {value:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_does_its_part_and_nothing_more() {
    let broker = PrivateBroker::start(&[]).await;
    let exchange = unique("roles");
    let mut script = String::new();
    for user in ["node", "alice", "ci", "mallory"] {
        script.push_str(&format!("rabbitmqctl add_user {user} {PASSWORD}\n"));
    }
    script += &permissions(&exchange, &["node", "--user", "node"]).await;
    script += &permissions(
        &exchange,
        &["caller", "--user", "alice", "--modules", "fib"],
    )
    .await;
    script += &permissions(&exchange, &["deployer", "--user", "ci"]).await;
    // Another team's administrator, who may do anything on the broker.
    script += "rabbitmqctl set_permissions -p / mallory '.*' '.*' '.*'\n";
    broker.ctl(&script).await;

    // The node, with only its own permissions, serves and takes deploys.
    let keys = Keys::new().await;
    let (node_url, trusted) = (broker.url_as("node", PASSWORD), keys.trusted());
    let node = TestNode::setup(&["fib", "nap"])
        .exchange(&exchange)
        .config(move |config| {
            config.brokers = node_url.parse().unwrap();
            config.accept_deploys = Some(trusted);
        })
        .try_start()
        .await
        .expect("the node cannot serve with the node role's permissions");

    // The caller calls fib, with wasmrpc or as the tutorial does.
    let (code, stdout, stderr) = as_user(&broker, "alice", &exchange, &["call", "fib", "10"]).await;
    assert_eq!((code, stdout.as_str()), (Some(0), "55\n"), "{stderr}");
    let mut tutorial = RawClient::connect_to(&broker.url_as("alice", PASSWORD)).await;
    assert_eq!(
        raw::body(&tutorial.call(&exchange, "fib", b"20").await),
        "6765"
    );
    // Another module: refused by the broker, said at once.
    let (code, _, stderr) = as_user(&broker, "alice", &exchange, &["call", "nap", "1"]).await;
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains("refused the call of module \"nap\"") && stderr.contains("ACCESS_REFUSED"),
        "{stderr}"
    );
    // It cannot take a node's place, nor speak on the control exchange.
    let topology = Topology::new(&exchange);
    let alice = Connection::connect(&broker.url_as("alice", PASSWORD), Default::default())
        .await
        .unwrap();
    let channel = alice.create_channel().await.unwrap();
    let fib_queue = topology.module_queue(&"fib".parse().unwrap());
    assert!(access_refused(
        channel
            .basic_consume(
                fib_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    ));
    let channel = alice.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let published = async {
        channel
            .basic_publish(
                topology.control_exchange().as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                b"status",
                BasicProperties::default(),
            )
            .await?
            .await
    };
    assert!(access_refused(published.await));
    let (code, _, stderr) = as_user(&broker, "alice", &exchange, &["ping"]).await;
    assert_eq!(code, Some(4), "{stderr}");

    // The deployer deploys, and knows its node's answer by the node's user.
    let dir = tempfile::tempdir().unwrap();
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let module = write(dir.path(), "sfib.wasm", &fib);
    let key = keys.secret();
    let deploy_args = |module: &str| {
        vec![
            "deploy".to_owned(),
            module.to_owned(),
            "--key".into(),
            key.to_str().unwrap().to_owned(),
            "--node-user".into(),
            "node".into(),
            "--wait".into(),
            "5s".into(),
        ]
    };
    let args = deploy_args(&module);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = as_user(&broker, "ci", &exchange, &args).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let line = stdout
        .lines()
        .find(|line| line.starts_with(&node.id))
        .unwrap();
    assert!(
        line.contains(" node ") && line.contains("took it"),
        "{stdout}"
    );
    let (code, stdout, stderr) = as_user(&broker, "ci", &exchange, &["ping"]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");

    // No other user passes for a node: mallory, who may read every order,
    // answers one that the node refuses, as "took it".
    let broken = write(dir.path(), "broken.wasm", b"\0asm, but not a module");
    let mut mallory = Spy::on(&broker.url_as("mallory", PASSWORD), &exchange).await;
    let args = deploy_args(&broken);
    let deploying = tokio::spawn({
        let url = broker.url_as("ci", PASSWORD);
        let exchange = exchange.clone();
        async move {
            let mut command = wasmrpc(
                &exchange,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            command.env("AMQP_URL", url);
            run(command).await
        }
    });
    let order = mallory.capture().await;
    // Under the node's own id.
    let forged = Ack {
        node: node.id.clone(),
        host: "mallory".into(),
        order: wasmrpc::deploy::order_in(&order.properties)
            .unwrap()
            .to_owned(),
        accepted: true,
        pending: false,
        version: Some(crate::live::version_of(b"\0asm, but not a module")),
        reason: None,
    };
    let reply_to = order.properties.reply_to().clone().unwrap();
    let correlation_id = order.properties.correlation_id().clone().unwrap();
    let mallory_connection =
        Connection::connect(&broker.url_as("mallory", PASSWORD), Default::default())
            .await
            .unwrap();
    let answer = |user_id: Option<&str>| {
        let mut properties = BasicProperties::default().with_correlation_id(correlation_id.clone());
        if let Some(user) = user_id {
            properties = properties.with_user_id(user.into());
        }
        properties
    };
    for (user_id, allowed) in [(None, true), (Some("mallory"), true), (Some("node"), false)] {
        let channel = mallory_connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let sent = async {
            channel
                .basic_publish(
                    "".into(),
                    reply_to.clone(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&forged).unwrap(),
                    answer(user_id),
                )
                .await?
                .await
        };
        let sent = sent.await;
        assert_eq!(sent.is_ok(), allowed, "as {user_id:?}: {sent:?}");
    }
    let output = deploying.await.unwrap();
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{stdout}{}",
        text(&output.stderr)
    );
    // Whatever mallory's answers raced, none counts: shown, they are
    // ignored; the node's own refusal stands.
    for line in stdout.lines().filter(|line| line.contains("mallory")) {
        assert!(line.contains("ignored"), "{stdout}");
    }
    assert!(!stdout.contains("took it"), "{stdout}");
    let line = stdout
        .lines()
        .find(|line| line.starts_with(&node.id) && !line.contains("mallory"))
        .unwrap();
    assert!(line.contains("refused"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_requests_exchange_is_a_topic_one_and_a_direct_one_from_before_still_serves() {
    // A new fleet declares a topic exchange: declaring it so again agrees.
    let node = TestNode::start(&["fib"]).await;
    let connection = Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(node.topology.unrouted_exchange().as_str().into()),
    );
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            node.exchange().into(),
            ExchangeKind::Topic,
            durable,
            arguments.clone(),
        )
        .await
        .expect("the requests exchange is not a topic exchange");

    // A fleet whose exchange an earlier wasmrpc declared as a direct one.
    let exchange = unique("direct");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(Topology::new(&exchange).unrouted_exchange().as_str().into()),
    );
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Direct,
            durable,
            arguments,
        )
        .await
        .unwrap();
    let old = TestNode::setup(&["fib"]).exchange(&exchange).start().await;
    assert_eq!(old.call("fib", "10").await.body, b"55");
    assert_eq!(
        old.call("nosuch", "1").await.error.as_deref(),
        Some("not_found")
    );
}
