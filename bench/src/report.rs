//! `rouse-bench all`: every comparison in one run, written as one Markdown
//! report with PNG charts beside it. The tables are the subcommands' own
//! output, from the same results the charts are drawn from.

use std::fmt::{self, Display};
use std::future::Future;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::chart::{
    BarChart, Series, BLUE_BAR, GREY_BAR, LIGHT_BLUE_BAR, LIGHT_GREY_BAR, ORANGE_BAR,
};
use crate::cluster::ClusterResults;
use crate::http::HttpResults;
use crate::pg::PgResults;
use crate::pg_http::PgHttpResults;
use crate::pg_idle::IdleResults;
use crate::redis::RedisResults;
use crate::sessions::SessionResults;
use crate::wake::WakeResults;

/// How much of everything to run.
pub struct Sizes {
    pub wake_cycles: usize,
    pub http_rounds: usize,
    pub http_seconds: u64,
    pub http_connections: usize,
    pub pg_rounds: usize,
    pub pg_seconds: u64,
    pub idle_clients: usize,
    pub idle_active: usize,
    /// How long pgbench drives the busy clients (their connects included).
    pub idle_seconds: u64,
    pub redis_rounds: usize,
    pub redis_requests: usize,
    pub redis_clients: usize,
    pub keys: usize,
    pub cluster_cycles: usize,
    pub cluster_kills: usize,
}

impl Sizes {
    /// Every part at a size whose medians hold still: about 23 minutes
    /// on two cores.
    pub const FULL: Sizes = Sizes {
        wake_cycles: 20,
        http_rounds: 5,
        http_seconds: 5,
        http_connections: 32,
        pg_rounds: 5,
        pg_seconds: 5,
        idle_clients: 10_000,
        idle_active: 1_000,
        idle_seconds: 15,
        redis_rounds: 3,
        redis_requests: 300_000,
        redis_clients: 50,
        keys: 500,
        cluster_cycles: 20,
        cluster_kills: 3,
    };

    /// A smoke run of a couple of minutes: every part runs, the figures are
    /// rough.
    pub const QUICK: Sizes = Sizes {
        wake_cycles: 5,
        http_rounds: 1,
        http_seconds: 3,
        http_connections: 32,
        pg_rounds: 1,
        pg_seconds: 3,
        idle_clients: 2_000,
        idle_active: 200,
        idle_seconds: 5,
        redis_rounds: 1,
        redis_requests: 50_000,
        redis_clients: 50,
        keys: 200,
        cluster_cycles: 5,
        cluster_kills: 1,
    };
}

impl Display for Sizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wake: {} hibernate/wake cycles per engine; HTTP: wrk, {} × {} s, {} connections; \
             pgbench: {} × {} s; {} idle PostgreSQL clients, {} of them then busy; redis-benchmark: {} × {} requests, \
             {} clients; credential checks: {} API keys; several nodes: {} creates and wakes, \
             {} node kills",
            self.wake_cycles,
            self.http_rounds,
            self.http_seconds,
            self.http_connections,
            self.pg_rounds,
            self.pg_seconds,
            self.idle_clients,
            self.idle_active,
            self.redis_rounds,
            self.redis_requests,
            self.redis_clients,
            self.keys,
            self.cluster_cycles,
            self.cluster_kills,
        )
    }
}

