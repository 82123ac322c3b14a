//! `stoker bench`: end-to-end benchmarks that print numbers a reader can
//! compare run to run.
//!
//! `stoker bench governor` measures the fuel governor: what governing costs
//! `primes` with no competing load, then a timeline (CPU, concurrency, fuel
//! rate each tick) while a CPU hog starts and stops, ending with the share
//! of ticks the node stayed in the CPU band after settling.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use stoker::exec::local::{LocalOptions, LocalRunner, RetryPolicy};
use stoker::resource::hog::CpuHog;
use stoker::resource::{Governor, GovernorConfig, ManagerConfig, ResourceManager, TickReport};
use stoker::sandbox::{CallLimits, Sandbox, SandboxConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// The fuel governor: throughput cost, then CPU band under a hog.
    ///
    /// Example: stoker bench governor --module target/wasm32-wasip1/release/primes.wasm
    Governor(GovernorArgs),
    /// The replicated metadata: commands/s, latency, failover time.
    ///
    /// Example: stoker bench meta
    Meta(super::bench_meta::Args),
    /// The task framework on 3 server processes: no-op subtasks/s, submit
    /// to running latency.
    ///
    /// Example: stoker bench cluster --module target/wasm32-wasip1/release/misbehave.wasm
    Cluster(super::bench_cluster::Args),
}

#[derive(Debug, clap::Args)]
struct GovernorArgs {
    /// The `primes` example module.
    #[arg(long)]
    module: PathBuf,
    /// Slots of the node [default: number of cores].
    #[arg(long)]
    slots: Option<usize>,
    /// Seconds of the timeline before the hog starts.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Seconds the hog runs.
    #[arg(long, default_value_t = 10.0)]
    hog: f64,
    /// Seconds of the timeline after the hog stops.
    #[arg(long, default_value_t = 10.0)]
    after: f64,
    /// Seconds after each change of load that do not count for the band.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Busy processes the hog starts (one core each).
    #[arg(long, default_value_t = 1)]
    hogs: usize,
    /// Tick of the resource manager, in milliseconds.
    #[arg(long, default_value_t = 250)]
    tick_ms: u64,
    /// End of the primes range `[0, end)` of the throughput comparison.
    #[arg(long, default_value_t = 3_000_000)]
    throughput_end: u64,
    /// Runs of each throughput variant (the best counts).
    #[arg(long, default_value_t = 3)]
    throughput_runs: u32,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.what {
        What::Governor(args) => governor(args).await,
        What::Meta(args) => super::bench_meta::run(args).await,
        What::Cluster(args) => super::bench_cluster::run(args).await,
    }
}

/// One phase of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Hog,
    After,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Warmup => "warmup",
            Phase::Hog => "hog",
            Phase::After => "after",
        }
    }
}

