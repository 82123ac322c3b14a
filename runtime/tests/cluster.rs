//! The task framework across real `stoker server` processes on 127.0.0.1:
//! scheduler nodes (Raft voters, the leader owning the scheduling) and
//! worker-only nodes, with `kill -9` of workers and of the owner.
//!
//! Clusters are started one at a time (a file-wide lock), and every process
//! is killed when its cluster is dropped.

use std::path::Path;
use std::time::{Duration, Instant};

use stoker::api::local_cluster::LocalCluster;
use stoker::api::meta::connect_stoker;
use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::api::{
    control_task_request::Action, ControlTaskRequest, GetTaskRequest, GetTaskResponse,
    ListNodesRequest, ModifyTaskRequest, SubmitTaskRequest, UploadModuleRequest,
};
use stoker_proto::meta::TaskModification;
use tonic::transport::Channel;

static CLUSTERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(90);

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stoker"))
}

/// The owner notices dead workers quickly in tests.
const CONFIG: &str =
    "[owner]\nnode_timeout_ms = 1500\ntick_ms = 100\n\n[worker]\nheartbeat_interval_ms = 300\n";

struct Harness {
    cluster: LocalCluster,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// `schedulers` scheduler nodes (`sched_args` each) and worker-only
    /// nodes with the given arguments (ids after the schedulers').
    async fn start(schedulers: u64, sched_args: &[&str], workers: &[&[&str]]) -> Harness {
        Self::start_with(CONFIG, schedulers, sched_args, workers).await
    }

    /// [`Harness::start`] with every node reading the TOML `config`.
    async fn start_with(
        config: &str,
        schedulers: u64,
        sched_args: &[&str],
        workers: &[&[&str]],
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<String> = sched_args.iter().map(|s| s.to_string()).collect();
        let mut cluster =
            LocalCluster::start_with_args(exe(), schedulers, dir.path(), Some(config), &|_| {
                args.clone()
            })
            .unwrap();
        for (i, w) in workers.iter().enumerate() {
            cluster.add_worker(schedulers + 1 + i as u64, w).unwrap();
        }
        cluster.wait_leader(Duration::from_secs(20)).await.unwrap();
        let h = Harness { cluster, _dir: dir };
        let want = if sched_args.contains(&"--no-worker") {
            workers.len()
        } else {
            workers.len() + schedulers as usize
        };
        h.cluster
            .wait_workers(want, Duration::from_secs(30))
            .await
            .unwrap();
        h
    }

    /// A client of the first running scheduler node.
    fn client(&self) -> StokerClient<Channel> {
        let running = self.cluster.running();
        let id = self
            .cluster
            .schedulers()
            .into_iter()
            .find(|id| running.contains(id))
            .expect("a scheduler runs");
        connect_stoker(self.cluster.addr(id), Duration::from_secs(20)).unwrap()
    }

    async fn upload(&self, name: &str) -> String {
        let bytes = stoker_test_artifacts::read(name);
        let first = UploadModuleRequest {
            name: name.into(),
            tag: String::new(),
            data: bytes,
        };
        let r = self
            .client()
            .upload_module(futures::stream::iter(vec![first]))
            .await
            .unwrap();
        r.into_inner().module.unwrap().hash
    }

    async fn submit(&self, req: SubmitTaskRequest) -> u64 {
        self.client()
            .submit_task(req)
            .await
            .unwrap()
            .into_inner()
            .id
    }

