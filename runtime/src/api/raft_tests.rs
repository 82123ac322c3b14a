//! The gRPC transport toward a peer that is down: bounded queue, drops
//! reported as unreachable, failed snapshots reported.

use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;

use super::*;
use crate::api::local_cluster::free_port;
use crate::meta::node::Inbound;

fn msg(to: u64, ty: MessageType) -> Message {
    let mut m = Message {
        from: 1,
        to,
        ..Default::default()
    };
    m.set_msg_type(ty);
    m
}

fn drain(rx: &mut mpsc::Receiver<Inbound>) -> (usize, usize) {
    let (mut unreachable, mut snap_failed) = (0, 0);
    while let Ok(m) = rx.try_recv() {
        match m {
            Inbound::Unreachable(2) => unreachable += 1,
            Inbound::SnapshotStatus { to: 2, ok: false } => snap_failed += 1,
            _ => {}
        }
    }
    (unreachable, snap_failed)
}

#[tokio::test]
async fn down_peer_costs_bounded_memory_and_is_reported() {
    let (tx, mut rx) = mpsc::channel(100_000);
    let config = TransportConfig {
        queue_capacity: 8,
        max_batch: 4,
        send_timeout_ms: 500,
        ..TransportConfig::default()
    };
    let t = GrpcTransport::new(
        1,
        "127.0.0.1:1".into(),
        config,
        tokio::runtime::Handle::current(),
    );
    t.attach(Reporter::new(&tx));
    // Nothing listens there.
    t.set_peer(2, &format!("127.0.0.1:{}", free_port().unwrap()));

    // The peer task has not run yet (current-thread runtime): the queue takes
    // exactly its capacity and every other message is dropped and reported.
    t.send(
        (0..1000)
            .map(|_| msg(2, MessageType::MsgHeartbeat))
            .collect(),
    );
    assert_eq!(drain(&mut rx), (1000 - 8, 0));
    t.send(vec![msg(2, MessageType::MsgSnapshot)]);
    assert_eq!(drain(&mut rx), (1, 1));

    // Once the peer task runs, failed sends are reported too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (unreachable, _) = drain(&mut rx);
    assert!(unreachable >= 1, "failed sends not reported");

    // A peer without an address: dropped and reported at once.
    t.remove_peer(2);
    t.send(vec![msg(2, MessageType::MsgAppend)]);
    assert_eq!(drain(&mut rx), (1, 0));
}
