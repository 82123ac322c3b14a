//! The `stoker` command line. Each subcommand lives in its own file; errors
//! become one actionable line on stderr and a non-zero exit code.

mod bench;
mod bench_cluster;
mod bench_meta;
mod client;
mod cluster;
mod config;
mod module;
mod node;
mod rules;
mod run_local;
mod scheduler;
mod server;
mod task;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use stoker_proto::meta::meta_client::MetaClient;
use tonic::transport::Channel;

/// Stoker: distributed tasks whose logic is WebAssembly.
#[derive(Debug, Parser)]
#[command(name = "stoker", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every step of one task on this machine, from a module file.
    ///
    /// Example: stoker run-local --module target/wasm32-wasip1/release/wordcount.wasm --input book.txt
    RunLocal(run_local::Args),
    /// Run a scheduler node: its Raft metadata and gRPC API.
    ///
    /// Example: stoker server --id 1 --listen 127.0.0.1:7401 --data-dir data/1 --peers 1=127.0.0.1:7401,2=127.0.0.1:7402,3=127.0.0.1:7403
    Server(server::ServerArgs),
    /// A one-node cluster (scheduler, owner and worker) for trying Stoker
    /// out; its data stays in --data-dir.
    ///
    /// Example: stoker dev --listen 127.0.0.1:7400
    Dev(server::DevArgs),
    /// Read and write cluster-wide settings (any node accepts them).
    ///
    /// Example: stoker config set scheduler.interval 5s --endpoint 127.0.0.1:7402
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Inspect and change the Raft membership.
    ///
    /// Example: stoker cluster status --endpoint 127.0.0.1:7401 -o json
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Upload and list task modules (.wasm).
    ///
    /// Example: stoker module upload wordcount.wasm --name wordcount
    #[command(subcommand)]
    Module(module::ModuleCommand),
    /// Submit, follow and control tasks.
    ///
    /// Example: ID=$(stoker task submit --module wordcount --input book.txt) && stoker task wait $ID
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// Inspect the cluster's nodes.
    ///
    /// Example: stoker node list
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Placement rules: apply a rules.toml, show the rules in force.
    ///
    /// Example: stoker rules apply rules.toml && stoker rules show
    #[command(subcommand)]
    Rules(rules::RulesCommand),
    /// The owner's coordinator schedulers: list, pause, resume, add, remove.
    ///
    /// Example: stoker scheduler pause balance-subtask
    #[command(subcommand)]
    Scheduler(scheduler::SchedulerCommand),
    /// The coordinator's operators (moves, leader transfers).
    ///
    /// Example: stoker operator list -o json
    #[command(subcommand)]
    Operator(scheduler::OperatorCommand),
    /// End-to-end benchmarks.
    ///
    /// Example: stoker bench governor --module target/wasm32-wasip1/release/primes.wasm
    #[command(subcommand_required = true)]
    Bench(bench::Args),
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// For people: progress bars and a summary.
    #[default]
    Text,
    /// Exactly one JSON object on stdout, for scripts.
    Json,
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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::RunLocal(args) => run_local::run(args).await,
            Command::Server(args) => server::run(args).await,
            Command::Dev(args) => server::run_dev(args).await,
            Command::Config(cmd) => config::run(cmd).await,
            Command::Cluster(cmd) => cluster::run(cmd).await,
            Command::Module(cmd) => module::run(cmd).await,
            Command::Task(cmd) => task::run(cmd).await,
            Command::Node(cmd) => node::run(cmd).await,
            Command::Rules(cmd) => rules::run(cmd).await,
            Command::Scheduler(cmd) => scheduler::run(cmd).await,
            Command::Operator(cmd) => scheduler::run_operator(cmd).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STOKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
