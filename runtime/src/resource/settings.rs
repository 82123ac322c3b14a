//! The resource manager's settings in the replicated cluster config
//! (`stoker config set resource.scheduler fixed`): which keys exist, how
//! their values are checked, and how they override a node's own
//! `[resource]` table.
//!
//! | key | value |
//! | --- | --- |
//! | `resource.scheduler` | `cpu` or `fixed` |
//! | `resource.cpu.low` | overclock below this CPU utilisation, 0 to 1 |
//! | `resource.cpu.high` | downclock above this CPU utilisation, 0 to 1 |
//! | `resource.cpu.min_interval_ms` | least time between two tunings |

use std::collections::BTreeMap;
use std::time::Duration;

use super::manager::ManagerConfig;
use super::scheduler::BUILT_IN;
use super::ResourceError;

/// Every resource key of the cluster config starts with this.
pub const RESOURCE_CONFIG_PREFIX: &str = "resource.";
/// The tuning scheduler of every worker.
pub const KEY_SCHEDULER: &str = "resource.scheduler";
/// The lower CPU bound of the `cpu` scheduler.
pub const KEY_CPU_LOW: &str = "resource.cpu.low";
/// The upper CPU bound of the `cpu` scheduler.
pub const KEY_CPU_HIGH: &str = "resource.cpu.high";
/// The `cpu` scheduler's least interval between tunings, in milliseconds.
pub const KEY_CPU_MIN_INTERVAL: &str = "resource.cpu.min_interval_ms";
/// The keys above, for error messages and listings.
pub const KEYS: &[&str] = &[
    KEY_SCHEDULER,
    KEY_CPU_LOW,
    KEY_CPU_HIGH,
    KEY_CPU_MIN_INTERVAL,
];

/// The cluster's overrides of the nodes' resource settings; `None` keeps
/// the node's own value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterResource {
    pub scheduler: Option<String>,
    pub low: Option<f64>,
    pub high: Option<f64>,
    pub min_interval: Option<Duration>,
}

fn bound(key: &str, value: &str) -> Result<f64, ResourceError> {
    match value.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(ResourceError::Config(format!(
            "{key} must be a number between 0 and 1, got {value:?}"
        ))),
    }
}

impl ClusterResource {
    /// Reads the `resource.*` entries of the cluster config (other keys are
    /// ignored).
    ///
    /// # Errors
    /// An unknown `resource.*` key or a bad value, naming it.
    pub fn parse(entries: &BTreeMap<String, String>) -> Result<Self, ResourceError> {
        let mut out = ClusterResource::default();
        for (key, value) in entries {
            if !key.starts_with(RESOURCE_CONFIG_PREFIX) {
                continue;
            }
            match key.as_str() {
                KEY_SCHEDULER => {
                    let name = value.trim();
                    if !BUILT_IN.contains(&name) {
                        return Err(ResourceError::Config(format!(
                            "{KEY_SCHEDULER} must be one of {}, got {value:?}",
                            BUILT_IN.join(", ")
                        )));
                    }
                    out.scheduler = Some(name.to_string());
                }
                KEY_CPU_LOW => out.low = Some(bound(key, value)?),
                KEY_CPU_HIGH => out.high = Some(bound(key, value)?),
                KEY_CPU_MIN_INTERVAL => {
                    let ms = value.trim().parse::<u64>().map_err(|_| {
                        ResourceError::Config(format!(
                            "{key} must be a whole number of milliseconds, got {value:?}"
                        ))
                    })?;
                    out.min_interval = Some(Duration::from_millis(ms));
                }
                other => {
                    return Err(ResourceError::Config(format!(
                        "unknown resource setting {other:?} (known: {})",
                        KEYS.join(", ")
                    )))
                }
            }
        }
        if let (Some(low), Some(high)) = (out.low, out.high) {
            if low >= high {
                return Err(ResourceError::Config(format!(
                    "{KEY_CPU_LOW} ({low}) must be below {KEY_CPU_HIGH} ({high})"
                )));
            }
        }
        Ok(out)
    }

    /// Whether the cluster asks for a resource manager on every worker.
    pub fn wants_manager(&self) -> bool {
        self.scheduler.is_some()
    }

    /// `base` with the cluster's overrides.
    pub fn apply_to(&self, base: &ManagerConfig) -> ManagerConfig {
        let mut c = base.clone();
        if let Some(s) = &self.scheduler {
            c.scheduler = s.clone();
        }
        if let Some(v) = self.low {
            c.cpu.low = v;
        }
        if let Some(v) = self.high {
            c.cpu.high = v;
        }
        if let Some(v) = self.min_interval {
            c.cpu.min_interval = v;
        }
        c
    }
}

/// Checks a change of the cluster config before it is applied: setting
/// (`Some`) or deleting (`None`) `key`, given the current `resource.*`
/// entries. Keys outside `resource.` are always accepted.
///
/// # Errors
/// The reason the change would leave an invalid resource config.
pub fn check_change(
    current: &BTreeMap<String, String>,
    key: &str,
    value: Option<&str>,
) -> Result<(), ResourceError> {
    if !key.starts_with(RESOURCE_CONFIG_PREFIX) {
        return Ok(());
    }
    let mut next = current.clone();
    match value {
        Some(v) => {
            next.insert(key.to_string(), v.to_string());
        }
        None => {
            next.remove(key);
        }
    }
    ClusterResource::parse(&next).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_and_overrides_a_node_config() {
        let c = ClusterResource::parse(&map(&[
            (KEY_SCHEDULER, "fixed"),
            (KEY_CPU_LOW, "0.3"),
            (KEY_CPU_MIN_INTERVAL, "500"),
            ("owner.other", "x"),
        ]))
        .unwrap();
        assert!(c.wants_manager());
        let base = ManagerConfig::default();
        let merged = c.apply_to(&base);
        assert_eq!(merged.scheduler, "fixed");
        assert_eq!(merged.cpu.low, 0.3);
        assert_eq!(merged.cpu.high, base.cpu.high);
        assert_eq!(merged.cpu.min_interval, Duration::from_millis(500));
        assert_eq!(
            ClusterResource::parse(&map(&[])).unwrap(),
            ClusterResource::default()
        );
        assert!(!ClusterResource::default().wants_manager());
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        for (key, value, needle) in [
            (KEY_SCHEDULER, "nope", "cpu, fixed"),
            (KEY_CPU_LOW, "1.5", KEY_CPU_LOW),
            (KEY_CPU_HIGH, "x", KEY_CPU_HIGH),
            (KEY_CPU_MIN_INTERVAL, "-1", KEY_CPU_MIN_INTERVAL),
            ("resource.cpu.lo", "0.1", "unknown resource setting"),
        ] {
            let err = check_change(&BTreeMap::new(), key, Some(value)).unwrap_err();
            assert!(err.to_string().contains(needle), "{key}: {err}");
        }
        // The band is checked across keys.
        let current = map(&[(KEY_CPU_HIGH, "0.4")]);
        let err = check_change(&current, KEY_CPU_LOW, Some("0.6")).unwrap_err();
        assert!(err.to_string().contains("must be below"), "{err}");
        check_change(&current, KEY_CPU_LOW, Some("0.2")).unwrap();
        check_change(&current, KEY_CPU_HIGH, None).unwrap();
        check_change(&current, "other.key", Some("anything")).unwrap();
    }
}
