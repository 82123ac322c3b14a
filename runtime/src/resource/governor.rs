//! The fuel governor: a token bucket in fuel per second shared by a node's
//! slots. Every running sandbox holds a [`Lease`] (its [`FuelGate`]) and
//! takes each fuel quantum from the bucket; waiters are served in fair order
//! ([`super::fair`]). The governor also caps how many leases hold fuel at
//! once: the others are suspended between quanta, never killed, and resumed
//! in the order of [`super::choice`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::choice::{pick_grow, pick_shrink, TaskLoad};
use super::fair::{weights, FairQueue, Place};
use super::gate::FuelGate;
use super::scheduler::TaskStats;
use super::ResourceError;
use crate::model::Rank;

/// Settings of a node's fuel governor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GovernorConfig {
    /// Subtasks that may hold fuel at once at most (one per core).
    /// Default: the number of cores.
    pub slots: usize,
    /// Fuel per quantum; must equal the sandbox's `fuel_yield_interval`.
    /// Default: 1,000,000.
    pub quantum: u64,
    /// Bucket capacity as time at the current rate: how much unused budget
    /// may be spent at once (never less than one quantum). Default: 20 ms.
    #[serde(with = "super::scheduler::millis")]
    pub burst: Duration,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        GovernorConfig {
            slots: std::thread::available_parallelism().map_or(1, |n| n.get()),
            quantum: 1_000_000,
            burst: Duration::from_millis(20),
        }
    }
}

impl GovernorConfig {
    /// `slots` slots whose quantum is `sandbox`'s fuel yield interval.
    pub fn for_sandbox(sandbox: &crate::sandbox::Sandbox, slots: usize) -> Self {
        GovernorConfig {
            slots,
            quantum: sandbox.config().fuel_yield_interval,
            ..GovernorConfig::default()
        }
    }

    /// # Errors
    /// Zero slots or a zero quantum.
    pub fn validate(&self) -> Result<(), ResourceError> {
        if self.slots == 0 {
            return Err(ResourceError::Config("slots must be at least 1".into()));
        }
        if self.quantum == 0 {
            return Err(ResourceError::Config("quantum must be at least 1".into()));
        }
        Ok(())
    }
}

/// Who a lease runs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub tenant: String,
    pub rank: Rank,
    /// The concurrency the task was scheduled with on this node.
    pub concurrency: u32,
}

/// The governor's state at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct GovernorSnapshot {
    pub slots: usize,
    /// Leases allowed to hold fuel at once.
    pub allowed: usize,
    /// Leases holding fuel (not suspended).
    pub active: usize,
    pub suspended: usize,
    /// Fuel per second; `None` when unlimited.
    pub fuel_rate: Option<f64>,
    /// Fuel granted since the governor started.
    pub fuel_granted: u64,
    pub tasks: Vec<TaskStats>,
    /// Fuel granted per tenant since the governor started.
    pub tenants: BTreeMap<String, u64>,
}

/// A node's fuel governor. Cheap to clone; clones share the bucket.
#[derive(Debug, Clone)]
pub struct Governor {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: GovernorConfig,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rate: Option<f64>,
    tokens: f64,
    refilled: Instant,
    allowed: usize,
    leases: BTreeMap<u64, LeaseState>,
    tasks: HashMap<String, TaskState>,
    tenants: BTreeMap<String, u64>,
    /// Per-tenant fuel rates (the tenants' `fuel_per_second` quota), each a
    /// bucket of its own on top of the node's.
    tenant_buckets: HashMap<String, Bucket>,
    queue: FairQueue<String, u64>,
    /// Per-task weights; `None` after the set of tasks changed.
    weights: Option<HashMap<String, f64>>,
    granted: u64,
    next_id: u64,
}

#[derive(Debug)]
struct LeaseState {
    task_id: String,
    started: Instant,
    suspended: bool,
    wake: Arc<Notify>,
    place: Option<Place>,
}

#[derive(Debug)]
struct TaskState {
    info: TaskInfo,
    started: Instant,
    fuel: u64,
    leases: usize,
}

/// A tenant's token bucket: fuel per second, `burst` deep (at least a
/// quantum), starting empty.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn capacity(&self, config: &GovernorConfig) -> f64 {
        (self.rate * config.burst.as_secs_f64()).max(config.quantum as f64)
    }

    /// How long until `fuel` may be taken (`None`: now).
    fn wait(&mut self, fuel: u64, now: Instant, config: &GovernorConfig) -> Option<Duration> {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + self.rate * dt).min(self.capacity(config));
        self.refilled = now;
        let enough = (fuel as f64).min(self.capacity(config));
        (self.tokens + 1e-6 < enough)
            .then(|| Duration::from_secs_f64(((enough - self.tokens) / self.rate).max(1e-6)))
    }
}

