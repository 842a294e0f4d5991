//! A private RabbitMQ node, for the tests that stop, start or reconfigure
//! their broker: its own node name, ports and data directory under a temp
//! folder, so the broker other tests share is never touched.
//!
//! It runs as this user, from the same installation as the shared broker
//! (Debian's `rabbitmq-server`), with its Erlang cookie in its own folder.

use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a broker may take to start; a few seconds here.
const START_TIMEOUT: Duration = Duration::from_secs(90);

pub struct PrivateBroker {
    dir: TempDir,
    name: String,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Starts a broker and waits until it takes connections. `config` lines
    /// are added to its `rabbitmq.conf` (e.g. `max_message_size = 1048576`).
    pub async fn start(config: &[&str]) -> PrivateBroker {
        let mut broker = PrivateBroker::new(config);
        broker.start_again().await;
        broker
    }

    /// A broker with its folder and ports chosen, not started yet.
    pub fn new(config: &[&str]) -> PrivateBroker {
        let dir = tempfile::tempdir().expect("failed to create the broker's folder");
        let port = free_port();
        let dist_port = free_port();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("wasmrpc-test-{}@localhost", &id[..12]);
        let mut conf = format!(
            "listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n\
             # A test broker never stops for a low disk.\ndisk_free_limit.absolute = 1\n"
        );
        for line in config {
            conf.push_str(line);
            conf.push('\n');
        }
        std::fs::write(dir.path().join("rabbitmq.conf"), conf).unwrap();
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").unwrap();
        PrivateBroker {
            dir,
            name,
            port,
            dist_port,
            child: None,
        }
    }

    /// The URL to reach it.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts it (again: its data survives a stop), and waits until it
    /// takes connections.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let dir = self.dir.path();
        let log = std::fs::File::create(dir.join("stdout.log")).unwrap();
        let child = Command::new(server())
            .envs(environment(dir, &self.name, self.port, self.dist_port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group, so that stopping it reaches the VM too.
            .process_group(0)
            .spawn()
            .expect("failed to start rabbitmq-server");
        self.child = Some(child);
        let started = Instant::now();
        let url = self.url();
        loop {
            let connected =
                lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await;
            if let Ok(connection) = connected {
                let _ = connection.close(200, "up".into()).await;
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the private broker exited ({status}) while starting; see {}",
                    dir.join("log").display()
                );
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "the private broker did not start within {START_TIMEOUT:?}; see {}",
                dir.join("log").display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The URL to reach it as `user`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `script`, shell lines that call `rabbitmqctl` (as an operator
    /// would type them), against this broker, off the async runtime.
    /// Returns what it printed; panics with its errors if it fails.
    pub async fn ctl(&self, script: &str) -> String {
        let ctl = Path::new("/usr/lib/rabbitmq/bin/rabbitmqctl");
        let ctl = if ctl.exists() {
            ctl.to_owned()
        } else {
            server().with_file_name("rabbitmqctl")
        };
        let script = format!(
            "set -euo pipefail\nrabbitmqctl() {{ {} -q -n '{}' \"$@\"; }}\n{script}",
            ctl.display(),
            self.name
        );
        // rabbitmqctl listens for Erlang distribution itself: a port of its own.
        let port = free_port().to_string();
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(&script)
            // Where the broker keeps its Erlang cookie.
            .env("HOME", self.dir.path())
            .env("RABBITMQ_CTL_DIST_PORT_MIN", &port)
            .env("RABBITMQ_CTL_DIST_PORT_MAX", &port);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .expect("failed to run bash");
        assert!(
            output.status.success(),
            "rabbitmqctl failed:\n{script}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Stops it as an operator would (SIGTERM), and waits until it has.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal_group(&child, "TERM");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        // The shell wrapper waits for the VM; make sure nothing is left.
        wait_for_port_closed(self.port).await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(&child, "KILL");
            let _ = child.wait();
        }
    }
}

/// The server script that runs as the calling user: Debian's
/// `/usr/sbin/rabbitmq-server` would switch to user `rabbitmq`.
fn server() -> PathBuf {
    let debian = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if debian.exists() {
        return debian.to_owned();
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("rabbitmq-server"))
            .find(|candidate| candidate.exists())
    });
    found.expect(
        "the fault tests start brokers of their own and need RabbitMQ's server here: \
         install Debian's rabbitmq-server (scripts/test does)",
    )
}

fn environment(dir: &Path, name: &str, port: u16, dist_port: u16) -> Vec<(String, String)> {
    let path = |child: &str| dir.join(child).display().to_string();
    vec![
        // The Erlang cookie is made here, private to this broker.
        ("HOME".into(), path("")),
        ("RABBITMQ_NODENAME".into(), name.into()),
        ("RABBITMQ_NODE_PORT".into(), port.to_string()),
        ("RABBITMQ_DIST_PORT".into(), dist_port.to_string()),
        ("RABBITMQ_MNESIA_BASE".into(), path("mnesia")),
        ("RABBITMQ_LOG_BASE".into(), path("log")),
        ("RABBITMQ_PID_FILE".into(), path("pid")),
        ("RABBITMQ_CONFIG_FILE".into(), path("rabbitmq.conf")),
        (
            "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
            path("enabled_plugins"),
        ),
        (
            "RABBITMQ_ADVANCED_CONFIG_FILE".into(),
            path("advanced.config"),
        ),
        ("RABBITMQ_CONF_ENV_FILE".into(), path("rabbitmq-env.conf")),
    ]
}

fn signal_group(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{}", child.id())])
        .status();
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for_port_closed(port: u16) {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(
            started.elapsed() < START_TIMEOUT,
            "the private broker did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
