//! The daemon: keeps one subscription per module it serves (following the
//! modules directory as it changes), one to the shared queue of unroutable
//! requests and one to the control exchange, and hands each delivery to
//! [`crate::request`] as its own task.
//!
//! Backpressure is the broker's prefetch (deliveries this node holds unacked)
//! plus a semaphore of `concurrency` permits (requests that run wasm at once).
//! Shutdown is warm: stop consuming, answer what is running, give back what
//! was prefetched but not started, then close.

mod control;
mod subscriptions;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context as _;
use lapin::message::Delivery;
use lapin::options::{BasicNackOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::{Stream, StreamExt as _, StreamMap};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::subscriptions::Subscriptions;
use crate::amqp;
use crate::names::ModuleName;
use crate::registry::{Loader, Registry, Update};
use crate::request;
use crate::runtime::{Limits, Runtime, RuntimeConfig};
use crate::stats::Stats;
use crate::watch::{self, Change};
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
    /// Where compiled modules are cached between runs; `None` for no cache.
    pub cache_dir: Option<PathBuf>,
}

impl NodeConfig {
    pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

    /// A configuration with the documented defaults, and no compile cache.
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
            cache_dir: None,
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
    Control,
}

/// A subscription's deliveries, then `None` once when it has ended (the
/// broker confirmed our cancel, or cancelled it itself), so the node learns
/// of the end; a `StreamMap` would drop the stream silently.
type Deliveries = Pin<Box<dyn Stream<Item = Option<lapin::Result<Delivery>>> + Send>>;

/// What request tasks share with the node.
pub(crate) struct Shared {
    pub id: String,
    pub host: String,
    pub concurrency: u32,
    pub registry: Arc<Registry>,
    pub topology: Topology,
    pub delivery_limit: u32,
    pub stats: Arc<Stats>,
    /// Replies are published here, with publisher confirms, and never on the
    /// consuming channel: a failed publish must not cancel the consumers.
    pub replies: Channel,
    pub slots: Semaphore,
    /// Cancelled when the node begins to shut down.
    pub stopping: CancellationToken,
}

