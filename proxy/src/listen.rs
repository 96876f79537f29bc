//! The accept loop every TCP front shares: counts open client connections
//! per protocol and stops accepting when told to.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// Accepts until `stop` resolves, serving each connection on its own task.
pub async fn accept_forever<F, Fut>(
    listener: TcpListener,
    protocol: &'static str,
    stop: impl Future<Output = ()>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
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
        let open = OpenConnection::new(protocol);
        // A combinator, not an async block: awaiting a moved-in future
        // from an async block would hold it twice in every task.
        tokio::spawn(serve(socket, peer).map(move |()| drop(open)));
    }
}

/// Client connections open on every front: what a shutdown drains.
static OPEN: AtomicUsize = AtomicUsize::new(0);

pub fn open_connections() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// Counts one open client connection in `rouse_client_connections` for
/// as long as it lives, also when its task is aborted.
struct OpenConnection(metrics::Gauge);

impl OpenConnection {
    fn new(protocol: &'static str) -> OpenConnection {
        let gauge = metrics::gauge!("rouse_client_connections", "protocol" => protocol);
        gauge.increment(1.0);
        OPEN.fetch_add(1, Ordering::Relaxed);
        OpenConnection(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.decrement(1.0);
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}
