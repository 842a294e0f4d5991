//! A request on the wire, both ways: what a caller puts in a request's
//! properties ([`properties`], which `wasmrpc call` and the client send) and
//! what a node reads from a delivery ([`Request::decode`]: once, on arrival,
//! into a plain value; the rest of the node never reads a raw header).
//!
//! Decoding is pure: the clock is a parameter, and it cannot fail as a
//! whole. A header a caller got wrong is either refused where it matters
//! (a deadline that is not a number makes the request `bad_request`) or
//! ignored with the reason (a trace context that does not parse).

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::amqp::header_u64;
use crate::trace::TraceParent;
use crate::wire::{
    ACQUIRED_COUNT_HEADER, BUDGET_HEADER, DEADLINE_HEADER, DELIVERY_COUNT_HEADER, DEPTH_HEADER,
    FORWARDS_HEADER, REPLY_LIMIT_HEADER, TIMEOUT_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER,
    UNROUTED_HEADER,
};

/// The pseudo-queue RabbitMQ routes direct replies through.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Where a call a module makes stands in its tree of calls (all zero and
/// `None` for an outside caller's call).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// How deep in the chain of calls it is (0: none).
    pub depth: u32,
    /// How many calls it may still cause in all ([`BUDGET_HEADER`]).
    pub budget: Option<u64>,
    /// The largest reply its caller can take ([`REPLY_LIMIT_HEADER`]).
    pub reply_limit: Option<u64>,
}

/// The properties of a call: replies by direct reply-to, `timeout` as both
/// the broker's expiration (nobody waits for it after) and the node's
/// deadline, the trace it belongs to, and `now` (Unix time) as its
/// timestamp, from which nodes measure how long it waited in its queue;
/// for a call a module makes, where it stands in its `chain` of calls.
pub fn properties(
    correlation_id: &str,
    timeout: Duration,
    traceparent: Option<&TraceParent>,
    chain: Chain,
    now: Duration,
) -> BasicProperties {
    let millis = timeout.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
    let mut headers = FieldTable::default();
    headers.insert(TIMEOUT_HEADER.into(), AMQPValue::LongUInt(millis));
    if chain.depth > 0 {
        headers.insert(DEPTH_HEADER.into(), AMQPValue::LongUInt(chain.depth));
    }
    let long = |value: u64| AMQPValue::LongLongInt(i64::try_from(value).unwrap_or(i64::MAX));
    if let Some(budget) = chain.budget {
        headers.insert(BUDGET_HEADER.into(), long(budget));
    }
    if let Some(limit) = chain.reply_limit {
        headers.insert(REPLY_LIMIT_HEADER.into(), long(limit));
    }
    if let Some(traceparent) = traceparent {
        headers.insert(
            TRACEPARENT_HEADER.into(),
            AMQPValue::LongString(traceparent.to_string().into()),
        );
    }
    BasicProperties::default()
        .with_reply_to(DIRECT_REPLY_TO.into())
        .with_correlation_id(correlation_id.into())
        .with_expiration(millis.to_string().as_str().into())
        .with_timestamp(now.as_secs())
        .with_headers(headers)
}

/// What the broker stamps on a request it delivers again, by its version:
/// a header of those names it does not stamp may be the caller's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stamps {
    /// RabbitMQ 3.x, or a broker whose version is unknown: only
    /// [`DELIVERY_COUNT_HEADER`], on quorum queues.
    #[default]
    DeliveryCount,
    /// RabbitMQ 4.0 and later: [`ACQUIRED_COUNT_HEADER`] as well.
    AcquiredCount,
}

impl Stamps {
    /// What a broker announcing `version` (`3.10.8`, `4.1.0`) stamps.
    pub fn of_version(version: Option<&str>) -> Stamps {
        let major = version
            .and_then(|version| version.split('.').next())
            .and_then(|major| major.parse::<u32>().ok());
        match major {
            Some(major) if major >= 4 => Stamps::AcquiredCount,
            _ => Stamps::DeliveryCount,
        }
    }
}

