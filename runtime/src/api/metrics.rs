//! `/metrics`: a node's metrics in the Prometheus (OpenMetrics) text
//! format, built at scrape time from what the node knows.
//!
//! - Every scheduler node: Raft term, commit and applied indexes,
//!   leadership, proposal latency; from its replica of the replicated
//!   state: tasks and subtasks by tenant and state, fuel used per tenant,
//!   each node's slots, assigned subtasks and reported resource state.
//! - Every scheduler node: the coordinator's operators, created by kind
//!   and source, finished by kind and outcome, in flight by kind (zero
//!   unless it owns the cluster).
//! - Every worker: slots in use, the resource manager's command, allowed
//!   and active concurrency, fuel rate, level and node CPU, fuel granted
//!   per tenant, subtask run latency (start to report) and start delay
//!   (submission to the first step's start).
//!
//! Counts of the replicated state are computed once per applied index
//! (they read the task and subtask tables whole).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use stoker_proto::meta::{NodeLoad, NodeRecord};

use crate::exec::stats::Labels;
use crate::exec::worker::WorkerView;
use crate::meta::stats::{self, StateCounts};
use crate::meta::{queries, MetaError, MetaNode};
use crate::sched::coordinator::{Board, OpKind, OpState, OperatorCounts, Published};

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type FloatGauge = Gauge<f64, AtomicU64>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What the replicated state says, cached per applied index.
#[derive(Debug, Clone, Default)]
pub struct ClusterCounts {
    pub applied: u64,
    pub counts: StateCounts,
    pub tenant_fuel: BTreeMap<String, u64>,
    pub nodes: Vec<NodeRecord>,
    /// Subtasks assigned (pending or running) per node id.
    pub assigned: BTreeMap<u64, u32>,
}

/// A per-applied-index cache of [`ClusterCounts`].
#[derive(Debug, Clone, Default)]
pub struct CountsCache(Arc<Mutex<Option<Arc<ClusterCounts>>>>);

impl CountsCache {
    /// The counts at `meta`'s applied state, read again only when the
    /// applied index moved.
    ///
    /// # Errors
    /// Storage failures.
    pub fn get(&self, meta: &MetaNode) -> Result<Arc<ClusterCounts>, MetaError> {
        let applied = meta.applied_index();
        if let Some(c) = self.0.lock().expect("counts lock").as_ref() {
            if c.applied == applied {
                return Ok(c.clone());
            }
        }
        let (mut counts, applied) = meta.read_local(|p, t| {
            let nodes = queries::node_records(p, t)?;
            let mut assigned = BTreeMap::new();
            for n in &nodes {
                assigned.insert(n.id, queries::node_subtasks(p, t, n.id)?.len() as u32);
            }
            Ok(ClusterCounts {
                applied: 0,
                counts: stats::state_counts(p, t)?,
                tenant_fuel: stats::tenant_fuel(p, t)?,
                nodes,
                assigned,
            })
        })?;
        counts.applied = applied;
        let counts = Arc::new(counts);
        *self.0.lock().expect("counts lock") = Some(counts.clone());
        Ok(counts)
    }
}

/// What a node has to report: the metadata node and the coordinator's
/// board of a scheduler node, the worker of a worker.
#[derive(Clone, Copy, Default)]
pub struct Parts<'a> {
    pub meta: Option<&'a MetaNode>,
    pub board: Option<&'a Board>,
    pub worker: Option<&'a WorkerView>,
}

/// Renders every metric of this node.
///
/// # Errors
/// Storage failures reading the replicated state.
pub async fn render(parts: Parts<'_>, cache: &CountsCache) -> Result<String, MetaError> {
    let mut reg = Registry::with_prefix("stoker");
    if let Some(meta) = parts.meta {
        raft_metrics(&mut reg, meta).await?;
        let counts = cache.get(meta)?;
        cluster_metrics(&mut reg, &counts);
    }
    if let Some(board) = parts.board {
        let published = board.lock().expect("board lock").clone();
        operator_metrics(&mut reg, &published);
    }
    if let Some(w) = parts.worker {
        worker_metrics(&mut reg, w);
    }
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| MetaError::Config(format!("cannot encode metrics: {e}")))?;
    Ok(out)
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    reg.register(name, help, g);
}

