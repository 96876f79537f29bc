//! PostgreSQL clients that hold a connection and do nothing: what each
//! costs rouse and PgBouncer in resident memory, over plain TCP and over
//! TLS (what libpq's default `sslmode=prefer` gets), and pgbench on some
//! of them while the rest stay idle.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};
use rouse_control_api::PoolMode;
use rouse_tests::{free_port, pg_connect_url, trust_any_certificate, Proxy, TlsFiles};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::cpu::cpu_time;
use crate::pg::{
    conninfo_over, pgbench_ready, pgbench_steady, setup, start_pgbouncer, us, APP, DB, PASSWORD,
    USER,
};
use crate::stats::{percentile, table};
use crate::wake::name;

/// Resident memory of one proxy before and with the idle clients, and
/// pgbench's point reads on some of them while the rest stay idle.
pub struct IdleRow {
    pub label: &'static str,
    pub plain: Memory,
    /// The same clients over TLS, to a proxy started afresh.
    pub tls: Memory,
    pub busy: Busy,
}

/// A proxy's resident memory before and with the idle clients, in KiB.
pub struct Memory {
    pub before_kib: u64,
    pub after_kib: u64,
}

/// pgbench `-S` through a proxy that holds the idle clients too.
pub struct Busy {
    pub tps: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// The proxy's CPU time over the whole pgbench run (its logins too)
    /// divided by every transaction, in µs.
    pub cpu_us: f64,
}

pub struct IdleResults {
    pub clients: usize,
    /// Of `clients`, how many pgbench drives; the others stay idle.
    pub active: usize,
    pub seconds: u64,
    pub rows: Vec<IdleRow>,
}

impl IdleRow {
    pub fn memory(&self, over_tls: bool) -> &Memory {
        if over_tls {
            &self.tls
        } else {
            &self.plain
        }
    }
}

impl IdleResults {
    /// Growth of the resident memory per idle client, in KiB.
    pub fn per_client_kib(&self, memory: &Memory) -> f64 {
        memory.after_kib.saturating_sub(memory.before_kib) as f64 / self.clients as f64
    }
}

impl fmt::Display for IdleResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = [("plain TCP", false), ("TLS", true)]
            .into_iter()
            .flat_map(|(transport, tls)| {
                self.rows.iter().map(move |r| {
                    let memory = r.memory(tls);
                    vec![
                        r.label.to_string(),
                        transport.to_string(),
                        format!("{} MiB", memory.before_kib / 1024),
                        format!("{} MiB", memory.after_kib / 1024),
                        format!("{:.2} KiB", self.per_client_kib(memory)),
                    ]
                })
            })
            .collect();
        let busy: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.label.to_string(),
                    format!("{:.0}", r.busy.tps),
                    us(r.busy.p50),
                    us(r.busy.p99),
                    format!("{:.1}", r.busy.cpu_us),
                ]
            })
            .collect();
        write!(
            f,
            "{} idle PostgreSQL clients, transaction pooling\n\n{}\n\
             {} of them busy (pgbench -S -c {} for {} s, counted once every client ran), {} idle, transaction pooling\n\n{}",
            self.clients,
            table(
                &[
                    "proxy",
                    "clients over",
                    "resident before",
                    "with the clients",
                    "per idle client"
                ],
                &rows
            ),
            self.active,
            self.active,
            self.seconds,
            self.clients - self.active,
            table(
                &[
                    "proxy",
                    "transactions/s",
                    "p50",
                    "p99",
                    "proxy CPU µs per transaction"
                ],
                &busy
            )
        )
    }
}

/// Memory per idle client: `clients` connections opened (logged in, then
/// idle) to rouse and to PgBouncer, both in transaction pooling, and the
/// growth of each one's resident memory divided by `clients`. Then `active`
/// of them are closed and pgbench's `active` clients read for `seconds`
/// beside the idle rest. Last, the same idle clients over TLS, to each
/// proxy started afresh (memory a process freed is not given back at once,
/// so a second batch on the same process would look cheaper).
pub async fn idle(clients: usize, active: usize, seconds: u64) -> Result<IdleResults> {
    anyhow::ensure!(active <= clients, "more active clients than clients");
    let (control, user, info) = setup().await?;
    control
        .client()
        .set_pool_mode(&name(APP), &name(DB), PoolMode::Transaction)
        .await?;
    let (dir, pgbench) = pgbench_ready("rouse-bench-idle-", info.endpoints[0].port)?;
    // PgBouncer's certificate; rouse makes its own, of the same kind.
    let tls_files = TlsFiles::make(dir.path());
    let tls = trust_any_certificate();
    let mut rows = Vec::new();
    for label in ["PgBouncer", "rouse"] {
        let start = || {
            Side::start(
                label,
                &control,
                dir.path(),
                info.endpoints[0].port,
                &user.scram_verifier,
                &tls_files,
            )
        };
        let side = start().await?;
        let (plain, mut held) = side.hold_idle(clients, None).await?;
        held.truncate(clients - active);
        let busy = side.busy(&pgbench, active, seconds, dir.path())?;
        drop(held);
        drop(side);
        let side = start().await?;
        let (tls, held) = side.hold_idle(clients, Some(&tls)).await?;
        drop(held);
        drop(side);
        rows.push(IdleRow {
            label,
            plain,
            tls,
            busy,
        });
    }
    Ok(IdleResults {
        clients,
        active,
        seconds,
        rows,
    })
}

