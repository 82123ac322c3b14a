//! The coordinator (PD style) of the owner: [checkers](super::checkers)
//! that patrol the cluster every round (down nodes, rule violations),
//! schedulers behind one [`Scheduler`] trait that run on their own
//! intervals with back-off, and the [`Operators`] controller that admits
//! their operators within per-kind in-flight limits, tracks them until done
//! and times them out.
//!
//! Everything here is pure: a [`CoordView`] of the cluster in, operators
//! out. The owner's loop builds the view from the replicated state and
//! carries the new operators out: a move is an `AssignSubtask` of a queued
//! subtask to its new node, whose step then reaches both nodes in their
//! heartbeat replies (the node it went to reports back when it claimed it);
//! a leader transfer is a Raft leader transfer; a node-down operator is a
//! `MarkNodeDown` and the requeues of the node's subtasks.
//!
//! Schedulers: `balance-subtask` evens each task's queued subtasks over its
//! eligible nodes; `hot-node` moves queued subtasks off nodes whose CPU
//! stayed above a band; `leader-placement` moves Raft leadership to a node
//! matching the `leader` rules in force.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::balance::{balance, Queued};
use super::checkers::{Active, Checker, DownNodeChecker, Liveness, RuleChecker};
pub use super::operators::{
    Confirmation, Limits, OpKind, OpState, Operator, OperatorCounts, Operators, Report, Seen, Step,
    StepOutcome, SubtaskAt, LEADER_LIMIT_KEY, OPERATOR_TIMEOUT_KEY, PRIORITY_BALANCE,
    PRIORITY_DOWN, PRIORITY_HOT, PRIORITY_RULE, SUBTASK_LIMIT_KEY,
};
use super::rules::{Rule, RuleKind};
use crate::model::{NodeId, NodeView, TaskId};

/// Cluster config key prefix of a scheduler's state: `scheduler.<name>` =
/// `running`, `paused` or `removed`.
pub const SCHEDULER_KEY_PREFIX: &str = "scheduler.";

/// The built-in schedulers, all running unless the config says otherwise.
pub const SCHEDULERS: &[&str] = &["balance-subtask", "hot-node", "leader-placement"];

/// The checkers, in the order they run; they always run.
pub const CHECKERS: &[&str] = &["down-node-checker", "rule-checker"];

/// A task as the coordinator sees it.
#[derive(Debug, Clone, Default)]
pub struct CoordTask {
    pub id: TaskId,
    pub key: String,
    pub tenant: String,
    /// The nodes it may use (after rules), in preference order.
    pub eligible: Vec<NodeId>,
    /// The `subtask` rule pinning it, if any.
    pub pinned_by: Option<String>,
    /// Its pending subtasks assigned to a node and not started.
    pub queued: Vec<Queued<SubtaskAt>>,
}

/// The cluster as one coordinator round sees it.
#[derive(Debug, Clone, Default)]
pub struct CoordView {
    pub now_ms: u64,
    pub nodes: Vec<NodeView>,
    /// Slots in use (pending and running subtasks) per node.
    pub used: BTreeMap<NodeId, u32>,
    /// Latest CPU utilisation (0..=1) per node, for nodes that report it.
    pub cpu: BTreeMap<NodeId, f32>,
    /// The tasks that accept work.
    pub tasks: Vec<CoordTask>,
    pub rules: Vec<Rule>,
    /// This node: the leader.
    pub leader: NodeId,
    /// Up scheduler (voter) nodes: the possible leaders.
    pub voters: BTreeSet<NodeId>,
    /// Every registered node, for the down-node checker.
    pub liveness: Vec<Liveness>,
    /// The pending and running subtasks on each node, of every task
    /// whatever its state.
    pub active: BTreeMap<NodeId, Vec<Active>>,
}

impl CoordView {
    /// The free slots of every up node: its slots less those in use.
    pub fn room(&self) -> Room {
        let mut free: Vec<(NodeId, u32)> = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| {
                let used = self.used.get(&n.id).copied().unwrap_or(0);
                (n.id, n.slots.saturating_sub(used))
            })
            .collect();
        free.sort_unstable_by_key(|(n, _)| *n);
        free.dedup_by_key(|(n, _)| *n);
        Room { free }
    }
}

/// Free slots per up node, as moves are planned: a node's place (found
/// once) indexes its count.
#[derive(Debug, Clone, Default)]
pub struct Room {
    /// (node, free slots), by node id.
    free: Vec<(NodeId, u32)>,
}

impl Room {
    /// Where `node` is kept; `None` for a node that is not up.
    pub fn place(&self, node: NodeId) -> Option<usize> {
        self.free.binary_search_by_key(&node, |(n, _)| *n).ok()
    }

    /// (node, free slots) at a place.
    pub fn at(&self, place: usize) -> (NodeId, u32) {
        self.free[place]
    }

    /// Free slots of `node` (0 when it is not up).
    pub fn free(&self, node: NodeId) -> u32 {
        self.place(node).map_or(0, |i| self.free[i].1)
    }

