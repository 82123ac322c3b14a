//! Where tasks may run and how many of their subtasks run where: pure
//! functions of a cluster view, driven by the owner's scheduling loop.
//!
//! 1. [`eligible_nodes`]: the nodes a task may use (up, `role=dist_worker`
//!    rule, scope, label selector, placement rules, max node count);
//!    [`EligibleIndex`] answers it for every task of a round.
//! 2. [`admit`]: in rank order, which tasks get their stripes (concurrency
//!    slots on each eligible node) after higher-ranked tasks reserved theirs.
//! 3. [`Admission::with_queue`]: room for subtasks queued on a node ahead
//!    of its free slots, so a worker starts its next subtask the moment one
//!    ends instead of waiting for the owner's next round and a commit.
//! 4. [`assign`]: which pending subtasks go to which node now.
//! 5. [`preempt`]: which running subtasks give their slots back because a
//!    higher-ranked task now holds them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{NodeId, NodeView, TaskId, TaskPlacement, BACKGROUND_SCOPE, DIST_WORKER_LABEL};

/// The nodes that may run a task, in preference order.
///
/// `allowed` is the placement rules' verdict on a node for this task;
/// `in_use` are the nodes already running the task's subtasks, kept first
/// when `max_nodes` trims the list so a limit does not shuffle work around.
/// For many tasks over the same nodes, build one [`EligibleIndex`].
pub fn eligible_nodes(
    nodes: &[NodeView],
    task: &TaskPlacement,
    allowed: impl Fn(&NodeView) -> bool,
    in_use: &BTreeSet<NodeId>,
) -> Vec<NodeId> {
    EligibleIndex::new(nodes).eligible(task, allowed, in_use)
}

/// The nodes of one round sorted out once (up, the `role=dist_worker`
/// rule, grouped by scope and by id), so that each task's eligible nodes
/// cost only its own filters (label selector, placement rules).
#[derive(Debug, Clone)]
pub struct EligibleIndex<'a> {
    /// The nodes that run tasks, by scope, each list by id.
    by_scope: BTreeMap<&'a str, Vec<&'a NodeView>>,
    /// The scope of a task that names none: `background` when such a node
    /// runs tasks, otherwise the empty scope.
    default_scope: &'a str,
}

impl<'a> EligibleIndex<'a> {
    pub fn new(nodes: &'a [NodeView]) -> Self {
        let (key, value) = DIST_WORKER_LABEL;
        let up = || nodes.iter().filter(|n| n.up);
        let dist_only = up().any(|n| n.has_label(key, value));
        let mut by_scope: BTreeMap<&str, Vec<&NodeView>> = BTreeMap::new();
        for n in up().filter(|n| !dist_only || n.has_label(key, value)) {
            by_scope.entry(n.scope.as_str()).or_default().push(n);
        }
        for list in by_scope.values_mut() {
            list.sort_by_key(|n| n.id);
        }
        let default_scope = if by_scope.contains_key(BACKGROUND_SCOPE) {
            BACKGROUND_SCOPE
        } else {
            ""
        };
        EligibleIndex {
            by_scope,
            default_scope,
        }
    }

    /// [`eligible_nodes`] of one task.
    pub fn eligible(
        &self,
        task: &TaskPlacement,
        allowed: impl Fn(&NodeView) -> bool,
        in_use: &BTreeSet<NodeId>,
    ) -> Vec<NodeId> {
        let eligible = self
            .scope_of(task)
            .iter()
            .filter(|n| n.matches(&task.selector) && allowed(n))
            .map(|n| n.id)
            .collect();
        Self::in_order(task, eligible, in_use)
    }

    /// [`eligible_nodes`] of a task that placement rules allow only on
    /// `only` (ids in ascending order): looks up those nodes rather than
    /// asking about every node.
    pub fn eligible_among(
        &self,
        task: &TaskPlacement,
        only: &[NodeId],
        in_use: &BTreeSet<NodeId>,
    ) -> Vec<NodeId> {
        let list = self.scope_of(task);
        let eligible = only
            .iter()
            .filter_map(|id| {
                let i = list.binary_search_by_key(id, |n| n.id).ok()?;
                Some(list[i])
            })
            .filter(|n| n.matches(&task.selector))
            .map(|n| n.id)
            .collect();
        Self::in_order(task, eligible, in_use)
    }

