//! A reply on the wire, both ways: what a node sends ([`Response`], encoded
//! by [`Response::properties`]) and what a caller reads ([`Reply::decode`]).
//! A `Response` is the node's side of a reply, a `Reply` the caller's.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::amqp::{header_str, header_u64};
use crate::wire::request::Trace;
use crate::wire::{
    APP_ID, CALLS_HEADER, DEFAULT_CONTENT_TYPE, ERROR_CONTENT_TYPE, ERROR_HEADER, ErrorKind,
    TRACEPARENT_HEADER, TRACESTATE_HEADER, VERSION_HEADER, unix_time,
};

/// What a node sends back to a caller.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Response {
    pub body: Vec<u8>,
    pub error: Option<ErrorKind>,
    /// The version of the module that produced it, if one did.
    pub version: Option<String>,
    pub content_type: Option<String>,
    /// The node's span of the caller's trace, and the caller's `tracestate`.
    pub trace: Option<Trace>,
    /// How many calls the request caused in all, for a caller that gave it
    /// a budget ([`CALLS_HEADER`]).
    pub calls: Option<u64>,
}

impl Response {
    pub(crate) fn ok(body: Vec<u8>) -> Self {
        Response {
            body,
            error: None,
            version: None,
            content_type: None,
            trace: None,
            calls: None,
        }
    }

    pub(crate) fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response {
            body: message.into().into_bytes(),
            error: Some(kind),
            version: None,
            content_type: Some(ERROR_CONTENT_TYPE.to_owned()),
            trace: None,
            calls: None,
        }
    }

    pub(crate) fn json(body: Vec<u8>) -> Self {
        Response {
            content_type: Some("application/json".to_owned()),
            ..Response::ok(body)
        }
    }

    /// The reply's properties, answering `correlation_id`.
    pub(crate) fn properties(&self, correlation_id: Option<&ShortString>) -> BasicProperties {
        let mut properties = BasicProperties::default()
            .with_app_id(APP_ID.into())
            .with_timestamp(unix_time().as_secs())
            .with_content_type(
                self.content_type
                    .as_deref()
                    .unwrap_or(DEFAULT_CONTENT_TYPE)
                    .into(),
            );
        if let Some(correlation_id) = correlation_id {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        let mut headers = FieldTable::default();
        let mut header = |name: &str, value: LongString| {
            headers.insert(name.into(), AMQPValue::LongString(value));
        };
        if let Some(kind) = self.error {
            header(ERROR_HEADER, kind.as_str().into());
        }
        if let Some(version) = &self.version {
            header(VERSION_HEADER, version.as_str().into());
        }
        if let Some(trace) = &self.trace {
            header(TRACEPARENT_HEADER, trace.parent.to_string().into());
            if let Some(state) = &trace.state {
                header(TRACESTATE_HEADER, state.clone());
            }
        }
        if let Some(calls) = self.calls {
            let calls = i64::try_from(calls).unwrap_or(i64::MAX);
            headers.insert(CALLS_HEADER.into(), AMQPValue::LongLongInt(calls));
        }
        if !headers.inner().is_empty() {
            properties = properties.with_headers(headers);
        }
        properties
    }
}

/// A reply from a node, success or error, as its caller reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub correlation_id: String,
    /// The module's output, or for an error reply a message for humans.
    pub body: Vec<u8>,
    /// The value of the `x-error` header: absent on success.
    pub error: Option<String>,
    /// The version of the module that produced the reply (`x-module-version`).
    pub version: Option<String>,
    /// The reply's `content_type`.
    pub content_type: Option<String>,
    /// The node's span of the call's trace (`traceparent`), if the call
    /// carried one.
    pub traceparent: Option<String>,
    /// The broker user that sent the reply, as the broker checked it (the
    /// message's `user_id`), if the sender set it.
    pub user_id: Option<String>,
    /// How many calls the request caused in all (`x-wasmrpc-calls`), on
    /// the reply to a call that carried a budget.
    pub calls: Option<u64>,
}

