//! The wasm runtime: compiles compute modules once and runs each request in a
//! fresh, limited sandbox.
//!
//! This is the only place that configures wasmtime. It knows nothing of AMQP:
//! it turns bytes into a [`Module`] and a request body into a reply body or a
//! [`CallError`], and the node decides what those mean on the wire.
//!
//! Two kinds of code are served. A *component* implements the wasmrpc world
//! (`call: func(input) -> result<output, call-error>`). A *WASI program*
//! (a WASI 0.2 command component exporting `wasi:cli/run`, or a WASI preview 1
//! core module, which is adapted into one when it is compiled) reads the
//! request body on stdin and writes the reply on stdout; exit status 0 is
//! success, any other a [`CallError::Failed`] with the tail of its stderr.
//! Every limit applies to both alike.
//!
//! Cost model: [`Runtime::compile`] is slow (tens to hundreds of milliseconds,
//! call it off the async path); [`Module::call`] instantiates from a pooled,
//! pre-linked [`bindings::FleetModulePre`] and costs tens of microseconds before
//! the guest runs.

mod bindings;
mod cache;
mod fleet;
mod limits;
mod output;
mod sandbox;

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{Hash as _, Hasher as _};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::thread;
use std::time::{Duration, Instant};

use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
};
use wasmtime::component::{Component, ComponentExportIndex, Linker, TypedFunc};
use wasmtime::error::Context as _;
use wasmtime::{
    Config, Engine, EngineWeak, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline,
};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::bindings::CommandPre;

use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::PollSemaphore;

use self::cache::ArtifactCache;
pub use self::cache::{DEFAULT_SIZE as DEFAULT_CACHE_SIZE, KEY_FILE as CACHE_KEY_FILE};
pub use self::fleet::{Callees, Calling, Fleet, FleetError, Outcome, kind as fleet_kind};
pub use self::limits::Limits;
use self::output::Output;
use self::sandbox::{DeadlineExceeded, MemoryLimitExceeded, Sandbox};
use crate::units::{Bytes, display_millis};

/// How much of a slot's memory (and of its tables) stays resident between
/// instances, per slot: what a small guest touches (a Rust guest's 1 MiB
/// stack and its heap). Larger memories are decommitted beyond it.
const KEEP_RESIDENT: usize = 2 << 20;

/// The world's `call`, typed so that its output is size-checked before it
/// is copied out of the guest's memory (see [`output`]).
type CallFunc<'a> = TypedFunc<(&'a [u8],), (Result<Output, bindings::CallError>,)>;

/// How often the epoch advances. It bounds how late a timeout fires and how
/// long a busy guest holds its executor thread before yielding.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// What a runtime is sized for; fixed for the life of the process.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// The most instances alive at once: requests in progress, whether they
    /// run wasm, wait in a host call or wait for their turn. The instance
    /// pool is sized to it and callers must not exceed it (the node holds a
    /// semaphore of this size).
    pub max_instances: u32,
    /// The most guests that execute wasm at once: the CPU a node gives its
    /// guests. A guest holds one of these only while it executes; one
    /// waiting in a host call (a WASI sleep) or at its time slice's end
    /// holds none, so it cannot keep others from running.
    pub max_running: u32,
    /// Where compiled modules are kept between runs; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// The most bytes of compiled code the cache keeps.
    pub cache_size: u64,
    /// Whether guests are stopped at their time limit while they compute
    /// (epoch interruption). Always on in a node and in `wasmrpc run`; off
    /// only to measure what the checks cost a guest (`cargo bench --bench
    /// sandbox`): without them a guest that computes is never stopped, only
    /// one waiting in a host call.
    pub time_limits: bool,
}

impl RuntimeConfig {
    /// A runtime that runs up to `max_running` guests at once and keeps
    /// [`INSTANCES_PER_RUNNING`] times as many instances alive.
    pub fn new(max_running: u32, cache_dir: Option<PathBuf>) -> RuntimeConfig {
        let max_running = max_running.max(1);
        RuntimeConfig {
            max_instances: max_running.saturating_mul(INSTANCES_PER_RUNNING),
            max_running,
            cache_dir,
            cache_size: DEFAULT_CACHE_SIZE,
            time_limits: true,
        }
    }

