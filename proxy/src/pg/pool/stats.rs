//! What the admin console reads of a pool (SHOW POOLS, SHOW SERVERS) and
//! asks of it (RECONNECT).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{Pool, Pooled};

/// A pool's connections and waiting clients, PgBouncer's `sv_active`,
/// `sv_idle` and `cl_waiting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolCounts {
    /// Lent to a client, or being opened.
    pub(crate) active: usize,
    pub(crate) idle: usize,
    pub(crate) waiting: usize,
}

/// Counts a client among the waiting while it lives.
pub(super) struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    pub(super) fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub(crate) fn counts(&self) -> PoolCounts {
        let idle = self.idle.lock().expect("pool poisoned").conns.len();
        let open = self.size - self.permits.available_permits();
        // A checkout that found a connection has stopped waiting by the
        // time its guard drops; one still in the loop is waiting.
        PoolCounts {
            active: open.saturating_sub(idle),
            idle,
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    /// Where the idle connections go, and how long each has lived; and
    /// where the lent ones go.
    pub(crate) fn servers(&self) -> (Vec<(SocketAddr, Duration)>, Option<SocketAddr>) {
        let idle = self.idle.lock().expect("pool poisoned");
        let idle = idle
            .conns
            .iter()
            .map(|b| (b.session.key.0, b.born.elapsed()))
            .collect();
        (idle, *self.last_addr.lock().expect("pool poisoned"))
    }

    /// Closes the idle connections now and the lent ones when they come
    /// back, so that new ones are made (PgBouncer's RECONNECT).
    pub(crate) fn reconnect(&self) {
        *self.retired_before.lock().expect("pool poisoned") = Some(Instant::now());
        // Their permits freed, waiting clients open new ones.
        self.idle.lock().expect("pool poisoned").conns.clear();
    }

    pub(super) fn retired(&self, b: &Pooled) -> bool {
        self.retired_before
            .lock()
            .expect("pool poisoned")
            .is_some_and(|t| b.born <= t)
    }
}
