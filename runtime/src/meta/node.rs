//! The Raft loop: one `RawNode` driven by a Ready loop on its own thread,
//! with persistence pipelined on a second thread, the log writer (raft-rs's
//! asynchronous Ready: `advance_append_async`, `on_persist_ready`).
//!
//! One Ready: send its messages (a leader's may leave before its own log
//! write, Raft thesis 10.2.1); apply its committed entries (raft-rs hands out
//! only entries this node has persisted); stage its entries and hard state
//! in the storage, where Raft reads them at once; `advance_append_async`;
//! queue the write for the log writer; hold its persisted messages
//! (a follower's acknowledgements and votes). The log writer writes
//! everything queued meanwhile in one synced transaction and reports the
//! last Ready number written; the loop then calls `on_persist_ready` and
//! sends the messages held up to it. So the loop keeps taking proposals,
//! sending appends and applying while a sync is in flight, and one sync
//! covers every Ready queued behind the previous one.
//!
//! A Ready with a snapshot is the exception: the loop waits until the writer
//! has caught up, then installs the snapshot synchronously (`advance`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use protobuf::Message as PbMessage;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
};
use raft::{RawNode, Ready, SnapshotStatus, StateRole};
use stoker_proto::meta::{
    command, membership_request::Kind as MemberKind, Command, CommandResult, ConfChangeContext,
    EntryBatch, Proposal, COMMAND_VERSION, OLDEST_COMMAND_VERSION,
};
use stoker_proto::Message as _;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::state_machine;
use super::storage::{ApplyTxn, LogWrite, RedbStorage};
use super::transport::Transport;
use super::{LeaderState, MemberStatus, MetaConfig, MetaError, NodeStatus, RequestId};

type Reply<T> = oneshot::Sender<Result<T, MetaError>>;

/// Requests into the Raft loop.
pub(crate) enum Inbound {
    Propose {
        // Boxed: commands are large and the inbox holds many requests.
        cmd: Box<Command>,
        request_id: RequestId,
        reply: Reply<CommandResult>,
    },
    Raft(Box<Message>),
    ReadIndex {
        reply: Reply<u64>,
    },
    Membership {
        kind: MemberKind,
        id: u64,
        addr: String,
        reply: Reply<()>,
    },
    TransferLeader {
        to: u64,
        reply: Reply<()>,
    },
    Unreachable(u64),
    SnapshotStatus {
        to: u64,
        ok: bool,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    Shutdown,
}

/// Watches the loop publishes for the rest of the process.
pub(crate) struct Published {
    pub applied: watch::Sender<u64>,
    pub leader: watch::Sender<LeaderState>,
    pub is_leader: watch::Sender<bool>,
}

pub(crate) struct Driver {
    id: u64,
    raw: RawNode<RedbStorage>,
    storage: RedbStorage,
    transport: Arc<dyn Transport>,
    inbox: mpsc::Receiver<Inbound>,
    config: MetaConfig,
    published: Published,
    /// Proposals waiting in the current group-commit batch.
    batch: Vec<(Command, RequestId, Reply<CommandResult>)>,
    /// Proposal id → caller, for entries this node proposed as leader.
    pending: HashMap<u64, Reply<CommandResult>>,
    /// ReadIndex context → caller.
    reads: HashMap<u64, Reply<u64>>,
    /// Log index of a proposed conf change → caller.
    conf_changes: HashMap<u64, Reply<()>>,
    next_id: u64,
    last_compact: u64,
    /// Peer → consecutive rejects saying its log ends before what it acked.
    lost_log_strikes: HashMap<u64, u32>,
    /// Number of the last Ready whose log write was queued for the writer.
    submitted: u64,
    /// Number of the last Ready known persisted (`on_persist_ready` done);
    /// writes are in flight while it is below `submitted`.
    persisted: u64,
    /// Persisted messages waiting for the write of their Ready (its number).
    held: VecDeque<(u64, Vec<Message>)>,
}

/// The log writer thread: writes staged [`LogWrite`]s in batches and
/// reports the last Ready number written.
struct LogWriter {
    queue: Option<std::sync::mpsc::Sender<LogWrite>>,
    written: watch::Receiver<u64>,
    failed: Arc<Mutex<Option<MetaError>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogWriter {
    fn start(id: u64, storage: RedbStorage) -> Result<Self, MetaError> {
        let (queue, rx) = std::sync::mpsc::channel::<LogWrite>();
        let (written_tx, written) = watch::channel(0u64);
        let failed = Arc::new(Mutex::new(None));
        let fail_slot = failed.clone();
        let thread = std::thread::Builder::new()
            .name(format!("raft-log-{id}"))
            .spawn(move || {
                // Everything queued while the previous batch was syncing
                // goes into the next one.
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    if let Err(e) = storage.write(&batch) {
                        *fail_slot.lock().expect("writer error slot") = Some(e);
                        written_tx.send_modify(|_| {});
                        return;
                    }
                    let last = batch.last().map_or(0, |w| w.number);
                    written_tx.send_replace(last);
                }
            })
            .map_err(|e| MetaError::Config(format!("cannot spawn raft log writer: {e}")))?;
        Ok(LogWriter {
            queue: Some(queue),
            written,
            failed,
            thread: Some(thread),
        })
    }

