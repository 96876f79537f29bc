//! HTTP data plane: wrk on rqlite's `/db/query` and `/db/execute` against
//! the bare rqlited, HAProxy (`mode http`) and rouse, interleaved round by
//! round; then 500 requests to a hibernated database through rouse, beside
//! the bare engine's cold start.

use std::fmt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rouse_control_api::{BackendCredentials, CreateDatabase, Engine};
use rouse_tests::{engine_url, free_port, rqlite_execute, Control, Proxy, ServerProcess};

use crate::cpu::cpu_time;
use crate::stats::{added_latency_table, ms, percentile, table};
use crate::wake::{bare_start, name};

const APP: &str = "bench";
const DB: &str = "http";

struct Load {
    label: &'static str,
    /// For the charts.
    short: &'static str,
    path: &'static str,
    body: &'static str,
}

const LOADS: [Load; 2] = [
    Load {
        label: "/db/query (point read)",
        short: "HTTP point read",
        path: "/db/query",
        body: r#"[["SELECT v FROM kv WHERE k = ?", 7]]"#,
    },
    Load {
        label: "/db/execute (insert)",
        short: "HTTP insert",
        path: "/db/execute",
        body: r#"[["INSERT INTO kv (k, v) VALUES (abs(random()) % 1000000, 'x')"]]"#,
    },
];

struct WrkResult {
    rps: f64,
    /// The proxy's CPU time per request, in µs (none for the bare side).
    cpu_us: Option<f64>,
    p50: Duration,
    p99: Duration,
}

/// Medians of one load: bare rqlited, HAProxy, rouse.
pub struct HttpRow {
    pub label: &'static str,
    pub short: &'static str,
    pub bare_rps: f64,
    pub haproxy_rps: f64,
    pub rouse_rps: f64,
    pub bare_p99: Duration,
    pub haproxy_p99: Duration,
    pub rouse_p99: Duration,
    /// Each proxy's CPU time per request, µs.
    pub haproxy_cpu_us: f64,
    pub rouse_cpu_us: f64,
}

/// 500 requests arriving at once at a hibernated database.
pub struct Herd {
    pub first: Duration,
    pub last: Duration,
    pub bare_cold_start: Duration,
}

pub struct HttpResults {
    pub rounds: usize,
    pub seconds: u64,
    pub connections: usize,
    pub rows: Vec<HttpRow>,
    pub herd: Herd,
    /// Median p50 latency of a point read at one connection: bare,
    /// HAProxy, rouse.
    pub one_client: [Duration; 3],
}

impl fmt::Display for HttpResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.label.to_string(),
                    format!("{:.0}", r.bare_rps),
                    format!("{:.0}", r.haproxy_rps),
                    format!("{:.0}", r.rouse_rps),
                    format!("{:.2}×", r.rouse_rps / r.haproxy_rps),
                    format!("{:.2}×", r.rouse_rps / r.bare_rps),
                    format!(
                        "{} / {} / {}",
                        ms_f(r.bare_p99),
                        ms_f(r.haproxy_p99),
                        ms_f(r.rouse_p99)
                    ),
                    format!("{:.1} / {:.1}", r.haproxy_cpu_us, r.rouse_cpu_us),
                ]
            })
            .collect();
        let throughput = table(
            &[
                "load",
                "bare req/s",
                "HAProxy req/s",
                "rouse req/s",
                "rouse ÷ HAProxy",
                "rouse ÷ bare",
                "p99 bare / HAProxy / rouse",
                "proxy CPU µs per request: HAProxy / rouse",
            ],
            &rows,
        );
        let herd = table(
            &[
                "500 requests to a hibernated database",
                "first answer",
                "last answer",
                "bare rqlited cold start",
            ],
            &[vec![
                "through rouse".into(),
                ms(self.herd.first),
                ms(self.herd.last),
                ms(self.herd.bare_cold_start),
            ]],
        );
        let one = added_latency_table(&["bare", "HAProxy", "rouse"], &self.one_client);
        let (connections, seconds, rounds) = (self.connections, self.seconds, self.rounds);
        write!(
            f,
            "rqlite HTTP through rouse, HAProxy and bare: wrk, {connections} connections, {seconds} s × {rounds} interleaved rounds (medians)\n\n{throughput}\n{herd}\n\
             One connection (wrk -c 1), p50 latency of a point read (median of the rounds)\n\n{one}"
        )
    }
}

