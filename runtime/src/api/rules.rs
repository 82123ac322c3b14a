//! The `Stoker` handlers of placement rules and the coordinator: apply and
//! show rules, list and steer schedulers, list operators. They are admin
//! operations: each handler first checks that the caller holds the admin
//! token (any caller is the admin of an open cluster).
//!
//! Rules are parsed and validated here, then replicated as one `SetRules`
//! command that the state machine validates again, so a rejected file never
//! changes the rules in force. Scheduler states and operator limits are
//! entries of the replicated cluster config; operators live in the owner's
//! memory, so a node that is not the owner asks the owner for them (and
//! passes worker heartbeats on to it, whose replies carry operator steps).

use std::collections::{BTreeMap, BTreeSet};

use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::api::{
    control_scheduler_request, ApplyRulesRequest, ApplyRulesResponse, ControlSchedulerRequest,
    ControlSchedulerResponse, HeartbeatRequest, HeartbeatResponse, ListOperatorsRequest,
    ListOperatorsResponse, ListSchedulersRequest, ListSchedulersResponse, OperatorInfo, RuleInfo,
    SchedulerInfo, ShowRulesRequest, ShowRulesResponse,
};
use stoker_proto::meta::command::Kind as C;
use stoker_proto::meta::{SetConfig, SetRules};
use tonic::{Request, Response, Status};

use super::auth::{AuthChannel, Bearer};
use super::meta::{channel, to_status, MAX_API_MESSAGE};
use super::service::StokerService;
use crate::meta::{now_ms, queries, MetaError};
use crate::model::{SubtaskState, TaskState};
use crate::sched::coordinator::{
    self, Operator, Published, CHECKERS, SCHEDULERS, SCHEDULER_KEY_PREFIX,
};
use crate::sched::rules::{self, Rule, StatusView, TaskKey};

/// How long a heartbeat passed on to the owner may take before this node
/// answers it itself (without operator steps).
const HEARTBEAT_FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A task as `rules show` needs it: key, tenant, subtasks waiting to run
/// (unassigned, or queued on a node).
struct Waiting {
    key: String,
    tenant: String,
    waiting: u32,
}

impl StokerService {
    pub(super) async fn apply_rules_impl(
        &self,
        request: Request<ApplyRulesRequest>,
    ) -> Result<Response<ApplyRulesResponse>, Status> {
        self.caller(&request)
            .await?
            .require_admin("changing placement rules")?;
        let source = request.into_inner().source;
        let parsed = rules::parse(&source).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let count = parsed.len() as u32;
        let cmd = C::SetRules(SetRules {
            rules: parsed.iter().map(Rule::to_record).collect(),
            source,
            time_ms: now_ms(),
        });
        let result = self
            .node()
            .propose(stoker_proto::meta::Command { kind: Some(cmd) })
            .await
            .map_err(to_status)?;
        if !result.error.is_empty() {
            return Err(Status::invalid_argument(result.error));
        }
        Ok(Response::new(ApplyRulesResponse { count }))
    }

    pub(super) async fn show_rules_impl(
        &self,
        request: Request<ShowRulesRequest>,
    ) -> Result<Response<ShowRulesResponse>, Status> {
        self.caller(&request)
            .await?
            .require_admin("reading placement rules")?;
        let node = self.node();
        node.read_barrier().await.map_err(to_status)?;
        let ((set, records, used, tasks), _) = node
            .read_local(|p, t| {
                let set = crate::meta::rules::rule_set(p, t)?;
                let records = queries::node_records(p, t)?;
                // Slots in use are running subtasks: queued ones wait for
                // room like unassigned ones.
                let running = SubtaskState::Running.as_str();
                let mut used = BTreeMap::new();
                for n in &records {
                    let on = queries::node_subtasks(p, t, n.id)?;
                    let busy = on.iter().filter(|s| s.state == running).count();
                    used.insert(n.id, busy as u32);
                }
                let mut tasks = Vec::new();
                for task in queries::list_tasks(p, t, &queries::TaskFilter::default())? {
                    let accepts = task
                        .state
                        .parse::<TaskState>()
                        .is_ok_and(|s| s.accepts_work(task.modifying_from.parse().ok()));
                    if !accepts || !task.started {
                        continue;
                    }
                    // Pending: unassigned, or queued on a node.
                    let waiting = queries::step_counts(p, t, task.id, task.step)?
                        .0
                        .get(&SubtaskState::Pending)
                        .copied()
                        .unwrap_or(0);
                    tasks.push(Waiting {
                        key: task.key,
                        tenant: task.tenant,
                        waiting,
                    });
                }
                Ok::<_, MetaError>((set, records, used, tasks))
            })
            .map_err(to_status)?;
        let nodes: Vec<_> = records.iter().map(queries::node_view).collect();
        let view = StatusView {
            nodes: &nodes,
            used,
            tasks: tasks
                .iter()
                .map(|t| TaskKey {
                    key: &t.key,
                    tenant: &t.tenant,
                    waiting: t.waiting,
                })
                .collect(),
            leader: node.leader_watch().borrow().leader_id,
            schedulers: records
                .iter()
                .filter(|n| n.scheduler && n.up)
                .map(|n| n.id)
                .collect::<BTreeSet<_>>(),
        };
        let now = now_ms();
        let mut out = Vec::with_capacity(set.rules.len());
        for record in set.rules {
            let rule = Rule::from_record(&record).map_err(|e| Status::internal(e.to_string()))?;
            let status = rules::status(&rule, &view, now);
            out.push(RuleInfo {
                nodes: rules::matching_nodes(&rule, &nodes),
                status: status.name().into(),
                reason: status.reason().into(),
                rule: Some(record),
            });
        }
        Ok(Response::new(ShowRulesResponse {
            rules: out,
            source: set.source,
            time_ms: set.time_ms,
        }))
    }