    /// Room in the pool for `waiting` more instances: requests that wait for
    /// their calls to other modules keep theirs beside those in progress.
    pub fn keeping_waiting(mut self, waiting: usize) -> RuntimeConfig {
        let waiting = u32::try_from(waiting).unwrap_or(u32::MAX);
        self.max_instances = self.max_instances.saturating_add(waiting);
        self
    }
}

/// Instances alive for each guest that may run: room for requests that wait
/// (in a host call, or for their turn) beside those that run.
pub const INSTANCES_PER_RUNNING: u32 = 4;

/// Compiles modules; clone-cheap, build one per process.
///
/// wasmtime fixes the wasm stack size per engine, so modules are compiled by
/// one engine per distinct stack limit, each made on first use. In practice
/// a node has one or two.
#[derive(Clone)]
pub struct Runtime {
    slots: u32,
    time_limits: bool,
    /// One permit per guest that may execute wasm at once.
    running: Arc<Semaphore>,
    engines: Arc<Mutex<BTreeMap<usize, Flavor>>>,
    cache: Option<Arc<ArtifactCache>>,
}

/// An engine, and the linker that offers guests WASI, for one stack size.
#[derive(Clone)]
struct Flavor {
    engine: Engine,
    linker: Arc<Linker<Sandbox>>,
    /// Names what this engine compiles to, for the cache: wasmtime's
    /// version, the target and every setting that shapes code.
    fingerprint: String,
}

impl Runtime {
    pub fn new(config: &RuntimeConfig) -> anyhow::Result<Self> {
        // A cache is an optimisation: a node that cannot have one still serves.
        let cache = config.cache_dir.as_deref().and_then(|dir| {
            ArtifactCache::open(dir, config.cache_size)
                .inspect_err(|error| tracing::warn!("compiling without a cache: {error:#}"))
                .ok()
                .map(Arc::new)
        });
        let runtime = Runtime {
            slots: config.max_instances.max(1),
            time_limits: config.time_limits,
            running: Arc::new(Semaphore::new(config.max_running.max(1) as usize)),
            engines: Arc::default(),
            cache,
        };
        // Fail now, not at the first module, if the engine cannot be built.
        runtime.flavor(Limits::DEFAULT.stack)?;
        Ok(runtime)
    }

