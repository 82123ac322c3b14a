//! What one owner round reads: the cluster view (nodes, the active
//! subtasks of each task's current step, tenants, rules, cluster config), in
//! one read transaction.

use std::collections::{BTreeMap, HashMap};

use stoker_proto::meta::{NodeRecord, SubtaskRecord, TaskRecord};

use crate::meta::queries::{self, TaskFilter};
use crate::meta::{MetaError, MetaNode};
use crate::model::{NodeId, SubtaskState, TaskId, TaskState};
use crate::sched::checkers::Active;
use crate::sched::coordinator::{self, Seen, SubtaskAt};
use crate::sched::fair_share::TenantShare;
use crate::sched::rules::{self, Rule};
use crate::sched::task::StepCounts;

/// A task's current step as a round sees it.
pub(super) struct TaskView {
    pub(super) task: TaskRecord,
    pub(super) state: TaskState,
    /// The step's active subtasks: every one assigned to a node (pending or
    /// running there), then the first ones waiting for a node whose backoff
    /// has passed, as many as the cluster has slots (more could not be
    /// assigned in one round).
    pub(super) subtasks: Vec<SubtaskRecord>,
    pub(super) counts: StepCounts,
}

/// Everything a round reads, in one read transaction. Only the current
/// step of an unfinished task can have pending or running subtasks (a step
/// advances once all of its subtasks succeeded, a task finishes once none
/// is left unfinished), so the task views hold every subtask that holds a
/// slot. What a round reads is bounded by the cluster's slots, not by the
/// size of the tasks: counts come from the per-step counts and the
/// subtasks from the by-node and waiting indexes.
pub(super) struct ClusterView {
    pub(super) nodes: Vec<NodeRecord>,
    pub(super) tasks: Vec<TaskView>,
    /// Where the subtasks of in-flight operators are now (finished ones
    /// included, which the task views leave out).
    pub(super) watched: HashMap<(TaskId, u32, u32), Seen>,
    /// Weight and slot quota of every tenant with a record.
    pub(super) tenants: BTreeMap<String, TenantShare>,
    /// Placement rules in force (whatever their window).
    pub(super) rules: Vec<Rule>,
    /// The cluster config (coordinator limits, scheduler states).
    pub(super) config: BTreeMap<String, String>,
}

impl ClusterView {
    /// The pending and running subtasks on each node, of every task.
    pub(super) fn active(&self) -> BTreeMap<NodeId, Vec<Active>> {
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
pub(super) fn read_view(
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
                for s in &subtasks {
                    checked_state(p, s)?;
                }
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
                    state: checked_state(p, &s)?,
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
                coordinator::SUBTASK_LIMIT_KEY,
                coordinator::LEADER_LIMIT_KEY,
                coordinator::OPERATOR_TIMEOUT_KEY,
            ],
            &[coordinator::SCHEDULER_KEY_PREFIX],
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

pub(super) fn is_state(s: &SubtaskRecord, st: SubtaskState) -> bool {
    s.state == st.as_str()
}

/// Whether a task's subtasks may be assigned and started.
pub(super) fn accepts_work(t: &TaskView) -> bool {
    t.state.accepts_work(t.task.modifying_from.parse().ok())
}

/// A subtask's state, refusing an unknown one as a corrupt record.
fn checked_state(path: &std::path::Path, s: &SubtaskRecord) -> Result<SubtaskState, MetaError> {
    crate::meta::records::subtask_state(s).map_err(|e| MetaError::Corrupt {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

/// A subtask's state; every state was checked when the view was read
/// ([`checked_state`]).
pub(super) fn parse_sub(s: &SubtaskRecord) -> SubtaskState {
    s.state.parse().unwrap_or(SubtaskState::Failed)
}
