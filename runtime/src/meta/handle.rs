//! [`MetaNode`]: the handle the rest of the process uses to reach the Raft
//! loop. Writes go through [`MetaNode::propose`] (batched, forwarded to the
//! leader, retried within a deadline); reads are linearizable through
//! ReadIndex or local when staleness is acceptable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use raft::RawNode;
use stoker_proto::meta::{
    membership_request::Kind as MemberKind, Command, CommandResult, Query, QueryResult,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info};

use super::node::{Driver, Inbound, Published};
use super::transport::{Reporter, Transport};
use super::{state_machine, LeaderState, MetaConfig, MetaError, NodeStatus, RedbStorage};

/// Sends leader-only requests to the leader when this node is not it
/// (gRPC between processes, direct calls in tests).
pub trait Forwarder: Send + Sync + 'static {
    /// Proposes `cmd` on `leader` without further forwarding.
    fn propose(
        &self,
        leader: u64,
        cmd: Command,
        request_id: RequestId,
    ) -> BoxFuture<'static, Result<CommandResult, MetaError>>;
    /// Changes membership on `leader`.
    fn change_membership(
        &self,
        leader: u64,
        kind: MemberKind,
        id: u64,
        addr: String,
    ) -> BoxFuture<'static, Result<(), MetaError>>;
    /// Asks `leader` to hand leadership to `to`.
    fn transfer_leader(&self, leader: u64, to: u64) -> BoxFuture<'static, Result<(), MetaError>>;
}

/// Names one logical write across its retries (16 bytes); the state machine
/// applies a request id at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub [u8; 16]);

impl RequestId {
    /// A fresh id: the node id, then a per-process counter started from the
    /// clock, so ids do not repeat across restarts.
    pub fn new(node: u64) -> Self {
        static START: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let start = *START.get_or_init(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
        let n = start.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed));
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&node.to_be_bytes());
        id[8..].copy_from_slice(&n.to_be_bytes());
        RequestId(id)
    }

    /// A random id, for clients that have no node id: 16 bytes from the
    /// OS's random source (falling back to the std hasher's per-process
    /// random keys mixed with the clock and process id).
    pub fn random() -> Self {
        use std::io::Read as _;
        let mut id = [0u8; 16];
        if std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut id))
            .is_ok()
        {
            return RequestId(id);
        }
        use std::hash::{BuildHasher as _, Hasher as _};
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let state = std::collections::hash_map::RandomState::new();
        for (i, half) in id.chunks_mut(8).enumerate() {
            let mut h = state.build_hasher();
            h.write_u128(nanos);
            h.write_u32(std::process::id());
            h.write_usize(i);
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
        RequestId(id)
    }

    /// Parses 16 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        b.try_into().ok().map(RequestId)
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read started (ReadIndex).
    Linearizable,
    /// This node's applied state, possibly behind the leader.
    Stale,
}

struct Inner {
    id: u64,
    config: MetaConfig,
    inbox: mpsc::Sender<Inbound>,
    storage: RedbStorage,
    applied: watch::Receiver<u64>,
    leader: watch::Receiver<LeaderState>,
    is_leader: watch::Receiver<bool>,
    forwarder: OnceLock<Arc<dyn Forwarder>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Seconds from `propose` to its result, successful proposals only.
    proposal_latency: prometheus_client::metrics::histogram::Histogram,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.inbox.try_send(Inbound::Shutdown);
    }
}

/// Handle to this process's Raft node. Cheap to clone.
#[derive(Clone)]
pub struct MetaNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MetaNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaNode")
            .field("id", &self.inner.id)
            .finish()
    }
}

/// Backoff between retries of a request: 10 ms doubling up to 200 ms.
fn next_backoff(b: Duration) -> Duration {
    (b * 2).min(Duration::from_millis(200))
}

