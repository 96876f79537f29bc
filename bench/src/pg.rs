//! PostgreSQL data plane: pgbench through rouse, HAProxy (`mode tcp`) and
//! PgBouncer, beside the bare server, interleaved round by round.

use std::fmt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rouse_control_api::{CreateDatabase, DatabaseInfo, Engine, PoolMode, UserInfo};
use rouse_tests::{free_port, postgres_bin_dir, Control, Proxy, RunAs, ServerProcess, TlsFiles};

use crate::stats::{added_latency_table, percentile, table};
use crate::wake::name;

pub(crate) const APP: &str = "bench";
pub(crate) const DB: &str = "pgb";
pub(crate) const USER: &str = "alice";
pub(crate) const PASSWORD: &str = "bench-password";

struct Side {
    label: &'static str,
    port: u16,
    user: String,
}

struct Load {
    label: &'static str,
    /// For the charts.
    short: &'static str,
    args: &'static [&'static str],
    /// rouse's pool mode, and PgBouncer's.
    mode: PoolMode,
}

const LOADS: [Load; 3] = [
    Load {
        label: "-S, 16 clients, session pooling",
        short: "pgbench -S session",
        args: &["-S", "-c", "16", "-j", "2"],
        mode: PoolMode::Session,
    },
    Load {
        label: "-S, 16 clients, transaction pooling",
        short: "pgbench -S transaction",
        args: &["-S", "-c", "16", "-j", "2"],
        mode: PoolMode::Transaction,
    },
    Load {
        label: "-S -C (connect per transaction), 8 clients, transaction pooling",
        short: "pgbench -S -C transaction",
        args: &["-S", "-C", "-c", "8", "-j", "2"],
        mode: PoolMode::Transaction,
    },
];

/// Control with app `bench`, its user and its PostgreSQL database.
pub(crate) async fn setup() -> Result<(Control, UserInfo, DatabaseInfo)> {
    let control = Control::builder().hibernation_timeout("0").start().await?;
    let client = control.client();
    client.create_app(&name(APP)).await?;
    let user = client.create_user(&name(APP), USER, PASSWORD).await?;
    let info = client
        .create_database(&CreateDatabase {
            app: name(APP),
            name: name(DB),
            engine: Engine::Postgres,
            replication_factor: None,
            patroni: None,
        })
        .await?;
    Ok((control, user, info))
}

/// Median tps of one pgbench load on each side.
pub struct PgRow {
    pub label: &'static str,
    pub short: &'static str,
    pub bare: f64,
    pub haproxy: f64,
    pub pgbouncer: f64,
    pub rouse: f64,
}

pub struct PgResults {
    pub rounds: usize,
    pub seconds: u64,
    pub rows: Vec<PgRow>,
    /// Median p50 latency of a point read at one client, session pooling:
    /// bare, HAProxy, PgBouncer, rouse.
    pub one_client: [Duration; 4],
}

impl fmt::Display for PgResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let mut row = vec![r.label.to_string()];
                row.extend(
                    [r.bare, r.haproxy, r.pgbouncer, r.rouse]
                        .iter()
                        .map(|t| format!("{t:.0}")),
                );
                row.push(format!(
                    "{:.2}× / {:.2}×",
                    r.rouse / r.haproxy,
                    r.rouse / r.pgbouncer
                ));
                row
            })
            .collect();
        let header = [
            "pgbench",
            "bare tps",
            "HAProxy tps",
            "PgBouncer tps",
            "rouse tps",
            "rouse ÷ HAProxy / ÷ PgBouncer",
        ];
        writeln!(
            f,
            "PostgreSQL through rouse, HAProxy (mode tcp) and PgBouncer (same pooling as rouse), {} s × {} interleaved rounds (medians)\n\n{}",
            self.seconds,
            self.rounds,
            table(&header, &rows)
        )?;
        write!(
            f,
            "One client (pgbench -S -c 1, session pooling), p50 latency of a point read (median of the rounds)\n\n{}",
            added_latency_table(&["bare", "HAProxy", "PgBouncer", "rouse"], &self.one_client)
        )
    }
}

