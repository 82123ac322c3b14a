//! The server side of the worker RPCs of the `Stoker` service: heartbeats
//! (which register a node when it is unknown or its description changed)
//! and the assignment long poll.
//!
//! Heartbeats also carry the coordinator's operators (PD style): the reply
//! holds the steps of the owner's operators in flight that concern the
//! node, and the node's next heartbeats report what it did about them. Only
//! the owner has its operators, so a scheduler node that does not own the
//! cluster passes heartbeats on to the owner (see `StokerService`).
//!
//! Both are served by any scheduler node. Heartbeats are proposed through the
//! Raft log (followers forward them); assignments are read from this node's
//! applied state, which may lag the leader a little. That is safe: claims and
//! reports are fenced by (node, attempt), so a worker acting on a stale view
//! is refused, never wrong.

use std::time::Duration;

use stoker_proto::api::{
    Assignment, AssignmentsRequest, AssignmentsResponse, HeartbeatRequest, HeartbeatResponse,
};
use stoker_proto::meta::command::Kind;
use stoker_proto::meta::{
    operator_report, Command, NodeHeartbeat, NodeRecord, OperatorReport, OperatorStep,
    RegisterNode, SubtaskRecord, SubtaskRef, TaskRecord,
};
use tokio::time::Instant;
use tonic::Status;

use super::meta::to_status;
use crate::meta::{now_ms, queries, records, stats, MetaNode};
use crate::resource::settings::RESOURCE_CONFIG_PREFIX;
use crate::sched::coordinator::{Board, Report, Step, StepOutcome, SubtaskAt};

/// Longest wait of one assignment long poll.
pub const MAX_ASSIGNMENT_WAIT: Duration = Duration::from_secs(30);

/// Whether a stored node record already says what a registration would.
fn same_description(stored: &NodeRecord, desc: &RegisterNode) -> bool {
    stored.addr == desc.addr
        && stored.labels == desc.labels
        && stored.scope == desc.scope
        && stored.slots == desc.slots
        && stored.worker == desc.worker
        && stored.scheduler == desc.scheduler
        && stored.memory_bytes == desc.memory_bytes
}

/// Proposes `kind`; a rejection comes back as its message.
async fn propose(node: &MetaNode, kind: Kind) -> Result<Result<(), String>, Status> {
    let result = node
        .propose(Command { kind: Some(kind) })
        .await
        .map_err(to_status)?;
    Ok(if result.error.is_empty() {
        Ok(())
    } else {
        Err(result.error)
    })
}

/// A worker's heartbeat: records that the node is alive, and (re)registers
/// it when the cluster does not know it or knows a different description.
/// Times come from this server's clock. The node's operator reports go to
/// this node's owner loop (when it owns the cluster) before the heartbeat
/// is proposed, whose apply wakes the owner's round.
///
/// # Errors
/// `invalid_argument` for a missing description or one the state machine
/// refuses; the metadata layer's errors mapped by [`to_status`].
pub async fn heartbeat(
    node: &MetaNode,
    req: HeartbeatRequest,
    interval: Duration,
    board: &Board,
) -> Result<HeartbeatResponse, Status> {
    let desc = req
        .node
        .ok_or_else(|| Status::invalid_argument("heartbeat without a node description"))?;
    if desc.id == 0 {
        return Err(Status::invalid_argument("node id must not be 0"));
    }
    let reports = req
        .operator_reports
        .iter()
        .filter_map(|r| report_of(desc.id, r));
    board.lock().expect("board lock").add_reports(reports);
    let (stored, _) = node
        .read_local(|path, txn| queries::node(path, txn, desc.id))
        .map_err(to_status)?;
    let known = stored.as_ref().is_some_and(|n| same_description(n, &desc));
    if known {
        let beat = NodeHeartbeat {
            id: desc.id,
            time_ms: now_ms(),
            load: req.load,
        };
        match propose(node, Kind::NodeHeartbeat(beat)).await? {
            Ok(()) => return response(node, interval, board, desc.id),
            // Unknown after all (this node's view was ahead of the log?):
            // register below.
            Err(e) if e.ends_with("not found") => {}
            Err(e) => return Err(Status::failed_precondition(e)),
        }
    }
    let register = RegisterNode {
        time_ms: now_ms(),
        ..desc
    };
    tracing::info!(
        node_id = register.id,
        addr = %register.addr,
        slots = register.slots,
        "registering node"
    );
    let id = register.id;
    propose(node, Kind::RegisterNode(register))
        .await?
        .map_err(Status::invalid_argument)?;
    response(node, interval, board, id)
}

