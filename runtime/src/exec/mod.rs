//! Running tasks.
//!
//! # Layout
//! - `local`: the local runner (`stoker run-local`): every step of one task
//!   on this machine.

pub mod local;
