//! In-process clusters over the fault-injecting network: safety under
//! partitions, convergence, snapshots, membership and restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use raft::eraftpb::Entry;
use raft::Storage as _;
use stoker_proto::meta::membership_request::Kind as MemberKind;
use stoker_proto::meta::{
    command, query, query_result, Command, CommandBatch, EntryBatch, GetConfig, Proposal, Query,
    SetConfig, COMMAND_VERSION, OLDEST_COMMAND_VERSION,
};
use stoker_proto::Message as _;

use super::sim::{test_config, SimCluster};
use super::{Consistency, MetaError, MetaNode, RedbStorage};

fn set(key: &str, value: &str) -> Command {
    Command {
        kind: Some(command::Kind::SetConfig(SetConfig {
            key: key.into(),
            value: value.into(),
        })),
    }
}

async fn get(node: &MetaNode, key: &str, c: Consistency) -> Result<Option<String>, MetaError> {
    let q = Query {
        kind: Some(query::Kind::GetConfig(GetConfig { key: key.into() })),
    };
    match node.query(&q, c).await?.0.kind {
        Some(query_result::Kind::GetConfig(r)) => Ok(r.value),
        other => panic!("unexpected {other:?}"),
    }
}

/// Every acknowledged write is visible on every node.
async fn assert_all_present(c: &SimCluster, acked: &BTreeMap<String, String>) {
    for id in c.ids() {
        for (k, v) in acked {
            let got = get(c.node(id), k, Consistency::Stale).await.unwrap();
            assert_eq!(got.as_deref(), Some(v.as_str()), "node {id} lost {k}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_cannot_commit_and_majority_keeps_committing() {
    let mut c = SimCluster::start(3, test_config(), 7);
    let leader = c.wait_leader(&[1, 2, 3], Duration::from_secs(10)).await;
    let mut acked = BTreeMap::new();
    for i in 0..20 {
        let (k, v) = (format!("before/{i}"), i.to_string());
        c.node(1 + i % 3).propose(set(&k, &v)).await.unwrap();
        acked.insert(k, v);
    }
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != leader).collect();
    c.net.partition(&[&[leader], &others]);

    // The isolated old leader cannot commit.
    let lone = c.node(leader).propose(set("minority", "x")).await;
    assert!(lone.is_err(), "minority committed: {lone:?}");
    // The majority elects a leader and keeps committing through both nodes.
    let new_leader = c.wait_leader(&others, Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);
    for i in 0..20u64 {
        let (k, v) = (format!("during/{i}"), i.to_string());
        c.node(others[(i % 2) as usize])
            .propose(set(&k, &v))
            .await
            .unwrap();
        acked.insert(k, v);
    }
    // Linearizable reads work on the majority and fail on the minority.
    assert_eq!(
        get(c.node(others[0]), "during/19", Consistency::Linearizable)
            .await
            .unwrap(),
        Some("19".into())
    );
    assert!(get(c.node(leader), "during/19", Consistency::Linearizable)
        .await
        .is_err());

    c.net.heal();
    c.wait_converged(Duration::from_secs(15)).await;
    assert_all_present(&c, &acked).await;
    for id in c.ids() {
        assert_eq!(
            get(c.node(id), "minority", Consistency::Stale)
                .await
                .unwrap(),
            None
        );
    }
    c.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_network_and_partitions_lose_no_acknowledged_write() {
    let mut c = SimCluster::start(3, test_config(), 42);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10)).await;
    c.net.set_lossy(150, Duration::from_millis(2));
    let mut writers = Vec::new();
    for w in 0..6u64 {
        let node = c.node(1 + w % 3).clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..40 {
                let (k, v) = (format!("w{w}/{i}"), format!("{w}-{i}"));
                if node.propose(set(&k, &v)).await.is_ok() {
                    acked.push((k, v));
                }
            }
            acked
        }));
    }
    for groups in [[1u64, 2], [2, 3], [1, 3]] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lone: Vec<u64> = [1, 2, 3]
            .into_iter()
            .filter(|i| !groups.contains(i))
            .collect();
        c.net.partition(&[&groups, &lone]);
        c.net.set_lossy(150, Duration::from_millis(2));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.net.heal();
    let mut acked = BTreeMap::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(
        acked.len() > 20,
        "too few writes succeeded: {}",
        acked.len()
    );
    c.wait_converged(Duration::from_secs(20)).await;
    assert_all_present(&c, &acked).await;
    c.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_and_wiped_nodes_catch_up_from_a_snapshot() {
    let mut config = test_config();
    config.snapshot_interval = 20;
    config.log_retain = 5;
    let mut c = SimCluster::start(3, config, 3);
    let leader = c.wait_leader(&[1, 2, 3], Duration::from_secs(10)).await;
    let lagger = if leader == 3 { 2 } else { 3 };
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != lagger).collect();
    c.net.partition(&[&[lagger], &others]);
    let lag_index = c.node(lagger).applied_index();
    for i in 0..100 {
        c.node(others[0])
            .propose(set(&format!("k{}", i % 10), &i.to_string()))
            .await
            .unwrap();
    }
    let leader = c.wait_leader(&others, Duration::from_secs(10)).await;
    let first = raft::Storage::first_index(c.node(leader).storage()).unwrap();
    assert!(
        first > lag_index + 1,
        "log not compacted past the lagging node: first {first}, lagging at {lag_index}"
    );
    c.net.heal();
    c.wait_converged(Duration::from_secs(15)).await;
    assert!(
        raft::Storage::first_index(c.node(lagger).storage()).unwrap() > 1,
        "no snapshot installed"
    );

    // A node whose data is wiped rejoins and catches up the same way.
    c.wipe_node(lagger);
    for i in 0..30 {
        c.node(others[0])
            .propose(set(&format!("after{i}"), "v"))
            .await
            .unwrap();
    }
    let members: Vec<(u64, String)> = (1..=3).map(|id| (id, format!("sim-{id}"))).collect();
    c.start_node(lagger, &members);
    let digest = c.wait_converged(Duration::from_secs(15)).await;
    assert_eq!(c.node(lagger).storage().digest().unwrap(), digest);
    c.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_applied_state() {
    let mut c = SimCluster::start(3, test_config(), 5);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(10)).await;
    for i in 0..30 {
        c.node(2).propose(set(&format!("r{i}"), "v")).await.unwrap();
    }
    let digest = c.wait_converged(Duration::from_secs(10)).await;
    let applied = c.node(2).applied_index();
    c.stop_node(2);
    c.node(1).propose(set("while-down", "v")).await.unwrap();
    let node = c.start_node(2, &[]);
    assert!(
        node.applied_index() >= applied,
        "applied went back to {}",
        node.applied_index()
    );
    assert_ne!(node.storage().digest().unwrap(), [0u8; 32]);
    let after = c.wait_converged(Duration::from_secs(10)).await;
    assert_ne!(after, digest);
    assert_eq!(
        get(&node, "while-down", Consistency::Linearizable)
            .await
            .unwrap(),
        Some("v".into())
    );
    c.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_and_leader_transfer() {
    let mut c = SimCluster::start(3, test_config(), 11);
    let leader = c.wait_leader(&[1, 2, 3], Duration::from_secs(10)).await;
    c.node(1).propose(set("a", "1")).await.unwrap();

    // A joining node starts empty and is added as learner, then voter.
    let node4 = c.start_node(4, &[]);
    c.node(2)
        .change_membership(MemberKind::AddLearner, 4, "sim-4")
        .await
        .unwrap();
    c.node(3)
        .change_membership(MemberKind::AddVoter, 4, "sim-4")
        .await
        .unwrap();
    c.wait_converged(Duration::from_secs(10)).await;
    assert_eq!(
        get(&node4, "a", Consistency::Stale).await.unwrap(),
        Some("1".into())
    );
    let status = c.node(leader).status().await.unwrap();
    assert_eq!(status.members.iter().filter(|m| !m.learner).count(), 4);

    // Leadership moves on request; the watch tells the old and new owner.
    let mut old_watch = c.node(leader).is_leader_watch();
    let mut new_watch = node4.is_leader_watch();
    c.node(1).transfer_leader(4).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), new_watch.wait_for(|l| *l))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), old_watch.wait_for(|l| !*l))
        .await
        .unwrap()
        .unwrap();

    // Remove a voter; the rest keep committing.
    c.node(4)
        .change_membership(MemberKind::Remove, 1, "")
        .await
        .unwrap();
    c.stop_node(1);
    c.node(2).propose(set("b", "2")).await.unwrap();
    let status = c.node(4).status().await.unwrap();
    let mut ids: Vec<u64> = status.members.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![2, 3, 4]);
    c.wait_converged(Duration::from_secs(10)).await;
    c.shutdown();
}