    fn submit(&self, w: LogWrite) -> Result<(), MetaError> {
        self.queue
            .as_ref()
            .and_then(|q| q.send(w).ok())
            .ok_or_else(|| self.error())
    }

    /// The writer's failure (or that it stopped).
    fn error(&self) -> MetaError {
        self.failed
            .lock()
            .expect("writer error slot")
            .take()
            .unwrap_or(MetaError::Stopped)
    }

    /// The last Ready number written, or the writer's failure.
    fn written(&mut self) -> Result<u64, MetaError> {
        let failed = self.failed.lock().expect("writer error slot").take();
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(*self.written.borrow_and_update())
    }

    /// Lets the writer finish what is queued and waits for it.
    fn stop(&mut self) {
        self.queue = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Rejects in a row after which a peer is taken to have lost its log.
const LOST_LOG_STRIKES: u32 = 3;

impl Driver {
    pub(crate) fn new(
        id: u64,
        raw: RawNode<RedbStorage>,
        transport: Arc<dyn Transport>,
        inbox: mpsc::Receiver<Inbound>,
        config: MetaConfig,
        published: Published,
    ) -> Self {
        let storage = raw.store().clone();
        let last_compact = raft::Storage::first_index(&storage).unwrap_or(1) - 1;
        // Proposal ids must not repeat across restarts of this node, or a
        // replayed entry of an earlier incarnation would answer a new caller.
        let next_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Driver {
            id,
            raw,
            storage,
            transport,
            inbox,
            config,
            published,
            batch: Vec::new(),
            pending: HashMap::new(),
            reads: HashMap::new(),
            conf_changes: HashMap::new(),
            next_id,
            last_compact,
            lost_log_strikes: HashMap::new(),
            submitted: 0,
            persisted: 0,
            held: VecDeque::new(),
        }
    }

    /// Runs the loop until shutdown or a fatal storage error.
    pub(crate) async fn run(mut self) {
        let mut writer = match LogWriter::start(self.id, self.storage.clone()) {
            Ok(w) => w,
            Err(e) => {
                error!(node_id = self.id, error = %e, "raft loop not started");
                self.fail_waiters(|| MetaError::Stopped);
                return;
            }
        };
        let mut ticker = tokio::time::interval(self.config.tick());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let drain_limit = self.config.max_batch.max(256) * 4;
        loop {
            let first = tokio::select! {
                _ = ticker.tick() => {
                    self.raw.tick();
                    self.reads.retain(|_, r| !r.is_closed());
                    None
                }
                // A failed write shows in `drive`.
                changed = writer.written.changed() => {
                    if changed.is_err() {
                        error!(node_id = self.id, "raft log writer stopped");
                        break;
                    }
                    None
                }
                msg = self.inbox.recv() => match msg {
                    Some(m) => Some(m),
                    None => break,
                },
            };
            let mut stop = false;
            if let Some(m) = first {
                stop = self.handle(m);
            }
            let mut drained = 0;
            while !stop && drained < drain_limit {
                match self.inbox.try_recv() {
                    Ok(m) => stop = self.handle(m),
                    Err(_) => break,
                }
                drained += 1;
            }
            self.flush_batch();
            if let Err(e) = self.drive(&mut writer).await {
                error!(node_id = self.id, error = %e, "raft loop stopped on error");
                break;
            }
            if stop {
                break;
            }
        }
        writer.stop();
        self.fail_waiters(|| MetaError::Stopped);
        info!(node_id = self.id, "raft loop stopped");
    }

    /// Takes what the writer finished, then handles Readies until there are
    /// none.
    async fn drive(&mut self, writer: &mut LogWriter) -> Result<(), MetaError> {
        self.on_written(writer)?;
        while self.raw.has_ready() {
            self.on_ready(writer).await?;
            self.on_written(writer)?;
        }
        self.maybe_compact()
    }

    /// Tells raft what the writer has made durable and sends the messages
    /// that waited for it.
    fn on_written(&mut self, writer: &mut LogWriter) -> Result<(), MetaError> {
        let written = writer.written()?;
        if written <= self.persisted {
            return Ok(());
        }
        self.persisted = written;
        self.raw.on_persist_ready(written);
        while self.held.front().is_some_and(|(n, _)| *n <= written) {
            if let Some((_, msgs)) = self.held.pop_front() {
                self.transport.send(msgs);
            }
        }
        Ok(())
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn leader_hint(&self) -> Option<u64> {
        let l = self.raw.raft.leader_id;
        (l != raft::INVALID_ID).then_some(l)
    }

    /// Handles one request; returns true on shutdown.
    fn handle(&mut self, msg: Inbound) -> bool {
        match msg {
            Inbound::Propose {
                cmd,
                request_id,
                reply,
            } => {
                self.batch.push((*cmd, request_id, reply));
                if self.batch.len() >= self.config.max_batch {
                    self.flush_batch();
                }
            }
            Inbound::Raft(mut m) => {
                if !self.guard_lost_log(&mut m) {
                    return false;
                }
                if let Err(e) = self.raw.step(*m) {
                    debug!(node_id = self.id, error = %e, "raft message rejected");
                }
            }
            Inbound::ReadIndex { reply } => {
                let ctx = self.next_id;
                self.next_id += 1;
                self.raw.read_index(ctx.to_be_bytes().to_vec());
                self.reads.insert(ctx, reply);
            }
            Inbound::Membership {
                kind,
                id,
                addr,
                reply,
            } => self.propose_membership(kind, id, addr, reply),
            Inbound::TransferLeader { to, reply } => {
                if self.is_leader() {
                    self.raw.transfer_leader(to);
                    let _ = reply.send(Ok(()));
                } else {
                    let _ = reply.send(Err(MetaError::NotLeader {
                        leader: self.leader_hint(),
                    }));
                }
            }
            Inbound::Unreachable(id) => self.raw.report_unreachable(id),
            Inbound::SnapshotStatus { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Inbound::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Inbound::Shutdown => return true,
        }
        false
    }

    /// Copes with a peer that lost its log (its data directory was wiped)
    /// and came back under the same id, which Raft itself does not allow
    /// for: the follower ignores a heartbeat's commit index beyond its log,
    /// and the leader, told that the peer's log ends before what
    /// it had replicated there, forgets that progress so the peer is probed
    /// from scratch and sent a snapshot. Returns whether to step `m`.
    fn guard_lost_log(&mut self, m: &mut Message) -> bool {
        match m.get_msg_type() {
            MessageType::MsgHeartbeat => {
                let last = self.raw.raft.raft_log.last_index();
                if m.commit > last {
                    // Commit nothing on its word: our log may not match the
                    // leader's at all.
                    warn!(
                        node_id = self.id,
                        commit = m.commit,
                        last,
                        "heartbeat commit beyond local log, ignored"
                    );
                    m.commit = self.raw.raft.raft_log.committed;
                }
                true
            }
            MessageType::MsgAppendResponse if !m.reject => {
                self.lost_log_strikes.remove(&m.from);
                true
            }
            MessageType::MsgAppendResponse if self.is_leader() => {
                let Some(pr) = self.raw.raft.mut_prs().get_mut(m.from) else {
                    return true;
                };
                if m.reject_hint >= pr.matched {
                    return true;
                }
                // One such reject may be a stale message that overtook newer
                // ones; a peer that really lost its log rejects every append.
                let strikes = self.lost_log_strikes.entry(m.from).or_insert(0);
                *strikes += 1;
                if *strikes < LOST_LOG_STRIKES {
                    return true;
                }
                self.lost_log_strikes.remove(&m.from);
                let Some(pr) = self.raw.raft.mut_prs().get_mut(m.from) else {
                    return true;
                };
                warn!(
                    node_id = self.id,
                    peer = m.from,
                    matched = pr.matched,
                    peer_last = m.reject_hint,
                    "peer lost its log, replicating to it from scratch"
                );
                pr.matched = 0;
                pr.become_probe();
                false
            }
            _ => true,
        }
    }

    /// Proposes the batched commands as one log entry (group commit).
    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        if !self.is_leader() {
            let leader = self.leader_hint();
            for (_, _, reply) in batch {
                let _ = reply.send(Err(MetaError::NotLeader { leader }));
            }
            return;
        }
        let mut proposals = Vec::with_capacity(batch.len());
        let mut ids = Vec::with_capacity(batch.len());
        for (cmd, request_id, reply) in batch {
            let id = self.next_id;
            self.next_id += 1;
            proposals.push(Proposal {
                id,
                command: Some(cmd),
                request_id: request_id.0.to_vec(),
            });
            ids.push((id, reply));
        }
        // The lowest version that holds these commands, so that a node of
        // the previous release still applies every entry it can.
        let batched = proposals.iter().any(|p| {
            matches!(
                p.command.as_ref().and_then(|c| c.kind.as_ref()),
                Some(command::Kind::Batch(_))
            )
        });
        let data = EntryBatch {
            version: if batched {
                COMMAND_VERSION
            } else {
                OLDEST_COMMAND_VERSION
            },
            proposer: self.id,
            proposals,
        }
        .encode_to_vec();
        match self.raw.propose(vec![], data) {
            Ok(()) => self.pending.extend(ids),
            Err(e) => {
                debug!(node_id = self.id, error = %e, "proposal dropped");
                for (_, reply) in ids {
                    let _ = reply.send(Err(MetaError::ProposalDropped));
                }
            }
        }
    }

    fn propose_membership(&mut self, kind: MemberKind, id: u64, addr: String, reply: Reply<()>) {
        if !self.is_leader() {
            let _ = reply.send(Err(MetaError::NotLeader {
                leader: self.leader_hint(),
            }));
            return;
        }
        let mut cc = ConfChange {
            node_id: id,
            ..Default::default()
        };
        cc.set_change_type(match kind {
            MemberKind::AddVoter => ConfChangeType::AddNode,
            MemberKind::AddLearner => ConfChangeType::AddLearnerNode,
            MemberKind::Remove => ConfChangeType::RemoveNode,
        });
        cc.context = ConfChangeContext { addr }.encode_to_vec().into();
        match self.raw.propose_conf_change(vec![], cc) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                self.conf_changes.insert(index, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(match e {
                    raft::Error::ProposalDropped => MetaError::ProposalDropped,
                    other => MetaError::Invalid(other.to_string()),
                }));
            }
        }
    }

    async fn on_ready(&mut self, writer: &mut LogWriter) -> Result<(), MetaError> {
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            return self.on_snapshot_ready(ready, writer).await;
        }
        self.on_ready_state(&mut ready);
        // Committed entries handed out are persisted here already.
        self.apply(ready.take_committed_entries())?;
        let number = ready.number();
        let write = LogWrite {
            number,
            entries: ready.take_entries(),
            hard_state: ready.hs().cloned(),
            sync: ready.must_sync(),
        };
        let msgs = ready.take_persisted_messages();
        if write.is_empty() && self.submitted <= self.persisted {
            // Nothing to write and nothing in flight to wait for.
            self.raw.advance_append_async(ready);
            self.raw.on_persist_ready(number);
            self.persisted = number;
            if !msgs.is_empty() {
                self.transport.send(msgs);
            }
        } else {
            // Raft reads staged entries from the storage from now on.
            self.storage.stage(&write)?;
            self.raw.advance_append_async(ready);
            writer.submit(write)?;
            self.submitted = number;
            if !msgs.is_empty() {
                self.held.push_back((number, msgs));
            }
        }
        self.raw.advance_apply();
        Ok(())
    }

