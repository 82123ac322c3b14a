//! `stoker run-local`: every step of one task on this machine.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use indicatif::ProgressBar;
use serde_json::json;
use stoker::blob::BlobStore;
use stoker::exec::local::{Event, LocalOptions, LocalRunner, RetryPolicy, Summary};
use stoker::resource::{Governor, GovernorConfig, ManagerConfig, ResourceManager};
use stoker::sandbox::{CallLimits, Sandbox, SandboxConfig};

use super::{bar_style, Output};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The task module (.wasm built with the guest SDK).
    #[arg(long)]
    module: PathBuf,
    /// A file with the task's input.
    #[arg(long)]
    input: PathBuf,
    /// Subtasks that run at once [default: number of cores].
    #[arg(long)]
    slots: Option<usize>,
    /// Fuel each call (plan, subtask, finish) may burn.
    #[arg(long, default_value_t = CallLimits::default().fuel)]
    fuel_per_subtask: u64,
    /// Largest linear memory of a sandbox, in bytes.
    #[arg(long, default_value_t = CallLimits::default().memory_bytes)]
    memory_limit: u64,
    /// Wall-clock seconds each call may take.
    #[arg(long, default_value_t = 60.0)]
    deadline: f64,
    /// Attempts per subtask for retryable failures.
    #[arg(long, default_value_t = RetryPolicy::default().max_attempts)]
    max_attempts: u32,
    /// Directory of the blob store (the task's tenant is `local`).
    #[arg(long, default_value = ".stoker/blobs")]
    blob_dir: PathBuf,
    /// Directory where compiled modules are cached.
    #[arg(long, default_value = ".stoker/cache")]
    cache_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
    /// How the fuel governor tunes while the task runs.
    #[arg(long, value_enum, default_value_t = GovernorChoice::Fixed)]
    governor: GovernorChoice,
}

