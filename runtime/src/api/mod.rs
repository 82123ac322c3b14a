//! Network services of a node.
//!
//! # Layout
//! - [`raft`]: the Raft transport between scheduler nodes (gRPC, batched per
//!   peer, bounded queues, chunked snapshots).
//! - [`meta`]: the client-facing `Meta` service, leader forwarding, error
//!   to status mapping.
//! - [`local_cluster`]: real `stoker server` processes on loopback (bench,
//!   tests).
//! - [`server`]: [`server::ServerConfig`] and starting a node's metadata
//!   layer with its gRPC server.
//! - [`rules`]: placement rules and the coordinator's schedulers and
//!   operators (admin handlers of the `Stoker` service).
//! - [`workers`]: the server side of the worker RPCs (heartbeat, the
//!   assignment long poll).

pub mod local_cluster;
pub mod meta;
pub mod raft;
pub mod rules;
pub mod server;
pub mod service;
pub mod workers;