pub async fn run(rounds: usize, seconds: u64, connections: usize) -> Result<HttpResults> {
    let control = Control::builder().hibernation_timeout("0").start().await?;
    let client = control.client();
    client.create_app(&name(APP)).await?;
    let key = client.create_key(&name(APP)).await?.key;
    let info = client
        .create_database(&CreateDatabase {
            app: name(APP),
            name: name(DB),
            engine: Engine::Rqlite,
            replication_factor: Some(1),
            patroni: None,
        })
        .await?;
    let engine = info.endpoints[0].addr();
    let logged_in = engine_url(&info, &info.endpoints[0]);
    rqlite_execute(&logged_in, "CREATE TABLE kv (k INTEGER, v TEXT)").await?;
    rqlite_execute(&logged_in, "INSERT INTO kv VALUES (7, 'seven')").await?;
    // rqlited checks its own login; rouse the app's API key.
    let engine_login = rouse_tests::engine_login(&info)
        .as_ref()
        .map_or_else(String::new, BackendCredentials::basic_auth);
    let proxy = Proxy::builder(&control).start().await?;
    let dir = tempfile::tempdir()?;
    let haproxy_port = free_port("127.0.0.1".parse()?);
    let haproxy = start_haproxy(dir.path(), haproxy_port, &engine).await?;

    // Base URLs, routing prefix included, logins, and the proxy's pid for
    // its CPU time: bare rqlited, HAProxy, rouse.
    let sides = [
        (format!("http://{engine}"), engine_login.clone(), None),
        (
            format!("http://127.0.0.1:{haproxy_port}"),
            engine_login,
            Some(haproxy.pid()),
        ),
        (
            format!("{}/{APP}/{DB}", proxy.url()),
            format!("ApiKey {key}"),
            Some(proxy.pid()),
        ),
    ];
    // One connection: what each side adds to a point read's latency,
    // measured first, while the table holds one row (the inserts below
    // would make every read a scan of them).
    let mut p50s: Vec<Vec<Duration>> = sides.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, (side, login, _)) in sides.iter().enumerate() {
            let script = wrk_script(dir.path(), i, &LOADS[0], login)?;
            let url = format!("{side}{}", LOADS[0].path);
            p50s[i].push(wrk(&script, &url, seconds, 1, None)?.p50);
        }
    }
    let one_client = std::array::from_fn(|i| percentile(&p50s[i], 50.0));

    let mut rows = Vec::new();
    for load in &LOADS {
        let scripts = sides
            .iter()
            .enumerate()
            .map(|(i, (_, login, _))| wrk_script(dir.path(), i, load, login))
            .collect::<Result<Vec<_>>>()?;
        let mut results: Vec<Vec<WrkResult>> = sides.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (i, (side, _, pid)) in sides.iter().enumerate() {
                results[i].push(wrk(
                    &scripts[i],
                    &format!("{side}{}", load.path),
                    seconds,
                    connections,
                    *pid,
                )?);
            }
        }
        let median = |rs: &[WrkResult]| {
            let middle = |mut v: Vec<f64>| {
                v.sort_by(|a, b| a.total_cmp(b));
                v.get(v.len() / 2).copied().unwrap_or_default()
            };
            let p99s: Vec<Duration> = rs.iter().map(|r| r.p99).collect();
            (
                middle(rs.iter().map(|r| r.rps).collect()),
                percentile(&p99s, 50.0),
                middle(rs.iter().filter_map(|r| r.cpu_us).collect()),
            )
        };
        let [(bare, bare99, _), (ha, ha99, ha_cpu), (rouse, rouse99, rouse_cpu)] = [
            median(&results[0]),
            median(&results[1]),
            median(&results[2]),
        ];
        rows.push(HttpRow {
            label: load.label,
            short: load.short,
            bare_rps: bare,
            haproxy_rps: ha,
            rouse_rps: rouse,
            bare_p99: bare99,
            haproxy_p99: ha99,
            rouse_p99: rouse99,
            haproxy_cpu_us: ha_cpu,
            rouse_cpu_us: rouse_cpu,
        });
    }

    // The herd: 500 requests arrive at once at a small hibernated database.
    const HERD: &str = "herd";
    let herd_db = client
        .create_database(&CreateDatabase {
            app: name(APP),
            name: name(HERD),
            engine: Engine::Rqlite,
            replication_factor: Some(1),
            patroni: None,
        })
        .await?;
    let herd_engine = engine_url(&herd_db, &herd_db.endpoints[0]);
    rqlite_execute(&herd_engine, "CREATE TABLE kv (k INTEGER, v TEXT)").await?;
    rqlite_execute(&herd_engine, "INSERT INTO kv VALUES (7, 'seven')").await?;
    client.hibernate(&name(APP), &name(HERD), true).await?;
    let herd_dir = control.data_dir().join(format!("{APP}_{HERD}/rqlite"));
    let bare_wake = bare_start(&client.database(&name(APP), &name(HERD)).await?, &herd_dir).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(600)
        .build()?;
    let started = Instant::now();
    let url = format!("{}/{APP}/{HERD}/db/query", proxy.url());
    let requests = (0..500).map(|_| {
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        async move {
            let resp = http
                .post(url)
                .header("x-api-key", key)
                .body(r#"["SELECT v FROM kv WHERE k = 7"]"#)
                .send()
                .await?;
            anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
            resp.bytes().await?;
            Ok::<_, anyhow::Error>(started.elapsed())
        }
    });
    let mut done: Vec<Duration> = futures::future::join_all(requests)
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    done.sort();
    Ok(HttpResults {
        rounds,
        seconds,
        connections,
        rows,
        one_client,
        herd: Herd {
            first: done[0],
            last: done[done.len() - 1],
            bare_cold_start: bare_wake,
        },
    })
}