/// The tuning scheduler of `--governor`. `fixed` is the default because a
/// local run is work someone is waiting for in the foreground.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GovernorChoice {
    /// Keep node CPU between 50 and 70 %: subtasks are slowed or suspended
    /// while other processes need the machine (calibrates for ~0.4 s first).
    Cpu,
    /// Every slot at full speed.
    Fixed,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let module = std::fs::read(&args.module)
        .with_context(|| format!("cannot read module file {}", args.module.display()))?;
    let input = std::fs::read(&args.input)
        .with_context(|| format!("cannot read input file {}", args.input.display()))?;
    if args.max_attempts == 0 {
        anyhow::bail!("--max-attempts must be at least 1");
    }
    let deadline = Duration::try_from_secs_f64(args.deadline)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--deadline must be a positive number of seconds")?;
    let slots = args
        .slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if slots == 0 {
        anyhow::bail!("--slots must be at least 1");
    }
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: Some(args.cache_dir.clone()),
        max_instances: (slots as u32 + 4).max(16),
        ..SandboxConfig::default()
    })?;
    let blobs = BlobStore::local(&args.blob_dir)?.tenant("local")?;
    let governor = Governor::new(GovernorConfig::for_sandbox(&sandbox, slots))?;
    let manager = match args.governor {
        GovernorChoice::Cpu => Some(
            ResourceManager::for_sandbox(&sandbox, governor.clone(), ManagerConfig::default())
                .await?,
        ),
        GovernorChoice::Fixed => None,
    };
    let runner = LocalRunner::new(Arc::new(sandbox), Some(blobs)).with_governor(governor.clone());
    let opts = LocalOptions {
        slots,
        limits: CallLimits {
            fuel: args.fuel_per_subtask,
            memory_bytes: args.memory_limit,
            deadline,
            ..CallLimits::default()
        },
        retry: RetryPolicy {
            max_attempts: args.max_attempts,
            ..RetryPolicy::default()
        },
        task_id: format!("local-{}", stoker::meta::now_ms()),
    };
    let display = Display::new(args.output);
    let summary = runner
        .run(&module, input, &opts, &|event| display.event(event))
        .await;
    display.finish();
    let ok = summary.result.is_ok();
    let governed = governor_json(&governor, manager.as_ref());
    match args.output {
        Output::Json => {
            let mut json = summary_json(&summary);
            json["governor"] = governed;
            println!("{json}");
        }
        Output::Text => {
            print_summary(&summary);
            eprintln!("{}", governor_line(&governed));
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The governor's final state: the manager's with `--governor cpu`.
fn governor_json(governor: &Governor, manager: Option<&ResourceManager>) -> serde_json::Value {
    match manager {
        Some(m) => serde_json::to_value(m.state()).unwrap_or_default(),
        None => {
            let snap = governor.snapshot();
            json!({
                "scheduler": "fixed",
                "slots": snap.slots,
                "allowed": snap.allowed,
                "fuel_rate": snap.fuel_rate,
                "fuel_granted": snap.fuel_granted,
            })
        }
    }
}

/// The governor's final state for people, e.g. `governor cpu: level 0.62
/// cores, 1/2 slots allowed, last command hold at 64% node cpu`.
fn governor_line(g: &serde_json::Value) -> String {
    let mut line = format!(
        "governor {}: {}/{} slots allowed",
        g["scheduler"].as_str().unwrap_or("?"),
        g["allowed"],
        g["slots"]
    );
    if let Some(level) = g["level"].as_f64() {
        line.push_str(&format!(", level {level:.2} cores"));
    }
    if let (Some(cmd), Some(cpu)) = (g["last_command"].as_str(), g["cpu"].as_f64()) {
        line.push_str(&format!(
            ", last command {cmd} at {:.0}% node cpu",
            cpu * 100.0
        ));
    }
    line
}

/// The one JSON object of `-o json`.
fn summary_json(s: &Summary) -> serde_json::Value {
    let (state, result, error) = match &s.result {
        Ok(bytes) => {
            let result = serde_json::from_slice::<serde_json::Value>(bytes)
                .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned().into());
            ("succeed", result, serde_json::Value::Null)
        }
        Err(e) => (
            "failed",
            serde_json::Value::Null,
            json!({ "kind": e.kind, "message": e.message }),
        ),
    };
    json!({
        "state": state,
        "result": result,
        "error": error,
        "steps": s.steps,
        "subtasks": s.subtasks,
        "attempts": s.attempts,
        "fuel_used": s.fuel_used,
        "elapsed_ms": s.elapsed.as_millis() as u64,
    })
}

fn print_summary(s: &Summary) {
    let state = if s.result.is_ok() {
        "succeed"
    } else {
        "failed"
    };
    eprintln!(
        "task {state} in {:.2} s: {} steps, {} subtasks, {} attempts, {} fuel",
        s.elapsed.as_secs_f64(),
        s.steps,
        s.subtasks,
        s.attempts,
        s.fuel_used
    );
    match &s.result {
        Ok(bytes) => println!("{}", String::from_utf8_lossy(bytes)),
        Err(e) => eprintln!("error: {e}"),
    }
}

/// Progress for people: a bar per step on a terminal, plain lines otherwise;
/// nothing with `-o json` (stdout stays one JSON object).
struct Display {
    output: Output,
    terminal: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Display {
    fn new(output: Output) -> Self {
        Display {
            output,
            terminal: std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        }
    }

    fn event(&self, event: Event) {
        if self.output == Output::Json {
            return;
        }
        let mut bar = self.bar.lock().expect("display lock");
        match event {
            Event::StepPlanned { step, subtasks } => {
                if let Some(old) = bar.take() {
                    old.finish();
                }
                if self.terminal {
                    let pb = ProgressBar::new(subtasks as u64);
                    pb.set_style(bar_style(
                        "step {prefix} [{bar:40}] {pos}/{len} subtasks {elapsed}",
                    ));
                    pb.set_prefix(step.to_string());
                    *bar = Some(pb);
                } else {
                    eprintln!("step {step}: {subtasks} subtasks");
                }
            }
            Event::SubtaskDone {
                step,
                ordinal,
                attempts,
            } => match bar.as_ref() {
                Some(pb) => pb.inc(1),
                None => eprintln!("  step {step} subtask {ordinal} done (attempts: {attempts})"),
            },
            Event::SubtaskRetry {
                step,
                ordinal,
                attempt,
                error,
            } => {
                let line = format!(
                    "  step {step} subtask {ordinal} attempt {attempt} failed, retrying: {error}"
                );
                match bar.as_ref() {
                    Some(pb) => pb.println(line),
                    None => eprintln!("{line}"),
                }
            }
            Event::Finishing => {
                if let Some(pb) = bar.take() {
                    pb.finish();
                }
                if !self.terminal {
                    eprintln!("finishing");
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(pb) = self.bar.lock().expect("display lock").take() {
            pb.finish();
        }
    }
}
