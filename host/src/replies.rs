//! The reply path: every reply a node sends goes out on a connection of its
//! own, with publisher confirms, so that whatever the broker does over a
//! reply (refuse it, close the channel or the whole connection) never takes
//! the subscriptions with it. The path reopens by itself on the next reply.
//!
//! When the broker closes the path, every reply then in flight fails with it,
//! though only one of them caused it. So each failed reply is sent again
//! *alone* (no other reply in flight on the path): one the broker refuses
//! even then is the culprit, and is reported as [`ReplyError::Refused`] so
//! that its request can be set aside; the others go through.
//!
//! The broker refuses messages larger than its `max_message_size` by
//! closing the channel. The path knows that size (configured, or learned
//! from the first refusal) and answers [`ReplyError::TooLarge`] before
//! sending anything larger.
//!
//! Before anything is published, a reply's `reply_to` is checked
//! ([`crate::reply_to`]): a name of the fleet's own queues, one the
//! operator's patterns do not allow, or a direct reply-to name the broker
//! cannot have made is refused ([`ReplyError::Forbidden`]). A well-formed
//! direct reply-to name for a broker node no reply has reached yet goes out
//! *on trial*, alone, on a second connection ([`Replies`] holds two
//! [`Lane`]s): RabbitMQ closes the publisher's connection over a name whose
//! node it does not know, and on the trial lane that costs no other reply.
//! Once a reply to a node is confirmed, replies to it go out on the main
//! lane with the others; a node the broker refused is refused at once for a
//! while.
//!
//! A broker may also stop confirming without closing anything (a node
//! shutting down, a partition). No reply arms a timer of its own for that:
//! one watchdog per channel sees when replies have been waiting and none
//! was confirmed for [`CONFIRM_TIMEOUT`], fails them all and drops the
//! channel, so the next reply opens another.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, Brokers};
use crate::logging::Escaped;
use crate::reply_to::{BadReplyTo, BrokerNode, Clearance, Nodes, ReplyRules, Route};

/// Why a reply did not go out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Larger than the broker accepts; nothing was sent.
    #[error("the reply of {size} bytes is larger than the broker accepts ({limit} bytes)")]
    TooLarge { size: usize, limit: usize },
    /// The broker refused this very reply: it closed the path over it even
    /// when it was the only reply in flight. Sending it again would fail the
    /// same way.
    #[error("the broker refused the reply: {0}")]
    Refused(String),
    /// The path could not be opened or failed for reasons not this reply's:
    /// it may go out later.
    #[error("the reply path is unavailable: {0}")]
    Unavailable(String),
    /// The caller stopped waiting (its session was lost).
    #[error("abandoned")]
    Abandoned,
    /// Its `reply_to` is refused before anything is published.
    #[error("{0}: nothing was published")]
    Forbidden(BadReplyTo),
}

/// How long replies may wait with none of them confirmed, or the reply
/// path for the broker to open it.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a channel's watchdog looks at its confirms: a stalled channel
/// is given up between [`CONFIRM_TIMEOUT`] and that plus this.
const WATCHDOG_TICK: Duration = Duration::from_secs(5);

/// After the path fails to open, replies fail at once for this long rather
/// than each trying every broker again.
const REOPEN_PAUSE: Duration = Duration::from_millis(500);

/// The reply path of one node: every reply's `reply_to` checked, and two
/// lanes to the broker.
pub struct Replies {
    rules: ReplyRules,
    /// Replies to queues and to broker nodes that replies have reached.
    main: Lane,
    /// Replies to broker nodes not reached yet: one at a time (`turn`).
    trial: Lane,
    turn: Mutex<()>,
    nodes: std::sync::Mutex<Nodes>,
}

