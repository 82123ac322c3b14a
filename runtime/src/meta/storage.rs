//! Durable Raft storage in redb, in two files:
//! - the *log file* (`<name>-log.redb` beside the state file): the log, the
//!   hard state and the snapshot point, written by the log writer in synced
//!   transactions;
//! - the *state file*: the applied state (state machine tables, applied
//!   index, conf state), which always change together in one transaction.
//!
//! Two files, because redb has one writer per database: a sync of the log
//! would otherwise hold up every apply (and the Raft loop with it) for its
//! whole length. Applies are not synced; a crash loses the latest ones and
//! they are applied again from the log, which is compacted only behind a
//! synced state (see [`RedbStorage::compact`]).
//!
//! The state machine tables *are* the snapshot: a snapshot is exported from
//! them on demand at the applied index, and the log is compacted behind it.
//!
//! Log appends and hard state changes are *staged* first ([`RedbStorage::stage`]):
//! kept in memory, where the `Storage` reads see them at once, until the
//! log writer has written them in one synced transaction with everything
//! else staged meanwhile ([`RedbStorage::write`]). Raft learns that they are
//! durable only after that (`on_persist_ready`), so nothing that depends on
//! them (acknowledgements, votes, commit, apply) happens before.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};
use stoker_proto::meta::SnapshotData;
use stoker_proto::Message as _;

use super::error::storage_err;
use super::state_machine::{self, SM_TABLES};
use super::MetaError;
use tracing::info;

/// Log entries (log file): index → 8 bytes of big-endian term, then the
/// encoded entry.
const LOG: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("raft_log");
/// Raft's own durable state (log file): [`HARD_STATE`], [`SNAPSHOT_POINT`].
const RAFT_STATE: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("raft_state");
/// The applied state (state file): [`APPLIED`], [`CONF_STATE`]; written with
/// the state machine tables.
const APPLY_STATE: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("apply_state");

const HARD_STATE: &str = "hard_state";
/// Index and term of the last entry compacted away (the log starts after it).
const SNAPSHOT_POINT: &str = "snapshot_point";
const APPLIED: &str = "applied";
/// Index of the snapshot point a bootstrapped cluster starts from.
pub const INIT_INDEX: u64 = 5;
/// Term of the snapshot point a bootstrapped cluster starts from.
pub const INIT_TERM: u64 = 5;
const CONF_STATE: &str = "conf_state";

/// What the storage keeps in memory; the tables are the truth.
#[derive(Debug, Clone, Default)]
struct Cached {
    hard_state: HardState,
    conf_state: ConfState,
    snap_index: u64,
    snap_term: u64,
    last_index: u64,
    applied_index: u64,
    applied_term: u64,
}

struct Inner {
    /// The state file: applied state and state machine tables.
    db: Database,
    path: PathBuf,
    /// The log file: log, hard state, snapshot point.
    log: Database,
    log_path: PathBuf,
    /// The logical state: hard state and last index include what is staged.
    state: RwLock<Cached>,
    /// Staged entries not yet written, each with the number of the
    /// [`LogWrite`] that staged it: contiguous indexes ending at the last
    /// index. Entries below the first staged one are read from the database.
    staged: Mutex<VecDeque<(u64, Entry)>>,
}

/// One Ready's log update: staged in memory by the Raft loop, then written by
/// the log writer, in order, batched with the updates staged meanwhile.
#[derive(Debug, Clone, Default)]
pub struct LogWrite {
    /// The Ready's number; a written batch is reported up to its last one.
    pub number: u64,
    /// Entries to append (conflicting entries from the first index on are
    /// replaced).
    pub entries: Vec<Entry>,
    /// The new hard state, if it changed.
    pub hard_state: Option<HardState>,
    /// Whether the write must be synced: entries, or a term or vote change.
    /// A write that only moves the commit index is not (a lost commit index
    /// is learnt again from the leader).
    pub sync: bool,
}

impl LogWrite {
    /// Whether there is nothing to write (the update only orders messages
    /// behind earlier writes).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.hard_state.is_none()
    }
}

/// Raft storage backed by two redb files (see the module docs). Cheap to
/// clone; clones share the databases. Only the node's Raft loop and its log
/// writer write.
#[derive(Clone)]
pub struct RedbStorage {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedbStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStorage")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    out
}

fn unpair(path: &Path, what: &str, bytes: &[u8]) -> Result<(u64, u64), MetaError> {
    let arr: [u8; 16] = bytes.try_into().map_err(|_| MetaError::Corrupt {
        path: path.to_path_buf(),
        what: format!("bad {what} record"),
    })?;
    let (a, b) = arr.split_at(8);
    Ok((
        u64::from_be_bytes(a.try_into().expect("8 bytes")),
        u64::from_be_bytes(b.try_into().expect("8 bytes")),
    ))
}

