//! Stoker's protobuf messages.
//!
//! # Layout
//! - [`guest`]: the guest ABI messages (plan, run, finish, revert). This part
//!   depends only on `prost` and builds for `wasm32-wasip1`, so the guest SDK
//!   and hand-written guests in other languages share one definition.
//! - [`meta`] (feature `grpc`): the replicated metadata commands, snapshot
//!   format, Raft transport and metadata client services (tonic).
//! - [`api`] (feature `grpc`): the public `Stoker` service (`stoker.proto`):
//!   modules, tasks, nodes, worker heartbeats and assignments.

/// The guest ABI, version 1 (see `docs/guest-abi.md`).
pub mod guest {
    include!(concat!(env!("OUT_DIR"), "/stoker.guest.v1.rs"));

    /// The ABI version this crate describes; a module marks the version it
    /// targets by exporting `stoker_abi_v<N>`.
    pub const ABI_VERSION: u32 = 1;
}

/// Replicated metadata: state machine commands, snapshots, Raft transport and
/// the client-facing `Meta` service.
#[cfg(feature = "grpc")]
pub mod meta {
    include!(concat!(env!("OUT_DIR"), "/stoker.meta.v1.rs"));

    /// The newest version of [`EntryBatch`] this build writes and
    /// understands: 2 added [`CommandBatch`]. An entry is written at the
    /// lowest version that can hold it (1 unless it carries a batch), so a
    /// node of the previous release applies every entry it can.
    pub const COMMAND_VERSION: u32 = 2;
    /// The oldest version of [`EntryBatch`] this build still applies.
    pub const OLDEST_COMMAND_VERSION: u32 = 1;
    /// Most commands in one [`CommandBatch`].
    pub const MAX_BATCH_COMMANDS: usize = 4096;
    /// The version of [`SnapshotData`] this build writes and understands.
    pub const SNAPSHOT_VERSION: u32 = 1;
}

/// The public API that clients, workers and the CLI use (`stoker.proto`).
#[cfg(feature = "grpc")]
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/api/stoker.v1.rs"));
}

pub use prost::Message;