/// What a node needs to know of a delivery, read from it once on arrival.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Request {
    /// The module it names (not checked: a caller may send anything).
    pub routing_key: ShortString,
    /// Where to answer; `None`: nobody to answer.
    pub reply_to: Option<ShortString>,
    pub correlation_id: Option<ShortString>,
    /// When the caller stops waiting (the earliest of its timeout and
    /// deadline headers), or why those headers cannot be read.
    pub deadline: Result<Option<Instant>, String>,
    /// The node's span of the caller's trace, with the caller's
    /// `tracestate` to echo, if it sent a valid trace context.
    pub trace: Option<Trace>,
    /// Why the caller's trace context (or its `tracestate`) was ignored.
    pub trace_ignored: Option<String>,
    /// How many times the broker delivered it before (see [`delivery_count`]).
    pub delivery_count: u64,
    /// How long it waited since its caller stamped it.
    pub queued: Option<Duration>,
    /// How many times nodes forwarded it to its module's queue.
    pub forwards: u64,
    /// How many times a node that knew nothing of its module published it
    /// again ([`UNROUTED_HEADER`]).
    pub unrouted: u64,
    /// How deep in a chain of calls between modules it is (0: an outside
    /// caller's; one that cannot be read counts as the deepest).
    pub depth: u32,
    /// How many calls it may still cause, if its caller said (one that
    /// cannot be read counts as none).
    pub budget: Option<u64>,
    /// The largest reply its caller can take, if it said (one that cannot
    /// be read counts as the smallest).
    pub reply_limit: Option<u64>,
}

impl Request {
    /// Its correlation id, empty if it has none.
    pub(crate) fn correlation_id_str(&self) -> &str {
        self.correlation_id.as_ref().map_or("", ShortString::as_str)
    }
}

/// The trace context a reply carries.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Trace {
    pub parent: TraceParent,
    pub state: Option<LongString>,
}

impl Request {
    /// Reads a delivery's properties, as it arrived at `received`, which was
    /// `now` in Unix time, from a broker that stamps what `stamps` says.
    pub(crate) fn decode(
        routing_key: &ShortString,
        properties: &BasicProperties,
        (redelivered, stamps): (bool, Stamps),
        received: Instant,
        now: Duration,
    ) -> Request {
        let headers = properties.headers().as_ref();
        let (trace, trace_ignored) = match trace(headers) {
            Ok(trace) => (trace, None),
            Err(why) => (None, Some(why)),
        };
        let (trace, trace_ignored) = match trace {
            Some((parent, Err(why))) => (
                Some(Trace {
                    parent,
                    state: None,
                }),
                Some(why),
            ),
            Some((parent, Ok(state))) => (Some(Trace { parent, state }), trace_ignored),
            None => (None, trace_ignored),
        };
        Request {
            routing_key: routing_key.clone(),
            reply_to: properties.reply_to().clone(),
            correlation_id: properties.correlation_id().clone(),
            deadline: deadline(headers, received, now),
            trace,
            trace_ignored,
            delivery_count: delivery_count(redelivered, stamps, headers),
            queued: properties
                .timestamp()
                .and_then(|stamp| queued(stamp, expiration(properties), now)),
            forwards: header_u64(headers, FORWARDS_HEADER)
                .ok()
                .flatten()
                .unwrap_or(0),
            // One that cannot be read counts as published again already.
            unrouted: header_u64(headers, UNROUTED_HEADER).map_or(1, |hops| hops.unwrap_or(0)),
            depth: match header_u64(headers, DEPTH_HEADER) {
                Ok(depth) => depth.map_or(0, |depth| u32::try_from(depth).unwrap_or(u32::MAX)),
                Err(_) => u32::MAX,
            },
            budget: header_u64(headers, BUDGET_HEADER).unwrap_or(Some(0)),
            reply_limit: header_u64(headers, REPLY_LIMIT_HEADER).unwrap_or(Some(0)),
        }
    }
}