async fn governor(args: GovernorArgs) -> anyhow::Result<ExitCode> {
    let module = std::fs::read(&args.module)
        .with_context(|| format!("cannot read module file {}", args.module.display()))?;
    let slots = args
        .slots
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    anyhow::ensure!(slots > 0, "--slots must be at least 1");
    let sandbox = Arc::new(Sandbox::new(SandboxConfig {
        max_instances: (slots as u32 + 4).max(16),
        ..SandboxConfig::default()
    })?);
    sandbox.load(&module).await?;

    let governor = Governor::new(GovernorConfig::for_sandbox(&sandbox, slots))?;
    let config = ManagerConfig {
        tick: Duration::from_millis(args.tick_ms),
        ..ManagerConfig::default()
    };
    let manager = ResourceManager::for_sandbox(&sandbox, governor.clone(), config).await?;
    let fuel_per_core = manager.fuel_per_core();
    println!(
        "calibration: {:.3} Gfuel/s per core, {slots} slots",
        fuel_per_core / 1e9
    );
    // The throughput part runs at full level with the cpu scheduler off.
    manager.set_scheduler("fixed")?;
    throughput(&sandbox, &module, slots, &args, fuel_per_core).await?;

    manager.set_scheduler("cpu")?;
    let ticks = timeline(&sandbox, &module, slots, &args, &manager, governor).await?;
    let settle = Duration::from_secs_f64(args.settle);
    let counted: Vec<_> = ticks
        .iter()
        .filter(|(_, since, r)| *since >= settle && r.cpu.is_some())
        .collect();
    let in_band = counted
        .iter()
        .filter(|(_, _, r)| r.cpu.is_some_and(|c| (0.5..=0.7).contains(&c)))
        .count();
    let state = manager.state();
    println!(
        "final: scheduler {}, level {:.2} cores, allowed {}/{}, fuel granted {:.1} G",
        state.scheduler,
        state.level,
        state.allowed,
        state.slots,
        state.fuel_granted as f64 / 1e9
    );
    println!(
        "ticks after settling: {} of {}, in [0.5, 0.7]: {in_band}",
        counted.len(),
        ticks.len()
    );
    let share = if counted.is_empty() {
        0.0
    } else {
        100.0 * in_band as f64 / counted.len() as f64
    };
    println!("in band: {share:.1}%");
    Ok(ExitCode::SUCCESS)
}

