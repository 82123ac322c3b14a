#![allow(dead_code, unused_imports)] // TODO(owner): removed once every helper below is used
//! The task framework across real `stoker server` processes on 127.0.0.1:
//! scheduler nodes (Raft voters, the leader owning the scheduling) and
//! worker-only nodes, with `kill -9` of workers and of the owner.
//!
//! Clusters are started one at a time (a file-wide lock), and every process
//! is killed when its cluster is dropped.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use stoker::api::local_cluster::LocalCluster;
use stoker::api::meta::connect_stoker;
use stoker_proto::meta::stoker_client::StokerClient;
use stoker_proto::meta::{
    control_task_request::Action, ControlTaskRequest, GetTaskRequest, GetTaskResponse,
    ListNodesRequest, ModifyTaskRequest, SubmitTaskRequest, TaskModification, UploadModuleRequest,
};
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
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<String> = sched_args.iter().map(|s| s.to_string()).collect();
        let mut cluster =
            LocalCluster::start_with_args(exe(), schedulers, dir.path(), Some(CONFIG), &|_| {
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
        h.wait_workers(want).await;
        h
    }

    fn client(&self) -> StokerClient<Channel> {
        let id = self.cluster.running()[0];
        connect_stoker(self.cluster.addr(id), Duration::from_secs(20)).unwrap()
    }

    /// A client of a scheduler node other than `not`.
    fn client_avoiding(&self, not: u64) -> StokerClient<Channel> {
        let id = self
            .cluster
            .schedulers()
            .into_iter()
            .find(|id| *id != not && self.cluster.running().contains(id))
            .unwrap();
        connect_stoker(self.cluster.addr(id), Duration::from_secs(20)).unwrap()
    }

    async fn wait_workers(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client().list_nodes(ListNodesRequest {}).await {
                let up = r
                    .get_ref()
                    .nodes
                    .iter()
                    .filter(|n| n.up && n.worker)
                    .count();
                if up >= n {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{n} workers never came up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

/// The reference word count (see `examples.rs`).
fn expected_top20(text: &str) -> Vec<(String, u64)> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word.to_lowercase()).or_default() += 1;
    }
    let mut all: Vec<_> = counts.into_iter().collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(20);
    all
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
    assert_eq!(got, expected_top20(&text));
    assert!(task.fuel_used > 0);
    // Only the worker-only nodes ran subtasks, and both of them did.
    let nodes: std::collections::BTreeSet<u64> = r.subtasks.iter().map(|s| s.node).collect();
    assert!(nodes.iter().all(|n| *n == 4 || *n == 5), "{nodes:?}");

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
