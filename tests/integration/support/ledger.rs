//! A caller as careful as a caller can be, and the ledger it keeps: it
//! publishes with publisher confirms, publishes again whatever the broker
//! never confirmed, and takes its replies from a durable quorum queue of
//! its own, which outlives its connections and a broker restart. So every
//! call whose publish the broker confirmed must come back answered, whatever
//! happens to the nodes or the broker meanwhile; the ledger says whether it
//! did.
//!
//! Call `i` asks `fib` for `i % 90`, with correlation id `i`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use wasmrpc::amqp::Brokers;

use super::oracle;

/// How long the caller waits for the broker to confirm a request.
const CONFIRM_PATIENCE: Duration = Duration::from_secs(5);

/// What became of every call.
#[derive(Default)]
struct Ledger {
    /// Calls whose publish the broker confirmed.
    sent: HashSet<u64>,
    /// Replies received, per call.
    replies: HashMap<u64, u32>,
    /// Calls answered with something else than their right answer.
    wrong: HashSet<u64>,
    /// When each reply came.
    times: Vec<Instant>,
}

/// The counts a run ends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tally {
    pub sent: usize,
    pub answered: usize,
    pub wrong: usize,
    pub duplicate: usize,
    pub lost: usize,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} / answered {} / wrong {} / duplicate {} / lost {}",
            self.sent, self.answered, self.wrong, self.duplicate, self.lost
        )
    }
}

pub struct CarefulCaller {
    ledger: Arc<Mutex<Ledger>>,
    /// How many calls have been sent (confirmed), and answered.
    sent: watch::Receiver<u64>,
    answered: watch::Receiver<u64>,
    stop: CancellationToken,
    publisher: JoinHandle<()>,
    consumer: JoinHandle<()>,
}

impl CarefulCaller {
    /// Starts publishing `calls` calls of `fib` on `exchange` at `rate` calls
    /// a second, with at most `window` unanswered at a time.
    pub async fn start(
        brokers: Brokers,
        exchange: &str,
        calls: u64,
        rate: f64,
        window: u64,
    ) -> CarefulCaller {
        let reply_queue = super::unique("replies");
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (sent_tx, sent) = watch::channel(0);
        let (answered_tx, answered) = watch::channel(0);
        let stop = CancellationToken::new();
        // The reply queue must exist before the first call names it.
        let (connection, _) = brokers.connect(0, "careful caller").await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        declare_reply_queue(&channel, &reply_queue).await.unwrap();
        let _ = connection.close(200, "declared".into()).await;

        let consumer = tokio::spawn(consume(
            brokers.clone(),
            reply_queue.clone(),
            ledger.clone(),
            answered_tx,
            stop.clone(),
        ));
        let publisher = tokio::spawn({
            let (exchange, ledger, stop) = (exchange.to_owned(), ledger.clone(), stop.clone());
            let answered = answered.clone();
            async move {
                let started = tokio::time::Instant::now();
                let mut link = None;
                for id in 0..calls {
                    let mut answered = answered.clone();
                    let room = answered.wait_for(|&answered| id < answered + window);
                    if stop.run_until_cancelled(room).await.is_none() {
                        return;
                    }
                    let due = started + Duration::from_secs_f64(id as f64 / rate);
                    tokio::time::sleep_until(due).await;
                    if !publish(&brokers, &mut link, &exchange, &reply_queue, id, &stop).await {
                        return;
                    }
                    ledger.lock().unwrap().sent.insert(id);
                    sent_tx.send_replace(id + 1);
                }
            }
        });
        CarefulCaller {
            ledger,
            sent,
            answered,
            stop,
            publisher,
            consumer,
        }
    }

    /// Waits until `count` calls have been sent.
    pub async fn sent(&self, count: u64) {
        let mut sent = self.sent.clone();
        sent.wait_for(|&sent| sent >= count).await.unwrap();
    }

    /// Waits until every call is sent and answered, or `patience` passes
    /// without a new answer; stops; then returns the tally and the longest
    /// stretches without any answer in each of `windows` (start, end).
    pub async fn finish(
        self,
        calls: u64,
        patience: Duration,
        windows: &[(Instant, Instant)],
    ) -> (Tally, Vec<Duration>) {
        let mut answered = self.answered.clone();
        loop {
            if *answered.borrow() >= calls {
                break;
            }
            match tokio::time::timeout(patience, answered.changed()).await {
                Ok(Ok(())) => continue,
                _ => break,
            }
        }
        // A duplicate reply comes soon after the first, or not at all.
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.stop.cancel();
        self.publisher.await.unwrap();
        self.consumer.await.unwrap();
        let ledger = self.ledger.lock().unwrap();
        let answered = ledger
            .sent
            .iter()
            .filter(|id| ledger.replies.contains_key(id));
        let tally = Tally {
            sent: ledger.sent.len(),
            answered: answered.count(),
            wrong: ledger.wrong.len(),
            duplicate: ledger.replies.values().map(|&n| n as usize - 1).sum(),
            lost: ledger
                .sent
                .iter()
                .filter(|id| !ledger.replies.contains_key(id))
                .count(),
        };
        let gaps = windows
            .iter()
            .map(|&(start, end)| longest_gap(&ledger.times, start, end))
            .collect();
        (tally, gaps)
    }
}

