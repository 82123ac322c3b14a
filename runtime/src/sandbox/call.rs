//! One call into a guest: a fresh instance, the request written into its
//! memory, the entry point run under fuel, memory and deadline limits, the
//! response read back (see `docs/guest-abi.md`, "Calling convention").

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Engine, Instance, Store};
use wasmtime_wasi::WasiCtxBuilder;

use super::config::{CallLimits, SandboxConfig};
use super::error::{classify, ErrorKind, SandboxError, TrapContext};
use super::host::HostState;
use super::log::LogBuffer;
use super::module::TaskModule;
use crate::blob::TenantBlobs;
use crate::resource::{FuelGate, Governed};

/// What a call may use and reach.
#[derive(Debug, Clone, Default)]
pub struct CallEnv {
    pub limits: CallLimits,
    /// The tenant's blobs; `None` denies every blob import.
    pub blobs: Option<TenantBlobs>,
    /// Where the call takes every fuel quantum from (the node's fuel
    /// governor); `None` runs it ungoverned.
    pub gate: Option<Arc<dyn FuelGate>>,
}

/// The outcome of one call and what the host observed while it ran.
#[derive(Debug)]
pub struct CallReport<T> {
    pub result: Result<T, SandboxError>,
    pub fuel_used: u64,
    /// The guest's stdout, stderr and `log` lines (bounded).
    pub log: String,
    /// The latest `progress(done, total)` the guest reported.
    pub progress: Option<(i64, i64)>,
    /// The latest checkpoint the guest saved.
    pub checkpoint: Option<Vec<u8>>,
    pub elapsed: Duration,
}

impl<T> CallReport<T> {
    /// The same report with its successful value transformed.
    pub fn and_then<U>(self, f: impl FnOnce(T) -> Result<U, SandboxError>) -> CallReport<U> {
        CallReport {
            result: self.result.and_then(f),
            fuel_used: self.fuel_used,
            log: self.log,
            progress: self.progress,
            checkpoint: self.checkpoint,
            elapsed: self.elapsed,
        }
    }
}

pub(crate) async fn invoke(
    engine: &Engine,
    config: &SandboxConfig,
    module: &TaskModule,
    env: &CallEnv,
    entry: &str,
    request: &[u8],
) -> CallReport<Vec<u8>> {
    let started = Instant::now();
    let limits = &env.limits;
    let log = LogBuffer::new(limits.log_bytes);
    let wasi = WasiCtxBuilder::new()
        .stdout(log.clone())
        .stderr(log.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build_p1();
    let state = HostState::new(wasi, log.clone(), env.blobs.clone(), limits.clone());
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    let setup = if config.consume_fuel {
        store
            .set_fuel(limits.fuel)
            .and_then(|()| store.fuel_async_yield_interval(Some(config.fuel_yield_interval)))
    } else {
        Ok(())
    };
    let result = match setup {
        Err(e) => Err(SandboxError::new(
            ErrorKind::Trap,
            format!("cannot set up the store: {e:#}"),
        )),
        Ok(()) => {
            // The deadline stops while the governor makes the call wait.
            let governed = Governed::new(
                call(&mut store, module, entry, request),
                env.gate.clone(),
                config.fuel_yield_interval,
                Some(limits.deadline),
            );
            match governed.await {
                Ok(Ok(bytes)) => Ok(bytes),
                Ok(Err(CallError::Wasm(e))) => {
                    let contents = log.contents();
                    let cx = TrapContext {
                        memory_refused: store.data().limiter.refused,
                        log: &contents,
                    };
                    Err(classify(e, &cx))
                }
                Ok(Err(CallError::Classified(e))) => Err(e),
                Err(_) => Err(SandboxError::new(
                    ErrorKind::Deadline,
                    format!("the call did not finish within {:?}", limits.deadline),
                )),
            }
        }
    };
    let fuel_used = match store.get_fuel() {
        Ok(left) => limits.fuel.saturating_sub(left),
        Err(_) => 0, // metering is off
    };
    let state = store.into_data();
    CallReport {
        result,
        fuel_used,
        log: log.contents(),
        progress: state.progress,
        checkpoint: state.checkpoint,
        elapsed: started.elapsed(),
    }
}

enum CallError {
    /// A wasmtime error still to be classified with what the store saw.
    Wasm(wasmtime::Error),
    Classified(SandboxError),
}

impl From<wasmtime::Error> for CallError {
    fn from(e: wasmtime::Error) -> Self {
        CallError::Wasm(e)
    }
}

async fn call(
    store: &mut Store<HostState>,
    module: &TaskModule,
    entry: &str,
    request: &[u8],
) -> Result<Vec<u8>, CallError> {
    let instance = module.pre.instantiate_async(&mut *store).await?;
    if module.exports.initialize {
        let init = instance.get_typed_func::<(), ()>(&mut *store, "_initialize")?;
        init.call_async(&mut *store, ()).await?;
    }
    let ptr = write_request(store, &instance, request).await?;
    let func = instance.get_typed_func::<(i32, i32), i64>(&mut *store, entry)?;
    let packed = func
        .call_async(&mut *store, (ptr as i32, request.len() as i32))
        .await?;
    read_response(store, &instance, packed)
}

async fn write_request(
    store: &mut Store<HostState>,
    instance: &Instance,
    request: &[u8],
) -> Result<u32, CallError> {
    let len = u32::try_from(request.len())
        .map_err(|_| CallError::Classified(SandboxError::abi("request larger than 4 GiB")))?;
    let alloc = instance.get_typed_func::<i32, i32>(&mut *store, "stoker_alloc")?;
    let ptr = alloc.call_async(&mut *store, len as i32).await? as u32;
    if request.is_empty() {
        return Ok(ptr);
    }
    if ptr == 0 {
        return Err(CallError::Classified(SandboxError::abi(format!(
            "stoker_alloc({len}) returned 0 (out of memory)"
        ))));
    }
    let memory = guest_memory(store, instance)?;
    memory
        .write(&mut *store, ptr as usize, request)
        .map_err(|_| {
            CallError::Classified(SandboxError::abi(format!(
                "stoker_alloc({len}) returned {ptr}, outside guest memory"
            )))
        })?;
    Ok(ptr)
}

fn read_response(
    store: &mut Store<HostState>,
    instance: &Instance,
    packed: i64,
) -> Result<Vec<u8>, CallError> {
    let packed = packed as u64;
    let (ptr, len) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
    if len == 0 {
        return Ok(Vec::new());
    }
    let max = store.data().limits.max_output_bytes;
    if len > max {
        return Err(CallError::Classified(SandboxError::abi(format!(
            "response of {len} bytes exceeds the limit of {max} bytes"
        ))));
    }
    let memory = guest_memory(store, instance)?;
    memory
        .data(&*store)
        .get(ptr..ptr + len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            CallError::Classified(SandboxError::abi(format!(
                "response range {ptr}+{len} is outside guest memory"
            )))
        })
}

fn guest_memory(
    store: &mut Store<HostState>,
    instance: &Instance,
) -> Result<wasmtime::Memory, CallError> {
    instance
        .get_memory(&mut *store, "memory")
        .ok_or_else(|| CallError::Classified(SandboxError::abi("module does not export `memory`")))
}
