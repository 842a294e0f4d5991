//! Deploys over the broker: a node started with `--accept-deploys` takes an
//! order signed by a key it trusts, checks that the module compiles, and
//! writes it into its modules directory, where the watcher and the loader
//! serve it like any file an operator dropped there (and a restart keeps it).
//!
//! An order is refused, before it costs anything, when it is too large, for
//! another fleet, out of its time (see [`crate::deploy`]), or not newer than
//! the last order this node took for the module: each node keeps that last
//! order in `.deploys/NAME.json` in its modules directory, so a replayed
//! order can neither roll a module back nor remove it again, even across
//! restarts, and an order seen twice is taken once. Only then is the
//! signature checked (which hashes the module) and the module compiled, one
//! order at a time and off the async workers.
//!
//! A refused order is logged, answered with the reason, and changes nothing.
//! A taken one changes the record, the manifest and the module together, in
//! one [`Transaction`]: if any write fails, all three are as they were.

use std::collections::VecDeque;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lapin::BasicProperties;
use serde::{Deserialize, Serialize};

use crate::deploy::{self, Action, Order, Refusal, Stamp, TrustedKeys};
use crate::files::Transaction;
use crate::manifest::Manifest;
use crate::names::ModuleName;
use crate::registry::{self, Loader};
use crate::runtime::{Limits, Runtime, Wasm};
use crate::units::Bytes;

/// Where a node keeps, per module, the last order it took, inside its
/// modules directory (the loader ignores names that start with a dot).
pub(crate) const RECORDS_DIR: &str = ".deploys";

/// How many verified orders a node remembers by id, to refuse a replay of
/// one it refused (a taken one is in its module's record anyway).
const SEEN: usize = 256;

/// What a node that accepts deploys needs to take one.
pub(crate) struct Deploys {
    pub trusted: TrustedKeys,
    pub dir: PathBuf,
    /// The fleet this node belongs to: orders for another are refused.
    pub exchange: String,
    pub runtime: Runtime,
    /// The node's limits, which a deployed manifest changes as a file's would.
    pub limits: Limits,
    /// No module's reply limit is above it.
    pub max_reply: usize,
    /// The largest module taken.
    pub max_size: usize,
    /// What serves the modules: it never reads half a deploy (its
    /// directory lock is held while the files change), and it serves a
    /// deployed module as compiled here.
    pub loader: Arc<Loader>,
    /// One order at a time, in the order they came: no two compiles at once,
    /// and each order checked against the record the one before left.
    pub turn: tokio::sync::Mutex<()>,
    /// The ids of the orders verified lately.
    pub seen: Mutex<VecDeque<String>>,
}

/// What an order came to: the version now served (for a deploy), or why not.
pub(crate) type Taken = Result<Option<String>, Refusal>;

/// The last order a node took for a module, as its record file holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    #[serde(flatten)]
    stamp: Stamp,
    action: Action,
    /// The version deployed; none for an undeploy.
    version: Option<String>,
}

impl Deploys {
    /// Takes the order in a control message of type `action`, or says why
    /// not. `compiling` is told when the module passed every check but the
    /// compile, which may take seconds.
    pub async fn take(
        &self,
        action: Action,
        properties: &BasicProperties,
        body: Vec<u8>,
        compiling: tokio::sync::oneshot::Sender<()>,
    ) -> Taken {
        // Before anything else: a message of any size is already in memory,
        // but it costs nothing more.
        if body.len() > self.max_size {
            return Err(Refusal::Invalid(format!(
                "a module of {} is over this node's deploy limit of {}",
                Bytes(body.len() as u64),
                Bytes(self.max_size as u64)
            )));
        }
        let (order, signed) = Order::from_message(action, properties, body)?;
        order.check_placed(&self.exchange, deploy::now_ms())?;
        let _turn = self.turn.lock().await;
        self.check_newer(&order)?;
        // Hashing a module of tens of MiB takes a while: off the workers.
        let trusted = self.trusted.clone();
        let order =
            tokio::task::spawn_blocking(move || order.verify(&signed, &trusted).map(|()| order))
                .await
                .map_err(|_| {
                    Refusal::Invalid("the thread checking the signature panicked".into())
                })??;
        self.remember(&order.stamp.order);
        match action {
            Action::Deploy => {
                let _ = compiling.send(());
                self.deploy(order).await.map(Some)
            }
            Action::Undeploy => self.undeploy(order).await.map(|()| None),
        }
    }

    /// Refuses an order seen before, or older than the last one taken for
    /// its module.
    fn check_newer(&self, order: &Order) -> Result<(), Refusal> {
        if let Some(taken) = self.record(&order.name)? {
            if taken.stamp == order.stamp {
                return Err(Refusal::Replayed(order.stamp.clone()));
            }
            if order.stamp < taken.stamp {
                return Err(Refusal::NotNewer {
                    this: order.stamp.clone(),
                    newest: taken.stamp,
                });
            }
        }
        // One refused once (it did not compile, say) is refused again.
        if self
            .seen
            .lock()
            .expect("deploys lock")
            .contains(&order.stamp.order)
        {
            return Err(Refusal::Replayed(order.stamp.clone()));
        }
        Ok(())
    }

