//! The `stoker` command line. Each subcommand lives in its own file.

mod bench;
mod cluster;
mod config;
mod server;

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use stoker_proto::meta::meta_client::MetaClient;
use tonic::transport::Channel;

/// Stoker: a distributed task platform whose task logic is WebAssembly.
#[derive(Debug, Parser)]
#[command(name = "stoker", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node.
    Server(server::ServerArgs),
    /// Read and write cluster-wide settings.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Inspect and change the Raft membership.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Where a client command connects.
#[derive(Debug, Clone, clap::Args)]
struct Endpoint {
    /// A node's gRPC address (any node of the cluster).
    #[arg(long, env = "STOKER_ENDPOINT", default_value = "127.0.0.1:7400")]
    endpoint: String,
    /// Request timeout in seconds.
    #[arg(long, default_value_t = 15)]
    timeout_secs: u64,
}

impl Endpoint {
    fn client(&self) -> anyhow::Result<MetaClient<Channel>> {
        stoker::api::meta::connect_lazy(&self.endpoint, Duration::from_secs(self.timeout_secs))
            .with_context(|| format!("cannot use endpoint {}", self.endpoint))
    }
}

/// Output format of client commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    #[default]
    Text,
    Json,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,raft=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parses the command line and runs it.
///
/// # Errors
/// Whatever the subcommand fails with, for the user to read.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Server(args) => server::run(args).await,
            Command::Config(cmd) => config::run(cmd).await,
            Command::Cluster(cmd) => cluster::run(cmd).await,
            Command::Bench(cmd) => bench::run(cmd).await,
        }
    })
}
