//! The task executor manager of a worker node.
//!
//! A worker talks to the scheduler nodes only by RPC (`endpoints`):
//!
//! - a **heartbeat loop** sends the node's full description every interval;
//!   the cluster (re)registers the node when it is unknown or changed;
//! - an **assignment loop** long-polls the subtasks assigned to this node and
//!   reconciles them with what runs locally ([`decide`], a pure function):
//!   it starts executors for pending assignments while slots are free, aborts
//!   local runs that are no longer assigned to this node at their attempt
//!   (requeued, cancelled, preempted, moved), and pauses the runs of tasks
//!   that are `pausing`;
//! - the heartbeat replies carry the steps of the owner's operators that
//!   concern the node ([`steps`](super::steps)): a subtask that moved away
//!   is dropped at once, one that moved here is fetched and claimed, and
//!   the next heartbeats report both back;
//! - an **executor** per subtask fetches and loads the module (once per
//!   hash), claims the subtask (`ClaimSubtask`, fenced by node and attempt),
//!   runs it in the sandbox, and reports the result (`ReportSubtask`).
//!   Claims and reports are retried under one request id on transport
//!   errors, so a retry is never applied twice; a rejection means the view
//!   was stale, and the work is dropped.
//!
//! Assignments may come from any scheduler node's applied state, slightly
//! stale; responses older (by applied index) than one already seen are
//! ignored, and the fencing of claims and reports makes the rest safe.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::api::{Assignment, AssignmentsRequest, GetModuleRequest, HeartbeatRequest};
use stoker_proto::guest::RunRequest;
use stoker_proto::meta::command::Kind;
use stoker_proto::meta::meta_client::MetaClient;
use stoker_proto::meta::{
    ClaimSubtask, Command, CommandResult, NodeLoad, ProposeRequest, RegisterNode, ReportSubtask,
    SubtaskRecord, SubtaskRef,
};
use tokio::sync::{watch, Notify, OnceCell};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Code;
use tracing::{debug, info, warn, Instrument};

use super::stats::WorkerStats;
use super::steps::{self, MoveStep};
use crate::api::auth::{AuthChannel, Bearer, Secret};
use crate::api::batch::ProposeBatcher;
use crate::blob::BlobStore;
use crate::meta::records::MAX_INLINE_BYTES;
use crate::meta::{now_ms, RequestId};
use crate::model::{Rank, SubtaskState, TaskState};
use crate::resource::{FuelGate, ResourceControl, TaskInfo};
use crate::sandbox::{module_hash, CallEnv, CallLimits, Sandbox, SandboxError, TaskModule};

/// The blob key (relative to the tenant) of one run's log: the guest's
/// stdout, stderr and `log` lines, bounded by the sandbox.
pub fn subtask_log_key(task: u64, step: u32, ordinal: u32, attempt: u32) -> String {
    format!("{}/{step}-{ordinal}-{attempt}", task_logs_prefix(task))
}

/// The blob prefix (relative to the tenant) of every log of a task's
/// subtasks, deleted with the task when its history is collected.
pub fn task_logs_prefix(task: u64) -> String {
    format!("logs/{task}")
}

/// Configuration of a node's worker (the `[worker]` table of the server
/// config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Run subtasks on this node. Default true.
    pub enabled: bool,
    /// Subtasks that run at once. Default: the number of CPUs.
    pub slots: u32,
    /// Labels task selectors and placement rules match. Default none.
    pub labels: BTreeMap<String, String>,
    /// The node's service scope. Default empty.
    pub scope: String,
    /// Memory the node offers, in bytes (0: unknown). Default: the
    /// machine's physical memory when it can be read.
    pub memory_bytes: u64,
    /// Heartbeat period, in milliseconds (the cluster's answer overrides
    /// it). Default 1000.
    pub heartbeat_interval_ms: u64,
    /// Longest wait of one assignment long poll, in milliseconds (at most
    /// 30,000). Default 5000.
    pub assignment_wait_ms: u32,
    /// Scheduler gRPC addresses (`host:port`) to talk to, tried in turn;
    /// empty: this process's own address. Default empty.
    pub endpoints: Vec<String>,
    /// Fuel of a subtask whose task sets none. Default: 10 billion.
    pub fuel_limit: u64,
    /// Linear memory of a subtask whose task sets none, in bytes.
    /// Default: 256 MiB.
    pub memory_limit: u64,
    /// Wall-clock time one subtask run may take (not counting time the fuel
    /// governor holds it), in milliseconds. Default 60,000.
    pub deadline_ms: u64,
    /// The cluster token the worker's calls carry: the server config's
    /// `admin_token`, copied here when the node starts (not read from the
    /// `[worker]` table).
    #[serde(skip)]
    pub token: Option<Secret>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let limits = CallLimits::default();
        WorkerConfig {
            enabled: true,
            slots: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            labels: BTreeMap::new(),
            scope: String::new(),
            memory_bytes: physical_memory().unwrap_or(0),
            heartbeat_interval_ms: 1000,
            assignment_wait_ms: 5000,
            endpoints: Vec::new(),
            fuel_limit: limits.fuel,
            memory_limit: limits.memory_bytes,
            deadline_ms: limits.deadline.as_millis() as u64,
            token: None,
        }
    }
}

/// Longest name the metadata accepts (labels, scope, addresses).
const MAX_NAME: usize = 256;

impl WorkerConfig {
    /// # Errors
    /// A message naming the first setting that is out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.slots == 0 || self.slots > 4096 {
            return Err("worker.slots must be between 1 and 4096".into());
        }
        if self.scope.len() > MAX_NAME {
            return Err(format!("worker.scope must be at most {MAX_NAME} bytes"));
        }
        if let Some((k, _)) = self
            .labels
            .iter()
            .find(|(k, v)| k.is_empty() || k.len() > MAX_NAME || v.len() > MAX_NAME)
        {
            return Err(format!(
                "worker label {k:?}: keys must be 1..={MAX_NAME} bytes and values at most {MAX_NAME}"
            ));
        }
        if !(10..=60_000).contains(&self.heartbeat_interval_ms) {
            return Err("worker.heartbeat_interval_ms must be between 10 and 60000".into());
        }
        if !(1..=30_000).contains(&self.assignment_wait_ms) {
            return Err("worker.assignment_wait_ms must be between 1 and 30000".into());
        }
        for e in &self.endpoints {
            if e.is_empty() || e.contains("://") || e.len() > MAX_NAME {
                return Err(format!("worker endpoint {e:?} must be host:port"));
            }
        }
        if self.fuel_limit == 0 {
            return Err("worker.fuel_limit must be at least 1".into());
        }
        if self.memory_limit < 64 * 1024 {
            return Err("worker.memory_limit must be at least 64 KiB".into());
        }
        if self.deadline_ms == 0 {
            return Err("worker.deadline_ms must be at least 1".into());
        }
        Ok(())
    }

    fn wait(&self) -> Duration {
        Duration::from_millis(u64::from(self.assignment_wait_ms))
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

// ---------------------------------------------------------------------------
// The decision: what to start and stop (pure).
// ---------------------------------------------------------------------------

/// A subtask: (task id, step, ordinal).
pub type SubtaskKey = (u64, u32, u32);

/// The key of an assigned subtask.
pub fn key_of(s: &SubtaskRecord) -> SubtaskKey {
    (s.task_id, s.step, s.ordinal)
}

/// What the decision needs of a subtask running locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRun {
    pub attempt: u32,
    /// Already told to stop and report `paused`.
    pub pausing: bool,
}

