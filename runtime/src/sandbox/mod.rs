//! The wasm sandbox of a node: one wasmtime [`Engine`] (fuel metering,
//! pooling allocator, copy-on-write memory images, bounded stack, async calls
//! that yield every fuel quantum), the module cache, and typed calls into a
//! guest's `plan`, `run`, `finish` and `revert`.
//!
//! # Layout
//! - `config`: engine settings ([`SandboxConfig`]) and per-call limits ([`CallLimits`]).
//! - `module`: ABI validation, compilation once per hash, the on-disk code cache.
//! - `call`: one call: fresh instance, request in, response out, classified failure.
//! - `host`: the store state and the `stoker` host functions.
//! - `log`: the bounded per-call log that captures stdout, stderr and `log`.
//! - `error`: [`SandboxError`] and its [`ErrorKind`]s.

mod call;
mod config;
mod error;
mod host;
mod log;
mod module;

use std::sync::Arc;

use prost::Message;
use stoker_proto::guest::{
    FinishRequest, FinishResponse, PlanRequest, PlanResponse, RevertRequest, RevertResponse,
    RunRequest, RunResponse,
};
use wasmtime::{Engine, InstanceAllocationStrategy, Linker, PoolingAllocationConfig};

pub use call::{CallEnv, CallReport};
pub use config::{CallLimits, SandboxConfig};
pub use error::{ErrorKind, SandboxError};
pub use host::code as host_code;
pub use log::LogBuffer;
pub use module::{module_hash, TaskModule, ABI_VERSION};

use host::HostState;
use module::ModuleCache;

/// A plan as the framework uses it: validated, the guest's error split out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The previous step was the last one.
    Done,
    /// The subtasks of this step (at least one).
    Step {
        subtasks: Vec<Vec<u8>>,
        non_idempotent: bool,
    },
}

/// A node's sandbox. Cheap to share behind an `Arc`; all calls take `&self`.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<HostState>,
    cache: Arc<ModuleCache>,
    config: SandboxConfig,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("config", &self.config)
            .finish()
    }
}

/// Linear memory kept resident per freed slot when PAGEMAP_SCAN finds the
/// dirtied pages: a small guest's stack and data (pages it never touched
/// cost nothing; at most this much stays resident per warm slot).
const KEEP_RESIDENT_BYTES: usize = 2 << 20;
/// The same for tables.
const KEEP_RESIDENT_TABLE_BYTES: usize = 64 << 10;

