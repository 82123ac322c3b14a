//! `stoker config set|get|list|delete`: cluster-wide settings in the
//! replicated state (e.g. `resource.scheduler`, see `docs/observability.md`).

use std::process::ExitCode;

use stoker_proto::meta::{
    command, command_result, query, query_result, Command, DeleteConfig, GetConfig, ListConfig,
    ProposeRequest, Query, QueryRequest,
};

use super::Endpoint;

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
