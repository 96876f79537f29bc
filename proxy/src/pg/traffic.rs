//! What went through each database's sessions, for the admin console's
//! SHOW STATS (PgBouncer's columns): transactions, queries, bytes each way,
//! time in transactions and queries, and time waited for a server.
//!
//! Both pool modes count the same way: a query ends at each ReadyForQuery,
//! a transaction at a ReadyForQuery that says idle. Transaction mode sees
//! each message anyway; session mode copies bytes as they come and finds
//! the ReadyForQuery messages by their headers alone ([`ReadyScanner`]),
//! without framing or buffering anything.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rouse_control_api::DbKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::proto::tags::backend;

/// The period the averages cover, PgBouncer's `stats_period`.
const PERIOD: Duration = Duration::from_secs(15);

/// One database's counters since the proxy started.
#[derive(Default)]
pub(crate) struct DbTraffic {
    assignments: AtomicU64,
    xacts: AtomicU64,
    queries: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    xact_us: AtomicU64,
    query_us: AtomicU64,
    wait_us: AtomicU64,
}

/// A snapshot of [`DbTraffic`], or the averages of a period.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) assignments: u64,
    pub(crate) xacts: u64,
    pub(crate) queries: u64,
    pub(crate) received: u64,
    pub(crate) sent: u64,
    pub(crate) xact_us: u64,
    pub(crate) query_us: u64,
    pub(crate) wait_us: u64,
}

impl DbTraffic {
    fn totals(&self) -> Totals {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            assignments: get(&self.assignments),
            xacts: get(&self.xacts),
            queries: get(&self.queries),
            received: get(&self.received),
            sent: get(&self.sent),
            xact_us: get(&self.xact_us),
            query_us: get(&self.query_us),
            wait_us: get(&self.wait_us),
        }
    }
}

/// PgBouncer's averages over the last period, in the same fields: counts
/// and bytes per second, times per transaction, query and assignment.
pub(crate) type Averages = Totals;

impl Totals {
    fn averages_between(old: &Totals, new: &Totals, elapsed: Duration) -> Averages {
        let secs = elapsed.as_secs_f64().max(1.0);
        let rate = |o: u64, n: u64| (n.saturating_sub(o) as f64 / secs) as u64;
        let per = |o: u64, n: u64, of_o: u64, of_n: u64| {
            n.saturating_sub(o)
                .checked_div(of_n.saturating_sub(of_o))
                .unwrap_or(0)
        };
        Totals {
            assignments: rate(old.assignments, new.assignments),
            xacts: rate(old.xacts, new.xacts),
            queries: rate(old.queries, new.queries),
            received: rate(old.received, new.received),
            sent: rate(old.sent, new.sent),
            xact_us: per(old.xact_us, new.xact_us, old.xacts, new.xacts),
            query_us: per(old.query_us, new.query_us, old.queries, new.queries),
            wait_us: per(old.wait_us, new.wait_us, old.assignments, new.assignments),
        }
    }
}

struct Period {
    began: Instant,
    base: BTreeMap<DbKey, Totals>,
    averages: BTreeMap<DbKey, Averages>,
}

/// Every database's counters.
pub(crate) struct Traffic {
    dbs: Mutex<BTreeMap<DbKey, Arc<DbTraffic>>>,
    period: Mutex<Period>,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            dbs: Default::default(),
            period: Mutex::new(Period {
                began: Instant::now(),
                base: BTreeMap::new(),
                averages: BTreeMap::new(),
            }),
        }
    }
}

impl Traffic {
    /// A new session's meter on `key`'s counters.
    pub(crate) fn meter(&self, key: &DbKey) -> Meter {
        let db = self
            .dbs
            .lock()
            .expect("traffic poisoned")
            .entry(key.clone())
            .or_default()
            .clone();
        Meter {
            db,
            clock: Clock::default(),
        }
    }

    /// Every database's totals and the averages of the last whole period
    /// (a period ends when it is looked at after [`PERIOD`]).
    pub(crate) fn stats(&self) -> Vec<(DbKey, Totals, Averages)> {
        let totals: BTreeMap<DbKey, Totals> = self
            .dbs
            .lock()
            .expect("traffic poisoned")
            .iter()
            .map(|(k, t)| (k.clone(), t.totals()))
            .collect();
        let mut period = self.period.lock().expect("traffic poisoned");
        let elapsed = period.began.elapsed();
        if elapsed >= PERIOD {
            let averages = totals
                .iter()
                .map(|(k, now)| {
                    let then = period.base.get(k).copied().unwrap_or_default();
                    (k.clone(), Totals::averages_between(&then, now, elapsed))
                })
                .collect();
            *period = Period {
                began: Instant::now(),
                base: totals.clone(),
                averages,
            };
        }
        totals
            .into_iter()
            .map(|(k, t)| {
                let avg = period.averages.get(&k).copied().unwrap_or_default();
                (k, t, avg)
            })
            .collect()
    }
}

/// One session's counting: when its current query and transaction began.
pub(crate) struct Meter {
    db: Arc<DbTraffic>,
    clock: Clock,
}

/// When the current query and transaction began, as [`now_us`] gave it
/// (0: none). Eight bytes each instead of an `Option<Instant>`'s sixteen:
/// every idle session keeps one.
#[derive(Default)]
struct Clock {
    query_since: u64,
    xact_since: u64,
}

/// Microseconds since the first call, never 0.
fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
}

