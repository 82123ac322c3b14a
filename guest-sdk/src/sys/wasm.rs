//! The imports of module `stoker`, as a `wasm32` guest sees them.

use std::mem::MaybeUninit;

// The Rust names carry a `stoker_` prefix so that they can never resolve to a
// libc symbol of the same name (`log` is also libm's logarithm); `link_name`
// keeps the import names of the ABI.
#[link(wasm_import_module = "stoker")]
unsafe extern "C" {
    #[link_name = "log"]
    fn stoker_log(level: i32, ptr: *const u8, len: usize);
    #[link_name = "progress"]
    fn stoker_progress(done: i64, total: i64);
    #[link_name = "checkpoint"]
    fn stoker_checkpoint(ptr: *const u8, len: usize) -> i32;
    #[link_name = "blob_put"]
    fn stoker_blob_put(key_ptr: *const u8, key_len: usize, ptr: *const u8, len: usize) -> i32;
    #[link_name = "blob_get"]
    fn stoker_blob_get(key_ptr: *const u8, key_len: usize, buf: *mut u8, cap: usize) -> i64;
    #[link_name = "blob_delete"]
    fn stoker_blob_delete(key_ptr: *const u8, key_len: usize) -> i32;
}

pub(crate) fn log(level: i32, message: &str) {
    // SAFETY: `message` is a live, initialised UTF-8 range of our memory; the
    // host only reads it during the call.
    unsafe { stoker_log(level, message.as_ptr(), message.len()) }
}

pub(crate) fn progress(done: i64, total: i64) {
    // SAFETY: plain values, no memory is shared.
    unsafe { stoker_progress(done, total) }
}

pub(crate) fn checkpoint(data: &[u8]) -> i64 {
    // SAFETY: `data` is a live, initialised range of our memory; the host
    // only reads it during the call.
    i64::from(unsafe { stoker_checkpoint(data.as_ptr(), data.len()) })
}

pub(crate) fn blob_put(key: &str, data: &[u8]) -> i64 {
    // SAFETY: `key` and `data` are live, initialised ranges of our memory;
    // the host only reads them during the call.
    i64::from(unsafe { stoker_blob_put(key.as_ptr(), key.len(), data.as_ptr(), data.len()) })
}

/// Returns the blob's size, having written it into `buf` when it fits, or a
/// negative code.
pub(crate) fn blob_get(key: &str, buf: &mut [MaybeUninit<u8>]) -> i64 {
    // SAFETY: `key` is a live UTF-8 range the host only reads; `buf` is a
    // live, exclusively borrowed range of `buf.len()` bytes the host may
    // write during the call (writing initialises `MaybeUninit` bytes).
    unsafe { stoker_blob_get(key.as_ptr(), key.len(), buf.as_mut_ptr().cast(), buf.len()) }
}

pub(crate) fn blob_delete(key: &str) -> i64 {
    // SAFETY: `key` is a live UTF-8 range of our memory; the host only reads
    // it during the call.
    i64::from(unsafe { stoker_blob_delete(key.as_ptr(), key.len()) })
}
