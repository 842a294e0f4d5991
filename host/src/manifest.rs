//! A module's optional manifest: `NAME.toml` beside `NAME.wasm`.
//!
//! ```toml
//! # Every key is optional; what is left out takes the node's setting.
//! # The content_type of successful replies [default: application/octet-stream].
//! content_type = "application/json"
//! # The modules it may call through wasmrpc:compute/fleet, or ["*"] for any;
//! # a module that imports fleet loads only if this names some [default: none].
//! calls = ["fib"]
//!
//! [limits]
//! time = "2s"        # ms, s or m; a bare number is seconds
//! memory = "64MiB"   # B, KiB, MiB or GiB; a bare number is bytes
//! stack = "1MiB"
//! request = "64KiB"
//! reply = "1MiB"
//! ```
//!
//! Unknown keys are errors, so a misspelt limit is never silently ignored.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Deserializer};

use crate::names::ModuleName;
use crate::runtime::{Callees, Limits};
use crate::units::{Bytes, parse_duration};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The `content_type` of the module's successful replies.
    #[serde(default, deserialize_with = "content_type")]
    pub content_type: Option<String>,
    /// The modules it may call (`wasmrpc:compute/fleet`): names, or `*`.
    #[serde(default, deserialize_with = "callees")]
    pub calls: Callees,
    #[serde(default)]
    pub limits: LimitOverrides,
}

/// Limits to change, each optional. Used for manifests and for the node's
/// own flags alike.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    #[serde(default, deserialize_with = "duration")]
    pub time: Option<Duration>,
    #[serde(default, deserialize_with = "size")]
    pub memory: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    pub stack: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    pub request: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    pub reply: Option<u64>,
}

impl LimitOverrides {
    /// `base` with these overrides applied, checked against [`Limits::MAX`].
    pub fn apply_to(&self, base: &Limits) -> Result<Limits, String> {
        let fit = |value: u64, name: &str| {
            usize::try_from(value).map_err(|_| format!("the {name} limit is too large"))
        };
        let limits = Limits {
            time: self.time.unwrap_or(base.time),
            memory: self.memory.unwrap_or(base.memory),
            stack: self
                .stack
                .map(|n| fit(n, "stack"))
                .transpose()?
                .unwrap_or(base.stack),
            request: self
                .request
                .map(|n| fit(n, "request"))
                .transpose()?
                .unwrap_or(base.request),
            reply: self
                .reply
                .map(|n| fit(n, "reply"))
                .transpose()?
                .unwrap_or(base.reply),
        };
        limits.validate()?;
        Ok(limits)
    }
}

impl Manifest {
    /// Reads the manifest beside `wasm`, if there is one.
    pub fn beside(wasm: &Path) -> anyhow::Result<Option<Manifest>> {
        let path = wasm.with_extension("toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(error).with_context(|| format!("failed to read {}", path.display()));
            }
        };
        let manifest = toml::from_str(&text)
            .with_context(|| format!("invalid manifest {}", path.display()))?;
        Ok(Some(manifest))
    }
}

/// Module names (each one a module could have), or `"*"` alone.
fn callees<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Callees, D::Error> {
    let names = Vec::<String>::deserialize(deserializer)?;
    for name in names.iter().filter(|name| *name != "*") {
        name.parse::<ModuleName>()
            .map_err(|error| serde::de::Error::custom(format!("calls: {name:?}: {error}")))?;
    }
    Callees::from_list(&names).map_err(serde::de::Error::custom)
}

/// A number, or a string with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum Value {
    Number(u64),
    Text(String),
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let parsed = match Value::deserialize(deserializer)? {
        Value::Number(seconds) => parse_duration(&seconds.to_string()),
        Value::Text(text) => parse_duration(&text),
    };
    parsed.map(Some).map_err(serde::de::Error::custom)
}

/// A MIME type as AMQP carries it: a short string (at most 255 bytes) of
/// printable ASCII, `type/subtype` with optional parameters.
fn content_type<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(deserializer)?;
    let (essence, _parameters) = text.split_once(';').unwrap_or((&text, ""));
    let valid = text.len() <= 255
        && text.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && essence
            .trim()
            .split_once('/')
            .is_some_and(|(kind, sub)| !kind.is_empty() && !sub.is_empty() && !sub.contains('/'));
    if valid {
        Ok(Some(text))
    } else {
        Err(serde::de::Error::custom(format!(
            "content_type {text:?} is not a MIME type such as \"application/json\""
        )))
    }
}

fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Number(bytes) => Ok(Some(bytes)),
        Value::Text(text) => Bytes::parse(&text)
            .map(|Bytes(n)| Some(n))
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn every_limit_can_be_set_with_units_or_plain_numbers() {
        let manifest = parse(
            r#"
            [limits]
            time = "250ms"
            memory = "64MiB"
            stack = 1048576
            request = "1KiB"
            reply = "2MiB"
            "#,
        )
        .unwrap();
        let limits = manifest.limits.apply_to(&Limits::DEFAULT).unwrap();
        assert_eq!(
            limits,
            Limits {
                time: Duration::from_millis(250),
                memory: 64 << 20,
                stack: 1 << 20,
                request: 1 << 10,
                reply: 2 << 20,
            }
        );
    }

    #[test]
    fn what_is_left_out_keeps_the_base_value() {
        let manifest = parse("[limits]\ntime = 3\n").unwrap();
        let limits = manifest.limits.apply_to(&Limits::DEFAULT).unwrap();
        assert_eq!(limits.time, Duration::from_secs(3));
        assert_eq!(
            Limits {
                time: Limits::DEFAULT.time,
                ..limits
            },
            Limits::DEFAULT
        );
        assert_eq!(parse("").unwrap().limits, LimitOverrides::default());
    }

    #[test]
    fn a_content_type_is_a_mime_type() {
        let manifest = parse("content_type = \"application/json; charset=utf-8\"\n").unwrap();
        assert_eq!(
            manifest.content_type.as_deref(),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(parse("").unwrap().content_type, None);
        for bad in ["json", "", "a/b/c", "text/plain\u{7}", "/json"] {
            let text = format!("content_type = {bad:?}\n");
            assert!(parse(&text).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn mistakes_are_errors() {
        assert!(parse("[limits]\ntiem = \"2s\"\n").is_err(), "unknown key");
        assert!(parse("[limit]\ntime = \"2s\"\n").is_err(), "unknown table");
        assert!(parse("[limits]\nmemory = \"lots\"\n").is_err(), "bad size");
        assert!(parse("[limits]\ntime = \"0s\"\n").is_err(), "zero time");
        let huge = parse("[limits]\nmemory = \"8GiB\"\n").unwrap();
        assert!(
            huge.limits
                .apply_to(&Limits::DEFAULT)
                .unwrap_err()
                .contains("at most 4 GiB")
        );
    }
}
