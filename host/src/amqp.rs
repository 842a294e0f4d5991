//! Broker plumbing shared by the node and the client: broker addresses (one
//! or several, for a cluster), connecting with an error that says where,
//! telling a failure that retrying can fix from one it cannot, and declaring
//! the topology of [`crate::wire`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPUri, SASLMechanism};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::names::ModuleName;
use crate::wire::{Topology, UNROUTED_TTL_MS};

/// The default broker URL: a local RabbitMQ with its default vhost.
pub const DEFAULT_URL: &str = "amqp://127.0.0.1:5672/%2f";

/// The reply code of a channel the broker closed over a request that
/// contradicts what exists (`inequivalent arg`), or a message it refuses.
pub const PRECONDITION_FAILED: u16 = 406;

/// The reply code of a channel the broker closed over a queue or exchange
/// it does not have.
pub const NOT_FOUND: u16 = 404;

/// How long to wait for the broker to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The AMQP heartbeat asked for when a URL does not set one (`?heartbeat=N`).
/// lapin gives up on a connection that has been silent for two intervals and
/// checks every half interval, so a stalled connection is noticed within
/// 2.5 intervals: 12.5 s.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 5;

/// One broker address: an `amqp://` or `amqps://` URL, checked when it is
/// parsed. Displays without its password.
#[derive(Clone, PartialEq, Eq)]
pub struct Broker {
    uri: AMQPUri,
    shown: String,
}

impl Broker {
    /// The connection settings lapin takes.
    fn uri(&self) -> AMQPUri {
        let mut uri = self.uri.clone();
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
        uri
    }

    /// The broker user this URL logs in as, when its login names one (a
    /// password login, not EXTERNAL or ANONYMOUS): the user the broker
    /// checks a message's `user_id` against.
    pub fn user(&self) -> Option<&str> {
        let mechanism = self.uri.query.auth_mechanism.unwrap_or_default();
        matches!(
            mechanism,
            SASLMechanism::Plain | SASLMechanism::AMQPlain | SASLMechanism::RabbitCrDemo
        )
        .then_some(self.uri.authority.userinfo.username.as_str())
    }
}

impl Broker {
    /// The RabbitMQ version this broker announces (`3.10.8`), read from the
    /// `connection.start` it sends before any login, on a TCP connection of
    /// its own closed right after (the broker logs it as closed by the
    /// client). `None` over TLS, where it is not read, or when it cannot be.
    pub async fn version(&self) -> Option<String> {
        use lapin::uri::AMQPScheme;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        if self.uri.scheme != AMQPScheme::AMQP {
            return None;
        }
        let address = (self.uri.authority.host.as_str(), self.uri.authority.port);
        let read = async {
            let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
            stream.write_all(b"AMQP\x00\x00\x09\x01").await.ok()?;
            // A frame: type, channel (2 bytes), size (4 bytes), payload, end.
            let mut frame = vec![0; 7];
            stream.read_exact(&mut frame).await.ok()?;
            let size = u32::from_be_bytes(frame[3..7].try_into().ok()?) as usize;
            if size > MAX_START_FRAME {
                return None;
            }
            frame.resize(7 + size + 1, 0);
            stream.read_exact(&mut frame[7..]).await.ok()?;
            server_version(&frame)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, read)
            .await
            .ok()
            .flatten()
    }
}

/// The most a broker's `connection.start` is read: RabbitMQ's is about 500
/// bytes.
const MAX_START_FRAME: usize = 64 << 10;

/// The `version` a `connection.start` frame's server properties give.
fn server_version(frame: &[u8]) -> Option<String> {
    use amq_protocol::frame::{AMQPFrame, parse_frame};
    use lapin::protocol::{AMQPClass, connection::AMQPMethod};
    let Ok((_, AMQPFrame::Method(0, AMQPClass::Connection(AMQPMethod::Start(start))))) =
        parse_frame(frame)
    else {
        return None;
    };
    match start
        .server_properties
        .inner()
        .get(&ShortString::from("version"))?
    {
        AMQPValue::LongString(version) => Some(String::from_utf8_lossy(version.as_bytes()).into()),
        AMQPValue::ShortString(version) => Some(version.as_str().to_owned()),
        _ => None,
    }
}

