//! Starting a scheduler node: its metadata database, Raft node and gRPC
//! server on one listening address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use stoker_proto::meta::meta_server::MetaServer;
use stoker_proto::meta::raft_transport_server::RaftTransportServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{error, info};

use super::meta::{GrpcForwarder, MetaService};
use super::raft::{GrpcTransport, RaftService, TransportConfig};
use crate::meta::{MetaConfig, MetaError, MetaNode, RedbStorage};

/// Name of the metadata database inside the data directory.
pub const META_DB_FILE: &str = "meta.redb";

/// Configuration of `stoker server` (the `--config` TOML file; flags
/// override it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        if self.id == 0 {
            return Err(MetaError::Config("id must be > 0".into()));
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
    /// The metadata node.
    pub node: MetaNode,
    /// The bound gRPC address.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops serving and stops the Raft loop.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let node = self.node.clone();
        let _ = tokio::task::spawn_blocking(move || node.shutdown()).await;
    }

    /// Waits until the gRPC server ends (it ends only on shutdown or error).
    pub async fn wait(&mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
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
    let transport = Arc::new(GrpcTransport::new(
        cfg.id,
        addr.to_string(),
        tcfg.clone(),
        tokio::runtime::Handle::current(),
    ));
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
    node.set_forwarder(Arc::new(GrpcForwarder::new(&node, timeout)));
    let raft_svc = RaftTransportServer::new(RaftService::new(node.clone(), transport, &tcfg))
        .max_decoding_message_size(usize::MAX);
    let meta_svc = MetaServer::new(MetaService::new(node.clone(), timeout));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let id = cfg.id;
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(raft_svc)
            .add_service(meta_svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = served {
            error!(node_id = id, error = %e, "grpc server failed");
        }
    });
    info!(node_id = id, %addr, "serving");
    Ok(RunningServer {
        node,
        addr,
        stop: Some(stop_tx),
        task: Some(task),
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
