//! An in-process network with fault injection (drop, delay, partition) and
//! a cluster harness on top of it, for tests.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use raft::eraftpb::{Message, MessageType};
use stoker_proto::meta::membership_request::Kind as MemberKind;
use stoker_proto::meta::{Command, CommandResult};

use super::{
    Forwarder, MetaConfig, MetaError, MetaNode, RedbStorage, Reporter, RequestId, Transport,
};

#[derive(Default)]
struct Faults {
    /// Directed links that deliver nothing.
    blocked: HashSet<(u64, u64)>,
    /// Chance of dropping a message, per mille.
    drop_per_mille: u64,
    /// Delay added to every delivered message.
    delay: Duration,
    rng: u64,
}

impl Faults {
    fn next_random(&mut self) -> u64 {
        // xorshift64: deterministic per seed, good enough for fault dice.
        let mut x = self.rng.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// The simulated network shared by every node of a test cluster.
#[derive(Default)]
pub(crate) struct SimNet {
    faults: Mutex<Faults>,
    nodes: Mutex<HashMap<u64, MetaNode>>,
}

impl SimNet {
    pub(crate) fn new(seed: u64) -> Arc<Self> {
        let net = SimNet::default();
        net.faults.lock().unwrap().rng = seed;
        Arc::new(net)
    }

    fn register(&self, node: MetaNode) {
        self.nodes.lock().unwrap().insert(node.id(), node);
    }

    fn unregister(&self, id: u64) {
        self.nodes.lock().unwrap().remove(&id);
    }

    fn node(&self, id: u64) -> Option<MetaNode> {
        self.nodes.lock().unwrap().get(&id).cloned()
    }

    /// Splits the nodes into groups that cannot talk to each other.
    pub(crate) fn partition(&self, groups: &[&[u64]]) {
        let mut f = self.faults.lock().unwrap();
        f.blocked.clear();
        for (i, a) in groups.iter().enumerate() {
            for (j, b) in groups.iter().enumerate() {
                if i != j {
                    for x in *a {
                        for y in *b {
                            f.blocked.insert((*x, *y));
                        }
                    }
                }
            }
        }
    }

    /// Removes every partition, drop and delay.
    pub(crate) fn heal(&self) {
        let mut f = self.faults.lock().unwrap();
        f.blocked.clear();
        f.drop_per_mille = 0;
        f.delay = Duration::ZERO;
    }

    pub(crate) fn set_lossy(&self, drop_per_mille: u64, delay: Duration) {
        let mut f = self.faults.lock().unwrap();
        f.drop_per_mille = drop_per_mille;
        f.delay = delay;
    }

    fn linked(&self, from: u64, to: u64) -> bool {
        !self.faults.lock().unwrap().blocked.contains(&(from, to))
    }

    /// Whether a message from → to gets through, and after what delay.
    fn roll(&self, from: u64, to: u64) -> Option<Duration> {
        let mut f = self.faults.lock().unwrap();
        if f.blocked.contains(&(from, to)) {
            return None;
        }
        if f.drop_per_mille > 0 && f.next_random() % 1000 < f.drop_per_mille {
            return None;
        }
        Some(f.delay)
    }
}

pub(crate) struct SimTransport {
    me: u64,
    net: Arc<SimNet>,
    reporter: OnceLock<Reporter>,
}

impl Transport for SimTransport {
    fn attach(&self, reporter: Reporter) {
        let _ = self.reporter.set(reporter);
    }

    fn send(&self, msgs: Vec<Message>) {
        let reporter = self.reporter.get().expect("attached");
        for msg in msgs {
            let to = msg.to;
            let snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
            let target = self.net.node(to);
            match (self.net.roll(self.me, to), target) {
                (Some(delay), Some(node)) => {
                    if delay.is_zero() {
                        node.step(msg);
                    } else {
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            node.step(msg);
                        });
                    }
                    if snapshot {
                        reporter.snapshot_status(to, true);
                    }
                }
                _ => {
                    reporter.unreachable(to);
                    if snapshot {
                        reporter.snapshot_status(to, false);
                    }
                }
            }
        }
    }

    fn set_peer(&self, _id: u64, _addr: &str) {}

    fn remove_peer(&self, _id: u64) {}
}

struct SimForwarder {
    me: u64,
    net: Arc<SimNet>,
}

impl SimForwarder {
    fn target(&self, leader: u64) -> Result<MetaNode, MetaError> {
        let unreachable = || MetaError::Forward {
            leader,
            reason: "unreachable".into(),
            retriable: true,
        };
        if !self.net.linked(self.me, leader) || !self.net.linked(leader, self.me) {
            return Err(unreachable());
        }
        self.net.node(leader).ok_or_else(unreachable)
    }
}

