//! Lines in the call's log, which the host keeps with the subtask.
//!
//! ```
//! use stoker_guest::log;
//! log::info(format_args!("counted {} words", 42));
//! log::warn("input has no trailing newline");
//! ```

use std::fmt;

use crate::sys;

/// How important a log line is; the numeric codes are the ABI's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Code 0. Also used for panic messages.
    Error = 0,
    /// Code 1.
    Warn = 1,
    /// Code 2.
    Info = 2,
    /// Code 3.
    Debug = 3,
    /// Code 4.
    Trace = 4,
}

impl Level {
    /// The level of an ABI code; unknown codes are `Info`, as on the host.
    pub fn from_code(code: i32) -> Self {
        match code {
            0 => Self::Error,
            1 => Self::Warn,
            3 => Self::Debug,
            4 => Self::Trace,
            _ => Self::Info,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        })
    }
}

/// Appends one line at `level`.
pub fn log(level: Level, message: impl fmt::Display) {
    sys::log(level as i32, &message.to_string());
}

/// Appends an error line.
pub fn error(message: impl fmt::Display) {
    log(Level::Error, message);
}

/// Appends a warning line.
pub fn warn(message: impl fmt::Display) {
    log(Level::Warn, message);
}

/// Appends an informational line.
pub fn info(message: impl fmt::Display) {
    log(Level::Info, message);
}

/// Appends a debugging line.
pub fn debug(message: impl fmt::Display) {
    log(Level::Debug, message);
}

/// Appends a tracing line.
pub fn trace(message: impl fmt::Display) {
    log(Level::Trace, message);
}
