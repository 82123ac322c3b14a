//! The worker's executor manager on one in-process node (scheduler and
//! worker): it registers through heartbeats, long-polls its assignments,
//! claims, runs and reports the subtasks of a `wordcount` task until the
//! task succeeds; large outputs go to the blob store; pausing and cancelling
//! a task stop its running subtask.

use std::path::Path;
use std::time::Duration;

use stoker::api::local_cluster::free_port;
use stoker::api::meta::connect_stoker;
use stoker::api::server::{self, RunningServer, ServerConfig};
use stoker::exec::worker::WorkerConfig;
use stoker::meta::MetaConfig;
use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::api::{
    control_task_request::Action, ControlTaskRequest, GetTaskRequest, GetTaskResponse,
    ListNodesRequest, SubmitTaskRequest, UploadModuleRequest,
};
use tokio::time::Instant;
use tonic::transport::Channel;

/// Starts node 1 (scheduler and worker, two slots) and waits until its
/// worker has registered itself with its description.
async fn start_node(dir: &Path) -> (RunningServer, StokerClient<Channel>, ServerConfig) {
    let port = free_port().unwrap();
    let cfg = ServerConfig {
        id: 1,
        listen: format!("127.0.0.1:{port}"),
        data_dir: dir.join("node-1"),
        peers: format!("1=127.0.0.1:{port}"),
        meta: MetaConfig {
            tick_ms: 20,
            ..MetaConfig::default()
        },
        worker: WorkerConfig {
            slots: 2,
            heartbeat_interval_ms: 200,
            assignment_wait_ms: 2000,
            ..WorkerConfig::default()
        },
        ..ServerConfig::default()
    };
    let server = server::start(&cfg).await.unwrap();
    let mut client = connect_stoker(&cfg.listen, Duration::from_secs(20)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = client
            .list_nodes(ListNodesRequest {})
            .await
            .map(|r| r.into_inner().nodes)
            .unwrap_or_default();
        if let Some(n) = nodes.iter().find(|n| n.id == 1 && n.worker) {
            assert_eq!(n.slots, 2);
            assert!(n.up && n.scheduler);
            assert_eq!(n.addr, cfg.listen);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never registered: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (server, client, cfg)
}

async fn upload(client: &mut StokerClient<Channel>, path: &str, name: &str) -> String {
    let upload = UploadModuleRequest {
        name: name.into(),
        tag: String::new(),
        data: std::fs::read(path).unwrap(),
    };
    client
        .upload_module(futures::stream::iter(vec![upload]))
        .await
        .unwrap()
        .into_inner()
        .module
        .unwrap()
        .hash
}

/// Polls the task until `done` holds (at most a minute).
async fn wait_task(
    client: &mut StokerClient<Channel>,
    id: u64,
    what: &str,
    done: impl Fn(&GetTaskResponse) -> bool,
) -> GetTaskResponse {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client
            .get_task(GetTaskRequest {
                id,
                with_subtasks: true,
            })
            .await
            .unwrap()
            .into_inner();
        if done(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "task {id}: never {what}: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state(r: &GetTaskResponse) -> &str {
    r.task.as_ref().map_or("", |t| t.state.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runs_a_wordcount_task() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client, _) = start_node(dir.path()).await;
    let hash = upload(&mut client, stoker_test_artifacts::WORDCOUNT, "wordcount").await;
    let text = "the quick brown fox jumps over the lazy dog, the end. ".repeat(200);
    let id = client
        .submit_task(SubmitTaskRequest {
            module: hash,
            input: text.into_bytes(),
            concurrency: 2,
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;

    let done = wait_task(&mut client, id, "finished", |r| {
        ["succeed", "failed", "reverted"].contains(&state(r))
    })
    .await;
    let task = done.task.unwrap();
    assert_eq!(task.state, "succeed", "{}", task.error);
    let result: Vec<(String, u64)> = serde_json::from_slice(&task.result).unwrap();
    let mut want = vec![("the".to_string(), 600)];
    for w in [
        "brown", "dog", "end", "fox", "jumps", "lazy", "over", "quick",
    ] {
        want.push((w.to_string(), 200));
    }
    assert_eq!(result, want);
    // Both steps ran here, every subtask claimed, run and reported by this
    // node's worker.
    assert!(done.subtasks.len() >= 2, "{:?}", done.subtasks);
    for s in &done.subtasks {
        assert_eq!(s.state, "succeed", "{s:?}");
        assert_eq!(s.node, 1, "{s:?}");
        assert!(s.attempt >= 1 && s.fuel_used > 0, "{s:?}");
    }
    assert!(task.fuel_used > 0);

    server.shutdown().await;
}

/// An output above the inline limit goes to the blob store under the
/// tenant, and the report names its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_outputs_go_to_the_blob_store() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client, cfg) = start_node(dir.path()).await;
    let hash = upload(&mut client, stoker_test_artifacts::MISBEHAVE, "misbehave").await;
    let size = stoker::meta::records::MAX_INLINE_BYTES + 1;
    let id = client
        .submit_task(SubmitTaskRequest {
            module: hash,
            // The second subtask keeps the task running while the test
            // looks: `finish` would refuse the 1 MiB result and the revert
            // would delete the task's blobs.
            input: format!("big:{size}\nspin:20000").into_bytes(),
            concurrency: 2,
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let r = wait_task(&mut client, id, "with its big subtask done", |r| {
        r.subtasks
            .iter()
            .any(|s| s.ordinal == 0 && s.state == "succeed")
    })
    .await;
    let s = r.subtasks.iter().find(|s| s.ordinal == 0).unwrap();
    let key = format!("tasks/{id}/out/0-0-{}", s.attempt);
    assert_eq!(s.output_blob, key);
    let file = cfg.data_dir.join("blobs/tenants/default").join(&key);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), size as u64);
    server.shutdown().await;
}

/// Pausing a task stops its running subtask at once and reports it paused;
/// cancelling a running task stops its subtask without a report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_and_cancelling_stop_local_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut client, _) = start_node(dir.path()).await;
    let hash = upload(&mut client, stoker_test_artifacts::MISBEHAVE, "misbehave").await;
    let submit = |hash: String| SubmitTaskRequest {
        module: hash,
        // Spins far longer than the test.
        input: b"loop".to_vec(),
        fuel_limit: u64::MAX / 2,
        ..SubmitTaskRequest::default()
    };
    let id = client
        .submit_task(submit(hash.clone()))
        .await
        .unwrap()
        .into_inner()
        .id;
    let running = |r: &GetTaskResponse| r.subtasks.iter().any(|s| s.state == "running");
    wait_task(&mut client, id, "running a subtask", running).await;
    let asked = Instant::now();
    client
        .control_task(ControlTaskRequest {
            id,
            action: Action::Pause as i32,
        })
        .await
        .unwrap();
    let r = wait_task(&mut client, id, "paused", |r| state(r) == "paused").await;
    assert!(asked.elapsed() < Duration::from_secs(10));
    assert!(
        r.subtasks.iter().all(|s| s.state == "paused"),
        "{:?}",
        r.subtasks
    );

    let id = client
        .submit_task(submit(hash))
        .await
        .unwrap()
        .into_inner()
        .id;
    wait_task(&mut client, id, "running a subtask", running).await;
    client
        .control_task(ControlTaskRequest {
            id,
            action: Action::Cancel as i32,
        })
        .await
        .unwrap();
    let r = wait_task(&mut client, id, "reverted", |r| state(r) == "reverted").await;
    assert!(
        r.subtasks.iter().all(|s| s.state == "canceled"),
        "{:?}",
        r.subtasks
    );
    server.shutdown().await;
}