impl Forwarder for SimForwarder {
    fn propose(
        &self,
        leader: u64,
        cmd: Command,
        request_id: RequestId,
    ) -> BoxFuture<'static, Result<CommandResult, MetaError>> {
        let target = self.target(leader);
        Box::pin(async move {
            target?
                .propose_local(cmd, request_id, Duration::from_secs(2))
                .await
        })
    }

    fn change_membership(
        &self,
        leader: u64,
        kind: MemberKind,
        id: u64,
        addr: String,
    ) -> BoxFuture<'static, Result<(), MetaError>> {
        let target = self.target(leader);
        Box::pin(async move { target?.change_membership(kind, id, &addr).await })
    }

    fn transfer_leader(&self, leader: u64, to: u64) -> BoxFuture<'static, Result<(), MetaError>> {
        let target = self.target(leader);
        Box::pin(async move { target?.transfer_leader(to).await })
    }
}

/// A cluster of in-process nodes on a [`SimNet`], each with its own redb
/// file in a temporary directory.
pub(crate) struct SimCluster {
    pub net: Arc<SimNet>,
    pub config: MetaConfig,
    dir: tempfile::TempDir,
    nodes: HashMap<u64, MetaNode>,
}

/// Fast timings for tests.
pub(crate) fn test_config() -> MetaConfig {
    MetaConfig {
        tick_ms: 10,
        election_ticks: 10,
        heartbeat_ticks: 2,
        request_timeout_ms: 3_000,
        read_attempt_timeout_ms: 300,
        ..MetaConfig::default()
    }
}

fn addr(id: u64) -> String {
    format!("sim-{id}")
}

impl SimCluster {
    pub(crate) fn start(n: u64, config: MetaConfig, seed: u64) -> Self {
        let mut c = SimCluster {
            net: SimNet::new(seed),
            config,
            dir: tempfile::tempdir().expect("tempdir"),
            nodes: HashMap::new(),
        };
        let members: Vec<(u64, String)> = (1..=n).map(|id| (id, addr(id))).collect();
        for id in 1..=n {
            c.start_node(id, &members);
        }
        c
    }

    /// The data file of node `id`.
    pub(crate) fn data_path(&self, id: u64) -> std::path::PathBuf {
        self.dir.path().join(format!("node-{id}.redb"))
    }

    /// Starts (or restarts) node `id` on its data file.
    pub(crate) fn start_node(&mut self, id: u64, initial: &[(u64, String)]) -> MetaNode {
        let storage = RedbStorage::open(&self.data_path(id)).expect("open storage");
        let transport = Arc::new(SimTransport {
            me: id,
            net: self.net.clone(),
            reporter: OnceLock::new(),
        });
        let node = MetaNode::start(id, self.config.clone(), storage, initial, transport)
            .expect("node starts");
        node.set_forwarder(Arc::new(SimForwarder {
            me: id,
            net: self.net.clone(),
        }));
        self.net.register(node.clone());
        self.nodes.insert(id, node.clone());
        node
    }

    /// Stops node `id` (its data stays).
    pub(crate) fn stop_node(&mut self, id: u64) {
        self.net.unregister(id);
        if let Some(n) = self.nodes.remove(&id) {
            n.shutdown();
        }
    }

    /// Stops node `id` and deletes its data.
    pub(crate) fn wipe_node(&mut self, id: u64) {
        self.stop_node(id);
        let path = self.data_path(id);
        std::fs::remove_file(RedbStorage::log_path(&path)).expect("wipe log");
        std::fs::remove_file(path).expect("wipe");
    }

    pub(crate) fn node(&self, id: u64) -> &MetaNode {
        &self.nodes[&id]
    }

    pub(crate) fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.nodes.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Waits until one of `among` leads and every node of `among` agrees.
    pub(crate) async fn wait_leader(&self, among: &[u64], timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let views: Vec<Option<u64>> = among
                .iter()
                .map(|id| self.node(*id).leader_watch().borrow().leader_id)
                .collect();
            if let Some(Some(l)) = views.first() {
                if among.contains(l)
                    && views.iter().all(|v| *v == Some(*l))
                    && *self.node(*l).is_leader_watch().borrow()
                {
                    return *l;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader among {among:?}: {views:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running node has the same applied index and state
    /// digest; returns the digest.
    pub(crate) async fn wait_converged(&self, timeout: Duration) -> [u8; 32] {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let states: Vec<(u64, [u8; 32])> = self
                .nodes
                .values()
                .map(|n| (n.applied_index(), n.storage().digest().expect("digest")))
                .collect();
            if states.windows(2).all(|w| w[0] == w[1]) {
                return states[0].1;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nodes did not converge: {:?}",
                states.iter().map(|s| s.0).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn shutdown(&mut self) {
        for id in self.ids() {
            self.stop_node(id);
        }
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}
