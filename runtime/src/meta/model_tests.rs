//! The task framework's commands applied to a real state machine: every
//! command's happy path, rejections (illegal transitions, the fence, bad
//! uploads) that change nothing, and determinism across two replicas.

use std::path::Path;

use sha2::{Digest, Sha256};
use stoker_proto::meta::{
    change_subtasks, command, command_result, AddSubtasks, AssignSubtask, ChangeSubtasks,
    ClaimSubtask, Command, CommandResult, CommitModule, CreateTenant, DeleteModule, FinishTask,
    GcHistory, MarkNodeDown, ModifyTask, NewSubtask, NodeHeartbeat, NodeLoad, PutModuleChunk,
    RegisterNode, ReportSubtask, RequeueSubtask, SetTaskState, SubmitTask, SubtaskRef,
    SweepModuleStaging, TaskModification,
};

use super::queries::{self, TaskFilter};
use super::tx::Tx;
use super::*;
use crate::model::{SubtaskState, TaskState};

pub(super) struct Sm {
    _dir: tempfile::TempDir,
    pub(super) s: RedbStorage,
    index: u64,
}

impl Sm {
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStorage::open(&dir.path().join("meta.redb")).unwrap();
        Sm {
            _dir: dir,
            s,
            index: 0,
        }
    }

    /// Closes the database and opens it again, as a restart does.
    pub(super) fn reopen(self) -> Self {
        let Sm { _dir, s, index } = self;
        let path = s.path().to_path_buf();
        drop(s);
        Sm {
            s: RedbStorage::open(&path).unwrap(),
            _dir,
            index,
        }
    }

    pub(super) fn apply(&mut self, kind: command::Kind) -> CommandResult {
        self.index += 1;
        let mut tx = self.s.begin_apply().unwrap();
        let cmd = Command { kind: Some(kind) };
        let r = state_machine::apply_command(tx.path(), &Tx::new(tx.txn()), &cmd).unwrap();
        tx.set_applied(self.index, 1);
        tx.commit().unwrap();
        r
    }

    #[track_caller]
    pub(super) fn ok(&mut self, kind: command::Kind) -> command_result::Kind {
        let r = self.apply(kind);
        assert!(r.error.is_empty(), "rejected: {}", r.error);
        r.kind.unwrap()
    }

    /// Applies a command that must be rejected and change nothing.
    #[track_caller]
    pub(super) fn rejected(&mut self, kind: command::Kind) -> String {
        let before = self.s.digest().unwrap();
        let r = self.apply(kind);
        assert!(!r.error.is_empty(), "accepted: {:?}", r.kind);
        assert!(r.kind.is_none());
        assert_eq!(
            self.s.digest().unwrap(),
            before,
            "{} changed state",
            r.error
        );
        r.error
    }

    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Path, &redb::ReadTransaction) -> Result<T, MetaError>,
    ) -> T {
        let txn = self.s.read().unwrap();
        f(self.s.path(), &txn).unwrap()
    }

    pub(super) fn task(&self, id: u64) -> stoker_proto::meta::TaskRecord {
        self.read(|p, t| queries::task(p, t, id)).unwrap()
    }

    pub(super) fn step(
        &self,
        id: u64,
        step: u32,
    ) -> (
        Vec<stoker_proto::meta::SubtaskRecord>,
        crate::sched::task::StepCounts,
    ) {
        self.read(|p, t| queries::step_subtasks(p, t, id, step))
    }
}

pub(super) use command::Kind as C;

pub(super) fn hash_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Uploads `bytes` in chunks of `chunk` bytes; returns the hash.
pub(super) fn upload(sm: &mut Sm, bytes: &[u8], chunk: usize) -> String {
    let hash = hash_of(bytes);
    let mut n = 0;
    for (i, part) in bytes.chunks(chunk).enumerate() {
        sm.ok(C::PutModuleChunk(PutModuleChunk {
            hash: hash.clone(),
            index: i as u32,
            data: part.to_vec(),
            time_ms: 0,
        }));
        n += 1;
    }
    sm.ok(C::CommitModule(commit(&hash, n)));
    hash
}

pub(super) fn commit(hash: &str, chunks: u32) -> CommitModule {
    CommitModule {
        hash: hash.to_string(),
        name: "wordcount".into(),
        tag: "v1".into(),
        abi_version: 1,
        upload_time_ms: 1000,
        chunks,
        ..Default::default()
    }
}

pub(super) fn register(sm: &mut Sm, id: u64, labels: &[(&str, &str)]) {
    sm.ok(C::RegisterNode(RegisterNode {
        id,
        addr: format!("127.0.0.1:{}", 7400 + id),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        scope: String::new(),
        slots: 4,
        memory_bytes: 1 << 30,
        scheduler: id == 1,
        worker: true,
        time_ms: 100,
    }));
}

pub(super) fn submit_spec(hash: &str, priority: u32, time: u64) -> SubmitTask {
    SubmitTask {
        module_hash: hash.to_string(),
        input: b"hello world".to_vec(),
        priority,
        create_time_ms: time,
        concurrency: 2,
        ..Default::default()
    }
}

