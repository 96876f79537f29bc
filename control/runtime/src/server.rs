//! What both daemons do around their servers: a higher open-file limit, a
//! shutdown future that resolves on SIGTERM or Ctrl-C, TLS from PEM files,
//! and HTTP/1.1 on an already-bound listener.

use std::sync::Arc;

use rouse_config::TlsConfig;
use tokio_rustls::TlsAcceptor;

/// A TLS acceptor for the certificate chain and key of `tls` (PEM).
pub fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert_file, key_file) = (&tls.cert_file, &tls.key_file);
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("cannot read {}: {e}", cert_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate in {}: {e}", cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("cannot read key {}: {e}", key_file.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Servers with thousands of connections need more than the default 1024:
/// raise the soft limit to the hard one.
pub fn raise_open_file_limit() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The service of one connection, as both daemons write it.
pub trait Handler<B>:
    hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = hyper::Response<B>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<S, B> Handler<B> for S where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// A response body hyper can send from any thread.
pub trait ResponseBody:
    hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> ResponseBody for B where
    B: hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// TLS on an HTTP listener. A connection whose first byte starts a TLS
/// handshake gets TLS; any other is plain HTTP, served only where `plain`
/// allows it and otherwise answered 400 `tls_required` (HAProxy and nginx
/// answer plain HTTP on an HTTPS port alike).
#[derive(Clone)]
pub struct ListenerTls {
    pub acceptor: TlsAcceptor,
    pub plain: bool,
}

/// A TLS record of type handshake: what every TLS client sends first.
const TLS_HANDSHAKE: u8 = 0x16;

const TLS_REQUIRED: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 71\r\n\r\n{\"error\":\"this port requires TLS: use https://\",\"code\":\"tls_required\"}\n";

/// Serves HTTP/1.1 (over TLS when `tls` is given) on an already-bound
/// listener until `shutdown` resolves; open connections then get `drain`
/// to finish. `service` makes the service of one connection from the
/// peer's address. Open connections are the gauge
/// `rouse_client_connections{protocol}`.
#[allow(clippy::too_many_arguments)]
pub async fn serve_http<F, S, B>(
    listener: tokio::net::TcpListener,
    tls: Option<ListenerTls>,
    protocol: &'static str,
    header_read_timeout: std::time::Duration,
    drain: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
    service: F,
) where
    F: Fn(std::net::SocketAddr) -> S,
    S: Handler<B>,
    B: ResponseBody,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (svc, watcher, tls) = (service(peer), graceful.watcher(), tls.clone());
        let open = crate::metric::CLIENT_CONNECTIONS.gauge([protocol.into()]);
        open.increment(1.0);
        tokio::spawn(async move {
            let served = match tls {
                Some(tls) => {
                    serve_tls_or_plain(stream, tls, svc, watcher, header_read_timeout).await
                }
                None => serve_one(stream, svc, watcher, header_read_timeout).await,
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            open.decrement(1.0);
        });
    }
    drop(listener);
    // A connection accepted just now may have its request on the way: give it
    // time to be read, so that it is answered rather than closed as idle.
    tokio::time::sleep(drain.min(std::time::Duration::from_millis(300))).await;
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}

/// One connection of a listener with TLS: over TLS when it starts a
/// handshake, else plain or refused as the listener says. The handshake
/// counts as part of the request head.
async fn serve_tls_or_plain<S, B>(
    stream: tokio::net::TcpStream,
    tls: ListenerTls,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    header_read_timeout: std::time::Duration,
) -> Result<(), String>
where
    S: Handler<B>,
    B: ResponseBody,
{
    let deadline = tokio::time::Instant::now() + header_read_timeout;
    let mut first = [0u8; 1];
    let starts_tls = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(n)) => n == 1 && first[0] == TLS_HANDSHAKE,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no request in time".into()),
    };
    if starts_tls {
        match tokio::time::timeout_at(deadline, tls.acceptor.accept(stream)).await {
            Ok(Ok(stream)) => serve_one(stream, service, watcher, header_read_timeout).await,
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err("TLS handshake timed out".into()),
        }
    } else if tls.plain {
        serve_one(stream, service, watcher, header_read_timeout).await
    } else {
        use tokio::io::AsyncWriteExt;
        let mut stream = stream;
        stream
            .write_all(TLS_REQUIRED)
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.shutdown().await;
        Ok(())
    }
}

async fn serve_one<I, S, B>(
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    header_read_timeout: std::time::Duration,
) -> Result<(), String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Handler<B>,
    B: ResponseBody,
{
    // HTTP/1.1 only; upgrades (WebSocket) are handed to the service.
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .http1_only();
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let conn = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), service);
    watcher.watch(conn).await.map_err(|e| e.to_string())
}

/// How a daemon's command ends: success, or its error on stderr (prefixed
/// with the binary's name) and a failing exit code.
pub fn exit_code<E: std::fmt::Display>(
    binary: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
