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
//!   runs it in the sandbox, and reports the result (`ReportSubtask`); a
//!   quick run of an idempotent step claims with its report instead.
//!   Claims and reports are retried under one request id on transport
//!   errors, so a retry is never applied twice; a rejection means the view
//!   was stale, and the work is dropped.
//!
//! Assignments may come from any scheduler node's applied state, slightly
//! stale; responses older (by applied index) than one already seen are
//! ignored, and the fencing of claims and reports makes the rest safe.
//!
//! # Layout
//! This file holds the state the parts share, [`start`] and the handles.
//! - `config`: [`WorkerConfig`], the `[worker]` table, defaults and
//!   validation.
//! - `decide`: [`decide`], what to start, stop and pause (pure).
//! - `heartbeat`: the heartbeat loop and the operator steps of its replies.
//! - `assignments`: the assignment loop and the reconciliation applying
//!   [`decide`].
//! - `executor`: one subtask's claim, sandboxed run and report.
//! - `modules`: modules fetched by hash and compiled once.
//! - `endpoints`: the scheduler nodes talked to in turn, and proposals
//!   retried across them.

mod assignments;
mod combine;
mod config;
mod decide;
mod endpoints;
mod executor;
mod heartbeat;
mod modules;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use stoker_proto::api::Assignment;
use stoker_proto::meta::NodeLoad;
use tokio::sync::{watch, Notify, OnceCell};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tracing::info;

use self::assignments::assignment_loop;
use self::combine::Combiner;
pub use self::config::WorkerConfig;
pub use self::decide::{decide, key_of, Decision, LocalRun, Start, SubtaskKey};
use self::endpoints::Endpoints;
use self::heartbeat::heartbeat_loop;
use super::stats::WorkerStats;
use super::steps::MoveStep;
use crate::api::auth::{Bearer, Secret};
use crate::blob::BlobStore;
use crate::meta::MetaNode;
use crate::resource::ResourceControl;
use crate::sandbox::{Sandbox, TaskModule};

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
    /// Runs that ended and whose report is being committed: their slot is
    /// free already, and they are not started again meanwhile.
    reporting: FxHashMap<(SubtaskKey, u32), AbortHandle>,
    /// Runs this process ended (reported, dropped or stopped), until the
    /// assignments no longer list them.
    finished: FxHashSet<(SubtaskKey, u32)>,
    /// Refused claims, not retried before the instant.
    blocked: FxHashMap<(SubtaskKey, u32), Instant>,
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
    /// The metadata node of this process when the worker's scheduler is
    /// its own node: claims, reports and the assignment poll go to it
    /// directly instead of over RPC to itself.
    local: Option<MetaNode>,
    /// Claims and reports, proposed together.
    combiner: Combiner,
    modules: Mutex<HashMap<String, Arc<OnceCell<Arc<TaskModule>>>>>,
    state: Mutex<State>,
    /// Wakes the assignment loop to poll again at once.
    repoll: Notify,
    /// Wakes the heartbeat loop to beat (and report) at once.
    beat_now: Notify,
}
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
            for (_, abort) in std::mem::take(&mut st.reporting) {
                abort.abort();
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
/// config starts nothing. `local` is this process's metadata node when the
/// worker talks to its own scheduler: proposals and the assignment poll
/// then skip the RPC (heartbeats still go through the API, which forwards
/// them to the owner).
#[allow(clippy::too_many_arguments)]
pub fn start(
    id: u64,
    advertise_addr: String,
    is_scheduler: bool,
    cfg: WorkerConfig,
    sandbox: Arc<Sandbox>,
    blobs: BlobStore,
    resource: Option<Arc<ResourceControl>>,
    local: Option<MetaNode>,
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
    let (combiner, proposals) = Combiner::new();
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
        local,
        combiner,
        modules: Mutex::new(HashMap::new()),
        state: Mutex::new(State::default()),
        repoll: Notify::new(),
        beat_now: Notify::new(),
    });
    let (stop, stop_rx) = watch::channel(false);
    let mut loops = Vec::new();
    if enabled {
        // Ends when the worker is dropped.
        let drain = Combiner::drain(Arc::downgrade(&shared), proposals, stop_rx.clone());
        tokio::spawn(drain);
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
}