/// The caller's trace context continued by a span of the node's own, and
/// its `tracestate` (or why it was dropped). `Ok(None)`: none sent.
#[allow(clippy::type_complexity)]
fn trace(
    headers: Option<&FieldTable>,
) -> Result<Option<(TraceParent, Result<Option<LongString>, String>)>, String> {
    let Some(headers) = headers else {
        return Ok(None);
    };
    let Some(value) = headers.inner().get(TRACEPARENT_HEADER) else {
        return Ok(None);
    };
    let parsed = match value {
        AMQPValue::LongString(text) => String::from_utf8_lossy(text.as_bytes()).parse(),
        AMQPValue::ShortString(text) => text.as_str().parse(),
        _ => return Err("a traceparent header that is not a string".to_owned()),
    };
    let parent = parsed.map_err(|error: crate::trace::InvalidTraceParent| error.to_string())?;
    let ours = TraceParent::child(&parent);
    let state = match headers.inner().get(TRACESTATE_HEADER) {
        None => Ok(None),
        Some(AMQPValue::LongString(state)) => trace_state(state.as_bytes()).map(Some),
        Some(AMQPValue::ShortString(state)) => trace_state(state.as_str().as_bytes()).map(Some),
        Some(_) => Err("a tracestate header that is not a string".to_owned()),
    };
    Ok(Some((ours, state)))
}

/// The most a `tracestate` may hold to be passed on: W3C Trace Context's
/// limits (32 list members; 512 bytes, beyond which vendors may drop it).
/// The reply echoes it, so it must stay small whatever the caller sends.
pub(crate) const MAX_TRACESTATE: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The caller's `tracestate`, to echo in the reply, if it is within W3C's
/// limits and printable; otherwise why it is dropped.
fn trace_state(state: &[u8]) -> Result<LongString, String> {
    let why = if state.len() > MAX_TRACESTATE {
        "longer than 512 bytes"
    } else if !state.iter().all(|&b| (0x20..0x7f).contains(&b)) {
        "not printable ASCII"
    } else if state.split(|&b| b == b',').count() > MAX_TRACESTATE_MEMBERS {
        "more than 32 members"
    } else {
        return Ok(LongString::from(state.to_vec()));
    };
    Err(format!("a tracestate {why}"))
}

/// The oldest a request without an expiration of its own is believed to be
/// by its stamp: an older stamp is a wrong clock or a caller's lie, and
/// would swamp the queue-wait histogram.
pub(crate) const MAX_QUEUED: Duration = Duration::from_secs(24 * 3600);

/// How long a request waited since its caller stamped it (the AMQP
/// `timestamp`, in seconds; a value too large for seconds is read as
/// milliseconds, as some clients send). `None` for a stamp the request
/// cannot have: from the future (clocks differ), or older than it could be,
/// which is its `expiration` (the broker drops it then) or [`MAX_QUEUED`].
fn queued(stamp: u64, expiration: Option<Duration>, now: Duration) -> Option<Duration> {
    // Seconds since 1970 stay below 10^11 until the year 5138.
    let stamp = if stamp >= 100_000_000_000 {
        Duration::from_millis(stamp)
    } else {
        Duration::from_secs(stamp)
    };
    let waited = now.checked_sub(stamp)?;
    // A stamp in whole seconds makes a request look up to a second older.
    let oldest = expiration.map_or(MAX_QUEUED, |expiration| {
        (expiration + Duration::from_secs(1)).min(MAX_QUEUED)
    });
    (waited <= oldest).then_some(waited)
}

/// A message's `expiration` (milliseconds, as text), if it has one.
fn expiration(properties: &BasicProperties) -> Option<Duration> {
    let text = properties.expiration().as_ref()?;
    text.as_str().parse().ok().map(Duration::from_millis)
}

