//! Random requests (bodies, routing keys, headers, properties) against a
//! running node: every request that names a `reply_to` gets exactly one
//! reply, and the node stays up.
//!
//! `WASMRPC_FUZZ_REQUESTS` sets how many (default 300); `WASMRPC_FUZZ_SEED`
//! replays a run (the seed is printed).

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::support::TestNode;
use crate::support::raw::{RawClient, correlation_id};

pub(crate) const MODULES: [&str; 5] = ["fib", "spin", "panic", "flood", "escape"];

fn random_text(rng: &mut fastrand::Rng, max: usize) -> String {
    const CHARS: &[char] = &[
        'a', 'z', '0', '9', '-', '_', '.', ' ', 'Z', '/', '#', '*', 'é', '\u{0}', '\n', '🦀',
    ];
    let len = rng.usize(0..=max);
    let mut text: String = (0..len).map(|_| CHARS[rng.usize(..CHARS.len())]).collect();
    // AMQP short strings hold at most 255 bytes.
    while text.len() > 255 {
        text.pop();
    }
    text
}

fn random_value(rng: &mut fastrand::Rng) -> AMQPValue {
    match rng.u8(0..9) {
        0 => AMQPValue::LongUInt(rng.u32(..)),
        1 => AMQPValue::LongLongInt(rng.i64(..)),
        2 => AMQPValue::ShortInt(rng.i16(..)),
        3 => AMQPValue::LongString(LongString::from(rng.u64(..).to_string())),
        4 => AMQPValue::LongString(LongString::from(random_text(rng, 20))),
        5 => AMQPValue::Boolean(rng.bool()),
        6 => AMQPValue::Double(rng.f64() * 1e6 - 5e5),
        7 => AMQPValue::Void,
        _ => AMQPValue::LongUInt(rng.u32(1..5_000)),
    }
}

pub(crate) fn random_body(rng: &mut fastrand::Rng) -> Vec<u8> {
    match rng.u8(0..6) {
        0 => Vec::new(),
        1 => rng.u32(0..3000).to_string().into_bytes(),
        2 => format!("-{}", rng.u32(..)).into_bytes(),
        3 => (0..rng.usize(0..4096)).map(|_| rng.u8(..)).collect(),
        4 => vec![b'7'; (1 << 20) + rng.usize(1..100)], // over the request limit
        _ => random_text(rng, 64).into_bytes(),
    }
}

fn random_headers(rng: &mut fastrand::Rng) -> FieldTable {
    let mut headers = FieldTable::default();
    let names = [
        "x-timeout-ms",
        "x-deadline",
        "x-delivery-count",
        "x-error",
        "x-anything",
    ];
    for name in names {
        if rng.u8(0..4) == 0 {
            headers.insert(name.into(), random_value(rng));
        }
    }
    if rng.bool() {
        headers.insert(ShortString::from(random_text(rng, 16)), random_value(rng));
    }
    headers
}

#[tokio::test(flavor = "multi_thread")]
async fn random_requests_each_get_exactly_one_reply_and_the_node_stays_up() {
    let count: usize = std::env::var("WASMRPC_FUZZ_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    let seed: u64 = std::env::var("WASMRPC_FUZZ_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("fuzz: {count} requests, WASMRPC_FUZZ_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let mut node = TestNode::setup(&MODULES)
        .manifest("spin", "[limits]\ntime = \"100ms\"\n")
        .start()
        .await;
    let mut client = RawClient::connect().await;
    let mut expected = HashSet::new();
    let mut anonymous = 0usize;
    for i in 0..count {
        let routing_key = match rng.u8(0..4) {
            0 => random_text(&mut rng, 80),
            1 => "nosuchmodule".to_owned(),
            _ => MODULES[rng.usize(..MODULES.len())].to_owned(),
        };
        let mut properties = BasicProperties::default().with_headers(random_headers(&mut rng));
        let reply_to = rng.u8(0..8) != 0;
        if reply_to {
            properties = properties.with_reply_to(client.callback_queue.as_str().into());
        }
        match rng.u8(0..8) {
            0 => {}
            1 => properties = properties.with_correlation_id("".into()),
            _ => properties = properties.with_correlation_id(format!("fuzz-{i}").as_str().into()),
        }
        if rng.bool() {
            properties = properties.with_content_type(random_text(&mut rng, 30).as_str().into());
        }
        if rng.bool() {
            properties = properties
                .with_priority(rng.u8(..))
                .with_delivery_mode(rng.u8(1..=2));
        }
        if rng.bool() {
            // Long enough that the broker never drops a request unanswered.
            properties = properties.with_expiration(rng.u32(600_000..).to_string().as_str().into());
        }
        if rng.bool() {
            properties = properties
                .with_message_id(random_text(&mut rng, 40).as_str().into())
                .with_app_id(random_text(&mut rng, 40).as_str().into())
                .with_timestamp(rng.u64(..));
        }
        if reply_to {
            match properties.correlation_id() {
                Some(id) if !id.as_str().is_empty() => {
                    expected.insert(id.as_str().to_owned());
                }
                _ => anonymous += 1,
            }
        }
        client
            .publish(
                node.exchange(),
                &routing_key,
                &random_body(&mut rng),
                properties,
            )
            .await;
    }

    let mut replied = HashSet::new();
    let mut anonymous_replies = 0usize;
    while replied.len() + anonymous_replies < expected.len() + anonymous {
        let reply = client
            .next_reply(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{} requests went unanswered (seed {seed})",
                    expected.len() + anonymous - replied.len() - anonymous_replies
                )
            });
        match correlation_id(&reply).filter(|id| !id.is_empty()) {
            Some(id) => {
                assert!(
                    expected.contains(id),
                    "a reply to {id:?}, which asked for none (seed {seed})"
                );
                assert!(
                    replied.insert(id.to_owned()),
                    "{id} answered twice (seed {seed})"
                );
            }
            None => anonymous_replies += 1,
        }
    }

    // The node still serves...
    let reply = client.call(node.exchange(), "fib", b"20").await;
    assert_eq!(reply.data, b"6765");
    // ...and stops cleanly, every reply it ever sent now in our queue. A
    // marker sent after that arrives after them: nothing may come before it.
    node.stop().await.unwrap();
    client
        .publish(
            "",
            &client.callback_queue.clone(),
            b"",
            client.request("marker"),
        )
        .await;
    let next = client.next_reply(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        correlation_id(&next),
        Some("marker"),
        "an extra reply came (seed {seed})"
    );
}
