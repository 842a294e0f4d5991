//! A real node, in this process, on the real broker, under a fresh exchange.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wasmrpc::client::{Client, Reply};
use wasmrpc::names::ModuleName;
use wasmrpc::node::{Node, NodeConfig, State};
use wasmrpc::registry::Registry;
use wasmrpc::stats::Stats;
use wasmrpc::wire::Topology;

use super::{amqp_url, brokers, guests, unique};

/// How long a test waits for a reply that should come.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a node may take to serve, once it has loaded its modules.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct TestNode {
    pub topology: Topology,
    /// Deleted when the node is dropped.
    modules_dir: TempDir,
    /// The node's modules, live.
    pub registry: Arc<Registry>,
    pub id: String,
    modules: Vec<ModuleName>,
    pub stats: Arc<Stats>,
    /// Where its HTTP endpoint listens, if it was started with one.
    pub http: Option<SocketAddr>,
    stop: CancellationToken,
    serving: Option<JoinHandle<anyhow::Result<()>>>,
    /// Dropped after `drop` has told the node to stop.
    _cleanup: Cleanup,
}

/// What a test node serves and how it is configured, before it starts.
pub struct Setup {
    http: bool,
    guests: Vec<String>,
    files: Vec<(String, Vec<u8>)>,
    /// Its modules directory is filled in by `start`.
    config: NodeConfig,
}

impl Setup {
    /// Adds a file to the modules directory (a manifest, a broken module...).
    pub fn file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_owned(), contents.into()));
        self
    }

    /// Gives `module` a manifest.
    pub fn manifest(self, module: &str, toml: &str) -> Self {
        self.file(&format!("{module}.toml"), toml)
    }

    /// Serves on `exchange`, beside other nodes there, instead of a fresh one.
    pub fn exchange(self, exchange: &str) -> Self {
        let exchange = exchange.to_owned();
        self.config(move |config| config.exchange = exchange)
    }

    /// Serves the HTTP endpoint too, on a free port of loopback; it answers
    /// until the `TestNode` is dropped, after the node has stopped.
    pub fn with_http(mut self) -> Self {
        self.http = true;
        self
    }

    /// Adjusts the node's configuration.
    pub fn config(mut self, configure: impl FnOnce(&mut NodeConfig)) -> Self {
        configure(&mut self.config);
        self
    }

    pub async fn start(self) -> TestNode {
        self.try_start().await.expect("the node failed to start")
    }

    pub async fn try_start(self) -> anyhow::Result<TestNode> {
        let modules_dir = tempfile::tempdir().expect("failed to create a modules directory");
        for name in &self.guests {
            std::fs::copy(
                guests::wasm(name),
                modules_dir.path().join(format!("{name}.wasm")),
            )
            .expect("failed to copy a guest into the modules directory");
        }
        for (name, contents) in &self.files {
            let path = modules_dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("a file in the directory"))
                .and_then(|()| std::fs::write(path, contents))
                .expect("failed to write to the modules directory");
        }
        let mut config = self.config;
        config.modules_dir = modules_dir.path().to_owned();
        let topology = Topology::new(&config.exchange);
        // Made before the node starts: a node that fails half-way may have
        // declared some of its topology already.
        let cleanup = Cleanup {
            topology: topology.clone(),
            modules: self
                .guests
                .iter()
                .map(String::as_str)
                .chain(
                    self.files
                        .iter()
                        .filter_map(|(name, _)| name.strip_suffix(".wasm")),
                )
                .filter_map(|name| name.parse().ok())
                .collect(),
            gone: CancellationToken::new(),
        };
        let node = Node::start(config).await?;
        let modules = node.modules();
        let stats = node.stats();
        let registry = node.registry();
        let id = node.id().to_owned();
        let mut state = node.state();
        let stop = CancellationToken::new();
        let http = match self.http {
            true => {
                let listener = wasmrpc::http::bind(([127, 0, 0, 1], 0).into()).await?;
                let addr = listener.local_addr()?;
                let endpoint = wasmrpc::http::serve(
                    listener,
                    node.probe(),
                    cleanup.gone.clone().cancelled_owned(),
                );
                tokio::spawn(endpoint);
                Some(addr)
            }
            false => None,
        };
        let serving = tokio::spawn(node.serve(stop.clone().cancelled_owned()));
        // Serving means subscribed: requests published from now on reach it.
        // The state is gone only when `serve` has returned.
        let ready = state.wait_for(|state| matches!(state, State::Serving { .. }));
        match tokio::time::timeout(START_TIMEOUT, ready).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                serving.await.expect("the node task panicked")?;
                anyhow::bail!("the node stopped before it served");
            }
            Err(_) => {
                stop.cancel();
                anyhow::bail!(
                    "the node did not serve within {START_TIMEOUT:?}: is the broker up? (on \
                     RabbitMQ 3.10, INTERNAL_ERROR on every quorum queue means rabbit_fifo_dlx_sup \
                     is down: scripts/test restarts it)"
                );
            }
        }
        Ok(TestNode {
            topology,
            modules_dir,
            registry,
            id,
            modules,
            stats,
            http,
            stop,
            serving: Some(serving),
            _cleanup: cleanup,
        })
    }
}

impl TestNode {
    /// A node serving the named guests (built from `guests/`), with defaults.
    pub async fn start(guests: &[&str]) -> TestNode {
        Self::setup(guests).start().await
    }