/// How many times the broker delivered this request before, by what the
/// broker vouches for: a first delivery (not `redelivered`) counts 0
/// whatever headers its caller sent; a redelivery counts the most of what
/// the quorum queue stamps on it (at least 1): RabbitMQ 3.x sets
/// [`DELIVERY_COUNT_HEADER`] (every return, a dead consumer's included);
/// 4.x sets [`ACQUIRED_COUNT_HEADER`] (every hand-out) as well, and from 4.3
/// its delivery count grows only on failures a consumer reports, not when
/// its connection dies. The broker's values replace the caller's headers of
/// those names, so taking the most can only count more, never less; but a
/// header the broker does not stamp (`x-acquired-count` on 3.x) is the
/// caller's, and is not read.
fn delivery_count(redelivered: bool, stamps: Stamps, headers: Option<&FieldTable>) -> u64 {
    if !redelivered {
        return 0;
    }
    let stamped: &[&str] = match stamps {
        Stamps::DeliveryCount => &[DELIVERY_COUNT_HEADER],
        Stamps::AcquiredCount => &[DELIVERY_COUNT_HEADER, ACQUIRED_COUNT_HEADER],
    };
    stamped
        .iter()
        .filter_map(|name| header_u64(headers, name).ok().flatten())
        .max()
        .unwrap_or(1)
        .max(1)
}

