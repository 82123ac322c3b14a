//! Replicas of the task framework's state machine: the same commands give
//! the same ids, results and digest; snapshots carry the tables; and under
//! random command sequences a rejected command never changes the state and
//! the indexes always agree with the records.

use std::collections::{BTreeMap, BTreeSet};

use stoker_proto::meta::{
    command_result, AddSubtasks, ChangeSubtasks, CommandResult, FinishTask, GcHistory,
    MarkNodeDown, ModifyTask, ModuleRecord, NewSubtask, NodeHeartbeat, PutModuleChunk,
    RegisterNode, RequeueSubtask, StepCountsRecord, SubtaskRecord, TaskModification, TaskRecord,
    TenantUsage,
};
use stoker_proto::Message;

use super::model_tests::*;
use super::queries::{self, TaskFilter};
use super::records::{self, by_node_key, rank_key, rank_of};
use super::{state_machine, subtasks};
use crate::model::{SubtaskState, TaskState};

/// A scripted workload with accepted and rejected commands.
fn workload() -> Vec<C> {
    let hash = hash_of(&[1u8; 100]);
    let mut cmds = vec![
        C::RegisterNode(RegisterNode {
            id: 1,
            slots: 2,
            worker: true,
            labels: BTreeMap::from([
                ("zone".to_string(), "a".to_string()),
                ("role".to_string(), "dist_worker".to_string()),
                ("disk".to_string(), "ssd".to_string()),
            ]),
            ..Default::default()
        }),
        C::PutModuleChunk(PutModuleChunk {
            hash: hash.clone(),
            index: 0,
            data: vec![1u8; 100],
            time_ms: 0,
        }),
        C::CommitModule(commit(&hash, 1)),
    ];
    for i in 0..5u64 {
        cmds.push(C::SubmitTask(submit_spec(&hash, 0, i)));
        cmds.push(C::SubmitTask(submit_spec(&hash, 5000, i)));
    }
    for id in 1..=5u64 {
        cmds.push(C::AddSubtasks(AddSubtasks {
            task_id: id,
            step: 0,
            subtasks: vec![NewSubtask::default()],
            last: true,
            start: false,
        }));
        cmds.push(set_state(id, TaskState::Running));
        cmds.push(assign(id, 0, 0, 1));
        cmds.push(claim(id, 0, 0, 1, 1));
        cmds.push(claim(id, 0, 0, 1, 1));
        cmds.push(C::ReportSubtask(report(
            id,
            0,
            0,
            1,
            1,
            SubtaskState::Succeed,
            b"o",
        )));
    }
    cmds.push(C::MarkNodeDown(MarkNodeDown { id: 1 }));
    cmds
}

