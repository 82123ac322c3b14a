//! The `stoker config` and `stoker cluster` commands against real server
//! processes on 127.0.0.1: settings through any node, status as JSON, adding
//! a joining node, leader transfer and removal.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use stoker::api::local_cluster::{free_port, LocalCluster};

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stoker"))
}

fn stoker(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .env("STOKER_LOG", "warn")
        .output()
        .expect("stoker runs")
}

fn ok(args: &[&str]) -> String {
    let out = stoker(args);
    assert!(
        out.status.success(),
        "stoker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn status(endpoint: &str) -> serde_json::Value {
    let text = ok(&["cluster", "status", "--endpoint", endpoint, "-o", "json"]);
    serde_json::from_str(&text).unwrap()
}

/// Retries `f` until it returns true or `timeout` passes.
fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn config_and_cluster_commands() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(exe(), 3, dir.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let leader = rt
        .block_on(cluster.wait_leader(Duration::from_secs(20)))
        .unwrap();
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let (l_addr, f_addr) = (
        cluster.addr(leader).to_string(),
        cluster.addr(follower).to_string(),
    );

    // Settings: written through a follower, read linearizably elsewhere.
    ok(&["config", "set", "greeting", "hello", "--endpoint", &f_addr]);
    assert_eq!(
        ok(&["config", "get", "greeting", "--endpoint", &l_addr]),
        "hello\n"
    );
    // A stale read on the follower sees the write once it has applied it
    // (not necessarily at once: that is what stale means).
    eventually(Duration::from_secs(10), "the follower to apply", || {
        let out = stoker(&[
            "config",
            "get",
            "greeting",
            "--endpoint",
            &f_addr,
            "--stale",
        ]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "hello"
    });
    assert!(
        !stoker(&["config", "get", "missing", "--endpoint", &f_addr])
            .status
            .success()
    );

    // Status: leader, term and every member's indexes.
    let s = status(&f_addr);
    assert_eq!(s["leader_id"], leader);
    assert!(s["term"].as_u64().unwrap() > 0);
    let members = s["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for m in members {
        assert!(m["reachable"].as_bool().unwrap(), "{m}");
        assert!(m["applied_index"].as_u64().unwrap() > 0, "{m}");
        assert!(m["commit_index"].as_u64().unwrap() >= m["applied_index"].as_u64().unwrap());
    }

    // A fourth node joins empty and is added as a voter.
    let port = free_port().unwrap();
    let addr4 = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("node-4.log")).unwrap();
    let _node4 = KillOnDrop(
        Command::new(exe())
            .args([
                "server",
                "--id",
                "4",
                "--listen",
                &addr4,
                "--join",
                "--data-dir",
            ])
            .arg(dir.path().join("node-4"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    ok(&[
        "cluster",
        "add",
        "--id",
        "4",
        "--addr",
        &addr4,
        "--endpoint",
        &f_addr,
    ]);
    eventually(Duration::from_secs(20), "node 4 to catch up", || {
        let out = stoker(&["config", "get", "greeting", "--endpoint", &addr4]);
        out.status.success() && out.stdout == b"hello\n"
    });
    assert_eq!(status(&l_addr)["members"].as_array().unwrap().len(), 4);

    // Leadership moves to the new node on request.
    ok(&[
        "cluster",
        "transfer-leader",
        "--id",
        "4",
        "--endpoint",
        &f_addr,
    ]);
    eventually(Duration::from_secs(10), "node 4 to lead", || {
        status(&l_addr)["leader_id"] == 4
    });

    // Removing a member shrinks the configuration; writes go on.
    ok(&[
        "cluster",
        "remove",
        "--id",
        &follower.to_string(),
        "--endpoint",
        &addr4,
    ]);
    let ids: Vec<u64> = status(&addr4)["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(!ids.contains(&follower));
    ok(&["config", "set", "after", "removal", "--endpoint", &l_addr]);
    assert_eq!(
        ok(&["config", "get", "after", "--endpoint", &addr4]),
        "removal\n"
    );
}

#[test]
fn server_refuses_a_corrupt_data_file_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meta.redb");
    std::fs::write(&db, vec![0x5Au8; 32 * 1024]).unwrap();
    let out = Command::new(exe())
        .args([
            "server",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--peers",
            "1=127.0.0.1:1",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(db.to_str().unwrap()), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