/// A node that has loaded its modules and is subscribed to their queues.
pub struct Node {
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    consume: Channel,
    deliveries: StreamMap<Source, Deliveries>,
    subscriptions: Subscriptions,
    /// Module changes the loader made, for the node to follow.
    updates: mpsc::UnboundedReceiver<Update>,
    loader: tokio::task::JoinHandle<()>,
    _watcher: notify::RecommendedWatcher,
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
            cache_dir: config.cache_dir.clone(),
        })?;
        // Watch before the first scan, so nothing that changes during it is missed.
        let (watcher, changes) = watch::watch(&config.modules_dir)?;
        let registry = Arc::new(Registry::default());
        let loader = Arc::new(Loader::new(
            runtime,
            &config.modules_dir,
            config.limits.clone(),
            registry.clone(),
        ));
        loader.load_all().await?;
        if registry.names().is_empty() {
            tracing::warn!(
                dir = %config.modules_dir.display(),
                "no modules to serve yet: this node answers not_found until some are added"
            );
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

        let mut deliveries = StreamMap::new();
        let mut subscriptions = Subscriptions::new(&id, topology.clone(), config.delivery_limit);
        let unrouted = topology.unrouted_queue();
        deliveries.insert(
            Source::Unrouted,
            subscriptions
                .consume(&consume, &unrouted, "unrouted", false)
                .await?,
        );
        let control = amqp::declare_control_queue(&consume, &topology).await?;
        deliveries.insert(
            Source::Control,
            subscriptions
                .consume(&consume, &control, "control", true)
                .await?,
        );
        for name in registry.names() {
            let stream = subscriptions
                .subscribe(&connection, &consume, &name)
                .await?;
            deliveries.insert(Source::Module(name), stream);
        }

        let (updates_sender, updates) = mpsc::unbounded_channel();
        let loader = tokio::spawn(follow_changes(loader, changes, updates_sender));
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
            shared: Arc::new(Shared {
                id,
                host: hostname(),
                concurrency: config.concurrency,
                registry,
                topology,
                delivery_limit: config.delivery_limit,
                stats: Arc::default(),
                replies,
                slots: Semaphore::new(config.concurrency as usize),
                stopping: CancellationToken::new(),
            }),
            connection: Arc::new(connection),
            consume,
            deliveries,
            subscriptions,
            updates,
            loader,
            _watcher: watcher,
        })
    }

    /// This node's id, as it appears in logs, consumer tags and the fleet view.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// What the node is doing; stays live after [`Node::serve`] takes the node.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// The modules this node serves, live: it follows the modules directory.
    pub fn registry(&self) -> Arc<Registry> {
        self.shared.registry.clone()
    }

    /// The modules this node serves now.
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
                Some(update) = self.updates.recv() => self.follow(update, &tasks).await,
                next = self.deliveries.next() => match next {
                    Some((source, Some(Ok(delivery)))) => self.dispatch(source, delivery, &tasks).await,
                    Some((source, Some(Err(error)))) => {
                        break Err(anyhow::Error::new(error).context(format!("lost the subscription to {source:?}")));
                    }
                    Some((Source::Module(name), None)) => self.ended(name, &tasks).await,
                    Some((source, None)) => break Err(anyhow::anyhow!("the broker cancelled the subscription to {source:?}")),
                    None => break Err(anyhow::anyhow!("no subscriptions left")),
                },
            }
        };

        let in_flight = tasks.len();
        tracing::info!(node = %self.shared.id, in_flight, "shutting down: no new requests, finishing those in flight");
        self.loader.abort();
        self.subscriptions.cancel_all(&self.consume).await;
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
        tracing::info!(node = %self.shared.id, "stopped");
        outcome
    }

    async fn dispatch(&mut self, source: Source, delivery: Delivery, tasks: &TaskTracker) {
        let shared = self.shared.clone();
        match source {
            Source::Unrouted => {
                tasks.spawn(request::handle(shared, request::Target::Unrouted, delivery));
            }
            Source::Control => {
                tasks.spawn(control::answer(shared, delivery));
            }
            // The version that serves a request is the one served when it arrives.
            Source::Module(name) => match self.shared.registry.get(&name) {
                Some(module) => {
                    tasks.spawn(request::handle(
                        shared,
                        request::Target::Module(module),
                        delivery,
                    ));
                }
                // Left in a subscription being cancelled: the queue hands it to
                // another node, or the last node out answers it. Returned here,
                // not in a task, so that it is back before the subscription's
                // end can set the last node's clean-up going.
                None => {
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    };
                    if let Err(error) = delivery.nack(requeue).await {
                        tracing::error!(module = %name, "failed to return a request to its queue: {error}");
                    }
                }
            },
        }
    }

    /// Follows a change the loader made to the registry.
    async fn follow(&mut self, update: Update, tasks: &TaskTracker) {
        match update {
            Update::Added(name) => {
                match self
                    .subscriptions
                    .added(&self.connection, &self.consume, &name)
                    .await
                {
                    Ok(Some(stream)) => {
                        self.deliveries.insert(Source::Module(name), stream);
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::error!(module = %name, "cannot serve the module: {error:#}")
                    }
                }
            }
            Update::Replaced(_) => {}
            Update::Removed(name) => {
                self.subscriptions.removed(&self.consume, &name).await;
                // If the subscription is already gone (it never started), retire now.
                if !self.deliveries.contains_key(&Source::Module(name.clone())) {
                    self.ended(name, tasks).await;
                }
            }
        }
    }

    /// A module's subscription has ended: subscribe again if the module came
    /// back meanwhile, else let its queue go if no node serves it any more.
    async fn ended(&mut self, name: ModuleName, tasks: &TaskTracker) {
        self.deliveries.remove(&Source::Module(name.clone()));
        match self
            .subscriptions
            .ended(&self.connection, &self.consume, &name)
            .await
        {
            Ok(subscriptions::Ended::Resubscribed(stream)) => {
                self.deliveries.insert(Source::Module(name), stream);
            }
            Ok(subscriptions::Ended::Retire) => {
                tasks.spawn(subscriptions::retire(
                    self.connection.clone(),
                    self.shared.clone(),
                    name,
                ));
            }
            Err(error) => tracing::error!(module = %name, "cannot serve the module: {error:#}"),
        }
    }
}

/// Turns what the watcher saw into registry updates, one change at a time,
/// and tells the node about each.
async fn follow_changes(
    loader: Arc<Loader>,
    mut changes: mpsc::UnboundedReceiver<Change>,
    updates: mpsc::UnboundedSender<Update>,
) {
    while let Some(change) = changes.recv().await {
        let found = match change {
            Change::Module(stem) => loader.reconcile(&stem).await.into_iter().collect(),
            Change::Everything => loader.reconcile_all().await,
        };
        for update in found {
            if updates.send(update).is_err() {
                return;
            }
        }
    }
}

fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that.
    let status = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if status != 0 {
        return "unknown".to_owned();
    }
    let end = buffer
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}
