//! The coordinator (PD style) of the owner: checkers that patrol the
//! cluster for rule violations, schedulers behind one [`Scheduler`] trait
//! that run on their own intervals with back-off, and the [`Operators`]
//! controller that admits their operators within per-kind in-flight limits,
//! tracks them until done and times them out.
//!
//! Everything here is pure: a [`CoordView`] of the cluster in, operators
//! out. The owner's loop builds the view from the replicated state, carries
//! the new operators out through replicated commands (a move is an
//! `AssignSubtask` of a queued subtask to its new node, which the workers
//! see in their next assignment poll; a leader transfer is a Raft leader
//! transfer) and reports back what it saw.
//!
//! Schedulers: `balance-subtask` evens each task's queued subtasks over its
//! eligible nodes; `hot-node` moves queued subtasks off nodes whose CPU
//! stayed above a band; `leader-placement` moves Raft leadership to a node
//! matching the `leader` rules in force. The rule checker moves queued
//! subtasks of pinned tasks onto their rule's nodes (when one has room).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::balance::{balance, Queued};
use super::rules::{Rule, RuleKind};
use crate::model::{NodeId, NodeView, TaskId};

/// Cluster config key: moves in flight at once.
pub const SUBTASK_LIMIT_KEY: &str = "subtask-schedule-limit";
/// Cluster config key: leader transfers in flight at once.
pub const LEADER_LIMIT_KEY: &str = "leader-schedule-limit";
/// Cluster config key: how long an operator may take, in ms.
pub const OPERATOR_TIMEOUT_KEY: &str = "operator-timeout-ms";
/// Cluster config key prefix of a scheduler's state: `scheduler.<name>` =
/// `running`, `paused` or `removed`.
pub const SCHEDULER_KEY_PREFIX: &str = "scheduler.";

/// The built-in schedulers, all running unless the config says otherwise.
pub const SCHEDULERS: &[&str] = &["balance-subtask", "hot-node", "leader-placement"];

/// A subtask at one assignment (fenced by its attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubtaskAt {
    pub task: TaskId,
    pub step: u32,
    pub ordinal: u32,
    pub attempt: u32,
}

impl SubtaskAt {
    /// The subtask regardless of attempt.
    pub fn id(&self) -> (TaskId, u32, u32) {
        (self.task, self.step, self.ordinal)
    }
}

/// What an operator changes; its in-flight limit is per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpKind {
    MoveSubtask,
    TransferLeader,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::MoveSubtask => "move-subtask",
            OpKind::TransferLeader => "transfer-leader",
        }
    }
}

/// One step of an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A queued subtask goes from one node to another.
    MoveSubtask {
        subtask: SubtaskAt,
        from: NodeId,
        to: NodeId,
    },
    /// Raft leadership (the owner) goes to `to`.
    TransferLeader { from: NodeId, to: NodeId },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::MoveSubtask {
                subtask: s,
                from,
                to,
            } => write!(
                f,
                "move {}/{}/{} from node {from} to node {to}",
                s.task, s.step, s.ordinal
            ),
            Step::TransferLeader { from, to } => {
                write!(f, "transfer leader from node {from} to node {to}")
            }
        }
    }
}

/// Where an operator stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpState {
    /// Created, not carried out yet.
    New,
    /// Carried out, waiting to see its effect.
    Running,
    Done,
    /// The cluster changed under it (e.g. the subtask started first).
    Cancelled,
    TimedOut,
}

impl OpState {
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::New => "new",
            OpState::Running => "running",
            OpState::Done => "done",
            OpState::Cancelled => "cancelled",
            OpState::TimedOut => "timed-out",
        }
    }
}

impl OpState {
    /// The states an operator ends in.
    pub const FINAL: [OpState; 3] = [OpState::Done, OpState::Cancelled, OpState::TimedOut];
}

/// The source of the rule checker's operators.
pub const RULE_CHECKER: &str = "rule-checker";

/// A scheduling operation: who asked, how urgent, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub id: u64,
    pub kind: OpKind,
    /// The scheduler or checker that created it.
    pub source: &'static str,
    /// Higher first when several compete for the limit.
    pub priority: u32,
    pub steps: Vec<Step>,
    pub created_ms: u64,
    pub deadline_ms: u64,
    pub state: OpState,
}

/// Priorities: rule enforcement first, then hot spots, then balance.
pub const PRIORITY_RULE: u32 = 3;
pub const PRIORITY_HOT: u32 = 2;
pub const PRIORITY_BALANCE: u32 = 1;