/// What a crash between a log write and the apply leaves on a stopped
/// single node: `entries` (format version, command) appended with a
/// commit index covering them, the state machine behind. The last index.
fn write_unapplied(c: &SimCluster, entries: &[(u32, Command)]) -> u64 {
    let storage = RedbStorage::open(&c.data_path(1)).unwrap();
    let mut hs = storage.initial_state().unwrap().hard_state;
    let last = storage.last_index().unwrap();
    assert_eq!(storage.applied().0, last);
    let entries: Vec<Entry> = (last + 1..)
        .zip(entries)
        .map(|(index, (version, cmd))| Entry {
            index,
            term: hs.term,
            data: EntryBatch {
                version: *version,
                proposer: 99,
                proposals: vec![Proposal {
                    id: index,
                    command: Some(cmd.clone()),
                    request_id: vec![index as u8; 16],
                }],
            }
            .encode_to_vec()
            .into(),
            ..Default::default()
        })
        .collect();
    hs.commit = last + entries.len() as u64;
    storage.persist(None, &entries, Some(&hs)).unwrap();
    hs.commit
}

/// A single voter commits on its own log write alone (the writer's report),
/// and a crash between that write and the apply loses nothing: on restart
/// the node applies the committed entries from its log, of either format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_written_but_not_applied_is_applied_after_a_restart() {
    let mut c = SimCluster::start(1, test_config(), 13);
    c.wait_leader(&[1], Duration::from_secs(10)).await;
    for i in 0..10 {
        c.node(1).propose(set(&format!("s{i}"), "v")).await.unwrap();
    }
    c.stop_node(1);
    let batch = Command {
        kind: Some(command::Kind::Batch(CommandBatch {
            commands: vec![set("batched", "1"), set("batched", "2")],
        })),
    };
    let index = write_unapplied(
        &c,
        &[
            (OLDEST_COMMAND_VERSION, set("crash", "after-write")),
            (COMMAND_VERSION, batch),
        ],
    );
    let node = c.start_node(1, &[]);
    let mut applied = node.applied_watch();
    tokio::time::timeout(Duration::from_secs(5), applied.wait_for(|a| *a >= index))
        .await
        .expect("entry applied after restart")
        .unwrap();
    assert_eq!(
        get(&node, "crash", Consistency::Stale).await.unwrap(),
        Some("after-write".into())
    );
    assert_eq!(
        get(&node, "batched", Consistency::Stale).await.unwrap(),
        Some("2".into())
    );
    c.wait_leader(&[1], Duration::from_secs(10)).await;
    node.propose(set("after", "restart")).await.unwrap();
    assert_eq!(
        get(&node, "after", Consistency::Linearizable)
            .await
            .unwrap(),
        Some("restart".into())
    );
    c.shutdown();
}

/// An entry of a newer command format than this build's stops the node's
/// apply loop short of it: it is neither misapplied nor skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_of_a_newer_format_is_refused_not_misapplied() {
    let mut c = SimCluster::start(1, test_config(), 13);
    c.wait_leader(&[1], Duration::from_secs(10)).await;
    c.node(1).propose(set("before", "v")).await.unwrap();
    c.stop_node(1);
    let index = write_unapplied(&c, &[(COMMAND_VERSION + 1, set("newer", "x"))]);
    let node = c.start_node(1, &[]);
    let mut applied = node.applied_watch();
    let reached =
        tokio::time::timeout(Duration::from_secs(2), applied.wait_for(|a| *a >= index)).await;
    assert!(!matches!(reached, Ok(Ok(_))), "the newer entry was applied");
    assert!(*node.applied_watch().borrow() < index);
    assert!(!matches!(
        get(&node, "newer", Consistency::Stale).await,
        Ok(Some(_))
    ));
    c.shutdown();
}