    fn remember(&self, order: &str) {
        let mut seen = self.seen.lock().expect("deploys lock");
        if seen.len() == SEEN {
            seen.pop_front();
        }
        seen.push_back(order.to_owned());
    }

    fn record_path(&self, name: &ModuleName) -> PathBuf {
        self.dir.join(RECORDS_DIR).join(format!("{name}.json"))
    }

    /// The last order taken for `name`, if any.
    fn record(&self, name: &ModuleName) -> Result<Option<Record>, Refusal> {
        let path = self.record_path(name);
        let unreadable = |why: String| {
            Refusal::Invalid(format!(
                "this node cannot read its record of the orders it took for {name} ({}): {why}; \
                 an operator must repair or delete it",
                path.display()
            ))
        };
        match std::fs::read(&path) {
            Ok(text) => serde_json::from_slice(&text)
                .map(Some)
                .map_err(|error| unreadable(error.to_string())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(unreadable(error.to_string())),
        }
    }

    async fn deploy(&self, order: Order) -> Result<String, Refusal> {
        // While it compiles, its requests wait for it in its queue, as for a
        // file being loaded (unless a version of it serves meanwhile).
        let name = order.name.clone();
        self.loader.deploying(&name);
        let deployed = self.compile_and_write(order).await;
        let refused = deployed.as_ref().err().map(ToString::to_string);
        self.loader.deployed(&name, refused.as_deref());
        deployed
    }

    async fn compile_and_write(&self, order: Order) -> Result<String, Refusal> {
        let invalid = Refusal::Invalid;
        let manifest = match &order.manifest {
            Some(text) => toml::from_str::<Manifest>(text)
                .map_err(|error| invalid(format!("invalid manifest: {}", error.message())))?,
            None => Manifest::default(),
        };
        let limits = registry::limits_of(&manifest, &self.limits, self.max_reply, &order.name)
            .map_err(|error| invalid(format!("invalid manifest: {error}")))?;
        // Compiled here first: a broken module never reaches the directory,
        // and the version served keeps serving.
        // What the loader would make of the files: it serves this at once,
        // and finds nothing to compile when the watcher shows it them.
        let runtime = self.runtime.clone();
        let path = self.dir.join(format!("{}.wasm", order.name));
        let (order, compiled) = tokio::task::spawn_blocking(move || {
            let wasm = Wasm::new(order.module);
            let compiled =
                registry::compile(&runtime, &order.name, &path, &manifest, &wasm, limits);
            (
                Order {
                    module: wasm.into_bytes(),
                    ..order
                },
                compiled,
            )
        })
        .await
        .map_err(|_| invalid("the compiler thread panicked".into()))?;
        let loaded = compiled
            .map_err(|error| invalid(format!("not a module this node can serve: {error:#}")))?;
        let version = loaded.version.clone();

        let record = Record {
            stamp: order.stamp.clone(),
            action: Action::Deploy,
            version: Some(version.clone()),
        };
        let (dir, name) = (self.dir.clone(), order.name.clone());
        let record_path = self.record_path(&name);
        let write = move || {
            let mut transaction = Transaction::default();
            stage_record(&mut transaction, &record_path, &record)?;
            let manifest = dir.join(format!("{name}.toml"));
            match &order.manifest {
                Some(text) => transaction.write(&manifest, text.as_bytes(), 0o644)?,
                None => transaction.remove(&manifest),
            }
            transaction.write(&dir.join(format!("{name}.wasm")), &order.module, 0o644)?;
            transaction.commit()
        };
        self.loader
            .write(&order.name, write, Some(loaded))
            .await
            .map_err(|error| invalid(format!("failed to write the module: {error}")))?;
        Ok(version)
    }

    async fn undeploy(&self, order: Order) -> Result<(), Refusal> {
        if !self.dir.join(format!("{}.wasm", order.name)).exists() {
            return Err(Refusal::NotHere(order.name));
        }
        let record = Record {
            stamp: order.stamp.clone(),
            action: Action::Undeploy,
            version: None,
        };
        let (dir, name) = (self.dir.clone(), order.name.clone());
        let record_path = self.record_path(&name);
        let write = move || {
            let mut transaction = Transaction::default();
            stage_record(&mut transaction, &record_path, &record)?;
            // The module first: without it, a manifest serves nothing.
            transaction.remove(&dir.join(format!("{name}.wasm")));
            transaction.remove(&dir.join(format!("{name}.toml")));
            transaction.commit()
        };
        self.loader
            .write(&order.name, write, None)
            .await
            .map_err(|error| Refusal::Invalid(format!("failed to remove the module: {error}")))
    }
}

/// Adds the record of an order taken to `transaction`, making the records'
/// directory first if need be.
fn stage_record(
    transaction: &mut Transaction,
    path: &Path,
    record: &Record,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let text = serde_json::to_vec(record).expect("a record is always JSON");
    transaction.write(path, &text, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_written() {
        let record = Record {
            stamp: Stamp {
                issued_ms: 1_764_590_000_123,
                order: "0123456789abcdef0123456789abcdef".into(),
            },
            action: Action::Deploy,
            version: Some("45c0e103cb52b096".into()),
        };
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(
            text,
            r#"{"issued_ms":1764590000123,"order":"0123456789abcdef0123456789abcdef","action":"deploy","version":"45c0e103cb52b096"}"#
        );
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), record);
    }
}
