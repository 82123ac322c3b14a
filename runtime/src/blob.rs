//! Blob storage for large inputs, outputs and intermediate data, through the
//! `object_store` crate (a local directory by default).
//!
//! Every key lives under `tenants/<tenant>/`. Callers never build store paths
//! themselves: they get a [`TenantBlobs`] for one tenant and hand it relative
//! keys, which [`validate_key`] confines to that tenant's prefix.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Longest key a guest may use, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob key {key:?} is not allowed: {why}")]
    Denied { key: String, why: &'static str },
    #[error("tenant name {0:?} is not allowed in blob keys")]
    BadTenant(String),
    #[error("blob store error: {0}")]
    Store(#[from] object_store::Error),
    #[error("cannot open blob directory {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// The whole blob store of a node or cluster.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobStore({})", self.store)
    }
}

impl BlobStore {
    /// A store in a local directory, created if missing.
    ///
    /// # Errors
    /// When the directory cannot be created or opened.
    pub fn local(dir: &FsPath) -> Result<Self, BlobError> {
        std::fs::create_dir_all(dir).map_err(|source| BlobError::Open {
            path: dir.display().to_string(),
            source,
        })?;
        // Deleting a task's blobs also removes the directories they leave.
        let store = LocalFileSystem::new_with_prefix(dir)?.with_automatic_cleanup(true);
        Ok(BlobStore {
            store: Arc::new(store),
        })
    }

    /// A store that lives in memory only (tests, benchmarks).
    pub fn in_memory() -> Self {
        BlobStore {
            store: Arc::new(InMemory::new()),
        }
    }

    /// The view of one tenant's blobs.
    ///
    /// # Errors
    /// When the tenant name could escape its prefix (empty, `/`, `..`, ...).
    pub fn tenant(&self, tenant: &str) -> Result<TenantBlobs, BlobError> {
        let ok = !tenant.is_empty()
            && tenant.len() <= 128
            && tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            && tenant != "."
            && tenant != "..";
        if !ok {
            return Err(BlobError::BadTenant(tenant.to_string()));
        }
        Ok(TenantBlobs {
            store: self.store.clone(),
            prefix: format!("tenants/{tenant}"),
        })
    }
}

/// One tenant's blobs; keys are relative to `tenants/<tenant>/`.
#[derive(Clone)]
pub struct TenantBlobs {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl std::fmt::Debug for TenantBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TenantBlobs({})", self.prefix)
    }
}

impl TenantBlobs {
    fn path(&self, key: &str) -> Result<Path, BlobError> {
        validate_key(key)?;
        Ok(Path::from(format!("{}/{key}", self.prefix)))
    }

    /// The full store key of a relative key, e.g. for showing to users.
    pub fn full_key(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    /// Reads a blob; `Ok(None)` when it does not exist.
    ///
    /// # Errors
    /// A denied key, or a store failure.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, BlobError> {
        let path = self.path(key)?;
        match self.store.get(&path).await {
            Ok(got) => Ok(Some(got.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a blob, replacing any previous value.
    ///
    /// # Errors
    /// A denied key, or a store failure.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), BlobError> {
        let path = self.path(key)?;
        self.store.put(&path, PutPayload::from(data)).await?;
        Ok(())
    }

    /// Deletes a blob; deleting one that does not exist is not an error.
    ///
    /// # Errors
    /// A denied key, or a store failure.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        let path = self.path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every blob under a relative prefix (e.g. `tasks/<id>`);
    /// returns how many were deleted.
    ///
    /// # Errors
    /// A denied prefix, or a store failure.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, BlobError> {
        let path = self.path(prefix)?;
        let mut listed = self.store.list(Some(&path));
        let mut deleted = 0;
        while let Some(meta) = listed.next().await {
            let meta = meta?;
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(deleted)
    }
}

/// Checks that a relative key stays inside its tenant's prefix.
///
/// # Errors
/// [`BlobError::Denied`] naming what is wrong with the key.
pub fn validate_key(key: &str) -> Result<(), BlobError> {
    let deny = |why| {
        Err(BlobError::Denied {
            key: key.chars().take(128).collect(),
            why,
        })
    };
    if key.is_empty() {
        return deny("empty key");
    }
    if key.len() > MAX_KEY_LEN {
        return deny("longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return deny("absolute keys are not allowed");
    }
    if key.contains('\\') || key.chars().any(char::is_control) {
        return deny("backslashes and control characters are not allowed");
    }
    for segment in key.split('/') {
        match segment {
            "" => return deny("empty path segment"),
            "." | ".." => return deny("'.' and '..' segments are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_confined() {
        for good in ["a", "tasks/t1/run-0", "x.y/z_w-1", "ünïcode/ok"] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a//b",
            "a/",
            "./a",
            "a\\b",
            "a\nb",
        ] {
            assert!(
                matches!(validate_key(bad), Err(BlobError::Denied { .. })),
                "{bad:?} must be denied"
            );
        }
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn tenant_names_are_checked() {
        let store = BlobStore::in_memory();
        assert!(store.tenant("acme").is_ok());
        for bad in ["", "..", "a/b", "a b"] {
            assert!(store.tenant(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn tenants_do_not_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let a = store.tenant("a").unwrap();
        let b = store.tenant("b").unwrap();
        a.put("k/1", Bytes::from_static(b"one")).await.unwrap();
        assert_eq!(a.get("k/1").await.unwrap().unwrap(), "one");
        assert!(b.get("k/1").await.unwrap().is_none());
        assert!(dir.path().join("tenants/a/k/1").exists());
        a.put("k/2", Bytes::from_static(b"two")).await.unwrap();
        assert_eq!(a.delete_prefix("k").await.unwrap(), 2);
        assert!(a.get("k/2").await.unwrap().is_none());
        a.delete("missing").await.unwrap();
    }

    /// A prefix is whole path segments: the logs of task 5 are not those
    /// of task 50, and another tenant's keys are never listed.
    #[tokio::test]
    async fn a_prefix_deletes_whole_segments_of_one_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let (a, b) = (store.tenant("a").unwrap(), store.tenant("b").unwrap());
        for key in ["logs/5/0-0-1", "logs/5/1-3-2", "logs/50/0-0-1", "logs/5x"] {
            a.put(key, Bytes::from_static(b"line")).await.unwrap();
        }
        b.put("logs/5/0-0-1", Bytes::from_static(b"b's"))
            .await
            .unwrap();
        assert_eq!(a.delete_prefix("logs/5").await.unwrap(), 2);
        assert!(a.get("logs/5/0-0-1").await.unwrap().is_none());
        assert!(a.get("logs/5/1-3-2").await.unwrap().is_none());
        assert!(a.get("logs/50/0-0-1").await.unwrap().is_some());
        assert!(a.get("logs/5x").await.unwrap().is_some());
        assert_eq!(b.get("logs/5/0-0-1").await.unwrap().unwrap(), "b's");
        assert!(
            !dir.path().join("tenants/a/logs/5").exists(),
            "no empty directory is left"
        );
        assert_eq!(a.delete_prefix("logs/5").await.unwrap(), 0);
    }
}
