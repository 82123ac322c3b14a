//! Stoker: a distributed task execution platform whose task logic is
//! WebAssembly.
//!
//! # Layout
//! - [`meta`]: replicated metadata: Raft node, redb log and state machine,
//!   commands, proposals and reads.
//! - [`api`]: gRPC services: Raft transport between scheduler nodes, the
//!   metadata API, starting a node's server.
//! - [`sandbox`]: the wasmtime engine, module validation and cache, limits,
//!   host functions, and typed calls into a guest.
//! - [`blob`]: tenant-confined blob storage over `object_store`.
//! - [`exec`]: running tasks; the local runner drives a whole task on one machine.
//! - [`model`]: task and subtask states and transitions, rank, node and task
//!   views: the pure data model every role shares.
//! - [`sched`]: the owner's scheduling: eligible nodes, admission, assignment,
//!   preemption.
//! - [`resource`]: the node's resource manager: the fuel governor (a token
//!   bucket every sandbox takes its fuel from) and pluggable tuning schedulers.
//! - `cli`: the `stoker` command line (in the binary).

pub mod api;
pub mod blob;
pub mod exec;
pub mod meta;
pub mod model;
pub mod resource;
pub mod sandbox;
pub mod sched;
