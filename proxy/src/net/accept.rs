//! The accept loop every TCP front shares: counts open client connections
//! per protocol and stops accepting when told to. A drain waits on
//! [`Connections`] for the sessions to end instead of polling a global count.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rouse_runtime::metric::CLIENT_CONNECTIONS;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::warn;

/// Client connections open on every front: what a shutdown drains.
#[derive(Default)]
pub(crate) struct Connections {
    open: AtomicUsize,
    /// Told when the last open connection closes.
    none_open: Notify,
}

impl Connections {
    pub(crate) fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// One more open connection of `protocol`, for as long as the guard
    /// lives (connections not accepted here: WebSockets of the HTTP port).
    pub(crate) fn track(self: &Arc<Self>, protocol: &'static str) -> OpenConnection {
        OpenConnection::new(protocol, self.clone())
    }

    /// Resolves once no connection is open.
    pub(crate) async fn drained(&self) {
        loop {
            let closed = self.none_open.notified();
            tokio::pin!(closed);
            // Registered before the count is read: a close in between is not missed.
            closed.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// Accepts until `stop` resolves, serving each connection on its own task.
pub(crate) async fn accept_forever<F, Fut>(
    listener: TcpListener,
    protocol: &'static str,
    connections: Arc<Connections>,
    stop: impl Future<Output = ()>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, OpenConnection) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(stop);
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning.
                    warn!(error = %e, protocol, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let _ = socket.set_nodelay(true);
        // The session holds its count (a parked one too, outside its task).
        let open = OpenConnection::new(protocol, connections.clone());
        tokio::spawn(serve(socket, peer, open));
    }
}

/// Counts one open client connection in `rouse_client_connections` and in
/// [`Connections`] for as long as it lives, also when its task is aborted.
pub(crate) struct OpenConnection {
    /// The gauge is looked up again when the connection closes: a handle
    /// held for the connection's life would cost every idle client an
    /// allocation.
    protocol: &'static str,
    connections: Arc<Connections>,
}

impl OpenConnection {
    fn new(protocol: &'static str, connections: Arc<Connections>) -> OpenConnection {
        CLIENT_CONNECTIONS.gauge([protocol.into()]).increment(1.0);
        connections.open.fetch_add(1, Ordering::AcqRel);
        OpenConnection {
            protocol,
            connections,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        CLIENT_CONNECTIONS
            .gauge([self.protocol.into()])
            .decrement(1.0);
        if self.connections.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.connections.none_open.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_ends_when_the_last_connection_closes() {
        let connections = Arc::new(Connections::default());
        connections.drained().await;
        let (a, b) = (
            OpenConnection::new("test", connections.clone()),
            OpenConnection::new("test", connections.clone()),
        );
        assert_eq!(connections.count(), 2);
        let drain = tokio::spawn({
            let connections = connections.clone();
            async move { connections.drained().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!drain.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), drain)
            .await
            .expect("drained once the last connection closed")
            .unwrap();
    }
}
