//! The store's state for one call and the `stoker` host functions a guest
//! imports (see `docs/guest-abi.md`, "Imports").
//!
//! Host functions tell two kinds of failure apart: a problem the guest can
//! handle comes back as a negative code; a broken contract (a pointer outside
//! memory, a string that is not UTF-8) ends the call as an ABI violation.

use bytes::Bytes;
use wasmtime::{Caller, Extern, Linker, ResourceLimiter};
use wasmtime_wasi::p1::WasiP1Ctx;

use super::config::CallLimits;
use super::error::AbiViolation;
use super::log::LogBuffer;
use crate::blob::{BlobError, TenantBlobs};

/// Negative return codes of the `stoker` imports.
pub mod code {
    pub const NOT_FOUND: i32 = -1;
    pub const DENIED: i32 = -2;
    pub const IO: i32 = -3;
    pub const TOO_LARGE: i32 = -4;
}

/// Everything the host keeps for one call; dropped with the instance.
pub struct HostState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: Limiter,
    pub(crate) log: LogBuffer,
    pub(crate) blobs: Option<TenantBlobs>,
    pub(crate) limits: CallLimits,
    /// Latest `progress(done, total)`.
    pub(crate) progress: Option<(i64, i64)>,
    /// Latest `checkpoint(bytes)`.
    pub(crate) checkpoint: Option<Vec<u8>>,
    /// The value of the last `blob_get` that did not fit the guest's buffer,
    /// so that the second call with a larger buffer does not read it again.
    blob_cache: Option<(String, Bytes)>,
}

impl HostState {
    pub(crate) fn new(
        wasi: WasiP1Ctx,
        log: LogBuffer,
        blobs: Option<TenantBlobs>,
        limits: CallLimits,
    ) -> Self {
        HostState {
            wasi,
            limiter: Limiter {
                memory_bytes: limits.memory_bytes,
                table_elements: limits.table_elements,
                refused: false,
            },
            log,
            blobs,
            limits,
            progress: None,
            checkpoint: None,
            blob_cache: None,
        }
    }
}

/// Store limits of one call. Records whether it refused a growth, so that a
/// trap that follows is classified as `memory_limit`.
pub(crate) struct Limiter {
    memory_bytes: u64,
    table_elements: usize,
    pub(crate) refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired as u64 <= self.memory_bytes;
        self.refused |= !ok;
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.table_elements;
        self.refused |= !ok;
        Ok(ok)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// Adds WASI preview 1 and the `stoker` module to a linker.
///
/// # Errors
/// Only if a name is defined twice, which is a bug.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p1::add_to_linker_async(linker, |s: &mut HostState| &mut s.wasi)?;
    linker.func_wrap("stoker", "log", host_log)?;
    linker.func_wrap("stoker", "progress", host_progress)?;
    linker.func_wrap("stoker", "checkpoint", host_checkpoint)?;
    linker.func_wrap_async(
        "stoker",
        "blob_put",
        |caller, (kp, kl, dp, dl): (i32, i32, i32, i32)| Box::new(blob_put(caller, kp, kl, dp, dl)),
    )?;
    linker.func_wrap_async(
        "stoker",
        "blob_get",
        |caller, (kp, kl, bp, bc): (i32, i32, i32, i32)| Box::new(blob_get(caller, kp, kl, bp, bc)),
    )?;
    linker.func_wrap_async("stoker", "blob_delete", |caller, (kp, kl): (i32, i32)| {
        Box::new(blob_delete(caller, kp, kl))
    })?;
    Ok(())
}

/// The names of the `stoker` imports, for validating modules.
pub(crate) const STOKER_IMPORTS: &[&str] = &[
    "log",
    "progress",
    "checkpoint",
    "blob_put",
    "blob_get",
    "blob_delete",
];

fn violation(msg: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(AbiViolation(msg.into()))
}

fn memory(caller: &mut Caller<'_, HostState>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(violation("module does not export its memory")),
    }
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub(crate) fn read_guest(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    what: &str,
) -> wasmtime::Result<Vec<u8>> {
    let mem = memory(caller)?;
    let data = mem.data(&caller);
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    data.get(start..start.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            violation(format!(
                "{what}: range {start}+{len} is outside guest memory ({} bytes)",
                data.len()
            ))
        })
}

