//! The coordinator's operators: what they change ([`Step`]), how many of a
//! kind may be in flight ([`Limits`], replicated cluster config), and the
//! [`Operators`] controller that admits them, hears what nodes report about
//! them, and retires them once done, cancelled or timed out. Pure: the
//! owner's loop carries admitted operators out and reports back.
//!
//! A move is done when the node the subtask went to reports (in a
//! heartbeat) that it claimed it at its new attempt — or, when that report
//! cannot come any more, when the replicated state shows the subtask
//! finished there. A leader transfer is done when leadership moved; a
//! node-down operator when its commands were applied.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::coordinator::{CoordView, Room};
use crate::model::{NodeId, SubtaskState, TaskId};

/// Cluster config key: moves in flight at once.
pub const SUBTASK_LIMIT_KEY: &str = "subtask-schedule-limit";
/// Cluster config key: leader transfers in flight at once.
pub const LEADER_LIMIT_KEY: &str = "leader-schedule-limit";
/// Cluster config key: how long an operator may take, in ms.
pub const OPERATOR_TIMEOUT_KEY: &str = "operator-timeout-ms";

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

impl std::fmt::Display for SubtaskAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.task, self.step, self.ordinal)
    }
}

/// What an operator changes; its in-flight limit is per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpKind {
    MoveSubtask,
    TransferLeader,
    /// A down node's subtasks taken back. Never limited: recovering from a
    /// dead node does not wait for balancing.
    NodeDown,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::MoveSubtask => "move-subtask",
            OpKind::TransferLeader => "transfer-leader",
            OpKind::NodeDown => "node-down",
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
    /// A node silent for `silent_ms` is marked down.
    MarkNodeDown { node: NodeId, silent_ms: u64 },
    /// A subtask active on a down node goes back to pending, or fails
    /// (`fail`: it runs a step that is not idempotent).
    TakeBack {
        subtask: SubtaskAt,
        node: NodeId,
        fail: bool,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::MoveSubtask { subtask, from, to } => {
                write!(f, "move {subtask} from node {from} to node {to}")
            }
            Step::TransferLeader { from, to } => {
                write!(f, "transfer leader from node {from} to node {to}")
            }
            Step::MarkNodeDown { node, silent_ms } => {
                write!(f, "mark node {node} down (silent for {silent_ms} ms)")
            }
            Step::TakeBack {
                subtask,
                node,
                fail,
            } => {
                let how = if *fail { "fail" } else { "requeue" };
                write!(f, "take {subtask} back from node {node} ({how})")
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

    /// The states an operator ends in.
    pub const FINAL: [OpState; 3] = [OpState::Done, OpState::Cancelled, OpState::TimedOut];
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

/// What a node did about a move step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// The node the subtask left dropped its queued assignment.
    Released,
    /// The node the subtask went to claimed it at its new attempt.
    Taken,
}

/// A node's report about an operator step, from its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub node: NodeId,
    pub operator: u64,
    /// The subtask at the attempt the node acted on.
    pub subtask: SubtaskAt,
    pub outcome: StepOutcome,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.outcome {
            StepOutcome::Released => "released",
            StepOutcome::Taken => "took",
        };
        write!(f, "node {} {what} {}", self.node, self.subtask)
    }
}

/// What showed an operator done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// The report of the node that carried the step out.
    Report(NodeId),
    /// The replicated state (or the leadership) shows the effect.
    State,
}

impl std::fmt::Display for Confirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Confirmation::Report(n) => write!(f, "report of node {n}"),
            Confirmation::State => write!(f, "replicated state"),
        }
    }
}

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
    /// What nodes reported about its steps.
    pub reports: Vec<Report>,
    /// What showed it done (set when it is).
    pub confirmed_by: Option<Confirmation>,
}

/// Priorities: down nodes first, then rule enforcement, hot spots, balance.
pub const PRIORITY_DOWN: u32 = 4;
pub const PRIORITY_RULE: u32 = 3;
pub const PRIORITY_HOT: u32 = 2;
pub const PRIORITY_BALANCE: u32 = 1;

