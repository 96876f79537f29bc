//! A transaction-pooled client session: between transactions it holds no
//! backend connection and waits for its next message; after
//! [`PARK_AFTER`] without one, the client is parked outside the runtime
//! (no task; a plain TCP client no reactor registration either) until it
//! speaks, which is what makes ten thousand idle clients cheap. Each
//! transaction runs in a boxed future, so the waiting task stays small too.

use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::futures::Notified;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use super::backend::BackendTarget;
use super::clients;
use super::error::PgError;
use super::proto::messages;
use super::traffic::Meter;
use super::{pool, Mode, PgFront, Started};
use crate::activity::InFlight;
use crate::net::park::{self, Resume};
use crate::net::{MaybeTls, OpenConnection};

/// How long a client says nothing before it is parked. Parking and
/// coming back cost a few system calls and a thread hop, nothing a
/// client that speaks less than once a second would notice.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Everything a transaction-pooled session keeps between transactions,
/// on the heap; parked, this is all of it.
pub(super) struct PooledClient {
    pub(super) front: Arc<PgFront>,
    /// `MaybeTls::Upgrading` while a plain client is parked (the parker
    /// holds the socket); a parked TLS client keeps its stream here.
    pub(super) client: MaybeTls,
    pub(super) started: Started,
    pub(super) meter: Meter,
    pub(super) statements: pool::Statements,
    pub(super) _in_session: InFlight,
    pub(super) _open: OpenConnection,
}

enum Idle {
    /// A message (or the end) is there to read.
    Readable,
    Park,
    Killed,
}

enum Ended {
    Left,
    Killed,
    Failed(PgError),
}

impl PooledClient {
    /// Serves transactions until the client leaves, KILL ends it, or it
    /// is parked (and [`Resume`] takes up here again). `buf` holds what
    /// the client sent beyond the last whole message; it lives here, not
    /// in the session, since a session is parked only with nothing in it.
    pub(super) async fn serve(mut self: Box<Self>, mut buf: BytesMut) {
        let registered = self.started.registered.client.clone();
        // One KILL listener and one park timer for the task's life, not
        // one each per transaction: a busy client moves the timer on about
        // once a second.
        let kill = registered.kill.notified();
        let park_timer = tokio::time::sleep(PARK_AFTER);
        tokio::pin!(kill, park_timer);
        let mut last_served = Instant::now();
        let ended = loop {
            if buf.is_empty() {
                // An idle client keeps no buffer.
                buf = BytesMut::new();
                let waited = match self.socket_to_watch() {
                    Some(socket) => {
                        idle(socket, kill.as_mut(), park_timer.as_mut(), last_served).await
                    }
                    None => Idle::Readable,
                };
                match waited {
                    Idle::Readable => {}
                    Idle::Killed => break Ended::Killed,
                    Idle::Park => return self.park(&registered),
                }
            }
            tokio::select! {
                served = Box::pin(self.next_transaction(&mut buf)) => match served {
                    Ok(true) => last_served = Instant::now(),
                    Ok(false) => break Ended::Left,
                    Err(e) => break Ended::Failed(e),
                },
                _ = kill.as_mut() => break Ended::Killed,
            }
        };
        Box::pin(self.end(ended)).await;
    }

    /// The socket whose readiness says the client spoke: a plain one, or
    /// the one under TLS when the TLS layer holds nothing already read or
    /// still to send. A WebSocket, or TLS with bytes in hand, waits inside
    /// its read instead.
    fn socket_to_watch(&self) -> Option<&tokio::net::TcpStream> {
        match &self.client {
            MaybeTls::Plain(socket) => Some(socket),
            MaybeTls::Tls(tls) => match tls.as_ref() {
                tokio_rustls::TlsStream::Server(tls) => {
                    let (socket, session) = tls.get_ref();
                    (session.wants_read() && !session.wants_write()).then_some(socket)
                }
                tokio_rustls::TlsStream::Client(_) => None,
            },
            MaybeTls::WebSocket(_) | MaybeTls::Upgrading => None,
        }
    }

