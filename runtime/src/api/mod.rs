//! Network services of a node.
//!
//! # Layout
//! - [`auth`]: who a request comes from (admin token, tenant tokens, the
//!   open mode), and the bearer token of internal clients.
//! - `tenancy`: the tenant, token and module-deletion calls.
//! - `watch`: the `WatchTask` stream; `logs`: `GetSubtaskLog`.
//! - [`raft`]: the Raft transport between scheduler nodes (gRPC, batched per
//!   peer, bounded queues, chunked snapshots).
//! - [`meta`]: the client-facing `Meta` service, leader forwarding, error
//!   to status mapping.
//! - [`local_cluster`]: real `stoker server` processes on loopback (bench,
//!   tests).
//! - [`server`]: [`server::ServerConfig`] and starting a node's metadata
//!   layer with its gRPC server.
//! - [`tls`]: the `[tls]` config table; TLS on the server and on every
//!   outgoing channel.
//! - [`rules`]: placement rules and the coordinator's schedulers and
//!   operators (admin handlers of the `Stoker` service).
//! - [`workers`]: the server side of the worker RPCs (heartbeat, the
//!   assignment long poll).
//! - [`http`]: HTTP beside gRPC: `/healthz`, `/readyz`, `/metrics`
//!   ([`metrics`]) and the web dashboard ([`dashboard`]) with its JSON
//!   endpoints and their one authorization function.

pub mod auth;
pub mod batch;
pub mod dashboard;
pub mod http;
pub mod local_cluster;
mod logs;
pub mod meta;
pub mod metrics;
pub mod raft;
pub mod rules;
pub mod server;
pub mod service;
mod tenancy;
pub mod tls;
mod watch;
pub mod workers;