impl Operator {
    /// A new operator (not admitted yet).
    pub fn new(kind: OpKind, source: &'static str, priority: u32, steps: Vec<Step>) -> Operator {
        Operator {
            id: 0,
            kind,
            source,
            priority,
            steps,
            created_ms: 0,
            deadline_ms: 0,
            state: OpState::New,
            reports: Vec::new(),
            confirmed_by: None,
        }
    }

    /// The steps a node has to act on: the moves from or to it.
    pub fn steps_for(&self, node: NodeId) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |s| {
            matches!(s, Step::MoveSubtask { from, to, .. } if *from == node || *to == node)
        })
    }
}

/// How many operators of each kind may be in flight, and for how long.
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
            OpKind::NodeDown => usize::MAX,
        }
    }
}

/// Where a subtask of the current view is, as the owner reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub node: NodeId,
    pub attempt: u32,
    pub state: SubtaskState,
}

/// The operators in flight, with their limits and recent history.
#[derive(Debug, Default)]
pub struct Operators {
    next_id: u64,
    in_flight: BTreeMap<u64, Operator>,
    recent: VecDeque<Operator>,
    pub(super) counts: OperatorCounts,
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

    /// The subtasks that in-flight moves wait on: what [`Self::reconcile`]
    /// will ask about.
    pub fn watched_subtasks(&self) -> Vec<(TaskId, u32, u32)> {
        self.in_flight
            .values()
            .flat_map(|o| &o.steps)
            .filter_map(|s| match s {
                Step::MoveSubtask { subtask, .. } => Some(subtask.id()),
                _ => None,
            })
            .collect()
    }

    pub fn recent(&self) -> impl Iterator<Item = &Operator> {
        self.recent.iter()
    }

    pub fn counts(&self) -> &OperatorCounts {
        &self.counts
    }