fn encode_entry(e: &Entry) -> Result<Vec<u8>, MetaError> {
    let mut out = e.term.to_be_bytes().to_vec();
    e.write_to_vec(&mut out).map_err(|err| MetaError::Decode {
        what: "raft entry",
        reason: err.to_string(),
    })?;
    Ok(out)
}

/// Moves the log tables of a state file written by an older build (which
/// kept them in that file) into the log file: copied there in a synced
/// transaction, then deleted from `txn`, which the caller commits. Stopping
/// in between leaves the tables in both, and the copy is made again.
fn move_log(
    path: &Path,
    txn: &WriteTransaction,
    log_path: &Path,
    log: &Database,
) -> Result<(), MetaError> {
    let err = |e: redb::Error| storage_err(path, e);
    let log_err = |e: redb::Error| storage_err(log_path, e);
    let dst = log.begin_write().map_err(|e| log_err(e.into()))?;
    {
        let src = txn.open_table(LOG).map_err(|e| err(e.into()))?;
        let mut out = dst.open_table(LOG).map_err(|e| log_err(e.into()))?;
        out.retain(|_, _| false).map_err(|e| log_err(e.into()))?;
        for row in src.iter().map_err(|e| err(e.into()))? {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            out.insert(k.value(), v.value())
                .map_err(|e| log_err(e.into()))?;
        }
        let src = txn.open_table(RAFT_STATE).map_err(|e| err(e.into()))?;
        let mut out = dst.open_table(RAFT_STATE).map_err(|e| log_err(e.into()))?;
        out.retain(|_, _| false).map_err(|e| log_err(e.into()))?;
        for row in src.iter().map_err(|e| err(e.into()))? {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            out.insert(k.value(), v.value())
                .map_err(|e| log_err(e.into()))?;
        }
    }
    dst.commit().map_err(|e| log_err(e.into()))?;
    txn.delete_table(LOG).map_err(|e| err(e.into()))?;
    txn.delete_table(RAFT_STATE).map_err(|e| err(e.into()))?;
    info!(
        from = %path.display(),
        to = %log_path.display(),
        "moved the raft log to its own file"
    );
    Ok(())
}

/// Checks that `entries` (not empty) continue or overwrite the log of `c`.
fn check_append(entries: &[Entry], c: &Cached) -> Result<(), MetaError> {
    let first = entries[0].index;
    if first <= c.snap_index {
        return Err(MetaError::Invalid(format!(
            "append at {first} rewrites the compacted log (first index {})",
            c.snap_index + 1
        )));
    }
    if first > c.last_index + 1 {
        return Err(MetaError::Invalid(format!(
            "append at {first} leaves a hole after {}",
            c.last_index
        )));
    }
    Ok(())
}

impl RedbStorage {
    /// The log file kept beside the state file `path`.
    pub fn log_path(path: &Path) -> PathBuf {
        let stem = path
            .file_stem()
            .map_or_else(|| "meta".to_string(), |s| s.to_string_lossy().into_owned());
        path.with_file_name(format!("{stem}-log.redb"))
    }

