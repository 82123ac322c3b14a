//! Authentication: who a request comes from.
//!
//! Two modes, chosen by the server config's `admin_token`:
//! - **open** (no `admin_token`, e.g. `stoker dev` and most tests): every
//!   request is the admin acting as the `default` tenant; tokens are not
//!   looked at. The node logs a warning at start.
//! - **authenticated**: every request carries `authorization: Bearer
//!   <token>`. The admin token (from config) acts as the admin; a tenant
//!   token (`stk_<id>_<secret>`, created by `stoker tenant create` or
//!   `stoker token create`) as its tenant. Tenant tokens live in the
//!   replicated state as their sha256 only. The internal services (`Meta`,
//!   `RaftTransport`) accept only the admin token, which every node of the
//!   cluster (schedulers and worker-only nodes) is configured with.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::meta::to_status;
use crate::meta::queries;
use crate::meta::records::DEFAULT_TENANT;
use crate::meta::MetaNode;

/// A secret read from config: serialized as its plain string, never shown
/// by `Debug` (configs get logged).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Prefix of every tenant token.
pub const TOKEN_PREFIX: &str = "stk_";

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant it acts as (the admin acts as `default` unless a request
    /// names another tenant).
    pub tenant: String,
    /// Whether it holds the admin token (or the cluster runs open).
    pub admin: bool,
}

impl Caller {
    /// The admin acting as the default tenant.
    pub fn admin() -> Self {
        Caller {
            tenant: DEFAULT_TENANT.to_string(),
            admin: true,
        }
    }

    /// The tenants whose objects this caller sees: `None` = every tenant
    /// (the admin, unless `filter` narrows it), else just its own.
    pub fn scope(&self, filter: &str) -> Option<String> {
        match (self.admin, filter.is_empty()) {
            (true, true) => None,
            (true, false) => Some(filter.to_string()),
            (false, _) => Some(self.tenant.clone()),
        }
    }

    /// Whether the caller may see an object of `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.admin || self.tenant == tenant
    }

    /// `PermissionDenied` unless the caller is the admin.
    ///
    /// # Errors
    /// As said, naming `what` needs the admin token.
    pub fn require_admin(&self, what: &str) -> Result<(), Status> {
        if self.admin {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{what} needs the admin token (tenant {} is not the admin)",
                self.tenant
            )))
        }
    }
}

/// Lowercase hex sha256 of a token string.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The id part of a tenant token `stk_<id>_<secret>`.
pub fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

/// A fresh token: its id and the whole token string.
///
/// # Errors
/// When the system's random source cannot be read.
pub fn new_token() -> std::io::Result<(String, String)> {
    use std::io::Read;
    let mut bytes = [0u8; 38];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let id = hex::encode(&bytes[..6]);
    let secret = hex::encode(&bytes[6..]);
    let token = format!("{TOKEN_PREFIX}{id}_{secret}");
    Ok((id, token))
}

/// Compares two secrets in time independent of where they differ (both
/// are hashed first, so lengths do not leak either).
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The bearer token of a request's metadata.
///
/// # Errors
/// `Unauthenticated` when there is none or it is malformed.
fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Err(Status::unauthenticated(
            "this cluster requires a token: pass --token or set STOKER_TOKEN (gRPC clients send `authorization: Bearer <token>`)",
        ));
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("the authorization header must be `Bearer <token>`"))
}

fn invalid_token() -> Status {
    Status::unauthenticated(
        "invalid or revoked token: check --token / STOKER_TOKEN, or ask the admin for a new one (`stoker token create`)",
    )
}

/// Authenticates requests of the public API against the admin token and
/// the replicated token table.
#[derive(Clone)]
pub struct Authenticator {
    admin_token: Option<Arc<str>>,
}

impl Authenticator {
    /// Authenticated when `admin_token` is set, open otherwise.
    pub fn new(admin_token: Option<&str>) -> Self {
        Authenticator {
            admin_token: admin_token.filter(|t| !t.is_empty()).map(Arc::from),
        }
    }

    /// Whether requests must carry a token.
    pub fn enabled(&self) -> bool {
        self.admin_token.is_some()
    }

