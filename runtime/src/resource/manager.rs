//! The resource manager: on every tick it samples node CPU, asks the current
//! [`Scheduler`] for a [`Command`] and applies it to the [`Governor`].
//!
//! Both knobs hang on one number, the *level*, in cores of this machine:
//! the fuel rate is `level` cores' worth of fuel per second (unlimited at
//! `slots`), and the allowed concurrency is `ceil(level)`. Overclock raises
//! the level by a factor, Downclock lowers it, so a command admits or sheds
//! a concurrent subtask when the level crosses a whole core and otherwise
//! moves the rate (DESIGN.md, "Resource manager").

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::cpu::CpuSampler;
use super::governor::Governor;
use super::scheduler::{self, Command, CpuSchedulerConfig, Scheduler, Stats};
use super::ResourceError;
use crate::sandbox::Sandbox;

/// Settings of the resource manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    /// Time between two ticks (CPU samples and scheduler decisions).
    /// Default: 250 ms.
    #[serde(with = "super::scheduler::millis")]
    pub tick: Duration,
    /// The scheduler at start: `cpu` or `fixed`. Default: `cpu`.
    pub scheduler: String,
    /// Bounds of the `cpu` scheduler.
    pub cpu: CpuSchedulerConfig,
    /// Lowest level, in cores. Default: 0.05.
    pub min_level: f64,
    /// Level at start, in cores; `None` starts at `slots` (unlimited rate,
    /// every slot allowed). Default: `None`.
    pub initial_level: Option<f64>,
    /// Factor an Overclock multiplies the level by (> 1). Default: 1.2.
    pub overclock_factor: f64,
    /// Factor a Downclock multiplies the level by (0 to 1). Default: 0.7.
    pub downclock_factor: f64,
    /// Least change of the level by one command, in cores. Default: 0.05.
    pub min_step: f64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            tick: Duration::from_millis(250),
            scheduler: "cpu".into(),
            cpu: CpuSchedulerConfig::default(),
            min_level: 0.05,
            initial_level: None,
            overclock_factor: 1.2,
            downclock_factor: 0.7,
            min_step: 0.05,
        }
    }
}

impl ManagerConfig {
    /// # Errors
    /// A setting out of range, or an unknown scheduler.
    pub fn validate(&self) -> Result<(), ResourceError> {
        let bad = |m: &str| Err(ResourceError::Config(m.into()));
        if self.tick.is_zero() {
            return bad("tick must be positive");
        }
        if !is_positive(self.min_level) {
            return bad("min_level must be positive");
        }
        if self.initial_level.is_some_and(|l| !is_positive(l)) {
            return bad("initial_level must be positive");
        }
        if !is_positive(self.overclock_factor - 1.0) {
            return bad("overclock_factor must be above 1");
        }
        if !(self.downclock_factor > 0.0 && self.downclock_factor < 1.0) {
            return bad("downclock_factor must be between 0 and 1");
        }
        if !(is_positive(self.min_step) || self.min_step == 0.0) {
            return bad("min_step must not be negative");
        }
        scheduler::by_name(&self.scheduler, &self.cpu).map(|_| ())
    }
}

/// Positive and not NaN.
fn is_positive(x: f64) -> bool {
    x > 0.0
}

/// The level after `command`, within `[min_level, slots]`. Pure.
pub fn next_level(level: f64, command: Command, config: &ManagerConfig, slots: usize) -> f64 {
    let max = slots as f64;
    let next = match command {
        Command::Hold => level,
        Command::Overclock => (level * config.overclock_factor).max(level + config.min_step),
        Command::Downclock => (level * config.downclock_factor).min(level - config.min_step),
    };
    next.clamp(config.min_level.min(max), max)
}

/// The allowed concurrency and the fuel rate (`None` = unlimited) of a
/// level. Pure.
pub fn knobs(level: f64, slots: usize, fuel_per_core: f64) -> (usize, Option<f64>) {
    let concurrency = ((level - 1e-9).ceil() as usize).clamp(1, slots);
    let rate = (level < slots as f64 - 1e-9).then_some(level * fuel_per_core);
    (concurrency, rate)
}

/// One tick as it happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TickReport {
    /// Time since the manager started.
    pub at: Duration,
    /// Node CPU utilisation over the tick, 0 to 1.
    pub cpu: Option<f64>,
    pub command: Command,
    /// The level after the command, in cores.
    pub level: f64,
    /// Allowed concurrency after the command.
    pub allowed: usize,
    /// Subtasks holding fuel.
    pub active: usize,
    /// Subtasks suspended by the governor.
    pub suspended: usize,
    /// Fuel per second after the command; `None` when unlimited.
    pub fuel_rate: Option<f64>,
}

