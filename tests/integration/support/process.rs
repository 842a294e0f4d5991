//! The `wasmrpc` binary as a separate process, for what only a process can
//! show: signals, being killed, its own memory use, riding through faults.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

use super::{amqp_url, guests};

/// How long a node may take to log what a test waits for, by default.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `wasmrpc serve` and the lines of its log.
pub struct NodeProcess {
    pub child: Child,
    pub log: mpsc::Receiver<String>,
    /// The line it logged when it first served, if it was started so.
    pub ready: String,
    /// Deleted with the process.
    _modules: TempDir,
}

/// The pieces of a node process: its modules, its broker and its settings.
#[derive(Clone)]
pub struct Spawn {
    guests: Vec<String>,
    files: Vec<(String, Vec<u8>)>,
    exchange: String,
    env: Vec<(String, String)>,
    /// Resource limits (`setrlimit`) it starts with.
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
}

impl Spawn {
    /// A node on `exchange` of the tests' broker, serving `guests`.
    pub fn new(exchange: &str, guests: &[&str]) -> Spawn {
        Spawn {
            guests: guests.iter().map(|name| name.to_string()).collect(),
            files: Vec::new(),
            exchange: exchange.to_owned(),
            env: vec![("AMQP_URL".into(), amqp_url())],
            rlimits: Vec::new(),
        }
    }

    /// Limits the size of the files it writes, as `ulimit -f` does: a write
    /// past it fails.
    pub fn file_size_limit(mut self, bytes: u64) -> Spawn {
        self.rlimits.push((libc::RLIMIT_FSIZE, bytes));
        self
    }

    /// Limits the files it may have open at once, as `ulimit -n` does.
    pub fn open_files_limit(mut self, files: u64) -> Spawn {
        self.rlimits.push((libc::RLIMIT_NOFILE, files));
        self
    }

    /// Adds a file to its modules directory (a manifest, say).
    pub fn file(self, name: &str, contents: &str) -> Spawn {
        self.binary(name, contents.as_bytes().to_vec())
    }

    /// Adds a file of any bytes to its modules directory (a module, say).
    pub fn binary(mut self, name: &str, contents: Vec<u8>) -> Spawn {
        self.files.push((name.into(), contents));
        self
    }

    /// Sets an environment variable of the node.
    pub fn env(mut self, name: &str, value: &str) -> Spawn {
        self.env.retain(|(key, _)| key != name);
        self.env.push((name.into(), value.into()));
        self
    }

    /// Connects it to the broker(s) at `url` (comma-separated for several).
    pub fn url(self, url: &str) -> Spawn {
        self.env("AMQP_URL", url)
    }

    /// Starts the node in a new modules directory and waits, off the async
    /// runtime, until it serves.
    pub async fn start(self) -> NodeProcess {
        let mut node = self.launch().await;
        tokio::task::spawn_blocking(move || {
            node.ready = node.wait_for_line("node ready");
            node
        })
        .await
        .unwrap()
    }

    /// Starts the node without waiting for anything.
    pub async fn launch(self) -> NodeProcess {
        tokio::task::spawn_blocking(move || {
            let modules = tempfile::tempdir().unwrap();
            for name in &self.guests {
                std::fs::copy(
                    guests::wasm(name),
                    modules.path().join(format!("{name}.wasm")),
                )
                .unwrap();
            }
            for (name, contents) in &self.files {
                std::fs::write(modules.path().join(name), contents).unwrap();
            }
            NodeProcess::launch_in(modules, &self.exchange, &self.env, self.rlimits)
        })
        .await
        .unwrap()
    }
}

impl NodeProcess {
    fn launch_in(
        modules: TempDir,
        exchange: &str,
        env: &[(String, String)],
        rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    ) -> NodeProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wasmrpc"));
        command
            .args(["serve", "--modules"])
            .arg(modules.path())
            .env("WASMRPC_EXCHANGE", exchange)
            .env("RUST_LOG", "info,wasmrpc::request=debug,lapin=off")
            .envs(env.iter().map(|(key, value)| (key, value)))
            .stderr(Stdio::piped());
        if !rlimits.is_empty() {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
            unsafe {
                command.pre_exec(move || {
                    for &(resource, value) in &rlimits {
                        let limit = libc::rlimit {
                            rlim_cur: value,
                            rlim_max: value,
                        };
                        if libc::setrlimit(resource, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().unwrap();
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
        NodeProcess {
            child,
            log,
            ready: String::new(),
            _modules: modules,
        }
    }

    /// Waits until the node logs a line containing `needle`, and returns it.
    /// Blocking: call it off the async runtime.
    pub fn wait_for_line(&self, needle: &str) -> String {
        self.wait_for_line_within(needle, LINE_TIMEOUT)
    }

    /// Like [`NodeProcess::wait_for_line`], within `timeout`.
    pub fn wait_for_line_within(&self, needle: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(error) => {
                    panic!("the node never logged {needle:?} within {timeout:?}: {error}")
                }
            }
        }
    }

    /// Reads the log until the `count`th line containing `needle`, and
    /// returns every line read. Blocking: call it off the async runtime.
    pub fn lines_until(&self, needle: &str, count: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + LINE_TIMEOUT;
        let mut lines = Vec::new();
        let mut found = 0;
        while found < count {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.log.recv_timeout(left).unwrap_or_else(|error| {
                panic!("the node logged {needle:?} {found} times, not {count}: {error}\n{lines:#?}")
            });
            found += usize::from(line.contains(needle));
            lines.push(line);
        }
        lines
    }

    /// The lines the node has logged and no one has read yet.
    pub fn unread_log(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// The directory it serves.
    pub fn modules_path(&self) -> &std::path::Path {
        self._modules.path()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
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
        self.status_bytes("VmRSS")
    }

    /// The node's peak resident set size since it started, in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM")
    }

    /// A size in kB from /proc/PID/status, in bytes.
    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        kib << 10
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
