//! The owner side: scheduling tasks onto nodes.
//!
//! # Layout
//! - `placement`: eligible nodes, admission by rank with stripes, assignment
//!   of pending subtasks, preemption — pure functions of a cluster view.

pub mod placement;
