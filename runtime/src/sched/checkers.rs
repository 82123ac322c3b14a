//! The coordinator's checkers: they patrol the whole view every round (no
//! interval, no back-off, no pausing) and emit the operators that fix what
//! they find, ahead of the schedulers.
//!
//! - `down-node-checker`: a worker silent past the node timeout is marked
//!   down, and the subtasks active on a down node (or on a node that no
//!   longer works) are taken back: requeued, or failed when they run a
//!   step that is not idempotent. Its operators are idempotent commands, so
//!   finding the same node again next round only repeats what is left.
//! - `rule-checker`: queued subtasks of a pinned task that sit off its
//!   rule's nodes move onto the matching node with the most room; when none
//!   has room nothing moves (the rule waits rather than overload a node).

use std::time::Duration;

use super::balance::is_down;
use super::coordinator::CoordView;
use super::operators::{OpKind, Operator, Step, SubtaskAt, PRIORITY_DOWN, PRIORITY_RULE};
use crate::model::NodeId;

/// The owner's default node timeout, in ms (`[owner] node_timeout_ms`).
pub const DEFAULT_NODE_TIMEOUT_MS: u64 = 5000;

/// A checker of the coordinator.
pub trait Checker: Send + Sync {
    fn name(&self) -> &'static str;
    /// The kind of the operators it creates.
    fn kind(&self) -> OpKind;
    /// The operators that fix what it finds in the view.
    fn check(&mut self, view: &CoordView) -> Vec<Operator>;
}

/// A node as the down-node checker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub id: NodeId,
    /// Its record says up.
    pub up: bool,
    /// It registered as a worker.
    pub worker: bool,
    /// When it was last heard from, in ms: its last heartbeat, or when this
    /// ownership term began if later (a new owner gives every node a full
    /// timeout).
    pub heard_ms: u64,
}

/// A pending or running subtask on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Active {
    pub subtask: SubtaskAt,
    pub running: bool,
    pub idempotent: bool,
}

/// Marks silent workers down and takes back the subtasks of down nodes.
#[derive(Debug)]
pub struct DownNodeChecker {
    pub timeout: Duration,
}

impl Default for DownNodeChecker {
    fn default() -> Self {
        DownNodeChecker {
            timeout: Duration::from_millis(DEFAULT_NODE_TIMEOUT_MS),
        }
    }
}

impl Checker for DownNodeChecker {
    fn name(&self) -> &'static str {
        "down-node-checker"
    }

    fn kind(&self) -> OpKind {
        OpKind::NodeDown
    }

    fn check(&mut self, view: &CoordView) -> Vec<Operator> {
        let mut out = Vec::new();
        for n in &view.liveness {
            let silent_ms = view.now_ms.saturating_sub(n.heard_ms);
            let working = n.up && n.worker;
            let silent = working && is_down(Duration::from_millis(silent_ms), self.timeout);
            if working && !silent {
                continue;
            }
            let mut steps = Vec::new();
            if silent {
                steps.push(Step::MarkNodeDown {
                    node: n.id,
                    silent_ms,
                });
            }
            for a in view.active.get(&n.id).into_iter().flatten() {
                steps.push(Step::TakeBack {
                    subtask: a.subtask,
                    node: n.id,
                    fail: a.running && !a.idempotent,
                });
            }
            if !steps.is_empty() {
                out.push(Operator::new(
                    OpKind::NodeDown,
                    self.name(),
                    PRIORITY_DOWN,
                    steps,
                ));
            }
        }
        out
    }
}

/// Moves stray queued subtasks of pinned tasks onto their rule's nodes.
#[derive(Debug, Default)]
pub struct RuleChecker;

impl Checker for RuleChecker {
    fn name(&self) -> &'static str {
        "rule-checker"
    }

    fn kind(&self) -> OpKind {
        OpKind::MoveSubtask
    }

    fn check(&mut self, view: &CoordView) -> Vec<Operator> {
        check_rules(view)
    }
}

/// The rule checker's operators: each queued subtask of a pinned task off
/// its eligible nodes moves to the eligible node with the most free slots
/// (counting moves already planned; ties to the lowest id), if any has one.
pub fn check_rules(view: &CoordView) -> Vec<Operator> {
    let mut room = view.room();
    let mut out = Vec::new();
    let mut places = Vec::new();
    for t in view.tasks.iter().filter(|t| t.pinned_by.is_some()) {
        let mut stray = t.queued.iter().filter(|q| !t.eligible.contains(&q.node));
        let Some(first) = stray.next() else {
            continue;
        };
        // Where the task's up eligible nodes are kept, found once per task.
        places.clear();
        places.extend(t.eligible.iter().filter_map(|n| room.place(*n)));
        for q in std::iter::once(first).chain(stray) {
            let to = places
                .iter()
                .map(|i| (room.at(*i), *i))
                .filter(|((_, free), _)| *free > 0)
                .max_by_key(|((n, free), _)| (*free, std::cmp::Reverse(*n)))
                .map(|((n, _), i)| (n, i));
            if let Some((to, place)) = to {
                room.take_at(place);
                out.push(Operator::new(
                    OpKind::MoveSubtask,
                    "rule-checker",
                    PRIORITY_RULE,
                    vec![Step::MoveSubtask {
                        subtask: q.subtask,
                        from: q.node,
                        to,
                    }],
                ));
            }
        }
    }
    out
}
