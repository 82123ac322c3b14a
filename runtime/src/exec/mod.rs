//! Running tasks.
//!
//! # Layout
//! - `local`: the local runner (`stoker run-local`): every step of one task
//!   on this machine.
//! - `worker`: the task executor manager of a worker node: heartbeats,
//!   assignment long polls, claims, sandboxed runs and fenced reports.
//! - `steps`: operator steps from heartbeat replies, what a worker does
//!   about them and reports back (pure).
//! - `stats`: the latency histograms a worker keeps for `/metrics`.

pub mod local;
pub mod stats;
pub mod steps;
pub mod worker;
