//! The node's Prometheus metrics: the families, their labels, and the
//! exposition `/metrics` serves (OpenMetrics text, which Prometheus reads).
//!
//! Labels are bounded by what the node serves: a module label only ever
//! names a module the node loaded, an outcome is `ok` or one of the wire's
//! error kinds. Nothing a caller sends (routing keys of unknown modules,
//! correlation ids) becomes a label: requests for modules no node serves are
//! counted together, by outcome only.
//!
//! Counters and histograms are updated by request tasks as things happen;
//! gauges of state the node keeps anyway (requests running, free slots,
//! modules loaded) are read when scraped, by a collector, so they cost
//! nothing per request and a scrape changes nothing.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::names::ModuleName;
use crate::runtime::CallError;
use crate::wire::ErrorKind;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleLabel {
    module: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    module: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    module: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    module: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type Histograms = Family<ModuleLabel, Histogram, fn() -> Histogram>;

/// Run times: from 100 µs (a small guest) to the longest time limit.
fn run_time_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0,
    ])
}

/// Queue waits come from the AMQP `timestamp`, which has whole seconds: no
/// bucket finer than that would mean anything.
fn queue_wait_histogram() -> Histogram {
    Histogram::new([
        1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    ])
}

/// A limit a request ran into, as the `limit` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The module's time limit.
    Time,
    /// The caller's deadline (`x-timeout-ms`, `x-deadline`).
    Deadline,
    Memory,
    Stack,
    /// The request body was over the module's request limit.
    Request,
    /// The module's output was over its reply limit, or the broker's.
    Reply,
}

impl Limit {
    fn as_str(self) -> &'static str {
        match self {
            Limit::Time => "time",
            Limit::Deadline => "deadline",
            Limit::Memory => "memory",
            Limit::Stack => "stack",
            Limit::Request => "request_size",
            Limit::Reply => "reply_size",
        }
    }

    /// The limit behind a failed call, if a limit stopped it.
    pub fn of(error: &CallError) -> Option<Limit> {
        Some(match error {
            CallError::Timeout { .. } => Limit::Time,
            CallError::Deadline { .. } | CallError::DeadlinePassed { .. } => Limit::Deadline,
            CallError::Memory { .. } => Limit::Memory,
            CallError::StackOverflow { .. } => Limit::Stack,
            CallError::InputTooLarge { .. } => Limit::Request,
            CallError::OutputTooLarge { .. } => Limit::Reply,
            CallError::InvalidInput(_)
            | CallError::Failed(_)
            | CallError::Trap(_)
            | CallError::Instantiate(_) => return None,
        })
    }
}

/// The state a scrape reads rather than the node counting it as it goes.
pub struct Readings {
    pub running: usize,
    pub slots_free: usize,
    /// Each module served, with its version.
    pub modules: Vec<(String, String)>,
    pub connected: bool,
}

/// Where the gauges are read from, once the node has said so.
type ReadingsSource = Arc<OnceLock<Box<dyn Fn() -> Option<Readings> + Send + Sync>>>;

/// The gauges, read from the node at each scrape.
struct Gauges(ReadingsSource);

