//! W3C Trace Context (`traceparent`), so that a call can be followed from
//! its caller through the node and back in whatever tracing system the
//! caller uses. Only what the node needs: parse and validate a header, make
//! a new trace or a child span, write the header back.
//!
//! <https://www.w3.org/TR/trace-context/#traceparent-header>

use std::fmt;
use std::str::FromStr;

/// A `traceparent` header: version 00, a trace id, the id of the span that
/// sent it, and the trace flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

/// Why a `traceparent` value was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {value:?}: {why}")]
pub struct InvalidTraceParent {
    value: String,
    why: &'static str,
}

impl TraceParent {
    /// The first span of a new trace, sampled.
    pub fn new_trace() -> TraceParent {
        TraceParent {
            trace_id: random_nonzero(),
            span_id: random_nonzero(),
            flags: 0x01,
        }
    }

    /// A span of the same trace whose parent is this one.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            span_id: random_nonzero(),
            ..*self
        }
    }

    pub fn trace_id(&self) -> String {
        hex::encode(self.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex::encode(self.span_id)
    }
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    let mut id = [0u8; N];
    while id.iter().all(|&byte| byte == 0) {
        // Without randomness the ids would collide; no ids is better.
        if getrandom::fill(&mut id).is_err() {
            id[N - 1] = 1;
        }
    }
    id
}

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |why| InvalidTraceParent {
            value: value.chars().take(100).collect(),
            why,
        };
        let mut fields = value.trim().split('-');
        let version = fields.next().unwrap_or_default();
        let trace_id = fields.next().ok_or_else(|| invalid("no trace id"))?;
        let span_id = fields.next().ok_or_else(|| invalid("no parent id"))?;
        let flags = fields.next().ok_or_else(|| invalid("no trace flags"))?;
        let version = lower_hex::<1>(version).ok_or_else(|| invalid("bad version"))?[0];
        if version == 0xff {
            return Err(invalid("version ff is invalid"));
        }
        // Version 00 has exactly four fields; later versions may add more.
        if version == 0 && fields.next().is_some() {
            return Err(invalid("version 00 has four fields"));
        }
        let trace_id = lower_hex::<16>(trace_id).ok_or_else(|| invalid("bad trace id"))?;
        let span_id = lower_hex::<8>(span_id).ok_or_else(|| invalid("bad parent id"))?;
        let flags = lower_hex::<1>(flags).ok_or_else(|| invalid("bad trace flags"))?[0];
        if trace_id.iter().all(|&byte| byte == 0) {
            return Err(invalid("the trace id is all zeros"));
        }
        if span_id.iter().all(|&byte| byte == 0) {
            return Err(invalid("the parent id is all zeros"));
        }
        Ok(TraceParent {
            trace_id,
            span_id,
            // A later version's unknown flags are not passed on.
            flags: flags & 0x01,
        })
    }
}

/// Exactly `N` bytes as `2N` lower-case hex digits, as the spec requires.
fn lower_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut bytes = [0u8; N];
    hex::decode_to_slice(text, &mut bytes).ok()?;
    Some(bytes)
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id(),
            self.span_id(),
            self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_spec_example_round_trips() {
        let parent: TraceParent = EXAMPLE.parse().unwrap();
        assert_eq!(parent.to_string(), EXAMPLE);
        assert_eq!(parent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = parent.child();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.span_id(), parent.span_id());
    }

    #[test]
    fn malformed_values_are_refused() {
        for value in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(value.parse::<TraceParent>().is_err(), "{value:?} was taken");
        }
    }

    #[test]
    fn a_later_version_is_read_as_00() {
        let parent: TraceParent = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-more"
            .parse()
            .unwrap();
        assert_eq!(
            parent.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn new_traces_are_valid_and_distinct() {
        let (a, b) = (TraceParent::new_trace(), TraceParent::new_trace());
        assert_ne!(a.trace_id(), b.trace_id());
        assert_eq!(a.to_string().parse::<TraceParent>().unwrap(), a);
    }
}