    /// Opens (or creates) the metadata databases: the state file at `path`
    /// and the log file beside it ([`Self::log_path`]).
    ///
    /// # Errors
    /// [`MetaError::Open`] or [`MetaError::Corrupt`] naming the file when it
    /// is not a readable redb database of this format, or when the two files
    /// do not belong together.
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        let log_path = Self::log_path(path);
        let open_err = |path: &Path, e: redb::Error| MetaError::Open {
            path: path.to_path_buf(),
            source: e,
        };
        let db = Database::create(path).map_err(|e| open_err(path, e.into()))?;
        let log = Database::create(&log_path).map_err(|e| open_err(&log_path, e.into()))?;
        {
            let txn = log
                .begin_write()
                .map_err(|e| open_err(&log_path, e.into()))?;
            txn.open_table(LOG)
                .map_err(|e| open_err(&log_path, e.into()))?;
            txn.open_table(RAFT_STATE)
                .map_err(|e| open_err(&log_path, e.into()))?;
            txn.commit().map_err(|e| open_err(&log_path, e.into()))?;
        }
        let txn = db.begin_write().map_err(|e| open_err(path, e.into()))?;
        let names: Vec<String> = txn
            .list_tables()
            .map_err(|e| open_err(path, e.into()))?
            .map(|t| t.name().to_string())
            .collect();
        let has = |name: &str| names.iter().any(|n| n == name);
        // A database written by a build that kept the log in the same file
        // has it moved to the log file, synced there before it goes here.
        if has(LOG.name()) || has(RAFT_STATE.name()) {
            move_log(path, &txn, &log_path, &log)?;
        }
        {
            txn.open_table(APPLY_STATE)
                .map_err(|e| open_err(path, e.into()))?;
            for def in SM_TABLES {
                txn.open_table(*def).map_err(|e| open_err(path, e.into()))?;
            }
        }
        // A database written by a build that did not keep some derived
        // tables gets them counted once, here (a new one: nothing to count).
        state_machine::rebuild_missing(path, &txn, has)?;
        txn.commit().map_err(|e| open_err(path, e.into()))?;
        let storage = RedbStorage {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                log,
                log_path,
                state: RwLock::new(Cached::default()),
                staged: Mutex::new(VecDeque::new()),
            }),
        };
        let state = storage.load()?;
        storage.set_cached(state);
        Ok(storage)
    }

    fn load(&self) -> Result<Cached, MetaError> {
        let (path, log_path) = (&self.inner.path, &self.inner.log_path);
        let err = |e: redb::Error| storage_err(path, e);
        let log_err = |e: redb::Error| storage_err(log_path, e);
        let corrupt = |path: &Path, what: &str| MetaError::Corrupt {
            path: path.to_path_buf(),
            what: what.to_string(),
        };
        let txn = self.inner.db.begin_read().map_err(|e| err(e.into()))?;
        let apply_state = txn.open_table(APPLY_STATE).map_err(|e| err(e.into()))?;
        let log_txn = self.inner.log.begin_read().map_err(|e| log_err(e.into()))?;
        let raft_state = log_txn
            .open_table(RAFT_STATE)
            .map_err(|e| log_err(e.into()))?;
        let log = log_txn.open_table(LOG).map_err(|e| log_err(e.into()))?;
        let mut c = Cached::default();
        let mut has_hard_state = false;
        if let Some(v) = raft_state.get(HARD_STATE).map_err(|e| log_err(e.into()))? {
            c.hard_state = HardState::parse_from_bytes(v.value())
                .map_err(|_| corrupt(log_path, "bad hard state"))?;
            has_hard_state = true;
        }
        if let Some(v) = raft_state
            .get(SNAPSHOT_POINT)
            .map_err(|e| log_err(e.into()))?
        {
            (c.snap_index, c.snap_term) = unpair(log_path, "snapshot point", v.value())?;
        }
        if let Some(v) = apply_state.get(APPLIED).map_err(|e| err(e.into()))? {
            (c.applied_index, c.applied_term) = unpair(path, "applied index", v.value())?;
        }
        if let Some(v) = apply_state.get(CONF_STATE).map_err(|e| err(e.into()))? {
            c.conf_state = ConfState::parse_from_bytes(v.value())
                .map_err(|_| corrupt(path, "bad conf state"))?;
        }
        // Check every entry now: raft-rs treats a storage error on the log
        // as fatal, so a bad record must stop the node here, with its name.
        c.last_index = c.snap_index;
        let mut applied_term_in_log = (c.applied_index == c.snap_index).then_some(c.snap_term);
        for row in log.iter().map_err(|e| log_err(e.into()))? {
            let (k, v) = row.map_err(|e| log_err(e.into()))?;
            let index = k.value();
            if index != c.last_index + 1 {
                return Err(corrupt(
                    log_path,
                    &format!(
                        "log entry {} follows {} (the log starts after {})",
                        index, c.last_index, c.snap_index
                    ),
                ));
            }
            let bytes = v.value();
            let ok = bytes.len() >= 8
                && Entry::parse_from_bytes(&bytes[8..])
                    .is_ok_and(|e| e.index == index && e.term.to_be_bytes() == bytes[..8]);
            if !ok {
                return Err(corrupt(log_path, &format!("bad log entry {index}")));
            }
            if index == c.applied_index {
                let term: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
                applied_term_in_log = Some(u64::from_be_bytes(term));
            }
            c.last_index = index;
        }
        drop((log, raft_state, log_txn, apply_state, txn));
        if c.applied_index > 0 && !has_hard_state {
            return Err(corrupt(
                log_path,
                &format!(
                    "no Raft state, but {} is applied up to {}: the log file is missing or \
                     belongs elsewhere",
                    path.display(),
                    c.applied_index
                ),
            ));
        }
        if c.applied_index < c.snap_index {
            return Err(corrupt(
                path,
                &format!(
                    "applied index {} is behind the log, which starts after {}",
                    c.applied_index, c.snap_index
                ),
            ));
        }
        if applied_term_in_log != Some(c.applied_term) {
            // A snapshot was installed in the state file and the node
            // stopped before the log file was reset to it: finish that.
            info!(
                path = %log_path.display(),
                index = c.applied_index,
                "finishing an interrupted snapshot install"
            );
            self.reset_log(&mut c)?;
        }
        // Entries are applied only once committed, and the commit index is
        // written without a sync; what was applied was committed.
        if c.hard_state.commit < c.applied_index {
            c.hard_state.commit = c.applied_index;
        }
        Ok(c)
    }

    /// Empties the log and puts its snapshot point at the applied index (of
    /// `c`, which is updated), in one synced transaction of the log file.
    fn reset_log(&self, c: &mut Cached) -> Result<(), MetaError> {
        let txn = self.inner.log.begin_write().map_err(|e| self.log_err(e))?;
        txn.open_table(LOG)
            .map_err(|e| self.log_err(e))?
            .retain(|_, _| false)
            .map_err(|e| self.log_err(e))?;
        txn.open_table(RAFT_STATE)
            .map_err(|e| self.log_err(e))?
            .insert(
                SNAPSHOT_POINT,
                pair(c.applied_index, c.applied_term).as_slice(),
            )
            .map_err(|e| self.log_err(e))?;
        c.snap_index = c.applied_index;
        c.snap_term = c.applied_term;
        c.last_index = c.applied_index;
        if c.hard_state.commit < c.applied_index {
            c.hard_state.commit = c.applied_index;
        }
        if c.hard_state.term < c.applied_term {
            c.hard_state.term = c.applied_term;
        }
        self.write_hard_state(&txn, &c.hard_state)?;
        txn.commit().map_err(|e| self.log_err(e))?;
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The log file.
    pub fn log_file(&self) -> &Path {
        &self.inner.log_path
    }

    fn err(&self, e: impl Into<redb::Error>) -> MetaError {
        storage_err(&self.inner.path, e)
    }

    fn log_err(&self, e: impl Into<redb::Error>) -> MetaError {
        storage_err(&self.inner.log_path, e)
    }

    fn cached(&self) -> Cached {
        self.inner.state.read().expect("storage lock").clone()
    }

    fn set_cached(&self, c: Cached) {
        *self.inner.state.write().expect("storage lock") = c;
    }

    /// Whether nothing was ever written: no log, no vote, no members.
    pub fn is_fresh(&self) -> bool {
        let c = self.cached();
        c.last_index == 0 && c.hard_state == HardState::default() && c.conf_state.voters.is_empty()
    }

    /// Bootstraps a fresh store with the initial voters and their addresses
    /// (all nodes of a new cluster do this with the same list).
    ///
    /// The initial state sits at a snapshot point ([`INIT_INDEX`],
    /// [`INIT_TERM`]) rather than at index 0, so that a node that joins later
    /// (or comes back with an empty data directory) has a log that cannot
    /// match the leader's from the start and receives a snapshot, which
    /// carries the membership, instead of replaying a log that lacks it.
    ///
    /// # Errors
    /// [`MetaError::Invalid`] if the store is not fresh; storage failures.
    pub fn initialize(&self, voters: &[(u64, String)]) -> Result<(), MetaError> {
        if !self.is_fresh() {
            return Err(MetaError::Invalid("storage is already initialized".into()));
        }
        let mut next = self.cached();
        next.conf_state.voters = voters.iter().map(|(id, _)| *id).collect();
        next.snap_index = INIT_INDEX;
        next.snap_term = INIT_TERM;
        next.last_index = INIT_INDEX;
        next.applied_index = INIT_INDEX;
        next.applied_term = INIT_TERM;
        next.hard_state.term = INIT_TERM;
        next.hard_state.commit = INIT_INDEX;
        // The state file first: a log file with Raft state but no applied
        // state is refused at open, not mistaken for a fresh one.
        let txn = self.inner.db.begin_write().map_err(|e| self.err(e))?;
        for (id, addr) in voters {
            state_machine::put_member(&txn, *id, addr).map_err(|e| self.err(e))?;
        }
        self.write_conf_state(&txn, &next.conf_state)?;
        let point = pair(INIT_INDEX, INIT_TERM);
        txn.open_table(APPLY_STATE)
            .map_err(|e| self.err(e))?
            .insert(APPLIED, point.as_slice())
            .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        let txn = self.inner.log.begin_write().map_err(|e| self.log_err(e))?;
        self.write_hard_state(&txn, &next.hard_state)?;
        txn.open_table(RAFT_STATE)
            .map_err(|e| self.log_err(e))?
            .insert(SNAPSHOT_POINT, point.as_slice())
            .map_err(|e| self.log_err(e))?;
        txn.commit().map_err(|e| self.log_err(e))?;
        self.set_cached(next);
        Ok(())
    }

    fn write_conf_state(&self, txn: &WriteTransaction, cs: &ConfState) -> Result<(), MetaError> {
        let bytes = cs.write_to_bytes().map_err(raft::Error::from)?;
        txn.open_table(APPLY_STATE)
            .map_err(|e| self.err(e))?
            .insert(CONF_STATE, bytes.as_slice())
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Writes the hard state in a transaction of the log file.
    fn write_hard_state(&self, txn: &WriteTransaction, hs: &HardState) -> Result<(), MetaError> {
        let bytes = hs.write_to_bytes().map_err(raft::Error::from)?;
        txn.open_table(RAFT_STATE)
            .map_err(|e| self.log_err(e))?
            .insert(HARD_STATE, bytes.as_slice())
            .map_err(|e| self.log_err(e))?;
        Ok(())
    }

    /// Persists one Ready's snapshot, entries and hard state at once
    /// (nothing may be staged): without a snapshot in one synced transaction
    /// of the log file; with one, the state file first, then the log file
    /// (see the module docs). When only the commit index changed, the write
    /// is not synced (see [`LogWrite::sync`]).
    ///
    /// # Errors
    /// [`MetaError::Invalid`] for entries that would leave a hole or rewrite
    /// the compacted log, or while writes are staged; decode failures of the
    /// snapshot; storage failures.
    pub fn persist(
        &self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), MetaError> {
        if !self.staged().is_empty() {
            return Err(MetaError::Invalid(
                "persist while log writes are staged".into(),
            ));
        }
        let Some(snap) = snapshot else {
            let cur = self.cached().hard_state;
            let write = LogWrite {
                number: 0,
                entries: entries.to_vec(),
                hard_state: hard_state.cloned(),
                sync: !entries.is_empty()
                    || hard_state.is_some_and(|hs| hs.term != cur.term || hs.vote != cur.vote),
            };
            self.stage(&write)?;
            return self.write(std::slice::from_ref(&write));
        };
        let mut next = self.cached();
        // The state file first, synced: should the node stop before the log
        // file follows, opening it finishes the install (see `load`).
        let txn = self.inner.db.begin_write().map_err(|e| self.err(e))?;
        self.install_snapshot(&txn, snap, &mut next)?;
        txn.commit().map_err(|e| self.err(e))?;
        self.reset_log(&mut next)?;
        if !entries.is_empty() || hard_state.is_some() {
            let txn = self.inner.log.begin_write().map_err(|e| self.log_err(e))?;
            if !entries.is_empty() {
                check_append(entries, &next)?;
                self.append(&txn, entries)?;
                next.last_index = entries[entries.len() - 1].index;
            }
            if let Some(hs) = hard_state {
                next.hard_state = hs.clone();
                // The snapshot's point may be ahead of what the Ready says.
                next.hard_state.commit = next.hard_state.commit.max(next.applied_index);
            }
            self.write_hard_state(&txn, &next.hard_state)?;
            txn.commit().map_err(|e| self.log_err(e))?;
        }
        self.set_cached(next);
        Ok(())
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Entry)>> {
        self.inner.staged.lock().expect("staged lock")
    }

    /// Stages a log update: the `Storage` reads see it at once; it becomes
    /// durable when [`Self::write`] has written it. Only the Raft loop
    /// stages, in Ready order.
    ///
    /// # Errors
    /// [`MetaError::Invalid`] for entries that would leave a hole or rewrite
    /// the compacted log.
    pub fn stage(&self, w: &LogWrite) -> Result<(), MetaError> {
        let mut next = self.cached();
        if !w.entries.is_empty() {
            check_append(&w.entries, &next)?;
            let first = w.entries[0].index;
            let mut staged = self.staged();
            while staged.back().is_some_and(|(_, e)| e.index >= first) {
                staged.pop_back();
            }
            staged.extend(w.entries.iter().map(|e| (w.number, e.clone())));
            next.last_index = w.entries[w.entries.len() - 1].index;
        }
        if let Some(hs) = &w.hard_state {
            next.hard_state = hs.clone();
        }
        self.set_cached(next);
        Ok(())
    }

    /// Writes staged updates, in order, in one transaction, synced if any of
    /// them must be; then drops their entries from memory. Called by the log
    /// writer (one at a time) with updates staged earlier.
    ///
    /// # Errors
    /// Storage failures.
    pub fn write(&self, batch: &[LogWrite]) -> Result<(), MetaError> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        if batch.iter().any(|w| !w.is_empty()) {
            let mut txn = self.inner.log.begin_write().map_err(|e| self.log_err(e))?;
            if !batch.iter().any(|w| w.sync) {
                txn.set_durability(Durability::None)
                    .map_err(|e| self.log_err(redb::Error::from(e)))?;
            }
            for w in batch.iter().filter(|w| !w.entries.is_empty()) {
                self.append(&txn, &w.entries)?;
            }
            if let Some(hs) = batch.iter().rev().find_map(|w| w.hard_state.as_ref()) {
                self.write_hard_state(&txn, hs)?;
            }
            txn.commit().map_err(|e| self.log_err(e))?;
        }
        // Entries staged by later updates (numbers above the batch's) stay:
        // they are not written yet, or replaced what was just written.
        let mut staged = self.staged();
        while staged.front().is_some_and(|(n, _)| *n <= last.number) {
            staged.pop_front();
        }
        Ok(())
    }

    /// Writes `entries` to the log table (in a transaction of the log file),
    /// replacing the log from their first index on.
    fn append(&self, txn: &WriteTransaction, entries: &[Entry]) -> Result<(), MetaError> {
        let mut log = txn.open_table(LOG).map_err(|e| self.log_err(e))?;
        log.retain_in(entries[0].index.., |_, _| false)
            .map_err(|e| self.log_err(e))?;
        for e in entries {
            log.insert(e.index, encode_entry(e)?.as_slice())
                .map_err(|e| self.log_err(e))?;
        }
        Ok(())
    }

    /// Imports a snapshot into the state file (in `txn`) and sets `next`'s
    /// applied state to its point; the log is reset after.
    fn install_snapshot(
        &self,
        txn: &WriteTransaction,
        snap: &Snapshot,
        next: &mut Cached,
    ) -> Result<(), MetaError> {
        let meta = snap.get_metadata();
        let data = SnapshotData::decode(snap.get_data()).map_err(|e| MetaError::Decode {
            what: "snapshot",
            reason: e.to_string(),
        })?;
        state_machine::import(&self.inner.path, txn, &data)?;
        txn.open_table(APPLY_STATE)
            .map_err(|e| self.err(e))?
            .insert(APPLIED, pair(meta.index, meta.term).as_slice())
            .map_err(|e| self.err(e))?;
        self.write_conf_state(txn, meta.get_conf_state())?;
        next.snap_index = meta.index;
        next.snap_term = meta.term;
        next.last_index = meta.index;
        next.applied_index = meta.index;
        next.applied_term = meta.term;
        next.conf_state = meta.get_conf_state().clone();
        Ok(())
    }

    /// Records a new commit index learnt after a Ready (not synced: a lost
    /// commit index is learnt again from the leader).
    ///
    /// # Errors
    /// Storage failures.
    pub fn set_commit(&self, commit: u64) -> Result<(), MetaError> {
        let mut next = self.cached();
        if commit <= next.hard_state.commit {
            return Ok(());
        }
        next.hard_state.commit = commit;
        let mut txn = self.inner.log.begin_write().map_err(|e| self.log_err(e))?;
        txn.set_durability(Durability::None)
            .map_err(|e| self.log_err(redb::Error::from(e)))?;
        self.write_hard_state(&txn, &next.hard_state)?;
        txn.commit().map_err(|e| self.log_err(e))?;
        self.set_cached(next);
        Ok(())
    }

    /// Starts the transaction that applies committed entries. It is not
    /// synced: after a crash the entries are applied again from the log,
    /// which compaction keeps until a synced transaction covers them.
    ///
    /// # Errors
    /// Storage failures.
    pub fn begin_apply(&self) -> Result<ApplyTxn<'_>, MetaError> {
        let mut txn = self.inner.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::None)
            .map_err(|e| self.err(redb::Error::from(e)))?;
        Ok(ApplyTxn {
            storage: self,
            txn,
            next: self.cached(),
        })
    }

    /// Discards the log up to and including `upto`, which must be applied.
    /// The state file is synced first, so every earlier (unsynced) apply is
    /// durable before the log that could replay it disappears.
    ///
    /// # Errors
    /// [`MetaError::Invalid`] if `upto` is not applied; storage failures.
    pub fn compact(&self, upto: u64) -> Result<(), MetaError> {
        let mut next = self.cached();
        if upto <= next.snap_index {
            return Ok(());
        }
        if upto > next.applied_index {
            return Err(MetaError::Invalid(format!(
                "cannot compact to {upto} beyond applied index {}",
                next.applied_index
            )));
        }
        let term = raft::Storage::term(self, upto)?;
        self.sync_applied()?;
        let txn = self.inner.log.begin_write().map_err(|e| self.log_err(e))?;
        txn.open_table(LOG)
            .map_err(|e| self.log_err(e))?
            .retain_in(..=upto, |_, _| false)
            .map_err(|e| self.log_err(e))?;
        txn.open_table(RAFT_STATE)
            .map_err(|e| self.log_err(e))?
            .insert(SNAPSHOT_POINT, pair(upto, term).as_slice())
            .map_err(|e| self.log_err(e))?;
        txn.commit().map_err(|e| self.log_err(e))?;
        next.snap_index = upto;
        next.snap_term = term;
        let mut cur = self.inner.state.write().expect("storage lock");
        cur.snap_index = next.snap_index;
        cur.snap_term = next.snap_term;
        Ok(())
    }

    /// Makes every applied change durable: one synced (empty) transaction of
    /// the state file, which persists the unsynced ones before it.
    ///
    /// # Errors
    /// Storage failures.
    pub fn sync_applied(&self) -> Result<(), MetaError> {
        let txn = self.inner.db.begin_write().map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// The applied index and its term.
    pub fn applied(&self) -> (u64, u64) {
        let c = self.cached();
        (c.applied_index, c.applied_term)
    }

    /// The hard state as last persisted.
    pub fn hard_state(&self) -> HardState {
        self.cached().hard_state
    }

    /// The applied membership.
    pub fn conf_state(&self) -> ConfState {
        self.cached().conf_state
    }

    /// A read transaction over the applied state.
    ///
    /// # Errors
    /// Storage failures.
    pub fn read(&self) -> Result<redb::ReadTransaction, MetaError> {
        self.inner.db.begin_read().map_err(|e| self.err(e))
    }

    fn read_log(&self) -> Result<redb::ReadTransaction, MetaError> {
        self.inner.log.begin_read().map_err(|e| self.log_err(e))
    }

    /// SHA-256 of the state machine tables.
    ///
    /// # Errors
    /// Storage failures.
    pub fn digest(&self) -> Result<[u8; 32], MetaError> {
        let txn = self.read()?;
        state_machine::digest(&txn).map_err(|e| self.err(e))
    }

    /// Members (id, address) recorded in the state machine.
    ///
    /// # Errors
    /// Storage failures, undecodable records.
    pub fn members(&self) -> Result<Vec<(u64, String)>, MetaError> {
        let txn = self.read()?;
        state_machine::members(&self.inner.path, &txn)
    }

    /// Entries [low, high) with at most `max` bytes (at least one entry):
    /// written ones from the database, then staged ones from memory.
    fn read_entries(&self, low: u64, high: u64, max: Option<u64>) -> Result<Vec<Entry>, MetaError> {
        // Held throughout, so the writer cannot drop staged entries between
        // the two reads (it drops them only once they are in the database).
        let staged = self.staged();
        let staged_first = staged.front().map_or(high, |(_, e)| e.index.min(high));
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        let mut push = |out: &mut Vec<Entry>, entry: Entry, bytes: u64| {
            size += bytes;
            // Always at least one entry, even if it alone exceeds the limit.
            if !out.is_empty() && max.is_some_and(|m| size > m) {
                return false;
            }
            out.push(entry);
            true
        };
        if low < staged_first {
            let hole = || MetaError::Corrupt {
                path: self.inner.log_path.clone(),
                what: format!("log has a hole in [{low}, {staged_first})"),
            };
            let txn = self.read_log()?;
            let log = txn.open_table(LOG).map_err(|e| self.log_err(e))?;
            for row in log.range(low..staged_first).map_err(|e| self.log_err(e))? {
                let (k, v) = row.map_err(|e| self.log_err(e))?;
                let bytes = v.value();
                let entry = bytes
                    .get(8..)
                    .and_then(|b| Entry::parse_from_bytes(b).ok())
                    .filter(|e| e.index == k.value())
                    .ok_or_else(|| MetaError::Corrupt {
                        path: self.inner.log_path.clone(),
                        what: format!("bad log entry {}", k.value()),
                    })?;
                if entry.index != low + out.len() as u64 {
                    return Err(hole());
                }
                if !push(&mut out, entry, (bytes.len() - 8) as u64) {
                    return Ok(out);
                }
            }
            if out.len() as u64 != staged_first - low {
                return Err(hole());
            }
        }
        if let Some((_, front)) = staged.front() {
            let from = low.max(front.index) - front.index;
            for (_, e) in staged
                .range(from as usize..)
                .take_while(|(_, e)| e.index < high)
            {
                let bytes = u64::from(protobuf::Message::compute_size(e));
                if !push(&mut out, e.clone(), bytes) {
                    return Ok(out);
                }
            }
        }
        if out.len() as u64 != high - low {
            return Err(MetaError::Corrupt {
                path: self.inner.log_path.clone(),
                what: format!("log has a hole in [{low}, {high})"),
            });
        }
        Ok(out)
    }

    /// The term of the staged entry at `idx`, if it is staged.
    fn staged_term(&self, idx: u64) -> Option<u64> {
        let staged = self.staged();
        let first = staged.front()?.1.index;
        let i = usize::try_from(idx.checked_sub(first)?).ok()?;
        staged.get(i).map(|(_, e)| e.term)
    }
}