    /// One slot of the node at `place` is taken.
    pub fn take_at(&mut self, place: usize) {
        let f = &mut self.free[place].1;
        *f = f.saturating_sub(1);
    }

    /// One slot of `node` is taken (if it is up).
    pub fn take(&mut self, node: NodeId) {
        if let Some(i) = self.place(node) {
            self.take_at(i);
        }
    }
}

/// A scheduler of the coordinator.
pub trait Scheduler: Send + Sync {
    fn name(&self) -> &'static str;
    /// The kind of the operators it creates (its limit gates it).
    fn kind(&self) -> OpKind;
    /// The shortest interval between two rounds.
    fn min_interval(&self) -> Duration;
    /// The interval after a round that created `created` operators: back
    /// to the minimum when it found work, growing while idle.
    fn next_interval(&self, previous: Duration, created: usize) -> Duration {
        if created > 0 {
            self.min_interval()
        } else {
            (previous * 2).clamp(self.min_interval(), MAX_INTERVAL)
        }
    }
    /// Whether it may run now: its kind's limit is not reached.
    fn is_schedule_allowed(&self, ops: &Operators, limits: &Limits) -> bool {
        ops.in_flight(self.kind()) < limits.of(self.kind())
    }
    /// The operators it wants, given the view.
    fn schedule(&mut self, view: &CoordView) -> Vec<Operator>;
}

/// The longest back-off of an idle scheduler.
pub const MAX_INTERVAL: Duration = Duration::from_secs(5);

fn move_op(
    source: &'static str,
    priority: u32,
    subtask: SubtaskAt,
    from: NodeId,
    to: NodeId,
) -> Operator {
    Operator::new(
        OpKind::MoveSubtask,
        source,
        priority,
        vec![Step::MoveSubtask { subtask, from, to }],
    )
}

/// Evens each task's queued subtasks over its eligible nodes. Pinned tasks'
/// eligible nodes are their rule's nodes, so their subtasks never leave
/// them; subtasks off their eligible nodes are the rule checker's.
#[derive(Debug, Default)]
pub struct BalanceSubtask;

impl Scheduler for BalanceSubtask {
    fn name(&self) -> &'static str {
        "balance-subtask"
    }
    fn kind(&self) -> OpKind {
        OpKind::MoveSubtask
    }
    fn min_interval(&self) -> Duration {
        Duration::from_millis(200)
    }
    fn schedule(&mut self, view: &CoordView) -> Vec<Operator> {
        let mut out = Vec::new();
        let mut queued = Vec::new();
        for t in view.tasks.iter().filter(|t| !t.queued.is_empty()) {
            queued.clear();
            queued.extend(t.queued.iter().filter(|q| t.eligible.contains(&q.node)));
            for m in balance(&queued, &t.eligible) {
                if let Some(to) = m.to {
                    out.push(move_op(
                        self.name(),
                        PRIORITY_BALANCE,
                        m.subtask,
                        m.from,
                        to,
                    ));
                }
            }
        }
        out
    }
}

/// Moves queued subtasks off nodes whose CPU stayed above `high` for
/// `rounds` consecutive rounds, onto the coolest eligible node below `low`.
#[derive(Debug)]
pub struct HotNode {
    pub high: f32,
    pub low: f32,
    pub rounds: u32,
    /// Consecutive rounds each node was seen above the band.
    hot_for: BTreeMap<NodeId, u32>,
}

impl Default for HotNode {
    fn default() -> Self {
        HotNode {
            high: 0.85,
            low: 0.6,
            rounds: 3,
            hot_for: BTreeMap::new(),
        }
    }
}

impl Scheduler for HotNode {
    fn name(&self) -> &'static str {
        "hot-node"
    }
    fn kind(&self) -> OpKind {
        OpKind::MoveSubtask
    }
    fn min_interval(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn schedule(&mut self, view: &CoordView) -> Vec<Operator> {
        for n in &view.nodes {
            match view.cpu.get(&n.id) {
                Some(c) if *c > self.high && n.up => *self.hot_for.entry(n.id).or_default() += 1,
                _ => {
                    self.hot_for.remove(&n.id);
                }
            }
        }
        let hot: BTreeSet<NodeId> = self
            .hot_for
            .iter()
            .filter(|(_, r)| **r >= self.rounds)
            .map(|(n, _)| *n)
            .collect();
        if hot.is_empty() {
            return Vec::new();
        }
        let mut room = view.room();
        let mut out = Vec::new();
        for t in &view.tasks {
            for q in t.queued.iter().filter(|q| hot.contains(&q.node)) {
                let to = t
                    .eligible
                    .iter()
                    .filter(|n| {
                        view.cpu.get(*n).is_some_and(|c| *c < self.low) && room.free(**n) > 0
                    })
                    .min_by(|a, b| view.cpu[*a].total_cmp(&view.cpu[*b]).then(a.cmp(b)))
                    .copied();
                if let Some(to) = to {
                    room.take(to);
                    out.push(move_op(self.name(), PRIORITY_HOT, q.subtask, q.node, to));
                }
            }
        }
        out
    }
}

/// Moves Raft leadership to a voter matching the `leader` rules in force.
#[derive(Debug, Default)]
pub struct LeaderPlacement;

