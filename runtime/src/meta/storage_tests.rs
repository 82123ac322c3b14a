//! The raft-rs `Storage` contract on redb: entries and terms over
//! [first − 1, last], appends that truncate conflicts, compaction, snapshots,
//! restart, and clear errors for bad files.

use raft::eraftpb::{Entry, HardState};
use raft::{GetEntriesContext, Storage, StorageError};
use stoker_proto::meta::{command, Command, SetConfig};

use super::*;
use crate::meta::tx::Tx;

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("data-{index}").into_bytes().into(),
        ..Default::default()
    }
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn open(dir: &tempfile::TempDir) -> RedbStorage {
    RedbStorage::open(&dir.path().join("meta.redb")).expect("open")
}

fn compacted<T: std::fmt::Debug>(r: raft::Result<T>) -> bool {
    matches!(r, Err(raft::Error::Store(StorageError::Compacted)))
}

fn unavailable<T: std::fmt::Debug>(r: raft::Result<T>) -> bool {
    matches!(r, Err(raft::Error::Store(StorageError::Unavailable)))
}

/// Applies (as committed) every entry up to `index` without state changes.
fn mark_applied(s: &RedbStorage, index: u64, term: u64) {
    let mut tx = s.begin_apply().unwrap();
    tx.set_applied(index, term);
    tx.commit().unwrap();
}

#[test]
fn fresh_storage_is_empty_log_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    assert!(s.is_fresh());
    assert_eq!(s.first_index().unwrap(), 1);
    assert_eq!(s.last_index().unwrap(), 0);
    assert_eq!(s.term(0).unwrap(), 0);
    assert!(unavailable(s.term(1)));
    assert!(s.entries(1, 1, None, ctx()).unwrap().is_empty());
    let st = s.initial_state().unwrap();
    assert_eq!(st.hard_state, HardState::default());
    assert!(st.conf_state.voters.is_empty());
}

#[test]
fn entries_and_terms_follow_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let ents: Vec<Entry> = (1..=5)
        .map(|i| entry(i, if i < 3 { 1 } else { 2 }))
        .collect();
    s.persist(None, &ents, None).unwrap();
    assert_eq!(s.last_index().unwrap(), 5);
    assert_eq!(s.entries(2, 5, None, ctx()).unwrap(), ents[1..4].to_vec());
    assert_eq!(s.term(2).unwrap(), 1);
    assert_eq!(s.term(5).unwrap(), 2);
    assert!(unavailable(s.term(6)));
    assert!(unavailable(s.entries(4, 7, None, ctx())));
    // A size limit still returns at least one entry, and stops early.
    assert_eq!(s.entries(1, 6, Some(0), ctx()).unwrap().len(), 1);
    let one = protobuf::Message::compute_size(&ents[0]) as u64;
    let two = s.entries(1, 6, Some(one * 2), ctx()).unwrap();
    assert!(!two.is_empty() && two.len() < 5, "limited to {}", two.len());
}

#[test]
fn conflicting_append_truncates_and_holes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let ents: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
    s.persist(None, &ents, None).unwrap();
    s.persist(None, &[entry(3, 2), entry(4, 2)], None).unwrap();
    assert_eq!(s.last_index().unwrap(), 4);
    assert_eq!(s.term(3).unwrap(), 2);
    assert!(unavailable(s.term(5)));
    let err = s.persist(None, &[entry(7, 2)], None).unwrap_err();
    assert!(err.to_string().contains("hole"), "{err}");
}

#[test]
fn compaction_keeps_the_term_before_first_index() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let ents: Vec<Entry> = (1..=10).map(|i| entry(i, i / 4 + 1)).collect();
    s.persist(None, &ents, None).unwrap();
    assert!(
        s.compact(5).is_err(),
        "cannot compact past the applied index"
    );
    mark_applied(&s, 6, ents[5].term);
    s.compact(5).unwrap();
    assert_eq!(s.first_index().unwrap(), 6);
    assert_eq!(s.term(5).unwrap(), ents[4].term);
    assert!(compacted(s.term(4)));
    assert!(compacted(s.entries(5, 7, None, ctx())));
    assert_eq!(s.entries(6, 11, None, ctx()).unwrap(), ents[5..].to_vec());
    let err = s.persist(None, &[entry(5, 9)], None).unwrap_err();
    assert!(err.to_string().contains("compacted"), "{err}");
}

