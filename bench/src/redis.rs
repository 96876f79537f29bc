//! Redis data plane: redis-benchmark GET and SET, with and without
//! pipelining, against the bare redis-server, HAProxy (`mode tcp` with the
//! usual `role:master` check) and rouse's Redis front (static list),
//! interleaved round by round.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rouse_tests::{free_port, Control, Proxy, Redis, ServerProcess};

use crate::cpu::cpu_time;
use crate::stats::{added_latency_table, table};

struct Load {
    label: &'static str,
    /// For the charts.
    short: &'static str,
    args: &'static [&'static str],
    /// Requests per run, as a multiple of `--requests`: pipelining is
    /// that much faster, and a run should last a few seconds either way.
    scale: usize,
}

const LOADS: [Load; 2] = [
    Load {
        label: "no pipelining",
        short: "",
        args: &[],
        scale: 1,
    },
    Load {
        label: "-P 16",
        short: "-P 16",
        args: &["-P", "16"],
        scale: 10,
    },
];

/// redis-benchmark's tests, SET first so that GET finds the key.
const TESTS: [&str; 2] = ["SET", "GET"];

/// Median requests per second of one test and load on each side, and the
/// proxies' median CPU time per request.
pub struct RedisRow {
    pub label: String,
    pub short: String,
    pub bare: f64,
    pub haproxy: f64,
    pub rouse: f64,
    pub haproxy_cpu_us: f64,
    pub rouse_cpu_us: f64,
}

pub struct RedisResults {
    pub rounds: usize,
    pub requests: usize,
    pub rows: Vec<RedisRow>,
    /// Median p50 latency of a GET at one client: bare, HAProxy, rouse.
    pub one_client: [Duration; 3],
}

impl fmt::Display for RedisResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let mut row = vec![r.label.clone()];
                row.extend(
                    [r.bare, r.haproxy, r.rouse]
                        .iter()
                        .map(|r| format!("{r:.0}")),
                );
                row.push(format!("{:.2}×", r.rouse / r.haproxy));
                row.push(format!("{:.2}×", r.rouse / r.bare));
                row.push(format!("{:.2} / {:.2}", r.haproxy_cpu_us, r.rouse_cpu_us));
                row
            })
            .collect();
        let header = [
            "redis-benchmark",
            "bare rps",
            "HAProxy rps",
            "rouse rps",
            "rouse ÷ HAProxy",
            "rouse ÷ bare",
            "proxy CPU µs per request, HAProxy / rouse",
        ];
        let one = added_latency_table(&["bare", "HAProxy", "rouse"], &self.one_client);
        write!(
            f,
            "Redis through rouse and HAProxy (mode tcp), beside the bare server; {} requests (×10 pipelined) × {} interleaved rounds (medians)\n\n{}\n\
             One client (redis-benchmark -c 1, GET), p50 latency (median of the rounds)\n\n{one}",
            self.requests,
            self.rounds,
            table(&header, &rows)
        )
    }
}

