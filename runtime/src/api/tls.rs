//! TLS for every gRPC connection of a node or client (rustls, through
//! tonic's `tls-ring` feature).
//!
//! A node with a `[tls]` table serves its one port (Raft transport, `Meta`,
//! the public API) over TLS with its certificate, and dials its peers and
//! schedulers over TLS trusting `ca`. With `client_auth = true` it also
//! demands a certificate signed by `ca` from every client: mutual TLS
//! between nodes, and for CLI users holding a client certificate.
//!
//! Outgoing connections of a process share one client setting, installed
//! once at start-up with [`install_client`]; [`endpoint`] applies it to
//! every channel the process opens.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::meta::MetaError;

/// The `[tls]` table of a node's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of this node; its names (DNS or IP) must cover
    /// the address others dial.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM certificate(s) of the authority that signed the cluster's
    /// certificates; trusted when dialling other nodes.
    pub ca: Option<PathBuf>,
    /// Demand a client certificate signed by `ca` on every connection.
    pub client_auth: bool,
}

impl TlsConfig {
    /// Whether the table turns TLS on (a certificate and key are given).
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }

    /// Checks that the table is complete and every file readable.
    ///
    /// # Errors
    /// [`MetaError::Config`] naming the missing key or unreadable file.
    pub fn validate(&self) -> Result<(), MetaError> {
        if !self.enabled() {
            if self.ca.is_some() || self.client_auth {
                return Err(MetaError::Config(
                    "tls: ca and client_auth need cert and key too".into(),
                ));
            }
            return Ok(());
        }
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err(MetaError::Config(
                "tls: cert and key must be given together".into(),
            ));
        };
        if self.ca.is_none() {
            return Err(MetaError::Config(
                "tls: ca is required (nodes dial each other and must trust their certificates)"
                    .into(),
            ));
        }
        for path in [cert, key].into_iter().chain(self.ca.as_ref()) {
            read_pem(path)?;
        }
        Ok(())
    }

    /// The server side: this node's identity, and the client CA when
    /// `client_auth` is set.
    ///
    /// # Errors
    /// [`MetaError::Config`] for an unreadable file.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, MetaError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Ok(None);
        };
        let mut tls =
            ServerTlsConfig::new().identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
        if self.client_auth {
            let ca = self.ca.as_ref().expect("validated: ca with client_auth");
            tls = tls.client_ca_root(Certificate::from_pem(read_pem(ca)?));
        }
        Ok(Some(tls))
    }

    /// The client side of a node: trust `ca`, present this node's
    /// certificate (servers with `client_auth` demand it).
    ///
    /// # Errors
    /// [`MetaError::Config`] for an unreadable file.
    pub fn client(&self) -> Result<Option<ClientTlsConfig>, MetaError> {
        if !self.enabled() {
            return Ok(None);
        }
        client_config(
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )
        .map(Some)
    }
}

/// A client TLS setting: trust `ca` (required: clusters use their own
/// authority), and present `cert`/`key` when both are given.
///
/// # Errors
/// [`MetaError::Config`] for an unreadable file or a certificate without
/// its key.
pub fn client_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<ClientTlsConfig, MetaError> {
    let mut tls = ClientTlsConfig::new();
    match ca {
        Some(ca) => tls = tls.ca_certificate(Certificate::from_pem(read_pem(ca)?)),
        None => {
            return Err(MetaError::Config(
                "tls: a CA certificate is needed to verify the server".into(),
            ))
        }
    }
    match (cert, key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(MetaError::Config(
                "tls: a client certificate and its key must be given together".into(),
            ))
        }
    }
    Ok(tls)
}

static CLIENT: OnceLock<ClientTlsConfig> = OnceLock::new();

/// Makes every connection this process opens from now on use TLS with
/// `tls`. The first call wins; later calls with a different setting are
/// refused (a process has one client identity).
///
/// # Errors
/// [`MetaError::Config`] when another setting is already installed.
pub fn install_client(tls: ClientTlsConfig) -> Result<(), MetaError> {
    let mut tls = Some(tls);
    CLIENT.get_or_init(|| tls.take().expect("taken once"));
    match tls {
        // Ours went in.
        None => Ok(()),
        Some(_) => Err(MetaError::Config(
            "tls: this process already uses another client TLS setting".into(),
        )),
    }
}

/// Whether outgoing connections use TLS.
pub fn client_enabled() -> bool {
    CLIENT.get().is_some()
}

/// An endpoint for `addr` (host:port): `https` with the installed client
/// TLS setting, plain `http` otherwise.
///
/// # Errors
/// [`MetaError::Invalid`] for a malformed address; [`MetaError::Config`]
/// when the TLS setting cannot apply to it.
pub fn endpoint(addr: &str) -> Result<Endpoint, MetaError> {
    let scheme = if client_enabled() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| MetaError::Invalid(format!("bad address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    match CLIENT.get() {
        Some(tls) => endpoint
            .tls_config(tls.clone())
            .map_err(|e| MetaError::Config(format!("tls for {addr}: {e}"))),
        None => Ok(endpoint),
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, MetaError> {
    let bytes = std::fs::read(path)
        .map_err(|e| MetaError::Config(format!("tls: cannot read {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(MetaError::Config(format!(
            "tls: {} is not a PEM file (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_tables_are_refused_with_the_missing_key() {
        assert!(TlsConfig::default().validate().is_ok());
        let only_cert = TlsConfig {
            cert: Some("c.pem".into()),
            ..TlsConfig::default()
        };
        assert!(only_cert
            .validate()
            .unwrap_err()
            .to_string()
            .contains("cert and key must be given together"));
        let no_ca = TlsConfig {
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..TlsConfig::default()
        };
        assert!(no_ca
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ca is required"));
        let auth_alone = TlsConfig {
            client_auth: true,
            ..TlsConfig::default()
        };
        assert!(auth_alone.validate().is_err());
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, b"not a certificate").unwrap();
        let cfg = TlsConfig {
            cert: Some(junk.clone()),
            key: Some(dir.path().join("missing.pem")),
            ca: Some(junk.clone()),
            client_auth: false,
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("junk.pem") && e.contains("not a PEM file"),
            "{e}"
        );
        std::fs::write(&junk, b"-----BEGIN CERTIFICATE-----\n").unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
    }
}
