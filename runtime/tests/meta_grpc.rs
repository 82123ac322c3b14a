//! Three in-process nodes on the real gRPC transport (127.0.0.1, ephemeral
//! ports): a node that was down while the log was compacted catches up from
//! a snapshot streamed in many small chunks, and a leadership watch follows
//! a leader transfer.

use std::path::Path;
use std::time::Duration;

use stoker::api::local_cluster::free_port;
use stoker::api::raft::TransportConfig;
use stoker::api::server::{self, RunningServer, ServerConfig};
use stoker::meta::MetaConfig;
use stoker_proto::meta::{command, Command, SetConfig};

fn config(id: u64, ports: &[u16], dir: &Path) -> ServerConfig {
    ServerConfig {
        id,
        listen: format!("127.0.0.1:{}", ports[id as usize - 1]),
        data_dir: dir.join(format!("node-{id}")),
        peers: ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(","),
        join: false,
        meta: MetaConfig {
            tick_ms: 20,
            snapshot_interval: 50,
            log_retain: 5,
            request_timeout_ms: 5000,
            ..MetaConfig::default()
        },
        transport: TransportConfig {
            chunk_bytes: 64,
            ..TransportConfig::default()
        },
        // The metadata layer alone: no worker.
        worker: stoker::exec::worker::WorkerConfig {
            enabled: false,
            ..Default::default()
        },
        ..ServerConfig::default()
    }
}

fn set(key: String, value: String) -> Command {
    Command {
        kind: Some(command::Kind::SetConfig(SetConfig { key, value })),
    }
}

/// Nodes 1..=3 on `ports`, data under `dir`.
async fn start_three(ports: &[u16], dir: &Path) -> Vec<Option<RunningServer>> {
    let mut servers = Vec::new();
    for id in 1..=3 {
        servers.push(Some(server::start(&config(id, ports, dir)).await.unwrap()));
    }
    servers
}

async fn wait_leader(servers: &[Option<RunningServer>]) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        for (i, s) in servers.iter().enumerate() {
            if let Some(s) = s {
                if *s.meta().is_leader_watch().borrow() {
                    return i;
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_from_a_chunked_snapshot_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port().unwrap()).collect();
    let mut servers = start_three(&ports, dir.path()).await;
    let leader = wait_leader(&servers).await;
    let lagger = (leader + 1) % 3;
    servers[lagger].take().unwrap().shutdown().await;

    let node = servers[leader].as_ref().unwrap().meta().clone();
    for i in 0..300 {
        node.propose(set(format!("key-{i}"), "x".repeat(32)))
            .await
            .unwrap();
    }
    let first = raft::Storage::first_index(node.storage()).unwrap();
    assert!(first > 100, "leader log not compacted: first index {first}");

    let restarted = server::start(&config(lagger as u64 + 1, &ports, dir.path()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (a, b) = (
            node.storage().digest().unwrap(),
            restarted.meta().storage().digest().unwrap(),
        );
        if a == b && restarted.meta().applied_index() >= node.applied_index() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "restarted node did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lag_first = raft::Storage::first_index(restarted.meta().storage()).unwrap();
    assert!(
        lag_first > 100,
        "caught up without a snapshot (first index {lag_first})"
    );
    servers[lagger] = Some(restarted);

    // Leadership moves on request and the watches say so.
    let target = servers[lagger].as_ref().unwrap().meta().clone();
    let mut watch = target.is_leader_watch();
    node.transfer_leader(target.id()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|l| *l))
        .await
        .unwrap()
        .unwrap();
    assert!(!*node.is_leader_watch().borrow());

    for s in servers.into_iter().flatten() {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_proposals_each_get_their_own_outcome_in_order() {
    use stoker::api::meta::connect_lazy;
    use stoker_proto::meta::{ProposeManyRequest, ProposeRequest, Query};

    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port().unwrap()).collect();
    let servers = start_three(&ports, dir.path()).await;
    let leader = wait_leader(&servers).await;
    let follower = (leader + 1) % 3;
    let follower_node = servers[follower].as_ref().unwrap().meta().clone();

    // Many concurrent writes on a follower: forwarded to the leader in
    // batches, every one acknowledged and applied exactly once.
    let writes = (0..300).map(|i| {
        let node = follower_node.clone();
        async move { node.propose(set(format!("fwd-{i}"), i.to_string())).await }
    });
    for r in futures::future::join_all(writes).await {
        assert!(r.unwrap().error.is_empty());
    }

    // One call with a good proposal, a malformed one and a retry of the
    // first under its request id: three outcomes, in order.
    let mut client = connect_lazy(
        &format!("127.0.0.1:{}", ports[follower]),
        Duration::from_secs(5),
    )
    .unwrap();
    let rid = vec![7u8; 16];
    let request = |key: &str, rid: Vec<u8>| ProposeRequest {
        command: Some(set(key.into(), "v".into())),
        forwarded: false,
        request_id: rid,
    };
    let resp = client
        .propose_many(ProposeManyRequest {
            requests: vec![
                request("many-a", rid.clone()),
                request("many-b", vec![1, 2, 3]),
                request("many-a", rid.clone()),
            ],
            forwarded: false,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp.outcomes.iter().map(|o| o.code).collect();
    assert_eq!(
        codes,
        [
            tonic::Code::Ok as i32,
            tonic::Code::InvalidArgument as i32,
            tonic::Code::Ok as i32
        ],
        "{resp:?}"
    );
    assert!(resp.outcomes[1].message.contains("request_id"), "{resp:?}");

    let leader_node = servers[leader].as_ref().unwrap().meta().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while follower_node.applied_index() < leader_node.applied_index() {
        assert!(tokio::time::Instant::now() < deadline, "follower behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let list = leader_node
        .query(
            &Query {
                kind: Some(stoker_proto::meta::query::Kind::ListConfig(
                    stoker_proto::meta::ListConfig {},
                )),
            },
            stoker::meta::Consistency::Linearizable,
        )
        .await
        .unwrap()
        .0;
    let Some(stoker_proto::meta::query_result::Kind::ListConfig(list)) = list.kind else {
        panic!("not a config list: {list:?}");
    };
    let keys: Vec<String> = list
        .entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.key).into_owned())
        .collect();
    assert_eq!(keys.iter().filter(|k| k.starts_with("fwd-")).count(), 300);
    assert!(keys.iter().any(|k| k == "many-a"), "{keys:?}");
    assert!(!keys.iter().any(|k| k == "many-b"), "{keys:?}");
    assert_eq!(
        leader_node.storage().digest().unwrap(),
        follower_node.storage().digest().unwrap()
    );

    for s in servers.into_iter().flatten() {
        s.shutdown().await;
    }
}
