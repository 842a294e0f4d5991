//! The daemon: connects to the broker, consumes one queue per module it
//! serves plus the shared queue of unroutable requests, and hands each
//! delivery to [`crate::request`] as its own task.
//!
//! Backpressure is the broker's prefetch (deliveries this node holds unacked)
//! plus a semaphore of `concurrency` permits (requests that run wasm at once).
//! Shutdown is warm: stop consuming, answer what is running, give back what
//! was prefetched but not started, then close.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::Semaphore;
use tokio_stream::{StreamExt as _, StreamMap};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp;
use crate::names::ModuleName;
use crate::registry::{self, Registry};
use crate::request;
use crate::runtime::{Limits, Runtime, RuntimeConfig};
use crate::stats::Stats;
use crate::wire::Topology;

/// Everything a node needs to start, validated.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub amqp_url: String,
    pub exchange: String,
    pub modules_dir: PathBuf,
    /// Requests that run at once.
    pub concurrency: u32,
    /// Deliveries the broker may push to each consumer before they are acked.
    pub prefetch: u16,
    /// The limits of every module whose manifest does not set its own.
    pub limits: Limits,
    /// How many times a request may be delivered without being settled
    /// before it is treated as poison. Fixed in each module queue's
    /// arguments: every node on the exchange must agree.
    pub delivery_limit: u32,
}

impl NodeConfig {
    pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

    /// A configuration with the documented defaults.
    pub fn new(amqp_url: impl Into<String>, modules_dir: impl Into<PathBuf>) -> Self {
        let concurrency = default_concurrency();
        NodeConfig {
            amqp_url: amqp_url.into(),
            exchange: crate::wire::DEFAULT_EXCHANGE.to_owned(),
            modules_dir: modules_dir.into(),
            concurrency,
            prefetch: default_prefetch(concurrency),
            limits: Limits::default(),
            delivery_limit: Self::DEFAULT_DELIVERY_LIMIT,
        }
    }
}

/// One request per core: guests are CPU-bound.
pub fn default_concurrency() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Twice the concurrency: a finished request always finds the next one
/// already here, without this node hoarding work that idle nodes could take.
pub fn default_prefetch(concurrency: u32) -> u16 {
    u16::try_from(concurrency.saturating_mul(2)).unwrap_or(u16::MAX)
}

/// Where a delivery came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    Module(ModuleName),
    Unrouted,
}

/// What request tasks share with the node.
pub(crate) struct Shared {
    pub registry: Registry,
    pub stats: Arc<Stats>,
    pub topology: Topology,
    pub delivery_limit: u32,
    /// Replies are published here, with publisher confirms, and never on the
    /// consuming channel: a failed publish must not cancel the consumers.
    pub replies: Channel,
    pub slots: Semaphore,
    /// Cancelled when the node begins to shut down.
    pub stopping: CancellationToken,
}

/// A node that has loaded its modules and is subscribed to their queues.
pub struct Node {
    id: String,
    shared: Arc<Shared>,
    connection: Connection,
    consume: Channel,
    consumers: StreamMap<Source, Consumer>,
}

impl Node {
    /// Loads the modules, connects and subscribes. When this returns, requests
    /// published to the exchange reach this node (they wait in the queues
    /// until [`Node::serve`] runs).
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        let id = uuid::Uuid::new_v4().to_string();
        config.limits.validate().map_err(anyhow::Error::msg)?;
        let runtime = Runtime::new(&RuntimeConfig {
            max_concurrent: config.concurrency,
        })?;
        let registry = Registry::default();
        for module in registry::load_dir(&runtime, &config.modules_dir, &config.limits).await? {
            registry.insert(module);
        }
        if registry.names().is_empty() {
            tracing::warn!(dir = %config.modules_dir.display(), "no modules to serve: this node will only answer not_found");
        }

        let connection = amqp::connect(&config.amqp_url, &format!("wasmrpc node {id}")).await?;
        let consume = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        consume
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await
            .context("failed to set the prefetch")?;
        let replies = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        replies
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("failed to enable publisher confirms")?;

        let topology = Topology::new(&config.exchange);
        amqp::declare_exchanges(&consume, &topology).await?;
        let mut consumers = StreamMap::new();
        let unrouted = topology.unrouted_queue();
        let source = Source::Unrouted;
        let consumer = subscribe(&consume, &unrouted, &consumer_tag(&id, &source)).await?;
        consumers.insert(source, consumer);
        for name in registry.names() {
            let queue =
                amqp::declare_module_queue(&consume, &topology, &name, config.delivery_limit)
                    .await?;
            let source = Source::Module(name);
            let consumer = subscribe(&consume, &queue, &consumer_tag(&id, &source)).await?;
            consumers.insert(source, consumer);
        }
        tracing::info!(
            node = %id,
            broker = %amqp::redact(&config.amqp_url),
            exchange = %config.exchange,
            modules = ?registry.names().iter().map(ModuleName::as_str).collect::<Vec<_>>(),
            concurrency = config.concurrency,
            prefetch = config.prefetch,
            "node ready"
        );

        Ok(Node {
            id,
            shared: Arc::new(Shared {
                registry,
                stats: Arc::default(),
                topology,
                delivery_limit: config.delivery_limit,
                replies,
                slots: Semaphore::new(config.concurrency as usize),
                stopping: CancellationToken::new(),
            }),
            connection,
            consume,
            consumers,
        })
    }

    /// This node's id, as it appears in logs and consumer tags.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the node is doing; stays live after [`Node::serve`] takes the node.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// The modules this node serves.
    pub fn modules(&self) -> Vec<ModuleName> {
        self.shared.registry.names()
    }

    /// Serves requests until `shutdown` completes, then stops consuming,
    /// finishes the requests in flight and closes the connection.
    ///
    /// Returns an error if the broker connection fails; requests this node
    /// held unacked then go back to their queues.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let tasks = TaskTracker::new();
        tokio::pin!(shutdown);
        let outcome = loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                next = self.consumers.next() => match next {
                    Some((source, Ok(delivery))) => {
                        tasks.spawn(request::handle(self.shared.clone(), source, delivery));
                    }
                    Some((source, Err(error))) => {
                        break Err(anyhow::Error::new(error).context(format!("lost the subscription to {source:?}")));
                    }
                    None => break Err(anyhow::anyhow!("the broker cancelled every subscription")),
                },
            }
        };

        let in_flight = tasks.len();
        tracing::info!(node = %self.id, in_flight, "shutting down: no new requests, finishing those in flight");
        for source in self.consumers.keys() {
            let tag = consumer_tag(&self.id, source);
            if let Err(error) = self
                .consume
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await
            {
                tracing::debug!(%tag, "failed to cancel the subscription: {error}");
            }
        }
        // Requests still waiting for a slot go back to their queue at once
        // rather than running during shutdown.
        self.shared.stopping.cancel();
        tasks.close();
        tasks.wait().await;
        // Closing the channel returns anything prefetched but never handled.
        let _ = self.consume.close(200, "node shutting down".into()).await;
        let _ = self
            .shared
            .replies
            .close(200, "node shutting down".into())
            .await;
        let _ = self
            .connection
            .close(200, "node shutting down".into())
            .await;
        tracing::info!(node = %self.id, "stopped");
        outcome
    }
}

fn consumer_tag(node: &str, source: &Source) -> String {
    match source {
        Source::Module(name) => format!("{node}/{name}"),
        Source::Unrouted => format!("{node}/unrouted"),
    }
}

async fn subscribe(channel: &Channel, queue: &str, tag: &str) -> anyhow::Result<Consumer> {
    channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to consume queue {queue:?}"))
}