/// The voters the leader rules in force want, and the rules that apply
/// (active, and covering the key of some unfinished task or every key).
/// Empty rules: no wish. Empty nodes with rules: no voter can satisfy them.
pub fn wanted_leaders(view: &CoordView) -> (Vec<&Rule>, Vec<NodeId>) {
    let applying: Vec<&Rule> = view
        .rules
        .iter()
        .filter(|r| r.kind == RuleKind::Leader && r.is_active(view.now_ms))
        .filter(|r| {
            (r.start_key.is_empty() && r.end_key.is_empty())
                || view.tasks.iter().any(|t| r.covers(&t.key, &t.tenant))
        })
        .collect();
    if applying.is_empty() {
        return (applying, Vec::new());
    }
    let voters: Vec<&NodeView> = view
        .nodes
        .iter()
        .filter(|n| view.voters.contains(&n.id))
        .collect();
    let all: Vec<NodeId> = voters
        .iter()
        .filter(|n| applying.iter().all(|r| r.matches(n)))
        .map(|n| n.id)
        .collect();
    if !all.is_empty() {
        return (applying, all);
    }
    // No voter satisfies every rule: the first by key range wins.
    let first = applying
        .iter()
        .min_by(|a, b| (&a.start_key, &a.name).cmp(&(&b.start_key, &b.name)))
        .expect("not empty");
    let some = voters
        .iter()
        .filter(|n| first.matches(n))
        .map(|n| n.id)
        .collect();
    (applying, some)
}

impl Scheduler for LeaderPlacement {
    fn name(&self) -> &'static str {
        "leader-placement"
    }
    fn kind(&self) -> OpKind {
        OpKind::TransferLeader
    }
    fn min_interval(&self) -> Duration {
        Duration::from_millis(500)
    }
    fn schedule(&mut self, view: &CoordView) -> Vec<Operator> {
        let (rules, wanted) = wanted_leaders(view);
        if rules.is_empty() || wanted.is_empty() || wanted.contains(&view.leader) {
            return Vec::new();
        }
        // The least busy wanted voter.
        let to = *wanted
            .iter()
            .min_by_key(|n| (view.used.get(*n).copied().unwrap_or(0), **n))
            .expect("not empty");
        vec![Operator::new(
            OpKind::TransferLeader,
            self.name(),
            PRIORITY_RULE,
            vec![Step::TransferLeader {
                from: view.leader,
                to,
            }],
        )]
    }
}

/// A scheduler with its run state.
struct Slot {
    scheduler: Box<dyn Scheduler>,
    interval: Duration,
    next_ms: u64,
    created: u64,
}

/// A checker with what it created.
struct CheckerSlot {
    checker: Box<dyn Checker>,
    created: u64,
}

/// A scheduler's (or checker's) state as `scheduler list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerStatus {
    pub name: &'static str,
    pub state: &'static str,
    /// Zero for a checker: it runs every round.
    pub interval: Duration,
    pub operators: u64,
    pub checker: bool,
}

/// The scheduler states from the cluster config: `running` (the default),
/// `paused` or `removed`.
pub fn scheduler_state<'c>(config: &'c BTreeMap<String, String>, name: &str) -> &'c str {
    config
        .get(&format!("{SCHEDULER_KEY_PREFIX}{name}"))
        .map_or("running", String::as_str)
}

/// A new built-in scheduler by name.
pub fn new_scheduler(name: &str) -> Option<Box<dyn Scheduler>> {
    match name {
        "balance-subtask" => Some(Box::new(BalanceSubtask)),
        "hot-node" => Some(Box::new(HotNode::default())),
        "leader-placement" => Some(Box::new(LeaderPlacement)),
        _ => None,
    }
}

/// What the owner publishes of its coordinator for `scheduler list`,
/// `operator list` and heartbeat replies on this node, and what heartbeats
/// bring back for it.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Whether this node owns the cluster now.
    pub owner: bool,
    pub schedulers: Vec<SchedulerStatus>,
    pub operators: Vec<Operator>,
    pub recent: Vec<Operator>,
    /// Reports from heartbeats, for the owner's next round.
    pub reports: Vec<Report>,
    /// Operators created and retired by this node's coordinators, over
    /// every term it owned the cluster.
    pub counts: OperatorCounts,
}

/// Reports kept for the next round at most (a worker repeats a report
/// until its step is retired, so dropping some loses nothing).
const MAX_REPORTS: usize = 4096;

impl Published {
    /// The steps of the operators in flight that `node` acts on, with their
    /// operator ids.
    pub fn steps_for(&self, node: NodeId) -> Vec<(u64, Step)> {
        self.operators
            .iter()
            .filter(|o| o.state == OpState::Running)
            .flat_map(|o| o.steps_for(node).map(move |s| (o.id, *s)))
            .collect()
    }

    /// Keeps reports from a heartbeat for the owner (only while this node
    /// owns the cluster).
    pub fn add_reports(&mut self, reports: impl IntoIterator<Item = Report>) {
        if self.owner {
            let room = MAX_REPORTS.saturating_sub(self.reports.len());
            self.reports.extend(reports.into_iter().take(room));
        }
    }
}

