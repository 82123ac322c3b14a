//! Fair share of the slots between tenants: admission by weight, not by
//! who came first.
//!
//! When one tenant alone wants slots (and has no `max_slots` quota),
//! admission is [`placement::admit`]'s rank order unchanged. Otherwise each
//! tenant first gets a budget of slots by weighted max-min fairness over
//! the slots of the up nodes ([`budgets`]): a tenant that wants less than
//! its weighted share gets what it wants, the rest is divided by weight
//! among the others; `max_slots` caps a tenant's demand. Then tasks are
//! admitted in rank order as before, each task's stripes trimmed to what
//! is left of its tenant's budget. A task whose tenant has no budget left
//! waits without reserving anything, so it never blocks other tenants.
//! Allowances that shrink when a tenant arrives make the owner preempt the
//! newest idempotent subtasks of the others ([`placement::preempt`]), and
//! non-idempotent ones give their slot back when they finish.

use std::collections::BTreeMap;

use super::placement::{self, Admission, Candidate};
use crate::model::{NodeId, NodeView, TaskId};

/// What admission needs to know of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantShare {
    /// Relative share under contention (0 is taken as 1).
    pub weight: u32,
    /// Most slots at once (0 = no limit).
    pub max_slots: u32,
}

impl Default for TenantShare {
    fn default() -> Self {
        TenantShare {
            weight: 1,
            max_slots: 0,
        }
    }
}

/// The slots a candidate asks for on each of its nodes: its concurrency,
/// at most the node's slots.
fn stripes(capacity: &BTreeMap<NodeId, u32>, c: &Candidate) -> BTreeMap<NodeId, u32> {
    c.eligible
        .iter()
        .filter_map(|n| {
            capacity
                .get(n)
                .map(|cap| (*n, c.placement.concurrency.min(*cap)))
        })
        .filter(|(_, need)| *need > 0)
        .collect()
}

/// Weighted max-min fair division of `total` slots between tenants that
/// want `demand` each. Deterministic; every slot is handed out unless every
/// demand is met.
pub fn budgets(
    total: u32,
    demand: &BTreeMap<String, (u32, u32)>, // tenant -> (weight, demand)
) -> BTreeMap<String, u32> {
    let mut alloc: BTreeMap<String, u32> = demand.keys().map(|t| (t.clone(), 0)).collect();
    let mut left = total;
    loop {
        let hungry: Vec<(&String, u32, u32)> = demand
            .iter()
            .map(|(t, (w, d))| (t, (*w).max(1), d.saturating_sub(alloc[t])))
            .filter(|(_, _, want)| *want > 0)
            .collect();
        if hungry.is_empty() || left == 0 {
            break;
        }
        let weights: u64 = hungry.iter().map(|(_, w, _)| u64::from(*w)).sum();
        let mut given = 0;
        for (t, w, want) in &hungry {
            let share = (u64::from(left) * u64::from(*w) / weights) as u32;
            let g = share.min(*want);
            *alloc.get_mut(*t).expect("known tenant") += g;
            given += g;
        }
        if given == 0 {
            // Shares rounded down to nothing: hand single slots out, the
            // tenant furthest below its weighted share first.
            let (t, _, _) = hungry
                .iter()
                .min_by(|a, b| {
                    let ra = u64::from(alloc[a.0]) * u64::from(b.1);
                    let rb = u64::from(alloc[b.0]) * u64::from(a.1);
                    ra.cmp(&rb).then_with(|| a.0.cmp(b.0))
                })
                .expect("not empty");
            *alloc.get_mut(*t).expect("known tenant") += 1;
            given = 1;
        }
        left -= given;
    }
    alloc
}

/// Trims stripes so that they add up to at most `budget`, taking from the
/// largest stripe first (then the highest node id), so the task stays
/// spread over its nodes.
fn trim(need: &mut BTreeMap<NodeId, u32>, budget: u32) {
    let mut sum: u32 = need.values().sum();
    while sum > budget {
        let (n, _) = need
            .iter()
            .max_by_key(|(n, k)| (**k, **n))
            .map(|(n, k)| (*n, *k))
            .expect("sum > 0");
        let k = need.get_mut(&n).expect("present");
        *k -= 1;
        if *k == 0 {
            need.remove(&n);
        }
        sum -= 1;
    }
}

