//! What every integration test needs: the guests built from source, a real
//! node on the real broker under names no other test uses, and oracles.

pub mod broker;
pub mod compare;
pub mod guests;
pub mod http;
pub mod ledger;
pub mod node;
pub mod oracle;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod stream;

pub use self::node::TestNode;

/// The broker the tests use: `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| wasmrpc::amqp::DEFAULT_URL.to_owned())
}

/// The broker the tests use, parsed.
pub fn brokers() -> wasmrpc::amqp::Brokers {
    amqp_url().parse().expect("AMQP_URL is a broker URL")
}

/// A name no other test (or test run) uses, so tests can share a broker.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("wasmrpc-test-{prefix}-{}", &id[..12])
}