/// The answer to node `id`'s heartbeat: the period, the cluster config's
/// `resource.*` keys from this server's applied state (a worker applies
/// them on its next beat at the latest), and the operator steps for it
/// when this node owns the cluster.
fn response(
    node: &MetaNode,
    interval: Duration,
    board: &Board,
    id: u64,
) -> Result<HeartbeatResponse, Status> {
    let (resource_config, _) = node
        .read_local(|path, txn| stats::config_with_prefix(path, txn, RESOURCE_CONFIG_PREFIX))
        .map_err(to_status)?;
    let steps = board.lock().expect("board lock").steps_for(id);
    Ok(HeartbeatResponse {
        interval_ms: interval.as_millis() as u64,
        resource_config,
        operator_steps: steps
            .into_iter()
            .filter_map(|(op, s)| step_message(op, s))
            .collect(),
    })
}

/// An operator step as a heartbeat reply carries it (moves only: the other
/// steps are the owner's to carry out).
fn step_message(operator: u64, step: Step) -> Option<OperatorStep> {
    match step {
        Step::MoveSubtask { subtask, from, to } => Some(OperatorStep {
            operator,
            subtask: Some(SubtaskRef {
                task_id: subtask.task,
                step: subtask.step,
                ordinal: subtask.ordinal,
            }),
            attempt: subtask.attempt,
            from,
            to,
        }),
        _ => None,
    }
}

/// Node `node`'s report as the coordinator takes it; `None` when malformed.
fn report_of(node: u64, r: &OperatorReport) -> Option<Report> {
    let s = r.subtask.as_ref()?;
    let outcome = match operator_report::Outcome::try_from(r.outcome).ok()? {
        operator_report::Outcome::Released => StepOutcome::Released,
        operator_report::Outcome::Taken => StepOutcome::Taken,
    };
    Some(Report {
        node,
        operator: r.operator,
        subtask: SubtaskAt {
            task: s.task_id,
            step: s.step,
            ordinal: s.ordinal,
            attempt: r.attempt,
        },
        outcome,
    })
}

/// The assignment long poll: the node's pending and running subtasks from
/// this server's applied state, answered at once when they differ from
/// `req.fingerprint`, otherwise when they change or `req.wait_ms` (at most
/// [`MAX_ASSIGNMENT_WAIT`]) passes.
///
/// # Errors
/// Storage failures, the metadata layer stopping.
pub async fn assignments(
    node: &MetaNode,
    req: AssignmentsRequest,
) -> Result<AssignmentsResponse, Status> {
    let wait = Duration::from_millis(u64::from(req.wait_ms)).min(MAX_ASSIGNMENT_WAIT);
    let deadline = Instant::now() + wait;
    let mut applied = node.applied_watch();
    loop {
        // Mark the current index seen before reading, so that a change
        // applied during the read wakes the wait below.
        applied.borrow_and_update();
        let response = read_assignments(node, req.node)?;
        if response.fingerprint != req.fingerprint {
            return Ok(response);
        }
        match tokio::time::timeout_at(deadline, applied.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Status::unavailable("the metadata node stopped")),
            Err(_) => return Ok(response),
        }
    }
}

