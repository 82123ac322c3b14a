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

/// A peer that counts the messages it gets by each call; `streams: false`
/// answers `Stream` as a build without it would.
struct CountingPeer {
    streams: bool,
    by_send: Arc<std::sync::atomic::AtomicUsize>,
    by_stream: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl RaftTransport for CountingPeer {
    async fn send(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let n = request.into_inner().messages.len();
        self.by_send
            .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        Ok(Response::new(RaftAck {}))
    }

    async fn stream(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<RaftAck>, Status> {
        if !self.streams {
            return Err(Status::unimplemented("unknown method Stream"));
        }
        let mut batches = request.into_inner();
        while let Some(b) = batches.message().await? {
            let n = b.messages.len();
            self.by_stream
                .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(Response::new(RaftAck {}))
    }

    async fn snapshot(
        &self,
        _: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftAck>, Status> {
        Err(Status::unimplemented("no snapshots here"))
    }
}

/// Sends heartbeats to peer 2 every 20 ms until `done` says so (at most
/// 10 s); the messages the peer got by `Send` and by `Stream`.
async fn deliver(streams: bool) -> (usize, usize, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (by_send, by_stream) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = CountingPeer {
        streams,
        by_send: by_send.clone(),
        by_stream: by_stream.clone(),
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(stoker_proto::meta::raft_transport_server::RaftTransportServer::new(peer))
            .serve_with_incoming(tokio_stream_of(listener)),
    );
    let (tx, mut rx) = mpsc::channel(100_000);
    let t = GrpcTransport::new(
        1,
        "127.0.0.1:1".into(),
        TransportConfig::default(),
        tokio::runtime::Handle::current(),
    );
    t.attach(Reporter::new(&tx));
    t.set_peer(2, &addr.to_string());
    let mut unreachable = 0;
    for _ in 0..500 {
        t.send(vec![msg(2, MessageType::MsgHeartbeat)]);
        tokio::time::sleep(Duration::from_millis(20)).await;
        unreachable += drain(&mut rx).0;
        if by_send.load(Ordering::SeqCst) + by_stream.load(Ordering::SeqCst) >= 20 {
            break;
        }
    }
    server.abort();
    (
        by_send.load(Ordering::SeqCst),
        by_stream.load(Ordering::SeqCst),
        unreachable,
    )
}

fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let accepted = l.accept().await.map(|(s, _)| s);
        Some((accepted, l))
    })
}

#[tokio::test]
async fn batches_go_on_one_stream_and_by_send_to_a_peer_without_it() {
    // A current peer gets every message on the stream, none by `Send`,
    // and nothing is reported unreachable.
    let (by_send, by_stream, unreachable) = deliver(true).await;
    assert_eq!((by_send, unreachable), (0, 0));
    assert!(by_stream >= 20, "{by_stream}");
    // An older peer refuses the stream once (what was written into it is
    // reported lost) and gets the rest one `Send` call a batch.
    let (by_send, by_stream, unreachable) = deliver(false).await;
    assert_eq!((by_stream, unreachable), (0, 1));
    assert!(by_send >= 20, "{by_send}");
}
