//! wasmrpc: WebAssembly compute modules served over RabbitMQ RPC.
//!
//! A node ([`node`]) consumes requests whose routing key names a module,
//! runs that module in a fresh wasm sandbox ([`runtime`]) and replies to the
//! request's `reply_to` with its `correlation_id`. [`client`] is the calling
//! side; [`wire`] is the contract between the two. See ARCHITECTURE.md.

pub mod amqp;
pub mod bench;
pub mod children;
pub mod cli;
pub mod client;
pub mod dead;
pub mod deploy;
pub mod files;
pub mod http;
pub mod local;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod names;
pub mod node;
pub mod permissions;
pub mod registry;
mod replies;
pub mod reply_to;
mod request;
pub mod runtime;
pub(crate) mod settler;
pub mod shutdown;
pub mod stats;
pub mod trace;
pub mod units;
pub mod watch;
pub mod wire;