/// What the manager is doing now (for summaries and, later, `node list`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManagerState {
    pub scheduler: String,
    pub last_command: Command,
    pub cpu: Option<f64>,
    pub level: f64,
    pub slots: usize,
    pub allowed: usize,
    pub active: usize,
    pub suspended: usize,
    pub fuel_rate: Option<f64>,
    pub fuel_per_core: f64,
    pub fuel_granted: u64,
    pub ticks: u64,
}

/// Fuel one core of this machine burns per second on `sandbox`'s engine
/// (about 0.4 s of one core, off the async executor).
///
/// # Errors
/// Calibration fails (fuel metering off).
pub async fn calibrate(sandbox: &Sandbox) -> Result<f64, ResourceError> {
    let engine = sandbox.engine().clone();
    tokio::task::spawn_blocking(move || {
        super::calibrate::fuel_per_core_second(&engine, Duration::from_millis(100), 3)
    })
    .await
    .map_err(|e| ResourceError::Calibration(format!("calibration panicked: {e}")))?
}

/// A node's resource manager. Dropping it stops the ticks; the governor
/// keeps its last rate and concurrency.
#[derive(Debug)]
pub struct ResourceManager {
    shared: Arc<Shared>,
    ticker: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    governor: Governor,
    fuel_per_core: f64,
    config: ManagerConfig,
    started: Instant,
    state: Mutex<State>,
    reports: broadcast::Sender<TickReport>,
}

#[derive(Debug)]
struct State {
    scheduler: Box<dyn Scheduler>,
    level: f64,
    last_tune: Instant,
    last_command: Command,
    cpu: Option<f64>,
    ticks: u64,
}

impl ResourceManager {
    /// Starts ticking on the current tokio runtime; the governor is set to
    /// the initial level at once.
    ///
    /// # Errors
    /// An invalid config or a non-positive `fuel_per_core`.
    pub fn start(
        governor: Governor,
        fuel_per_core: f64,
        config: ManagerConfig,
    ) -> Result<Self, ResourceError> {
        Self::start_with_cpu(governor, fuel_per_core, config, CpuSampler::default())
    }

    /// Like [`ResourceManager::start`], reading CPU with `sampler`.
    ///
    /// # Errors
    /// As [`ResourceManager::start`].
    pub fn start_with_cpu(
        governor: Governor,
        fuel_per_core: f64,
        config: ManagerConfig,
        mut sampler: CpuSampler,
    ) -> Result<Self, ResourceError> {
        let shared = Arc::new(Shared::new(governor, fuel_per_core, config)?);
        let (tick, s) = (shared.config.tick, shared.clone());
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            sampler.sample();
            loop {
                interval.tick().await;
                s.on_tick(sampler.sample());
            }
        });
        Ok(ResourceManager { shared, ticker })
    }

    /// Calibrates fuel per core on `sandbox`'s engine (about 0.4 s of one
    /// core) and starts managing `governor`.
    ///
    /// # Errors
    /// Calibration fails (fuel metering off), or an invalid config.
    pub async fn for_sandbox(
        sandbox: &Sandbox,
        governor: Governor,
        config: ManagerConfig,
    ) -> Result<Self, ResourceError> {
        let fuel_per_core = calibrate(sandbox).await?;
        Self::start(governor, fuel_per_core, config)
    }

    pub fn governor(&self) -> &Governor {
        &self.shared.governor
    }

    /// Fuel one core burns per second (the unit of the level).
    pub fn fuel_per_core(&self) -> f64 {
        self.shared.fuel_per_core
    }

    /// Switches the scheduler by name (one of [`scheduler::BUILT_IN`])
    /// without a restart; the level stays where it is.
    ///
    /// # Errors
    /// [`ResourceError::UnknownScheduler`].
    pub fn set_scheduler(&self, name: &str) -> Result<(), ResourceError> {
        self.set_scheduler_with(name, &self.shared.config.cpu)
    }

    /// Switches the scheduler by name, the `cpu` one with bounds `cpu`
    /// (how the cluster config changes the band at runtime); the level
    /// stays where it is.
    ///
    /// # Errors
    /// [`ResourceError::UnknownScheduler`], invalid bounds.
    pub fn set_scheduler_with(
        &self,
        name: &str,
        cpu: &CpuSchedulerConfig,
    ) -> Result<(), ResourceError> {
        let next = scheduler::by_name(name, cpu)?;
        let mut st = self.shared.lock();
        tracing::info!(
            from = st.scheduler.name(),
            to = name,
            low = cpu.low,
            high = cpu.high,
            "scheduler switched"
        );
        st.scheduler = next;
        Ok(())
    }

    /// Switches to a scheduler built elsewhere.
    pub fn set_custom_scheduler(&self, scheduler: Box<dyn Scheduler>) {
        self.shared.lock().scheduler = scheduler;
    }

    pub fn schedulers(&self) -> &'static [&'static str] {
        scheduler::BUILT_IN
    }

    pub fn state(&self) -> ManagerState {
        self.shared.state()
    }

    /// Every tick from now on. A slow receiver misses old ticks.
    pub fn subscribe(&self) -> broadcast::Receiver<TickReport> {
        self.shared.reports.subscribe()
    }

    /// Runs one tick with a given CPU reading (for tests and benchmarks that
    /// drive the manager themselves; the ticker keeps running too).
    pub fn tick_with(&self, cpu: Option<f64>) -> TickReport {
        self.shared.on_tick(cpu)
    }
}

