//! One subscription per served module, following the registry as modules
//! come and go, and the retirement of a module's queue when the last node
//! stops serving it. `Subscriptions` owns every subscription's state and its
//! stream of deliveries (the unrouted and control queues' too): the session
//! asks it for the next delivery.
//!
//! A module's subscription is `Active`, then `Cancelling` once its file is
//! gone: the broker stops sending, the deliveries already here are handled,
//! and the stream ends. If the file came back meanwhile the node subscribes
//! again; if not, and no other node consumes the queue, the queue goes.
//!
//! A node whose file of a module fails to load *stands in* for it: it keeps
//! the queue bound and consumes it at a lower priority than any node that
//! serves the module, so the broker hands it a request only when no such
//! node can take it; it answers `load_failed` with why, and steps aside as
//! soon as it sees another consumer. So a request for a module that one
//! node of the fleet failed to load hears why from that node, never
//! `not_found` from one that merely lacks the file.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio_stream::{Stream, StreamExt as _, StreamMap};

use crate::amqp;
use crate::names::ModuleName;
use crate::request::{self, Context};
use crate::settler::Settler;
use crate::wire::Topology;

enum Phase {
    /// Its queue is declared and bound, so requests wait there, but this
    /// node does not consume it yet: the module is being loaded.
    Prepared,
    Active {
        tag: String,
    },
    Cancelling {
        come_back: bool,
    },
    /// Its file failed to load here: consumed at a low priority, to answer
    /// `load_failed` while no node serves it.
    StandIn {
        tag: String,
    },
}

/// The consumer priority of a stand-in: below every serving node's (0).
const STAND_IN_PRIORITY: i32 = -10;

/// The modules whose queues a session wants, shared with its retirements.
pub(super) type Wanted = Arc<std::sync::Mutex<std::collections::BTreeSet<ModuleName>>>;

/// What to do once a module's subscription has ended.
pub(super) enum AfterEnd {
    /// Subscribed again: the module came back, or the broker ended it.
    Resubscribed,
    /// Nobody here serves it any more: see [`retire`]. When this node last
    /// declared its queue, if it did.
    Retire(Option<Instant>),
}

/// How long after a quorum queue is declared it may be deleted. RabbitMQ
/// 3.10 starts a dead-letter worker with each new quorum queue; one whose
/// queue is deleted as it starts crashes, and after two such crashes within
/// 5 s the broker stops supervising them and refuses every quorum queue
/// with at-least-once dead-lettering (INTERNAL_ERROR) until it restarts.
/// A subscription's deliveries, then `None` once when it has ended (the
/// broker confirmed our cancel, or cancelled it itself), so the node learns
/// of the end; a `StreamMap` would drop the stream silently.
pub(super) type Deliveries = Pin<Box<dyn Stream<Item = Option<lapin::Result<Delivery>>> + Send>>;

/// Where a delivery came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Source {
    Module(ModuleName),
    Unrouted,
    Control,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Module(name) => write!(f, "module {name}"),
            Source::Unrouted => f.write_str("the unrouted queue"),
            Source::Control => f.write_str("the control queue"),
        }
    }
}

pub(super) const QUEUE_SETTLE: Duration = Duration::from_secs(1);

pub(super) struct Subscriptions {
    node: String,
    topology: Topology,
    delivery_limit: u32,
    /// Consumer tags must be unique on a channel, also across resubscriptions.
    next_tag: u64,
    modules: HashMap<ModuleName, Phase>,
    /// When this session last declared each module's queue.
    declared: HashMap<ModuleName, Instant>,
    /// The modules whose queues this session wants (prepared or consumed),
    /// for the queues being retired meanwhile: a queue wanted again stays.
    wanted: Wanted,
    /// The unrouted and control subscriptions, with their channels.
    others: Vec<(Channel, String)>,
    /// Every subscription's deliveries, by where they come from.
    streams: StreamMap<Source, Deliveries>,
}

impl Subscriptions {
    pub fn new(node: &str, topology: Topology, delivery_limit: u32) -> Self {
        Subscriptions {
            node: node.to_owned(),
            topology,
            delivery_limit,
            next_tag: 0,
            modules: HashMap::new(),
            declared: HashMap::new(),
            wanted: Wanted::default(),
            others: Vec::new(),
            streams: StreamMap::new(),
        }
    }

    /// The next delivery of any subscription, or `None` once for a
    /// subscription that has ended (see [`Deliveries`]); `None` for all
    /// when there are none.
    pub async fn next(&mut self) -> Option<(Source, Option<lapin::Result<Delivery>>)> {
        self.streams.next().await
    }

