//! Sockets: the accept loop every TCP front shares (and what a drain waits
//! for), connections that may be inside TLS or a WebSocket, the TLS
//! set-up, and idle sockets parked outside the runtime.

mod accept;
pub(crate) mod park;
mod stream;
pub(crate) mod tls;
pub(crate) mod websocket;

pub(crate) use accept::{accept_forever, Connections, OpenConnection};
pub(crate) use stream::MaybeTls;
