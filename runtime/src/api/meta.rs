//! The client-facing `Meta` gRPC service, the forwarder that sends
//! leader-only requests to the leader, and the one mapping between
//! [`MetaError`] and `tonic::Code`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::meta::membership_request::Kind as MemberKind;
use stoker_proto::meta::meta_client::MetaClient;
use stoker_proto::meta::meta_server::Meta;
use stoker_proto::meta::{
    Command, CommandResult, Member, MembershipRequest, MembershipResponse, ProposeManyRequest,
    ProposeManyResponse, ProposeRequest, ProposeResponse, QueryRequest, QueryResponse,
    StatusRequest, StatusResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use super::auth::{AuthChannel, Bearer};
use super::batch::{to_outcome, ProposeBatcher};
use crate::meta::{
    Consistency, Forwarder, MetaError, MetaNode, NodeStatus, RedbStorage, RequestId,
};

/// The one mapping from metadata errors to gRPC status codes.
pub fn to_status(e: MetaError) -> Status {
    let code = match &e {
        MetaError::NotLeader { .. }
        | MetaError::ProposalDropped
        | MetaError::LeaderChanged
        | MetaError::Stopped => Code::Unavailable,
        MetaError::Forward {
            retriable: true, ..
        } => Code::Unavailable,
        MetaError::Timeout { .. } => Code::DeadlineExceeded,
        MetaError::Invalid(_) | MetaError::Config(_) => Code::InvalidArgument,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// A status from a forwarded call, as an error of this node.
fn from_status(leader: u64, s: Status) -> MetaError {
    MetaError::Forward {
        leader,
        reason: s.message().to_string(),
        retriable: matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        ),
    }
}

/// A `Propose` request that sets cluster setting `key` to `value`.
pub fn set_config_request(key: String, value: String) -> ProposeRequest {
    ProposeRequest {
        command: Some(Command {
            kind: Some(stoker_proto::meta::command::Kind::SetConfig(
                stoker_proto::meta::SetConfig { key, value },
            )),
        }),
        forwarded: false,
        request_id: Vec::new(),
    }
}

/// A lazily connected client to `addr` (host:port).
///
/// # Errors
/// [`MetaError::Invalid`] for a malformed address.
pub fn connect_lazy(addr: &str, timeout: Duration) -> Result<MetaClient<Channel>, MetaError> {
    Ok(MetaClient::new(channel(addr, timeout)?))
}

/// A lazily connected channel to `addr` (host:port), each call bounded by
/// `timeout`; over TLS when the process installed a client TLS setting.
///
/// # Errors
/// [`MetaError::Invalid`] for a malformed address.
pub fn channel(addr: &str, timeout: Duration) -> Result<Channel, MetaError> {
    Ok(super::tls::endpoint(addr)?.timeout(timeout).connect_lazy())
}

/// A lazily connected client of the public `Stoker` API at `addr`. Module
/// bytes travel in one message, so the message limits allow a whole module.
///
/// # Errors
/// [`MetaError::Invalid`] for a malformed address.
pub fn connect_stoker(addr: &str, timeout: Duration) -> Result<StokerClient<Channel>, MetaError> {
    Ok(StokerClient::new(channel(addr, timeout)?)
        .max_decoding_message_size(MAX_API_MESSAGE)
        .max_encoding_message_size(MAX_API_MESSAGE))
}

/// [`connect_stoker`] whose every request carries `token` (when given).
///
/// # Errors
/// [`MetaError::Invalid`] for a malformed address or token.
pub fn connect_stoker_with(
    addr: &str,
    timeout: Duration,
    token: Option<&str>,
) -> Result<StokerClient<AuthChannel>, MetaError> {
    let bearer = Bearer::new(token).map_err(MetaError::Invalid)?;
    Ok(
        StokerClient::with_interceptor(channel(addr, timeout)?, bearer)
            .max_decoding_message_size(MAX_API_MESSAGE)
            .max_encoding_message_size(MAX_API_MESSAGE),
    )
}

/// [`connect_lazy`] whose every request carries `token` (when given).
///
/// # Errors
/// [`MetaError::Invalid`] for a malformed address or token.
pub fn connect_meta_with(
    addr: &str,
    timeout: Duration,
    token: Option<&str>,
) -> Result<MetaClient<AuthChannel>, MetaError> {
    let bearer = Bearer::new(token).map_err(MetaError::Invalid)?;
    Ok(MetaClient::with_interceptor(
        channel(addr, timeout)?,
        bearer,
    ))
}

/// The largest API message: a whole module plus its record.
pub const MAX_API_MESSAGE: usize = crate::meta::records::MAX_MODULE_BYTES + (1 << 20);

/// Forwards over gRPC, to the address the replicated membership records.
pub struct GrpcForwarder {
    /// The membership's addresses. Not the node itself: the node owns its
    /// forwarder, and a handle here would keep the node alive forever.
    storage: RedbStorage,
    timeout: Duration,
    /// The cluster token every forwarded call carries.
    bearer: Bearer,
    clients: Mutex<HashMap<u64, (String, MetaClient<AuthChannel>)>>,
    /// Forwarded proposals go to the leader in batches (one per leader
    /// address).
    batchers: Mutex<HashMap<u64, (String, Arc<ProposeBatcher>)>>,
}

impl GrpcForwarder {
    /// Forwards on behalf of `node`; each call is bounded by `timeout` and
    /// carries `bearer`.
    pub fn new(node: &MetaNode, timeout: Duration, bearer: Bearer) -> Self {
        GrpcForwarder {
            storage: node.storage().clone(),
            timeout,
            bearer,
            clients: Mutex::new(HashMap::new()),
            batchers: Mutex::new(HashMap::new()),
        }
    }

    fn address(&self, leader: u64) -> Result<String, MetaError> {
        self.storage
            .members()?
            .into_iter()
            .find(|(id, _)| *id == leader)
            .map(|(_, a)| a)
            .ok_or(MetaError::Forward {
                leader,
                reason: "leader address unknown".into(),
                retriable: true,
            })
    }

    fn client(&self, leader: u64) -> Result<MetaClient<AuthChannel>, MetaError> {
        let addr = self.address(leader)?;
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some((a, c)) = clients.get(&leader) {
            if *a == addr {
                return Ok(c.clone());
            }
        }
        let c = MetaClient::with_interceptor(channel(&addr, self.timeout)?, self.bearer.clone());
        clients.insert(leader, (addr, c.clone()));
        Ok(c)
    }

    /// The batcher of forwarded proposals to `leader` (at its current
    /// address). Must be called within a tokio runtime.
    fn batcher(&self, leader: u64) -> Result<Arc<ProposeBatcher>, MetaError> {
        let addr = self.address(leader)?;
        let mut batchers = self.batchers.lock().expect("batchers lock");
        if let Some((a, b)) = batchers.get(&leader) {
            if *a == addr {
                return Ok(b.clone());
            }
        }
        let b = Arc::new(ProposeBatcher::new(self.client(leader)?, true));
        batchers.insert(leader, (addr, b.clone()));
        Ok(b)
    }
}

impl Forwarder for GrpcForwarder {
    fn propose(
        &self,
        leader: u64,
        cmd: Command,
        request_id: RequestId,
    ) -> BoxFuture<'static, Result<CommandResult, MetaError>> {
        let batcher = self.batcher(leader);
        Box::pin(async move {
            batcher?
                .propose(ProposeRequest {
                    command: Some(cmd),
                    forwarded: true,
                    request_id: request_id.0.to_vec(),
                })
                .await
                .map_err(|s| from_status(leader, s))
        })
    }

    fn change_membership(
        &self,
        leader: u64,
        kind: MemberKind,
        id: u64,
        addr: String,
    ) -> BoxFuture<'static, Result<(), MetaError>> {
        let client = self.client(leader);
        Box::pin(async move {
            client?
                .change_membership(MembershipRequest {
                    kind: kind as i32,
                    id,
                    addr,
                })
                .await
                .map_err(|s| from_status(leader, s))?;
            Ok(())
        })
    }

    fn transfer_leader(&self, leader: u64, to: u64) -> BoxFuture<'static, Result<(), MetaError>> {
        let client = self.client(leader);
        Box::pin(async move {
            client?
                .transfer_leader(TransferLeaderRequest { id: to })
                .await
                .map_err(|s| from_status(leader, s))?;
            Ok(())
        })
    }
}

