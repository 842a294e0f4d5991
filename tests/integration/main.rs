//! Integration tests: a real node on the real RabbitMQ, running real wasm.
//!
//! Each test starts its own node under its own exchange (see
//! `support::TestNode`), so the tests run in parallel on one broker. The
//! guests are built from `guests/` on first use.

mod support;

mod bench;
mod bundled;
mod cache;
mod calls;
mod cli;
mod cluster;
mod contract;
mod deploy;
mod faults;
mod fib;
mod fuzz;
mod hostile;
mod http;
mod languages;
mod limits;
mod live;
mod loading;
mod local_run;
mod logs;
mod modules;
mod new;
mod operator;
mod poison;
mod process;
mod programs;
mod readme;
mod security;
mod share;
mod soak;
mod tidy;
mod trace;
