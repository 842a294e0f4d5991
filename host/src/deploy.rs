//! Signed deploys: what `wasmrpc deploy` and `undeploy` send a fleet, how a
//! node tells an order it may take from one it must refuse, and the answer
//! it gives. The message codec lives here, used by both ends.
//!
//! An operator makes an ed25519 key pair (`wasmrpc keygen`); nodes started
//! with `--accept-deploys FILE` trust the public keys listed there. An order
//! is signed over everything it changes and everything that places it: the
//! fleet (the exchange), a unique order id, the action, the module's name,
//! the SHA-256 of the module and of the manifest, and the time it was issued
//! (Unix milliseconds). So a signature cannot be moved to other bytes,
//! another name or another fleet, and a node can tell a replayed order: it
//! takes, per module name, only orders newer than the last one it took (see
//! `node::deploys`), and none issued more than [`MAX_AGE`] ago or more than
//! [`MAX_SKEW`] ahead of its clock.
//!
//! Nothing here touches the broker connection or the disk.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::amqp::{header_str, header_u64};
use crate::names::ModuleName;
use crate::wire::unix_time;

/// How old an order may be when a node gets it. An order waits for no queue
/// (each node's control queue lives only as long as the node), so this is
/// transit time plus clock difference; it bounds how long a captured order
/// could be replayed to a node that has never taken an order for its module.
pub const MAX_AGE: Duration = Duration::from_secs(300);

/// How far ahead of a node's clock an order may be dated: the clocks of the
/// deployer and the node may differ by this much.
pub const MAX_SKEW: Duration = Duration::from_secs(30);

/// The largest manifest an order may carry: a manifest is a few lines.
pub const MAX_MANIFEST: usize = 64 << 10;

/// Headers of an order on the control exchange (its AMQP `type` is `deploy`
/// or `undeploy`; a deploy's body is the module).
const FORMAT_HEADER: &str = "x-deploy-format";
const EXCHANGE_HEADER: &str = "x-deploy-exchange";
const ORDER_HEADER: &str = "x-deploy-order";
const NAME_HEADER: &str = "x-deploy-name";
const MANIFEST_HEADER: &str = "x-deploy-manifest";
const ISSUED_HEADER: &str = "x-deploy-issued-ms";
const KEY_HEADER: &str = "x-deploy-key";
const SIGNATURE_HEADER: &str = "x-deploy-signature";

/// The order format this version writes and reads: 2 added the exchange and
/// the order id.
const FORMAT: u64 = 2;

/// What an order asks of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// Where an order stands in time among the orders for its module: by issue
/// time, then by id (two orders issued in the same millisecond are put in
/// one order by every node alike).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    /// Unix milliseconds.
    pub issued_ms: u64,
    /// The order's id: 32 hex digits, random.
    pub order: String,
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "order {} issued at {} ms", self.order, self.issued_ms)
    }
}

/// A deploy or undeploy, with what it is signed over.
#[derive(Clone, Debug)]
pub struct Order {
    pub action: Action,
    /// The fleet it is for.
    pub exchange: String,
    pub name: ModuleName,
    /// The module's bytes; empty for an undeploy.
    pub module: Vec<u8>,
    /// The text of `NAME.toml`, if the module has one.
    pub manifest: Option<String>,
    pub stamp: Stamp,
}

impl Order {
    /// A new order, with a fresh id, issued now.
    pub fn new(
        action: Action,
        exchange: &str,
        name: ModuleName,
        module: Vec<u8>,
        manifest: Option<String>,
    ) -> Order {
        Order {
            action,
            exchange: exchange.to_owned(),
            name,
            module,
            manifest,
            stamp: Stamp {
                issued_ms: now_ms(),
                order: uuid::Uuid::new_v4().simple().to_string(),
            },
        }
    }

    /// The version a node serves once it has taken this deploy: the first
    /// 16 hex digits of the module's SHA-256.
    pub fn version(&self) -> String {
        hex::encode(Sha256::digest(&self.module))[..16].to_owned()
    }