    /// The nodes of the task's scope, by id.
    fn scope_of(&self, task: &TaskPlacement) -> &[&'a NodeView] {
        let scope = if task.scope.is_empty() {
            self.default_scope
        } else {
            task.scope.as_str()
        };
        self.by_scope.get(scope).map_or(&[], Vec::as_slice)
    }

    /// Eligible nodes (by id) in preference order, trimmed to `max_nodes`.
    fn in_order(
        task: &TaskPlacement,
        mut eligible: Vec<NodeId>,
        in_use: &BTreeSet<NodeId>,
    ) -> Vec<NodeId> {
        if !in_use.is_empty() {
            // The nodes in use first, then the others, each part by id.
            let mut ordered = Vec::with_capacity(eligible.len());
            ordered.extend(
                in_use
                    .iter()
                    .filter(|id| eligible.binary_search(id).is_ok()),
            );
            ordered.extend(eligible.iter().filter(|id| !in_use.contains(id)));
            eligible = ordered;
        }
        if task.max_nodes > 0 {
            eligible.truncate(task.max_nodes as usize);
        }
        eligible
    }
}

/// A task as admission sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub placement: TaskPlacement,
    pub eligible: Vec<NodeId>,
}

/// The outcome of admission.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// Admitted tasks in rank order, with the slots each may use per node.
    pub admitted: Vec<(TaskId, BTreeMap<NodeId, u32>)>,
    /// Tasks that wait for slots (or for any eligible node), in rank order.
    pub waiting: Vec<TaskId>,
    /// Subtasks a node may hold queued per slot (set by
    /// [`Admission::with_queue`]; 0: assignment only to free slots).
    pub queue_per_slot: u32,
}

impl Admission {
    /// Slots `task` may use on `node` (0 if it is not admitted there).
    pub fn allowance(&self, task: TaskId, node: NodeId) -> u32 {
        self.admitted
            .iter()
            .find(|(t, _)| *t == task)
            .and_then(|(_, per_node)| per_node.get(&node).copied())
            .unwrap_or(0)
    }

    /// The same admission with room for `per_slot` queued subtasks per
    /// allowed slot: assigned to the node, not started, started by its
    /// worker as soon as one of the task's runs there ends. Only a whole
    /// stripe (`stripe(task, node)`: the task's concurrency, at most the
    /// node's slots) gets a queue, because a worker runs at most that many
    /// of a task at once; a stripe that fair share trimmed gets none, so
    /// the worker never runs more of the task than admission allowed.
    #[must_use]
    pub fn with_queue(mut self, per_slot: u32, stripe: impl Fn(TaskId, NodeId) -> u32) -> Self {
        for (task, per_node) in &mut self.admitted {
            for (node, allow) in per_node.iter_mut() {
                if *allow == stripe(*task, *node) {
                    *allow = allow.saturating_mul(per_slot.saturating_add(1));
                }
            }
        }
        self.queue_per_slot = per_slot;
        self
    }
}

/// Admits tasks in rank order. A task gets a stripe of `concurrency` slots
/// (at most the node's slots) on each of its eligible nodes when they fit
/// in what higher-ranked tasks left. A task that does not fit still reserves
/// what is left on its nodes, so lower-ranked tasks cannot starve it; they
/// may still run on nodes it does not need.
pub fn admit(nodes: &[NodeView], mut candidates: Vec<Candidate>) -> Admission {
    candidates.sort_by_key(|c| c.placement.rank);
    // Slots by node, in vectors indexed like `ids` (ascending node ids).
    let capacity: BTreeMap<NodeId, u32> = nodes.iter().map(|n| (n.id, n.slots)).collect();
    let ids: Vec<NodeId> = capacity.keys().copied().collect();
    let slots: Vec<u32> = capacity.values().copied().collect();
    let mut free = slots.clone();
    let mut out = Admission::default();
    let mut need: Vec<(NodeId, usize, u32)> = Vec::new();
    for c in candidates {
        let id = c.placement.rank.id;
        need.clear();
        need.extend(c.eligible.iter().filter_map(|n| {
            let i = ids.binary_search(n).ok()?;
            let k = c.placement.concurrency.min(slots[i]);
            (k > 0).then_some((*n, i, k))
        }));
        // By node, each once (a node listed twice is needed once).
        need.sort_unstable_by_key(|(_, i, _)| *i);
        need.dedup_by_key(|(_, i, _)| *i);
        let fits = !need.is_empty() && need.iter().all(|(_, i, k)| free[*i] >= *k);
        for (_, i, k) in &need {
            free[*i] = free[*i].saturating_sub(*k);
        }
        if fits {
            out.admitted
                .push((id, need.iter().map(|(n, _, k)| (*n, *k)).collect()));
        } else {
            out.waiting.push(id);
        }
    }
    out
}

