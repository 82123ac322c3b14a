//! `stoker bench meta`: committed commands/s and p50/p99 latency of a
//! 3-process cluster on loopback for several client counts, then the time
//! from killing the leader (SIGKILL) to the next committed write.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use stoker::api::local_cluster::{process_cpu_seconds, LocalCluster};
use stoker::api::meta::{connect_lazy, set_config_request};
use stoker_proto::meta::meta_client::MetaClient;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Client counts to measure, comma separated.
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Send every write to the leader instead of spreading clients over all
    /// nodes (followers forward to the leader).
    #[arg(long)]
    leader_only: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    meta(args).await?;
    Ok(ExitCode::SUCCESS)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn meta(args: Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the stoker binary")?;
    let dir = std::env::temp_dir().join(format!("stoker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_bench(&exe, &dir, &args).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_bench(
    exe: &std::path::Path,
    dir: &std::path::Path,
    args: &Args,
) -> anyhow::Result<()> {
    let mut cluster = LocalCluster::start(exe, 3, dir).context("cannot start the cluster")?;
    let leader = cluster
        .wait_leader(Duration::from_secs(15))
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "meta bench: 3 stoker server processes on 127.0.0.1, {} s per run",
        args.secs
    );
    let timeout = Duration::from_secs(10);
    for &n in &args.clients {
        let targets: Vec<String> = if args.leader_only {
            vec![cluster.addr(leader).to_string()]
        } else {
            cluster
                .ids()
                .iter()
                .map(|id| cluster.addr(*id).to_string())
                .collect()
        };
        let clients: Vec<MetaClient<Channel>> = targets
            .iter()
            .map(|a| connect_lazy(a, timeout))
            .collect::<Result<_, _>>()?;
        let cpu_before = (
            cluster.cpu_seconds(),
            process_cpu_seconds("/proc/self/stat"),
        );
        let (count, errors, mut lat, elapsed) =
            load(&clients, n, Duration::from_secs(args.secs)).await;
        let cpu_after = (
            cluster.cpu_seconds(),
            process_cpu_seconds("/proc/self/stat"),
        );
        lat.sort_unstable();
        // CPU per command: steadier than the rate on a shared machine.
        let per_cmd = |before: Option<f64>, after: Option<f64>| match (before, after) {
            (Some(b), Some(a)) if count > 0 => format!("{:.0}", (a - b) / count as f64 * 1e6),
            _ => "-".to_string(),
        };
        println!(
            "clients={n:<3} committed={count:<8} errors={errors:<4} cmds/s={:<9.0} p50={:.2}ms p99={:.2}ms cpu/cmd: servers {} us, client {} us",
            count as f64 / elapsed.as_secs_f64(),
            percentile(&lat, 0.50).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            per_cmd(cpu_before.0, cpu_after.0),
            per_cmd(cpu_before.1, cpu_after.1),
        );
    }
    let leader = cluster
        .wait_leader(Duration::from_secs(15))
        .await
        .map_err(anyhow::Error::msg)?;
    let survivors: Vec<MetaClient<Channel>> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .map(|id| connect_lazy(cluster.addr(id), Duration::from_millis(500)))
        .collect::<Result<_, _>>()?;
    cluster.kill(leader);
    let killed = Instant::now();
    let mut i = 0usize;
    loop {
        let mut c = survivors[i % survivors.len()].clone();
        i += 1;
        if c.propose(set_config_request("failover".into(), i.to_string()))
            .await
            .is_ok()
        {
            break;
        }
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(30),
            "no write committed within 30 s of the leader kill"
        );
    }
    println!(
        "failover: leader {leader} killed (SIGKILL), next committed write after {:.0} ms",
        killed.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Runs `n` sequential writers for `secs`; returns (ok, errors, latencies, elapsed).
async fn load(
    clients: &[MetaClient<Channel>],
    n: usize,
    secs: Duration,
) -> (u64, u64, Vec<Duration>, Duration) {
    let start = Instant::now();
    let stop = Arc::new(start + secs);
    let mut tasks = Vec::new();
    for w in 0..n {
        let mut client = clients[w % clients.len()].clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while Instant::now() < *stop {
                let t = Instant::now();
                let req = set_config_request(format!("bench/{w}/{}", i % 128), i.to_string());
                match client.propose(req).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            all.extend(lat);
            errors += e;
        }
    }
    (all.len() as u64, errors, all, start.elapsed())
}
