//! The error a task type returns: a message and whether retrying may help.

use std::fmt;

/// A failure of `plan`, `run`, `finish` or `revert`, reported to the host as
/// a `GuestError`.
///
/// A *retryable* error makes the framework run the same subtask again (with
/// back-off, up to the task's attempt limit); a *fatal* one fails the task at
/// once. Conversions from ordinary error types (`?` on an I/O, UTF-8 or parse
/// error) give fatal errors: bad input does not get better by retrying.
/// Blob store I/O errors are the exception and convert to retryable ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
    retryable: bool,
}

impl Error {
    /// An error that retrying cannot fix (bad input, a bug).
    ///
    /// Takes anything printable, so `.map_err(Error::fatal)` works on any
    /// error type.
    pub fn fatal(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: false,
        }
    }

    /// An error that may go away when the subtask runs again (a flaky
    /// dependency, a busy store).
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: true,
        }
    }

    /// The message shown to the user.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the framework may retry the call.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Prefixes the message with what was being done: `"{context}: {message}"`.
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Conversions that make `?` work on common error types; all give fatal
/// errors.
macro_rules! fatal_from {
    ($($ty:ty),* $(,)?) => {
        $(
            impl From<$ty> for Error {
                fn from(error: $ty) -> Self {
                    Error::fatal(error)
                }
            }
        )*
    };
}

fatal_from!(
    String,
    &str,
    std::io::Error,
    std::str::Utf8Error,
    std::string::FromUtf8Error,
    std::num::ParseIntError,
    std::num::ParseFloatError,
    std::num::TryFromIntError,
    std::fmt::Error,
);

impl From<crate::blob::BlobError> for Error {
    fn from(error: crate::blob::BlobError) -> Self {
        if error.kind() == crate::blob::BlobErrorKind::Io {
            Error::retryable(error)
        } else {
            Error::fatal(error)
        }
    }
}

/// Turns any `Result` whose error prints into a `Result<T, Error>`, choosing
/// whether it is retryable: `serde_json::from_slice(input).fatal()?`.
pub trait ResultExt<T> {
    /// Maps the error to [`Error::fatal`].
    ///
    /// # Errors
    /// The original error, as a fatal [`Error`].
    fn fatal(self) -> Result<T, Error>;

    /// Maps the error to [`Error::retryable`].
    ///
    /// # Errors
    /// The original error, as a retryable [`Error`].
    fn retryable(self) -> Result<T, Error>;
}

impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn fatal(self) -> Result<T, Error> {
        self.map_err(Error::fatal)
    }

    fn retryable(self) -> Result<T, Error> {
        self.map_err(Error::retryable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_fatal_except_blob_io() {
        let parse: Error = "x".parse::<u32>().unwrap_err().into();
        assert!(!parse.is_retryable());
        let io = crate::blob::BlobError::new(crate::blob::BlobErrorKind::Io, "get", "k");
        assert!(Error::from(io).is_retryable());
        let denied = crate::blob::BlobError::new(crate::blob::BlobErrorKind::Denied, "get", "k");
        assert!(!Error::from(denied).is_retryable());
    }

    #[test]
    fn context_prefixes_the_message() {
        let error = Error::retryable("timed out").context("reading input");
        assert_eq!(error.message(), "reading input: timed out");
        assert!(error.is_retryable());
    }

    #[test]
    fn result_ext_chooses_retryability() {
        let r: Result<(), &str> = Err("boom");
        assert_eq!(r.fatal().unwrap_err(), Error::fatal("boom"));
        assert!(r.retryable().unwrap_err().is_retryable());
    }
}
