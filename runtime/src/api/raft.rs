//! Raft transport over gRPC: a `RaftTransport` service receiving batches and
//! streamed snapshots, and a client side with one bounded queue and one
//! sender task per peer. A sender keeps one `Stream` call open to its peer
//! and writes every batch into it; it reopens the call when it ends (the
//! peer went away) and falls back to one `Send` call per batch for a peer
//! that does not know `Stream`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use protobuf::Message as PbMessage;
use raft::eraftpb::{Message, MessageType};
use stoker_proto::meta::raft_transport_client::RaftTransportClient;
use stoker_proto::meta::raft_transport_server::RaftTransport;
use stoker_proto::meta::{RaftAck, RaftBatch, SnapshotChunk};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::auth::{AuthChannel, Bearer};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, warn};

use serde::{Deserialize, Serialize};

use crate::meta::{MetaError, MetaNode, Reporter, Transport};

/// Tunables of the gRPC Raft transport.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Messages queued per peer; more are dropped (Raft retransmits), so a
    /// down peer costs bounded memory. Default 4096.
    pub queue_capacity: usize,
    /// Most messages in one `Send` call. Default 256.
    pub max_batch: usize,
    /// Snapshot chunk size, in bytes. Default 1 MiB.
    pub chunk_bytes: usize,
    /// Timeout of one `Send` call, in milliseconds (a snapshot gets 30
    /// times this). Default 2000.
    pub send_timeout_ms: u64,
    /// Largest snapshot accepted, in bytes. Default 1 GiB.
    pub max_snapshot_bytes: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            queue_capacity: 4096,
            max_batch: 256,
            chunk_bytes: 1 << 20,
            send_timeout_ms: 2000,
            max_snapshot_bytes: 1 << 30,
        }
    }
}

impl TransportConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// [`MetaError::Config`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), MetaError> {
        if self.queue_capacity == 0 || self.max_batch == 0 || self.chunk_bytes == 0 {
            return Err(MetaError::Config(
                "transport queue_capacity, max_batch and chunk_bytes must be > 0".into(),
            ));
        }
        if self.send_timeout_ms == 0 {
            return Err(MetaError::Config(
                "transport send_timeout_ms must be > 0".into(),
            ));
        }
        Ok(())
    }

    fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.send_timeout_ms)
    }
}

struct Peer {
    addr: String,
    queue: mpsc::Sender<Message>,
}

/// The client half: implements [`Transport`] for the Raft loop.
pub struct GrpcTransport {
    me: u64,
    /// This node's gRPC address, sent along with every batch.
    advertise: String,
    config: TransportConfig,
    peers: Mutex<HashMap<u64, Peer>>,
    reporter: OnceLock<Reporter>,
    runtime: tokio::runtime::Handle,
    /// The cluster token every message carries.
    bearer: Bearer,
}

impl GrpcTransport {
    /// Sends `bearer` (the cluster's admin token) with every message.
    #[must_use]
    pub fn with_bearer(mut self, bearer: Bearer) -> Self {
        self.bearer = bearer;
        self
    }

    /// A transport for node `me` reachable at `advertise`, whose peer tasks
    /// run on `runtime`.
    pub fn new(
        me: u64,
        advertise: String,
        config: TransportConfig,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        GrpcTransport {
            me,
            advertise,
            config,
            peers: Mutex::new(HashMap::new()),
            reporter: OnceLock::new(),
            runtime,
            bearer: Bearer::default(),
        }
    }

    /// Registers a peer's address learnt from its messages, unless the
    /// replicated membership already gave one.
    pub fn learn_peer(&self, id: u64, addr: &str) {
        let known = self.peers.lock().expect("peers lock").contains_key(&id);
        if !known && id != self.me && !addr.is_empty() {
            debug!(peer = id, addr, "learnt peer address from its messages");
            self.set_peer(id, addr);
        }
    }

    fn report_failure(&self, msg: &Message) {
        if let Some(r) = self.reporter.get() {
            r.unreachable(msg.to);
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                r.snapshot_status(msg.to, false);
            }
        }
    }
}

impl Transport for GrpcTransport {
    fn attach(&self, reporter: Reporter) {
        let _ = self.reporter.set(reporter);
    }

    fn send(&self, msgs: Vec<Message>) {
        let peers = self.peers.lock().expect("peers lock");
        for msg in msgs {
            let Some(peer) = peers.get(&msg.to) else {
                debug!(
                    from = self.me,
                    to = msg.to,
                    "no address for peer, message dropped"
                );
                self.report_failure(&msg);
                continue;
            };
            if let Err(e) = peer.queue.try_send(msg) {
                let msg = match e {
                    mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
                };
                debug!(
                    from = self.me,
                    to = msg.to,
                    "peer queue full, message dropped"
                );
                self.report_failure(&msg);
            }
        }
    }