    /// The bytes the signature covers. Hashes the module: slow for a large
    /// one.
    fn signed(&self) -> Vec<u8> {
        let manifest = self
            .manifest
            .as_deref()
            .map(|text| hex::encode(Sha256::digest(text)));
        format!(
            "wasmrpc order v{FORMAT}\nexchange {:?}\norder {}\naction {}\nname {}\nmodule {}\nmanifest {}\nissued-ms {}\n",
            self.exchange,
            self.stamp.order,
            self.action.as_str(),
            self.name,
            hex::encode(Sha256::digest(&self.module)),
            manifest.as_deref().unwrap_or("none"),
            self.stamp.issued_ms,
        )
        .into_bytes()
    }

    pub fn sign(&self, key: &SecretKey) -> Signed {
        Signed {
            key: key.0.verifying_key(),
            signature: key.0.sign(&self.signed()),
        }
    }

    /// Whether this order is for `exchange`, and dated within what a node
    /// takes at `now_ms`: cheap checks, before any hashing.
    pub fn check_placed(&self, exchange: &str, now_ms: u64) -> Result<(), Refusal> {
        if self.exchange != exchange {
            return Err(Refusal::OtherFleet(self.exchange.clone()));
        }
        let issued = self.stamp.issued_ms;
        if issued > now_ms.saturating_add(MAX_SKEW.as_millis() as u64) {
            return Err(Refusal::Future(Duration::from_millis(issued - now_ms)));
        }
        if now_ms.saturating_sub(issued) > MAX_AGE.as_millis() as u64 {
            return Err(Refusal::Stale(Duration::from_millis(now_ms - issued)));
        }
        Ok(())
    }

    /// Whether one of `trusted` signed this very order. Hashes the module:
    /// call it off the async workers for a large one.
    pub fn verify(&self, signed: &Signed, trusted: &TrustedKeys) -> Result<(), Refusal> {
        if !trusted.0.contains(&signed.key) {
            return Err(Refusal::UntrustedKey(hex::encode(signed.key.as_bytes())));
        }
        signed
            .key
            .verify(&self.signed(), &signed.signature)
            .map_err(|_| Refusal::BadSignature)
    }

    /// The message that carries this order: its properties (the caller adds
    /// `reply_to` and a correlation id) and body.
    pub fn to_message(&self, signed: &Signed) -> (BasicProperties, &[u8]) {
        let mut headers = FieldTable::default();
        let mut text = |name: &str, value: String| {
            headers.insert(name.into(), AMQPValue::LongString(value.into()));
        };
        text(EXCHANGE_HEADER, self.exchange.clone());
        text(ORDER_HEADER, self.stamp.order.clone());
        text(NAME_HEADER, self.name.to_string());
        text(KEY_HEADER, hex::encode(signed.key.as_bytes()));
        text(SIGNATURE_HEADER, hex::encode(signed.signature.to_bytes()));
        if let Some(manifest) = &self.manifest {
            text(MANIFEST_HEADER, manifest.clone());
        }
        headers.insert(FORMAT_HEADER.into(), AMQPValue::LongLongInt(FORMAT as i64));
        headers.insert(
            ISSUED_HEADER.into(),
            AMQPValue::LongLongInt(self.stamp.issued_ms as i64),
        );
        let properties = BasicProperties::default()
            .with_type(self.action.as_str().into())
            .with_headers(headers);
        (properties, &self.module)
    }

