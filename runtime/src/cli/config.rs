//! `stoker config set|get|list|delete`: cluster-wide settings in the
//! replicated state (e.g. `resource.scheduler`, see `docs/observability.md`).

use std::process::ExitCode;

use stoker_proto::meta::{
    command, command_result, query, query_result, Command, DeleteConfig, GetConfig, ListConfig,
    ProposeRequest, Query, QueryRequest,
};

use super::{Endpoint, Output};

#[derive(Debug, clap::Subcommand)]
pub(super) enum ConfigCommand {
    /// Set KEY to VALUE (any node accepts it). `resource.*` keys switch
    /// every worker's tuning scheduler and CPU band at runtime.
    ///
    /// Example: stoker config set resource.scheduler fixed
    Set {
        key: String,
        value: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Print the value of KEY.
    Get {
        key: String,
        /// Read the node's local state without a ReadIndex round.
        #[arg(long)]
        stale: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Remove KEY (a `resource.*` key: nodes go back to their own config).
    ///
    /// Example: stoker config delete resource.scheduler
    Delete {
        key: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// The resource manager's tuning schedulers: each built-in one, the
    /// cluster-wide choice (`resource.scheduler`) and the nodes running it.
    ///
    /// Example: stoker config schedulers -o json
    Schedulers {
        #[command(flatten)]
        endpoint: Endpoint,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Print every setting as KEY=VALUE lines.
    List {
        #[arg(long)]
        stale: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

pub(super) async fn run(cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    run_inner(cmd).await.map(|()| ExitCode::SUCCESS)
}

async fn run_inner(cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Set {
            key,
            value,
            endpoint,
        } => {
            let resp = endpoint
                .client()?
                .propose(stoker::api::meta::set_config_request(key, value))
                .await
                .map_err(|s| anyhow::anyhow!("config set failed: {}", s.message()))?
                .into_inner();
            let result = resp.result.unwrap_or_default();
            if !result.error.is_empty() {
                anyhow::bail!("config set rejected: {}", result.error);
            }
            if let Some(command_result::Kind::SetConfig(r)) = result.kind {
                if let Some(prev) = r.previous {
                    eprintln!("previous value: {prev}");
                }
            }
            Ok(())
        }
        ConfigCommand::Get {
            key,
            stale,
            endpoint,
        } => {
            let q = query::Kind::GetConfig(GetConfig { key: key.clone() });
            match run_query(&endpoint, q, stale).await? {
                Some(query_result::Kind::GetConfig(r)) => match r.value {
                    Some(v) => {
                        println!("{v}");
                        Ok(())
                    }
                    None => anyhow::bail!("config key {key:?} is not set"),
                },
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
        ConfigCommand::Delete { key, endpoint } => {
            let req = ProposeRequest {
                command: Some(Command {
                    kind: Some(command::Kind::DeleteConfig(DeleteConfig {
                        key: key.clone(),
                    })),
                }),
                forwarded: false,
                request_id: Vec::new(),
            };
            let resp = endpoint
                .client()?
                .propose(req)
                .await
                .map_err(|s| anyhow::anyhow!("config delete failed: {}", s.message()))?
                .into_inner();
            let result = resp.result.unwrap_or_default();
            if !result.error.is_empty() {
                anyhow::bail!("config delete rejected: {}", result.error);
            }
            match result.kind {
                Some(command_result::Kind::DeleteConfig(r)) if !r.existed => {
                    anyhow::bail!("config key {key:?} is not set")
                }
                _ => Ok(()),
            }
        }
        ConfigCommand::Schedulers { endpoint, output } => schedulers(&endpoint, output).await,
        ConfigCommand::List { stale, endpoint } => {
            match run_query(&endpoint, query::Kind::ListConfig(ListConfig {}), stale).await? {
                Some(query_result::Kind::ListConfig(r)) => {
                    for kv in r.entries {
                        println!(
                            "{}={}",
                            String::from_utf8_lossy(&kv.key),
                            String::from_utf8_lossy(&kv.value)
                        );
                    }
                    Ok(())
                }
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
        }
    }
}

async fn run_query(
    endpoint: &Endpoint,
    kind: query::Kind,
    stale: bool,
) -> anyhow::Result<Option<query_result::Kind>> {
    let resp = endpoint
        .client()?
        .query(QueryRequest {
            query: Some(Query { kind: Some(kind) }),
            stale_ok: stale,
        })
        .await
        .map_err(|s| anyhow::anyhow!("config read failed: {}", s.message()))?
        .into_inner();
    Ok(resp.result.and_then(|r| r.kind))
}

/// What each built-in tuning scheduler does.
fn describe(name: &str) -> &'static str {
    match name {
        "cpu" => "keeps node CPU in [resource.cpu.low, resource.cpu.high]: overclocks below, downclocks above",
        "fixed" => "never tunes: the node keeps the concurrency and fuel rate it started with",
        _ => "",
    }
}

/// `stoker config schedulers`.
async fn schedulers(endpoint: &Endpoint, output: Output) -> anyhow::Result<()> {
    let key = stoker::resource::settings::KEY_SCHEDULER.to_string();
    let chosen = match run_query(endpoint, query::Kind::GetConfig(GetConfig { key }), false).await?
    {
        Some(query_result::Kind::GetConfig(r)) => r.value,
        other => anyhow::bail!("unexpected answer {other:?}"),
    };
    endpoint.install_tls()?;
    let c = super::client::Client::new(
        &endpoint.endpoint,
        std::time::Duration::from_secs(endpoint.timeout_secs),
        endpoint.token.as_deref(),
    )?;
    let nodes = c
        .api
        .clone()
        .list_nodes(stoker_proto::api::ListNodesRequest {})
        .await
        .map_err(|s| c.error("nodes", &s))?
        .into_inner()
        .nodes;
    let running = |name: &str| -> Vec<u64> {
        nodes
            .iter()
            .filter(|n| n.load.as_ref().is_some_and(|l| l.scheduler == name))
            .map(|n| n.id)
            .collect()
    };
    let rows: Vec<(&str, bool, Vec<u64>)> = stoker::resource::scheduler::BUILT_IN
        .iter()
        .map(|name| (*name, chosen.as_deref() == Some(*name), running(name)))
        .collect();
    match output {
        Output::Json => {
            let list: Vec<serde_json::Value> = rows
                .iter()
                .map(|(name, selected, nodes)| {
                    serde_json::json!({
                        "name": name,
                        "description": describe(name),
                        "selected": selected,
                        "nodes": nodes,
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({ "schedulers": list, "setting": chosen })
            );
        }
        Output::Text => {
            println!(
                "{:<8} {:<9} {:<12} DESCRIPTION",
                "NAME", "SELECTED", "NODES"
            );
            for (name, selected, nodes) in &rows {
                let nodes: Vec<String> = nodes.iter().map(u64::to_string).collect();
                println!(
                    "{name:<8} {:<9} {:<12} {}",
                    if *selected { "yes" } else { "" },
                    if nodes.is_empty() {
                        "-".to_string()
                    } else {
                        nodes.join(",")
                    },
                    describe(name)
                );
            }
            match &chosen {
                Some(_) => println!("switch with: stoker config set resource.scheduler NAME"),
                None => println!(
                    "resource.scheduler is not set: each node runs the scheduler of its own config"
                ),
            }
        }
    }
    Ok(())
}
