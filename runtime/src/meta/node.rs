//! The Raft loop: one `RawNode` driven by a Ready loop on its own thread.
//!
//! Order of one Ready, as raft-rs requires: send messages; persist the
//! snapshot, entries and hard state in one synced transaction; send the
//! persisted messages; apply committed entries; advance; handle the
//! LightReady (commit index, messages, committed entries); advance_apply.

use std::collections::HashMap;
use std::sync::Arc;

use protobuf::Message as PbMessage;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use stoker_proto::meta::{
    membership_request::Kind as MemberKind, Command, CommandResult, ConfChangeContext, EntryBatch,
    Proposal, COMMAND_VERSION,
};
use stoker_proto::Message as _;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::state_machine;
use super::storage::{ApplyTxn, RedbStorage};
use super::transport::Transport;
use super::{LeaderState, MemberStatus, MetaConfig, MetaError, NodeStatus, RequestId};

type Reply<T> = oneshot::Sender<Result<T, MetaError>>;

/// Requests into the Raft loop.
pub(crate) enum Inbound {
    Propose {
        cmd: Command,
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
        }
    }

    /// Runs the loop until shutdown or a fatal storage error.
    pub(crate) async fn run(mut self) {
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
            if let Err(e) = self.on_ready() {
                error!(node_id = self.id, error = %e, "raft loop stopped on error");
                break;
            }
            if stop {
                break;
            }
        }
        self.fail_waiters(|| MetaError::Stopped);
        info!(node_id = self.id, "raft loop stopped");
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
                self.batch.push((cmd, request_id, reply));
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
        let data = EntryBatch {
            version: COMMAND_VERSION,
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

    fn on_ready(&mut self) -> Result<(), MetaError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
        self.storage
            .persist(snapshot.as_ref(), ready.entries(), ready.hs())?;
        if let Some(snap) = &snapshot {
            self.after_snapshot(snap.get_metadata().index)?;
        }
        if let Some(ss) = ready.ss() {
            self.on_soft_state(ss.leader_id, ss.raft_state);
        }
        for rs in ready.take_read_states() {
            let ctx = rs.request_ctx.as_slice().try_into().map(u64::from_be_bytes);
            if let Some(reply) = ctx.ok().and_then(|c| self.reads.remove(&c)) {
                let _ = reply.send(Ok(rs.index));
            }
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        self.apply(ready.take_committed_entries())?;
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit)?;
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.maybe_compact()
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
        for entry in &entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    self.apply_normal(&tx, entry, &mut replies)?;
                    if let Some(r) = self.conf_changes.remove(&entry.index) {
                        // raft-rs turned the conf change into an empty entry:
                        // another one was still pending.
                        let _ = r.send(Err(MetaError::ProposalDropped));
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&mut tx, entry)?;
                    peers_changed = true;
                    if let Some(r) = self.conf_changes.remove(&entry.index) {
                        let _ = r.send(Ok(()));
                    }
                }
            }
            tx.set_applied(entry.index, entry.term);
        }
        state_machine::forget_old_requests(
            tx.path(),
            tx.txn(),
            state_machine::MAX_REMEMBERED_REQUESTS,
        )?;
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
        tx: &ApplyTxn<'_>,
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
        if batch.version != COMMAND_VERSION {
            return Err(MetaError::UnsupportedVersion {
                what: "command",
                version: batch.version,
                supported: COMMAND_VERSION,
            });
        }
        for p in &batch.proposals {
            let result = state_machine::apply_proposal(tx.path(), tx.txn(), entry.index, p)?;
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