/// One executor to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// Index into the assignments.
    pub index: usize,
    /// The subtask already runs on this node at this attempt in the
    /// cluster's view, but not in this process (it restarted): run it (or
    /// give it up) without claiming it again.
    pub adopt: bool,
}

/// What to change locally given the latest assignments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Executors to start: adopted runs first, then pending subtasks in rank
    /// order, no more than the free slots.
    pub start: Vec<Start>,
    /// Local runs to abort without reporting: not assigned to this node at
    /// their attempt any more.
    pub stop: Vec<SubtaskKey>,
    /// Local runs of `pausing` tasks: abort and report `paused`.
    pub pause: Vec<SubtaskKey>,
}

fn task_state_is(a: &Assignment, states: &[TaskState]) -> bool {
    a.task_state
        .parse::<TaskState>()
        .is_ok_and(|s| states.contains(&s))
}

/// Reconciles the node's assignments with what runs locally. `skip` lists
/// (subtask, attempt) pairs not to start: runs this process already
/// finished (their end may not show in the assignments yet) and claims
/// refused a moment ago.
pub fn decide(
    assignments: &[Assignment],
    local: &BTreeMap<SubtaskKey, LocalRun>,
    skip: &HashSet<(SubtaskKey, u32)>,
    slots: usize,
) -> Decision {
    let mut d = Decision::default();
    let assigned: HashMap<SubtaskKey, &Assignment> = assignments
        .iter()
        .filter_map(|a| a.subtask.as_ref().map(|s| (key_of(s), a)))
        .collect();
    for (key, run) in local {
        let current = assigned
            .get(key)
            .filter(|a| a.subtask.as_ref().is_some_and(|s| s.attempt == run.attempt));
        match current {
            // Pending at the same attempt is our claim not yet visible in
            // this (possibly stale) view: every way back to pending
            // unassigns the subtask or bumps the attempt.
            None => d.stop.push(*key),
            Some(a) if !run.pausing && task_state_is(a, &[TaskState::Pausing]) => {
                d.pause.push(*key)
            }
            Some(_) => {}
        }
    }
    let mut free = slots.saturating_sub(local.len() - d.stop.len());
    let mut adopt = Vec::new();
    let mut claim = Vec::new();
    for (index, a) in assignments.iter().enumerate() {
        let Some(s) = &a.subtask else { continue };
        let key = key_of(s);
        if local.contains_key(&key) && !d.stop.contains(&key) {
            continue;
        }
        if skip.contains(&(key, s.attempt)) {
            continue;
        }
        match s.state.parse::<SubtaskState>() {
            Ok(SubtaskState::Running) => adopt.push(index),
            Ok(SubtaskState::Pending) if a.accepts_work => claim.push(index),
            _ => {}
        }
    }
    let rank = |&i: &usize| {
        let a = &assignments[i];
        let s = a.subtask.as_ref().expect("filtered above");
        (
            a.priority,
            a.task_create_time_ms,
            s.task_id,
            s.step,
            s.ordinal,
        )
    };
    adopt.sort_by_key(rank);
    claim.sort_by_key(rank);
    for (index, adopt) in adopt
        .into_iter()
        .map(|i| (i, true))
        .chain(claim.into_iter().map(|i| (i, false)))
    {
        if free == 0 {
            break;
        }
        free -= 1;
        d.start.push(Start { index, adopt });
    }
    d
}

// ---------------------------------------------------------------------------
// Endpoints: the scheduler nodes this worker talks to, in turn.
// ---------------------------------------------------------------------------

struct Endpoints {
    addrs: Vec<String>,
    current: AtomicUsize,
    channels: Mutex<HashMap<usize, Channel>>,
    /// Proposals to each endpoint, batched across this worker's executors.
    batchers: Mutex<HashMap<usize, Arc<ProposeBatcher>>>,
    timeout: Duration,
    /// The cluster token every call carries.
    bearer: Bearer,
}

impl Endpoints {
    fn new(addrs: Vec<String>, timeout: Duration, bearer: Bearer) -> Self {
        Endpoints {
            addrs,
            current: AtomicUsize::new(0),
            channels: Mutex::new(HashMap::new()),
            batchers: Mutex::new(HashMap::new()),
            timeout,
            bearer,
        }
    }

    /// The current endpoint's index and channel.
    fn get(&self) -> Result<(usize, Channel), String> {
        let i = self.current.load(Ordering::Relaxed) % self.addrs.len();
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(&i) {
            return Ok((i, c.clone()));
        }
        match crate::api::meta::channel(&self.addrs[i], self.timeout) {
            Ok(c) => {
                channels.insert(i, c.clone());
                Ok((i, c))
            }
            Err(e) => {
                drop(channels);
                self.failed(i);
                Err(e.to_string())
            }
        }
    }

    /// Moves on from endpoint `i` (unless someone already did).
    fn failed(&self, i: usize) {
        let next = (i + 1) % self.addrs.len();
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn addr(&self, i: usize) -> &str {
        &self.addrs[i]
    }

    fn stoker(&self) -> Result<(usize, StokerClient<AuthChannel>), String> {
        let (i, c) = self.get()?;
        Ok((
            i,
            StokerClient::with_interceptor(c, self.bearer.clone())
                .max_decoding_message_size(crate::api::meta::MAX_API_MESSAGE)
                .max_encoding_message_size(crate::api::meta::MAX_API_MESSAGE),
        ))
    }

    fn meta(&self) -> Result<(usize, MetaClient<AuthChannel>), String> {
        let (i, c) = self.get()?;
        Ok((
            i,
            MetaClient::with_interceptor(c, self.bearer.clone())
                .max_decoding_message_size(crate::api::meta::MAX_API_MESSAGE)
                .max_encoding_message_size(crate::api::meta::MAX_API_MESSAGE),
        ))
    }

    /// The current endpoint's index and proposal batcher.
    fn batcher(&self) -> Result<(usize, Arc<ProposeBatcher>), String> {
        let i = self.current.load(Ordering::Relaxed) % self.addrs.len();
        if let Some(b) = self.batchers.lock().expect("batchers lock").get(&i) {
            return Ok((i, b.clone()));
        }
        let (i, client) = self.meta()?;
        let mut batchers = self.batchers.lock().expect("batchers lock");
        let b = batchers
            .entry(i)
            .or_insert_with(|| Arc::new(ProposeBatcher::new(client, false)));
        Ok((i, b.clone()))
    }
}

/// Status codes that say the request itself is wrong: retrying it
/// elsewhere would fail the same way.
fn permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::OutOfRange
    )
}