    /// Compiles and links a component that implements the `module` world,
    /// to run within `limits`, or loads what this node compiled from it
    /// before.
    ///
    /// Fails if the bytes are not a component, or if it does not export
    /// `call` with the world's signature, or if it imports anything but
    /// WASI 0.2. Slow unless cached: run it on a blocking thread.
    pub fn compile(&self, wasm: &Wasm, limits: &Limits) -> anyhow::Result<Module> {
        limits.validate().map_err(anyhow::Error::msg)?;
        let Flavor {
            engine,
            linker,
            fingerprint,
        } = self.flavor(limits.stack)?;
        let entry = format!("{}-{fingerprint}", wasm.digest());
        let cached = self
            .cache
            .as_ref()
            .and_then(|cache| cache.load(&entry))
            .and_then(|artifact| {
                // SAFETY: the cache hands back only artifacts whose tag proves this
                // node's key compiled them, from these very bytes, for this engine.
                unsafe { Component::deserialize(&engine, artifact) }
                    .inspect_err(|error| {
                        tracing::warn!("ignoring an unusable cached artifact: {error}")
                    })
                    .ok()
            });
        let from_cache = cached.is_some();
        // wasmtime would also read the text format: insist on a binary.
        if !wasm.bytes.starts_with(b"\0asm") {
            anyhow::bail!("not a wasm binary (it does not start with \\0asm)");
        }
        let core = wasm.is_core_module();
        let component = match cached {
            Some(component) => component,
            None => {
                let component = if core {
                    let adapted = adapt_preview1(&wasm.bytes)?;
                    Component::new(&engine, adapted)
                        .context("the adapted WASI preview 1 program does not compile")?
                } else {
                    Component::new(&engine, &wasm.bytes).context("not a valid wasm component")?
                };
                if let Some(cache) = &self.cache {
                    match component.serialize() {
                        Ok(artifact) => cache.store(&entry, &artifact),
                        Err(error) => {
                            tracing::warn!("failed to serialize a compiled module: {error}")
                        }
                    }
                }
                component
            }
        };
        let (mut imports_wasi, mut imports_fleet) = (false, false);
        for (name, _) in component.component_type().imports(&engine) {
            match name == fleet::INTERFACE {
                true => imports_fleet = true,
                false => imports_wasi = true,
            }
        }
        let pre = linker
            .instantiate_pre(&component)
            .context("imports something other than WASI 0.2 and wasmrpc:compute/fleet")?;
        let (entry, kind) = match component.get_export_index(None, "call") {
            Some(call) => {
                let pre = bindings::FleetModulePre::new(pre)
                    .context("does not implement the wasmrpc:compute/module world")?;
                (Entry::Call { pre, call }, ModuleKind::Component)
            }
            None => {
                let pre = CommandPre::new(pre).context(
                    "exports neither the wasmrpc world's `call` nor WASI's `wasi:cli/run`",
                )?;
                let kind = if core {
                    ModuleKind::WasiPreview1
                } else {
                    ModuleKind::WasiCommand
                };
                (Entry::Program { pre }, kind)
            }
        };
        Ok(Module {
            entry,
            kind,
            running: self.running.clone(),
            imports_wasi,
            imports_fleet,
            engine,
            limits: limits.clone(),
            digest: wasm.digest(),
            from_cache,
        })
    }

    fn flavor(&self, stack: usize) -> anyhow::Result<Flavor> {
        let mut engines = self.engines.lock().expect("engines lock");
        if let Some(flavor) = engines.get(&stack) {
            return Ok(flavor.clone());
        }
        let engine = new_engine(self.slots, stack, self.time_limits)?;
        if self.time_limits {
            spawn_epoch_ticker(engine.weak());
        }
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .context("failed to link the WASI sandbox")?;
        bindings::wasmrpc::compute::fleet::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |sandbox: &mut Sandbox| sandbox,
        )
        .context("failed to link the fleet interface")?;
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let flavor = Flavor {
            engine,
            linker: Arc::new(linker),
            fingerprint: format!("{:016x}", hasher.finish()),
        };
        engines.insert(stack, flavor.clone());
        Ok(flavor)
    }
}

fn new_engine(slots: u32, stack: usize, epochs: bool) -> anyhow::Result<Engine> {
    // Every figure is per slot: a component may hold several core instances,
    // tables and memories (a wasip2 build of Rust has 3 core instances; other
    // toolchains more), but only one component runs per slot. Memory slots
    // reserve address space, not memory: size them for the largest limit and
    // let each store's limiter enforce its module's.
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(slots)
        .total_core_instances(slots * 32)
        .max_core_instances_per_component(32)
        .total_memories(slots * 2)
        .max_memories_per_component(2)
        .total_tables(slots * 8)
        .max_tables_per_component(8)
        .total_stacks(slots)
        .max_memory_size(Limits::MAX.memory as usize);
    // A slot given back is reset by scanning for the pages the instance
    // touched and zeroing those in place, up to KEEP_RESIDENT bytes, rather
    // than by madvise: that system call flushes every core's TLB and makes
    // the next instance page-fault its memory back in. It was half of a
    // fresh instance's cost (28 µs to 14 µs, `cargo bench --bench sandbox`).
    pool.linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(wasmtime::Enabled::Auto);
    // Reuse the slots already warm before touching a cold one: the slots a
    // node ever uses are then as many as the instances it ran at once, not
    // the whole pool (which holds room for requests waiting for their calls
    // to other modules, mostly unused), and each keeps up to KEEP_RESIDENT.
    // (wasmtime also splits a pool of 128 or more of a kind into one shard
    // per core, each with warm slots of its own: a pool of 64 slots grew a
    // node by 15 MiB over a thousand hostile calls where 63 grew it by 1.)
    pool.max_unused_warm_slots(0);

    let mut config = Config::new();
    config
        .epoch_interruption(epochs)
        .max_wasm_stack(stack)
        // The async fiber runs host calls too: leave them room above the guest's stack.
        .async_stack_size(stack + (1 << 20))
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Ok(Engine::new(&config).context("failed to create the wasm engine")?)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is gone.
fn spawn_epoch_ticker(engine: EngineWeak) {
    thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                thread::sleep(EPOCH_TICK);
            }
        })
        .expect("failed to spawn the epoch thread");
}