/// Shared between the owner loop and the API of one node.
pub type Board = std::sync::Arc<std::sync::Mutex<Published>>;

/// The coordinator of one ownership term.
pub struct Coordinator {
    checkers: Vec<CheckerSlot>,
    schedulers: Vec<Slot>,
    pub operators: Operators,
}

impl OperatorCounts {
    /// Every (kind, source) an operator can be created by: the checkers and
    /// the built-in schedulers, so that a node can export zeros.
    pub fn sources() -> Vec<(OpKind, &'static str)> {
        let mut all: Vec<_> = SCHEDULERS
            .iter()
            .filter_map(|n| new_scheduler(n))
            .map(|s| (s.kind(), s.name()))
            .collect();
        let c = Coordinator::default();
        all.extend(
            c.checkers
                .iter()
                .map(|c| (c.checker.kind(), c.checker.name())),
        );
        all.sort();
        all
    }
}

impl Default for Coordinator {
    fn default() -> Self {
        Coordinator::new(DownNodeChecker::default().timeout)
    }
}

impl Coordinator {
    /// A coordinator whose down-node checker takes a worker silent for
    /// longer than `node_timeout` as down.
    pub fn new(node_timeout: Duration) -> Coordinator {
        let checkers: Vec<Box<dyn Checker>> = vec![
            Box::new(DownNodeChecker {
                timeout: node_timeout,
            }),
            Box::new(RuleChecker),
        ];
        Coordinator {
            checkers: checkers
                .into_iter()
                .map(|checker| CheckerSlot {
                    checker,
                    created: 0,
                })
                .collect(),
            schedulers: SCHEDULERS
                .iter()
                .filter_map(|n| new_scheduler(n))
                .map(|s| Slot {
                    interval: s.min_interval(),
                    scheduler: s,
                    next_ms: 0,
                    created: 0,
                })
                .collect(),
            operators: Operators::default(),
        }
    }

    /// Takes in what nodes reported about operator steps.
    pub fn reports(&mut self, reports: &[Report]) {
        for r in reports {
            if !self.operators.report(r) {
                tracing::debug!(
                    node = r.node,
                    operator = r.operator,
                    "report matches no step in flight"
                );
            }
        }
    }

    /// One round: retire finished operators, run every checker and every
    /// running scheduler that is due and allowed, admit what they created
    /// within the limits. Returns the operators to carry out.
    pub fn round(
        &mut self,
        view: &CoordView,
        config: &BTreeMap<String, String>,
        seen: &dyn Fn(TaskId, u32, u32) -> Option<Seen>,
    ) -> Vec<Operator> {
        let limits = Limits::from_config(config);
        self.operators.reconcile(view, seen);
        let mut out = Vec::new();
        for slot in &mut self.checkers {
            let admitted = self
                .operators
                .admit(slot.checker.check(view), view, &limits);
            slot.created += admitted.len() as u64;
            out.extend(admitted);
        }
        for slot in &mut self.schedulers {
            if scheduler_state(config, slot.scheduler.name()) != "running"
                || view.now_ms < slot.next_ms
                || !slot.scheduler.is_schedule_allowed(&self.operators, &limits)
            {
                continue;
            }
            let admitted = self
                .operators
                .admit(slot.scheduler.schedule(view), view, &limits);
            slot.created += admitted.len() as u64;
            slot.interval = slot.scheduler.next_interval(slot.interval, admitted.len());
            slot.next_ms = view.now_ms + slot.interval.as_millis() as u64;
            out.extend(admitted);
        }
        out
    }

    /// Publishes the current state on `board`.
    pub fn publish(&self, board: &Board, config: &BTreeMap<String, String>) {
        let mut b = board.lock().expect("board lock");
        b.owner = true;
        b.schedulers = self.status(config);
        b.operators = self.operators.list().cloned().collect();
        b.recent = self.operators.recent().cloned().collect();
        b.counts = self.operators.counts().clone();
    }

    /// The coordinator of a new ownership term on a node: nothing in
    /// flight, its operator counts continuing from what the node's earlier
    /// terms published on `board`.
    pub fn continuing(node_timeout: Duration, board: &Board) -> Coordinator {
        let mut c = Coordinator::new(node_timeout);
        c.operators.counts = board.lock().expect("board lock").counts.clone();
        c
    }

    /// Every checker, then every built-in scheduler with its state.
    pub fn status(&self, config: &BTreeMap<String, String>) -> Vec<SchedulerStatus> {
        let checkers = self.checkers.iter().map(|c| SchedulerStatus {
            name: c.checker.name(),
            state: "running",
            interval: Duration::ZERO,
            operators: c.created,
            checker: true,
        });
        let schedulers = self.schedulers.iter().map(|s| SchedulerStatus {
            name: s.scheduler.name(),
            state: match scheduler_state(config, s.scheduler.name()) {
                "paused" => "paused",
                "removed" => "removed",
                _ => "running",
            },
            interval: s.interval,
            operators: s.created,
            checker: false,
        });
        checkers.chain(schedulers).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_labels, SubtaskState};
    use crate::sched::checkers::check_rules;
    use crate::sched::rules;

