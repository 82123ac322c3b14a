//! What a worker measures about the subtasks it runs, for `/metrics`:
//! run latency (start to report) by outcome, and the delay from a task's
//! submission to the start of its first step's subtasks.

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Labels of one series: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

fn seconds_histogram() -> Histogram {
    // 5 ms to about 11 min, doubling.
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

/// A worker's latency histograms. Cheap to clone; clones share the
/// counts.
#[derive(Debug, Clone)]
pub struct WorkerStats {
    /// Claim to report, by the reported state (`succeed`, `failed`,
    /// `paused`, ...), in seconds.
    pub run_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// Task submission to the start (claim) of a first-step subtask on its
    /// first attempt, in seconds. The submission time is the proposing
    /// server's clock, so clock skew between nodes shows here.
    pub start_delay_seconds: Histogram,
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            run_seconds: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            start_delay_seconds: seconds_histogram(),
        }
    }
}

impl WorkerStats {
    /// Records one run from its start (its claim, or the start of a quick
    /// run that claims with its report) to its report.
    pub fn observe_run(&self, state: &str, seconds: f64) {
        self.run_seconds
            .get_or_create(&vec![("state".to_string(), state.to_string())])
            .observe(seconds);
    }
}
