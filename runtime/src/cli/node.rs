//! `stoker node list`: the registered nodes, their slots and load.

use std::process::ExitCode;

use serde_json::{json, Value};
use stoker_proto::api::{ListNodesRequest, ListNodesResponse};
use stoker_proto::meta::{NodeLoad, NodeRecord};

use super::client::{self, Conn};
use super::Output;

#[derive(Debug, clap::Subcommand)]
pub(super) enum NodeCommand {
    /// Every registered node: address, liveness, roles, scope, labels, slots,
    /// assigned subtasks, and what its resource manager reported in the
    /// last heartbeat (scheduler, command, active/allowed concurrency, fuel
    /// rate, node CPU).
    ///
    /// Example: stoker node list -o json
    List {
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
}

pub(super) async fn run(cmd: NodeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NodeCommand::List { conn, output } => {
            let c = conn.connect()?;
            let resp = client::retry(|| {
                let mut api = c.api.clone();
                async move { api.list_nodes(ListNodesRequest {}).await }
            })
            .await
            .map_err(|s| c.error("", &s))?
            .into_inner();
            match output {
                Output::Json => println!("{}", nodes_json(&resp)),
                Output::Text => println!("{}", nodes_table(&resp)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Each node with its busy count (missing counts are 0).
fn with_busy(resp: &ListNodesResponse) -> impl Iterator<Item = (&NodeRecord, u32)> {
    resp.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n, resp.busy.get(i).copied().unwrap_or(0)))
}

fn roles(n: &NodeRecord) -> String {
    match (n.scheduler, n.worker) {
        (true, true) => "scheduler,worker".into(),
        (true, false) => "scheduler".into(),
        (false, true) => "worker".into(),
        (false, false) => "-".into(),
    }
}

/// A node's resource state in `node list -o json`; `null` until its
/// first heartbeat with a load.
fn load_json(l: Option<&NodeLoad>) -> Value {
    let Some(l) = l else {
        return Value::Null;
    };
    json!({
        "scheduler": l.scheduler,
        "command": l.command,
        "allowed": l.allowed,
        "active": l.active,
        "suspended": l.suspended,
        "running": l.running,
        "fuel_rate": if l.fuel_rate > 0.0 { json!(l.fuel_rate) } else { Value::Null },
        "level": l.level,
        "cpu": l.cpu,
        "fuel_granted": l.fuel_granted,
    })
}

/// The resource columns of the table: scheduler:command, active/allowed,
/// fuel rate, CPU.
fn load_columns(l: Option<&NodeLoad>) -> [String; 4] {
    let Some(l) = l else {
        return ["-".into(), "-".into(), "-".into(), "-".into()];
    };
    let scheduler = if l.scheduler.is_empty() {
        "none"
    } else {
        &l.scheduler
    };
    [
        format!("{scheduler}:{}", l.command),
        format!("{}/{}", l.active, l.allowed),
        if l.fuel_rate > 0.0 {
            format!("{:.3e}/s", l.fuel_rate)
        } else {
            "unlimited".into()
        },
        l.cpu.map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
    ]
}

/// The array of `node list -o json`.
fn nodes_json(resp: &ListNodesResponse) -> Value {
    Value::Array(
        with_busy(resp)
            .map(|(n, busy)| {
                json!({
                    "id": n.id,
                    "addr": n.addr,
                    "up": n.up,
                    "scheduler": n.scheduler,
                    "worker": n.worker,
                    "scope": n.scope,
                    "labels": n.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
                    "slots": n.slots,
                    "busy": busy,
                    "last_heartbeat_ms": n.last_heartbeat_ms,
                    "resource": load_json(n.load.as_ref()),
                })
            })
            .collect(),
    )
}

fn nodes_table(resp: &ListNodesResponse) -> String {
    let rows: Vec<Vec<String>> = with_busy(resp)
        .map(|(n, busy)| {
            let [governor, concurrency, rate, cpu] = load_columns(n.load.as_ref());
            vec![
                n.id.to_string(),
                n.addr.clone(),
                if n.up { "up" } else { "down" }.into(),
                roles(n),
                if n.scope.is_empty() {
                    "-".into()
                } else {
                    n.scope.clone()
                },
                client::fmt_labels(&n.labels),
                n.slots.to_string(),
                busy.to_string(),
                governor,
                concurrency,
                rate,
                cpu,
            ]
        })
        .collect();
    client::table(
        &[
            "ID",
            "ADDR",
            "UP",
            "ROLES",
            "SCOPE",
            "LABELS",
            "SLOTS",
            "BUSY",
            "GOVERNOR",
            "ACTIVE/ALLOWED",
            "FUEL RATE",
            "CPU",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp() -> ListNodesResponse {
        ListNodesResponse {
            nodes: vec![
                NodeRecord {
                    id: 1,
                    addr: "127.0.0.1:7401".into(),
                    labels: [("zone".to_string(), "a".to_string())].into(),
                    scheduler: true,
                    worker: true,
                    up: true,
                    slots: 2,
                    last_heartbeat_ms: 99,
                    load: Some(NodeLoad {
                        scheduler: "cpu".into(),
                        command: "downclock".into(),
                        allowed: 1,
                        active: 1,
                        suspended: 1,
                        running: 2,
                        fuel_rate: 5e8,
                        level: 0.5,
                        cpu: Some(0.75),
                        fuel_granted: 7,
                        slots: 2,
                    }),
                    ..NodeRecord::default()
                },
                NodeRecord {
                    id: 2,
                    addr: "127.0.0.1:7402".into(),
                    scope: "background".into(),
                    worker: true,
                    slots: 4,
                    ..NodeRecord::default()
                },
            ],
            busy: vec![1],
        }
    }

    #[test]
    fn node_json_has_the_documented_fields() {
        let v = nodes_json(&resp());
        assert_eq!(
            v[0],
            json!({
                "id": 1, "addr": "127.0.0.1:7401", "up": true, "scheduler": true,
                "worker": true, "scope": "", "labels": {"zone": "a"}, "slots": 2,
                "busy": 1, "last_heartbeat_ms": 99,
                "resource": {
                    "scheduler": "cpu", "command": "downclock", "allowed": 1, "active": 1,
                    "suspended": 1, "running": 2, "fuel_rate": 5e8, "level": 0.5,
                    "cpu": 0.75, "fuel_granted": 7,
                },
            })
        );
        assert_eq!(v[1]["busy"], 0);
        assert_eq!(v[1]["resource"], Value::Null);
        assert_eq!(v[1]["up"], false);
    }

    #[test]
    fn node_table_shows_roles_and_labels() {
        let t = nodes_table(&resp());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID"));
        assert!(lines[1].contains("scheduler,worker") && lines[1].contains("zone=a"));
        assert!(lines[1].contains("cpu:downclock") && lines[1].contains("1/1"));
        assert!(lines[1].contains("75%") && lines[1].contains("5.000e8/s"));
        assert!(lines[2].contains("down") && lines[2].contains("background"));
    }
}
