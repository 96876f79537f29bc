//! Connections to Redis servers and sentinels: plain TCP, or TLS verified
//! against `tls_ca_file` when it is set.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
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

/// Opens links, TLS or not, the same way for checks and relayed clients.
pub struct Dialer {
    tls: Option<TlsConnector>,
}

impl Dialer {
    pub fn new(tls_ca_file: Option<&Path>) -> Result<Dialer, TlsSetupError> {
        let Some(path) = tls_ca_file else {
            return Ok(Dialer { tls: None });
        };
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let ca_error = |source| TlsSetupError::CaFile {
            path: path.to_path_buf(),
            source,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(path).map_err(ca_error)? {
            roots.add(cert.map_err(ca_error)?)?;
        }
        if roots.is_empty() {
            return Err(TlsSetupError::NoCa(path.to_path_buf()));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Dialer {
            tls: Some(TlsConnector::from(Arc::new(config))),
        })
    }

    /// Connects to `addr` (`host:port`); with TLS, the host is the name
    /// the server's certificate must carry.
    pub async fn connect(&self, addr: &str) -> io::Result<Link> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Link::Plain(tcp));
        };
        let name = ServerName::try_from(host_of(addr).to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{addr}: not a TLS server name"),
            )
        })?;
        Ok(Link::Tls(Box::new(tls.connect(name, tcp).await?.into())))
    }
}

/// The host of `host:port`, IPv6 brackets removed.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A connection to a Redis server or sentinel.
pub use crate::stream::Stream as Link;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_of("127.0.0.1:6379"), "127.0.0.1");
        assert_eq!(host_of("redis-1.internal:6380"), "redis-1.internal");
        assert_eq!(host_of("[::1]:6379"), "::1");
    }

    #[test]
    fn a_missing_ca_file_is_reported() {
        assert!(matches!(
            Dialer::new(Some(Path::new("/nonexistent/ca.pem"))),
            Err(TlsSetupError::CaFile { .. })
        ));
    }
}