    fn node(id: NodeId, slots: u32, labels: &str) -> NodeView {
        NodeView {
            id,
            labels: parse_labels(labels).unwrap(),
            scope: String::new(),
            slots,
            up: true,
        }
    }

    fn at(task: TaskId, ordinal: u32) -> SubtaskAt {
        SubtaskAt {
            task,
            step: 0,
            ordinal,
            attempt: 1,
        }
    }

    fn moves(ops: &[Operator]) -> Vec<(u32, NodeId, NodeId)> {
        ops.iter()
            .flat_map(|o| o.steps.iter())
            .filter_map(|s| match s {
                Step::MoveSubtask { subtask, from, to } => Some((subtask.ordinal, *from, *to)),
                _ => None,
            })
            .collect()
    }

    fn view_with_queued(queued: &[(u32, NodeId)], eligible: &[NodeId]) -> CoordView {
        let nodes: Vec<NodeView> = (1..=4).map(|i| node(i, 4, &format!("host=h{i}"))).collect();
        let mut used = BTreeMap::new();
        for (_, n) in queued {
            *used.entry(*n).or_default() += 1;
        }
        CoordView {
            now_ms: 1000,
            liveness: nodes
                .iter()
                .map(|n| Liveness {
                    id: n.id,
                    up: true,
                    worker: true,
                    heard_ms: 1000,
                })
                .collect(),
            nodes,
            used,
            tasks: vec![CoordTask {
                id: 1,
                key: "k".into(),
                tenant: "default".into(),
                eligible: eligible.to_vec(),
                pinned_by: None,
                queued: queued
                    .iter()
                    .map(|(o, n)| Queued {
                        subtask: at(1, *o),
                        node: *n,
                    })
                    .collect(),
            }],
            leader: 1,
            voters: BTreeSet::from([1]),
            ..Default::default()
        }
    }

    /// Time passes; every node keeps heartbeating.
    fn tick(v: &mut CoordView, ms: u64) {
        v.now_ms += ms;
        for n in &mut v.liveness {
            n.heard_ms = v.now_ms;
        }
    }

    fn seen_at(node: NodeId, attempt: u32, state: SubtaskState) -> Option<Seen> {
        Some(Seen {
            node,
            attempt,
            state,
        })
    }

    #[test]
    fn balance_evens_within_eligible_nodes_only() {
        // Pinned to nodes 1 and 2: four queued on node 1, one on node 3.
        let mut v = view_with_queued(&[(0, 1), (1, 1), (2, 1), (3, 1), (4, 3)], &[1, 2]);
        v.tasks[0].pinned_by = Some("pin".into());
        let got = moves(&BalanceSubtask.schedule(&v));
        assert!(got.iter().all(|(_, _, to)| [1, 2].contains(to)), "{got:?}");
        assert!(
            got.iter().all(|(o, _, _)| *o != 4),
            "the checker's: {got:?}"
        );
        assert_eq!(got.len(), 2);
        // The checker takes the stray one onto the rule's node with most room.
        let fix = moves(&check_rules(&v));
        assert_eq!(fix, vec![(4, 3, 2)]);
    }

    #[test]
    fn rule_checker_waits_when_the_rule_nodes_are_full() {
        let mut v = view_with_queued(&[(0, 3), (1, 3)], &[1]);
        v.tasks[0].pinned_by = Some("pin".into());
        v.used.insert(1, 4);
        assert!(check_rules(&v).is_empty());
        v.used.insert(1, 3);
        assert_eq!(moves(&check_rules(&v)), vec![(0, 3, 1)]);
    }

    #[test]
    fn limits_bound_operators_in_flight() {
        let mut v = view_with_queued(&[(0, 3), (1, 3), (2, 3)], &[1, 2]);
        v.tasks[0].pinned_by = Some("pin".into());
        let config = BTreeMap::from([(SUBTASK_LIMIT_KEY.to_string(), "1".to_string())]);
        let mut c = Coordinator::default();
        let nowhere = |_: TaskId, _: u32, _: u32| seen_at(3, 1, SubtaskState::Pending);
        let first = c.round(&v, &config, &nowhere);
        assert_eq!(first.len(), 1);
        assert_eq!(c.operators.in_flight(OpKind::MoveSubtask), 1);
        // While it is in flight nothing else moves, even once it runs on
        // its new node: the node has not reported yet.
        tick(&mut v, 100);
        let (moved, to) = match first[0].steps[0] {
            Step::MoveSubtask { subtask, to, .. } => (subtask, to),
            _ => unreachable!(),
        };
        let running_there = move |t: TaskId, s: u32, o: u32| {
            if (t, s, o) == moved.id() {
                seen_at(to, 2, SubtaskState::Running)
            } else {
                seen_at(3, 1, SubtaskState::Pending)
            }
        };
        assert!(c.round(&v, &config, &running_there).is_empty());
        // Its report frees the limit: the next one goes.
        c.reports(&[Report {
            node: to,
            operator: first[0].id,
            subtask: SubtaskAt {
                attempt: 2,
                ..moved
            },
            outcome: StepOutcome::Taken,
        }]);
        assert_eq!(c.operators.recent().next().unwrap().state, OpState::Done);
        v.tasks[0].queued.retain(|q| q.subtask.id() != moved.id());
        assert_eq!(c.round(&v, &config, &running_there).len(), 1);
        // A limit of 0 stops moves; an operator past its deadline times out.
        let zero = BTreeMap::from([(SUBTASK_LIMIT_KEY.to_string(), "0".to_string())]);
        tick(&mut v, 31_000);
        assert!(c.round(&v, &zero, &running_there).is_empty());
        assert_eq!(c.operators.in_flight(OpKind::MoveSubtask), 0);
        assert_eq!(
            c.operators.recent().next().unwrap().state,
            OpState::TimedOut
        );
    }