    /// Reads an order from the properties and body of its message, without
    /// hashing anything: [`Order::check_placed`] and [`Order::verify`] come
    /// after. `body` is taken, not copied.
    pub fn from_message(
        action: Action,
        properties: &BasicProperties,
        body: Vec<u8>,
    ) -> Result<(Order, Signed), Refusal> {
        let headers = properties.headers().as_ref();
        let invalid = |why: String| Refusal::Invalid(why);
        let text = |name: &str| {
            header_str(headers, name).ok_or_else(|| invalid(format!("no {name} header")))
        };
        match header_u64(headers, FORMAT_HEADER).ok().flatten() {
            Some(FORMAT) => {}
            None => return Err(Refusal::Outdated),
            Some(other) => {
                return Err(invalid(format!(
                    "an order of format {other}, which this node (format {FORMAT}) cannot read"
                )));
            }
        }
        let exchange = text(EXCHANGE_HEADER)?.to_owned();
        let order = text(ORDER_HEADER)?;
        if order.len() != 32 || !order.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("the order id is not 32 hex digits".into()));
        }
        let name: ModuleName = text(NAME_HEADER)?
            .parse()
            .map_err(|error| invalid(format!("{error}")))?;
        let issued_ms = header_u64(headers, ISSUED_HEADER)
            .map_err(invalid)?
            .ok_or_else(|| invalid(format!("no {ISSUED_HEADER} header")))?;
        let manifest = match headers.and_then(|h| h.inner().get(MANIFEST_HEADER)) {
            None => None,
            Some(AMQPValue::LongString(text)) if text.as_bytes().len() > MAX_MANIFEST => {
                return Err(invalid(format!(
                    "the manifest is over {} KiB",
                    MAX_MANIFEST >> 10
                )));
            }
            Some(AMQPValue::LongString(text)) => Some(
                String::from_utf8(text.as_bytes().to_vec())
                    .map_err(|_| invalid("the manifest is not UTF-8".into()))?,
            ),
            Some(_) => return Err(invalid("the manifest header is not a string".into())),
        };
        if action == Action::Undeploy && (!body.is_empty() || manifest.is_some()) {
            return Err(invalid("an undeploy carries no module nor manifest".into()));
        }
        let signed = header_str(headers, KEY_HEADER)
            .zip(header_str(headers, SIGNATURE_HEADER))
            .and_then(|(key, signature)| Signed::parse(key, signature))
            .ok_or(Refusal::Unsigned)?;
        let order = Order {
            action,
            exchange,
            name,
            module: body,
            manifest,
            stamp: Stamp {
                issued_ms,
                order: order.to_ascii_lowercase(),
            },
        };
        Ok((order, signed))
    }
}

/// The name of the module an order message is about, if it says: for log
/// lines about an order that could not be read.
pub fn named_in(properties: &BasicProperties) -> Option<&str> {
    header_str(properties.headers().as_ref(), NAME_HEADER)
}

