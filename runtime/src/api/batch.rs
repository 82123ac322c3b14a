//! Proposals sent to one node in batches: everything queued while earlier
//! calls are in flight leaves in one `ProposeMany` call. A follower
//! forwarding to the leader and a worker reporting for its executors use
//! it, so a busy node makes one call (and the leader one log entry) for
//! many commands instead of one each.

use std::sync::Arc;

use prost::Message as _;
use stoker_proto::meta::meta_client::MetaClient;
use stoker_proto::meta::{CommandResult, ProposeManyRequest, ProposeOutcome, ProposeRequest};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::{Code, Status};

use super::auth::AuthChannel;

/// Calls in flight at once; more proposals wait and leave together.
const MAX_IN_FLIGHT: usize = 4;
/// Proposals in one call.
const MAX_BATCH: usize = 512;
/// Encoded bytes in one call (a larger proposal leaves alone); well under
/// the 4 MiB a gRPC server decodes by default.
const MAX_BATCH_BYTES: usize = 2 << 20;
/// Proposals waiting for a call; callers wait beyond this.
const QUEUE: usize = 8192;

struct Queued {
    request: ProposeRequest,
    size: usize,
    reply: oneshot::Sender<Result<CommandResult, Status>>,
}

/// A queue of proposals for one node, drained by a task that ends when the
/// batcher is dropped (after answering what was queued).
pub struct ProposeBatcher {
    queue: mpsc::Sender<Queued>,
}

impl ProposeBatcher {
    /// Sends to `client`; `forwarded` marks every call as a follower's
    /// forward (the receiver must not forward it again). Must be called
    /// within a tokio runtime.
    pub fn new(client: MetaClient<AuthChannel>, forwarded: bool) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(drain(client, forwarded, rx));
        ProposeBatcher { queue }
    }

    /// Proposes `request` in the next call and returns its own outcome: the
    /// command's result, or the status `Propose` would have returned (the
    /// whole call's status if the call failed).
    pub async fn propose(&self, request: ProposeRequest) -> Result<CommandResult, Status> {
        let (reply, answer) = oneshot::channel();
        let size = request.encoded_len();
        self.queue
            .send(Queued {
                request,
                size,
                reply,
            })
            .await
            .map_err(|_| Status::unavailable("proposal queue closed"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("proposal call dropped"))?
    }
}

/// The next batch from `rx`: the item `carried` over from the last batch
/// or the next one to arrive, then whatever else is queued, up to `max`
/// items and `max_bytes` by `size` (an item that would go beyond is
/// carried to the next batch; one bigger than that leaves alone). `None`
/// once the queue is closed and empty.
pub(crate) async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    carried: &mut Option<T>,
    size: impl Fn(&T) -> usize,
    max: usize,
    max_bytes: usize,
) -> Option<Vec<T>> {
    let first = match carried.take() {
        Some(q) => q,
        None => rx.recv().await?,
    };
    let mut bytes = size(&first);
    let mut batch = vec![first];
    while batch.len() < max {
        let Ok(q) = rx.try_recv() else { break };
        let n = size(&q);
        if bytes + n > max_bytes {
            *carried = Some(q);
            break;
        }
        bytes += n;
        batch.push(q);
    }
    Some(batch)
}

async fn drain(client: MetaClient<AuthChannel>, forwarded: bool, mut rx: mpsc::Receiver<Queued>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carried: Option<Queued> = None;
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let size = |q: &Queued| q.size;
        let next = next_batch(&mut rx, &mut carried, size, MAX_BATCH, MAX_BATCH_BYTES);
        let Some(batch) = next.await else {
            return;
        };
        let mut client = client.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (requests, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|q| (q.request, q.reply)).unzip();
            let n = requests.len();
            match client
                .propose_many(ProposeManyRequest {
                    requests,
                    forwarded,
                })
                .await
            {
                Ok(resp) => {
                    let mut outcomes = resp.into_inner().outcomes.into_iter();
                    for reply in replies {
                        let answer = match outcomes.next() {
                            Some(o) => outcome(o),
                            None => Err(Status::internal(format!(
                                "the node answered fewer than the {n} proposals sent"
                            ))),
                        };
                        let _ = reply.send(answer);
                    }
                }
                Err(status) => {
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
            }
        });
    }
}

/// One proposal's outcome as `Propose` would have given it.
pub fn outcome(o: ProposeOutcome) -> Result<CommandResult, Status> {
    if o.code == Code::Ok as i32 {
        Ok(o.result.unwrap_or_default())
    } else {
        Err(Status::new(Code::from(o.code), o.message))
    }
}

/// The wire form of one proposal's outcome.
pub fn to_outcome(r: Result<CommandResult, Status>) -> ProposeOutcome {
    match r {
        Ok(result) => ProposeOutcome {
            result: Some(result),
            code: Code::Ok as i32,
            message: String::new(),
        },
        Err(s) => ProposeOutcome {
            result: None,
            code: s.code() as i32,
            message: s.message().to_string(),
        },
    }
}
