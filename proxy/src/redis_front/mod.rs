//! The Redis front: `REDIS_URL` pointed at the proxy reaches the current
//! master, found through Sentinel or by `ROLE` over a static list.
//!
//! Every `check_interval` (and at once when a client arrives while no master
//! is known, or cannot reach the known one, or a sentinel announces
//! `+switch-master`) the sentinels are asked in turn
//! for the master's address, which must then confirm with `ROLE`; without
//! sentinels each listed server is asked its role. Clients are relayed byte
//! for byte to the master of the moment, so they authenticate themselves;
//! the configured credentials serve the checks only. When the master
//! changes, every session on the old one is closed and reconnecting clients
//! land on the new one; a client arriving while there is none waits (at most
//! [`MASTER_WAIT`]) instead of being refused. With `tls_ca_file`, the proxy
//! speaks TLS to servers and sentinels alike (a TLS deployment secures
//! both), clients plain TCP to the proxy.

mod check;
mod link;
pub(crate) mod resp;
mod switches;

use crate::metrics::REQUESTS;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::future::join_all;
use rouse_config::RedisBackend;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use self::check::{CheckError, Checker, Role};
use self::link::Dialer;
use crate::health::Health;
use crate::net::{accept_forever, Connections, MaybeTls, OpenConnection};

/// How long a client waits for a master before it is dropped.
pub(crate) const MASTER_WAIT: Duration = Duration::from_secs(30);
/// Connecting to the master for a client, TLS handshake included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Rounds in a row without an answering master before the known one is
/// given up (one slow answer from a busy master must not cut its clients).
const FALL: u32 = 3;
/// A zero `check_interval` must not make the checks spin.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// The master of the moment. A new `epoch` for each change, so that a
/// session notices a switch away and back to the same address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Master {
    addr: Arc<str>,
    epoch: u64,
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("no Redis master known within {0:?}")]
    NoMaster(Duration),
    #[error("Redis master {addr}: {source}")]
    Master { addr: Arc<str>, source: io::Error },
}

struct Front {
    backend: RedisBackend,
    dialer: Arc<Dialer>,
    checker: Checker,
    master: watch::Sender<Option<Master>>,
    resolve_now: Arc<Notify>,
    /// Whether each server is the master, in metrics and on the stats page.
    health: Arc<Health>,
}

pub(crate) async fn serve(
    listener: TcpListener,
    backend: RedisBackend,
    health: Arc<Health>,
    connections: Arc<Connections>,
    stop: impl Future<Output = ()>,
) {
    let dialer = match Dialer::new(backend.tls_ca_file.as_deref()) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            error!(error = %e, "Redis front not started");
            return;
        }
    };
    for server in &backend.servers {
        health.record("redis", server, "master", false);
    }
    let front = Arc::new(Front {
        checker: Checker::new(
            dialer.clone(),
            backend.username.clone(),
            backend.password.clone(),
            backend.sentinel_password.clone(),
        ),
        backend,
        dialer,
        master: watch::Sender::new(None),
        resolve_now: Arc::new(Notify::new()),
        health,
    });
    tokio::spawn(resolve_forever(Arc::downgrade(&front)));
    for sentinel in &front.backend.sentinels {
        tokio::spawn(switches::follow(Arc::downgrade(&front), sentinel.clone()));
    }
    accept_forever(
        listener,
        "redis",
        connections,
        stop,
        move |client, peer, open| front.clone().session(client, peer, open),
    )
    .await
}

/// What one round of checks learned.
#[derive(Default)]
struct Round {
    master: Option<String>,
    /// Servers that answered with another role than master.
    not_master: Vec<String>,
    errors: Vec<CheckError>,
}

/// The resolver's memory between rounds.
#[derive(Default)]
struct Resolver {
    epoch: u64,
    /// Rounds in a row that found no master.
    failures: u32,
    /// The sentinel that answered last is asked first.
    sentinel: usize,
}

/// Resolves the master until the front is dropped.
async fn resolve_forever(front: Weak<Front>) {
    let mut resolver = Resolver::default();
    loop {
        let Some(f) = front.upgrade() else { return };
        let round = if f.backend.sentinels.is_empty() {
            f.ask_servers().await
        } else {
            f.ask_sentinels(&mut resolver).await
        };
        f.apply(round, &mut resolver);
        let interval = f.backend.check_interval.max(MIN_CHECK_INTERVAL);
        let now = f.resolve_now.clone();
        drop(f);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = now.notified() => {}
        }
    }
}

impl Front {
    /// Sentinels in turn, from the one that answered last, until one names
    /// a server that confirms it is the master.
    async fn ask_sentinels(&self, resolver: &mut Resolver) -> Round {
        let name = self.backend.master_name.as_deref().unwrap_or_default();
        let sentinels = &self.backend.sentinels;
        let mut round = Round::default();
        let mut asked = Vec::new();
        for i in 0..sentinels.len() {
            let at = (resolver.sentinel + i) % sentinels.len();
            let addr = match self.checker.sentinel_master(&sentinels[at], name).await {
                Ok(addr) => addr,
                Err(e) => {
                    round.errors.push(e);
                    continue;
                }
            };
            if asked.contains(&addr) {
                continue;
            }
            asked.push(addr.clone());
            match self.checker.role(&addr).await {
                Ok(Role::Master) => {
                    resolver.sentinel = at;
                    round.master = Some(addr);
                    break;
                }
                Ok(_) => round.not_master.push(addr),
                Err(e) => round.errors.push(e),
            }
        }
        round
    }

