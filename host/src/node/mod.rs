//! The daemon. A node loads its modules and follows its modules directory
//! for as long as it runs, whatever the broker does; it serves them through
//! one broker [`session`] at a time, and when a session fails it logs why,
//! opens another with capped exponential backoff and jitter, and serves on.
//! It stops on its shutdown signal, or when a broker refuses its
//! configuration for good (credentials, contradictory queue arguments).
//!
//! Backpressure is the broker's prefetch (deliveries this node holds
//! unacked), a semaphore of instances (requests in progress, at most half of
//! them one module's) and the runtime's `concurrency` permits to execute
//! wasm, which a guest holds only while it computes.
//! Shutdown is warm: stop consuming, answer what is running, give back what
//! was prefetched but not started, then close.

mod control;
mod deploys;
mod probe;
mod session;
mod shared;
mod subscriptions;

pub use self::probe::Probe;
pub use self::shared::State;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::session::{OpenError, Session, SessionEnd};
use self::shared::{Identity, Modules, Shared, Shown};
use crate::amqp::Brokers;
use crate::children::{ChildLimits, Children};
use crate::deploy::TrustedKeys;
use crate::logging::Burst;
use crate::metrics::Metrics;
use crate::names::ModuleName;
use crate::registry::{Loader, Registry, Update};
use crate::replies::Replies;
use crate::reply_to::{Pattern, ReplyRules};
use crate::request::{Admission, Requests};
use crate::runtime::{Limits, Runtime, RuntimeConfig};
use crate::stats::Stats;
use crate::units::Bytes;
use crate::watch::{self, Change};
use crate::wire::Topology;

/// Everything a node needs to start, validated.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The brokers to use, tried in turn: one, or the nodes of a cluster.
    pub brokers: Brokers,
    pub exchange: String,
    pub modules_dir: PathBuf,
    /// Guests that execute wasm at once: the cores given to guests. Requests
    /// in progress may be [`crate::runtime::INSTANCES_PER_RUNNING`] times as many.
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
    /// The most bytes the cache may hold; past it, the entries used least
    /// recently go.
    pub cache_size: u64,
    /// The largest message body the broker accepts (RabbitMQ's
    /// `max_message_size`): no module's reply limit is higher.
    pub max_message: usize,
    /// The keys whose signed deploys this node takes; `None` ignores deploys.
    pub accept_deploys: Option<TrustedKeys>,
    /// The largest module a deploy may bring.
    pub deploy_limit: usize,
    /// The bounds on modules' calls to other modules.
    pub children: ChildLimits,
    /// The `reply_to` names replies may go to; empty: any that is not one
    /// of the fleet's own queues (see [`crate::reply_to`]).
    pub reply_to: Vec<Pattern>,
}

impl NodeConfig {
    pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

    /// RabbitMQ's default `max_message_size` since 4.0.
    pub const DEFAULT_MAX_MESSAGE: usize = 16 << 20;

    /// The largest module a deploy may bring, unless configured.
    pub const DEFAULT_DEPLOY_LIMIT: usize = 64 << 20;

    /// A configuration with the documented defaults, and no compile cache.
    pub fn new(brokers: Brokers, modules_dir: impl Into<PathBuf>) -> Self {
        let concurrency = default_concurrency();
        NodeConfig {
            brokers,
            exchange: crate::wire::DEFAULT_EXCHANGE.to_owned(),
            modules_dir: modules_dir.into(),
            concurrency,
            prefetch: default_prefetch(concurrency),
            limits: Limits::default(),
            delivery_limit: Self::DEFAULT_DELIVERY_LIMIT,
            cache_dir: None,
            cache_size: crate::runtime::DEFAULT_CACHE_SIZE,
            max_message: Self::DEFAULT_MAX_MESSAGE,
            accept_deploys: None,
            deploy_limit: Self::DEFAULT_DEPLOY_LIMIT,
            children: ChildLimits::for_concurrency(concurrency),
            reply_to: Vec::new(),
        }
    }
}

