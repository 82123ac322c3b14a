//! The owner: the scheduler manager, task schedulers, node manager and
//! balancer of the Raft leader. It runs only while this node leads, started
//! and stopped by the leadership watch, and keeps no state of its own that
//! the replicated state does not hold: a new owner reads the tables and
//! carries on where the last one stopped.
//!
//! One *round* reads the applied state once and
//! 1. asks [`decide`] for each unfinished task's next action and starts it
//!    (one action per task at a time: planning calls the module's `plan` in
//!    a sandbox, finishing its `finish`, reverting its `revert`);
//! 2. admits running tasks in rank order (a task whose key falls in an
//!    active `subtask` placement rule only on the rule's nodes), preempts
//!    slots that admission gave to higher-ranked tasks, and runs the
//!    [coordinator](super::coordinator): its down-node checker marks silent
//!    workers down and takes their subtasks back (requeued for idempotent
//!    steps, failed otherwise), its rule checker and schedulers move queued
//!    subtasks and leadership;
//! 3. assigns pending subtasks to nodes with free slots (never to a node
//!    going down).
//!
//! Rounds run on a timer and whenever this node applies new entries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stoker_proto::guest::{FinishRequest, PlanRequest, RevertRequest};
use stoker_proto::meta::command::Kind as C;
use stoker_proto::meta::{
    change_subtasks, command_result, AddSubtasks, AssignSubtask, ChangeSubtasks, Command,
    CommandResult, FinishTask, GcHistory, MarkNodeDown, NewSubtask, NodeRecord, RequeueSubtask,
    SetTaskState, SubtaskRecord, SubtaskRef, SweepModuleStaging, TaskRecord,
};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::balance::Queued;
use super::checkers::{Active, Liveness, DEFAULT_NODE_TIMEOUT_MS};
use super::coordinator::{
    Board, CoordTask, CoordView, Coordinator, OpKind, Operator, Seen, Step, SubtaskAt,
};
use super::fair_share::{admit_fair, TenantShare};
use super::placement::{assign, preempt, Candidate, EligibleIndex, Held, Usage};
use super::rule_index::SubtaskRules;
use super::rules::{self, Rule};
use super::task::{decide, Action, StepCounts};
use crate::blob::BlobStore;
use crate::exec::local::RetryPolicy;
use crate::exec::worker::task_logs_prefix;
use crate::meta::queries::{self, TaskFilter};
use crate::meta::records::{subtask_name, MAX_INLINE_BYTES};
use crate::meta::{now_ms, MetaError, MetaNode};
use crate::model::{NodeId, NodeView, SubtaskState, TaskId, TaskState};
use crate::sandbox::{CallEnv, CallLimits, Plan, Sandbox, SandboxError, TaskModule};

/// The owner's settings (`[owner]` in the server config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OwnerConfig {
    /// Period of the scheduling round when nothing is applied, in ms.
    pub tick_ms: u64,
    /// A worker silent for this long is down, in ms.
    pub node_timeout_ms: u64,
    /// Finished tasks are deleted this long after they finish, in seconds.
    pub history_ttl_secs: u64,
    /// How often history is garbage-collected, in seconds.
    pub gc_interval_secs: u64,
    /// A module upload whose chunks stop coming for this long without a
    /// commit is swept (at the history collection), in seconds.
    pub upload_ttl_secs: u64,
    /// Subtasks one `AddSubtasks` command carries at most.
    pub subtask_batch: usize,
    /// Attempts at `plan`, `finish` and `revert` calls that fail retryably.
    pub call_attempts: u32,
    /// Limits of the owner's `plan`, `finish` and `revert` calls (a task's
    /// own fuel and memory limits replace these when set).
    pub limits: CallLimits,
}

impl Default for OwnerConfig {
    fn default() -> Self {
        OwnerConfig {
            tick_ms: 200,
            node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            history_ttl_secs: 7 * 24 * 3600,
            gc_interval_secs: 60,
            upload_ttl_secs: 3600,
            subtask_batch: 1000,
            call_attempts: 3,
            limits: CallLimits::default(),
        }
    }
}

impl OwnerConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// A message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.tick_ms == 0 || self.node_timeout_ms == 0 || self.gc_interval_secs == 0 {
            return Err("owner tick_ms, node_timeout_ms and gc_interval_secs must be > 0".into());
        }
        if self.subtask_batch == 0 || self.subtask_batch > crate::meta::records::MAX_SUBTASK_BATCH {
            return Err(format!(
                "owner subtask_batch must be 1..={}",
                crate::meta::records::MAX_SUBTASK_BATCH
            ));
        }
        if self.call_attempts == 0 {
            return Err("owner call_attempts must be at least 1".into());
        }
        Ok(())
    }
}

/// What every part of the owner shares.
struct Ctx {
    node: MetaNode,
    sandbox: Arc<Sandbox>,
    blobs: BlobStore,
    config: OwnerConfig,
    /// Where the coordinator's state is published for this node's API.
    board: Board,
}

