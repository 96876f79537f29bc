//! What a credential check costs a request: found in the proxy's own cache,
//! found in Redis (another proxy validated it), or validated by control.
//! Each request carries a key this proxy has not seen (or, for the cached
//! case, one it has) and ends right after the check (an unknown gateway
//! operation), so the latency is the check plus the proxy's fixed cost.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use rouse_control_api::Name;
use rouse_tests::{Control, Proxy, Redis};

use crate::stats::{percentile, table};

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// Sequential requests through `proxy`, one per key; their latencies.
async fn requests(http: &reqwest::Client, proxy: &Proxy, keys: &[String]) -> Result<Vec<Duration>> {
    let url = format!("{}/v1/database/check", proxy.url());
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let t0 = Instant::now();
        let status = http.post(&url).bearer_auth(key).send().await?.status();
        out.push(t0.elapsed());
        // Past the check, the unknown operation is refused with 404.
        ensure!(
            status == reqwest::StatusCode::NOT_FOUND,
            "check failed: {status}"
        );
    }
    Ok(out)
}

/// Request latency with the credential found in one place.
pub struct SessionRow {
    pub label: &'static str,
    pub p50: Duration,
    pub p99: Duration,
}

impl SessionRow {
    fn new(label: &'static str, samples: &[Duration]) -> Self {
        SessionRow {
            label,
            p50: percentile(samples, 50.0),
            p99: percentile(samples, 99.0),
        }
    }
}

pub struct SessionResults {
    pub keys: usize,
    pub rows: Vec<SessionRow>,
}

impl fmt::Display for SessionResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| vec![r.label.to_string(), us(r.p50), us(r.p99)])
            .collect();
        write!(
            f,
            "Credential check, {} API keys, one request each (request latency)\n\n{}",
            self.keys,
            table(&["credential found", "p50", "p99"], &rows)
        )
    }
}

pub async fn run(keys: usize) -> Result<SessionResults> {
    let redis = Redis::start().await?;
    let control = Control::builder().start().await?;
    let api = control.client();
    let app = Name::new("bench")?;
    api.create_app(&app).await?;
    let mut issued = Vec::with_capacity(keys);
    for _ in 0..keys {
        issued.push(api.create_key(&app).await?.key);
    }
    let url = format!("redis://{}", redis.addr());
    let first = Proxy::builder(&control)
        .redis_url(&url, &[])
        .start()
        .await?;
    let second = Proxy::builder(&control)
        .redis_url(&url, &[])
        .start()
        .await?;
    let http = reqwest::Client::new();
    // The first proxy validates every key with control and files it in Redis;
    // the second then finds each in Redis; asked again, in its own cache.
    let by_control = requests(&http, &first, &issued).await?;
    let by_redis = requests(&http, &second, &issued).await?;
    let cached = requests(&http, &second, &issued).await?;
    Ok(SessionResults {
        keys,
        rows: vec![
            SessionRow::new("in the proxy's cache", &cached),
            SessionRow::new("in Redis (validated by another proxy)", &by_redis),
            SessionRow::new("validated by control", &by_control),
        ],
    })
}