/// One request per core: guests are CPU-bound.
pub fn default_concurrency() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Sixteen per core that runs guests. A delivery is unacked from its
/// arrival until the broker confirms its reply, a broker round trip after
/// the guest is done, so the prefetch must cover that pipeline as well as the
/// requests computing; but what a node holds beyond them waits, and work a
/// slow node holds is work an idle node cannot take. Measured on 2 cores
/// (README.md, "Performance"): 16 per core gives 2.6 times the throughput
/// of 2 per core and 91% of 32 per core, and lets a node 1,000 times slower
/// than its peer take 11% of a burst, against 7% at 2 and 16% at 32 per core.
pub fn default_prefetch(concurrency: u32) -> u16 {
    u16::try_from(concurrency.saturating_mul(16)).unwrap_or(u16::MAX)
}

/// The delay before a session is opened again: from 100 ms, doubling, up
/// to 1 s, each with up to as much again of jitter, so that a fleet that
/// lost its broker does not come back in step. A node is back within 2 s
/// of its broker.
fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .without_max_times()
}

/// A node that has loaded its modules; [`Node::serve`] connects it.
pub struct Node {
    shared: Arc<Shared>,
    brokers: Brokers,
    /// Module changes the loader made, for the node to follow.
    updates: mpsc::UnboundedReceiver<Update>,
    /// The task that has the loader follow the watcher.
    following: tokio::task::JoinHandle<()>,
    state: tokio::sync::watch::Sender<State>,
    _watcher: notify::RecommendedWatcher,
}

impl Node {
    /// Loads the modules and starts following the modules directory. Needs
    /// no broker: [`Node::serve`] connects.
    pub async fn start(mut config: NodeConfig) -> anyhow::Result<Node> {
        let id = uuid::Uuid::new_v4().to_string();
        config.limits.validate().map_err(anyhow::Error::msg)?;
        if config.limits.reply > config.max_message {
            tracing::warn!(
                "the reply limit of {} is more than the broker accepts ({}): using {}",
                Bytes(config.limits.reply as u64),
                Bytes(config.max_message as u64),
                Bytes(config.max_message as u64),
            );
            config.limits.reply = config.max_message;
        }
        let mut runtime_config = RuntimeConfig::new(config.concurrency, config.cache_dir.clone());
        runtime_config.cache_size = config.cache_size;
        // Admission takes the instances for requests in progress; the rest
        // are for those waiting for their calls to other modules.
        let instances = runtime_config.max_instances;
        let runtime_config = runtime_config.keeping_waiting(config.children.max_waiting);
        let runtime = Runtime::new(&runtime_config)?;
        // Watch before the first scan, so nothing that changes during it is missed.
        let (watcher, changes) = watch::watch(&config.modules_dir)?;
        let registry = Arc::new(Registry::default());
        let stats = Arc::new(Stats::default());
        let (updates_sender, updates) = mpsc::unbounded_channel();
        let loader = Arc::new(
            Loader::new(
                runtime.clone(),
                &config.modules_dir,
                config.limits.clone(),
                config.max_message,
                registry.clone(),
            )
            .reporting_to(updates_sender)
            .counting_in(stats.clone()),
        );
        let deploys = config.accept_deploys.take().map(|trusted| {
            Arc::new(deploys::Deploys {
                trusted,
                dir: config.modules_dir.clone(),
                exchange: config.exchange.clone(),
                runtime,
                limits: config.limits.clone(),
                max_reply: config.max_message,
                max_size: config.deploy_limit,
                loader: loader.clone(),
                turn: tokio::sync::Mutex::new(()),
                seen: Mutex::default(),
            })
        });
        loader.load_all().await?;
        if registry.names().is_empty() {
            tracing::warn!(
                dir = %config.modules_dir.display(),
                "no modules to serve yet: this node answers not_found until some are added"
            );
        }
        let following = tokio::spawn(follow_changes(loader.clone(), changes));
        let replies = Replies::new(
            config.brokers.clone(),
            format!("wasmrpc node {id} replies"),
            config.max_message,
            ReplyRules::new(&config.exchange, config.reply_to.clone()),
        );
        let topology = Topology::new(&config.exchange);
        let metrics = Arc::new(Metrics::default());
        let children = Children::new(
            config.brokers.clone(),
            config.exchange.clone(),
            format!("wasmrpc node {id} calls"),
            config.children.clone(),
            metrics.clone(),
        );
        let requests = Arc::new(Requests {
            replies: Arc::new(replies),
            stats: stats.clone(),
            metrics: metrics.clone(),
            admission: Admission::new(instances as usize, config.delivery_limit),
            children: Arc::new(children),
            dead_queue: topology.dead_queue(),
            requests_exchange: topology.exchange().to_owned(),
            refused_replies: Burst::new(Duration::from_secs(10)),
            looking_again: tokio::sync::Semaphore::new(crate::request::MAX_LOOKING_AGAIN),
            stopping: CancellationToken::new(),
        });
        let shared = Arc::new(Shared {
            identity: Identity {
                id,
                host: gethostname::gethostname().to_string_lossy().into_owned(),
                concurrency: config.concurrency,
                instances,
                prefetch: config.prefetch,
                delivery_limit: config.delivery_limit,
                topology,
            },
            requests,
            modules: Modules {
                registry,
                loader,
                deploys,
            },
            shown: Shown {
                stats,
                metrics,
                subscribed: Mutex::default(),
                broker_error: Mutex::default(),
            },
        });
        let state = tokio::sync::watch::Sender::new(State::Connecting);
        // Weak: the metrics belong to the node, and must not keep it alive.
        let (weak, seen) = (Arc::downgrade(&shared), state.subscribe());
        shared
            .shown
            .metrics
            .read_gauges_from(move || Some(probe::readings(&*weak.upgrade()?, &seen)));
        Ok(Node {
            shared,
            brokers: config.brokers,
            updates,
            following,
            state,
            _watcher: watcher,
        })
    }