impl FromStr for Broker {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let mut url = url::Url::parse(text).map_err(|error| format!("{text:?}: {error}"))?;
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return Err(format!(
                "{text:?}: the scheme must be amqp or amqps, not {:?}",
                url.scheme()
            ));
        }
        let host = match url.host() {
            Some(url::Host::Domain(name)) => name.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(format!("{text:?}: no broker host")),
        };
        let mut uri: AMQPUri = text.parse().map_err(|error| format!("{text:?}: {error}"))?;
        // lapin's parser takes the host from `Url::domain`, which is `None`
        // for an IPv6 address: it would connect to "localhost" instead.
        uri.authority.host = host;
        if url.password().is_some() {
            // Cannot fail: a URL with a password has a host.
            let _ = url.set_password(Some("***"));
        }
        Ok(Broker {
            uri,
            shown: url.to_string(),
        })
    }
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Broker({})", self.shown)
    }
}

/// The brokers a node or client may use: the nodes of one RabbitMQ cluster,
/// tried in turn. Never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Brokers(Vec<Broker>);

impl Brokers {
    /// Parses each URL; `urls` may also hold comma-separated lists.
    pub fn parse<S: AsRef<str>>(urls: &[S]) -> Result<Brokers, String> {
        let brokers = urls
            .iter()
            .flat_map(|urls| urls.as_ref().split(','))
            .filter(|url| !url.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Broker>, _>>()?;
        Brokers::try_from(brokers)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `index`th broker, counting round and round the list.
    pub fn get(&self, index: usize) -> &Broker {
        &self.0[index % self.0.len()]
    }

    /// Connects to the first broker that accepts, trying each once, starting
    /// with the `start`th. Returns the connection and the index of its
    /// broker; the error names every broker tried.
    pub async fn connect(
        &self,
        start: usize,
        connection_name: &str,
    ) -> Result<(Connection, usize), ConnectError> {
        let mut failures = Vec::new();
        for offset in 0..self.len() {
            let index = (start + offset) % self.len();
            match connect(self.get(index), connection_name).await {
                Ok(connection) => return Ok((connection, index)),
                Err(error) if error.is_permanent() => return Err(error),
                Err(error) => failures.push(error),
            }
        }
        let mut last = failures.pop().expect("at least one broker");
        if !failures.is_empty() {
            let earlier: Vec<String> = failures.iter().map(ToString::to_string).collect();
            last.message = format!("{}; {}", earlier.join("; "), last.message);
        }
        Err(last)
    }
}

impl TryFrom<Vec<Broker>> for Brokers {
    type Error = String;

    fn try_from(brokers: Vec<Broker>) -> Result<Self, Self::Error> {
        if brokers.is_empty() {
            return Err("no broker URL given".into());
        }
        Ok(Brokers(brokers))
    }
}

impl FromStr for Brokers {
    type Err = String;

    /// One URL, or several separated by commas.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Brokers::parse(&[text])
    }
}

impl fmt::Display for Brokers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, broker) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{broker}")?;
        }
        Ok(())
    }
}

/// Why a connection could not be made, naming the broker.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    message: String,
    permanent: bool,
}

impl ConnectError {
    /// Whether the broker refused us for good (credentials, vhost): trying
    /// again cannot help.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

/// Connects to one broker; the error names it (without its password).
pub async fn connect(broker: &Broker, connection_name: &str) -> Result<Connection, ConnectError> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    let connect = Connection::connect_uri(broker.uri(), properties);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(connection)) => Ok(connection),
        // The error's own text already includes its source: don't chain it.
        Ok(Err(error)) => Err(ConnectError {
            message: format!("cannot connect to the broker at {broker}: {error}"),
            permanent: is_refusal(&error),
        }),
        Err(_) => Err(ConnectError {
            message: format!(
                "cannot connect to the broker at {broker}: no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            ),
            permanent: false,
        }),
    }
}