/// Slots in use: per node, and per (task, node). A subtask holds its slot
/// from assignment until it finishes or is requeued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub per_node: BTreeMap<NodeId, u32>,
    /// Only looked up (a round adds one entry per active subtask).
    pub per_task_node: HashMap<(TaskId, NodeId), u32>,
}

impl Usage {
    pub fn add(&mut self, task: TaskId, node: NodeId) {
        *self.per_node.entry(node).or_default() += 1;
        *self.per_task_node.entry((task, node)).or_default() += 1;
    }

    fn on(&self, task: TaskId, node: NodeId) -> u32 {
        self.per_task_node.get(&(task, node)).copied().unwrap_or(0)
    }
}

/// Assigns pending subtasks (per task, in the order given) to nodes with
/// room: within the task's allowance on the node and the node's slots plus
/// the admission's queued subtasks per slot (see [`Admission::with_queue`]),
/// spreading each task evenly (fewest of its subtasks first, then the least
/// loaded node, then the lowest id). Returns (task, subtask, node) triples.
pub fn assign<S: Copy>(
    nodes: &[NodeView],
    admission: &Admission,
    pending: &BTreeMap<TaskId, Vec<S>>,
    usage: &mut Usage,
) -> Vec<(TaskId, S, NodeId)> {
    let room_per_slot = admission.queue_per_slot.saturating_add(1);
    let slots: BTreeMap<NodeId, u32> = nodes
        .iter()
        .filter(|n| n.up)
        .map(|n| (n.id, n.slots.saturating_mul(room_per_slot)))
        .collect();
    let mut out = Vec::new();
    // One task's nodes at a time, read from `usage` once: (node, its
    // allowance, the task's subtasks there, the node's used slots, its
    // slots), by node id.
    let mut room: Vec<(NodeId, u32, u32, u32, u32)> = Vec::new();
    for (task, per_node) in &admission.admitted {
        let Some(subtasks) = pending.get(task) else {
            continue;
        };
        room.clear();
        room.extend(per_node.iter().filter_map(|(n, allow)| {
            let node_slots = *slots.get(n)?;
            let node_used = usage.per_node.get(n).copied().unwrap_or(0);
            Some((*n, *allow, usage.on(*task, *n), node_used, node_slots))
        }));
        for subtask in subtasks {
            let best = room
                .iter_mut()
                .filter(|(_, allow, on, used, cap)| on < allow && used < cap)
                .min_by_key(|(n, _, on, used, _)| (*on, *used, *n));
            let Some((node, _, on, used, _)) = best else {
                break; // no room left for this task
            };
            *on += 1;
            *used += 1;
            let node = *node;
            usage.add(*task, node);
            out.push((*task, *subtask, node));
        }
    }
    out
}

/// A running (or assigned) subtask, for preemption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held<S> {
    pub task: TaskId,
    pub subtask: S,
    pub node: NodeId,
    /// When it started, `u64::MAX` while it is queued (assigned, not
    /// started); the newest are preempted first (least work lost), so
    /// queued subtasks go before running ones.
    pub started_ms: u64,
    /// Only idempotent subtasks are taken back once they run.
    pub idempotent: bool,
}

impl<S> Held<S> {
    /// Assigned but not started: taking it back loses no work, whatever
    /// its step.
    pub fn queued(&self) -> bool {
        self.started_ms == u64::MAX
    }
}