impl fmt::Debug for Gauges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Gauges")
    }
}

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(now) = self.0.get().and_then(|read| read()) else {
            return Ok(());
        };
        let mut gauge = |name: &str, help: &str, value: i64| -> fmt::Result {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        gauge(
            "requests_running",
            "Requests in progress now",
            now.running as i64,
        )?;
        gauge(
            "slots_free",
            "Instances free for more requests now",
            now.slots_free as i64,
        )?;
        gauge(
            "broker_connected",
            "1 while the node has a session on a broker, 0 while it waits for one",
            i64::from(now.connected),
        )?;
        let mut modules = encoder.encode_descriptor(
            "module",
            "The modules served, with their versions (always 1)",
            None,
            MetricType::Gauge,
        )?;
        for (module, version) in now.modules {
            let labels = VersionLabels { module, version };
            ConstGauge::new(1i64).encode(modules.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Every metric a node exports. One per node, shared by its tasks.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    unrouted: Family<OutcomeLabel, Counter>,
    run_time: Histograms,
    queue_wait: Histograms,
    limits: Family<LimitLabels, Counter>,
    child_calls: Family<RequestLabels, Counter>,
    reconnects: Counter,
    replies_refused: Family<ReasonLabel, Counter>,
    readings: ReadingsSource,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wasmrpc");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests answered, by module and outcome (ok or the error kind of the reply)",
            requests.clone(),
        );
        let unrouted = Family::default();
        registry.register(
            "unrouted_requests",
            "Requests answered for modules no node serves (not_found) or with invalid names (bad_request)",
            unrouted.clone(),
        );
        let run_time = Histograms::new_with_constructor(run_time_histogram);
        registry.register_with_unit(
            "run",
            "Time a request spent in its module, from its turn to run to its output",
            Unit::Seconds,
            run_time.clone(),
        );
        let queue_wait = Histograms::new_with_constructor(queue_wait_histogram);
        registry.register_with_unit(
            "queue_wait",
            "Time from the caller's AMQP timestamp to the node taking the request (requests with a timestamp only; whole seconds)",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let limits = Family::default();
        registry.register(
            "limits_tripped",
            "Requests stopped by a limit, by module and limit",
            limits.clone(),
        );
        let child_calls = Family::default();
        registry.register(
            "child_calls",
            "Calls modules made to other modules (wasmrpc:compute/fleet), by calling module and outcome (ok or the error kind)",
            child_calls.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Sessions opened after a lost one",
            reconnects.clone(),
        );
        let replies_refused = Family::default();
        registry.register(
            "replies_refused",
            "Replies not delivered because of their reply_to, by reason: fleet_queue, not_allowed, malformed (refused before publishing) or broker (the broker refused it)",
            replies_refused.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build", "The wasmrpc version (always 1)", build);
        let readings = ReadingsSource::default();
        registry.register_collector(Box::new(Gauges(readings.clone())));
        Metrics {
            registry,
            requests,
            unrouted,
            run_time,
            queue_wait,
            limits,
            child_calls,
            reconnects,
            replies_refused,
            readings,
        }
    }
}

impl Metrics {
    /// A request for `module` was answered with `error` (`None`: success).
    pub fn answered(&self, module: &ModuleName, error: Option<ErrorKind>) {
        self.requests
            .get_or_create(&RequestLabels {
                module: module.to_string(),
                outcome: error.map_or("ok", ErrorKind::as_str),
            })
            .inc();
    }

    /// A call `module` made to another module ended with `outcome` (`ok`,
    /// or an error kind; one the node does not know counts as `other`).
    pub fn child_call(&self, module: &ModuleName, outcome: &'static str) {
        self.child_calls
            .get_or_create(&RequestLabels {
                module: module.to_string(),
                outcome,
            })
            .inc();
    }

    /// A request no module queue took was answered with `error`.
    pub fn unrouted(&self, error: ErrorKind) {
        self.unrouted
            .get_or_create(&OutcomeLabel {
                outcome: error.as_str(),
            })
            .inc();
    }

    pub fn ran(&self, module: &ModuleName, time: Duration) {
        self.run_time
            .get_or_create(&ModuleLabel {
                module: module.to_string(),
            })
            .observe(time.as_secs_f64());
    }

    pub fn waited(&self, module: &ModuleName, wait: Duration) {
        self.queue_wait
            .get_or_create(&ModuleLabel {
                module: module.to_string(),
            })
            .observe(wait.as_secs_f64());
    }

    pub fn tripped(&self, module: &ModuleName, limit: Limit) {
        self.limits
            .get_or_create(&LimitLabels {
                module: module.to_string(),
                limit: limit.as_str(),
            })
            .inc();
    }

    /// A reply was not delivered because of its `reply_to`, for `reason`.
    pub fn reply_refused(&self, reason: &'static str) {
        self.replies_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A session opened after another was lost.
    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// Has each scrape read the gauges from `read` (`None`: the node is
    /// gone, and they are left out). Once: later calls change nothing.
    pub fn read_gauges_from(&self, read: impl Fn() -> Option<Readings> + Send + Sync + 'static) {
        let _ = self.readings.set(Box::new(read));
    }

    /// The exposition. Reads the gauges; changes nothing.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_follow_prometheus_conventions() {
        let metrics = Metrics::default();
        let fib: ModuleName = "fib".parse().unwrap();
        metrics.answered(&fib, None);
        metrics.answered(&fib, Some(ErrorKind::Timeout));
        metrics.tripped(&fib, Limit::Time);
        metrics.ran(&fib, Duration::from_millis(3));
        metrics.read_gauges_from(|| {
            Some(Readings {
                running: 2,
                slots_free: 6,
                modules: vec![("fib".into(), "0123456789abcdef".into())],
                connected: true,
            })
        });
        let text = metrics.encode();
        assert_eq!(metrics.encode(), text, "a scrape changes nothing");
        for line in [
            r#"wasmrpc_requests_total{module="fib",outcome="ok"} 1"#,
            r#"wasmrpc_requests_total{module="fib",outcome="timeout"} 1"#,
            r#"wasmrpc_limits_tripped_total{module="fib",limit="time"} 1"#,
            r#"wasmrpc_run_seconds_count{module="fib"} 1"#,
            "wasmrpc_requests_running 2",
            "wasmrpc_slots_free 6",
            r#"wasmrpc_module{module="fib",version="0123456789abcdef"} 1"#,
            "wasmrpc_broker_connected 1",
            "wasmrpc_broker_reconnects_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }
}