/// The broker's reply code, if `error` is the broker closing a channel or
/// the connection.
pub fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Whether the broker refused what we asked for a reason that asking again
/// will not change: access (credentials, permissions, the vhost) or a
/// declaration that contradicts what exists (`inequivalent arg`).
pub fn is_refusal(error: &lapin::Error) -> bool {
    let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
        return false;
    };
    matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED | AMQPSoftError::PRECONDITIONFAILED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
    )
}

/// Whether the broker closed a channel or the connection because of what
/// was sent on it, rather than because it is going away.
pub fn is_broker_objection(error: &lapin::Error) -> bool {
    let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
        return false;
    };
    !matches!(
        amqp.kind(),
        AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)
    )
}

/// Finds the lapin error behind an `anyhow` chain, if there is one.
pub fn lapin_cause(error: &anyhow::Error) -> Option<&lapin::Error> {
    error.chain().find_map(|cause| cause.downcast_ref())
}

/// Declares what every node of a deployment shares: the exchange, its
/// alternate exchange and the `unrouted` queue behind it, the dead-letter
/// exchange and queue, and the control exchange. Every node declares the
/// same, so the first one creates them and the others merely confirm they
/// exist. Declarations run on channels of their own: the broker closes the
/// channel of one it refuses.
pub async fn declare_topology(connection: &Connection, topology: &Topology) -> anyhow::Result<()> {
    let channel = connection
        .create_channel()
        .await
        .context("failed to open a channel")?;
    let unrouted = topology.unrouted_exchange();
    declare_exchange(
        &channel,
        &unrouted,
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await?;
    declare_requests_exchange(connection, topology).await?;
    let dead = topology.dead_exchange();
    declare_exchange(&channel, &dead, ExchangeKind::Fanout, FieldTable::default()).await?;
    let control = topology.control_exchange();
    declare_exchange(
        &channel,
        &control,
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await?;

    let queue = topology.unrouted_queue();
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-ttl".into(), AMQPValue::LongUInt(UNROUTED_TTL_MS));
    declare_replicated_queue(connection, &queue, arguments).await?;
    bind(&channel, &queue, &unrouted, "").await?;
    let queue = topology.dead_queue();
    declare_dead_queue(connection, &queue).await?;
    bind(&channel, &queue, &dead, "").await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// The most the dead-letter queue keeps: past either, its oldest letters
/// go; and no letter stays longer than a week.
pub const DEAD_MAX_LETTERS: u32 = 10_000;
pub const DEAD_MAX_BYTES: u32 = 256 << 20;
pub const DEAD_TTL_MS: u32 = 7 * 24 * 3600 * 1000;

/// Declares the dead-letter queue, bounded by [`DEAD_MAX_LETTERS`],
/// [`DEAD_MAX_BYTES`] and [`DEAD_TTL_MS`]. One declared without them by an
/// earlier wasmrpc is used as it is, with a warning that says how to bound
/// it with a policy (its arguments cannot change).
async fn declare_dead_queue(connection: &Connection, queue: &str) -> anyhow::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), string("quorum"));
    arguments.insert("x-max-length".into(), AMQPValue::LongUInt(DEAD_MAX_LETTERS));
    arguments.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongUInt(DEAD_MAX_BYTES),
    );
    arguments.insert("x-message-ttl".into(), AMQPValue::LongUInt(DEAD_TTL_MS));
    arguments.insert("x-overflow".into(), string("drop-head"));
    let channel = connection
        .create_channel()
        .await
        .context("failed to open a channel")?;
    match declare_queue(&channel, queue, arguments).await {
        Ok(()) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(error) if lapin_cause(&error).and_then(reply_code) == Some(PRECONDITION_FAILED) => {
            let channel = connection
                .create_channel()
                .await
                .context("failed to open a channel")?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await
                .with_context(|| format!("failed to declare queue {queue:?}"))?;
            let _ = channel.close(200, "declared".into()).await;
            let pattern = format!("^{}$", queue.replace('.', "\\."));
            tracing::warn!(
                "queue {queue:?} was declared by an earlier wasmrpc without a bound: it keeps \
                 every dead letter. Bound it with a policy: rabbitmqctl set_policy --apply-to \
                 queues wasmrpc-dead '{pattern}' \
                 '{{\"max-length\":{DEAD_MAX_LETTERS},\"max-length-bytes\":{DEAD_MAX_BYTES},\"message-ttl\":{DEAD_TTL_MS}}}'"
            );
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Declares the exchange callers publish requests to: a topic exchange, so
/// that RabbitMQ's topic permissions can say which modules a user may call
/// (module names hold no `.`, `*` or `#`, so each binds its own name only).
/// An exchange declared as a direct one by wasmrpc before 0.2 is used as it
/// is, with a warning: requests route the same, but per-module permissions
/// do not apply (README, "Security model", says how to migrate).
async fn declare_requests_exchange(
    connection: &Connection,
    topology: &Topology,
) -> anyhow::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "alternate-exchange".into(),
        string(&topology.unrouted_exchange()),
    );
    let exchange = topology.exchange();
    let channel = connection
        .create_channel()
        .await
        .context("failed to open a channel")?;
    let declared =
        declare_exchange(&channel, exchange, ExchangeKind::Topic, arguments.clone()).await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(error) if is_other_type(&error) => {
            // The refusal closed that channel.
            let channel = connection
                .create_channel()
                .await
                .context("failed to open a channel")?;
            declare_exchange(&channel, exchange, ExchangeKind::Direct, arguments).await?;
            let _ = channel.close(200, "declared".into()).await;
            tracing::warn!(
                "exchange {exchange:?} is a direct exchange, declared by an earlier wasmrpc: \
                 requests route as before, but RabbitMQ's topic permissions (which modules a \
                 broker user may call) apply only to a topic exchange; see README.md, \
                 \"Security model\", to migrate"
            );
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Whether the broker refused a declaration because the exchange exists
/// with another type.
fn is_other_type(error: &anyhow::Error) -> bool {
    lapin_cause(error).is_some_and(|error| {
        reply_code(error) == Some(PRECONDITION_FAILED)
            && matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp)
                if amqp.get_message().as_str().contains("'type'"))
    })
}

