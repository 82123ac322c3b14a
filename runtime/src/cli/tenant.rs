//! `stoker tenant create|list|set` (the admin) and `stoker token
//! create|list|revoke` (a tenant for itself, the admin for any tenant).

use std::process::ExitCode;

use serde_json::{json, Value};
use stoker_proto::api::{
    CreateTenantRequest, CreateTokenRequest, ListTenantsRequest, ListTokensRequest,
    RevokeTokenRequest, SetTenantRequest,
};
use stoker_proto::meta::{TenantQuota, TenantRecord, TokenRecord};

use super::client::{self, Conn};
use super::Output;

/// A tenant's limits; an absent flag is 0, i.e. no limit.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct QuotaArgs {
    /// Slots its subtasks may hold at once, cluster-wide.
    #[arg(long)]
    max_slots: Option<u32>,
    /// Fuel its subtasks may burn per second on one worker node.
    #[arg(long)]
    fuel_per_second: Option<u64>,
    /// Largest fuel limit per subtask a task may ask for (and the limit of
    /// tasks that ask for none).
    #[arg(long)]
    max_fuel_per_subtask: Option<u64>,
    /// Largest sandbox memory per subtask, in bytes.
    #[arg(long)]
    max_memory_bytes: Option<u64>,
    /// Total bytes of its modules.
    #[arg(long)]
    max_module_bytes: Option<u64>,
    /// Unfinished tasks it may have at once.
    #[arg(long)]
    max_queued_tasks: Option<u32>,
}

impl QuotaArgs {
    fn any(&self) -> bool {
        self.max_slots.is_some()
            || self.fuel_per_second.is_some()
            || self.max_fuel_per_subtask.is_some()
            || self.max_memory_bytes.is_some()
            || self.max_module_bytes.is_some()
            || self.max_queued_tasks.is_some()
    }

