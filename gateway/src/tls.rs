//! Native TLS for the public port (`https://`, `wss://`) with rustls, for deployments without a
//! TLS-terminating ingress: the certificate and key come from PEM files and are loaded again
//! when the files change, so a renewed certificate needs no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading certificates from {path}: {reason}")]
    Certificates { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("reading the private key from {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the private key is of an unsupported type: {0}")]
    UnsupportedKey(String),
    #[error("tls setup: {0}")]
    Setup(#[from] rustls::Error),
}

/// Loads a certificate chain and its private key from PEM files.
pub fn load(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect())
        .map_err(|e| TlsError::Certificates {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Key {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let signing_key = ring::sign::any_supported_type(&key)
        .map_err(|e| TlsError::UnsupportedKey(e.to_string()))?;
    Ok(CertifiedKey::new(chain, signing_key))
}

/// Hands every handshake the current certificate; [`watch`] replaces it when the files change.
#[derive(Debug)]
pub struct CertificateSlot(RwLock<Arc<CertifiedKey>>);

impl CertificateSlot {
    fn current(&self) -> Arc<CertifiedKey> {
        // A panic while holding this lock cannot leave a half-written Arc behind.
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, key: CertifiedKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }
}

impl ResolvesServerCert for CertificateSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The files of one certificate and how often to look at them.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub reload_every: Duration,
}

/// The rustls server configuration (HTTP/1.1 only: WebSockets here upgrade HTTP/1.1) and the
/// slot that [`watch`] keeps current.
pub fn server_config(
    files: &TlsFiles,
) -> Result<(rustls::ServerConfig, Arc<CertificateSlot>), TlsError> {
    let slot = Arc::new(CertificateSlot(RwLock::new(Arc::new(load(
        &files.cert,
        &files.key,
    )?))));
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, slot))
}

fn modified(files: &TlsFiles) -> Option<(SystemTime, SystemTime)> {
    let cert = std::fs::metadata(&files.cert)
        .and_then(|m| m.modified())
        .ok()?;
    let key = std::fs::metadata(&files.key)
        .and_then(|m| m.modified())
        .ok()?;
    Some((cert, key))
}

/// Loads the certificate again whenever either file's modification time changes, until
/// `shutdown`. A file that does not load (for example, the key written before the certificate)
/// keeps the previous certificate in use and is tried again at the next look.
pub async fn watch(files: TlsFiles, slot: Arc<CertificateSlot>, shutdown: CancellationToken) {
    let mut seen = modified(&files);
    let mut ticker = tokio::time::interval(files.reload_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = modified(&files);
        if now.is_none() || now == seen {
            continue;
        }
        match load(&files.cert, &files.key) {
            Ok(key) => {
                slot.replace(key);
                seen = now;
                tracing::info!(cert = %files.cert.display(), "tls certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "tls certificate changed but does not load; keeping the old one")
            }
        }
    }
}