/// One connection to the broker that replies go out on.
struct Lane {
    brokers: Brokers,
    connection_name: String,
    /// Whether replies share the lane: then a failed reply is sent again
    /// alone, to tell the culprit from the others.
    shared: bool,
    /// The channel replies go out on, when it is open: what every reply
    /// reads, without waiting for `path`.
    live: std::sync::RwLock<Option<Arc<Live>>>,
    /// Opening and dropping the channel, one at a time.
    path: Mutex<Path>,
    /// Replies in flight hold it shared; a reply sent alone holds it exclusively.
    gate: RwLock<()>,
    /// The largest message body the broker accepts (shared by the lanes).
    max_message: Arc<AtomicUsize>,
}

/// An open reply channel.
struct Live {
    channel: Channel,
    /// Counts the channels opened, so a failure only drops the one it saw.
    generation: u64,
    /// Which broker it is on.
    broker: usize,
    confirms: Arc<Confirms>,
}

/// What a channel's watchdog reads of the replies waiting on it.
#[derive(Default)]
struct Confirms {
    /// Replies published and not yet confirmed (nor failed).
    waiting: AtomicUsize,
    /// Replies confirmed (or failed) so far.
    settled: AtomicU64,
    /// Cancelled when the channel stalls: every reply waiting fails.
    stalled: CancellationToken,
}

/// A reply waiting for its confirm; counts as settled when dropped.
struct Waiting<'a>(&'a Confirms);

impl Confirms {
    fn wait(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(self)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.settled.fetch_add(1, Ordering::Relaxed);
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Path {
    connection: Option<Connection>,
    /// Counts the channels opened.
    generation: u64,
    /// Which broker to try first.
    broker: usize,
    /// When the path last failed to open, and why.
    failed: Option<(Instant, String)>,
}

/// Where a message goes: a reply through the default exchange to its
/// `reply_to`, or a request forwarded to the requests exchange.
#[derive(Clone, Copy, Debug)]
struct To<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

impl To<'_> {
    fn reply(reply_to: &str) -> To<'_> {
        To {
            exchange: "",
            routing_key: reply_to,
        }
    }
}

/// Whether a message goes out with the path's broker user as its `user_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vouch {
    Yes,
    No,
}

/// Why one attempt to send failed.
enum AttemptFailure {
    /// The path could not be opened.
    Open(String),
    /// The broker nacked the reply: it could not take it for now.
    Nacked,
    /// Publishing or confirming failed on the channel of this generation.
    Failed(lapin::Error, u64),
}

impl Replies {
    /// A reply path to the first of `brokers` that answers, opened on the
    /// first reply, for replies that `rules` allow. `max_message` is the
    /// broker's `max_message_size`.
    pub fn new(
        brokers: Brokers,
        connection_name: String,
        max_message: usize,
        rules: ReplyRules,
    ) -> Replies {
        let max_message = Arc::new(AtomicUsize::new(max_message));
        let lane = |connection_name: String, shared: bool| Lane {
            brokers: brokers.clone(),
            connection_name,
            shared,
            live: std::sync::RwLock::default(),
            path: Mutex::default(),
            gate: RwLock::new(()),
            max_message: max_message.clone(),
        };
        Replies {
            rules,
            trial: lane(format!("{connection_name} (trial)"), false),
            main: lane(connection_name, true),
            turn: Mutex::new(()),
            nodes: std::sync::Mutex::default(),
        }
    }

    /// Publishes a reply through the default exchange to `reply_to` and waits
    /// for the broker's confirm. Gives up with [`ReplyError::Abandoned`] as
    /// soon as `abandon` is cancelled.
    ///
    /// A reply the broker nacks is sent again after a pause, for a while:
    /// RabbitMQ nacks what a queue cannot take for the moment (a quorum
    /// queue electing a new leader, say), and that passes.
    pub async fn send(
        &self,
        reply_to: &str,
        properties: BasicProperties,
        body: &[u8],
        abandon: &CancellationToken,
    ) -> Result<(), ReplyError> {
        self.reply(reply_to, properties, body, abandon, Vouch::No)
            .await
    }

