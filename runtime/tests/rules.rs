//! Placement rules and the coordinator across real `stoker server`
//! processes on 127.0.0.1: subtask rules pin key ranges to labelled nodes,
//! a leader rule moves ownership, `--rules FILE` reloads on SIGUSR1, a time
//! window opens and closes, an operator limit of 1 moves one subtask at a
//! time (each move done by the report of the node it went to, or timed out
//! when that node never reports), `stoker scheduler add|remove` steers the
//! built-in schedulers, a follower's worker gets its operator steps (and
//! sends its reports) through the owner, and a rule whose node is full
//! waits and says why.
//!
//! Clusters are started one at a time (a file-wide lock), and every process
//! is killed when its cluster is dropped.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{exe, one, samples, scrape};
use stoker::api::local_cluster::LocalCluster;
use stoker::api::meta::{connect_lazy, connect_stoker, set_config_request};
use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::api::{
    control_scheduler_request, ApplyRulesRequest, ControlSchedulerRequest, GetTaskRequest,
    GetTaskResponse, ListOperatorsRequest, OperatorInfo, RuleInfo, ShowRulesRequest,
    SubmitTaskRequest,
};
use tonic::transport::Channel;

static CLUSTERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(120);

/// The owner notices dead workers quickly and rounds often.
const CONFIG: &str =
    "[owner]\nnode_timeout_ms = 1500\ntick_ms = 100\n\n[worker]\nheartbeat_interval_ms = 300\n";

struct Harness {
    cluster: LocalCluster,
    dir: tempfile::TempDir,
}

impl Harness {
    /// `schedulers` scheduler nodes with `sched_args(id)` and worker-only
    /// nodes with the given arguments (ids after the schedulers'); waits
    /// for `workers_up` workers.
    async fn start(
        config: &str,
        schedulers: u64,
        sched_args: &dyn Fn(u64, &Path) -> Vec<String>,
        workers: &[&[&str]],
        workers_up: usize,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut cluster =
            LocalCluster::start_with_args(exe(), schedulers, dir.path(), Some(config), &|id| {
                sched_args(id, &path)
            })
            .unwrap();
        for (i, w) in workers.iter().enumerate() {
            cluster.add_worker(schedulers + 1 + i as u64, w).unwrap();
        }
        cluster.wait_leader(Duration::from_secs(30)).await.unwrap();
        cluster
            .wait_workers(workers_up, Duration::from_secs(60))
            .await
            .unwrap();
        Harness { cluster, dir }
    }