#[test]
fn restart_recovers_log_hard_state_and_applied() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(&dir);
        s.initialize(&[(1, "a".into()), (2, "b".into())]).unwrap();
        let mut hs = HardState::default();
        assert_eq!(s.first_index().unwrap(), super::INIT_INDEX + 1);
        assert_eq!(s.term(super::INIT_INDEX).unwrap(), super::INIT_TERM);
        hs.term = 6;
        hs.vote = 2;
        hs.commit = 7;
        let ents: Vec<Entry> = (6..=9).map(|i| entry(i, 6)).collect();
        s.persist(None, &ents, Some(&hs)).unwrap();
        mark_applied(&s, 7, 6);
        s.set_commit(8).unwrap();
    }
    let s = open(&dir);
    assert!(!s.is_fresh());
    let st = s.initial_state().unwrap();
    assert_eq!(
        (st.hard_state.term, st.hard_state.vote, st.hard_state.commit),
        (6, 2, 8)
    );
    assert_eq!(st.conf_state.voters, vec![1, 2]);
    assert_eq!(s.applied(), (7, 6));
    assert_eq!(s.last_index().unwrap(), 9);
    assert_eq!(s.members().unwrap(), vec![(1, "a".into()), (2, "b".into())]);
    assert!(s.initialize(&[(1, "a".into())]).is_err());
}

fn staged(number: u64, entries: Vec<Entry>, commit: u64) -> LogWrite {
    LogWrite {
        number,
        entries,
        hard_state: Some(HardState {
            term: 3,
            vote: 1,
            commit,
            ..Default::default()
        }),
        sync: true,
    }
}

fn terms(s: &RedbStorage, low: u64, high: u64) -> Vec<(u64, u64)> {
    s.entries(low, high, None, ctx())
        .unwrap()
        .iter()
        .map(|e| (e.index, e.term))
        .collect()
}

#[test]
fn staged_entries_are_read_at_once_and_durable_only_once_written() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(&dir);
        s.persist(
            None,
            &(1..=3).map(|i| entry(i, 1)).collect::<Vec<_>>(),
            None,
        )
        .unwrap();
        let w1 = staged(1, (4..=6).map(|i| entry(i, 1)).collect(), 3);
        s.stage(&w1).unwrap();
        assert_eq!(s.last_index().unwrap(), 6);
        assert_eq!(s.term(5).unwrap(), 1);
        // Written and staged entries in one read, and a size limit across both.
        assert_eq!(terms(&s, 2, 7), (2..=6).map(|i| (i, 1)).collect::<Vec<_>>());
        let one = protobuf::Message::compute_size(&entry(1, 1)) as u64;
        assert_eq!(s.entries(2, 7, Some(one * 3), ctx()).unwrap().len(), 3);
        // A conflict inside the staged entries, then one reaching into the
        // written log.
        let w2 = staged(2, (5..=7).map(|i| entry(i, 2)).collect(), 4);
        s.stage(&w2).unwrap();
        assert_eq!(terms(&s, 4, 8), vec![(4, 1), (5, 2), (6, 2), (7, 2)]);
        let w3 = staged(3, vec![entry(3, 3), entry(4, 3)], 2);
        s.stage(&w3).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(terms(&s, 1, 5), vec![(1, 1), (2, 1), (3, 3), (4, 3)]);
        assert_eq!(s.term(3).unwrap(), 3);
        assert!(unavailable(s.term(5)));
        assert!(unavailable(s.entries(4, 6, None, ctx())));
        // Holes and compacted indexes are refused when staging too.
        assert!(s.stage(&staged(4, vec![entry(9, 3)], 2)).is_err());
        // Nothing staged reached the file: a crash now loses it all.
    }
    let s = open(&dir);
    assert_eq!(s.last_index().unwrap(), 3);
    assert_eq!(s.initial_state().unwrap().hard_state, HardState::default());
    assert_eq!(terms(&s, 1, 4), vec![(1, 1), (2, 1), (3, 1)]);

    let batch = [
        staged(1, (4..=6).map(|i| entry(i, 1)).collect(), 3),
        staged(2, (5..=7).map(|i| entry(i, 2)).collect(), 4),
        staged(3, vec![entry(3, 3), entry(4, 3)], 2),
    ];
    for w in &batch {
        s.stage(w).unwrap();
    }
    s.write(&batch).unwrap();
    assert_eq!(terms(&s, 1, 5), vec![(1, 1), (2, 1), (3, 3), (4, 3)]);
    drop(s);
    let s = open(&dir);
    assert_eq!(s.last_index().unwrap(), 4);
    assert_eq!(terms(&s, 1, 5), vec![(1, 1), (2, 1), (3, 3), (4, 3)]);
    let hs = s.initial_state().unwrap().hard_state;
    assert_eq!((hs.term, hs.vote, hs.commit), (3, 1, 2));
}