    async fn next_transaction(&mut self, buf: &mut BytesMut) -> Result<bool, PgError> {
        let Mode::Transaction(pool, upstream) = &self.started.mode else {
            unreachable!("only transaction-pooled sessions are served here");
        };
        let (front, key) = (&self.front, &self.started.key);
        let addr = move |stale| -> futures::future::BoxFuture<'_, _> {
            Box::pin(front.pooled_addr(key, upstream, stale))
        };
        pool::next_transaction(
            &mut self.client,
            buf,
            pool,
            addr,
            &self.started.registered.client.cancel_to,
            &mut self.meter,
            &mut self.statements,
        )
        .await
    }

    /// Hands the socket to the parker; this task ends here. A plain
    /// socket leaves the runtime; under TLS the stream stays with the
    /// session (its TLS state is in it) and the parker watches a duplicate
    /// of its descriptor, dropped when the client comes back.
    fn park(mut self: Box<Self>, registered: &clients::Client) {
        let watched = match &self.client {
            MaybeTls::Tls(_) => self
                .socket_to_watch()
                .expect("parked only after waiting on its socket")
                .as_fd()
                .try_clone_to_owned()
                .map(std::net::TcpStream::from),
            _ => match std::mem::replace(&mut self.client, MaybeTls::Upgrading) {
                MaybeTls::Plain(socket) => socket.into_std(),
                _ => unreachable!("only plain TCP and TLS clients park"),
            },
        };
        match watched {
            Ok(socket) => {
                if let Some(ticket) = park::park(socket, self) {
                    registered.parked(ticket);
                }
            }
            Err(e) => {
                // Nothing can watch the socket: the session ends.
                debug!(error = %e, "an idle client could not be parked");
                tokio::spawn(self.end(Ended::Failed(PgError::Backend(e.to_string()))));
            }
        }
    }

    async fn end(mut self: Box<Self>, ended: Ended) {
        let last = match ended {
            Ended::Left => None,
            Ended::Killed => Some(messages::fatal(
                "57P01",
                "terminating connection due to administrator command",
            )),
            Ended::Failed(e) => {
                debug!(database = %self.started.key, error = %e, "pooled postgres session ended");
                Some(e.frame())
            }
        };
        if let Some(last) = last {
            let _ = self.client.write_all(&last).await;
        }
        // Boxed: its state would otherwise size every session's task.
        let cancel_key = self.started.registered.client.cancel_key;
        Box::pin(self.front.cancels.unshare(cancel_key)).await;
    }
}

/// Waits for a client's next message on its socket; `Park` once it has said
/// nothing for [`PARK_AFTER`] since `last_served`. The timer may have been
/// set for an earlier transaction: when it rings early, it is moved on.
async fn idle(
    socket: &tokio::net::TcpStream,
    mut kill: Pin<&mut Notified<'_>>,
    mut park_timer: Pin<&mut Sleep>,
    last_served: Instant,
) -> Idle {
    loop {
        tokio::select! {
            biased;
            _ = kill.as_mut() => return Idle::Killed,
            // An error shows on the read.
            _ = socket.readable() => return Idle::Readable,
            _ = park_timer.as_mut() => {
                let due = last_served + PARK_AFTER;
                if Instant::now() >= due {
                    return Idle::Park;
                }
                park_timer.as_mut().reset(due);
            }
        }
    }
}

impl Resume for PooledClient {
    fn resume(self: Box<Self>, socket: std::net::TcpStream) {
        let runtime = self.front.runtime.clone();
        runtime.spawn(self.resumed(socket));
    }
}

impl PooledClient {
    async fn resumed(mut self: Box<Self>, socket: std::net::TcpStream) {
        // A TLS client kept its stream: `socket` was the duplicate watched.
        if matches!(self.client, MaybeTls::Upgrading) {
            match tokio::net::TcpStream::from_std(socket) {
                Ok(socket) => self.client = MaybeTls::Plain(socket),
                Err(e) => {
                    return self
                        .end(Ended::Failed(PgError::Backend(e.to_string())))
                        .await
                }
            }
        }
        self.serve(BytesMut::new()).await
    }
}

impl PgFront {
    /// Where a pooled session's next transaction goes: held while its
    /// database is paused (as PgBouncer's PAUSE does), then resolved,
    /// again when `stale`.
    pub(super) async fn pooled_addr(
        &self,
        key: &rouse_control_api::DbKey,
        upstream: &BackendTarget,
        stale: bool,
    ) -> Result<std::net::SocketAddr, PgError> {
        if !self.clients.unpaused(key, self.pause_hold).await {
            return Err(PgError::Paused(key.db.to_string()));
        }
        upstream.addr(key, &self.resolver, stale).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each idle client keeps one of each, on the heap: a field that makes
    /// either bigger moves the idle figure of `docs/performance.md` (the
    /// allocator rounds them up to 224 and, with its reference counts,
    /// 160 bytes).
    #[test]
    fn an_idle_session_stays_small() {
        let sizes = (
            std::mem::size_of::<PooledClient>(),
            std::mem::size_of::<clients::Client>(),
        );
        assert!(sizes.0 <= 224 && sizes.1 <= 144, "{sizes:?}");
    }
}