impl Drop for ResourceManager {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

impl Shared {
    fn new(
        governor: Governor,
        fuel_per_core: f64,
        config: ManagerConfig,
    ) -> Result<Self, ResourceError> {
        config.validate()?;
        if !is_positive(fuel_per_core) {
            return Err(ResourceError::Config(format!(
                "fuel per core must be positive, got {fuel_per_core}"
            )));
        }
        let slots = governor.config().slots;
        let level = config
            .initial_level
            .unwrap_or(slots as f64)
            .clamp(config.min_level.min(slots as f64), slots as f64);
        let scheduler = scheduler::by_name(&config.scheduler, &config.cpu)?;
        let now = Instant::now();
        let shared = Shared {
            governor,
            fuel_per_core,
            config,
            started: now,
            state: Mutex::new(State {
                scheduler,
                level,
                last_tune: now,
                last_command: Command::Hold,
                cpu: None,
                ticks: 0,
            }),
            reports: broadcast::channel(1024).0,
        };
        shared.apply(level);
        Ok(shared)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, level: f64) -> (usize, Option<f64>) {
        let (concurrency, rate) = knobs(level, self.governor.config().slots, self.fuel_per_core);
        self.governor.set_rate(rate);
        let allowed = self.governor.set_concurrency(concurrency);
        (allowed, rate)
    }

    fn on_tick(&self, cpu: Option<f64>) -> TickReport {
        let snap = self.governor.snapshot();
        let mut st = self.lock();
        let now = Instant::now();
        let stats = Stats {
            cpu,
            active: snap.active,
            allowed: snap.allowed,
            slots: snap.slots,
            fuel_rate: snap.fuel_rate,
            level: st.level,
            tasks: snap.tasks,
            since_last_tune: now.saturating_duration_since(st.last_tune),
        };
        let command = st.scheduler.tune(&stats);
        st.cpu = cpu;
        st.ticks += 1;
        st.last_command = command;
        if command != Command::Hold {
            st.level = next_level(st.level, command, &self.config, snap.slots);
            st.last_tune = now;
        }
        let level = st.level;
        drop(st);
        let (allowed, fuel_rate) = self.apply(level);
        if command != Command::Hold {
            tracing::debug!(?command, cpu, level, allowed, "resource level tuned");
        }
        let after = self.governor.snapshot();
        let report = TickReport {
            at: now.saturating_duration_since(self.started),
            cpu,
            command,
            level,
            allowed,
            active: after.active,
            suspended: after.suspended,
            fuel_rate,
        };
        let _ = self.reports.send(report.clone());
        report
    }

    fn state(&self) -> ManagerState {
        let snap = self.governor.snapshot();
        let st = self.lock();
        ManagerState {
            scheduler: st.scheduler.name().to_string(),
            last_command: st.last_command,
            cpu: st.cpu,
            level: st.level,
            slots: snap.slots,
            allowed: snap.allowed,
            active: snap.active,
            suspended: snap.suspended,
            fuel_rate: snap.fuel_rate,
            fuel_per_core: self.fuel_per_core,
            fuel_granted: snap.fuel_granted,
            ticks: st.ticks,
        }
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