/// What one run measured; a part that failed is `None`, its error in
/// `failed`.
#[derive(Default)]
struct Results {
    wake: Option<WakeResults>,
    http: Option<HttpResults>,
    pg: Option<PgResults>,
    pg_http: Option<PgHttpResults>,
    idle: Option<IdleResults>,
    redis: Option<RedisResults>,
    sessions: Option<SessionResults>,
    cluster: Option<ClusterResults>,
    failed: Vec<(&'static str, String)>,
}

impl Results {
    async fn step<T>(
        &mut self,
        part: &'static str,
        run: impl Future<Output = Result<T>>,
    ) -> Option<T> {
        eprintln!("rouse-bench all: {part} ...");
        let started = Instant::now();
        match run.await {
            Ok(r) => {
                eprintln!(
                    "rouse-bench all: {part} done in {:.0} s",
                    started.elapsed().as_secs_f64()
                );
                Some(r)
            }
            Err(e) => {
                eprintln!("rouse-bench all: {part} failed: {e:#}");
                self.failed.push((part, format!("{e:#}")));
                None
            }
        }
    }
}

const THROUGHPUT_PNG: &str = "throughput.png";
const WAKE_PNG: &str = "wake.png";
const IDLE_PNG: &str = "idle-memory.png";

/// Runs everything at `sizes` and writes `out/README.md` and its charts.
pub async fn all(sizes: &Sizes, quick: bool, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let started = Instant::now();
    let mut r = Results::default();
    r.wake = r.step("wake", crate::wake::run(sizes.wake_cycles)).await;
    r.http = r
        .step(
            "http",
            crate::http::run(
                sizes.http_rounds,
                sizes.http_seconds,
                sizes.http_connections,
            ),
        )
        .await;
    r.pg = r
        .step("pg", crate::pg::run(sizes.pg_rounds, sizes.pg_seconds))
        .await;
    r.pg_http = r
        .step(
            "pg-http",
            crate::pg_http::run(sizes.pg_rounds, sizes.pg_seconds, sizes.http_connections),
        )
        .await;
    r.idle = r
        .step(
            "pg-idle",
            crate::pg_idle::idle(sizes.idle_clients, sizes.idle_active, sizes.idle_seconds),
        )
        .await;
    r.redis = r
        .step(
            "redis",
            crate::redis::run(
                sizes.redis_rounds,
                sizes.redis_requests,
                sizes.redis_clients,
            ),
        )
        .await;
    r.sessions = r
        .step("credential checks", crate::sessions::run(sizes.keys))
        .await;
    r.cluster = r
        .step(
            "cluster",
            crate::cluster::run(sizes.cluster_cycles, sizes.cluster_kills),
        )
        .await;

    let charts = draw_charts(&r, out)?;
    let report = markdown(&r, sizes, quick, &charts);
    let path = out.join("README.md");
    std::fs::write(&path, report).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "rouse-bench all: wrote {} in {:.0} s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    if !r.failed.is_empty() {
        let parts: Vec<&str> = r.failed.iter().map(|(p, _)| *p).collect();
        bail!("failed: {}", parts.join(", "));
    }
    Ok(())
}

/// The charts there is data for, by file name.
fn draw_charts(r: &Results, out: &Path) -> Result<Vec<&'static str>> {
    let mut drawn = Vec::new();
    let ratio = |v: f64| format!("{v:.2}×");

    // rouse's throughput as a multiple of HAProxy's and PgBouncer's.
    let mut groups = Vec::new();
    let (mut vs_haproxy, mut vs_pgbouncer) = (Vec::new(), Vec::new());
    for row in r.http.iter().flat_map(|h| &h.rows) {
        groups.push(row.short.to_string());
        vs_haproxy.push(Some(row.rouse_rps / row.haproxy_rps));
        vs_pgbouncer.push(None);
    }
    for row in r.pg.iter().flat_map(|p| &p.rows) {
        groups.push(row.short.to_string());
        vs_haproxy.push(Some(row.rouse / row.haproxy));
        vs_pgbouncer.push(Some(row.rouse / row.pgbouncer));
    }
    for row in r.redis.iter().flat_map(|p| &p.rows) {
        groups.push(row.short.clone());
        vs_haproxy.push(Some(row.rouse / row.haproxy));
        vs_pgbouncer.push(None);
    }
    if !groups.is_empty() {
        BarChart {
            title: "rouse throughput as a multiple of HAProxy's and PgBouncer's",
            axis: "rouse ÷ other proxy (medians; 1.0× is parity)",
            groups,
            series: vec![
                Series {
                    name: "rouse ÷ HAProxy".into(),
                    color: BLUE_BAR,
                    values: vs_haproxy,
                },
                Series {
                    name: "rouse ÷ PgBouncer".into(),
                    color: ORANGE_BAR,
                    values: vs_pgbouncer,
                },
            ],
            format: &ratio,
            reference: Some(1.0),
        }
        .draw(&out.join(THROUGHPUT_PNG))?;
        drawn.push(THROUGHPUT_PNG);
    }

    if let Some(wake) = &r.wake {
        let ms = |v: f64| format!("{v:.0} ms");
        let series =
            |name: &str, color, pick: fn(&crate::wake::WakeRow) -> std::time::Duration| Series {
                name: name.into(),
                color,
                values: wake
                    .rows
                    .iter()
                    .map(|row| Some(pick(row).as_secs_f64() * 1000.0))
                    .collect(),
            };
        BarChart {
            title: "Wake latency: rouse's wake beside the bare engine's cold start",
            axis: "milliseconds until the first answer",
            groups: wake.rows.iter().map(|row| row.label.clone()).collect(),
            series: vec![
                series("rouse p50", BLUE_BAR, |row| row.rouse_p50),
                series("rouse p99", LIGHT_BLUE_BAR, |row| row.rouse_p99),
                series("bare p50", GREY_BAR, |row| row.bare_p50),
                series("bare p99", LIGHT_GREY_BAR, |row| row.bare_p99),
            ],
            format: &ms,
            reference: None,
        }
        .draw(&out.join(WAKE_PNG))?;
        drawn.push(WAKE_PNG);
    }

    if let Some(idle) = &r.idle {
        let kib = |v: f64| format!("{v:.2} KiB");
        BarChart {
            title: "Memory per idle PostgreSQL client (transaction pooling)",
            axis: "growth of resident memory per idle client",
            groups: idle.rows.iter().map(|row| row.label.to_string()).collect(),
            series: [("plain TCP", BLUE_BAR, false), ("TLS", ORANGE_BAR, true)]
                .into_iter()
                .map(|(over, color, tls)| Series {
                    name: format!("{} idle clients, {over}", idle.clients),
                    color,
                    values: idle
                        .rows
                        .iter()
                        .map(|row| Some(idle.per_client_kib(row.memory(tls))))
                        .collect(),
                })
                .collect(),
            format: &kib,
            reference: None,
        }
        .draw(&out.join(IDLE_PNG))?;
        drawn.push(IDLE_PNG);
    }
    // A chart of an earlier run would not match this report.
    for file in [THROUGHPUT_PNG, WAKE_PNG, IDLE_PNG] {
        if !drawn.contains(&file) {
            let _ = std::fs::remove_file(out.join(file));
        }
    }
    Ok(drawn)
}

