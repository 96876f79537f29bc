//! Per-app limits the proxy enforces (`apps:`): PostgreSQL sessions per app
//! and per database, and requests waiting for wakes per app. Past one, the
//! tenant gets `429`/`53300` naming the limit; other apps notice nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rouse_config::AppsConfig;
use rouse_control_api::{DbKey, Name};
use rouse_runtime::metric::APP_LIMIT_REFUSALS;

use crate::error::ProxyError;

/// Everything that decides whether a client may come in: the logins'
/// verifiers, rate limits, failed-login throttling and the app's limits.
#[derive(Clone)]
pub(crate) struct Admission {
    pub(crate) verifiers: crate::pg::Verifiers,
    pub(crate) limits: Arc<crate::fleet::ratelimit::RateLimits>,
    pub(crate) failed_logins: Arc<crate::throttle::FailedLogins>,
    pub(crate) quotas: Arc<AppQuotas>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Counter {
    Sessions(Name),
    DatabaseSessions(DbKey),
    Waiting(Name),
}

impl Counter {
    /// The limit's name in `apps:`.
    fn limit(&self) -> &'static str {
        match self {
            Counter::Sessions(_) => "max_connections",
            Counter::DatabaseSessions(_) => "max_connections_per_database",
            Counter::Waiting(_) => "max_waiting",
        }
    }
}

pub(crate) struct AppQuotas {
    apps: AppsConfig,
    /// Only counters above zero are kept.
    counts: Mutex<HashMap<Counter, usize>>,
}

/// Held while a session lives or a request waits; gives its place back when dropped.
pub(crate) struct Slot {
    quotas: Arc<AppQuotas>,
    /// What it counts in: its counters are made again when it is dropped,
    /// so that an idle session holds no list of them.
    held: Held,
}

enum Held {
    Session(DbKey),
    Waiting(Name),
}

impl Held {
    fn counters(&self) -> Vec<Counter> {
        match self {
            Held::Session(key) => vec![
                Counter::Sessions(key.app.clone()),
                Counter::DatabaseSessions(key.clone()),
            ],
            Held::Waiting(app) => vec![Counter::Waiting(app.clone())],
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.quotas.counts.lock().expect("quotas poisoned");
        for c in &self.held.counters() {
            if let Some(n) = counts.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(c);
                }
            }
        }
    }
}

impl AppQuotas {
    pub(crate) fn new(apps: AppsConfig) -> Arc<AppQuotas> {
        Arc::new(AppQuotas {
            apps,
            counts: Mutex::default(),
        })
    }

    /// A PostgreSQL session of `key`'s app on `key`.
    pub(crate) fn session(self: &Arc<Self>, key: &DbKey) -> Result<Slot, ProxyError> {
        let limits = self.apps.limits(key.app.as_str());
        self.take(
            &key.app,
            Held::Session(key.clone()),
            &[limits.max_connections, limits.max_connections_per_database],
        )
    }

    /// A request of `app` waiting for a wake.
    pub(crate) fn wait(self: &Arc<Self>, app: &Name) -> Result<Slot, ProxyError> {
        let max = self.apps.limits(app.as_str()).max_waiting;
        self.take(app, Held::Waiting(app.clone()), &[max])
    }

    /// All counters of `held` or none; `maxes` in the order of its counters.
    fn take(self: &Arc<Self>, app: &Name, held: Held, maxes: &[usize]) -> Result<Slot, ProxyError> {
        let wanted = held.counters();
        let mut counts = self.counts.lock().expect("quotas poisoned");
        for (counter, max) in wanted.iter().zip(maxes) {
            if counts.get(counter).copied().unwrap_or(0) >= *max {
                let limit = counter.limit();
                APP_LIMIT_REFUSALS.counter([(*limit).into()]).increment(1);
                return Err(ProxyError::AppLimit {
                    app: app.to_string(),
                    limit: format!("{limit} = {max}"),
                });
            }
        }
        for counter in wanted {
            *counts.entry(counter).or_default() += 1;
        }
        Ok(Slot {
            quotas: self.clone(),
            held,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rouse_config::AppLimits;

    fn key(app: &str, db: &str) -> DbKey {
        DbKey::new(Name::new(app).unwrap(), Name::new(db).unwrap())
    }

    #[test]
    fn limits_hold_per_app_and_per_database_and_places_come_back() {
        let quotas = AppQuotas::new(AppsConfig {
            default: AppLimits {
                max_connections: Some(3),
                max_connections_per_database: Some(2),
                max_waiting: Some(1),
                ..AppLimits::default()
            },
            overrides: Default::default(),
        });
        let a = quotas.session(&key("shop", "a")).unwrap();
        let _a2 = quotas.session(&key("shop", "a")).unwrap();
        assert!(quotas.session(&key("shop", "a")).is_err(), "per database");
        let _b = quotas.session(&key("shop", "b")).unwrap();
        assert!(quotas.session(&key("shop", "c")).is_err(), "per app");
        assert!(quotas.session(&key("rival", "a")).is_ok(), "another app");
        drop(a);
        assert!(quotas.session(&key("shop", "c")).is_ok());
        let w = quotas.wait(&Name::new("shop").unwrap()).unwrap();
        assert!(quotas.wait(&Name::new("shop").unwrap()).is_err());
        drop(w);
        assert!(quotas.wait(&Name::new("shop").unwrap()).is_ok());
        drop(_a2);
        drop(_b);
        assert!(quotas.counts.lock().unwrap().len() <= 2);
    }
}