fn primes_input(start: u64, end: u64, chunks: usize) -> Vec<u8> {
    format!(r#"{{"start": {start}, "end": {end}, "chunks": {chunks}}}"#).into_bytes()
}

fn opts(slots: usize, task_id: &str) -> LocalOptions {
    LocalOptions {
        slots,
        limits: CallLimits {
            fuel: u64::MAX / 2,
            deadline: Duration::from_secs(3600),
            ..CallLimits::default()
        },
        retry: RetryPolicy::default(),
        task_id: task_id.into(),
    }
}

/// Runs one primes task; its wall time and result bytes.
async fn timed(
    runner: &LocalRunner,
    module: &[u8],
    input: &[u8],
    slots: usize,
) -> anyhow::Result<(Duration, Vec<u8>)> {
    let started = Instant::now();
    let summary = runner
        .run(module, input.to_vec(), &opts(slots, "bench"), &|_| {})
        .await;
    let result = summary
        .result
        .map_err(|e| anyhow::anyhow!("primes failed: {e}"))?;
    Ok((started.elapsed(), result))
}

/// Ungoverned vs governed primes, interleaved, best of N each.
async fn throughput(
    sandbox: &Arc<Sandbox>,
    module: &[u8],
    slots: usize,
    args: &GovernorArgs,
    fuel_per_core: f64,
) -> anyhow::Result<()> {
    let input = primes_input(0, args.throughput_end, slots * 4);
    let plain = LocalRunner::new(sandbox.clone(), None);
    let full = Governor::new(GovernorConfig::for_sandbox(sandbox, slots))?;
    let governed = LocalRunner::new(sandbox.clone(), None).with_governor(full);
    let limited_gov = Governor::new(GovernorConfig::for_sandbox(sandbox, slots))?;
    limited_gov.set_rate(Some(slots as f64 * fuel_per_core));
    let limited = LocalRunner::new(sandbox.clone(), None).with_governor(limited_gov);
    let runners = [
        ("ungoverned", &plain),
        ("governed, unlimited rate", &governed),
        ("governed, rate = slots cores", &limited),
    ];
    let runs = args.throughput_runs.max(1) as usize;
    let mut times: [Vec<Duration>; 3] = Default::default();
    let mut answer: Option<Vec<u8>> = None;
    for round in 0..runs {
        // Rotate the order so no variant always runs first or after another.
        for k in 0..runners.len() {
            let i = (round + k) % runners.len();
            let (took, result) = timed(runners[i].1, module, &input, slots).await?;
            if let Some(a) = &answer {
                anyhow::ensure!(*a == result, "variants disagree on the primes count");
            }
            answer = Some(result);
            times[i].push(took);
        }
    }
    println!(
        "throughput: primes [0, {}) in {} chunks on {slots} slots, {runs} runs each, no competing load",
        args.throughput_end,
        slots * 4,
    );
    let stats: Vec<(f64, f64)> = times
        .iter_mut()
        .map(|t| {
            t.sort();
            (t[0].as_secs_f64(), t[t.len() / 2].as_secs_f64())
        })
        .collect();
    let (best0, median0) = stats[0];
    println!(
        "  {:<30} {:>8} {:>7} {:>8} {:>7}",
        "", "best", "cost", "median", "cost"
    );
    for ((name, _), (best, median)) in runners.iter().zip(stats) {
        println!(
            "  {name:<30} {best:>7.3}s {:>+6.1}% {median:>7.3}s {:>+6.1}%",
            100.0 * (best / best0 - 1.0),
            100.0 * (median / median0 - 1.0)
        );
    }
    Ok(())
}

/// Primes tasks back to back under `governor` while the hog comes and goes;
/// every tick with its phase and the time since the phase began.
async fn timeline(
    sandbox: &Arc<Sandbox>,
    module: &[u8],
    slots: usize,
    args: &GovernorArgs,
    manager: &ResourceManager,
    governor: Governor,
) -> anyhow::Result<Vec<(Phase, Duration, TickReport)>> {
    let runner = LocalRunner::new(sandbox.clone(), None).with_governor(governor);
    let module = module.to_vec();
    let input = primes_input(1_000_000_000, 1_000_000_000 + 2_000_000, slots * 8);
    let work = tokio::spawn(async move {
        let mut first: Option<Vec<u8>> = None;
        for n in 0u64.. {
            let (_, result) = timed(&runner, &module, &input, slots).await?;
            match &first {
                None => first = Some(result),
                Some(f) => anyhow::ensure!(*f == result, "task {n} counted differently"),
            }
        }
        Ok(())
    });
    let mut rx = manager.subscribe();
    let plan = [
        (Phase::Warmup, args.warmup),
        (Phase::Hog, args.hog),
        (Phase::After, args.after),
    ];
    println!(
        "timeline: tick {} ms, {} hog process(es)",
        args.tick_ms, args.hogs
    );
    println!("  time   phase    cpu    allowed  active  susp  level  rate(cores)  command");
    let mut ticks = Vec::new();
    for (phase, secs) in plan {
        let _hogs = match phase {
            Phase::Hog => (0..args.hogs)
                .map(|_| CpuHog::start())
                .collect::<Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        };
        let began = Instant::now();
        let until = began + Duration::from_secs_f64(secs);
        while Instant::now() < until {
            let left = until.saturating_duration_since(Instant::now());
            let Ok(got) = tokio::time::timeout(left, rx.recv()).await else {
                break;
            };
            let Ok(report) = got else { continue };
            print_tick(phase, &report, manager.fuel_per_core(), slots);
            ticks.push((phase, began.elapsed(), report));
        }
        if work.is_finished() {
            break;
        }
    }
    work.abort();
    match work.await {
        Ok(Err(e)) => return Err(e),
        Err(e) if !e.is_cancelled() => anyhow::bail!("primes driver failed: {e}"),
        _ => {}
    }
    Ok(ticks)
}

fn print_tick(phase: Phase, r: &TickReport, fuel_per_core: f64, slots: usize) {
    let cpu = r
        .cpu
        .map_or_else(|| "   -  ".to_string(), |c| format!("{:5.1}%", c * 100.0));
    let rate = r.fuel_rate.map_or_else(
        || "unlimited".to_string(),
        |f| format!("{:.2}", f / fuel_per_core),
    );
    println!(
        "  {:6.2}s {:<7} {cpu}  {}/{:<6} {:>6} {:>5}  {:5.2}  {rate:>11}  {}",
        r.at.as_secs_f64(),
        phase.name(),
        r.allowed,
        slots,
        r.active,
        r.suspended,
        r.level,
        serde_json::to_value(r.command)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    );
}