async fn declare_exchange(
    channel: &Channel,
    exchange: &str,
    kind: ExchangeKind,
    arguments: FieldTable,
) -> anyhow::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(exchange.into(), kind, durable, arguments)
        .await
        .with_context(|| format!("failed to declare exchange {exchange:?}"))
}

/// Declares a durable quorum queue: replicated, it serves on while a
/// minority of a cluster's nodes is down, where a classic queue is gone with
/// its node. A classic queue of that name, as wasmrpc 0.1 declared, is used
/// as it is, with a warning.
async fn declare_replicated_queue(
    connection: &Connection,
    queue: &str,
    arguments: FieldTable,
) -> anyhow::Result<()> {
    let mut quorum = arguments.clone();
    quorum.insert("x-queue-type".into(), string("quorum"));
    let channel = connection
        .create_channel()
        .await
        .context("failed to open a channel")?;
    match declare_queue(&channel, queue, quorum).await {
        Ok(()) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(error) if lapin_cause(&error).and_then(reply_code) == Some(PRECONDITION_FAILED) => {
            let channel = connection
                .create_channel()
                .await
                .context("failed to open a channel")?;
            declare_queue(&channel, queue, arguments).await?;
            let _ = channel.close(200, "declared".into()).await;
            tracing::warn!(
                "queue {queue:?} is a classic queue, declared by an earlier wasmrpc: it is not \
                 replicated, so it stops with its broker node; delete it while no wasmrpc node \
                 runs to have it declared again as a quorum queue"
            );
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// How much a control queue holds for its node, beyond what the node holds
/// unacked: a node that takes deploys holds up to `max_order` bytes of
/// orders waiting, and the broker refuses more (the deployer hears it: its
/// publish is nacked); one that takes none holds 1 MiB of questions, and the
/// broker drops anything larger unread (an order it would ignore anyway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlLimit {
    Orders { max_order: u64 },
    QuestionsOnly,
}

impl ControlLimit {
    /// For a node that takes modules of up to `deploy_limit` bytes: orders
    /// of twice that and 1 MiB, so that one it refuses for its size still
    /// reaches it, and it can say why.
    pub fn for_deploys(deploy_limit: u64) -> ControlLimit {
        ControlLimit::Orders {
            max_order: deploy_limit.saturating_mul(2).saturating_add(1 << 20),
        }
    }

    /// Whether an order whose module is `size` bytes reaches the node.
    pub fn lets_in(self, size: u64) -> bool {
        match self {
            ControlLimit::Orders { max_order } => size <= max_order,
            ControlLimit::QuestionsOnly => false,
        }
    }
}

/// Declares this node's own queue on the control exchange: a server-named
/// queue that dies with the connection, holding at most what `limit` says.
/// Returns its name.
pub async fn declare_control_queue(
    channel: &Channel,
    topology: &Topology,
    limit: ControlLimit,
) -> anyhow::Result<String> {
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let (bytes, overflow) = match limit {
        ControlLimit::Orders { max_order } => (max_order, "reject-publish"),
        ControlLimit::QuestionsOnly => (1 << 20, "drop-head"),
    };
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(bytes).unwrap_or(i64::MAX)),
    );
    arguments.insert("x-overflow".into(), string(overflow));
    let queue = channel
        .queue_declare("".into(), private, arguments)
        .await
        .context("failed to declare the control queue")?;
    let queue = queue.name().as_str().to_owned();
    bind(channel, &queue, &topology.control_exchange(), "").await?;
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

/// What deleting one queue or exchange came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deleted {
    /// A queue deleted, with the messages it held.
    Queue {
        name: String,
        messages: u32,
    },
    Exchange(String),
    /// A queue that was not there.
    Absent(String),
}