    pub(super) async fn list_schedulers_impl(
        &self,
        request: Request<ListSchedulersRequest>,
    ) -> Result<Response<ListSchedulersResponse>, Status> {
        let (published, me, token) = self
            .coordinator_board(&request, "listing the coordinator's schedulers")
            .await?;
        if published.owner {
            return Ok(Response::new(ListSchedulersResponse {
                schedulers: published
                    .schedulers
                    .into_iter()
                    .map(|s| SchedulerInfo {
                        name: s.name.into(),
                        state: s.state.into(),
                        interval_ms: s.interval.as_millis() as u64,
                        operators: s.operators,
                        checker: s.checker,
                    })
                    .collect(),
                node: me,
                owner: true,
            }));
        }
        if let Some(mut owner) = self.owner_client(token.as_deref()).await? {
            return owner
                .list_schedulers(ListSchedulersRequest {})
                .await
                .map(|r| Response::new(r.into_inner()));
        }
        // No reachable owner: the replicated states, without run figures.
        let config = self.config().await?;
        let checkers = CHECKERS.iter().map(|n| SchedulerInfo {
            name: (*n).into(),
            state: "running".into(),
            interval_ms: 0,
            operators: 0,
            checker: true,
        });
        let schedulers = SCHEDULERS.iter().map(|n| SchedulerInfo {
            name: (*n).into(),
            state: coordinator::scheduler_state(&config, n).into(),
            interval_ms: 0,
            operators: 0,
            checker: false,
        });
        Ok(Response::new(ListSchedulersResponse {
            schedulers: checkers.chain(schedulers).collect(),
            node: me,
            owner: false,
        }))
    }

    pub(super) async fn control_scheduler_impl(
        &self,
        request: Request<ControlSchedulerRequest>,
    ) -> Result<Response<ControlSchedulerResponse>, Status> {
        use control_scheduler_request::Action;
        self.caller(&request)
            .await?
            .require_admin("steering the coordinator")?;
        let req = request.into_inner();
        if CHECKERS.contains(&req.name.as_str()) {
            return Err(Status::failed_precondition(format!(
                "{} is a checker: checkers run every round and are not paused, added or removed",
                req.name
            )));
        }
        if coordinator::new_scheduler(&req.name).is_none() {
            return Err(Status::not_found(format!(
                "scheduler {:?} not found; the built-in schedulers are: {}",
                req.name,
                SCHEDULERS.join(", ")
            )));
        }
        let config = self.config().await?;
        let current = coordinator::scheduler_state(&config, &req.name);
        let action = Action::try_from(req.action)
            .map_err(|_| Status::invalid_argument(format!("unknown action {}", req.action)))?;
        let next = match (action, current) {
            (Action::Add, "removed") => "running",
            (Action::Add, _) => {
                return Err(Status::already_exists(format!(
                    "scheduler {} is already added ({current})",
                    req.name
                )))
            }
            (Action::Remove, _) => "removed",
            (Action::Pause | Action::Resume, "removed") => {
                return Err(Status::failed_precondition(format!(
                    "scheduler {} is removed; add it first",
                    req.name
                )))
            }
            (Action::Pause, _) => "paused",
            (Action::Resume, _) => "running",
        };
        let cmd = C::SetConfig(SetConfig {
            key: format!("{SCHEDULER_KEY_PREFIX}{}", req.name),
            value: next.into(),
        });
        let result = self
            .node()
            .propose(stoker_proto::meta::Command { kind: Some(cmd) })
            .await
            .map_err(to_status)?;
        if !result.error.is_empty() {
            return Err(Status::invalid_argument(result.error));
        }
        Ok(Response::new(ControlSchedulerResponse {
            state: next.into(),
        }))
    }