/// The id of the order in a message, if it says: for the answer to an order
/// that could not be read.
pub fn order_in(properties: &BasicProperties) -> Option<&str> {
    header_str(properties.headers().as_ref(), ORDER_HEADER)
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

/// Why a node refuses an order; the deployer reads it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the order is not signed, or its signature is malformed")]
    Unsigned,
    #[error(
        "the order comes from an older wasmrpc (no order id, so it could be replayed): deploy \
         with this version"
    )]
    Outdated,
    #[error("signed by key {0}, which this node does not trust")]
    UntrustedKey(String),
    #[error("the signature does not match the order")]
    BadSignature,
    #[error("the order is for the fleet on exchange {0:?}, not this one")]
    OtherFleet(String),
    #[error(
        "the order was issued {:.0} s ago: orders older than {} s are refused (replayed, or the clocks differ)",
        .0.as_secs_f64(),
        MAX_AGE.as_secs()
    )]
    Stale(Duration),
    #[error(
        "the order is dated {:.0} s ahead of this node's clock, more than the {} s allowed: check the clocks",
        .0.as_secs_f64(),
        MAX_SKEW.as_secs()
    )]
    Future(Duration),
    #[error("this node saw {0} already: an order is taken once")]
    Replayed(Stamp),
    #[error("this node took a newer order for the module ({newest}) than this one ({this})")]
    NotNewer { this: Stamp, newest: Stamp },
    #[error("this node has no module {0}")]
    NotHere(ModuleName),
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

    /// Reads a secret key's file. A public key (which has the same form)
    /// is refused: signing with it would make another key, which no node
    /// trusts.
    pub fn read(path: &Path) -> anyhow::Result<SecretKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the key {}", path.display()))?;
        if text.contains(PUBLIC) || path.extension().is_some_and(|ext| ext == "pub") {
            anyhow::bail!(
                "{} is a public key: sign with the secret key, the file of the same name without .pub",
                path.display()
            );
        }
        let lines: Vec<&str> = key_lines(&text).collect();
        let seed: [u8; 32] = match lines[..] {
            [line] => hex::decode(line)
                .ok()
                .and_then(|bytes| bytes.try_into().ok()),
            _ => None,
        }
        .with_context(|| format!("{} is not a key made by `wasmrpc keygen`", path.display()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    /// The text of its file, as `keygen` writes it.
    pub fn file_text(&self) -> String {
        format!(
            "# {SECRET}: sign deploys with it, and keep it to yourself\n{}\n",
            hex::encode(self.0.to_bytes())
        )
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

/// What the first line of each key file `keygen` writes says it is.
const SECRET: &str = "wasmrpc deploy key (secret)";
const PUBLIC: &str = "wasmrpc deploy key (public)";

/// The lines of a key file that hold keys: not blank, not `#` comments.
fn key_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|line| !line.is_empty())
}

/// A verifying key, in hex.
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// The text of its file, as `keygen` writes it.
    pub fn file_text(&self) -> String {
        format!("# {PUBLIC}: list it in the file nodes take with --accept-deploys\n{self}\n")
    }
}

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
        if text.contains(SECRET) {
            anyhow::bail!(
                "{} holds a secret key: give nodes the public key (the file `keygen` wrote with .pub), \
                 and keep the secret one to sign with",
                path.display()
            );
        }
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

/// A node's answer to an order, as JSON. It is not signed: what vouches for
/// it is the broker, which checks the message's `user_id` (see
/// `wasmrpc deploy --node-user`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub node: String,
    pub host: String,
    /// The id of the order answered.
    #[serde(default)]
    pub order: String,
    pub accepted: bool,
    /// Not the answer yet: the node is compiling the module, and answers
    /// again when it is done.
    #[serde(default)]
    pub pending: bool,
    /// The version now served, for a deploy taken.
    pub version: Option<String>,
    /// Why it was refused.
    pub reason: Option<String>,
}

