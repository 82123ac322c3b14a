//! The owner side: scheduling tasks onto nodes. The decision logic is pure
//! (functions of a cluster view), driven by the owner's loop.
//!
//! # Layout
//! - `placement`: eligible nodes, admission by rank with stripes, assignment
//!   of pending subtasks, preemption.
//! - `fair_share`: admission with slots divided between tenants by weight
//!   and capped by their `max_slots` quota.
//! - `task`: a task scheduler's next action from its state and its step's
//!   subtask states.
//! - `balance`: the balancer's moves and the liveness rule.
//! - [`coordinator`]: the PD-style coordinator: its view of the cluster, the
//!   schedulers (balance-subtask, hot-node, leader-placement) and the round
//!   that runs them after the checkers.
//! - [`checkers`]: the coordinator's checkers, run every round: down nodes
//!   (the node manager) and rule violations.
//! - [`operators`]: operators, their per-kind limits, and the controller
//!   that admits them, takes nodes' reports and retires them.
//! - [`rules`]: placement rules: the `rules.toml` file, validation and
//!   conflict detection, which rule applies to a task, rule status.
//! - [`rule_index`]: the `subtask` rules of one round indexed by key range,
//!   with the nodes each allows (what a round asks per task, made cheap).
//! - [`owner`]: the owner's loop (leader only) that carries all of it out
//!   through replicated commands and the module's `plan`/`finish`/`revert`.

pub mod balance;
pub mod checkers;
pub mod coordinator;
pub mod fair_share;
pub mod operators;
pub mod owner;
pub mod placement;
pub mod rule_index;
pub mod rules;
pub mod task;
