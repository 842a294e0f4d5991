//! The RPC client: publishes a request and waits for the reply that carries
//! its correlation id.
//!
//! It uses RabbitMQ's direct reply-to: replies come straight back on the
//! connection with no reply queue to declare, so a call costs one round trip
//! to the broker. Requests are published with publisher confirms: a request
//! the broker did not take is an error, not a timeout. One [`Client`] serves many concurrent calls: a background
//! task routes each reply to the call waiting for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ErrorKind as LapinErrorKind};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;

use crate::amqp::Brokers;
use crate::deploy::{Ack, Order, Signed};
use crate::trace::TraceParent;
use crate::wire::{NodeStatus, Topology, unix_time};

pub use crate::wire::reply::Reply;
use crate::wire::request::{self, Chain, DIRECT_REPLY_TO};

/// An answer from a node on the control exchange, with the broker user that
/// sent it: the broker refuses a message whose `user_id` is not its
/// sender's, so this is what the broker vouches for; `None` if the sender
/// did not say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer<T> {
    pub value: T,
    pub user: Option<String>,
}

/// What the fleet answered a message on the control exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetAnswers<T> {
    pub answers: Vec<Answer<T>>,
    /// Whether the broker refused the message for some node: its control
    /// queue holds less (an order over twice that node's deploy limit).
    pub refused: bool,
}

/// How to make a call, beyond its module, body and timeout.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// The trace the call belongs to: sent as the `traceparent` header.
    pub traceparent: Option<TraceParent>,
    /// For a call a module makes: where it stands in its tree of calls.
    pub chain: Chain,
}

/// Why a call got no reply.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("no reply within {:.1} s", .0.as_secs_f64())]
    Timeout(Duration),
    #[error(
        "exchange {0:?} does not exist on the broker: no wasmrpc node has run there with this exchange"
    )]
    NoExchange(String),
    #[error("the broker refused it: {0}")]
    Refused(String),
    #[error("lost the broker connection: {0}")]
    Broker(String),
    #[error("a module name of {0} bytes cannot be a routing key (255 bytes at most)")]
    NameTooLong(usize),
}

type Pending = Arc<Mutex<PendingCalls>>;

#[derive(Default)]
struct PendingCalls {
    waiting: HashMap<String, Waiter>,
    /// Set once the channel is gone; later calls fail with it at once.
    closed: Option<ClientError>,
}

/// Who waits for replies with a given correlation id.
enum Waiter {
    /// A call: the first reply ends it.
    One(oneshot::Sender<Result<Reply, ClientError>>),
    /// A fleet question: every node answers.
    Many(mpsc::UnboundedSender<Reply>),
}

/// A connection to the broker that can call modules.
pub struct Client {
    _connection: Connection,
    channel: Channel,
    exchange: String,
    pending: Pending,
    router: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects to the first of `brokers` that answers and subscribes to
    /// direct replies.
    pub async fn connect(brokers: &Brokers, exchange: &str) -> anyhow::Result<Client> {
        Client::connect_as(brokers, exchange, "wasmrpc client").await
    }

    /// [`Client::connect`], with the connection named `name` on the broker.
    pub async fn connect_as(
        brokers: &Brokers,
        exchange: &str,
        name: &str,
    ) -> anyhow::Result<Client> {
        let (connection, _) = brokers.connect(0, name).await?;
        let channel = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("failed to enable publisher confirms")?;
        // Direct reply-to requires consuming, without acks, before publishing.
        let options = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let mut replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                options,
                FieldTable::default(),
            )
            .await
            .context("failed to subscribe to direct replies")?;

