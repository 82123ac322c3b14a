//! Tunables of the Raft node.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::MetaError;

/// Configuration of one metadata (Raft) node. Every field has a default
/// suitable for a small cluster on a LAN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetaConfig {
    /// Interval of one Raft tick, in milliseconds. Default 50.
    pub tick_ms: u64,
    /// Ticks without a leader message before a follower starts an election
    /// (randomised up to twice this). Default 10 (0.5–1 s).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats. Default 2.
    pub heartbeat_ticks: usize,
    /// Applied entries after which the log is compacted behind the state
    /// machine (whose tables are the snapshot). Default 10000.
    pub snapshot_interval: u64,
    /// Entries kept in the log behind the applied index at compaction, so
    /// slightly lagging followers catch up from the log rather than a
    /// snapshot. Default 1000.
    pub log_retain: u64,
    /// Most proposals grouped into one log entry. Default 1024.
    pub max_batch: usize,
    /// Capacity of the node's inbox (proposals, reads, Raft messages).
    /// Raft messages beyond it are dropped. Default 16384.
    pub inbox_capacity: usize,
    /// Largest size of entries in one append message, in bytes. Default 1 MiB.
    pub max_msg_bytes: u64,
    /// Most in-flight append messages per follower. Default 256.
    pub max_inflight_msgs: usize,
    /// Time a proposal or membership change may take, retries included, in
    /// milliseconds. Default 10000.
    pub request_timeout_ms: u64,
    /// Time one ReadIndex attempt may take before it is retried, in
    /// milliseconds. Default 1000.
    pub read_attempt_timeout_ms: u64,
}

impl Default for MetaConfig {
    fn default() -> Self {
        MetaConfig {
            tick_ms: 50,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval: 10_000,
            log_retain: 1_000,
            max_batch: 1024,
            inbox_capacity: 16_384,
            max_msg_bytes: 1 << 20,
            max_inflight_msgs: 256,
            request_timeout_ms: 10_000,
            read_attempt_timeout_ms: 1_000,
        }
    }
}

impl MetaConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// [`MetaError::Config`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), MetaError> {
        let bad = |msg: &str| Err(MetaError::Config(msg.to_string()));
        if self.tick_ms == 0 {
            return bad("tick_ms must be > 0");
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return bad("election_ticks must be greater than heartbeat_ticks > 0");
        }
        if self.snapshot_interval == 0 {
            return bad("snapshot_interval must be > 0");
        }
        if self.max_batch == 0 || self.inbox_capacity == 0 || self.max_inflight_msgs == 0 {
            return bad("max_batch, inbox_capacity and max_inflight_msgs must be > 0");
        }
        if self.request_timeout_ms == 0 || self.read_attempt_timeout_ms == 0 {
            return bad("request_timeout_ms and read_attempt_timeout_ms must be > 0");
        }
        Ok(())
    }

    pub(crate) fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub(crate) fn read_attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.read_attempt_timeout_ms)
    }

    /// The raft-rs configuration of node `id` that has applied `applied`.
    pub(crate) fn raft_config(&self, id: u64, applied: u64) -> raft::Config {
        raft::Config {
            id,
            election_tick: self.election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            applied,
            max_size_per_msg: self.max_msg_bytes,
            max_inflight_msgs: self.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        }
    }
}