    /// One move of subtask 0 from node 3 to node 1, admitted.
    fn one_move() -> (Coordinator, CoordView, Operator) {
        let mut v = view_with_queued(&[(0, 3)], &[1]);
        v.tasks[0].pinned_by = Some("pin".into());
        let mut c = Coordinator::default();
        let queued = |_: TaskId, _: u32, _: u32| seen_at(3, 1, SubtaskState::Pending);
        let ops = c.round(&v, &BTreeMap::new(), &queued);
        assert_eq!(moves(&ops), vec![(0, 3, 1)]);
        v.tasks[0].queued.clear();
        (c, v, ops[0].clone())
    }

    fn report(op: &Operator, node: NodeId, attempt: u32, outcome: StepOutcome) -> Report {
        Report {
            node,
            operator: op.id,
            subtask: SubtaskAt {
                attempt,
                ..at(1, 0)
            },
            outcome,
        }
    }

    #[test]
    fn a_move_is_done_by_the_report_of_the_node_it_went_to() {
        let (mut c, mut v, op) = one_move();
        let mut board = Published {
            owner: true,
            operators: c.operators.list().cloned().collect(),
            ..Published::default()
        };
        // The step reaches both nodes, and only them.
        let step = op.steps[0];
        assert_eq!(board.steps_for(3), vec![(op.id, step)]);
        assert_eq!(board.steps_for(1), vec![(op.id, step)]);
        assert!(board.steps_for(2).is_empty());
        // Queued, then running on node 1 in the replicated state: in flight.
        let there = |state| move |_: TaskId, _: u32, _: u32| seen_at(1, 2, state);
        for state in [SubtaskState::Pending, SubtaskState::Running] {
            tick(&mut v, 100);
            c.round(&v, &BTreeMap::new(), &there(state));
            assert_eq!(c.operators.in_flight(OpKind::MoveSubtask), 1);
        }
        // The node it left reports: noted, not done.
        board.add_reports([report(&op, 3, 1, StepOutcome::Released)]);
        // Reports that do not match the step change nothing: another node,
        // the old attempt, an unknown operator.
        board.add_reports([
            report(&op, 2, 2, StepOutcome::Taken),
            report(&op, 1, 1, StepOutcome::Taken),
            Report {
                operator: 99,
                ..report(&op, 1, 2, StepOutcome::Taken)
            },
        ]);
        c.reports(&std::mem::take(&mut board.reports));
        let live = c.operators.list().next().expect("still in flight");
        assert_eq!(live.reports, vec![report(&op, 3, 1, StepOutcome::Released)]);
        // The node it went to reports it took it: done, by its report.
        c.reports(&[report(&op, 1, 2, StepOutcome::Taken)]);
        assert_eq!(c.operators.in_flight(OpKind::MoveSubtask), 0);
        let done = c.operators.recent().next().unwrap();
        assert_eq!(done.state, OpState::Done);
        assert_eq!(done.confirmed_by, Some(Confirmation::Report(1)));
        assert_eq!(done.reports.len(), 2);
        assert_eq!(done.reports[1].to_string(), "node 1 took 1/0/0");
        // A node that does not own the cluster keeps no reports.
        let mut follower = Published::default();
        follower.add_reports([report(&op, 1, 2, StepOutcome::Taken)]);
        assert!(follower.reports.is_empty());
    }

    #[test]
    fn a_move_its_node_never_reports_times_out() {
        let (mut c, mut v, _) = one_move();
        let running = |_: TaskId, _: u32, _: u32| seen_at(1, 2, SubtaskState::Running);
        tick(&mut v, 29_000);
        c.round(&v, &BTreeMap::new(), &running);
        assert_eq!(c.operators.in_flight(OpKind::MoveSubtask), 1);
        tick(&mut v, 1_000);
        c.round(&v, &BTreeMap::new(), &running);
        let op = c.operators.recent().next().unwrap();
        assert_eq!(op.state, OpState::TimedOut);
        assert_eq!(op.confirmed_by, None);
    }