        let pending = Pending::default();
        let router = tokio::spawn({
            let pending = pending.clone();
            let exchange = exchange.to_owned();
            async move {
                let closed = loop {
                    match replies.next().await {
                        Some(Ok(delivery)) => route(&pending, delivery),
                        Some(Err(error)) => break describe(&error, &exchange),
                        None => {
                            break ClientError::Broker(
                                "the reply subscription was cancelled".into(),
                            );
                        }
                    }
                };
                let mut pending = pending.lock().expect("pending lock");
                for (_, waiter) in pending.waiting.drain() {
                    if let Waiter::One(call) = waiter {
                        let _ = call.send(Err(closed.clone()));
                    }
                }
                pending.closed = Some(closed);
            }
        });
        Ok(Client {
            _connection: connection,
            channel,
            exchange: exchange.to_owned(),
            pending,
            router,
        })
    }

    /// Whether the connection is gone, so that every call fails at once.
    pub fn is_closed(&self) -> bool {
        self.pending.lock().expect("pending lock").closed.is_some()
    }

    /// Calls `module` with `input` and waits up to `timeout` for its reply.
    ///
    /// An error reply from the node is a `Reply` (see [`Reply::error`]); an
    /// `Err` means no reply came. The request carries `timeout` as its AMQP
    /// expiration and as its `x-timeout-ms`, so neither the broker nor a node
    /// spends longer on it than the caller waits.
    pub async fn call(
        &self,
        module: &str,
        input: &[u8],
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        self.call_with(module, input, timeout, &CallOptions::default())
            .await
    }

    /// [`Client::call`], with `options`.
    pub async fn call_with(
        &self,
        module: &str,
        input: &[u8],
        timeout: Duration,
        options: &CallOptions,
    ) -> Result<Reply, ClientError> {
        // A routing key longer than 255 bytes cannot even be encoded (the
        // node answers any other name that is not a module's).
        if module.len() > usize::from(u8::MAX) {
            return Err(ClientError::NameTooLong(module.len()));
        }
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let (sender, receiver) = oneshot::channel();
        self.wait_for(&correlation_id, Waiter::One(sender))?;
        // Whatever ends the call (a reply, an error, or the caller dropping
        // it), nobody waits for this id any more.
        let _forget = Forget {
            client: self,
            correlation_id: &correlation_id,
        };
        // The broker drops the request if no node takes it in time, and a
        // node that takes it stops the module when the caller stops waiting.
        let properties = request::properties(
            &correlation_id,
            timeout,
            options.traceparent.as_ref(),
            options.chain,
            unix_time(),
        );
        let published = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                module.into(),
                BasicPublishOptions::default(),
                input,
                properties,
            )
            .await;
        let confirm = match published {
            Ok(confirm) => confirm,
            Err(error) => return Err(describe(&error, &self.exchange)),
        };
        // The broker confirms the request once it is safely queued; the
        // reply may come before or after.
        let replied = async {
            match confirm.await {
                Ok(confirmation) if confirmation.is_ack() => {}
                Ok(_) => {
                    return Err(ClientError::Broker("the broker refused the request".into()));
                }
                Err(error) => return Err(describe(&error, &self.exchange)),
            }
            receiver.await.unwrap_or_else(|_router_gone| {
                Err(ClientError::Broker("the client stopped".into()))
            })
        };
        tokio::time::timeout(timeout, replied)
            .await
            .unwrap_or(Err(ClientError::Timeout(timeout)))
    }

    /// Asks every node on the exchange who it is and what it serves, and
    /// returns the answers that came within `wait`, in node-id order. A node
    /// that is gone simply does not answer.
    pub async fn fleet(&self, wait: Duration) -> Result<Vec<NodeStatus>, ClientError> {
        Ok(self
            .fleet_vouched(wait)
            .await?
            .into_iter()
            .map(|answer| answer.value)
            .collect())
    }

    /// [`Client::fleet`], each answer with the broker user that sent it.
    pub async fn fleet_vouched(
        &self,
        wait: Duration,
    ) -> Result<Vec<Answer<NodeStatus>>, ClientError> {
        let mut nodes = self
            .ask_fleet(
                BasicProperties::default(),
                b"status",
                wait,
                |_: &[Answer<NodeStatus>]| false,
            )
            .await?
            .answers;
        nodes.sort_by(|a, b| a.value.node.cmp(&b.value.node));
        Ok(nodes)
    }

    /// Sends a signed deploy or undeploy to every node on the exchange and
    /// returns the answers that came within `wait`, in node-id order. Nodes
    /// that take no deploys do not answer; anyone who can publish to the
    /// default exchange and has seen the order may, which is why each
    /// answer comes with the broker user that sent it.
    ///
    /// A node that compiles the module first answers that it does
    /// ([`Ack::pending`]), then again once it is done. The answers are
    /// returned as soon as `done` says they are all there, or after `wait`.
    pub async fn order(
        &self,
        order: &Order,
        signed: &Signed,
        wait: Duration,
        done: impl Fn(&[Answer<Ack>]) -> bool,
    ) -> Result<FleetAnswers<Ack>, ClientError> {
        let (properties, body) = order.to_message(signed);
        let mut acks: FleetAnswers<Ack> = self.ask_fleet(properties, body, wait, done).await?;
        acks.answers.sort_by(|a, b| a.value.node.cmp(&b.value.node));
        Ok(acks)
    }

    /// Publishes `body` to every node's control queue and collects the
    /// answers that parse as `T` within `wait`.
    async fn ask_fleet<T: serde::de::DeserializeOwned>(
        &self,
        properties: BasicProperties,
        body: &[u8],
        wait: Duration,
        done: impl Fn(&[Answer<T>]) -> bool,
    ) -> Result<FleetAnswers<T>, ClientError> {
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let (sender, mut answers) = mpsc::unbounded_channel();
        self.wait_for(&correlation_id, Waiter::Many(sender))?;
        let properties = properties
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(correlation_id.as_str().into())
            .with_expiration(
                wait.as_millis()
                    .clamp(1, u128::from(u32::MAX))
                    .to_string()
                    .as_str()
                    .into(),
            );
        let control = Topology::new(&self.exchange).control_exchange();
        let published = self
            .channel
            .basic_publish(
                control.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await;
        let confirmed = match published {
            Ok(confirm) => confirm.await.map(|confirmation| confirmation.is_ack()),
            Err(error) => Err(error),
        };
        // A nack: some node's control queue refused it (an order larger than
        // that node takes); the others have it and answer.
        let refused = match confirmed {
            Ok(acked) => !acked,
            Err(error) => {
                self.forget(&correlation_id);
                return Err(describe(&error, &control));
            }
        };
        let mut found = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, answers.recv()).await {
            match serde_json::from_slice::<T>(&reply.body) {
                Ok(value) => found.push(Answer {
                    value,
                    user: reply.user_id,
                }),
                Err(error) => tracing::warn!("ignoring an answer that does not parse: {error}"),
            }
            if done(&found) {
                break;
            }
        }
        self.forget(&correlation_id);
        if let Some(closed) = &self.pending.lock().expect("pending lock").closed {
            return Err(closed.clone());
        }
        Ok(FleetAnswers {
            answers: found,
            refused,
        })
    }

    fn wait_for(&self, correlation_id: &str, waiter: Waiter) -> Result<(), ClientError> {
        let mut pending = self.pending.lock().expect("pending lock");
        if let Some(closed) = &pending.closed {
            return Err(closed.clone());
        }
        pending.waiting.insert(correlation_id.to_owned(), waiter);
        Ok(())
    }

    fn forget(&self, correlation_id: &str) {
        self.pending
            .lock()
            .expect("pending lock")
            .waiting
            .remove(correlation_id);
    }
}

