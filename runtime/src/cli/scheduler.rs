//! `stoker scheduler list|pause|resume|add|remove` and `stoker operator
//! list`: the owner's coordinator. Scheduler states are replicated cluster
//! config; operators are the owner's (any node asks it). Operator limits
//! are cluster config too: `stoker config set subtask-schedule-limit 1`.
//!
//! The schedulers are built in (`balance-subtask`, `hot-node`,
//! `leader-placement`): `add` puts a removed one back, it does not load new
//! code; any other name is refused with the list of known ones. The
//! checkers (`down-node-checker`, `rule-checker`) are listed too; they run
//! every round and are not steered.

use std::process::ExitCode;

use serde_json::{json, Value};
use stoker_proto::api::{
    control_scheduler_request::Action, ControlSchedulerRequest, ListOperatorsRequest,
    ListOperatorsResponse, ListSchedulersRequest, ListSchedulersResponse, OperatorInfo,
};

use super::client::{self, Conn};
use super::Output;

#[derive(Debug, clap::Subcommand)]
pub(super) enum SchedulerCommand {
    /// The coordinator's checkers and schedulers: kind, state, current
    /// interval, operators created during this ownership term.
    ///
    /// Example: stoker scheduler list -o json
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Stop a scheduler from creating operators until resumed.
    ///
    /// Example: stoker scheduler pause balance-subtask
    Pause {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Let a paused scheduler run again.
    Resume {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Add a removed built-in scheduler back (only the built-in ones
    /// exist: balance-subtask, hot-node, leader-placement).
    ///
    /// Example: stoker scheduler add hot-node
    Add {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a scheduler (it stays known and can be added back).
    ///
    /// Example: stoker scheduler remove hot-node
    Remove {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, clap::Subcommand)]
pub(super) enum OperatorCommand {
    /// Operators in flight on the owner, and the recently finished ones.
    ///
    /// Example: stoker operator list -o json
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
}

pub(super) async fn run(cmd: SchedulerCommand) -> anyhow::Result<ExitCode> {
    let (name, conn, action) = match cmd {
        SchedulerCommand::List { conn, output } => {
            let c = conn.connect()?;
            let resp = client::retry(|| {
                let mut api = c.api.clone();
                async move { api.list_schedulers(ListSchedulersRequest {}).await }
            })
            .await
            .map_err(|s| c.error("", &s))?
            .into_inner();
            match output {
                Output::Json => println!("{}", schedulers_json(&resp)),
                Output::Text => println!("{}", schedulers_table(&resp)),
            }
            return Ok(ExitCode::SUCCESS);
        }
        SchedulerCommand::Pause { name, conn } => (name, conn, Action::Pause),
        SchedulerCommand::Resume { name, conn } => (name, conn, Action::Resume),
        SchedulerCommand::Add { name, conn } => (name, conn, Action::Add),
        SchedulerCommand::Remove { name, conn } => (name, conn, Action::Remove),
    };
    let c = conn.connect()?;
    let resp = client::retry(|| {
        let mut api = c.api.clone();
        let name = name.clone();
        async move {
            api.control_scheduler(ControlSchedulerRequest {
                name,
                action: action as i32,
            })
            .await
        }
    })
    .await
    .map_err(|s| c.error(&format!("scheduler {name}"), &s))?
    .into_inner();
    eprintln!("scheduler {name}: {}", resp.state);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn run_operator(cmd: OperatorCommand) -> anyhow::Result<ExitCode> {
    let OperatorCommand::List { conn, output } = cmd;
    let c = conn.connect()?;
    let resp = client::retry(|| {
        let mut api = c.api.clone();
        async move { api.list_operators(ListOperatorsRequest {}).await }
    })
    .await
    .map_err(|s| c.error("", &s))?
    .into_inner();
    match output {
        Output::Json => println!("{}", operators_json(&resp)),
        Output::Text => println!("{}", operators_table(&resp)),
    }
    Ok(ExitCode::SUCCESS)
}

fn schedulers_json(resp: &ListSchedulersResponse) -> Value {
    json!({
        "node": resp.node,
        "owner": resp.owner,
        "schedulers": resp.schedulers.iter().map(|s| json!({
            "name": s.name,
            "kind": if s.checker { "checker" } else { "scheduler" },
            "state": s.state,
            "interval_ms": s.interval_ms,
            "operators": s.operators,
        })).collect::<Vec<_>>(),
    })
}

fn schedulers_table(resp: &ListSchedulersResponse) -> String {
    let rows: Vec<Vec<String>> = resp
        .schedulers
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                if s.checker { "checker" } else { "scheduler" }.into(),
                s.state.clone(),
                if !resp.owner {
                    "-".into()
                } else if s.checker {
                    "every round".into()
                } else {
                    format!("{}ms", s.interval_ms)
                },
                s.operators.to_string(),
            ]
        })
        .collect();
    client::table(&["NAME", "KIND", "STATE", "INTERVAL", "OPERATORS"], &rows)
}

fn operator_json(o: &OperatorInfo) -> Value {
    json!({
        "id": o.id,
        "kind": o.kind,
        "source": o.source,
        "priority": o.priority,
        "steps": o.steps,
        "created_ms": o.created_ms,
        "deadline_ms": o.deadline_ms,
        "state": o.state,
        "reports": o.reports,
        "confirmed_by": o.confirmed_by,
    })
}

fn operators_json(resp: &ListOperatorsResponse) -> Value {
    json!({
        "node": resp.node,
        "owner": resp.owner,
        "operators": resp.operators.iter().map(operator_json).collect::<Vec<_>>(),
        "recent": resp.recent.iter().map(operator_json).collect::<Vec<_>>(),
    })
}

fn operators_table(resp: &ListOperatorsResponse) -> String {
    let row = |o: &OperatorInfo| {
        vec![
            o.id.to_string(),
            o.kind.clone(),
            o.source.clone(),
            o.priority.to_string(),
            o.state.clone(),
            o.steps.join("; "),
            if o.confirmed_by.is_empty() {
                o.reports.join("; ")
            } else {
                format!("{} (by {})", o.reports.join("; "), o.confirmed_by)
                    .trim_start()
                    .to_string()
            },
        ]
    };
    let mut rows: Vec<Vec<String>> = resp.operators.iter().map(row).collect();
    rows.extend(resp.recent.iter().map(row));
    if rows.is_empty() {
        return "no operators".into();
    }
    client::table(
        &[
            "ID", "KIND", "SOURCE", "PRIORITY", "STATE", "STEPS", "REPORTS",
        ],
        &rows,
    )
}
