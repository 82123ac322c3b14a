//! `stoker bench cluster`: the task framework end to end on 3 real
//! `stoker server` processes on 127.0.0.1 (every node a scheduler and a
//! worker).
//!
//! 1. Throughput: T tasks of N no-op subtasks (misbehave payload `ok`) at
//!    once; no-op subtasks committed per second from the first submit to
//!    the last task's success (submit, plan, assign, claim, run, report,
//!    commit, finish).
//! 2. Latency: K one-subtask tasks one after another; submit to the
//!    subtask's start (its record's `start_time_ms`, the claiming worker's
//!    clock, minus the wall clock taken just before the `SubmitTask` call:
//!    the same machine) and submit to the task's success, p50 and p99.
//!
//! Records carry the times of every phase (task created, subtask started
//! and ended, task finished), so the summary also says where time goes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use stoker::api::local_cluster::LocalCluster;
use stoker::api::meta::{connect_lazy, connect_stoker};
use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::api::{GetTaskRequest, GetTaskResponse, SubmitTaskRequest, UploadModuleRequest};
use stoker_proto::meta::{StatusRequest, TaskRecord};
use tonic::transport::Channel;

use super::Output;

/// Throughput the framework aims at, in no-op subtasks per second.
const AIM_RATE: f64 = 10_000.0;
/// Submit-to-running p50 the framework aims at, in milliseconds.
const AIM_P50_MS: f64 = 10.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The `misbehave` test module (`tests/programs/misbehave`).
    #[arg(long)]
    module: PathBuf,
    /// No-op subtasks per throughput task.
    #[arg(long, default_value_t = 2000)]
    subtasks: u32,
    /// Throughput tasks, submitted at once.
    #[arg(long, default_value_t = 4)]
    tasks: u32,
    /// Slots of every node's worker; also each task's concurrency.
    #[arg(long, default_value_t = 8)]
    slots: u32,
    /// One-subtask tasks of the latency part, run one after another.
    #[arg(long, default_value_t = 50)]
    latency_tasks: u32,
    /// Milliseconds between two polls of a latency task.
    #[arg(long, default_value_t = 1)]
    poll_ms: u64,
    /// The whole run (cluster start included) must end within this.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// A TOML server config every node reads (e.g. `[owner]
    /// queue_per_slot`), to measure a setting.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Keep the cluster's directory (node data and logs `node-N.log`).
    #[arg(long)]
    keep: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.slots > 0, "--slots must be at least 1");
    anyhow::ensure!(
        args.subtasks > 0 && args.tasks > 0,
        "--subtasks and --tasks must be at least 1"
    );
    let module = std::fs::read(&args.module)
        .with_context(|| format!("cannot read module file {}", args.module.display()))?;
    let exe = std::env::current_exe().context("cannot find the stoker binary")?;
    let dir = std::env::temp_dir().join(format!("stoker-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let limit = Duration::from_secs(args.timeout_secs);
    let deadline = Instant::now() + limit;
    let outcome = tokio::time::timeout(limit, bench(&exe, &dir, &module, &args, deadline)).await;
    if args.keep {
        eprintln!("kept the cluster directory {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = match outcome {
        Ok(report) => report?,
        Err(_) => anyhow::bail!(
            "the benchmark did not finish within {} s (--timeout-secs); \
             rerun with --keep and read the node logs",
            args.timeout_secs
        ),
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report.json(&args))?),
        Output::Text => report.print(&args),
    }
    Ok(ExitCode::SUCCESS)
}

/// Milliseconds since the Unix epoch, with sub-millisecond precision.
fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The `p` quantile (0..=1) of sorted values, nearest rank; 0 when empty.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sorted copy of `values` (NaN-free by construction).
fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// p50 and p99 of `values`.
fn p50_p99(values: &[f64]) -> (f64, f64) {
    let s = sorted(values);
    (percentile(&s, 0.5), percentile(&s, 0.99))
}

/// Misbehave input of `n` no-op subtasks.
fn noop_input(n: u32) -> Vec<u8> {
    "ok\n".repeat(n as usize).into_bytes()
}