    /// Soft state and read states of a Ready.
    fn on_ready_state(&mut self, ready: &mut Ready) {
        if let Some(ss) = ready.ss() {
            self.on_soft_state(ss.leader_id, ss.raft_state);
        }
        for rs in ready.take_read_states() {
            let ctx = rs.request_ctx.as_slice().try_into().map(u64::from_be_bytes);
            if let Some(reply) = ctx.ok().and_then(|c| self.reads.remove(&c)) {
                let _ = reply.send(Ok(rs.index));
            }
        }
    }

    /// A Ready with a snapshot: once every earlier write is done, installs it
    /// with the Ready's entries and hard state, synced (`RedbStorage::persist`),
    /// then completes the Ready the synchronous way.
    async fn on_snapshot_ready(
        &mut self,
        mut ready: Ready,
        writer: &mut LogWriter,
    ) -> Result<(), MetaError> {
        // No `on_persist_ready` while this Ready is out: `advance` below
        // covers every earlier Ready.
        while writer.written()? < self.submitted {
            if writer.written.changed().await.is_err() {
                return Err(writer.error());
            }
        }
        let snapshot = ready.snapshot().clone();
        self.storage
            .persist(Some(&snapshot), ready.entries(), ready.hs())?;
        self.after_snapshot(snapshot.get_metadata().index)?;
        for (_, msgs) in std::mem::take(&mut self.held) {
            self.transport.send(msgs);
        }
        self.on_ready_state(&mut ready);
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        self.apply(ready.take_committed_entries())?;
        self.persisted = ready.number();
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit)?;
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        Ok(())
    }

