//! Signed deploys: what `wasmrpc deploy` and `undeploy` send a fleet, and
//! how a node tells a deploy it may take from one it must refuse.
//!
//! An operator makes an ed25519 key pair (`wasmrpc keygen`); nodes started
//! with `--accept-deploys FILE` trust the public keys listed there. A deploy
//! is signed over everything it changes (the action, the module's name, the
//! SHA-256 of the module and of the manifest) and the time it was issued, so
//! a signature cannot be moved to other bytes or another name, and a
//! captured deploy cannot be replayed after [`MAX_AGE`] (rolling a module
//! back, or undeploying it again later).
//!
//! Nothing here touches the broker or the disk.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::names::ModuleName;
use crate::wire::unix_time;

/// How old a signed deploy may be when a node gets it (clocks may differ
/// a little; a deploy waits for no queue).
pub const MAX_AGE: Duration = Duration::from_secs(300);

/// What a deploy asks of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Serve this module, in this version, with this manifest.
    Deploy,
    /// Stop serving this module.
    Undeploy,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deploy => "deploy",
            Action::Undeploy => "undeploy",
        }
    }

    pub fn parse(text: &str) -> Option<Action> {
        match text {
            "deploy" => Some(Action::Deploy),
            "undeploy" => Some(Action::Undeploy),
            _ => None,
        }
    }
}

/// A deploy or undeploy, with what it is signed over.
#[derive(Clone, Debug)]
pub struct Order {
    pub action: Action,
    pub name: ModuleName,
    /// The module's bytes; empty for an undeploy.
    pub module: Vec<u8>,
    /// The text of `NAME.toml`, if the module has one.
    pub manifest: Option<String>,
    /// Unix seconds.
    pub issued_at: u64,
}

impl Order {
    pub fn new(
        action: Action,
        name: ModuleName,
        module: Vec<u8>,
        manifest: Option<String>,
    ) -> Order {
        Order {
            action,
            name,
            module,
            manifest,
            issued_at: now(),
        }
    }

    /// The bytes the signature covers.
    fn signed(&self) -> Vec<u8> {
        let manifest = self
            .manifest
            .as_deref()
            .map(|text| hex::encode(Sha256::digest(text)));
        format!(
            "wasmrpc {} v1\nname {}\nmodule {}\nmanifest {}\nissued {}\n",
            self.action.as_str(),
            self.name,
            hex::encode(Sha256::digest(&self.module)),
            manifest.as_deref().unwrap_or("none"),
            self.issued_at
        )
        .into_bytes()
    }

    pub fn sign(&self, key: &SecretKey) -> Signed {
        Signed {
            key: key.0.verifying_key(),
            signature: key.0.sign(&self.signed()),
        }
    }

    /// Whether one of `trusted` signed this order, recently.
    pub fn verify(&self, signed: &Signed, trusted: &TrustedKeys) -> Result<(), Refusal> {
        if !trusted.0.contains(&signed.key) {
            return Err(Refusal::UntrustedKey(hex::encode(signed.key.as_bytes())));
        }
        signed
            .key
            .verify(&self.signed(), &signed.signature)
            .map_err(|_| Refusal::BadSignature)?;
        let age = now().abs_diff(self.issued_at);
        if age > MAX_AGE.as_secs() {
            return Err(Refusal::Stale(age));
        }
        Ok(())
    }
}

/// The signer's public key and its signature.
#[derive(Clone, Debug)]
pub struct Signed {
    pub key: VerifyingKey,
    pub signature: Signature,
}

impl Signed {
    /// From their hex forms, as headers carry them.
    pub fn parse(key: &str, signature: &str) -> Option<Signed> {
        let key: [u8; 32] = hex::decode(key).ok()?.try_into().ok()?;
        let signature: [u8; 64] = hex::decode(signature).ok()?.try_into().ok()?;
        Some(Signed {
            key: VerifyingKey::from_bytes(&key).ok()?,
            signature: Signature::from_bytes(&signature),
        })
    }
}

/// Why a node refuses a deploy; the deployer reads it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the deploy is not signed, or its signature is malformed")]
    Unsigned,
    #[error("signed by key {0}, which this node does not trust")]
    UntrustedKey(String),
    #[error("the signature does not match the module, name and manifest")]
    BadSignature,
    #[error("signed {0} s from now: older than {max} s, or the clocks differ", max = MAX_AGE.as_secs())]
    Stale(u64),
    #[error("{0}")]
    Invalid(String),
}

