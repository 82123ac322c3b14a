//! Fairness of the fuel governor: who gets the next quantum when several
//! sandboxes wait. Pure: no clock, no locks.
//!
//! Weights: tenants share equally; inside a tenant, the task at rank position
//! `p` (0 = highest rank, DESIGN.md: priority asc, create time asc, id asc)
//! weighs `1/(p+1)`, so higher-ranked tasks get more fuel and none starves.
//! Waiters are served by start-time fair queueing: a request's tag is
//! `max(virtual time, its flow's last finish)`, its flow's finish advances by
//! `fuel / weight`, and the smallest tag goes first.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

/// The weight of each task (same order as `tasks`), given its tenant and
/// rank (smaller ranks first, as [`crate::model::Rank`]). Weights are positive and sum to 1 when `tasks` is not empty.
pub fn weights<R: Ord>(tasks: &[(&str, &R)]) -> Vec<f64> {
    let mut by_tenant: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (tenant, _)) in tasks.iter().enumerate() {
        by_tenant.entry(tenant).or_default().push(i);
    }
    let share = 1.0 / by_tenant.len().max(1) as f64;
    let mut out = vec![0.0; tasks.len()];
    for members in by_tenant.values_mut() {
        members.sort_by(|&a, &b| tasks[a].1.cmp(tasks[b].1));
        let raw = |p: usize| 1.0 / (p + 1) as f64;
        let sum: f64 = (0..members.len()).map(raw).sum();
        for (p, &i) in members.iter().enumerate() {
            out[i] = share * raw(p) / sum;
        }
    }
    out
}

/// A virtual-time tag, ordered totally.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tag(f64);

impl Eq for Tag {}

impl PartialOrd for Tag {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Tag {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Where a waiter stands in the queue (to remove it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place {
    tag: Tag,
    seq: u64,
}

/// Start-time fair queue of waiters `W` in flows `K` (tasks).
#[derive(Debug)]
pub struct FairQueue<K, W> {
    virtual_time: f64,
    last_finish: HashMap<K, f64>,
    waiting: BTreeMap<Place, W>,
    seq: u64,
}

impl<K, W> Default for FairQueue<K, W> {
    fn default() -> Self {
        FairQueue {
            virtual_time: 0.0,
            last_finish: HashMap::new(),
            waiting: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, W: Clone> FairQueue<K, W> {
    /// Queues `waiter` of `flow` for `fuel` at `weight` (> 0).
    pub fn push(&mut self, flow: &K, waiter: W, fuel: u64, weight: f64) -> Place {
        let last = self.last_finish.get(flow).copied().unwrap_or(0.0);
        let start = last.max(self.virtual_time);
        let finish = start + fuel as f64 / weight.max(1e-9);
        self.last_finish.insert(flow.clone(), finish);
        self.seq += 1;
        let place = Place {
            tag: Tag(start),
            seq: self.seq,
        };
        self.waiting.insert(place, waiter);
        place
    }

    /// The waiter to serve next.
    pub fn head(&self) -> Option<(Place, &W)> {
        self.waiting.first_key_value().map(|(p, w)| (*p, w))
    }

    /// Takes `place` out of the queue; when it is served (not abandoned),
    /// virtual time moves to its tag.
    pub fn remove(&mut self, place: Place, served: bool) -> Option<W> {
        let w = self.waiting.remove(&place)?;
        if served {
            self.virtual_time = self.virtual_time.max(place.tag.0);
        }
        Some(w)
    }

    /// Forgets a flow that has no subtasks left.
    pub fn forget(&mut self, flow: &K) {
        self.last_finish.remove(flow);
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_share_equally_and_rank_orders_inside_a_tenant() {
        let (a1, a2, b1) = (0, 5, 9);
        let w = weights(&[("acme", &a2), ("beta", &b1), ("acme", &a1)]);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // beta's only task gets half; acme's half is split 2:1 by rank.
        assert!((w[1] - 0.5).abs() < 1e-12);
        assert!((w[2] - 2.0 * w[0]).abs() < 1e-12, "{w:?}");
        assert!(w[2] > w[0]);
        assert!(weights::<u32>(&[]).is_empty());
    }

    /// Always-backlogged flows with weights 2:1 are served 2:1.
    #[test]
    fn backlogged_flows_are_served_by_weight() {
        let mut q: FairQueue<&str, &str> = FairQueue::default();
        q.push(&"heavy", "heavy", 10, 2.0 / 3.0);
        q.push(&"light", "light", 10, 1.0 / 3.0);
        let mut served = HashMap::new();
        for _ in 0..300 {
            let (place, &who) = q.head().unwrap();
            q.remove(place, true);
            *served.entry(who).or_insert(0i32) += 1;
            let weight = if who == "heavy" { 2.0 / 3.0 } else { 1.0 / 3.0 };
            q.push(&who, who, 10, weight);
        }
        let (h, l) = (served["heavy"], served["light"]);
        assert!((h - 2 * l).abs() <= 2, "heavy {h} light {l}");
    }

    /// A flow that was idle does not get credit for the time it was away.
    #[test]
    fn an_idle_flow_starts_at_virtual_time() {
        let mut q: FairQueue<&str, &str> = FairQueue::default();
        for _ in 0..100 {
            let p = q.push(&"busy", "busy", 10, 0.5);
            q.remove(p, true);
        }
        q.push(&"busy", "busy", 10, 0.5);
        q.push(&"new", "new", 10, 0.5);
        let mut order = Vec::new();
        for _ in 0..4 {
            let (p, &who) = q.head().unwrap();
            q.remove(p, true);
            order.push(who);
            q.push(&who, who, 10, 0.5);
        }
        let new = order.iter().filter(|w| **w == "new").count();
        assert_eq!(new, 2, "{order:?}");
    }

    #[test]
    fn abandoned_places_leave_the_queue() {
        let mut q: FairQueue<&str, u32> = FairQueue::default();
        let p1 = q.push(&"a", 1, 10, 1.0);
        let _p2 = q.push(&"b", 2, 10, 1.0);
        assert_eq!(q.len(), 2);
        assert_eq!(q.remove(p1, false), Some(1));
        assert_eq!(q.head().map(|(_, w)| *w), Some(2));
        assert_eq!(q.remove(p1, false), None);
        q.forget(&"a");
        assert!(!q.is_empty());
    }
}
