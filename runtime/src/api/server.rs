//! Starting a node: on a scheduler node its metadata database, Raft node,
//! owner loop and gRPC services on one listening address; on a worker its
//! task executor manager. A node may be both (the default).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use stoker_proto::meta::meta_server::MetaServer;
use stoker_proto::meta::raft_transport_server::RaftTransportServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::auth::{Authenticator, Bearer, ClusterGuard, Secret};
use super::http::{self, HttpState};
use super::meta::{GrpcForwarder, MetaService, MAX_API_MESSAGE};
use super::raft::{GrpcTransport, RaftService, TransportConfig};
use super::service::StokerService;
use super::tls::TlsConfig;
use crate::blob::BlobStore;
use crate::exec::worker::{self, WorkerConfig, WorkerHandle};
use crate::meta::{MetaConfig, MetaError, MetaNode, RedbStorage};
use crate::resource::{Governor, GovernorConfig, ManagerConfig, ResourceControl};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::sched::owner::{self, OwnerConfig};
use stoker_proto::api::stoker_server::StokerServer;

/// Name of the metadata database inside the data directory.
pub const META_DB_FILE: &str = "meta.redb";

/// Configuration of `stoker server` (the `--config` TOML file; flags
/// override it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// This node's id, > 0 and unique in the cluster. Required.
    pub id: u64,
    /// gRPC listen address (Raft transport and API). Default `127.0.0.1:7400`.
    pub listen: String,
    /// Directory of the node's metadata database. Default `.stoker/data`.
    pub data_dir: PathBuf,
    /// The initial cluster as `ID=HOST:PORT,...`, this node included; used
    /// only when the data directory is empty. Default empty.
    pub peers: String,
    /// Start without bootstrapping and wait to be added with
    /// `stoker cluster add`. Default false.
    pub join: bool,
    /// Raft tunables.
    pub meta: MetaConfig,
    /// Raft transport tunables.
    pub transport: TransportConfig,
    /// Whether this node is a scheduler (a Raft voter that serves the API
    /// and may become the owner). A worker-only node sets this to false
    /// and lists schedulers in `worker.endpoints`. Default true.
    pub scheduler: bool,
    /// The blob store directory (large inputs, outputs, intermediate
    /// data), shared by every node of the cluster. Default
    /// `<data_dir>/blobs`.
    pub blob_dir: Option<PathBuf>,
    /// The wasm engine (module cache under `<data_dir>/cache` by default).
    pub sandbox: SandboxConfig,
    /// The owner's loop (on the leader).
    pub owner: OwnerConfig,
    /// The task executor manager; `worker.enabled = false` makes a
    /// scheduler-only node.
    pub worker: WorkerConfig,
    /// The resource manager that tunes the worker's fuel governor (a
    /// `[resource]` table turns it on, e.g. `scheduler = "cpu"` to keep
    /// node CPU in a band). Without it the governor lets every slot run
    /// at full speed.
    pub resource: Option<ManagerConfig>,
    /// TLS for the node's port and its outgoing connections (a `[tls]`
    /// table with `cert`, `key`, `ca` and optionally `client_auth`).
    /// Default off.
    pub tls: TlsConfig,
    /// The admin token. When set, every request must carry a token (this
    /// one, or a tenant's), and the internal services (Raft transport,
    /// `Meta`, worker calls) accept only this one, so every node of the
    /// cluster, worker-only nodes too, must be given the same value. When
    /// unset the cluster runs open: no authentication, every request acts
    /// as the admin of the `default` tenant (fine for `stoker dev`, not
    /// for a shared cluster). Default unset.
    pub admin_token: Option<Secret>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            id: 0,
            listen: "127.0.0.1:7400".into(),
            data_dir: PathBuf::from(".stoker/data"),
            peers: String::new(),
            join: false,
            meta: MetaConfig::default(),
            transport: TransportConfig::default(),
            scheduler: true,
            blob_dir: None,
            sandbox: SandboxConfig::default(),
            owner: OwnerConfig::default(),
            worker: WorkerConfig::default(),
            resource: None,
            tls: TlsConfig::default(),
            admin_token: None,
        }
    }
}

