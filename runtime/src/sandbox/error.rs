//! Every way a sandboxed call can fail, classified into the kinds a user can
//! act on (see `docs/guest-abi.md`, "Limits and failures").

use std::fmt;

use serde::{Deserialize, Serialize};

/// The class of a sandbox failure. The names (`snake_case`) are part of the
/// user-facing contract: they appear in `-o json` output and in task errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not wasm, fails validation, missing or mistyped exports, unknown imports.
    InvalidModule,
    /// Wrong ABI version, or the guest broke the ABI at run time.
    Abi,
    /// The call used up its fuel.
    FuelExhausted,
    /// The call trapped after a memory growth was refused.
    MemoryLimit,
    /// The wasm stack was exhausted.
    StackOverflow,
    /// Any other trap, including a guest panic.
    Trap,
    /// The guest returned an error of its own.
    GuestError,
    /// The wall-clock deadline passed.
    Deadline,
}

impl ErrorKind {
    /// The `snake_case` name used in JSON and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidModule => "invalid_module",
            ErrorKind::Abi => "abi",
            ErrorKind::FuelExhausted => "fuel_exhausted",
            ErrorKind::MemoryLimit => "memory_limit",
            ErrorKind::StackOverflow => "stack_overflow",
            ErrorKind::Trap => "trap",
            ErrorKind::GuestError => "guest_error",
            ErrorKind::Deadline => "deadline",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified sandbox failure: its kind, a message for people, and whether
/// running the same call again may succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{kind}: {message}")]
pub struct SandboxError {
    pub kind: ErrorKind,
    pub message: String,
    /// Only guest errors that say so, and deadlines, are retryable: every
    /// other failure would fail the same way again.
    pub retryable: bool,
}

impl SandboxError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let retryable = kind == ErrorKind::Deadline;
        SandboxError {
            kind,
            message: message.into(),
            retryable,
        }
    }

    pub fn invalid_module(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidModule, message)
    }

    pub fn abi(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Abi, message)
    }

    pub fn guest(message: impl Into<String>, retryable: bool) -> Self {
        SandboxError {
            kind: ErrorKind::GuestError,
            message: message.into(),
            retryable,
        }
    }
}

/// A host function's way to end the call with an ABI violation: returned as
/// a wasmtime error from inside a host function, it unwinds the guest and is
/// classified as [`ErrorKind::Abi`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct AbiViolation(pub String);

/// What the host saw while the call ran, needed to classify a trap.
pub(crate) struct TrapContext<'a> {
    /// A memory or table growth was refused by the store limiter.
    pub memory_refused: bool,
    /// The call's captured log, searched for a guest panic message.
    pub log: &'a str,
}

/// Turns a wasmtime error from instantiation or a call into a classified
/// error, with the wasm backtrace and, for panics, the guest's message.
pub(crate) fn classify(err: wasmtime::Error, cx: &TrapContext<'_>) -> SandboxError {
    if let Some(v) = err.downcast_ref::<AbiViolation>() {
        return SandboxError::abi(v.0.clone());
    }
    if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return SandboxError::new(
            ErrorKind::Trap,
            format!("guest called proc_exit({}) instead of returning", exit.0),
        );
    }
    let backtrace = err
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|bt| format!("\nwasm backtrace:\n{bt}"))
        .unwrap_or_default();
    let Some(trap) = err.downcast_ref::<wasmtime::Trap>().copied() else {
        // Not a trap: a host function failed, or linking failed.
        return SandboxError::new(ErrorKind::Trap, format!("{err:#}{backtrace}"));
    };
    let (kind, what) = match trap {
        wasmtime::Trap::OutOfFuel => (ErrorKind::FuelExhausted, "the call ran out of fuel".into()),
        wasmtime::Trap::StackOverflow => (ErrorKind::StackOverflow, "wasm stack exhausted".into()),
        _ if cx.memory_refused => (
            ErrorKind::MemoryLimit,
            format!("memory limit reached, then the guest trapped ({trap})"),
        ),
        _ => match panic_message(cx.log) {
            Some(panic) => (ErrorKind::Trap, format!("guest {panic}")),
            None => (ErrorKind::Trap, trap.to_string()),
        },
    };
    SandboxError::new(kind, format!("{what}{backtrace}"))
}

/// The last panic message in a guest log: from the SDK's panic hook or from
/// Rust's default hook on stderr (`thread '...' panicked at file:line:\nmsg`).
fn panic_message(log: &str) -> Option<String> {
    let start = log.rfind("panicked at")?;
    let text = log[start..].trim_end();
    // The default hook puts the location on the first line and the message on
    // the next ones; keep both, but no more than a few lines.
    let lines: Vec<&str> = text
        .lines()
        .take(4)
        .filter(|l| !l.starts_with("note:"))
        .collect();
    Some(lines.join(" ").trim_end_matches(':').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_message_from_default_hook() {
        let log = "hello\nthread '<unnamed>' panicked at src/lib.rs:10:5:\nboom\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            panic_message(log).as_deref(),
            Some("panicked at src/lib.rs:10:5: boom")
        );
        assert_eq!(panic_message("no panic here"), None);
    }

    #[test]
    fn kinds_have_stable_names() {
        let json = serde_json::to_string(&ErrorKind::FuelExhausted).unwrap();
        assert_eq!(json, "\"fuel_exhausted\"");
        assert_eq!(ErrorKind::InvalidModule.to_string(), "invalid_module");
        assert!(SandboxError::new(ErrorKind::Deadline, "x").retryable);
        assert!(!SandboxError::new(ErrorKind::Trap, "x").retryable);
    }
}
