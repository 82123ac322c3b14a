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
    /// Run only a worker (no Raft, no API): it talks to the schedulers
    /// listed in --endpoints.
    #[arg(long)]
    worker_only: bool,
    /// Run no worker on this scheduler node.
    #[arg(long, conflicts_with = "worker_only")]
    no_worker: bool,
    /// Scheduler addresses a worker talks to, HOST:PORT,...
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Subtasks this worker runs at once.
    #[arg(long)]
    slots: Option<u32>,
    /// This node's labels, k=v,...
    #[arg(long)]
    labels: Option<String>,
    /// This node's scope (e.g. `background`).
    #[arg(long)]
    scope: Option<String>,
    /// The blob store directory, shared by every node.
    #[arg(long)]
    blob_dir: Option<PathBuf>,
    /// Seconds of silence after which the owner takes a worker as down.
    #[arg(long)]
    node_timeout_secs: Option<f64>,
    /// Placement rules file (`rules.toml`): applied at start and re-read on
    /// every SIGUSR1 (a scheduler node only).
    #[arg(long, conflicts_with = "worker_only")]
    rules: Option<PathBuf>,
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
    if args.worker_only {
        cfg.scheduler = false;
    }
    if args.no_worker {
        cfg.worker.enabled = false;
    }
    if !args.endpoints.is_empty() {
        cfg.worker.endpoints = args.endpoints.clone();
    }
    if let Some(slots) = args.slots {
        cfg.worker.slots = slots;
    }
    if let Some(labels) = &args.labels {
        cfg.worker.labels = stoker::model::parse_labels(labels).map_err(anyhow::Error::msg)?;
    }
    if let Some(scope) = &args.scope {
        cfg.worker.scope = scope.clone();
    }
    if let Some(dir) = &args.blob_dir {
        cfg.blob_dir = Some(dir.clone());
    }
    if let Some(secs) = args.node_timeout_secs {
        cfg.owner.node_timeout_ms = (secs * 1000.0) as u64;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub(super) async fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let cfg = load(&args)?;
    if let Some(file) = &args.rules {
        // A bad file stops the start, before anything listens.
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read rules file {}", file.display()))?;
        stoker::sched::rules::parse(&text)
            .with_context(|| format!("rules file {} refused", file.display()))?;
    }
    let mut running = server::start(&cfg).await?;
    // Scripts and tests read this line to learn the bound address.
    println!("listening on {}", running.addr);
    if let Some(file) = args.rules.clone() {
        let addr = running.addr.to_string();
        // The node applies its file as the admin of its cluster.
        let token = cfg.admin_token.as_ref().map(|t| t.expose().to_string());
        tokio::spawn(async move {
            if let Err(e) = super::rules::serve_rules_file(file, addr, token).await {
                tracing::error!(error = %format!("{e:#}"), "placement rules file is not served");
            }
        });
    }
    // The leadership watch closes when the Raft loop ends (fatal error).
    let raft = running.node.as_ref().map(|n| n.leader_watch());
    let raft_stopped = async move {
        match raft {
            Some(mut raft) => while raft.changed().await.is_ok() {},
            None => std::future::pending::<()>().await,
        }
    };
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

#[derive(Debug, clap::Args)]
pub(super) struct DevArgs {
    /// gRPC listen address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: String,
    /// Data directory (metadata, blobs, module cache); kept across runs.
    #[arg(long, default_value = ".stoker/dev")]
    data_dir: PathBuf,
    /// Subtasks run at once (default: the number of CPUs).
    #[arg(long)]
    slots: Option<u32>,
}

/// `stoker dev`: a one-node cluster (scheduler, owner and worker in one
/// process) for trying Stoker out.
pub(super) async fn run_dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = ServerConfig {
        id: 1,
        listen: args.listen.clone(),
        data_dir: args.data_dir.clone(),
        peers: format!("1={}", args.listen),
        ..ServerConfig::default()
    };
    if let Some(slots) = args.slots {
        cfg.worker.slots = slots;
    }
    cfg.validate()?;
    let running = server::start(&cfg).await?;
    println!("listening on {}", running.addr);
    println!(
        "stoker dev: a one-node cluster with its data in {}; try\n  \
         stoker module upload FILE.wasm --name NAME --endpoint {addr}\n  \
         stoker task submit --module NAME --input FILE --endpoint {addr}",
        args.data_dir.display(),
        addr = running.addr
    );
    let _ = tokio::signal::ctrl_c().await;
    info!("interrupted, shutting down");
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ServerArgs,
    }

    #[test]
    fn flags_override_the_config_file_and_keep_its_admin_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "id = 3\nlisten = \"127.0.0.1:1\"\npeers = \"3=127.0.0.1:1\"\nadmin_token = \"0123456789abcdef-admin\"\n[worker]\nslots = 2\n",
        )
        .unwrap();
        let w = Wrap::parse_from([
            "stoker",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9",
            "--peers",
            "3=127.0.0.1:9",
            "--slots",
            "5",
        ]);
        let cfg = load(&w.args).unwrap();
        assert_eq!((cfg.id, cfg.listen.as_str()), (3, "127.0.0.1:9"));
        assert_eq!(cfg.worker.slots, 5);
        assert_eq!(
            cfg.admin_token.as_ref().map(|t| t.expose()),
            Some("0123456789abcdef-admin")
        );
        assert!(!format!("{cfg:?}").contains("abcdef-admin"), "never logged");
        // A short admin token is refused with the reason.
        std::fs::write(
            &path,
            "id = 3\npeers = \"3=a:1\"\nadmin_token = \"short\"\n",
        )
        .unwrap();
        let w = Wrap::parse_from(["stoker", "--config", path.to_str().unwrap()]);
        let e = load(&w.args).unwrap_err().to_string();
        assert!(e.contains("admin_token"), "{e}");
    }
}