/// What an acquisition does next.
enum Step {
    Granted,
    Wait(Arc<Notify>),
    Sleep(Arc<Notify>, Duration),
}

impl Governor {
    /// A governor with an unlimited rate and every slot allowed.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(config: GovernorConfig) -> Result<Self, ResourceError> {
        config.validate()?;
        let state = State {
            rate: None,
            tokens: 0.0,
            refilled: Instant::now(),
            allowed: config.slots,
            leases: BTreeMap::new(),
            tasks: HashMap::new(),
            tenants: BTreeMap::new(),
            tenant_buckets: HashMap::new(),
            queue: FairQueue::default(),
            weights: None,
            granted: 0,
            next_id: 0,
        };
        Ok(Governor {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(state),
            }),
        })
    }

    pub fn config(&self) -> &GovernorConfig {
        &self.shared.config
    }

    /// A lease for one subtask of `task`: its gate for every call while the
    /// subtask runs. It starts suspended when the allowed concurrency is
    /// taken. Dropping it frees its place.
    pub fn lease(&self, task_id: &str, task: &TaskInfo) -> Arc<Lease> {
        let mut st = self.shared.lock();
        let now = Instant::now();
        let entry = st
            .tasks
            .entry(task_id.to_string())
            .or_insert_with(|| TaskState {
                info: task.clone(),
                started: now,
                fuel: 0,
                leases: 0,
            });
        entry.leases += 1;
        st.weights = None;
        let suspended = st.active() >= st.allowed;
        st.next_id += 1;
        let id = st.next_id;
        st.leases.insert(
            id,
            LeaseState {
                task_id: task_id.to_string(),
                started: now,
                suspended,
                wake: Arc::new(Notify::new()),
                place: None,
            },
        );
        tracing::debug!(task_id, lease = id, suspended, "lease taken");
        Arc::new(Lease {
            id,
            shared: self.shared.clone(),
        })
    }

    /// Sets the fuel rate in fuel/s; `None` lifts the limit.
    pub fn set_rate(&self, rate: Option<f64>) {
        let mut st = self.shared.lock();
        let now = Instant::now();
        st.refill(now, &self.shared.config);
        if st.rate.is_none() && rate.is_some() {
            st.tokens = 0.0;
        }
        st.rate = rate.map(|r| r.max(1.0));
        st.refill(now, &self.shared.config);
        st.wake_head();
    }

    pub fn rate(&self) -> Option<f64> {
        self.shared.lock().rate
    }

    /// Limits `tenant`'s subtasks on this node to `rate` fuel per second
    /// together (`None` or 0 lifts the limit). Setting the rate it already
    /// has changes nothing, so callers may repeat it with every assignment.
    pub fn set_tenant_rate(&self, tenant: &str, rate: Option<u64>) {
        let mut st = self.shared.lock();
        match rate.filter(|r| *r > 0) {
            None => {
                if st.tenant_buckets.remove(tenant).is_some() {
                    st.wake_all();
                }
            }
            Some(r) => {
                let r = r as f64;
                let now = Instant::now();
                let bucket = st
                    .tenant_buckets
                    .entry(tenant.to_string())
                    .or_insert(Bucket {
                        rate: r,
                        tokens: 0.0,
                        refilled: now,
                    });
                if bucket.rate != r {
                    bucket.wait(0, now, &self.shared.config);
                    bucket.rate = r;
                    st.wake_all();
                }
            }
        }
    }

    /// The fuel rate limit of `tenant` on this node, if any.
    pub fn tenant_rate(&self, tenant: &str) -> Option<f64> {
        self.shared
            .lock()
            .tenant_buckets
            .get(tenant)
            .map(|b| b.rate)
    }

    /// Sets how many leases may hold fuel at once (clamped to 1..=slots),
    /// suspending or resuming leases to match; the concurrency applied.
    pub fn set_concurrency(&self, n: usize) -> usize {
        let mut st = self.shared.lock();
        st.allowed = n.clamp(1, self.shared.config.slots);
        st.rebalance();
        st.allowed
    }

    pub fn snapshot(&self) -> GovernorSnapshot {
        let st = self.shared.lock();
        let now = Instant::now();
        let loads = st.loads(now);
        let mut tasks: Vec<TaskStats> = loads
            .into_iter()
            .map(|load| {
                let t = &st.tasks[&load.task_id];
                TaskStats {
                    tenant: t.info.tenant.clone(),
                    fuel_used: t.fuel,
                    load,
                }
            })
            .collect();
        tasks.sort_by(|a, b| a.load.task_id.cmp(&b.load.task_id));
        let active = st.active();
        GovernorSnapshot {
            slots: self.shared.config.slots,
            allowed: st.allowed,
            active,
            suspended: st.leases.len() - active,
            fuel_rate: st.rate,
            fuel_granted: st.granted,
            tasks,
            tenants: st.tenants.clone(),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters, never broken
        // invariants that matter more than stopping the node.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn acquire(&self, id: u64, fuel: u64) {
        let mut guard = Abandon {
            shared: self,
            id,
            armed: true,
        };
        loop {
            let step = self.lock().step(id, fuel, &self.config);
            match step {
                Step::Granted => break,
                Step::Wait(wake) => wake.notified().await,
                Step::Sleep(wake, delay) => {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = wake.notified() => {}
                    }
                }
            }
        }
        guard.armed = false;
    }
}