/// Back-off between retries of one request: 50 ms doubling up to 2 s.
fn next_backoff(b: Duration) -> Duration {
    (b * 2).min(Duration::from_secs(2))
}

/// Each claim, report or module fetch gives up on one endpoint after this.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The worker.
// ---------------------------------------------------------------------------

/// One local run: an executor task.
struct Entry {
    attempt: u32,
    /// Tells runs apart that reuse a key (a later attempt).
    run: u64,
    abort: AbortHandle,
    pause: watch::Sender<bool>,
    pausing: bool,
}

#[derive(Default)]
struct State {
    latest: Vec<Assignment>,
    latest_index: u64,
    running: BTreeMap<SubtaskKey, Entry>,
    /// Runs this process ended (reported, dropped or stopped), until the
    /// assignments no longer list them.
    finished: HashSet<(SubtaskKey, u32)>,
    /// Refused claims, not retried before the instant.
    blocked: HashMap<(SubtaskKey, u32), Instant>,
    next_run: u64,
    stopped: bool,
    /// The operator steps of the latest heartbeat reply.
    steps: Vec<MoveStep>,
    /// Operators whose move away from this node it carried out.
    released: BTreeSet<u64>,
    /// The latest (subtask, attempt) this process claimed or adopted,
    /// oldest first: what `taken` reports are made of.
    taken: VecDeque<(SubtaskKey, u32)>,
    /// (operator, outcome) of the reports the last heartbeat carried.
    reported: BTreeSet<(u64, i32)>,
}

/// Claims remembered for `taken` reports.
const TAKEN: usize = 1024;

impl State {
    fn was_taken(&self, key: SubtaskKey, attempt: u32) -> bool {
        self.taken.contains(&(key, attempt))
    }
}

struct Shared {
    id: u64,
    addr: String,
    is_scheduler: bool,
    cfg: WorkerConfig,
    sandbox: Arc<Sandbox>,
    blobs: BlobStore,
    resource: Option<Arc<ResourceControl>>,
    stats: WorkerStats,
    endpoints: Endpoints,
    modules: Mutex<HashMap<String, Arc<OnceCell<Arc<TaskModule>>>>>,
    state: Mutex<State>,
    /// Wakes the assignment loop to poll again at once.
    repoll: Notify,
    /// Wakes the heartbeat loop to beat (and report) at once.
    beat_now: Notify,
}

/// How long a refused claim is not retried.
const CLAIM_BLOCK: Duration = Duration::from_millis(500);

/// A running worker. Dropping it leaves its tasks running; call
/// [`WorkerHandle::shutdown`].
pub struct WorkerHandle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
}

/// A read-only view of a running worker: its load and latency histograms.
#[derive(Clone)]
pub struct WorkerView(Arc<Shared>);

impl WorkerView {
    /// The node's resource manager state and the subtasks it runs.
    pub fn load(&self) -> NodeLoad {
        self.0.load()
    }

    /// Run latency histograms.
    pub fn stats(&self) -> &WorkerStats {
        &self.0.stats
    }

    /// The resource control, when the worker governs fuel.
    pub fn resource(&self) -> Option<&Arc<ResourceControl>> {
        self.0.resource.as_ref()
    }
}

/// Marker type of the worker subsystem; see [`start`].
pub struct Worker;

impl WorkerHandle {
    /// The subtasks running in this process and their attempts.
    pub fn running(&self) -> Vec<(SubtaskKey, u32)> {
        let st = self.shared.state.lock().expect("state lock");
        st.running.iter().map(|(k, e)| (*k, e.attempt)).collect()
    }

    /// What metrics and the dashboard read of this worker while it runs.
    pub fn view(&self) -> WorkerView {
        WorkerView(self.shared.clone())
    }

    /// Stops the loops and aborts every local run (without reporting: the
    /// cluster takes the node's subtasks back when it stops heartbeating).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        {
            let mut st = self.shared.state.lock().expect("state lock");
            st.stopped = true;
            for (_, e) in std::mem::take(&mut st.running) {
                e.abort.abort();
            }
        }
        for l in self.loops {
            let _ = l.await;
        }
        info!(node_id = self.shared.id, "worker stopped");
    }
}

/// Starts the worker of node `id`, reachable at `advertise_addr`, with its
/// heartbeat and assignment loops on the current tokio runtime. A disabled
/// config starts nothing.
pub fn start(
    id: u64,
    advertise_addr: String,
    is_scheduler: bool,
    cfg: WorkerConfig,
    sandbox: Arc<Sandbox>,
    blobs: BlobStore,
    resource: Option<Arc<ResourceControl>>,
) -> WorkerHandle {
    let addrs = if cfg.endpoints.is_empty() {
        vec![advertise_addr.clone()]
    } else {
        cfg.endpoints.clone()
    };
    // A long poll must fit in one call.
    let timeout = cfg.wait() + Duration::from_secs(10);
    // Validated with the server config.
    let bearer = Bearer::new(cfg.token.as_ref().map(Secret::expose)).unwrap_or_default();
    let enabled = cfg.enabled;
    let shared = Arc::new(Shared {
        id,
        addr: advertise_addr,
        is_scheduler,
        cfg,
        sandbox,
        blobs,
        resource,
        stats: WorkerStats::default(),
        endpoints: Endpoints::new(addrs, timeout, bearer),
        modules: Mutex::new(HashMap::new()),
        state: Mutex::new(State::default()),
        repoll: Notify::new(),
        beat_now: Notify::new(),
    });
    let (stop, stop_rx) = watch::channel(false);
    let mut loops = Vec::new();
    if enabled {
        info!(
            node_id = id,
            slots = shared.cfg.slots,
            endpoints = ?shared.endpoints.addrs,
            "worker started"
        );
        loops.push(tokio::spawn(heartbeat_loop(
            shared.clone(),
            stop_rx.clone(),
        )));
        loops.push(tokio::spawn(assignment_loop(shared.clone(), stop_rx)));
    }
    WorkerHandle {
        shared,
        stop,
        loops,
    }
}

