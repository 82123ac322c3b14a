//! The data model every role shares: task and subtask states with their
//! legal transitions, rank, and the views of nodes and tasks the owner's
//! placement logic works on. Pure types, no I/O.
//!
//! # Layout
//! - `state`: task and subtask state machines.

mod state;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use state::{
    check_subtask_transition, check_task_transition, IllegalTransition, SubtaskChange,
    SubtaskState, TaskState,
};

pub type NodeId = u64;
pub type TaskId = u64;

/// Lowest (most urgent) and highest task priority; lower runs first.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<u32> = 1..=1024;
pub const DEFAULT_PRIORITY: u32 = 512;

/// The label that, once any node carries it, restricts task execution to
/// the nodes that do.
pub const DIST_WORKER_LABEL: (&str, &str) = ("role", "dist_worker");

/// The scope an empty target scope prefers when nodes of it exist.
pub const BACKGROUND_SCOPE: &str = "background";

/// The order tasks are scheduled in: priority, then create time, then id,
/// all ascending. Compare ranks with `<`: the smaller runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rank {
    pub priority: u32,
    /// Create time in milliseconds since the Unix epoch.
    pub create_time_ms: u64,
    pub id: TaskId,
}

/// What the owner knows of a node for placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub labels: BTreeMap<String, String>,
    pub scope: String,
    pub slots: u32,
    /// Up: heartbeating, and a worker.
    pub up: bool,
}

impl NodeView {
    pub fn has_label(&self, key: &str, value: &str) -> bool {
        self.labels.get(key).is_some_and(|v| v == value)
    }

    /// Whether every `key=value` of the selector is among the node's labels.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.has_label(k, v))
    }
}

/// What placement needs to know of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPlacement {
    pub rank: Rank,
    /// Slots the task may use on each node (its stripes).
    pub concurrency: u32,
    /// At most this many nodes run the task; 0 = no limit.
    pub max_nodes: u32,
    pub scope: String,
    pub selector: BTreeMap<String, String>,
}

/// Parses `k=v,k2=v2` (labels, selectors).
///
/// # Errors
/// A message naming the malformed pair.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not of the form key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(format!("label {pair:?} has an empty key"));
        }
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_orders_by_priority_then_time_then_id() {
        let r = |priority, create_time_ms, id| Rank {
            priority,
            create_time_ms,
            id,
        };
        let mut ranks = vec![r(512, 10, 3), r(1, 99, 9), r(512, 10, 2), r(512, 5, 7)];
        ranks.sort();
        assert_eq!(
            ranks,
            vec![r(1, 99, 9), r(512, 5, 7), r(512, 10, 2), r(512, 10, 3)]
        );
    }

    #[test]
    fn labels_parse() {
        let l = parse_labels("zone=z1, role=dist_worker").unwrap();
        assert_eq!(l.get("zone").unwrap(), "z1");
        assert_eq!(l.len(), 2);
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("zone").unwrap_err().contains("key=value"));
        assert!(parse_labels("=x").is_err());
    }
}