    /// Whether the module's subscription still delivers (it may be
    /// cancelling).
    pub fn consuming(&self, name: &ModuleName) -> bool {
        self.streams.contains_key(&Source::Module(name.clone()))
    }

    /// Consumes a queue that is not a module's (unrouted, control).
    pub async fn consume(
        &mut self,
        channel: &Channel,
        queue: &str,
        source: Source,
        no_ack: bool,
    ) -> anyhow::Result<()> {
        let label = match &source {
            Source::Module(name) => name.as_str(),
            Source::Unrouted => "unrouted",
            Source::Control => "control",
        };
        let tag = self.tag(label);
        let deliveries = start_consuming(channel, queue, &tag, no_ack).await?;
        self.others.push((channel.clone(), tag));
        self.streams.insert(source, deliveries);
        Ok(())
    }

    /// The module's file failed to load: stands in for it (see the module's
    /// documentation), declaring its queue if need be.
    pub async fn stand_in(
        &mut self,
        connection: &Connection,
        consume: &Channel,
        name: &ModuleName,
    ) -> anyhow::Result<()> {
        match self.modules.get(name) {
            None | Some(Phase::Prepared) => {}
            // Served after all, or on its way out: nothing to stand in for.
            Some(_) => return Ok(()),
        }
        let queue = self.declare(connection, name).await?;
        let tag = self.tag(&format!("{name}-stand-in"));
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-priority".into(),
            lapin::types::AMQPValue::LongInt(STAND_IN_PRIORITY),
        );
        let options = BasicConsumeOptions::default();
        let deliveries = consume_with(consume, &queue, &tag, options, arguments).await?;
        self.modules.insert(name.clone(), Phase::StandIn { tag });
        self.want(name, true);
        self.streams
            .insert(Source::Module(name.clone()), deliveries);
        Ok(())
    }

    /// The tag of the module's stand-in consumer, if this node stands in.
    pub fn standing_in(&self, name: &ModuleName) -> Option<&str> {
        match self.modules.get(name) {
            Some(Phase::StandIn { tag }) => Some(tag),
            _ => None,
        }
    }

    /// Steps aside as a stand-in: another node consumes the queue.
    pub async fn step_aside(&mut self, consume: &Channel, name: &ModuleName) {
        if self.standing_in(name).is_some() {
            self.cancel(consume, name, false).await;
        }
    }

    /// Declares the module's queue and consumes it.
    pub async fn subscribe(
        &mut self,
        connection: &Connection,
        consume: &Channel,
        name: &ModuleName,
    ) -> anyhow::Result<()> {
        let queue = self.declare(connection, name).await?;
        let tag = self.tag(name.as_str());
        let deliveries = start_consuming(consume, &queue, &tag, false).await?;
        self.modules.insert(name.clone(), Phase::Active { tag });
        self.want(name, true);
        self.streams
            .insert(Source::Module(name.clone()), deliveries);
        Ok(())
    }

    /// Declares and binds the module's queue, and notes when, for [`retire`].
    /// On a channel of its own: the broker closes the channel of a
    /// declaration it refuses, and that must not be the consuming one.
    async fn declare(
        &mut self,
        connection: &Connection,
        name: &ModuleName,
    ) -> anyhow::Result<String> {
        let declare = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        let queue =
            amqp::declare_module_queue(&declare, &self.topology, name, self.delivery_limit).await;
        let _ = declare.close(200, "declared".into()).await;
        let queue = queue?;
        self.declared.insert(name.clone(), Instant::now());
        Ok(queue)
    }

    /// The module is being loaded: declares and binds its queue, so that its
    /// requests wait there for it rather than be answered `not_found`.
    pub async fn prepare(
        &mut self,
        connection: &Connection,
        name: &ModuleName,
    ) -> anyhow::Result<()> {
        if self.modules.contains_key(name) {
            return Ok(());
        }
        self.declare(connection, name).await?;
        self.modules.insert(name.clone(), Phase::Prepared);
        self.want(name, true);
        Ok(())
    }

    /// The module could not be loaded: forgets its prepared queue. Returns
    /// when this session last declared it, for [`retire`].
    pub fn failed(&mut self, name: &ModuleName) -> Option<Instant> {
        match self.modules.get(name) {
            Some(Phase::Prepared) | None => {
                self.modules.remove(name);
                self.want(name, false);
                self.declared.remove(name)
            }
            Some(_) => None,
        }
    }

    /// What [`retire`] asks before it lets a queue go.
    pub fn wanted(&self) -> Wanted {
        self.wanted.clone()
    }

    fn want(&self, name: &ModuleName, wanted: bool) {
        let mut names = self.wanted.lock().expect("subscriptions lock");
        if wanted {
            names.insert(name.clone());
        } else {
            names.remove(name);
        }
    }

    /// Whether requests for the module reach its queue through this node's
    /// declarations: it is prepared or consumed.
    pub fn bound(&self, name: &ModuleName) -> bool {
        matches!(
            self.modules.get(name),
            Some(Phase::Prepared | Phase::Active { .. })
        )
    }

    /// The module left the registry, or its files did: a stand-in for it
    /// ends too (`removed` covers a served module).
    async fn cancel(&mut self, consume: &Channel, name: &ModuleName, come_back: bool) {
        let tag = match self.modules.get(name) {
            Some(Phase::Active { tag } | Phase::StandIn { tag }) => tag.clone(),
            _ => return,
        };
        if let Err(error) = consume
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
        {
            tracing::warn!(module = %name, "failed to cancel the subscription: {error}");
        }
        self.modules
            .insert(name.clone(), Phase::Cancelling { come_back });
    }

    /// The module is (again) in the registry: subscribes to it, unless it
    /// has a subscription or gets one when its cancelled one ends.
    pub async fn added(
        &mut self,
        connection: &Connection,
        consume: &Channel,
        name: &ModuleName,
    ) -> anyhow::Result<()> {
        match self.modules.get_mut(name) {
            None | Some(Phase::Prepared) => self.subscribe(connection, consume, name).await,
            Some(Phase::Active { .. }) => Ok(()),
            Some(Phase::Cancelling { come_back }) => {
                *come_back = true;
                Ok(())
            }
            // Its file loads now: consumed as a server once the stand-in ends.
            Some(Phase::StandIn { .. }) => {
                self.cancel(consume, name, true).await;
                Ok(())
            }
        }
    }

    /// The module left the registry (or its file that failed is gone):
    /// stop the broker sending its requests.
    pub async fn removed(&mut self, consume: &Channel, name: &ModuleName) {
        self.cancel(consume, name, false).await;
    }

    /// The module's subscription has ended.
    pub async fn ended(
        &mut self,
        connection: &Connection,
        consume: &Channel,
        name: &ModuleName,
    ) -> anyhow::Result<AfterEnd> {
        self.streams.remove(&Source::Module(name.clone()));
        match self.modules.remove(name) {
            Some(
                Phase::Cancelling { come_back: false } | Phase::Prepared | Phase::StandIn { .. },
            )
            | None => {
                self.want(name, false);
                Ok(AfterEnd::Retire(self.declared.remove(name)))
            }
            Some(Phase::Cancelling { come_back: true }) => {
                self.subscribe(connection, consume, name).await?;
                Ok(AfterEnd::Resubscribed)
            }
            Some(Phase::Active { .. }) => {
                // Not ours: the broker cancelled it, as it does when the queue
                // is deleted. The module is still served here: declare it again.
                tracing::warn!(module = %name, "the broker cancelled the module's subscription; subscribing again");
                self.subscribe(connection, consume, name).await?;
                Ok(AfterEnd::Resubscribed)
            }
        }
    }

    /// The modules whose requests this session receives now.
    pub fn active(&self) -> impl Iterator<Item = &ModuleName> {
        self.modules
            .iter()
            .filter(|(_, state)| matches!(state, Phase::Active { .. }))
            .map(|(name, _)| name)
    }

    /// Cancels every subscription, for shutdown.
    pub async fn cancel_all(&mut self, consume: &Channel) {
        let modules = self.modules.drain().filter_map(|(_, state)| match state {
            Phase::Active { tag } | Phase::StandIn { tag } => Some((consume.clone(), tag)),
            Phase::Prepared | Phase::Cancelling { .. } => None,
        });
        for (channel, tag) in modules.chain(self.others.drain(..)).collect::<Vec<_>>() {
            if let Err(error) = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
            {
                tracing::debug!(%tag, "failed to cancel the subscription: {error}");
            }
        }
    }

    fn tag(&mut self, label: &str) -> String {
        self.next_tag += 1;
        format!("{}/{label}/{}", self.node, self.next_tag)
    }
}

