//! Per-app limits control enforces (`apps:`): the databases an app holds
//! and how fast it creates them. Creates are decided on the coordinator,
//! so the rate is counted there, in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rouse_config::AppsConfig;
use rouse_control_api::Name;

use crate::error::{AppLimit, ControlError, Result};
use rouse_runtime::metric::APP_LIMIT_REFUSALS;

const MINUTE: Duration = Duration::from_secs(60);

pub struct Quotas {
    apps: AppsConfig,
    /// Each app's creates within the last minute.
    creates: Mutex<HashMap<Name, VecDeque<Instant>>>,
}

impl Quotas {
    pub fn new(apps: AppsConfig) -> Quotas {
        Quotas {
            apps,
            creates: Mutex::default(),
        }
    }

    /// Admits one more create for `app`, which holds `held` databases now.
    pub fn admit_create(&self, app: &Name, held: usize) -> Result<()> {
        let limits = self.apps.limits(app.as_str());
        let refuse = |limit: AppLimit, max: u32| {
            APP_LIMIT_REFUSALS
                .counter([limit.key().into()])
                .increment(1);
            Err(ControlError::AppLimit {
                app: app.to_string(),
                limit,
                max,
            })
        };
        if held >= limits.max_databases as usize {
            return refuse(AppLimit::MaxDatabases, limits.max_databases);
        }
        let now = Instant::now();
        let mut creates = self.creates.lock().expect("creates poisoned");
        let recent = creates.entry(app.clone()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= MINUTE)
        {
            recent.pop_front();
        }
        if recent.len() >= limits.creates_per_minute as usize {
            return refuse(AppLimit::CreatesPerMinute, limits.creates_per_minute);
        }
        recent.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rouse_config::AppLimits;

    #[test]
    fn each_app_has_its_own_count_and_rate() {
        let quotas = Quotas::new(AppsConfig {
            default: AppLimits {
                max_databases: Some(3),
                creates_per_minute: Some(2),
                ..AppLimits::default()
            },
            overrides: Default::default(),
        });
        let (a, b) = (Name::new("a").unwrap(), Name::new("b").unwrap());
        assert!(quotas.admit_create(&a, 0).is_ok());
        assert!(quotas.admit_create(&a, 1).is_ok());
        assert!(matches!(
            quotas.admit_create(&a, 2),
            Err(ControlError::AppLimit {
                limit: AppLimit::CreatesPerMinute,
                max: 2,
                ..
            })
        ));
        assert!(matches!(
            quotas.admit_create(&b, 3),
            Err(ControlError::AppLimit {
                limit: AppLimit::MaxDatabases,
                max: 3,
                ..
            })
        ));
        assert!(quotas.admit_create(&b, 2).is_ok());
    }
}