pub(crate) fn us(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

pub async fn run(rounds: usize, seconds: u64) -> Result<PgResults> {
    let (control, user, info) = setup().await?;
    let client = control.client();
    let pg_port = info.endpoints[0].port;
    let proxy = Proxy::builder(&control).start().await?;
    let (dir, pgbench) = pgbench_ready("rouse-bench-pg-", pg_port)?;

    let haproxy_port = free_port("127.0.0.1".parse()?);
    let _haproxy = start_haproxy(dir.path(), haproxy_port, pg_port).await?;
    // PgBouncer in each pooling mode, each in a directory of its own.
    let mut bouncers = Vec::new();
    for mode in ["session", "transaction"] {
        let port = free_port("127.0.0.1".parse()?);
        let bouncer_dir = dir.path().join(mode);
        std::fs::create_dir(&bouncer_dir)?;
        std::fs::set_permissions(
            &bouncer_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let process = start_pgbouncer(
            &bouncer_dir,
            port,
            pg_port,
            &user.scram_verifier,
            mode,
            None,
        )
        .await?;
        bouncers.push((port, process));
    }
    let mut rows = Vec::new();
    for load in &LOADS {
        client
            .set_pool_mode(&name(APP), &name(DB), load.mode)
            .await?;
        let bouncer = bouncers[usize::from(load.mode == PoolMode::Transaction)].0;
        let side = |label, port, user: String| Side { label, port, user };
        let sides = [
            side("bare", pg_port, USER.into()),
            side("HAProxy", haproxy_port, USER.into()),
            side("PgBouncer", bouncer, USER.into()),
            side(
                "rouse",
                proxy.postgres_addr().port(),
                format!("{USER}.{APP}"),
            ),
        ];
        let mut tps: Vec<Vec<f64>> = sides.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (i, side) in sides.iter().enumerate() {
                tps[i].push(pgbench_tps(&pgbench, load.args, seconds, side)?);
            }
        }
        let medians: Vec<f64> = tps
            .iter_mut()
            .map(|v| {
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            })
            .collect();
        rows.push(PgRow {
            label: load.label,
            short: load.short,
            bare: medians[0],
            haproxy: medians[1],
            pgbouncer: medians[2],
            rouse: medians[3],
        });
    }
    // One client: what each side adds to a point read's latency.
    client
        .set_pool_mode(&name(APP), &name(DB), PoolMode::Session)
        .await?;
    let sides = [
        (pg_port, USER.to_string()),
        (haproxy_port, USER.to_string()),
        (bouncers[0].0, USER.to_string()),
        (proxy.postgres_addr().port(), format!("{USER}.{APP}")),
    ];
    let mut p50s: Vec<Vec<Duration>> = sides.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (port, user)) in sides.iter().enumerate() {
            let prefix = dir.path().join(format!("one-{round}-{i}"));
            let one = ["-c", "1", "-j", "1"];
            let run = pgbench_steady(&pgbench, &one, seconds, *port, user, &prefix)?;
            p50s[i].push(percentile(&run.latencies, 50.0));
        }
    }
    let one_client = std::array::from_fn(|i| percentile(&p50s[i], 50.0));
    Ok(PgResults {
        rounds,
        seconds,
        rows,
        one_client,
    })
}

/// A directory for pgbench's files and PgBouncer's, which PostgreSQL's
/// user may read, and pgbench with its tables made on the server at `port`.
pub(crate) fn pgbench_ready(
    prefix: &str,
    port: u16,
) -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let pgbench = postgres_bin_dir()?.join("pgbench");
    init_pgbench(&pgbench, port)?;
    Ok((dir, pgbench))
}

/// pgbench's tables, at scale 1, created directly on the server.
pub(crate) fn init_pgbench(pgbench: &Path, port: u16) -> Result<()> {
    let init = Command::new(pgbench)
        .args(["-i", "-s", "1", "-q", &conninfo(port, USER)])
        .env("PGPASSWORD", PASSWORD)
        .output()?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    Ok(())
}

/// pgbench's transactions from the moment every client had run its first
/// (before it, clients are still connecting, which is not the load being
/// measured): their latencies and rate.
pub(crate) struct Steady {
    pub(crate) latencies: Vec<Duration>,
    pub(crate) per_second: f64,
    /// Every transaction, the first ones of each client too.
    pub(crate) all: usize,
}