async fn start_consuming(
    channel: &Channel,
    queue: &str,
    tag: &str,
    no_ack: bool,
) -> anyhow::Result<Deliveries> {
    let options = BasicConsumeOptions {
        no_ack,
        ..BasicConsumeOptions::default()
    };
    consume_with(channel, queue, tag, options, FieldTable::default()).await
}

async fn consume_with(
    channel: &Channel,
    queue: &str,
    tag: &str,
    options: BasicConsumeOptions,
    arguments: FieldTable,
) -> anyhow::Result<Deliveries> {
    let consumer = channel
        .basic_consume(queue.into(), tag.into(), options, arguments)
        .await
        .with_context(|| format!("failed to consume queue {queue:?}"))?;
    Ok(Box::pin(consumer.map(Some).chain(tokio_stream::once(None))))
}

/// The last node out turns off the lights: if no node consumes the module's
/// queue any more, it unbinds the queue (so new requests for the module are
/// answered at once, through the alternate exchange), answers the requests
/// still waiting in it (`not_found`, or `load_failed` with `failure`, why
/// this node could not load the module), and deletes it. If another node
/// subscribes meanwhile, it puts the binding back and leaves the queue.
/// Requests this node still runs are answered: they were delivered already.
#[allow(clippy::too_many_arguments)]
pub(super) async fn retire(
    connection: Arc<Connection>,
    context: Arc<Context>,
    topology: Topology,
    name: ModuleName,
    declared: Option<Instant>,
    failure: Option<String>,
    wanted: Wanted,
) {
    let topology = &topology;
    let queue = topology.module_queue(&name);
    // A module that never loaded may have no queue at all.
    if failure.is_some() && !queue_exists(&connection, &queue).await {
        return;
    }
    let binding = |channel: Channel| {
        let (queue, exchange) = (queue.clone(), topology.exchange().to_owned());
        let key = name.to_string();
        async move {
            let bound = channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await;
            if let Err(error) = bound {
                tracing::warn!(%queue, "failed to restore the queue's binding: {error}");
            }
        }
    };
    let result: anyhow::Result<()> = async {
        let channel = connection.create_channel().await?;
        let served_now = || async {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let declared = channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await?;
            // Or this node wants it again (its module is back, loading).
            let again = wanted.lock().expect("subscriptions lock").contains(&name);
            anyhow::Ok(declared.consumer_count() > 0 || again)
        };
        // The broker may count a consumer of ours for a moment yet (our
        // cancelled subscription; our `basic.get`s, until a quorum queue has
        // applied their acks): only a count that stays up means another node.
        let served_elsewhere = || async {
            for _ in 0..10 {
                if !served_now().await? {
                    return anyhow::Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tracing::debug!(module = %name, "other nodes still serve the module");
            Ok(true)
        };
        if served_elsewhere().await? {
            return Ok(());
        }
        channel
            .queue_unbind(queue.as_str().into(), topology.exchange().into(), name.as_str().into(), FieldTable::default())
            .await?;
        // A node that subscribed meanwhile keeps it.
        if served_now().await? {
            binding(channel).await;
            return Ok(());
        }
        let mut answered = 0usize;
        let settler = Settler::start(channel.clone(), context.lost.clone());
        while let Some(message) = channel.basic_get(queue.as_str().into(), BasicGetOptions::default()).await? {
            let ticket = settler.ticket(message.delivery.delivery_tag);
            request::answer_unserved(&context, &message.delivery, ticket, &name, failure.as_deref()).await;
            answered += 1;
        }
        settler.finish(Duration::from_secs(5)).await;
        if let Some(declared) = declared {
            tokio::time::sleep_until((declared + QUEUE_SETTLE).into()).await;
        }
        // Quorum queues refuse `if-unused` deletes (with a connection error),
        // so look once more just before: a node that subscribes in the
        // instant between is cancelled by the broker and subscribes again.
        if served_elsewhere().await? {
            binding(channel).await;
            return Ok(());
        }
        channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
        tracing::info!(module = %name, answered, "no node serves the module any more: deleted its queue");
        let _ = channel.close(200, "retired".into()).await;
        Ok(())
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(module = %name, "failed to retire the module's queue: {error:#}");
    }
}

/// How many consumers `queue` has, as a passive declaration tells (on a
/// channel of its own); `None` if it cannot be told.
pub(super) async fn consumers(connection: &Connection, queue: &str) -> Option<u32> {
    let channel = connection.create_channel().await.ok()?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .ok()?;
    let _ = channel.close(200, "looked".into()).await;
    Some(declared.consumer_count())
}

/// Whether `queue` exists, as far as a passive declaration tells.
async fn queue_exists(connection: &Connection, queue: &str) -> bool {
    consumers(connection, queue).await.is_some()
}
