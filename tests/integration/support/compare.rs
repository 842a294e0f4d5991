//! A wasmrpc node against a native peer (`host/examples/native_peer.rs`) in
//! one run against one broker, the table `scripts/bench` prints: calls/s and
//! latency at 1 to 256 calls in flight, a CPU-bound guest against the same
//! code native, CPU per call, a fresh sandbox's cost in-process, memory, and
//! how a burst is shared between a fast node and a slow one. Ratios are
//! against the peer measured in the same run: these machines are noisy.
//!
//! Every call is made with `wasmrpc bench --expect`, so every reply is
//! checked; the suite runs the quick mode and asserts just that.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wasmrpc::bench::Report;
use wasmrpc::runtime::{Limits, Module, Runtime, RuntimeConfig, Wasm};

use super::node::Cleanup;
use super::process::Spawn;
use super::{amqp_url, guests, unique};

/// How long and how much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How long each calls/s point runs.
    pub duration: Duration,
    /// Calls for the CPU-per-call figure.
    pub cpu_calls: u64,
    /// Calls per round of the in-process sandbox figure.
    pub sandbox_calls: usize,
    /// Modules for the memory-with-many-modules figure.
    pub modules: usize,
    /// Calls in the burst shared by a fast node and a slow one.
    pub burst: u64,
    /// Fan-out jobs (16 parts each) per measurement, and each part's ms.
    pub fan_out_jobs: u32,
    pub part_ms: u32,
    /// Calls for the cost of a call made by a module.
    pub child_calls: u32,
}

impl Settings {
    /// Seconds, not minutes: proves the bench works end to end.
    pub const QUICK: Settings = Settings {
        duration: Duration::from_millis(300),
        cpu_calls: 300,
        sandbox_calls: 50,
        modules: 10,
        burst: 40,
        fan_out_jobs: 1,
        part_ms: 20,
        child_calls: 20,
    };
}

/// One line of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub what: String,
    pub node: f64,
    /// The native peer's figure, where there is one to compare with.
    pub native: Option<f64>,
    /// What the node's figure (or its ratio to the native one) should be.
    pub target: Option<Target>,
}

#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// The ratio node / native at least this.
    RatioAtLeast(f64),
    /// The ratio node / native at most this.
    RatioAtMost(f64),
    /// The node's figure at most this.
    AtMost(f64),
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        self.native.map(|native| self.node / native)
    }

    /// Whether the row meets its target, if it has one.
    pub fn met(&self) -> Option<bool> {
        Some(match self.target? {
            Target::RatioAtLeast(least) => self.ratio()? >= least,
            Target::RatioAtMost(most) => self.ratio()? <= most,
            Target::AtMost(most) => self.node <= most,
        })
    }
}

/// What a run measured: the table, and every bench report behind it.
pub struct Comparison {
    pub rows: Vec<Row>,
    pub reports: Vec<Report>,
}

impl Comparison {
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<52} {:>10} {:>10} {:>7}  target\n",
            "", "node", "native", "ratio"
        );
        for row in &self.rows {
            let native = row.native.map_or(String::new(), |n| format!("{n:.1}"));
            let ratio = row.ratio().map_or(String::new(), |r| format!("{r:.2}x"));
            let target = match row.target {
                None => String::new(),
                Some(Target::RatioAtLeast(r)) => format!(">= {r}x"),
                Some(Target::RatioAtMost(r)) => format!("<= {r}x"),
                Some(Target::AtMost(n)) => format!("<= {n}"),
            };
            let mark = match row.met() {
                Some(true) => "  met",
                Some(false) => "  missed",
                None => "",
            };
            let _ = writeln!(
                out,
                "{:<52} {:>10.1} {:>10} {:>7}  {target}{mark}",
                row.what, row.node, native, ratio
            );
        }
        out
    }
}

