//! The public `Stoker` gRPC service: modules, tasks, nodes, and the
//! worker-facing heartbeat and assignment calls. Any scheduler node serves
//! it; every write is a replicated command (followers forward it to the
//! leader), reads are linearizable unless they only feed a long poll.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use stoker_proto::api::stoker_server::Stoker;
use stoker_proto::api::{
    control_task_request, ControlTaskRequest, ControlTaskResponse, GetModuleRequest,
    GetModuleResponse, GetTaskRequest, GetTaskResponse, HeartbeatRequest, HeartbeatResponse,
    ListModulesRequest, ListModulesResponse, ListNodesRequest, ListNodesResponse, ListTasksRequest,
    ListTasksResponse, ModifyTaskRequest, ModifyTaskResponse, StateCount, StepInfo,
    SubmitTaskRequest, SubmitTaskResponse, UploadModuleRequest, UploadModuleResponse,
};
use stoker_proto::api::{
    CreateTenantRequest, CreateTenantResponse, CreateTokenRequest, CreateTokenResponse,
    DeleteModuleRequest, DeleteModuleResponse, ListTenantsRequest, ListTenantsResponse,
    ListTokensRequest, ListTokensResponse, RevokeTokenRequest, RevokeTokenResponse,
    SetTenantRequest, SetTenantResponse,
};
use stoker_proto::meta::command::Kind as C;
use stoker_proto::meta::command_result::Kind as R;
use stoker_proto::meta::{
    change_subtasks, ChangeSubtasks, Command, CommandResult, CommitModule, ModifyTask,
    PutModuleChunk, SetTaskState, SubmitTask,
};
use tonic::{Code, Request, Response, Status, Streaming};

use super::auth::{Authenticator, Caller};
use super::meta::to_status;
use super::workers;
use crate::blob::BlobStore;
use crate::meta::queries::{self, TaskFilter};
use crate::meta::records::{MAX_CHUNK_BYTES, MAX_INLINE_BYTES, MAX_MODULE_BYTES};
use crate::meta::{now_ms, MetaError, MetaNode, RequestId};
use crate::model::{SubtaskState, TaskState};
use crate::sandbox::{Sandbox, ABI_VERSION};
use crate::sched::task::StepCounts;

/// A rejected command as a gRPC status whose code says why.
pub fn rejection_status(message: &str) -> Status {
    let code = if message.contains(" not found") {
        Code::NotFound
    } else if message.starts_with("quota exceeded") {
        Code::ResourceExhausted
    } else if message.contains(" already exists") {
        Code::AlreadyExists
    } else if message.starts_with("illegal ") || message.contains(" is used by unfinished task") {
        Code::FailedPrecondition
    } else if message.starts_with("stale report") {
        Code::Aborted
    } else {
        Code::InvalidArgument
    };
    Status::new(code, message.to_string())
}

/// The outcome of a proposal: its result, or the rejection as a status.
pub fn accepted(result: CommandResult) -> Result<Option<R>, Status> {
    if result.error.is_empty() {
        Ok(result.kind)
    } else {
        Err(rejection_status(&result.error))
    }
}

/// The `Stoker` service of one node.
pub struct StokerService {
    node: MetaNode,
    /// Validates uploaded modules (compiles them once, which also warms
    /// this node's cache for planning).
    sandbox: Arc<Sandbox>,
    heartbeat_interval: Duration,
    pub(super) auth: Authenticator,
    /// Where subtask logs are read from and large inputs are kept.
    blobs: BlobStore,
    /// What this node's owner loop publishes of its coordinator.
    pub(super) board: crate::sched::coordinator::Board,
    /// A channel to the owner when it is another node: (its address, the
    /// channel), reused by the calls passed on to it.
    pub(super) owner_channel: std::sync::Mutex<Option<(String, tonic::transport::Channel)>>,
}

impl StokerService {
    /// Serves `node`'s API; `auth` decides who a request comes from.
    pub fn new(
        node: MetaNode,
        sandbox: Arc<Sandbox>,
        heartbeat_interval: Duration,
        auth: Authenticator,
        blobs: BlobStore,
    ) -> Self {
        StokerService {
            node,
            sandbox,
            heartbeat_interval,
            auth,
            blobs,
            board: Default::default(),
            owner_channel: Default::default(),
        }
    }