    /// Admits operators (highest priority first) while their kind's limit
    /// allows: one per subtask and per down node, a move only onto a node
    /// with a free slot (counting moves already heading there) and never
    /// from or to a node going down. Returns the admitted ones, to carry
    /// out.
    pub fn admit(
        &mut self,
        mut ops: Vec<Operator>,
        view: &CoordView,
        limits: &Limits,
    ) -> Vec<Operator> {
        if ops.is_empty() {
            return ops;
        }
        ops.sort_by_key(|o| std::cmp::Reverse(o.priority));
        let mut count: BTreeMap<OpKind, usize> = BTreeMap::new();
        let mut busy: BTreeSet<(TaskId, u32, u32)> = BTreeSet::new();
        let mut going_down: BTreeSet<NodeId> = BTreeSet::new();
        let mut room = view.room();
        for o in self.in_flight.values() {
            *count.entry(o.kind).or_default() += 1;
            for s in &o.steps {
                claim(s, &mut busy, &mut going_down, &mut room);
            }
        }
        let mut out = Vec::new();
        for mut op in ops {
            let n = count.entry(op.kind).or_default();
            if *n >= limits.of(op.kind) {
                continue;
            }
            let fits = op.steps.iter().all(|s| match s {
                Step::MoveSubtask { subtask, from, to } => {
                    !busy.contains(&subtask.id())
                        && room.free(*to) > 0
                        && !going_down.contains(from)
                        && !going_down.contains(to)
                }
                Step::TransferLeader { to, .. } => view.voters.contains(to),
                Step::MarkNodeDown { node, .. } => !going_down.contains(node),
                Step::TakeBack { subtask, .. } => !busy.contains(&subtask.id()),
            });
            if !fits {
                continue;
            }
            *n += 1;
            for s in &op.steps {
                claim(s, &mut busy, &mut going_down, &mut room);
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
        self.finish(id, OpState::Cancelled, None);
    }

    /// The owner carried out an operator whose effect is its commands
    /// (node-down): done when every command was applied, cancelled (and
    /// found again by its checker) otherwise.
    pub fn carried_out(&mut self, id: u64, applied: bool) {
        if applied {
            self.finish(id, OpState::Done, Some(Confirmation::State));
        } else {
            self.cancel(id);
        }
    }

    fn finish(&mut self, id: u64, state: OpState, by: Option<Confirmation>) {
        if let Some(mut op) = self.in_flight.remove(&id) {
            op.state = state;
            op.confirmed_by = by;
            *self.counts.finished.entry((op.kind, state)).or_default() += 1;
            self.recent.push_front(op);
            self.recent.truncate(RECENT);
        }
    }

    /// A node's report about a step. A move is done when the node it went
    /// to took it at its new attempt; a report that matches no step in
    /// flight (late, or about another attempt) changes nothing. Returns
    /// whether it matched.
    pub fn report(&mut self, r: &Report) -> bool {
        let Some(op) = self.in_flight.get_mut(&r.operator) else {
            return false;
        };
        let matched = op.steps.iter().any(|s| match (s, r.outcome) {
            (Step::MoveSubtask { subtask, from, .. }, StepOutcome::Released) => {
                *from == r.node && *subtask == r.subtask
            }
            (Step::MoveSubtask { subtask, to, .. }, StepOutcome::Taken) => {
                *to == r.node
                    && subtask.id() == r.subtask.id()
                    && subtask.attempt + 1 == r.subtask.attempt
            }
            _ => false,
        });
        if !matched || op.reports.contains(r) {
            return matched;
        }
        op.reports.push(*r);
        if r.outcome == StepOutcome::Taken {
            self.finish(
                r.operator,
                OpState::Done,
                Some(Confirmation::Report(r.node)),
            );
        }
        true
    }

    /// Retires operators whose outcome the view shows, and those past
    /// their deadline. `seen` finds a subtask of the view; a move waits for
    /// the report of the node it went to while the subtask is queued or
    /// runs there, is done when the subtask finished there, and is
    /// cancelled when the subtask was requeued, moved on or started
    /// elsewhere.
    pub fn reconcile(&mut self, view: &CoordView, seen: &dyn Fn(TaskId, u32, u32) -> Option<Seen>) {
        let mut ended = Vec::new();
        for (id, op) in &self.in_flight {
            let mut outcome = None;
            for s in &op.steps {
                outcome = match *s {
                    Step::MoveSubtask { subtask, from, to } => {
                        let at = seen(subtask.task, subtask.step, subtask.ordinal);
                        move_outcome(subtask, from, to, at)
                    }
                    Step::TransferLeader { to, .. } => {
                        (view.leader == to).then_some((OpState::Done, Some(Confirmation::State)))
                    }
                    Step::MarkNodeDown { node, .. } | Step::TakeBack { node, .. } => {
                        let down = view.liveness.iter().any(|n| n.id == node && !n.up);
                        let empty = view.active.get(&node).is_none_or(Vec::is_empty);
                        (down && empty).then_some((OpState::Done, Some(Confirmation::State)))
                    }
                };
            }
            match outcome {
                Some((st, by)) => ended.push((*id, st, by)),
                None if view.now_ms >= op.deadline_ms => ended.push((*id, OpState::TimedOut, None)),
                None => {}
            }
        }
        for (id, st, by) in ended {
            self.finish(id, st, by);
        }
    }
}

/// What an admitted step holds: its subtask, its down node, a slot on the
/// node a move goes to.
fn claim(
    s: &Step,
    busy: &mut BTreeSet<(TaskId, u32, u32)>,
    going_down: &mut BTreeSet<NodeId>,
    room: &mut Room,
) {
    match s {
        Step::MoveSubtask { subtask, to, .. } => {
            busy.insert(subtask.id());
            room.take(*to);
        }
        Step::TakeBack { subtask, .. } => {
            busy.insert(subtask.id());
        }
        Step::MarkNodeDown { node, .. } => {
            going_down.insert(*node);
        }
        Step::TransferLeader { .. } => {}
    }
}

/// A move's outcome from where its subtask is now (`None`: not decided).
fn move_outcome(
    subtask: SubtaskAt,
    from: NodeId,
    to: NodeId,
    at: Option<Seen>,
) -> Option<(OpState, Option<Confirmation>)> {
    let at = at?;
    let moved = subtask.attempt + 1;
    if at.node == to && at.attempt == moved {
        return match at.state {
            SubtaskState::Pending | SubtaskState::Running => None,
            SubtaskState::Succeed | SubtaskState::Failed => {
                Some((OpState::Done, Some(Confirmation::State)))
            }
            _ => Some((OpState::Cancelled, None)),
        };
    }
    if at.node == from && at.attempt == subtask.attempt && at.state == SubtaskState::Pending {
        // Not carried out yet.
        return None;
    }
    Some((OpState::Cancelled, None))
}
