//! `stoker server`: run a node until interrupted.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use stoker::api::server::{self, ServerConfig};
use tracing::info;

#[derive(Debug, clap::Args)]
pub(super) struct ServerArgs {
    /// TOML config file; flags given on the command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id (> 0).
    #[arg(long)]
    id: Option<u64>,
    /// gRPC listen address, HOST:PORT.
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (recovered from on restart).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Initial cluster, ID=HOST:PORT,... including this node.
    #[arg(long)]
    peers: Option<String>,
    /// Do not bootstrap; wait to be added with `stoker cluster add`.
    #[arg(long)]
    join: bool,
}

fn load(args: &ServerArgs) -> anyhow::Result<ServerConfig> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("invalid config file {}", path.display()))?
        }
        None => ServerConfig::default(),
    };
    if let Some(id) = args.id {
        cfg.id = id;
    }
    if let Some(listen) = &args.listen {
        cfg.listen = listen.clone();
    }
    if let Some(dir) = &args.data_dir {
        cfg.data_dir = dir.clone();
    }
    if let Some(peers) = &args.peers {
        cfg.peers = peers.clone();
    }
    cfg.join |= args.join;
    cfg.validate()?;
    Ok(cfg)
}

pub(super) async fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let cfg = load(&args)?;
    let mut running = server::start(&cfg).await?;
    // Scripts and tests read this line to learn the bound address.
    println!("listening on {}", running.addr);
    // The leadership watch closes when the Raft loop ends (fatal error).
    let mut raft = running.node.leader_watch();
    let raft_stopped = async move { while raft.changed().await.is_ok() {} };
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            info!("interrupted, shutting down");
            Ok(())
        }
        _ = running.wait() => Err(anyhow::anyhow!("grpc server stopped")),
        _ = raft_stopped => Err(anyhow::anyhow!("raft loop stopped; see the log for the cause")),
    };
    running.shutdown().await;
    outcome.map(|()| ExitCode::SUCCESS)
}
