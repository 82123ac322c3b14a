//! What the Raft loop needs from the network, and how the network reports
//! back. Implemented by the gRPC transport (`crate::api::raft`) and by the
//! fault-injecting in-process network of the tests.

use raft::eraftpb::Message;
use tokio::sync::mpsc;

use super::node::Inbound;

/// Delivers Raft messages to peers. Implementations must never block the
/// Raft loop and never buffer without bound: a message that cannot be queued
/// is dropped (Raft retransmits).
pub trait Transport: Send + Sync + 'static {
    /// Called once when the node starts, before any other call.
    fn attach(&self, reporter: Reporter);
    /// Queues messages for their destinations (`msg.to`).
    fn send(&self, msgs: Vec<Message>);
    /// Sets or updates where peer `id` listens.
    fn set_peer(&self, id: u64, addr: &str);
    /// Forgets peer `id` (removed from the cluster).
    fn remove_peer(&self, id: u64);
}

/// The transport's way back into the Raft loop: unreachable peers and
/// snapshot outcomes (`report_unreachable`, `report_snapshot`). Holds only a
/// weak reference, so a transport never keeps a stopped node alive.
#[derive(Clone, Debug)]
pub struct Reporter {
    inbox: mpsc::WeakSender<Inbound>,
}

impl Reporter {
    pub(crate) fn new(inbox: &mpsc::Sender<Inbound>) -> Self {
        Reporter {
            inbox: inbox.downgrade(),
        }
    }

    fn report(&self, msg: Inbound) {
        if let Some(inbox) = self.inbox.upgrade() {
            // A full inbox drops the report; Raft probes the peer again.
            let _ = inbox.try_send(msg);
        }
    }

    /// Peer `id` could not be reached.
    pub fn unreachable(&self, id: u64) {
        self.report(Inbound::Unreachable(id));
    }

    /// A snapshot sent to `id` was delivered (`ok`) or failed.
    pub fn snapshot_status(&self, id: u64, ok: bool) {
        self.report(Inbound::SnapshotStatus { to: id, ok });
    }
}
