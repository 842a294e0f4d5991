//! A client that knows only the RabbitMQ RPC tutorial: an exclusive,
//! server-named callback queue, `reply_to` and `correlation_id`. Written
//! with lapin directly, sharing no code with `wasmrpc::client`, so the tests
//! that use it check the wire contract, not our own client.

use std::time::Duration;

use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio_stream::StreamExt as _;

use super::amqp_url;

pub struct RawClient {
    _connection: Connection,
    pub channel: Channel,
    pub callback_queue: String,
    replies: Consumer,
}

impl RawClient {
    pub async fn connect() -> RawClient {
        Self::connect_to(&amqp_url()).await
    }

    /// A tutorial client of the broker at `url` (as another user, say).
    pub async fn connect_to(url: &str) -> RawClient {
        let connection = Connection::connect(url, Default::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let queue = channel
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .unwrap();
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let replies = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .unwrap();
        RawClient {
            callback_queue: queue.name().as_str().to_owned(),
            _connection: connection,
            channel,
            replies,
        }
    }

    /// Properties of a tutorial request: `reply_to` this client, and the
    /// given correlation id.
    pub fn request(&self, correlation_id: &str) -> BasicProperties {
        BasicProperties::default()
            .with_reply_to(self.callback_queue.as_str().into())
            .with_correlation_id(correlation_id.into())
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap();
    }

    /// Publishes a tutorial request and waits for its reply.
    pub async fn call(&mut self, exchange: &str, module: &str, body: &[u8]) -> Delivery {
        let id = uuid::Uuid::new_v4().to_string();
        self.publish(exchange, module, body, self.request(&id))
            .await;
        loop {
            let reply = self
                .next_reply(Duration::from_secs(30))
                .await
                .expect("no reply");
            if correlation_id(&reply) == Some(id.as_str()) {
                return reply;
            }
        }
    }

    pub async fn next_reply(&mut self, within: Duration) -> Option<Delivery> {
        match tokio::time::timeout(within, self.replies.next()).await {
            Ok(Some(delivery)) => Some(delivery.unwrap()),
            Ok(None) => panic!("the reply subscription ended"),
            Err(_) => None,
        }
    }
}

impl RawClient {
    /// Waits up to `within` for a message in `queue`, and takes it.
    pub async fn next_in(&self, queue: &str, within: Duration) -> BasicGetMessage {
        let take = async {
            loop {
                let options = BasicGetOptions { no_ack: true };
                let got = self.channel.basic_get(queue.into(), options).await.unwrap();
                match got {
                    Some(message) => break message,
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        tokio::time::timeout(within, take)
            .await
            .unwrap_or_else(|_| panic!("nothing reached queue {queue} within {within:?}"))
    }
}

pub fn correlation_id(delivery: &Delivery) -> Option<&str> {
    delivery
        .properties
        .correlation_id()
        .as_ref()
        .map(ShortString::as_str)
}

pub fn error_header(delivery: &Delivery) -> Option<String> {
    header_string(delivery, "x-error")
}

pub fn header_string(delivery: &Delivery, name: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::LongString(value) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        other => panic!("{name} should be a string, got {other:?}"),
    }
}

pub fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.data).into_owned()
}

/// A direct reply-to name as RabbitMQ (3.10 and later) makes them, for a
/// consumer on broker node `node` (`reply@HASH`): well formed, but a broker
/// that has no such node closes the publisher's connection over a reply.
pub fn direct_reply_to_for_node(node: &str) -> String {
    let mut term = vec![131, 88, 118];
    term.extend((node.len() as u16).to_be_bytes());
    term.extend(node.as_bytes());
    term.extend([0, 0, 2, 255, 0, 0, 0, 0, 107, 23, 62, 135]);
    let pid = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, term);
    format!("amq.rabbitmq.reply-to.{pid}.EP1TC5pn3F+neaeXxONm5A==")
}
