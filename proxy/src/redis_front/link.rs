//! Connections to Redis servers and sentinels: plain TCP, or TLS verified
//! against `tls_ca_file` when it is set (see `net::tls`).

use std::io;
use std::path::Path;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::net::tls::{self, TlsSetupError};
use crate::net::MaybeTls;

/// Opens links, TLS or not, the same way for checks and relayed clients.
pub(crate) struct Dialer {
    tls: Option<TlsConnector>,
}

impl Dialer {
    pub(crate) fn new(tls_ca_file: Option<&Path>) -> Result<Dialer, TlsSetupError> {
        Ok(Dialer {
            tls: tls_ca_file.map(tls::connector).transpose()?,
        })
    }

    /// Connects to `addr` (`host:port`); with TLS, the host is the name
    /// the server's certificate must carry.
    pub(crate) async fn connect(&self, addr: &str) -> io::Result<MaybeTls> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let name = ServerName::try_from(host_of(addr).to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{addr}: not a TLS server name"),
            )
        })?;
        Ok(MaybeTls::Tls(Box::new(
            tls.connect(name, tcp).await?.into(),
        )))
    }
}

/// The host of `host:port`, IPv6 brackets removed.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_of("127.0.0.1:6379"), "127.0.0.1");
        assert_eq!(host_of("redis-1.internal:6380"), "redis-1.internal");
        assert_eq!(host_of("[::1]:6379"), "::1");
    }
}