    fn on_soft_state(&mut self, leader_id: u64, role: StateRole) {
        let state = LeaderState {
            leader_id: (leader_id != raft::INVALID_ID).then_some(leader_id),
            term: self.raw.raft.term,
            is_leader: role == StateRole::Leader,
        };
        info!(
            node_id = self.id,
            leader_id,
            term = state.term,
            role = ?role,
            "raft role changed"
        );
        if !state.is_leader {
            // Our in-flight entries may be overwritten by the new leader.
            let pending: Vec<_> = self.pending.drain().map(|(_, r)| r).collect();
            for r in pending {
                let _ = r.send(Err(MetaError::LeaderChanged));
            }
            for (_, r) in self.conf_changes.drain() {
                let _ = r.send(Err(MetaError::LeaderChanged));
            }
        }
        if state.leader_id.is_none() {
            for (_, r) in self.reads.drain() {
                let _ = r.send(Err(MetaError::LeaderChanged));
            }
        }
        self.published.is_leader.send_if_modified(|v| {
            let changed = *v != state.is_leader;
            *v = state.is_leader;
            changed
        });
        self.published.leader.send_replace(state);
    }

    fn after_snapshot(&mut self, index: u64) -> Result<(), MetaError> {
        info!(node_id = self.id, index, "installed snapshot");
        self.last_compact = index;
        self.sync_peers()?;
        self.published.applied.send_replace(index);
        Ok(())
    }