/// Runs the whole comparison against the broker at `AMQP_URL`.
pub async fn run(settings: Settings) -> Comparison {
    let mut rows = Vec::new();
    let mut reports = Vec::new();
    let node_exchange = unique("bench-node");
    let peer_exchange = unique("bench-peer");
    let _cleanup = (
        Cleanup::new(&node_exchange, &["fib", "fibrec"]),
        Cleanup::new(&peer_exchange, &["fib", "fibrec"]),
    );
    let node = measured(Spawn::new(&node_exchange, &["fib", "fibrec"]))
        .start()
        .await;
    let idle_rss = node.rss();
    let prefetch = wasmrpc::node::default_prefetch(wasmrpc::node::default_concurrency());
    let peer = NativePeer::start(&peer_exchange, prefetch).await;

    // Calls/s and latency, node and peer in turn at each level.
    for concurrency in [1, 4, 16, 64, 256] {
        let on_node = bench(
            &node_exchange,
            "fib",
            "10",
            "55",
            concurrency,
            settings.duration,
        );
        let on_peer = bench(
            &peer_exchange,
            "fib",
            "10",
            "55",
            concurrency,
            settings.duration,
        );
        let target = (concurrency == 64).then_some(Target::RatioAtLeast(0.9));
        rows.push(Row {
            what: format!("calls/s, {concurrency} in flight, fib(10)"),
            node: on_node.calls_per_s,
            native: Some(on_peer.calls_per_s),
            target,
        });
        if concurrency == 1 {
            rows.push(Row {
                what: "p50 latency ms, 1 in flight, fib(10)".into(),
                node: on_node.latency_ms.p50,
                native: Some(on_peer.latency_ms.p50),
                target: Some(Target::RatioAtMost(1.1)),
            });
        }
        if concurrency == 64 {
            rows.push(Row {
                what: "p99 latency ms, 64 in flight, fib(10)".into(),
                node: on_node.latency_ms.p99,
                native: Some(on_peer.latency_ms.p99),
                target: Some(Target::RatioAtMost(1.5)),
            });
        }
        reports.extend([on_node, on_peer]);
    }
    rows.push(hostile_reply_to(&node_exchange, settings.duration).await);
    let on_node = bench(
        &node_exchange,
        "fibrec",
        "25",
        "75025",
        16,
        settings.duration * 2,
    );
    let on_peer = bench(
        &peer_exchange,
        "fibrec",
        "25",
        "75025",
        16,
        settings.duration * 2,
    );
    rows.push(Row {
        what: "calls/s, 16 in flight, naive recursive fib(25)".into(),
        node: on_node.calls_per_s,
        native: Some(on_peer.calls_per_s),
        target: Some(Target::RatioAtLeast(0.7)),
    });
    reports.extend([on_node, on_peer]);

    let (node_cpu, report) = cpu_per_call(node.child.id(), &node_exchange, settings.cpu_calls);
    reports.push(report);
    let (peer_cpu, report) = cpu_per_call(peer.child.id(), &peer_exchange, settings.cpu_calls);
    reports.push(report);
    rows.push(Row {
        what: "CPU µs per call, 64 in flight, fib(10)".into(),
        node: node_cpu,
        native: Some(peer_cpu),
        target: Some(Target::RatioAtMost(1.3)),
    });
    drop((node, peer));

    let calls = settings.sandbox_calls;
    let (no_imports, wasip2) = tokio::task::spawn_blocking(move || sandbox_micros(calls))
        .await
        .unwrap();
    rows.push(Row {
        what: "sandbox µs per call in-process, import-free fib(0)".into(),
        node: no_imports,
        native: None,
        target: Some(Target::AtMost(10.0)),
    });
    rows.push(Row {
        what: "sandbox µs per call in-process, wasip2 fib(0)".into(),
        node: wasip2,
        native: None,
        target: Some(Target::AtMost(25.0)),
    });

    rows.push(Row {
        what: "RSS MiB, idle, 2 modules".into(),
        node: mib(idle_rss),
        native: None,
        target: Some(Target::AtMost(40.0)),
    });
    rows.push(Row {
        what: format!("RSS MiB, {} modules loaded", settings.modules),
        node: mib(many_modules_rss(settings.modules).await),
        native: None,
        target: None,
    });
    let peak = peak_rss_per_request().await;
    rows.push(Row {
        what: "peak RSS MiB per request, 100 MiB output, 2 at once".into(),
        node: peak,
        native: None,
        target: Some(Target::AtMost(
            Limits::DEFAULT.memory as f64 / (1 << 20) as f64,
        )),
    });
    let (share, took, report) = burst(settings.burst).await;
    reports.push(report);
    rows.push(Row {
        what: format!(
            "% of a {}-call burst a 1000x slower node takes",
            settings.burst
        ),
        node: share,
        native: None,
        target: None,
    });
    rows.push(Row {
        what: "  the burst's duration, ms".into(),
        node: took.as_secs_f64() * 1000.0,
        native: None,
        target: None,
    });
    rows.extend(fan_out(settings).await);
    Comparison { rows, reports }
}

