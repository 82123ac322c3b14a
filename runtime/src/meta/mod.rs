//! Replicated metadata: an embedded Raft group (raft-rs) whose log, hard
//! state and state machine live in one redb file per scheduler node.
//!
//! # Layout
//! - [`config`]: Raft tunables ([`MetaConfig`]).
//! - [`error`]: the subsystem's error type, [`MetaError`].
//! - [`storage`]: raft-rs `Storage` on redb, plus the applied state.
//! - [`state_machine`]: typed commands applied to tables; snapshots; digest.
//! - [`records`]: the task framework's tables, keys and rejections;
//!   `nodes`, `modules`, `tasks`, `subtasks`: its commands; [`queries`]:
//!   its reads; [`stats`]: fuel per tenant and the counts metrics read.
//! - [`rules`]: the placement rule set in force (`SetRules`).
//! - `node`: the Ready loop on its own thread.
//! - [`handle`]: [`MetaNode`], the process-wide handle: propose, read,
//!   membership, leadership watch.
//! - [`transport`]: what the loop needs from the network ([`Transport`]).

pub mod config;
pub mod error;
pub mod handle;
mod logger;
mod modules;
pub(crate) mod node;
mod nodes;
pub mod queries;
pub mod records;
pub mod rules;
pub mod state_machine;
pub mod stats;
pub mod storage;
mod subtasks;
mod tasks;
mod tenants;
pub mod transport;
pub mod tx;

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod model_replica_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tenants_tests;

pub use config::MetaConfig;
pub use error::MetaError;
pub use handle::{Consistency, Forwarder, MetaNode, RequestId};
pub use storage::RedbStorage;
pub use transport::{Reporter, Transport};

/// Milliseconds since the Unix epoch by this process's clock: the time a
/// command carries (commands never read the clock while applying).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Who leads the Raft group, as this node sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// The current leader, if known.
    pub leader_id: Option<u64>,
    /// The term of that knowledge.
    pub term: u64,
    /// Whether this node is the leader (the owner).
    pub is_leader: bool,
}

/// One member as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberStatus {
    pub id: u64,
    pub addr: String,
    pub learner: bool,
    /// Highest log index known replicated on the member (leader only).
    pub matched: u64,
}

/// A node's view of the group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    pub id: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    /// `leader`, `follower`, `candidate` or `precandidate`.
    pub role: String,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub members: Vec<MemberStatus>,
}