    /// This node's id, as it appears in logs, consumer tags and the fleet view.
    pub fn id(&self) -> &str {
        &self.shared.identity.id
    }

    /// What the node is doing; stays live after [`Node::serve`] takes the node.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.shown.stats.clone()
    }

    /// The modules this node serves, live: it follows the modules directory.
    pub fn registry(&self) -> Arc<Registry> {
        self.shared.modules.registry.clone()
    }

    /// The modules this node serves now.
    pub fn modules(&self) -> Vec<ModuleName> {
        self.shared.modules.registry.names()
    }

    /// Where the node stands with its broker, kept up to date.
    pub fn state(&self) -> tokio::sync::watch::Receiver<State> {
        self.state.subscribe()
    }

    /// Readiness and metrics, for the HTTP endpoint; live after
    /// [`Node::serve`] takes the node.
    pub fn probe(&self) -> Probe {
        Probe {
            shared: self.shared.clone(),
            state: self.state.subscribe(),
        }
    }

    /// Serves requests until `shutdown` completes, through as many broker
    /// sessions as it takes, then stops consuming, finishes the requests in
    /// flight and closes.
    ///
    /// Returns an error only when a broker refuses this node's configuration
    /// for good (its credentials, its vhost, queue arguments that contradict
    /// what other nodes declared).
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let tasks = TaskTracker::new();
        tokio::pin!(shutdown);
        let mut broker = 0;
        let mut sessions = 0;
        let outcome = loop {
            self.state.send_replace(State::Connecting);
            let opened = {
                let open = open_session(&self.shared, &self.brokers, broker, sessions + 1);
                tokio::pin!(open);
                loop {
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break None,
                        // A session subscribes to what the registry holds when it opens.
                        Some(_) = self.updates.recv() => {}
                        opened = &mut open => break Some(opened),
                    }
                }
            };
            let mut session = match opened {
                None => break Ok(()),
                Some(Ok(session)) => session,
                Some(Err(error)) => break Err(error),
            };
            if sessions > 0 {
                self.shared.shown.metrics.reconnected();
            }
            sessions = session.number;
            broker = session.broker;
            *self.shared.shown.broker_error.lock().expect("node lock") = None;
            self.state.send_replace(State::Serving {
                broker: self.brokers.get(broker).to_string(),
                session: sessions,
            });
            match session
                .serve(&mut self.updates, &mut shutdown, &tasks)
                .await
            {
                SessionEnd::Shutdown => {
                    self.state.send_replace(State::Stopping);
                    self.following.abort();
                    session.stop(&tasks).await;
                    break Ok(());
                }
                SessionEnd::Lost(error) => {
                    // In this order, so that readiness never sees a node
                    // serving nothing: why it is not connected, then that
                    // it is not, then that it consumes nothing.
                    *self.shared.shown.broker_error.lock().expect("node lock") =
                        Some(format!("{error:#}"));
                    self.state.send_replace(State::Connecting);
                    self.shared
                        .shown
                        .subscribed
                        .lock()
                        .expect("node lock")
                        .clear();
                    tracing::warn!(
                        node = %self.shared.identity.id,
                        session = sessions,
                        "lost the broker: {error:#}; reconnecting (requests it held return to their queues)"
                    );
                    session.abandon();
                    // Try the next broker first: on a cluster, the one just
                    // lost may be the one that is down.
                    broker += 1;
                }
            }
        };

        self.state.send_replace(State::Stopping);
        self.following.abort();
        // Without a session (shutdown while connecting, or a refusal) the
        // tasks left are those of lost sessions: they end at once.
        self.shared.requests.stopping.cancel();
        tasks.close();
        tasks.wait().await;
        self.shared.requests.replies.close().await;
        self.shared.requests.children.close().await;
        tracing::info!(node = %self.shared.identity.id, "stopped");
        outcome
    }
}

