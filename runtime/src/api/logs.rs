//! `GetSubtaskLog`: one run's log, read from the tenant's blobs where the
//! worker left it (`logs/<task>/<step>-<ordinal>-<attempt>`).

use stoker_proto::api::{GetSubtaskLogRequest, GetSubtaskLogResponse};
use tonic::{Request, Response, Status};

use super::service::StokerService;
use crate::exec::worker::subtask_log_key;
use crate::meta::queries;

impl StokerService {
    pub(super) async fn do_get_subtask_log(
        &self,
        request: Request<GetSubtaskLogRequest>,
    ) -> Result<Response<GetSubtaskLogResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let name = format!("subtask {}/{}/{}", req.task_id, req.step, req.ordinal);
        let found = self
            .read(|p, t| {
                let Some(task) =
                    queries::task(p, t, req.task_id)?.filter(|t| caller.sees(&t.tenant))
                else {
                    return Ok(None);
                };
                let (subtasks, _) = queries::step_subtasks(p, t, req.task_id, req.step)?;
                Ok(subtasks
                    .into_iter()
                    .find(|s| s.ordinal == req.ordinal)
                    .map(|s| (task.tenant, s.attempt)))
            })
            .await?;
        let (tenant, latest) =
            found.ok_or_else(|| Status::not_found(format!("{name} not found")))?;
        let attempt = if req.attempt == 0 {
            latest
        } else {
            req.attempt
        };
        if attempt > latest {
            return Err(Status::not_found(format!(
                "{name} has no attempt {attempt} (its latest is {latest})"
            )));
        }
        let blobs = self
            .blobs()
            .tenant(&tenant)
            .map_err(|e| Status::internal(format!("blob store: {e}")))?;
        let key = subtask_log_key(req.task_id, req.step, req.ordinal, attempt);
        let log = blobs
            .get(&key)
            .await
            .map_err(|e| Status::unavailable(format!("cannot read {name}'s log: {e}")))?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Ok(Response::new(GetSubtaskLogResponse { log, attempt }))
    }
}
