//! The tenant's blob store: large inputs, intermediate data, results.
//!
//! Keys are `/`-separated paths relative to the tenant (`tasks/t1/run-0`);
//! empty segments, `.`, `..`, a leading `/`, backslashes and control
//! characters are refused with [`BlobErrorKind::Denied`]. Keep a task's
//! intermediate data under [`task_key`], which the framework deletes when the
//! task is reverted.

use std::fmt;

use crate::sys;

/// How large a first read buffer [`get`] offers the host; larger blobs take
/// a second (free) call with a buffer of the exact size.
const FIRST_READ: usize = 16 * 1024;

/// Why a blob operation failed; the ABI's negative return codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlobErrorKind {
    /// No blob with that key (only from calls other than [`get`], which
    /// answers `None` instead).
    NotFound,
    /// The key is not allowed.
    Denied,
    /// The store failed; retrying the subtask may help.
    Io,
    /// The value exceeds a limit of the host, or does not fit in the guest's
    /// memory.
    TooLarge,
    /// A code this SDK does not know.
    Unknown(i64),
}

impl BlobErrorKind {
    fn from_code(code: i64) -> Self {
        match code {
            sys::NOT_FOUND => Self::NotFound,
            sys::DENIED => Self::Denied,
            sys::IO => Self::Io,
            sys::TOO_LARGE => Self::TooLarge,
            other => Self::Unknown(other),
        }
    }
}

impl fmt::Display for BlobErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => f.write_str("not found"),
            Self::Denied => f.write_str("key denied"),
            Self::Io => f.write_str("blob store i/o error"),
            Self::TooLarge => f.write_str("too large"),
            Self::Unknown(code) => write!(f, "unknown error code {code}"),
        }
    }
}

/// A failed blob operation, naming the operation and the key.
///
/// Converts into a retryable [`crate::Error`] for [`BlobErrorKind::Io`] and a
/// fatal one otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobError {
    kind: BlobErrorKind,
    op: &'static str,
    key: String,
}

impl BlobError {
    pub(crate) fn new(kind: BlobErrorKind, op: &'static str, key: &str) -> Self {
        Self {
            kind,
            op,
            key: key.to_owned(),
        }
    }

    /// Why it failed.
    pub fn kind(&self) -> BlobErrorKind {
        self.kind
    }

    /// The key of the failed operation.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for BlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blob {} {:?}: {}", self.op, self.key, self.kind)
    }
}

impl std::error::Error for BlobError {}

/// `Ok(())` for 0, the error of a negative code otherwise.
fn check(code: i64, op: &'static str, key: &str) -> Result<(), BlobError> {
    if code >= 0 {
        Ok(())
    } else {
        Err(BlobError::new(BlobErrorKind::from_code(code), op, key))
    }
}

/// Reads a blob; `None` when there is no blob with that key.
///
/// # Errors
/// [`BlobErrorKind::Denied`] for a bad key, [`BlobErrorKind::Io`] when the
/// store failed, [`BlobErrorKind::TooLarge`] when the value does not fit in
/// the guest's memory.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, BlobError> {
    let too_large = || BlobError::new(BlobErrorKind::TooLarge, "get", key);
    let mut buf: Vec<u8> = Vec::new();
    buf.try_reserve_exact(FIRST_READ).map_err(|_| too_large())?;
    // The host answers the size; a buffer that is too small costs one more
    // call. More than two rounds means the value changed under us.
    for _ in 0..3 {
        let size = sys::blob_get(key, buf.spare_capacity_mut());
        if size == sys::NOT_FOUND {
            return Ok(None);
        }
        check(size, "get", key)?;
        let size = usize::try_from(size).map_err(|_| too_large())?;
        if size <= buf.capacity() {
            // SAFETY: `buf` is empty, so its spare capacity starts at index
            // 0, and the host (or the native stand-in) initialised its first
            // `size` bytes because `size` fits in that capacity.
            unsafe { buf.set_len(size) };
            return Ok(Some(buf));
        }
        buf.try_reserve_exact(size).map_err(|_| too_large())?;
    }
    Err(BlobError::new(BlobErrorKind::Io, "get", key))
}

/// The size of a blob in bytes, without copying it into the guest; `None`
/// when there is no blob with that key.
///
/// # Errors
/// As [`get`].
pub fn size(key: &str) -> Result<Option<u64>, BlobError> {
    let size = sys::blob_get(key, &mut []);
    if size == sys::NOT_FOUND {
        return Ok(None);
    }
    check(size, "size", key)?;
    Ok(Some(size.unsigned_abs()))
}

/// Stores a blob, replacing one that exists.
///
/// # Errors
/// [`BlobErrorKind::Denied`] for a bad key, [`BlobErrorKind::Io`] when the
/// store failed, [`BlobErrorKind::TooLarge`] over the host's blob size limit.
pub fn put(key: &str, data: &[u8]) -> Result<(), BlobError> {
    check(sys::blob_put(key, data), "put", key)
}

/// Deletes a blob; deleting one that does not exist succeeds.
///
/// # Errors
/// [`BlobErrorKind::Denied`] for a bad key, [`BlobErrorKind::Io`] when the
/// store failed.
pub fn delete(key: &str) -> Result<(), BlobError> {
    check(sys::blob_delete(key), "delete", key)
}

/// The key of a task's intermediate blob `name`: `tasks/<task_id>/<name>`.
/// The framework deletes everything under `tasks/<task_id>/` when the task
/// is reverted.
pub fn task_key(task_id: &str, name: &str) -> String {
    format!("tasks/{task_id}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_small_and_large() {
        crate::testing::reset();
        assert_eq!(get("a/b").unwrap(), None);
        assert_eq!(size("a/b").unwrap(), None);
        put("a/b", b"hello").unwrap();
        assert_eq!(get("a/b").unwrap().as_deref(), Some(&b"hello"[..]));
        let big = vec![7u8; FIRST_READ * 3 + 1];
        put("a/big", &big).unwrap();
        assert_eq!(get("a/big").unwrap(), Some(big.clone()));
        assert_eq!(size("a/big").unwrap(), Some(big.len() as u64));
        put("a/empty", b"").unwrap();
        assert_eq!(get("a/empty").unwrap(), Some(Vec::new()));
        delete("a/b").unwrap();
        delete("a/b").unwrap();
        assert_eq!(get("a/b").unwrap(), None);
    }

    #[test]
    fn bad_keys_are_denied() {
        for key in ["../x", "/abs", "a//b", ""] {
            assert_eq!(put(key, b"x").unwrap_err().kind(), BlobErrorKind::Denied);
            assert_eq!(get(key).unwrap_err().kind(), BlobErrorKind::Denied);
            assert_eq!(delete(key).unwrap_err().kind(), BlobErrorKind::Denied);
        }
        let error = get("../x").unwrap_err();
        assert_eq!(error.to_string(), "blob get \"../x\": key denied");
        assert!(!crate::Error::from(error).is_retryable());
    }
}
