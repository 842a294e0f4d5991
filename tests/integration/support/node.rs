//! A real node, in this process, on the real broker, under a fresh exchange.

use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wasmrpc::client::{Client, Reply};
use wasmrpc::names::ModuleName;
use wasmrpc::node::{Node, NodeConfig};
use wasmrpc::wire::Topology;

use super::{amqp_url, guests, unique};

/// How long a test waits for a reply that should come.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestNode {
    pub topology: Topology,
    /// Deleted when the node is dropped.
    _modules_dir: TempDir,
    modules: Vec<ModuleName>,
    stop: CancellationToken,
    serving: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestNode {
    /// A node serving the named guests (built from `guests/`).
    pub async fn start(guest_names: &[&str]) -> TestNode {
        Self::start_with(guest_names, |_| {}).await
    }

    /// A node serving the named guests, its configuration adjusted first.
    pub async fn start_with(
        guest_names: &[&str],
        configure: impl FnOnce(&mut NodeConfig),
    ) -> TestNode {
        let modules_dir = tempfile::tempdir().expect("failed to create a modules directory");
        for name in guest_names {
            std::fs::copy(
                guests::wasm(name),
                modules_dir.path().join(format!("{name}.wasm")),
            )
            .expect("failed to copy a guest into the modules directory");
        }
        Self::start_in(modules_dir, unique("node"), configure).await
    }

    /// A node serving whatever `modules_dir` holds, on `exchange`.
    pub async fn start_in(
        modules_dir: TempDir,
        exchange: String,
        configure: impl FnOnce(&mut NodeConfig),
    ) -> TestNode {
        let mut config = NodeConfig::new(amqp_url(), modules_dir.path());
        config.exchange = exchange;
        configure(&mut config);
        let topology = Topology::new(&config.exchange);
        let node = Node::start(config).await.expect("the node failed to start");
        let modules = node.modules();
        let stop = CancellationToken::new();
        let serving = tokio::spawn(node.serve(stop.clone().cancelled_owned()));
        TestNode {
            topology,
            _modules_dir: modules_dir,
            modules,
            stop,
            serving: Some(serving),
        }
    }

    pub fn exchange(&self) -> &str {
        self.topology.exchange()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&amqp_url(), self.exchange())
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
    /// Stops the node if the test did not, and deletes what it declared on
    /// the broker, so a test leaves nothing behind even when it fails.
    fn drop(&mut self) {
        self.stop.cancel();
        let (topology, modules) = (self.topology.clone(), self.modules.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(delete_topology(&topology, &modules));
            std::io::Result::Ok(())
        })
        .join();
    }
}

/// Deletes the queues and exchanges a node on `topology` declared.
pub async fn delete_topology(topology: &Topology, modules: &[ModuleName]) {
    let Ok(connection) = lapin::Connection::connect(&amqp_url(), Default::default()).await else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let queues = modules
        .iter()
        .map(|module| topology.module_queue(module))
        .chain([topology.unrouted_queue()]);
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [topology.exchange().to_owned(), topology.unrouted_exchange()] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "test done".into()).await;
}
