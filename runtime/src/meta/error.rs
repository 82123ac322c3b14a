//! The metadata subsystem's error type.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the replicated metadata layer.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The metadata database could not be opened (missing permissions, a
    /// corrupt or truncated file, another process holding it).
    #[error("cannot open metadata database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    /// A record inside the metadata database cannot be decoded.
    #[error("corrupt metadata database {path}: {what}")]
    Corrupt { path: PathBuf, what: String },
    /// A read or write of the metadata database failed.
    #[error("metadata storage error in {path}: {source}")]
    Storage {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    /// Raft refused an operation.
    #[error("raft error: {0}")]
    Raft(#[from] raft::Error),
    /// A log entry or snapshot was written by a newer version of stoker.
    #[error(
        "unsupported {what} version {version} (this build understands versions up to {supported})"
    )]
    UnsupportedVersion {
        what: &'static str,
        version: u32,
        supported: u32,
    },
    /// A replicated payload (entry, snapshot, message) cannot be decoded.
    #[error("cannot decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    /// This node is not the leader; `leader` is the current leader if known.
    #[error("not leader (leader {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// Raft dropped the proposal (no leader, or a leader transfer is running).
    #[error("proposal dropped")]
    ProposalDropped,
    /// Leadership changed while the proposal was in flight; its outcome is
    /// unknown.
    #[error("leader changed while the request was in flight")]
    LeaderChanged,
    /// A request was retried until its deadline without success.
    #[error("{op} did not complete within {timeout:?} after {attempts} attempts: {last}")]
    Timeout {
        op: &'static str,
        timeout: Duration,
        attempts: u32,
        last: String,
    },
    /// The request is invalid (bad argument, unknown node, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Forwarding to the leader failed.
    #[error("forwarding to leader {leader} failed: {reason}")]
    Forward {
        leader: u64,
        reason: String,
        /// Whether trying again (possibly elsewhere) may succeed.
        retriable: bool,
    },
    /// The node's Raft loop is not running (shut down or failed).
    #[error("metadata node stopped")]
    Stopped,
    /// A listening socket or data directory could not be set up.
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Invalid configuration.
    #[error("invalid metadata config: {0}")]
    Config(String),
}

impl MetaError {
    /// Whether the same request may succeed if tried again a bit later
    /// (possibly on another node). Used by the bounded retry loops.
    pub fn is_retriable(&self) -> bool {
        match self {
            MetaError::NotLeader { .. } | MetaError::ProposalDropped | MetaError::LeaderChanged => {
                true
            }
            MetaError::Forward { retriable, .. } => *retriable,
            _ => false,
        }
    }
}

/// Converts any redb error into [`MetaError::Storage`] naming the file.
pub(crate) fn storage_err(path: &std::path::Path, e: impl Into<redb::Error>) -> MetaError {
    MetaError::Storage {
        path: path.to_path_buf(),
        source: e.into(),
    }
}
