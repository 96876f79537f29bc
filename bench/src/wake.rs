//! Wake latency: `POST /databases/{app}/{db}/wake` until it returns active,
//! against the bare engine started by hand on the same data directory,
//! ports and flags, timed until it answers the same first query. The two
//! alternate within every cycle, so machine noise hits both alike.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rouse_control_api::{CreateDatabase, DatabaseInfo, Engine, Name};
use rouse_tests::{postgres_bin_dir, rqlite_query, Control, RunAs, ServerProcess};

use crate::stats::{ms, percentile, table};

const APP: &str = "bench";

struct Target {
    db: &'static str,
    engine: Engine,
    replicas: u32,
    /// The target for control's wake p50.
    target_p50: Duration,
}

const TARGETS: [Target; 3] = [
    Target {
        db: "rq1",
        engine: Engine::Rqlite,
        replicas: 1,
        target_p50: Duration::from_millis(300),
    },
    Target {
        db: "rq3",
        engine: Engine::Rqlite,
        replicas: 3,
        target_p50: Duration::from_millis(1000),
    },
    Target {
        db: "pg",
        engine: Engine::Postgres,
        replicas: 1,
        target_p50: Duration::from_millis(250),
    },
];

pub(crate) fn name(s: &str) -> Name {
    Name::new(s).expect("benchmark names are valid")
}

/// Wake and bare cold-start latencies of one engine and replica count.
pub struct WakeRow {
    /// `rqlite ×3`
    pub label: String,
    pub rouse_p50: Duration,
    pub rouse_p99: Duration,
    pub bare_p50: Duration,
    pub bare_p99: Duration,
    pub target_p50: Duration,
}

pub struct WakeResults {
    pub cycles: usize,
    pub rows: Vec<WakeRow>,
}

impl fmt::Display for WakeResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.label.clone(),
                    ms(r.rouse_p50),
                    ms(r.rouse_p99),
                    ms(r.bare_p50),
                    ms(r.bare_p99),
                    ms(r.rouse_p50.saturating_sub(r.bare_p50)),
                    format!("≤ {}", ms(r.target_p50)),
                ]
            })
            .collect();
        write!(
            f,
            "wake latency over {} hibernate/wake cycles per engine\n\n{}",
            self.cycles,
            table(
                &[
                    "engine × replicas",
                    "rouse wake p50",
                    "p99",
                    "bare cold start p50",
                    "p99",
                    "control overhead p50",
                    "target p50"
                ],
                &rows
            )
        )
    }
}

pub async fn run(cycles: usize) -> Result<WakeResults> {
    let control = Control::builder().hibernation_timeout("0").start().await?;
    let client = control.client();
    client.create_app(&name(APP)).await?;
    let mut rows = Vec::new();
    for t in &TARGETS {
        let info = client
            .create_database(&CreateDatabase {
                app: name(APP),
                name: name(t.db),
                engine: t.engine,
                replication_factor: Some(t.replicas),
                patroni: None,
            })
            .await?;
        let dir = control
            .data_dir()
            .join(format!("{APP}_{}", t.db))
            .join(t.engine.as_str());
        let (mut woken, mut bare) = (Vec::new(), Vec::new());
        for _ in 0..cycles {
            client.hibernate(&name(APP), &name(t.db), true).await?;
            bare.push(bare_start(&info, &dir).await?);
            let asked = Instant::now();
            let after = client.wake(&name(APP), &name(t.db)).await?;
            woken.push(asked.elapsed());
            if after.ports != info.ports {
                bail!(
                    "{} woke on other ports; the comparison would not be like for like",
                    t.db
                );
            }
        }
        rows.push(WakeRow {
            label: format!("{} ×{}", t.engine.as_str(), t.replicas),
            rouse_p50: percentile(&woken, 50.0),
            rouse_p99: percentile(&woken, 99.0),
            bare_p50: percentile(&bare, 50.0),
            bare_p99: percentile(&bare, 99.0),
            target_p50: t.target_p50,
        });
    }
    Ok(WakeResults { cycles, rows })
}