/// Admission with fair share between tenants (see the module doc).
/// `tenant_of` names each candidate's tenant; tenants missing from
/// `tenants` get the default share.
pub fn admit_fair(
    nodes: &[NodeView],
    mut candidates: Vec<Candidate>,
    tenant_of: &BTreeMap<TaskId, String>,
    tenants: &BTreeMap<String, TenantShare>,
) -> Admission {
    let tenant = |id: TaskId| tenant_of.get(&id).cloned().unwrap_or_default();
    let share = |t: &str| tenants.get(t).copied().unwrap_or_default();
    let capacity: BTreeMap<NodeId, u32> = nodes.iter().map(|n| (n.id, n.slots)).collect();
    let mut demand: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for c in candidates.iter().filter(|c| !c.eligible.is_empty()) {
        let t = tenant(c.placement.rank.id);
        let s = share(&t);
        let want: u32 = stripes(&capacity, c).values().sum();
        let entry = demand.entry(t).or_insert((s.weight, 0));
        entry.1 = entry.1.saturating_add(want);
    }
    for (t, (_, d)) in demand.iter_mut() {
        let max = share(t).max_slots;
        if max > 0 {
            *d = (*d).min(max);
        }
    }
    let capped = demand.keys().any(|t| share(t).max_slots > 0);
    if demand.len() <= 1 && !capped {
        return placement::admit(nodes, candidates);
    }
    let total: u32 = nodes.iter().filter(|n| n.up).map(|n| n.slots).sum();
    let mut budget = budgets(total, &demand);
    candidates.sort_by_key(|c| c.placement.rank);
    let mut free = capacity.clone();
    let mut out = Admission::default();
    for c in candidates {
        let id = c.placement.rank.id;
        let left = budget.entry(tenant(id)).or_insert(0);
        let mut need = stripes(&capacity, &c);
        trim(&mut need, *left);
        if need.is_empty() {
            out.waiting.push(id);
            continue;
        }
        let fits = need.iter().all(|(n, k)| free[n] >= *k);
        for (n, k) in &need {
            let f = free.get_mut(n).expect("known node");
            let took = (*f).min(*k);
            *f -= took;
            *left -= took;
        }
        if fits {
            out.admitted.push((id, need));
        } else {
            out.waiting.push(id);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Rank, TaskPlacement};

    fn node(id: NodeId, slots: u32) -> NodeView {
        NodeView {
            id,
            labels: BTreeMap::new(),
            scope: String::new(),
            slots,
            up: true,
        }
    }

    fn cand(id: TaskId, concurrency: u32, eligible: &[NodeId]) -> Candidate {
        Candidate {
            placement: TaskPlacement {
                rank: Rank {
                    priority: 512,
                    create_time_ms: id,
                    id,
                },
                concurrency,
                max_nodes: 0,
                scope: String::new(),
                selector: BTreeMap::new(),
            },
            eligible: eligible.to_vec(),
        }
    }

    fn tenants(pairs: &[(TaskId, &str)]) -> BTreeMap<TaskId, String> {
        pairs.iter().map(|(i, t)| (*i, t.to_string())).collect()
    }

    fn slots_of(a: &Admission, ids: &[TaskId]) -> u32 {
        a.admitted
            .iter()
            .filter(|(t, _)| ids.contains(t))
            .map(|(_, m)| m.values().sum::<u32>())
            .sum()
    }

    #[test]
    fn budgets_are_weighted_max_min_fair() {
        let d = |v: &[(&str, u32, u32)]| {
            v.iter()
                .map(|(t, w, d)| (t.to_string(), (*w, *d)))
                .collect::<BTreeMap<_, _>>()
        };
        let b = budgets(8, &d(&[("a", 1, 8), ("b", 1, 8)]));
        assert_eq!((b["a"], b["b"]), (4, 4));
        let b = budgets(9, &d(&[("a", 2, 100), ("b", 1, 100)]));
        assert_eq!((b["a"], b["b"]), (6, 3));
        // A tenant that wants little leaves the rest to the others.
        let b = budgets(8, &d(&[("a", 1, 1), ("b", 1, 100), ("c", 1, 100)]));
        assert_eq!(b["a"], 1);
        assert_eq!(b["b"] + b["c"], 7);
        assert!(b["b"].abs_diff(b["c"]) <= 1);
        // Rounding never loses slots.
        let b = budgets(5, &d(&[("a", 1, 9), ("b", 1, 9), ("c", 1, 9)]));
        assert_eq!(b.values().sum::<u32>(), 5);
        let b = budgets(4, &d(&[("a", 1, 1), ("b", 1, 1)]));
        assert_eq!((b["a"], b["b"]), (1, 1), "demand is never exceeded");
    }

    #[test]
    fn two_tenants_with_equal_weights_get_half_the_slots_each() {
        let nodes = [node(1, 4), node(2, 4)];
        // Tenant a came first with tasks that alone would take every slot.
        let cands = vec![
            cand(1, 4, &[1, 2]),
            cand(2, 4, &[1, 2]),
            cand(3, 4, &[1, 2]),
        ];
        let of = tenants(&[(1, "a"), (2, "a"), (3, "b")]);
        let a = admit_fair(&nodes, cands, &of, &BTreeMap::new());
        assert_eq!(slots_of(&a, &[1, 2]), 4);
        assert_eq!(slots_of(&a, &[3]), 4);
        assert_eq!(
            a.waiting,
            vec![2],
            "a's second task waits, reserving nothing"
        );
    }

    #[test]
    fn weights_and_max_slots_shape_the_division() {
        let nodes = [node(1, 6)];
        let cands = vec![cand(1, 6, &[1]), cand(2, 6, &[1])];
        let of = tenants(&[(1, "a"), (2, "b")]);
        let mut shares = BTreeMap::new();
        shares.insert(
            "b".to_string(),
            TenantShare {
                weight: 2,
                max_slots: 0,
            },
        );
        let a = admit_fair(&nodes, cands.clone(), &of, &shares);
        assert_eq!((slots_of(&a, &[1]), slots_of(&a, &[2])), (2, 4));
        // One tenant alone but capped by its quota.
        let one = admit_fair(
            &nodes,
            vec![cand(1, 6, &[1])],
            &of,
            &[(
                "a".to_string(),
                TenantShare {
                    weight: 1,
                    max_slots: 2,
                },
            )]
            .into_iter()
            .collect(),
        );
        assert_eq!(slots_of(&one, &[1]), 2);
    }

    #[test]
    fn one_tenant_alone_is_plain_rank_order() {
        let nodes = [node(1, 4), node(2, 2)];
        let cands = vec![cand(1, 3, &[1, 2]), cand(2, 2, &[1]), cand(3, 1, &[2])];
        let of = tenants(&[(1, "a"), (2, "a"), (3, "a")]);
        assert_eq!(
            admit_fair(&nodes, cands.clone(), &of, &BTreeMap::new()),
            placement::admit(&nodes, cands)
        );
    }

    #[test]
    fn admitted_slots_never_exceed_nodes_or_budgets() {
        // A small exhaustive sweep instead of a random one: every mix of
        // three tasks over two tenants and two nodes.
        let nodes = [node(1, 3), node(2, 2)];
        for c1 in 1..=4 {
            for c2 in 1..=4 {
                for split in 0..8u32 {
                    let cands = vec![cand(1, c1, &[1, 2]), cand(2, c2, &[1]), cand(3, 2, &[2])];
                    let of: BTreeMap<TaskId, String> = (1..=3)
                        .map(|i| {
                            (
                                i,
                                if (split >> (i - 1)) & 1 == 1 {
                                    "b"
                                } else {
                                    "a"
                                }
                                .into(),
                            )
                        })
                        .collect();
                    let a = admit_fair(&nodes, cands, &of, &BTreeMap::new());
                    for n in &nodes {
                        let used: u32 = a.admitted.iter().filter_map(|(_, m)| m.get(&n.id)).sum();
                        assert!(used <= n.slots, "node {} over: {a:?}", n.id);
                    }
                    assert_eq!(a.admitted.len() + a.waiting.len(), 3);
                }
            }
        }
    }
}