/// `pgbench -S` with `args` for `seconds`, from its per-transaction log
/// (written under `prefix`).
pub(crate) fn pgbench_steady(
    pgbench: &Path,
    args: &[&str],
    seconds: u64,
    port: u16,
    user: &str,
    prefix: &Path,
) -> Result<Steady> {
    let out = Command::new(pgbench)
        .args(["-n", "-S", "-l", "-T", &seconds.to_string()])
        .args(args)
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg(conninfo(port, user))
        .env("PGPASSWORD", PASSWORD)
        .output()
        .context("cannot run pgbench")?;
    if !out.status.success() {
        bail!(
            "pgbench {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = prefix.parent().context("log prefix without a directory")?;
    let stem = prefix
        .file_name()
        .context("log prefix without a name")?
        .to_string_lossy()
        .into_owned();
    // (client, finished at in µs since the epoch, latency in µs)
    let mut done: Vec<(u64, u64, u64)> = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{stem}."))
        {
            continue;
        }
        // client_id transaction_no latency_us script_no epoch epoch_us
        for line in std::fs::read_to_string(entry.path())?.lines() {
            let f: Vec<u64> = line
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            if let [client, _, latency, _, secs, micros, ..] = f[..] {
                done.push((client, secs * 1_000_000 + micros, latency));
            }
        }
        std::fs::remove_file(entry.path())?;
    }
    anyhow::ensure!(!done.is_empty(), "pgbench wrote no transaction log");
    Ok(steady(&done, seconds))
}

/// The transactions after every client's first, and their rate.
fn steady(done: &[(u64, u64, u64)], seconds: u64) -> Steady {
    let mut first = std::collections::HashMap::new();
    for &(client, at, _) in done {
        let f = first.entry(client).or_insert(at);
        *f = (*f).min(at);
    }
    let start = first.values().copied().max().unwrap_or(0);
    let end = done.iter().map(|&(_, at, _)| at).max().unwrap_or(0);
    let kept: Vec<Duration> = done
        .iter()
        .filter(|&&(_, at, _)| at > start || end == start)
        .map(|&(_, _, latency)| Duration::from_micros(latency))
        .collect();
    let span = match end > start {
        true => (end - start) as f64 / 1e6,
        false => seconds as f64,
    };
    Steady {
        per_second: kept.len() as f64 / span,
        latencies: kept,
        all: done.len(),
    }
}

/// Plain TCP, as every load here but idle clients over TLS.
pub(crate) fn conninfo(port: u16, user: &str) -> String {
    conninfo_over(port, user, "disable")
}

pub(crate) fn conninfo_over(port: u16, user: &str, sslmode: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} dbname={DB} sslmode={sslmode}")
}

fn pgbench_tps(pgbench: &Path, args: &[&str], seconds: u64, side: &Side) -> Result<f64> {
    let out = Command::new(pgbench)
        .args(args)
        .args(["-n", "-T", &seconds.to_string()])
        .arg(conninfo(side.port, &side.user))
        .env("PGPASSWORD", PASSWORD)
        .output()
        .context("cannot run pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench via {} failed: {text}{}",
            side.label,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps in pgbench output: {text}"))
}

async fn start_haproxy(dir: &Path, port: u16, backend: u16) -> Result<ServerProcess> {
    let cfg = dir.join("haproxy-pg.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             listen postgres\n  bind 127.0.0.1:{port}\n  server pg 127.0.0.1:{backend}\n"
        ),
    )?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let mut process = ServerProcess::spawn("haproxy", cmd, &dir.join("haproxy-pg.log"))?;
    process
        .wait_ready(Duration::from_secs(10), || tcp_ready(port))
        .await?;
    Ok(process)
}

pub(crate) async fn start_pgbouncer(
    dir: &Path,
    port: u16,
    backend: u16,
    verifier: &str,
    pool_mode: &str,
    tls: Option<&TlsFiles>,
) -> Result<ServerProcess> {
    let ini = dir.join("pgbouncer.ini");
    let users = dir.join("userlist.txt");
    std::fs::write(&users, format!("\"{USER}\" \"{verifier}\"\n"))?;
    // Clients choose: TLS for those that ask, as rouse's default.
    let tls = tls.map_or_else(String::new, |files| {
        format!(
            "client_tls_sslmode = allow\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\n",
            files.cert.display(),
            files.key.display()
        )
    });
    std::fs::write(
        &ini,
        format!(
            "[databases]\n{DB} = host=127.0.0.1 port={backend} dbname={DB}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\nauth_file = {}\n\
             pool_mode = {pool_mode}\nmax_client_conn = 20000\ndefault_pool_size = 20\nunix_socket_dir =\nlogfile = {}\n{tls}",
            users.display(),
            dir.join("pgbouncer-own.log").display(),
        ),
    )?;
    let mut cmd = Command::new("pgbouncer");
    cmd.arg(&ini);
    // PgBouncer refuses to run as root.
    if let Some(user) = RunAs::when_root()? {
        user.chown_path(dir)?;
        user.apply(&mut cmd);
    }
    let mut process = ServerProcess::spawn("pgbouncer", cmd, &dir.join("pgbouncer.log"))?;
    process
        .wait_ready(Duration::from_secs(10), || tcp_ready(port))
        .await?;
    Ok(process)
}

async fn tcp_ready(port: u16) -> Result<()> {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steady_part_starts_when_every_client_has_run() {
        // Client 1 connects late: until its first answer at t = 900 µs the
        // load is not all there.
        let done = [
            (0, 100, 10),
            (0, 200, 10),
            (0, 500, 10),
            (1, 900, 50),
            (0, 1_000, 20),
            (1, 1_900, 30),
        ];
        let s = steady(&done, 1);
        assert_eq!(s.latencies, [20, 30].map(Duration::from_micros).to_vec());
        assert!((s.per_second - 2.0 / 0.001).abs() < 1e-6);
        // One transaction: all of it, over the run's length.
        let one = steady(&[(0, 100, 10)], 2);
        assert_eq!((one.latencies.len(), one.per_second), (1, 0.5));
    }
}