fn float_gauge(reg: &mut Registry, name: &str, help: &str, v: f64) {
    let g = FloatGauge::default();
    g.set(v);
    reg.register(name, help, g);
}

async fn raft_metrics(reg: &mut Registry, meta: &MetaNode) -> Result<(), MetaError> {
    let s = meta.status().await?;
    gauge(reg, "raft_term", "Current Raft term", s.term as i64);
    gauge(
        reg,
        "raft_commit_index",
        "Highest Raft log index known committed",
        s.commit_index as i64,
    );
    gauge(
        reg,
        "raft_applied_index",
        "Highest Raft log index applied to the state machine",
        s.applied_index as i64,
    );
    gauge(
        reg,
        "raft_last_index",
        "Last index of this node's Raft log",
        s.last_index as i64,
    );
    gauge(
        reg,
        "raft_is_leader",
        "1 when this node is the Raft leader (the owner)",
        i64::from(s.role == "leader"),
    );
    gauge(
        reg,
        "raft_leader_id",
        "The leader as this node knows it, 0 when unknown",
        s.leader_id.unwrap_or(0) as i64,
    );
    reg.register(
        "raft_proposal_seconds",
        "Time from proposing a command on this node to its applied result",
        meta.proposal_latency().clone(),
    );
    Ok(())
}

fn cluster_metrics(reg: &mut Registry, c: &ClusterCounts) {
    let tasks = Family::<Labels, Gauge>::default();
    for ((tenant, state), n) in &c.counts.tasks {
        tasks
            .get_or_create(&labels(&[("tenant", tenant), ("state", state)]))
            .set(*n as i64);
    }
    reg.register(
        "tasks",
        "Stored tasks (finished ones until history is collected) by tenant and state",
        tasks,
    );
    let subtasks = Family::<Labels, Gauge>::default();
    for ((tenant, state), n) in &c.counts.subtasks {
        subtasks
            .get_or_create(&labels(&[("tenant", tenant), ("state", state)]))
            .set(*n as i64);
    }
    reg.register(
        "subtasks",
        "Subtasks of stored tasks by tenant and state",
        subtasks,
    );
    let fuel = Family::<Labels, Counter>::default();
    for (tenant, n) in &c.tenant_fuel {
        fuel.get_or_create(&labels(&[("tenant", tenant)]))
            .inc_by(*n);
    }
    reg.register(
        "tenant_fuel_used",
        "Fuel used by each tenant's subtasks, summed over every reported run",
        fuel,
    );
    let up = Family::<Labels, Gauge>::default();
    let slots = Family::<Labels, Gauge>::default();
    let assigned = Family::<Labels, Gauge>::default();
    let allowed = Family::<Labels, Gauge>::default();
    let cpu = Family::<Labels, FloatGauge>::default();
    for n in &c.nodes {
        let id = n.id.to_string();
        let l = labels(&[("node", &id)]);
        up.get_or_create(&l).set(i64::from(n.up));
        slots.get_or_create(&l).set(i64::from(n.slots));
        assigned
            .get_or_create(&l)
            .set(i64::from(c.assigned.get(&n.id).copied().unwrap_or(0)));
        if let Some(load) = &n.load {
            allowed.get_or_create(&l).set(i64::from(load.allowed));
            if let Some(v) = load.cpu {
                cpu.get_or_create(&l).set(v);
            }
        }
    }
    reg.register("cluster_node_up", "1 while a node heartbeats", up);
    reg.register("cluster_node_slots", "Slots of each registered node", slots);
    reg.register(
        "cluster_node_assigned_subtasks",
        "Pending and running subtasks assigned to each node",
        assigned,
    );
    reg.register(
        "cluster_node_allowed_concurrency",
        "Allowed concurrency each worker reported in its last heartbeat",
        allowed,
    );
    reg.register(
        "cluster_node_cpu_utilisation",
        "Node CPU utilisation (0 to 1) each worker reported in its last heartbeat",
        cpu,
    );
}

