//! What a letter in the dead-letter queue (`EXCHANGE.dead`) is, read from
//! the headers RabbitMQ adds when it dead-letters a message: which module it
//! was for, and why it is there. `wasmrpc dead` shows them.
//!
//! Three kinds land there: calls that expired in a module's queue before any
//! node took them (their caller had given up), poison requests (nodes took
//! them and died each time, until the queue's delivery limit or a node said
//! so), and requests whose reply the broker refused (a malformed
//! `reply_to`). A node sets the last two aside the same way (`basic.reject`),
//! and the broker keeps nothing that tells them apart: the node's log does.

use std::fmt;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::wire::Topology;

/// Why a request was set aside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// It expired in its queue: no node took it before its caller's
    /// `expiration` (the caller had given up).
    Expired,
    /// Poison: nodes took it and died each time, until the queue's delivery
    /// limit.
    Poison,
    /// A node set it aside: poison (it answered so), or a request whose
    /// reply the broker refused (a malformed `reply_to`, say).
    Rejected,
    /// Something else, in RabbitMQ's words.
    Other(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Expired => f.write_str("expired"),
            Reason::Poison => f.write_str("poison"),
            Reason::Rejected => f.write_str("rejected (poison, or its reply refused)"),
            Reason::Other(reason) => write!(f, "{reason}"),
        }
    }
}

/// One letter of the dead-letter queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The module it was for, if it came from a module's queue.
    pub module: Option<String>,
    pub reason: Reason,
    pub correlation_id: Option<String>,
    /// When it was dead-lettered, in Unix seconds, if the broker said.
    pub dead_since: Option<u64>,
    /// Its body's size, in bytes.
    pub size: usize,
}

impl DeadLetter {
    /// Reads a letter from its properties, for the fleet on `topology`.
    pub fn read(properties: &BasicProperties, size: usize, topology: &Topology) -> DeadLetter {
        let headers = properties.headers().as_ref();
        let death = first_death(headers);
        let field = |name: &str| -> Option<String> {
            match death?.inner().get(name)? {
                AMQPValue::LongString(text) => {
                    Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
                _ => None,
            }
        };
        let prefix = format!("{}.module.", topology.exchange());
        let module =
            field("queue").and_then(|queue| queue.strip_prefix(&prefix).map(str::to_owned));
        let reason = match field("reason").as_deref() {
            Some("expired") => Reason::Expired,
            Some("delivery_limit") => Reason::Poison,
            Some("rejected") => Reason::Rejected,
            Some(other) => Reason::Other(other.to_owned()),
            None => Reason::Other("unknown (no x-death header)".to_owned()),
        };
        let dead_since = death.and_then(|death| match death.inner().get("time")? {
            AMQPValue::Timestamp(seconds) => Some(*seconds),
            _ => None,
        });
        DeadLetter {
            module,
            reason,
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|id| id.as_str().to_owned()),
            dead_since,
            size,
        }
    }
}

/// The first (oldest) entry of the `x-death` header: where and why the
/// message was first dead-lettered.
fn first_death(headers: Option<&FieldTable>) -> Option<&FieldTable> {
    match headers?.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().last()? {
            AMQPValue::FieldTable(death) => Some(death),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldArray;

    use super::*;

    fn letter(reason: &str, queue: &str) -> DeadLetter {
        let mut death = FieldTable::default();
        death.insert("reason".into(), AMQPValue::LongString(reason.into()));
        death.insert("queue".into(), AMQPValue::LongString(queue.into()));
        death.insert("time".into(), AMQPValue::Timestamp(1_764_590_000));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_correlation_id("c-1".into());
        DeadLetter::read(&properties, 3, &Topology::new("fleet"))
    }

    #[test]
    fn each_way_into_the_dead_letter_queue_is_told_apart() {
        let expired = letter("expired", "fleet.module.fib");
        assert_eq!(expired.reason, Reason::Expired);
        assert_eq!(expired.module.as_deref(), Some("fib"));
        assert_eq!(expired.dead_since, Some(1_764_590_000));
        assert_eq!(expired.correlation_id.as_deref(), Some("c-1"));

        let limit = letter("delivery_limit", "fleet.module.fib");
        assert_eq!(limit.reason, Reason::Poison);
        let rejected = letter("rejected", "fleet.module.fib");
        assert_eq!(rejected.reason, Reason::Rejected);

        let elsewhere = letter("maxlen", "other.queue");
        assert_eq!(elsewhere.reason, Reason::Other("maxlen".into()));
        assert_eq!(elsewhere.module, None);
    }
}
