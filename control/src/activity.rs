//! What proxies report about each database: last activity and open
//! sessions. A database with an open session is never hibernated; a proxy
//! that stops reporting stops counting after `STALE_AFTER`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rouse_control_api::{ActivityReport, DbKey};

const STALE_AFTER: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct ActivityTracker {
    dbs: Mutex<HashMap<DbKey, DbActivity>>,
}

#[derive(Default)]
struct DbActivity {
    /// Unix milliseconds.
    last_activity: u64,
    /// Per proxy: open sessions, when reported.
    proxies: HashMap<String, (u64, Instant)>,
    requests: u64,
}

impl ActivityTracker {
    /// Marks a database active now (created or woken), so it is not
    /// hibernated before anybody had a chance to use it.
    pub fn touch(&self, key: &DbKey, now_ms: u64) {
        let mut dbs = self.dbs.lock().expect("activity poisoned");
        let a = dbs.entry(key.clone()).or_default();
        a.last_activity = a.last_activity.max(now_ms);
    }

    /// Applies a proxy's report to the databases that exist (`known`).
    pub fn report(&self, report: &ActivityReport, known: impl Fn(&DbKey) -> bool) -> usize {
        let mut dbs = self.dbs.lock().expect("activity poisoned");
        let now = Instant::now();
        let mut applied = 0;
        for d in &report.databases {
            let key = DbKey::new(d.app.clone(), d.name.clone());
            if !known(&key) {
                continue;
            }
            let a = dbs.entry(key).or_default();
            a.last_activity = a.last_activity.max(d.last_activity);
            a.proxies
                .insert(report.proxy_id.clone(), (d.open_sessions, now));
            a.requests += d.requests;
            applied += 1;
        }
        applied
    }

    pub fn last_activity(&self, key: &DbKey) -> Option<u64> {
        self.dbs
            .lock()
            .expect("activity poisoned")
            .get(key)
            .map(|a| a.last_activity)
    }

    /// Sessions open on the database according to proxies heard from lately.
    pub fn open_sessions(&self, key: &DbKey) -> u64 {
        let dbs = self.dbs.lock().expect("activity poisoned");
        dbs.get(key)
            .map(|a| {
                a.proxies
                    .values()
                    .filter(|(_, at)| at.elapsed() < STALE_AFTER)
                    .map(|(n, _)| n)
                    .sum()
            })
            .unwrap_or(0)
    }

    pub fn forget(&self, key: &DbKey) {
        self.dbs.lock().expect("activity poisoned").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rouse_control_api::{DatabaseActivity, Name};

    fn key() -> DbKey {
        DbKey::new(Name::new("a").unwrap(), Name::new("b").unwrap())
    }

    fn report(proxy: &str, last: u64, open: u64) -> ActivityReport {
        ActivityReport {
            proxy_id: proxy.into(),
            databases: vec![DatabaseActivity {
                app: key().app,
                name: key().db,
                last_activity: last,
                open_sessions: open,
                requests: 1,
            }],
        }
    }

    #[test]
    fn sessions_add_up_across_proxies_and_activity_only_moves_forward() {
        let t = ActivityTracker::default();
        t.report(&report("p1", 100, 2), |_| true);
        t.report(&report("p2", 50, 1), |_| true);
        assert_eq!(t.open_sessions(&key()), 3);
        assert_eq!(t.last_activity(&key()), Some(100));
        t.report(&report("p1", 200, 0), |_| true);
        assert_eq!(t.open_sessions(&key()), 1);
        assert_eq!(t.last_activity(&key()), Some(200));
    }

    #[test]
    fn unknown_databases_are_ignored() {
        let t = ActivityTracker::default();
        assert_eq!(t.report(&report("p1", 100, 2), |_| false), 0);
        assert_eq!(t.open_sessions(&key()), 0);
    }
}