/// The coordinator's operators. Every scheduler node exports every series
/// (zero where it never counted one): created and finished count what this
/// process's coordinators did in the terms it owned the cluster; in flight
/// is the owner's, zero elsewhere.
fn operator_metrics(reg: &mut Registry, board: &Published) {
    let created = Family::<Labels, Counter>::default();
    for (kind, source) in OperatorCounts::sources() {
        let n = board.counts.created.get(&(kind, source)).copied();
        created
            .get_or_create(&labels(&[("kind", kind.as_str()), ("scheduler", source)]))
            .inc_by(n.unwrap_or(0));
    }
    reg.register(
        "operators_created",
        "Operators the coordinator admitted, by kind and the scheduler or checker that created them",
        created,
    );
    let finished = Family::<Labels, Counter>::default();
    let in_flight = Family::<Labels, Gauge>::default();
    for kind in [OpKind::MoveSubtask, OpKind::TransferLeader] {
        for outcome in OpState::FINAL {
            let n = board.counts.finished.get(&(kind, outcome)).copied();
            finished
                .get_or_create(&labels(&[
                    ("kind", kind.as_str()),
                    ("outcome", outcome.as_str()),
                ]))
                .inc_by(n.unwrap_or(0));
        }
        let n = if board.owner {
            board.operators.iter().filter(|o| o.kind == kind).count()
        } else {
            0
        };
        in_flight
            .get_or_create(&labels(&[("kind", kind.as_str())]))
            .set(n as i64);
    }
    reg.register(
        "operators_finished",
        "Operators retired, by kind and outcome (done, cancelled, timed-out)",
        finished,
    );
    reg.register(
        "operators_in_flight",
        "Operators the owner's coordinator is carrying out, by kind (0 on other nodes)",
        in_flight,
    );
}

fn worker_metrics(reg: &mut Registry, w: &WorkerView) {
    let load: NodeLoad = w.load();
    gauge(
        reg,
        "worker_slots",
        "Slots of this worker",
        i64::from(load.slots),
    );
    gauge(
        reg,
        "worker_slots_in_use",
        "Subtasks this worker is running",
        i64::from(load.running),
    );
    gauge(
        reg,
        "governor_allowed_concurrency",
        "Subtasks allowed to hold fuel at once",
        i64::from(load.allowed),
    );
    gauge(
        reg,
        "governor_active_concurrency",
        "Subtasks holding fuel now",
        i64::from(load.active),
    );
    gauge(
        reg,
        "governor_suspended",
        "Subtasks suspended between fuel quanta by a downclock",
        i64::from(load.suspended),
    );
    float_gauge(
        reg,
        "governor_fuel_rate",
        "Fuel per second the governor hands out, 0 when unlimited",
        load.fuel_rate,
    );
    float_gauge(
        reg,
        "governor_level",
        "The resource manager's level in cores (0 without a manager)",
        load.level,
    );
    let command = Family::<Labels, Gauge>::default();
    for c in ["overclock", "downclock", "hold"] {
        command
            .get_or_create(&labels(&[("command", c)]))
            .set(i64::from(load.command == c));
    }
    reg.register(
        "governor_command",
        "1 for the resource manager's last command",
        command,
    );
    let scheduler = Family::<Labels, Gauge>::default();
    if !load.scheduler.is_empty() {
        scheduler
            .get_or_create(&labels(&[("scheduler", &load.scheduler)]))
            .set(1);
    }
    reg.register(
        "resource_scheduler",
        "1 for the tuning scheduler in use (none without a resource manager)",
        scheduler,
    );
    if let Some(cpu) = load.cpu {
        float_gauge(
            reg,
            "node_cpu_utilisation",
            "Whole-node CPU utilisation, 0 to 1, over the last sample",
            cpu,
        );
    }
    let granted = Family::<Labels, Counter>::default();
    if let Some(r) = w.resource() {
        for (tenant, n) in r.tenant_fuel() {
            granted
                .get_or_create(&labels(&[("tenant", &tenant)]))
                .inc_by(n);
        }
    }
    reg.register(
        "worker_fuel_granted",
        "Fuel this worker's governor handed out, by tenant",
        granted,
    );
    let stats = w.stats();
    reg.register(
        "worker_subtask_run_seconds",
        "Subtask runs on this worker from start (claim) to report, by reported state",
        stats.run_seconds.clone(),
    );
    reg.register(
        "worker_subtask_start_delay_seconds",
        "Task submission to the start of a first-step subtask (first attempt)",
        stats.start_delay_seconds.clone(),
    );
}