/// Deletes everything a fleet on `topology` declared: the queues of
/// `modules` (a queue's name says nothing of which modules had one, so they
/// are named), the unrouted and dead-letter queues and the four exchanges.
/// Each on a channel of its own: the broker closes one that names a queue it
/// does not have.
pub async fn delete_topology(
    connection: &Connection,
    topology: &Topology,
    modules: &[ModuleName],
) -> anyhow::Result<Vec<Deleted>> {
    let queues = modules
        .iter()
        .map(|module| topology.module_queue(module))
        .chain([topology.unrouted_queue(), topology.dead_queue()]);
    let mut deleted = Vec::new();
    for queue in queues {
        let channel = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let found = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await;
        match found {
            Ok(_) => {
                let messages = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .with_context(|| format!("failed to delete queue {queue:?}"))?;
                let _ = channel.close(200, "deleted".into()).await;
                deleted.push(Deleted::Queue {
                    name: queue,
                    messages,
                });
            }
            Err(error) if reply_code(&error) == Some(NOT_FOUND) => {
                deleted.push(Deleted::Absent(queue));
            }
            Err(error) => {
                return Err(error).with_context(|| format!("failed to look for queue {queue:?}"));
            }
        }
    }
    let exchanges = [
        topology.exchange().to_owned(),
        topology.unrouted_exchange(),
        topology.dead_exchange(),
        topology.control_exchange(),
    ];
    for exchange in exchanges {
        let channel = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .with_context(|| format!("failed to delete exchange {exchange:?}"))?;
        let _ = channel.close(200, "deleted".into()).await;
        deleted.push(Deleted::Exchange(exchange));
    }
    Ok(deleted)
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
    number.map(Some).ok_or_else(|| {
        format!(
            "header {name} must be a non-negative integer, got {}",
            shown(value)
        )
    })
}