/// Honest calls/s with 100 hostile requests a second arriving beside them
/// (`reply_to` names RabbitMQ closes a publisher's connection over, and the
/// fleet's own queues), against the same node's calls/s without, measured
/// in turn.
async fn hostile_reply_to(exchange: &str, duration: Duration) -> Row {
    let quiet = bench(exchange, "fib", "10", "55", 16, duration);
    let attacker = super::raw::RawClient::connect().await;
    let attacking = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let topology = wasmrpc::wire::Topology::new(exchange);
    let attack = {
        let attacking = attacking.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(10));
            let mut n = 0u64;
            while attacking.load(std::sync::atomic::Ordering::Relaxed) {
                ticks.tick().await;
                let reply_to = match n % 3 {
                    0 => format!("amq.rabbitmq.reply-to.AAAA{n}.key"),
                    1 => super::raw::direct_reply_to_for_node(&format!("reply@{}", 1_000_000 + n)),
                    _ => topology.dead_queue(),
                };
                let properties = lapin::BasicProperties::default()
                    .with_reply_to(reply_to.as_str().into())
                    .with_correlation_id("hostile".into());
                attacker
                    .publish(topology.exchange(), "fib", b"10", properties)
                    .await;
                n += 1;
            }
        })
    };
    let attacked = bench(exchange, "fib", "10", "55", 16, duration);
    attacking.store(false, std::sync::atomic::Ordering::Relaxed);
    attack.await.unwrap();
    Row {
        what: "honest calls/s, 16 in flight, 100 hostile reply_to/s (vs none)".into(),
        node: attacked.calls_per_s,
        native: Some(quiet.calls_per_s),
        target: Some(Target::RatioAtLeast(0.8)),
    }
}

/// A node process as the bench measures it: its own default settings, and
/// no backtraces captured for errors (this machine's environment asks for
/// them, which costs a node whose guests write to stdio).
fn measured(spawn: Spawn) -> Spawn {
    spawn.env("RUST_BACKTRACE", "0")
}

/// `wasmrpc bench` on `exchange`, every reply checked against `expect`.
fn bench(
    exchange: &str,
    module: &str,
    arg: &str,
    expect: &str,
    concurrency: u32,
    duration: Duration,
) -> Report {
    let mut command = wasmrpc(exchange);
    command
        .args(["bench", module, arg, "--json", "--expect", expect])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--duration", &format!("{}ms", duration.as_millis())]);
    report(&output(command))
}

/// Runs a command to its end off the async runtime's workers.
fn output(mut command: Command) -> std::process::Output {
    tokio::task::block_in_place(|| command.output().expect("failed to run wasmrpc"))
}

fn report(output: &std::process::Output) -> Report {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "wasmrpc bench printed no report ({error}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn wasmrpc(exchange: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasmrpc"));
    command
        .env("AMQP_URL", amqp_url())
        .env("WASMRPC_EXCHANGE", exchange)
        .env("RUST_BACKTRACE", "0");
    command
}

/// CPU time (user and system, from /proc) the process spent per call over
/// `calls` calls at 64 in flight.
fn cpu_per_call(pid: u32, exchange: &str, calls: u64) -> (f64, Report) {
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name, which may hold spaces: utime, stime
        // are fields 14 and 15 of the line.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let mut command = wasmrpc(exchange);
    command
        .args(["bench", "fib", "10", "--json", "--expect", "55"])
        .args(["--concurrency", "64", "--requests", &calls.to_string()]);
    let before = ticks();
    let output = output(command);
    let used = ticks() - before;
    // Clock ticks are 1/100 s on Linux.
    (used as f64 * 10_000.0 / calls as f64, report(&output))
}

/// The peer process.
struct NativePeer {
    child: Child,
}

