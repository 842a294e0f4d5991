//! `wasmrpc dead`: what the fleet's dead-letter queue holds, and why.

use std::time::Duration;

use clap::Args;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};

use super::common::{Failure, Global};
use crate::dead::DeadLetter;
use crate::logging::Escaped;
use crate::wire::{Topology, unix_time};

/// List the requests set aside in the fleet's dead-letter queue, and why.
///
/// Reads up to `--count` letters of `EXCHANGE.dead` and shows, for each,
/// the module it was for, why it is there (`expired`: no node took it
/// before its caller gave up; `poison`: nodes took it and died each time,
/// up to the queue's delivery limit; `rejected`: a node set it aside, as
/// poison or because the broker refused its reply, which its log tells),
/// its correlation id and size. The letters stay in the queue, unless
/// `--take` removes them. The queue keeps at most 10,000 letters, 256 MiB,
/// for a week.
///
/// Exit codes: 0 listed (maybe none), 4 broker unreachable or refused.
///
/// Examples: `wasmrpc dead`; `wasmrpc dead --count 100 --json`; `wasmrpc dead --take`
#[derive(Debug, Args)]
pub(super) struct DeadArgs {
    /// The most letters to read.
    #[arg(short = 'n', long, default_value_t = 20)]
    count: u32,

    /// Remove the letters read from the queue.
    #[arg(long)]
    take: bool,

    /// Print the letters as JSON, one array.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(args: DeadArgs, global: &Global) -> Result<(), Failure> {
    let broker = |error: anyhow::Error| Failure::Broker(error);
    let brokers = global.brokers()?;
    let (connection, _) = brokers
        .connect(0, "wasmrpc dead")
        .await
        .map_err(|error| broker(error.into()))?;
    let topology = Topology::new(&global.exchange);
    let queue = topology.dead_queue();
    let channel = connection
        .create_channel()
        .await
        .map_err(|error| broker(error.into()))?;
    let mut letters = Vec::new();
    let mut last = None;
    while letters.len() < args.count as usize {
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|error| {
                broker(anyhow::anyhow!(
                    "cannot read the dead-letter queue {queue:?}: {error}"
                ))
            })?;
        let Some(message) = got else { break };
        last = Some(message.delivery.delivery_tag);
        letters.push(DeadLetter::read(
            &message.delivery.properties,
            message.delivery.data.len(),
            &topology,
        ));
    }
    // Every letter read is settled at once: taken, or put back.
    if let Some(tag) = last {
        let settled = if args.take {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
        } else {
            channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
        };
        settled.map_err(|error| broker(error.into()))?;
    }
    let _ = channel.close(200, "read".into()).await;
    let _ = connection.close(200, "done".into()).await;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&letters).expect("letters are JSON")
        );
        return Ok(());
    }
    let now = unix_time().as_secs();
    let rows = letters.iter().map(|letter| {
        vec![
            letter
                .dead_since
                .map(|since| ago(Duration::from_secs(now.saturating_sub(since))))
                .unwrap_or_else(|| "?".into()),
            letter.module.clone().unwrap_or_else(|| "?".into()),
            letter.reason.to_string(),
            letter
                .correlation_id
                .as_deref()
                .map(|id| Escaped(id).to_string())
                .unwrap_or_default(),
            letter.size.to_string(),
        ]
    });
    print!(
        "{}",
        super::fleet::table(
            &["SINCE", "MODULE", "REASON", "CORRELATION ID", "BYTES"],
            rows
        )
    );
    if args.take && !letters.is_empty() {
        println!("took {} letters out of {queue}", letters.len());
    }
    Ok(())
}

/// `5m07s ago`.
fn ago(elapsed: Duration) -> String {
    format!("{} ago", super::fleet::uptime(elapsed.as_millis() as u64))
}
