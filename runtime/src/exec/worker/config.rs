//! The worker's configuration: the `[worker]` table of the server config,
//! its defaults and its validation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::auth::Secret;
use crate::sandbox::CallLimits;

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
    /// A subtask of an idempotent step starts without waiting for its
    /// claim, and is claimed only if it still runs after this many
    /// milliseconds; a quicker run claims with its report, one replicated
    /// command instead of two. 0: claim before every run. At most 60,000.
    /// Default 50.
    pub claim_delay_ms: u64,
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
            claim_delay_ms: 50,
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
        if self.claim_delay_ms > 60_000 {
            return Err("worker.claim_delay_ms must be at most 60000".into());
        }
        Ok(())
    }

    pub(super) fn wait(&self) -> Duration {
        Duration::from_millis(u64::from(self.assignment_wait_ms))
    }

    pub(super) fn claim_delay(&self) -> Duration {
        Duration::from_millis(self.claim_delay_ms)
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let cfg = WorkerConfig::default();
        cfg.validate().unwrap();
        assert!(cfg.enabled && cfg.slots >= 1);
        assert_eq!(cfg.heartbeat_interval_ms, 1000);
        assert_eq!(cfg.assignment_wait_ms, 5000);
        assert_eq!(cfg.claim_delay_ms, 50);
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
                claim_delay_ms: 60_001,
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
