//! What a caller sends is bounded before it costs anything: a trace state
//! too large to echo, a body over the limit while every slot is taken, and
//! text made to forge log lines.

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use super::{Keys, Spy};
use crate::support::process::Spawn;
use crate::support::raw::{self, RawClient};
use crate::support::{TestNode, amqp_url, guests, unique};

#[tokio::test(flavor = "multi_thread")]
async fn a_tracestate_too_large_to_echo_is_dropped_and_every_caller_is_answered() {
    let node = TestNode::start(&["fib"]).await;
    let honest = Arc::new(node.client().await);
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let honest = honest.clone();
            tokio::spawn(async move { honest.call("fib", b"20", Duration::from_secs(10)).await })
        })
        .collect();

    // The request fits RabbitMQ's frame; a reply echoing it would not.
    let mut attacker = RawClient::connect().await;
    let state = "a".repeat(130_850);
    const ATTACKS: usize = 50;
    for n in 0..ATTACKS {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        );
        headers.insert(
            "tracestate".into(),
            AMQPValue::LongString(state.as_str().into()),
        );
        let properties = attacker
            .request(&format!("attack-{n}"))
            .with_headers(headers);
        attacker
            .publish(node.exchange(), "fib", b"10", properties)
            .await;
    }
    for _ in 0..ATTACKS {
        let reply = attacker
            .next_reply(Duration::from_secs(10))
            .await
            .expect("a request with a huge tracestate got no reply");
        assert_eq!(raw::body(&reply), "55");
        assert!(raw::header_string(&reply, "traceparent").is_some());
        assert_eq!(raw::header_string(&reply, "tracestate"), None);
    }
    for call in calls {
        let reply = call.await.unwrap().expect("an honest call got no reply");
        assert_eq!(reply.body, b"6765");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_limit_is_answered_on_arrival_while_every_slot_is_taken() {
    let nap = std::fs::read(guests::wasm("nap")).unwrap();
    // Two sleepy modules hold half the instances each: all of them.
    let node = TestNode::setup(&["nap", "fib"])
        .file("nap2.wasm", nap)
        .config(|config| config.concurrency = 1)
        .start()
        .await;
    let client = Arc::new(node.client().await);
    let naps: Vec<_> = ["nap", "nap", "nap2", "nap2"]
        .into_iter()
        .map(|module| {
            let client = client.clone();
            tokio::spawn(async move { client.call(module, b"5000", Duration::from_secs(30)).await })
        })
        .collect();
    node.running(4).await;

    let body = vec![b'7'; 4 << 20];
    let replies: Vec<_> = (0..10)
        .map(|_| {
            let (client, body) = (client.clone(), body.clone());
            tokio::spawn(async move { client.call("fib", &body, Duration::from_secs(10)).await })
        })
        .collect();
    for reply in replies {
        let reply = reply.await.unwrap().expect("no reply");
        assert_eq!(reply.error.as_deref(), Some("too_large"));
        let message = String::from_utf8_lossy(&reply.body);
        assert!(message.contains("is over the limit of 1 MiB"), "{message}");
    }
    assert!(
        naps.iter().all(|nap| !nap.is_finished()),
        "the bodies were answered only once a slot freed"
    );
    for nap in naps {
        assert_eq!(nap.await.unwrap().unwrap().error, None);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn caller_text_cannot_forge_a_log_line() {
    let keys = Keys::new().await;
    let exchange = unique("forge");
    let node = Spawn::new(&exchange, &["fib"])
        .env("WASMRPC_ACCEPT_DEPLOYS", keys.public().to_str().unwrap())
        .start()
        .await;
    let _cleanup = crate::support::node::Cleanup::new(&exchange, &["fib"]);
    let forged = "2026-12-01T00:00:00.000000Z ERROR wasmrpc: FORGED";
    let mut caller = RawClient::connect().await;
    // By the routing key: a module name no queue has, answered bad_request.
    let properties = caller.request("by-key");
    caller
        .publish(
            &exchange,
            &format!("fib\n{forged} by the routing key"),
            b"1",
            properties,
        )
        .await;
    // By the correlation id of a request that fails.
    let properties = caller.request(&format!("x\n{forged} by the correlation id"));
    caller
        .publish(&exchange, "fib", b"nonsense", properties)
        .await;
    for _ in 0..2 {
        let reply = caller
            .next_reply(Duration::from_secs(10))
            .await
            .expect("no reply");
        assert_eq!(raw::error_header(&reply).as_deref(), Some("bad_request"));
    }
    // By a deploy order's module name.
    let mut spy = Spy::on(&amqp_url(), &exchange).await;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-deploy-name".into(),
        AMQPValue::LongString(format!("sfib\n{forged} by the deploy name").into()),
    );
    headers.insert("x-deploy-format".into(), AMQPValue::LongLongInt(2));
    let order = BasicProperties::default()
        .with_type("deploy".into())
        .with_headers(headers);
    let acks = spy.send(&exchange, order, b"", 1).await;
    assert!(acks.len() == 1 && !acks[0].accepted, "{acks:?}");

    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = node.lines_until("failed", 2);
        lines.extend(node.lines_until("refused a deploy", 1));
        lines
    })
    .await
    .unwrap();
    let shown = lines.join("\n");
    assert!(
        !lines
            .iter()
            .any(|line| line.contains("FORGED") && !line.contains("\\n2026")),
        "a forged line:\n{shown}"
    );
    for what in ["routing key", "correlation id", "deploy name"] {
        assert!(
            lines
                .iter()
                .any(|line| line.contains(&format!("\\n{forged} by the {what}"))),
            "the {what} is not in the log, escaped:\n{shown}"
        );
    }
}
