//! `stoker rules apply|show`, and the `--rules FILE` of `stoker server`:
//! the file is applied at start and again on every SIGUSR1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use stoker_proto::api::{ApplyRulesRequest, ShowRulesRequest, ShowRulesResponse};
use tracing::{error, info, warn};

use super::client::{self, Client, Conn};
use super::Output;
use stoker::sched::rules::{self, format_time};

#[derive(Debug, clap::Subcommand)]
pub(super) enum RulesCommand {
    /// Replace the placement rules by those of FILE (a `rules.toml`); the
    /// whole file is refused, changing nothing, if a rule is invalid or two
    /// rules conflict.
    ///
    /// Example: stoker rules apply rules.toml
    Apply {
        file: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// The rules in force, each with its status (active, waiting for its
    /// window, expired, blocked: why).
    ///
    /// Example: stoker rules show -o json
    Show {
        #[command(flatten)]
        conn: Conn,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
}

pub(super) async fn run(cmd: RulesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RulesCommand::Apply { file, conn } => {
            let c = conn.connect()?;
            let n = apply_file(&c, &file).await?;
            eprintln!("{n} rules in force");
        }
        RulesCommand::Show { conn, output } => {
            let c = conn.connect()?;
            let resp = client::retry(|| {
                let mut api = c.api.clone();
                async move { api.show_rules(ShowRulesRequest {}).await }
            })
            .await
            .map_err(|s| c.error("", &s))?
            .into_inner();
            match output {
                Output::Json => println!("{}", rules_json(&resp)),
                Output::Text => println!("{}", rules_table(&resp)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads `file`, checks it here (so a bad file fails before any call) and
/// applies it; returns how many rules are in force.
async fn apply_file(c: &Client, file: &Path) -> anyhow::Result<u32> {
    let source = read_checked(file)?;
    apply_source(c, source).await.map_err(|s| {
        c.error("", &s)
            .context(format!("rules file {} not applied", file.display()))
    })
}

/// The text of a rules file that parses and validates.
fn read_checked(file: &Path) -> anyhow::Result<String> {
    let source = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read rules file {}", file.display()))?;
    rules::parse(&source).with_context(|| format!("rules file {} refused", file.display()))?;
    Ok(source)
}

async fn apply_source(c: &Client, source: String) -> Result<u32, tonic::Status> {
    client::retry(|| {
        let mut api = c.api.clone();
        let source = source.clone();
        async move { api.apply_rules(ApplyRulesRequest { source }).await }
    })
    .await
    .map(|r| r.into_inner().count)
}

/// `stoker server --rules FILE`: applies the file once the cluster answers,
/// then again on every SIGUSR1. A refused file is logged and changes
/// nothing. Runs until the process ends.
///
/// # Errors
/// The SIGUSR1 handler cannot be installed.
pub(super) async fn serve_rules_file(
    file: PathBuf,
    addr: String,
    token: Option<String>,
) -> anyhow::Result<()> {
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("cannot install the SIGUSR1 handler")?;
    let c = Client::new(&addr, Duration::from_secs(15), token.as_deref())?;
    // At start the cluster may have no leader yet: retry until it answers
    // or refuses the file for good.
    let mut delay = Duration::from_millis(200);
    loop {
        let source = match read_checked(&file) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %format!("{e:#}"), "placement rules refused");
                break;
            }
        };
        match apply_source(&c, source).await {
            Ok(n) => {
                info!(file = %file.display(), rules = n, "placement rules applied");
                break;
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                ) =>
            {
                error!(file = %file.display(), error = s.message(), "placement rules refused");
                break;
            }
            Err(s) => {
                warn!(error = s.message(), "cannot apply placement rules yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    while usr1.recv().await.is_some() {
        match apply_file(&c, &file).await {
            Ok(n) => info!(file = %file.display(), rules = n, "placement rules reloaded"),
            Err(e) => {
                error!(file = %file.display(), error = %format!("{e:#}"), "placement rules not reloaded")
            }
        }
    }
    Ok(())
}

fn rule_json(r: &stoker_proto::api::RuleInfo) -> Value {
    let rule = r.rule.clone().unwrap_or_default();
    json!({
        "name": rule.name,
        "kind": rule.kind,
        "start_key": rule.start_key,
        "end_key": rule.end_key,
        "tenant": (!rule.tenant.is_empty()).then_some(rule.tenant),
        "targets": rule.targets.iter().map(|t| &t.labels).collect::<Vec<_>>(),
        "start_time": (rule.start_ms != 0).then(|| format_time(rule.start_ms)),
        "end_time": (rule.end_ms != 0).then(|| format_time(rule.end_ms)),
        "status": r.status,
        "reason": r.reason,
        "nodes": r.nodes,
    })
}

/// The object of `rules show -o json`.
fn rules_json(resp: &ShowRulesResponse) -> Value {
    json!({
        "rules": resp.rules.iter().map(rule_json).collect::<Vec<_>>(),
        "applied_ms": resp.time_ms,
    })
}

fn rules_table(resp: &ShowRulesResponse) -> String {
    if resp.rules.is_empty() {
        return "no placement rules".into();
    }
    let rows: Vec<Vec<String>> = resp
        .rules
        .iter()
        .map(|r| {
            let rule = r.rule.clone().unwrap_or_default();
            let window = match (rule.start_ms, rule.end_ms) {
                (0, 0) => "-".to_string(),
                (s, e) => format!(
                    "{}..{}",
                    if s == 0 {
                        String::new()
                    } else {
                        format_time(s)
                    },
                    if e == 0 {
                        String::new()
                    } else {
                        format_time(e)
                    }
                ),
            };
            let status = if r.reason.is_empty() {
                r.status.clone()
            } else {
                format!("{}: {}", r.status, r.reason)
            };
            vec![
                rule.name,
                rule.kind,
                format!("[{:?}, {:?})", rule.start_key, rule.end_key),
                if rule.tenant.is_empty() {
                    "*".into()
                } else {
                    rule.tenant
                },
                rule.targets
                    .iter()
                    .map(|t| client::fmt_labels(&t.labels))
                    .collect::<Vec<_>>()
                    .join(" | "),
                window,
                format!("{:?}", r.nodes),
                status,
            ]
        })
        .collect();
    client::table(
        &[
            "NAME", "KIND", "KEYS", "TENANT", "TARGETS", "WINDOW", "NODES", "STATUS",
        ],
        &rows,
    )
}