impl Reply {
    /// Reads a reply; `None` without a correlation id (nobody to give it to).
    pub fn decode(properties: &BasicProperties, body: Vec<u8>) -> Option<Reply> {
        let correlation_id = properties.correlation_id().as_ref()?.to_string();
        let headers = properties.headers().as_ref();
        Some(Reply {
            error: header_str(headers, ERROR_HEADER).map(str::to_owned),
            version: header_str(headers, VERSION_HEADER).map(str::to_owned),
            content_type: properties
                .content_type()
                .as_ref()
                .map(|value| value.to_string()),
            traceparent: header_str(headers, TRACEPARENT_HEADER).map(str::to_owned),
            user_id: properties.user_id().as_ref().map(|user| user.to_string()),
            calls: header_u64(headers, CALLS_HEADER).ok().flatten(),
            correlation_id,
            body,
        })
    }

    /// The error kind, if this is an error reply of a kind this client knows.
    pub fn error_kind(&self) -> Option<ErrorKind> {
        self.error.as_deref().and_then(ErrorKind::parse)
    }
}

#[cfg(test)]
mod tests {
    use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame};

    use super::*;
    use crate::trace::TraceParent;
    use crate::wire::request::MAX_TRACESTATE;

    fn parent() -> TraceParent {
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap()
    }

    #[test]
    fn what_a_node_sends_is_what_a_caller_reads() {
        let response = Response {
            version: Some("45c0e103cb52b096".into()),
            trace: Some(Trace {
                parent: parent(),
                state: Some("rojo=1".into()),
            }),
            ..Response::error(ErrorKind::Timeout, "fib: too slow")
        };
        let properties = response.properties(Some(&"c-7".into()));
        let reply = Reply::decode(&properties, response.body.clone()).unwrap();
        assert_eq!(reply.correlation_id, "c-7");
        assert_eq!(reply.body, b"fib: too slow");
        assert_eq!(reply.error_kind(), Some(ErrorKind::Timeout));
        assert_eq!(reply.version.as_deref(), Some("45c0e103cb52b096"));
        assert_eq!(reply.content_type.as_deref(), Some(ERROR_CONTENT_TYPE));
        assert_eq!(reply.traceparent, Some(parent().to_string()));

        let ok = Response::ok(b"55".to_vec());
        let reply = Reply::decode(&ok.properties(Some(&"c-8".into())), ok.body).unwrap();
        assert_eq!((reply.error, reply.version), (None, None));
        assert_eq!(reply.content_type.as_deref(), Some(DEFAULT_CONTENT_TYPE));
        // Nobody to give a reply without a correlation id to.
        assert_eq!(
            Reply::decode(&Response::ok(vec![]).properties(None), vec![]),
            None
        );
    }

    #[test]
    fn the_largest_reply_properties_fit_the_smallest_frame() {
        // Every field a reply can carry, each at the most it can be: a
        // correlation id is a short string (255 bytes), a content type is
        // checked to 255, a tracestate kept to 512.
        let response = Response {
            body: Vec::new(),
            error: Some(ErrorKind::StackOverflow),
            version: Some("45c0e103cb52b096".into()),
            content_type: Some("a".repeat(255)),
            trace: Some(Trace {
                parent: parent(),
                state: Some(LongString::from("s".repeat(MAX_TRACESTATE))),
            }),
            calls: Some(u64::MAX),
        };
        let correlation_id = ShortString::from("c".repeat(255));
        let properties = response
            .properties(Some(&correlation_id))
            .with_user_id("u".repeat(255).as_str().into());
        let frame = AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: 0,
                properties,
            },
        );
        let mut buffer = vec![0u8; 1 << 16];
        let written = gen_frame(&frame)(WriteContext::from(buffer.as_mut_slice()))
            .unwrap()
            .position;
        // AMQP's smallest frame_max: what any broker may negotiate.
        assert!(written < 4096, "{written} bytes");
    }
}