/// The transaction applying a run of committed entries: state machine
/// writes, the applied index and the conf state commit together.
pub struct ApplyTxn<'a> {
    storage: &'a RedbStorage,
    txn: WriteTransaction,
    next: Cached,
}

impl ApplyTxn<'_> {
    /// The write transaction for state machine tables.
    pub fn txn(&self) -> &WriteTransaction {
        &self.txn
    }

    /// The database file (for error messages).
    pub fn path(&self) -> &Path {
        self.storage.path()
    }

    /// Records that the entry at `index` of `term` is applied.
    pub fn set_applied(&mut self, index: u64, term: u64) {
        self.next.applied_index = index;
        self.next.applied_term = term;
    }

    /// Records the membership produced by an applied conf change.
    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.next.conf_state = cs;
    }

    /// Commits the transaction.
    ///
    /// # Errors
    /// Storage failures.
    pub fn commit(self) -> Result<(), MetaError> {
        let s = self.storage;
        s.txn_write_applied(&self.txn, &self.next)?;
        self.txn.commit().map_err(|e| s.err(e))?;
        // Only the applied fields: the log side may not change meanwhile
        // (one writer), but keep the cache's other fields authoritative.
        let mut cur = s.inner.state.write().expect("storage lock");
        cur.applied_index = self.next.applied_index;
        cur.applied_term = self.next.applied_term;
        cur.conf_state = self.next.conf_state;
        Ok(())
    }
}

