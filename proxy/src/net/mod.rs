//! Sockets: the accept loop every TCP front shares (and what a drain waits
//! for), connections that may be inside TLS or a WebSocket, and the TLS
//! set-up.

mod accept;
mod stream;
pub(crate) mod tls;
pub(crate) mod websocket;

pub(crate) use accept::{accept_forever, Connections};
pub(crate) use stream::MaybeTls;