fn read_str(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    what: &str,
) -> wasmtime::Result<String> {
    String::from_utf8(read_guest(caller, ptr, len, what)?)
        .map_err(|_| violation(format!("{what} is not valid UTF-8")))
}

fn host_log(
    mut caller: Caller<'_, HostState>,
    level: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<()> {
    let msg = read_str(&mut caller, ptr, len, "log message")?;
    let level = match level {
        0 => "error",
        1 => "warn",
        3 => "debug",
        4 => "trace",
        _ => "info",
    };
    caller.data().log.line(level, &msg);
    Ok(())
}

fn host_progress(mut caller: Caller<'_, HostState>, done: i64, total: i64) {
    caller.data_mut().progress = Some((done, total));
}

fn host_checkpoint(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    if len as u32 as usize > caller.data().limits.checkpoint_bytes {
        return Ok(code::TOO_LARGE);
    }
    let bytes = read_guest(&mut caller, ptr, len, "checkpoint")?;
    caller.data_mut().checkpoint = Some(bytes);
    Ok(0)
}

fn blob_code(err: &BlobError) -> i32 {
    match err {
        BlobError::Denied { .. } | BlobError::BadTenant(_) => code::DENIED,
        BlobError::Store(_) | BlobError::Open { .. } => code::IO,
    }
}

async fn blob_put(
    mut caller: Caller<'_, HostState>,
    kp: i32,
    kl: i32,
    dp: i32,
    dl: i32,
) -> wasmtime::Result<i32> {
    let key = read_str(&mut caller, kp, kl, "blob key")?;
    if dl as u32 as usize > caller.data().limits.blob_bytes {
        return Ok(code::TOO_LARGE);
    }
    let data = read_guest(&mut caller, dp, dl, "blob data")?;
    let Some(blobs) = caller.data().blobs.clone() else {
        return Ok(code::DENIED);
    };
    Ok(match blobs.put(&key, Bytes::from(data)).await {
        Ok(()) => 0,
        Err(e) => {
            caller
                .data()
                .log
                .line("warn", &format!("blob_put {key:?}: {e}"));
            blob_code(&e)
        }
    })
}

async fn blob_get(
    mut caller: Caller<'_, HostState>,
    kp: i32,
    kl: i32,
    bp: i32,
    bc: i32,
) -> wasmtime::Result<i64> {
    let key = read_str(&mut caller, kp, kl, "blob key")?;
    let cached = match caller.data_mut().blob_cache.take() {
        Some((k, v)) if k == key => Some(v),
        _ => None,
    };
    let value = match cached {
        Some(v) => v,
        None => {
            let Some(blobs) = caller.data().blobs.clone() else {
                return Ok(code::DENIED.into());
            };
            match blobs.get(&key).await {
                Ok(Some(v)) => v,
                Ok(None) => return Ok(code::NOT_FOUND.into()),
                Err(e) => {
                    caller
                        .data()
                        .log
                        .line("warn", &format!("blob_get {key:?}: {e}"));
                    return Ok(blob_code(&e).into());
                }
            }
        }
    };
    if value.len() > caller.data().limits.blob_bytes {
        return Ok(code::TOO_LARGE.into());
    }
    let size = value.len() as i64;
    if value.len() > bc as u32 as usize {
        caller.data_mut().blob_cache = Some((key, value));
        return Ok(size);
    }
    let mem = memory(&mut caller)?;
    let start = bp as u32 as usize;
    mem.write(&mut caller, start, &value).map_err(|_| {
        violation(format!(
            "blob_get: buffer {start}+{bc} is outside guest memory"
        ))
    })?;
    Ok(size)
}

async fn blob_delete(mut caller: Caller<'_, HostState>, kp: i32, kl: i32) -> wasmtime::Result<i32> {
    let key = read_str(&mut caller, kp, kl, "blob key")?;
    let Some(blobs) = caller.data().blobs.clone() else {
        return Ok(code::DENIED);
    };
    Ok(match blobs.delete(&key).await {
        Ok(()) => 0,
        Err(e) => blob_code(&e),
    })
}