/// The node's assignments from this server's applied state.
///
/// # Errors
/// Storage failures.
pub fn read_assignments(node: &MetaNode, id: u64) -> Result<AssignmentsResponse, Status> {
    let (assignments, applied_index) = node
        .read_local(|path, txn| {
            let subtasks = queries::node_subtasks(path, txn, id)?;
            let mut task: Option<TaskRecord> = None;
            let mut rates: std::collections::HashMap<String, u64> = Default::default();
            let mut out = Vec::with_capacity(subtasks.len());
            for s in subtasks {
                // Subtasks come by task: read each task record once.
                if task.as_ref().map(|t| t.id) != Some(s.task_id) {
                    task = queries::task(path, txn, s.task_id)?;
                }
                let Some(t) = &task else {
                    tracing::warn!(
                        node_id = id,
                        task_id = s.task_id,
                        "assigned subtask without its task record"
                    );
                    continue;
                };
                let rate = match rates.get(&t.tenant) {
                    Some(r) => *r,
                    None => {
                        let r = queries::tenant(path, txn, &t.tenant)?
                            .and_then(|r| r.quota)
                            .map_or(0, |q| q.fuel_per_second);
                        rates.insert(t.tenant.clone(), r);
                        r
                    }
                };
                let mut a = assignment(s, t);
                a.tenant_fuel_per_second = rate;
                out.push(a);
            }
            Ok(out)
        })
        .map_err(to_status)?;
    Ok(AssignmentsResponse {
        fingerprint: fingerprint(&assignments),
        assignments,
        applied_index,
    })
}

/// One subtask joined with what a worker needs of its task. The output is
/// not sent (a pending or running subtask has none worth sending).
fn assignment(mut s: SubtaskRecord, t: &TaskRecord) -> Assignment {
    s.output.clear();
    Assignment {
        subtask: Some(s),
        tenant: t.tenant.clone(),
        module_hash: t.module_hash.clone(),
        task_state: t.state.clone(),
        fuel_limit: t.fuel_limit,
        memory_limit: t.memory_limit,
        priority: t.priority,
        task_create_time_ms: t.create_time_ms,
        accepts_work: records::accepts_work(t).unwrap_or(false),
        concurrency: t.concurrency,
        tenant_fuel_per_second: 0,
    }
}

