//! TLS on a real cluster: three scheduler nodes and a worker-only node
//! whose every connection (Raft, forwarding, heartbeats, assignments,
//! claims, the API) is mutual TLS, with certificates made by the test.
//!
//! In a binary of its own: the client TLS setting is process-wide.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use stoker::api::local_cluster::LocalCluster;
use stoker::api::meta::connect_stoker;
use stoker::api::tls;
use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::api::{GetTaskRequest, ListNodesRequest, SubmitTaskRequest, UploadModuleRequest};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// PEM files of one certificate authority and what it signed.
struct Pki {
    ca: PathBuf,
    node_cert: PathBuf,
    node_key: PathBuf,
}

/// A certificate authority in `dir/<name>-*.pem`, with a node certificate
/// for 127.0.0.1 signed by it.
fn pki(dir: &Path, name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(params, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let write = |file: &str, pem: String| {
        let path = dir.join(format!("{name}-{file}.pem"));
        std::fs::write(&path, pem).unwrap();
        path
    };
    Pki {
        ca: write("ca", ca.pem()),
        node_cert: write("cert", cert.pem()),
        node_key: write("key", key.serialize_pem()),
    }
}

/// A client of `addr` with an explicit TLS setting (or none), apart from
/// the process-wide one.
fn client_with(
    addr: &str,
    tls: Option<ClientTlsConfig>,
) -> StokerClient<tonic::transport::Channel> {
    let endpoint = match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap(),
        None => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
    };
    StokerClient::new(
        endpoint
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_lazy(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_tls_cluster_runs_a_task_and_refuses_clients_without_a_trusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), "cluster");
    let rogue = pki(dir.path(), "rogue");
    let config = format!(
        "[owner]\nnode_timeout_ms = 1500\ntick_ms = 100\n\n[worker]\nheartbeat_interval_ms = 300\n\n\
         [tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nclient_auth = true\n",
        good.node_cert, good.node_key, good.ca
    );
    // This process (the test's client) presents the cluster's certificate.
    tls::install_client(
        tls::client_config(Some(&good.ca), Some(&good.node_cert), Some(&good.node_key)).unwrap(),
    )
    .unwrap();

    let mut cluster = LocalCluster::start_with_args(
        Path::new(env!("CARGO_BIN_EXE_stoker")),
        3,
        dir.path(),
        Some(&config),
        &|_| vec!["--no-worker".to_string()],
    )
    .unwrap();
    cluster.add_worker(4, &["--slots", "2"]).unwrap();
    cluster.wait_leader(Duration::from_secs(30)).await.unwrap();
    cluster
        .wait_workers(1, Duration::from_secs(30))
        .await
        .unwrap();

    // Upload through a follower (forwarded to the leader over TLS too).
    let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
    let follower = cluster
        .schedulers()
        .into_iter()
        .find(|&id| id != leader)
        .unwrap();
    let mut api = connect_stoker(cluster.addr(follower), Duration::from_secs(20)).unwrap();
    let module = api
        .upload_module(futures::stream::iter(vec![UploadModuleRequest {
            name: "misbehave".into(),
            tag: String::new(),
            data: stoker_test_artifacts::read("misbehave"),
        }]))
        .await
        .unwrap()
        .into_inner()
        .module
        .unwrap();
    let id = api
        .submit_task(SubmitTaskRequest {
            module: module.hash,
            input: "ok\n".repeat(6).into(),
            concurrency: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let deadline = Instant::now() + Duration::from_secs(90);
    let task = loop {
        let t = api
            .get_task(GetTaskRequest {
                id,
                with_subtasks: false,
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        if matches!(t.state.as_str(), "succeed" | "failed" | "reverted") {
            break t;
        }
        assert!(Instant::now() < deadline, "task stuck in {}", t.state);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(task.state, "succeed", "{task:?}");

    // Nobody gets in without a certificate the cluster's authority signed.
    let addr = cluster.addr(leader).to_string();
    let plain = client_with(&addr, None)
        .list_nodes(ListNodesRequest {})
        .await;
    assert!(plain.is_err(), "plain text is refused");
    let trusting_only = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&good.ca).unwrap()));
    let anonymous = client_with(&addr, Some(trusting_only.clone()))
        .list_nodes(ListNodesRequest {})
        .await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate is refused"
    );
    let rogue_identity = trusting_only.identity(Identity::from_pem(
        std::fs::read(&rogue.node_cert).unwrap(),
        std::fs::read(&rogue.node_key).unwrap(),
    ));
    let stranger = client_with(&addr, Some(rogue_identity))
        .list_nodes(ListNodesRequest {})
        .await;
    assert!(
        stranger.is_err(),
        "a certificate of another authority is refused"
    );
    // A client that trusts another authority does not accept the node.
    let wrong_ca = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&rogue.ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(&good.node_cert).unwrap(),
            std::fs::read(&good.node_key).unwrap(),
        ));
    let unverified = client_with(&addr, Some(wrong_ca))
        .list_nodes(ListNodesRequest {})
        .await;
    assert!(unverified.is_err(), "the node's certificate is checked");
    // And the genuine client still works.
    let nodes = connect_stoker(&addr, Duration::from_secs(10))
        .unwrap()
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nodes.nodes.len(), 1, "the one worker is registered");
    drop(cluster);
}