    /// Shares the owner loop's coordinator board (`scheduler list`,
    /// `operator list`).
    pub fn with_board(mut self, board: crate::sched::coordinator::Board) -> Self {
        self.board = board;
        self
    }

    /// Keeps an input over the inline limit in the tenant's blob space
    /// (`inputs/<request id>`, so a retried submit rewrites the same blob);
    /// returns the inline input and the blob key, one of them empty.
    async fn stage_input(
        &self,
        tenant: &str,
        input: Vec<u8>,
        rid: Option<RequestId>,
    ) -> Result<(Vec<u8>, String), Status> {
        if input.len() <= MAX_INLINE_BYTES {
            return Ok((input, String::new()));
        }
        let id = rid.unwrap_or_else(RequestId::random);
        let key = format!("inputs/{}", hex(&id.0));
        let size = input.len();
        self.blobs
            .tenant(tenant)
            .map_err(|e| Status::internal(e.to_string()))?
            .put(&key, Bytes::from(input))
            .await
            .map_err(|e| {
                Status::unavailable(format!("cannot store the {size}-byte input as a blob: {e}"))
            })?;
        Ok((Vec::new(), key))
    }

    /// The cluster's blob store.
    pub(super) fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// The metadata node it serves.
    pub(super) fn node(&self) -> &MetaNode {
        &self.node
    }