/// Subtasks per second between the 10% and 90% completion times (the
/// steady state, without ramp-up and tail); `None` with too few samples or
/// no time between them.
fn steady_rate(end_times_ms: &[u64]) -> Option<f64> {
    if end_times_ms.len() < 10 {
        return None;
    }
    let mut t = end_times_ms.to_vec();
    t.sort_unstable();
    let (a, b) = (t.len() / 10, t.len() * 9 / 10);
    let span = t[b].saturating_sub(t[a]);
    (span > 0).then(|| (b - a) as f64 / (span as f64 / 1e3))
}

/// Whether a task state is final.
fn finished(state: &str) -> bool {
    matches!(state, "succeed" | "failed" | "reverted")
}

fn delta(later: u64, earlier: f64) -> f64 {
    later as f64 - earlier
}

/// Fails with `what` once `deadline` has passed.
fn check(deadline: Instant, what: impl FnOnce() -> String) -> anyhow::Result<()> {
    anyhow::ensure!(
        Instant::now() < deadline,
        "timed out (--timeout-secs): {}",
        what()
    );
    Ok(())
}

/// The throughput part's figures.
struct Throughput {
    subtasks: u64,
    tasks: u32,
    /// First submit to the last task's `finish_time_ms`, in seconds.
    wall_s: f64,
    /// The same as the client saw it (its last poll), in seconds.
    observed_s: f64,
    rate: f64,
    steady_rate: Option<f64>,
    /// Raft log entries committed per subtask (leader's commit index).
    entries_per_subtask: f64,
    /// Phase spans, ms: first submit to the last task created, then to
    /// the first subtask start, first start to last subtask end, last end
    /// to the last task finished.
    submit_to_created_ms: f64,
    created_to_first_start_ms: f64,
    run_span_ms: f64,
    last_end_to_finish_ms: f64,
    /// Subtask run times (start to end, ms), p50 and p99.
    run_p50_ms: f64,
    run_p99_ms: f64,
    /// Subtasks each node ran.
    per_node: Vec<(u64, u64)>,
    /// CPU time of the three server processes per subtask, in
    /// microseconds (submit to the last task done); `None` without `/proc`.
    cpu_us_per_subtask: Option<f64>,
}

/// The latency part's figures (milliseconds).
struct Latency {
    count: u32,
    /// Submit to the subtask's `start_time_ms`.
    to_start: Vec<f64>,
    /// Submit to the first poll that saw the subtask running or done.
    to_seen_running: Vec<f64>,
    /// Submit to the first poll that saw the task succeed.
    to_succeed: Vec<f64>,
    /// Submit to the task's `finish_time_ms`.
    to_finish_record: Vec<f64>,
    /// Phases: submit→created, created→start, start→end, end→finished.
    submit_to_created: Vec<f64>,
    created_to_start: Vec<f64>,
    start_to_end: Vec<f64>,
    end_to_finish: Vec<f64>,
    /// Polls per task, mean.
    polls: f64,
}

struct Report {
    leader: u64,
    startup_s: f64,
    warmup_s: f64,
    total_s: f64,
    throughput: Throughput,
    latency: Latency,
}