    /// [`Replies::send`], with the message's `user_id` set to the broker
    /// user the path logged in as (when it logged in with a password): the
    /// broker refuses a `user_id` that is not the publisher's own, so whoever
    /// reads the message knows it came from that user. For the node's
    /// answers on the control exchange, which a deployer authenticates so.
    pub async fn send_vouched(
        &self,
        reply_to: &str,
        properties: BasicProperties,
        body: &[u8],
        abandon: &CancellationToken,
    ) -> Result<(), ReplyError> {
        self.reply(reply_to, properties, body, abandon, Vouch::Yes)
            .await
    }

    /// Publishes a request again, to `exchange` with `routing_key`, with
    /// publisher confirms as a reply: a request that reached the node before
    /// its module's queue was bound goes to that queue.
    pub async fn forward(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
        abandon: &CancellationToken,
    ) -> Result<(), ReplyError> {
        let to = To {
            exchange,
            routing_key,
        };
        self.main
            .send_as(to, properties, body, abandon, Vouch::No)
            .await
    }

    /// Closes both lanes, for shutdown.
    pub async fn close(&self) {
        self.main.close().await;
        self.trial.close().await;
    }

    async fn reply(
        &self,
        reply_to: &str,
        properties: BasicProperties,
        body: &[u8],
        abandon: &CancellationToken,
        vouch: Vouch,
    ) -> Result<(), ReplyError> {
        let node = match self.rules.check(reply_to).map_err(ReplyError::Forbidden)? {
            Route::Queue => None,
            Route::Direct(node) => Some(node),
        };
        let to = To::reply(reply_to);
        let Some(node) = node else {
            return self
                .main
                .send_as(to, properties, body, abandon, vouch)
                .await;
        };
        let admit = || {
            self.nodes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .admit(&node)
        };
        match admit() {
            Clearance::Known => {
                return self
                    .main
                    .send_as(to, properties, body, abandon, vouch)
                    .await;
            }
            Clearance::Refused => return Err(refused_lately()),
            Clearance::Unproven => return Err(ReplyError::Forbidden(BadReplyTo::Unproven)),
            Clearance::Trial => {}
        }
        let Some(_turn) = abandon.run_until_cancelled(self.turn.lock()).await else {
            self.tried(&node, None);
            return Err(ReplyError::Abandoned);
        };
        // The reply on trial before this one may have settled it.
        match admit() {
            Clearance::Known => {
                self.tried(&node, None);
                return self
                    .main
                    .send_as(to, properties, body, abandon, vouch)
                    .await;
            }
            Clearance::Refused => return Err(refused_lately()),
            Clearance::Unproven | Clearance::Trial => {}
        }
        let sent = self
            .trial
            .send_as(to, properties, body, abandon, vouch)
            .await;
        let reached = match &sent {
            Ok(()) => {
                tracing::debug!(node = ?node, "a reply reached a broker node: replies to it share the main lane now");
                Some(true)
            }
            Err(ReplyError::Refused(_)) => Some(false),
            Err(_) => None,
        };
        self.tried(&node, reached);
        sent
    }

    fn tried(&self, node: &BrokerNode, reached: Option<bool>) {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tried(node, reached);
    }
}

/// Why a reply to a broker node the broker refused lately is not sent.
fn refused_lately() -> ReplyError {
    ReplyError::Refused(
        "the broker refused a reply to this direct reply-to name's broker node moments ago".into(),
    )
}

impl Lane {
    /// The largest reply body the broker accepts, as far as this node knows.
    fn max_message(&self) -> usize {
        self.max_message.load(Ordering::Relaxed)
    }