impl Shared {
    /// The resource manager's state (or the governor's, without one) and
    /// the subtasks running here.
    fn load(&self) -> NodeLoad {
        let running = self.state.lock().expect("state lock").running.len() as u32;
        let mut load = match &self.resource {
            Some(r) => r.load(),
            None => NodeLoad {
                command: "hold".into(),
                allowed: self.cfg.slots,
                slots: self.cfg.slots,
                ..NodeLoad::default()
            },
        };
        load.running = running;
        load.slots = self.cfg.slots;
        load
    }

    fn description(&self) -> RegisterNode {
        RegisterNode {
            id: self.id,
            addr: self.addr.clone(),
            labels: self
                .cfg
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            scope: self.cfg.scope.clone(),
            slots: self.cfg.slots,
            memory_bytes: self.cfg.memory_bytes,
            scheduler: self.is_scheduler,
            worker: true,
            time_ms: now_ms(),
        }
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut interval = Duration::from_millis(shared.cfg.heartbeat_interval_ms);
    // Node CPU over one heartbeat period, for nodes without a resource
    // manager (which reports its own reading): the owner's hot-node
    // scheduler compares nodes by it.
    let mut cpu = crate::resource::cpu::CpuSampler::default();
    loop {
        let sampled = cpu.sample();
        let beat = async {
            let (i, mut client) = shared.endpoints.stoker()?;
            let mut load = shared.load();
            load.cpu = load.cpu.or(sampled);
            let req = HeartbeatRequest {
                node: Some(shared.description()),
                load: Some(load),
                operator_reports: shared.step_reports(),
                forwarded: false,
            };
            match client.heartbeat(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if let Some(control) = &shared.resource {
                        control.apply_cluster(&r.resource_config).await;
                    }
                    on_steps(&shared, &r.operator_steps);
                    Ok(r.interval_ms)
                }
                Err(s) => {
                    shared.endpoints.failed(i);
                    Err(format!("{}: {}", shared.endpoints.addr(i), s.message()))
                }
            }
        };
        let wait = match beat.await {
            Ok(ms) => {
                if ms > 0 {
                    interval = Duration::from_millis(ms);
                }
                interval
            }
            Err(e) => {
                warn!(node_id = shared.id, error = %e, "heartbeat failed");
                interval.min(Duration::from_millis(500))
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(wait) => {}
            () = shared.beat_now.notified() => {}
        }
    }
}

impl Shared {
    /// What this node reports about the steps it holds.
    fn step_reports(&self) -> Vec<stoker_proto::meta::OperatorReport> {
        let mut guard = self.state.lock().expect("state lock");
        let st = &mut *guard;
        let reports = steps::reports(self.id, &st.steps, &st.released, |key, attempt| {
            st.was_taken(key, attempt)
        });
        st.reported = reports.iter().map(|r| (r.operator, r.outcome)).collect();
        reports
    }

    /// Whether a report is ready that no heartbeat carried yet (a
    /// subtask claimed before its step arrived, a move away carried out).
    fn new_report(&self, st: &State) -> bool {
        steps::reports(self.id, &st.steps, &st.released, |key, attempt| {
            st.was_taken(key, attempt)
        })
        .iter()
        .any(|r| !st.reported.contains(&(r.operator, r.outcome)))
    }