impl MetaNode {
    /// Starts node `id` on `storage`. A fresh store is bootstrapped with
    /// `initial_members` (id, address) as voters; pass none for a node that
    /// joins an existing cluster through `add`. An initialized store ignores
    /// `initial_members` and recovers from its own state.
    ///
    /// # Errors
    /// Invalid config, storage failures, raft refusing the recovered state.
    pub fn start(
        id: u64,
        config: MetaConfig,
        storage: RedbStorage,
        initial_members: &[(u64, String)],
        transport: Arc<dyn Transport>,
    ) -> Result<MetaNode, MetaError> {
        config.validate()?;
        if id == 0 {
            return Err(MetaError::Config("node id must be > 0".into()));
        }
        if storage.is_fresh() && !initial_members.is_empty() {
            info!(
                node_id = id,
                members = initial_members.len(),
                "bootstrapping new cluster"
            );
            storage.initialize(initial_members)?;
        }
        let (applied, _) = storage.applied();
        let logger = super::logger::raft_logger(id);
        let raw = RawNode::new(&config.raft_config(id, applied), storage.clone(), &logger)?;
        let (tx, rx) = mpsc::channel(config.inbox_capacity);
        transport.attach(Reporter::new(&tx));
        for (peer, addr) in storage.members()? {
            if peer != id {
                transport.set_peer(peer, &addr);
            }
        }
        let (applied_tx, applied_rx) = watch::channel(applied);
        let (leader_tx, leader_rx) = watch::channel(LeaderState::default());
        let (is_leader_tx, is_leader_rx) = watch::channel(false);
        let published = Published {
            applied: applied_tx,
            leader: leader_tx,
            is_leader: is_leader_tx,
        };
        let driver = Driver::new(id, raw, transport, rx, config.clone(), published);
        let thread = std::thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("raft runtime builds");
                rt.block_on(driver.run());
            })
            .map_err(|e| MetaError::Config(format!("cannot spawn raft thread: {e}")))?;
        info!(node_id = id, applied, "metadata node started");
        Ok(MetaNode {
            inner: Arc::new(Inner {
                id,
                config,
                inbox: tx,
                storage,
                applied: applied_rx,
                leader: leader_rx,
                is_leader: is_leader_rx,
                forwarder: OnceLock::new(),
                thread: Mutex::new(Some(thread)),
                proposal_latency: prometheus_client::metrics::histogram::Histogram::new(
                    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16),
                ),
            }),
        })
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The node's storage (applied state, digest, members).
    pub fn storage(&self) -> &RedbStorage {
        &self.inner.storage
    }

    /// Installs how leader-only requests reach the leader. Only the first
    /// call has an effect.
    pub fn set_forwarder(&self, f: Arc<dyn Forwarder>) {
        let _ = self.inner.forwarder.set(f);
    }

    /// Stops the Raft loop and waits for its thread. Pending requests fail
    /// with [`MetaError::Stopped`].
    pub fn shutdown(&self) {
        let _ = self.inner.inbox.try_send(Inbound::Shutdown);
        let handle = self.inner.thread.lock().expect("thread lock").take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Hands an incoming Raft message to the loop; dropped if the inbox is
    /// full (Raft retransmits).
    pub fn step(&self, msg: raft::eraftpb::Message) {
        if self
            .inner
            .inbox
            .try_send(Inbound::Raft(Box::new(msg)))
            .is_err()
        {
            debug!(node_id = self.inner.id, "inbox full, raft message dropped");
        }
    }

    /// Leadership as seen by this node; changes on every role or leader change.
    pub fn leader_watch(&self) -> watch::Receiver<LeaderState> {
        self.inner.leader.clone()
    }

    /// `true` while this node is the leader (the owner); changes only when
    /// that flips.
    pub fn is_leader_watch(&self) -> watch::Receiver<bool> {
        self.inner.is_leader.clone()
    }

    /// Latency of this node's successful proposals (propose to applied
    /// result, forwarding and retries included), in seconds.
    pub fn proposal_latency(&self) -> &prometheus_client::metrics::histogram::Histogram {
        &self.inner.proposal_latency
    }

    /// The applied index on this node; changes after every applied batch.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.inner.applied.clone()
    }

    /// The last applied index on this node.
    pub fn applied_index(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, MetaError>>) -> Inbound,
        timeout: Duration,
    ) -> Result<T, MetaError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .inbox
            .send(make(tx))
            .await
            .map_err(|_| MetaError::Stopped)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(MetaError::Stopped),
            Err(_) => Err(MetaError::Timeout {
                op: "raft request",
                timeout,
                attempts: 1,
                last: "no answer from the raft loop".into(),
            }),
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the request
    /// timeout passes; retriable errors back off and try again.
    async fn retry<T, F, Fut>(&self, op: &'static str, mut attempt: F) -> Result<T, MetaError>
    where
        F: FnMut(Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, MetaError>>,
    {
        let timeout = self.inner.config.request_timeout();
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(10);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match attempt(left).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retriable() || matches!(e, MetaError::Timeout { .. }) => e,
                Err(e) => return Err(e),
            };
            if Instant::now() + backoff >= deadline {
                return Err(MetaError::Timeout {
                    op,
                    timeout,
                    attempts,
                    last: err.to_string(),
                });
            }
            debug!(node_id = self.inner.id, op, attempts, error = %err, "retrying");
            tokio::time::sleep(backoff).await;
            backoff = next_backoff(backoff);
        }
    }

    /// Proposes `cmd` and returns its result once applied on this node.
    /// Concurrent proposals share log entries; on a follower the command is
    /// forwarded to the leader. Dropped proposals and leader changes are
    /// retried until the request timeout under one [`RequestId`], so a
    /// command whose first attempt was applied after all is not applied
    /// again (its first result is returned).
    ///
    /// # Errors
    /// [`MetaError::Timeout`] naming the last failure, or a permanent error.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, MetaError> {
        self.propose_with_id(cmd, RequestId::new(self.inner.id))
            .await
    }

    /// [`Self::propose`] under a caller-chosen request id, for callers that
    /// retry on their own (e.g. a client whose connection broke).
    ///
    /// # Errors
    /// As [`Self::propose`].
    pub async fn propose_with_id(
        &self,
        cmd: Command,
        request_id: RequestId,
    ) -> Result<CommandResult, MetaError> {
        let started = Instant::now();
        let result = self.propose_retrying(cmd, request_id).await;
        if result.is_ok() {
            self.inner
                .proposal_latency
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn propose_retrying(
        &self,
        cmd: Command,
        request_id: RequestId,
    ) -> Result<CommandResult, MetaError> {
        self.retry("propose", |left| {
            let cmd = cmd.clone();
            async move {
                // Known follower: forward at once rather than ask the Raft
                // loop, which may be busy syncing the log.
                let known = *self.inner.leader.borrow();
                let local = match known.leader_id {
                    Some(l) if !known.is_leader && l != self.inner.id => {
                        Err(MetaError::NotLeader { leader: Some(l) })
                    }
                    _ => self.propose_local(cmd.clone(), request_id, left).await,
                };
                match local {
                    Err(MetaError::NotLeader { leader: Some(l) }) if l != self.inner.id => {
                        match self.inner.forwarder.get() {
                            Some(f) => tokio::time::timeout(left, f.propose(l, cmd, request_id))
                                .await
                                .unwrap_or(Err(MetaError::LeaderChanged)),
                            None => Err(MetaError::NotLeader { leader: Some(l) }),
                        }
                    }
                    other => other,
                }
            }
        })
        .await
    }

    /// Proposes on this node only: [`MetaError::NotLeader`] on a follower.
    ///
    /// # Errors
    /// Not leader, dropped, leader changed, stopped, timeout.
    pub async fn propose_local(
        &self,
        cmd: Command,
        request_id: RequestId,
        timeout: Duration,
    ) -> Result<CommandResult, MetaError> {
        self.call(
            |reply| Inbound::Propose {
                cmd: Box::new(cmd),
                request_id,
                reply,
            },
            timeout,
        )
        .await
    }

    /// Waits until this node has applied at least `index`.
    async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), MetaError> {
        let mut rx = self.inner.applied.clone();
        let waited = tokio::time::timeout(timeout, async {
            rx.wait_for(|a| *a >= index).await.map(|_| ())
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(MetaError::Stopped),
            Err(_) => Err(MetaError::Timeout {
                op: "wait for apply",
                timeout,
                attempts: 1,
                last: format!("applied index below {index}"),
            }),
        }
    }

    /// A linearizable read barrier: confirms leadership through ReadIndex and
    /// waits until this node has applied the leader's commit index. Returns
    /// that index.
    ///
    /// # Errors
    /// [`MetaError::Timeout`] when no leader confirms in time.
    pub async fn read_barrier(&self) -> Result<u64, MetaError> {
        let attempt_timeout = self.inner.config.read_attempt_timeout();
        let index = self
            .retry("read index", |left| async move {
                let t = attempt_timeout.min(left);
                self.call(|reply| Inbound::ReadIndex { reply }, t)
                    .await
                    .map_err(|e| match e {
                        MetaError::Timeout { .. } => MetaError::LeaderChanged,
                        other => other,
                    })
            })
            .await?;
        self.wait_applied(index, self.inner.config.request_timeout())
            .await?;
        Ok(index)
    }

    /// Answers a query from the state machine at the requested consistency.
    /// Returns the result and the applied index it reflects.
    ///
    /// # Errors
    /// Read barrier failures, storage failures.
    pub async fn query(
        &self,
        q: &Query,
        consistency: Consistency,
    ) -> Result<(QueryResult, u64), MetaError> {
        if consistency == Consistency::Linearizable {
            self.read_barrier().await?;
        }
        self.read_local(|path, txn| state_machine::query(path, txn, q))
    }

    /// Runs `f` on a read transaction of this node's applied state (a
    /// consistent view, possibly stale). Returns its result and the applied
    /// index it saw (at least).
    ///
    /// # Errors
    /// Storage failures or `f`'s.
    pub fn read_local<T>(
        &self,
        f: impl FnOnce(&std::path::Path, &redb::ReadTransaction) -> Result<T, MetaError>,
    ) -> Result<(T, u64), MetaError> {
        let applied = self.applied_index();
        let txn = self.inner.storage.read()?;
        Ok((f(self.inner.storage.path(), &txn)?, applied))
    }

    /// This node's view of the group.
    ///
    /// # Errors
    /// [`MetaError::Stopped`].
    pub async fn status(&self) -> Result<NodeStatus, MetaError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .inbox
            .send(Inbound::Status { reply: tx })
            .await
            .map_err(|_| MetaError::Stopped)?;
        rx.await.map_err(|_| MetaError::Stopped)
    }

    /// Adds a voter or learner, or removes a member; returns once the change
    /// is applied on this node. Forwarded to the leader when needed.
    ///
    /// # Errors
    /// Invalid change, timeout.
    pub async fn change_membership(
        &self,
        kind: MemberKind,
        id: u64,
        addr: &str,
    ) -> Result<(), MetaError> {
        if id == 0 {
            return Err(MetaError::Invalid("node id must be > 0".into()));
        }
        if kind != MemberKind::Remove && addr.is_empty() {
            return Err(MetaError::Invalid("an added node needs an address".into()));
        }
        self.retry("change membership", |left| {
            let addr = addr.to_string();
            async move {
                let local = self
                    .call(
                        |reply| Inbound::Membership {
                            kind,
                            id,
                            addr: addr.clone(),
                            reply,
                        },
                        left,
                    )
                    .await;
                match local {
                    Err(MetaError::NotLeader { leader: Some(l) }) if l != self.inner.id => {
                        match self.inner.forwarder.get() {
                            Some(f) => f.change_membership(l, kind, id, addr).await,
                            None => Err(MetaError::NotLeader { leader: Some(l) }),
                        }
                    }
                    other => other,
                }
            }
        })
        .await
    }

    /// Asks the leader to hand leadership to `to` and waits until this node
    /// sees `to` lead.
    ///
    /// # Errors
    /// Timeout when the transfer does not happen (e.g. `to` lags or is down).
    pub async fn transfer_leader(&self, to: u64) -> Result<(), MetaError> {
        let timeout = self.inner.config.request_timeout();
        let deadline = Instant::now() + timeout;
        let mut leader = self.inner.leader.clone();
        loop {
            if leader.borrow().leader_id == Some(to) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MetaError::Timeout {
                    op: "transfer leader",
                    timeout,
                    attempts: 1,
                    last: format!("node {to} did not become leader"),
                });
            }
            let asked = self
                .call(|reply| Inbound::TransferLeader { to, reply }, left)
                .await;
            if let Err(MetaError::NotLeader { leader: Some(l) }) = asked {
                if let Some(f) = self.inner.forwarder.get() {
                    let _ = f.transfer_leader(l, to).await;
                }
            }
            let wait = leader.wait_for(|s| s.leader_id == Some(to));
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RequestId;

    #[test]
    fn request_ids_do_not_repeat() {
        let ids: std::collections::HashSet<RequestId> =
            (0..10_000).map(|_| RequestId::new(7)).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|id| id.0[..8] == 7u64.to_be_bytes()));
    }
}
