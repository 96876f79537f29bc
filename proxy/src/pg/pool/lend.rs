//! Lending a pool's connections, first come first served as PgBouncer
//! does: a connection given back goes straight to the client that has
//! waited longest, so that a client arriving meanwhile cannot take it
//! first; with a thousand clients on twenty connections that is what
//! keeps the slowest transactions close to the others. A connection that
//! is closed instead frees its permit, which waiting clients also wait
//! for: they then open a new one.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::{stats, Pool, Pooled, CHECKOUT_TIMEOUT};
use crate::pg::backend::connect_backend;
use crate::pg::error::PgError;

/// A pool's idle connections and the clients waiting for one, under one
/// lock: a connection is either idle or handed to a waiter, never both.
#[derive(Default)]
pub(super) struct Idle {
    pub(super) conns: Vec<Pooled>,
    /// Oldest first. A waiter that gave up leaves a closed sender behind,
    /// skipped when its turn comes.
    waiters: VecDeque<oneshot::Sender<Pooled>>,
}

/// What a checkout gets at once. Returned once and taken apart: not
/// boxed, which would cost an allocation per transaction.
#[allow(clippy::large_enum_variant)]
enum Turn {
    Idle(Pooled),
    /// Room for a new connection.
    Room(OwnedSemaphorePermit),
    /// Its place in the queue.
    Wait(oneshot::Receiver<Pooled>),
}

impl Pool {
    /// An idle connection to `addr` when nobody waits, else a new one
    /// while the pool has room, else the next one given back (or the room
    /// a closed one leaves), in turn.
    pub(crate) async fn checkout(&self, addr: SocketAddr) -> Result<Pooled, PgError> {
        let deadline = tokio::time::Instant::now() + CHECKOUT_TIMEOUT;
        *self.last_used.lock().expect("pool poisoned") = Instant::now();
        *self.last_addr.lock().expect("pool poisoned") = Some(addr);
        let _waiting = stats::Waiting::new(&self.waiting);
        let mut handed = match self.take_or_queue(addr) {
            Turn::Idle(b) => return Ok(b),
            Turn::Room(permit) => return self.connect(addr, permit).await,
            Turn::Wait(rx) => rx,
        };
        tokio::select! {
            biased;
            b = &mut handed => match b {
                Ok(b) if self.fits(&b, addr) => Ok(b),
                // Unfit: its room makes a new connection.
                Ok(b) => self.connect(addr, b.into_permit()).await,
                Err(_) => Err(PgError::Backend("the pool was closed".into())),
            },
            permit = self.permits.clone().acquire_owned() => {
                let permit = permit.map_err(|_| PgError::Backend("the pool was closed".into()))?;
                // A connection handed over meanwhile is not lost with the
                // waiter: it is taken, and the permit left free.
                handed.close();
                match handed.try_recv() {
                    Ok(b) if self.fits(&b, addr) => Ok(b),
                    _ => self.connect(addr, permit).await,
                }
            }
            _ = tokio::time::sleep_until(deadline) => Err(PgError::TooManyClients),
        }
    }

    /// An idle connection or room for a new one, when nobody waits ahead;
    /// else a place at the end of the queue.
    fn take_or_queue(&self, addr: SocketAddr) -> Turn {
        let mut idle = self.idle.lock().expect("pool poisoned");
        while idle.waiters.front().is_some_and(|w| w.is_closed()) {
            idle.waiters.pop_front();
        }
        if idle.waiters.is_empty() {
            // Connections to where the database used to run, or that went
            // stale, are dropped (their permits freed).
            while let Some(b) = idle.conns.pop() {
                if self.fits(&b, addr) {
                    return Turn::Idle(b);
                }
            }
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                return Turn::Room(permit);
            }
        }
        let (tx, rx) = oneshot::channel();
        idle.waiters.push_back(tx);
        Turn::Wait(rx)
    }

    /// Whether an idle connection can serve a client going to `addr`.
    fn fits(&self, b: &Pooled, addr: SocketAddr) -> bool {
        b.session.key.0 == addr && b.usable(&self.times) && !self.retired(b)
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Result<Pooled, PgError> {
        let key = *self.client_key.lock().expect("pool poisoned");
        let params: &[(&str, &str)] = if self.read_only {
            &[("default_transaction_read_only", "on")]
        } else {
            &[]
        };
        let session = connect_backend(
            addr,
            &self.role,
            &self.database,
            params,
            &self.verifier,
            &key,
        )
        .await?;
        {
            let mut greeting = self.greeting.lock().expect("pool poisoned");
            if greeting.is_empty() {
                *greeting = session.greeting.clone();
            }
        }
        let now = Instant::now();
        Ok(Pooled {
            session,
            prepared: HashMap::new(),
            dirty: false,
            born: now,
            idle_since: now,
            _permit: permit,
        })
    }

    /// Takes a connection back: to the longest waiting client, else among
    /// the idle. One past its lifetime, or retired, is closed instead.
    pub(crate) fn checkin(&self, mut b: Pooled) {
        if b.born.elapsed() >= self.times.server_lifetime || self.retired(&b) {
            return;
        }
        b.idle_since = Instant::now();
        let mut idle = self.idle.lock().expect("pool poisoned");
        while let Some(waiter) = idle.waiters.pop_front() {
            match waiter.send(b) {
                Ok(()) => return,
                Err(back) => b = back,
            }
        }
        idle.conns.push(b);
    }

    /// Closes idle connections that went stale or idle too long; whether
    /// the pool is now empty and unused, so it can go (the database
    /// hibernated, moved or was dropped, or its clients left).
    pub(crate) fn sweep(&self) -> bool {
        let mut idle = self.idle.lock().expect("pool poisoned");
        idle.conns.retain(|b| b.usable(&self.times));
        idle.conns.is_empty()
            && self.permits.available_permits() == self.size
            && self.last_used.lock().expect("pool poisoned").elapsed()
                >= self.times.server_idle_timeout
    }
}

impl Pooled {
    /// Its room in the pool, the connection closed.
    fn into_permit(self) -> OwnedSemaphorePermit {
        self._permit
    }
}
