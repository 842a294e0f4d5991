//! The wasm runtime: compiles compute modules once and runs each request in a
//! fresh, limited sandbox.
//!
//! This is the only place that configures wasmtime. It knows nothing of AMQP:
//! it turns bytes into a [`Module`] and a request body into a reply body or a
//! [`CallError`], and the node decides what those mean on the wire.
//!
//! Cost model: [`Runtime::compile`] is slow (tens to hundreds of milliseconds,
//! call it off the async path); [`Module::call`] instantiates from a pooled,
//! pre-linked [`bindings::ModulePre`] and costs microseconds before the guest
//! runs.

mod limits;
mod sandbox;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker};
use wasmtime::error::Context as _;
use wasmtime::{
    Config, Engine, EngineWeak, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline,
};

pub use self::limits::Limits;
use self::sandbox::{DeadlineExceeded, MemoryLimitExceeded, Sandbox};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "module",
        exports: { default: async },
    });
}

/// How often the epoch advances. It bounds how late a timeout fires and how
/// long a busy guest holds its executor thread before yielding.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// What a runtime is sized for; fixed for the life of the process.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// The most requests that run at once. The instance pool is sized to it
    /// and callers must not exceed it (the node holds a semaphore of this size).
    pub max_concurrent: u32,
    /// The highest memory limit any module may be given.
    pub max_memory: u64,
    /// Wasm stack available to a guest, in bytes.
    pub max_stack: usize,
}

/// The shared wasmtime engine and linker; clone-cheap, build one per process.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<Sandbox>>,
    max_stack: usize,
}

impl Runtime {
    pub fn new(config: &RuntimeConfig) -> anyhow::Result<Self> {
        let slots = config.max_concurrent.max(1);
        // Every figure is per slot: a component may hold several core
        // instances, tables and memories (a wasip2 build of Rust has 3 core
        // instances; other toolchains more), but only one component runs
        // per slot.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(slots)
            .total_core_instances(slots * 32)
            .max_core_instances_per_component(32)
            .total_memories(slots * 2)
            .max_memories_per_component(2)
            .total_tables(slots * 8)
            .max_tables_per_component(8)
            .total_stacks(slots)
            .max_memory_size(usize::try_from(config.max_memory).context("memory limit too large")?);

        let mut wasmtime = Config::new();
        wasmtime
            .epoch_interruption(true)
            .max_wasm_stack(config.max_stack)
            // The async fiber runs host calls too: leave them room above the guest's stack.
            .async_stack_size(config.max_stack + (1 << 20))
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasmtime).context("failed to create the wasm engine")?;
        spawn_epoch_ticker(engine.weak());

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .context("failed to link the WASI sandbox")?;
        Ok(Runtime {
            engine,
            linker: Arc::new(linker),
            max_stack: config.max_stack,
        })
    }

    /// Compiles and links a component that implements the `module` world.
    ///
    /// Fails if the bytes are not a component, or if it does not export
    /// `call` with the world's signature, or if it imports anything but
    /// WASI 0.2. Slow: run it on a blocking thread.
    pub fn compile(&self, wasm: &[u8]) -> anyhow::Result<Module> {
        let component = Component::new(&self.engine, wasm).context("not a valid wasm component")?;
        let imports_wasi = component
            .component_type()
            .imports(&self.engine)
            .next()
            .is_some();
        let pre = self
            .linker
            .instantiate_pre(&component)
            .context("imports something other than WASI 0.2")?;
        let pre = bindings::ModulePre::new(pre)
            .context("does not implement the wasmrpc:compute/module world")?;
        Ok(Module {
            pre,
            imports_wasi,
            engine: self.engine.clone(),
            max_stack: self.max_stack,
        })
    }
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

/// A compiled, linked compute module. Clone-cheap; every clone shares the code.
#[derive(Clone)]
pub struct Module {
    pre: bindings::ModulePre<Sandbox>,
    imports_wasi: bool,
    engine: Engine,
    max_stack: usize,
}

/// Why a call produced no output. Every variant is an answer for the caller,
/// none is a fault of the node.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    Failed(String),
    #[error("input is {size} bytes, more than the limit of {limit} bytes")]
    InputTooLarge { size: usize, limit: usize },
    #[error("output is {size} bytes, more than the limit of {limit} bytes")]
    OutputTooLarge { size: usize, limit: usize },
    #[error("ran longer than the time limit of {} ms", .limit.as_millis())]
    Timeout { limit: Duration },
    #[error("needed more than the memory limit of {limit} bytes")]
    Memory { limit: u64 },
    #[error("overflowed the wasm stack limit of {limit} bytes")]
    StackOverflow { limit: usize },
    #[error("trapped: {0}")]
    Trap(String),
    /// The sandbox could not be set up; the module never ran.
    #[error("could not start the module: {0}")]
    Instantiate(String),
}

impl Module {
    /// Runs one request in a fresh instance, within `limits`.
    ///
    /// Anything the guest writes to stdout or stderr is logged (target
    /// `wasmrpc::guest`) inside the caller's tracing span, and stderr is
    /// appended to the message of a trap so a panic message reaches the caller.
    pub async fn call(&self, input: &[u8], limits: &Limits) -> Result<Vec<u8>, CallError> {
        if input.len() > limits.input {
            return Err(CallError::InputTooLarge {
                size: input.len(),
                limit: limits.input,
            });
        }
        let deadline = Instant::now() + limits.timeout;
        let mut store = Store::new(&self.engine, Sandbox::new(limits, self.imports_wasi));
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
            let instance = self
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(|error| (error, true))?;
            instance
                .call_call(&mut store, input)
                .await
                .map_err(|error| (error, false))
        };
        let outcome = tokio::time::timeout_at((deadline + EPOCH_TICK).into(), run).await;
        let stderr = store.data().log_output();

        let result = match outcome {
            Err(_elapsed) => {
                return Err(CallError::Timeout {
                    limit: limits.timeout,
                });
            }
            Ok(Ok(result)) => result,
            Ok(Err((error, instantiating))) => {
                return Err(self.classify(error, instantiating, limits, stderr));
            }
        };
        match result {
            Ok(output) if output.len() > limits.output => Err(CallError::OutputTooLarge {
                size: output.len(),
                limit: limits.output,
            }),
            Ok(output) => Ok(output),
            Err(bindings::CallError::InvalidInput(message)) => {
                Err(CallError::InvalidInput(message))
            }
            Err(bindings::CallError::Failed(message)) => Err(CallError::Failed(message)),
        }
    }

    /// Names the limit a failed call ran into, or passes the trap on with
    /// what the guest wrote to stderr.
    fn classify(
        &self,
        error: wasmtime::Error,
        instantiating: bool,
        limits: &Limits,
        stderr: String,
    ) -> CallError {
        if error.is::<DeadlineExceeded>() {
            return CallError::Timeout {
                limit: limits.timeout,
            };
        }
        if error.is::<MemoryLimitExceeded>() {
            return CallError::Memory {
                limit: limits.memory,
            };
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::StackOverflow) => CallError::StackOverflow {
                limit: self.max_stack,
            },
            Some(trap) => {
                let mut message = trap.to_string();
                if !stderr.is_empty() {
                    message = format!("{message}; stderr: {}", stderr.trim_end());
                }
                CallError::Trap(message)
            }
            None if instantiating => CallError::Instantiate(format!("{error:#}")),
            None => CallError::Trap(format!("{error:#}")),
        }
    }
}
