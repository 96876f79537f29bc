//! A WebSocket on the HTTP port as a byte stream: the upgrade handshake
//! (RFC 6455), then binary messages read and written as the bytes of
//! whatever protocol rides inside (the PostgreSQL wire, for the serverless
//! drivers' `Pool` and `Client`). Framing, masking, pings and the close
//! handshake are tungstenite's.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Largest message a client may send: PostgreSQL's messages as the proxy
/// relays them, and then some.
const MAX_MESSAGE: usize = 64 << 20;

/// Whether `req` asks to become a WebSocket.
pub(crate) fn is_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(UPGRADE, "websocket") && has(CONNECTION, "upgrade")
}

/// The answer to an upgrade request, and the WebSocket it becomes once
/// sent; an answer alone (400) when the request is no valid handshake.
pub(crate) fn accept<B: Default>(
    req: Request<Incoming>,
) -> (
    Response<B>,
    Option<impl std::future::Future<Output = io::Result<WsStream>>>,
) {
    let key = req.headers().get(SEC_WEBSOCKET_KEY).cloned();
    let version_13 = req
        .headers()
        .get("sec-websocket-version")
        .is_some_and(|v| v == "13");
    let Some(key) = key.filter(|_| version_13 && req.method() == hyper::Method::GET) else {
        let mut refused = Response::new(B::default());
        *refused.status_mut() = StatusCode::BAD_REQUEST;
        return (refused, None);
    };
    let mut switching = Response::new(B::default());
    *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = switching.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .expect("base64 is a valid header value"),
    );
    let upgraded = async move {
        let io = hyper::upgrade::on(req).await.map_err(io::Error::other)?;
        let config = WebSocketConfig::default()
            // Idle sessions keep a small buffer; writes go out at once.
            .read_buffer_size(8 << 10)
            .write_buffer_size(0)
            .max_message_size(Some(MAX_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, Some(config)).await;
        Ok(WsStream {
            ws,
            unread: Bytes::new(),
        })
    };
    (switching, Some(upgraded))
}

/// A server-side WebSocket read and written as bytes.
pub(crate) struct WsStream {
    ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    /// What the last message left unread.
    unread: Bytes,
}

impl AsyncRead for WsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.unread.is_empty() {
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.unread = b,
                Some(Ok(Message::Text(t))) => this.unread = Bytes::from(t),
                // The peer closed, or the stream ended: end of file.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                // Pings are answered by tungstenite itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = &mut self.get_mut().ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(io::Error::other)?;
        Pin::new(&mut *ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io::Error::other)?;
        // Written eagerly (no write buffer); a socket that would block keeps
        // the rest for the next write or flush.
        if let Poll::Ready(Err(e)) = Pin::new(ws).poll_flush(cx) {
            return Poll::Ready(Err(io::Error::other(e)));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}