/// Parses `ID=HOST:PORT,ID=HOST:PORT`.
///
/// # Errors
/// [`MetaError::Config`] naming the bad item.
pub fn parse_peers(s: &str) -> Result<Vec<(u64, String)>, MetaError> {
    let mut out: Vec<(u64, String)> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| MetaError::Config(format!("peer {item:?} is not ID=HOST:PORT")))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| MetaError::Config(format!("peer {item:?} has a bad id")))?;
        if id == 0 || out.iter().any(|(i, _)| *i == id) {
            return Err(MetaError::Config(format!(
                "peer id {id} is zero or repeated"
            )));
        }
        if addr.trim().is_empty() {
            return Err(MetaError::Config(format!("peer {id} has no address")));
        }
        out.push((id, addr.trim().to_string()));
    }
    Ok(out)
}

impl ServerConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// [`MetaError::Config`] naming the problem.
    pub fn validate(&self) -> Result<(), MetaError> {
        self.meta.validate()?;
        self.transport.validate()?;
        self.owner.validate().map_err(MetaError::Config)?;
        self.worker.validate().map_err(MetaError::Config)?;
        self.sandbox.validate().map_err(MetaError::Config)?;
        self.tls.validate()?;
        if let Some(r) = &self.resource {
            r.validate()
                .map_err(|e| MetaError::Config(format!("resource: {e}")))?;
        }
        if self.id == 0 {
            return Err(MetaError::Config("id must be > 0".into()));
        }
        if let Some(t) = self.admin_token.as_ref().map(Secret::expose) {
            if t.trim().len() < 16 || t.trim() != t || Bearer::new(Some(t)).is_err() {
                return Err(MetaError::Config(
                    "admin_token must be at least 16 printable characters without surrounding spaces"
                        .into(),
                ));
            }
        }
        if !self.scheduler {
            if !self.worker.enabled {
                return Err(MetaError::Config(
                    "a node that is not a scheduler must be a worker".into(),
                ));
            }
            if self.worker.endpoints.is_empty() {
                return Err(MetaError::Config(
                    "a worker-only node needs worker.endpoints (scheduler addresses)".into(),
                ));
            }
            return Ok(());
        }
        let peers = parse_peers(&self.peers)?;
        if !self.join && !peers.iter().any(|(id, _)| *id == self.id) {
            return Err(MetaError::Config(format!(
                "peers must list this node ({}) unless join is set",
                self.id
            )));
        }
        Ok(())
    }
}

/// A running node. Dropping it does not stop it; call [`Self::shutdown`].
pub struct RunningServer {
    /// The metadata node (scheduler nodes only).
    pub node: Option<MetaNode>,
    /// The bound gRPC address (scheduler nodes), or the advertised one.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    owner_stop: Option<tokio::sync::watch::Sender<bool>>,
    /// Ends the peers' Raft streams, which would otherwise hold the
    /// server's graceful stop open.
    raft_stop: Option<tokio::sync::watch::Sender<bool>>,
    owner: Option<JoinHandle<()>>,
    worker: Option<WorkerHandle>,
}

impl RunningServer {
    /// The metadata node of a scheduler node.
    ///
    /// # Panics
    /// On a worker-only node, which has none.
    pub fn meta(&self) -> &MetaNode {
        self.node
            .as_ref()
            .expect("a scheduler node has a metadata node")
    }

