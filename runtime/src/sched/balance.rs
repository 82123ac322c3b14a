//! The balancer and the liveness rule (the down-node checker's), as pure
//! functions.
//!
//! The balancer evens a task's queued (assigned, not yet running) subtasks
//! over its eligible nodes and takes every subtask off nodes the task may no
//! longer use. Running subtasks stay where they are unless their node is
//! gone (then the node manager requeues them) — moving a running subtask
//! throws its work away.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::model::NodeId;

/// A queued subtask of one task on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued<S> {
    pub subtask: S,
    pub node: NodeId,
}

/// One balancing move: `subtask` leaves `from` for `to`, or goes back to the
/// unassigned pool when `to` is `None` (no eligible node has room).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move<S> {
    pub subtask: S,
    pub from: NodeId,
    pub to: Option<NodeId>,
}

/// Moves for one task: off ineligible nodes first, then from the node with
/// the most queued subtasks to the one with the fewest until they differ by
/// at most one. Deterministic (ties go to the lowest node id).
pub fn balance<S: Copy>(queued: &[Queued<S>], eligible: &[NodeId]) -> Vec<Move<S>> {
    if already_even(queued, eligible) {
        return Vec::new();
    }
    plan_moves(queued, eligible)
}

/// [`balance`] without its shortcut.
fn plan_moves<S: Copy>(queued: &[Queued<S>], eligible: &[NodeId]) -> Vec<Move<S>> {
    let allowed: BTreeSet<NodeId> = eligible.iter().copied().collect();
    let mut per_node: BTreeMap<NodeId, Vec<S>> =
        eligible.iter().map(|n| (*n, Vec::new())).collect();
    let mut moves = Vec::new();
    let mut homeless = Vec::new();
    for q in queued {
        if allowed.contains(&q.node) {
            per_node.entry(q.node).or_default().push(q.subtask);
        } else {
            homeless.push(*q);
        }
    }
    for q in homeless {
        let to = per_node
            .iter()
            .min_by_key(|(n, list)| (list.len(), **n))
            .map(|(n, _)| *n);
        if let Some(to) = to {
            per_node.get_mut(&to).expect("known node").push(q.subtask);
        }
        moves.push(Move {
            subtask: q.subtask,
            from: q.node,
            to,
        });
    }
    // Move one subtask at a time from the fullest node to the emptiest
    // until they differ by at most one.
    while let Some((max_node, min_node)) = fullest_and_emptiest(&per_node) {
        let subtask = per_node
            .get_mut(&max_node)
            .expect("known node")
            .pop()
            .expect("non-empty");
        per_node
            .get_mut(&min_node)
            .expect("known node")
            .push(subtask);
        moves.push(Move {
            subtask,
            from: max_node,
            to: Some(min_node),
        });
    }
    moves
}

/// Whether every queued subtask is on an eligible node and no two nodes
/// differ by more than one: the common case, told without building the
/// per-node lists (a round asks it of every task).
fn already_even<S>(queued: &[Queued<S>], eligible: &[NodeId]) -> bool {
    let mut counts: Vec<(NodeId, usize)> = Vec::with_capacity(queued.len());
    for q in queued {
        if !eligible.contains(&q.node) {
            return false;
        }
        match counts.iter_mut().find(|(n, _)| *n == q.node) {
            Some((_, c)) => *c += 1,
            None => counts.push((q.node, 1)),
        }
    }
    let max = counts.iter().map(|(_, c)| *c).max().unwrap_or(0);
    // A node without queued subtasks holds none (at most this counts a
    // repeated eligible node as one more empty node: then the full check
    // runs).
    let min = if counts.len() < eligible.len() {
        0
    } else {
        counts.iter().map(|(_, c)| *c).min().unwrap_or(0)
    };
    max <= min + 1
}

/// The fullest and the emptiest node when they differ by more than one.
fn fullest_and_emptiest<S>(per_node: &BTreeMap<NodeId, Vec<S>>) -> Option<(NodeId, NodeId)> {
    let lens = || per_node.iter().map(|(n, l)| (*n, l.len()));
    let (max_node, max_len) = lens().max_by_key(|(n, len)| (*len, std::cmp::Reverse(*n)))?;
    let (min_node, min_len) = lens().min_by_key(|(n, len)| (*len, *n))?;
    (max_len > min_len + 1).then_some((max_node, min_node))
}

/// A node is down when its last heartbeat is older than `timeout`.
pub fn is_down(since_last_heartbeat: Duration, timeout: Duration) -> bool {
    since_last_heartbeat > timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(subtask: u32, node: NodeId) -> Queued<u32> {
        Queued { subtask, node }
    }

    #[test]
    fn evens_queued_subtasks() {
        let queued: Vec<_> = (0..6).map(|i| q(i, 1)).collect();
        let moves = balance(&queued, &[1, 2, 3]);
        assert_eq!(moves.len(), 4);
        let mut counts = BTreeMap::from([(1, 6), (2, 0), (3, 0)]);
        for m in &moves {
            *counts.get_mut(&m.from).unwrap() -= 1;
            *counts.get_mut(&m.to.unwrap()).unwrap() += 1;
        }
        assert_eq!(counts, BTreeMap::from([(1, 2), (2, 2), (3, 2)]));
        // Already even: nothing moves.
        let even = [q(0, 1), q(1, 2), q(2, 3), q(3, 1)];
        assert!(balance(&even, &[1, 2, 3]).is_empty());
    }

    #[test]
    fn moves_everything_off_disallowed_nodes() {
        let queued = [q(0, 9), q(1, 9), q(2, 1)];
        let moves = balance(&queued, &[1, 2]);
        assert!(moves.iter().all(|m| m.to != Some(9)));
        assert!(moves.iter().any(|m| m.subtask == 0 && m.from == 9));
        assert!(moves.iter().any(|m| m.subtask == 1 && m.from == 9));
        assert_eq!(moves.len(), 2, "{moves:?}");
        // No eligible node at all: everything back to the unassigned pool.
        let moves = balance(&queued, &[]);
        assert_eq!(moves.len(), 3);
        assert!(moves.iter().all(|m| m.to.is_none()));
    }

    #[test]
    fn the_even_shortcut_agrees_with_the_full_balance() {
        // Every placement of up to 5 subtasks on nodes 1..=4 (4 is not
        // eligible), with eligible sets with and without a repeated node.
        for eligible in [vec![1, 2, 3], vec![1, 2, 2], vec![1], vec![]] {
            for code in 0..4usize.pow(5) {
                for len in 0..=5 {
                    let queued: Vec<_> = (0..len)
                        .map(|i| q(i as u32, 1 + (code / 4usize.pow(i as u32) % 4) as u64))
                        .collect();
                    let even = already_even(&queued, &eligible);
                    let none = plan_moves(&queued, &eligible).is_empty();
                    assert!(!even || none, "{queued:?} {eligible:?}");
                    // Without a repeated node it is exactly the full answer.
                    if eligible != [1, 2, 2] {
                        assert_eq!(even, none, "{queued:?} {eligible:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn liveness() {
        assert!(!is_down(Duration::from_secs(2), Duration::from_secs(5)));
        assert!(is_down(Duration::from_secs(6), Duration::from_secs(5)));
    }
}