/// A stable 64-bit hash (FNV-1a) of what a worker acts on: each
/// assignment's (task, step, ordinal, attempt, state, task state, task
/// concurrency), in order.
/// The same assignments give the same value in every process and version.
pub fn fingerprint(assignments: &[Assignment]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    eat(&(assignments.len() as u64).to_be_bytes());
    let none = SubtaskRecord::default();
    for a in assignments {
        let s = a.subtask.as_ref().unwrap_or(&none);
        eat(&s.task_id.to_be_bytes());
        eat(&s.step.to_be_bytes());
        eat(&s.ordinal.to_be_bytes());
        eat(&s.attempt.to_be_bytes());
        for text in [&s.state, &a.task_state] {
            eat(&(text.len() as u64).to_be_bytes());
            eat(text.as_bytes());
        }
        // How many run at once changes with a modified concurrency alone
        // (0, unknown to older servers, leaves the value as it was).
        if a.concurrency != 0 {
            eat(&a.concurrency.to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(task: u64, ordinal: u32, attempt: u32, state: &str, task_state: &str) -> Assignment {
        Assignment {
            subtask: Some(SubtaskRecord {
                task_id: task,
                ordinal,
                attempt,
                state: state.into(),
                payload: vec![1, 2, 3],
                ..SubtaskRecord::default()
            }),
            task_state: task_state.into(),
            ..Assignment::default()
        }
    }

    #[test]
    fn fingerprint_is_stable() {
        // Pinned: the value must not change across builds or processes.
        // (Cross-checked with an independent FNV-1a implementation.)
        assert_eq!(fingerprint(&[]), 0xa8c7_f832_281a_39c5);
        let list = vec![
            a(1, 0, 1, "pending", "running"),
            a(1, 1, 2, "running", "running"),
        ];
        assert_eq!(fingerprint(&list), 0xfe9e_44e8_b397_c871);
    }

    #[test]
    fn fingerprint_sees_what_workers_act_on() {
        let base = vec![a(1, 0, 1, "pending", "running")];
        let f = fingerprint(&base);
        for changed in [
            vec![a(2, 0, 1, "pending", "running")],
            vec![a(1, 1, 1, "pending", "running")],
            vec![a(1, 0, 2, "pending", "running")],
            vec![a(1, 0, 1, "running", "running")],
            vec![a(1, 0, 1, "pending", "pausing")],
            vec![],
            vec![
                a(1, 0, 1, "pending", "running"),
                a(1, 0, 1, "pending", "running"),
            ],
        ] {
            assert_ne!(fingerprint(&changed), f, "{changed:?}");
        }
        // A modified concurrency alone changes it.
        let mut modified = base.clone();
        modified[0].concurrency = 3;
        let f3 = fingerprint(&modified);
        assert_ne!(f3, f);
        modified[0].concurrency = 4;
        assert_ne!(fingerprint(&modified), f3);
        // Payloads, checkpoints and limits are not part of it.
        let mut same = base.clone();
        same[0].subtask.as_mut().unwrap().payload = vec![9];
        same[0].fuel_limit = 7;
        assert_eq!(fingerprint(&same), f);
        // Field boundaries are delimited: moving a byte between the two
        // strings changes the hash.
        assert_ne!(
            fingerprint(&[a(1, 0, 1, "ab", "c")]),
            fingerprint(&[a(1, 0, 1, "a", "bc")])
        );
    }

    #[test]
    fn steps_and_reports_travel_intact() {
        use crate::exec::steps::{self, MoveStep};
        let queued = SubtaskAt {
            task: 7,
            step: 1,
            ordinal: 2,
            attempt: 3,
        };
        let step = Step::MoveSubtask {
            subtask: queued,
            from: 4,
            to: 5,
        };
        let msg = step_message(9, step).unwrap();
        let got = MoveStep::from_proto(&msg).unwrap();
        assert_eq!(
            (got.operator, got.key, got.attempt, got.from, got.to),
            (9, (7, 1, 2), 3, 4, 5)
        );
        // Node 5 claimed it at the next attempt: the coordinator reads the
        // report as the move taken there.
        let sent = steps::reports(5, &[got], &Default::default(), |k, a| {
            k == (7, 1, 2) && a == 4
        });
        assert_eq!(
            report_of(5, &sent[0]),
            Some(Report {
                node: 5,
                operator: 9,
                subtask: SubtaskAt {
                    attempt: 4,
                    ..queued
                },
                outcome: StepOutcome::Taken,
            })
        );
        // Only moves travel; malformed reports are dropped.
        assert!(step_message(1, Step::TransferLeader { from: 1, to: 2 }).is_none());
        let mut bad = sent[0];
        bad.outcome = 7;
        assert!(report_of(5, &bad).is_none());
        bad.outcome = 0;
        bad.subtask = None;
        assert!(report_of(5, &bad).is_none());
    }

    #[test]
    fn description_changes_are_seen() {
        let desc = RegisterNode {
            id: 3,
            addr: "127.0.0.1:1".into(),
            slots: 2,
            worker: true,
            ..RegisterNode::default()
        };
        let stored = NodeRecord {
            id: 3,
            addr: "127.0.0.1:1".into(),
            slots: 2,
            worker: true,
            up: false,
            last_heartbeat_ms: 5,
            ..NodeRecord::default()
        };
        assert!(same_description(&stored, &desc));
        let mut other = desc.clone();
        other.labels.insert("zone".into(), "a".into());
        assert!(!same_description(&stored, &other));
        let other = RegisterNode {
            slots: 4,
            ..desc.clone()
        };
        assert!(!same_description(&stored, &other));
    }
}