    /// Who sent `request` (see [`Authenticator::caller`]).
    ///
    /// # Errors
    /// `Unauthenticated` for a missing, unknown or revoked token.
    pub(super) fn caller<T>(
        &self,
        request: &Request<T>,
    ) -> impl std::future::Future<Output = Result<Caller, Status>> + Send + '_ {
        let token = self.auth.token_of(request.metadata());
        self.auth.caller(&self.node, token)
    }

    pub(super) async fn propose(
        &self,
        kind: C,
        request_id: Option<RequestId>,
    ) -> Result<Option<R>, Status> {
        let cmd = Command { kind: Some(kind) };
        let result = match request_id {
            Some(id) => self.node.propose_with_id(cmd, id).await,
            None => self.node.propose(cmd).await,
        };
        accepted(result.map_err(to_status)?)
    }

    pub(super) async fn read<T>(
        &self,
        f: impl FnOnce(&std::path::Path, &redb::ReadTransaction) -> Result<T, MetaError>,
    ) -> Result<T, Status> {
        self.node.read_barrier().await.map_err(to_status)?;
        self.node.read_local(f).map(|(v, _)| v).map_err(to_status)
    }

    /// The state of a task the caller may see (`NotFound` for another
    /// tenant's, exactly as for a missing one).
    async fn task_state(&self, caller: &Caller, id: u64) -> Result<String, Status> {
        self.read(|p, t| queries::task(p, t, id))
            .await?
            .filter(|t| caller.sees(&t.tenant))
            .map(|t| t.state)
            .ok_or_else(|| Status::not_found(format!("task {id} not found")))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn request_id(bytes: &[u8]) -> Result<Option<RequestId>, Status> {
    if bytes.is_empty() {
        return Ok(None);
    }
    RequestId::from_bytes(bytes)
        .map(Some)
        .ok_or_else(|| Status::invalid_argument("request_id must be 16 bytes"))
}

fn set_state(id: u64, state: TaskState) -> C {
    C::SetTaskState(SetTaskState {
        id,
        state: state.to_string(),
        error: String::new(),
    })
}

#[tonic::async_trait]
impl Stoker for StokerService {
    type WatchTaskStream = super::watch::TaskEvents;

    async fn upload_module(
        &self,
        request: Request<Streaming<UploadModuleRequest>>,
    ) -> Result<Response<UploadModuleResponse>, Status> {
        let caller = self.caller(&request).await?;
        let mut stream = request.into_inner();
        let (mut name, mut tag, mut bytes) = (String::new(), String::new(), Vec::new());
        let mut first = true;
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            if first {
                (name, tag) = (msg.name, msg.tag);
                first = false;
            }
            if bytes.len() + msg.data.len() > MAX_MODULE_BYTES {
                return Err(Status::invalid_argument(format!(
                    "module exceeds {MAX_MODULE_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&msg.data);
        }
        if name.is_empty() {
            return Err(Status::invalid_argument("a module upload needs a name"));
        }
        if bytes.is_empty() {
            return Err(Status::invalid_argument("the module is empty"));
        }
        // Refuse what no worker could run, with the sandbox's reason.
        let module = self
            .sandbox
            .load(&bytes)
            .await
            .map_err(|e| Status::invalid_argument(format!("invalid module: {e}")))?;
        let hash = module.hash.clone();
        self.check_module_quota(&caller.tenant, &hash, bytes.len() as u64)
            .await?;
        let chunks: Vec<&[u8]> = bytes.chunks(MAX_CHUNK_BYTES).collect();
        for (index, data) in chunks.iter().enumerate() {
            self.propose(
                C::PutModuleChunk(PutModuleChunk {
                    hash: hash.clone(),
                    index: index as u32,
                    data: data.to_vec(),
                    time_ms: now_ms(),
                }),
                None,
            )
            .await?;
        }
        let created = match self
            .propose(
                C::CommitModule(CommitModule {
                    hash: hash.clone(),
                    tenant: caller.tenant.clone(),
                    name,
                    tag,
                    abi_version: ABI_VERSION,
                    upload_time_ms: now_ms(),
                    chunks: chunks.len() as u32,
                }),
                None,
            )
            .await?
        {
            Some(R::CommitModule(r)) => r.created,
            other => return Err(Status::internal(format!("unexpected result {other:?}"))),
        };
        let record = self
            .read(|p, t| queries::module(p, t, &caller.tenant, &hash))
            .await?
            .ok_or_else(|| Status::internal(format!("module {hash} vanished after commit")))?;
        Ok(Response::new(UploadModuleResponse {
            module: Some(record),
            created,
        }))
    }

    async fn list_modules(
        &self,
        request: Request<ListModulesRequest>,
    ) -> Result<Response<ListModulesResponse>, Status> {
        let caller = self.caller(&request).await?;
        let scope = caller.scope(&request.get_ref().tenant);
        let modules = self
            .read(|p, t| queries::modules(p, t, scope.as_deref()))
            .await?;
        Ok(Response::new(ListModulesResponse { modules }))
    }

    async fn get_module(
        &self,
        request: Request<GetModuleRequest>,
    ) -> Result<Response<GetModuleResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let scope = caller.scope(&req.tenant);
        // Modules never change once committed: a local read that finds one
        // is as good as a linearizable one.
        let find = |p: &std::path::Path, t: &redb::ReadTransaction| {
            let Some(m) = queries::find_module(p, t, scope.as_deref(), &req.module, &req.tag)?
            else {
                return Ok(None);
            };
            let data = if req.with_bytes {
                queries::module_bytes(p, t, &m.hash)?.unwrap_or_default()
            } else {
                Vec::new()
            };
            Ok(Some((m, data)))
        };
        let found = match self.node.read_local(find).map_err(to_status)?.0 {
            Some(v) => Some(v),
            None => self.read(find).await?,
        };
        let (module, data) =
            found.ok_or_else(|| Status::not_found(format!("module {} not found", req.module)))?;
        Ok(Response::new(GetModuleResponse {
            module: Some(module),
            data,
        }))
    }

    async fn submit_task(
        &self,
        request: Request<SubmitTaskRequest>,
    ) -> Result<Response<SubmitTaskResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let rid = request_id(&req.request_id)?;
        let module = self
            .read(|p, t| {
                queries::find_module(p, t, Some(&caller.tenant), &req.module, &req.module_tag)
            })
            .await?
            .ok_or_else(|| Status::not_found(format!("module {} not found", req.module)))?;
        let size = req.input.len() as u64;
        let (input, input_blob) = self.stage_input(&caller.tenant, req.input, rid).await?;
        let staged = (!input_blob.is_empty()).then(|| input_blob.clone());
        let input_blob_size = if input_blob.is_empty() { 0 } else { size };
        let cmd = C::SubmitTask(SubmitTask {
            tenant: caller.tenant.clone(),
            key: req.key,
            module_hash: module.hash,
            input,
            input_blob,
            input_blob_size,
            priority: req.priority,
            create_time_ms: now_ms(),
            concurrency: req.concurrency.max(1),
            max_nodes: req.max_nodes,
            scope: req.scope,
            selector: req.selector,
            fuel_limit: req.fuel_limit,
            memory_limit: req.memory_limit,
            max_attempts: req.max_attempts,
            manual_recovery: req.manual_recovery,
        });
        let submitted = self.propose(cmd, rid).await;
        if let (Err(status), Some(key)) = (&submitted, staged) {
            // Refused for good: nothing refers to the staged input. (A
            // timeout may still commit, so its blob stays.)
            if matches!(
                status.code(),
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::ResourceExhausted
            ) {
                if let Ok(blobs) = self.blobs.tenant(&caller.tenant) {
                    let _ = blobs.delete(&key).await;
                }
            }
        }
        match submitted? {
            Some(R::SubmitTask(r)) => Ok(Response::new(SubmitTaskResponse { id: r.id })),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    async fn get_task(
        &self,
        request: Request<GetTaskRequest>,
    ) -> Result<Response<GetTaskResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let id = req.id;
        let found = self
            .read(|p, t| {
                let Some(task) = queries::task(p, t, id)?.filter(|t| caller.sees(&t.tenant)) else {
                    return Ok(None);
                };
                let mut steps = Vec::new();
                let mut subtasks = Vec::new();
                if task.started {
                    for step in 0..=task.step {
                        let counts = queries::step_counts(p, t, id, step)?;
                        steps.push(StepInfo {
                            step,
                            counts: state_counts(&counts),
                        });
                        if req.with_subtasks {
                            let (list, _) = queries::step_subtasks(p, t, id, step)?;
                            subtasks.extend(list.into_iter().map(|mut s| {
                                s.payload.clear();
                                s.output.clear();
                                s.checkpoint.clear();
                                s
                            }));
                        }
                    }
                }
                Ok(Some(GetTaskResponse {
                    task: Some(task),
                    steps,
                    subtasks,
                }))
            })
            .await?;
        found
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("task {id} not found")))
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let states = req
            .states
            .iter()
            .map(|s| s.parse::<TaskState>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(Status::invalid_argument)?;
        let filter = TaskFilter {
            states,
            include_finished: req.include_finished,
            limit: req.limit as usize,
            tenant: caller.scope(&req.tenant),
            after_id: req.after_id,
        };
        let mut tasks = self.read(|p, t| queries::list_tasks(p, t, &filter)).await?;
        for t in &mut tasks {
            t.result.clear();
        }
        Ok(Response::new(ListTasksResponse { tasks }))
    }

    async fn control_task(
        &self,
        request: Request<ControlTaskRequest>,
    ) -> Result<Response<ControlTaskResponse>, Status> {
        use control_task_request::Action;
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let action = Action::try_from(req.action)
            .map_err(|_| Status::invalid_argument(format!("unknown action {}", req.action)))?;
        let id = req.id;
        // Another tenant's task is refused before anything is proposed.
        let state = self.task_state(&caller, id).await?;
        match action {
            Action::Cancel => {
                self.propose(set_state(id, TaskState::Cancelling), None)
                    .await?;
            }
            Action::Pause => {
                self.propose(set_state(id, TaskState::Pausing), None)
                    .await?;
            }
            Action::Resume => {
                self.propose(set_state(id, TaskState::Resuming), None)
                    .await?;
            }
            Action::Resolve => {
                if state != TaskState::AwaitingResolution.as_str() {
                    return Err(Status::failed_precondition(format!(
                        "task {id} is {state}; only an awaiting-resolution task is resolved"
                    )));
                }
                // Failed subtasks go back to pending first, so the running
                // task does not see them failed again.
                self.propose(
                    C::ChangeSubtasks(ChangeSubtasks {
                        task_id: id,
                        kind: change_subtasks::Kind::Resolve as i32,
                        include_running: false,
                        time_ms: now_ms(),
                    }),
                    None,
                )
                .await?;
                self.propose(set_state(id, TaskState::Running), None)
                    .await?;
            }
        }
        let state = self.task_state(&caller, id).await?;
        Ok(Response::new(ControlTaskResponse { state }))
    }

    async fn modify_task(
        &self,
        request: Request<ModifyTaskRequest>,
    ) -> Result<Response<ModifyTaskResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        self.task_state(&caller, req.id).await?;
        self.propose(
            C::ModifyTask(ModifyTask {
                id: req.id,
                modification: req.modification,
            }),
            None,
        )
        .await?;
        let state = self.task_state(&caller, req.id).await?;
        Ok(Response::new(ModifyTaskResponse { state }))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.caller(&request).await?;
        let (nodes, busy) = self
            .read(|p, t| {
                let nodes = queries::node_records(p, t)?;
                let mut busy = Vec::with_capacity(nodes.len());
                for n in &nodes {
                    busy.push(queries::node_subtasks(p, t, n.id)?.len() as u32);
                }
                Ok((nodes, busy))
            })
            .await?;
        Ok(Response::new(ListNodesResponse { nodes, busy }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.caller(&request)
            .await?
            .require_admin("a worker heartbeat")?;
        let token = self.auth.token_of(request.metadata())?;
        let req = request.into_inner();
        if !req.forwarded {
            if let Some(reply) = self.heartbeat_at_owner(&req, token.as_deref()).await {
                return Ok(Response::new(reply));
            }
        }
        workers::heartbeat(&self.node, req, self.heartbeat_interval, &self.board)
            .await
            .map(Response::new)
    }

    async fn assignments(
        &self,
        request: Request<stoker_proto::api::AssignmentsRequest>,
    ) -> Result<Response<stoker_proto::api::AssignmentsResponse>, Status> {
        self.caller(&request)
            .await?
            .require_admin("polling assignments")?;
        workers::assignments(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        self.do_create_tenant(request).await
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        self.do_list_tenants(request).await
    }

    async fn set_tenant(
        &self,
        request: Request<SetTenantRequest>,
    ) -> Result<Response<SetTenantResponse>, Status> {
        self.do_set_tenant(request).await
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        self.do_create_token(request).await
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        self.do_revoke_token(request).await
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        self.do_list_tokens(request).await
    }

    async fn delete_module(
        &self,
        request: Request<DeleteModuleRequest>,
    ) -> Result<Response<DeleteModuleResponse>, Status> {
        self.do_delete_module(request).await
    }

    async fn watch_task(
        &self,
        request: Request<stoker_proto::api::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        self.do_watch_task(request).await
    }

    async fn get_subtask_log(
        &self,
        request: Request<stoker_proto::api::GetSubtaskLogRequest>,
    ) -> Result<Response<stoker_proto::api::GetSubtaskLogResponse>, Status> {
        self.do_get_subtask_log(request).await
    }

    async fn apply_rules(
        &self,
        request: Request<stoker_proto::api::ApplyRulesRequest>,
    ) -> Result<Response<stoker_proto::api::ApplyRulesResponse>, Status> {
        self.apply_rules_impl(request).await
    }

    async fn show_rules(
        &self,
        request: Request<stoker_proto::api::ShowRulesRequest>,
    ) -> Result<Response<stoker_proto::api::ShowRulesResponse>, Status> {
        self.show_rules_impl(request).await
    }

    async fn list_schedulers(
        &self,
        request: Request<stoker_proto::api::ListSchedulersRequest>,
    ) -> Result<Response<stoker_proto::api::ListSchedulersResponse>, Status> {
        self.list_schedulers_impl(request).await
    }

    async fn control_scheduler(
        &self,
        request: Request<stoker_proto::api::ControlSchedulerRequest>,
    ) -> Result<Response<stoker_proto::api::ControlSchedulerResponse>, Status> {
        self.control_scheduler_impl(request).await
    }

    async fn list_operators(
        &self,
        request: Request<stoker_proto::api::ListOperatorsRequest>,
    ) -> Result<Response<stoker_proto::api::ListOperatorsResponse>, Status> {
        self.list_operators_impl(request).await
    }
}

/// Counts by state in the state machine's order, zero counts left out.
pub fn state_counts(counts: &StepCounts) -> Vec<StateCount> {
    SubtaskState::ALL
        .iter()
        .filter_map(|s| {
            let n = counts.get(*s);
            (n > 0).then(|| StateCount {
                state: s.to_string(),
                count: n,
            })
        })
        .collect()
}