    /// Remembers that this process holds `key` at `attempt` (claimed or
    /// adopted); beats at once when a move here waits for that report.
    fn took(&self, key: SubtaskKey, attempt: u32) {
        let mut st = self.state.lock().expect("state lock");
        if st.taken.len() >= TAKEN {
            st.taken.pop_front();
        }
        st.taken.push_back((key, attempt));
        let report = self.new_report(&st);
        drop(st);
        if report {
            self.beat_now.notify_one();
        }
    }
}

/// Acts on the operator steps of a heartbeat reply: forgets subtasks that
/// moved away (stopping runs of them that have not claimed), polls again
/// when one that moved here is not listed yet, and beats at once when that
/// makes a new report (the owner waits for it to finish the move).
fn on_steps(shared: &Arc<Shared>, sent: &[stoker_proto::meta::OperatorStep]) {
    let (actions, report) = {
        let mut guard = shared.state.lock().expect("state lock");
        let st = &mut *guard;
        st.steps = sent.iter().filter_map(MoveStep::from_proto).collect();
        let live: BTreeSet<u64> = st.steps.iter().map(|s| s.operator).collect();
        st.released.retain(|op| live.contains(op));
        let local = local_runs(st);
        let actions = steps::act(shared.id, &st.steps, &st.latest, &local);
        for &(operator, key, attempt) in &actions.drop {
            st.latest.retain(|a| {
                a.subtask
                    .as_ref()
                    .is_none_or(|s| key_of(s) != key || s.attempt > attempt)
            });
            st.finished.insert((key, attempt));
            if st.running.get(&key).is_some_and(|e| e.attempt <= attempt) {
                let e = st.running.remove(&key).expect("checked");
                e.abort.abort();
                info!(
                    node_id = shared.id,
                    operator,
                    task_id = key.0,
                    step = key.1,
                    ordinal = key.2,
                    attempt = e.attempt,
                    "subtask moved away by an operator: stopped"
                );
            }
            st.released.insert(operator);
        }
        (actions, shared.new_report(st))
    };
    if report {
        shared.beat_now.notify_one();
    }
    if actions.repoll {
        shared.repoll.notify_one();
    }
    if !actions.drop.is_empty() {
        reconcile(shared);
    }
}

async fn assignment_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut fingerprint = 0;
    let mut backoff = Duration::from_millis(50);
    // Expires refused claims even when nothing else happens.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let req = AssignmentsRequest {
            node: shared.id,
            fingerprint,
            wait_ms: shared.cfg.assignment_wait_ms,
        };
        let poll = async {
            let (i, mut client) = shared.endpoints.stoker()?;
            client.assignments(req).await.map_err(|s| {
                shared.endpoints.failed(i);
                format!("{}: {}", shared.endpoints.addr(i), s.message())
            })
        };
        tokio::pin!(poll);
        let answer = loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                answer = &mut poll => break Some(answer),
                _ = tick.tick() => reconcile(&shared),
                () = shared.repoll.notified() => break None,
            }
        };
        let Some(answer) = answer else {
            // A subtask moved here is not in the assignments yet: ask for
            // them now rather than wait for a change.
            fingerprint = 0;
            continue;
        };
        match answer {
            Ok(resp) => {
                backoff = Duration::from_millis(50);
                let resp = resp.into_inner();
                let accepted = {
                    let mut st = shared.state.lock().expect("state lock");
                    if resp.applied_index >= st.latest_index {
                        st.latest_index = resp.applied_index;
                        st.latest = resp.assignments;
                        true
                    } else {
                        false
                    }
                };
                if accepted {
                    fingerprint = resp.fingerprint;
                    reconcile(&shared);
                } else {
                    // A server behind one already heard from: its view would
                    // undo newer facts. Ask again shortly.
                    debug!(
                        node_id = shared.id,
                        applied_index = resp.applied_index,
                        "stale assignments ignored"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Err(e) => {
                warn!(node_id = shared.id, error = %e, "assignment poll failed");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = next_backoff(backoff);
            }
        }
    }
}

/// What this process is running, as [`decide`] and the step actions see it.
fn local_runs(st: &State) -> BTreeMap<SubtaskKey, LocalRun> {
    st.running
        .iter()
        .map(|(k, e)| {
            (
                *k,
                LocalRun {
                    attempt: e.attempt,
                    pausing: e.pausing,
                },
            )
        })
        .collect()
}

/// Applies [`decide`] to the latest assignments: aborts, pauses, starts.
fn reconcile(shared: &Arc<Shared>) {
    let mut guard = shared.state.lock().expect("state lock");
    let st = &mut *guard;
    if st.stopped {
        return;
    }
    let now = Instant::now();
    st.blocked.retain(|_, until| *until > now);
    let listed: HashSet<(SubtaskKey, u32)> = st
        .latest
        .iter()
        .filter_map(|a| a.subtask.as_ref().map(|s| (key_of(s), s.attempt)))
        .collect();
    st.finished.retain(|k| listed.contains(k));
    let skip: HashSet<(SubtaskKey, u32)> = st
        .finished
        .iter()
        .chain(st.blocked.keys())
        .copied()
        .collect();
    let local = local_runs(st);
    let d = decide(&st.latest, &local, &skip, shared.cfg.slots as usize);
    for key in &d.stop {
        if let Some(e) = st.running.remove(key) {
            e.abort.abort();
            info!(
                node_id = shared.id,
                task_id = key.0,
                step = key.1,
                ordinal = key.2,
                attempt = e.attempt,
                "subtask no longer assigned here: stopped"
            );
        }
    }
    for key in &d.pause {
        if let Some(e) = st.running.get_mut(key) {
            e.pausing = true;
            let _ = e.pause.send(true);
        }
    }
    let mut per_task: HashMap<u64, u32> = HashMap::new();
    for a in &st.latest {
        if let Some(s) = &a.subtask {
            *per_task.entry(s.task_id).or_default() += 1;
        }
    }
    for s in d.start {
        let a = st.latest[s.index].clone();
        let Some(sub) = &a.subtask else { continue };
        let key = key_of(sub);
        let attempt = sub.attempt;
        let concurrency = per_task.get(&key.0).copied().unwrap_or(1);
        st.next_run += 1;
        let run = st.next_run;
        // A run adopted while its task is pausing reports paused at once.
        let pausing = task_state_is(&a, &[TaskState::Pausing]);
        let (pause, pause_rx) = watch::channel(pausing);
        let span = tracing::info_span!(
            "subtask",
            node_id = shared.id,
            task_id = key.0,
            step = key.1,
            ordinal = key.2,
            attempt
        );
        let exec = Executor {
            shared: shared.clone(),
            assignment: a,
            adopt: s.adopt,
            run,
            pause: pause_rx,
            concurrency,
            claimed: std::sync::OnceLock::new(),
        };
        let handle = tokio::spawn(exec.run().instrument(span));
        st.running.insert(
            key,
            Entry {
                attempt,
                run,
                abort: handle.abort_handle(),
                pause,
                pausing,
            },
        );
    }
}

/// How a run ended, for the bookkeeping after it.
enum Ended {
    /// Reported, or dropped as stale: do not start it again.
    Done,
    /// The claim was refused: maybe try again after a moment.
    ClaimRefused,
}

/// Why a module is not available.
enum ModuleError {
    /// The cluster could not be asked; try again.
    Unreachable(String),
    /// The server asked does not know the module.
    NotFound(String),
    /// The module cannot run here (corrupt, invalid).
    Bad(SandboxError),
}

/// Fetches of a module the cluster says it does not have before its
/// subtask fails.
const MODULE_TRIES: u32 = 5;

/// One subtask on its own tokio task.
struct Executor {
    shared: Arc<Shared>,
    assignment: Assignment,
    adopt: bool,
    run: u64,
    pause: watch::Receiver<bool>,
    concurrency: u32,
    /// When this process's claim was accepted (not set for adopted runs).
    claimed: std::sync::OnceLock<Instant>,
}

/// What a report says.
#[derive(Default)]
struct Outcome {
    state: &'static str,
    output: Vec<u8>,
    output_blob: String,
    error: String,
    retryable: bool,
    fuel_used: u64,
    checkpoint: Vec<u8>,
}

impl Executor {
    fn subtask(&self) -> &SubtaskRecord {
        self.assignment
            .subtask
            .as_ref()
            .expect("assignments without a subtask are never started")
    }

    fn subtask_ref(&self) -> SubtaskRef {
        let s = self.subtask();
        SubtaskRef {
            task_id: s.task_id,
            step: s.step,
            ordinal: s.ordinal,
        }
    }

    async fn run(self) {
        let ended = self.execute().await;
        let key = key_of(self.subtask());
        let attempt = self.subtask().attempt;
        {
            let mut st = self.shared.state.lock().expect("state lock");
            if st.running.get(&key).is_some_and(|e| e.run == self.run) {
                st.running.remove(&key);
            }
            match ended {
                Ended::Done => {
                    st.finished.insert((key, attempt));
                }
                Ended::ClaimRefused => {
                    st.blocked
                        .insert((key, attempt), Instant::now() + CLAIM_BLOCK);
                }
            }
        }
        // A slot is free: start the next subtask.
        reconcile(&self.shared);
    }

    async fn execute(&self) -> Ended {
        let mut tries = 0;
        let module = loop {
            tries += 1;
            match self.shared.module(&self.assignment.module_hash).await {
                Ok(m) => break Ok(m),
                Err(ModuleError::Bad(e)) => break Err(e),
                // A server behind the one that assigned the subtask may not
                // have the module yet; give up only after asking around.
                Err(ModuleError::NotFound(e)) if tries >= MODULE_TRIES => {
                    break Err(SandboxError::invalid_module(e))
                }
                Err(ModuleError::NotFound(e) | ModuleError::Unreachable(e)) => {
                    warn!(error = %e, "cannot fetch the module; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        if !self.adopt {
            if let Err(e) = self.claim().await {
                debug!(error = %e, "claim refused: dropped");
                return Ended::ClaimRefused;
            }
            debug!("claimed");
            let _ = self.claimed.set(Instant::now());
            let s = self.subtask();
            if s.step == 0 && s.attempt == 1 {
                let delay_ms = now_ms().saturating_sub(self.assignment.task_create_time_ms);
                self.shared
                    .stats
                    .start_delay_seconds
                    .observe(delay_ms as f64 / 1000.0);
            }
        }
        // Claimed now, or already running here at this attempt (adopted).
        let s = self.subtask();
        self.shared.took(key_of(s), s.attempt);
        let checkpoint = self.subtask().checkpoint.clone();
        if *self.pause.borrow() {
            return self.paused(checkpoint).await;
        }
        if self.adopt && !self.subtask().idempotent {
            warn!("a non-idempotent subtask was running when this worker restarted: failing it");
            return self
                .report(Outcome {
                    state: SubtaskState::Failed.as_str(),
                    error:
                        "the worker restarted while the subtask ran, and its step is not idempotent"
                            .into(),
                    ..Outcome::default()
                })
                .await;
        }
        let module = match module {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "module unusable: subtask failed");
                return self
                    .report(Outcome {
                        state: SubtaskState::Failed.as_str(),
                        error: e.to_string(),
                        retryable: e.retryable,
                        checkpoint,
                        ..Outcome::default()
                    })
                    .await;
            }
        };
        info!(adopted = self.adopt, "subtask running");
        let outcome = {
            // Boxed so that a pause drops the call (and its instance and
            // governor lease) before reporting.
            let mut sandbox_run = Box::pin(self.call(&module, checkpoint.clone()));
            let mut pause = self.pause.clone();
            let paused = async move {
                if pause.wait_for(|p| *p).await.is_err() {
                    // The worker forgot this run: it is being aborted.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                outcome = &mut sandbox_run => outcome,
                () = paused => {
                    drop(sandbox_run);
                    return self.paused(checkpoint).await;
                }
            }
        };
        self.report(outcome).await
    }

    /// Runs the subtask in the sandbox; the report to make.
    async fn call(&self, module: &TaskModule, checkpoint: Vec<u8>) -> Outcome {
        let a = &self.assignment;
        let s = self.subtask();
        let cfg = &self.shared.cfg;
        let pick = |task: u64, default: u64| if task == 0 { default } else { task };
        let limits = CallLimits {
            fuel: pick(a.fuel_limit, cfg.fuel_limit),
            memory_bytes: pick(a.memory_limit, cfg.memory_limit)
                .min(self.shared.sandbox.config().max_memory_bytes),
            deadline: Duration::from_millis(cfg.deadline_ms),
            ..CallLimits::default()
        };
        let blobs = match self.shared.blobs.tenant(&a.tenant) {
            Ok(b) => b,
            Err(e) => {
                return Outcome {
                    state: SubtaskState::Failed.as_str(),
                    error: format!("blob store: {e}"),
                    checkpoint,
                    ..Outcome::default()
                }
            }
        };
        let task_id = s.task_id.to_string();
        let gate = self.shared.resource.as_ref().map(|r| {
            let g = r.governor();
            g.set_tenant_rate(&a.tenant, Some(a.tenant_fuel_per_second));
            let info = TaskInfo {
                tenant: a.tenant.clone(),
                rank: Rank {
                    priority: a.priority,
                    create_time_ms: a.task_create_time_ms,
                    id: s.task_id,
                },
                concurrency: self.concurrency,
            };
            g.lease(&task_id, &info) as Arc<dyn FuelGate>
        });
        let env = CallEnv {
            limits,
            blobs: Some(blobs.clone()),
            gate,
        };
        let request = RunRequest {
            step: s.step,
            ordinal: s.ordinal,
            payload: s.payload.clone(),
            checkpoint: checkpoint.clone(),
            attempt: s.attempt,
            task_id: task_id.clone(),
        };
        let report = self.shared.sandbox.run(module, &env, &request).await;
        if !report.log.is_empty() {
            // Kept in the tenant's blobs for `GetSubtaskLog`; losing it
            // does not fail the subtask.
            let key = subtask_log_key(s.task_id, s.step, s.ordinal, s.attempt);
            if let Err(e) = blobs.put(&key, Bytes::from(report.log.clone())).await {
                warn!(error = %e, blob = %key, "cannot store the subtask's log");
            }
        }
        let checkpoint = report.checkpoint.unwrap_or(checkpoint);
        let fuel_used = report.fuel_used;
        match report.result {
            Ok(output) if output.len() <= MAX_INLINE_BYTES => {
                info!(fuel_used, bytes = output.len(), "subtask succeeded");
                Outcome {
                    state: SubtaskState::Succeed.as_str(),
                    output,
                    fuel_used,
                    checkpoint,
                    ..Outcome::default()
                }
            }
            Ok(output) => {
                let key = format!("tasks/{task_id}/out/{}-{}-{}", s.step, s.ordinal, s.attempt);
                let size = output.len();
                match blobs.put(&key, Bytes::from(output)).await {
                    Ok(()) => {
                        info!(fuel_used, bytes = size, blob = %key, "subtask succeeded");
                        Outcome {
                            state: SubtaskState::Succeed.as_str(),
                            output_blob: key,
                            fuel_used,
                            checkpoint,
                            ..Outcome::default()
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot store the output");
                        Outcome {
                            state: SubtaskState::Failed.as_str(),
                            error: format!("cannot store the output in {key}: {e}"),
                            retryable: true,
                            fuel_used,
                            checkpoint,
                            ..Outcome::default()
                        }
                    }
                }
            }
            Err(e) => {
                info!(fuel_used, error = %e, retryable = e.retryable, "subtask failed");
                Outcome {
                    state: SubtaskState::Failed.as_str(),
                    error: e.to_string(),
                    retryable: e.retryable,
                    fuel_used,
                    checkpoint,
                    ..Outcome::default()
                }
            }
        }
    }

    /// Reports the run `paused` (its task is pausing). The guest's
    /// checkpoints of the aborted call are lost with it; the subtask's last
    /// committed checkpoint is kept.
    async fn paused(&self, checkpoint: Vec<u8>) -> Ended {
        info!("task pausing: subtask stopped");
        self.report(Outcome {
            state: SubtaskState::Paused.as_str(),
            checkpoint,
            ..Outcome::default()
        })
        .await
    }

    async fn claim(&self) -> Result<(), String> {
        let cmd = Kind::ClaimSubtask(ClaimSubtask {
            subtask: Some(self.subtask_ref()),
            node: self.shared.id,
            attempt: self.subtask().attempt,
            time_ms: now_ms(),
        });
        let result = self.shared.propose(cmd).await?;
        if result.error.is_empty() {
            Ok(())
        } else {
            Err(result.error)
        }
    }

    async fn report(&self, o: Outcome) -> Ended {
        let state = o.state;
        if let Some(claimed) = self.claimed.get() {
            self.shared
                .stats
                .observe_run(state, claimed.elapsed().as_secs_f64());
        }
        let cmd = Kind::ReportSubtask(ReportSubtask {
            subtask: Some(self.subtask_ref()),
            node: self.shared.id,
            attempt: self.subtask().attempt,
            state: o.state.to_string(),
            output: o.output,
            output_blob: o.output_blob,
            error: o.error,
            retryable: o.retryable,
            fuel_used: o.fuel_used,
            checkpoint: o.checkpoint,
            time_ms: now_ms(),
        });
        match self.shared.propose(cmd).await {
            Ok(r) if r.error.is_empty() => debug!(state, "reported"),
            Ok(r) => debug!(state, error = %r.error, "stale report dropped"),
            Err(e) => warn!(state, error = %e, "report refused"),
        }
        Ended::Done
    }
}

impl Shared {
    /// Proposes `cmd` through the current endpoint, retrying under one
    /// request id (on the next endpoint) until the cluster answers. A
    /// rejection is in the result's `error`; `Err` is a request the cluster
    /// refuses outright.
    async fn propose(&self, cmd: Kind) -> Result<CommandResult, String> {
        let request_id = RequestId::new(self.id);
        let mut backoff = Duration::from_millis(50);
        loop {
            let attempt = async {
                let (i, batcher) = self.endpoints.batcher()?;
                let req = ProposeRequest {
                    command: Some(Command {
                        kind: Some(cmd.clone()),
                    }),
                    forwarded: false,
                    request_id: request_id.0.to_vec(),
                };
                match tokio::time::timeout(CALL_TIMEOUT, batcher.propose(req)).await {
                    Ok(Ok(r)) => Ok(Ok(r)),
                    Ok(Err(s)) if permanent(s.code()) => Ok(Err(s.message().to_string())),
                    Ok(Err(s)) => {
                        self.endpoints.failed(i);
                        Err(format!("{}: {}", self.endpoints.addr(i), s.message()))
                    }
                    Err(_) => {
                        self.endpoints.failed(i);
                        Err(format!(
                            "{}: no answer in {CALL_TIMEOUT:?}",
                            self.endpoints.addr(i)
                        ))
                    }
                }
            };
            match attempt.await {
                Ok(answer) => return answer,
                Err(e) => {
                    debug!(node_id = self.id, error = %e, "propose failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = next_backoff(backoff);
                }
            }
        }
    }

    /// The loaded module with this hash: fetched from the cluster and
    /// compiled once per hash (concurrent executors wait for the first).
    async fn module(&self, hash: &str) -> Result<Arc<TaskModule>, ModuleError> {
        let cell = self
            .modules
            .lock()
            .expect("modules lock")
            .entry(hash.to_string())
            .or_default()
            .clone();
        cell.get_or_try_init(|| self.fetch_module(hash))
            .await
            .cloned()
    }

    async fn fetch_module(&self, hash: &str) -> Result<Arc<TaskModule>, ModuleError> {
        let (i, mut client) = self.endpoints.stoker().map_err(ModuleError::Unreachable)?;
        let req = GetModuleRequest {
            module: hash.to_string(),
            tag: String::new(),
            with_bytes: true,
            // Any tenant's module with these bytes (the worker holds the
            // admin token).
            tenant: String::new(),
        };
        let resp = match tokio::time::timeout(CALL_TIMEOUT, client.get_module(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if s.code() == Code::NotFound => {
                self.endpoints.failed(i);
                return Err(ModuleError::NotFound(format!(
                    "module {hash} not found: {}",
                    s.message()
                )));
            }
            Ok(Err(s)) => {
                self.endpoints.failed(i);
                return Err(ModuleError::Unreachable(format!(
                    "{}: {}",
                    self.endpoints.addr(i),
                    s.message()
                )));
            }
            Err(_) => {
                self.endpoints.failed(i);
                return Err(ModuleError::Unreachable(format!(
                    "{}: no answer in {CALL_TIMEOUT:?}",
                    self.endpoints.addr(i)
                )));
            }
        };
        if module_hash(&resp.data) != hash {
            // A server answering with other bytes is broken; ask another.
            self.endpoints.failed(i);
            return Err(ModuleError::Unreachable(format!(
                "{} sent bytes that do not hash to {hash}",
                self.endpoints.addr(i)
            )));
        }
        let module = self
            .sandbox
            .load(&resp.data)
            .await
            .map_err(ModuleError::Bad)?;
        info!(node_id = self.id, module = hash, "module loaded");
        Ok(module)
    }
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
                idempotent: true,
                ..SubtaskRecord::default()
            }),
            task_state: task_state.into(),
            accepts_work: task_state
                .parse::<TaskState>()
                .is_ok_and(|s| s.accepts_work(None)),
            priority: 512,
            ..Assignment::default()
        }
    }

    fn local(runs: &[(SubtaskKey, u32)]) -> BTreeMap<SubtaskKey, LocalRun> {
        runs.iter()
            .map(|(k, attempt)| {
                (
                    *k,
                    LocalRun {
                        attempt: *attempt,
                        pausing: false,
                    },
                )
            })
            .collect()
    }

    fn started(d: &Decision, list: &[Assignment]) -> Vec<(SubtaskKey, bool)> {
        d.start
            .iter()
            .map(|s| (key_of(list[s.index].subtask.as_ref().unwrap()), s.adopt))
            .collect()
    }

    #[test]
    fn starts_pending_work_up_to_the_free_slots_in_rank_order() {
        let mut list = vec![
            a(2, 0, 1, "pending", "running"),
            a(1, 1, 1, "pending", "running"),
            a(1, 0, 1, "pending", "resuming"),
            a(3, 0, 1, "pending", "running"),
        ];
        // Task 3 ranks first by priority.
        list[3].priority = 1;
        let d = decide(&list, &BTreeMap::new(), &HashSet::new(), 3);
        assert_eq!(
            started(&d, &list),
            vec![((3, 0, 0), false), ((1, 0, 0), false), ((1, 0, 1), false)]
        );
        assert!(d.stop.is_empty() && d.pause.is_empty());
        // One slot taken by a local run of task 2: two free.
        let d = decide(&list, &local(&[((2, 0, 0), 1)]), &HashSet::new(), 3);
        assert_eq!(
            started(&d, &list),
            vec![((3, 0, 0), false), ((1, 0, 0), false)]
        );
        assert!(d.stop.is_empty());
        // No free slot: nothing starts.
        let full = local(&[((7, 0, 0), 1), ((2, 0, 0), 1)]);
        let mut with7 = list.clone();
        with7.push(a(7, 0, 1, "running", "running"));
        let d = decide(&with7, &full, &HashSet::new(), 2);
        assert!(d.start.is_empty());
    }

    #[test]
    fn only_tasks_that_accept_work_are_claimed() {
        for (state, claims) in [
            ("running", true),
            ("resuming", true),
            ("pending", false),
            ("pausing", false),
            ("paused", false),
            ("modifying", false),
            ("cancelling", false),
            ("reverting", false),
            ("bogus", false),
        ] {
            let list = vec![a(1, 0, 1, "pending", state)];
            let d = decide(&list, &BTreeMap::new(), &HashSet::new(), 4);
            assert_eq!(!d.start.is_empty(), claims, "{state}");
        }
        // The server says whether the task accepts work: a task modified
        // while it runs does.
        let modified = Assignment {
            accepts_work: true,
            ..a(1, 0, 1, "pending", "modifying")
        };
        let d = decide(&[modified], &BTreeMap::new(), &HashSet::new(), 4);
        assert_eq!(d.start.len(), 1);
    }

    #[test]
    fn skipped_attempts_do_not_start_again() {
        let list = vec![
            a(1, 0, 1, "running", "running"),
            a(1, 1, 2, "pending", "running"),
        ];
        let skip: HashSet<_> = [((1, 0, 0), 1), ((1, 0, 1), 2)].into_iter().collect();
        let d = decide(&list, &BTreeMap::new(), &skip, 4);
        assert!(d.start.is_empty());
        // Another attempt of a skipped subtask is new work.
        let list = vec![a(1, 1, 3, "pending", "running")];
        let d = decide(&list, &BTreeMap::new(), &skip, 4);
        assert_eq!(started(&d, &list), vec![((1, 0, 1), false)]);
    }

    #[test]
    fn running_here_but_not_local_is_adopted_first() {
        let list = vec![
            a(1, 0, 1, "pending", "running"),
            a(2, 0, 4, "running", "running"),
        ];
        let d = decide(&list, &BTreeMap::new(), &HashSet::new(), 1);
        assert_eq!(started(&d, &list), vec![((2, 0, 0), true)]);
        // Adopted even when its task is pausing (the executor reports it
        // paused at once).
        let list = vec![a(2, 0, 4, "running", "pausing")];
        let d = decide(&list, &BTreeMap::new(), &HashSet::new(), 1);
        assert_eq!(started(&d, &list), vec![((2, 0, 0), true)]);
    }

    #[test]
    fn runs_no_longer_assigned_at_their_attempt_stop() {
        let list = vec![
            // Still ours, running.
            a(1, 0, 1, "running", "running"),
            // Claimed locally; this view predates the claim.
            a(1, 1, 1, "pending", "running"),
            // Requeued and assigned to us again: a new attempt.
            a(1, 2, 3, "pending", "running"),
            // Task cancelling: keeps running until its subtasks go.
            a(4, 0, 1, "running", "cancelling"),
        ];
        let runs = local(&[
            ((1, 0, 0), 1),
            ((1, 0, 1), 1),
            ((1, 0, 2), 2),
            ((4, 0, 0), 1),
            // Gone from the assignments (moved, cancelled, preempted).
            ((5, 0, 0), 1),
        ]);
        let d = decide(&list, &runs, &HashSet::new(), 8);
        assert_eq!(d.stop, vec![(1, 0, 2), (5, 0, 0)]);
        assert!(d.pause.is_empty());
        // The new attempt starts in the freed slot.
        assert_eq!(started(&d, &list), vec![((1, 0, 2), false)]);
        // Two stopped of five local runs with five slots: the new attempt
        // still fits.
        let d = decide(&list, &runs, &HashSet::new(), 4);
        assert_eq!(started(&d, &list), vec![((1, 0, 2), false)]);
        let d = decide(&list, &runs, &HashSet::new(), 3);
        assert!(d.start.is_empty());
    }

    #[test]
    fn runs_of_pausing_tasks_pause_once() {
        let list = vec![
            a(1, 0, 1, "running", "pausing"),
            a(1, 1, 1, "pending", "pausing"),
        ];
        let mut runs = local(&[((1, 0, 0), 1)]);
        let d = decide(&list, &runs, &HashSet::new(), 4);
        assert_eq!(d.pause, vec![(1, 0, 0)]);
        assert!(d.stop.is_empty());
        // Pending work of a pausing task does not start.
        assert!(d.start.is_empty());
        runs.get_mut(&(1, 0, 0)).unwrap().pausing = true;
        let d = decide(&list, &runs, &HashSet::new(), 4);
        assert!(d.pause.is_empty());
    }

    #[test]
    fn config_defaults_and_validation() {
        let cfg = WorkerConfig::default();
        cfg.validate().unwrap();
        assert!(cfg.enabled && cfg.slots >= 1);
        assert_eq!(cfg.heartbeat_interval_ms, 1000);
        assert_eq!(cfg.assignment_wait_ms, 5000);
        assert_eq!(cfg.fuel_limit, CallLimits::default().fuel);
        assert_eq!(cfg.memory_limit, CallLimits::default().memory_bytes);
        assert_eq!(
            Duration::from_millis(cfg.deadline_ms),
            CallLimits::default().deadline
        );
        let parsed: WorkerConfig =
            toml::from_str("slots = 3\nlabels = { zone = \"a\" }\nendpoints = [\"h:1\"]").unwrap();
        assert_eq!(parsed.slots, 3);
        assert_eq!(parsed.labels["zone"], "a");
        parsed.validate().unwrap();
        assert!(toml::from_str::<WorkerConfig>("slot = 3").is_err());
        for bad in [
            WorkerConfig {
                slots: 0,
                ..WorkerConfig::default()
            },
            WorkerConfig {
                assignment_wait_ms: 60_000,
                ..WorkerConfig::default()
            },
            WorkerConfig {
                endpoints: vec!["http://h:1".into()],
                ..WorkerConfig::default()
            },
            WorkerConfig {
                labels: [(String::new(), "x".into())].into_iter().collect(),
                ..WorkerConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