/// Opens a session, trying again with backoff until one opens, or a broker
/// refuses this node for good. Logs the first failure, then attempts 2, 4,
/// 8... so that a long outage costs a few lines.
async fn open_session(
    shared: &Arc<Shared>,
    brokers: &Brokers,
    first: usize,
    number: u64,
) -> anyhow::Result<Session> {
    let started = Instant::now();
    let attempts = AtomicU32::new(0);
    let next = AtomicUsize::new(first);
    let open = || {
        attempts.fetch_add(1, Ordering::Relaxed);
        Session::open(shared, brokers, next.load(Ordering::Relaxed), number)
    };
    let opened = open
        .retry(reconnect_backoff())
        .when(|error| matches!(error, OpenError::Transient(_)))
        .notify(|error, delay| {
            // The next attempt starts with the next broker.
            next.fetch_add(1, Ordering::Relaxed);
            *shared.shown.broker_error.lock().expect("node lock") =
                Some(format!("{:#}", error.cause()));
            let attempt = attempts.load(Ordering::Relaxed);
            if attempt.is_power_of_two() {
                tracing::warn!(
                    node = %shared.identity.id,
                    attempt,
                    waiting_s = started.elapsed().as_secs(),
                    retry_in_ms = delay.as_millis() as u64,
                    "waiting for the broker: {:#}",
                    error.cause()
                );
            }
        })
        .await;
    match opened {
        Ok(session) => {
            if attempts.load(Ordering::Relaxed) > 1 {
                tracing::info!(
                    node = %shared.identity.id,
                    attempts = attempts.load(Ordering::Relaxed),
                    waited_ms = started.elapsed().as_millis() as u64,
                    "the broker answers again"
                );
            }
            Ok(session)
        }
        Err(error) => Err(error
            .into_cause()
            .context("the broker refused this node's configuration")),
    }
}

/// Turns what the watcher saw into registry updates, one change at a time,
/// and tells the node about each.
async fn follow_changes(loader: Arc<Loader>, mut changes: mpsc::UnboundedReceiver<Change>) {
    let mut batch = Vec::new();
    while changes.recv_many(&mut batch, 256).await > 0 {
        // Every new file is announced before any is compiled: a module
        // dropped in beside others that compile for long waits with its
        // queue bound, not unknown.
        for change in &batch {
            if let Change::Module(stem) = change {
                loader.announce(stem);
            }
        }
        for change in batch.drain(..) {
            match change {
                Change::Module(stem) => loader.reconcile(&stem).await,
                Change::Everything => loader.reconcile_all().await,
            }
        }
    }
}
