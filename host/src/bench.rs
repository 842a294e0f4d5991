//! A load generator for any module on any exchange: `concurrency` callers,
//! each waiting for its reply before its next call (a closed loop), for a
//! number of calls or a length of time; a latency histogram; and a summary
//! of what came back.
//!
//! Calls go through [`Client`], so requests are published with publisher
//! confirms and replies come by direct reply-to: the same path any caller
//! takes, and the same for a wasmrpc node and a hand-written server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::client::{CallOptions, Client, ClientError};
use crate::trace::TraceParent;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub module: String,
    pub input: Vec<u8>,
    /// How many calls in all; `None` to call until `duration` has passed.
    pub requests: Option<u64>,
    pub duration: Duration,
    /// Calls in flight.
    pub concurrency: u32,
    /// The reply every call should get; others count as wrong.
    pub expect: Option<Vec<u8>>,
    /// How long one call may wait for its reply.
    pub timeout: Duration,
}

/// What a run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub module: String,
    pub concurrency: u32,
    /// Calls made: those answered (right, wrong or with an error reply) and
    /// those that got no reply in time.
    pub calls: u64,
    pub elapsed_s: f64,
    /// Calls answered a second.
    pub calls_per_s: f64,
    pub latency_ms: Latency,
    /// Calls that got no answer or an error reply, by kind: an `x-error`
    /// value, `timeout` or `broker`.
    pub errors: BTreeMap<String, u64>,
    /// Replies that were not the expected body.
    pub wrong: u64,
}

impl Report {
    /// Whether every call got the right answer.
    pub fn clean(&self) -> bool {
        self.errors.is_empty() && self.wrong == 0
    }
}

/// Latencies of the calls that got a reply, from publish to reply, in ms.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// What one caller saw.
struct Tally {
    latencies: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    wrong: u64,
}

/// Runs the load; `progress` hears of every call answered.
pub async fn run(
    client: Arc<Client>,
    config: &BenchConfig,
    progress: impl Fn() + Send + Sync + 'static,
) -> Report {
    let config = Arc::new(config.clone());
    let progress = Arc::new(progress);
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + config.duration;
    let callers: Vec<_> = (0..config.concurrency.max(1))
        .map(|_| {
            let (client, config, issued, progress) = (
                client.clone(),
                config.clone(),
                issued.clone(),
                progress.clone(),
            );
            tokio::spawn(async move {
                let mut tally = Tally {
                    // 1 µs to 1 h, 3 significant digits: cannot fail.
                    latencies: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                        .expect("valid histogram bounds"),
                    errors: BTreeMap::new(),
                    wrong: 0,
                };
                loop {
                    let more = match config.requests {
                        Some(requests) => issued.fetch_add(1, Ordering::Relaxed) < requests,
                        None => Instant::now() < deadline,
                    };
                    if !more {
                        break;
                    }
                    let sent = Instant::now();
                    // A trace per call, as `wasmrpc call` sends: its cost is
                    // part of what is measured.
                    let options = CallOptions {
                        traceparent: Some(TraceParent::new_trace()),
                        ..CallOptions::default()
                    };
                    let reply = client
                        .call_with(&config.module, &config.input, config.timeout, &options)
                        .await;
                    let micros = sent.elapsed().as_micros().max(1) as u64;
                    match reply {
                        Ok(reply) => {
                            tally.latencies.saturating_record(micros);
                            match &reply.error {
                                Some(kind) => *tally.errors.entry(kind.clone()).or_default() += 1,
                                None if config
                                    .expect
                                    .as_ref()
                                    .is_some_and(|expect| *expect != reply.body) =>
                                {
                                    tally.wrong += 1
                                }
                                None => {}
                            }
                        }
                        Err(ClientError::Timeout(_)) => {
                            *tally.errors.entry("timeout".into()).or_default() += 1
                        }
                        // The connection is gone: every later call would fail at once.
                        Err(error) => {
                            *tally.errors.entry("broker".into()).or_default() += 1;
                            tracing::error!("{error}");
                            break;
                        }
                    }
                    progress();
                }
                tally
            })
        })
        .collect();

    let mut latencies =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
    let mut errors = BTreeMap::new();
    let mut wrong = 0;
    for caller in callers {
        let tally = caller.await.expect("a bench caller panicked");
        latencies
            .add(&tally.latencies)
            .expect("histograms of the same bounds add up");
        for (kind, count) in tally.errors {
            *errors.entry(kind).or_default() += count;
        }
        wrong += tally.wrong;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ms = |micros: u64| micros as f64 / 1000.0;
    let calls = latencies.len() + errors.get("timeout").copied().unwrap_or(0);
    Report {
        module: config.module.clone(),
        concurrency: config.concurrency,
        calls,
        elapsed_s: elapsed,
        calls_per_s: latencies.len() as f64 / elapsed,
        latency_ms: Latency {
            p50: ms(latencies.value_at_quantile(0.5)),
            p90: ms(latencies.value_at_quantile(0.9)),
            p99: ms(latencies.value_at_quantile(0.99)),
            max: ms(latencies.max()),
            mean: latencies.mean() / 1000.0,
        },
        errors,
        wrong,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} calls of {} in {:.2} s, {} in flight: {:.0} calls/s",
            self.calls, self.module, self.elapsed_s, self.concurrency, self.calls_per_s
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  mean {:.3}",
            l.p50, l.p90, l.p99, l.max, l.mean
        )?;
        if self.errors.is_empty() {
            writeln!(f, "errors: none")?;
        } else {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|(kind, count)| format!("{kind} {count}"))
                .collect();
            writeln!(f, "errors: {}", errors.join(", "))?;
        }
        write!(f, "wrong replies: {}", self.wrong)
    }
}
