//! An in-memory host for native builds: a thread-local blob store, logs on
//! stderr, and a record of progress and checkpoints that
//! [`crate::testing`] exposes to tests.
//!
//! It enforces the host's key rules and size limits so that a task type that
//! passes its native tests does not meet `DENIED` on a real cluster.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::mem::MaybeUninit;

use super::{DENIED, NOT_FOUND, TOO_LARGE};
use crate::log::Level;
use crate::CHECKPOINT_LIMIT;

/// The longest key the host accepts, in bytes.
const KEY_LIMIT: usize = 1024;

/// What the in-memory host holds for the current thread.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) blobs: BTreeMap<String, Vec<u8>>,
    pub(crate) logs: Vec<(Level, String)>,
    pub(crate) progress: Option<(i64, i64)>,
    pub(crate) checkpoint: Option<Vec<u8>>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Runs `f` on this thread's host state.
pub(crate) fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    STATE.with(|state| f(&mut state.borrow_mut()))
}

/// The key rules of the ABI's *Blob keys* section.
pub(crate) fn key_allowed(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= KEY_LIMIT
        && !key.contains('\\')
        && !key.chars().any(char::is_control)
        && key
            .split('/')
            .all(|segment| !matches!(segment, "" | "." | ".."))
}

pub(crate) fn log(level: i32, message: &str) {
    let level = Level::from_code(level);
    eprintln!("[stoker {level}] {message}");
    with_state(|state| state.logs.push((level, message.to_owned())));
}

pub(crate) fn progress(done: i64, total: i64) {
    with_state(|state| state.progress = Some((done, total)));
}

pub(crate) fn checkpoint(data: &[u8]) -> i64 {
    if data.len() > CHECKPOINT_LIMIT {
        return TOO_LARGE;
    }
    with_state(|state| state.checkpoint = Some(data.to_vec()));
    0
}

pub(crate) fn blob_put(key: &str, data: &[u8]) -> i64 {
    if !key_allowed(key) {
        return DENIED;
    }
    with_state(|state| state.blobs.insert(key.to_owned(), data.to_vec()));
    0
}

pub(crate) fn blob_get(key: &str, buf: &mut [MaybeUninit<u8>]) -> i64 {
    if !key_allowed(key) {
        return DENIED;
    }
    with_state(|state| match state.blobs.get(key) {
        None => NOT_FOUND,
        Some(value) => {
            if value.len() <= buf.len() {
                for (slot, byte) in buf.iter_mut().zip(value) {
                    slot.write(*byte);
                }
            }
            i64::try_from(value.len()).unwrap_or(i64::MAX)
        }
    })
}

pub(crate) fn blob_delete(key: &str) -> i64 {
    if !key_allowed(key) {
        return DENIED;
    }
    with_state(|state| state.blobs.remove(key));
    0
}

#[cfg(test)]
mod tests {
    use super::key_allowed;

    #[test]
    fn keys_follow_the_abi_rules() {
        for good in ["a", "tasks/t1/chunk-0", "a/b.c/..d", "ünïcode/ok"] {
            assert!(key_allowed(good), "{good}");
        }
        let long = "x".repeat(1025);
        for bad in [
            "", "/abs", "a//b", "a/", "./a", "a/./b", "../x", "a/..", "a\\b", "a\nb", "a\0b", &long,
        ] {
            assert!(!key_allowed(bad), "{bad:?}");
        }
    }
}