    #[test]
    fn operator_counts_go_on_across_ownership_terms_of_a_node() {
        let (mut c, mut v, _) = one_move();
        let running = |_: TaskId, _: u32, _: u32| seen_at(1, 2, SubtaskState::Running);
        tick(&mut v, 30_000);
        c.round(&v, &BTreeMap::new(), &running);
        let board = Board::default();
        c.publish(&board, &BTreeMap::new());
        let counts = board.lock().unwrap().counts.clone();
        let move_by_rule = (OpKind::MoveSubtask, "rule-checker");
        assert_eq!(counts.created, BTreeMap::from([(move_by_rule, 1)]));
        assert_eq!(
            counts.finished,
            BTreeMap::from([((OpKind::MoveSubtask, OpState::TimedOut), 1)])
        );
        // The next term starts with nothing in flight and the counts so far;
        // a second cancel of one operator counts nothing.
        let mut next = Coordinator::continuing(Duration::from_secs(5), &board);
        assert_eq!(next.operators.list().count(), 0);
        assert_eq!(next.operators.counts(), &counts);
        let mut v = view_with_queued(&[(0, 3)], &[1]);
        v.tasks[0].pinned_by = Some("pin".into());
        let queued = |_: TaskId, _: u32, _: u32| seen_at(3, 1, SubtaskState::Pending);
        let ops = next.round(&v, &BTreeMap::new(), &queued);
        next.operators.cancel(ops[0].id);
        next.operators.cancel(ops[0].id);
        let after = next.operators.counts();
        assert_eq!(after.created[&move_by_rule], 2);
        assert_eq!(
            after.finished[&(OpKind::MoveSubtask, OpState::Cancelled)],
            1
        );
        let sources = OperatorCounts::sources();
        for s in [
            (OpKind::MoveSubtask, "balance-subtask"),
            (OpKind::MoveSubtask, "hot-node"),
            (OpKind::MoveSubtask, "rule-checker"),
            (OpKind::NodeDown, "down-node-checker"),
            (OpKind::TransferLeader, "leader-placement"),
        ] {
            assert!(sources.contains(&s), "{s:?} in {sources:?}");
        }
    }

    #[test]
    fn the_replicated_state_ends_a_move_the_report_cannot() {
        // Finished where it went (its node restarted before reporting):
        // done, by the state.
        let (mut c, v, _) = one_move();
        let finished = |_: TaskId, _: u32, _: u32| seen_at(1, 2, SubtaskState::Succeed);
        c.round(&v, &BTreeMap::new(), &finished);
        let op = c.operators.recent().next().unwrap();
        assert_eq!(
            (op.state, op.confirmed_by),
            (OpState::Done, Some(Confirmation::State))
        );
        // Requeued, moved on, or started elsewhere: cancelled.
        for (node, attempt, state) in [
            (0, 2, SubtaskState::Pending),
            (2, 3, SubtaskState::Pending),
            (3, 1, SubtaskState::Running),
        ] {
            let (mut c, v, _) = one_move();
            let elsewhere = move |_: TaskId, _: u32, _: u32| seen_at(node, attempt, state);
            c.round(&v, &BTreeMap::new(), &elsewhere);
            let op = c.operators.recent().next().expect("ended");
            assert_eq!(op.state, OpState::Cancelled, "{node} {attempt} {state}");
        }
    }

    fn active(ordinal: u32, running: bool, idempotent: bool) -> Active {
        Active {
            subtask: at(1, ordinal),
            running,
            idempotent,
        }
    }

    #[test]
    fn the_down_node_checker_marks_silent_workers_and_takes_their_work_back() {
        let mut v = view_with_queued(&[], &[1, 2]);
        v.now_ms = 10_000;
        v.liveness.iter_mut().for_each(|n| n.heard_ms = 9_000);
        v.liveness[1].heard_ms = 4_000; // node 2: silent for 6 s
        v.liveness[2].heard_ms = 6_000; // node 3: 4 s, within the timeout
        v.liveness[3].up = false; // node 4: already down
        v.active = BTreeMap::from([
            (2, vec![active(0, true, true), active(1, true, false)]),
            (3, vec![active(2, false, true)]),
            (4, vec![active(3, false, false)]),
        ]);
        let mut checker = DownNodeChecker::default();
        let ops = checker.check(&v);
        let steps: Vec<Vec<String>> = ops
            .iter()
            .map(|o| o.steps.iter().map(Step::to_string).collect())
            .collect();
        assert_eq!(
            steps,
            vec![
                vec![
                    "mark node 2 down (silent for 6000 ms)".to_string(),
                    "take 1/0/0 back from node 2 (requeue)".into(),
                    "take 1/0/1 back from node 2 (fail)".into(),
                ],
                vec!["take 1/0/3 back from node 4 (requeue)".into()],
            ]
        );
        assert!(ops.iter().all(|o| o.kind == OpKind::NodeDown));
        // A node that registered as no worker gives its subtasks back too.
        v.liveness[2].worker = false;
        assert_eq!(checker.check(&v).len(), 3);
        // A down node with nothing left: nothing to do.
        v.active.clear();
        v.liveness[2].worker = true;
        assert_eq!(checker.check(&v).len(), 1, "only the mark of node 2");
    }

