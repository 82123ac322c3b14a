//! A cluster of real `stoker server` processes on 127.0.0.1 with ephemeral
//! ports, for `stoker bench meta` and the process-level tests. Every child
//! is killed when the cluster is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stoker_proto::api::ListNodesRequest;
use stoker_proto::meta::StatusRequest;

use super::meta::{connect_meta_with, connect_stoker_with};

/// One server process.
struct ProcNode {
    addr: String,
    data_dir: PathBuf,
    child: Option<Child>,
    /// Extra `stoker server` arguments (labels, slots, worker flags).
    args: Vec<String>,
    /// A worker-only node (not in the Raft group).
    worker_only: bool,
}

/// N `stoker server` processes forming one cluster.
pub struct LocalCluster {
    exe: PathBuf,
    dir: PathBuf,
    peers: String,
    config: Option<PathBuf>,
    nodes: BTreeMap<u64, ProcNode>,
    /// The admin token the cluster's config sets, sent by the waits.
    token: Option<String>,
}

/// A free port on 127.0.0.1, found by binding port 0.
///
/// # Errors
/// When no socket can be bound.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl LocalCluster {
    /// Starts `n` nodes of binary `exe`, with data under `dir`.
    ///
    /// # Errors
    /// When ports cannot be found or processes cannot be spawned.
    pub fn start(exe: &Path, n: u64, dir: &Path) -> std::io::Result<Self> {
        Self::start_with_config(exe, n, dir, None)
    }

    /// Like [`Self::start`], every node also reading the TOML `config`
    /// (e.g. a `[meta]` table; flags set id, listen, data dir and peers).
    ///
    /// # Errors
    /// When ports cannot be found, the config cannot be written or
    /// processes cannot be spawned.
    pub fn start_with_config(
        exe: &Path,
        n: u64,
        dir: &Path,
        config: Option<&str>,
    ) -> std::io::Result<Self> {
        Self::start_with_args(exe, n, dir, config, &|_| Vec::new())
    }

    /// Like [`Self::start_with_config`], node `id` also getting the
    /// `stoker server` arguments `args_of(id)`. Every node shares the blob
    /// directory `<dir>/blobs`.
    ///
    /// # Errors
    /// As [`Self::start_with_config`].
    pub fn start_with_args(
        exe: &Path,
        n: u64,
        dir: &Path,
        config: Option<&str>,
        args_of: &dyn Fn(u64) -> Vec<String>,
    ) -> std::io::Result<Self> {
        let config = match config {
            Some(text) => {
                let path = dir.join("node.toml");
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            nodes.insert(
                id,
                ProcNode {
                    addr: format!("127.0.0.1:{}", free_port()?),
                    data_dir: dir.join(format!("node-{id}")),
                    child: None,
                    args: args_of(id),
                    worker_only: false,
                },
            );
        }
        let peers = nodes
            .iter()
            .map(|(id, n)| format!("{id}={}", n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = LocalCluster {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            peers,
            config,
            nodes,
            token: None,
        };
        for id in 1..=n {
            cluster.spawn(id)?;
        }
        Ok(cluster)
    }

    /// Adds and starts a worker-only node `id` (not a Raft member) that
    /// talks to the scheduler nodes, with extra `stoker server` `args`.
    ///
    /// # Errors
    /// When a port cannot be found or the process cannot be spawned.
    pub fn add_worker(&mut self, id: u64, args: &[&str]) -> std::io::Result<()> {
        assert!(!self.nodes.contains_key(&id), "node {id} exists");
        let endpoints = self
            .nodes
            .values()
            .filter(|n| !n.worker_only)
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>()
            .join(",");
        let mut all = vec!["--worker-only".to_string(), "--endpoints".into(), endpoints];
        all.extend(args.iter().map(|a| a.to_string()));
        self.nodes.insert(
            id,
            ProcNode {
                addr: format!("127.0.0.1:{}", free_port()?),
                data_dir: self.dir.join(format!("node-{id}")),
                child: None,
                args: all,
                worker_only: true,
            },
        );
        self.spawn(id)
    }

    /// The shared blob directory.
    pub fn blob_dir(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    /// Starts (or restarts) node `id` on its data directory.
    ///
    /// # Errors
    /// When the process cannot be spawned.
    pub fn spawn(&mut self, id: u64) -> std::io::Result<()> {
        let node = self.nodes.get_mut(&id).expect("known node");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{id}.log")))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("server");
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        let child = cmd
            .args(["--id", &id.to_string()])
            .args(["--listen", &node.addr])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--peers", &self.peers])
            .arg("--blob-dir")
            .arg(self.dir.join("blobs"))
            .args(&node.args)
            .env("STOKER_LOG", "info,raft=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        node.child = Some(child);
        Ok(())
    }

    /// Kills node `id` with SIGKILL and reaps it.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Deletes node `id`'s data directory (kill it first).
    ///
    /// # Errors
    /// When the directory cannot be removed.
    pub fn wipe(&mut self, id: u64) -> std::io::Result<()> {
        let dir = &self.nodes[&id].data_dir;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        Ok(())
    }

    /// The process id of node `id` while it runs (to signal it).
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id)?.child.as_ref().map(Child::id)
    }

    /// CPU time (user and system, all threads) used so far by the node
    /// processes that run now, in seconds; `None` where `/proc` cannot
    /// tell (not Linux). Benchmarks divide its growth by the work done: a
    /// cost that, unlike a rate, does not move with what else the machine
    /// is doing.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.nodes
            .values()
            .filter_map(|n| n.child.as_ref())
            .map(|c| process_cpu_seconds(&format!("/proc/{}/stat", c.id())))
            .sum()
    }

    /// Node `id`'s gRPC address.
    pub fn addr(&self, id: u64) -> &str {
        &self.nodes[&id].addr
    }

    /// Every node id.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Ids of nodes whose process is running.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.child.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Ids of the scheduler (Raft) nodes.
    pub fn schedulers(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| !n.worker_only)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Makes the waits send `token` (the `admin_token` of a cluster started
    /// with one in its config).
    pub fn set_token(&mut self, token: &str) {
        self.token = Some(token.to_string());
    }

    /// Waits until the cluster lists at least `n` up workers.
    ///
    /// # Errors
    /// When fewer are up after `timeout`.
    pub async fn wait_workers(&self, n: usize, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut up = 0;
        loop {
            for id in self
                .running()
                .into_iter()
                .filter(|id| !self.nodes[id].worker_only)
            {
                let Ok(mut c) = connect_stoker_with(
                    self.addr(id),
                    Duration::from_millis(500),
                    self.token.as_deref(),
                ) else {
                    continue;
                };
                if let Ok(r) = c.list_nodes(ListNodesRequest {}).await {
                    up = r
                        .get_ref()
                        .nodes
                        .iter()
                        .filter(|n| n.up && n.worker)
                        .count();
                    break;
                }
            }
            if up >= n {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("{up} of {n} workers up after {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a running node reports itself leader and returns its id.
    ///
    /// # Errors
    /// When no leader shows up within `timeout`.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<u64, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for id in self.running() {
                if self.nodes[&id].worker_only {
                    continue;
                }
                if let Ok(mut c) = connect_meta_with(
                    self.addr(id),
                    Duration::from_millis(500),
                    self.token.as_deref(),
                ) {
                    if let Ok(s) = c.status(StatusRequest {}).await {
                        if s.get_ref().role == "leader" {
                            return Ok(id);
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("no leader within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for id in self.ids() {
            self.kill(id);
        }
    }
}

/// Clock ticks per second of `/proc/*/stat` times: `USER_HZ`, 100 on every
/// Linux architecture Stoker builds for.
const USER_HZ: f64 = 100.0;

/// User plus system CPU seconds of the process whose `stat` file is at
/// `path` (`/proc/self/stat` for this one).
pub fn process_cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces: count from its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stat");
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime ...
        std::fs::write(
            &path,
            "42 (a (b) c) S 1 42 42 0 -1 4194560 10 0 0 0 250 130 0 0 20 0 9",
        )
        .unwrap();
        let secs = process_cpu_seconds(path.to_str().unwrap()).unwrap();
        assert!((secs - 3.8).abs() < 1e-9, "{secs}");
        std::fs::write(&path, "42 (x) S 1 42").unwrap();
        assert_eq!(process_cpu_seconds(path.to_str().unwrap()), None);
        if cfg!(target_os = "linux") {
            assert!(process_cpu_seconds("/proc/self/stat").is_some());
        }
    }
}
