//! Subtask logs, read from the tenant's blobs where the worker left them
//! (`logs/<task>/<step>-<ordinal>-<attempt>`): [`subtask_log`] is the one
//! lookup behind both `GetSubtaskLog` (gRPC) and the dashboard's
//! `/api/tasks/{id}/subtasks/{step}/{ordinal}/log` (HTTP).

use stoker_proto::api::{GetSubtaskLogRequest, GetSubtaskLogResponse};
use tonic::{Request, Response, Status};

use super::meta::to_status;
use super::service::StokerService;
use crate::blob::{BlobError, BlobStore};
use crate::exec::worker::subtask_log_key;
use crate::meta::{queries, MetaError, MetaNode};

/// Why a subtask log cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// No such task, subtask or attempt, or another tenant's task (the
    /// same answer, so that a tenant cannot probe for others' tasks).
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("cannot read {what}'s log: {source}")]
    Blob { what: String, source: BlobError },
}

/// Which run's log: attempt 0 is the latest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogAt {
    pub task: u64,
    pub step: u32,
    pub ordinal: u32,
    pub attempt: u32,
}

/// One run's log (lossy UTF-8) and the attempt it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubtaskLog {
    pub log: String,
    pub attempt: u32,
}

/// The log of one run of a subtask whose task's tenant `sees` accepts,
/// after a read barrier (linearizable). A run that logged nothing (or has
/// not reported yet) has an empty log.
///
/// # Errors
/// [`LogError::NotFound`] for an unknown task, subtask or attempt and for
/// a task `sees` refuses; the metadata layer's and the blob store's
/// errors.
pub async fn subtask_log(
    meta: &MetaNode,
    blobs: &BlobStore,
    sees: impl Fn(&str) -> bool,
    at: LogAt,
) -> Result<SubtaskLog, LogError> {
    let name = format!("subtask {}/{}/{}", at.task, at.step, at.ordinal);
    meta.read_barrier().await?;
    let (found, _) = meta.read_local(|p, t| {
        let Some(task) = queries::task(p, t, at.task)?.filter(|t| sees(&t.tenant)) else {
            return Ok(None);
        };
        let subtask = queries::subtask(p, t, at.task, at.step, at.ordinal)?;
        Ok(subtask.map(|s| (task.tenant, s.attempt)))
    })?;
    let (tenant, latest) = found.ok_or_else(|| LogError::NotFound(format!("{name} not found")))?;
    let attempt = if at.attempt == 0 { latest } else { at.attempt };
    if attempt > latest {
        return Err(LogError::NotFound(format!(
            "{name} has no attempt {attempt} (its latest is {latest})"
        )));
    }
    let blob_error = |source| LogError::Blob {
        what: name.clone(),
        source,
    };
    let key = subtask_log_key(at.task, at.step, at.ordinal, attempt);
    let log = blobs
        .tenant(&tenant)
        .map_err(blob_error)?
        .get(&key)
        .await
        .map_err(blob_error)?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Ok(SubtaskLog { log, attempt })
}

impl From<LogError> for Status {
    fn from(e: LogError) -> Self {
        match e {
            LogError::NotFound(m) => Status::not_found(m),
            LogError::Meta(e) => to_status(e),
            LogError::Blob {
                source: BlobError::BadTenant(_) | BlobError::Denied { .. },
                ..
            } => Status::internal(e.to_string()),
            LogError::Blob { .. } => Status::unavailable(e.to_string()),
        }
    }
}

impl StokerService {
    pub(super) async fn do_get_subtask_log(
        &self,
        request: Request<GetSubtaskLogRequest>,
    ) -> Result<Response<GetSubtaskLogResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let at = LogAt {
            task: req.task_id,
            step: req.step,
            ordinal: req.ordinal,
            attempt: req.attempt,
        };
        let found = subtask_log(self.node(), self.blobs(), |t| caller.sees(t), at).await?;
        Ok(Response::new(GetSubtaskLogResponse {
            log: found.log,
            attempt: found.attempt,
        }))
    }
}