    /// Every listed server at once; the current master keeps its place
    /// while it still says master (two may during a manual switch).
    async fn ask_servers(&self) -> Round {
        let servers = &self.backend.servers;
        let roles = join_all(servers.iter().map(|s| self.checker.role(s))).await;
        let current = self.master.borrow().as_ref().map(|m| m.addr.clone());
        let mut round = Round::default();
        let mut masters = Vec::new();
        for (server, role) in servers.iter().zip(roles) {
            match role {
                Ok(Role::Master) => masters.push(server),
                Ok(_) => round.not_master.push(server.clone()),
                Err(e) => round.errors.push(e),
            }
        }
        round.master = masters
            .iter()
            .find(|s| current.as_deref() == Some(s.as_str()))
            .or(masters.first())
            .map(|s| s.to_string());
        round
    }

    fn apply(&self, round: Round, resolver: &mut Resolver) {
        for e in &round.errors {
            debug!(error = %e, "Redis check failed");
        }
        let current = self.master.borrow().clone();
        let current_addr = current.as_ref().map(|m| &*m.addr);
        let Some(addr) = round.master else {
            resolver.failures = resolver.failures.saturating_add(1);
            let demoted = current_addr.is_some_and(|a| round.not_master.iter().any(|n| n == a));
            if demoted || resolver.failures == FALL {
                let errors: Vec<String> = round.errors.iter().map(|e| e.to_string()).collect();
                warn!(previous = ?current_addr, ?errors, demoted, "no Redis master answers");
                if current.is_some() {
                    self.publish(None);
                }
            }
            return;
        };
        resolver.failures = 0;
        if current_addr != Some(addr.as_str()) {
            resolver.epoch += 1;
            info!(master = %addr, previous = ?current_addr, "Redis master changed: sessions on the previous one close");
            self.publish(Some(Master {
                addr: addr.into(),
                epoch: resolver.epoch,
            }));
        }
    }

    fn publish(&self, master: Option<Master>) {
        if let Some(new) = &master {
            self.health.record("redis", &new.addr, "master", true);
        }
        if let Some(old) = self.master.send_replace(master) {
            self.health.record("redis", &old.addr, "master", false);
        }
    }

    /// Relays one client to the master until either side closes or the
    /// master changes.
    async fn session(
        self: Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        _open: OpenConnection,
    ) {
        let outcome = |o: &'static str| {
            REQUESTS
                .counter(["".into(), "redis".into(), "redis".into(), o.into()])
                .increment(1)
        };
        let (mut backend, master) = match self.connect().await {
            Ok(c) => c,
            Err(e) => {
                warn!(%peer, error = %e, "Redis client dropped");
                outcome("backend");
                return;
            }
        };
        outcome("ok");
        tokio::select! {
            relayed = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
                debug!(%peer, result = ?relayed, "Redis session ended");
            }
            _ = self.replaced(master.epoch) => {
                // One line per session would flood the log at a failover.
                debug!(%peer, master = %master.addr, "Redis master changed: session closed");
                let _ = client.shutdown().await;
            }
        }
    }

    /// A link to the current master, waiting up to [`MASTER_WAIT`] for one
    /// that accepts it.
    async fn connect(&self) -> Result<(MaybeTls, Master), ConnectError> {
        let deadline = Instant::now() + MASTER_WAIT;
        let mut rx = self.master.subscribe();
        loop {
            let current = rx.borrow_and_update().clone();
            let Some(master) = current else {
                self.resolve_now.notify_one();
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => return Err(ConnectError::NoMaster(MASTER_WAIT)),
                }
            };
            let error = match tokio::time::timeout(
                CONNECT_TIMEOUT,
                self.dialer.connect(&master.addr),
            )
            .await
            {
                Ok(Ok(link)) => return Ok((link, master)),
                Ok(Err(e)) => e,
                Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            };
            if Instant::now() >= deadline {
                return Err(ConnectError::Master {
                    addr: master.addr,
                    source: error,
                });
            }
            debug!(master = %master.addr, %error, "Redis master refused a connection: checking again");
            self.resolve_now.notify_one();
            // Wait for the checks to move, or retry soon anyway.
            let soon = Instant::now() + Duration::from_millis(200);
            let _ = tokio::time::timeout_at(deadline.min(soon), rx.changed()).await;
        }
    }

    /// Resolves once the master is no longer the one of `epoch`.
    async fn replaced(&self, epoch: u64) {
        let mut rx = self.master.subscribe();
        let _ = rx
            .wait_for(|m| m.as_ref().map(|m| m.epoch) != Some(epoch))
            .await;
    }
}
