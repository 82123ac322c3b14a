//! Tenancy across real `stoker server` processes started with an
//! `admin_token`: authentication of every request, isolation of tenants on
//! every endpoint, quotas with their codes, fair share of the slots, and the
//! `stoker tenant` / `stoker token` commands.
//!
//! Clusters are started one at a time (a file-wide lock), and every process
//! is killed when its cluster is dropped.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::http_get;

use stoker::api::auth::AuthChannel;
use stoker::api::local_cluster::LocalCluster;
use stoker::api::meta::{connect_meta_with, connect_stoker_with};
use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::api::{
    control_task_request::Action, ApplyRulesRequest, AssignmentsRequest, ControlTaskRequest,
    CreateTenantRequest, CreateTokenRequest, DeleteModuleRequest, GetModuleRequest,
    GetSubtaskLogRequest, GetTaskRequest, GetTaskResponse, HeartbeatRequest, ListModulesRequest,
    ListNodesRequest, ListOperatorsRequest, ListTasksRequest, ListTenantsRequest,
    ListTokensRequest, ModifyTaskRequest, RevokeTokenRequest, SetTenantRequest, ShowRulesRequest,
    SubmitTaskRequest, UploadModuleRequest, WatchTaskRequest,
};
use stoker_proto::meta::{
    ProposeRequest, QueryRequest, StatusRequest, TaskModification, TenantQuota,
};
use tonic::Code;

static CLUSTERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ADMIN: &str = "admin-token-for-the-tenancy-tests";
const WAIT: Duration = Duration::from_secs(120);

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stoker"))
}

fn config() -> String {
    format!(
        "admin_token = \"{ADMIN}\"\n[owner]\nnode_timeout_ms = 1500\ntick_ms = 100\n\n[worker]\nheartbeat_interval_ms = 300\n"
    )
}

type Api = StokerClient<AuthChannel>;