/// One proxy under test, started for one batch of clients.
struct Side {
    label: &'static str,
    port: u16,
    user: String,
    pid: u32,
    /// The running proxy (rouse's or PgBouncer's), stopped when dropped.
    _process: Box<dyn std::any::Any + Send>,
}

impl Side {
    async fn start(
        label: &'static str,
        control: &rouse_tests::Control,
        dir: &std::path::Path,
        backend: u16,
        verifier: &str,
        tls: &TlsFiles,
    ) -> Result<Side> {
        if label == "PgBouncer" {
            let port = free_port("127.0.0.1".parse()?);
            let process =
                start_pgbouncer(dir, port, backend, verifier, "transaction", Some(tls)).await?;
            return Ok(Side {
                label,
                port,
                user: USER.to_string(),
                pid: process.pid(),
                _process: Box::new(process),
            });
        }
        // As PgBouncer's max_client_conn: the app's own limit too.
        let proxy = Proxy::builder(control)
            .set("max_client_connections", "20000")
            .section(
                "apps:\n  default: {max_connections: 20000, max_connections_per_database: 20000}\n",
            )
            .start()
            .await?;
        Ok(Side {
            label,
            port: proxy.postgres_addr().port(),
            user: format!("{USER}.{APP}"),
            pid: proxy.pid(),
            _process: Box::new(proxy),
        })
    }

    /// `clients` logged-in clients that then say nothing, and the growth
    /// of the proxy's resident memory they caused. One client logs in,
    /// reads and leaves first, so that what the first login costs once
    /// (code paged in, the pool's first backend connection) is not
    /// counted as the idle clients'.
    async fn hold_idle(
        &self,
        clients: usize,
        tls: Option<&MakeRustlsConnect>,
    ) -> Result<(Memory, Vec<tokio_postgres::Client>)> {
        let sslmode = if tls.is_some() { "require" } else { "disable" };
        let url = format!(
            "{} password={PASSWORD}",
            conninfo_over(self.port, &self.user, sslmode)
        );
        let first = pg_connect_url(&url, tls).await?;
        first.simple_query("SELECT 1").await?;
        drop(first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before_kib = rss_kib(self.pid)?;
        let mut held = Vec::with_capacity(clients);
        for chunk in 0..clients.div_ceil(200) {
            let n = (clients - chunk * 200).min(200);
            let batch = futures::future::join_all((0..n).map(|_| pg_connect_url(&url, tls))).await;
            for c in batch {
                held.push(c.with_context(|| format!("connect to {}", self.label))?);
            }
        }
        // One query on the last client proves the sessions are live.
        held.last()
            .context("no clients")?
            .simple_query("SELECT 1")
            .await?;
        // Idle means idle for a while: rouse parks a client that said
        // nothing for a second.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let memory = Memory {
            before_kib,
            after_kib: rss_kib(self.pid)?,
        };
        Ok((memory, held))
    }

    /// pgbench `-S` on `active` clients for `seconds`.
    fn busy(
        &self,
        pgbench: &std::path::Path,
        active: usize,
        seconds: u64,
        dir: &std::path::Path,
    ) -> Result<Busy> {
        let threads = active.clamp(1, 2).to_string();
        let cpu_before = cpu_time(self.pid)?;
        let active_arg = active.to_string();
        let run = pgbench_steady(
            pgbench,
            &["-c", &active_arg, "-j", &threads],
            seconds,
            self.port,
            &self.user,
            &dir.join(format!("busy-{}", self.label)),
        )?;
        let cpu = cpu_time(self.pid)?.saturating_sub(cpu_before);
        Ok(Busy {
            tps: run.per_second,
            p50: percentile(&run.latencies, 50.0),
            p99: percentile(&run.latencies, 99.0),
            cpu_us: cpu.as_secs_f64() * 1e6 / run.all.max(1) as f64,
        })
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}