    /// The token of a request's metadata, taken out before any await (so
    /// that the request itself is not held across one). `None` in open
    /// mode.
    ///
    /// # Errors
    /// `Unauthenticated` when authentication is on and there is no token
    /// or a malformed one.
    pub fn token_of(&self, metadata: &MetadataMap) -> Result<Option<String>, Status> {
        if self.admin_token.is_none() {
            return Ok(None);
        }
        bearer(metadata).map(|t| Some(t.to_string()))
    }

    /// Who holds `token` (from [`Self::token_of`]).
    ///
    /// A token unknown to this node's (possibly lagging) state is looked
    /// up again after a read barrier, so a token created a moment ago on
    /// another node works here too.
    ///
    /// # Errors
    /// `Unauthenticated` for a missing, malformed, unknown or revoked token;
    /// `Unavailable` when the state cannot be read.
    pub async fn caller(
        &self,
        node: &MetaNode,
        token: Result<Option<String>, Status>,
    ) -> Result<Caller, Status> {
        let (Some(admin), Some(token)) = (&self.admin_token, token?) else {
            return Ok(Caller::admin());
        };
        if same_secret(&token, admin) {
            return Ok(Caller::admin());
        }
        let id = token_id(&token).ok_or_else(invalid_token)?.to_string();
        let lookup = |p: &std::path::Path, t: &redb::ReadTransaction| queries::token(p, t, &id);
        let mut record = node.read_local(lookup).map_err(to_status)?.0;
        if record.is_none() {
            node.read_barrier().await.map_err(to_status)?;
            record = node.read_local(lookup).map_err(to_status)?.0;
        }
        match record {
            Some(r) if same_secret(&token_sha256(&token), &r.sha256) => Ok(Caller {
                tenant: r.tenant,
                admin: false,
            }),
            _ => Err(invalid_token()),
        }
    }

    /// The check of the internal services (`Meta`, `RaftTransport`): only
    /// the admin (cluster) token passes when authentication is on.
    ///
    /// # Errors
    /// `Unauthenticated` otherwise.
    pub fn check_cluster(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(admin) = &self.admin_token else {
            return Ok(());
        };
        let token = bearer(metadata)?;
        if same_secret(token, admin) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "internal cluster services need the cluster's admin_token; set admin_token in this node's --config",
            ))
        }
    }
}

/// Server-side interceptor of the internal services.
#[derive(Clone)]
pub struct ClusterGuard(pub Authenticator);

impl Interceptor for ClusterGuard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.0.check_cluster(req.metadata())?;
        Ok(req)
    }
}

/// Client-side interceptor: adds `authorization: Bearer <token>` to every
/// request when a token is set.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sends `token` (nothing when `None` or empty).
    ///
    /// # Errors
    /// When the token holds characters a header cannot carry.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| "the token holds characters not allowed in a header".to_string()),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose every request carries a bearer token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_an_id_and_a_secret_and_hash_stably() {
        let (id, token) = new_token().unwrap();
        assert_eq!(token_id(&token), Some(id.as_str()));
        assert_eq!(id.len(), 12);
        assert_ne!(new_token().unwrap().1, token, "tokens are random");
        assert_eq!(token_sha256(&token), token_sha256(&token));
        assert_eq!(token_sha256(&token).len(), 64);
        for bad in ["", "stk_", "stk_abc", "stk__x", "stk_abc_", "xyz_abc_def"] {
            assert_eq!(token_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn cluster_check_wants_the_admin_token_only_when_enabled() {
        let open = Authenticator::new(None);
        assert!(open.check_cluster(&MetadataMap::new()).is_ok());
        let auth = Authenticator::new(Some("s3cret"));
        let mut md = MetadataMap::new();
        let e = auth.check_cluster(&md).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        md.insert("authorization", "Bearer wrong".parse().unwrap());
        assert_eq!(
            auth.check_cluster(&md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.check_cluster(&md).is_ok());
    }

    #[test]
    fn callers_see_their_own_tenant_and_the_admin_sees_all() {
        let a = Caller {
            tenant: "a".into(),
            admin: false,
        };
        assert!(a.sees("a") && !a.sees("b"));
        assert_eq!(a.scope(""), Some("a".into()));
        assert_eq!(a.scope("b"), Some("a".into()), "a filter cannot widen");
        let admin = Caller::admin();
        assert!(admin.sees("b"));
        assert_eq!(admin.scope(""), None);
        assert_eq!(admin.scope("b"), Some("b".into()));
        assert!(a.require_admin("x").is_err() && admin.require_admin("x").is_ok());
    }
}
