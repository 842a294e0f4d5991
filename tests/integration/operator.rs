//! An operator's chores: what the dead-letter queue holds and why (it is
//! bounded), and removing a fleet's topology after a trial.

use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};

use crate::cli::{run, text, wasmrpc};
use crate::support::raw::RawClient;
use crate::support::{TestNode, unique};

/// `wasmrpc dead --json` on `exchange`: the letters.
async fn dead(exchange: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["dead", "--json"];
    args.extend(extra);
    let output = run(wasmrpc(exchange, &args)).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dead_letter_queue_tells_expired_calls_from_poison_and_is_bounded() {
    let mut node = TestNode::start(&["fib"]).await;
    node.stop().await.unwrap();
    let queue = node.topology.module_queue(&"fib".parse().unwrap());

    // A call no node takes in time expires in the module's queue.
    let output = run(wasmrpc(
        node.exchange(),
        &["call", "--timeout", "200ms", "fib", "1"],
    ))
    .await;
    assert_eq!(output.status.code(), Some(3));
    // A request taken, handed back, then rejected, as a node does with
    // poison; and one rejected at once, as for a refused reply.
    let client = RawClient::connect().await;
    let channel = &client.channel;
    let take = async || loop {
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap();
        if let Some(message) = got {
            if message
                .delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|id| id.as_str())
                != Some("by-node")
            {
                // The expired call, not expired yet: leave it.
                message
                    .delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            return message;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for rejected_at_once in [false, true] {
        client
            .publish(
                "",
                &queue,
                b"1",
                BasicProperties::default().with_correlation_id("by-node".into()),
            )
            .await;
        let first = take().await;
        if !rejected_at_once {
            first
                .delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            let again = take().await;
            assert!(again.delivery.redelivered);
            again
                .delivery
                .reject(BasicRejectOptions { requeue: false })
                .await
                .unwrap();
        } else {
            first
                .delivery
                .reject(BasicRejectOptions { requeue: false })
                .await
                .unwrap();
        }
    }

    let started = Instant::now();
    let letters = loop {
        let letters = dead(node.exchange(), &[]).await;
        if letters.len() == 3 {
            break letters;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "dead letters: {letters:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut reasons: Vec<&str> = letters
        .iter()
        .map(|letter| letter["reason"].as_str().unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["expired", "rejected", "rejected"], "{letters:#?}");
    assert!(letters.iter().all(|letter| letter["module"] == "fib"));
    // The table says the same, for people.
    let output = run(wasmrpc(node.exchange(), &["dead"])).await;
    let table = text(&output.stdout);
    for reason in ["expired", "rejected (poison, or its reply refused)"] {
        assert!(table.contains(reason), "{table}");
    }
    // Taken, they are gone.
    assert_eq!(dead(node.exchange(), &["--take"]).await.len(), 3);
    assert!(dead(node.exchange(), &[]).await.is_empty());

    // The queue is bounded: declared without its bounds, it is refused as
    // another queue than the one there.
    let declared = channel
        .queue_declare(
            node.topology.dead_queue().as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            {
                let mut arguments = FieldTable::default();
                arguments.insert(
                    "x-queue-type".into(),
                    lapin::types::AMQPValue::LongString("quorum".into()),
                );
                arguments
            },
        )
        .await;
    assert!(
        declared
            .unwrap_err()
            .to_string()
            .contains("inequivalent arg 'x-max-length'"),
        "the dead-letter queue has no x-max-length"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_whose_dead_letter_queue_is_unbounded_keeps_working() {
    // An earlier wasmrpc declared the dead-letter queue without bounds.
    let exchange = unique("old-dead");
    let client = RawClient::connect().await;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    client
        .channel
        .queue_declare(
            format!("{exchange}.dead").as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .unwrap();
    let node = TestNode::setup(&["fib"]).exchange(&exchange).start().await;
    assert_eq!(node.call("fib", "10").await.body, b"55");
}

#[tokio::test(flavor = "multi_thread")]
async fn topology_delete_removes_a_fleet_and_refuses_while_nodes_answer() {
    let mut node = TestNode::start(&["fib"]).await;
    let exchange = node.exchange().to_owned();
    let delete = async |extra: &[&str]| {
        let mut args = vec!["topology", "delete", "--module", "fib"];
        args.extend(extra);
        let mut command = wasmrpc(&exchange, &args);
        command.env("WASMRPC_MODULES", "/nonexistent");
        run(command).await
    };
    let refused = delete(&[]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("1 node(s) still serve"),
        "{}",
        text(&refused.stderr)
    );
    // A request waits in fib's queue once the node is gone.
    node.stop().await.unwrap();
    let client = RawClient::connect().await;
    client
        .channel
        .basic_publish(
            exchange.as_str().into(),
            "fib".into(),
            BasicPublishOptions::default(),
            b"1",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let deleted = delete(&[]).await;
    let stdout = text(&deleted.stdout);
    assert_eq!(
        deleted.status.code(),
        Some(0),
        "{stdout}{}",
        text(&deleted.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "deleted queue {exchange}.module.fib (1 messages in it)"
        )),
        "{stdout}"
    );
    for name in ["", ".unrouted", ".dead", ".control"] {
        assert!(
            stdout.contains(&format!("deleted exchange {exchange}{name}\n")),
            "{stdout}"
        );
    }
    // Gone: looking for the exchange fails.
    let looked = client
        .channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(looked.unwrap_err().to_string().contains("NOT_FOUND"));
}