    async fn send_as(
        &self,
        to: To<'_>,
        properties: BasicProperties,
        body: &[u8],
        abandon: &CancellationToken,
        vouch: Vouch,
    ) -> Result<(), ReplyError> {
        let limit = self.max_message();
        if body.len() > limit {
            return Err(ReplyError::TooLarge {
                size: body.len(),
                limit,
            });
        }
        let mut pauses = nack_backoff().build();
        loop {
            match self.send_once(to, &properties, body, abandon, vouch).await {
                Err(AttemptFailure::Nacked) => {
                    let Some(pause) = pauses.next() else {
                        return Err(ReplyError::Unavailable(
                            "the broker kept nacking the reply (is its queue full, or without a leader?)"
                                .into(),
                        ));
                    };
                    tracing::debug!(to = %Escaped(to.routing_key), "the broker nacked the reply: sending it again in {pause:?}");
                    abandon
                        .run_until_cancelled(tokio::time::sleep(pause))
                        .await
                        .ok_or(ReplyError::Abandoned)?;
                }
                Err(AttemptFailure::Open(why)) => return Err(ReplyError::Unavailable(why)),
                Err(AttemptFailure::Failed(error, _)) => return Err(self.judge(error, body.len())),
                Ok(sent) => return sent,
            }
        }
    }

    /// Sends once, and once more alone if that fails. `Ok` holds the outcome
    /// for the caller; `Err` what the caller still has to deal with.
    async fn send_once(
        &self,
        to: To<'_>,
        properties: &BasicProperties,
        body: &[u8],
        abandon: &CancellationToken,
        vouch: Vouch,
    ) -> Result<Result<(), ReplyError>, AttemptFailure> {
        let first = abandon
            .run_until_cancelled(async {
                let _shared = self.gate.read().await;
                self.attempt(to, properties, body, vouch).await
            })
            .await;
        let generation = match first {
            None => return Ok(Err(ReplyError::Abandoned)),
            Some(Ok(())) => return Ok(Ok(())),
            Some(Err(AttemptFailure::Failed(error, generation))) if !self.shared => {
                // It was alone already: it is the culprit.
                self.forget(generation).await;
                return Err(AttemptFailure::Failed(error, generation));
            }
            Some(Err(AttemptFailure::Failed(error, generation))) => {
                tracing::debug!(to = %Escaped(to.routing_key), "reply failed, sending it again alone: {error}");
                generation
            }
            Some(Err(other)) => return Err(other),
        };
        self.forget(generation).await;
        let Some(_alone) = abandon.run_until_cancelled(self.gate.write()).await else {
            return Ok(Err(ReplyError::Abandoned));
        };
        match abandon
            .run_until_cancelled(self.attempt(to, properties, body, vouch))
            .await
        {
            None => Ok(Err(ReplyError::Abandoned)),
            Some(Ok(())) => Ok(Ok(())),
            Some(Err(AttemptFailure::Failed(error, generation))) => {
                self.forget(generation).await;
                Err(AttemptFailure::Failed(error, generation))
            }
            Some(Err(other)) => Err(other),
        }
    }

    /// What a reply that failed even alone comes to.
    fn judge(&self, error: lapin::Error, size: usize) -> ReplyError {
        if !amqp::is_broker_objection(&error) {
            return ReplyError::Unavailable(error.to_string());
        }
        if let Some(limit) = size_limit(&error) {
            self.learn_max_message(limit);
            return ReplyError::TooLarge { size, limit };
        }
        ReplyError::Refused(error.to_string())
    }

    /// Closes the lane, for shutdown.
    async fn close(&self) {
        let mut path = self.path.lock().await;
        if let Some(live) = self.take_live() {
            live.confirms.stalled.cancel();
            let _ = live.channel.close(200, "node shutting down".into()).await;
        }
        if let Some(connection) = path.connection.take() {
            let _ = connection.close(200, "node shutting down".into()).await;
        }
    }

