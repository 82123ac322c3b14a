//! The scheduler nodes a worker talks to, tried in turn, and the fenced
//! proposals (claims, reports) retried across them under one request id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::meta::command::Kind;
use stoker_proto::meta::meta_client::MetaClient;
use stoker_proto::meta::{Command, CommandResult, ProposeRequest};
use tonic::transport::Channel;
use tonic::Code;
use tracing::debug;

use super::Shared;
use crate::api::auth::{AuthChannel, Bearer};
use crate::api::batch::ProposeBatcher;
use crate::meta::RequestId;

/// The scheduler nodes this worker talks to, in turn.
pub(super) struct Endpoints {
    pub(super) addrs: Vec<String>,
    current: AtomicUsize,
    channels: Mutex<HashMap<usize, Channel>>,
    /// Proposals to each endpoint, batched across this worker's executors.
    batchers: Mutex<HashMap<usize, Arc<ProposeBatcher>>>,
    timeout: Duration,
    /// The cluster token every call carries.
    bearer: Bearer,
}

impl Endpoints {
    pub(super) fn new(addrs: Vec<String>, timeout: Duration, bearer: Bearer) -> Self {
        Endpoints {
            addrs,
            current: AtomicUsize::new(0),
            channels: Mutex::new(HashMap::new()),
            batchers: Mutex::new(HashMap::new()),
            timeout,
            bearer,
        }
    }

    /// The current endpoint's index and channel.
    fn get(&self) -> Result<(usize, Channel), String> {
        let i = self.current.load(Ordering::Relaxed) % self.addrs.len();
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(&i) {
            return Ok((i, c.clone()));
        }
        match crate::api::meta::channel(&self.addrs[i], self.timeout) {
            Ok(c) => {
                channels.insert(i, c.clone());
                Ok((i, c))
            }
            Err(e) => {
                drop(channels);
                self.failed(i);
                Err(e.to_string())
            }
        }
    }

    /// Moves on from endpoint `i` (unless someone already did).
    pub(super) fn failed(&self, i: usize) {
        let next = (i + 1) % self.addrs.len();
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(super) fn addr(&self, i: usize) -> &str {
        &self.addrs[i]
    }

    pub(super) fn stoker(&self) -> Result<(usize, StokerClient<AuthChannel>), String> {
        let (i, c) = self.get()?;
        Ok((
            i,
            StokerClient::with_interceptor(c, self.bearer.clone())
                .max_decoding_message_size(crate::api::meta::MAX_API_MESSAGE)
                .max_encoding_message_size(crate::api::meta::MAX_API_MESSAGE),
        ))
    }

    fn meta(&self) -> Result<(usize, MetaClient<AuthChannel>), String> {
        let (i, c) = self.get()?;
        Ok((
            i,
            MetaClient::with_interceptor(c, self.bearer.clone())
                .max_decoding_message_size(crate::api::meta::MAX_API_MESSAGE)
                .max_encoding_message_size(crate::api::meta::MAX_API_MESSAGE),
        ))
    }

    /// The current endpoint's index and proposal batcher.
    fn batcher(&self) -> Result<(usize, Arc<ProposeBatcher>), String> {
        let i = self.current.load(Ordering::Relaxed) % self.addrs.len();
        if let Some(b) = self.batchers.lock().expect("batchers lock").get(&i) {
            return Ok((i, b.clone()));
        }
        let (i, client) = self.meta()?;
        let mut batchers = self.batchers.lock().expect("batchers lock");
        let b = batchers
            .entry(i)
            .or_insert_with(|| Arc::new(ProposeBatcher::new(client, false)));
        Ok((i, b.clone()))
    }
}

/// Status codes that say the request itself is wrong: retrying it
/// elsewhere would fail the same way.
fn permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::OutOfRange
    )
}

/// Back-off between retries of one request: 50 ms doubling up to 2 s.
pub(super) fn next_backoff(b: Duration) -> Duration {
    (b * 2).min(Duration::from_secs(2))
}

/// Each claim, report or module fetch gives up on one endpoint after this.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(15);

impl Shared {
    /// Proposes `cmd` together with the other executors' claims and
    /// reports (see [`super::combine`]). A rejection is in the result's
    /// `error`; `Err` is a request the cluster refuses outright.
    pub(super) async fn propose(&self, cmd: Kind) -> Result<CommandResult, String> {
        self.combiner.propose(cmd).await
    }

    /// Proposes `cmd` alone through the current endpoint, retrying under
    /// one request id (on the next endpoint) until the cluster answers.
    pub(super) async fn propose_alone(&self, cmd: Kind) -> Result<CommandResult, String> {
        let request_id = RequestId::new(self.id);
        let mut backoff = Duration::from_millis(50);
        loop {
            let attempt = async {
                if let Some(node) = &self.local {
                    // A scheduler's own worker: straight into its metadata
                    // node (which forwards to the leader), no RPC.
                    let cmd = Command {
                        kind: Some(cmd.clone()),
                    };
                    return match node.propose_with_id(cmd, request_id).await {
                        Ok(r) => Ok(Ok(r)),
                        Err(e) => {
                            let s = crate::api::meta::to_status(e);
                            if permanent(s.code()) {
                                Ok(Err(s.message().to_string()))
                            } else {
                                Err(format!("local metadata node: {}", s.message()))
                            }
                        }
                    };
                }
                let (i, batcher) = self.endpoints.batcher()?;
                let req = ProposeRequest {
                    command: Some(Command {
                        kind: Some(cmd.clone()),
                    }),
                    forwarded: false,
                    request_id: request_id.0.to_vec(),
                };
                match tokio::time::timeout(CALL_TIMEOUT, batcher.propose(req)).await {
                    Ok(Ok(r)) => Ok(Ok(r)),
                    Ok(Err(s)) if permanent(s.code()) => Ok(Err(s.message().to_string())),
                    Ok(Err(s)) => {
                        self.endpoints.failed(i);
                        Err(format!("{}: {}", self.endpoints.addr(i), s.message()))
                    }
                    Err(_) => {
                        self.endpoints.failed(i);
                        Err(format!(
                            "{}: no answer in {CALL_TIMEOUT:?}",
                            self.endpoints.addr(i)
                        ))
                    }
                }
            };
            match attempt.await {
                Ok(answer) => return answer,
                Err(e) => {
                    debug!(node_id = self.id, error = %e, "propose failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = next_backoff(backoff);
                }
            }
        }
    }
}