impl Clock {
    fn ready(&mut self, db: &DbTraffic, status: u8) {
        let now = now_us();
        let since = |began: u64| now.saturating_sub(began);
        match std::mem::take(&mut self.query_since) {
            0 => {}
            began => {
                db.queries.fetch_add(1, Ordering::Relaxed);
                db.query_us.fetch_add(since(began), Ordering::Relaxed);
            }
        }
        if status == backend::IDLE {
            match std::mem::take(&mut self.xact_since) {
                0 => {}
                began => {
                    db.xacts.fetch_add(1, Ordering::Relaxed);
                    db.xact_us.fetch_add(since(began), Ordering::Relaxed);
                }
            }
        }
    }
}

impl Meter {
    /// The client sent `bytes` towards the backend.
    pub(crate) fn asked(&mut self, bytes: usize) {
        self.db.received.fetch_add(bytes as u64, Ordering::Relaxed);
        let (now, clock) = (now_us(), &mut self.clock);
        for since in [&mut clock.query_since, &mut clock.xact_since] {
            if *since == 0 {
                *since = now;
            }
        }
    }

    /// The backend sent `bytes` towards the client.
    pub(crate) fn answered(&mut self, bytes: usize) {
        self.db.sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A ReadyForQuery with this transaction status reached the client.
    pub(crate) fn ready(&mut self, status: u8) {
        self.clock.ready(&self.db, status);
    }

    /// A server was assigned to the client after `waited`.
    pub(crate) fn assigned(&self, waited: Duration) {
        self.db.assignments.fetch_add(1, Ordering::Relaxed);
        self.db
            .wait_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Finds ReadyForQuery messages and their status in a backend's byte
/// stream fed in arbitrary pieces, reading only message headers.
#[derive(Debug, Default)]
pub(crate) struct ReadyScanner {
    header: [u8; 5],
    /// Header bytes held so far (0..5).
    have: usize,
    /// Body bytes of the current message still to skip.
    skip: usize,
    /// The next body byte is a ReadyForQuery's status.
    status_next: bool,
}

impl ReadyScanner {
    #[cfg(test)]
    fn quiet(&self) -> bool {
        self.have == 0 && self.skip == 0 && !self.status_next
    }

    pub(crate) fn feed(&mut self, mut bytes: &[u8], mut ready: impl FnMut(u8)) {
        while !bytes.is_empty() {
            if self.status_next {
                ready(bytes[0]);
                self.status_next = false;
            }
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 5 {
                self.have = 0;
                let len = u32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes"));
                // A length below 4 is malformed; the client sees it as it is.
                self.skip = (len as usize).saturating_sub(4);
                self.status_next = self.header[0] == backend::READY_FOR_QUERY && self.skip > 0;
            }
        }
    }
}

/// A backend connection whose traffic a [`Meter`] counts as it is copied
/// (session mode).
pub(crate) struct Metered<'a, S> {
    pub(crate) inner: &'a mut S,
    pub(crate) meter: &'a mut Meter,
    /// Where the backend's byte stream stands.
    scanner: ReadyScanner,
}

impl<'a, S> Metered<'a, S> {
    pub(crate) fn new(inner: &'a mut S, meter: &'a mut Meter) -> Self {
        Metered {
            inner,
            meter,
            scanner: ReadyScanner::default(),
        }
    }

    /// Bytes the backend sent, as they come: counted, and scanned for
    /// ReadyForQuery.
    pub(crate) fn backend_bytes(&mut self, bytes: &[u8]) {
        self.meter.answered(bytes.len());
        let Meter { db, clock } = &mut *self.meter;
        self.scanner.feed(bytes, |status| clock.ready(db, status));
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.backend_bytes(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.meter.asked(n);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// A backend's answer to two queries, the second ending a transaction;
    /// a body that holds a `Z` byte must not be taken for a header.
    fn stream() -> Vec<u8> {
        [
            message(b'T', b"ZZZZZ"),
            message(b'D', &[b'Z'; 40]),
            message(b'C', b"SELECT 1\0"),
            message(b'Z', b"T"),
            message(b'N', b"notice"),
            message(b'C', b"COMMIT\0"),
            message(b'Z', b"I"),
        ]
        .concat()
    }

    proptest! {
        #[test]
        fn ready_for_query_is_found_however_the_bytes_are_cut(cuts in proptest::collection::vec(0usize..200, 0..12)) {
            let bytes = stream();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut scanner = ReadyScanner::default();
            let mut seen = Vec::new();
            for w in cuts.windows(2) {
                scanner.feed(&bytes[w[0]..w[1]], |s| seen.push(s));
            }
            prop_assert_eq!(seen, vec![b'T', b'I']);
            prop_assert!(scanner.quiet());
        }

        #[test]
        fn any_bytes_are_scanned_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            ReadyScanner::default().feed(&bytes, |_| {});
        }
    }

    #[test]
    fn a_session_counts_queries_transactions_bytes_and_averages() {
        let traffic = Traffic::default();
        let key = DbKey::new(
            rouse_control_api::Name::new("shop").unwrap(),
            rouse_control_api::Name::new("main").unwrap(),
        );
        let mut meter = traffic.meter(&key);
        meter.assigned(Duration::from_micros(300));
        meter.asked(10);
        let mut backend = tokio::io::empty();
        Metered::new(&mut backend, &mut meter).backend_bytes(&stream());
        let (k, totals, _) = traffic.stats().pop().unwrap();
        assert_eq!(k, key);
        assert_eq!(
            (totals.queries, totals.xacts, totals.received, totals.sent),
            (1, 1, 10, stream().len() as u64),
            "one query asked, answered with two ReadyForQuery: one query, one transaction"
        );
        assert_eq!((totals.assignments, totals.wait_us), (1, 300));
        let old = Totals::default();
        let avg = Totals::averages_between(&old, &totals, Duration::from_secs(2));
        assert_eq!((avg.received, avg.wait_us), (5, 300));
    }
}
