//! The active set under a Zipf-distributed stream of requests over every
//! tenant of the density run: the popular databases are asked for often,
//! the long tail rarely, while at most [`ACTIVE_SET`] may run at once on
//! the node. How many requests are served, how many waited for a wake and
//! how long, how often a database is put to sleep to make room, and the
//! engines' peak memory.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rouse_tests::{metric, Control, Proxy};

use crate::stats::{ms, percentile, table};

/// `database.max_active_databases` for this phase.
pub const ACTIVE_SET: usize = 50;
const SECONDS: u64 = 60;
/// Clients asking at once, each one request after another.
const CLIENTS: usize = 32;
/// The Zipf exponent: the k-th most popular database is asked for in
/// proportion to 1/k^s.
const ZIPF_S: f64 = 1.1;
/// A request that took this long waited for a wake: a running database
/// answers a point query in a few milliseconds, a wake takes hundreds.
const WAITED: Duration = Duration::from_millis(100);

pub struct ActiveSetResults {
    databases: usize,
    requests: usize,
    failed: usize,
    seconds: f64,
    /// The requests that waited for a wake, how long each took.
    waits: Vec<Duration>,
    evictions: f64,
    peak_engine_bytes: u64,
}

/// The cumulative distribution of ranks 0..n under Zipf's law.
fn zipf_cdf(n: usize) -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = (1..=n)
        .map(|k| {
            acc += 1.0 / (k as f64).powf(ZIPF_S);
            acc
        })
        .collect();
    cdf.iter_mut().for_each(|c| *c /= acc);
    cdf
}

/// xorshift64*: a fixed, cheap sequence per client, the same every run.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

async fn evictions(control: &Control) -> f64 {
    let url = format!("{}/metrics", control.api_url());
    let mut n = 0.0;
    for reason in ["max_active_databases", "max_active_memory"] {
        n += metric(
            &url,
            &format!("rouse_evictions_total{{reason=\"{reason}\"}}"),
        )
        .await;
    }
    n
}

/// Runs the stream through a proxy of `control`, whose node must run with
/// `max_active_databases` = [`ACTIVE_SET`]; database `i` is `name(i)` of
/// app `apps[i % 2]`, whose key is `keys[i % 2]`.
pub async fn run(
    control: &Control,
    apps: [&str; 2],
    keys: &[String],
    databases: usize,
    name: fn(usize) -> String,
) -> Result<ActiveSetResults> {
    let proxy = Proxy::builder(control).start().await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()?;
    let cdf = Arc::new(zipf_cdf(databases));
    let evicted_before = evictions(control).await;
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (client, peak) = (control.client(), peak.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(cap) = client.capacity().await {
                    let bytes = cap.nodes.first().map_or(0, |n| n.engine_memory_bytes);
                    peak.fetch_max(bytes, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(SECONDS);
    let clients = (0..CLIENTS).map(|c| {
        let (http, cdf, url) = (http.clone(), cdf.clone(), proxy.url());
        let keys = keys.to_vec();
        async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
            let mut seen = Vec::new();
            while Instant::now() < deadline {
                let u = rng.unit();
                let i = cdf.partition_point(|&p| p < u).min(cdf.len() - 1);
                let asked = Instant::now();
                let ok = http
                    .post(format!("{url}/{}/{}/db/query", apps[i % 2], name(i)))
                    .bearer_auth(&keys[i % 2])
                    .json(&serde_json::json!(["SELECT 1"]))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                seen.push((asked.elapsed(), ok));
            }
            seen
        }
    });
    let seen: Vec<(Duration, bool)> = futures::future::join_all(clients)
        .await
        .into_iter()
        .flatten()
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    sampler.abort();
    Ok(ActiveSetResults {
        databases,
        requests: seen.len(),
        failed: seen.iter().filter(|(_, ok)| !ok).count(),
        seconds,
        waits: seen
            .iter()
            .filter(|(took, ok)| *ok && *took >= WAITED)
            .map(|(took, _)| *took)
            .collect(),
        evictions: evictions(control).await - evicted_before,
        peak_engine_bytes: peak.load(Ordering::Relaxed),
    })
}

impl fmt::Display for ActiveSetResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Active set of {ACTIVE_SET} on the node, {CLIENTS} clients asking for all {} databases for {SECONDS} s, Zipf-distributed (s = {ZIPF_S}):\n",
            self.databases
        )?;
        let answered = self.requests - self.failed;
        let rows = vec![
            vec![
                "requests/s".into(),
                format!("{:.0}", answered as f64 / self.seconds),
            ],
            vec!["requests failed".into(), self.failed.to_string()],
            vec![
                format!(
                    "requests that waited for a wake (took ≥ {} ms)",
                    WAITED.as_millis()
                ),
                format!(
                    "{:.1} %",
                    100.0 * self.waits.len() as f64 / answered.max(1) as f64
                ),
            ],
            vec![
                "… their time, p50 / p99".into(),
                format!(
                    "{} / {}",
                    ms(percentile(&self.waits, 50.0)),
                    ms(percentile(&self.waits, 99.0))
                ),
            ],
            vec![
                "databases put to sleep to make room".into(),
                format!("{:.1}/s", self.evictions / self.seconds),
            ],
            vec![
                "peak engine memory".into(),
                format!("{} MiB", self.peak_engine_bytes >> 20),
            ],
        ];
        writeln!(f, "{}", table(&["measure", "value"], &rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ranks_take_most_draws_and_every_rank_can_come() {
        let cdf = zipf_cdf(2000);
        assert!((cdf[1999] - 1.0).abs() < 1e-9);
        assert!(cdf[9] > 0.4, "the ten most popular: {}", cdf[9]);
        let mut rng = Rng(7);
        let draws: Vec<f64> = (0..10_000).map(|_| rng.unit()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