/// Unix milliseconds, as orders are dated.
pub fn now_ms() -> u64 {
    unix_time().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Order {
        Order::new(
            Action::Deploy,
            "fleet",
            "fib".parse().unwrap(),
            b"\0asm".to_vec(),
            Some("[limits]\ntime = 1\n".into()),
        )
    }

    fn trusting(key: &SecretKey) -> TrustedKeys {
        TrustedKeys(vec![key.0.verifying_key()])
    }

    #[test]
    fn a_signature_covers_everything_the_order_changes_and_where_it_stands() {
        let key = SecretKey::generate().unwrap();
        let trusted = trusting(&key);
        let order = order();
        let signed = order.sign(&key);
        assert_eq!(order.verify(&signed, &trusted), Ok(()));

        let changes: [fn(&mut Order); 7] = [
            |order| order.module.push(0),
            |order| order.name = "fob".parse().unwrap(),
            |order| order.manifest = None,
            |order| order.action = Action::Undeploy,
            |order| order.exchange = "other".into(),
            |order| order.stamp.order = "0".repeat(32),
            |order| order.stamp.issued_ms += 1,
        ];
        for change in changes {
            let mut other = order.clone();
            change(&mut other);
            assert_eq!(other.verify(&signed, &trusted), Err(Refusal::BadSignature));
        }
    }

    #[test]
    fn an_order_round_trips_through_its_message() {
        let key = SecretKey::generate().unwrap();
        let order = order();
        let signed = order.sign(&key);
        let (properties, body) = order.to_message(&signed);
        let (read, read_signed) =
            Order::from_message(Action::Deploy, &properties, body.to_vec()).unwrap();
        assert_eq!(read.verify(&read_signed, &trusting(&key)), Ok(()));
        assert_eq!(read.stamp, order.stamp);
        assert_eq!(read.exchange, "fleet");
        assert_eq!(read.manifest, order.manifest);
        // Read as the other action, it is not an undeploy: that carries nothing.
        assert!(matches!(
            Order::from_message(Action::Undeploy, &properties, body.to_vec()),
            Err(Refusal::Invalid(_))
        ));
    }

    #[test]
    fn orders_from_elsewhere_or_out_of_their_time_are_refused_before_hashing() {
        let order = order();
        let now = order.stamp.issued_ms;
        assert_eq!(order.check_placed("fleet", now), Ok(()));
        assert_eq!(
            order.check_placed("other", now),
            Err(Refusal::OtherFleet("fleet".into()))
        );
        let old = now + MAX_AGE.as_millis() as u64 + 1;
        assert!(matches!(
            order.check_placed("fleet", old),
            Err(Refusal::Stale(_))
        ));
        assert_eq!(order.check_placed("fleet", now + 290_000), Ok(()));
        let behind = now - MAX_SKEW.as_millis() as u64 - 1;
        assert!(matches!(
            order.check_placed("fleet", behind),
            Err(Refusal::Future(_))
        ));
        assert_eq!(order.check_placed("fleet", now - 29_000), Ok(()));
    }

    #[test]
    fn an_order_without_an_id_is_an_outdated_one() {
        let mut headers = FieldTable::default();
        headers.insert("x-deploy-name".into(), AMQPValue::LongString("fib".into()));
        headers.insert("x-deploy-issued-at".into(), AMQPValue::LongLongInt(1));
        let properties = BasicProperties::default().with_headers(headers);
        assert_eq!(
            Order::from_message(Action::Deploy, &properties, Vec::new()).unwrap_err(),
            Refusal::Outdated
        );
    }

    #[test]
    fn stamps_order_by_time_then_id() {
        let stamp = |issued_ms, order: &str| Stamp {
            issued_ms,
            order: order.into(),
        };
        assert!(stamp(2, "a") > stamp(1, "b"));
        assert!(stamp(1, "b") > stamp(1, "a"));
    }

    #[test]
    fn keys_round_trip_through_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        std::fs::write(dir.path().join("k"), key.file_text()).unwrap();
        std::fs::write(
            dir.path().join("trusted"),
            format!("# the release key\n{}\n", key.public().file_text()),
        )
        .unwrap();
        let read = SecretKey::read(&dir.path().join("k")).unwrap();
        let trusted = TrustedKeys::read(&dir.path().join("trusted")).unwrap();
        let order = order();
        assert_eq!(order.verify(&order.sign(&read), &trusted), Ok(()));
        std::fs::write(dir.path().join("bad"), "not a key\n").unwrap();
        assert!(TrustedKeys::read(&dir.path().join("bad")).is_err());
        // A key file of wasmrpc before the marks: the hex alone.
        std::fs::write(dir.path().join("old"), hex::encode(key.0.to_bytes())).unwrap();
        assert!(SecretKey::read(&dir.path().join("old")).is_ok());
    }

    #[test]
    fn a_key_given_in_the_other_ones_place_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let (secret, public) = (
            dir.path().join("deploy.key"),
            dir.path().join("deploy.key.pub"),
        );
        std::fs::write(&secret, key.file_text()).unwrap();
        std::fs::write(&public, key.public().file_text()).unwrap();
        let error = SecretKey::read(&public).err().unwrap().to_string();
        assert!(
            error.contains("is a public key: sign with the secret key"),
            "{error}"
        );
        let error = TrustedKeys::read(&secret).unwrap_err().to_string();
        assert!(
            error.contains("holds a secret key: give nodes the public key"),
            "{error}"
        );
        // A public key by its content alone, under another name.
        let renamed = dir.path().join("release");
        std::fs::copy(&public, &renamed).unwrap();
        assert!(SecretKey::read(&renamed).is_err());
    }
}