struct Harness {
    cluster: LocalCluster,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// One scheduler node with its own worker of `slots` slots.
    async fn start(slots: u32) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let slots = slots.to_string();
        let mut cluster =
            LocalCluster::start_with_args(exe(), 1, dir.path(), Some(&config()), &|_| {
                vec!["--slots".into(), slots.clone()]
            })
            .unwrap();
        cluster.set_token(ADMIN);
        cluster.wait_leader(Duration::from_secs(30)).await.unwrap();
        cluster
            .wait_workers(1, Duration::from_secs(30))
            .await
            .unwrap();
        Harness { cluster, _dir: dir }
    }

    /// Three scheduler nodes without workers and one worker-only node:
    /// the Raft transport, forwarded proposals and the worker's calls all
    /// need the cluster token.
    async fn start_three_and_a_worker() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster =
            LocalCluster::start_with_args(exe(), 3, dir.path(), Some(&config()), &|_| {
                vec!["--no-worker".into()]
            })
            .unwrap();
        cluster.add_worker(4, &["--slots", "2"]).unwrap();
        cluster.set_token(ADMIN);
        cluster.wait_leader(Duration::from_secs(30)).await.unwrap();
        cluster
            .wait_workers(1, Duration::from_secs(30))
            .await
            .unwrap();
        Harness { cluster, _dir: dir }
    }

    fn addr(&self) -> &str {
        self.cluster.addr(1)
    }

    fn api(&self, token: Option<&str>) -> Api {
        connect_stoker_with(self.addr(), Duration::from_secs(20), token).unwrap()
    }

    fn admin(&self) -> Api {
        self.api(Some(ADMIN))
    }

    /// Creates a tenant; returns its token.
    async fn tenant(&self, id: &str, quota: Option<TenantQuota>) -> String {
        let r = self
            .admin()
            .create_tenant(CreateTenantRequest {
                id: id.into(),
                name: String::new(),
                weight: 1,
                quota,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.tenant.unwrap().id, id);
        assert!(r.token.starts_with("stk_"), "{}", r.token);
        r.token
    }

    async fn upload(&self, token: &str, name: &str) -> Result<String, tonic::Status> {
        let first = UploadModuleRequest {
            name: name.into(),
            tag: String::new(),
            data: stoker_test_artifacts::read(name),
        };
        let r = self
            .api(Some(token))
            .upload_module(futures::stream::iter(vec![first]))
            .await?;
        Ok(r.into_inner().module.unwrap().hash)
    }

    async fn submit(&self, token: &str, req: SubmitTaskRequest) -> Result<u64, tonic::Status> {
        Ok(self
            .api(Some(token))
            .submit_task(req)
            .await?
            .into_inner()
            .id)
    }

    async fn get(&self, id: u64) -> GetTaskResponse {
        self.admin()
            .get_task(GetTaskRequest {
                id,
                with_subtasks: true,
            })
            .await
            .unwrap()
            .into_inner()
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
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait(&self, id: u64) -> GetTaskResponse {
        self.wait_for(id, |r| finished(&state(r))).await
    }
}

fn state(r: &GetTaskResponse) -> String {
    r.task.as_ref().unwrap().state.clone()
}

fn finished(s: &str) -> bool {
    matches!(s, "succeed" | "failed" | "reverted")
}

fn req(module: &str, input: &str) -> SubmitTaskRequest {
    SubmitTaskRequest {
        module: module.into(),
        input: input.as_bytes().to_vec(),
        concurrency: 2,
        ..Default::default()
    }
}

#[track_caller]
fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, want: Code) -> String {
    match r {
        Err(s) => {
            assert_eq!(s.code(), want, "{s:?}");
            s.message().to_string()
        }
        Ok(v) => panic!("expected {want:?}, got {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_token_are_unauthenticated() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(2).await;
    // No token, a malformed one, an unknown one: every endpoint refuses.
    for token in [None, Some("nonsense"), Some("stk_0123456789ab_deadbeef")] {
        let mut api = h.api(token);
        let m = code(
            api.list_tasks(ListTasksRequest::default()).await,
            Code::Unauthenticated,
        );
        assert!(m.contains("token"), "{m}");
        code(
            api.list_modules(ListModulesRequest::default()).await,
            Code::Unauthenticated,
        );
        code(
            api.list_nodes(ListNodesRequest {}).await,
            Code::Unauthenticated,
        );
        code(api.submit_task(req("x", "ok")).await, Code::Unauthenticated);
        code(
            api.list_tenants(ListTenantsRequest {}).await,
            Code::Unauthenticated,
        );
        code(
            api.heartbeat(HeartbeatRequest::default()).await,
            Code::Unauthenticated,
        );
        // The internal services are no way around it either.
        let mut meta = connect_meta_with(h.addr(), Duration::from_secs(10), token).unwrap();
        code(meta.status(StatusRequest {}).await, Code::Unauthenticated);
        code(
            meta.query(QueryRequest {
                query: None,
                stale_ok: true,
            })
            .await,
            Code::Unauthenticated,
        );
        code(
            meta.propose(ProposeRequest::default()).await,
            Code::Unauthenticated,
        );
    }
    // A tenant token is not the cluster token.
    let a = h.tenant("a", None).await;
    let mut meta = connect_meta_with(h.addr(), Duration::from_secs(10), Some(&a)).unwrap();
    code(meta.status(StatusRequest {}).await, Code::Unauthenticated);
    code(
        h.api(Some(&a)).heartbeat(HeartbeatRequest::default()).await,
        Code::PermissionDenied,
    );
    code(
        h.api(Some(&a))
            .assignments(AssignmentsRequest::default())
            .await,
        Code::PermissionDenied,
    );
    code(
        h.api(Some(&a))
            .create_tenant(CreateTenantRequest {
                id: "sneaky".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
    );
    // Placement rules and the coordinator are the admin's.
    code(
        h.api(Some(&a))
            .apply_rules(ApplyRulesRequest {
                source: String::new(),
            })
            .await,
        Code::PermissionDenied,
    );
    code(
        h.api(Some(&a)).show_rules(ShowRulesRequest {}).await,
        Code::PermissionDenied,
    );
    code(
        h.api(Some(&a))
            .list_operators(ListOperatorsRequest {})
            .await,
        Code::PermissionDenied,
    );
    // A second token works until it is revoked; the first keeps working.
    let second = h
        .api(Some(&a))
        .create_token(CreateTokenRequest {
            tenant: String::new(),
            description: "ci".into(),
        })
        .await
        .unwrap()
        .into_inner();
    h.api(Some(&second.token))
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap();
    let listed = h
        .api(Some(&a))
        .list_tokens(ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed
        .iter()
        .all(|t| t.tenant == "a" && t.sha256.is_empty()));
    h.api(Some(&a))
        .revoke_token(RevokeTokenRequest {
            id: second.id.clone(),
        })
        .await
        .unwrap();
    let m = code(
        h.api(Some(&second.token))
            .list_tasks(ListTasksRequest::default())
            .await,
        Code::Unauthenticated,
    );
    assert!(m.contains("revoked"), "{m}");
    h.api(Some(&a))
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_multi_node_cluster_replicates_forwards_and_runs_tasks() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start_three_and_a_worker().await;
    let leader = h
        .cluster
        .wait_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let on = |id: u64, token: &str| {
        connect_stoker_with(h.cluster.addr(id), Duration::from_secs(20), Some(token)).unwrap()
    };
    // Created through one follower (forwarded to the leader), used through
    // the other: the token is known there after its read barrier.
    let token = on(followers[0], ADMIN)
        .create_tenant(CreateTenantRequest {
            id: "far".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    // The coordinator lives on the owner: a follower forwards the admin's
    // request with the admin's token.
    // (A follower learns who leads from the leader's first messages.)
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ops = loop {
        match on(followers[0], ADMIN)
            .list_operators(ListOperatorsRequest {})
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("operators through a follower: {s:?}"),
        }
    };
    assert!(ops.owner && ops.node == leader, "{ops:?}");
    let mut api = on(followers[1], &token);
    let first = UploadModuleRequest {
        name: "misbehave".into(),
        tag: String::new(),
        data: stoker_test_artifacts::read("misbehave"),
    };
    api.upload_module(futures::stream::iter(vec![first]))
        .await
        .unwrap();
    let id = api
        .submit_task(req("misbehave", "ok-1\nok-2\nok-3\n"))
        .await
        .unwrap()
        .into_inner()
        .id;
    let r = h.wait(id).await;
    let t = r.task.unwrap();
    assert_eq!(t.state, "succeed", "{t:?}");
    assert_eq!(t.tenant, "far");
    assert!(
        r.subtasks.iter().all(|s| s.node == 4),
        "the worker-only node ran them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_see_or_touch_another_tenants_objects() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(2).await;
    let a = h.tenant("a", None).await;
    let b = h.tenant("b", None).await;
    let hash = h.upload(&a, "misbehave").await.unwrap();
    let sort = h.upload(&a, "sort").await.unwrap();
    // a's long task, so that b has something running to try to touch.
    let long: String = (0..6).map(|_| "spin:300\n").collect();
    let id = h.submit(&a, req("misbehave", &long)).await.unwrap();
    let mut bb = h.api(Some(&b));

    // Modules: not listed, not found by name or hash, not usable, not
    // deletable.
    let mods = bb
        .list_modules(ListModulesRequest::default())
        .await
        .unwrap();
    assert!(mods.into_inner().modules.is_empty());
    for m in ["misbehave", hash.as_str()] {
        code(
            bb.get_module(GetModuleRequest {
                module: m.into(),
                with_bytes: true,
                ..Default::default()
            })
            .await,
            Code::NotFound,
        );
        code(bb.submit_task(req(m, "ok")).await, Code::NotFound);
        code(
            bb.delete_module(DeleteModuleRequest {
                module: m.into(),
                tag: String::new(),
            })
            .await,
            Code::NotFound,
        );
    }
    // Tasks: not listed, not readable, not controllable, not modifiable,
    // with the same answer as for a task that does not exist.
    let listed = bb
        .list_tasks(ListTasksRequest {
            include_finished: true,
            tenant: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(
        listed.is_empty(),
        "a tenant filter cannot widen: {listed:?}"
    );
    let theirs = code(
        bb.get_task(GetTaskRequest {
            id,
            with_subtasks: true,
        })
        .await,
        Code::NotFound,
    );
    let missing = code(
        bb.get_task(GetTaskRequest {
            id: 99_999,
            with_subtasks: false,
        })
        .await,
        Code::NotFound,
    );
    assert_eq!(
        theirs.replace(&id.to_string(), "N"),
        missing.replace("99999", "N")
    );
    code(bb.watch_task(WatchTaskRequest { id }).await, Code::NotFound);
    for action in [
        Action::Cancel,
        Action::Pause,
        Action::Resume,
        Action::Resolve,
    ] {
        code(
            bb.control_task(ControlTaskRequest {
                id,
                action: action as i32,
            })
            .await,
            Code::NotFound,
        );
    }
    code(
        bb.modify_task(ModifyTaskRequest {
            id,
            modification: Some(TaskModification {
                concurrency: Some(1),
                ..Default::default()
            }),
        })
        .await,
        Code::NotFound,
    );
    // Tokens and tenants: a's are invisible to b.
    let a_tokens = h
        .api(Some(&a))
        .list_tokens(ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    code(
        bb.revoke_token(RevokeTokenRequest {
            id: a_tokens[0].id.clone(),
        })
        .await,
        Code::NotFound,
    );
    code(
        bb.create_token(CreateTokenRequest {
            tenant: "a".into(),
            description: String::new(),
        })
        .await,
        Code::NotFound,
    );
    let tenants = bb.list_tenants(ListTenantsRequest {}).await.unwrap();
    let ids: Vec<String> = tenants
        .into_inner()
        .tenants
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, vec!["b".to_string()]);

    // Blobs: a's input under tenants/a/ is out of b's reach, by its key
    // or by a key that tries to climb out of b's prefix.
    let inputs = h.cluster.blob_dir().join("tenants/a/inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let records: Vec<String> = (0..50).map(|i| format!("{:04}", (i * 37) % 101)).collect();
    std::fs::write(inputs.join("r.txt"), records.join("\n") + "\n").unwrap();
    h.upload(&b, "sort").await.unwrap();
    for key in ["inputs/r.txt", "../a/inputs/r.txt"] {
        let input = serde_json::json!({"input_key": key, "chunks": 2}).to_string();
        let t = h.submit(&b, req("sort", &input)).await.unwrap();
        let r = h.wait(t).await;
        assert_ne!(state(&r), "succeed", "b read a's blob with key {key}");
    }
    // a reads its own; its guest's escape attempts are denied.
    let input = serde_json::json!({"input_key": "inputs/r.txt", "chunks": 2}).to_string();
    let t = h.submit(&a, req(&sort, &input)).await.unwrap();
    assert_eq!(state(&h.wait(t).await), "succeed");
    let t = h.submit(&a, req("misbehave", "blob")).await.unwrap();
    let r = h.wait(t).await;
    assert_eq!(r.task.unwrap().result, b"blob ok");

    // Logs: a's subtask log is a's alone.
    let t = h.submit(&a, req("misbehave", "log:3")).await.unwrap();
    assert_eq!(state(&h.wait(t).await), "succeed");
    let log_req = || GetSubtaskLogRequest {
        task_id: t,
        step: 0,
        ordinal: 0,
        attempt: 0,
    };
    let log = h
        .api(Some(&a))
        .get_subtask_log(log_req())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(log.attempt, 1);
    assert_eq!(log.log.lines().count(), 3, "{:?}", log.log);
    code(bb.get_subtask_log(log_req()).await, Code::NotFound);
    // The dashboard's endpoint for it: the same lookup and scoping. b's
    // token gets the answer of a task that does not exist; no token, 401.
    let path = |task: u64| format!("/api/tasks/{task}/subtasks/0/0/log");
    let bearer = |token: &str| format!("Bearer {token}");
    let r = http_get(h.addr(), &path(t), &[("Authorization", &bearer(&a))]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["attempt"], 1);
    assert_eq!(v["log"].as_str().unwrap(), log.log);
    let admin = http_get(h.addr(), &path(t), &[("Authorization", &bearer(ADMIN))]);
    assert_eq!((admin.status, admin.body.as_str()), (200, r.body.as_str()));
    let theirs = http_get(h.addr(), &path(t), &[("Authorization", &bearer(&b))]);
    let missing = http_get(h.addr(), &path(99_999), &[("Authorization", &bearer(&b))]);
    assert_eq!((theirs.status, missing.status), (404, 404), "{theirs:?}");
    assert_eq!(
        theirs.body.replace(&t.to_string(), "N"),
        missing.body.replace("99999", "N")
    );
    assert!(!theirs.body.contains("log line"), "{}", theirs.body);
    let anonymous = http_get(h.addr(), &path(t), &[]);
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);

    // The admin sees every tenant's tasks, and filters by tenant.
    let all = h
        .admin()
        .list_tasks(ListTasksRequest {
            include_finished: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(all.iter().any(|t| t.tenant == "a") && all.iter().any(|t| t.tenant == "b"));
    let only_b = h
        .admin()
        .list_tasks(ListTasksRequest {
            include_finished: true,
            tenant: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(!only_b.is_empty() && only_b.iter().all(|t| t.tenant == "b"));
    // b's cancel, pause and modify never reached a's task.
    let r = h.wait(id).await;
    let t = r.task.unwrap();
    assert_eq!(t.state, "succeed", "{t:?}");
    assert_eq!(t.concurrency, 2, "not modified");
    assert_eq!(t.result, "spun 300".repeat(6).into_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_quota_is_enforced_with_resource_exhausted() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(2).await;
    let module_size = stoker_test_artifacts::read("misbehave").len() as u64;
    let q = h
        .tenant(
            "q",
            Some(TenantQuota {
                max_fuel_per_subtask: 5_000_000_000,
                max_memory_bytes: 64 << 20,
                max_module_bytes: module_size + 10,
                max_queued_tasks: 1,
                ..Default::default()
            }),
        )
        .await;
    h.upload(&q, "misbehave").await.unwrap();
    let m = code(h.upload(&q, "sort").await, Code::ResourceExhausted);
    assert!(m.contains("max_module_bytes"), "{m}");
    let mut over = req("misbehave", "ok");
    over.fuel_limit = 6_000_000_000;
    let m = code(h.submit(&q, over).await, Code::ResourceExhausted);
    assert!(m.contains("max_fuel_per_subtask"), "{m}");
    let mut over = req("misbehave", "ok");
    over.memory_limit = 128 << 20;
    let m = code(h.submit(&q, over).await, Code::ResourceExhausted);
    assert!(m.contains("max_memory_bytes"), "{m}");
    // One unfinished task at a time.
    let first = h
        .submit(&q, req("misbehave", "spin:300\nspin:300\n"))
        .await
        .unwrap();
    let t = h.get(first).await.task.unwrap();
    assert_eq!(
        (t.fuel_limit, t.memory_limit),
        (5_000_000_000, 64 << 20),
        "capped"
    );
    let m = code(
        h.submit(&q, req("misbehave", "ok")).await,
        Code::ResourceExhausted,
    );
    assert!(m.contains("max_queued_tasks"), "{m}");
    // Watching the task: a stream of changes that ends when it finished.
    let mut events = h
        .api(Some(&q))
        .watch_task(WatchTaskRequest { id: first })
        .await
        .unwrap()
        .into_inner();
    let mut states = Vec::new();
    while let Some(e) = tokio::time::timeout(WAIT, events.message())
        .await
        .expect("an event or the end within the wait")
        .unwrap()
    {
        let t = e.task.unwrap();
        if states.last() != Some(&t.state) {
            states.push(t.state.clone());
        }
        if t.state == "succeed" {
            assert_eq!(t.result, b"spun 300spun 300");
        }
    }
    assert_eq!(
        states.last().map(String::as_str),
        Some("succeed"),
        "{states:?}"
    );
    h.wait(first).await;
    h.submit(&q, req("misbehave", "ok")).await.unwrap();
    // The admin lifts a quota; only the admin may.
    code(
        h.api(Some(&q))
            .set_tenant(SetTenantRequest {
                id: "q".into(),
                weight: None,
                quota: Some(TenantQuota::default()),
            })
            .await,
        Code::PermissionDenied,
    );
    let t = h
        .admin()
        .set_tenant(SetTenantRequest {
            id: "q".into(),
            weight: Some(3),
            quota: Some(TenantQuota::default()),
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(t.weight, 3);
    h.upload(&q, "sort").await.unwrap();
    // A module in use cannot be deleted; once unused it can.
    let id = h.submit(&q, req("misbehave", "spin:300\n")).await.unwrap();
    let m = code(
        h.api(Some(&q))
            .delete_module(DeleteModuleRequest {
                module: "misbehave".into(),
                tag: String::new(),
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(m.contains("unfinished task"), "{m}");
    h.wait(id).await;
    h.api(Some(&q))
        .delete_module(DeleteModuleRequest {
            module: "misbehave".into(),
            tag: String::new(),
        })
        .await
        .unwrap();
}

/// Running subtasks per tenant.
fn running(r: &GetTaskResponse) -> usize {
    r.subtasks.iter().filter(|s| s.state == "running").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_with_equal_weights_share_the_slots_about_evenly() {
    let _one = CLUSTERS.lock().await;
    let slots = 4;
    let h = Harness::start(slots).await;
    let a = h.tenant("a", None).await;
    let b = h.tenant("b", None).await;
    h.upload(&a, "misbehave").await.unwrap();
    h.upload(&b, "misbehave").await.unwrap();
    let work: String = (0..60).map(|_| "spin:300\n").collect();
    let mut ra = req("misbehave", &work);
    ra.concurrency = slots;
    // a comes first and takes every slot.
    let ta = h.submit(&a, ra.clone()).await.unwrap();
    h.wait_for(ta, |r| running(r) >= 3 || finished(&state(r)))
        .await;
    let tb = h.submit(&b, ra).await.unwrap();
    h.wait_for(tb, |r| running(r) >= 1 || finished(&state(r)))
        .await;
    // Sample while both still have work queued.
    let (mut sum_a, mut sum_b, mut samples) = (0usize, 0usize, 0usize);
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        let (x, y) = (h.get(ta).await, h.get(tb).await);
        if finished(&state(&x)) || finished(&state(&y)) {
            break;
        }
        sum_a += running(&x);
        sum_b += running(&y);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples >= 10, "too few samples while both ran: {samples}");
    let (avg_a, avg_b) = (sum_a as f64 / samples as f64, sum_b as f64 / samples as f64);
    let half = f64::from(slots) / 2.0;
    eprintln!("fair share: {samples} samples, running on average a {avg_a:.2}, b {avg_b:.2} of {slots} slots");
    assert!(
        (avg_a - half).abs() <= 1.0 && (avg_b - half).abs() <= 1.0,
        "running on average: a {avg_a:.2}, b {avg_b:.2} of {slots} slots"
    );
    for t in [ta, tb] {
        assert_eq!(state(&h.wait(t).await), "succeed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_tenants_and_tokens_and_fails_in_one_line() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(1).await;
    let stoker = |args: &[&str], token: Option<&str>| {
        let mut cmd = std::process::Command::new(exe());
        cmd.args(args)
            .args(["--endpoint", h.addr()])
            .env_remove("STOKER_TOKEN");
        if let Some(t) = token {
            cmd.env("STOKER_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = stoker(
        &["tenant", "create", "acme", "--max-slots", "3"],
        Some(ADMIN),
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.lines().last().unwrap().to_string();
    assert!(token.starts_with("stk_"), "{stdout}");
    // The token works; it sees only its tenant.
    let out = stoker(&["tenant", "list", "-o", "json"], Some(&token));
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], "acme");
    assert_eq!(list[0]["quota"]["max_slots"], 3);
    // A tenant creates and revokes its own tokens.
    let out = stoker(&["token", "create", "-o", "json"], Some(&token));
    assert!(out.status.success(), "{out:?}");
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created["id"].as_str().unwrap();
    let out = stoker(&["token", "revoke", id], Some(&token));
    assert!(out.status.success(), "{out:?}");
    // A subtask's log, for its tenant only.
    h.upload(&token, "misbehave").await.unwrap();
    let t = h.submit(&token, req("misbehave", "log:2")).await.unwrap();
    assert_eq!(state(&h.wait(t).await), "succeed");
    let id = t.to_string();
    let out = stoker(&["task", "log", &id, "0", "0"], Some(&token));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "log line 0 of 2\nlog line 1 of 2\n"
    );
    let other = h.tenant("other", None).await;
    let out = stoker(&["task", "log", &id, "0", "0"], Some(&other));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    // Failures: one line, actionable, non-zero.
    for (args, token, want) in [
        (&["task", "list"][..], None, "STOKER_TOKEN"),
        (
            &["tenant", "create", "x"][..],
            Some(token.as_str()),
            "admin token",
        ),
        (
            &["tenant", "create", "Bad/Id"][..],
            Some(ADMIN),
            "tenant id",
        ),
        (
            &["tenant", "set", "nope", "--weight", "2"][..],
            Some(ADMIN),
            "not found",
        ),
    ] {
        let out = stoker(args, token);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].contains(want), "{args:?}: {err}");
    }
}

/// A Python with `grpcio` and `grpcio-tools`: a venv under the target
/// directory, created and filled with pip from PyPI on first use.
fn python() -> std::path::PathBuf {
    // <target>/<profile>/stoker → <target>/py-venv
    let target = exe().parent().and_then(Path::parent).expect("target dir");
    let venv = target.join("py-venv");
    let py = venv.join("bin/python");
    let run = |cmd: &mut std::process::Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if !py.exists() {
        run(
            std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv),
            "python3 -m venv (scripts/setup.sh installs python3 and its venv module)",
        );
    }
    let have = std::process::Command::new(&py)
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        run(
            std::process::Command::new(&py).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "grpcio",
                "grpcio-tools",
            ]),
            "pip install grpcio grpcio-tools",
        );
    }
    py
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_from_the_protos_submits_and_waits() {
    let py = python();
    let gen = tempfile::tempdir().unwrap();
    let protos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto");
    let out = std::process::Command::new(&py)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&protos)
        .arg(format!("--python_out={}", gen.path().display()))
        .arg(format!("--grpc_python_out={}", gen.path().display()))
        .arg(protos.join("stoker.proto"))
        .arg(protos.join("meta.proto"))
        .output()
        .unwrap();
    assert!(out.status.success(), "protoc: {out:?}");
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(2).await;
    let token = h.tenant("py", None).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/submit_and_wait.py");
    let module = stoker_test_artifacts::path("misbehave").expect("misbehave is built");
    let client = |token: &str| {
        std::process::Command::new(&py)
            .arg(&script)
            .arg(gen.path())
            .arg(h.addr())
            .arg(token)
            .arg(module)
            .arg("ok-1\nok-2\necho:from python\n")
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(|| client(&token));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["state"], "succeed");
    assert_eq!(v["tenant"], "py");
    assert_eq!(v["result"], "ok-1ok-2from python");
    // The same client with a wrong token gets the status code the proto
    // contract promises.
    let out = tokio::task::block_in_place(|| client("stk_000000000000_bad"));
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["code"], "UNAUTHENTICATED");
}