pub async fn run(rounds: usize, requests: usize, clients: usize) -> Result<RedisResults> {
    let redis = Redis::start().await?;
    let control = Control::builder().hibernation_timeout("0").start().await?;
    let proxy = Proxy::builder(&control)
        .redis_backend(&format!("{{servers: [{}]}}", redis.addr()))
        .start()
        .await?;
    let dir = tempfile::Builder::new()
        .prefix("rouse-bench-redis-")
        .tempdir()?;
    let haproxy = SocketAddr::new("127.0.0.1".parse()?, free_port("127.0.0.1".parse()?));
    let haproxy_process = start_haproxy(dir.path(), haproxy, redis.addr()).await?;
    // Label, address, and the proxy's pid for its CPU time.
    let sides = [
        ("bare", redis.addr(), None),
        ("HAProxy", haproxy, Some(haproxy_process.pid())),
        ("rouse", proxy.redis_addr(), Some(proxy.pid())),
    ];
    let mut rows = Vec::new();
    for load in &LOADS {
        let n = requests * load.scale;
        for test in TESTS {
            // Per side, one figure per round: rps, and the proxy's CPU
            // time per request.
            let mut rps = vec![Vec::new(); sides.len()];
            let mut cpu = vec![Vec::new(); sides.len()];
            for _ in 0..rounds {
                for (i, (label, addr, pid)) in sides.iter().enumerate() {
                    let before = pid.map(cpu_time).transpose()?;
                    rps[i].push(
                        redis_benchmark(*addr, test, load, n, clients)
                            .with_context(|| format!("redis-benchmark via {label}"))?
                            .rps,
                    );
                    if let (Some(pid), Some(before)) = (pid, before) {
                        let used = cpu_time(*pid)? - before;
                        cpu[i].push(used.as_secs_f64() * 1e6 / n as f64);
                    }
                }
            }
            let rps: Vec<f64> = rps.iter_mut().map(|r| median(r)).collect();
            let cpu: Vec<f64> = cpu.iter_mut().map(|c| median(c)).collect();
            rows.push(RedisRow {
                label: format!("{test}, {clients} clients, {}", load.label),
                short: format!("Redis {test} {}", load.short)
                    .trim_end()
                    .to_string(),
                bare: rps[0],
                haproxy: rps[1],
                rouse: rps[2],
                haproxy_cpu_us: cpu[1],
                rouse_cpu_us: cpu[2],
            });
        }
    }
    // One client: what each side adds to a GET's latency.
    let mut p50s = vec![Vec::new(); sides.len()];
    for _ in 0..rounds {
        for (i, (label, addr, _)) in sides.iter().enumerate() {
            let one = redis_benchmark(*addr, "GET", &LOADS[0], requests / 10, 1)
                .with_context(|| format!("redis-benchmark -c 1 via {label}"))?;
            p50s[i].push(one.p50);
        }
    }
    let one_client = std::array::from_fn(|i| crate::stats::percentile(&p50s[i], 50.0));
    Ok(RedisResults {
        rounds,
        requests,
        rows,
        one_client,
    })
}

/// The median; 0 for none (the bare side has no proxy CPU).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// What one run of a redis-benchmark test measured.
struct Measured {
    rps: f64,
    p50: Duration,
}

/// Requests per second and p50 latency of one of redis-benchmark's tests.
fn redis_benchmark(
    addr: SocketAddr,
    test: &str,
    load: &Load,
    requests: usize,
    clients: usize,
) -> Result<Measured> {
    let out = Command::new("redis-benchmark")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-t", &test.to_lowercase(), "--csv"])
        .args(["-n", &requests.to_string(), "-c", &clients.to_string()])
        .args(load.args)
        .output()
        .context("cannot run redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{text}{}", String::from_utf8_lossy(&out.stderr));
    }
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...
    text.lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split(',').map(|f| f.trim_matches('"')).collect();
            if fields.first() != Some(&test) {
                return None;
            }
            let p50_ms: f64 = fields.get(4)?.parse().ok()?;
            Some(Measured {
                rps: fields.get(1)?.parse().ok()?,
                p50: Duration::from_secs_f64(p50_ms / 1e3),
            })
        })
        .with_context(|| format!("no {test} in redis-benchmark output: {text}"))
}

/// HAProxy as it usually fronts Redis: `mode tcp`, the server checked
/// for `role:master`.
async fn start_haproxy(dir: &Path, addr: SocketAddr, backend: SocketAddr) -> Result<ServerProcess> {
    let cfg = dir.join("haproxy-redis.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             listen redis\n  bind {addr}\n  option tcp-check\n\
             \x20 tcp-check send PING\\r\\n\n  tcp-check expect string +PONG\n\
             \x20 tcp-check send info\\ replication\\r\\n\n  tcp-check expect string role:master\n\
             \x20 tcp-check send QUIT\\r\\n\n  tcp-check expect string +OK\n\
             \x20 server r1 {backend} check inter 1s\n"
        ),
    )?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut process = ServerProcess::spawn("haproxy", cmd, &dir.join("haproxy-redis.log"))?;
    process
        .wait_ready(Duration::from_secs(10), || async {
            let out = rouse_tests::redis_cli(addr, None, &["PING"]).await?;
            anyhow::ensure!(out == "PONG", "PING via HAProxy answered {out:?}");
            Ok(())
        })
        .await?;
    Ok(process)
}
