//! A hand-written lapin RPC server with the guarantees of a wasmrpc node and
//! none of its sandbox: the baseline `scripts/bench` measures a node against.
//!
//! Same topology (a durable quorum queue per module, declared as a node
//! declares it), same guarantees (replies on a channel of their own with
//! publisher confirms, a request acked only once its reply is confirmed),
//! and the same functions as the guests, compiled natively: `fib` (exact,
//! by fast doubling over num-bigint, as `guests/fib`) and `fibrec` (naive
//! recursion, as `guests/fibrec`).
//!
//! `AMQP_URL=... cargo run --release --example native_peer -- EXCHANGE [PREFETCH]`

use std::sync::Arc;

use anyhow::Context as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use num_bigint::BigUint;
use tokio_stream::StreamExt as _;
use wasmrpc::amqp::{self, Brokers};
use wasmrpc::wire::Topology;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let exchange = args
        .next()
        .context("usage: native_peer EXCHANGE [PREFETCH]")?;
    let prefetch: u16 = args.next().map_or(Ok(64), |n| n.parse())?;
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| amqp::DEFAULT_URL.to_owned());
    let brokers: Brokers = url.parse().map_err(anyhow::Error::msg)?;
    let (connection, _) = brokers.connect(0, "wasmrpc native peer").await?;
    let topology = Topology::new(&exchange);
    amqp::declare_topology(&connection, &topology).await?;

    let consume = connection.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let replies = connection.create_channel().await?;
    replies
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let replies = Arc::new(replies);
    let mut consumers = Vec::new();
    for (module, function) in [("fib", fib as fn(&[u8]) -> Vec<u8>), ("fibrec", fibrec)] {
        let name = module.parse().map_err(|error| anyhow::anyhow!("{error}"))?;
        let declare = connection.create_channel().await?;
        let queue = amqp::declare_module_queue(&declare, &topology, &name, 5).await?;
        let consumer = consume
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push(tokio::spawn(serve(consumer, function, replies.clone())));
    }
    eprintln!("native peer ready on exchange {exchange}, prefetch {prefetch}");
    for consumer in consumers {
        consumer.await??;
    }
    Ok(())
}

async fn serve(
    mut deliveries: lapin::Consumer,
    function: fn(&[u8]) -> Vec<u8>,
    replies: Arc<Channel>,
) -> anyhow::Result<()> {
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let replies = replies.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(delivery, function, &replies).await {
                eprintln!("error: {error:#}");
            }
        });
    }
    Ok(())
}

/// Computes, replies, waits for the broker's confirm, then acks.
async fn answer(
    delivery: Delivery,
    function: fn(&[u8]) -> Vec<u8>,
    replies: &Channel,
) -> anyhow::Result<()> {
    let output = function(&delivery.data);
    if let Some(reply_to) = delivery.properties.reply_to() {
        let mut properties = BasicProperties::default();
        if let Some(id) = delivery.properties.correlation_id() {
            properties = properties.with_correlation_id(id.clone());
        }
        let confirmation = replies
            .basic_publish(
                "".into(),
                reply_to.as_str().into(),
                BasicPublishOptions::default(),
                &output,
                properties,
            )
            .await?
            .await?;
        anyhow::ensure!(confirmation.is_ack(), "the broker refused a reply");
    }
    delivery.ack(BasicAckOptions::default()).await?;
    Ok(())
}

fn parse(input: &[u8]) -> Option<u32> {
    std::str::from_utf8(input).ok()?.trim().parse().ok()
}

/// F(n) exactly, by fast doubling, as `guests/fib` computes it.
fn fib(input: &[u8]) -> Vec<u8> {
    let Some(n) = parse(input).filter(|&n| n <= 100_000) else {
        return b"expected n".to_vec();
    };
    let mut a = BigUint::ZERO; // F(k)
    let mut b = BigUint::from(1u32); // F(k+1)
    for bit in (0..u32::BITS - n.leading_zeros()).rev() {
        let d = &a * ((&b << 1usize) - &a); // F(2k)
        let e = &a * &a + &b * &b; // F(2k+1)
        if n >> bit & 1 == 0 {
            (a, b) = (d, e);
        } else {
            b = &d + &e;
            a = e;
        }
    }
    a.to_string().into_bytes()
}

/// F(n) by naive recursion, as `guests/fibrec` computes it.
fn fibrec(input: &[u8]) -> Vec<u8> {
    fn fib(n: u32) -> u64 {
        if n < 2 {
            u64::from(n)
        } else {
            fib(n - 1) + fib(n - 2)
        }
    }
    match parse(input).filter(|&n| n <= 35) {
        Some(n) => fib(n).to_string().into_bytes(),
        None => b"expected n".to_vec(),
    }
}