/// The earliest of the deadlines the caller set with [`TIMEOUT_HEADER`]
/// (counted from `received`) and [`DEADLINE_HEADER`] (Unix milliseconds).
fn deadline(
    headers: Option<&FieldTable>,
    received: Instant,
    now: Duration,
) -> Result<Option<Instant>, String> {
    let timeout = match header_u64(headers, TIMEOUT_HEADER)? {
        Some(0) => return Err(format!("header {TIMEOUT_HEADER} must be at least 1")),
        Some(ms) => received.checked_add(Duration::from_millis(ms)),
        None => None,
    };
    let deadline = header_u64(headers, DEADLINE_HEADER)?.map(|unix_ms| {
        let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        if unix_ms >= now_ms {
            received
                .checked_add(Duration::from_millis(unix_ms - now_ms))
                .unwrap_or(received + Duration::from_secs(365 * 24 * 3600))
        } else {
            // Already past: any instant before `received` will do, as near as
            // the clock allows to the real one so the error says how late.
            received
                .checked_sub(Duration::from_millis(now_ms - unix_ms))
                .unwrap_or(received)
        }
    });
    Ok(match (timeout, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::unix_time;

    const V3: Stamps = Stamps::DeliveryCount;
    const V4: Stamps = Stamps::AcquiredCount;
    /// A first delivery, from a 3.x broker.
    const FIRST: (bool, Stamps) = (false, V3);

    fn headers(values: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (name, value) in values {
            table.insert((*name).into(), value.clone());
        }
        table
    }

    #[test]
    fn a_call_decodes_as_it_was_sent() {
        let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        let now = unix_time();
        let chain = Chain {
            depth: 3,
            budget: Some(17),
            reply_limit: Some(1 << 20),
        };
        let sent = properties(
            "c-1",
            Duration::from_millis(1500),
            Some(&parent),
            chain,
            now,
        );
        let received = Instant::now();
        let request = Request::decode(
            &"fib".into(),
            &sent,
            (false, Stamps::DeliveryCount),
            received,
            // Within its expiration: an older request cannot have a wait.
            now + Duration::from_secs(1),
        );
        assert_eq!(request.reply_to.as_ref().unwrap().as_str(), DIRECT_REPLY_TO);
        assert_eq!(request.correlation_id.as_ref().unwrap().as_str(), "c-1");
        assert_eq!(
            request.deadline,
            Ok(Some(received + Duration::from_millis(1500)))
        );
        let trace = request.trace.unwrap();
        assert_eq!(trace.parent.trace_id(), parent.trace_id());
        assert_ne!(trace.parent.span_id(), parent.span_id());
        assert_eq!(request.trace_ignored, None);
        assert_eq!(request.delivery_count, 0);
        assert!(request.queued.unwrap() >= Duration::from_secs(1));
        assert_eq!(request.forwards, 0);
        assert_eq!(request.depth, 3);
        assert_eq!(request.budget, Some(17));
        assert_eq!(request.reply_limit, Some(1 << 20));
    }

    #[test]
    fn the_tutorial_request_decodes_with_nothing_but_reply_to() {
        let tutorial = BasicProperties::default()
            .with_reply_to("amq.gen-abc".into())
            .with_correlation_id("1".into());
        let request = Request::decode(&"fib".into(), &tutorial, FIRST, Instant::now(), unix_time());
        assert_eq!(request.deadline, Ok(None));
        assert_eq!((request.trace, request.trace_ignored), (None, None));
        assert_eq!((request.queued, request.forwards), (None, 0));
    }

    #[test]
    fn a_bad_trace_context_is_ignored_with_its_reason() {
        let bad = BasicProperties::default().with_headers(headers(&[(
            TRACEPARENT_HEADER,
            AMQPValue::LongString("00-zz".into()),
        )]));
        let request = Request::decode(&"fib".into(), &bad, FIRST, Instant::now(), unix_time());
        assert_eq!(request.trace, None);
        assert!(request.trace_ignored.is_some());
        // A good parent with a bad state keeps the parent.
        let long_state = BasicProperties::default().with_headers(headers(&[
            (
                TRACEPARENT_HEADER,
                AMQPValue::LongString(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                ),
            ),
            (
                TRACESTATE_HEADER,
                AMQPValue::LongString("a".repeat(130_850).into()),
            ),
        ]));
        let request = Request::decode(
            &"fib".into(),
            &long_state,
            FIRST,
            Instant::now(),
            unix_time(),
        );
        assert_eq!(request.trace.unwrap().state, None);
        assert_eq!(
            request.trace_ignored.as_deref(),
            Some("a tracestate longer than 512 bytes")
        );
    }

    #[test]
    fn any_headers_decode_without_a_panic() {
        // Every header the node reads, with values of every AMQP type, at
        // their extremes: decoding never panics, and refuses a deadline
        // only when a deadline header is there.
        let values = |rng: &mut fastrand::Rng| -> AMQPValue {
            match rng.u8(0..14) {
                0 => AMQPValue::Boolean(rng.bool()),
                1 => AMQPValue::ShortShortInt(rng.i8(..)),
                2 => AMQPValue::ShortUInt(rng.u16(..)),
                3 => AMQPValue::LongInt(rng.i32(..)),
                4 => AMQPValue::LongUInt(rng.u32(..)),
                5 => AMQPValue::LongLongInt(*rng.choice(&[i64::MIN, -1, 0, 1, i64::MAX]).unwrap()),
                6 => AMQPValue::Timestamp(*rng.choice(&[0, 1, u64::MAX]).unwrap()),
                7 => AMQPValue::Double(f64::NAN),
                8 => AMQPValue::LongString(
                    (0..rng.usize(0..700))
                        .map(|_| rng.u8(..))
                        .collect::<Vec<_>>()
                        .into(),
                ),
                9 => AMQPValue::ShortString(
                    (0..rng.usize(0..60))
                        .map(|_| rng.alphanumeric())
                        .collect::<String>()
                        .into(),
                ),
                10 => AMQPValue::LongString(u64::MAX.to_string().into()),
                11 => AMQPValue::FieldArray(Default::default()),
                12 => AMQPValue::Void,
                _ => AMQPValue::LongString(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                ),
            }
        };
        let names = [
            TIMEOUT_HEADER,
            DEADLINE_HEADER,
            TRACEPARENT_HEADER,
            TRACESTATE_HEADER,
            DELIVERY_COUNT_HEADER,
            ACQUIRED_COUNT_HEADER,
            FORWARDS_HEADER,
            "x-other",
        ];
        let mut rng = fastrand::Rng::with_seed(16);
        for _ in 0..20_000 {
            let mut table = FieldTable::default();
            for name in names {
                if rng.bool() {
                    table.insert(name.into(), values(&mut rng));
                }
            }
            let has_deadline = table.inner().contains_key(TIMEOUT_HEADER)
                || table.inner().contains_key(DEADLINE_HEADER);
            let mut properties = BasicProperties::default().with_headers(table);
            if rng.bool() {
                properties = properties.with_timestamp(*rng.choice(&[0, 1, u64::MAX]).unwrap());
            }
            let now = *rng
                .choice(&[Duration::ZERO, unix_time(), Duration::MAX])
                .unwrap();
            let request = Request::decode(
                &"fib".into(),
                &properties,
                (
                    rng.bool(),
                    *rng.choice(&[Stamps::DeliveryCount, Stamps::AcquiredCount])
                        .unwrap(),
                ),
                Instant::now(),
                now,
            );
            assert!(has_deadline || request.deadline == Ok(None));
            if let Some(trace) = &request.trace {
                assert!(
                    trace
                        .state
                        .as_ref()
                        .is_none_or(|s| s.as_bytes().len() <= MAX_TRACESTATE)
                );
            }
        }
    }

    #[test]
    fn a_first_delivery_counts_nothing_the_caller_says() {
        let forged = headers(&[
            ("x-delivery-count", AMQPValue::LongLongInt(99)),
            ("x-acquired-count", AMQPValue::LongLongInt(99)),
        ]);
        for stamps in [V3, V4] {
            assert_eq!(delivery_count(false, stamps, Some(&forged)), 0);
            assert_eq!(delivery_count(false, stamps, None), 0);
        }
    }

    #[test]
    fn a_redelivery_counts_what_rabbitmq_3_stamps() {
        // 3.x: x-delivery-count on every redelivery, as a long.
        let stamped = headers(&[("x-delivery-count", AMQPValue::LongLongInt(3))]);
        assert_eq!(delivery_count(true, V3, Some(&stamped)), 3);
        // A classic queue stamps nothing: a redelivery counts one.
        assert_eq!(delivery_count(true, V3, None), 1);
        assert_eq!(delivery_count(true, V3, Some(&headers(&[]))), 1);
    }

    #[test]
    fn a_redelivery_counts_every_hand_out_on_rabbitmq_4() {
        // 4.3: a node that died (OOM-killed, say) left the delivery count
        // where it was; the acquired count saw every hand-out.
        let after_deaths = headers(&[
            ("x-acquired-count", AMQPValue::LongLongInt(5)),
            ("x-delivery-count", AMQPValue::LongLongInt(0)),
        ]);
        assert_eq!(delivery_count(true, V4, Some(&after_deaths)), 5);
        let only_acquired = headers(&[("x-acquired-count", AMQPValue::LongLongInt(2))]);
        assert_eq!(delivery_count(true, V4, Some(&only_acquired)), 2);
        // Failures reported with basic.reject count in both.
        let rejected = headers(&[
            ("x-acquired-count", AMQPValue::LongLongInt(4)),
            ("x-delivery-count", AMQPValue::LongLongInt(4)),
        ]);
        assert_eq!(delivery_count(true, V4, Some(&rejected)), 4);
    }

    #[test]
    fn a_caller_cannot_lower_the_count_the_broker_stamps() {
        // On 3.x a caller's x-acquired-count survives; it cannot hide the
        // broker's x-delivery-count.
        let lowered = headers(&[
            ("x-acquired-count", AMQPValue::LongLongInt(0)),
            ("x-delivery-count", AMQPValue::LongLongInt(4)),
        ]);
        for stamps in [V3, V4] {
            assert_eq!(delivery_count(true, stamps, Some(&lowered)), 4);
        }
        let garbage = headers(&[("x-acquired-count", AMQPValue::LongString("many".into()))]);
        assert_eq!(delivery_count(true, V4, Some(&garbage)), 1);
    }

    #[test]
    fn a_header_rabbitmq_3_does_not_stamp_is_the_callers_and_not_read() {
        // On 3.x an x-acquired-count can only be the caller's.
        let forged = headers(&[("x-acquired-count", AMQPValue::LongLongInt(99))]);
        assert_eq!(delivery_count(true, V3, Some(&forged)), 1);
        assert_eq!(delivery_count(true, V4, Some(&forged)), 99);
        let both = headers(&[
            ("x-acquired-count", AMQPValue::LongLongInt(99)),
            ("x-delivery-count", AMQPValue::LongLongInt(2)),
        ]);
        assert_eq!(delivery_count(true, V3, Some(&both)), 2);
    }

    #[test]
    fn the_broker_version_says_what_it_stamps() {
        assert_eq!(Stamps::of_version(Some("3.10.8")), V3);
        assert_eq!(Stamps::of_version(Some("3.13.7")), V3);
        assert_eq!(Stamps::of_version(Some("4.0.0")), V4);
        assert_eq!(Stamps::of_version(Some("4.3.1-beta.2")), V4);
        // Unknown: believe only what every version stamps.
        assert_eq!(Stamps::of_version(None), V3);
        assert_eq!(Stamps::of_version(Some("garbage")), V3);
    }

    #[test]
    fn a_stamp_the_request_cannot_have_gives_no_queue_wait() {
        let now = Duration::from_secs(1_800_000_000);
        let second = Duration::from_secs(1);
        // 1970: older than any request can be.
        assert_eq!(queued(0, None, now), None);
        assert_eq!(queued(1, Some(second * 30), now), None);
        // The future (clocks differ).
        assert_eq!(queued(now.as_secs() + 5, None, now), None);
        // Within its expiration (and the second a stamp rounds off).
        let stamp = now.as_secs() - 20;
        assert_eq!(queued(stamp, Some(second * 30), now), Some(second * 20));
        assert_eq!(queued(stamp, Some(second * 10), now), None);
        assert_eq!(queued(stamp, None, now), Some(second * 20));
        // In milliseconds, as some clients send.
        let millis = now.as_millis() as u64 - 1500;
        assert_eq!(queued(millis, None, now), Some(Duration::from_millis(1500)));
        let day = MAX_QUEUED.as_secs();
        assert_eq!(queued(now.as_secs() - day - 1, None, now), None);
    }

    #[test]
    fn a_tracestate_within_w3c_limits_is_kept_and_others_dropped() {
        let keep = |state: &str| trace_state(state.as_bytes()).is_ok();
        assert!(keep("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        assert!(keep(&"a".repeat(512)));
        assert!(!keep(&"a".repeat(513)));
        assert!(!keep(&"a".repeat(130_850)));
        assert!(keep(&vec!["k=v"; 32].join(",")));
        assert!(!keep(&vec!["k=v"; 33].join(",")));
        assert!(!keep("rojo=1\nERROR forged"));
    }

    #[test]
    fn deadlines_come_from_either_header_and_the_earliest_wins() {
        let received = Instant::now();
        let now = unix_time();
        assert_eq!(deadline(None, received, now), Ok(None));
        let timeout = headers(&[(TIMEOUT_HEADER, AMQPValue::LongUInt(500))]);
        assert_eq!(
            deadline(Some(&timeout), received, now),
            Ok(Some(received + Duration::from_millis(500)))
        );
        let far = now.as_millis() as u64 + 60_000;
        let both = headers(&[
            (TIMEOUT_HEADER, AMQPValue::LongString("200".into())),
            (DEADLINE_HEADER, AMQPValue::LongLongInt(far as i64)),
        ]);
        assert_eq!(
            deadline(Some(&both), received, now),
            Ok(Some(received + Duration::from_millis(200)))
        );
        let zero = headers(&[(TIMEOUT_HEADER, AMQPValue::LongUInt(0))]);
        assert!(deadline(Some(&zero), received, now).is_err());
        let words = headers(&[(TIMEOUT_HEADER, AMQPValue::LongString("soon".into()))]);
        assert!(deadline(Some(&words), received, now).is_err());
    }
}