    /// Stops the worker, the owner, serving, and the Raft loop.
    pub async fn shutdown(mut self) {
        if let Some(w) = self.worker.take() {
            w.shutdown().await;
        }
        if let Some(stop) = self.owner_stop.take() {
            let _ = stop.send(true);
        }
        if let Some(owner) = self.owner.take() {
            let _ = owner.await;
        }
        if let Some(stop) = self.raft_stop.take() {
            let _ = stop.send(true);
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some(node) = self.node.clone() {
            let _ = tokio::task::spawn_blocking(move || node.shutdown()).await;
        }
    }

    /// Waits until the gRPC server ends (it ends only on shutdown or
    /// error); on a worker-only node, forever.
    pub async fn wait(&mut self) {
        match self.task.take() {
            Some(task) => {
                let _ = task.await;
            }
            None => std::future::pending::<()>().await,
        }
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> MetaError {
    move |source| MetaError::Io { what, source }
}

/// The worker's fuel governor (every subtask takes its fuel quanta from
/// it) with the resource manager tuning it when the node's config or,
/// later, the cluster config asks for one.
async fn governor(
    cfg: &ServerConfig,
    sandbox: &Arc<Sandbox>,
) -> Result<Option<Arc<ResourceControl>>, MetaError> {
    if !cfg.worker.enabled {
        return Ok(None);
    }
    let config_err = |e: crate::resource::ResourceError| MetaError::Config(e.to_string());
    let governor = Governor::new(GovernorConfig::for_sandbox(
        sandbox,
        cfg.worker.slots as usize,
    ))
    .map_err(config_err)?;
    let control = ResourceControl::start(governor, sandbox.clone(), cfg.resource.clone())
        .await
        .map_err(config_err)?;
    Ok(Some(Arc::new(control)))
}

/// Serves `router` (HTTP/1.1 and h2c) on `listener` until `stop`.
fn serve_http(
    id: u64,
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
    tls: &TlsConfig,
    stop: oneshot::Receiver<()>,
) -> Result<JoinHandle<()>, MetaError> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls.server()? {
        builder = builder
            .tls_config(tls)
            .map_err(|e| MetaError::Config(format!("tls: {e}")))?;
    }
    Ok(tokio::spawn(async move {
        let served = builder
            .accept_http1(true)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop.await;
            })
            .await;
        if let Err(e) = served {
            error!(node_id = id, error = %e, "server failed");
        }
    }))
}

/// The engine and blob store every role of a node shares.
fn node_parts(cfg: &ServerConfig) -> Result<(Arc<Sandbox>, BlobStore), MetaError> {
    let mut sandbox_cfg = cfg.sandbox.clone();
    if sandbox_cfg.cache_dir.is_none() {
        sandbox_cfg.cache_dir = Some(cfg.data_dir.join("cache"));
    }
    let sandbox = Sandbox::new(sandbox_cfg)
        .map_err(|e| MetaError::Config(format!("cannot start the sandbox: {e:#}")))?;
    let blob_dir = cfg
        .blob_dir
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("blobs"));
    std::fs::create_dir_all(&blob_dir).map_err(io_err(format!(
        "create blob directory {}",
        blob_dir.display()
    )))?;
    let blobs = BlobStore::local(&blob_dir).map_err(|e| {
        MetaError::Config(format!(
            "cannot open blob store {}: {e}",
            blob_dir.display()
        ))
    })?;
    Ok((Arc::new(sandbox), blobs))
}