/// Forgets a call's correlation id when dropped.
struct Forget<'a> {
    client: &'a Client,
    correlation_id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.client.forget(self.correlation_id);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.router.abort();
    }
}

/// Hands a reply to the call waiting for it; a reply nobody waits for (its
/// call timed out) is dropped.
fn route(pending: &Pending, delivery: lapin::message::Delivery) {
    let Some(reply) = Reply::decode(&delivery.properties, delivery.data) else {
        tracing::debug!("ignoring a reply without correlation id");
        return;
    };
    let correlation_id = reply.correlation_id.clone();
    let mut pending = pending.lock().expect("pending lock");
    match pending.waiting.remove(&correlation_id) {
        Some(Waiter::One(call)) => {
            let _ = call.send(Ok(reply));
        }
        Some(Waiter::Many(answers)) => {
            let _ = answers.send(reply);
            pending
                .waiting
                .insert(correlation_id, Waiter::Many(answers));
        }
        None => tracing::debug!(%correlation_id, "ignoring a reply nobody waits for"),
    }
}

/// Turns a channel failure into what the caller should hear.
fn describe(error: &lapin::Error, exchange: &str) -> ClientError {
    if let LapinErrorKind::ProtocolError(amqp) = error.kind() {
        match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
                if amqp.get_message().as_str().contains("no exchange") =>
            {
                return ClientError::NoExchange(exchange.to_owned());
            }
            // The broker user may not publish there (a module it may not call,
            // say): RabbitMQ says which resource and which user.
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                return ClientError::Refused(amqp.get_message().to_string());
            }
            _ => {}
        }
    }
    ClientError::Broker(error.to_string())
}