    /// Points the transport at every member in the replicated state.
    fn sync_peers(&self) -> Result<(), MetaError> {
        for (id, addr) in self.storage.members()? {
            if id != self.id {
                self.transport.set_peer(id, &addr);
            }
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), MetaError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let last_index = last.index;
        let storage = self.storage.clone();
        let mut tx = storage.begin_apply()?;
        let mut replies = Vec::new();
        let mut peers_changed = false;
        let mut rest = entries.as_slice();
        while let Some(entry) = rest.first() {
            if entry.get_entry_type() == EntryType::EntryNormal {
                // A run of normal entries: the request tables are opened
                // once for all of them.
                let n = rest
                    .iter()
                    .position(|e| e.get_entry_type() != EntryType::EntryNormal)
                    .unwrap_or(rest.len());
                let (run, after) = rest.split_at(n);
                let mut requests = state_machine::Requests::open(
                    tx.path(),
                    tx.txn(),
                    state_machine::MAX_REMEMBERED_REQUESTS,
                )?;
                for entry in run {
                    self.apply_normal(&mut requests, entry, &mut replies)?;
                    if let Some(r) = self.conf_changes.remove(&entry.index) {
                        // raft-rs turned the conf change into an empty
                        // entry: another one was still pending.
                        let _ = r.send(Err(MetaError::ProposalDropped));
                    }
                }
                drop(requests);
                let last = run.last().expect("a run has an entry");
                tx.set_applied(last.index, last.term);
                rest = after;
            } else {
                self.apply_conf_change(&mut tx, entry)?;
                peers_changed = true;
                if let Some(r) = self.conf_changes.remove(&entry.index) {
                    let _ = r.send(Ok(()));
                }
                tx.set_applied(entry.index, entry.term);
                rest = &rest[1..];
            }
        }
        tx.commit()?;
        for (reply, result) in replies {
            let _ = reply.send(Ok(result));
        }
        if peers_changed {
            self.sync_peers()?;
        }
        self.published.applied.send_replace(last_index);
        Ok(())
    }

