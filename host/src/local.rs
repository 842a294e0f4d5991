//! Calls between modules resolved in this process, with no broker: what
//! `wasmrpc run FILE --modules DIR` gives a module that calls others. A call
//! to `NAME` runs `DIR/NAME.wasm` (with its manifest), loaded on first use,
//! with the same checks a node makes: the caller's deadline, the depth, the
//! fan-out cap and the memory accounting, and the same error kinds.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;

use crate::children::ChildLimits;
use crate::names::ModuleName;
use crate::registry::{self, LoadedModule};
use crate::runtime::{Calling, Fleet, FleetError, Limits, Outcome, Runtime};
use crate::wire::ErrorKind;

/// The modules of one directory, as calls find them.
pub struct LocalFleet {
    runtime: Runtime,
    dir: PathBuf,
    limits: Limits,
    bounds: ChildLimits,
    loaded: tokio::sync::Mutex<HashMap<ModuleName, Arc<LoadedModule>>>,
}

impl LocalFleet {
    /// Modules from `dir`, compiled by `runtime` within `limits` unless
    /// their manifests say otherwise, called within `bounds`.
    pub fn new(runtime: Runtime, dir: PathBuf, limits: Limits, bounds: ChildLimits) -> Arc<Self> {
        Arc::new(LocalFleet {
            runtime,
            dir,
            limits,
            bounds,
            loaded: tokio::sync::Mutex::default(),
        })
    }

    /// What `module`, called at `depth` by a request due by `deadline`, calls
    /// other modules through.
    pub fn calling(
        self: &Arc<Self>,
        module: &LoadedModule,
        deadline: Instant,
        depth: u32,
    ) -> Calling {
        Calling {
            fleet: Arc::new(LocalCalls {
                fleet: self.clone(),
                deadline,
                depth,
            }),
            callees: module.calls.clone(),
        }
    }

    async fn module(&self, name: &str) -> Result<Arc<LoadedModule>, FleetError> {
        let not_found = || {
            FleetError::new(
                ErrorKind::NotFound.as_str(),
                format!("no module {name:?} in {}", self.dir.display()),
            )
        };
        let name: ModuleName = name.parse().map_err(|_| not_found())?;
        let mut loaded = self.loaded.lock().await;
        if let Some(module) = loaded.get(&name) {
            return Ok(module.clone());
        }
        let path = self.dir.join(format!("{name}.wasm"));
        if !path.is_file() {
            return Err(not_found());
        }
        let module =
            registry::load_file(&self.runtime, &name, &path, &self.limits, usize::MAX, None)
                .await
                .map_err(|error| {
                    FleetError::new(ErrorKind::LoadFailed.as_str(), format!("{name}: {error:#}"))
                })?
                .expect("a first load always loads");
        let module = Arc::new(module);
        loaded.insert(name, module.clone());
        Ok(module)
    }
}

/// One request's calls, run here.
#[derive(Clone)]
struct LocalCalls {
    fleet: Arc<LocalFleet>,
    deadline: Instant,
    depth: u32,
}

impl LocalCalls {
    async fn call_one(self, name: String, input: Vec<u8>) -> Outcome {
        let depth = self.fleet.bounds.depth_of_call(self.depth, &name)?;
        let module = self.fleet.module(&name).await?;
        let own = Instant::now() + module.module.limits().time;
        let calling = self.fleet.calling(&module, self.deadline.min(own), depth);
        module
            .module
            .call_with(&input, Some(self.deadline), Some(calling))
            .await
            .map_err(|error| {
                FleetError::new(ErrorKind::from(&error).as_str(), format!("{name}: {error}"))
            })
    }
}

impl Fleet for LocalCalls {
    fn max_calls(&self) -> usize {
        self.fleet.bounds.max_calls
    }

    fn call_all(
        &self,
        calls: Vec<(String, Vec<u8>)>,
        _memory: (u64, u64),
    ) -> Pin<Box<dyn Future<Output = Vec<Outcome>> + Send + '_>> {
        // Each call is a task of its own: polled inside the caller's poll,
        // it would compute on the caller's permit to run wasm and wait for
        // one of its own, which a chain deeper than the permits never gets.
        let tasks: Vec<_> = calls
            .into_iter()
            .map(|(name, input)| tokio::spawn(self.clone().call_one(name, input)))
            .collect();
        Box::pin(async move {
            join_all(tasks)
                .await
                .into_iter()
                .map(|joined| {
                    joined.unwrap_or_else(|error| {
                        Err(FleetError::new(
                            ErrorKind::Internal.as_str(),
                            format!("the call failed: {error}"),
                        ))
                    })
                })
                .collect()
        })
    }
}