#[test]
fn replicas_applying_the_same_commands_agree_on_ids_results_and_digest() {
    let cmds = workload();
    let (mut a, mut b) = (Sm::new(), Sm::new());
    let ra: Vec<CommandResult> = cmds.iter().map(|c| a.apply(c.clone())).collect();
    let rb: Vec<CommandResult> = cmds.iter().map(|c| b.apply(c.clone())).collect();
    assert_eq!(ra, rb);
    assert!(
        ra.iter().any(|r| !r.error.is_empty()),
        "no rejected command"
    );
    let ids: Vec<u64> = ra
        .iter()
        .filter_map(|r| match &r.kind {
            Some(command_result::Kind::SubmitTask(s)) => Some(s.id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    assert_eq!(a.s.digest().unwrap(), b.s.digest().unwrap());
    // The digest covers the new tables.
    b.ok(C::NodeHeartbeat(NodeHeartbeat {
        id: 1,
        time_ms: 1,
        load: None,
    }));
    assert_ne!(a.s.digest().unwrap(), b.s.digest().unwrap());
}

#[test]
fn a_snapshot_carries_the_task_framework_tables() {
    let mut a = Sm::new();
    for c in workload() {
        a.apply(c);
    }
    let data = {
        let txn = a.s.read().unwrap();
        state_machine::export(&txn).unwrap()
    };
    let b = Sm::new();
    let tx = b.s.begin_apply().unwrap();
    state_machine::import(tx.path(), tx.txn(), &data).unwrap();
    tx.commit().unwrap();
    assert_eq!(a.s.digest().unwrap(), b.s.digest().unwrap());
    let tasks = b.read(|p, t| queries::list_tasks(p, t, &TaskFilter::default()));
    assert_eq!(tasks.len(), 5);
    assert_eq!(b.step(1, 0).1.get(SubtaskState::Succeed), 1);
}

#[test]
fn step_counts_and_waiting_subtasks_come_back_from_older_snapshots_and_databases() {
    let mut a = Sm::new();
    for c in workload() {
        a.apply(c);
    }
    // A new task gets two subtasks that wait for a node.
    a.ok(C::SubmitTask(submit_spec(&hash_of(&[1u8; 100]), 0, 99)));
    let all = a.read(|p, t| queries::list_tasks(p, t, &TaskFilter::default()));
    let id = all.iter().map(|t| t.id).max().unwrap();
    a.ok(C::AddSubtasks(AddSubtasks {
        task_id: id,
        step: 0,
        subtasks: vec![
            NewSubtask::default(),
            NewSubtask {
                ordinal: 1,
                ..Default::default()
            },
        ],
        last: true,
        start: true,
    }));
    check_indexes(&a);
    let derived = ["sm_step_counts", "sm_subtasks_waiting"];
    let t = tables(&a);
    assert_eq!(t["sm_subtasks_waiting"].len(), 2);
    assert_eq!(a.read(|p, t| queries::waiting_count(p, t, id, 0)), 2);
    assert_eq!(a.read(|p, t| queries::waiting_count(p, t, id, 1)), 0);
    assert!(!t["sm_step_counts"].is_empty());
    let data = state_machine::export(&a.s.read().unwrap()).unwrap();

    // A snapshot without them (an older build's) gets them counted.
    let mut old = data.clone();
    old.tables.retain(|t| !derived.contains(&t.name.as_str()));
    let b = Sm::new();
    let tx = b.s.begin_apply().unwrap();
    state_machine::import(tx.path(), tx.txn(), &old).unwrap();
    tx.commit().unwrap();
    check_indexes(&b);
    assert_eq!(a.s.digest().unwrap(), b.s.digest().unwrap());

    // A database without them gets them at open (applied index back to 0:
    // these commands were applied without a Raft log).
    let mut tx = a.s.begin_apply().unwrap();
    assert!(tx.txn().delete_table(records::STEP_COUNTS_TABLE).unwrap());
    assert!(tx
        .txn()
        .delete_table(records::SUBTASKS_WAITING_TABLE)
        .unwrap());
    tx.set_applied(0, 0);
    tx.commit().unwrap();
    let a = a.reopen();
    check_indexes(&a);
    assert_eq!(a.s.digest().unwrap(), b.s.digest().unwrap());
}

/// A xorshift generator: random but the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// One random command over a small universe (3 nodes, 5 task ids, 2 steps,
/// 3 ordinals, 4 attempts), often illegal.
fn random_command(rng: &mut Rng, hash: &str, time: u64) -> C {
    let task = 1 + rng.below(5);
    let (step, ordinal) = (rng.below(2) as u32, rng.below(3) as u32);
    let node = 1 + rng.below(3);
    let attempt = rng.below(4) as u32;
    // Biased towards progress so that the walk reaches claims and reports.
    let task_state = if rng.below(2) == 0 {
        TaskState::Running
    } else {
        rng.pick(&TaskState::ALL)
    };
    let subtask_state = if rng.below(2) == 0 {
        SubtaskState::Succeed
    } else {
        rng.pick(&SubtaskState::ALL)
    };
    match rng.below(16) {
        0 => C::RegisterNode(RegisterNode {
            id: node,
            worker: true,
            slots: 2,
            time_ms: time,
            ..Default::default()
        }),
        1 => C::NodeHeartbeat(NodeHeartbeat {
            id: node,
            time_ms: time,
            load: None,
        }),
        2 => C::MarkNodeDown(MarkNodeDown { id: node }),
        3 => C::SubmitTask(submit_spec(hash, rng.pick(&[0, 1, 700, 2000]), time)),
        4 | 5 => set_state(task, task_state),
        6 => C::ModifyTask(ModifyTask {
            id: task,
            modification: Some(TaskModification {
                concurrency: Some(rng.below(3) as u32),
                priority: Some(rng.pick(&[1, 512, 5000])),
                max_nodes: None,
            }),
        }),
        7 => C::FinishTask(FinishTask {
            id: task,
            state: task_state.to_string(),
            time_ms: time,
            ..Default::default()
        }),
        8 => C::AddSubtasks(AddSubtasks {
            task_id: task,
            step,
            subtasks: (0..rng.below(4) as u32)
                .map(|o| NewSubtask {
                    ordinal: o,
                    payload: vec![],
                    idempotent: o % 2 == 0,
                })
                .collect(),
            last: rng.below(2) == 0,
            start: rng.below(4) == 0,
        }),
        9 | 10 => assign(task, step, ordinal, node),
        11 => claim(task, step, ordinal, node, attempt),
        12 | 13 => C::ReportSubtask(stoker_proto::meta::ReportSubtask {
            retryable: rng.below(2) == 0,
            // Half of them claim as they report (a quick unclaimed run).
            start_time_ms: rng.below(2) * time,
            ..report(task, step, ordinal, node, attempt, subtask_state, b"o")
        }),
        14 => C::RequeueSubtask(RequeueSubtask {
            subtask: sref(task, step, ordinal),
            attempt: rng.below(2) as u32 * attempt,
            or_fail: rng.below(2) == 0,
            reason: "lost".into(),
            time_ms: time,
            only_pending: rng.below(2) == 0,
        }),
        _ => C::ChangeSubtasks(ChangeSubtasks {
            task_id: task,
            kind: rng.below(4) as i32,
            include_running: rng.below(2) == 0,
            time_ms: time,
        }),
    }
}

/// A command a well-behaved owner or worker might send next for a random
/// task, read from the replica's state (which noise may have moved on).
fn plausible_command(sm: &Sm, rng: &mut Rng, time: u64) -> Option<C> {
    let id = 1 + rng.below(5);
    let task = sm.read(|p, t| queries::task(p, t, id))?;
    let state: TaskState = task.state.parse().unwrap();
    let (subs, _) = sm.step(id, task.step);
    let sub = (!subs.is_empty()).then(|| subs[rng.below(subs.len() as u64) as usize].clone());
    let node = 1 + rng.below(3);
    Some(match (state, sub) {
        (TaskState::Pending, _) if !task.step_planned => C::AddSubtasks(AddSubtasks {
            task_id: id,
            step: 0,
            subtasks: (0..3)
                .map(|o| NewSubtask {
                    ordinal: o,
                    payload: vec![],
                    idempotent: o != 1,
                })
                .collect(),
            last: true,
            // Half the tasks start with their plan, half by a later command.
            start: id.is_multiple_of(2),
        }),
        (TaskState::Running, Some(s)) => {
            let r = (s.task_id, s.step, s.ordinal);
            match (s.state.as_str(), s.node) {
                ("pending", 0) => assign(r.0, r.1, r.2, node),
                // A quick run of an idempotent step reports unclaimed.
                ("pending", n) if s.idempotent && rng.below(2) == 0 => {
                    C::ReportSubtask(stoker_proto::meta::ReportSubtask {
                        start_time_ms: time,
                        ..report(r.0, r.1, r.2, n, s.attempt, SubtaskState::Succeed, b"q")
                    })
                }
                ("pending", n) => claim(r.0, r.1, r.2, n, s.attempt),
                ("running", n) => C::ReportSubtask(stoker_proto::meta::ReportSubtask {
                    retryable: rng.below(2) == 0,
                    ..report(
                        r.0,
                        r.1,
                        r.2,
                        n,
                        s.attempt,
                        rng.pick(&[
                            SubtaskState::Succeed,
                            SubtaskState::Succeed,
                            SubtaskState::Failed,
                        ]),
                        b"o",
                    )
                }),
                _ => set_state(id, TaskState::Running),
            }
        }
        (s, _) if s.is_finished() => C::GcHistory(GcHistory {
            before_ms: time,
            limit: 1,
        }),
        _ => set_state(id, TaskState::Running),
    })
}

/// A table's rows: key and value bytes.
type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Every table's rows, by table name.
fn tables(sm: &Sm) -> BTreeMap<String, Rows> {
    let txn = sm.s.read().unwrap();
    state_machine::export(&txn)
        .unwrap()
        .tables
        .into_iter()
        .map(|t| {
            let rows = t.entries.into_iter().map(|kv| (kv.key, kv.value)).collect();
            (t.name, rows)
        })
        .collect()
}

/// The unfinished and by-node indexes and the tenants' usage counts hold
/// exactly what the records say.
#[track_caller]
fn check_indexes(sm: &Sm) {
    let t = tables(sm);
    let keys =
        |name: &str| -> BTreeSet<Vec<u8>> { t[name].iter().map(|(k, _)| k.clone()).collect() };
    let mut unfinished = BTreeSet::new();
    let mut usage: BTreeMap<String, TenantUsage> = BTreeMap::new();
    for (_, v) in &t["sm_tasks"] {
        let task = TaskRecord::decode(v.as_slice()).unwrap();
        if !records::task_state(&task).unwrap().is_finished() {
            unfinished.insert(rank_key(&rank_of(&task)).to_vec());
            usage.entry(task.tenant).or_default().unfinished_tasks += 1;
        }
    }
    assert_eq!(keys("sm_tasks_unfinished"), unfinished);
    for (_, v) in &t["sm_modules"] {
        let m = ModuleRecord::decode(v.as_slice()).unwrap();
        usage.entry(m.tenant).or_default().module_bytes += m.size;
    }
    let kept: BTreeMap<String, TenantUsage> = t["sm_tenant_usage"]
        .iter()
        .map(|(k, v)| {
            let tenant = String::from_utf8(k.clone()).unwrap();
            (tenant, TenantUsage::decode(v.as_slice()).unwrap())
        })
        .collect();
    assert_eq!(kept, usage, "the usage counts are the records'");
    let mut by_node = BTreeSet::new();
    for (_, v) in &t["sm_subtasks"] {
        let s = SubtaskRecord::decode(v.as_slice()).unwrap();
        let active = matches!(
            records::subtask_state(&s).unwrap(),
            SubtaskState::Pending | SubtaskState::Running
        );
        if s.node != 0 && active {
            by_node.insert(by_node_key(s.node, s.task_id, s.step, s.ordinal).to_vec());
        }
    }
    assert_eq!(keys("sm_subtasks_by_node"), by_node);
    let mut waiting = BTreeSet::new();
    let mut counts: BTreeMap<Vec<u8>, StepCountsRecord> = BTreeMap::new();
    for (k, v) in &t["sm_subtasks"] {
        let s = SubtaskRecord::decode(v.as_slice()).unwrap();
        if s.node == 0 && records::subtask_state(&s).unwrap() == SubtaskState::Pending {
            waiting.insert(k.clone());
        }
        let c = counts
            .entry(records::step_key(s.task_id, s.step).to_vec())
            .or_default();
        *subtasks::count_of(c, records::subtask_state(&s).unwrap()) += 1;
    }
    assert_eq!(keys("sm_subtasks_waiting"), waiting);
    let kept: BTreeMap<Vec<u8>, StepCountsRecord> = t["sm_step_counts"]
        .iter()
        .map(|(k, v)| (k.clone(), StepCountsRecord::decode(v.as_slice()).unwrap()))
        .collect();
    assert_eq!(kept, counts, "the step counts are the records'");
}

#[test]
fn random_commands_keep_indexes_right_and_rejections_change_nothing() {
    let (mut a, mut b) = (Sm::new(), Sm::new());
    let bytes = [3u8; 64];
    let hash = hash_of(&bytes);
    let setup = [
        C::PutModuleChunk(PutModuleChunk {
            hash: hash.clone(),
            index: 0,
            data: bytes.to_vec(),
            time_ms: 0,
        }),
        C::CommitModule(commit(&hash, 1)),
    ];
    for c in setup {
        a.ok(c.clone());
        b.ok(c);
    }
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut accepted = BTreeMap::<&str, u32>::new();
    for time in 0..3000u64 {
        let cmd = match rng.below(3) {
            0 => random_command(&mut rng, &hash, time),
            _ => plausible_command(&a, &mut rng, time)
                .unwrap_or_else(|| random_command(&mut rng, &hash, time)),
        };
        let before = a.s.digest().unwrap();
        let (ra, rb): (CommandResult, CommandResult) = (a.apply(cmd.clone()), b.apply(cmd));
        assert_eq!(ra, rb);
        if ra.error.is_empty() {
            let kind = match ra.kind.as_ref().unwrap() {
                command_result::Kind::SubtaskState(s) => match s.state.as_str() {
                    "running" => "claim",
                    "succeed" => "report",
                    _ => "subtask",
                },
                command_result::Kind::SubmitTask(_) => "submit",
                _ => "other",
            };
            *accepted.entry(kind).or_default() += 1;
        } else {
            assert_eq!(a.s.digest().unwrap(), before, "{}", ra.error);
        }
        check_indexes(&a);
    }
    assert_eq!(a.s.digest().unwrap(), b.s.digest().unwrap());
    // The walk reached the interesting commands.
    for kind in ["submit", "claim", "report", "subtask"] {
        assert!(accepted.get(kind).is_some_and(|n| *n > 0), "{accepted:?}");
    }
    let all = TaskFilter {
        include_finished: true,
        ..Default::default()
    };
    assert!(!a.read(|p, t| queries::list_tasks(p, t, &all)).is_empty());
}