/// A header's value as its sender wrote it: a string quoted, a number as
/// such, anything else by its AMQP type.
pub fn shown(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(text) => {
            format!("{:?}", String::from_utf8_lossy(text.as_bytes()))
        }
        AMQPValue::ShortString(text) => format!("{:?}", text.as_str()),
        AMQPValue::Boolean(value) => value.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::FieldTable(_) => "a table".to_owned(),
        AMQPValue::FieldArray(_) => "an array".to_owned(),
        AMQPValue::ByteArray(_) => "a byte array".to_owned(),
        AMQPValue::DecimalValue(_) => "a decimal".to_owned(),
        AMQPValue::Void => "nothing (void)".to_owned(),
    }
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
    use super::*;

    #[tokio::test]
    async fn a_broker_says_its_version_before_any_login() {
        let url = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let broker: Broker = url.parse().unwrap();
        let version = broker.version().await.expect("the test broker's version");
        assert!(
            version.split('.').next().unwrap().parse::<u32>().is_ok(),
            "{version}"
        );
        // Nothing answers there: no version, and no wait past the timeout.
        let nobody: Broker = "amqp://127.0.0.1:1".parse().unwrap();
        assert_eq!(nobody.version().await, None);
        let tls: Broker = "amqps://127.0.0.1:5671".parse().unwrap();
        assert_eq!(tls.version().await, None);
    }

    #[test]
    fn a_bad_header_is_shown_as_its_sender_wrote_it() {
        let mut headers = FieldTable::default();
        headers.insert("x-timeout-ms".into(), AMQPValue::LongString("abc".into()));
        headers.insert("x-deadline".into(), AMQPValue::LongLongInt(-5));
        assert_eq!(
            header_u64(Some(&headers), "x-timeout-ms"),
            Err("header x-timeout-ms must be a non-negative integer, got \"abc\"".into())
        );
        assert_eq!(
            header_u64(Some(&headers), "x-deadline"),
            Err("header x-deadline must be a non-negative integer, got -5".into())
        );
    }

    #[test]
    fn a_broker_displays_without_its_password() {
        let shown = |url: &str| url.parse::<Broker>().unwrap().to_string();
        assert_eq!(
            shown("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(
            shown("amqp://guest:secret@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(shown("amqps://bob@rabbit/vh"), "amqps://bob@rabbit/vh");
    }

    #[test]
    fn a_broker_knows_its_user_when_it_logs_in_with_a_password() {
        let user = |url: &str| url.parse::<Broker>().unwrap().user().map(str::to_owned);
        assert_eq!(user("amqp://127.0.0.1/%2f").as_deref(), Some("guest"));
        assert_eq!(user("amqp://n%40de:pw@rabbit/%2f").as_deref(), Some("n@de"));
        assert_eq!(user("amqps://rabbit/%2f?auth_mechanism=external"), None);
    }

    #[test]
    fn a_broker_keeps_an_ip_address_and_asks_for_heartbeats() {
        let broker: Broker = "amqp://u:p@10.1.2.3:5673/vh".parse().unwrap();
        let uri = broker.uri();
        assert_eq!(uri.authority.host, "10.1.2.3");
        assert_eq!(uri.authority.port, 5673);
        assert_eq!(uri.vhost, "vh");
        assert_eq!(uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        let chosen: Broker = "amqp://[::1]:5672/%2f?heartbeat=30".parse().unwrap();
        assert_eq!(chosen.uri().authority.host, "::1");
        assert_eq!(chosen.uri().query.heartbeat, Some(30));
    }

    #[test]
    fn a_malformed_broker_url_is_refused_with_the_reason() {
        for bad in [
            "not a url",
            "http://rabbit:5672/",
            "amqp://rabbit:99999/",
            "amqp://rabbit/?heartbeat=soon",
        ] {
            let error = bad.parse::<Broker>().unwrap_err();
            assert!(error.contains(bad), "{error:?} names {bad:?}");
        }
    }

    #[test]
    fn brokers_come_as_a_list_or_comma_separated() {
        let brokers = Brokers::parse(&["amqp://a:5672,amqp://b:5672", "amqp://c"]).unwrap();
        assert_eq!(brokers.len(), 3);
        assert_eq!(brokers.get(4).to_string(), "amqp://b:5672");
        assert_eq!(brokers.to_string(), "amqp://a:5672,amqp://b:5672,amqp://c");
        assert!(Brokers::parse(&[""]).is_err());
        assert!(Brokers::parse(&["amqp://a,nonsense"]).is_err());
    }
}
