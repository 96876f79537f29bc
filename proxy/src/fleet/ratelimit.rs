//! Rate limits per app and per credential, with GCRA (the generic cell rate
//! algorithm): each limit keeps one "theoretical arrival time". Across
//! proxies all limits of a request are checked and updated in one Lua
//! script, one round trip (keys `rouse:rl:<app>:<protocol>[:<credential>]`);
//! without Redis each proxy keeps its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rouse_config::{Limit, ProtocolLimits};
use rouse_control_api::Name;

use super::{keys, Fleet};
use crate::error::ProxyError;
use crate::metrics::RATE_LIMITED;

/// KEYS: the limits; ARGV: per key its emission interval and tolerance in
/// milliseconds. Returns 0 when admitted (and records it), else the wait.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local wait = 0
local next = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local allow_at = tat + interval - tolerance
  if allow_at - now > wait then wait = allow_at - now end
  next[i] = tat + interval
end
if wait > 0 then return math.ceil(wait) end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.3f', next[i]), 'PX', math.ceil(next[i] - now) + 1)
end
return 0
"#;

/// Which front a request came through: each has its own limits.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Protocol {
    Http,
    Postgres,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Postgres => "postgres",
        }
    }
}

pub(crate) struct RateLimits {
    /// HTTP and PostgreSQL limits, replaced as a whole on reload.
    limits: std::sync::RwLock<std::sync::Arc<(ProtocolLimits, ProtocolLimits)>>,
    script: redis::Script,
    /// The fallback: theoretical arrival times, in ms since `epoch`.
    local: Mutex<HashMap<String, f64>>,
    epoch: Instant,
}

impl RateLimits {
    pub(crate) fn new(http: ProtocolLimits, postgres: ProtocolLimits) -> RateLimits {
        RateLimits {
            limits: std::sync::RwLock::new(std::sync::Arc::new((http, postgres))),
            script: redis::Script::new(GCRA),
            local: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    /// Admits one request of `app` with the credential `credential` names
    /// (asked only when there is a per-credential limit), or says how long
    /// to wait.
    pub(crate) async fn check(
        &self,
        fleet: &Fleet,
        protocol: Protocol,
        app: &Name,
        credential: impl FnOnce() -> String,
    ) -> Result<(), ProxyError> {
        let both = self.limits.read().expect("limits poisoned").clone();
        let limits = match protocol {
            Protocol::Http => &both.0,
            Protocol::Postgres => &both.1,
        };
        let p = protocol.as_str();
        let keys: Vec<(String, &Limit)> = [
            limits
                .per_app
                .as_ref()
                .map(|l| (keys::rate_limit(app, p, None), l)),
            limits
                .per_credential
                .as_ref()
                .map(|l| (keys::rate_limit(app, p, Some(&credential())), l)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut invocation = self.script.prepare_invoke();
        for (key, limit) in &keys {
            let (interval, tolerance) = cell(limit);
            invocation.key(key).arg(interval).arg(tolerance);
        }
        let wait_ms = match fleet
            .call("rate_limit", |mut c| async move {
                invocation.invoke_async::<u64>(&mut c).await
            })
            .await?
        {
            Some(wait) => wait,
            None => self.check_here(&keys),
        };
        if wait_ms == 0 {
            return Ok(());
        }
        RATE_LIMITED
            .counter([app.to_string().into(), p.into()])
            .increment(1);
        Err(ProxyError::RateLimited(Duration::from_millis(wait_ms)))
    }

    /// New limits (a reload); what was admitted so far still counts.
    pub(crate) fn set(&self, http: ProtocolLimits, postgres: ProtocolLimits) {
        *self.limits.write().expect("limits poisoned") = std::sync::Arc::new((http, postgres));
    }

    /// The same algorithm on this proxy's own state.
    fn check_here(&self, keys: &[(String, &Limit)]) -> u64 {
        let now = self.epoch.elapsed().as_secs_f64() * 1000.0;
        let mut tats = self.local.lock().expect("limits poisoned");
        let mut wait: f64 = 0.0;
        for (key, limit) in keys {
            let (interval, tolerance) = cell(limit);
            let tat = tats.get(key).copied().unwrap_or(now).max(now);
            wait = wait.max(tat + interval - tolerance - now);
        }
        if wait > 0.0 {
            return wait.ceil() as u64;
        }
        for (key, limit) in keys {
            let (interval, _) = cell(limit);
            let tat = tats.get(key).copied().unwrap_or(now).max(now);
            tats.insert(key.clone(), tat + interval);
        }
        // Limits long idle are as good as absent.
        if tats.len() > 100_000 {
            tats.retain(|_, tat| *tat > now);
        }
        0
    }
}

/// GCRA's emission interval (ms between requests at the rate) and
/// tolerance (how far ahead `burst` requests may run).
fn cell(limit: &Limit) -> (f64, f64) {
    let interval = 1000.0 / limit.rate;
    (interval, interval * f64::from(limit.burst.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: f64, burst: u32) -> RateLimits {
        RateLimits::new(
            ProtocolLimits {
                per_app: Some(Limit { rate, burst }),
                per_credential: None,
            },
            ProtocolLimits::default(),
        )
    }

    #[tokio::test]
    async fn a_burst_then_the_rate() {
        let l = limits(10.0, 5);
        let app = Name::new("shop").unwrap();
        let fleet = Fleet::local();
        for _ in 0..5 {
            l.check(&fleet, Protocol::Http, &app, || "k".into())
                .await
                .unwrap();
        }
        let err = l
            .check(&fleet, Protocol::Http, &app, || "k".into())
            .await
            .unwrap_err();
        let ProxyError::RateLimited(wait) = err else {
            panic!("{err:?}")
        };
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Postgres has no limit here.
        for _ in 0..50 {
            l.check(&fleet, Protocol::Postgres, &app, || "k".into())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(110)).await;
        l.check(&fleet, Protocol::Http, &app, || "k".into())
            .await
            .unwrap();
    }
}