    fn set_peer(&self, id: u64, addr: &str) {
        let mut peers = self.peers.lock().expect("peers lock");
        if peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        let Some(reporter) = self.reporter.get().cloned() else {
            return;
        };
        let endpoint = match super::tls::endpoint(addr) {
            Ok(e) => e,
            Err(e) => {
                warn!(peer = id, addr, error = %e, "bad peer address");
                return;
            }
        };
        let (tx, rx) = mpsc::channel(self.config.queue_capacity);
        let _guard = self.runtime.enter();
        let client = |endpoint: tonic::transport::Endpoint| {
            RaftTransportClient::with_interceptor(endpoint.connect_lazy(), self.bearer.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX)
        };
        // The stream's call lasts as long as the peer is there: no call
        // timeout; HTTP/2 pings find a peer that stopped answering.
        let stream_endpoint = endpoint
            .clone()
            .http2_keep_alive_interval(self.config.send_timeout())
            .keep_alive_timeout(self.config.send_timeout())
            .keep_alive_while_idle(true);
        let sender = PeerSender {
            me: self.me,
            advertise: self.advertise.clone(),
            to: id,
            client: client(endpoint.timeout(self.config.send_timeout())),
            stream_client: client(stream_endpoint),
            stream: None,
            unary_only: false,
            reporter,
            config: self.config.clone(),
        };
        self.runtime.spawn(sender.run(rx));
        // Replacing the entry drops the old queue, which ends its task.
        peers.insert(
            id,
            Peer {
                addr: addr.to_string(),
                queue: tx,
            },
        );
    }

    fn remove_peer(&self, id: u64) {
        self.peers.lock().expect("peers lock").remove(&id);
    }
}

struct PeerSender {
    me: u64,
    advertise: String,
    to: u64,
    /// For `Send` and snapshots: each call bounded by the send timeout.
    client: RaftTransportClient<AuthChannel>,
    /// For `Stream`: no call timeout.
    stream_client: RaftTransportClient<AuthChannel>,
    /// The open `Stream` call, if any.
    stream: Option<OpenStream>,
    /// The peer answered `Stream` with `Unimplemented`: one call a batch.
    unary_only: bool,
    reporter: Reporter,
    config: TransportConfig,
}

/// Batches in flight on one `Stream` call before the sender waits (HTTP/2
/// flow control bounds what is on the wire).
const STREAM_DEPTH: usize = 64;

/// An open `Stream` call: batches go in through `batches`; `call` ends
/// when the peer closes it or the connection breaks.
struct OpenStream {
    batches: mpsc::Sender<RaftBatch>,
    call: JoinHandle<Result<Response<RaftAck>, Status>>,
}

