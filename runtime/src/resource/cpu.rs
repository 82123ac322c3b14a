//! Whole-node CPU utilisation from `/proc/stat`: every process counts, not
//! only Stoker, because the governor's job is to leave room for the rest.

use std::path::{Path, PathBuf};

use super::ResourceError;

/// Cumulative CPU time of all cores, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// Time not spent idle or waiting for I/O.
    pub busy: u64,
    pub total: u64,
}

impl CpuTimes {
    /// Utilisation between `earlier` and `self`, 0.0 to 1.0; `None` when no
    /// time passed (the counters move every clock tick, 10 ms usually).
    pub fn utilisation_since(&self, earlier: &CpuTimes) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.saturating_sub(earlier.busy);
        (total > 0).then(|| (busy as f64 / total as f64).clamp(0.0, 1.0))
    }
}

/// Parses the aggregate `cpu` line of `/proc/stat`:
/// `cpu user nice system idle iowait irq softirq steal guest guest_nice`.
/// Guest time is already part of user time and is not added again.
///
/// # Errors
/// No `cpu` line, or fewer than four numeric fields.
pub fn parse_proc_stat(text: &str) -> Result<CpuTimes, ResourceError> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .ok_or_else(|| ResourceError::CpuStat("no aggregate cpu line".into()))?;
    let fields = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse::<u64>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ResourceError::CpuStat(format!("bad cpu field: {e}")))?;
    if fields.len() < 4 {
        return Err(ResourceError::CpuStat(format!(
            "cpu line has {} fields, expected at least 4",
            fields.len()
        )));
    }
    let total: u64 = fields.iter().sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Ok(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// Reads utilisation since its previous reading.
#[derive(Debug)]
pub struct CpuSampler {
    path: PathBuf,
    last: Option<CpuTimes>,
}

impl Default for CpuSampler {
    fn default() -> Self {
        CpuSampler::new("/proc/stat")
    }
}

impl CpuSampler {
    pub fn new(path: impl AsRef<Path>) -> Self {
        CpuSampler {
            path: path.as_ref().to_path_buf(),
            last: None,
        }
    }

    /// The cumulative counters now.
    ///
    /// # Errors
    /// The file cannot be read or parsed.
    pub fn read(&self) -> Result<CpuTimes, ResourceError> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| {
            ResourceError::CpuStat(format!("cannot read {}: {e}", self.path.display()))
        })?;
        parse_proc_stat(&text)
    }

    /// Utilisation since the previous call; `None` on the first call, when
    /// no clock tick passed, or when the file cannot be read (logged).
    pub fn sample(&mut self) -> Option<f64> {
        let now = match self.read() {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sample node cpu");
                return None;
            }
        };
        let util = self.last.and_then(|last| now.utilisation_since(&last));
        self.last = Some(now);
        util
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  212645 10 16819 15459 105 0 49 240 0 0\n\
                        cpu0 106334 0 8237 7977 18 0 2 108 0 0\n\
                        intr 1 2 3\n";

    #[test]
    fn parses_the_aggregate_line() {
        let t = parse_proc_stat(STAT).unwrap();
        assert_eq!(t.total, 212645 + 10 + 16819 + 15459 + 105 + 49 + 240);
        assert_eq!(t.busy, t.total - 15459 - 105);
    }

    #[test]
    fn rejects_a_file_without_a_cpu_line() {
        assert!(parse_proc_stat("intr 1 2\n").is_err());
        assert!(parse_proc_stat("cpu 1 2\n").is_err());
        assert!(parse_proc_stat("cpu 1 x 3 4\n").is_err());
    }

    #[test]
    fn utilisation_is_busy_over_total_between_readings() {
        let a = CpuTimes {
            busy: 100,
            total: 200,
        };
        let b = CpuTimes {
            busy: 160,
            total: 300,
        };
        assert_eq!(b.utilisation_since(&a), Some(0.6));
        assert_eq!(a.utilisation_since(&a), None);
        assert_eq!(a.utilisation_since(&b), None);
    }

    #[test]
    fn samples_this_machine() {
        let mut s = CpuSampler::default();
        assert_eq!(s.sample(), None);
        let t0 = s.read().unwrap();
        // Burn ~50 ms so at least one clock tick passes.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let t1 = s.read().unwrap();
        let util = t1.utilisation_since(&t0).unwrap();
        assert!(util > 0.0 && util <= 1.0, "utilisation {util}");
    }
}