    /// A client of a running scheduler node.
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
        common::upload(self.client(), name).await
    }

    async fn submit(&self, module: &str, key: &str, input: String, concurrency: u32) -> u64 {
        self.client()
            .submit_task(SubmitTaskRequest {
                module: module.into(),
                key: key.into(),
                input: input.into(),
                concurrency,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .id
    }

    async fn get(&self, id: u64) -> GetTaskResponse {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self
                .client()
                .get_task(GetTaskRequest {
                    id,
                    with_subtasks: true,
                })
                .await
            {
                return r.into_inner();
            }
            assert!(Instant::now() < deadline, "task {id} cannot be read");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the task finished; it must have succeeded.
    async fn wait(&self, id: u64) -> GetTaskResponse {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self.get(id).await;
            let state = r.task.as_ref().unwrap().state.clone();
            if matches!(state.as_str(), "succeed" | "failed" | "reverted") {
                assert_eq!(state, "succeed", "{:?}", r.task);
                return r;
            }
            assert!(Instant::now() < deadline, "task {id} still {state}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The nodes that ran the task's subtasks.
    async fn ran_on(&self, id: u64) -> BTreeSet<u64> {
        self.wait(id)
            .await
            .subtasks
            .iter()
            .map(|s| s.node)
            .collect()
    }

    async fn apply(&self, source: &str) -> Result<u32, tonic::Status> {
        self.client()
            .apply_rules(ApplyRulesRequest {
                source: source.into(),
            })
            .await
            .map(|r| r.into_inner().count)
    }

    async fn rules(&self) -> Vec<RuleInfo> {
        self.client()
            .show_rules(ShowRulesRequest {})
            .await
            .unwrap()
            .into_inner()
            .rules
    }

    /// Polls `rules show` until rule `name` satisfies `ok`.
    async fn wait_rule(&self, name: &str, ok: impl Fn(&RuleInfo) -> bool) -> RuleInfo {
        let deadline = Instant::now() + WAIT;
        loop {
            let rules = self.rules().await;
            let rule = rules.iter().find(|r| r.rule.as_ref().unwrap().name == name);
            if let Some(r) = rule.filter(|r| ok(r)) {
                return r.clone();
            }
            assert!(Instant::now() < deadline, "rule {name} now: {rule:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, id: u64, sig: &str) {
        let pid = self.cluster.pid(id).expect("node runs");
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }
}

/// Sets a cluster config key through node 1.
async fn set_config(h: &Harness, key: &str, value: &str) {
    let mut meta = connect_lazy(h.cluster.addr(1), Duration::from_secs(20)).unwrap();
    let r = meta
        .propose(set_config_request(key.into(), value.into()))
        .await
        .unwrap()
        .into_inner();
    assert!(r.result.unwrap().error.is_empty());
}

/// Runs the `stoker` CLI against node 1.
fn cli(h: &Harness, args: &[&str]) -> std::process::Output {
    std::process::Command::new(exe())
        .args(args)
        .args(["--endpoint", h.cluster.addr(1)])
        .env("STOKER_LOG", "warn")
        .output()
        .expect("stoker runs")
}

/// Misbehave input: `n` subtasks spinning `millions` million iterations.
fn spins(n: usize, millions: u32) -> String {
    (0..n).map(|_| format!("spin:{millions}\n")).collect()
}

fn rule(name: &str, kind: &str, start: &str, end: &str, targets: &str, extra: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nkind = \"{kind}\"\nstart_key = \"{start}\"\nend_key = \"{end}\"\ntargets = {targets}\n{extra}\n"
    )
}

fn labels(id: u64) -> String {
    format!("zone=z{id},host=h{id},rack=r{}", id % 2)
}

/// Five labelled nodes: one scheduler that also works (with `extra`
/// arguments), four workers; `slots` each.
async fn five_nodes(config: &str, slots: u32, extra: Vec<String>) -> Harness {
    let slots = slots.to_string();
    let worker_args: Vec<Vec<String>> = (2..=5)
        .map(|id| {
            vec![
                "--slots".into(),
                slots.clone(),
                "--labels".into(),
                labels(id),
            ]
        })
        .collect();
    let refs: Vec<Vec<&str>> = worker_args
        .iter()
        .map(|a| a.iter().map(String::as_str).collect())
        .collect();
    let workers: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
    Harness::start(
        config,
        1,
        &move |id, _| {
            let mut a = vec![
                "--slots".into(),
                slots.clone(),
                "--labels".into(),
                labels(id),
            ];
            a.extend(extra.iter().cloned());
            a
        },
        &workers,
        5,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subtask_rules_pin_key_ranges_to_their_nodes() {
    let _one = CLUSTERS.lock().await;
    let h = five_nodes(CONFIG, 2, Vec::new()).await;
    let m = h.upload("misbehave").await;
    let rules = [
        rule(
            "a-on-2-3",
            "subtask",
            "a/",
            "a0",
            "[{ host = \"h2\" }, { host = \"h3\" }]",
            "",
        ),
        rule(
            "c-on-rack1",
            "subtask",
            "c/",
            "c0",
            "[{ rack = \"r1\", zone = \"z5\" }]",
            "",
        ),
    ]
    .concat();
    assert_eq!(h.apply(&rules).await.unwrap(), 2);
    let shown = h.rules().await;
    assert_eq!(shown.len(), 2);
    assert!(shown.iter().all(|r| r.status == "active"), "{shown:?}");
    assert_eq!(shown[0].nodes, vec![2, 3]);
    assert_eq!(shown[1].nodes, vec![5]);

    let a = h.submit(&m, "a/1", spins(10, 20), 2).await;
    let c = h.submit(&m, "c/7", spins(6, 20), 2).await;
    let free = h.submit(&m, "z/1", spins(10, 20), 2).await;
    assert_eq!(
        h.ran_on(a).await,
        BTreeSet::from([2, 3]),
        "spread over both"
    );
    assert_eq!(h.ran_on(c).await, BTreeSet::from([5]));
    assert!(h.ran_on(free).await.len() > 2, "unpinned work spreads");

    // A conflicting file is refused, naming both rules, and changes nothing.
    let bad = [
        rules.clone(),
        rule("a-on-4", "subtask", "a/x", "a/y", "[{ host = \"h4\" }]", ""),
    ]
    .concat();
    let e = h.apply(&bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("a-on-2-3") && e.message().contains("a-on-4"),
        "{}",
        e.message()
    );
    let cross = [
        rules.clone(),
        rule("owner-z4", "leader", "c/", "c0", "[{ zone = \"z4\" }]", ""),
    ]
    .concat();
    let e = h.apply(&cross).await.unwrap_err();
    assert!(e.message().contains("owner-z4") && e.message().contains("c-on-rack1"));
    let e = h
        .apply("[[rule]]\nname = \"x\"\nkind = \"region\"\n")
        .await
        .unwrap_err();
    assert!(e.message().contains("\"x\""), "{}", e.message());
    let names: Vec<String> = h
        .rules()
        .await
        .iter()
        .map(|r| r.rule.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, vec!["a-on-2-3", "c-on-rack1"]);
    // Removing the rules frees the range again.
    assert_eq!(h.apply("").await.unwrap(), 0);
    let a = h.submit(&m, "a/2", spins(10, 20), 2).await;
    assert!(h.ran_on(a).await.len() > 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_rule_moves_ownership() {
    let _one = CLUSTERS.lock().await;
    let h = Harness::start(
        CONFIG,
        3,
        &|id, _| vec!["--slots".into(), "2".into(), "--labels".into(), labels(id)],
        &[],
        3,
    )
    .await;
    let leader = h
        .cluster
        .wait_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let target = if leader == 3 { 2 } else { 3 };
    let rules = rule(
        "owner",
        "leader",
        "",
        "",
        &format!("[{{ zone = \"z{target}\" }}]"),
        "",
    );
    h.apply(&rules).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while h
        .cluster
        .wait_leader(Duration::from_secs(30))
        .await
        .unwrap()
        != target
    {
        assert!(
            Instant::now() < deadline,
            "leadership did not move to {target}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.wait_rule("owner", |r| r.status == "active").await;
    // The new owner schedules.
    let m = h.upload("misbehave").await;
    let id = h.submit(&m, "k", spins(4, 10), 2).await;
    h.wait(id).await;
    assert_eq!(
        h.cluster
            .wait_leader(Duration::from_secs(30))
            .await
            .unwrap(),
        target,
        "leadership stays where the rule wants it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reloads_the_rules_file_and_changes_placement_of_new_subtasks() {
    let _one = CLUSTERS.lock().await;
    // The file exists before node 1 starts with `--rules`.
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("rules.toml");
    std::fs::write(
        &path,
        rule("pin", "subtask", "r/", "r0", "[{ host = \"h2\" }]", ""),
    )
    .unwrap();
    let h = five_nodes(
        CONFIG,
        2,
        vec!["--rules".into(), path.display().to_string()],
    )
    .await;
    // Applied at start.
    h.wait_rule("pin", |r| r.nodes == vec![2] && r.status == "active")
        .await;
    let m = h.upload("misbehave").await;
    let first = h.submit(&m, "r/1", spins(8, 20), 2).await;
    assert_eq!(h.ran_on(first).await, BTreeSet::from([2]));

    std::fs::write(
        &path,
        rule("pin", "subtask", "r/", "r0", "[{ host = \"h4\" }]", ""),
    )
    .unwrap();
    h.signal(1, "-USR1");
    h.wait_rule("pin", |r| r.nodes == vec![4]).await;
    let second = h.submit(&m, "r/2", spins(8, 20), 2).await;
    assert_eq!(h.ran_on(second).await, BTreeSet::from([4]));

    // A broken file is refused on reload: the rules in force stay.
    std::fs::write(&path, "[[rule]]\nname = \"pin\"\nkind = ").unwrap();
    h.signal(1, "-USR1");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = std::fs::read_to_string(h.dir.path().join("node-1.log")).unwrap();
    assert!(log.contains("not reloaded"), "the refusal is logged");
    let shown = h.rules().await;
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].nodes, vec![4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_window_opens_and_closes() {
    let _one = CLUSTERS.lock().await;
    let h = five_nodes(CONFIG, 2, Vec::new()).await;
    let m = h.upload("misbehave").await;
    let now = std::time::SystemTime::now();
    let at =
        |secs: u64| humantime::format_rfc3339_seconds(now + Duration::from_secs(secs)).to_string();
    let (open, close) = (20, 60);
    let window = format!(
        "start_time = \"{}\"\nend_time = \"{}\"",
        at(open),
        at(close)
    );
    let rules = rule(
        "window",
        "subtask",
        "w/",
        "w0",
        "[{ host = \"h3\" }]",
        &window,
    );
    h.apply(&rules).await.unwrap();
    let r = h.wait_rule("window", |r| r.status == "waiting").await;
    assert!(r.reason.contains("window opens at"), "{r:?}");
    // Before the window: anywhere.
    let before = h.submit(&m, "w/1", spins(10, 20), 2).await;
    assert!(h.ran_on(before).await.len() > 1);
    // In the window: only node 3.
    h.wait_rule("window", |r| r.status == "active").await;
    let during = h.submit(&m, "w/2", spins(6, 10), 2).await;
    assert_eq!(h.ran_on(during).await, BTreeSet::from([3]));
    // After it: anywhere again.
    h.wait_rule("window", |r| r.status == "expired").await;
    let after = h.submit(&m, "w/3", spins(10, 20), 2).await;
    assert!(h.ran_on(after).await.len() > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_limit_of_one_moves_one_subtask_at_a_time() {
    let _one = CLUSTERS.lock().await;
    // Stopped workers must stay "up": a long node timeout. Heartbeats
    // (which carry operator steps and reports) come often.
    let config =
        "[owner]\nnode_timeout_ms = 600000\ntick_ms = 100\n\n[worker]\nheartbeat_interval_ms = 100\n";
    let h = Harness::start(
        config,
        1,
        &|_, _| vec!["--no-worker".into()],
        &[
            &["--slots", "8", "--labels", "host=h2"],
            &["--slots", "8", "--labels", "host=h3"],
            &["--slots", "2", "--labels", "host=h4"],
        ],
        3,
    )
    .await;
    set_config(&h, "subtask-schedule-limit", "1").await;
    // Only the rule checker moves work here.
    for name in ["balance-subtask", "hot-node"] {
        let state = h
            .client()
            .control_scheduler(ControlSchedulerRequest {
                name: name.into(),
                action: control_scheduler_request::Action::Pause as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .state;
        assert_eq!(state, "paused");
    }
    let m = h.upload("misbehave").await;
    // Nodes 3 and 4 stop claiming (and heartbeating): what is assigned to
    // them stays queued.
    h.signal(3, "-STOP");
    h.signal(4, "-STOP");
    let id = h.submit(&m, "m/1", spins(10, 600), 8).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = h.get(id).await;
        let queued_on = |n: u64| {
            r.subtasks
                .iter()
                .filter(|s| s.state == "pending" && s.node == n)
                .count()
        };
        if queued_on(3) + queued_on(4) >= 3 && queued_on(4) >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "nothing queued on 3 and 4");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let operators = || async {
        h.client()
            .list_operators(ListOperatorsRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    // A rule onto stopped node 3: moves from node 4 reach node 3's
    // heartbeat replies, but it never reports, so each times out.
    set_config(&h, "operator-timeout-ms", "1500").await;
    h.apply(&rule(
        "pin",
        "subtask",
        "m/",
        "m0",
        "[{ host = \"h3\" }]",
        "",
    ))
    .await
    .unwrap();
    loop {
        let ops = operators().await;
        assert!(ops.operators.len() <= 1, "{:?}", ops.operators);
        let to_3 =
            |o: &&OperatorInfo| o.kind == "move-subtask" && o.steps[0].ends_with("to node 3");
        assert!(
            ops.recent.iter().filter(to_3).all(|o| o.state != "done"),
            "node 3 never took anything: {:?}",
            ops.recent
        );
        if let Some(o) = ops
            .recent
            .iter()
            .filter(to_3)
            .find(|o| o.state == "timed-out")
        {
            assert_eq!(o.confirmed_by, "");
            assert!(o.reports.iter().all(|r| !r.contains("node 3")), "{o:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no move timed out: {:?}", ops);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Onto node 2, which runs: every move is done by node 2's report.
    set_config(&h, "operator-timeout-ms", "30000").await;
    h.apply(&rule(
        "pin",
        "subtask",
        "m/",
        "m0",
        "[{ host = \"h2\" }]",
        "",
    ))
    .await
    .unwrap();
    // Watch the operators until the task is done: never two moves at once.
    let mut moves_done = BTreeSet::new();
    let mut by_report = BTreeSet::new();
    loop {
        let ops = operators().await;
        let moving = ops
            .operators
            .iter()
            .filter(|o| o.kind == "move-subtask")
            .count();
        assert!(moving <= 1, "{:?}", ops.operators);
        let m = scrape(h.cluster.addr(1));
        let in_flight = one(
            &m,
            "stoker_operators_in_flight",
            &[("kind", "move-subtask")],
        );
        assert!(in_flight <= 1.0, "{in_flight} in flight in /metrics");
        for o in ops.recent.iter().filter(|o| {
            o.kind == "move-subtask" && o.state == "done" && o.steps[0].ends_with("to node 2")
        }) {
            moves_done.insert(o.id);
            if o.confirmed_by == "report of node 2" {
                assert!(
                    o.reports.iter().any(|r| r.starts_with("node 2 took")),
                    "{o:?}"
                );
                by_report.insert(o.id);
            }
        }
        let r = h.get(id).await;
        if r.task.as_ref().unwrap().state == "succeed" {
            break;
        }
        assert!(Instant::now() < deadline, "task not done: {:?}", r.task);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.signal(3, "-CONT");
    h.signal(4, "-CONT");
    // (A move may start and finish between two looks, so seeing one in
    // flight is not guaranteed; two in flight were never seen.)
    assert!(moves_done.len() >= 3, "moves happened: {moves_done:?}");
    // A move whose subtask finished before node 2's report came is done by
    // the replicated state; with heartbeats every 100 ms that is rare.
    assert!(
        by_report.len() * 2 >= moves_done.len(),
        "done by node 2's report: {by_report:?} of {moves_done:?}"
    );
    assert_eq!(h.ran_on(id).await, BTreeSet::from([2]));
    // /metrics of the owner counts them: created by the rule checker
    // alone, each one either finished or still in flight.
    let m = scrape(h.cluster.addr(1));
    let moves = [("kind", "move-subtask")];
    let created = one(
        &m,
        "stoker_operators_created_total",
        &[("kind", "move-subtask"), ("scheduler", "rule-checker")],
    );
    let done = one(
        &m,
        "stoker_operators_finished_total",
        &[("kind", "move-subtask"), ("outcome", "done")],
    );
    assert!(done >= moves_done.len() as f64, "{done} done");
    let finished: f64 = samples(&m, "stoker_operators_finished_total", &moves)
        .iter()
        .map(|s| common::value(&s.value))
        .sum();
    let in_flight = one(&m, "stoker_operators_in_flight", &moves);
    assert_eq!(created, finished + in_flight, "{created} created");
    let by_others: f64 = samples(&m, "stoker_operators_created_total", &moves)
        .iter()
        .filter(|s| s.labels.get("scheduler") != Some("rule-checker"))
        .map(|s| common::value(&s.value))
        .sum();
    assert_eq!(by_others, 0.0, "the paused schedulers created none");

    // `scheduler add|remove` steer the built-in schedulers; other names are
    // refused with the known ones; checkers are listed, not steered.
    let out = cli(&h, &["scheduler", "remove", "hot-node"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = |h: &Harness| {
        let out = cli(h, &["scheduler", "list", "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["schedulers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let field = |k: &str| s[k].as_str().unwrap().to_string();
                (field("name"), field("kind"), field("state"))
            })
            .collect::<Vec<_>>()
    };
    let has = |l: &[(String, String, String)], name: &str, kind: &str, state: &str| {
        l.contains(&(name.into(), kind.into(), state.into()))
    };
    let l = list(&h);
    assert!(has(&l, "hot-node", "scheduler", "removed"), "{l:?}");
    assert!(has(&l, "down-node-checker", "checker", "running"), "{l:?}");
    assert!(has(&l, "rule-checker", "checker", "running"), "{l:?}");
    let out = cli(&h, &["scheduler", "add", "hot-node"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(has(&list(&h), "hot-node", "scheduler", "running"));
    let out = cli(&h, &["scheduler", "add", "balance-region"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("balance-subtask, hot-node, leader-placement"),
        "{err}"
    );
    let out = cli(&h, &["scheduler", "pause", "down-node-checker"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("checker"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_worker_gets_its_steps_through_the_owner() {
    let _one = CLUSTERS.lock().await;
    // Three scheduler nodes that also work; a stopped one stays "up".
    let config =
        "[owner]\nnode_timeout_ms = 600000\ntick_ms = 100\n\n[worker]\nheartbeat_interval_ms = 100\n";
    let h = Harness::start(
        config,
        3,
        &|id, _| vec!["--slots".into(), "2".into(), "--labels".into(), labels(id)],
        &[],
        3,
    )
    .await;
    let leader = h
        .cluster
        .wait_leader(Duration::from_secs(30))
        .await
        .unwrap();
    // `stopped` is never node 1, which the harness's client talks to.
    let stopped = if leader == 3 { 2 } else { 3 };
    let follower = 6 - leader - stopped;
    for name in ["balance-subtask", "hot-node"] {
        h.client()
            .control_scheduler(ControlSchedulerRequest {
                name: name.into(),
                action: control_scheduler_request::Action::Pause as i32,
            })
            .await
            .unwrap();
    }
    let m = h.upload("misbehave").await;
    h.signal(stopped, "-STOP");
    let id = h.submit(&m, "f/1", spins(6, 600), 2).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = h.get(id).await;
        if r.subtasks
            .iter()
            .any(|s| s.state == "pending" && s.node == stopped)
        {
            break;
        }
        assert!(Instant::now() < deadline, "nothing queued on {stopped}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Onto the follower's worker, whose heartbeats reach the owner only
    // through the follower: the steps must come back that way, and the
    // reports go to the owner the same way.
    let target = format!("[{{ host = \"h{follower}\" }}]");
    h.apply(&rule("pin", "subtask", "f/", "f0", &target, ""))
        .await
        .unwrap();
    let by_follower = format!("report of node {follower}");
    loop {
        let ops = h
            .client()
            .list_operators(ListOperatorsRequest {})
            .await
            .unwrap()
            .into_inner();
        if let Some(o) = ops.recent.iter().find(|o| o.confirmed_by == by_follower) {
            let took = format!("node {follower} took");
            assert!(o.reports.iter().any(|r| r.starts_with(&took)), "{o:?}");
            assert!(
                o.steps[0].ends_with(&format!("to node {follower}")),
                "{o:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no move done by node {follower}'s report: {:?}",
            ops.recent
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.signal(stopped, "-CONT");
    let ran = h.ran_on(id).await;
    assert!(!ran.contains(&stopped), "{ran:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_targeting_a_full_node_waits_and_says_why() {
    let _one = CLUSTERS.lock().await;
    let h = five_nodes(CONFIG, 1, Vec::new()).await;
    let m = h.upload("misbehave").await;
    h.apply(&rule(
        "full",
        "subtask",
        "f/",
        "f0",
        "[{ host = \"h2\" }]",
        "",
    ))
    .await
    .unwrap();
    let id = h.submit(&m, "f/1", spins(4, 800), 4).await;
    let r = h
        .wait_rule("full", |r| {
            r.status == "blocked" && r.reason.contains("full")
        })
        .await;
    assert!(r.reason.contains("wait for room"), "{r:?}");
    // The others wait for node 2 rather than overload it or go elsewhere.
    let t = h.get(id).await;
    let running: Vec<u64> = t
        .subtasks
        .iter()
        .filter(|s| s.state == "running")
        .map(|s| s.node)
        .collect();
    assert!(
        running.len() <= 1 && running.iter().all(|n| *n == 2),
        "{running:?}"
    );
    assert_eq!(h.ran_on(id).await, BTreeSet::from([2]));
    h.wait_rule("full", |r| r.status == "active").await;
}