pub(super) fn submit(sm: &mut Sm, hash: &str, priority: u32, time: u64) -> u64 {
    match sm.ok(C::SubmitTask(submit_spec(hash, priority, time))) {
        command_result::Kind::SubmitTask(r) => r.id,
        k => panic!("unexpected {k:?}"),
    }
}

pub(super) fn add(
    sm: &mut Sm,
    task: u64,
    step: u32,
    ordinals: std::ops::Range<u32>,
    idempotent: bool,
    last: bool,
) {
    sm.ok(C::AddSubtasks(AddSubtasks {
        task_id: task,
        step,
        subtasks: ordinals
            .map(|o| NewSubtask {
                ordinal: o,
                payload: format!("part {o}").into_bytes(),
                idempotent,
            })
            .collect(),
        last,
        start: false,
    }));
}

pub(super) fn set_state(task: u64, state: TaskState) -> command::Kind {
    C::SetTaskState(SetTaskState {
        id: task,
        state: state.to_string(),
        error: String::new(),
    })
}

pub(super) fn sref(task: u64, step: u32, ordinal: u32) -> Option<SubtaskRef> {
    Some(SubtaskRef {
        task_id: task,
        step,
        ordinal,
    })
}

pub(super) fn assign(task: u64, step: u32, ordinal: u32, node: u64) -> command::Kind {
    C::AssignSubtask(AssignSubtask {
        subtask: sref(task, step, ordinal),
        node,
    })
}

pub(super) fn claim(task: u64, step: u32, ordinal: u32, node: u64, attempt: u32) -> command::Kind {
    C::ClaimSubtask(ClaimSubtask {
        subtask: sref(task, step, ordinal),
        node,
        attempt,
        time_ms: 2000,
    })
}

pub(super) fn report(
    task: u64,
    step: u32,
    ordinal: u32,
    node: u64,
    attempt: u32,
    state: SubtaskState,
    output: &[u8],
) -> ReportSubtask {
    ReportSubtask {
        subtask: sref(task, step, ordinal),
        node,
        attempt,
        state: state.to_string(),
        output: output.to_vec(),
        fuel_used: 10,
        time_ms: 3000,
        ..Default::default()
    }
}

/// Assigns, claims and reports one subtask succeeded on `node`.
pub(super) fn run_ok(sm: &mut Sm, task: u64, step: u32, ordinal: u32, node: u64) {
    let attempt = match sm.ok(assign(task, step, ordinal, node)) {
        command_result::Kind::SubtaskState(r) => r.attempt,
        k => panic!("unexpected {k:?}"),
    };
    sm.ok(claim(task, step, ordinal, node, attempt));
    sm.ok(C::ReportSubtask(report(
        task,
        step,
        ordinal,
        node,
        attempt,
        SubtaskState::Succeed,
        format!("out {ordinal}").as_bytes(),
    )));
}

/// A module, two nodes and a pending task.
pub(super) fn setup() -> (Sm, String, u64) {
    let mut sm = Sm::new();
    register(&mut sm, 1, &[]);
    register(&mut sm, 2, &[("zone", "z2")]);
    let hash = upload(&mut sm, &[7u8; 10_000], 3000);
    let task = submit(&mut sm, &hash, 0, 5000);
    (sm, hash, task)
}