/// Takes a cancelled acquisition out of the queue.
struct Abandon<'a> {
    shared: &'a Shared,
    id: u64,
    armed: bool,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.lock().leave_queue(self.id);
        }
    }
}

impl State {
    fn active(&self) -> usize {
        self.leases.values().filter(|l| !l.suspended).count()
    }

    /// Bucket capacity: `burst` at the current rate, at least a quantum.
    fn capacity(&self, config: &GovernorConfig) -> f64 {
        let rate = self.rate.unwrap_or(0.0);
        (rate * config.burst.as_secs_f64()).max(config.quantum as f64)
    }

    fn refill(&mut self, now: Instant, config: &GovernorConfig) {
        if let Some(rate) = self.rate {
            let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
            self.tokens = (self.tokens + rate * dt).min(self.capacity(config));
        }
        self.refilled = now;
    }

    /// One attempt of lease `id` to take `fuel`.
    fn step(&mut self, id: u64, fuel: u64, config: &GovernorConfig) -> Step {
        let now = Instant::now();
        self.refill(now, config);
        let Some(lease) = self.leases.get(&id) else {
            return Step::Granted; // released while waiting: nothing to govern
        };
        let wake = lease.wake.clone();
        if lease.suspended {
            self.leave_queue(id);
            return Step::Wait(wake);
        }
        // Its tenant's own rate first: a lease its tenant cannot pay for
        // yet leaves the queue, so it does not hold up other tenants.
        let tenant_delay = match self.tasks.get(&lease.task_id) {
            Some(task) => self
                .tenant_buckets
                .get_mut(&task.info.tenant)
                .and_then(|bucket| bucket.wait(fuel, now, config)),
            None => None,
        };
        if let Some(delay) = tenant_delay {
            self.leave_queue(id);
            return Step::Sleep(wake, delay);
        }
        let Some(rate) = self.rate else {
            self.leave_queue(id);
            self.account(id, fuel);
            return Step::Granted;
        };
        let place = match lease.place {
            Some(place) => place,
            None => {
                let task_id = lease.task_id.clone();
                let weight = self.weight(&task_id);
                let place = self.queue.push(&task_id, id, fuel, weight);
                self.leases.get_mut(&id).expect("lease exists").place = Some(place);
                place
            }
        };
        if self.queue.head().map(|(p, _)| p) != Some(place) {
            return Step::Wait(wake);
        }
        // A request larger than the bucket waits for a full bucket and
        // leaves it in debt.
        let need = fuel as f64;
        let enough = need.min(self.capacity(config));
        if self.tokens + 1e-6 >= enough {
            self.tokens -= need;
            self.queue.remove(place, true);
            self.leases.get_mut(&id).expect("lease exists").place = None;
            self.account(id, fuel);
            self.wake_head();
            return Step::Granted;
        }
        let delay = Duration::from_secs_f64(((enough - self.tokens) / rate).max(1e-6));
        Step::Sleep(wake, delay)
    }

    fn account(&mut self, id: u64, fuel: u64) {
        let task_id = &self.leases[&id].task_id;
        if let Some(task) = self.tasks.get_mut(task_id) {
            task.fuel += fuel;
            *self.tenants.entry(task.info.tenant.clone()).or_default() += fuel;
            if let Some(b) = self.tenant_buckets.get_mut(&task.info.tenant) {
                b.tokens -= fuel as f64;
            }
        }
        self.granted += fuel;
    }

