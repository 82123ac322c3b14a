//! The raw host calls of `docs/guest-abi.md`, behind safe functions.
//!
//! On `wasm32` these are the imports of module `stoker`; everywhere else an
//! in-memory stand-in with the same behaviour, so task types can be unit
//! tested natively with `cargo test`.

/// `NOT_FOUND`: no blob with that key.
pub(crate) const NOT_FOUND: i64 = -1;
/// `DENIED`: the key is not allowed.
pub(crate) const DENIED: i64 = -2;
/// `IO`: the blob store failed; retrying may help.
pub(crate) const IO: i64 = -3;
/// `TOO_LARGE`: the value exceeds a limit.
pub(crate) const TOO_LARGE: i64 = -4;

#[cfg(target_arch = "wasm32")]
mod wasm;
#[cfg(target_arch = "wasm32")]
pub(crate) use wasm::*;

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod native;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::*;