#[test]
fn nodes_register_heartbeat_and_go_down() {
    let mut sm = Sm::new();
    register(&mut sm, 1, &[("role", "dist_worker")]);
    register(&mut sm, 2, &[]);
    sm.ok(C::NodeHeartbeat(NodeHeartbeat {
        id: 2,
        time_ms: 900,
        load: Some(NodeLoad {
            cpu: Some(0.42),
            ..NodeLoad::default()
        }),
    }));
    sm.ok(C::MarkNodeDown(MarkNodeDown { id: 1 }));
    let views = sm.read(queries::nodes);
    assert_eq!(views.len(), 2);
    assert!(!views[0].up && views[0].has_label("role", "dist_worker"));
    assert!(views[1].up);
    let n2 = sm.read(|p, t| queries::node(p, t, 2)).unwrap();
    assert_eq!((n2.last_heartbeat_ms, n2.registered_ms), (900, 100));
    assert_eq!(n2.load.and_then(|l| l.cpu), Some(0.42));
    // A heartbeat brings a down node back; an unknown node is rejected.
    sm.ok(C::NodeHeartbeat(NodeHeartbeat {
        id: 1,
        time_ms: 950,
        load: None,
    }));
    assert!(sm.read(queries::nodes)[0].up);
    // A heartbeat's load is kept; an older, reordered one does not replace
    // it, and a re-registration keeps it.
    let load = |command: &str| NodeLoad {
        command: command.into(),
        allowed: 1,
        ..NodeLoad::default()
    };
    sm.ok(C::NodeHeartbeat(NodeHeartbeat {
        id: 2,
        time_ms: 1000,
        load: Some(load("downclock")),
    }));
    sm.ok(C::NodeHeartbeat(NodeHeartbeat {
        id: 2,
        time_ms: 990,
        load: Some(load("overclock")),
    }));
    let n2 = sm.read(|p, t| queries::node(p, t, 2)).unwrap();
    assert_eq!(n2.load, Some(load("downclock")));
    register(&mut sm, 2, &[("zone", "b")]);
    let n2 = sm.read(|p, t| queries::node(p, t, 2)).unwrap();
    assert_eq!(n2.load, Some(load("downclock")));
    let e = sm.rejected(C::NodeHeartbeat(NodeHeartbeat {
        id: 9,
        time_ms: 1,
        load: None,
    }));
    assert_eq!(e, "node 9 not found");
    let e = sm.rejected(C::RegisterNode(RegisterNode::default()));
    assert!(e.contains("must not be 0"), "{e}");
    sm.ok(C::CreateTenant(CreateTenant {
        id: "acme".into(),
        name: "Acme".into(),
        ..CreateTenant::default()
    }));
    let e = sm.rejected(C::CreateTenant(CreateTenant {
        id: "acme".into(),
        name: "again".into(),
        ..CreateTenant::default()
    }));
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn module_upload_commits_chunks_and_reads_back() {
    let mut sm = Sm::new();
    let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let hash = upload(&mut sm, &bytes, 4096);
    assert_eq!(
        sm.read(|p, t| queries::module_bytes(p, t, &hash)),
        Some(bytes)
    );
    let m = sm
        .read(|p, t| queries::module(p, t, "default", &hash))
        .unwrap();
    assert_eq!(
        (m.size, m.chunks, m.tenant.as_str()),
        (10_000, 3, "default")
    );
    assert_eq!(sm.read(|p, t| queries::modules(p, t, None)).len(), 1);
    let by_name = sm.read(|p, t| queries::find_module(p, t, Some("default"), "wordcount", ""));
    assert_eq!(by_name.unwrap().hash, hash);
    let by_hash = sm.read(|p, t| queries::find_module(p, t, Some("default"), &hash, ""));
    assert_eq!(by_hash.unwrap().name, "wordcount");
    assert!(sm
        .read(|p, t| queries::find_module(p, t, Some("default"), "wordcount", "v2"))
        .is_none());
    // Committing the same module again is a no-op.
    match sm.ok(C::CommitModule(commit(&hash, 3))) {
        command_result::Kind::CommitModule(r) => assert!(!r.created),
        k => panic!("unexpected {k:?}"),
    }
    sm.ok(C::DeleteModule(DeleteModule {
        hash: hash.clone(),
        tenant: String::new(),
    }));
    assert_eq!(sm.read(|p, t| queries::module_bytes(p, t, &hash)), None);
}

#[test]
fn module_upload_with_a_wrong_hash_or_missing_chunk_is_rejected() {
    let mut sm = Sm::new();
    let wrong = hash_of(b"something else");
    for (i, part) in [b"abc".as_slice(), b"def"].iter().enumerate() {
        sm.ok(C::PutModuleChunk(PutModuleChunk {
            hash: wrong.clone(),
            index: i as u32,
            data: part.to_vec(),
            time_ms: 0,
        }));
    }
    let e = sm.rejected(C::CommitModule(commit(&wrong, 2)));
    assert!(
        e.contains("hash to") && e.contains(&hash_of(b"abcdef")),
        "{e}"
    );
    let e = sm.rejected(C::CommitModule(commit(&wrong, 3)));
    assert!(e.contains("expected chunks 0..3, 2 are staged"), "{e}");
    assert_eq!(
        sm.read(|p, t| queries::module(p, t, "default", &wrong)),
        None
    );
    let e = sm.rejected(C::PutModuleChunk(PutModuleChunk {
        hash: "ABC".into(),
        index: 0,
        data: vec![1],
        time_ms: 0,
    }));
    assert!(e.contains("not a lowercase hex sha256"), "{e}");
    let e = sm.rejected(C::PutModuleChunk(PutModuleChunk {
        hash: wrong.clone(),
        index: 32,
        data: vec![1],
        time_ms: 0,
    }));
    assert!(e.contains("beyond"), "{e}");
}

#[test]
fn abandoned_uploads_are_swept_and_fresh_or_committed_ones_kept() {
    let mut sm = Sm::new();
    let stage = |sm: &mut Sm, bytes: &[u8], time_ms: u64| {
        let hash = hash_of(bytes);
        sm.ok(C::PutModuleChunk(PutModuleChunk {
            hash: hash.clone(),
            index: 0,
            data: bytes.to_vec(),
            time_ms,
        }));
        hash
    };
    let old = stage(&mut sm, b"old upload", 1_000);
    let fresh = stage(&mut sm, b"fresh upload", 5_000);
    let done = stage(&mut sm, b"committed upload", 1_000);
    sm.ok(C::CommitModule(commit(&done, 1)));
    assert_eq!(sm.read(|p, t| queries::abandoned_uploads(p, t, 2_000)), 1);
    let r = sm.ok(C::SweepModuleStaging(SweepModuleStaging {
        before_ms: 2_000,
    }));
    assert!(matches!(
        r,
        command_result::Kind::Count(stoker_proto::meta::CountResult { count: 1 })
    ));
    assert_eq!(
        sm.read(|p, t| queries::abandoned_uploads(p, t, u64::MAX)),
        1
    );
    // The swept upload's chunks are gone; the fresh one still commits.
    let e = sm.rejected(C::CommitModule(commit(&old, 1)));
    assert!(e.contains("expected chunks 0..1, 0 are staged"), "{e}");
    sm.ok(C::CommitModule(CommitModule {
        name: "fresh".into(),
        ..commit(&fresh, 1)
    }));
    assert_eq!(
        sm.read(|p, t| queries::abandoned_uploads(p, t, u64::MAX)),
        0
    );
    assert!(sm.read(|p, t| queries::module_bytes(p, t, &done)).is_some());
}

#[test]
fn submit_validates_and_numbers_tasks() {
    let (mut sm, hash, first) = setup();
    assert_eq!(first, 1);
    let t = sm.task(first);
    assert_eq!(t.state, "pending");
    assert_eq!(
        (t.priority, t.max_attempts, t.tenant.as_str()),
        (512, 3, "default")
    );
    assert_eq!(t.input_size, 11);
    assert_eq!(
        sm.read(|p, t| queries::task_input(p, t, first)),
        b"hello world"
    );
    assert_eq!(submit(&mut sm, &hash, 7, 6000), 2);
    let e = sm.rejected(C::SubmitTask(submit_spec(&hash, 2000, 1)));
    assert_eq!(e, "priority 2000 is outside 1..=1024");
    let e = sm.rejected(C::SubmitTask(SubmitTask {
        concurrency: 0,
        ..submit_spec(&hash, 0, 1)
    }));
    assert_eq!(e, "concurrency must be at least 1");
    let missing = hash_of(b"missing");
    let e = sm.rejected(C::SubmitTask(submit_spec(&missing, 0, 1)));
    assert_eq!(e, format!("module {missing} not found"));
    let e = sm.rejected(C::SubmitTask(SubmitTask {
        tenant: "nobody".into(),
        ..submit_spec(&hash, 0, 1)
    }));
    assert_eq!(e, "unknown tenant nobody");
    // The module is in use now.
    let e = sm.rejected(C::DeleteModule(DeleteModule {
        hash: hash.clone(),
        tenant: String::new(),
    }));
    assert_eq!(e, format!("module {hash} is used by unfinished task 2"));
}

#[test]
fn a_task_runs_its_steps_finishes_into_history_and_is_collected() {
    let (mut sm, hash, task) = setup();
    // Step 0 in two batches, the second seals it; only then may it run.
    add(&mut sm, task, 0, 0..2, true, false);
    assert!(!sm.task(task).step_planned);
    let e = sm.rejected(set_state(task, TaskState::Running));
    assert_eq!(
        e,
        format!("task {task} runs once its first step is planned")
    );
    add(&mut sm, task, 0, 2..3, true, true);
    sm.ok(set_state(task, TaskState::Running));
    let (subs, counts) = sm.step(task, 0);
    assert_eq!(subs.len(), 3);
    assert_eq!(counts.get(SubtaskState::Pending), 3);
    // The next step waits for this one.
    let e = sm.rejected(C::AddSubtasks(AddSubtasks {
        task_id: task,
        step: 1,
        subtasks: vec![NewSubtask::default()],
        last: true,
        start: false,
    }));
    assert!(e.contains("unfinished or failed subtasks"), "{e}");
    for o in 0..3 {
        run_ok(&mut sm, task, 0, o, 1 + u64::from(o % 2));
    }
    let (subs, counts) = sm.step(task, 0);
    assert_eq!(counts.get(SubtaskState::Succeed), 3);
    assert_eq!(subs[2].output, b"out 2");
    assert_eq!((subs[2].start_time_ms, subs[2].end_time_ms), (2000, 3000));
    add(&mut sm, task, 1, 0..1, false, true);
    let t = sm.task(task);
    assert_eq!((t.step, t.step_planned, t.fuel_used), (1, true, 30));
    let finish_early = C::FinishTask(FinishTask {
        id: task,
        state: "succeed".into(),
        time_ms: 8000,
        ..Default::default()
    });
    let e = sm.rejected(finish_early);
    assert_eq!(
        e,
        format!("task {task} has 1 unfinished subtasks in step 1; cancel them first")
    );
    run_ok(&mut sm, task, 1, 0, 2);
    sm.ok(C::FinishTask(FinishTask {
        id: task,
        state: "succeed".into(),
        result: b"done".to_vec(),
        error: String::new(),
        time_ms: 9000,
    }));
    let t = sm.task(task);
    assert_eq!(
        (t.state.as_str(), t.result.as_slice(), t.finish_time_ms),
        ("succeed", b"done".as_slice(), 9000)
    );
    let unfinished = sm.read(|p, t| queries::list_tasks(p, t, &TaskFilter::default()));
    assert!(unfinished.is_empty());
    let all = TaskFilter {
        include_finished: true,
        ..Default::default()
    };
    assert_eq!(sm.read(|p, t| queries::list_tasks(p, t, &all)).len(), 1);
    // No longer in use: the module may go.
    sm.ok(C::DeleteModule(DeleteModule {
        hash,
        tenant: String::new(),
    }));
    // Collected only once older than the cut.
    let gc = |before_ms| {
        C::GcHistory(GcHistory {
            before_ms,
            limit: 0,
        })
    };
    match sm.ok(gc(9000)) {
        command_result::Kind::Count(c) => assert_eq!(c.count, 0),
        k => panic!("unexpected {k:?}"),
    }
    match sm.ok(gc(9001)) {
        command_result::Kind::Count(c) => assert_eq!(c.count, 1),
        k => panic!("unexpected {k:?}"),
    }
    assert_eq!(sm.read(|p, t| queries::task(p, t, task)), None);
    assert!(sm.read(|p, t| queries::task_input(p, t, task)).is_empty());
    assert_eq!(sm.step(task, 0).0.len(), 0);
}

#[test]
fn the_batch_that_seals_a_pending_tasks_step_may_start_it() {
    let (mut sm, _hash, task) = setup();
    let batch = |ordinal: u32, last: bool, start: bool| {
        C::AddSubtasks(AddSubtasks {
            task_id: task,
            step: 0,
            subtasks: vec![NewSubtask {
                ordinal,
                ..Default::default()
            }],
            last,
            start,
        })
    };
    // Only the sealing batch starts the task.
    let e = sm.rejected(batch(0, false, true));
    assert!(e.contains("only the batch that seals"), "{e}");
    sm.ok(batch(0, false, false));
    assert_eq!(sm.task(task).state, "pending");
    sm.ok(batch(1, true, true));
    let t = sm.task(task);
    assert_eq!((t.state.as_str(), t.step_planned), ("running", true));
    // A running task is not started again.
    let e = sm.rejected(batch(2, true, true));
    assert!(e.contains(&format!("task {task} is running")), "{e}");
}

#[test]
fn illegal_transitions_are_rejected_with_the_message() {
    let (mut sm, _, task) = setup();
    let e = sm.rejected(C::FinishTask(FinishTask {
        id: task,
        state: "succeed".into(),
        time_ms: 1,
        ..Default::default()
    }));
    assert_eq!(e, "illegal task transition pending -> succeed");
    let e = sm.rejected(set_state(task, TaskState::Resuming));
    assert_eq!(e, "illegal task transition pending -> resuming");
    sm.ok(set_state(task, TaskState::Cancelling));
    sm.ok(set_state(task, TaskState::Reverting));
    sm.ok(C::FinishTask(FinishTask {
        id: task,
        state: "reverted".into(),
        time_ms: 1,
        ..Default::default()
    }));
    let e = sm.rejected(set_state(task, TaskState::Running));
    assert_eq!(
        e,
        "illegal task transition reverted -> running: the task has finished"
    );
    let e = sm.rejected(set_state(task, TaskState::Succeed));
    assert!(e.contains("finish_task"), "{e}");
    let e = sm.rejected(set_state(99, TaskState::Running));
    assert_eq!(e, "task 99 not found");
    // Subtask edges: a pending subtask cannot be reported.
    let (mut sm, _, task) = setup();
    add(&mut sm, task, 0, 0..1, false, true);
    sm.ok(set_state(task, TaskState::Running));
    sm.ok(assign(task, 0, 0, 1));
    sm.ok(claim(task, 0, 0, 1, 1));
    let e = sm.rejected(C::ReportSubtask(report(
        task,
        0,
        0,
        1,
        1,
        SubtaskState::Pending,
        b"",
    )));
    assert_eq!(e, "illegal subtask transition running -> pending");
}

#[test]
fn reports_are_fenced_by_node_and_attempt_and_commit_once() {
    let (mut sm, _, task) = setup();
    add(&mut sm, task, 0, 0..1, true, true);
    let e = sm.rejected(assign(task, 0, 0, 1));
    assert!(
        e.contains("is pending: its subtasks are not assigned"),
        "{e}"
    );
    sm.ok(set_state(task, TaskState::Running));
    sm.ok(assign(task, 0, 0, 1));
    // The balancer moves the pending subtask to node 2 before node 1 claims it.
    sm.ok(assign(task, 0, 0, 2));
    let e = sm.rejected(claim(task, 0, 0, 1, 1));
    assert_eq!(
        e,
        format!("stale report for subtask {task}/0/0: assigned to node 2 attempt 2, not node 1 attempt 1")
    );
    let on = |sm: &Sm, node| -> Vec<(u32, String)> {
        sm.read(|p, t| queries::node_subtasks(p, t, node))
            .into_iter()
            .map(|s| (s.attempt, s.state))
            .collect()
    };
    assert!(on(&sm, 1).is_empty());
    assert_eq!(on(&sm, 2), vec![(2, "pending".to_string())]);
    sm.ok(claim(task, 0, 0, 2, 2));
    assert_eq!(on(&sm, 2), vec![(2, "running".to_string())]);
    // A second claim of the same attempt is stale too.
    let e = sm.rejected(claim(task, 0, 0, 2, 2));
    assert!(e.contains("it is running, not pending"), "{e}");
    // Node 2 is lost: the idempotent subtask is requeued and runs on node 1.
    sm.ok(C::RequeueSubtask(RequeueSubtask {
        subtask: sref(task, 0, 0),
        attempt: 2,
        reason: "node 2 down".into(),
        ..Default::default()
    }));
    assert!(on(&sm, 2).is_empty());
    sm.ok(assign(task, 0, 0, 1));
    sm.ok(claim(task, 0, 0, 1, 3));
    assert_eq!(on(&sm, 1), vec![(3, "running".to_string())]);
    // Node 2's late result is dropped.
    let late = report(task, 0, 0, 2, 2, SubtaskState::Succeed, b"late");
    let e = sm.rejected(C::ReportSubtask(late));
    assert!(e.starts_with("stale report"), "{e}");
    let good = report(task, 0, 0, 1, 3, SubtaskState::Succeed, b"right");
    sm.ok(C::ReportSubtask(good.clone()));
    // The same report applied twice commits once.
    let e = sm.rejected(C::ReportSubtask(good));
    assert!(e.contains("it is succeed, not running"), "{e}");
    assert!(on(&sm, 1).is_empty());
    let (subs, _) = sm.step(task, 0);
    assert_eq!(
        (
            subs[0].output.as_slice(),
            subs[0].attempt,
            subs[0].fuel_used
        ),
        (b"right".as_slice(), 3, 10)
    );
    assert_eq!(sm.task(task).fuel_used, 10);
    // The tenant's total counts the committed report once.
    let tenant = sm.task(task).tenant;
    let fuel = sm.read(super::stats::tenant_fuel);
    assert_eq!(fuel.get(&tenant), Some(&10), "{fuel:?}");
}

#[test]
fn a_report_with_a_start_time_claims_and_ends_an_idempotent_subtask_at_once() {
    let unclaimed = |task, ordinal, node, attempt, state| {
        C::ReportSubtask(ReportSubtask {
            start_time_ms: 2500,
            ..report(task, 0, ordinal, node, attempt, state, b"quick")
        })
    };
    let (mut sm, _, task) = setup();
    add(&mut sm, task, 0, 0..3, true, true);
    sm.ok(set_state(task, TaskState::Running));
    for ordinal in 0..3 {
        sm.ok(assign(task, 0, ordinal, 1));
    }
    // Only the node and attempt it is assigned to may report it.
    let e = sm.rejected(unclaimed(task, 0, 2, 1, SubtaskState::Succeed));
    assert!(e.starts_with("stale report"), "{e}");
    let e = sm.rejected(unclaimed(task, 0, 1, 2, SubtaskState::Succeed));
    assert!(e.starts_with("stale report"), "{e}");
    sm.ok(unclaimed(task, 0, 1, 1, SubtaskState::Succeed));
    // Once: the same report again finds it succeeded.
    let e = sm.rejected(unclaimed(task, 0, 1, 1, SubtaskState::Succeed));
    assert!(e.contains("it is succeed, not pending"), "{e}");
    // A claimed subtask is reported as such, not claimed twice.
    sm.ok(claim(task, 0, 1, 1, 1));
    let e = sm.rejected(unclaimed(task, 1, 1, 1, SubtaskState::Succeed));
    assert!(e.contains("it is running, not pending"), "{e}");
    // A retryable failure goes back to the pool, as after a claim.
    sm.ok(C::ReportSubtask(ReportSubtask {
        retryable: true,
        ..match unclaimed(task, 2, 1, 1, SubtaskState::Failed) {
            C::ReportSubtask(r) => r,
            _ => unreachable!(),
        }
    }));
    let (subs, counts) = sm.step(task, 0);
    assert_eq!(
        (
            subs[0].state.as_str(),
            subs[0].start_time_ms,
            subs[0].end_time_ms
        ),
        ("succeed", 2500, 3000)
    );
    assert_eq!(subs[0].output, b"quick");
    assert_eq!(
        (subs[2].state.as_str(), subs[2].node, subs[2].retries),
        ("pending", 0, 1)
    );
    assert_eq!(
        (
            counts.get(SubtaskState::Succeed),
            counts.get(SubtaskState::Running),
            counts.get(SubtaskState::Pending)
        ),
        (1, 1, 1)
    );
    assert_eq!(sm.task(task).fuel_used, 20);

    // A step that is not idempotent is claimed before it runs.
    let (mut sm, _, task) = setup();
    add(&mut sm, task, 0, 0..1, false, true);
    sm.ok(set_state(task, TaskState::Running));
    sm.ok(assign(task, 0, 0, 1));
    let e = sm.rejected(unclaimed(task, 0, 1, 1, SubtaskState::Succeed));
    assert!(e.contains("must be claimed before it runs"), "{e}");
    // Nor does a pausing task's subtask start by report.
    let (mut sm, _, task) = setup();
    add(&mut sm, task, 0, 0..1, true, true);
    sm.ok(set_state(task, TaskState::Running));
    sm.ok(assign(task, 0, 0, 1));
    sm.ok(set_state(task, TaskState::Pausing));
    let e = sm.rejected(unclaimed(task, 0, 1, 1, SubtaskState::Succeed));
    assert!(e.contains("its subtasks do not start"), "{e}");
}

#[test]
fn resource_config_is_checked_when_applied() {
    use stoker_proto::meta::SetConfig;
    let set = |key: &str, value: &str| {
        C::SetConfig(SetConfig {
            key: key.into(),
            value: value.into(),
        })
    };
    let mut sm = Sm::new();
    let e = sm.rejected(set("resource.scheduler", "fastest"));
    assert!(e.contains("cpu, fixed"), "{e}");
    sm.ok(set("resource.scheduler", "fixed"));
    sm.ok(set("resource.cpu.high", "0.4"));
    let e = sm.rejected(set("resource.cpu.low", "0.6"));
    assert!(e.contains("must be below"), "{e}");
    let e = sm.rejected(set("resource.nope", "1"));
    assert!(e.contains("unknown resource setting"), "{e}");
    sm.ok(set("other.key", "anything"));
    let config = sm.read(|p, t| super::stats::config_with_prefix(p, t, "resource."));
    assert_eq!(config.len(), 2, "{config:?}");
}

#[test]
fn requeue_needs_idempotence_and_retries_count_attempts() {
    let (mut sm, _, task) = setup();
    add(&mut sm, task, 0, 0..2, false, true);
    sm.ok(set_state(task, TaskState::Running));
    sm.ok(assign(task, 0, 0, 1));
    sm.ok(claim(task, 0, 0, 1, 1));
    let requeue = |or_fail| {
        C::RequeueSubtask(RequeueSubtask {
            subtask: sref(task, 0, 0),
            or_fail,
            reason: "node 1 down".into(),
            time_ms: 4000,
            ..Default::default()
        })
    };
    let e = sm.rejected(requeue(false));
    assert_eq!(
        e,
        "illegal subtask transition running -> pending: only subtasks of idempotent steps are re-run elsewhere"
    );
    // A balancing move of a subtask that has started since is refused.
    let e = sm.rejected(C::RequeueSubtask(RequeueSubtask {
        subtask: sref(task, 0, 0),
        reason: "rebalanced".into(),
        only_pending: true,
        ..Default::default()
    }));
    assert!(
        e.contains("it is running, and only a pending subtask is moved"),
        "{e}"
    );
    match sm.ok(requeue(true)) {
        command_result::Kind::SubtaskState(r) => assert_eq!(r.state, "failed"),
        k => panic!("unexpected {k:?}"),
    }
    // A move before the first run does not use up the retry budget.
    sm.ok(assign(task, 0, 1, 1));
    match sm.ok(C::RequeueSubtask(RequeueSubtask {
        subtask: sref(task, 0, 1),
        reason: "node 1 no longer allowed".into(),
        ..Default::default()
    })) {
        command_result::Kind::SubtaskState(r) => {
            assert_eq!((r.state.as_str(), r.attempt), ("pending", 1))
        }
        k => panic!("unexpected {k:?}"),
    }
    let e = sm.rejected(claim(task, 0, 1, 1, 1));
    assert!(e.contains("assigned to node 0 attempt 1"), "{e}");
    // Retryable failures go back to pending until max attempts (3 runs).
    for attempt in 2..=4 {
        sm.ok(assign(task, 0, 1, 2));
        sm.ok(claim(task, 0, 1, 2, attempt));
        let r = ReportSubtask {
            retryable: true,
            error: "flaky".into(),
            ..report(task, 0, 1, 2, attempt, SubtaskState::Failed, b"")
        };
        let expected = if attempt < 4 { "pending" } else { "failed" };
        match sm.ok(C::ReportSubtask(r)) {
            command_result::Kind::SubtaskState(r) => assert_eq!(r.state, expected),
            k => panic!("unexpected {k:?}"),
        }
    }
    let (subs, counts) = sm.step(task, 0);
    assert_eq!(counts.get(SubtaskState::Failed), 2);
    assert_eq!((subs[1].attempt, subs[1].retries), (4, 2));
    assert_eq!(subs[1].error, "flaky");
    // Reported at 3000 after the second retry's run: backoff 2 s.
    assert_eq!(subs[1].retry_after_ms, 5000);
    assert_eq!(super::subtasks::retry_backoff_ms(1), 1000);
    assert_eq!(super::subtasks::retry_backoff_ms(100), 60_000);
}

#[test]
fn subtasks_pause_resume_cancel_and_resolve_in_bulk() {
    let (mut sm, _, task) = setup();
    add(&mut sm, task, 0, 0..4, true, true);
    sm.ok(set_state(task, TaskState::Running));
    sm.ok(assign(task, 0, 0, 1));
    sm.ok(claim(task, 0, 0, 1, 1));
    let change = |kind: change_subtasks::Kind, include_running| {
        C::ChangeSubtasks(ChangeSubtasks {
            task_id: task,
            kind: kind as i32,
            include_running,
            time_ms: 7000,
        })
    };
    let count = |k| match k {
        command_result::Kind::Count(c) => c.count,
        k => panic!("unexpected {k:?}"),
    };
    sm.ok(set_state(task, TaskState::Pausing));
    assert_eq!(count(sm.ok(change(change_subtasks::Kind::Pause, false))), 3);
    // The running one stops on its worker and reports paused.
    sm.ok(C::ReportSubtask(report(
        task,
        0,
        0,
        1,
        1,
        SubtaskState::Paused,
        b"",
    )));
    assert_eq!(sm.step(task, 0).1.get(SubtaskState::Paused), 4);
    sm.ok(set_state(task, TaskState::Paused));
    sm.ok(set_state(task, TaskState::Resuming));
    assert_eq!(
        count(sm.ok(change(change_subtasks::Kind::Resume, false))),
        4
    );
    sm.ok(set_state(task, TaskState::Running));
    // One fails for good; manual recovery resolves it.
    sm.ok(assign(task, 0, 1, 2));
    sm.ok(claim(task, 0, 1, 2, 1));
    sm.ok(C::ReportSubtask(report(
        task,
        0,
        1,
        2,
        1,
        SubtaskState::Failed,
        b"",
    )));
    sm.ok(set_state(task, TaskState::AwaitingResolution));
    assert_eq!(
        count(sm.ok(change(change_subtasks::Kind::Resolve, false))),
        1
    );
    sm.ok(set_state(task, TaskState::Running));
    sm.ok(assign(task, 0, 2, 2));
    sm.ok(claim(task, 0, 2, 2, 1));
    sm.ok(set_state(task, TaskState::Cancelling));
    assert_eq!(
        count(sm.ok(change(change_subtasks::Kind::Cancel, false))),
        3
    );
    assert_eq!(count(sm.ok(change(change_subtasks::Kind::Cancel, true))), 1);
    let counts = sm.step(task, 0).1;
    assert_eq!(counts.get(SubtaskState::Canceled), 4);
    // The cancelled worker's late report is stale.
    let e = sm.rejected(C::ReportSubtask(report(
        task,
        0,
        2,
        2,
        1,
        SubtaskState::Succeed,
        b"x",
    )));
    assert!(e.starts_with("stale report"), "{e}");
}

#[test]
fn modify_applies_when_the_task_returns_and_ranks_follow() {
    let (mut sm, hash, a) = setup();
    let b = submit(&mut sm, &hash, 100, 6000);
    let order = |sm: &Sm| -> Vec<u64> {
        sm.read(|p, t| queries::list_tasks(p, t, &TaskFilter::default()))
            .iter()
            .map(|t| t.id)
            .collect()
    };
    assert_eq!(order(&sm), vec![b, a]);
    let e = sm.rejected(C::ModifyTask(ModifyTask {
        id: a,
        modification: Some(TaskModification::default()),
    }));
    assert!(e.contains("a modification changes"), "{e}");
    sm.ok(C::ModifyTask(ModifyTask {
        id: a,
        modification: Some(TaskModification {
            concurrency: Some(8),
            max_nodes: Some(1),
            priority: Some(1),
        }),
    }));
    let t = sm.task(a);
    assert_eq!(
        (t.state.as_str(), t.modifying_from.as_str(), t.concurrency),
        ("modifying", "pending", 2)
    );
    let e = sm.rejected(set_state(a, TaskState::Running));
    assert_eq!(
        e,
        "illegal task transition modifying -> running: a modifying task returns to the state it came from"
    );
    sm.ok(set_state(a, TaskState::Pending));
    let t = sm.task(a);
    assert_eq!((t.concurrency, t.max_nodes, t.priority), (8, 1, 1));
    assert!(t.modifying_from.is_empty() && t.modification.is_none());
    assert_eq!(order(&sm), vec![a, b]);
    let placement = queries::task_placement(&t);
    assert_eq!((placement.rank.priority, placement.concurrency), (1, 8));
    let only_pending = TaskFilter {
        states: vec![TaskState::Pending],
        limit: 1,
        ..Default::default()
    };
    assert_eq!(
        sm.read(|p, t| queries::list_tasks(p, t, &only_pending))
            .len(),
        1
    );
}