impl PeerSender {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(self.config.max_batch);
        loop {
            // An open stream that breaks while the queue is empty is
            // reported at once, not at the next message.
            let next = {
                let ended = async {
                    match &mut self.stream {
                        Some(s) => (&mut s.call).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    m = rx.recv() => Ok(m),
                    r = ended => Err(r),
                }
            };
            let first = match next {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(result) => {
                    self.stream = None;
                    self.stream_ended(result);
                    continue;
                }
            };
            batch.push(first);
            while batch.len() < self.config.max_batch {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let (snaps, msgs): (Vec<_>, Vec<_>) = batch
                .drain(..)
                .partition(|m| m.get_msg_type() == MessageType::MsgSnapshot);
            if !msgs.is_empty() {
                self.send_batch(msgs).await;
            }
            for snap in snaps {
                self.send_snapshot(snap).await;
            }
        }
    }

    async fn send_batch(&mut self, msgs: Vec<Message>) {
        let mut encoded = Vec::with_capacity(msgs.len());
        for m in &msgs {
            match m.write_to_bytes() {
                Ok(b) => encoded.push(b),
                Err(e) => warn!(to = self.to, error = %e, "cannot encode raft message"),
            }
        }
        let req = RaftBatch {
            from: self.me,
            to: self.to,
            messages: encoded,
            from_addr: self.advertise.clone(),
        };
        if self.unary_only {
            if let Err(status) = self.client.send(req).await {
                debug!(to = self.to, error = %status.message(), "raft send failed");
                self.reporter.unreachable(self.to);
            }
            return;
        }
        if self.stream.as_ref().is_some_and(|s| s.call.is_finished()) {
            self.close_stream().await;
        }
        let open = match self.stream.take() {
            Some(s) => s,
            None => self.open_stream(),
        };
        match open.batches.send(req).await {
            Ok(()) => self.stream = Some(open),
            Err(_) => {
                self.stream = Some(open);
                self.close_stream().await;
            }
        }
    }

    fn open_stream(&self) -> OpenStream {
        let (batches, rx) = mpsc::channel::<RaftBatch>(STREAM_DEPTH);
        let outgoing =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        let mut client = self.stream_client.clone();
        let call = tokio::spawn(async move { client.stream(Request::new(outgoing)).await });
        OpenStream { batches, call }
    }

    /// Ends the open stream (it broke, or its call ended) and says why.
    async fn close_stream(&mut self) {
        let Some(open) = self.stream.take() else {
            return;
        };
        drop(open.batches);
        let result = open.call.await;
        self.stream_ended(result);
    }

    /// A `Stream` call ended: what was written into it since it broke is
    /// lost, so the peer is reported unreachable (Raft probes it and sends
    /// again).
    fn stream_ended(
        &mut self,
        result: Result<Result<Response<RaftAck>, Status>, tokio::task::JoinError>,
    ) {
        let status = match result {
            Ok(Ok(_)) => Status::unavailable("the peer ended the stream"),
            Ok(Err(status)) => status,
            Err(e) => Status::internal(format!("stream task: {e}")),
        };
        if status.code() == Code::Unimplemented {
            warn!(
                to = self.to,
                "peer does not know the Stream call: one Send call per batch"
            );
            self.unary_only = true;
        } else {
            debug!(to = self.to, error = %status.message(), "raft stream ended");
        }
        self.reporter.unreachable(self.to);
    }

    async fn send_snapshot(&mut self, msg: Message) {
        let index = msg.get_snapshot().get_metadata().index;
        let bytes = match msg.write_to_bytes() {
            Ok(b) => b,
            Err(e) => {
                warn!(to = self.to, error = %e, "cannot encode snapshot");
                self.reporter.snapshot_status(self.to, false);
                return;
            }
        };
        let size = bytes.len();
        let chunks: Vec<SnapshotChunk> = bytes
            .chunks(self.config.chunk_bytes.max(1))
            .map(|c| SnapshotChunk {
                from: self.me,
                to: self.to,
                data: c.to_vec(),
            })
            .collect();
        let mut req = Request::new(futures::stream::iter(chunks));
        // A snapshot may take longer than a batch.
        req.set_timeout(self.config.send_timeout() * 30);
        let ok = match self.client.snapshot(req).await {
            Ok(_) => true,
            Err(status) => {
                warn!(to = self.to, index, error = %status.message(), "snapshot send failed");
                self.reporter.unreachable(self.to);
                false
            }
        };
        debug!(to = self.to, index, size, ok, "snapshot sent");
        self.reporter.snapshot_status(self.to, ok);
    }
}

/// The server half: hands received messages to the local Raft loop.
pub struct RaftService {
    node: MetaNode,
    transport: Arc<GrpcTransport>,
    max_snapshot_bytes: usize,
    /// True when the node stops: open streams end (a graceful stop waits
    /// for every call, and a peer never ends its stream on its own).
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl RaftService {
    /// Serves messages for `node`, teaching `transport` the addresses of
    /// senders it does not know yet, until `stopping` turns true.
    pub fn new(
        node: MetaNode,
        transport: Arc<GrpcTransport>,
        config: &TransportConfig,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        RaftService {
            node,
            transport,
            max_snapshot_bytes: config.max_snapshot_bytes,
            stopping,
        }
    }

    /// Hands a batch's messages to the Raft loop.
    fn receive(&self, batch: RaftBatch) -> Result<(), Status> {
        self.check_to(batch.to)?;
        self.transport.learn_peer(batch.from, &batch.from_addr);
        for bytes in batch.messages {
            let msg = Message::parse_from_bytes(&bytes)
                .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
            self.node.step(msg);
        }
        Ok(())
    }

    fn check_to(&self, to: u64) -> Result<(), Status> {
        if to != self.node.id() {
            return Err(Status::invalid_argument(format!(
                "message for node {to} reached node {}",
                self.node.id()
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        self.receive(request.into_inner())?;
        Ok(Response::new(RaftAck {}))
    }

    async fn stream(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<RaftAck>, Status> {
        let mut batches = request.into_inner();
        let mut stopping = self.stopping.clone();
        let stop = async move {
            if stopping.wait_for(|s| *s).await.is_err() {
                // The server was dropped without a stop: serve on.
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(stop);
        loop {
            tokio::select! {
                batch = batches.message() => match batch? {
                    Some(batch) => self.receive(batch)?,
                    None => break,
                },
                () = &mut stop => break,
            }
        }
        Ok(Response::new(RaftAck {}))
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftAck>, Status> {
        let mut stream = request.into_inner();
        let mut buf = Vec::new();
        while let Some(chunk) = stream.message().await? {
            self.check_to(chunk.to)?;
            if buf.len() + chunk.data.len() > self.max_snapshot_bytes {
                return Err(Status::resource_exhausted("snapshot too large"));
            }
            buf.extend_from_slice(&chunk.data);
        }
        let msg = Message::parse_from_bytes(&buf)
            .map_err(|e| Status::invalid_argument(format!("bad snapshot message: {e}")))?;
        self.node.step(msg);
        Ok(Response::new(RaftAck {}))
    }
}

#[cfg(test)]
#[path = "raft_tests.rs"]
mod tests;
