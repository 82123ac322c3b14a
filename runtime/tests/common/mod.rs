//! Shared by the observability tests: a one-node cluster of real
//! `stoker server` processes, plain HTTP GETs, `/metrics` parsed as
//! Prometheus text, task helpers.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value};
use stoker::api::local_cluster::LocalCluster;
use stoker::api::meta::connect_stoker;
use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::api::{GetTaskRequest, GetTaskResponse, SubmitTaskRequest, UploadModuleRequest};
use tonic::transport::Channel;

/// One cluster at a time per test binary.
pub static CLUSTERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest wait for a task or a condition.
pub const WAIT: Duration = Duration::from_secs(90);

pub fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stoker"))
}

/// Quick heartbeats, so node state shows up fast.
pub const CONFIG: &str =
    "[owner]\nnode_timeout_ms = 3000\ntick_ms = 100\n\n[worker]\nheartbeat_interval_ms = 300\nslots = 2\n";

/// Uploads test module `name` through `client`; returns its hash.
pub async fn upload(mut client: StokerClient<Channel>, name: &str) -> String {
    let first = UploadModuleRequest {
        name: name.into(),
        tag: String::new(),
        data: stoker_test_artifacts::read(name),
    };
    let r = client
        .upload_module(futures::stream::iter(vec![first]))
        .await
        .unwrap();
    r.into_inner().module.unwrap().hash
}

pub struct Harness {
    pub cluster: LocalCluster,
    pub dir: tempfile::TempDir,
}

impl Harness {
    /// `n` scheduler nodes (each also a worker) reading `config`.
    pub async fn start(n: u64, config: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let cluster = LocalCluster::start_with_config(exe(), n, dir.path(), Some(config)).unwrap();
        cluster.wait_leader(Duration::from_secs(30)).await.unwrap();
        cluster
            .wait_workers(n as usize, Duration::from_secs(30))
            .await
            .unwrap();
        Harness { cluster, dir }
    }

    pub fn addr(&self, id: u64) -> &str {
        self.cluster.addr(id)
    }

    pub fn client(&self) -> StokerClient<Channel> {
        connect_stoker(self.cluster.addr(1), Duration::from_secs(20)).unwrap()
    }

    pub async fn upload(&self, name: &str) -> String {
        upload(self.client(), name).await
    }

    pub async fn submit(&self, req: SubmitTaskRequest) -> u64 {
        self.client()
            .submit_task(req)
            .await
            .unwrap()
            .into_inner()
            .id
    }

    pub async fn get(&self, id: u64) -> GetTaskResponse {
        self.client()
            .get_task(GetTaskRequest {
                id,
                with_subtasks: true,
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until the task has finished; its last view.
    pub async fn wait(&self, id: u64) -> GetTaskResponse {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self.get(id).await;
            let state = r.task.as_ref().unwrap().state.clone();
            if matches!(state.as_str(), "succeed" | "failed" | "reverted") {
                return r;
            }
            assert!(Instant::now() < deadline, "task {id} did not finish: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// An HTTP response: status, headers (lowercase names), body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.1 on `addr` with optional extra headers.
pub fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = s.split_once("\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `WAIT`.
pub async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `/metrics` of `addr`, parsed as Prometheus text.
pub fn scrape(addr: &str) -> Scrape {
    let r = http_get(addr, "/metrics", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        r.headers
    );
    Scrape::parse(r.body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// A sample's value (a histogram's count).
pub fn value(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        Value::Histogram(buckets) => buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .map_or(0.0, |b| b.count),
        other => panic!("unexpected sample {other:?}"),
    }
}

/// The samples of `name` whose labels include `labels`.
pub fn samples<'a>(s: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect()
}

/// The one sample of `name` with `labels`; its value (a histogram's count).
pub fn one(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(s, name, labels);
    assert_eq!(
        found.len(),
        1,
        "{name} {labels:?}: {found:?}\nall metrics: {:?}",
        s.samples
            .iter()
            .map(|x| &x.metric)
            .collect::<std::collections::BTreeSet<_>>()
    );
    value(&found[0].value)
}