impl RedbStorage {
    fn txn_write_applied(&self, txn: &WriteTransaction, next: &Cached) -> Result<(), MetaError> {
        txn.open_table(APPLY_STATE)
            .map_err(|e| self.err(e))?
            .insert(
                APPLIED,
                pair(next.applied_index, next.applied_term).as_slice(),
            )
            .map_err(|e| self.err(e))?;
        self.write_conf_state(txn, &next.conf_state)
    }
}

fn to_raft(e: MetaError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl raft::Storage for RedbStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.cached();
        Ok(RaftState {
            hard_state: c.hard_state,
            conf_state: c.conf_state,
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let c = self.cached();
        if low <= c.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > c.last_index + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low == high {
            return Ok(Vec::new());
        }
        self.read_entries(low, high, max_size.into())
            .map_err(to_raft)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let c = self.cached();
        if idx == c.snap_index {
            return Ok(c.snap_term);
        }
        if idx < c.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > c.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if let Some(term) = self.staged_term(idx) {
            return Ok(term);
        }
        let read = || -> Result<u64, MetaError> {
            let txn = self.read_log()?;
            let log = txn.open_table(LOG).map_err(|e| self.log_err(e))?;
            let v = log.get(idx).map_err(|e| self.log_err(e))?;
            v.and_then(|v| {
                let term: [u8; 8] = v.value().get(..8)?.try_into().ok()?;
                Some(u64::from_be_bytes(term))
            })
            .ok_or_else(|| MetaError::Corrupt {
                path: self.inner.log_path.clone(),
                what: format!("missing log entry {idx}"),
            })
        };
        read().map_err(to_raft)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.cached().snap_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.cached().last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let build = || -> Result<Snapshot, MetaError> {
            let txn = self.read()?;
            let apply_state = txn.open_table(APPLY_STATE).map_err(|e| self.err(e))?;
            let (index, term) = match apply_state.get(APPLIED).map_err(|e| self.err(e))? {
                Some(v) => unpair(self.path(), "applied index", v.value())?,
                None => (0, 0),
            };
            let cs = match apply_state.get(CONF_STATE).map_err(|e| self.err(e))? {
                Some(v) => ConfState::parse_from_bytes(v.value()).map_err(raft::Error::from)?,
                None => ConfState::default(),
            };
            let data = state_machine::export(&txn).map_err(|e| self.err(e))?;
            let mut snap = Snapshot {
                data: data.encode_to_vec().into(),
                ..Default::default()
            };
            let meta = snap.mut_metadata();
            meta.index = index;
            meta.term = term;
            meta.set_conf_state(cs);
            Ok(snap)
        };
        let snap = build().map_err(to_raft)?;
        if snap.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snap)
    }
}

#[cfg(test)]
#[path = "storage_tests.rs"]
mod tests;
