//! The tenant and token calls of the `Stoker` service, and module deletion.
//! Creating and changing tenants needs the admin token; a tenant manages
//! its own tokens. Another tenant's token or module is answered exactly like
//! a missing one.

use stoker_proto::api::{
    CreateTenantRequest, CreateTenantResponse, CreateTokenRequest, CreateTokenResponse,
    DeleteModuleRequest, DeleteModuleResponse, ListTenantsRequest, ListTenantsResponse,
    ListTokensRequest, ListTokensResponse, RevokeTokenRequest, RevokeTokenResponse,
    SetTenantRequest, SetTenantResponse,
};
use stoker_proto::meta::command::Kind as C;
use stoker_proto::meta::{
    CreateTenant, CreateToken, DeleteModule, RevokeToken, SetTenant, TenantRecord,
};
use tonic::{Request, Response, Status};

use super::auth::{new_token, token_sha256, Caller};
use super::service::StokerService;
use crate::meta::now_ms;
use crate::meta::queries;

impl StokerService {
    /// A tenant's record, or `NotFound` (also for a tenant the caller may
    /// not see).
    async fn tenant_record(&self, caller: &Caller, id: &str) -> Result<TenantRecord, Status> {
        let found = if caller.sees(id) {
            self.read(|p, t| queries::tenant(p, t, id)).await?
        } else {
            None
        };
        found.ok_or_else(|| Status::not_found(format!("tenant {id} not found")))
    }

    /// Creates a token of `tenant` and returns its id and the token.
    async fn issue_token(
        &self,
        tenant: &str,
        description: &str,
    ) -> Result<(String, String), Status> {
        let (id, token) = new_token()
            .map_err(|e| Status::internal(format!("cannot read random bytes for a token: {e}")))?;
        self.propose(
            C::CreateToken(CreateToken {
                id: id.clone(),
                tenant: tenant.to_string(),
                sha256: token_sha256(&token),
                time_ms: now_ms(),
                description: description.to_string(),
            }),
            None,
        )
        .await?;
        Ok((id, token))
    }

    /// Refuses an upload over the tenant's `max_module_bytes` before any
    /// chunk is staged (the commit checks again, deterministically).
    pub(super) async fn check_module_quota(
        &self,
        tenant: &str,
        hash: &str,
        size: u64,
    ) -> Result<(), Status> {
        let (quota, used, have) = self
            .read(|p, t| {
                let quota = queries::tenant(p, t, tenant)?
                    .and_then(|r| r.quota)
                    .unwrap_or_default();
                let mods = queries::modules(p, t, Some(tenant))?;
                let used: u64 = mods.iter().map(|m| m.size).sum();
                Ok((quota, used, mods.iter().any(|m| m.hash == hash)))
            })
            .await?;
        if !have && quota.max_module_bytes != 0 && used + size > quota.max_module_bytes {
            return Err(Status::resource_exhausted(format!(
                "quota exceeded: tenant {tenant}'s max_module_bytes is {}, its modules use {used} bytes and this one has {size}; delete unused modules (stoker module delete) or ask the admin to raise it",
                quota.max_module_bytes
            )));
        }
        Ok(())
    }

    pub(super) async fn do_create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        let caller = self.caller(&request).await?;
        caller.require_admin("creating a tenant")?;
        let req = request.into_inner();
        self.propose(
            C::CreateTenant(CreateTenant {
                id: req.id.clone(),
                name: req.name,
                weight: req.weight,
                quota: req.quota,
                time_ms: now_ms(),
            }),
            None,
        )
        .await?;
        let (token_id, token) = self.issue_token(&req.id, "created with the tenant").await?;
        let tenant = self.tenant_record(&caller, &req.id).await?;
        Ok(Response::new(CreateTenantResponse {
            tenant: Some(tenant),
            token,
            token_id,
        }))
    }

    pub(super) async fn do_list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let mut tenants = self.read(queries::tenants).await?;
        tenants.retain(|t| caller.sees(&t.id));
        Ok(Response::new(ListTenantsResponse { tenants }))
    }

    pub(super) async fn do_set_tenant(
        &self,
        request: Request<SetTenantRequest>,
    ) -> Result<Response<SetTenantResponse>, Status> {
        let caller = self.caller(&request).await?;
        caller.require_admin("changing a tenant")?;
        let req = request.into_inner();
        self.propose(
            C::SetTenant(SetTenant {
                id: req.id.clone(),
                weight: req.weight,
                quota: req.quota,
            }),
            None,
        )
        .await?;
        let tenant = self.tenant_record(&caller, &req.id).await?;
        Ok(Response::new(SetTenantResponse {
            tenant: Some(tenant),
        }))
    }

    pub(super) async fn do_create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let tenant = if req.tenant.is_empty() {
            caller.tenant.clone()
        } else {
            req.tenant
        };
        // Checks the tenant exists and is the caller's (NotFound otherwise).
        self.tenant_record(&caller, &tenant).await?;
        let (id, token) = self.issue_token(&tenant, &req.description).await?;
        Ok(Response::new(CreateTokenResponse { id, token }))
    }

    pub(super) async fn do_revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        self.propose(
            C::RevokeToken(RevokeToken {
                id: req.id,
                tenant: if caller.admin {
                    String::new()
                } else {
                    caller.tenant
                },
            }),
            None,
        )
        .await?;
        Ok(Response::new(RevokeTokenResponse {}))
    }

    pub(super) async fn do_list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let caller = self.caller(&request).await?;
        let scope = caller.scope(&request.get_ref().tenant);
        let mut tokens = self.read(queries::tokens).await?;
        tokens.retain(|t| scope.as_ref().is_none_or(|s| *s == t.tenant));
        for t in &mut tokens {
            t.sha256.clear();
        }
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    pub(super) async fn do_delete_module(
        &self,
        request: Request<DeleteModuleRequest>,
    ) -> Result<Response<DeleteModuleResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let scope = caller.scope("");
        let module = self
            .read(|p, t| queries::find_module(p, t, scope.as_deref(), &req.module, &req.tag))
            .await?
            .ok_or_else(|| Status::not_found(format!("module {} not found", req.module)))?;
        self.propose(
            C::DeleteModule(DeleteModule {
                hash: module.hash.clone(),
                tenant: module.tenant,
            }),
            None,
        )
        .await?;
        Ok(Response::new(DeleteModuleResponse { hash: module.hash }))
    }
}