/// Watches leadership and runs the owner while this node leads. Returns
/// when `stop` fires.
pub async fn run(
    node: MetaNode,
    sandbox: Arc<Sandbox>,
    blobs: BlobStore,
    config: OwnerConfig,
    board: Board,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let ctx = Arc::new(Ctx {
        node: node.clone(),
        sandbox,
        blobs,
        config,
        board,
    });
    let mut leader = node.is_leader_watch();
    loop {
        let leading = *leader.borrow_and_update();
        if leading {
            info!(node_id = node.id(), "became owner");
            let term = tokio::spawn(own(ctx.clone()));
            tokio::select! {
                _ = leader.wait_for(|l| !*l) => {}
                _ = stop.wait_for(|s| *s) => {
                    term.abort();
                    return;
                }
            }
            term.abort();
            let _ = term.await;
            ctx.board.lock().expect("board lock").owner = false;
            info!(node_id = node.id(), "no longer owner");
        } else {
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// One term of ownership: rounds until aborted.
async fn own(ctx: Arc<Ctx>) {
    // Apply everything committed before acting on it.
    while let Err(e) = ctx.node.read_barrier().await {
        debug!(error = %e, "owner waits for a read barrier");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut owner = Owner {
        ctx: ctx.clone(),
        since_ms: now_ms(),
        actions: JoinSet::new(),
        busy: HashMap::new(),
        last_gc_ms: 0,
        coordinator: Coordinator::continuing(
            Duration::from_millis(ctx.config.node_timeout_ms),
            &ctx.board,
        ),
    };
    let mut applied = ctx.node.applied_watch();
    let tick = Duration::from_millis(ctx.config.tick_ms);
    loop {
        if let Err(e) = owner.round().await {
            warn!(error = %e, "scheduling round failed");
        }
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep(tick) => {}
            Some(done) = owner.actions.join_next_with_id() => owner.ended(done),
        }
        // Reap every other action that ended meanwhile.
        while let Some(done) = owner.actions.try_join_next_with_id() {
            owner.ended(done);
        }
    }
}

/// A task's current step as a round sees it.
struct TaskView {
    task: TaskRecord,
    state: TaskState,
    /// The step's active subtasks: every one assigned to a node (pending or
    /// running there), then the first ones waiting for a node whose backoff
    /// has passed, as many as the cluster has slots (more could not be
    /// assigned in one round).
    subtasks: Vec<SubtaskRecord>,
    counts: StepCounts,
}

/// Everything a round reads, in one read transaction. Only the current
/// step of an unfinished task can have pending or running subtasks (a step
/// advances once all of its subtasks succeeded, a task finishes once none
/// is left unfinished), so the task views hold every subtask that holds a
/// slot. What a round reads is bounded by the cluster's slots, not by the
/// size of the tasks: counts come from the per-step counts and the
/// subtasks from the by-node and waiting indexes.
struct ClusterView {
    nodes: Vec<NodeRecord>,
    tasks: Vec<TaskView>,
    /// Where the subtasks of in-flight operators are now (finished ones
    /// included, which the task views leave out).
    watched: HashMap<(TaskId, u32, u32), Seen>,
    /// Weight and slot quota of every tenant with a record.
    tenants: BTreeMap<String, TenantShare>,
    /// Placement rules in force (whatever their window).
    rules: Vec<Rule>,
    /// The cluster config (coordinator limits, scheduler states).
    config: BTreeMap<String, String>,
}

impl ClusterView {
    /// The pending and running subtasks on each node, of every task.
    fn active(&self) -> BTreeMap<NodeId, Vec<Active>> {
        let mut out: BTreeMap<NodeId, Vec<Active>> = BTreeMap::new();
        for s in self.tasks.iter().flat_map(|t| &t.subtasks) {
            let st = parse_sub(s);
            if s.node != 0 && (st == SubtaskState::Pending || st == SubtaskState::Running) {
                out.entry(s.node).or_default().push(Active {
                    subtask: SubtaskAt {
                        task: s.task_id,
                        step: s.step,
                        ordinal: s.ordinal,
                        attempt: s.attempt,
                    },
                    running: st == SubtaskState::Running,
                    idempotent: s.idempotent,
                });
            }
        }
        out
    }
}

/// Reads a round's view; `watched` names subtasks whose whereabouts the
/// coordinator's in-flight operators wait on.
fn read_view(
    node: &MetaNode,
    watched: &[(TaskId, u32, u32)],
    now: u64,
) -> Result<ClusterView, MetaError> {
    node.read_local(|p, t| {
        let nodes = queries::node_records(p, t)?;
        let tenants = queries::tenants(p, t)?
            .into_iter()
            .map(|r| {
                let share = TenantShare {
                    weight: r.weight.max(1),
                    max_slots: r.quota.map_or(0, |q| q.max_slots),
                };
                (r.id, share)
            })
            .collect();
        // The most one round can assign: every slot of every node.
        let room = nodes.iter().map(|n| n.slots as usize).sum::<usize>().max(1);
        let mut assigned: HashMap<TaskId, Vec<SubtaskRecord>> = HashMap::new();
        for s in queries::assigned_subtasks(p, t)? {
            assigned.entry(s.task_id).or_default().push(s);
        }
        let mut tasks = Vec::new();
        for task in queries::list_tasks(p, t, &TaskFilter::default())? {
            let state = task
                .state
                .parse::<TaskState>()
                .map_err(|e| MetaError::Corrupt {
                    path: p.to_path_buf(),
                    what: e,
                })?;
            let (subtasks, counts) = if task.started {
                let mut subtasks = assigned.remove(&task.id).unwrap_or_default();
                subtasks.retain(|s| s.step == task.step);
                subtasks.extend(queries::waiting_subtasks(
                    p, t, task.id, task.step, now, room,
                )?);
                subtasks.sort_by_key(|s| s.ordinal);
                (subtasks, queries::step_counts(p, t, task.id, task.step)?)
            } else {
                (Vec::new(), StepCounts::default())
            };
            tasks.push(TaskView {
                task,
                state,
                subtasks,
                counts,
            });
        }
        let mut seen = HashMap::new();
        for &(task, step, ordinal) in watched {
            if let Some(s) = queries::subtask(p, t, task, step, ordinal)? {
                let at = Seen {
                    node: s.node,
                    attempt: s.attempt,
                    state: parse_sub(&s),
                };
                seen.insert((task, step, ordinal), at);
            }
        }
        let set = crate::meta::rules::rule_set(p, t)?;
        let rules = rules::from_records(&set.rules).map_err(|e| MetaError::Corrupt {
            path: p.to_path_buf(),
            what: format!("placement rules in force: {e}"),
        })?;
        let config = crate::meta::rules::cluster_config_subset(
            p,
            t,
            &[
                super::coordinator::SUBTASK_LIMIT_KEY,
                super::coordinator::LEADER_LIMIT_KEY,
                super::coordinator::OPERATOR_TIMEOUT_KEY,
            ],
            &[super::coordinator::SCHEDULER_KEY_PREFIX],
        )?;
        Ok(ClusterView {
            nodes,
            tasks,
            watched: seen,
            tenants,
            rules,
            config,
        })
    })
    .map(|(v, _)| v)
}

struct Owner {
    ctx: Arc<Ctx>,
    /// When this term began: nodes get a full timeout from then before
    /// the down-node checker takes them as down.
    since_ms: u64,
    actions: JoinSet<()>,
    /// Tasks with an action in flight, and its tokio task.
    busy: HashMap<TaskId, tokio::task::Id>,
    last_gc_ms: u64,
    coordinator: Coordinator,
}

fn is_state(s: &SubtaskRecord, st: SubtaskState) -> bool {
    s.state == st.as_str()
}

/// Whether a task's subtasks may be assigned and started.
fn accepts_work(t: &TaskView) -> bool {
    t.state.accepts_work(t.task.modifying_from.parse().ok())
}

impl Owner {
    /// An action ended (or panicked): its task may act again.
    fn ended(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        self.busy.retain(|_, v| *v != id);
    }

    async fn round(&mut self) -> Result<(), MetaError> {
        let now = now_ms();
        let watched = self.coordinator.operators.watched_subtasks();
        let view = read_view(&self.ctx.node, &watched, now)?;
        for t in &view.tasks {
            if self.busy.contains_key(&t.task.id) {
                continue;
            }
            let planned = t.task.started && t.task.step_planned;
            let action = decide(t.state, planned, &t.counts, t.task.manual_recovery);
            if action == Action::Wait {
                continue;
            }
            debug!(task_id = t.task.id, state = %t.state, ?action, "task action");
            let (ctx, task) = (self.ctx.clone(), t.task.clone());
            let handle = self
                .actions
                .spawn(async move { carry_out(&ctx, task, action).await });
            self.busy.insert(t.task.id, handle.id());
        }
        self.place(&view, now).await;
        if now.saturating_sub(self.last_gc_ms) >= self.ctx.config.gc_interval_secs * 1000 {
            self.last_gc_ms = now;
            self.collect_history(now).await?;
            self.sweep_uploads(now).await?;
        }
        Ok(())
    }

    /// Drops the staged chunks of module uploads abandoned for longer than
    /// `upload_ttl_secs` (a client that died between chunks and commit).
    async fn sweep_uploads(&self, now: u64) -> Result<(), MetaError> {
        let before = now.saturating_sub(self.ctx.config.upload_ttl_secs * 1000);
        let abandoned = self
            .ctx
            .node
            .read_local(|p, t| queries::abandoned_uploads(p, t, before))?
            .0;
        if abandoned > 0 {
            info!(uploads = abandoned, "sweeping abandoned module uploads");
            propose(
                &self.ctx.node,
                C::SweepModuleStaging(SweepModuleStaging { before_ms: before }),
            )
            .await;
        }
        Ok(())
    }

    /// Deletes tasks that finished more than `history_ttl_secs` ago: first
    /// their blobs (`tasks/<id>/`, a blob input, the subtask logs under
    /// `logs/<id>/`), then their records.
    /// A crash in between only repeats the blob deletion next time.
    async fn collect_history(&self, now: u64) -> Result<(), MetaError> {
        let before = now.saturating_sub(self.ctx.config.history_ttl_secs * 1000);
        let old = self
            .ctx
            .node
            .read_local(|p, t| queries::history_before(p, t, before, GC_BATCH))?
            .0;
        if old.is_empty() {
            return Ok(());
        }
        for task in &old {
            if let Err(e) = delete_task_blobs(&self.ctx.blobs, task).await {
                // Keep the records so that the next collection tries again.
                warn!(task_id = task.id, error = %e, "cannot delete the blobs of an old task");
                return Ok(());
            }
        }
        propose(
            &self.ctx.node,
            C::GcHistory(GcHistory {
                before_ms: before,
                limit: old.len() as u32,
            }),
        )
        .await;
        Ok(())
    }

    /// Admission, preemption, the coordinator (down nodes, rules,
    /// balancing, leadership) and assignment.
    async fn place(&mut self, view: &ClusterView, now: u64) {
        let nodes: Vec<NodeView> = view.nodes.iter().map(queries::node_view).collect();
        let eligibility = EligibleIndex::new(&nodes);
        let subtask_rules = SubtaskRules::new(&view.rules, &nodes, now);
        let mut candidates = Vec::new();
        let mut eligible_of = BTreeMap::new();
        let mut pinned_by = BTreeMap::new();
        for t in view.tasks.iter().filter(|t| accepts_work(t)) {
            let in_use: BTreeSet<NodeId> = t
                .subtasks
                .iter()
                .filter(|s| s.node != 0 && !SubtaskState::is_finished(parse_sub(s)))
                .map(|s| s.node)
                .collect();
            let placement = queries::task_placement(&t.task);
            let rule = subtask_rules.rule_for(&t.task.key, &t.task.tenant);
            let eligible = match rule {
                Some(r) => eligibility.eligible_among(&placement, subtask_rules.nodes(r), &in_use),
                None => eligibility.eligible(&placement, |_| true, &in_use),
            };
            if let Some(r) = rule {
                pinned_by.insert(t.task.id, r.rule.name.clone());
            }
            eligible_of.insert(t.task.id, eligible.clone());
            candidates.push(Candidate {
                placement,
                eligible,
            });
        }
        let tenant_of: BTreeMap<TaskId, String> = view
            .tasks
            .iter()
            .map(|t| (t.task.id, t.task.tenant.clone()))
            .collect();
        let admission = admit_fair(&nodes, candidates, &tenant_of, &view.tenants);
        // Every subtask holding a slot, whatever its task's state.
        let mut held = Vec::new();
        let mut usage = Usage::default();
        let up: BTreeSet<NodeId> = nodes.iter().filter(|n| n.up).map(|n| n.id).collect();
        for t in &view.tasks {
            for s in t
                .subtasks
                .iter()
                .filter(|s| s.node != 0 && up.contains(&s.node))
            {
                let st = parse_sub(s);
                if st == SubtaskState::Pending || st == SubtaskState::Running {
                    usage.add(t.task.id, s.node);
                    if accepts_work(t) {
                        held.push(Held {
                            task: t.task.id,
                            subtask: (s.step, s.ordinal, s.attempt, st),
                            node: s.node,
                            started_ms: if st == SubtaskState::Running {
                                s.start_time_ms
                            } else {
                                u64::MAX
                            },
                            idempotent: s.idempotent,
                        });
                    }
                }
            }
        }
        let mut commands = Vec::new();
        let mut taken_back = BTreeSet::new();
        // A pinned task's subtasks off its rule's nodes are not preempted:
        // running ones finish where they are (the rule does not throw work
        // away), queued ones are moved by the coordinator's rule checker
        // when a rule node has room (within the operator limits).
        let preemptible: Vec<_> = held
            .iter()
            .filter(|h| {
                !pinned_by.contains_key(&h.task)
                    || eligible_of
                        .get(&h.task)
                        .is_some_and(|e: &Vec<NodeId>| e.contains(&h.node))
            })
            .copied()
            .collect();
        for h in preempt(&admission, &preemptible) {
            let (step, ordinal, attempt, _) = h.subtask;
            taken_back.insert((h.task, step, ordinal));
            commands.push(requeue(
                h.task,
                (step, ordinal, attempt),
                "preempted",
                false,
                now,
            ));
        }
        // The coordinator: queued (assigned, not started) subtasks move by
        // its operators; leadership follows the leader rules.
        let coord = CoordView {
            now_ms: now,
            used: usage.per_node.clone(),
            cpu: view
                .nodes
                .iter()
                .filter_map(|n| n.load.as_ref()?.cpu.map(|c| (n.id, c as f32)))
                .collect(),
            tasks: eligible_of
                .iter()
                .map(|(task, eligible)| {
                    let t = view.tasks.iter().find(|t| t.task.id == *task);
                    CoordTask {
                        id: *task,
                        key: t.map(|t| t.task.key.clone()).unwrap_or_default(),
                        tenant: t.map(|t| t.task.tenant.clone()).unwrap_or_default(),
                        eligible: eligible.clone(),
                        pinned_by: pinned_by.get(task).cloned(),
                        queued: held
                            .iter()
                            .filter(|h| h.task == *task && h.subtask.3 == SubtaskState::Pending)
                            .filter(|h| !taken_back.contains(&(h.task, h.subtask.0, h.subtask.1)))
                            .map(|h| Queued {
                                subtask: SubtaskAt {
                                    task: h.task,
                                    step: h.subtask.0,
                                    ordinal: h.subtask.1,
                                    attempt: h.subtask.2,
                                },
                                node: h.node,
                            })
                            .collect(),
                    }
                })
                .collect(),
            rules: view.rules.clone(),
            leader: self.ctx.node.id(),
            voters: view
                .nodes
                .iter()
                .filter(|n| n.scheduler && n.up)
                .map(|n| n.id)
                .collect(),
            nodes,
            liveness: view
                .nodes
                .iter()
                .map(|n| Liveness {
                    id: n.id,
                    up: n.up,
                    worker: n.worker,
                    heard_ms: n.last_heartbeat_ms.max(self.since_ms),
                })
                .collect(),
            active: view.active(),
        };
        let seen = |task: TaskId, step: u32, ordinal: u32| {
            view.watched.get(&(task, step, ordinal)).copied()
        };
        // What workers reported in their heartbeats since the last round.
        let reports = std::mem::take(&mut self.ctx.board.lock().expect("board lock").reports);
        self.coordinator.reports(&reports);
        let operators = self.coordinator.round(&coord, &view.config, &seen);
        let mut moves = Vec::new();
        let mut downs = Vec::new();
        for op in operators {
            if op.kind == OpKind::NodeDown {
                downs.push(op);
                continue;
            }
            for step in &op.steps {
                match *step {
                    Step::MoveSubtask { subtask, to, .. } => {
                        usage.add(subtask.task, to);
                        moves.push((op.id, subtask, to));
                    }
                    Step::TransferLeader { to, .. } => {
                        info!(to, operator = op.id, "moving leadership by placement rule");
                        let node = self.ctx.node.clone();
                        tokio::spawn(async move {
                            if let Err(e) = node.transfer_leader(to).await {
                                warn!(to, error = %e, "leader transfer failed");
                            }
                        });
                    }
                    Step::MarkNodeDown { .. } | Step::TakeBack { .. } => {}
                }
            }
        }
        let mut nodes = coord.nodes;
        // A node going down takes no new work; its work comes back first.
        for step in downs.iter().flat_map(|op| &op.steps) {
            if let Step::MarkNodeDown { node, .. } = step {
                nodes
                    .iter_mut()
                    .filter(|n| n.id == *node)
                    .for_each(|n| n.up = false);
            }
        }
        self.take_down(downs, now).await;
        // Freed slots are reused in the next round, once the requeues are
        // applied; assignment now works with what is certainly free.
        let mut pending: BTreeMap<TaskId, Vec<(u32, u32)>> = BTreeMap::new();
        for t in view.tasks.iter().filter(|t| accepts_work(t)) {
            let list: Vec<(u32, u32)> = t
                .subtasks
                .iter()
                .filter(|s| {
                    is_state(s, SubtaskState::Pending) && s.node == 0 && s.retry_after_ms <= now
                })
                .map(|s| (s.step, s.ordinal))
                .collect();
            if !list.is_empty() {
                pending.insert(t.task.id, list);
            }
        }
        for (task, (step, ordinal), node) in assign(&nodes, &admission, &pending, &mut usage) {
            commands.push(C::AssignSubtask(AssignSubtask {
                subtask: Some(SubtaskRef {
                    task_id: task,
                    step,
                    ordinal,
                }),
                node,
            }));
        }
        let moved = futures::future::join_all(moves.iter().map(|(_, s, to)| {
            propose_for(
                &self.ctx.node,
                C::AssignSubtask(AssignSubtask {
                    subtask: Some(SubtaskRef {
                        task_id: s.task,
                        step: s.step,
                        ordinal: s.ordinal,
                    }),
                    node: *to,
                }),
            )
        }));
        let (moved, ()) = tokio::join!(moved, propose_all(&self.ctx.node, commands));
        for ((op, s, _), result) in moves.iter().zip(moved) {
            // Refused: it started (or went away) first, nothing moved. A
            // move that landed at another attempt than the next one raced
            // with a requeue: the step the nodes would get is wrong.
            let attempt = result.and_then(|r| match r.kind {
                Some(command_result::Kind::SubtaskState(st)) if r.error.is_empty() => {
                    Some(st.attempt)
                }
                _ => None,
            });
            if attempt != Some(s.attempt + 1) {
                self.coordinator.operators.cancel(*op);
            }
        }
        self.coordinator.publish(&self.ctx.board, &view.config);
    }

    /// Carries out the down-node checker's operators: marks silent nodes
    /// down, then takes their subtasks back (requeued, or failed for steps
    /// that are not idempotent). The commands are idempotent and fenced by
    /// attempt; an operator whose commands were not all applied is found
    /// again by the checker next round.
    async fn take_down(&mut self, ops: Vec<Operator>, now: u64) {
        for op in ops {
            let mut applied = true;
            for step in &op.steps {
                if let Step::MarkNodeDown { node, silent_ms } = *step {
                    info!(node, silent_ms, operator = op.id, "node is down");
                    let mark = C::MarkNodeDown(MarkNodeDown { id: node });
                    applied &= propose_for(&self.ctx.node, mark).await.is_some();
                }
            }
            let takes = op.steps.iter().filter_map(|step| match *step {
                Step::TakeBack { subtask, node, .. } => Some(C::RequeueSubtask(RequeueSubtask {
                    subtask: Some(SubtaskRef {
                        task_id: subtask.task,
                        step: subtask.step,
                        ordinal: subtask.ordinal,
                    }),
                    attempt: subtask.attempt,
                    or_fail: true,
                    reason: format!("node {node} is down"),
                    time_ms: now,
                    only_pending: false,
                })),
                _ => None,
            });
            let results =
                futures::future::join_all(takes.map(|c| propose_for(&self.ctx.node, c))).await;
            applied &= results.iter().all(Option::is_some);
            self.coordinator.operators.carried_out(op.id, applied);
        }
    }
}

/// A subtask's state; every state was checked when the view was read
/// (`step_subtasks` refuses an unknown one).
/// Finished tasks deleted by one history collection at most.
const GC_BATCH: usize = 1000;

/// The blobs a task owns: everything under `tasks/<id>/` and `logs/<id>/`
/// (its subtasks' logs) of its tenant, and its input when that was stored
/// as a blob.
async fn delete_task_blobs(blobs: &BlobStore, task: &TaskRecord) -> Result<(), String> {
    let blobs = blobs.tenant(&task.tenant).map_err(|e| e.to_string())?;
    for prefix in [format!("tasks/{}", task.id), task_logs_prefix(task.id)] {
        blobs
            .delete_prefix(&prefix)
            .await
            .map_err(|e| e.to_string())?;
    }
    if !task.input_blob.is_empty() {
        blobs
            .delete(&task.input_blob)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn parse_sub(s: &SubtaskRecord) -> SubtaskState {
    s.state.parse().unwrap_or(SubtaskState::Failed)
}

/// Takes (step, ordinal) back from the node it holds at `attempt`;
/// `only_pending` leaves it alone if it has started since.
fn requeue(
    task: TaskId,
    (step, ordinal, attempt): (u32, u32, u32),
    why: &str,
    only_pending: bool,
    now: u64,
) -> C {
    C::RequeueSubtask(RequeueSubtask {
        subtask: Some(SubtaskRef {
            task_id: task,
            step,
            ordinal,
        }),
        attempt,
        or_fail: false,
        reason: why.into(),
        time_ms: now,
        only_pending,
    })
}

/// Proposes one owner command; a rejection or failure is logged and left
/// to the next round, which decides again from the replicated state.
/// Whether it was applied and accepted.
async fn propose(node: &MetaNode, kind: C) -> bool {
    propose_for(node, kind)
        .await
        .is_some_and(|r| r.error.is_empty())
}

/// [`propose`], returning the applied result (an accepted command or a
/// rejection); `None` when the command was not applied.
async fn propose_for(node: &MetaNode, kind: C) -> Option<CommandResult> {
    let what = command_name(&kind);
    match node.propose(Command { kind: Some(kind) }).await {
        Ok(r) => {
            if !r.error.is_empty() {
                debug!(command = what, error = %r.error, "owner command rejected");
            }
            Some(r)
        }
        Err(e) => {
            warn!(command = what, error = %e, "owner command failed");
            None
        }
    }
}

/// Proposes many commands at once (they share log entries).
async fn propose_all(node: &MetaNode, commands: Vec<C>) {
    futures::future::join_all(commands.into_iter().map(|c| propose(node, c))).await;
}

fn command_name(kind: &C) -> &'static str {
    match kind {
        C::AddSubtasks(_) => "add_subtasks",
        C::AssignSubtask(_) => "assign_subtask",
        C::RequeueSubtask(_) => "requeue_subtask",
        C::SetTaskState(_) => "set_task_state",
        C::FinishTask(_) => "finish_task",
        C::ChangeSubtasks(_) => "change_subtasks",
        C::MarkNodeDown(_) => "mark_node_down",
        C::GcHistory(_) => "gc_history",
        _ => "command",
    }
}

fn set_state(id: TaskId, state: TaskState, error: String) -> C {
    C::SetTaskState(SetTaskState {
        id,
        state: state.to_string(),
        error,
    })
}

fn change(id: TaskId, kind: change_subtasks::Kind, include_running: bool) -> C {
    C::ChangeSubtasks(ChangeSubtasks {
        task_id: id,
        kind: kind as i32,
        include_running,
        time_ms: now_ms(),
    })
}

/// Carries out one task scheduler action.
async fn carry_out(ctx: &Ctx, task: TaskRecord, action: Action) {
    let id = task.id;
    let node = &ctx.node;
    match action {
        Action::Wait => {}
        Action::PlanNextStep => {
            if let Err(e) = plan_next(ctx, &task).await {
                warn!(task_id = id, error = %e, "planning failed");
            }
        }
        Action::Fail { manual_recovery } => {
            // The round's view holds only active subtasks: read the step.
            let step = node.read_local(|p, t| queries::step_subtasks(p, t, id, task.step));
            let failed = step
                .map(|((subtasks, _), _)| subtasks)
                .unwrap_or_default()
                .into_iter()
                .find(|s| is_state(s, SubtaskState::Failed))
                .map(|s| {
                    format!(
                        "subtask {} failed: {}",
                        subtask_name(s.task_id, s.step, s.ordinal),
                        s.error
                    )
                })
                .unwrap_or_else(|| "a subtask failed".into());
            let to = if manual_recovery {
                TaskState::AwaitingResolution
            } else {
                TaskState::Reverting
            };
            info!(task_id = id, to = %to, error = %failed, "task failed");
            propose(node, set_state(id, to, failed)).await;
        }
        Action::CancelSubtasks => {
            propose(node, change(id, change_subtasks::Kind::Cancel, true)).await;
        }
        Action::PauseSubtasks => {
            propose(node, change(id, change_subtasks::Kind::Pause, false)).await;
        }
        Action::ResumeSubtasks => {
            propose(node, change(id, change_subtasks::Kind::Resume, false)).await;
        }
        Action::MoveTo(to) => {
            let error = if to == TaskState::Reverting && task.error.is_empty() {
                "cancelled".to_string()
            } else {
                String::new()
            };
            propose(node, set_state(id, to, error)).await;
        }
        Action::ApplyModification => match task.modifying_from.parse::<TaskState>() {
            Ok(back) => {
                propose(node, set_state(id, back, String::new())).await;
            }
            Err(e) => warn!(task_id = id, error = %e, "modifying task has no state to return to"),
        },
        Action::Revert => revert(ctx, &task).await,
    }
}

/// Why an owner-side step of a task could not be taken (retried next round).
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Missing(String),
    #[error("blob store: {0}")]
    Blob(String),
}

fn limits_of(ctx: &Ctx, task: &TaskRecord) -> CallLimits {
    let mut limits = ctx.config.limits.clone();
    if task.fuel_limit > 0 {
        limits.fuel = task.fuel_limit;
    }
    if task.memory_limit > 0 {
        limits.memory_bytes = task.memory_limit;
    }
    limits
}

async fn load_module(ctx: &Ctx, task: &TaskRecord) -> Result<Arc<TaskModule>, (bool, String)> {
    // The hash was checked against the bytes at upload: a module loaded
    // under it needs no second read (megabytes from the chunk table) nor
    // hashing on every plan and finish.
    if let Some(module) = ctx.sandbox.loaded(&task.module_hash) {
        return Ok(module);
    }
    let bytes = ctx
        .node
        .read_local(|p, t| queries::module_bytes(p, t, &task.module_hash))
        .map_err(|e| (true, e.to_string()))?
        .0
        .ok_or_else(|| (false, format!("module {} not found", task.module_hash)))?;
    ctx.sandbox
        .load(&bytes)
        .await
        .map_err(|e| (false, e.to_string()))
}

async fn task_input(ctx: &Ctx, task: &TaskRecord) -> Result<Vec<u8>, StepError> {
    if !task.input_blob.is_empty() {
        return read_blob(ctx, task, &task.input_blob).await;
    }
    Ok(ctx
        .node
        .read_local(|p, t| queries::task_input(p, t, task.id))?
        .0)
}

async fn read_blob(ctx: &Ctx, task: &TaskRecord, key: &str) -> Result<Vec<u8>, StepError> {
    let blobs = ctx
        .blobs
        .tenant(&task.tenant)
        .map_err(|e| StepError::Blob(e.to_string()))?;
    blobs
        .get(key)
        .await
        .map_err(|e| StepError::Blob(e.to_string()))?
        .map(|b| b.to_vec())
        .ok_or_else(|| StepError::Missing(format!("blob {key} of task {} is missing", task.id)))
}

/// The outputs of one step in ordinal order (blob outputs read back).
async fn step_outputs(ctx: &Ctx, task: &TaskRecord, step: u32) -> Result<Vec<Vec<u8>>, StepError> {
    let (subtasks, _) = ctx
        .node
        .read_local(|p, t| queries::step_subtasks(p, t, task.id, step))?
        .0;
    let mut out = Vec::with_capacity(subtasks.len());
    for s in subtasks {
        if s.output_blob.is_empty() {
            out.push(s.output);
        } else {
            out.push(read_blob(ctx, task, &s.output_blob).await?);
        }
    }
    Ok(out)
}

/// Runs a guest call, retrying retryable failures with back-off.
async fn with_retries<T, F, Fut>(ctx: &Ctx, mut call: F) -> Result<T, SandboxError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SandboxError>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if e.retryable && attempt < ctx.config.call_attempts => {
                tokio::time::sleep(RetryPolicy::default().backoff(attempt + 1)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The task failed at the owner (its plan or finish): a pending task fails
/// at once, a running one reverts.
async fn fail_task(ctx: &Ctx, task: &TaskRecord, error: String) {
    info!(task_id = task.id, error = %error, "task failed");
    if task.state == TaskState::Pending.as_str() {
        propose(
            &ctx.node,
            C::FinishTask(FinishTask {
                id: task.id,
                state: TaskState::Failed.to_string(),
                result: Vec::new(),
                error,
                time_ms: now_ms(),
            }),
        )
        .await;
    } else {
        propose(&ctx.node, set_state(task.id, TaskState::Reverting, error)).await;
    }
}

/// Plans the next step (or re-plans a partly written one), or finishes.
async fn plan_next(ctx: &Ctx, task: &TaskRecord) -> Result<(), StepError> {
    let id = task.id;
    let pending = task.state == TaskState::Pending.as_str();
    if pending && task.started && task.step_planned {
        // Step 0 was written by an owner that stopped before starting it.
        propose(&ctx.node, set_state(id, TaskState::Running, String::new())).await;
        return Ok(());
    }
    let step = if !task.started {
        0
    } else if !task.step_planned {
        task.step
    } else {
        task.step + 1
    };
    let module = match load_module(ctx, task).await {
        Ok(m) => m,
        Err((true, e)) => return Err(StepError::Missing(e)),
        Err((false, e)) => {
            fail_task(ctx, task, e).await;
            return Ok(());
        }
    };
    let input = task_input(ctx, task).await?;
    let previous_outputs = if step == 0 {
        Vec::new()
    } else {
        step_outputs(ctx, task, step - 1).await?
    };
    let node_count = ctx
        .node
        .read_local(queries::nodes)?
        .0
        .iter()
        .filter(|n| n.up)
        .count()
        .max(1) as u32;
    let env = CallEnv {
        limits: limits_of(ctx, task),
        blobs: ctx.blobs.tenant(&task.tenant).ok(),
        gate: None,
    };
    let request = PlanRequest {
        step,
        input: input.clone(),
        previous_outputs,
        node_count,
        task_id: id.to_string(),
        concurrency: task.concurrency,
    };
    let plan = with_retries(ctx, || async {
        ctx.sandbox.plan(&module, &env, &request).await.result
    })
    .await;
    match plan {
        Err(e) => {
            fail_task(ctx, task, format!("plan of step {step} failed: {e}")).await;
        }
        Ok(Plan::Done) => {
            finish(ctx, task, &module, &env, input, request.previous_outputs).await;
        }
        Ok(Plan::Step {
            subtasks,
            non_idempotent,
        }) => {
            info!(
                task_id = id,
                step,
                subtasks = subtasks.len(),
                "step planned"
            );
            // Re-planning the current step: skip what an earlier owner wrote.
            let written: BTreeSet<u32> = if task.started && step == task.step {
                let (subtasks, _) = ctx
                    .node
                    .read_local(|p, t| queries::step_subtasks(p, t, id, step))?
                    .0;
                subtasks.iter().map(|s| s.ordinal).collect()
            } else {
                BTreeSet::new()
            };
            // A pending task starts with the batch that seals its step.
            write_step(
                ctx,
                task,
                step,
                subtasks,
                !non_idempotent,
                &written,
                pending,
            )
            .await?;
        }
    }
    Ok(())
}

/// Writes a step's subtasks in batches, skipping those an earlier owner
/// already wrote; the last batch seals the step.
async fn write_step(
    ctx: &Ctx,
    task: &TaskRecord,
    step: u32,
    payloads: Vec<Vec<u8>>,
    idempotent: bool,
    existing: &BTreeSet<u32>,
    start: bool,
) -> Result<(), StepError> {
    let fresh: Vec<NewSubtask> = payloads
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !existing.contains(&(*i as u32)))
        .map(|(i, payload)| NewSubtask {
            ordinal: i as u32,
            payload,
            idempotent,
        })
        .collect();
    // Batches bounded by count and by bytes, so one log entry stays small.
    let mut batches: Vec<Vec<NewSubtask>> = vec![Vec::new()];
    let mut bytes = 0;
    for s in fresh {
        let current = batches.last_mut().expect("one batch");
        if !current.is_empty()
            && (current.len() >= ctx.config.subtask_batch
                || bytes + s.payload.len() > MAX_INLINE_BYTES)
        {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += s.payload.len();
        batches.last_mut().expect("one batch").push(s);
    }
    let n = batches.len();
    for (i, subtasks) in batches.into_iter().enumerate() {
        let cmd = C::AddSubtasks(AddSubtasks {
            task_id: task.id,
            step,
            subtasks,
            last: i + 1 == n,
            start: start && i + 1 == n,
        });
        if !propose(&ctx.node, cmd).await {
            return Err(StepError::Missing(format!(
                "subtasks of step {step} of task {} were not written",
                task.id
            )));
        }
    }
    Ok(())
}

async fn finish(
    ctx: &Ctx,
    task: &TaskRecord,
    module: &TaskModule,
    env: &CallEnv,
    input: Vec<u8>,
    outputs: Vec<Vec<u8>>,
) {
    let request = FinishRequest {
        input,
        outputs,
        task_id: task.id.to_string(),
    };
    let result = with_retries(ctx, || async {
        ctx.sandbox.finish(module, env, &request).await.result
    })
    .await;
    match result {
        Ok(result) if result.len() > MAX_INLINE_BYTES => {
            fail_task(
                ctx,
                task,
                format!(
                    "finish returned {} bytes; a task result is at most {MAX_INLINE_BYTES}",
                    result.len()
                ),
            )
            .await;
        }
        Ok(result) => {
            let finished = propose(
                &ctx.node,
                C::FinishTask(FinishTask {
                    id: task.id,
                    state: TaskState::Succeed.to_string(),
                    result,
                    error: String::new(),
                    time_ms: now_ms(),
                }),
            )
            .await;
            // Blobs under `tasks/<id>/` stay: a result may name one.
            if finished {
                info!(task_id = task.id, "task succeeded");
            }
        }
        Err(e) => fail_task(ctx, task, format!("finish failed: {e}")).await,
    }
}

/// Deletes the task's intermediate blobs (`tasks/<id>/…`).
async fn delete_intermediate(ctx: &Ctx, task: &TaskRecord) {
    if let Ok(blobs) = ctx.blobs.tenant(&task.tenant) {
        if let Err(e) = blobs.delete_prefix(&format!("tasks/{}", task.id)).await {
            warn!(task_id = task.id, error = %e, "cannot delete intermediate blobs");
        }
    }
}

/// Runs the guest's revert hook, deletes intermediate blobs, and ends the
/// task `reverted`. A failing hook is logged: reverting always ends.
async fn revert(ctx: &Ctx, task: &TaskRecord) {
    if let Ok(module) = load_module(ctx, task).await {
        let input = task_input(ctx, task).await.unwrap_or_default();
        let env = CallEnv {
            limits: limits_of(ctx, task),
            blobs: ctx.blobs.tenant(&task.tenant).ok(),
            gate: None,
        };
        let request = RevertRequest {
            input,
            step: task.step,
            reason: task.error.clone(),
            task_id: task.id.to_string(),
        };
        let report = with_retries(ctx, || async {
            match ctx.sandbox.revert(&module, &env, &request).await {
                Some(r) => r.result.map(|_| true),
                None => Ok(false),
            }
        })
        .await;
        match report {
            Ok(true) => info!(task_id = task.id, "revert hook ran"),
            Ok(false) => {}
            Err(e) => warn!(task_id = task.id, error = %e, "revert hook failed"),
        }
    }
    delete_intermediate(ctx, task).await;
    propose(
        &ctx.node,
        C::FinishTask(FinishTask {
            id: task.id,
            state: TaskState::Reverted.to_string(),
            result: Vec::new(),
            error: String::new(),
            time_ms: now_ms(),
        }),
    )
    .await;
}