#[test]
fn a_written_batch_leaves_later_staged_entries_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let w1 = staged(1, (1..=3).map(|i| entry(i, 1)).collect(), 0);
    let w2 = staged(2, vec![entry(2, 2)], 0);
    let w3 = staged(3, vec![entry(3, 2), entry(4, 2)], 1);
    for w in [&w1, &w2, &w3] {
        s.stage(w).unwrap();
    }
    // The file now holds 1..=3 of term 1, but 2 and 3 were replaced since.
    s.write(std::slice::from_ref(&w1)).unwrap();
    assert_eq!(terms(&s, 1, 5), vec![(1, 1), (2, 2), (3, 2), (4, 2)]);
    assert_eq!(s.term(3).unwrap(), 2);
    // `persist` refuses to run while anything is staged.
    assert!(s.persist(None, &[entry(5, 2)], None).is_err());
    s.write(&[w2, w3]).unwrap();
    drop(s);
    let s = open(&dir);
    assert_eq!(terms(&s, 1, 5), vec![(1, 1), (2, 2), (3, 2), (4, 2)]);
    assert_eq!(s.initial_state().unwrap().hard_state.commit, 1);
    s.persist(None, &[entry(5, 2)], None).unwrap();
    assert_eq!(s.last_index().unwrap(), 5);
}

#[test]
fn snapshot_moves_state_between_stores() {
    let dir = tempfile::tempdir().unwrap();
    let a = RedbStorage::open(&dir.path().join("a.redb")).unwrap();
    a.initialize(&[(1, "a".into())]).unwrap();
    let ents: Vec<Entry> = (6..=8).map(|i| entry(i, 6)).collect();
    a.persist(None, &ents, None).unwrap();
    {
        let mut tx = a.begin_apply().unwrap();
        let cmd = Command {
            kind: Some(command::Kind::SetConfig(SetConfig {
                key: "k".into(),
                value: "v".into(),
            })),
        };
        let r = state_machine::apply_command(tx.path(), &Tx::new(tx.txn()), &cmd).unwrap();
        assert!(r.error.is_empty());
        tx.set_applied(8, 6);
        tx.commit().unwrap();
    }
    assert!(matches!(
        a.snapshot(9, 2),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    ));
    let snap = a.snapshot(8, 2).unwrap();
    assert_eq!(
        (snap.get_metadata().index, snap.get_metadata().term),
        (8, 6)
    );
    assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1]);

    let b = RedbStorage::open(&dir.path().join("b.redb")).unwrap();
    b.persist(None, &[entry(1, 1)], None).unwrap();
    b.persist(Some(&snap), &[], None).unwrap();
    assert_eq!(b.first_index().unwrap(), 9);
    assert_eq!(b.last_index().unwrap(), 8);
    assert_eq!(b.term(8).unwrap(), 6);
    assert_eq!(b.applied(), (8, 6));
    assert!(b.hard_state().commit >= 8);
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    // And it survives a restart.
    drop(b);
    let b = RedbStorage::open(&dir.path().join("b.redb")).unwrap();
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    assert_eq!(b.first_index().unwrap(), 9);
}

