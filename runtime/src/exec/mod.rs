//! Running tasks.
//!
//! # Layout
//! - `local`: the local runner (`stoker run-local`): every step of one task
//!   on this machine.
//! - `worker`: the task executor manager of a worker node: heartbeats,
//!   assignment long polls, claims, sandboxed runs and fenced reports.
//! - `stats`: the latency histograms a worker keeps for `/metrics`.

pub mod local;
pub mod stats;
pub mod worker;