    async fn get(&self, id: u64) -> GetTaskResponse {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Any running scheduler answers.
            for sid in self.cluster.schedulers() {
                if !self.cluster.running().contains(&sid) {
                    continue;
                }
                let mut c = connect_stoker(self.cluster.addr(sid), Duration::from_secs(5)).unwrap();
                if let Ok(r) = c
                    .get_task(GetTaskRequest {
                        id,
                        with_subtasks: true,
                    })
                    .await
                {
                    return r.into_inner();
                }
            }
            assert!(Instant::now() < deadline, "task {id} cannot be read");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the task has finished; returns its last view.
    async fn wait(&self, id: u64) -> GetTaskResponse {
        self.wait_for(id, |r| finished(&state(r))).await
    }

    async fn wait_for(&self, id: u64, done: impl Fn(&GetTaskResponse) -> bool) -> GetTaskResponse {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self.get(id).await;
            if done(&r) {
                return r;
            }
            // A finished task will not change any more: say so now rather
            // than after the whole wait.
            assert!(
                !finished(&state(&r)),
                "task {id} finished before it got there: {:?}",
                r.task
            );
            assert!(
                Instant::now() < deadline,
                "task {id} did not get there: {:?}",
                r.task
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn control(&self, id: u64, action: Action) -> Result<String, tonic::Status> {
        self.client()
            .control_task(ControlTaskRequest {
                id,
                action: action as i32,
            })
            .await
            .map(|r| r.into_inner().state)
    }
}

fn state(r: &GetTaskResponse) -> String {
    r.task.as_ref().unwrap().state.clone()
}

fn finished(s: &str) -> bool {
    matches!(s, "succeed" | "failed" | "reverted")
}

fn running_count(r: &GetTaskResponse) -> usize {
    r.subtasks.iter().filter(|s| s.state == "running").count()
}

fn submit_req(hash: &str, input: impl Into<Vec<u8>>) -> SubmitTaskRequest {
    SubmitTaskRequest {
        module: hash.into(),
        input: input.into(),
        concurrency: 2,
        ..Default::default()
    }
}

/// Misbehave input: `n` subtasks that each burn `millions` million
/// iterations (spin) and output `spun <millions>`.
fn spins(n: usize, millions: u32) -> String {
    (0..n).map(|_| format!("spin:{millions}\n")).collect()
}

fn assert_each_output_once(r: &GetTaskResponse, n: usize, millions: u32) {
    let task = r.task.as_ref().unwrap();
    assert_eq!(task.state, "succeed", "{task:?}");
    let result = String::from_utf8(task.result.clone()).unwrap();
    assert_eq!(
        result,
        format!("spun {millions}").repeat(n),
        "one output per subtask"
    );
    assert_eq!(r.subtasks.len(), n);
    assert!(r.subtasks.iter().all(|s| s.state == "succeed"));
}

fn text() -> String {
    let mut text = String::new();
    for i in 0..300 {
        text.push_str(&format!(
            "Stoker runs wasm {i} tasks; the owner plans, the workers run. Run {} again!\n",
            i % 5
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_schedulers_and_two_workers_run_wordcount_and_sort() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(3, &["--no-worker"], &[&["--slots", "2"], &["--slots", "2"]]).await;
    let wc = h.upload("wordcount").await;
    let text = text();
    let id = h.submit(submit_req(&wc, text.clone())).await;
    let r = h.wait(id).await;
    let task = r.task.clone().unwrap();
    assert_eq!(task.state, "succeed", "{task:?}");
    let got: Vec<(String, u64)> = serde_json::from_slice(&task.result).unwrap();
    assert_eq!(got, stoker_test_artifacts::wordcount_top20(&text));
    assert!(task.fuel_used > 0);
    // Only the worker-only nodes ran subtasks, and both of them did.
    let nodes: std::collections::BTreeSet<u64> = r.subtasks.iter().map(|s| s.node).collect();
    assert!(nodes.iter().all(|n| *n == 4 || *n == 5), "{nodes:?}");

    // An input over the 1 MiB inline limit is kept as a blob of the
    // tenant, not replicated through the log.
    let big = text.repeat(60);
    assert!(big.len() > 1 << 20);
    let id = h.submit(submit_req(&wc, big.clone())).await;
    let r = h.wait(id).await;
    let task = r.task.clone().unwrap();
    assert_eq!(task.state, "succeed", "{task:?}");
    assert_eq!(task.input_size, big.len() as u64);
    assert!(task.input_blob.starts_with("inputs/"), "{task:?}");
    let got: Vec<(String, u64)> = serde_json::from_slice(&task.result).unwrap();
    assert_eq!(got, stoker_test_artifacts::wordcount_top20(&big));

    // sort: records in a blob, sorted output in a blob.
    let sort = h.upload("sort").await;
    let mut records: Vec<String> = (0..500)
        .map(|i| format!("{:08x}", (i as u64).wrapping_mul(2654435761) % 1_000_003))
        .collect();
    let blob_dir = h.cluster.blob_dir().join("tenants/default/inputs");
    std::fs::create_dir_all(&blob_dir).unwrap();
    std::fs::write(blob_dir.join("records.txt"), records.join("\n") + "\n").unwrap();
    let input = serde_json::json!({"input_key": "inputs/records.txt", "chunks": 4}).to_string();
    let id = h.submit(submit_req(&sort, input)).await;
    let r = h.wait(id).await;
    let task = r.task.unwrap();
    assert_eq!(task.state, "succeed", "{task:?}");
    let out: serde_json::Value = serde_json::from_slice(&task.result).unwrap();
    let key = out["output_key"].as_str().expect("output key");
    let sorted =
        std::fs::read_to_string(h.cluster.blob_dir().join("tenants/default").join(key)).unwrap();
    records.sort();
    assert_eq!(sorted.lines().collect::<Vec<_>>(), records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_step_loses_nothing_and_commits_each_output_once() {
    let _one = CLUSTERS.lock().await;
    let mut h = Harness::start(3, &["--no-worker"], &[&["--slots", "2"], &["--slots", "2"]]).await;
    let m = h.upload("misbehave").await;
    let (n, millions) = (12, 200);
    let id = h.submit(submit_req(&m, spins(n, millions))).await;
    h.wait_for(id, |r| {
        r.subtasks
            .iter()
            .any(|s| s.state == "running" && s.node == 4)
    })
    .await;
    h.cluster.kill(4);
    let r = h.wait(id).await;
    assert_each_output_once(&r, n, millions);
    // What ran on the dead worker ran again elsewhere, under a new attempt.
    assert!(r.subtasks.iter().all(|s| s.node == 5 || s.node == 4));
    assert!(
        r.subtasks.iter().any(|s| s.node == 5 && s.attempt >= 2),
        "a subtask of the dead node was re-run: {:?}",
        r.subtasks
    );
    let nodes = h.client().list_nodes(ListNodesRequest {}).await.unwrap();
    let dead = nodes.get_ref().nodes.iter().find(|n| n.id == 4).unwrap();
    assert!(!dead.up, "the killed worker is down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_killed_mid_task_is_replaced_and_the_task_succeeds() {
    let _one = CLUSTERS.lock().await;
    let mut h = Harness::start(3, &["--no-worker"], &[&["--slots", "2"], &["--slots", "2"]]).await;
    let m = h.upload("misbehave").await;
    let (n, millions) = (12, 200);
    let id = h.submit(submit_req(&m, spins(n, millions))).await;
    h.wait_for(id, |r| r.subtasks.iter().any(|s| s.state == "succeed"))
        .await;
    let owner = h.cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
    h.cluster.kill(owner);
    let new_owner = h
        .cluster
        .wait_leader(Duration::from_secs(20))
        .await
        .unwrap();
    assert_ne!(owner, new_owner);
    let r = h.wait(id).await;
    assert_each_output_once(&r, n, millions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_every_subtask_and_resume_finishes_the_task() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(1, &[], &[&["--slots", "2"]]).await;
    let m = h.upload("misbehave").await;
    let (n, millions) = (10, 200);
    let id = h.submit(submit_req(&m, spins(n, millions))).await;
    h.wait_for(id, |r| running_count(r) > 0).await;
    let now = h.control(id, Action::Pause).await.unwrap();
    assert!(now == "pausing" || now == "paused", "{now}");
    let paused = h.wait_for(id, |r| state(r) == "paused").await;
    assert_eq!(running_count(&paused), 0);
    let done = paused
        .subtasks
        .iter()
        .filter(|s| s.state == "succeed")
        .count();
    assert!(done < n, "paused before the end");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let later = h.get(id).await;
    assert_eq!(state(&later), "paused");
    assert_eq!(running_count(&later), 0, "nothing runs while paused");
    assert_eq!(
        later
            .subtasks
            .iter()
            .filter(|s| s.state == "succeed")
            .count(),
        done,
        "nothing finished while paused"
    );
    h.control(id, Action::Resume).await.unwrap();
    let r = h.wait(id).await;
    assert_each_output_once(&r, n, millions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reverts_the_task_and_runs_its_revert_hook() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(1, &[], &[&["--slots", "2"]]).await;
    let m = h.upload("misbehave").await;
    let id = h.submit(submit_req(&m, spins(10, 200))).await;
    h.wait_for(id, |r| running_count(r) > 0).await;
    h.control(id, Action::Cancel).await.unwrap();
    let r = h.wait(id).await;
    let task = r.task.unwrap();
    assert_eq!(task.state, "reverted", "{task:?}");
    assert_eq!(task.error, "cancelled");
    assert!(r
        .subtasks
        .iter()
        .all(|s| s.state == "succeed" || s.state == "canceled"));
    let marker = h
        .cluster
        .blob_dir()
        .join(format!("tenants/default/reverted/{id}"));
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "cancelled");
    let intermediate = h
        .cluster
        .blob_dir()
        .join(format!("tenants/default/tasks/{id}"));
    let left: Vec<_> = std::fs::read_dir(&intermediate)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "reverting deletes the task's blobs: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modifying_concurrency_changes_how_many_run_at_once() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(1, &["--no-worker"], &[&["--slots", "4"]]).await;
    let m = h.upload("misbehave").await;
    let n = 24;
    let mut req = submit_req(&m, spins(n, 150));
    req.concurrency = 1;
    let id = h.submit(req).await;
    let mut most = 0;
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        most = most.max(running_count(&h.get(id).await));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(most, 1, "concurrency 1 runs one at a time");
    let now = h
        .client()
        .modify_task(ModifyTaskRequest {
            id,
            modification: Some(TaskModification {
                concurrency: Some(4),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .state;
    assert!(now == "modifying" || now == "running", "{now}");
    let r = h
        .wait_for(id, |r| running_count(r) > 1 || finished(&state(r)))
        .await;
    assert!(running_count(&r) > 1, "more run at once after the change");
    assert_eq!(r.task.unwrap().concurrency, 4);
    let r = h.wait(id).await;
    assert_each_output_once(&r, n, 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_task_preempts_a_lower_ones_slots_and_both_finish() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(1, &["--no-worker"], &[&["--slots", "2"]]).await;
    let m = h.upload("misbehave").await;
    // Each low subtask spins long enough (~0.4 s) that the task is surely
    // still running two at once when the poll looks, even on a busy machine.
    let mut low = submit_req(&m, spins(12, 400));
    low.priority = 900;
    let low = h.submit(low).await;
    h.wait_for(low, |r| running_count(r) == 2).await;
    let mut high = submit_req(&m, spins(2, 60));
    high.priority = 10;
    let high = h.submit(high).await;
    let r = h.wait(high).await;
    assert_each_output_once(&r, 2, 60);
    let l = h.get(low).await;
    assert!(
        !finished(&state(&l)),
        "the high task ran while the low one waited"
    );
    assert!(
        l.subtasks.iter().any(|s| s.attempt >= 2),
        "a low subtask was preempted and re-run: {:?}",
        l.subtasks
    );
    let l = h.wait(low).await;
    assert_each_output_once(&l, 12, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dist_worker_label_and_background_scope_decide_where_subtasks_run() {
    let _one = CLUSTERS.lock().await;
    // Node 1 schedules and works; 2 is labelled role=dist_worker; 3 is a
    // plain worker.
    let h = Harness::start(
        1,
        &[],
        &[
            &["--slots", "2", "--labels", "role=dist_worker"],
            &["--slots", "2"],
        ],
    )
    .await;
    let m = h.upload("misbehave").await;
    let id = h.submit(submit_req(&m, "ok\n".repeat(12))).await;
    let r = h.wait(id).await;
    assert_eq!(state(&r), "succeed");
    assert!(
        r.subtasks.iter().all(|s| s.node == 2),
        "only the dist_worker runs subtasks: {:?}",
        r.subtasks.iter().map(|s| s.node).collect::<Vec<_>>()
    );
    drop(h);

    // Without the label every node works; with a `background` node, tasks
    // without a scope prefer it; a task with scope `x` goes to scope x.
    let h = Harness::start(
        1,
        &[],
        &[
            &["--slots", "2", "--scope", "background"],
            &["--slots", "2", "--scope", "x"],
        ],
    )
    .await;
    let m = h.upload("misbehave").await;
    let id = h.submit(submit_req(&m, "ok\n".repeat(12))).await;
    let r = h.wait(id).await;
    assert_eq!(state(&r), "succeed");
    assert!(
        r.subtasks.iter().all(|s| s.node == 2),
        "background preferred"
    );
    let mut scoped = submit_req(&m, "ok\n".repeat(6));
    scoped.scope = "x".into();
    let id = h.submit(scoped).await;
    let r = h.wait(id).await;
    assert!(r.subtasks.iter().all(|s| s.node == 3), "scope x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_run_subtasks_when_none_is_a_dist_worker() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(1, &[], &[&["--slots", "1"]]).await;
    let m = h.upload("misbehave").await;
    let id = h.submit(submit_req(&m, spins(8, 30))).await;
    let r = h.wait(id).await;
    assert_eq!(state(&r), "succeed");
    let nodes: std::collections::BTreeSet<u64> = r.subtasks.iter().map(|s| s.node).collect();
    assert_eq!(nodes, [1, 2].into_iter().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_traps_manual_recovery_and_illegal_transitions() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(1, &[], &[]).await;
    let m = h.upload("misbehave").await;

    // A plan that traps fails the task with the trap's message.
    let id = h.submit(submit_req(&m, "plan:trap\nok\n")).await;
    let r = h.wait(id).await;
    let task = r.task.unwrap();
    assert_eq!(task.state, "failed");
    assert!(
        task.error.contains("plan of step 0 failed") && task.error.contains("unreachable"),
        "{}",
        task.error
    );

    // A subtask failing for good under manual recovery waits for a person;
    // `resolve` retries it (its next attempt succeeds).
    let mut req = submit_req(&m, "ok\nflaky:2\n");
    req.max_attempts = 1;
    req.manual_recovery = true;
    let id = h.submit(req).await;
    let r = h.wait_for(id, |r| state(r) == "awaiting-resolution").await;
    assert!(r.task.unwrap().error.contains("flaky"));
    // Illegal requests get a clear error and change nothing.
    let err = h.control(id, Action::Pause).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("illegal task transition awaiting-resolution -> pausing"),
        "{}",
        err.message()
    );
    assert_eq!(state(&h.get(id).await), "awaiting-resolution");
    h.control(id, Action::Resolve).await.unwrap();
    let r = h.wait(id).await;
    let task = r.task.unwrap();
    assert_eq!(task.state, "succeed", "{task:?}");
    assert_eq!(task.result, b"okok at attempt 2");

    let err = h.control(id, Action::Resume).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("the task has finished"),
        "{}",
        err.message()
    );
    let err = h.control(999, Action::Cancel).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // Bad requests are refused with the reason, and accept nothing.
    let garbage = UploadModuleRequest {
        name: "garbage".into(),
        tag: String::new(),
        data: b"\0asm but not really".to_vec(),
    };
    let err = h
        .client()
        .upload_module(futures::stream::iter(vec![garbage]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("invalid module"),
        "{}",
        err.message()
    );
    let err = h
        .client()
        .submit_task(submit_req("garbage", "ok"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let mut bad = submit_req(&m, "ok");
    bad.priority = 5000;
    let err = h.client().submit_task(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("priority 5000"), "{}", err.message());
    let tasks = h
        .client()
        .list_tasks(stoker_proto::api::ListTasksRequest {
            include_finished: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 2, "only the two good tasks exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_and_their_blobs_are_collected_after_the_history_ttl() {
    let _one = CLUSTERS.lock().await;
    let config = "[owner]\nnode_timeout_ms = 1500\ntick_ms = 100\nhistory_ttl_secs = 2\n\
                  gc_interval_secs = 1\n\n[worker]\nheartbeat_interval_ms = 300\n";
    let h = Harness::start_with(config, 1, &[], &[]).await;
    let m = h.upload("misbehave").await;
    let id = h.submit(submit_req(&m, "ok\nlog:2\n")).await;
    let r = h.wait(id).await;
    assert_eq!(state(&r), "succeed");
    // Data the task left in its blob space (as a guest may) and the log
    // its subtask 0/1 printed stay while the task is in history.
    let tenant_dir = h.cluster.blob_dir().join("tenants/default");
    let blob_dir = tenant_dir.join(format!("tasks/{id}"));
    std::fs::create_dir_all(blob_dir.join("out")).unwrap();
    std::fs::write(blob_dir.join("out/left-behind"), b"data").unwrap();
    let log_dir = tenant_dir.join(format!("logs/{id}"));
    let log = std::fs::read_to_string(log_dir.join("0-1-1")).unwrap();
    assert_eq!(log, "log line 0 of 2\nlog line 1 of 2\n");
    let finished_at = Instant::now();
    let deadline = Instant::now() + WAIT;
    loop {
        let gone = h
            .client()
            .get_task(GetTaskRequest {
                id,
                with_subtasks: false,
            })
            .await
            .is_err_and(|s| s.code() == tonic::Code::NotFound);
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "task {id} was never collected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        finished_at.elapsed() >= Duration::from_secs(1),
        "kept for its time in history"
    );
    let left: Vec<_> = std::fs::read_dir(&blob_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the task's blobs are deleted: {left:?}");
    assert!(
        !log_dir.exists(),
        "the task's subtask logs are deleted: {:?}",
        std::fs::read_dir(&log_dir).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
}