/// Serves the `Meta` API of one node.
pub struct MetaService {
    node: MetaNode,
    timeout: Duration,
}

impl MetaService {
    /// Serves `node`; `timeout` bounds requests that are not forwarded.
    pub fn new(node: MetaNode, timeout: Duration) -> Self {
        MetaService { node, timeout }
    }
}

/// Converts a status into its wire form.
pub fn status_to_proto(s: NodeStatus) -> StatusResponse {
    StatusResponse {
        id: s.id,
        leader_id: s.leader_id.unwrap_or(0),
        term: s.term,
        role: s.role,
        commit_index: s.commit_index,
        applied_index: s.applied_index,
        first_index: s.first_index,
        last_index: s.last_index,
        members: s
            .members
            .into_iter()
            .map(|m| Member {
                id: m.id,
                addr: m.addr,
                learner: m.learner,
                matched: m.matched,
            })
            .collect(),
    }
}

impl MetaService {
    /// Proposes one request; `forwarded` (by a follower) proposes on this
    /// node only, never bouncing it on.
    async fn propose_one(
        &self,
        req: ProposeRequest,
        forwarded: bool,
    ) -> Result<CommandResult, Status> {
        let cmd = req
            .command
            .ok_or_else(|| Status::invalid_argument("missing command"))?;
        let request_id = if req.request_id.is_empty() {
            RequestId::new(self.node.id())
        } else {
            RequestId::from_bytes(&req.request_id)
                .ok_or_else(|| Status::invalid_argument("request_id must be 16 bytes"))?
        };
        if forwarded {
            self.node.propose_local(cmd, request_id, self.timeout).await
        } else {
            self.node.propose_with_id(cmd, request_id).await
        }
        .map_err(to_status)
    }
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        let req = request.into_inner();
        let forwarded = req.forwarded;
        let result = self.propose_one(req, forwarded).await?;
        Ok(Response::new(ProposeResponse {
            result: Some(result),
        }))
    }

    async fn propose_many(
        &self,
        request: Request<ProposeManyRequest>,
    ) -> Result<Response<ProposeManyResponse>, Status> {
        let req = request.into_inner();
        let forwarded = req.forwarded;
        // Proposed at once, so the leader's loop batches them together.
        let outcomes = futures::future::join_all(req.requests.into_iter().map(|r| async move {
            let forwarded = forwarded || r.forwarded;
            to_outcome(self.propose_one(r, forwarded).await)
        }))
        .await;
        Ok(Response::new(ProposeManyResponse { outcomes }))
    }

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let req = request.into_inner();
        let query = req
            .query
            .ok_or_else(|| Status::invalid_argument("missing query"))?;
        let consistency = if req.stale_ok {
            Consistency::Stale
        } else {
            Consistency::Linearizable
        };
        let (result, applied_index) = self
            .node
            .query(&query, consistency)
            .await
            .map_err(to_status)?;
        Ok(Response::new(QueryResponse {
            result: Some(result),
            applied_index,
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self.node.status().await.map_err(to_status)?;
        Ok(Response::new(status_to_proto(s)))
    }

    async fn change_membership(
        &self,
        request: Request<MembershipRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let req = request.into_inner();
        let kind = MemberKind::try_from(req.kind).map_err(|_| {
            Status::invalid_argument(format!("unknown membership kind {}", req.kind))
        })?;
        self.node
            .change_membership(kind, req.id, &req.addr)
            .await
            .map_err(to_status)?;
        let s = status_to_proto(self.node.status().await.map_err(to_status)?);
        Ok(Response::new(MembershipResponse { members: s.members }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let to = request.into_inner().id;
        self.node.transfer_leader(to).await.map_err(to_status)?;
        Ok(Response::new(TransferLeaderResponse { leader_id: to }))
    }
}