    pub(super) async fn list_operators_impl(
        &self,
        request: Request<ListOperatorsRequest>,
    ) -> Result<Response<ListOperatorsResponse>, Status> {
        let (published, me, token) = self
            .coordinator_board(&request, "listing the coordinator's operators")
            .await?;
        if published.owner {
            return Ok(Response::new(ListOperatorsResponse {
                operators: published.operators.iter().map(operator_info).collect(),
                recent: published.recent.iter().map(operator_info).collect(),
                node: me,
                owner: true,
            }));
        }
        match self.owner_client(token.as_deref()).await? {
            Some(mut owner) => owner
                .list_operators(ListOperatorsRequest {})
                .await
                .map(|r| Response::new(r.into_inner())),
            None => Err(Status::unavailable(
                "no owner is known: operators live on the owner",
            )),
        }
    }

    /// An admin's look at the coordinator, for `what`: this node's
    /// published board, its id, and the caller's token (to forward the
    /// request to the owner when this node is not it).
    async fn coordinator_board<T>(
        &self,
        request: &Request<T>,
        what: &str,
    ) -> Result<(Published, u64, Option<String>), Status> {
        self.caller(request).await?.require_admin(what)?;
        let token = self.forwarded_token(request)?;
        let published = self.board.lock().expect("board lock").clone();
        Ok((published, self.node().id(), token))
    }

    /// The caller's token, to forward with its request to the owner (which
    /// checks it again).
    fn forwarded_token<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        self.auth.token_of(request.metadata())
    }

    /// A client of the owner when it is another node (and known), carrying
    /// `token`. The channel to it is kept for the next calls.
    async fn owner_client(
        &self,
        token: Option<&str>,
    ) -> Result<Option<StokerClient<AuthChannel>>, Status> {
        let node = self.node();
        let Some(leader) = node.leader_watch().borrow().leader_id else {
            return Ok(None);
        };
        if leader == node.id() {
            return Ok(None);
        }
        let members = node.storage().members().map_err(to_status)?;
        let Some((_, addr)) = members.into_iter().find(|(id, _)| *id == leader) else {
            return Ok(None);
        };
        let channel = {
            let mut cached = self.owner_channel.lock().expect("owner channel lock");
            match cached.as_ref().filter(|(a, _)| *a == addr) {
                Some((_, c)) => c.clone(),
                None => {
                    let c =
                        channel(&addr, std::time::Duration::from_secs(10)).map_err(to_status)?;
                    *cached = Some((addr, c.clone()));
                    c
                }
            }
        };
        let bearer = Bearer::new(token).map_err(Status::invalid_argument)?;
        Ok(Some(
            StokerClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(MAX_API_MESSAGE)
                .max_encoding_message_size(MAX_API_MESSAGE),
        ))
    }

    /// Passes a worker's heartbeat on to the owner, whose reply carries the
    /// operator steps for the node (only the owner has its operators).
    /// `None` when this node owns the cluster, or no owner answered in
    /// time: this node answers it then.
    pub(super) async fn heartbeat_at_owner(
        &self,
        req: &HeartbeatRequest,
        token: Option<&str>,
    ) -> Option<HeartbeatResponse> {
        if self.board.lock().expect("board lock").owner {
            return None;
        }
        let mut owner = self.owner_client(token).await.ok().flatten()?;
        let mut forwarded = tonic::Request::new(HeartbeatRequest {
            forwarded: true,
            ..req.clone()
        });
        forwarded.set_timeout(HEARTBEAT_FORWARD_TIMEOUT);
        match owner.heartbeat(forwarded).await {
            Ok(r) => Some(r.into_inner()),
            Err(s) => {
                tracing::debug!(error = %s.message(), "heartbeat not passed on to the owner");
                None
            }
        }
    }

    async fn config(&self) -> Result<BTreeMap<String, String>, Status> {
        let node = self.node();
        node.read_barrier().await.map_err(to_status)?;
        node.read_local(crate::meta::rules::cluster_config)
            .map(|(c, _)| c)
            .map_err(to_status)
    }
}

fn operator_info(o: &Operator) -> OperatorInfo {
    OperatorInfo {
        id: o.id,
        kind: o.kind.as_str().into(),
        source: o.source.into(),
        priority: o.priority,
        steps: o.steps.iter().map(|s| s.to_string()).collect(),
        created_ms: o.created_ms,
        deadline_ms: o.deadline_ms,
        state: o.state.as_str().into(),
        reports: o.reports.iter().map(|r| r.to_string()).collect(),
        confirmed_by: o.confirmed_by.map(|c| c.to_string()).unwrap_or_default(),
    }
}
