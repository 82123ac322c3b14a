//! Tuning schedulers: given what the node looks like, say whether it should
//! run more, less or the same. Pluggable behind [`Scheduler`]; the resource
//! manager asks the current one on every tick and applies its [`Command`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::choice::TaskLoad;
use super::ResourceError;

/// What a scheduler asks the resource manager to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Admit one more concurrent subtask (up to the slots) and/or raise the
    /// fuel rate.
    Overclock,
    /// Shed one concurrent subtask (suspended between fuel quanta, not
    /// killed) and/or lower the fuel rate.
    Downclock,
    /// Leave things as they are.
    Hold,
}

/// One task as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStats {
    pub load: TaskLoad,
    pub tenant: String,
    /// Fuel granted to the task's subtasks on this node so far.
    pub fuel_used: u64,
}

/// What a scheduler decides from.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Whole-node CPU utilisation over the last tick, 0.0 to 1.0, counting
    /// load that Stoker did not cause; `None` when it cannot be read.
    pub cpu: Option<f64>,
    /// Subtasks holding fuel now.
    pub active: usize,
    /// Subtasks allowed to hold fuel at once.
    pub allowed: usize,
    /// The node's slots (the most `allowed` can be).
    pub slots: usize,
    /// The fuel rate in fuel/s; `None` when unlimited.
    pub fuel_rate: Option<f64>,
    /// The same rate in cores of this machine.
    pub level: f64,
    pub tasks: Vec<TaskStats>,
    /// Time since the last Overclock or Downclock was applied.
    pub since_last_tune: Duration,
}

/// Decides a [`Command`] from [`Stats`] on every tick of the resource
/// manager. Implementations must be cheap: they run on the tick.
pub trait Scheduler: Send + std::fmt::Debug {
    /// The name it is selected by.
    fn name(&self) -> &'static str;
    fn tune(&mut self, stats: &Stats) -> Command;
}

/// Bounds of the CPU-utilisation scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpuSchedulerConfig {
    /// Overclock while node CPU utilisation is below this, 0 to 1.
    /// Default: 0.5.
    pub low: f64,
    /// Downclock while node CPU utilisation is above this, 0 to 1.
    /// Default: 0.7.
    pub high: f64,
    /// Least time between two commands other than Hold, so the effect of one
    /// is measured before the next; below the manager's tick, every tick may
    /// tune. Default: 200 ms.
    #[serde(with = "millis")]
    pub min_interval: Duration,
}

impl Default for CpuSchedulerConfig {
    fn default() -> Self {
        CpuSchedulerConfig {
            low: 0.5,
            high: 0.7,
            min_interval: Duration::from_millis(200),
        }
    }
}

impl CpuSchedulerConfig {
    /// # Errors
    /// The bounds are not `0 <= low < high <= 1`.
    pub fn validate(&self) -> Result<(), ResourceError> {
        if !((0.0..1.0).contains(&self.low) && self.low < self.high && self.high <= 1.0) {
            return Err(ResourceError::Config(format!(
                "cpu scheduler bounds must satisfy 0 <= low < high <= 1, got low {} high {}",
                self.low, self.high
            )));
        }
        Ok(())
    }
}

/// Keeps node CPU utilisation between `low` and `high`: overclocks below,
/// downclocks above, holds in between, and never tunes more often than
/// `min_interval`. Holds when CPU cannot be read.
#[derive(Debug, Clone, Default)]
pub struct CpuScheduler {
    pub config: CpuSchedulerConfig,
}

impl Scheduler for CpuScheduler {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn tune(&mut self, stats: &Stats) -> Command {
        if stats.since_last_tune < self.config.min_interval {
            return Command::Hold;
        }
        match stats.cpu {
            Some(cpu) if cpu < self.config.low => Command::Overclock,
            Some(cpu) if cpu > self.config.high => Command::Downclock,
            _ => Command::Hold,
        }
    }
}

/// Never tunes: the node keeps the concurrency and rate it started with.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedScheduler;

impl Scheduler for FixedScheduler {
    fn name(&self) -> &'static str {
        "fixed"
    }

    fn tune(&mut self, _: &Stats) -> Command {
        Command::Hold
    }
}