async fn bench(
    exe: &Path,
    dir: &Path,
    module: &[u8],
    args: &Args,
    deadline: Instant,
) -> anyhow::Result<Report> {
    let began = Instant::now();
    let slots = args.slots.to_string();
    let config = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?,
        ),
        None => None,
    };
    let cluster = LocalCluster::start_with_args(exe, 3, dir, config.as_deref(), &|_| {
        vec!["--slots".to_string(), slots.clone()]
    })
    .context("cannot start the cluster")?;
    let leader = cluster
        .wait_leader(Duration::from_secs(20))
        .await
        .map_err(anyhow::Error::msg)?;
    let timeout = Duration::from_secs(15);
    let mut client = connect_stoker(cluster.addr(leader), timeout)?;
    let until = deadline.saturating_duration_since(Instant::now());
    cluster
        .wait_workers(3, until.min(Duration::from_secs(30)))
        .await
        .map_err(|e| anyhow::anyhow!("timed out (--timeout-secs): {e}"))?;
    let startup_s = began.elapsed().as_secs_f64();
    progress(
        args,
        format!("cluster up in {startup_s:.1} s, leader {leader}"),
    );

    let hash = client
        .upload_module(futures::stream::iter(vec![UploadModuleRequest {
            name: "misbehave".into(),
            tag: String::new(),
            data: module.to_vec(),
        }]))
        .await
        .context("upload of the module failed")?
        .into_inner()
        .module
        .context("the upload returned no module record")?
        .hash;

    // Warm-up: every node compiles the module once (owner and workers).
    let t = Instant::now();
    let warm = submit(&mut client, &hash, noop_input(3 * args.slots), args.slots).await?;
    wait_all(&mut client, &[warm], deadline, "the warm-up task").await?;
    let warmup_s = t.elapsed().as_secs_f64();
    progress(args, format!("warm-up task done in {warmup_s:.2} s"));

    // The throughput part waits through a follower, off the owner's node.
    let follower = cluster
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .context("the cluster has no follower")?;
    let mut watcher = connect_stoker(cluster.addr(follower), timeout)?;
    let throughput = throughput(
        &mut client,
        &mut watcher,
        &cluster,
        leader,
        &hash,
        args,
        deadline,
    )
    .await?;
    progress(
        args,
        format!(
            "throughput: {} subtasks in {:.2} s",
            throughput.subtasks, throughput.wall_s
        ),
    );
    let latency = latency(&mut client, &hash, args, deadline).await?;
    // Every process stops before the directory is removed.
    drop(cluster);
    Ok(Report {
        leader,
        startup_s,
        warmup_s,
        total_s: began.elapsed().as_secs_f64(),
        throughput,
        latency,
    })
}

fn progress(args: &Args, line: String) {
    if args.output == Output::Text {
        eprintln!("  .. {line}");
    }
}

async fn submit(
    client: &mut StokerClient<Channel>,
    hash: &str,
    input: Vec<u8>,
    concurrency: u32,
) -> anyhow::Result<u64> {
    Ok(client
        .submit_task(SubmitTaskRequest {
            module: hash.into(),
            input,
            concurrency,
            ..Default::default()
        })
        .await
        .context("SubmitTask failed")?
        .into_inner()
        .id)
}

async fn get(
    client: &mut StokerClient<Channel>,
    id: u64,
    with_subtasks: bool,
) -> anyhow::Result<GetTaskResponse> {
    Ok(client
        .get_task(GetTaskRequest { id, with_subtasks })
        .await
        .with_context(|| format!("GetTask {id} failed"))?
        .into_inner())
}