impl Sandbox {
    /// Builds the engine and linker.
    ///
    /// # Errors
    /// An invalid config, or an engine the platform cannot provide.
    pub fn new(config: SandboxConfig) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        // Where the kernel can say which pages an instance dirtied
        // (PAGEMAP_SCAN, Linux 6.7+), a freed slot is reset by rewriting
        // just those instead of an madvise of the whole memory, which
        // costs a TLB shootdown on every core per instance. Elsewhere the
        // default reset is kept: resetting a resident window blindly would
        // rewrite all of it every time.
        match Self::build(config.clone(), true) {
            Ok(s) => Ok(s),
            Err(_) => Self::build(config, false),
        }
    }

    fn build(config: SandboxConfig, pagemap: bool) -> anyhow::Result<Self> {
        let mut pool = PoolingAllocationConfig::new();
        if pagemap {
            pool.pagemap_scan(wasmtime::Enabled::Yes)
                .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
                .table_keep_resident(KEEP_RESIDENT_TABLE_BYTES);
        }
        pool.total_core_instances(config.max_instances)
            .total_memories(config.max_instances)
            .total_tables(config.max_instances * 4)
            .total_stacks(config.max_instances)
            .max_memories_per_module(1)
            .max_tables_per_module(4)
            .max_memory_size(config.max_memory_bytes as usize)
            .table_elements(100_000)
            // Guest images are small; keep freed slots warm so the next
            // instance of the same module reuses its memory mapping.
            .max_unused_warm_slots(config.max_instances.min(64));
        let mut wasm = wasmtime::Config::new();
        wasm.consume_fuel(config.consume_fuel)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(true)
            .max_wasm_stack(config.max_wasm_stack)
            .async_stack_size(config.async_stack_size);
        let engine = Engine::new(&wasm)
            .map_err(|e| anyhow::anyhow!("cannot create the wasm engine: {e:#}"))?;
        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link host functions: {e:#}"))?;
        let cache = ModuleCache::new(&engine, config.cache_dir.clone())
            .map_err(|e| anyhow::anyhow!("cannot create the module cache directory: {e}"))?;
        Ok(Sandbox {
            engine,
            linker,
            cache: Arc::new(cache),
            config,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The module already loaded under `hash` (its sha256), if any: callers
    /// that know the hash skip reading and hashing the bytes again.
    pub fn loaded(&self, hash: &str) -> Option<Arc<TaskModule>> {
        self.cache.get(hash)
    }

    /// Validates and compiles a module, once per hash: later loads of the
    /// same bytes return the same [`TaskModule`], and a compiled copy on disk
    /// is reused across restarts.
    ///
    /// # Errors
    /// `invalid_module` or `abi`, naming what is wrong.
    pub async fn load(&self, bytes: &[u8]) -> Result<Arc<TaskModule>, SandboxError> {
        let hash = module_hash(bytes);
        if let Some(module) = self.cache.get(&hash) {
            return Ok(module);
        }
        let (engine, cache, bytes_owned, h) = (
            self.engine.clone(),
            self.cache.clone(),
            bytes.to_vec(),
            hash.clone(),
        );
        // Compiling is CPU-heavy: keep it off the async executor.
        let compiled =
            tokio::task::spawn_blocking(move || cache.compile(&engine, &h, &bytes_owned))
                .await
                .map_err(|e| {
                    SandboxError::invalid_module(format!("compilation panicked: {e}"))
                })??;
        let module = Arc::new(module::validate_and_link(&self.linker, &compiled, hash)?);
        self.cache.insert(module.clone());
        Ok(module)
    }

    async fn invoke<Req: Message, Resp: Message + Default>(
        &self,
        module: &TaskModule,
        env: &CallEnv,
        entry: &str,
        request: &Req,
    ) -> CallReport<Resp> {
        let bytes = request.encode_to_vec();
        call::invoke(&self.engine, &self.config, module, env, entry, &bytes)
            .await
            .and_then(|raw| {
                Resp::decode(raw.as_slice()).map_err(|e| {
                    SandboxError::abi(format!("{entry} returned bytes that do not decode: {e}"))
                })
            })
    }

    /// Plans one step.
    pub async fn plan(
        &self,
        module: &TaskModule,
        env: &CallEnv,
        request: &PlanRequest,
    ) -> CallReport<Plan> {
        let step = request.step;
        self.invoke::<_, PlanResponse>(module, env, "stoker_plan", request)
            .await
            .and_then(|resp| {
                if let Some(e) = resp.error {
                    return Err(SandboxError::guest(e.message, e.retryable));
                }
                match (resp.done, resp.subtasks.is_empty()) {
                    (true, _) if step == 0 => Err(SandboxError::abi(
                        "plan of step 0 answered done: a task needs at least one step",
                    )),
                    (true, true) => Ok(Plan::Done),
                    (true, false) => Err(SandboxError::abi(
                        "plan answered done together with subtasks",
                    )),
                    (false, true) => Err(SandboxError::abi(format!(
                        "plan of step {step} has no subtasks and is not done"
                    ))),
                    (false, false) => Ok(Plan::Step {
                        subtasks: resp.subtasks,
                        non_idempotent: resp.non_idempotent,
                    }),
                }
            })
    }

    /// Runs one subtask; its output on success.
    pub async fn run(
        &self,
        module: &TaskModule,
        env: &CallEnv,
        request: &RunRequest,
    ) -> CallReport<Vec<u8>> {
        self.invoke::<_, RunResponse>(module, env, "stoker_run", request)
            .await
            .and_then(|resp| match resp.error {
                Some(e) => Err(SandboxError::guest(e.message, e.retryable)),
                None => Ok(resp.output),
            })
    }

    /// Produces the task result; without a `stoker_finish` export, the
    /// outputs concatenated in order.
    pub async fn finish(
        &self,
        module: &TaskModule,
        env: &CallEnv,
        request: &FinishRequest,
    ) -> CallReport<Vec<u8>> {
        if !module.exports.finish {
            return CallReport {
                result: Ok(request.outputs.concat()),
                fuel_used: 0,
                log: String::new(),
                progress: None,
                checkpoint: None,
                elapsed: std::time::Duration::ZERO,
            };
        }
        self.invoke::<_, FinishResponse>(module, env, "stoker_finish", request)
            .await
            .and_then(|resp| match resp.error {
                Some(e) => Err(SandboxError::guest(e.message, e.retryable)),
                None => Ok(resp.result),
            })
    }

    /// Lets the guest clean up after a failed or cancelled task; `None` when
    /// the module has no `stoker_revert`.
    pub async fn revert(
        &self,
        module: &TaskModule,
        env: &CallEnv,
        request: &RevertRequest,
    ) -> Option<CallReport<()>> {
        if !module.exports.revert {
            return None;
        }
        let report = self
            .invoke::<_, RevertResponse>(module, env, "stoker_revert", request)
            .await;
        Some(report.and_then(|resp| match resp.error {
            Some(e) => Err(SandboxError::guest(e.message, e.retryable)),
            None => Ok(()),
        }))
    }
}
