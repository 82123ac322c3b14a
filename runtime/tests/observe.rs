//! Observability across real `stoker server` processes: `/healthz`,
//! `/readyz`, `/metrics` parsed as Prometheus text, the resource state in
//! `node list`, schedulers switched through the cluster config, fuel
//! accounting per subtask, task and tenant, and the progress of
//! `module upload` on a terminal and in `-o json`.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{eventually, exe, http_get, one, samples, scrape, value, Harness, CLUSTERS, CONFIG};
use stoker_proto::api::{ListNodesRequest, SubmitTaskRequest};
use stoker_proto::meta::NodeLoad;

async fn load_of(h: &Harness, id: u64) -> Option<NodeLoad> {
    let nodes = h
        .client()
        .list_nodes(ListNodesRequest {})
        .await
        .ok()?
        .into_inner()
        .nodes;
    nodes.into_iter().find(|n| n.id == id)?.load
}

fn stoker(args: &[&str]) -> std::process::Output {
    Command::new(exe()).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_fuel_after_a_task_ran() {
    let _serial = CLUSTERS.lock().await;
    let h = Harness::start(1, CONFIG).await;
    let addr = h.addr(1).to_string();

    let health = http_get(&addr, "/healthz", &[]);
    assert_eq!((health.status, health.body.trim()), (200, "ok"));
    let ready = eventually("/readyz to say ready", async || {
        let r = http_get(&addr, "/readyz", &[]);
        (r.status == 200).then_some(r)
    })
    .await;
    let body: serde_json::Value = serde_json::from_str(&ready.body).unwrap();
    assert_eq!(body["ready"], true);
    assert_eq!(body["leader_id"], 1);
    assert!(body["applied_index"].as_u64().unwrap() >= 1, "{body}");

    let hash = h.upload("misbehave").await;
    let id = h
        .submit(SubmitTaskRequest {
            module: hash.clone(),
            input: b"spin:2\nspin:2\nspin:2\nok\n".to_vec(),
            concurrency: 2,
            ..Default::default()
        })
        .await;
    let done = h.wait(id).await;
    let task = done.task.clone().unwrap();
    assert_eq!(task.state, "succeed", "{task:?}");

    // Fuel is accounted per subtask, summed per task, and per tenant.
    let per_subtask: u64 = done.subtasks.iter().map(|s| s.fuel_used).sum();
    assert!(
        done.subtasks.iter().all(|s| s.fuel_used > 0),
        "{:?}",
        done.subtasks
    );
    assert_eq!(task.fuel_used, per_subtask);
    let show = stoker(&[
        "task",
        "show",
        &id.to_string(),
        "--subtasks",
        "-o",
        "json",
        "--endpoint",
        &addr,
    ]);
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["fuel_used"], task.fuel_used);
    let listed = shown["subtask_list"].as_array().unwrap();
    assert_eq!(listed.len(), done.subtasks.len());
    assert!(
        listed.iter().all(|s| s["fuel_used"].as_u64().unwrap() > 0),
        "{shown}"
    );

    let m = scrape(&addr);
    assert!(one(&m, "stoker_raft_term", &[]) >= 1.0);
    let commit = one(&m, "stoker_raft_commit_index", &[]);
    let applied = one(&m, "stoker_raft_applied_index", &[]);
    assert!(
        commit >= 1.0 && applied >= 1.0 && applied <= commit + 1e-9,
        "{commit} {applied}"
    );
    assert_eq!(one(&m, "stoker_raft_is_leader", &[]), 1.0);
    assert!(
        one(&m, "stoker_raft_proposal_seconds", &[]) >= 1.0,
        "proposals were timed"
    );
    assert_eq!(one(&m, "stoker_tasks", &[("state", "succeed")]), 1.0);
    assert_eq!(
        one(&m, "stoker_subtasks", &[("state", "succeed")]),
        done.subtasks.len() as f64
    );
    let tenant = task.tenant.as_str();
    assert_eq!(
        one(&m, "stoker_tenant_fuel_used_total", &[("tenant", tenant)]),
        task.fuel_used as f64
    );
    assert_eq!(one(&m, "stoker_worker_slots", &[]), 2.0);
    assert_eq!(one(&m, "stoker_worker_slots_in_use", &[]), 0.0);
    assert_eq!(one(&m, "stoker_governor_allowed_concurrency", &[]), 2.0);
    assert_eq!(
        one(&m, "stoker_governor_command", &[("command", "hold")]),
        1.0
    );
    assert_eq!(one(&m, "stoker_cluster_node_up", &[("node", "1")]), 1.0);
    assert_eq!(one(&m, "stoker_cluster_node_slots", &[("node", "1")]), 2.0);
    assert_eq!(
        one(
            &m,
            "stoker_worker_subtask_run_seconds",
            &[("state", "succeed")]
        ),
        done.subtasks.len() as f64,
        "one run per subtask"
    );
    assert!(one(&m, "stoker_worker_subtask_start_delay_seconds", &[]) >= 1.0);
    assert!(
        one(
            &m,
            "stoker_worker_fuel_granted_total",
            &[("tenant", tenant)]
        ) > 0.0,
        "the governor handed out fuel"
    );
    // The coordinator's operators: every series, at zero on a cluster of
    // one node (nothing to move); the rules tests see them count.
    for (kind, scheduler) in [
        ("move-subtask", "balance-subtask"),
        ("move-subtask", "hot-node"),
        ("move-subtask", "rule-checker"),
        ("transfer-leader", "leader-placement"),
    ] {
        let labels = [("kind", kind), ("scheduler", scheduler)];
        assert_eq!(one(&m, "stoker_operators_created_total", &labels), 0.0);
    }
    for kind in ["move-subtask", "transfer-leader"] {
        for outcome in ["done", "cancelled", "timed-out"] {
            let labels = [("kind", kind), ("outcome", outcome)];
            assert_eq!(one(&m, "stoker_operators_finished_total", &labels), 0.0);
        }
        assert_eq!(
            one(&m, "stoker_operators_in_flight", &[("kind", kind)]),
            0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_state_in_node_list_and_schedulers_switched_by_cluster_config() {
    let _serial = CLUSTERS.lock().await;
    // No `[resource]` table: the governor runs every slot at full speed
    // until the cluster asks for a scheduler.
    let h = Harness::start(1, CONFIG).await;
    let addr = h.addr(1).to_string();

    let load = eventually("a heartbeat with the load", async || load_of(&h, 1).await).await;
    assert_eq!(load.scheduler, "");
    assert_eq!((load.allowed, load.slots), (2, 2));
    let listed = stoker(&["node", "list", "-o", "json", "--endpoint", &addr]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let nodes: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let resource = &nodes[0]["resource"];
    assert_eq!(resource["command"], "hold", "{nodes}");
    assert_eq!(resource["allowed"], 2, "{nodes}");
    assert!(resource.get("cpu").is_some(), "{nodes}");

    // The cluster switches on the cpu scheduler without a restart.
    let set = stoker(&[
        "config",
        "set",
        "resource.scheduler",
        "cpu",
        "--endpoint",
        &addr,
    ]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let load = eventually("the cpu scheduler to run", async || {
        load_of(&h, 1).await.filter(|l| l.scheduler == "cpu")
    })
    .await;
    assert!(load.level > 0.0, "{load:?}");
    eventually("cpu readings from the manager", async || {
        load_of(&h, 1).await.filter(|l| l.cpu.is_some())
    })
    .await;
    let m = scrape(&addr);
    assert_eq!(
        one(&m, "stoker_resource_scheduler", &[("scheduler", "cpu")]),
        1.0
    );
    // The schedulers are listed with the cluster's choice and who runs it.
    let listed = stoker(&["config", "schedulers", "-o", "json", "--endpoint", &addr]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["setting"], "cpu", "{listed}");
    let cpu = listed["schedulers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "cpu")
        .unwrap();
    assert_eq!(cpu["selected"], true, "{listed}");
    assert_eq!(cpu["nodes"], serde_json::json!([1]), "{listed}");
    assert!(listed["schedulers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "fixed" && s["selected"] == false));

    // ... and back to fixed.
    let set = stoker(&[
        "config",
        "set",
        "resource.scheduler",
        "fixed",
        "--endpoint",
        &addr,
    ]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    eventually("the fixed scheduler", async || {
        load_of(&h, 1)
            .await
            .filter(|l| l.scheduler == "fixed" && l.command == "hold")
    })
    .await;

    // Bad settings are refused with the reason, and change nothing.
    for (key, value, needle) in [
        ("resource.scheduler", "fastest", "cpu, fixed"),
        ("resource.cpu.low", "2", "between 0 and 1"),
        ("resource.cpu.lo", "0.2", "unknown resource setting"),
    ] {
        let out = stoker(&["config", "set", key, value, "--endpoint", &addr]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}={value} accepted");
        assert!(err.contains(needle), "{key}={value}: {err}");
    }
    let set = stoker(&[
        "config",
        "set",
        "resource.cpu.high",
        "0.4",
        "--endpoint",
        &addr,
    ]);
    assert!(set.status.success());
    let out = stoker(&[
        "config",
        "set",
        "resource.cpu.low",
        "0.6",
        "--endpoint",
        &addr,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be below"));
    let get = stoker(&["config", "get", "resource.scheduler", "--endpoint", &addr]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "fixed");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(load_of(&h, 1).await.unwrap().scheduler, "fixed");

    // Without the cluster's scheduler the node goes back to its own
    // config: no resource manager, every slot at full speed.
    let del = stoker(&[
        "config",
        "delete",
        "resource.scheduler",
        "--endpoint",
        &addr,
    ]);
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    let load = eventually("the manager to stop", async || {
        load_of(&h, 1).await.filter(|l| l.scheduler.is_empty())
    })
    .await;
    assert_eq!((load.allowed, load.fuel_rate), (2, 0.0), "{load:?}");
    let again = stoker(&[
        "config",
        "delete",
        "resource.scheduler",
        "--endpoint",
        &addr,
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not set"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_subtask_fuel_limit_ends_a_runaway_guest() {
    let _serial = CLUSTERS.lock().await;
    let h = Harness::start(1, CONFIG).await;
    let hash = h.upload("misbehave").await;
    let id = h
        .submit(SubmitTaskRequest {
            module: hash,
            input: b"loop\n".to_vec(),
            fuel_limit: 50_000_000,
            max_attempts: 1,
            ..Default::default()
        })
        .await;
    let done = h.wait(id).await;
    let task = done.task.unwrap();
    assert_ne!(task.state, "succeed");
    let failed: Vec<_> = done
        .subtasks
        .iter()
        .filter(|s| s.state == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{:?}", done.subtasks);
    assert!(
        failed[0].error.starts_with("fuel_exhausted"),
        "{}",
        failed[0].error
    );
    // The fuel it burned up to the limit is accounted.
    assert!(failed[0].fuel_used >= 50_000_000, "{}", failed[0].fuel_used);
    assert_eq!(task.fuel_used, failed[0].fuel_used);
    let m = scrape(h.addr(1));
    let by_tenant: BTreeMap<String, f64> = samples(&m, "stoker_tenant_fuel_used_total", &[])
        .into_iter()
        .map(|s| {
            (
                s.labels.get("tenant").unwrap_or("").to_string(),
                value(&s.value),
            )
        })
        .collect();
    assert_eq!(
        by_tenant.get(&task.tenant).copied(),
        Some(task.fuel_used as f64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_only_node_serves_its_own_metrics_and_health() {
    let _serial = CLUSTERS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = stoker::api::local_cluster::LocalCluster::start_with_config(
        exe(),
        1,
        dir.path(),
        Some(CONFIG),
    )
    .unwrap();
    cluster.add_worker(2, &["--slots", "3"]).unwrap();
    cluster
        .wait_leader(std::time::Duration::from_secs(30))
        .await
        .unwrap();
    cluster
        .wait_workers(2, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let worker = cluster.addr(2).to_string();
    let health = http_get(&worker, "/healthz", &[]);
    assert_eq!(health.status, 200);
    assert_eq!(http_get(&worker, "/readyz", &[]).status, 200);
    let m = scrape(&worker);
    assert_eq!(one(&m, "stoker_worker_slots", &[]), 3.0);
    assert_eq!(one(&m, "stoker_governor_allowed_concurrency", &[]), 3.0);
    for name in [
        "stoker_raft_term",
        "stoker_operators_created_total",
        "stoker_operators_in_flight",
    ] {
        assert!(
            samples(&m, name, &[]).is_empty(),
            "a worker has no Raft state and no coordinator: {name}"
        );
    }
    // The dashboard's data lives on scheduler nodes; the worker says where.
    let r = http_get(&worker, "/api/overview", &[]);
    assert_eq!(r.status, 503);
    assert!(r.body.contains(cluster.addr(1)), "{}", r.body);
    // The scheduler reports the worker's state from its heartbeats.
    let sched = cluster.addr(1).to_string();
    let m = eventually("the worker's load on the scheduler", async || {
        let m = scrape(&sched);
        (!samples(
            &m,
            "stoker_cluster_node_allowed_concurrency",
            &[("node", "2")],
        )
        .is_empty())
        .then_some(m)
    })
    .await;
    assert_eq!(
        one(
            &m,
            "stoker_cluster_node_allowed_concurrency",
            &[("node", "2")]
        ),
        3.0
    );
}

/// Runs `stoker` under a pseudo-terminal (util-linux `script`), so that its
/// stderr is a terminal; everything it wrote, control sequences included.
fn stoker_on_a_terminal(args: &[&str]) -> String {
    let script = std::path::Path::new("/usr/bin/script");
    assert!(
        script.exists(),
        "{} (util-linux, Debian's essential bsdutils) is missing: the test runs the CLI on a pseudo-terminal with it",
        script.display()
    );
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let line: Vec<String> = std::iter::once(exe().to_str().unwrap())
        .chain(args.iter().copied())
        .map(quote)
        .collect();
    let out = Command::new(script)
        .args(["-qefc", &line.join(" "), "/dev/null"])
        .env("STOKER_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{line:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_upload_draws_a_byte_bar_on_a_terminal_and_json_alone_with_o_json() {
    let _serial = CLUSTERS.lock().await;
    let h = Harness::start(1, CONFIG).await;
    let addr = h.addr(1).to_string();
    let upload = |guest: &str, more: &[&str]| {
        let mut args = vec![
            "module",
            "upload",
            stoker_test_artifacts::path(guest).unwrap(),
            "--name",
            guest,
            "--endpoint",
            &addr,
        ];
        args.extend(more);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| Command::new(exe()).args(args).output().unwrap();

    // A pipe: the hash alone on stdout, nothing on stderr.
    let out = run(upload("misbehave", &[]));
    assert!(out.status.success(), "{out:?}");
    let hash = String::from_utf8(out.stdout).unwrap();
    assert_eq!(hash.trim().len(), 64, "{hash:?}");
    assert_eq!(hash.lines().count(), 1, "{hash:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // -o json: one JSON object and nothing else, on a terminal too.
    let out = run(upload("sort", &["-o", "json"]));
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "sort");
    assert_eq!(v["created"], true);
    let args = upload("primes", &["-o", "json"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = stoker_on_a_terminal(&args);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not only JSON on the terminal ({e}): {text:?}"));
    assert_eq!(v["name"], "primes");

    // Text on a terminal: a bar of the module's bytes, replaced by a line
    // of how many were sent (all of them), then the hash on a line of its
    // own.
    let size = stoker_test_artifacts::read("wordcount").len() as u64;
    let args = upload("wordcount", &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = stoker_on_a_terminal(&args);
    let total = indicatif::BinaryBytes(size).to_string();
    assert!(
        text.contains(&format!("/{total}")) && text.contains("upload ["),
        "no byte bar of {total}: {text:?}"
    );
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let [.., sent, hash] = lines.as_slice() else {
        panic!("{text:?}")
    };
    assert!(
        sent.contains(&format!("uploaded {total} in ")),
        "the bar ends as a line of all {total} sent: {text:?}"
    );
    let hash = hash.trim();
    assert_eq!(hash.len(), 64, "the hash comes last: {text:?}");
    let listed = stoker(&["module", "list", "-o", "json", "--endpoint", &addr]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "wordcount" && m["hash"] == hash),
        "{listed}"
    );
}