/// Starts the hibernated database's engine by hand exactly as control
/// would, times it to its first answer, and stops it again.
pub(crate) async fn bare_start(info: &DatabaseInfo, dir: &Path) -> Result<Duration> {
    let (took, mut processes) = bare_boot(info, dir, Instant::now()).await?;
    for p in &mut processes {
        p.terminate(Duration::from_secs(30)).await?;
    }
    Ok(took)
}

/// [`bare_start`] without the stop: the time from `asked` to the first
/// answer, and the processes, still running.
pub(crate) async fn bare_boot(
    info: &DatabaseInfo,
    dir: &Path,
    asked: Instant,
) -> Result<(Duration, Vec<ServerProcess>)> {
    let mut processes = Vec::new();
    match info.engine {
        Engine::Patroni => bail!("a Patroni cluster neither hibernates nor wakes"),
        Engine::Rqlite => {
            for (idx, pair) in info.ports.chunks(2).enumerate() {
                let host = format!("127.0.0.{}", idx + 1);
                let mut cmd = Command::new("rqlited");
                cmd.args(["-node-id", &format!("node-{idx}")])
                    .args(["-http-addr", &format!("{host}:{}", pair[0])])
                    .args(["-raft-addr", &format!("{host}:{}", pair[1])])
                    .args(["-raft-election-timeout", "100ms", "-raft-timeout", "100ms"])
                    .args(["-raft-leader-lease-timeout", "100ms"])
                    .arg(dir.join(format!("node-{idx}")));
                processes.push(spawn("rqlited", cmd, dir.join(format!("bare-{idx}.log"))).await?);
            }
            let addrs: Vec<String> = info
                .ports
                .chunks(2)
                .enumerate()
                .map(|(i, p)| format!("127.0.0.{}:{}", i + 1, p[0]))
                .collect();
            poll(|| async {
                for a in &addrs {
                    // A strong read only succeeds through an elected leader.
                    if rqlite_query(a, "SELECT 1").await.is_ok() {
                        return Ok(());
                    }
                }
                bail!("no leader yet")
            })
            .await?;
        }
        Engine::Postgres => {
            let backend = rouse_tests::engine_login(info)
                .context("postgres database without an engine login")?;
            let port = info.ports[0];
            let mut cmd = Command::new(postgres_bin_dir()?.join("postgres"));
            cmd.arg("-D").arg(dir.join("node-0")).args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                // control's default, so that both start the same instance
                "-c",
                "max_connections=300",
            ]);
            if let Some(user) = RunAs::when_root()? {
                user.apply(&mut cmd);
            }
            processes.push(spawn("postgres", cmd, dir.join("bare.log")).await?);
            poll(|| async {
                let (client, conn) = tokio_postgres::Config::new()
                    .host("127.0.0.1")
                    .port(port)
                    .user(&backend.user)
                    .password(&backend.password)
                    .dbname("postgres")
                    .connect(tokio_postgres::NoTls)
                    .await?;
                tokio::spawn(conn);
                client.simple_query("SELECT 1").await?;
                Ok(())
            })
            .await?;
        }
    }
    Ok((asked.elapsed(), processes))
}

/// Spawns off the runtime, as control does: a spawn returns once the
/// child has exec'd, which takes long while a storm of starting engines
/// holds the CPUs, and the starts of a storm must not queue behind it.
async fn spawn(name: &'static str, cmd: Command, log: PathBuf) -> Result<ServerProcess> {
    tokio::task::spawn_blocking(move || ServerProcess::spawn(name, cmd, &log)).await?
}

/// Polls like control does (every 15 ms) for at most 30 s.
async fn poll<F, Fut>(mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match probe().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("bare engine never answered"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(15)).await,
        }
    }
}
