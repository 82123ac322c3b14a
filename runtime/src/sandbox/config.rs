//! Engine-wide sandbox settings and per-call limits.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Settings of a node's one wasmtime engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Where compiled modules are cached (`<sha256>-<engine>.cwasm`); `None`
    /// keeps them in memory only. Default: `None`.
    pub cache_dir: Option<PathBuf>,
    /// Instances that can exist at once (pooling allocator slots). A call
    /// beyond it fails to instantiate, so size it above the node's slots plus
    /// its planning calls. Default: 128.
    pub max_instances: u32,
    /// Largest linear memory any guest may have, in bytes; per-call limits
    /// are at most this. Default: 4 GiB.
    pub max_memory_bytes: u64,
    /// Wasm stack a guest may use, in bytes. Default: 1 MiB.
    pub max_wasm_stack: usize,
    /// Fuel a guest burns between two yields to the executor (the quantum the
    /// fuel governor hands out). Default: 1,000,000 (about a millisecond).
    pub fuel_yield_interval: u64,
    /// Meter fuel. Turning it off removes fuel limits, `fuel_exhausted` and
    /// yielding to the executor, so it is only for measuring what metering
    /// costs. Default: true.
    pub consume_fuel: bool,
    /// Host stack for a running guest (must exceed `max_wasm_stack`), in
    /// bytes. Default: 2 MiB.
    pub async_stack_size: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            cache_dir: None,
            max_instances: 128,
            max_memory_bytes: 4 << 30,
            max_wasm_stack: 1 << 20,
            fuel_yield_interval: 1_000_000,
            consume_fuel: true,
            async_stack_size: 2 << 20,
        }
    }
}

impl SandboxConfig {
    /// # Errors
    /// A message naming the first setting that is out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_instances == 0 {
            return Err("max_instances must be at least 1".into());
        }
        if self.max_memory_bytes < 64 * 1024 || self.max_memory_bytes > 4 << 30 {
            return Err("max_memory_bytes must be between 64 KiB and 4 GiB".into());
        }
        if self.fuel_yield_interval == 0 {
            return Err("fuel_yield_interval must be at least 1".into());
        }
        if self.async_stack_size <= self.max_wasm_stack {
            return Err("async_stack_size must be larger than max_wasm_stack".into());
        }
        Ok(())
    }
}

/// Limits of one call (plan, run, finish or revert).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallLimits {
    /// Fuel the call may burn (instantiation included). Default: 10 billion.
    pub fuel: u64,
    /// Largest linear memory, in bytes. Default: 256 MiB.
    pub memory_bytes: u64,
    /// Largest table, in elements. Default: 100,000.
    pub table_elements: usize,
    /// Wall-clock time the call may take, not counting time it waits for
    /// the fuel governor (a suspended call is paused, not killed).
    /// Default: 60 s.
    #[serde(with = "humantime_secs")]
    pub deadline: Duration,
    /// Largest response a guest may return, in bytes. Default: 16 MiB.
    pub max_output_bytes: usize,
    /// Capacity of the call's captured log, in bytes. Default: 64 KiB.
    pub log_bytes: usize,
    /// Largest checkpoint, in bytes. Default: 1 MiB.
    pub checkpoint_bytes: usize,
    /// Largest blob a guest may write or read at once, in bytes.
    /// Default: 256 MiB.
    pub blob_bytes: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            fuel: 10_000_000_000,
            memory_bytes: 256 << 20,
            table_elements: 100_000,
            deadline: Duration::from_secs(60),
            max_output_bytes: 16 << 20,
            log_bytes: 64 << 10,
            checkpoint_bytes: 1 << 20,
            blob_bytes: 256 << 20,
        }
    }
}

/// Durations in config files as (fractional) seconds.
mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        SandboxConfig::default().validate().unwrap();
        let bad = SandboxConfig {
            fuel_yield_interval: 0,
            ..SandboxConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("fuel_yield_interval"));
    }
}