fn markdown(r: &Results, sizes: &Sizes, quick: bool, charts: &[&str]) -> String {
    let mut md = String::from("# rouse benchmarks\n\n");
    md.push_str(
        "Every side-by-side comparison of `rouse-bench` in one run: rouse against the bare \
         engines, HAProxy and PgBouncer, with servers and load generators on one host, round \
         by round so that noise hits every side alike. Made by\n\n```sh\ncargo build --release --workspace --bins \
         && ./target/release/rouse-bench all",
    );
    if quick {
        md.push_str(" --quick");
    }
    md.push_str("\n```\n\n");
    md.push_str(&format!("Sizes: {sizes}.\n\n"));
    if quick {
        md.push_str(
            "This is a smoke run (`--quick`): every part ran, but the sizes are too small for \
             the figures to be more than rough; run without `--quick` for figures to quote.\n\n",
        );
    }
    md.push_str(
        "Each part also runs alone (`rouse-bench wake`, `http`, `pg`, `pg-http`, `pg-idle`, `redis`, \
         `cluster`) and prints the same tables.\n",
    );
    let chart = |md: &mut String, file: &str, alt: &str| {
        if charts.contains(&file) {
            md.push_str(&format!("\n![{alt}]({file})\n"));
        }
    };
    let section = |md: &mut String, part: &str, result: Option<&dyn Display>| match result {
        Some(result) => md.push_str(&format!("\n{result}")),
        None => {
            let why = r
                .failed
                .iter()
                .find(|(p, _)| *p == part)
                .map_or("not run", |(_, e)| e.as_str());
            md.push_str(&crate::stats::not_measured(why));
        }
    };

    md.push_str("\n## Throughput beside HAProxy and PgBouncer\n");
    chart(
        &mut md,
        THROUGHPUT_PNG,
        "rouse throughput divided by HAProxy's and PgBouncer's, per load",
    );
    md.push_str(
        "\nrouse's median throughput divided by HAProxy's (rqlite HTTP, PostgreSQL, Redis) and \
         PgBouncer's (PostgreSQL, same pooling mode); 1.0× is parity. The absolute figures are \
         in the tables below.\n",
    );

    md.push_str("\n## Wake latency\n");
    chart(
        &mut md,
        WAKE_PNG,
        "wake latency p50 and p99 per engine, rouse beside the bare engine",
    );
    section(&mut md, "wake", r.wake.as_ref().map(|x| x as &dyn Display));

    md.push_str("\n## rqlite over HTTP\n");
    section(&mut md, "http", r.http.as_ref().map(|x| x as &dyn Display));

    md.push_str("\n## PostgreSQL\n");
    section(&mut md, "pg", r.pg.as_ref().map(|x| x as &dyn Display));

    md.push_str("\n## PostgreSQL over HTTP\n");
    section(
        &mut md,
        "pg-http",
        r.pg_http.as_ref().map(|x| x as &dyn Display),
    );

    md.push_str("\n## Idle PostgreSQL clients, and busy ones beside them\n");
    chart(
        &mut md,
        IDLE_PNG,
        "resident memory per idle PostgreSQL client, rouse beside PgBouncer",
    );
    section(
        &mut md,
        "pg-idle",
        r.idle.as_ref().map(|x| x as &dyn Display),
    );

    md.push_str("\n## Redis\n");
    section(
        &mut md,
        "redis",
        r.redis.as_ref().map(|x| x as &dyn Display),
    );
    section(
        &mut md,
        "credential checks",
        r.sessions.as_ref().map(|x| x as &dyn Display),
    );

    md.push_str("\n## Several nodes\n");
    section(
        &mut md,
        "cluster",
        r.cluster.as_ref().map(|x| x as &dyn Display),
    );
    md
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::http::{Herd, HttpRow};
    use crate::pg::PgRow;
    use crate::pg_idle::{Busy, IdleRow, Memory};
    use crate::redis::RedisRow;
    use crate::wake::WakeRow;

    fn sample() -> Results {
        let ms = Duration::from_millis;
        Results {
            wake: Some(WakeResults {
                cycles: 3,
                rows: ["rqlite ×1", "rqlite ×3", "postgres ×1"]
                    .iter()
                    .enumerate()
                    .map(|(i, label)| WakeRow {
                        label: label.to_string(),
                        rouse_p50: ms(190 + 10 * i as u64),
                        rouse_p99: ms(250),
                        bare_p50: ms(170),
                        bare_p99: ms(230 + 40 * i as u64),
                        target_p50: ms(300),
                    })
                    .collect(),
            }),
            http: Some(HttpResults {
                rounds: 1,
                seconds: 2,
                connections: 32,
                rows: vec![HttpRow {
                    label: "/db/query (point read)",
                    short: "HTTP point read",
                    bare_rps: 26097.0,
                    haproxy_rps: 20201.0,
                    rouse_rps: 17817.0,
                    bare_p99: ms(34),
                    haproxy_p99: ms(7),
                    rouse_p99: ms(7),
                    haproxy_cpu_us: 21.0,
                    rouse_cpu_us: 24.0,
                }],
                one_client: [310, 360, 390].map(Duration::from_micros),
                herd: Herd {
                    first: ms(230),
                    last: ms(278),
                    bare_cold_start: ms(151),
                },
            }),
            pg: Some(PgResults {
                rounds: 1,
                seconds: 2,
                rows: vec![PgRow {
                    label: "-S, 16 clients, session pooling",
                    short: "pgbench -S session",
                    bare: 61762.0,
                    haproxy: 43266.0,
                    pgbouncer: 41494.0,
                    rouse: 43668.0,
                }],
                one_client: [128, 172, 175, 182].map(Duration::from_micros),
            }),
            idle: Some(IdleResults {
                clients: 1000,
                active: 100,
                seconds: 3,
                rows: vec![
                    IdleRow {
                        label: "PgBouncer",
                        plain: Memory {
                            before_kib: 8192,
                            after_kib: 9000,
                        },
                        tls: Memory {
                            before_kib: 8192,
                            after_kib: 24000,
                        },
                        busy: Busy {
                            tps: 30000.0,
                            p50: Duration::from_micros(2900),
                            p99: Duration::from_micros(7000),
                            cpu_us: 30.0,
                        },
                    },
                    IdleRow {
                        label: "rouse",
                        plain: Memory {
                            before_kib: 15000,
                            after_kib: 16900,
                        },
                        tls: Memory {
                            before_kib: 15000,
                            after_kib: 25000,
                        },
                        busy: Busy {
                            tps: 31000.0,
                            p50: Duration::from_micros(2800),
                            p99: Duration::from_micros(6500),
                            cpu_us: 35.0,
                        },
                    },
                ],
            }),
            redis: Some(RedisResults {
                rounds: 1,
                requests: 30_000,
                rows: vec![RedisRow {
                    label: "GET, 50 clients, -P 16".into(),
                    short: "Redis GET -P 16".into(),
                    bare: 1618996.0,
                    haproxy: 945477.0,
                    rouse: 962155.0,
                    haproxy_cpu_us: 0.57,
                    rouse_cpu_us: 0.52,
                }],
                one_client: [40, 70, 75].map(Duration::from_micros),
            }),
            pg_http: None,
            sessions: None,
            cluster: None,
            failed: vec![("credential checks", "Redis would not start".into())],
        }
    }

    #[test]
    fn report_with_charts() {
        let r = sample();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let charts = draw_charts(&r, out).unwrap();
        assert_eq!(charts, [THROUGHPUT_PNG, WAKE_PNG, IDLE_PNG]);
        for file in &charts {
            assert!(std::fs::metadata(out.join(file)).unwrap().len() > 1000);
        }
        let md = markdown(&r, &Sizes::QUICK, true, &charts);
        assert!(md.contains("rouse-bench all --quick\n"));
        assert!(md.contains(
            "![rouse throughput divided by HAProxy's and PgBouncer's, per load](throughput.png)"
        ));
        // The subcommands' own tables, as they print them.
        assert!(md.contains(&r.wake.as_ref().unwrap().to_string()));
        assert!(md.contains(&r.pg.as_ref().unwrap().to_string()));
        assert!(md.contains("| /db/query (point read) | 26097 | 20201 | 17817 | 0.88× | 0.68× |"));
        assert!(md.contains("| rouse | 31000 | 2800 µs | 6500 µs |"));
        assert!(md.contains(
            "100 of them busy (pgbench -S -c 100 for 3 s, counted once every client ran), 900 idle"
        ));
        assert!(md.contains("Not measured: Redis would not start"));
    }
}