fn ms_f(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn start_haproxy(dir: &Path, port: u16, backend: &str) -> Result<ServerProcess> {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n\
             frontend rqlite\n  bind 127.0.0.1:{port}\n  default_backend engine\n\
             backend engine\n  http-reuse always\n  server e1 {backend}\n"
        ),
    )?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut process = ServerProcess::spawn("haproxy", cmd, &dir.join("haproxy.log"))?;
    let url = format!("http://127.0.0.1:{port}/status");
    process
        // Any answer of rqlited's (401 without its login) means HAProxy reaches it.
        .wait_ready(Duration::from_secs(10), || async {
            let status = reqwest::get(&url).await?.status();
            anyhow::ensure!(!status.is_server_error(), "HAProxy answers {status}");
            Ok(())
        })
        .await?;
    Ok(process)
}

/// A wrk script that posts `load`'s body with `login`, for side `i`.
fn wrk_script(dir: &Path, i: usize, load: &Load, login: &str) -> Result<std::path::PathBuf> {
    let script = dir.join(format!("post-{i}.lua"));
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = [=[{}]=]\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"{login}\"\n",
            load.body
        ),
    )?;
    Ok(script)
}

/// One wrk run; with `proxy`, that process's CPU time per request too.
fn wrk(
    script: &Path,
    url: &str,
    seconds: u64,
    connections: usize,
    proxy: Option<u32>,
) -> Result<WrkResult> {
    let cpu_before = proxy.map(cpu_time).transpose()?;
    let out = Command::new("wrk")
        .args([
            "-t",
            &connections.min(2).to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") {
        bail!(
            "wrk against {url} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec in wrk output")?;
    // "12345 requests in 5.00s, ..."
    let requests: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.parse().ok())
        .context("no request count in wrk output")?;
    let cpu_us = match (proxy, cpu_before) {
        (Some(pid), Some(before)) => {
            let used = cpu_time(pid)?.saturating_sub(before);
            Some(used.as_secs_f64() * 1e6 / requests.max(1.0))
        }
        _ => None,
    };
    let percentile = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .and_then(|v| parse_wrk_duration(v.trim()))
            .with_context(|| format!("no {p} latency in wrk output"))
    };
    Ok(WrkResult {
        rps,
        cpu_us,
        p50: percentile("50%")?,
        p99: percentile("99%")?,
    })
}

/// wrk prints `850.00us`, `1.23ms`, `2.00s`.
fn parse_wrk_duration(s: &str) -> Option<Duration> {
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    num.parse::<f64>()
        .ok()
        .map(|v| Duration::from_secs_f64(v * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_durations() {
        assert_eq!(
            parse_wrk_duration("850.00us"),
            Some(Duration::from_micros(850))
        );
        assert_eq!(
            parse_wrk_duration("1.50ms"),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(parse_wrk_duration("2.00s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_wrk_duration("fast"), None);
    }
}
