//! Modules by hash: fetched from the cluster, checked against their hash
//! and compiled once per hash.

use std::sync::Arc;

use stoker_proto::api::GetModuleRequest;
use tonic::Code;
use tracing::info;

use super::endpoints::CALL_TIMEOUT;
use super::Shared;
use crate::sandbox::{module_hash, SandboxError, TaskModule};

/// Why a module is not available.
pub(super) enum ModuleError {
    /// The cluster could not be asked; try again.
    Unreachable(String),
    /// The server asked does not know the module.
    NotFound(String),
    /// The module cannot run here (corrupt, invalid).
    Bad(SandboxError),
}

/// Fetches of a module the cluster says it does not have before its
/// subtask fails.
pub(super) const MODULE_TRIES: u32 = 5;

impl Shared {
    /// The loaded module with this hash: fetched from the cluster and
    /// compiled once per hash (concurrent executors wait for the first).
    pub(super) async fn module(&self, hash: &str) -> Result<Arc<TaskModule>, ModuleError> {
        let cell = self
            .modules
            .lock()
            .expect("modules lock")
            .entry(hash.to_string())
            .or_default()
            .clone();
        cell.get_or_try_init(|| self.fetch_module(hash))
            .await
            .cloned()
    }

    async fn fetch_module(&self, hash: &str) -> Result<Arc<TaskModule>, ModuleError> {
        let (i, mut client) = self.endpoints.stoker().map_err(ModuleError::Unreachable)?;
        let req = GetModuleRequest {
            module: hash.to_string(),
            tag: String::new(),
            with_bytes: true,
            // Any tenant's module with these bytes (the worker holds the
            // admin token).
            tenant: String::new(),
        };
        let resp = match tokio::time::timeout(CALL_TIMEOUT, client.get_module(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if s.code() == Code::NotFound => {
                self.endpoints.failed(i);
                return Err(ModuleError::NotFound(format!(
                    "module {hash} not found: {}",
                    s.message()
                )));
            }
            Ok(Err(s)) => {
                self.endpoints.failed(i);
                return Err(ModuleError::Unreachable(format!(
                    "{}: {}",
                    self.endpoints.addr(i),
                    s.message()
                )));
            }
            Err(_) => {
                self.endpoints.failed(i);
                return Err(ModuleError::Unreachable(format!(
                    "{}: no answer in {CALL_TIMEOUT:?}",
                    self.endpoints.addr(i)
                )));
            }
        };
        if module_hash(&resp.data) != hash {
            // A server answering with other bytes is broken; ask another.
            self.endpoints.failed(i);
            return Err(ModuleError::Unreachable(format!(
                "{} sent bytes that do not hash to {hash}",
                self.endpoints.addr(i)
            )));
        }
        let module = self
            .sandbox
            .load(&resp.data)
            .await
            .map_err(ModuleError::Bad)?;
        info!(node_id = self.id, module = hash, "module loaded");
        Ok(module)
    }
}