    /// A node serving the named guests, to be configured further.
    pub fn setup(guests: &[&str]) -> Setup {
        Setup {
            http: false,
            guests: guests.iter().map(|name| name.to_string()).collect(),
            files: Vec::new(),
            config: NodeConfig {
                exchange: unique("node"),
                ..NodeConfig::new(brokers(), "")
            },
        }
    }

    /// Waits until `count` requests are running wasm on the node.
    pub async fn running(&self, count: usize) {
        let mut running = self.stats.running();
        tokio::time::timeout(REPLY_TIMEOUT, running.wait_for(|&n| n == count))
            .await
            .unwrap_or_else(|_| panic!("{count} requests never ran at once"))
            .unwrap();
    }

    /// The directory the node serves; files dropped here are served.
    pub fn modules_path(&self) -> &std::path::Path {
        self.modules_dir.path()
    }

    /// The modules the node loaded at start.
    pub fn modules(&self) -> &[ModuleName] {
        &self.modules
    }

    pub fn exchange(&self) -> &str {
        self.topology.exchange()
    }

    pub async fn client(&self) -> Client {
        Self::client_for(self.exchange()).await
    }

    /// A client of the fleet on `exchange` (nodes in other processes, say).
    pub async fn client_for(exchange: &str) -> Client {
        Client::connect(&brokers(), exchange)
            .await
            .expect("the client failed to connect")
    }

    /// One call on a fresh client; panics if no reply comes.
    pub async fn call(&self, module: &str, input: impl AsRef<[u8]>) -> Reply {
        self.client()
            .await
            .call(module, input.as_ref(), REPLY_TIMEOUT)
            .await
            .expect("no reply")
    }

    /// Shuts the node down warmly and returns what `serve` returned. The
    /// node's queues stay until the `TestNode` is dropped, for tests that
    /// look at what is left in them.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        let serving = self.serving.take().expect("the node is serving");
        serving.await.expect("the node task panicked")
    }
}

impl Drop for TestNode {
    /// Stops the node if the test did not; `cleanup` then deletes its topology.
    fn drop(&mut self) {
        self.stop.cancel();
        // Modules added while it ran have queues too.
        for name in self.registry.names() {
            if !self._cleanup.modules.contains(&name) {
                self._cleanup.modules.push(name);
            }
        }
    }
}

/// Deletes, when dropped, everything a node on `topology` serving `modules`
/// declared on the broker, so a test leaves nothing behind even when it fails.
pub struct Cleanup {
    pub topology: Topology,
    pub modules: Vec<ModuleName>,
    /// Cancelled when dropped: what lives as long as the test's node does.
    gone: CancellationToken,
}

impl Cleanup {
    pub fn new(exchange: &str, modules: &[&str]) -> Cleanup {
        Cleanup {
            topology: Topology::new(exchange),
            modules: modules.iter().map(|name| name.parse().unwrap()).collect(),
            gone: CancellationToken::new(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.gone.cancel();
        let (topology, modules) = (self.topology.clone(), std::mem::take(&mut self.modules));
        // Drop cannot await, and may run inside a runtime: use a thread of its own.
        let _ = std::thread::spawn(move || {
            // A quorum queue deleted as it is created crashes RabbitMQ 3.10's
            // dead-letter worker, and two crashes break every such queue on
            // the broker (see `node::subscriptions::QUEUE_SETTLE`).
            if !modules.is_empty() {
                std::thread::sleep(Duration::from_secs(1));
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(delete_topology(&topology, &modules));
            std::io::Result::Ok(())
        })
        .join();
    }
}

async fn delete_topology(topology: &Topology, modules: &[ModuleName]) {
    let Ok(connection) = lapin::Connection::connect(&amqp_url(), Default::default()).await else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let queues = modules
        .iter()
        .map(|module| topology.module_queue(module))
        .chain([topology.unrouted_queue(), topology.dead_queue()]);
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let exchanges = [
        topology.exchange().to_owned(),
        topology.unrouted_exchange(),
        topology.dead_exchange(),
        topology.control_exchange(),
    ];
    for exchange in exchanges {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "test done".into()).await;
}

/// Waits until `nodes` have counted `calls` answered calls between them. A
/// node counts a call once the broker has confirmed its reply, which may be
/// a moment after the caller got it.
pub async fn answered(nodes: &[&TestNode], calls: u64) {
    let mut counts: Vec<_> = nodes.iter().map(|node| node.stats.answered()).collect();
    let total = |counts: &mut Vec<tokio::sync::watch::Receiver<u64>>| -> u64 {
        counts
            .iter_mut()
            .map(|count| *count.borrow_and_update())
            .sum()
    };
    let waited = tokio::time::timeout(REPLY_TIMEOUT, async {
        while total(&mut counts) < calls {
            // Whichever node counts next.
            let mut changed = tokio::task::JoinSet::new();
            for count in &counts {
                let mut count = count.clone();
                changed.spawn(async move { count.changed().await });
            }
            changed.join_next().await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "the nodes counted {} calls, not {calls}",
        total(&mut counts)
    );
}

impl TestNode {
    /// Waits until what the node serves satisfies `done`, within `within`;
    /// the registry says when it changes, so nothing polls.
    pub async fn until_registry(&self, within: Duration, done: impl Fn(&Registry) -> bool) {
        let mut changes = self.registry.changes();
        let waited = tokio::time::timeout(within, async {
            loop {
                if done(&self.registry) {
                    return;
                }
                changes.changed().await.expect("the registry is gone");
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "the registry did not change as expected within {within:?}"
        );
    }
}
