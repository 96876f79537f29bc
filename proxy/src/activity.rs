//! Per-database activity, reported to control every `activity_interval`:
//! last request, requests in flight (open sessions, which control never
//! hibernates under) and the number of requests since the last report.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rouse_control_api::{ActivityReport, Client, DatabaseActivity, DbKey};
use tracing::debug;

#[derive(Default)]
struct Counters {
    last_activity: u64,
    open: u64,
    requests: u64,
    /// Requests since the proxy started (the stats page's rates).
    total: u64,
    /// `open` as last reported: a drop to zero must be reported too.
    reported_open: u64,
}

/// The least time between two reports that a new session brought forward.
const MIN_GAP: Duration = Duration::from_millis(100);

#[derive(Default)]
pub(crate) struct Activity {
    dbs: Mutex<HashMap<DbKey, Counters>>,
    /// A database control believes idle got a session: report it now, so
    /// that control does not put it to sleep to make room meanwhile.
    session_opened: tokio::sync::Notify,
}

/// A request in flight; it ends when dropped.
pub(crate) struct InFlight {
    activity: Arc<Activity>,
    key: DbKey,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut dbs = self.activity.dbs.lock().expect("activity poisoned");
        if let Some(c) = dbs.get_mut(&self.key) {
            c.open = c.open.saturating_sub(1);
            c.last_activity = rouse_runtime::clock::now_ms();
        }
    }
}

impl Activity {
    pub(crate) fn begin(self: &Arc<Self>, key: &DbKey) -> InFlight {
        let mut dbs = self.dbs.lock().expect("activity poisoned");
        // No key clone on the hot path once the database is known.
        let c = match dbs.get_mut(key) {
            Some(c) => c,
            None => dbs.entry(key.clone()).or_default(),
        };
        c.open += 1;
        c.requests += 1;
        c.total += 1;
        c.last_activity = rouse_runtime::clock::now_ms();
        InFlight {
            activity: self.clone(),
            key: key.clone(),
        }
    }

    /// [`Activity::begin`] for a client session, which may last: when
    /// control last heard of no session on the database, the next report
    /// goes at once instead of at the next interval.
    pub(crate) fn begin_session(self: &Arc<Self>, key: &DbKey) -> InFlight {
        let in_flight = self.begin(key);
        let unheard = self
            .dbs
            .lock()
            .expect("activity poisoned")
            .get(key)
            .is_some_and(|c| c.reported_open == 0);
        if unheard {
            self.session_opened.notify_one();
        }
        in_flight
    }

    /// What happened since the last call; idle databases are dropped.
    fn take_report(&self) -> Vec<DatabaseActivity> {
        let mut dbs = self.dbs.lock().expect("activity poisoned");
        let out = dbs
            .iter_mut()
            .filter(|(_, c)| c.requests > 0 || c.open > 0 || c.reported_open != c.open)
            .map(|(k, c)| {
                let requests = std::mem::take(&mut c.requests);
                c.reported_open = c.open;
                DatabaseActivity {
                    app: k.app.clone(),
                    name: k.db.clone(),
                    last_activity: c.last_activity,
                    open_sessions: c.open,
                    requests,
                }
            })
            .collect();
        out
    }

    /// Per database: requests since start, and requests in flight.
    pub(crate) fn totals(&self) -> HashMap<DbKey, (u64, u64)> {
        let dbs = self.dbs.lock().expect("activity poisoned");
        dbs.iter()
            .map(|(k, c)| (k.clone(), (c.total, c.open)))
            .collect()
    }

    pub(crate) async fn report_forever(
        self: Arc<Self>,
        control: Client,
        proxy_id: String,
        every: Duration,
    ) {
        let mut tick = tokio::time::interval(every);
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.session_opened.notified() => {
                    tokio::time::sleep_until(last + MIN_GAP).await;
                }
            }
            last = tokio::time::Instant::now();
            let databases = self.take_report();
            if databases.is_empty() {
                continue;
            }
            let report = ActivityReport {
                proxy_id: proxy_id.clone(),
                databases,
            };
            if let Err(e) = control.report_activity(&report).await {
                debug!(error = %e, "activity report failed");
            }
        }
    }
}
