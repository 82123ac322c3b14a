//! `stoker cluster status|add|remove|transfer-leader`.

use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use stoker_proto::meta::membership_request::Kind as MemberKind;
use stoker_proto::meta::{MembershipRequest, StatusRequest, StatusResponse, TransferLeaderRequest};

use super::{Endpoint, Output};

#[derive(Debug, clap::Subcommand)]
pub(super) enum ClusterCommand {
    /// Leader, term, members and every node's commit and applied index.
    Status {
        #[command(flatten)]
        endpoint: Endpoint,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Add a node (started with `stoker server --join`) as voter or learner.
    Add {
        #[arg(long)]
        id: u64,
        /// The new node's gRPC address.
        #[arg(long)]
        addr: String,
        /// Add as a non-voting learner.
        #[arg(long)]
        learner: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Remove a node from the cluster.
    Remove {
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Hand leadership to a node.
    TransferLeader {
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Debug, Serialize)]
struct NodeView {
    id: u64,
    addr: String,
    learner: bool,
    reachable: bool,
    role: Option<String>,
    term: Option<u64>,
    commit_index: Option<u64>,
    applied_index: Option<u64>,
    /// Replicated index as the leader sees it.
    matched: u64,
}

#[derive(Debug, Serialize)]
struct ClusterView {
    leader_id: Option<u64>,
    term: u64,
    members: Vec<NodeView>,
}

async fn node_status(addr: &str, token: Option<&str>) -> Option<StatusResponse> {
    let mut client =
        stoker::api::meta::connect_meta_with(addr, Duration::from_secs(2), token).ok()?;
    client
        .status(StatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

pub(super) async fn run(cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    run_inner(cmd).await.map(|()| ExitCode::SUCCESS)
}

async fn run_inner(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status { endpoint, output } => {
            let first = endpoint
                .client()?
                .status(StatusRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("status failed: {}", s.message()))?
                .into_inner();
            // Ask the leader for replication progress when it is known.
            let leader = match first.leader_id {
                0 => None,
                l if l == first.id => Some(first.clone()),
                l => match first.members.iter().find(|m| m.id == l) {
                    Some(m) => node_status(&m.addr, endpoint.token.as_deref()).await,
                    None => None,
                },
            };
            let base = leader.clone().unwrap_or_else(|| first.clone());
            let mut members = Vec::new();
            for m in &base.members {
                let s = node_status(&m.addr, endpoint.token.as_deref()).await;
                members.push(NodeView {
                    id: m.id,
                    addr: m.addr.clone(),
                    learner: m.learner,
                    reachable: s.is_some(),
                    role: s.as_ref().map(|s| s.role.clone()),
                    term: s.as_ref().map(|s| s.term),
                    commit_index: s.as_ref().map(|s| s.commit_index),
                    applied_index: s.as_ref().map(|s| s.applied_index),
                    matched: m.matched,
                });
            }
            let view = ClusterView {
                leader_id: (base.leader_id != 0).then_some(base.leader_id),
                term: base.term,
                members,
            };
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&view)?),
                Output::Text => {
                    println!("leader: {:?}  term: {}", view.leader_id, view.term);
                    for m in &view.members {
                        println!(
                            "  {} {} {}{} commit={} applied={}",
                            m.id,
                            m.addr,
                            m.role.as_deref().unwrap_or("unreachable"),
                            if m.learner { " (learner)" } else { "" },
                            m.commit_index.map_or("-".into(), |v| v.to_string()),
                            m.applied_index.map_or("-".into(), |v| v.to_string()),
                        );
                    }
                }
            }
            Ok(())
        }
        ClusterCommand::Add {
            id,
            addr,
            learner,
            endpoint,
        } => {
            let kind = if learner {
                MemberKind::AddLearner
            } else {
                MemberKind::AddVoter
            };
            membership(&endpoint, kind, id, addr).await
        }
        ClusterCommand::Remove { id, endpoint } => {
            membership(&endpoint, MemberKind::Remove, id, String::new()).await
        }
        ClusterCommand::TransferLeader { id, endpoint } => {
            endpoint
                .client()?
                .transfer_leader(TransferLeaderRequest { id })
                .await
                .map_err(|s| anyhow::anyhow!("transfer leader failed: {}", s.message()))?;
            println!("leader is now {id}");
            Ok(())
        }
    }
}

async fn membership(
    endpoint: &Endpoint,
    kind: MemberKind,
    id: u64,
    addr: String,
) -> anyhow::Result<()> {
    let resp = endpoint
        .client()?
        .change_membership(MembershipRequest {
            kind: kind as i32,
            id,
            addr,
        })
        .await
        .map_err(|s| anyhow::anyhow!("membership change failed: {}", s.message()))?
        .into_inner();
    for m in resp.members {
        println!(
            "{} {}{}",
            m.id,
            m.addr,
            if m.learner { " (learner)" } else { "" }
        );
    }
    Ok(())
}