/// A compiled, linked compute module and its limits. Clone-cheap; every
/// clone shares the code.
#[derive(Clone)]
pub struct Module {
    entry: Entry,
    kind: ModuleKind,
    /// The runtime's permits to execute wasm.
    running: Arc<Semaphore>,
    imports_wasi: bool,
    /// Whether it imports `wasmrpc:compute/fleet`: it calls other modules.
    imports_fleet: bool,
    engine: Engine,
    limits: Limits,
    digest: String,
    from_cache: bool,
}

/// How a request enters a module, checked when it was compiled.
#[derive(Clone)]
enum Entry {
    /// The wasmrpc world: `call`, called through [`CallFunc`].
    Call {
        pre: bindings::FleetModulePre<Sandbox>,
        call: ComponentExportIndex,
    },
    /// A WASI program: `wasi:cli/run`, with the request on stdin.
    Program { pre: CommandPre<Sandbox> },
}

/// What a module file turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// A component implementing the wasmrpc world.
    Component,
    /// A WASI 0.2 command component (`wasi:cli/run`).
    WasiCommand,
    /// A WASI preview 1 core module, adapted to a command when compiled.
    WasiPreview1,
}

impl ModuleKind {
    /// As `wasmrpc modules` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleKind::Component => "component",
            ModuleKind::WasiCommand => "wasi-command",
            ModuleKind::WasiPreview1 => "wasi-preview1",
        }
    }
}

impl std::fmt::Display for ModuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Wraps a WASI preview 1 core module into a command component, with the
/// adapter that wasmtime publishes for its own preview 1 support.
fn adapt_preview1(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    let encoder = wit_component::ComponentEncoder::default()
        .validate(true)
        .module(module)
        .context("not a valid wasm module")?;
    let mut encoder = encoder
        .adapter(
            WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
        )
        .context("failed to load the WASI preview 1 adapter")?;
    encoder.encode().context(
        "not a WASI preview 1 program (a core module must import only \
         wasi_snapshot_preview1 and export `_start`)",
    )
}

/// A module's bytes and their SHA-256, which names this build of it.
pub struct Wasm {
    bytes: Vec<u8>,
    digest: [u8; 32],
}

impl Wasm {
    pub fn new(bytes: Vec<u8>) -> Wasm {
        let digest = Sha256::digest(&bytes).into();
        Wasm { bytes, digest }
    }

    /// The SHA-256 of the bytes, in hex.
    pub fn digest(&self) -> String {
        hex::encode(self.digest)
    }

    /// The bytes back.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// A core module (version 1 of the binary format), not a component.
    fn is_core_module(&self) -> bool {
        self.bytes.get(4..8) == Some(&[1, 0, 0, 0])
    }
}

/// How a guest's run ended, when it ended on its own.
enum Ran {
    /// The wasmrpc world's `call` returned.
    Returned(Result<Output, bindings::CallError>),
    /// A WASI program exited with this status.
    Exited(i32),
}