    async fn attempt(
        &self,
        to: To<'_>,
        properties: &BasicProperties,
        body: &[u8],
        vouch: Vouch,
    ) -> Result<(), AttemptFailure> {
        let live = self.channel().await.map_err(AttemptFailure::Open)?;
        let generation = live.generation;
        let mut properties = properties.clone();
        if vouch == Vouch::Yes
            && let Some(user) = self.brokers.get(live.broker).user()
        {
            properties = properties.with_user_id(user.into());
        }
        let _waiting = live.confirms.wait();
        let confirm = live
            .channel
            .basic_publish(
                to.exchange.into(),
                to.routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await;
        let confirmation = match confirm {
            Ok(confirm) => live.confirms.stalled.run_until_cancelled(confirm).await,
            Err(error) => Some(Err(error)),
        };
        match confirmation {
            Some(Ok(confirmation)) if confirmation.is_ack() => Ok(()),
            Some(Ok(_)) => Err(AttemptFailure::Nacked),
            Some(Err(error)) => Err(AttemptFailure::Failed(error, generation)),
            // The watchdog gave the channel up (and dropped it already).
            None => Err(AttemptFailure::Open(format!(
                "the broker confirmed no reply for {} s",
                CONFIRM_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The open channel, opening one (and a connection, if need be) first.
    async fn channel(&self) -> Result<Arc<Live>, String> {
        if let Some(live) = self.current() {
            return Ok(live);
        }
        let mut path = self.path.lock().await;
        // Another reply may have opened it while this one waited.
        if let Some(live) = self.current() {
            return Ok(live);
        }
        if let Some(live) = self.take_live() {
            live.confirms.stalled.cancel();
        }
        if let Some((when, why)) = &path.failed
            && when.elapsed() < REOPEN_PAUSE
        {
            return Err(why.clone());
        }
        // A broker node shutting down may take the connection and then
        // answer nothing; the path's lock must not be held forever.
        let opened = tokio::time::timeout(CONFIRM_TIMEOUT, self.open(&mut path))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the broker did not open a reply channel within {} s",
                    CONFIRM_TIMEOUT.as_secs()
                ))
            });
        match opened {
            Ok(channel) => {
                path.failed = None;
                path.generation += 1;
                let live = Arc::new(Live {
                    channel,
                    generation: path.generation,
                    broker: path.broker,
                    confirms: Arc::default(),
                });
                *self.live.write().unwrap_or_else(PoisonError::into_inner) = Some(live.clone());
                tokio::spawn(watchdog(
                    live.confirms.clone(),
                    CONFIRM_TIMEOUT,
                    WATCHDOG_TICK,
                ));
                Ok(live)
            }
            Err(why) => {
                path.failed = Some((Instant::now(), why.clone()));
                Err(why)
            }
        }
    }

    async fn open(&self, path: &mut Path) -> Result<Channel, String> {
        let connected = path
            .connection
            .as_ref()
            .is_some_and(|connection| connection.status().connected());
        if !connected {
            // After a lost connection, the next broker first: on a cluster,
            // the one just lost may be the one that is down.
            let first = path.broker + usize::from(path.connection.is_some());
            let (connection, broker) = self
                .brokers
                .connect(first, &self.connection_name)
                .await
                .map_err(|error| error.to_string())?;
            // The trial lane reopens after every reply the broker refuses.
            if path.connection.is_some() && self.shared {
                tracing::info!(broker = %self.brokers.get(broker), "reply path reopened");
            }
            path.connection = Some(connection);
            path.broker = broker;
        }
        let connection = path.connection.as_ref().expect("connected above");
        let channel = connection
            .create_channel()
            .await
            .map_err(|error| format!("failed to open a channel for replies: {error}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|error| format!("failed to enable publisher confirms: {error}"))?;
        Ok(channel)
    }

    /// The open channel, if it is still connected and has not stalled.
    fn current(&self) -> Option<Arc<Live>> {
        let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
        live.as_ref()
            .filter(|live| {
                live.channel.status().connected() && !live.confirms.stalled.is_cancelled()
            })
            .cloned()
    }

    fn take_live(&self) -> Option<Arc<Live>> {
        self.live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Drops the channel of `generation` if it is still the current one; the
    /// next reply opens another (and a connection, if this one is gone).
    async fn forget(&self, generation: u64) {
        let _path = self.path.lock().await;
        let mut live = self.live.write().unwrap_or_else(PoisonError::into_inner);
        if live
            .as_ref()
            .is_some_and(|live| live.generation == generation)
            && let Some(live) = live.take()
        {
            live.confirms.stalled.cancel();
        }
    }

    fn learn_max_message(&self, limit: usize) {
        let before = self.max_message.fetch_min(limit, Ordering::Relaxed);
        if limit < before {
            tracing::warn!(
                "the broker accepts messages of at most {limit} bytes, less than the \
                 {before} this node was told (--max-message-size): larger replies are \
                 answered too_large from now on"
            );
        }
    }
}

/// Watches one channel's confirms until it is dropped: when replies have
/// been waiting for `timeout` and none was confirmed meanwhile, the channel
/// has stalled, and every reply waiting on it fails.
async fn watchdog(confirms: Arc<Confirms>, timeout: Duration, tick: Duration) {
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Tokio's clock: the one the ticks keep.
    let now = tokio::time::Instant::now;
    let mut seen = (confirms.settled.load(Ordering::Relaxed), now());
    loop {
        if confirms
            .stalled
            .run_until_cancelled(ticks.tick())
            .await
            .is_none()
        {
            return;
        }
        let settled = confirms.settled.load(Ordering::Relaxed);
        if settled != seen.0 || confirms.waiting.load(Ordering::Relaxed) == 0 {
            seen = (settled, now());
        } else if seen.1.elapsed() >= timeout {
            tracing::warn!(
                "the broker confirmed no reply for {} s: opening another reply channel",
                timeout.as_secs()
            );
            confirms.stalled.cancel();
            return;
        }
    }
}

/// Pauses between sends of a reply the broker nacks: from 50 ms, doubling
/// to 2 s, about 15 s in all.
fn nack_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(11)
}

/// The broker's message size limit, if `error` is its refusal of a message
/// over it: `PRECONDITION_FAILED - message size 3145728 is larger than
/// configured max size 2097152`.
fn size_limit(error: &lapin::Error) -> Option<usize> {
    let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
        return None;
    };
    if !matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    ) {
        return None;
    }
    parse_size_limit(amqp.get_message().as_str())
}

fn parse_size_limit(message: &str) -> Option<usize> {
    let (_, rest) = message.split_once("larger than configured max size ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{Confirms, parse_size_limit, watchdog};

    const TIMEOUT: Duration = Duration::from_secs(30);
    const TICK: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_fails_replies_when_none_is_confirmed_in_time() {
        let confirms = Arc::new(Confirms::default());
        let watching = tokio::spawn(watchdog(confirms.clone(), TIMEOUT, TICK));
        let _waiting = confirms.wait();
        tokio::time::sleep(TIMEOUT - TICK).await;
        assert!(!confirms.stalled.is_cancelled(), "gave up too soon");
        tokio::time::sleep(TICK * 2).await;
        assert!(confirms.stalled.is_cancelled(), "never gave up");
        watching.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_leaves_a_channel_that_confirms_or_has_nothing_waiting() {
        let confirms = Arc::new(Confirms::default());
        let watching = tokio::spawn(watchdog(confirms.clone(), TIMEOUT, TICK));
        // Idle for long: nothing waits, so nothing is late.
        tokio::time::sleep(TIMEOUT * 3).await;
        // Always one reply waiting, but one is confirmed every 10 s.
        let mut waiting = confirms.wait();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let next = confirms.wait();
            drop(std::mem::replace(&mut waiting, next));
        }
        assert!(!confirms.stalled.is_cancelled());
        // Then none for longer than the timeout.
        tokio::time::sleep(TIMEOUT + TICK * 2).await;
        assert!(confirms.stalled.is_cancelled());
        watching.await.unwrap();
    }

    #[test]
    fn the_broker_says_its_message_size_limit_when_it_refuses_a_message() {
        assert_eq!(
            parse_size_limit(
                "PRECONDITION_FAILED - message size 3145728 is larger than configured max size 2097152"
            ),
            Some(2_097_152)
        );
        assert_eq!(
            parse_size_limit("PRECONDITION_FAILED - unknown delivery tag 1"),
            None
        );
    }
}