#[test]
fn garbage_file_is_a_clear_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    std::fs::write(&path, vec![0xA5u8; 64 * 1024]).unwrap();
    let err = RedbStorage::open(&path).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
}

#[test]
fn truncated_file_is_a_clear_error_naming_it() {
    for log_file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let s = RedbStorage::open(&path).unwrap();
            let ents: Vec<Entry> = (1..=200).map(|i| entry(i, 1)).collect();
            s.persist(None, &ents, None).unwrap();
        }
        let victim = if log_file {
            RedbStorage::log_path(&path)
        } else {
            path.clone()
        };
        let len = std::fs::metadata(&victim).unwrap().len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .unwrap();
        f.set_len(len / 3).unwrap();
        drop(f);
        let err = RedbStorage::open(&path).unwrap_err();
        assert!(err.to_string().contains(victim.to_str().unwrap()), "{err}");
    }
}

#[test]
fn corrupt_log_entry_is_a_clear_error_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let log_path = RedbStorage::log_path(&path);
    {
        let s = RedbStorage::open(&path).unwrap();
        assert_eq!(s.log_file(), log_path);
        let ents: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
        s.persist(None, &ents, None).unwrap();
    }
    {
        let db = redb::Database::open(&log_path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(LOG)
            .unwrap()
            .insert(3u64, b"garbage!garbage".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let err = RedbStorage::open(&path).unwrap_err().to_string();
    assert!(
        err.contains(log_path.to_str().unwrap()) && err.contains("log entry 3"),
        "{err}"
    );
    {
        let db = redb::Database::open(&log_path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(LOG).unwrap().remove(3u64).unwrap();
        txn.commit().unwrap();
    }
    let err = RedbStorage::open(&path).unwrap_err().to_string();
    assert!(err.contains("log entry 4 follows 2"), "{err}");
}

#[test]
fn a_lost_log_file_is_refused_not_taken_for_a_fresh_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    {
        let s = RedbStorage::open(&path).unwrap();
        s.initialize(&[(1, "127.0.0.1:1".into())]).unwrap();
    }
    std::fs::remove_file(RedbStorage::log_path(&path)).unwrap();
    let err = RedbStorage::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("no Raft state") && err.contains("log file is missing"),
        "{err}"
    );
}

#[test]
fn a_log_kept_in_the_state_file_by_an_older_build_is_moved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let log_path = RedbStorage::log_path(&path);
    let hs = HardState {
        term: 3,
        vote: 2,
        commit: 4,
        ..Default::default()
    };
    {
        let s = RedbStorage::open(&path).unwrap();
        let ents: Vec<Entry> = (1..=6).map(|i| entry(i, 3)).collect();
        s.persist(None, &ents, Some(&hs)).unwrap();
        mark_applied(&s, 4, 3);
    }
    // Rewrite the pair as the old single file: log tables beside the state.
    {
        let old = redb::Database::open(&log_path).unwrap();
        let db = redb::Database::open(&path).unwrap();
        let (r, w) = (old.begin_read().unwrap(), db.begin_write().unwrap());
        {
            let mut log = w.open_table(LOG).unwrap();
            for row in r.open_table(LOG).unwrap().iter().unwrap() {
                let (k, v) = row.unwrap();
                log.insert(k.value(), v.value()).unwrap();
            }
            let mut state = w.open_table(RAFT_STATE).unwrap();
            for row in r.open_table(RAFT_STATE).unwrap().iter().unwrap() {
                let (k, v) = row.unwrap();
                state.insert(k.value(), v.value()).unwrap();
            }
        }
        w.commit().unwrap();
    }
    std::fs::remove_file(&log_path).unwrap();
    let s = RedbStorage::open(&path).unwrap();
    assert_eq!(s.last_index().unwrap(), 6);
    assert_eq!(s.hard_state(), hs);
    assert_eq!(s.applied(), (4, 3));
    assert_eq!(terms(&s, 1, 7), (1..=6).map(|i| (i, 3)).collect::<Vec<_>>());
    drop(s);
    let db = redb::Database::open(&path).unwrap();
    let names: Vec<String> = db
        .begin_read()
        .unwrap()
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    assert!(!names.iter().any(|n| n == "raft_log" || n == "raft_state"));
}

