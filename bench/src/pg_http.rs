//! PostgreSQL over HTTP: a point read through `/sql` (Neon's protocol) and
//! through the gateway API, beside the same read over PostgreSQL
//! connections (bare, and through rouse's Postgres port), at one client and
//! at many, in one run, round by round.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rouse_tests::{postgres_bin_dir, Proxy};
use serde_json::json;

use crate::pg::{init_pgbench, setup, us, APP, DB, PASSWORD, USER};
use crate::stats::{percentile, table};
use crate::wake::name;

/// Rows of pgbench's scale 1.
const ACCOUNTS: u32 = 100_000;
const POINT_READ: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const SIDES: [&str; 4] = [
    "bare PostgreSQL connection",
    "rouse Postgres port",
    "rouse /sql (Neon HTTP)",
    "rouse gateway API",
];

/// Latencies of one side at one number of clients, over every round.
pub struct Side {
    pub label: &'static str,
    pub clients: usize,
    pub latencies: Vec<Duration>,
}

pub struct PgHttpResults {
    pub rounds: usize,
    pub seconds: u64,
    pub sides: Vec<Side>,
}

impl fmt::Display for PgHttpResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = self
            .sides
            .iter()
            .map(|s| {
                let secs = (self.rounds as u64 * self.seconds) as f64;
                vec![
                    s.label.to_string(),
                    s.clients.to_string(),
                    format!("{:.0}", s.latencies.len() as f64 / secs),
                    us(percentile(&s.latencies, 50.0)),
                    us(percentile(&s.latencies, 99.0)),
                ]
            })
            .collect();
        write!(
            f,
            "A point read of pgbench_accounts over HTTP and over PostgreSQL connections, {} s × {} interleaved rounds\n\n{}",
            self.seconds,
            self.rounds,
            table(&["route", "clients", "reads/s", "p50", "p99"], &rows)
        )
    }
}

pub async fn run(rounds: usize, seconds: u64, clients: usize) -> Result<PgHttpResults> {
    let (control, _user, info) = setup().await?;
    let api = control.client();
    let key = api.create_key(&name(APP)).await?.key;
    let proxy = Proxy::builder(&control).start().await?;
    let pg_port = info.endpoints[0].port;
    init_pgbench(&postgres_bin_dir()?.join("pgbench"), pg_port)?;
    let urls = [
        format!("host=127.0.0.1 port={pg_port} user={USER} password={PASSWORD} dbname={DB}"),
        format!(
            "host=127.0.0.1 port={} user={USER}.{APP} password={PASSWORD} dbname={DB} sslmode=disable",
            proxy.postgres_addr().port()
        ),
    ];
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let mut sides: Vec<Side> = [1, clients]
        .into_iter()
        .flat_map(|n| {
            SIDES.map(|label| Side {
                label,
                clients: n,
                latencies: Vec::new(),
            })
        })
        .collect();
    for _ in 0..rounds {
        for side in &mut sides {
            let reader = Reader {
                route: SIDES.iter().position(|l| *l == side.label).expect("a side"),
                urls: &urls,
                proxy: &proxy,
                http: &http,
                key: &key,
            };
            side.latencies
                .extend(reader.load(side.clients, seconds).await?);
        }
    }
    Ok(PgHttpResults {
        rounds,
        seconds,
        sides,
    })
}

/// One route's point reads.
struct Reader<'a> {
    route: usize,
    urls: &'a [String; 2],
    proxy: &'a Proxy,
    http: &'a reqwest::Client,
    key: &'a str,
}

impl Reader<'_> {
    /// `clients` loops reading for `seconds`; each read's latency.
    async fn load(&self, clients: usize, seconds: u64) -> Result<Vec<Duration>> {
        let until = Instant::now() + Duration::from_secs(seconds);
        let loops = futures::future::try_join_all((0..clients).map(|c| async move {
            let pg = match self.route {
                0 | 1 => {
                    let (client, conn) =
                        tokio_postgres::connect(&self.urls[self.route], tokio_postgres::NoTls)
                            .await
                            .context("connect")?;
                    tokio::spawn(conn);
                    // Prepared once: each read is then one round trip.
                    let read = client.prepare(POINT_READ).await?;
                    Some((client, read))
                }
                _ => None,
            };
            let mut taken = Vec::new();
            let mut aid = (c as u32 * 7919) % ACCOUNTS + 1;
            while Instant::now() < until {
                aid = aid % ACCOUNTS + 1;
                let t0 = Instant::now();
                match &pg {
                    Some((client, read)) => {
                        client.query_one(read, &[&(aid as i32)]).await?;
                    }
                    None => self.over_http(aid).await?,
                }
                taken.push(t0.elapsed());
            }
            anyhow::Ok(taken)
        }))
        .await?;
        Ok(loops.into_iter().flatten().collect())
    }

    async fn over_http(&self, aid: u32) -> Result<()> {
        let base = self.proxy.url();
        let request = match self.route {
            2 => self
                .http
                .post(format!("{base}/sql"))
                .header(
                    "Neon-Connection-String",
                    format!("postgresql://{USER}.{APP}:{PASSWORD}@127.0.0.1/{DB}"),
                )
                .header("Neon-Raw-Text-Output", "true")
                .header("Neon-Array-Mode", "true")
                .json(&json!({"query": POINT_READ, "params": [aid.to_string()]})),
            _ => self
                .http
                .post(format!("{base}/v1/database/query"))
                .bearer_auth(self.key)
                .json(&json!({"database": DB, "sql": "SELECT abalance FROM pgbench_accounts WHERE aid = ?", "args": [aid]})),
        };
        let resp = request.send().await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "{}: {}",
            SIDES[self.route],
            resp.text().await.unwrap_or_default()
        );
        resp.bytes().await?;
        Ok(())
    }
}