/// The longest time between `start` and the last answer before `end`
/// without an answer.
fn longest_gap(times: &[Instant], start: Instant, end: Instant) -> Duration {
    let mut last = start;
    let mut longest = Duration::ZERO;
    for &time in times.iter().filter(|&&time| time > start && time < end) {
        longest = longest.max(time - last);
        last = time;
    }
    longest
}

async fn declare_reply_queue(channel: &Channel, queue: &str) -> lapin::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), durable, arguments)
        .await
        .map(drop)
}

/// Publishes call `id` until the broker confirms it, reconnecting as
/// needed. Returns false if told to stop first.
async fn publish(
    brokers: &Brokers,
    link: &mut Option<(Connection, Channel)>,
    exchange: &str,
    reply_queue: &str,
    id: u64,
    stop: &CancellationToken,
) -> bool {
    loop {
        if stop.is_cancelled() {
            return false;
        }
        if link.is_none() {
            *link = connect(brokers, stop).await;
            let Some((_, channel)) = link else {
                return false;
            };
            let confirms = channel.confirm_select(ConfirmSelectOptions::default());
            if !matches!(
                tokio::time::timeout(CONFIRM_PATIENCE, confirms).await,
                Ok(Ok(()))
            ) {
                *link = None;
                continue;
            }
        }
        let (_, channel) = link.as_ref().unwrap();
        let properties = BasicProperties::default()
            .with_reply_to(reply_queue.into())
            .with_correlation_id(id.to_string().as_str().into())
            .with_delivery_mode(2);
        let published = async {
            channel
                .basic_publish(
                    exchange.into(),
                    "fib".into(),
                    BasicPublishOptions::default(),
                    (id % 90).to_string().as_bytes(),
                    properties,
                )
                .await?
                .await
        };
        // A publish or confirm that does not come (a broker node shutting
        // down may sit on one) counts as a failure: publish it again on a
        // new connection.
        match tokio::time::timeout(CONFIRM_PATIENCE, published).await {
            Ok(Ok(confirmation)) if confirmation.is_ack() => return true,
            // Not taken: publish it again.
            Ok(Ok(_)) => {}
            Ok(Err(_)) => *link = None,
            Err(_) => {
                eprintln!(
                    "careful caller: no confirm for call {id} within {CONFIRM_PATIENCE:?}; publishing it again"
                );
                *link = None;
            }
        }
    }
}

/// Takes replies off the reply queue into the ledger, reconnecting as needed.
async fn consume(
    brokers: Brokers,
    queue: String,
    ledger: Arc<Mutex<Ledger>>,
    answered: watch::Sender<u64>,
    stop: CancellationToken,
) {
    while let Some((_connection, channel)) = connect(&brokers, &stop).await {
        let consumer = async {
            channel.basic_qos(256, BasicQosOptions::default()).await?;
            channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        let Ok(mut replies) = consumer.await else {
            continue;
        };
        loop {
            // Replies that stop coming while calls are unanswered mean a
            // subscription the broker forgot: subscribe again.
            let next = tokio::time::timeout(CONFIRM_PATIENCE, replies.next());
            let next = match stop.run_until_cancelled(next).await {
                None => break,
                Some(Err(_idle)) => {
                    let unanswered = ledger.lock().unwrap().sent.len() as u64 > *answered.borrow();
                    if unanswered {
                        eprintln!(
                            "careful caller: no reply for {CONFIRM_PATIENCE:?} with calls unanswered; subscribing again"
                        );
                        break;
                    }
                    continue;
                }
                Some(Ok(next)) => next,
            };
            let Some(Ok(delivery)) = next else {
                break;
            };
            record(&ledger, &answered, &delivery);
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        if stop.is_cancelled() {
            return;
        }
    }
}

fn record(ledger: &Mutex<Ledger>, answered: &watch::Sender<u64>, delivery: &Delivery) {
    let id: Option<u64> = delivery
        .properties
        .correlation_id()
        .as_ref()
        .and_then(|id| id.as_str().parse().ok());
    let Some(id) = id else {
        return;
    };
    let mut ledger = ledger.lock().unwrap();
    let seen = ledger.replies.contains_key(&id);
    // A reply redelivered because our ack was lost with the connection is
    // the same reply, not a duplicate.
    if seen && delivery.redelivered {
        return;
    }
    *ledger.replies.entry(id).or_default() += 1;
    ledger.times.push(Instant::now());
    let right = oracle::fib_decimal((id % 90) as u32);
    let error = delivery
        .properties
        .headers()
        .as_ref()
        .is_some_and(|headers| {
            headers
                .inner()
                .contains_key(&lapin::types::ShortString::from(
                    wasmrpc::wire::ERROR_HEADER,
                ))
        });
    if error || delivery.data != right.as_bytes() {
        ledger.wrong.insert(id);
    }
    if !seen {
        answered.send_modify(|answered| *answered += 1);
    }
}

/// Connects to the first broker that answers, trying again until one does
/// or the caller stops.
async fn connect(brokers: &Brokers, stop: &CancellationToken) -> Option<(Connection, Channel)> {
    let mut start = 0;
    loop {
        if let Ok((connection, index)) = brokers.connect(start, "careful caller").await {
            // A broker node shutting down may take a connection and then
            // answer nothing: try the next.
            match tokio::time::timeout(CONFIRM_PATIENCE, connection.create_channel()).await {
                Ok(Ok(channel)) => return Some((connection, channel)),
                _ => start = index + 1,
            }
        }
        let pause = tokio::time::sleep(Duration::from_millis(100));
        stop.run_until_cancelled(pause).await?;
    }
}