fn operator(kind: OpKind, source: &'static str, priority: u32, step: Step) -> Operator {
    Operator {
        id: 0,
        kind,
        source,
        priority,
        steps: vec![step],
        created_ms: 0,
        deadline_ms: 0,
        state: OpState::New,
    }
}

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
    pub tasks: Vec<CoordTask>,
    pub rules: Vec<Rule>,
    /// This node: the leader.
    pub leader: NodeId,
    /// Up scheduler (voter) nodes: the possible leaders.
    pub voters: BTreeSet<NodeId>,
}

impl CoordView {
    fn slots(&self, node: NodeId) -> u32 {
        self.nodes
            .iter()
            .find(|n| n.id == node && n.up)
            .map_or(0, |n| n.slots)
    }
}

/// What decides whether and when a scheduler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub subtask: usize,
    pub leader: usize,
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            subtask: 8,
            leader: 1,
            timeout: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// The limits from the replicated cluster config; a missing or bad
    /// value keeps its default (`stoker config set` accepts any string).
    pub fn from_config(config: &BTreeMap<String, String>) -> Limits {
        let d = Limits::default();
        let num = |k: &str| config.get(k).and_then(|v| v.trim().parse::<u64>().ok());
        Limits {
            subtask: num(SUBTASK_LIMIT_KEY).map_or(d.subtask, |v| v as usize),
            leader: num(LEADER_LIMIT_KEY).map_or(d.leader, |v| v as usize),
            timeout: num(OPERATOR_TIMEOUT_KEY)
                .filter(|v| *v > 0)
                .map_or(d.timeout, Duration::from_millis),
        }
    }

    pub fn of(&self, kind: OpKind) -> usize {
        match kind {
            OpKind::MoveSubtask => self.subtask,
            OpKind::TransferLeader => self.leader,
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
        for t in &view.tasks {
            let allowed: BTreeSet<NodeId> = t.eligible.iter().copied().collect();
            let queued: Vec<Queued<SubtaskAt>> = t
                .queued
                .iter()
                .filter(|q| allowed.contains(&q.node))
                .copied()
                .collect();
            for m in balance(&queued, &t.eligible) {
                if let Some(to) = m.to {
                    out.push(operator(
                        OpKind::MoveSubtask,
                        self.name(),
                        PRIORITY_BALANCE,
                        Step::MoveSubtask {
                            subtask: m.subtask,
                            from: m.from,
                            to,
                        },
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
        let mut incoming: BTreeMap<NodeId, u32> = BTreeMap::new();
        let mut out = Vec::new();
        for t in &view.tasks {
            for q in t.queued.iter().filter(|q| hot.contains(&q.node)) {
                let to = t
                    .eligible
                    .iter()
                    .filter(|n| {
                        view.cpu.get(*n).is_some_and(|c| *c < self.low)
                            && free(view, **n, &incoming) > 0
                    })
                    .min_by(|a, b| view.cpu[*a].total_cmp(&view.cpu[*b]).then(a.cmp(b)))
                    .copied();
                if let Some(to) = to {
                    *incoming.entry(to).or_default() += 1;
                    out.push(operator(
                        OpKind::MoveSubtask,
                        self.name(),
                        PRIORITY_HOT,
                        Step::MoveSubtask {
                            subtask: q.subtask,
                            from: q.node,
                            to,
                        },
                    ));
                }
            }
        }
        out
    }
}

fn free(view: &CoordView, node: NodeId, incoming: &BTreeMap<NodeId, u32>) -> u32 {
    view.slots(node).saturating_sub(
        view.used.get(&node).copied().unwrap_or(0) + incoming.get(&node).copied().unwrap_or(0),
    )
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
        vec![operator(
            OpKind::TransferLeader,
            self.name(),
            PRIORITY_RULE,
            Step::TransferLeader {
                from: view.leader,
                to,
            },
        )]
    }
}

/// The rule checker: queued subtasks of a pinned task that sit off its
/// rule's nodes move onto the matching node with the most room. When none
/// has room nothing moves: the rule waits rather than overload a node.
pub fn check_rules(view: &CoordView) -> Vec<Operator> {
    let mut incoming: BTreeMap<NodeId, u32> = BTreeMap::new();
    let mut out = Vec::new();
    for t in view.tasks.iter().filter(|t| t.pinned_by.is_some()) {
        let allowed: BTreeSet<NodeId> = t.eligible.iter().copied().collect();
        for q in t.queued.iter().filter(|q| !allowed.contains(&q.node)) {
            let to = t
                .eligible
                .iter()
                .map(|n| (free(view, *n, &incoming), *n))
                .filter(|(f, _)| *f > 0)
                .max_by_key(|(f, n)| (*f, std::cmp::Reverse(*n)))
                .map(|(_, n)| n);
            if let Some(to) = to {
                *incoming.entry(to).or_default() += 1;
                out.push(operator(
                    OpKind::MoveSubtask,
                    RULE_CHECKER,
                    PRIORITY_RULE,
                    Step::MoveSubtask {
                        subtask: q.subtask,
                        from: q.node,
                        to,
                    },
                ));
            }
        }
    }
    out
}

/// Where a subtask is now, as the owner reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub node: NodeId,
    pub attempt: u32,
    pub running: bool,
}

/// How many operators a coordinator created and retired: counters for
/// `/metrics`, carried from one ownership term to the next on a node so
/// that they never go back while its process runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperatorCounts {
    /// By kind and source (the scheduler or checker that created them).
    pub created: BTreeMap<(OpKind, &'static str), u64>,
    /// By kind and the state they ended in (done, cancelled, timed-out).
    pub finished: BTreeMap<(OpKind, OpState), u64>,
}

impl OperatorCounts {
    /// Every (kind, source) an operator can be created by: the built-in
    /// schedulers and the rule checker, so that a node can export zeros.
    pub fn sources() -> Vec<(OpKind, &'static str)> {
        let mut all: Vec<_> = SCHEDULERS
            .iter()
            .filter_map(|n| new_scheduler(n))
            .map(|s| (s.kind(), s.name()))
            .collect();
        all.push((OpKind::MoveSubtask, RULE_CHECKER));
        all.sort();
        all
    }
}

/// The operators in flight, with their limits, recent history and counts.
#[derive(Debug, Default)]
pub struct Operators {
    next_id: u64,
    in_flight: BTreeMap<u64, Operator>,
    recent: VecDeque<Operator>,
    counts: OperatorCounts,
}

/// Finished operators kept for `operator list`.
const RECENT: usize = 64;

impl Operators {
    pub fn in_flight(&self, kind: OpKind) -> usize {
        self.in_flight.values().filter(|o| o.kind == kind).count()
    }

    pub fn list(&self) -> impl Iterator<Item = &Operator> {
        self.in_flight.values()
    }

    pub fn recent(&self) -> impl Iterator<Item = &Operator> {
        self.recent.iter()
    }

    pub fn counts(&self) -> &OperatorCounts {
        &self.counts
    }

    fn busy_subtasks(&self) -> BTreeSet<(TaskId, u32, u32)> {
        self.in_flight
            .values()
            .flat_map(|o| o.steps.iter())
            .filter_map(|s| match s {
                Step::MoveSubtask { subtask, .. } => Some(subtask.id()),
                Step::TransferLeader { .. } => None,
            })
            .collect()
    }

    /// Admits operators (highest priority first) while their kind's limit
    /// allows, one per subtask, and a move only onto a node with a free
    /// slot (counting moves already heading there). Returns the admitted
    /// ones, to carry out.
    pub fn admit(
        &mut self,
        mut ops: Vec<Operator>,
        view: &CoordView,
        limits: &Limits,
    ) -> Vec<Operator> {
        ops.sort_by_key(|o| std::cmp::Reverse(o.priority));
        let mut busy = self.busy_subtasks();
        let mut incoming: BTreeMap<NodeId, u32> = BTreeMap::new();
        for o in self.in_flight.values() {
            for s in &o.steps {
                if let Step::MoveSubtask { to, .. } = s {
                    *incoming.entry(*to).or_default() += 1;
                }
            }
        }
        let mut out = Vec::new();
        for mut op in ops {
            if self.in_flight(op.kind) >= limits.of(op.kind) {
                continue;
            }
            let fits = op.steps.iter().all(|s| match s {
                Step::MoveSubtask { subtask, to, .. } => {
                    !busy.contains(&subtask.id()) && free(view, *to, &incoming) > 0
                }
                Step::TransferLeader { to, .. } => view.voters.contains(to),
            });
            if !fits {
                continue;
            }
            for s in &op.steps {
                if let Step::MoveSubtask { subtask, to, .. } = s {
                    busy.insert(subtask.id());
                    *incoming.entry(*to).or_default() += 1;
                }
            }
            self.next_id += 1;
            op.id = self.next_id;
            op.created_ms = view.now_ms;
            op.deadline_ms = view.now_ms + limits.timeout.as_millis() as u64;
            op.state = OpState::Running;
            *self.counts.created.entry((op.kind, op.source)).or_default() += 1;
            self.in_flight.insert(op.id, op.clone());
            out.push(op);
        }
        out
    }

    /// An operator could not be carried out (its command was refused).
    pub fn cancel(&mut self, id: u64) {
        self.finish(id, OpState::Cancelled);
    }

    fn finish(&mut self, id: u64, state: OpState) {
        if let Some(mut op) = self.in_flight.remove(&id) {
            op.state = state;
            *self.counts.finished.entry((op.kind, state)).or_default() += 1;
            self.recent.push_front(op);
            self.recent.truncate(RECENT);
        }
    }

    /// Retires operators whose effect is seen (a moved subtask started on
    /// its new node, or left the active set), whose subtask went elsewhere,
    /// or whose deadline passed. `seen` maps an active subtask to where it
    /// is; `leader` is the current leader.
    pub fn reconcile(
        &mut self,
        now_ms: u64,
        seen: &dyn Fn(TaskId, u32, u32) -> Option<Seen>,
        leader: NodeId,
    ) {
        let mut ended = Vec::new();
        for (id, op) in &self.in_flight {
            let mut state = None;
            for s in &op.steps {
                state = match s {
                    Step::MoveSubtask { subtask, to, .. } => {
                        match seen(subtask.task, subtask.step, subtask.ordinal) {
                            None => Some(OpState::Done),
                            Some(at) if at.node == 0 => Some(OpState::Cancelled),
                            Some(at) if at.node == *to && at.running => Some(OpState::Done),
                            Some(at) if at.node != *to && at.attempt > subtask.attempt + 1 => {
                                Some(OpState::Cancelled)
                            }
                            Some(_) => None,
                        }
                    }
                    Step::TransferLeader { to, .. } => (leader == *to).then_some(OpState::Done),
                };
            }
            match state {
                Some(st) => ended.push((*id, st)),
                None if now_ms >= op.deadline_ms => ended.push((*id, OpState::TimedOut)),
                None => {}
            }
        }
        for (id, st) in ended {
            self.finish(id, st);
        }
    }
}

/// A scheduler with its run state.
struct Slot {
    scheduler: Box<dyn Scheduler>,
    interval: Duration,
    next_ms: u64,
    created: u64,
}

/// A scheduler's state as `scheduler list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerStatus {
    pub name: &'static str,
    pub state: &'static str,
    pub interval: Duration,
    pub operators: u64,
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

/// What the owner publishes of its coordinator for `scheduler list` and
/// `operator list` on this node.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Whether this node owns the cluster now.
    pub owner: bool,
    pub schedulers: Vec<SchedulerStatus>,
    pub operators: Vec<Operator>,
    pub recent: Vec<Operator>,
    /// Operators created and retired by this node's coordinators, over
    /// every term it owned the cluster.
    pub counts: OperatorCounts,
}

/// Shared between the owner loop and the API of one node.
pub type Board = std::sync::Arc<std::sync::Mutex<Published>>;

/// The coordinator of one ownership term.
pub struct Coordinator {
    schedulers: Vec<Slot>,
    pub operators: Operators,
}

impl Default for Coordinator {
    fn default() -> Self {
        Coordinator {
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
}

impl Coordinator {
    /// The coordinator of a new ownership term on a node: nothing in
    /// flight, its counts continuing from what the node's earlier terms
    /// published on `board`.
    pub fn continuing(board: &Board) -> Coordinator {
        let mut c = Coordinator::default();
        c.operators.counts = board.lock().expect("board lock").counts.clone();
        c
    }

    /// One round: retire finished operators, run the rule checker and
    /// every running scheduler that is due and allowed, admit what they
    /// created within the limits. Returns the operators to carry out.
    pub fn round(
        &mut self,
        view: &CoordView,
        config: &BTreeMap<String, String>,
        seen: &dyn Fn(TaskId, u32, u32) -> Option<Seen>,
    ) -> Vec<Operator> {
        let limits = Limits::from_config(config);
        self.operators.reconcile(view.now_ms, seen, view.leader);
        let mut out = self.operators.admit(check_rules(view), view, &limits);
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
        b.counts = self.operators.counts.clone();
    }

    /// Every built-in scheduler with its state.
    pub fn status(&self, config: &BTreeMap<String, String>) -> Vec<SchedulerStatus> {
        self.schedulers
            .iter()
            .map(|s| SchedulerStatus {
                name: s.scheduler.name(),
                state: match scheduler_state(config, s.scheduler.name()) {
                    "paused" => "paused",
                    "removed" => "removed",
                    _ => "running",
                },
                interval: s.interval,
                operators: s.created,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_labels;
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
                Step::TransferLeader { .. } => None,
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
        let nowhere = |_: TaskId, _: u32, _: u32| -> Option<Seen> {
            Some(Seen {
                node: 3,
                attempt: 1,
                running: false,
            })
        };
        let first = c.round(&v, &config, &nowhere);
        assert_eq!(first.len(), 1);
        assert_eq!(c.operators.in_flight(OpKind::MoveSubtask), 1);
        // While it is in flight nothing else moves.
        v.now_ms += 100;
        let moved = match first[0].steps[0] {
            Step::MoveSubtask { subtask, to, .. } => (subtask, to),
            _ => unreachable!(),
        };
        let pending_there = move |t: TaskId, s: u32, o: u32| -> Option<Seen> {
            Some(Seen {
                node: if (t, s, o) == moved.0.id() {
                    moved.1
                } else {
                    3
                },
                attempt: 2,
                running: false,
            })
        };
        assert!(c.round(&v, &config, &pending_there).is_empty());
        // Once it runs on its new node, the next one goes.
        let running_there = move |t: TaskId, s: u32, o: u32| -> Option<Seen> {
            let here = (t, s, o) == moved.0.id();
            Some(Seen {
                node: if here { moved.1 } else { 3 },
                attempt: if here { 2 } else { 1 },
                running: here,
            })
        };
        v.tasks[0].queued.retain(|q| q.subtask.id() != moved.0.id());
        assert_eq!(c.round(&v, &config, &running_there).len(), 1);
        assert_eq!(c.operators.recent().next().unwrap().state, OpState::Done);
        // A limit of 0 stops moves; an operator past its deadline times out.
        let zero = BTreeMap::from([(SUBTASK_LIMIT_KEY.to_string(), "0".to_string())]);
        v.now_ms += 31_000;
        assert!(c.round(&v, &zero, &pending_there).is_empty());
        assert_eq!(c.operators.in_flight(OpKind::MoveSubtask), 0);
        assert_eq!(
            c.operators.recent().next().unwrap().state,
            OpState::TimedOut
        );
        // Counted: two created by the rule checker, one done, one timed out.
        let counts = c.operators.counts().clone();
        let created = BTreeMap::from([((OpKind::MoveSubtask, RULE_CHECKER), 2)]);
        assert_eq!(counts.created, created);
        let finished = BTreeMap::from([
            ((OpKind::MoveSubtask, OpState::Done), 1),
            ((OpKind::MoveSubtask, OpState::TimedOut), 1),
        ]);
        assert_eq!(counts.finished, finished);
    }

    #[test]
    fn operator_counts_go_on_across_ownership_terms_of_a_node() {
        let mut v = view_with_queued(&[(0, 3), (1, 3)], &[1, 2]);
        v.tasks[0].pinned_by = Some("pin".into());
        let config = BTreeMap::new();
        let stays = |_: TaskId, _: u32, _: u32| -> Option<Seen> {
            Some(Seen {
                node: 3,
                attempt: 1,
                running: false,
            })
        };
        let board = Board::default();
        let mut first = Coordinator::continuing(&board);
        let ops = first.round(&v, &config, &stays);
        assert_eq!(ops.len(), 2);
        first.operators.cancel(ops[0].id);
        first.operators.cancel(ops[0].id);
        first.publish(&board, &config);
        let counts = board.lock().unwrap().counts.clone();
        assert_eq!(counts.created[&(OpKind::MoveSubtask, RULE_CHECKER)], 2);
        assert_eq!(
            counts.finished,
            BTreeMap::from([((OpKind::MoveSubtask, OpState::Cancelled), 1)]),
            "a second cancel of the same operator counts nothing"
        );
        // The next term starts with nothing in flight and the counts so far.
        let mut second = Coordinator::continuing(&board);
        assert_eq!(second.operators.list().count(), 0);
        assert_eq!(second.operators.counts(), &counts);
        assert_eq!(second.round(&v, &config, &stays).len(), 2);
        assert_eq!(
            second.operators.counts().created[&(OpKind::MoveSubtask, RULE_CHECKER)],
            4
        );
        let sources = OperatorCounts::sources();
        for s in [
            (OpKind::MoveSubtask, "balance-subtask"),
            (OpKind::MoveSubtask, "hot-node"),
            (OpKind::MoveSubtask, RULE_CHECKER),
            (OpKind::TransferLeader, "leader-placement"),
        ] {
            assert!(sources.contains(&s), "{s:?} in {sources:?}");
        }
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
        assert_eq!(c.status(&paused)[0].state, "paused");
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