    fn weight(&mut self, task_id: &str) -> f64 {
        let tasks = &self.tasks;
        let cache = self.weights.get_or_insert_with(|| {
            let ids: Vec<&String> = tasks.keys().collect();
            let keys: Vec<(&str, &Rank)> = ids
                .iter()
                .map(|id| (tasks[*id].info.tenant.as_str(), &tasks[*id].info.rank))
                .collect();
            ids.iter()
                .map(|id| (*id).clone())
                .zip(weights(&keys))
                .collect()
        });
        cache.get(task_id).copied().unwrap_or(1.0)
    }

    fn leave_queue(&mut self, id: u64) {
        if let Some(place) = self.leases.get_mut(&id).and_then(|l| l.place.take()) {
            self.queue.remove(place, false);
            self.wake_head();
        }
    }

    /// Wakes every lease (a limit changed: each looks again).
    fn wake_all(&self) {
        for lease in self.leases.values() {
            lease.wake.notify_one();
        }
    }

    fn wake_head(&self) {
        if let Some((_, id)) = self.queue.head() {
            if let Some(lease) = self.leases.get(id) {
                lease.wake.notify_one();
            }
        }
    }

    fn release(&mut self, id: u64) {
        self.leave_queue(id);
        let Some(lease) = self.leases.remove(&id) else {
            return;
        };
        if let Some(task) = self.tasks.get_mut(&lease.task_id) {
            task.leases -= 1;
            if task.leases == 0 {
                self.tasks.remove(&lease.task_id);
                self.queue.forget(&lease.task_id);
                self.weights = None;
            }
        }
        self.rebalance();
    }

    fn loads(&self, now: Instant) -> Vec<TaskLoad> {
        let mut loads: BTreeMap<&str, TaskLoad> = BTreeMap::new();
        for (id, task) in &self.tasks {
            loads.insert(
                id,
                TaskLoad {
                    task_id: id.clone(),
                    running: 0,
                    waiting: 0,
                    scheduled: task.info.concurrency,
                    run_time: now.saturating_duration_since(task.started),
                },
            );
        }
        for lease in self.leases.values() {
            if let Some(load) = loads.get_mut(lease.task_id.as_str()) {
                if lease.suspended {
                    load.waiting += 1;
                } else {
                    load.running += 1;
                }
            }
        }
        loads.into_values().collect()
    }

    /// Suspends or resumes leases until `allowed` of them hold fuel (or
    /// every lease does).
    fn rebalance(&mut self) {
        let now = Instant::now();
        while self.active() > self.allowed {
            let loads = self.loads(now);
            let Some(i) = pick_shrink(&loads) else { break };
            // The task's most recently started running lease gives way.
            let victim = self
                .leases
                .iter()
                .filter(|(_, l)| l.task_id == loads[i].task_id && !l.suspended)
                .max_by_key(|(id, l)| (l.started, **id))
                .map(|(id, _)| *id)
                .expect("a task with running leases");
            self.leases.get_mut(&victim).expect("lease").suspended = true;
            self.leave_queue(victim);
            tracing::debug!(task_id = %loads[i].task_id, lease = victim, "subtask suspended");
        }
        while self.active() < self.allowed {
            let loads = self.loads(now);
            let Some(i) = pick_grow(&loads) else { break };
            // The task's longest-waiting suspended lease resumes.
            let chosen = self
                .leases
                .iter()
                .filter(|(_, l)| l.task_id == loads[i].task_id && l.suspended)
                .min_by_key(|(id, l)| (l.started, **id))
                .map(|(id, _)| *id)
                .expect("a task with waiting leases");
            let lease = self.leases.get_mut(&chosen).expect("lease");
            lease.suspended = false;
            lease.wake.notify_one();
            tracing::debug!(task_id = %loads[i].task_id, lease = chosen, "subtask resumed");
        }
    }
}

/// One subtask's hold on the governor: the [`FuelGate`] of its calls.
/// Dropping the last reference frees its place for a suspended subtask.
#[derive(Debug)]
pub struct Lease {
    id: u64,
    shared: Arc<Shared>,
}

impl Lease {
    /// Whether the governor currently withholds fuel from this subtask.
    pub fn is_suspended(&self) -> bool {
        self.shared
            .lock()
            .leases
            .get(&self.id)
            .is_some_and(|l| l.suspended)
    }
}

impl FuelGate for Lease {
    fn acquire(self: Arc<Self>, fuel: u64) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.shared.acquire(self.id, fuel).await })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.lock().release(self.id);
    }
}

#[cfg(test)]
#[path = "governor_tests.rs"]
mod tests;