/// A signing key, read from a file `keygen` wrote.
pub struct SecretKey(SigningKey);

impl SecretKey {
    pub fn generate() -> anyhow::Result<SecretKey> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|error| anyhow::anyhow!("no randomness: {error}"))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn read(path: &Path) -> anyhow::Result<SecretKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the key {}", path.display()))?;
        let seed: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .with_context(|| format!("{} is not a key made by `wasmrpc keygen`", path.display()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    /// The secret, in hex, as its file holds it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

/// A verifying key, in hex.
pub struct PublicKey(VerifyingKey);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0.as_bytes()))
    }
}

/// The public keys a node takes deploys from: a file of hex keys, one a
/// line; blank lines and `#` comments are ignored.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys(Vec<VerifyingKey>);

impl TrustedKeys {
    pub fn read(path: &Path) -> anyhow::Result<TrustedKeys> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the trusted keys {}", path.display()))?;
        let mut keys = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let key = hex::decode(line)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok())
                .with_context(|| {
                    format!(
                        "{} line {}: not a public key made by `wasmrpc keygen`",
                        path.display(),
                        number + 1
                    )
                })?;
            keys.push(key);
        }
        anyhow::ensure!(!keys.is_empty(), "{} lists no public key", path.display());
        Ok(TrustedKeys(keys))
    }
}

/// A node's answer to a deploy or undeploy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub node: String,
    pub host: String,
    pub accepted: bool,
    /// The version now served, for a deploy taken.
    pub version: Option<String>,
    /// Why it was refused.
    pub reason: Option<String>,
}

fn now() -> u64 {
    unix_time().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Order {
        Order::new(
            Action::Deploy,
            "fib".parse().unwrap(),
            b"\0asm".to_vec(),
            Some("[limits]\ntime = 1\n".into()),
        )
    }

    fn trusting(key: &SecretKey) -> TrustedKeys {
        TrustedKeys(vec![key.0.verifying_key()])
    }

    #[test]
    fn a_signature_covers_everything_the_deploy_changes() {
        let key = SecretKey::generate().unwrap();
        let trusted = trusting(&key);
        let order = order();
        let signed = order.sign(&key);
        assert_eq!(order.verify(&signed, &trusted), Ok(()));

        let mut other = order.clone();
        other.module.push(0);
        assert_eq!(other.verify(&signed, &trusted), Err(Refusal::BadSignature));
        let mut other = order.clone();
        other.name = "fob".parse().unwrap();
        assert_eq!(other.verify(&signed, &trusted), Err(Refusal::BadSignature));
        let mut other = order.clone();
        other.manifest = None;
        assert_eq!(other.verify(&signed, &trusted), Err(Refusal::BadSignature));
        let mut other = order.clone();
        other.action = Action::Undeploy;
        assert_eq!(other.verify(&signed, &trusted), Err(Refusal::BadSignature));
    }

    #[test]
    fn untrusted_and_stale_deploys_are_refused() {
        let (key, stranger) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let order = order();
        assert!(matches!(
            order.verify(&order.sign(&stranger), &trusting(&key)),
            Err(Refusal::UntrustedKey(_))
        ));
        let mut old = order.clone();
        old.issued_at -= MAX_AGE.as_secs() + 60;
        assert!(matches!(
            old.verify(&old.sign(&key), &trusting(&key)),
            Err(Refusal::Stale(_))
        ));
    }

    #[test]
    fn keys_round_trip_through_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        std::fs::write(dir.path().join("k"), key.to_hex()).unwrap();
        std::fs::write(
            dir.path().join("trusted"),
            format!("# the release key\n{}\n\n", key.public()),
        )
        .unwrap();
        let read = SecretKey::read(&dir.path().join("k")).unwrap();
        let trusted = TrustedKeys::read(&dir.path().join("trusted")).unwrap();
        let order = order();
        assert_eq!(order.verify(&order.sign(&read), &trusted), Ok(()));
        std::fs::write(dir.path().join("bad"), "not a key\n").unwrap();
        assert!(TrustedKeys::read(&dir.path().join("bad")).is_err());
    }
}
