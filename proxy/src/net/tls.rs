//! TLS where the proxy needs it: the PostgreSQL front's acceptor (the
//! certificate of `proxy.tls`) and the Redis front's connector to servers
//! and sentinels (verified against `tls_ca_file`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rouse_config::TlsConfig;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The acceptor for clients that ask for TLS.
pub(crate) fn acceptor(config: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    rouse_runtime::server::tls_acceptor(config).map_err(|e| anyhow::anyhow!(e))
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsSetupError {
    #[error("cannot read CA certificates from {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("no usable CA certificate in {0}")]
    NoCa(PathBuf),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// A connector that trusts the CA certificates in `ca_file` only.
pub(crate) fn connector(ca_file: &Path) -> Result<TlsConnector, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let ca_error = |source| TlsSetupError::CaFile {
        path: ca_file.to_path_buf(),
        source,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(ca_error)? {
        roots.add(cert.map_err(ca_error)?)?;
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoCa(ca_file.to_path_buf()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_ca_file_is_reported() {
        assert!(matches!(
            connector(Path::new("/nonexistent/ca.pem")),
            Err(TlsSetupError::CaFile { .. })
        ));
    }
}