/// A guest's future that holds one of the runtime's permits to run wasm
/// only while it is polled, which is when its fiber executes wasm. Whenever
/// the guest waits (in a host call such as a WASI sleep, or at an epoch
/// tick, every 10 ms of computing) it gives its permit back and queues for
/// another, behind the guests already waiting: CPU is shared in time slices
/// among the guests that compute, and a guest that sleeps holds none.
struct OnPermit<F> {
    guest: Pin<Box<F>>,
    permits: PollSemaphore,
    /// The reply limit, for the output lifted during a poll.
    reply_limit: usize,
}

impl<F: Future> Future for OnPermit<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let permit = ready!(self.permits.poll_acquire(cx));
        let reply_limit = self.reply_limit;
        let polled = output::with_limit(reply_limit, || self.guest.as_mut().poll(cx));
        drop(permit);
        polled
    }
}

/// Why a call produced no output. Every variant is an answer for the caller,
/// none is a fault of the node.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    Failed(String),
    #[error("request body of {} is over the limit of {}", Bytes(*.size as u64), Bytes(*.limit as u64))]
    InputTooLarge { size: usize, limit: usize },
    #[error("reply of {} is over the limit of {}", Bytes(*.size as u64), Bytes(*.limit as u64))]
    OutputTooLarge { size: usize, limit: usize },
    #[error("ran longer than its time limit of {}", display_millis(*.limit))]
    Timeout { limit: Duration },
    #[error("ran past the caller's deadline, {} after it started", display_millis(*.budget))]
    Deadline { budget: Duration },
    #[error("the caller's deadline passed {} before the request could start", display_millis(*.late_by))]
    DeadlinePassed { late_by: Duration },
    #[error("needed more than its memory limit of {}", Bytes(*.limit))]
    Memory { limit: u64 },
    #[error("overflowed its wasm stack limit of {}", Bytes(*.limit as u64))]
    StackOverflow { limit: usize },
    #[error("trapped: {0}")]
    Trap(String),
    /// The sandbox could not be set up; the module never ran.
    #[error("could not start: {0}")]
    Instantiate(String),
}

impl Module {
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The SHA-256 of the module's bytes, in hex: which build this is.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// What the file turned out to be.
    pub fn kind(&self) -> ModuleKind {
        self.kind
    }

    /// Whether the code came from the artifact cache rather than the compiler.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// Whether it imports `wasmrpc:compute/fleet`, to call other modules.
    pub fn imports_fleet(&self) -> bool {
        self.imports_fleet
    }

    /// Runs one request in a fresh instance, within the module's limits and
    /// the caller's `deadline`, whichever ends first.
    ///
    /// Anything the guest writes to stdout or stderr is logged (target
    /// `wasmrpc::guest`) inside the caller's tracing span, and stderr is
    /// appended to the message of a trap so a panic message reaches the caller.
    pub async fn call(
        &self,
        input: &[u8],
        deadline: Option<Instant>,
    ) -> Result<Vec<u8>, CallError> {
        self.call_with(input, deadline, None).await
    }

