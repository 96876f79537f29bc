//! PostgreSQL clients that hold a connection and do nothing: what each
//! costs rouse and PgBouncer in resident memory, and pgbench on some of
//! them while the rest stay idle.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};
use rouse_control_api::PoolMode;
use rouse_tests::{free_port, Proxy};

use crate::cpu::cpu_time;
use crate::pg::{
    conninfo, pgbench_ready, pgbench_steady, setup, start_pgbouncer, us, APP, DB, PASSWORD, USER,
};
use crate::stats::{percentile, table};
use crate::wake::name;

/// Resident memory of one proxy before and with the idle clients, and
/// pgbench's point reads on some of them while the rest stay idle.
pub struct IdleRow {
    pub label: &'static str,
    pub before_kib: u64,
    pub after_kib: u64,
    pub busy: Busy,
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

impl IdleResults {
    /// Growth of the resident memory per idle client, in KiB.
    pub fn per_client_kib(&self, row: &IdleRow) -> f64 {
        row.after_kib.saturating_sub(row.before_kib) as f64 / self.clients as f64
    }
}

impl fmt::Display for IdleResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.label.to_string(),
                    format!("{} MiB", r.before_kib / 1024),
                    format!("{} MiB", r.after_kib / 1024),
                    format!("{:.2} KiB", self.per_client_kib(r)),
                ]
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
/// beside the idle rest.
pub async fn idle(clients: usize, active: usize, seconds: u64) -> Result<IdleResults> {
    anyhow::ensure!(active <= clients, "more active clients than clients");
    let (control, user, info) = setup().await?;
    let client = control.client();
    client
        .set_pool_mode(&name(APP), &name(DB), PoolMode::Transaction)
        .await?;
    // As PgBouncer's max_client_conn below: the app's own limit too.
    let proxy = Proxy::builder(&control)
        .set("max_client_connections", "20000")
        .section(
            "apps:\n  default: {max_connections: 20000, max_connections_per_database: 20000}\n",
        )
        .start()
        .await?;
    let (dir, pgbench) = pgbench_ready("rouse-bench-idle-", info.endpoints[0].port)?;
    let bouncer_port = free_port("127.0.0.1".parse()?);
    let bouncer = start_pgbouncer(
        dir.path(),
        bouncer_port,
        info.endpoints[0].port,
        &user.scram_verifier,
        "transaction",
    )
    .await?;
    let mut rows = Vec::new();
    for (label, port, user, pid) in [
        ("PgBouncer", bouncer_port, USER.to_string(), bouncer.pid()),
        (
            "rouse",
            proxy.postgres_addr().port(),
            format!("{USER}.{APP}"),
            proxy.pid(),
        ),
    ] {
        let before = rss_kib(pid)?;
        let mut held = Vec::with_capacity(clients);
        let url = format!("{} password={PASSWORD}", conninfo(port, &user));
        for chunk in 0..clients.div_ceil(200) {
            let n = (clients - chunk * 200).min(200);
            let batch = futures::future::join_all(
                (0..n).map(|_| tokio_postgres::connect(&url, tokio_postgres::NoTls)),
            )
            .await;
            for c in batch {
                let (c, conn) = c.with_context(|| format!("connect to {label}"))?;
                tokio::spawn(conn);
                held.push(c);
            }
        }
        // One query on the last client proves the sessions are live.
        held.last()
            .context("no clients")?
            .simple_query("SELECT 1")
            .await?;
        // Idle means idle for a while: rouse parks a client that said
        // nothing for a second.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let after = rss_kib(pid)?;
        held.truncate(clients - active);
        let threads = active.clamp(1, 2).to_string();
        let cpu_before = cpu_time(pid)?;
        let active_arg = active.to_string();
        let run = pgbench_steady(
            &pgbench,
            &["-c", &active_arg, "-j", &threads],
            seconds,
            port,
            &user,
            &dir.path().join(format!("busy-{label}")),
        )?;
        let cpu = cpu_time(pid)?.saturating_sub(cpu_before);
        rows.push(IdleRow {
            label,
            before_kib: before,
            after_kib: after,
            busy: Busy {
                tps: run.per_second,
                p50: percentile(&run.latencies, 50.0),
                p99: percentile(&run.latencies, 99.0),
                cpu_us: cpu.as_secs_f64() * 1e6 / run.all.max(1) as f64,
            },
        });
        drop(held);
    }
    Ok(IdleResults {
        clients,
        active,
        seconds,
        rows,
    })
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
