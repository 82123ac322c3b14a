//! Real `stoker server` processes on 127.0.0.1: continuous writes through
//! every endpoint while the leader is killed with SIGKILL and restarted, and
//! a wiped node rejoining from a snapshot. Every acknowledged write must be
//! on every node.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stoker::api::local_cluster::LocalCluster;
use stoker::api::meta::{connect_lazy, set_config_request};
use stoker_proto::meta::{query, query_result, ListConfig, Query, QueryRequest};

const CONFIG: &str = "[meta]\nsnapshot_interval = 100\nlog_retain = 10\n";

/// All settings of the node at `addr`, read linearizably (so the node has
/// applied everything committed before the read).
async fn dump(addr: &str) -> Result<BTreeMap<String, String>, String> {
    let mut c = connect_lazy(addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let resp = c
        .query(QueryRequest {
            query: Some(Query {
                kind: Some(query::Kind::ListConfig(ListConfig {})),
            }),
            stale_ok: false,
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    match resp.result.and_then(|r| r.kind) {
        Some(query_result::Kind::ListConfig(l)) => Ok(l
            .entries
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    String::from_utf8_lossy(&kv.value).into_owned(),
                )
            })
            .collect()),
        other => Err(format!("unexpected {other:?}")),
    }
}

async fn assert_has_all(addr: &str, acked: &BTreeMap<String, String>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match dump(addr).await {
            Ok(state) => {
                let missing: Vec<_> = acked
                    .iter()
                    .filter(|(k, v)| state.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone())
                    .collect();
                assert!(
                    missing.is_empty(),
                    "{what} at {addr} misses {} acked writes, e.g. {:?}",
                    missing.len(),
                    &missing[..missing.len().min(5)]
                );
                return;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what} at {addr} not ready: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what} at {addr} unreadable: {e}"),
        }
    }
}

struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(String, String, Instant)>>>,
}

fn start_writers(cluster: &LocalCluster, tag: &str) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for id in cluster.ids() {
        let addr = cluster.addr(id).to_string();
        let stop = stop.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = connect_lazy(&addr, Duration::from_secs(3)).unwrap();
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("{tag}/{id}/{i}"), i.to_string());
                if client
                    .propose(set_config_request(k.clone(), v.clone()))
                    .await
                    .is_ok()
                {
                    acked.push((k, v, Instant::now()));
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                i += 1;
            }
            acked
        }));
    }
    Writers { stop, tasks }
}

impl Writers {
    async fn finish(self) -> Vec<(String, String, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
        all
    }
}

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stoker"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_restart_and_wiped_node_lose_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::start_with_config(exe(), 3, dir.path(), Some(CONFIG)).unwrap();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await.unwrap();

    let writers = start_writers(&cluster, "phase1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.kill(leader);
    let killed_at = Instant::now();
    let new_leader = cluster.wait_leader(Duration::from_secs(10)).await.unwrap();
    assert_ne!(new_leader, leader);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.spawn(leader).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let acked = writers.finish().await;
    let after_kill = acked.iter().filter(|(_, _, t)| *t > killed_at).count();
    assert!(
        after_kill > 10,
        "writes did not continue after the leader kill ({after_kill})"
    );
    let acked: BTreeMap<String, String> = acked.into_iter().map(|(k, v, _)| (k, v)).collect();
    for id in cluster.ids() {
        assert_has_all(cluster.addr(id), &acked, &format!("node {id}")).await;
    }

    // Wipe a follower; enough writes happen meanwhile that the leader's log
    // is compacted past it, so it must catch up from a snapshot.
    let leader = cluster.wait_leader(Duration::from_secs(10)).await.unwrap();
    let victim = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    cluster.kill(victim);
    cluster.wipe(victim).unwrap();
    let writers = start_writers(&cluster, "phase2");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut more: BTreeMap<String, String> = writers
        .finish()
        .await
        .into_iter()
        .map(|(k, v, _)| (k, v))
        .collect();
    assert!(
        more.len() > 100,
        "too few writes to force compaction: {}",
        more.len()
    );
    let log_path = dir.path().join(format!("node-{victim}.log"));
    std::fs::remove_file(&log_path).unwrap();
    cluster.spawn(victim).unwrap();
    more.extend(acked);
    assert_has_all(cluster.addr(victim), &more, &format!("wiped node {victim}")).await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("installed snapshot"),
        "wiped node did not install a snapshot"
    );
}