    /// [`Module::call`], with `calling` for the guest's calls to other
    /// modules (without it, every such call fails `unavailable`).
    pub async fn call_with(
        &self,
        input: &[u8],
        deadline: Option<Instant>,
        calling: Option<Calling>,
    ) -> Result<Vec<u8>, CallError> {
        let limits = &self.limits;
        if input.len() > limits.request {
            return Err(CallError::InputTooLarge {
                size: input.len(),
                limit: limits.request,
            });
        }
        let started = Instant::now();
        let own_deadline = started + limits.time;
        let (deadline, callers) = match deadline {
            Some(deadline) if deadline <= started => {
                return Err(CallError::DeadlinePassed {
                    late_by: started - deadline,
                });
            }
            Some(deadline) if deadline < own_deadline => (deadline, true),
            _ => (own_deadline, false),
        };
        let timeout = || {
            if callers {
                CallError::Deadline {
                    budget: deadline - started,
                }
            } else {
                CallError::Timeout { limit: limits.time }
            }
        };

        let mut sandbox = match self.entry {
            Entry::Call { .. } => Sandbox::new(limits, self.imports_wasi),
            Entry::Program { .. } => Sandbox::program(limits, input),
        };
        if self.imports_fleet {
            sandbox.set_calling(calling);
        }
        let mut store = Store::new(&self.engine, sandbox);
        store.limiter(|sandbox| sandbox);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Err(DeadlineExceeded.into())
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });

        // The epoch callback stops a guest that computes; this stops one
        // that waits inside a host call (a WASI sleep, say), where no epoch
        // check runs. Dropping the future unwinds the guest.
        let run = async {
            match &self.entry {
                Entry::Call { pre, call } => {
                    let instance = pre
                        .instance_pre()
                        .instantiate_async(&mut store)
                        .await
                        .map_err(|error| (error, true))?;
                    let call: CallFunc<'_> = instance
                        .get_typed_func(&mut store, *call)
                        .map_err(|error| (error, true))?;
                    let (result,) = call
                        .call_async(&mut store, (input,))
                        .await
                        .map_err(|error| (error, false))?;
                    Ok(Ran::Returned(result))
                }
                Entry::Program { pre } => {
                    let command = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(|error| (error, true))?;
                    match command.wasi_cli_run().call_run(&mut store).await {
                        Ok(Ok(())) => Ok(Ran::Exited(0)),
                        Ok(Err(())) => Ok(Ran::Exited(1)),
                        Err(error) => match error.downcast_ref::<I32Exit>() {
                            Some(I32Exit(status)) => Ok(Ran::Exited(*status)),
                            None => Err((error, false)),
                        },
                    }
                }
            }
        };
        let run = OnPermit {
            guest: Box::pin(run),
            permits: PollSemaphore::new(self.running.clone()),
            reply_limit: limits.reply,
        };
        let outcome = tokio::time::timeout_at((deadline + EPOCH_TICK).into(), run).await;
        let stderr = store.data().log_output();

        let result = match outcome {
            Err(_elapsed) => return Err(timeout()),
            Ok(Ok(Ran::Exited(0))) => {
                let (output, written) = store.data().take_stdout();
                if written > limits.reply {
                    return Err(CallError::OutputTooLarge {
                        size: written,
                        limit: limits.reply,
                    });
                }
                return Ok(output);
            }
            Ok(Ok(Ran::Exited(status))) => {
                let mut message = format!("exited with status {status}");
                if !stderr.trim().is_empty() {
                    message = format!("{message}; stderr ends:\n{}", stderr.trim_end());
                }
                return Err(CallError::Failed(message));
            }
            Ok(Ok(Ran::Returned(result))) => result,
            Ok(Err((error, _))) if error.is::<DeadlineExceeded>() => return Err(timeout()),
            Ok(Err((error, instantiating))) => {
                return Err(self.classify(error, instantiating, stderr));
            }
        };
        match result {
            Ok(Output::Bytes(output)) => Ok(output),
            Ok(Output::TooLarge(size)) => Err(CallError::OutputTooLarge {
                size,
                limit: limits.reply,
            }),
            Err(bindings::CallError::InvalidInput(message)) => {
                Err(CallError::InvalidInput(message))
            }
            Err(bindings::CallError::Failed(message)) => Err(CallError::Failed(message)),
        }
    }

    /// Names the limit a failed call ran into, or passes the trap on with
    /// what the guest wrote to stderr.
    fn classify(&self, error: wasmtime::Error, instantiating: bool, stderr: String) -> CallError {
        if error.is::<MemoryLimitExceeded>() {
            return CallError::Memory {
                limit: self.limits.memory,
            };
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::StackOverflow) => CallError::StackOverflow {
                limit: self.limits.stack,
            },
            Some(trap) => {
                let trap = trap.to_string();
                let mut message = trap.strip_prefix("wasm trap: ").unwrap_or(&trap).to_owned();
                if !stderr.is_empty() {
                    message = format!("{message}\nstderr:\n{}", stderr.trim_end());
                }
                CallError::Trap(message)
            }
            None if instantiating => CallError::Instantiate(format!("{error:#}")),
            None => CallError::Trap(format!("{error:#}")),
        }
    }
}