/// Waits until every task has succeeded (an error names a failed one);
/// their last records.
async fn wait_all(
    client: &mut StokerClient<Channel>,
    ids: &[u64],
    deadline: Instant,
    what: &str,
) -> anyhow::Result<Vec<TaskRecord>> {
    let mut done: Vec<Option<TaskRecord>> = vec![None; ids.len()];
    loop {
        for (i, id) in ids.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let task = get(client, *id, false)
                .await?
                .task
                .with_context(|| format!("task {id} has no record"))?;
            if finished(&task.state) {
                anyhow::ensure!(
                    task.state == "succeed",
                    "task {id} ended {}: {}",
                    task.state,
                    task.error
                );
                done[i] = Some(task);
            }
        }
        if done.iter().all(Option::is_some) {
            return Ok(done.into_iter().flatten().collect());
        }
        check(deadline, || {
            let left = done.iter().filter(|d| d.is_none()).count();
            format!("{what}: {left} of {} tasks still unfinished", ids.len())
        })?;
        // Figures come from the records' times, not from this poll: poll
        // rarely, so the bench adds little load to the cluster it measures.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader's commit index (0 when it cannot be read).
async fn commit_index(addr: &str) -> u64 {
    let Ok(mut meta) = connect_lazy(addr, Duration::from_secs(5)) else {
        return 0;
    };
    meta.status(StatusRequest {})
        .await
        .map_or(0, |s| s.into_inner().commit_index)
}

async fn throughput(
    client: &mut StokerClient<Channel>,
    watcher: &mut StokerClient<Channel>,
    cluster: &LocalCluster,
    leader: u64,
    hash: &str,
    args: &Args,
    deadline: Instant,
) -> anyhow::Result<Throughput> {
    let input = noop_input(args.subtasks);
    let index_before = commit_index(cluster.addr(leader)).await;
    let cpu_before = cluster.cpu_seconds();
    let first_submit = wall_ms();
    let started = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..args.tasks {
        ids.push(submit(client, hash, input.clone(), args.slots).await?);
    }
    let tasks = wait_all(watcher, &ids, deadline, "throughput").await?;
    let observed_s = started.elapsed().as_secs_f64();
    let cpu_after = cluster.cpu_seconds();
    let index_after = commit_index(cluster.addr(leader)).await;
    let last_finish = tasks.iter().map(|t| t.finish_time_ms).max().unwrap_or(0);
    let last_created = tasks.iter().map(|t| t.create_time_ms).max().unwrap_or(0);
    let subtasks = u64::from(args.subtasks) * u64::from(args.tasks);
    let wall_s = (delta(last_finish, first_submit) / 1e3).max(1e-3);

    let mut starts = Vec::new();
    let mut ends = Vec::new();
    let mut runs = Vec::new();
    let mut per_node = std::collections::BTreeMap::<u64, u64>::new();
    for id in &ids {
        let r = get(client, *id, true).await?;
        for s in &r.subtasks {
            starts.push(s.start_time_ms);
            ends.push(s.end_time_ms);
            runs.push(s.end_time_ms.saturating_sub(s.start_time_ms) as f64);
            *per_node.entry(s.node).or_default() += 1;
        }
    }
    let first_start = starts.iter().copied().min().unwrap_or(0);
    let last_end = ends.iter().copied().max().unwrap_or(0);
    let (run_p50_ms, run_p99_ms) = p50_p99(&runs);
    Ok(Throughput {
        subtasks,
        tasks: args.tasks,
        wall_s,
        observed_s,
        rate: subtasks as f64 / wall_s,
        steady_rate: steady_rate(&ends),
        entries_per_subtask: index_after.saturating_sub(index_before) as f64 / subtasks as f64,
        submit_to_created_ms: delta(last_created, first_submit),
        created_to_first_start_ms: first_start as f64 - last_created.min(first_start) as f64,
        run_span_ms: last_end.saturating_sub(first_start) as f64,
        last_end_to_finish_ms: last_finish.saturating_sub(last_end) as f64,
        run_p50_ms,
        run_p99_ms,
        per_node: per_node.into_iter().collect(),
        cpu_us_per_subtask: cpu_before
            .zip(cpu_after)
            .map(|(b, a)| (a - b) / subtasks as f64 * 1e6),
    })
}

async fn latency(
    client: &mut StokerClient<Channel>,
    hash: &str,
    args: &Args,
    deadline: Instant,
) -> anyhow::Result<Latency> {
    let poll = Duration::from_millis(args.poll_ms);
    let mut l = Latency {
        count: args.latency_tasks,
        to_start: Vec::new(),
        to_seen_running: Vec::new(),
        to_succeed: Vec::new(),
        to_finish_record: Vec::new(),
        submit_to_created: Vec::new(),
        created_to_start: Vec::new(),
        start_to_end: Vec::new(),
        end_to_finish: Vec::new(),
        polls: 0.0,
    };
    let mut polls = 0u64;
    for k in 0..args.latency_tasks {
        let submitted = wall_ms();
        let t0 = Instant::now();
        let id = submit(client, hash, noop_input(1), 1).await?;
        let mut seen_running = None;
        let last = loop {
            let r = get(client, id, true).await?;
            polls += 1;
            let task = r.task.clone().context("task without a record")?;
            if seen_running.is_none()
                && r.subtasks
                    .iter()
                    .any(|s| s.state == "running" || s.state == "succeed")
            {
                seen_running = Some(t0.elapsed());
            }
            if finished(&task.state) {
                anyhow::ensure!(
                    task.state == "succeed",
                    "latency task {id} ended {}: {}",
                    task.state,
                    task.error
                );
                l.to_succeed.push(t0.elapsed().as_secs_f64() * 1e3);
                break r;
            }
            check(deadline, || {
                format!("latency task {k} of {} (id {id}) unfinished", l.count)
            })?;
            tokio::time::sleep(poll).await;
        };
        let task = last.task.context("task without a record")?;
        let s = last
            .subtasks
            .first()
            .with_context(|| format!("latency task {id} has no subtask"))?;
        l.to_seen_running
            .push(seen_running.unwrap_or_else(|| t0.elapsed()).as_secs_f64() * 1e3);
        l.to_start.push(delta(s.start_time_ms, submitted));
        l.to_finish_record
            .push(delta(task.finish_time_ms, submitted));
        l.submit_to_created
            .push(delta(task.create_time_ms, submitted));
        l.created_to_start
            .push(s.start_time_ms as f64 - task.create_time_ms as f64);
        l.start_to_end
            .push(s.end_time_ms as f64 - s.start_time_ms as f64);
        l.end_to_finish
            .push(task.finish_time_ms as f64 - s.end_time_ms as f64);
    }
    l.polls = polls as f64 / f64::from(args.latency_tasks.max(1));
    Ok(l)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

impl Report {
    fn print(&self, args: &Args) {
        let t = &self.throughput;
        let l = &self.latency;
        println!(
            "cluster bench: 3 stoker server processes on 127.0.0.1 (each scheduler + worker, {} slots), leader {}{}",
            args.slots,
            self.leader,
            args.config
                .as_ref()
                .map(|c| format!(", config {}", c.display()))
                .unwrap_or_default()
        );
        println!(
            "startup {:.1} s, warm-up task {:.2} s, whole run {:.1} s",
            self.startup_s, self.warmup_s, self.total_s
        );
        println!(
            "throughput: {} tasks x {} no-op subtasks (concurrency {}), first submit to last succeed {:.2} s (client saw {:.2} s)",
            t.tasks, args.subtasks, args.slots, t.wall_s, t.observed_s
        );
        println!(
            "  {:.0} subtasks/s end to end (aim >= {AIM_RATE:.0}: {}); steady state (10%..90% of commits) {}",
            t.rate,
            verdict(t.rate >= AIM_RATE),
            t.steady_rate
                .map_or_else(|| "-".to_string(), |r| format!("{r:.0}/s")),
        );
        println!(
            "  phases: submit->last task created {:.0} ms, ->first subtask start {:.0} ms, first start->last end {:.0} ms, last end->last task finished {:.0} ms",
            t.submit_to_created_ms, t.created_to_first_start_ms, t.run_span_ms, t.last_end_to_finish_ms
        );
        println!(
            "  subtask run (start->end, recorded start to end time) p50 {:.0} ms p99 {:.0} ms; raft log entries per subtask {:.2}; server CPU per subtask {}",
            t.run_p50_ms,
            t.run_p99_ms,
            t.entries_per_subtask,
            t.cpu_us_per_subtask
                .map_or_else(|| "-".to_string(), |us| format!("{us:.0} us")),
        );
        let nodes: Vec<String> = t
            .per_node
            .iter()
            .map(|(n, c)| format!("node {n}: {c}"))
            .collect();
        println!("  subtasks per node: {}", nodes.join(", "));
        let (s50, s99) = p50_p99(&l.to_start);
        let (r50, r99) = p50_p99(&l.to_seen_running);
        let (d50, d99) = p50_p99(&l.to_succeed);
        let (f50, f99) = p50_p99(&l.to_finish_record);
        println!(
            "latency: {} one-subtask tasks in sequence, polled every {} ms ({:.0} polls per task)",
            l.count, args.poll_ms, l.polls
        );
        println!(
            "  submit -> subtask start (record)  p50 {s50:>7.1} ms  p99 {s99:>7.1} ms  (aim p50 <= {AIM_P50_MS:.0} ms: {})",
            verdict(s50 <= AIM_P50_MS)
        );
        println!("  submit -> seen running (poll)     p50 {r50:>7.1} ms  p99 {r99:>7.1} ms");
        println!("  submit -> seen succeed (poll)     p50 {d50:>7.1} ms  p99 {d99:>7.1} ms");
        println!("  submit -> finished (record)       p50 {f50:>7.1} ms  p99 {f99:>7.1} ms");
        let p = |v: &[f64]| p50_p99(v).0;
        println!(
            "  p50 phases: submit->created {:.1} ms, created->start {:.1} ms, start->end {:.1} ms, end->finished {:.1} ms",
            p(&l.submit_to_created),
            p(&l.created_to_start),
            p(&l.start_to_end),
            p(&l.end_to_finish)
        );
    }

    fn json(&self, args: &Args) -> serde_json::Value {
        let t = &self.throughput;
        let l = &self.latency;
        let pair = |v: &[f64]| {
            let (p50, p99) = p50_p99(v);
            serde_json::json!({"p50": p50, "p99": p99})
        };
        serde_json::json!({
            "nodes": 3,
            "slots": args.slots,
            "config": args.config.as_ref().map(|c| c.display().to_string()),
            "leader": self.leader,
            "startup_s": self.startup_s,
            "warmup_s": self.warmup_s,
            "total_s": self.total_s,
            "throughput": {
                "tasks": t.tasks,
                "subtasks_per_task": args.subtasks,
                "subtasks": t.subtasks,
                "wall_s": t.wall_s,
                "observed_s": t.observed_s,
                "subtasks_per_s": t.rate,
                "steady_subtasks_per_s": t.steady_rate,
                "aim_subtasks_per_s": AIM_RATE,
                "aim_met": t.rate >= AIM_RATE,
                "raft_entries_per_subtask": t.entries_per_subtask,
                "server_cpu_us_per_subtask": t.cpu_us_per_subtask,
                "phases_ms": {
                    "submit_to_last_created": t.submit_to_created_ms,
                    "created_to_first_start": t.created_to_first_start_ms,
                    "first_start_to_last_end": t.run_span_ms,
                    "last_end_to_last_finished": t.last_end_to_finish_ms,
                },
                "subtask_run_ms": {"p50": t.run_p50_ms, "p99": t.run_p99_ms},
                "subtasks_per_node": t.per_node.iter()
                    .map(|(n, c)| (n.to_string(), serde_json::json!(c)))
                    .collect::<serde_json::Map<_, _>>(),
            },
            "latency": {
                "tasks": l.count,
                "poll_ms": args.poll_ms,
                "polls_per_task": l.polls,
                "submit_to_start_ms": pair(&l.to_start),
                "submit_to_seen_running_ms": pair(&l.to_seen_running),
                "submit_to_succeed_ms": pair(&l.to_succeed),
                "submit_to_finished_record_ms": pair(&l.to_finish_record),
                "aim_p50_ms": AIM_P50_MS,
                "aim_met": p50_p99(&l.to_start).0 <= AIM_P50_MS,
                "phases_ms": {
                    "submit_to_created": pair(&l.submit_to_created),
                    "created_to_start": pair(&l.created_to_start),
                    "start_to_end": pair(&l.start_to_end),
                    "end_to_finished": pair(&l.end_to_finish),
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&v, 2.0), 100.0);
        assert_eq!(p50_p99(&[3.0, 1.0, 2.0]), (2.0, 3.0));
    }

    #[test]
    fn steady_rate_counts_the_middle_of_the_commits() {
        assert_eq!(steady_rate(&[1, 2, 3]), None);
        assert_eq!(steady_rate(&[5; 20]), None);
        // One commit per ms: 1000 per second.
        let ends: Vec<u64> = (0..1000).rev().collect();
        let r = steady_rate(&ends).unwrap();
        assert!((r - 1000.0).abs() < 1.0, "{r}");
    }

    #[test]
    fn noop_input_is_one_ok_line_per_subtask() {
        assert_eq!(noop_input(3), b"ok\nok\nok\n");
        assert!(noop_input(0).is_empty());
    }
}