/// The names [`by_name`] knows.
pub const BUILT_IN: &[&str] = &["cpu", "fixed"];

/// A built-in scheduler by name; `cpu` takes `cpu_config`.
///
/// # Errors
/// [`ResourceError::UnknownScheduler`] for a name not in [`BUILT_IN`], or an
/// invalid `cpu_config`.
pub fn by_name(
    name: &str,
    cpu_config: &CpuSchedulerConfig,
) -> Result<Box<dyn Scheduler>, ResourceError> {
    match name {
        "cpu" => {
            cpu_config.validate()?;
            Ok(Box::new(CpuScheduler {
                config: cpu_config.clone(),
            }))
        }
        "fixed" => Ok(Box::new(FixedScheduler)),
        other => Err(ResourceError::UnknownScheduler(other.to_string())),
    }
}

/// Durations in config files as milliseconds.
pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(cpu: Option<f64>, since_ms: u64) -> Stats {
        Stats {
            cpu,
            active: 2,
            allowed: 2,
            slots: 2,
            fuel_rate: None,
            level: 2.0,
            tasks: Vec::new(),
            since_last_tune: Duration::from_millis(since_ms),
        }
    }

    #[test]
    fn cpu_scheduler_keeps_cpu_in_the_band() {
        let mut s = CpuScheduler::default();
        assert_eq!(s.tune(&stats(Some(0.0), 1000)), Command::Overclock);
        assert_eq!(s.tune(&stats(Some(0.49), 1000)), Command::Overclock);
        assert_eq!(s.tune(&stats(Some(0.5), 1000)), Command::Hold);
        assert_eq!(s.tune(&stats(Some(0.6), 1000)), Command::Hold);
        assert_eq!(s.tune(&stats(Some(0.7), 1000)), Command::Hold);
        assert_eq!(s.tune(&stats(Some(0.71), 1000)), Command::Downclock);
        assert_eq!(s.tune(&stats(Some(1.0), 1000)), Command::Downclock);
    }

    #[test]
    fn cpu_scheduler_waits_the_minimum_interval() {
        let mut s = CpuScheduler::default();
        assert_eq!(s.tune(&stats(Some(0.95), 199)), Command::Hold);
        assert_eq!(s.tune(&stats(Some(0.05), 0)), Command::Hold);
        assert_eq!(s.tune(&stats(Some(0.95), 200)), Command::Downclock);
    }

    #[test]
    fn cpu_scheduler_holds_when_cpu_is_unknown() {
        let mut s = CpuScheduler::default();
        assert_eq!(s.tune(&stats(None, 10_000)), Command::Hold);
    }

    #[test]
    fn cpu_scheduler_bounds_are_configurable() {
        let mut s = CpuScheduler {
            config: CpuSchedulerConfig {
                low: 0.2,
                high: 0.3,
                min_interval: Duration::ZERO,
            },
        };
        assert_eq!(s.tune(&stats(Some(0.1), 0)), Command::Overclock);
        assert_eq!(s.tune(&stats(Some(0.25), 0)), Command::Hold);
        assert_eq!(s.tune(&stats(Some(0.4), 0)), Command::Downclock);
    }

    #[test]
    fn fixed_scheduler_never_tunes() {
        let mut s = FixedScheduler;
        for cpu in [None, Some(0.0), Some(0.6), Some(1.0)] {
            assert_eq!(s.tune(&stats(cpu, 60_000)), Command::Hold);
        }
    }

    #[test]
    fn schedulers_by_name() {
        let cfg = CpuSchedulerConfig::default();
        for name in BUILT_IN {
            assert_eq!(by_name(name, &cfg).unwrap().name(), *name);
        }
        assert!(matches!(
            by_name("nope", &cfg),
            Err(ResourceError::UnknownScheduler(n)) if n == "nope"
        ));
        let bad = CpuSchedulerConfig {
            low: 0.8,
            high: 0.7,
            ..cfg
        };
        assert!(by_name("cpu", &bad)
            .unwrap_err()
            .to_string()
            .contains("low"));
    }
}