/// Opens the data directory, starts the Raft node and serves gRPC.
///
/// # Errors
/// Invalid config, unusable data directory or database (the error names
/// the file), an address that cannot be bound.
pub async fn start(cfg: &ServerConfig) -> Result<RunningServer, MetaError> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| MetaError::Io {
        what: format!("create data directory {}", cfg.data_dir.display()),
        source,
    })?;
    if let Some(tls) = cfg.tls.client()? {
        super::tls::install_client(tls)?;
    }
    let (sandbox, blobs) = node_parts(cfg)?;
    let admin_token = cfg.admin_token.as_ref().map(Secret::expose);
    let auth = Authenticator::new(admin_token);
    let bearer = Bearer::new(admin_token).map_err(MetaError::Config)?;
    if !auth.enabled() {
        warn!(
            node_id = cfg.id,
            "no admin_token configured: the cluster runs open, without authentication, every request acting as the admin of tenant default"
        );
    }
    let resource = governor(cfg, &sandbox).await?;
    if !cfg.scheduler {
        let addr: SocketAddr = cfg
            .listen
            .parse()
            .map_err(|e| MetaError::Config(format!("listen {:?}: {e}", cfg.listen)))?;
        let mut wcfg = cfg.worker.clone();
        wcfg.token = cfg.admin_token.clone();
        let worker = worker::start(
            cfg.id,
            cfg.listen.clone(),
            false,
            wcfg,
            sandbox,
            blobs.clone(),
            resource,
            None,
        );
        // HTTP only (metrics, health, the dashboard page): a worker-only
        // node serves no gRPC.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetaError::Io {
                what: format!("listen on {addr} (the worker's HTTP: metrics, health)"),
                source,
            })?;
        let state = HttpState::new(
            cfg.id,
            None,
            Some(worker.view()),
            cfg.worker.endpoints.clone(),
            auth,
            blobs,
            None,
        );
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = serve_http(
            cfg.id,
            listener,
            http::router(state).into(),
            &cfg.tls,
            stop_rx,
        )?;
        info!(node_id = cfg.id, %addr, "worker-only node started");
        return Ok(RunningServer {
            node: None,
            addr,
            stop: Some(stop_tx),
            task: Some(task),
            owner_stop: None,
            raft_stop: None,
            owner: None,
            worker: Some(worker),
        });
    }
    let storage = RedbStorage::open(&cfg.data_dir.join(META_DB_FILE))?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| MetaError::Io {
            what: format!("listen on {}", cfg.listen),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| MetaError::Io {
        what: "read listen address".into(),
        source,
    })?;
    let tcfg = cfg.transport.clone();
    let transport = Arc::new(
        GrpcTransport::new(
            cfg.id,
            addr.to_string(),
            tcfg.clone(),
            tokio::runtime::Handle::current(),
        )
        .with_bearer(bearer.clone()),
    );
    let initial = if cfg.join {
        Vec::new()
    } else {
        parse_peers(&cfg.peers)?
    };
    let node = MetaNode::start(
        cfg.id,
        cfg.meta.clone(),
        storage,
        &initial,
        transport.clone(),
    )?;
    let timeout = cfg.meta.request_timeout();
    node.set_forwarder(Arc::new(GrpcForwarder::new(&node, timeout, bearer)));
    let guard = ClusterGuard(auth.clone());
    let (raft_stop, raft_stop_rx) = tokio::sync::watch::channel(false);
    let raft_svc = tonic::service::interceptor::InterceptedService::new(
        RaftTransportServer::new(RaftService::new(
            node.clone(),
            transport,
            &tcfg,
            raft_stop_rx,
        ))
        .max_decoding_message_size(usize::MAX),
        guard.clone(),
    );
    let meta_svc = MetaServer::with_interceptor(MetaService::new(node.clone(), timeout), guard);
    let heartbeat = std::time::Duration::from_millis(cfg.worker.heartbeat_interval_ms);
    let board = crate::sched::coordinator::Board::default();
    let stoker_svc = StokerServer::new(
        StokerService::new(
            node.clone(),
            sandbox.clone(),
            heartbeat,
            auth.clone(),
            blobs.clone(),
        )
        .with_board(board.clone()),
    )
    .max_decoding_message_size(MAX_API_MESSAGE)
    .max_encoding_message_size(MAX_API_MESSAGE);
    let id = cfg.id;
    // The worker starts before serving: the HTTP side reads its state. Its
    // first heartbeats wait in the listen backlog until serving starts.
    let worker = cfg.worker.enabled.then(|| {
        let mut wcfg = cfg.worker.clone();
        // A worker of its own scheduler reaches the metadata in process.
        let local = wcfg.endpoints.is_empty().then(|| node.clone());
        if wcfg.endpoints.is_empty() {
            wcfg.endpoints = vec![addr.to_string()];
        }
        wcfg.token = cfg.admin_token.clone();
        worker::start(
            id,
            addr.to_string(),
            true,
            wcfg,
            sandbox.clone(),
            blobs.clone(),
            resource,
            local,
        )
    });
    let state = HttpState::new(
        id,
        Some(node.clone()),
        worker.as_ref().map(WorkerHandle::view),
        Vec::new(),
        auth,
        blobs.clone(),
        Some(board.clone()),
    );
    let routes = tonic::service::Routes::from(http::router(state))
        .add_service(raft_svc)
        .add_service(meta_svc)
        .add_service(stoker_svc);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = serve_http(id, listener, routes, &cfg.tls, stop_rx)?;
    info!(node_id = id, %addr, "serving");
    let (owner_stop, owner_stop_rx) = tokio::sync::watch::channel(false);
    let owner = tokio::spawn(owner::run(
        node.clone(),
        sandbox.clone(),
        blobs.clone(),
        cfg.owner.clone(),
        board,
        owner_stop_rx,
    ));
    Ok(RunningServer {
        node: Some(node),
        addr,
        stop: Some(stop_tx),
        task: Some(task),
        owner_stop: Some(owner_stop),
        raft_stop: Some(raft_stop),
        owner: Some(owner),
        worker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_config_parses_validates_and_rejects_unknown_fields() {
        let cfg: ServerConfig = toml::from_str(
            r#"
            id = 2
            listen = "127.0.0.1:7402"
            data_dir = "/var/lib/stoker"
            peers = "1=127.0.0.1:7401, 2=127.0.0.1:7402"
            [meta]
            tick_ms = 20
            [transport]
            chunk_bytes = 4096
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.meta.tick_ms, 20);
        assert_eq!(
            cfg.meta.election_ticks,
            MetaConfig::default().election_ticks
        );
        assert_eq!(cfg.transport.chunk_bytes, 4096);
        assert_eq!(
            parse_peers(&cfg.peers).unwrap(),
            vec![(1, "127.0.0.1:7401".into()), (2, "127.0.0.1:7402".into())]
        );
        assert!(cfg.resource.is_none(), "no resource manager unless asked");
        let tuned: ServerConfig = toml::from_str(
            "id = 1\npeers = \"1=a:1\"\n[resource]\nscheduler = \"cpu\"\n[worker]\nslots = 3\nlabels = { zone = \"z1\" }\n[owner]\nnode_timeout_ms = 900\n",
        )
        .unwrap();
        tuned.validate().unwrap();
        assert_eq!(tuned.resource.unwrap().scheduler, "cpu");
        assert_eq!(tuned.worker.slots, 3);
        assert_eq!(tuned.owner.node_timeout_ms, 900);
        let bad: ServerConfig =
            toml::from_str("id = 1\npeers = \"1=a:1\"\n[resource]\nscheduler = \"nope\"\n")
                .unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("resource"));
        let err = toml::from_str::<ServerConfig>("id = 1\nlisten_addr = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn invalid_configs_are_rejected_with_a_reason() {
        let base = ServerConfig {
            id: 1,
            peers: "1=a:1,2=b:2".into(),
            ..ServerConfig::default()
        };
        base.validate().unwrap();
        let cases = [
            ServerConfig {
                id: 0,
                ..base.clone()
            },
            ServerConfig {
                id: 3,
                ..base.clone()
            },
            ServerConfig {
                peers: "1=a:1,1=b:2".into(),
                ..base.clone()
            },
            ServerConfig {
                peers: "x=a:1".into(),
                ..base.clone()
            },
            ServerConfig {
                peers: "1".into(),
                ..base.clone()
            },
            ServerConfig {
                meta: MetaConfig {
                    heartbeat_ticks: 10,
                    ..MetaConfig::default()
                },
                ..base.clone()
            },
        ];
        for c in cases {
            assert!(matches!(c.validate(), Err(MetaError::Config(_))), "{c:?}");
        }
        // A joining node need not be in the peer list.
        ServerConfig {
            id: 3,
            join: true,
            ..base
        }
        .validate()
        .unwrap();
    }
}