    /// The quota these flags give, starting from `base` (flags not given
    /// keep its values).
    fn apply(&self, base: TenantQuota) -> TenantQuota {
        TenantQuota {
            max_slots: self.max_slots.unwrap_or(base.max_slots),
            fuel_per_second: self.fuel_per_second.unwrap_or(base.fuel_per_second),
            max_fuel_per_subtask: self
                .max_fuel_per_subtask
                .unwrap_or(base.max_fuel_per_subtask),
            max_memory_bytes: self.max_memory_bytes.unwrap_or(base.max_memory_bytes),
            max_module_bytes: self.max_module_bytes.unwrap_or(base.max_module_bytes),
            max_queued_tasks: self.max_queued_tasks.unwrap_or(base.max_queued_tasks),
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub(super) enum TenantCommand {
    /// Create a tenant (admin token). Prints its first token alone on the
    /// last line, once: only its hash is kept.
    ///
    /// Example: TOKEN=$(stoker tenant create acme --weight 2 --max-slots 8 | tail -n1)
    Create {
        /// Tenant id: a-z, 0-9, '-', '_' (at most 64).
        id: String,
        /// Display name (default: the id).
        #[arg(long, default_value = "")]
        name: String,
        /// Share of the slots when tenants compete for them.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        #[command(flatten)]
        quota: QuotaArgs,
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// List tenants (the admin sees every one, a tenant itself).
    ///
    /// Example: stoker tenant list -o json
    List {
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Change a tenant's weight or quota (admin token); flags not given
    /// stay as they are, 0 removes a limit.
    ///
    /// Example: stoker tenant set acme --max-slots 16 --max-queued-tasks 100
    Set {
        /// Tenant id.
        id: String,
        /// New weight.
        #[arg(long)]
        weight: Option<u32>,
        #[command(flatten)]
        quota: QuotaArgs,
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, clap::Subcommand)]
pub(super) enum TokenCommand {
    /// Create an API token for your tenant (or, with the admin token, for
    /// --tenant). Prints the token alone on the last line, once.
    ///
    /// Example: NEW=$(stoker token create --description ci | tail -n1)
    Create {
        /// The tenant (admin only; default: the caller's own).
        #[arg(long, default_value = "")]
        tenant: String,
        /// Free text to tell tokens apart.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a token by its id (see `stoker token list`).
    ///
    /// Example: stoker token revoke 3f9a0c1b2d4e
    Revoke {
        /// Token id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List token ids (never the tokens themselves).
    ///
    /// Example: stoker token list -o json
    List {
        /// The tenant (admin only; default: every tenant for the admin).
        #[arg(long, default_value = "")]
        tenant: String,
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
}

fn quota_json(q: &TenantQuota) -> Value {
    json!({
        "max_slots": q.max_slots,
        "fuel_per_second": q.fuel_per_second,
        "max_fuel_per_subtask": q.max_fuel_per_subtask,
        "max_memory_bytes": q.max_memory_bytes,
        "max_module_bytes": q.max_module_bytes,
        "max_queued_tasks": q.max_queued_tasks,
    })
}

fn tenant_json(t: &TenantRecord) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "weight": t.weight.max(1),
        "quota": quota_json(&t.quota.unwrap_or_default()),
        "create_time_ms": t.create_time_ms,
    })
}

fn token_json(t: &TokenRecord) -> Value {
    json!({
        "id": t.id,
        "tenant": t.tenant,
        "description": t.description,
        "create_time_ms": t.create_time_ms,
    })
}

fn limit(v: u64) -> String {
    if v == 0 {
        "-".into()
    } else {
        v.to_string()
    }
}

fn tenants_table(tenants: &[TenantRecord]) -> String {
    let rows: Vec<Vec<String>> = tenants
        .iter()
        .map(|t| {
            let q = t.quota.unwrap_or_default();
            vec![
                t.id.clone(),
                t.weight.max(1).to_string(),
                limit(q.max_slots.into()),
                limit(q.fuel_per_second),
                limit(q.max_fuel_per_subtask),
                limit(q.max_memory_bytes),
                limit(q.max_module_bytes),
                limit(q.max_queued_tasks.into()),
            ]
        })
        .collect();
    client::table(
        &[
            "ID",
            "WEIGHT",
            "SLOTS",
            "FUEL/S",
            "FUEL/SUBTASK",
            "MEMORY",
            "MODULE BYTES",
            "QUEUED",
        ],
        &rows,
    )
}

pub(super) async fn run_tenant(cmd: TenantCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TenantCommand::Create {
            id,
            name,
            weight,
            quota,
            conn,
            output,
        } => {
            let c = conn.connect()?;
            let subject = format!("tenant {id}");
            let resp = c
                .api
                .clone()
                .create_tenant(CreateTenantRequest {
                    id,
                    name,
                    weight,
                    quota: Some(quota.apply(TenantQuota::default())),
                })
                .await
                .map_err(|s| c.error(&subject, &s))?
                .into_inner();
            let tenant = resp.tenant.unwrap_or_default();
            match output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "tenant": tenant_json(&tenant),
                        "token_id": resp.token_id,
                        "token": resp.token,
                    })
                ),
                Output::Text => {
                    println!(
                        "created tenant {} (token id {}); its token, shown only now:",
                        tenant.id, resp.token_id
                    );
                    println!("{}", resp.token);
                }
            }
        }
        TenantCommand::List { conn, output } => {
            let c = conn.connect()?;
            let resp = client::retry(|| {
                let mut api = c.api.clone();
                async move { api.list_tenants(ListTenantsRequest {}).await }
            })
            .await
            .map_err(|s| c.error("", &s))?
            .into_inner();
            match output {
                Output::Json => println!(
                    "{}",
                    Value::Array(resp.tenants.iter().map(tenant_json).collect())
                ),
                Output::Text => println!("{}", tenants_table(&resp.tenants)),
            }
        }
        TenantCommand::Set {
            id,
            weight,
            quota,
            conn,
            output,
        } => {
            let c = conn.connect()?;
            let subject = format!("tenant {id}");
            let new_quota = if quota.any() {
                // Flags not given keep the tenant's current values.
                let current = client::retry(|| {
                    let mut api = c.api.clone();
                    async move { api.list_tenants(ListTenantsRequest {}).await }
                })
                .await
                .map_err(|s| c.error(&subject, &s))?
                .into_inner()
                .tenants
                .into_iter()
                .find(|t| t.id == id)
                .ok_or_else(|| anyhow::anyhow!("tenant {id} not found"))?;
                Some(quota.apply(current.quota.unwrap_or_default()))
            } else {
                None
            };
            if weight.is_none() && new_quota.is_none() {
                anyhow::bail!("nothing to change: give --weight or a quota flag (see --help)");
            }
            let resp = c
                .api
                .clone()
                .set_tenant(SetTenantRequest {
                    id,
                    weight,
                    quota: new_quota,
                })
                .await
                .map_err(|s| c.error(&subject, &s))?
                .into_inner();
            let t = resp.tenant.unwrap_or_default();
            match output {
                Output::Json => println!("{}", tenant_json(&t)),
                Output::Text => println!("{}", tenants_table(std::slice::from_ref(&t))),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn run_token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Create {
            tenant,
            description,
            conn,
            output,
        } => {
            let c = conn.connect()?;
            let subject = if tenant.is_empty() {
                String::new()
            } else {
                format!("tenant {tenant}")
            };
            let resp = c
                .api
                .clone()
                .create_token(CreateTokenRequest {
                    tenant,
                    description,
                })
                .await
                .map_err(|s| c.error(&subject, &s))?
                .into_inner();
            match output {
                Output::Json => println!("{}", json!({ "id": resp.id, "token": resp.token })),
                Output::Text => {
                    println!("created token {}; shown only now:", resp.id);
                    println!("{}", resp.token);
                }
            }
        }
        TokenCommand::Revoke { id, conn } => {
            let c = conn.connect()?;
            let subject = format!("token {id}");
            c.api
                .clone()
                .revoke_token(RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(|s| c.error(&subject, &s))?;
            println!("revoked token {id}");
        }
        TokenCommand::List {
            tenant,
            conn,
            output,
        } => {
            let c = conn.connect()?;
            let resp = client::retry(|| {
                let mut api = c.api.clone();
                let tenant = tenant.clone();
                async move { api.list_tokens(ListTokensRequest { tenant }).await }
            })
            .await
            .map_err(|s| c.error("", &s))?
            .into_inner();
            match output {
                Output::Json => println!(
                    "{}",
                    Value::Array(resp.tokens.iter().map(token_json).collect())
                ),
                Output::Text => {
                    let rows: Vec<Vec<String>> = resp
                        .tokens
                        .iter()
                        .map(|t| vec![t.id.clone(), t.tenant.clone(), t.description.clone()])
                        .collect();
                    println!("{}", client::table(&["ID", "TENANT", "DESCRIPTION"], &rows));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_flags_keep_what_is_not_given() {
        let args = QuotaArgs {
            max_slots: Some(4),
            fuel_per_second: None,
            max_fuel_per_subtask: None,
            max_memory_bytes: Some(0),
            max_module_bytes: None,
            max_queued_tasks: None,
        };
        assert!(args.any());
        let base = TenantQuota {
            max_slots: 1,
            max_memory_bytes: 9,
            max_queued_tasks: 7,
            ..TenantQuota::default()
        };
        let q = args.apply(base);
        assert_eq!(
            (q.max_slots, q.max_memory_bytes, q.max_queued_tasks),
            (4, 0, 7)
        );
        let j = tenant_json(&TenantRecord {
            id: "a".into(),
            quota: Some(q),
            ..TenantRecord::default()
        });
        assert_eq!(j["weight"], 1);
        assert_eq!(j["quota"]["max_slots"], 4);
    }
}
