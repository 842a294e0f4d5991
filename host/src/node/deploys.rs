//! Deploys over the broker: a node started with `--accept-deploys` takes a
//! module signed by a key it trusts, checks that it compiles, and writes it
//! into its modules directory, where the watcher and the loader serve it
//! like any file an operator dropped there (and a restart keeps it).
//!
//! A refused deploy (untrusted or bad signature, stale, too large, not a
//! module, an invalid manifest) is logged, answered with the reason, and
//! never touches the directory. Files are written aside and renamed, the
//! manifest first, so the loader never reads half of either.

use std::path::{Path, PathBuf};

use lapin::message::Delivery;
use lapin::types::AMQPValue;

use crate::amqp::{header_str, header_u64};
use crate::deploy::{Action, Order, Refusal, Signed, TrustedKeys};
use crate::manifest::Manifest;
use crate::names::ModuleName;
use crate::runtime::{Limits, Runtime, Wasm};
use crate::units::Bytes;
use crate::wire::{
    DEPLOY_ISSUED_HEADER, DEPLOY_KEY_HEADER, DEPLOY_MANIFEST_HEADER, DEPLOY_NAME_HEADER,
    DEPLOY_SIGNATURE_HEADER,
};

/// What a node that accepts deploys needs to take one.
pub(crate) struct Deploys {
    pub trusted: TrustedKeys,
    pub dir: PathBuf,
    pub runtime: Runtime,
    /// The node's limits, which a deployed manifest changes as a file's would.
    pub limits: Limits,
    /// The largest module taken.
    pub max_size: usize,
    /// One deploy at a time: two for one name must not interleave their files.
    pub writing: tokio::sync::Mutex<()>,
}

/// What a deploy came to: the version written, or why not.
pub(crate) type Outcome = Result<Option<String>, Refusal>;

impl Deploys {
    pub async fn take(&self, action: Action, delivery: &Delivery) -> Outcome {
        let order = self.read(action, delivery)?;
        match action {
            Action::Deploy => self.deploy(order).await.map(Some),
            Action::Undeploy => self.undeploy(&order.name).await.map(|()| None),
        }
    }

    /// The order in the message, checked: signed by a trusted key, recently.
    fn read(&self, action: Action, delivery: &Delivery) -> Result<Order, Refusal> {
        let headers = delivery.properties.headers().as_ref();
        let invalid = |why: String| Refusal::Invalid(why);
        let name: ModuleName = header_str(headers, DEPLOY_NAME_HEADER)
            .ok_or_else(|| invalid(format!("no {DEPLOY_NAME_HEADER} header")))?
            .parse()
            .map_err(|error| invalid(format!("{error}")))?;
        let issued_at = header_u64(headers, DEPLOY_ISSUED_HEADER)
            .map_err(invalid)?
            .ok_or_else(|| invalid(format!("no {DEPLOY_ISSUED_HEADER} header")))?;
        let manifest = match headers.and_then(|h| h.inner().get(DEPLOY_MANIFEST_HEADER)) {
            None => None,
            Some(AMQPValue::LongString(text)) => Some(
                String::from_utf8(text.as_bytes().to_vec())
                    .map_err(|_| invalid("the manifest is not UTF-8".into()))?,
            ),
            Some(_) => return Err(invalid("the manifest header is not a string".into())),
        };
        let signed = header_str(headers, DEPLOY_KEY_HEADER)
            .zip(header_str(headers, DEPLOY_SIGNATURE_HEADER))
            .and_then(|(key, signature)| Signed::parse(key, signature))
            .ok_or(Refusal::Unsigned)?;
        let order = Order {
            action,
            name,
            module: delivery.data.clone(),
            manifest,
            issued_at,
        };
        order.verify(&signed, &self.trusted)?;
        Ok(order)
    }

    async fn deploy(&self, order: Order) -> Result<String, Refusal> {
        let invalid = Refusal::Invalid;
        if order.module.len() > self.max_size {
            return Err(invalid(format!(
                "a module of {} is over this node's deploy limit of {}",
                Bytes(order.module.len() as u64),
                Bytes(self.max_size as u64)
            )));
        }
        let limits = match &order.manifest {
            Some(text) => toml::from_str::<Manifest>(text)
                .map_err(|error| invalid(format!("invalid manifest: {}", error.message())))?
                .limits
                .apply_to(&self.limits)
                .map_err(|error| invalid(format!("invalid manifest: {error}")))?,
            None => self.limits.clone(),
        };
        // Compiled here first: a broken module never reaches the directory,
        // and the version served keeps serving.
        let wasm = Wasm::new(order.module.clone());
        let version = wasm.digest()[..16].to_owned();
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || runtime.compile(&wasm, &limits))
            .await
            .map_err(|_| invalid("the compiler thread panicked".into()))?
            .map_err(|error| invalid(format!("not a module this node can serve: {error:#}")))?;

        let _writing = self.writing.lock().await;
        let name = order.name.as_str();
        let manifest = self.dir.join(format!("{name}.toml"));
        match &order.manifest {
            Some(text) => write_aside(&manifest, text.as_bytes()),
            None => remove(&manifest),
        }
        .and_then(|()| write_aside(&self.dir.join(format!("{name}.wasm")), &order.module))
        .map_err(|error| invalid(format!("failed to write the module: {error}")))?;
        Ok(version)
    }

    async fn undeploy(&self, name: &ModuleName) -> Result<(), Refusal> {
        let _writing = self.writing.lock().await;
        // The module first: without it, a manifest serves nothing.
        remove(&self.dir.join(format!("{name}.wasm")))
            .and_then(|()| remove(&self.dir.join(format!("{name}.toml"))))
            .map_err(|error| Refusal::Invalid(format!("failed to remove the module: {error}")))
    }
}

/// Writes `path` whole or not at all: aside under a name the loader
/// ignores, then renamed into place.
fn write_aside(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let partial = path.with_file_name(format!(".{file_name}.deploy.partial"));
    std::fs::write(&partial, contents)
        .and_then(|()| std::fs::rename(&partial, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}
