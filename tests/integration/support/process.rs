//! The `wasmrpc` binary as a separate process, for what only a process can
//! show: signals, being killed, its own memory use.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

use super::{amqp_url, guests};

/// A running `wasmrpc serve` and the lines of its log.
pub struct NodeProcess {
    pub child: Child,
    pub log: mpsc::Receiver<String>,
    /// Deleted with the process.
    _modules: TempDir,
}

/// The pieces of a node process: its modules and its settings.
pub struct Spawn {
    pub guests: &'static [&'static str],
    pub files: &'static [(&'static str, &'static str)],
    pub exchange: String,
    pub env: &'static [(&'static str, &'static str)],
}

impl Spawn {
    /// Starts the node in a new modules directory and waits, off the async
    /// runtime, until it is ready.
    pub async fn start(self) -> NodeProcess {
        tokio::task::spawn_blocking(move || {
            let modules = tempfile::tempdir().unwrap();
            for name in self.guests {
                std::fs::copy(
                    guests::wasm(name),
                    modules.path().join(format!("{name}.wasm")),
                )
                .unwrap();
            }
            for (name, contents) in self.files {
                std::fs::write(modules.path().join(name), contents).unwrap();
            }
            NodeProcess::start_in(modules, &self.exchange, self.env)
        })
        .await
        .unwrap()
    }
}

impl NodeProcess {
    /// Starts a node serving `modules` and waits until it is ready.
    pub fn start_in(modules: TempDir, exchange: &str, env: &[(&str, &str)]) -> NodeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasmrpc"))
            .args(["serve", "--modules"])
            .arg(modules.path())
            .env("AMQP_URL", amqp_url())
            .env("WASMRPC_EXCHANGE", exchange)
            .env("RUST_LOG", "info,wasmrpc::request=debug")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (sender, log) = mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    // The test stopped listening: stop reading, closing the pipe.
                    return;
                }
            }
        });
        let node = NodeProcess {
            child,
            log,
            _modules: modules,
        };
        node.wait_for_line("node ready");
        node
    }

    /// Waits until the node logs a line containing `needle`, and returns it.
    pub fn wait_for_line(&self, needle: &str) -> String {
        loop {
            match self.log.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(error) => panic!("the node never logged {needle:?}: {error}"),
            }
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// The node's resident set size, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib << 10
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