#[test]
fn a_snapshot_install_cut_short_before_the_log_file_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (a_path, b_path) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
    let snap = {
        let a = RedbStorage::open(&a_path).unwrap();
        let ents: Vec<Entry> = (1..=8).map(|i| entry(i, 2)).collect();
        let hs = HardState {
            term: 2,
            commit: 8,
            ..Default::default()
        };
        a.persist(None, &ents, Some(&hs)).unwrap();
        let set = command::Kind::SetConfig(SetConfig {
            key: "k".into(),
            value: "v".into(),
        });
        apply_all(&a, &[Command { kind: Some(set) }]);
        mark_applied(&a, 8, 2);
        a.snapshot(8, 0).unwrap()
    };
    {
        let b = RedbStorage::open(&b_path).unwrap();
        let hs = HardState {
            term: 1,
            commit: 2,
            ..Default::default()
        };
        let ents: Vec<Entry> = (1..=3).map(|i| entry(i, 1)).collect();
        b.persist(None, &ents, Some(&hs)).unwrap();
    }
    // Only the state file half of the install reaches the disk.
    {
        let db = redb::Database::open(&b_path).unwrap();
        let txn = db.begin_write().unwrap();
        let data = SnapshotData::decode(snap.get_data()).unwrap();
        state_machine::import(&b_path, &txn, &data).unwrap();
        let point = [8u64.to_be_bytes(), 2u64.to_be_bytes()].concat();
        txn.open_table(APPLY_STATE)
            .unwrap()
            .insert(APPLIED, point.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let b = RedbStorage::open(&b_path).unwrap();
    assert_eq!(b.first_index().unwrap(), 9);
    assert_eq!(b.last_index().unwrap(), 8);
    assert_eq!(b.term(8).unwrap(), 2);
    assert_eq!(b.applied(), (8, 2));
    assert!(b.hard_state().commit >= 8 && b.hard_state().term >= 2);
    let a = RedbStorage::open(&a_path).unwrap();
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
}

fn apply_all(s: &RedbStorage, cmds: &[Command]) -> Vec<stoker_proto::meta::CommandResult> {
    let mut tx = s.begin_apply().unwrap();
    let out = {
        // One view for the run, as a node applies a run of entries.
        let run = Tx::new(tx.txn());
        cmds.iter()
            .map(|c| state_machine::apply_command(tx.path(), &run, c).unwrap())
            .collect()
    };
    tx.set_applied(cmds.len() as u64, 1);
    tx.commit().unwrap();
    out
}

#[test]
fn applying_the_same_commands_gives_the_same_results_and_digest() {
    use stoker_proto::meta::DeleteConfig;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let cmds: Vec<Command> = (0..500)
        .map(|_| {
            let key = format!("k{}", next() % 40);
            let kind = match next() % 5 {
                0 => command::Kind::DeleteConfig(DeleteConfig { key }),
                1 => command::Kind::SetConfig(SetConfig {
                    key: String::new(),
                    value: "rejected".into(),
                }),
                _ => command::Kind::SetConfig(SetConfig {
                    key,
                    value: next().to_string(),
                }),
            };
            Command { kind: Some(kind) }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let a = RedbStorage::open(&dir.path().join("a.redb")).unwrap();
    let b = RedbStorage::open(&dir.path().join("b.redb")).unwrap();
    let (ra, rb) = (apply_all(&a, &cmds), apply_all(&b, &cmds));
    assert_eq!(ra, rb);
    assert!(
        ra.iter().any(|r| !r.error.is_empty()),
        "no rejected command"
    );
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    // The digest sees every change.
    let one_more = Command {
        kind: Some(command::Kind::SetConfig(SetConfig {
            key: "extra".into(),
            value: "1".into(),
        })),
    };
    apply_all(&b, &[one_more]);
    assert_ne!(a.digest().unwrap(), b.digest().unwrap());
}

#[test]
fn a_batch_applies_each_command_as_if_proposed_alone() {
    use stoker_proto::meta::{
        command_result, CommandBatch, CommandResult, Proposal, MAX_BATCH_COMMANDS,
    };
    let set = |key: &str, value: &str| Command {
        kind: Some(command::Kind::SetConfig(SetConfig {
            key: key.into(),
            value: value.into(),
        })),
    };
    let batch = |commands: Vec<Command>| Command {
        kind: Some(command::Kind::Batch(CommandBatch { commands })),
    };
    // Some accepted, some rejected (an empty key), keys overwritten within
    // and across batches.
    let cmds: Vec<Command> = (0..40)
        .map(|i| match i % 6 {
            0 => set("", "rejected"),
            _ => set(&format!("k{}", i % 9), &i.to_string()),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let alone = RedbStorage::open(&dir.path().join("alone.redb")).unwrap();
    let batched = RedbStorage::open(&dir.path().join("batched.redb")).unwrap();
    let one_by_one = apply_all(&alone, &cmds);
    let batches: Vec<Command> = cmds.chunks(7).map(|c| batch(c.to_vec())).collect();
    let together: Vec<CommandResult> = {
        let mut tx = batched.begin_apply().unwrap();
        let mut requests = state_machine::Requests::open(tx.path(), tx.txn(), 100).unwrap();
        let mut out = Vec::new();
        for (i, b) in batches.iter().enumerate() {
            let p = Proposal {
                id: 0,
                command: Some(b.clone()),
                request_id: vec![i as u8 + 1; 16],
            };
            let r = requests.apply(i as u64 + 1, &p).unwrap();
            assert!(r.error.is_empty(), "{}", r.error);
            // The same request id again: the first answer, nothing applied.
            assert_eq!(requests.apply(i as u64 + 1, &p).unwrap(), r);
            match r.kind {
                Some(command_result::Kind::Batch(b)) => out.extend(b.results),
                k => panic!("unexpected {k:?}"),
            }
        }
        drop(requests);
        tx.set_applied(cmds.len() as u64, 1);
        tx.commit().unwrap();
        out
    };
    assert_eq!(together, one_by_one);
    assert!(together.iter().any(|r| !r.error.is_empty()));
    // The same settings (the request tables differ: one id per batch).
    let config = |s: &RedbStorage| {
        let data = state_machine::export(&s.read().unwrap()).unwrap();
        data.tables
            .into_iter()
            .find(|t| t.name == "sm_config")
            .unwrap()
            .entries
    };
    assert_eq!(config(&alone), config(&batched));
    assert!(!config(&alone).is_empty());

    // A batch in a batch, or one too big, is rejected whole: nothing of it
    // is applied.
    let before = batched.digest().unwrap();
    let nested = batch(vec![set("n", "1"), batch(vec![set("m", "1")])]);
    let too_big = batch(vec![set("b", "1"); MAX_BATCH_COMMANDS + 1]);
    let rejected = apply_all(&batched, &[nested, too_big]);
    assert!(
        rejected[0].error.contains("cannot hold a batch"),
        "{:?}",
        rejected[0]
    );
    assert!(rejected[1].error.contains("at most"), "{:?}", rejected[1]);
    assert!(rejected.iter().all(|r| r.kind.is_none()));
    assert_eq!(batched.digest().unwrap(), before);
}

/// What `EMPTY_COMMAND` promises proposers: a leader of a release before
/// batches (whose `Command` lacks the field) decodes a batch as a command
/// of no kind, so it proposes, and every node applies, a rejection that
/// changes nothing.
#[test]
fn a_release_before_batches_sees_a_batch_as_an_empty_command() {
    use stoker_proto::meta::CommandBatch;
    use stoker_proto::Message as _;
    /// `Command` as it was before `CommandBatch` (two of its kinds suffice).
    #[derive(Clone, PartialEq, prost::Message)]
    struct OldCommand {
        #[prost(oneof = "OldKind", tags = "1, 2")]
        kind: Option<OldKind>,
    }
    #[derive(Clone, PartialEq, prost::Oneof)]
    enum OldKind {
        #[prost(message, tag = "1")]
        SetConfig(SetConfig),
        #[prost(message, tag = "2")]
        DeleteConfig(stoker_proto::meta::DeleteConfig),
    }
    let set = Command {
        kind: Some(command::Kind::SetConfig(SetConfig {
            key: "k".into(),
            value: "v".into(),
        })),
    };
    let batch = Command {
        kind: Some(command::Kind::Batch(CommandBatch {
            commands: vec![set.clone(), set],
        })),
    };
    let old = OldCommand::decode(batch.encode_to_vec().as_slice()).unwrap();
    assert_eq!(old.kind, None);
    // What the old leader writes to the log, as any node decodes it.
    let logged = Command::decode(old.encode_to_vec().as_slice()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStorage::open(&dir.path().join("s.redb")).unwrap();
    let before = s.digest().unwrap();
    let r = apply_all(&s, &[logged]);
    assert_eq!(r[0].kind, None);
    assert_eq!(r[0].error, state_machine::EMPTY_COMMAND);
    assert_eq!(s.digest().unwrap(), before, "nothing applied");
}

#[test]
fn a_request_id_is_applied_once_and_old_ids_are_forgotten() {
    use stoker_proto::meta::{command_result, Proposal};
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let proposal = |id: u8, value: &str| Proposal {
        id: 0,
        command: Some(Command {
            kind: Some(command::Kind::SetConfig(SetConfig {
                key: "k".into(),
                value: value.into(),
            })),
        }),
        request_id: vec![id; 16],
    };
    let tx = s.begin_apply().unwrap();
    // Three ids remembered: each new one forgets the oldest beyond them.
    let mut requests = state_machine::Requests::open(tx.path(), tx.txn(), 3).unwrap();
    let first = requests.apply(1, &proposal(1, "a")).unwrap();
    let again = requests.apply(2, &proposal(1, "b")).unwrap();
    assert_eq!(first, again);
    let other = requests.apply(3, &proposal(2, "c")).unwrap();
    match other.kind {
        Some(command_result::Kind::SetConfig(r)) => assert_eq!(r.previous.as_deref(), Some("a")),
        k => panic!("unexpected {k:?}"),
    }
    for id in 3..10 {
        requests
            .apply(u64::from(id) + 1, &proposal(id, "d"))
            .unwrap();
    }
    // Id 1 is forgotten: applying it now changes the state again.
    let late = requests.apply(20, &proposal(1, "e")).unwrap();
    assert_ne!(late, first);
    // Id 9 is remembered.
    let kept = requests.apply(21, &proposal(9, "f")).unwrap();
    match &kept.kind {
        Some(command_result::Kind::SetConfig(r)) => assert_eq!(r.previous.as_deref(), Some("d")),
        k => panic!("unexpected {k:?}"),
    }
    drop(requests);
    // Remembered across transactions too.
    tx.commit().unwrap();
    let tx = s.begin_apply().unwrap();
    let mut requests = state_machine::Requests::open(tx.path(), tx.txn(), 3).unwrap();
    assert_eq!(requests.apply(22, &proposal(9, "g")).unwrap(), kept);
    drop(requests);
    tx.commit().unwrap();
}
