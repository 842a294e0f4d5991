//! The trust boundary (README, "Security model"), tried as an attacker
//! would: with broker credentials (replaying, forging, flooding), as a
//! caller (headers and bodies of any size or shape), with a shell on the box
//! (planted links and keys, a full disk, idle connections), on real nodes
//! and the real broker.

mod cache;
mod callers;
mod deploys;
mod http;
mod isolation;
mod permissions;
mod rabbitmq4;

use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio_stream::StreamExt as _;
use wasmrpc::deploy::Ack;
use wasmrpc::wire::Topology;

use crate::cli::{run, text, wasmrpc};

/// A key pair made by `wasmrpc keygen`, in a folder of its own.
pub struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    pub async fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("deploy.key");
        let made = run(wasmrpc(
            "unused",
            &["keygen", "--out", out.to_str().unwrap()],
        ))
        .await;
        assert_eq!(made.status.code(), Some(0), "{}", text(&made.stderr));
        Keys { dir }
    }

    pub fn secret(&self) -> PathBuf {
        self.dir.path().join("deploy.key")
    }

    pub fn public(&self) -> PathBuf {
        self.dir.path().join("deploy.key.pub")
    }

    pub fn trusted(&self) -> wasmrpc::deploy::TrustedKeys {
        wasmrpc::deploy::TrustedKeys::read(&self.public()).unwrap()
    }
}

/// What `wasmrpc deploy` or `undeploy` printed and returned.
pub struct Deployed {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `wasmrpc ARGS --key KEY` on `exchange` at `url`.
pub async fn deployer(url: &str, exchange: &str, keys: &Keys, args: &[&str]) -> Deployed {
    let key = keys.secret();
    let mut args = args.to_vec();
    args.extend(["--key", key.to_str().unwrap(), "--wait", "60s"]);
    let mut command = wasmrpc(exchange, &args);
    command.env("AMQP_URL", url);
    let output = run(command).await;
    Deployed {
        code: output.status.code(),
        stdout: text(&output.stdout),
        stderr: text(&output.stderr),
    }
}

/// Writes `contents` to `dir/name` and returns the path, as text.
pub fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A broker user who is not a node, and reads the control exchange: it binds
/// a queue of its own there (as any user with read access to it can),
/// captures the orders deployers send, and publishes them again.
pub struct Spy {
    _connection: Connection,
    channel: Channel,
    captured: Consumer,
    answers: Consumer,
    reply_queue: String,
}

impl Spy {
    pub async fn on(url: &str, exchange: &str) -> Spy {
        let connection = Connection::connect(url, Default::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let capture = channel
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .unwrap();
        channel
            .queue_bind(
                capture.name().clone(),
                Topology::new(exchange).control_exchange().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let replies = channel
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .unwrap();
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let captured = channel
            .basic_consume(
                capture.name().clone(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .unwrap();
        let answers = channel
            .basic_consume(
                replies.name().clone(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .unwrap();
        Spy {
            _connection: connection,
            channel,
            captured,
            answers,
            reply_queue: replies.name().as_str().to_owned(),
        }
    }

    /// The next order a deployer sent to the fleet (fleet questions, and
    /// what this spy sent itself, are skipped).
    pub async fn capture(&mut self) -> Delivery {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), self.captured.next())
                .await
                .expect("no order crossed the control exchange")
                .expect("the capture ended")
                .unwrap();
            let ours = next
                .properties
                .reply_to()
                .as_ref()
                .map(|queue| queue.as_str())
                == Some(self.reply_queue.as_str());
            if next.properties.kind().is_some() && !ours {
                return next;
            }
        }
    }

    /// Publishes `properties` and `body` to the control exchange of
    /// `exchange` with this spy as `reply_to`, and returns the answers of
    /// `nodes` nodes (or whatever came within 5 s).
    pub async fn send(
        &mut self,
        exchange: &str,
        properties: BasicProperties,
        body: &[u8],
        nodes: usize,
    ) -> Vec<Ack> {
        let id = uuid::Uuid::new_v4().to_string();
        let properties = properties
            .with_reply_to(self.reply_queue.as_str().into())
            .with_correlation_id(id.as_str().into());
        self.channel
            .basic_publish(
                Topology::new(exchange).control_exchange().as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap();
        let mut acks = Vec::new();
        while acks.len() < nodes {
            let Ok(next) = tokio::time::timeout(Duration::from_secs(5), self.answers.next()).await
            else {
                break;
            };
            let answer = next.expect("the answers ended").unwrap();
            if answer
                .properties
                .correlation_id()
                .as_ref()
                .map(|id| id.as_str())
                == Some(&id)
            {
                let ack: Ack = serde_json::from_slice(&answer.data).unwrap();
                // A node compiling says so, then answers.
                if !ack.pending {
                    acks.push(ack);
                }
            }
        }
        acks
    }

    /// Publishes a captured order again, to the fleet on `exchange`.
    pub async fn replay(&mut self, exchange: &str, order: &Delivery, nodes: usize) -> Vec<Ack> {
        self.send(exchange, order.properties.clone(), &order.data, nodes)
            .await
    }
}

/// The one answer of one node, refused, with a reason that says `why`.
#[track_caller]
pub fn refused(acks: &[Ack], why: &str) {
    let [ack] = acks else {
        panic!("expected one answer, got {acks:?}");
    };
    assert!(!ack.accepted, "taken: {ack:?}");
    let reason = ack.reason.as_deref().unwrap_or_default();
    assert!(reason.contains(why), "{reason:?} does not say {why:?}");
}

/// Every file under `dir`, with its path relative to it: to start another
/// node on a copy of a node's modules directory.
pub fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let name = path.strip_prefix(dir).unwrap().to_str().unwrap().to_owned();
                found.push((name, std::fs::read(&path).unwrap()));
            }
        }
    }
    found
}
