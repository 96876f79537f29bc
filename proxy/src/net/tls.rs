//! TLS where the proxy needs it: the certificate its clients get (that of
//! `proxy.tls`, or one made at first start) and the Redis front's
//! connector to servers and sentinels (verified against `tls_ca_file`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rouse_config::TlsConfig;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Where the certificate made at first start is kept.
const SELF_SIGNED_DIR: &str = "proxy-tls";

/// The certificate clients get: the configured one, else (unless switched
/// off) one made at first start and kept in `<data_dir>/proxy-tls/`, as
/// Debian's PostgreSQL answers `sslmode=require` with its snakeoil
/// certificate out of the box.
pub(crate) fn certificate(
    config: &rouse_config::ProxyConfig,
    data_dir: &Path,
) -> anyhow::Result<Option<TlsConfig>> {
    match &config.tls {
        Some(tls) => Ok(Some(tls.clone())),
        None if config.self_signed_tls => self_signed(&data_dir.join(SELF_SIGNED_DIR)).map(Some),
        None => Ok(None),
    }
}

/// The certificate and key in `dir`, made there when absent. Made in a
/// directory of their own and renamed into place, so that proxies starting
/// together never pair one's key with another's certificate.
fn self_signed(dir: &Path) -> anyhow::Result<TlsConfig> {
    use anyhow::Context;
    use std::os::unix::fs::DirBuilderExt;
    let files = |dir: &Path| TlsConfig {
        cert_file: dir.join("proxy.crt"),
        key_file: dir.join("proxy.key"),
    };
    let wanted = files(dir);
    if wanted.cert_file.exists() && wanted.key_file.exists() {
        return Ok(wanted);
    }
    let parent = dir.parent().context("the data directory")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = parent.join(format!(".{SELF_SIGNED_DIR}-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let host = crate::app::hostname();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string(), host.clone()])?;
    params.subject_alt_names.extend(
        [
            std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::Ipv6Addr::LOCALHOST.into(),
        ]
        .map(rcgen::SanType::IpAddress),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("rouse proxy on {host}"));
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let made = files(&staging);
    write_new(&made.key_file, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&made.cert_file, cert.pem().as_bytes(), 0o644)?;
    if std::fs::rename(&staging, dir).is_err() {
        // Another proxy put its pair in place first: that one is used.
        let _ = std::fs::remove_dir_all(&staging);
    } else {
        tracing::info!(cert = %wanted.cert_file.display(), "made a self-signed certificate for TLS clients (set proxy.tls to use your own)");
    }
    Ok(wanted)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    Ok(())
}

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
    fn a_self_signed_certificate_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let data = tempfile::tempdir().unwrap();
        let config = rouse_config::ProxyConfig::default();
        let made = certificate(&config, data.path()).unwrap().unwrap();
        let key_mode = std::fs::metadata(&made.key_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o077, 0, "the key is readable by others");
        let first = std::fs::read(&made.cert_file).unwrap();
        acceptor(&made).expect("a usable certificate");
        // The next start keeps it: clients that pinned it go on working.
        let again = certificate(&config, data.path()).unwrap().unwrap();
        assert_eq!(std::fs::read(&again.cert_file).unwrap(), first);
        // Switched off, there is none.
        let off = rouse_config::ProxyConfig {
            self_signed_tls: false,
            ..Default::default()
        };
        assert!(certificate(&off, data.path()).unwrap().is_none());
    }

    #[test]
    fn a_missing_ca_file_is_reported() {
        assert!(matches!(
            connector(Path::new("/nonexistent/ca.pem")),
            Err(TlsSetupError::CaFile { .. })
        ));
    }
}