    fn apply_normal(
        &mut self,
        requests: &mut state_machine::Requests<'_>,
        entry: &Entry,
        replies: &mut Vec<(Reply<CommandResult>, CommandResult)>,
    ) -> Result<(), MetaError> {
        if entry.get_data().is_empty() {
            return Ok(()); // a new leader's empty entry
        }
        let batch = EntryBatch::decode(entry.get_data()).map_err(|e| MetaError::Decode {
            what: "log entry",
            reason: format!("index {}: {e}", entry.index),
        })?;
        if !(OLDEST_COMMAND_VERSION..=COMMAND_VERSION).contains(&batch.version) {
            return Err(MetaError::UnsupportedVersion {
                what: "command",
                version: batch.version,
                supported: COMMAND_VERSION,
            });
        }
        for p in &batch.proposals {
            let result = requests.apply(entry.index, p)?;
            if batch.proposer == self.id {
                if let Some(reply) = self.pending.remove(&p.id) {
                    replies.push((reply, result));
                }
            }
        }
        Ok(())
    }

    fn apply_conf_change(&mut self, tx: &mut ApplyTxn<'_>, entry: &Entry) -> Result<(), MetaError> {
        let decode = |e: protobuf::ProtobufError| MetaError::Decode {
            what: "conf change",
            reason: format!("index {}: {e}", entry.index),
        };
        let cs: ConfState;
        let changes: Vec<(ConfChangeType, u64)>;
        if entry.get_entry_type() == EntryType::EntryConfChange {
            let cc = ConfChange::parse_from_bytes(entry.get_data()).map_err(decode)?;
            cs = self.raw.apply_conf_change(&cc)?;
            changes = vec![(cc.get_change_type(), cc.node_id)];
            let addr = ConfChangeContext::decode(cc.get_context())
                .unwrap_or_default()
                .addr;
            self.record_members(tx, &changes, &addr)?;
        } else {
            let cc = ConfChangeV2::parse_from_bytes(entry.get_data()).map_err(decode)?;
            cs = self.raw.apply_conf_change(&cc)?;
            changes = cc
                .get_changes()
                .iter()
                .map(|c| (c.get_change_type(), c.node_id))
                .collect();
            let addr = ConfChangeContext::decode(cc.get_context())
                .unwrap_or_default()
                .addr;
            self.record_members(tx, &changes, &addr)?;
        }
        info!(node_id = self.id, index = entry.index, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
        tx.set_conf_state(cs);
        Ok(())
    }

    fn record_members(
        &self,
        tx: &ApplyTxn<'_>,
        changes: &[(ConfChangeType, u64)],
        addr: &str,
    ) -> Result<(), MetaError> {
        let err = |e| super::error::storage_err(tx.path(), e);
        for (kind, id) in changes {
            match kind {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    if !addr.is_empty() {
                        state_machine::put_member(tx.txn(), *id, addr).map_err(err)?;
                    }
                }
                ConfChangeType::RemoveNode => {
                    state_machine::remove_member(tx.txn(), *id).map_err(err)?;
                    if *id != self.id {
                        self.transport.remove_peer(*id);
                    } else {
                        warn!(node_id = self.id, "this node was removed from the cluster");
                    }
                }
            }
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), MetaError> {
        let (applied, _) = self.storage.applied();
        if applied < self.last_compact + self.config.snapshot_interval + self.config.log_retain {
            return Ok(());
        }
        let upto = applied - self.config.log_retain;
        self.storage.compact(upto)?;
        debug!(node_id = self.id, upto, "compacted raft log");
        self.last_compact = upto;
        Ok(())
    }

    fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let cs = raft.prs().conf().to_conf_state();
        let addrs: HashMap<u64, String> = self
            .storage
            .members()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let leader = raft.state == StateRole::Leader;
        let member = |id: u64, learner: bool| MemberStatus {
            id,
            addr: addrs.get(&id).cloned().unwrap_or_default(),
            learner,
            matched: if leader {
                raft.prs().get(id).map_or(0, |p| p.matched)
            } else {
                0
            },
        };
        let mut members: Vec<MemberStatus> =
            cs.voters.iter().map(|&id| member(id, false)).collect();
        members.extend(cs.learners.iter().map(|&id| member(id, true)));
        NodeStatus {
            id: self.id,
            leader_id: self.leader_hint(),
            term: raft.term,
            role: format!("{:?}", raft.state).to_lowercase(),
            commit_index: raft.raft_log.committed,
            applied_index: self.storage.applied().0,
            first_index: raft::Storage::first_index(&self.storage).unwrap_or(0),
            last_index: raft.raft_log.last_index(),
            members,
        }
    }

    fn fail_waiters(&mut self, err: impl Fn() -> MetaError) {
        for (_, _, r) in self.batch.drain(..) {
            let _ = r.send(Err(err()));
        }
        for (_, r) in self.pending.drain() {
            let _ = r.send(Err(err()));
        }
        for (_, r) in self.reads.drain() {
            let _ = r.send(Err(err()));
        }
        for (_, r) in self.conf_changes.drain() {
            let _ = r.send(Err(err()));
        }
        while let Ok(m) = self.inbox.try_recv() {
            match m {
                Inbound::Propose { reply, .. } => {
                    let _ = reply.send(Err(err()));
                }
                Inbound::ReadIndex { reply } => {
                    let _ = reply.send(Err(err()));
                }
                Inbound::Membership { reply, .. } | Inbound::TransferLeader { reply, .. } => {
                    let _ = reply.send(Err(err()));
                }
                _ => {}
            }
        }
        self.inbox.close();
    }
}
