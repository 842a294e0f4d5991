//! Broker plumbing shared by the node and the client: connecting with an
//! error that says where, and declaring the topology of [`crate::wire`].

use std::time::Duration;

use anyhow::Context as _;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::names::ModuleName;
use crate::wire::{Topology, UNROUTED_TTL_MS};

/// The default broker URL: a local RabbitMQ with its default vhost.
pub const DEFAULT_URL: &str = "amqp://127.0.0.1:5672/%2f";

/// How long to wait for the broker to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the broker; the error names the URL (without its password).
pub async fn connect(url: &str, connection_name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    let connect = Connection::connect(url, properties);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        // The error's own text already includes its source: don't chain it.
        Ok(connection) => connection.map_err(|error| {
            anyhow::anyhow!("cannot connect to the broker at {}: {error}", redact(url))
        }),
        Err(_) => anyhow::bail!(
            "cannot connect to the broker at {}: no answer within {} s",
            redact(url),
            CONNECT_TIMEOUT.as_secs()
        ),
    }
}

/// The URL with any password replaced, fit for logs and error messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// Declares the exchange, its alternate exchange and the queue behind it.
/// Every node declares the same, so the first one creates them and the others
/// merely confirm they exist.
pub async fn declare_exchanges(channel: &Channel, topology: &Topology) -> anyhow::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let unrouted = topology.unrouted_exchange();
    channel
        .exchange_declare(
            unrouted.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to declare exchange {unrouted:?}"))?;
    let mut arguments = FieldTable::default();
    arguments.insert("alternate-exchange".into(), string(&unrouted));
    channel
        .exchange_declare(
            topology.exchange().into(),
            ExchangeKind::Direct,
            durable,
            arguments,
        )
        .await
        .with_context(|| format!("failed to declare exchange {:?}", topology.exchange()))?;

    let queue = topology.unrouted_queue();
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-ttl".into(), AMQPValue::LongUInt(UNROUTED_TTL_MS));
    declare_queue(channel, &queue, arguments).await?;
    bind(channel, &queue, &unrouted, "").await?;

    let dead = topology.dead_exchange();
    channel
        .exchange_declare(
            dead.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to declare exchange {dead:?}"))?;
    let queue = topology.dead_queue();
    declare_queue(channel, &queue, FieldTable::default()).await?;
    bind(channel, &queue, &dead, "").await
}

/// Declares the control exchange and this node's own queue on it: a
/// server-named queue that dies with the connection. Returns its name.
pub async fn declare_control_queue(
    channel: &Channel,
    topology: &Topology,
) -> anyhow::Result<String> {
    let exchange = topology.control_exchange();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to declare exchange {exchange:?}"))?;
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), private, FieldTable::default())
        .await
        .context("failed to declare the control queue")?;
    let queue = queue.name().as_str().to_owned();
    bind(channel, &queue, &exchange, "").await?;
    Ok(queue)
}

/// Declares a module's queue and binds it by the module's name. Returns the
/// queue's name.
///
/// A quorum queue: it survives a broker restart and, replicated, the loss of
/// a broker node. The broker counts deliveries; past `delivery_limit` returns
/// without an ack, it dead-letters the request (at least once) to the dead
/// exchange. The arguments are fixed when the queue is first declared: every
/// node must use the same `delivery_limit`.
pub async fn declare_module_queue(
    channel: &Channel,
    topology: &Topology,
    module: &ModuleName,
    delivery_limit: u32,
) -> anyhow::Result<String> {
    let queue = topology.module_queue(module);
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), string("quorum"));
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongUInt(delivery_limit),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        string(&topology.dead_exchange()),
    );
    arguments.insert("x-dead-letter-strategy".into(), string("at-least-once"));
    // At-least-once dead-lettering requires it; with no length limit set it
    // never refuses a publish.
    arguments.insert("x-overflow".into(), string("reject-publish"));
    declare_queue(channel, &queue, arguments).await.with_context(|| {
        format!(
            "queue {queue:?} exists with other arguments: every node on exchange {:?} must use the same \
             --delivery-limit (or delete the queue once it is empty)",
            topology.exchange()
        )
    })?;
    bind(channel, &queue, topology.exchange(), module.as_str()).await?;
    Ok(queue)
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
) -> anyhow::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to bind queue {queue:?} to exchange {exchange:?}"))
}

async fn declare_queue(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
) -> anyhow::Result<()> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), options, arguments)
        .await
        .with_context(|| format!("failed to declare queue {queue:?}"))?;
    Ok(())
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// The value of an integer header, whichever AMQP integer type carries it
/// (or a string of digits, as some clients can only send strings). `Err`
/// names the header and says what it should be.
pub fn header_u64(headers: Option<&FieldTable>, name: &str) -> Result<Option<u64>, String> {
    let Some(value) = headers.and_then(|headers| headers.inner().get(&ShortString::from(name)))
    else {
        return Ok(None);
    };
    let number = match value {
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes())
            .ok()
            .and_then(|t| t.parse().ok()),
        AMQPValue::ShortString(text) => text.as_str().parse().ok(),
        _ => None,
    };
    number
        .map(Some)
        .ok_or_else(|| format!("header {name} must be a non-negative integer, got {value:?}"))
}

/// The value of a string header, whichever AMQP string type carries it.
pub fn header_str<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    let key = ShortString::from(name);
    match headers?.inner().get(&key)? {
        AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
        AMQPValue::ShortString(value) => Some(value.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact("amqp://guest:secret@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(redact("amqps://bob@rabbit/vh"), "amqps://bob:***@rabbit/vh");
        assert_eq!(redact("not a url"), "not a url");
    }
}