    #[test]
    fn down_nodes_come_first_unlimited_and_nothing_moves_onto_them() {
        // Subtask 0 queued on node 3 off its rule's node 2; node 2 silent.
        let mut v = view_with_queued(&[(0, 3)], &[2]);
        v.tasks[0].pinned_by = Some("pin".into());
        v.now_ms = 10_000;
        v.liveness.iter_mut().for_each(|n| n.heard_ms = 9_000);
        v.liveness[1].heard_ms = 1_000;
        v.active = BTreeMap::from([(2, vec![active(5, true, true)])]);
        let zero = BTreeMap::from([(SUBTASK_LIMIT_KEY.to_string(), "0".to_string())]);
        let mut c = Coordinator::default();
        let none = |_: TaskId, _: u32, _: u32| None;
        // No move limit holds a node-down operator back.
        let ops = c.round(&v, &zero, &none);
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert_eq!(ops[0].kind, OpKind::NodeDown);
        assert_eq!(ops[0].source, "down-node-checker");
        // While it is in flight the node is not found again, and nothing
        // moves onto it.
        assert!(c.round(&v, &BTreeMap::new(), &none).is_empty());
        let fix = check_rules(&v);
        assert_eq!(moves(&fix), vec![(0, 3, 2)]);
        assert!(c.operators.admit(fix, &v, &Limits::default()).is_empty());
        // Its commands applied: done; the checker finds what is left next.
        c.operators.carried_out(ops[0].id, true);
        let done = c.operators.recent().next().unwrap();
        assert_eq!(
            (done.state, done.confirmed_by),
            (OpState::Done, Some(Confirmation::State))
        );
        v.liveness[1].up = false;
        v.nodes[1].up = false;
        v.active.clear();
        assert!(c.round(&v, &BTreeMap::new(), &none).is_empty());
        let status = c.status(&BTreeMap::new());
        let names: Vec<(&str, bool, u64)> = status
            .iter()
            .map(|s| (s.name, s.checker, s.operators))
            .collect();
        assert_eq!(
            names,
            vec![
                ("down-node-checker", true, 1),
                ("rule-checker", true, 0),
                ("balance-subtask", false, 0),
                ("hot-node", false, 0),
                ("leader-placement", false, 0),
            ]
        );
    }

    #[test]
    fn paused_schedulers_do_not_run_and_back_off_when_idle() {
        let v = view_with_queued(&[(0, 1), (1, 1), (2, 1), (3, 1)], &[1, 2]);
        let paused = BTreeMap::from([(
            format!("{SCHEDULER_KEY_PREFIX}balance-subtask"),
            "paused".to_string(),
        )]);
        let none = |_: TaskId, _: u32, _: u32| -> Option<Seen> { None };
        let mut c = Coordinator::default();
        assert!(c.round(&v, &paused, &none).is_empty());
        let status = c.status(&paused);
        let balance = status.iter().find(|s| s.name == "balance-subtask").unwrap();
        assert_eq!(balance.state, "paused");
        let got = c.round(&v, &BTreeMap::new(), &none);
        assert_eq!(got.len(), 2);
        let b = BalanceSubtask;
        assert_eq!(
            b.next_interval(Duration::from_millis(200), 0),
            Duration::from_millis(400)
        );
        assert_eq!(b.next_interval(Duration::from_secs(4), 0), MAX_INTERVAL);
        assert_eq!(b.next_interval(Duration::from_secs(4), 3), b.min_interval());
    }

    #[test]
    fn hot_node_moves_after_the_cpu_stays_high() {
        let mut v = view_with_queued(&[(0, 1), (1, 1)], &[1, 2, 3]);
        v.cpu = BTreeMap::from([(1, 0.95), (2, 0.5), (3, 0.2)]);
        let mut h = HotNode::default();
        assert!(h.schedule(&v).is_empty());
        assert!(h.schedule(&v).is_empty());
        assert_eq!(moves(&h.schedule(&v)), vec![(0, 1, 3), (1, 1, 3)]);
        v.cpu.insert(1, 0.5);
        assert!(h.schedule(&v).is_empty(), "the streak is broken");
    }

    #[test]
    fn leader_placement_follows_active_leader_rules() {
        let mut v = view_with_queued(&[], &[1]);
        v.voters = BTreeSet::from([1, 2, 3]);
        v.rules = rules::parse(
            "[[rule]]\nname = \"own\"\nkind = \"leader\"\ntargets = [{ host = \"h3\" }]\n",
        )
        .unwrap();
        let ops = LeaderPlacement.schedule(&v);
        assert_eq!(ops[0].steps, vec![Step::TransferLeader { from: 1, to: 3 }]);
        v.leader = 3;
        assert!(LeaderPlacement.schedule(&v).is_empty());
        // A ranged rule applies only while a task's key is in its range.
        v.leader = 1;
        v.rules = rules::parse(
            "[[rule]]\nname = \"own\"\nkind = \"leader\"\nstart_key = \"x\"\ntargets = [{ host = \"h3\" }]\n",
        )
        .unwrap();
        assert!(LeaderPlacement.schedule(&v).is_empty());
        v.tasks[0].key = "xy".into();
        assert_eq!(LeaderPlacement.schedule(&v).len(), 1);
    }
}
