//! Stoker runtime.
//!
//! # Layout
//! - [`meta`]: replicated metadata: Raft node, redb log and state machine,
//!   commands, proposals and reads.
//! - [`api`]: gRPC services: Raft transport between scheduler nodes, the
//!   metadata API, starting a node's server.
//! - [`sandbox`]: the wasmtime sandbox.
pub mod api;
pub mod meta;
pub mod sandbox;