/// The subtasks to send back to pending because their task holds more slots
/// on their node than admission now allows it (a higher-ranked task took
/// them, or the node is no longer eligible for the task): queued ones
/// first, then the newest running ones of idempotent steps.
pub fn preempt<S: Copy>(admission: &Admission, held: &[Held<S>]) -> Vec<Held<S>> {
    let mut by_slot: BTreeMap<(TaskId, NodeId), Vec<Held<S>>> = BTreeMap::new();
    for h in held.iter().filter(|h| h.idempotent || h.queued()) {
        by_slot.entry((h.task, h.node)).or_default().push(*h);
    }
    let mut out = Vec::new();
    for ((task, node), mut list) in by_slot {
        let allow = admission.allowance(task, node) as usize;
        let total = held
            .iter()
            .filter(|h| h.task == task && h.node == node)
            .count();
        if total <= allow {
            continue;
        }
        list.sort_by_key(|h| std::cmp::Reverse(h.started_ms));
        out.extend(list.into_iter().take(total - allow));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_labels, Rank};

    fn node(id: NodeId, slots: u32, scope: &str, labels: &str) -> NodeView {
        NodeView {
            id,
            labels: parse_labels(labels).unwrap(),
            scope: scope.into(),
            slots,
            up: true,
        }
    }

    fn task(id: TaskId, priority: u32, concurrency: u32) -> TaskPlacement {
        TaskPlacement {
            rank: Rank {
                priority,
                create_time_ms: id,
                id,
            },
            concurrency,
            max_nodes: 0,
            scope: String::new(),
            selector: BTreeMap::new(),
        }
    }

    fn eligible(nodes: &[NodeView], t: &TaskPlacement) -> Vec<NodeId> {
        eligible_nodes(nodes, t, |_| true, &BTreeSet::new())
    }

    #[test]
    fn dist_worker_label_restricts_when_present() {
        let mut nodes = vec![
            node(1, 2, "", ""),
            node(2, 2, "", "role=dist_worker"),
            node(3, 2, "", ""),
        ];
        assert_eq!(eligible(&nodes, &task(1, 1, 1)), vec![2]);
        nodes[1].labels.clear();
        assert_eq!(eligible(&nodes, &task(1, 1, 1)), vec![1, 2, 3]);
        // A labelled node that is down does not keep the others idle.
        nodes[1] = node(2, 2, "", "role=dist_worker");
        nodes[1].up = false;
        assert_eq!(eligible(&nodes, &task(1, 1, 1)), vec![1, 3]);
    }

    #[test]
    fn empty_scope_prefers_background() {
        let nodes = vec![
            node(1, 2, "", ""),
            node(2, 2, "background", ""),
            node(3, 2, "etl", ""),
        ];
        assert_eq!(eligible(&nodes, &task(1, 1, 1)), vec![2]);
        let mut etl = task(1, 1, 1);
        etl.scope = "etl".into();
        assert_eq!(eligible(&nodes, &etl), vec![3]);
        let no_bg = vec![node(1, 2, "", ""), node(3, 2, "etl", "")];
        assert_eq!(eligible(&no_bg, &task(1, 1, 1)), vec![1]);
    }

    #[test]
    fn selector_rules_and_max_nodes() {
        let nodes: Vec<_> = (1..=5)
            .map(|i| node(i, 2, "", if i % 2 == 0 { "disk=ssd" } else { "" }))
            .collect();
        let mut t = task(1, 1, 1);
        t.selector = parse_labels("disk=ssd").unwrap();
        assert_eq!(eligible(&nodes, &t), vec![2, 4]);
        t.selector.clear();
        assert_eq!(
            eligible_nodes(&nodes, &t, |n| n.id != 3, &BTreeSet::new()),
            vec![1, 2, 4, 5]
        );
        t.max_nodes = 2;
        assert_eq!(eligible(&nodes, &t), vec![1, 2]);
        // Nodes already in use are kept.
        assert_eq!(
            eligible_nodes(&nodes, &t, |_| true, &BTreeSet::from([5])),
            vec![5, 1]
        );
    }

    #[test]
    fn eligible_among_a_rules_nodes_is_eligible_with_the_rule() {
        let mut nodes: Vec<_> = (1..=6)
            .map(|i| {
                node(
                    i,
                    2,
                    if i == 6 { "etl" } else { "" },
                    if i % 2 == 0 { "disk=ssd" } else { "" },
                )
            })
            .collect();
        nodes[2].up = false;
        let index = EligibleIndex::new(&nodes);
        let mut t = task(1, 1, 1);
        for selector in ["", "disk=ssd"] {
            t.selector = parse_labels(selector).unwrap();
            for scope in ["", "etl"] {
                t.scope = scope.into();
                for only in [vec![], vec![2, 4], vec![1, 2, 3, 4, 5, 6, 9]] {
                    for in_use in [BTreeSet::new(), BTreeSet::from([5]), BTreeSet::from([4, 9])] {
                        for max in [0, 1, 2] {
                            t.max_nodes = max;
                            assert_eq!(
                                index.eligible_among(&t, &only, &in_use),
                                eligible_nodes(&nodes, &t, |n| only.contains(&n.id), &in_use),
                                "{selector} {scope:?} {only:?} {in_use:?} {max}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn higher_ranked_tasks_reserve_their_stripes() {
        let nodes = vec![node(1, 4, "", ""), node(2, 4, "", "")];
        let cands = vec![
            Candidate {
                placement: task(3, 512, 2),
                eligible: vec![1, 2],
            },
            Candidate {
                placement: task(1, 512, 3),
                eligible: vec![1, 2],
            },
            Candidate {
                placement: task(2, 1, 1),
                eligible: vec![1],
            },
        ];
        let a = admit(&nodes, cands);
        // Rank: task 2 (priority 1), then 1, then 3.
        assert_eq!(
            a.admitted.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert_eq!(a.waiting, vec![3]);
        assert_eq!(a.allowance(1, 2), 3);
        assert_eq!(a.allowance(3, 1), 0);
    }

    #[test]
    fn waiting_task_blocks_only_its_own_nodes() {
        let nodes = vec![node(1, 2, "", ""), node(2, 2, "", ""), node(3, 2, "", "")];
        let cands = vec![
            Candidate {
                placement: task(1, 1, 2),
                eligible: vec![1],
            },
            Candidate {
                placement: task(2, 2, 2),
                eligible: vec![1],
            }, // node 1 is full: waits
            Candidate {
                placement: task(3, 3, 2),
                eligible: vec![1, 2],
            }, // waits, reserves node 2
            Candidate {
                placement: task(4, 4, 2),
                eligible: vec![2],
            }, // node 2 is reserved
            Candidate {
                placement: task(5, 5, 2),
                eligible: vec![3],
            }, // nobody above needs node 3
        ];
        let a = admit(&nodes, cands);
        assert_eq!(
            a.admitted.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            vec![1, 5]
        );
        assert_eq!(a.waiting, vec![2, 3, 4]);
    }

    #[test]
    fn concurrency_is_capped_by_node_slots() {
        let nodes = vec![node(1, 2, "", "")];
        let a = admit(
            &nodes,
            vec![Candidate {
                placement: task(1, 1, 64),
                eligible: vec![1],
            }],
        );
        assert_eq!(a.allowance(1, 1), 2);
    }

    #[test]
    fn assignment_spreads_within_allowance() {
        let nodes = vec![node(1, 2, "", ""), node(2, 2, "", "")];
        let a = admit(
            &nodes,
            vec![Candidate {
                placement: task(1, 1, 2),
                eligible: vec![1, 2],
            }],
        );
        let pending = BTreeMap::from([(1, (0..10).collect::<Vec<u32>>())]);
        let mut usage = Usage::default();
        let got = assign(&nodes, &a, &pending, &mut usage);
        assert_eq!(got, vec![(1, 0, 1), (1, 1, 2), (1, 2, 1), (1, 3, 2)]);
        // Full: nothing more.
        assert!(assign(&nodes, &a, &pending, &mut usage).is_empty());
    }

    #[test]
    fn preemption_takes_the_newest_idempotent_subtasks() {
        let nodes = vec![node(1, 2, "", "")];
        // Task 2 (higher priority) arrives while task 1 holds both slots.
        let a = admit(
            &nodes,
            vec![
                Candidate {
                    placement: task(1, 500, 2),
                    eligible: vec![1],
                },
                Candidate {
                    placement: task(2, 1, 1),
                    eligible: vec![1],
                },
            ],
        );
        assert_eq!(a.allowance(2, 1), 1);
        assert_eq!(a.allowance(1, 1), 0, "task 1 no longer fits");
        let held = [
            Held {
                task: 1,
                subtask: 10,
                node: 1,
                started_ms: 100,
                idempotent: true,
            },
            Held {
                task: 1,
                subtask: 11,
                node: 1,
                started_ms: 200,
                idempotent: true,
            },
        ];
        let out = preempt(&a, &held);
        assert_eq!(
            out.iter().map(|h| h.subtask).collect::<Vec<_>>(),
            vec![11, 10]
        );
        let not_idem = [Held {
            idempotent: false,
            ..held[0]
        }];
        assert!(preempt(&a, &not_idem).is_empty());
        // Queued (not started) subtasks go first, of any step.
        let queued = [
            held[1],
            Held {
                subtask: 12,
                started_ms: u64::MAX,
                idempotent: false,
                ..held[0]
            },
        ];
        let out = preempt(&a, &queued);
        assert_eq!(
            out.iter().map(|h| h.subtask).collect::<Vec<_>>(),
            vec![12, 11]
        );
    }

    #[test]
    fn whole_stripes_get_a_queue_trimmed_ones_do_not() {
        let nodes = vec![node(1, 4, "", ""), node(2, 2, "", "")];
        let a = admit(
            &nodes,
            vec![Candidate {
                placement: task(1, 1, 3),
                eligible: vec![1, 2],
            }],
        );
        assert_eq!((a.allowance(1, 1), a.allowance(1, 2)), (3, 2));
        // Node 2's stripe is whole at 2 (its slots); pretend fair share
        // trimmed node 1's to 2 of 3.
        let mut trimmed = a.clone();
        trimmed.admitted[0].1.insert(1, 2);
        let stripe = |_, n| if n == 1 { 3 } else { 2 };
        let q = trimmed.with_queue(2, stripe);
        assert_eq!((q.allowance(1, 1), q.allowance(1, 2)), (2, 6));
        let q = a.with_queue(1, stripe);
        assert_eq!((q.allowance(1, 1), q.allowance(1, 2)), (6, 4));
        // Assignment fills the queues too, within slots x (1 + queue).
        let pending = BTreeMap::from([(1, (0..20).collect::<Vec<u32>>())]);
        let mut usage = Usage::default();
        let got = assign(&nodes, &q, &pending, &mut usage);
        assert_eq!(got.len(), 10);
        assert_eq!(usage.per_node, BTreeMap::from([(1, 6), (2, 4)]));
    }

    /// Random clusters: assignments never exceed node slots or a task's
    /// allowance, use only eligible nodes, and are deterministic.
    #[test]
    fn invariants_hold_on_random_clusters() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let nodes: Vec<NodeView> = (1..=1 + rnd(6))
                .map(|id| {
                    let mut n = node(
                        id,
                        1 + rnd(4) as u32,
                        if rnd(4) == 0 { "background" } else { "" },
                        "",
                    );
                    n.up = rnd(8) != 0;
                    if rnd(5) == 0 {
                        n.labels.insert("role".into(), "dist_worker".into());
                    }
                    n
                })
                .collect();
            let tasks: Vec<TaskPlacement> = (1..=1 + rnd(5))
                .map(|id| {
                    let mut t = task(id, 1 + rnd(3) as u32, 1 + rnd(4) as u32);
                    t.max_nodes = rnd(3) as u32;
                    t
                })
                .collect();
            let cands: Vec<Candidate> = tasks
                .iter()
                .map(|t| Candidate {
                    placement: t.clone(),
                    eligible: eligible(&nodes, t),
                })
                .collect();
            let a = admit(&nodes, cands.clone());
            assert_eq!(a, admit(&nodes, cands.clone()), "deterministic");
            let pending: BTreeMap<TaskId, Vec<u64>> = tasks
                .iter()
                .map(|t| (t.rank.id, (0..rnd(12)).collect()))
                .collect();
            let queue = rnd(3) as u32;
            let stripe = |t: TaskId, n: NodeId| {
                let c = tasks.iter().find(|p| p.rank.id == t).unwrap().concurrency;
                c.min(nodes.iter().find(|v| v.id == n).unwrap().slots)
            };
            let queued = a.clone().with_queue(queue, stripe);
            let mut usage = Usage::default();
            let got = assign(&nodes, &queued, &pending, &mut usage);
            for n in &nodes {
                let used = usage.per_node.get(&n.id).copied().unwrap_or(0);
                assert!(used <= n.slots * (1 + queue));
            }
            for (t, _, n) in &got {
                let c = cands.iter().find(|c| c.placement.rank.id == *t).unwrap();
                assert!(c.eligible.contains(n), "task {t} on ineligible node {n}");
                let on = usage.per_task_node[&(*t, *n)];
                assert!(on <= queued.allowance(*t, *n));
                // A whole stripe queues; a trimmed one never exceeds it.
                let allow = a.allowance(*t, *n);
                let cap = if allow == stripe(*t, *n) {
                    allow * (1 + queue)
                } else {
                    allow
                };
                assert!(on <= cap);
            }
        }
    }
}
