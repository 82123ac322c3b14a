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
mod subtask_log;
mod task;
mod tenant;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::ProgressStyle;
use stoker::api::auth::AuthChannel;
use stoker_proto::meta::meta_client::MetaClient;

/// Shown after the command list of `stoker --help`.
const EXAMPLES: &str = "\
Examples:
  Try it on one machine (a scheduler, the owner and a worker in one process):
    stoker dev --listen 127.0.0.1:7400 &
    export STOKER_ENDPOINT=127.0.0.1:7400
    stoker module upload wordcount.wasm --name wordcount
    ID=$(stoker task submit --module wordcount --input book.txt)
    stoker task wait $ID && stoker task show $ID -o json

  A cluster of three schedulers and a worker:
    stoker server --id 1 --listen 10.0.0.1:7400 --data-dir /var/lib/stoker \\
        --peers 1=10.0.0.1:7400,2=10.0.0.2:7400,3=10.0.0.3:7400 --no-worker
    stoker server --id 11 --listen 10.0.1.1:7400 --worker-only \\
        --endpoints 10.0.0.1:7400,10.0.0.2:7400,10.0.0.3:7400 --slots 8 --labels zone=z1
    stoker cluster status -o json
    stoker node list

  Control tasks:
    stoker task list
    stoker task pause|resume|cancel|resolve ID
    stoker task modify ID --concurrency 4 --priority 10

  Tenants, placement and the coordinator (admin token in STOKER_TOKEN):
    TOKEN=$(stoker tenant create acme --max-slots 8 | tail -n1)
    stoker rules apply rules.toml && stoker rules show -o json
    stoker config set subtask-schedule-limit 4
    stoker scheduler list && stoker operator list

  Run one task locally, without a cluster:
    stoker run-local --module primes.wasm --input primes.json --slots 2

Every client command takes --endpoint (STOKER_ENDPOINT), --token
(STOKER_TOKEN), --ca-cert (STOKER_CA_CERT) and -o json where it prints
something. `stoker help COMMAND` shows a command's options and examples.";

/// Stoker: distributed tasks whose logic is WebAssembly.
#[derive(Debug, Parser)]
#[command(name = "stoker", version, about, long_about = None, after_help = EXAMPLES)]
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
    /// Create, list and change tenants (admin token).
    ///
    /// Example: TOKEN=$(stoker tenant create acme --max-slots 8 | tail -n1)
    #[command(subcommand)]
    Tenant(tenant::TenantCommand),
    /// Create, list and revoke API tokens.
    ///
    /// Example: stoker token create --description ci --token $TOKEN
    #[command(subcommand)]
    Token(tenant::TokenCommand),
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

impl Output {
    /// Whether to draw progress bars: text output with stderr (where they
    /// go) on a terminal. `-o json` prints only its JSON; text output to a
    /// pipe gets plain lines, if anything.
    fn bars(self) -> bool {
        self == Output::Text && std::io::stderr().is_terminal()
    }
}

/// The look of every progress bar of the CLI, around `template`'s fields.
fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
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
    /// PEM certificate of the cluster's certificate authority: talk TLS to
    /// the endpoint and trust the certificates it signed.
    #[arg(long, env = "STOKER_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate, for clusters that demand one
    /// (`client_auth`); needs --client-key.
    #[arg(long, env = "STOKER_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, env = "STOKER_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// API token, sent as `authorization: Bearer <token>` on every request
    /// (the admin token for `config` and `cluster` commands).
    #[arg(long, env = "STOKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl Endpoint {
    /// Turns TLS on for this process's connections when --ca-cert is given.
    fn install_tls(&self) -> anyhow::Result<()> {
        let Some(ca) = &self.ca_cert else {
            return Ok(());
        };
        let tls = stoker::api::tls::client_config(
            Some(ca),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
        )?;
        stoker::api::tls::install_client(tls)?;
        Ok(())
    }

    fn client(&self) -> anyhow::Result<MetaClient<AuthChannel>> {
        self.install_tls()?;
        stoker::api::meta::connect_meta_with(
            &self.endpoint,
            Duration::from_secs(self.timeout_secs),
            self.token.as_deref(),
        )
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
            Command::Tenant(cmd) => tenant::run_tenant(cmd).await,
            Command::Token(cmd) => tenant::run_token(cmd).await,
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
        // Colours only on a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
