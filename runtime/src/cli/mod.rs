//! The `stoker` command line. Each subcommand lives in its own file; errors
//! become one actionable line on stderr and a non-zero exit code.

mod bench;
mod run_local;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

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