impl NativePeer {
    async fn start(exchange: &str, prefetch: u16) -> NativePeer {
        let path = PathBuf::from(env!("CARGO_BIN_EXE_wasmrpc"))
            .parent()
            .unwrap()
            .join("examples/native_peer");
        assert!(
            path.exists(),
            "{} is missing: cargo build --release --example native_peer",
            path.display()
        );
        let mut child = Command::new(path)
            .args([exchange, &prefetch.to_string()])
            .env("AMQP_URL", amqp_url())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (ready, started) = tokio::sync::oneshot::channel();
        // Reads its log to the end, so that it never blocks writing.
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut lines = std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok);
            let _ = ready.send(lines.next());
            lines.for_each(drop);
        });
        let first = started.await.unwrap();
        assert!(
            first.as_ref().is_some_and(|line| line.contains("ready")),
            "the native peer did not start: {first:?}"
        );
        NativePeer { child }
    }
}

impl Drop for NativePeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a fresh sandbox costs per call, in-process: median µs of 7 rounds,
/// for an import-free fib component and the wasip2 build.
pub fn sandbox_micros(calls: usize) -> (f64, f64) {
    let wasip2 = std::fs::read(guests::wasm("fib")).unwrap();
    let core = std::fs::read(
        guests::build_for("wasm32-unknown-unknown")
            .unwrap_or_else(|error| panic!("{error}"))
            .join("fib.wasm"),
    )
    .unwrap();
    let no_imports = wit_component::ComponentEncoder::default()
        .module(&core)
        .unwrap()
        .validate(true)
        .encode()
        .unwrap();
    let runtime = Runtime::new(&RuntimeConfig::new(1, None)).unwrap();
    let compile = |bytes: Vec<u8>| {
        runtime
            .compile(&Wasm::new(bytes), &Limits::DEFAULT)
            .unwrap()
    };
    let (no_imports, wasip2) = (compile(no_imports), compile(wasip2));
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let median = |module: &Module| {
        let mut rounds: Vec<f64> = (0..7)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..calls {
                    tokio.block_on(module.call(b"0", None)).unwrap();
                }
                started.elapsed().as_secs_f64() * 1e6 / calls as f64
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        rounds[3]
    };
    (median(&no_imports), median(&wasip2))
}

