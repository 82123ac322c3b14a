//! The node's resource manager: fuel is the CPU governor (DESIGN.md,
//! "Resource manager").
//!
//! Every running sandbox takes each fuel quantum from the node's
//! [`Governor`], a token bucket in fuel per second that also caps how many
//! subtasks hold fuel at once. The [`ResourceManager`] ticks, reads node CPU
//! and asks a pluggable [`Scheduler`] whether to overclock, downclock or
//! hold, and moves the governor's rate and concurrency accordingly.
//!
//! # Layout
//! - `gate`: [`FuelGate`] and [`Governed`], the hook that makes a sandbox
//!   take every quantum from a gate.
//! - `governor`: the token bucket, fair waiting, suspension and per-task
//!   and per-tenant fuel accounting.
//! - `fair`: weights by tenant and rank, start-time fair queueing (pure).
//! - `choice`: which task grows or shrinks when concurrency changes (pure).
//! - `scheduler`: [`Scheduler`], [`Command`], [`Stats`] and the built-in
//!   `cpu` and `fixed` schedulers.
//! - `manager`: the tick loop, the level that drives rate and concurrency.
//! - `cpu`: whole-node CPU utilisation from `/proc/stat`.
//! - `calibrate`: fuel one core burns per second on this machine.
//! - `control`: a worker's governor and manager, reconfigured by the
//!   cluster config; the load its heartbeats carry.
//! - `settings`: the `resource.*` keys of the cluster config.
//! - `hog`: a busy child process, the competing load of tests and benches.

pub mod calibrate;
pub mod choice;
pub mod control;
pub mod cpu;
pub mod fair;
mod gate;
pub mod governor;
pub mod hog;
pub mod manager;
pub mod scheduler;
pub mod settings;

pub use control::ResourceControl;
pub use gate::{DeadlineExceeded, FuelGate, Governed};
pub use governor::{Governor, GovernorConfig, GovernorSnapshot, Lease, TaskInfo};
pub use manager::{ManagerConfig, ManagerState, ResourceManager, TickReport};
pub use scheduler::{Command, Scheduler, Stats};

/// Errors of the resource subsystem.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("invalid resource config: {0}")]
    Config(String),
    #[error("unknown scheduler {0:?} (known: cpu, fixed)")]
    UnknownScheduler(String),
    #[error("calibration failed: {0}")]
    Calibration(String),
    #[error("cannot read node cpu: {0}")]
    CpuStat(String),
    #[error("cpu hog: {0}")]
    Hog(String),
}