/// The RSS of a node that has loaded `count` distinct modules.
async fn many_modules_rss(count: usize) -> u64 {
    let exchange = unique("bench-many");
    let names: Vec<String> = (0..count).map(|i| format!("fib{i}")).collect();
    let _cleanup = Cleanup::new(
        &exchange,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let fib = std::fs::read(guests::wasm("fib")).unwrap();
    let mut spawn = measured(Spawn::new(&exchange, &[]));
    for name in &names {
        spawn = spawn.binary(&format!("{name}.wasm"), guests::variant(&fib, name));
    }
    let node = spawn.start().await;
    node.rss()
}

/// Peak RSS per request of a node answering two at a time calls whose
/// output (100 MiB) is over the reply limit (16 MiB): the guest's memory
/// is within its limit, and the output is never copied out of it.
async fn peak_rss_per_request() -> f64 {
    let exchange = unique("bench-peak");
    let _cleanup = Cleanup::new(&exchange, &["flood"]);
    let node = measured(Spawn::new(&exchange, &["flood"]))
        .env("WASMRPC_CONCURRENCY", "2")
        .start()
        .await;
    let before = node.peak_rss();
    let mut command = wasmrpc(&exchange);
    command
        .args(["bench", "flood", "104857600", "--json"])
        .args(["--concurrency", "2", "--requests", "6"]);
    let report = report(&output(command));
    let peak = node.peak_rss().saturating_sub(before);
    let too_large = std::collections::BTreeMap::from([("too_large".to_owned(), 6)]);
    assert_eq!(report.errors, too_large, "every output is over the limit");
    mib(peak) / 2.0
}

/// Two nodes share a queue, one 1000 times slower than the other (`work`
/// sleeps 20 ms on it: `spin`; it computes fib(20) on the other): the share
/// of a burst of `calls` that the slow one takes, and how long the burst took.
async fn burst(calls: u64) -> (f64, Duration, Report) {
    let exchange = unique("bench-burst");
    let _cleanup = Cleanup::new(&exchange, &["work"]);
    let slow = measured(Spawn::new(&exchange, &[]))
        .binary("work.wasm", std::fs::read(guests::wasm("spin")).unwrap())
        .start()
        .await;
    let fast = measured(Spawn::new(&exchange, &[]))
        .binary("work.wasm", std::fs::read(guests::wasm("fib")).unwrap())
        .start()
        .await;
    let mut command = wasmrpc(&exchange);
    command
        .args(["bench", "work", "20", "--json"])
        .args(["--concurrency", &calls.to_string()])
        .args(["--requests", &calls.to_string()]);
    let started = Instant::now();
    let report = report(&output(command));
    let took = started.elapsed();
    let mut command = wasmrpc(&exchange);
    command.args(["modules", "--json"]);
    let fleet = output(command);
    let nodes: Vec<wasmrpc::wire::NodeStatus> = serde_json::from_slice(&fleet.stdout).unwrap();
    let spin = wasmrpc::runtime::Wasm::new(std::fs::read(guests::wasm("spin")).unwrap()).digest();
    let slow_calls: u64 = nodes
        .iter()
        .flat_map(|node| &node.modules)
        .filter(|module| spin.starts_with(&module.version))
        .map(|module| module.calls)
        .sum();
    drop((slow, fast));
    (slow_calls as f64 * 100.0 / calls as f64, took, report)
}

/// Modules calling modules: a job split into 16 CPU-bound parts (`split`, a
/// relay, calls `spin` 16 times at once) on one node and then two
/// (`--concurrency 1` each), and what a call made by a module costs against
/// one made from outside: `a` calling `fib` (two round trips, one of them
/// from inside a module) against two calls of `fib` in a row from outside.
async fn fan_out(settings: Settings) -> Vec<Row> {
    let exchange = unique("bench-fan-out");
    let _cleanup = Cleanup::new(&exchange, &["split", "spin", "fib"]);
    let relay = std::fs::read(guests::wasm("relay")).unwrap();
    let spawn = measured(Spawn::new(&exchange, &["spin", "fib"]))
        .env("WASMRPC_CONCURRENCY", "1")
        .binary("split.wasm", relay)
        .file("split.toml", "calls = [\"*\"]\n");
    let first = spawn.clone().start().await;
    let client = wasmrpc::client::Client::connect(&super::brokers(), &exchange)
        .await
        .unwrap();
    let job = format!("*16,spin;{}", settings.part_ms);
    // Warm up: the first call opens the node's connection for calls.
    ms_per_round(&client, 1, &[("split", "fib;10")]).await;
    let rounds = settings.child_calls;
    let through_module = ms_per_round(&client, rounds, &[("split", "fib;10")]).await;
    let from_outside = ms_per_round(&client, rounds, &[("fib", "10"), ("fib", "10")]).await;
    let jobs = settings.fan_out_jobs;
    let one_node = ms_per_round(&client, jobs, &[("split", &job)]).await;
    let second = spawn.start().await;
    let two_nodes = ms_per_round(&client, jobs, &[("split", &job)]).await;
    drop((first, second));
    vec![
        Row {
            what: format!(
                "fan-out 16 x {} ms, ms a job: 2 nodes (vs 1)",
                settings.part_ms
            ),
            node: two_nodes,
            native: Some(one_node),
            // 1.7 times as fast.
            target: Some(Target::RatioAtMost(0.59)),
        },
        Row {
            what: "ms: call through a module (vs 2 from outside)".into(),
            node: through_module,
            native: Some(from_outside),
            target: Some(Target::RatioAtMost(1.2)),
        },
    ]
}

/// Makes `calls` one after the other, `rounds` times: ms per round.
async fn ms_per_round(
    client: &wasmrpc::client::Client,
    rounds: u32,
    calls: &[(&str, &str)],
) -> f64 {
    let started = Instant::now();
    for _ in 0..rounds {
        for (module, input) in calls {
            let reply = client
                .call(module, input.as_bytes(), Duration::from_secs(60))
                .await
                .expect("no reply");
            assert_eq!(
                reply.error,
                None,
                "{}",
                String::from_utf8_lossy(&reply.body)
            );
        }
    }
    started.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}
