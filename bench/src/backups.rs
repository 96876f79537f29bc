//! Backups: how long a backup and a restore take for a large rqlite
//! database (1 GiB of random blobs by default) and a pgbench database
//! (scale 50 by default), each to the default destination directory, and
//! what `backups.on_hibernate` adds to a hibernation.

use std::fmt;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rouse_control_api::{Client, CreateDatabase, DatabaseInfo, Engine, RestoreRequest};
use rouse_tests::{engine_url, postgres_bin_dir, rqlite_execute, Control};

use crate::stats::table;
use crate::wake::name;

const APP: &str = "bench";
const USER: &str = "alice";
const PASSWORD: &str = "bench-password";
const ON_HIBERNATE: &str = "ROUSE_BACKUPS__ON_HIBERNATE";

/// What was measured for one engine.
struct EngineRow {
    label: String,
    data_mib: f64,
    backup: Duration,
    stored_mib: f64,
    restore: Duration,
    hibernate_plain: Duration,
    hibernate_changed: Duration,
    hibernate_unchanged: Duration,
}

pub struct BackupResults {
    rows: Vec<EngineRow>,
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl fmt::Display for BackupResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "### Backups and restores (destination: a local directory)\n"
        )?;
        let rate = |took: Duration, mib: f64| {
            format!("{} ({:.0} MiB/s)", secs(took), mib / took.as_secs_f64())
        };
        let added = |took: Duration, plain: Duration| {
            format!("{} (+{})", secs(took), secs(took.saturating_sub(plain)))
        };
        let copies = self.rows(|r| {
            vec![
                format!("{:.0} MiB", r.data_mib),
                rate(r.backup, r.data_mib),
                format!("{:.0} MiB", r.stored_mib),
                rate(r.restore, r.data_mib),
            ]
        });
        let header = [
            "database",
            "data",
            "backup",
            "stored",
            "restore into a new name",
        ];
        writeln!(f, "{}", table(&header, &copies))?;
        let sleeps = self.rows(|r| {
            vec![
                secs(r.hibernate_plain),
                added(r.hibernate_changed, r.hibernate_plain),
                added(r.hibernate_unchanged, r.hibernate_plain),
            ]
        });
        let header = [
            "hibernate",
            "without on_hibernate",
            "with on_hibernate, one row changed",
            "with on_hibernate, unchanged",
        ];
        write!(f, "{}", table(&header, &sleeps))
    }
}

impl BackupResults {
    /// One table row per engine: its label, then `cells`.
    fn rows(&self, cells: impl Fn(&EngineRow) -> Vec<String>) -> Vec<Vec<String>> {
        self.rows
            .iter()
            .map(|r| std::iter::once(r.label.clone()).chain(cells(r)).collect())
            .collect()
    }
}

async fn timed<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<(T, Duration)> {
    let t = Instant::now();
    let v = work.await?;
    Ok((v, t.elapsed()))
}

pub async fn run(rqlite_mib: usize, pg_scale: u32) -> Result<BackupResults> {
    let mut control = Control::builder()
        .hibernation_timeout("0")
        .env(ON_HIBERNATE, "false")
        .start()
        .await?;
    let client = control.client();
    client.create_app(&name(APP)).await?;
    client.create_user(&name(APP), USER, PASSWORD).await?;
    let create = |db: &str, engine| CreateDatabase {
        app: name(APP),
        name: name(db),
        engine,
        replication_factor: Some(1).filter(|_| engine == Engine::Rqlite),
        patroni: None,
    };
    let lite = client
        .create_database(&create("big", Engine::Rqlite))
        .await?;
    let pg = client
        .create_database(&create("pgb", Engine::Postgres))
        .await?;
    fill_rqlite(&lite, rqlite_mib).await?;
    fill_postgres(&pg, pg_scale)?;
    let pg_mib = postgres_mib(&pg).await?;

    let plain = [
        hibernate(&client, "big").await?,
        hibernate(&client, "pgb").await?,
    ];
    let mut measured = Vec::new();
    for db in ["big", "pgb"] {
        client.wake(&name(APP), &name(db)).await?;
        let (made, took) = timed(async { Ok(client.backup(&name(APP), &name(db)).await?) }).await?;
        let as_name = format!("{db}-copy");
        let request = RestoreRequest {
            backup: Some(made.id.clone()),
            as_name: Some(name(&as_name)),
            ..Default::default()
        };
        let (_, restore) =
            timed(async { Ok(client.restore(&name(APP), &name(db), &request).await?) }).await?;
        client.drop_database(&name(APP), &name(&as_name)).await?;
        measured.push((made.size, took, restore));
    }
    write_row(&client, "big", "pgb").await?;
    control.restart_with(ON_HIBERNATE, "true").await?;
    let changed = [
        hibernate(&client, "big").await?,
        hibernate(&client, "pgb").await?,
    ];
    for db in ["big", "pgb"] {
        client.wake(&name(APP), &name(db)).await?;
    }
    let unchanged = [
        hibernate(&client, "big").await?,
        hibernate(&client, "pgb").await?,
    ];

    let rows = [
        ("rqlite ×1", rqlite_mib as f64),
        (&*format!("PostgreSQL, pgbench scale {pg_scale}"), pg_mib),
    ]
    .iter()
    .enumerate()
    .map(|(i, (label, data_mib))| EngineRow {
        label: label.to_string(),
        data_mib: *data_mib,
        backup: measured[i].1,
        stored_mib: measured[i].0 as f64 / 1048576.0,
        restore: measured[i].2,
        hibernate_plain: plain[i],
        hibernate_changed: changed[i],
        hibernate_unchanged: unchanged[i],
    })
    .collect();
    Ok(BackupResults { rows })
}

async fn hibernate(client: &Client, db: &str) -> Result<Duration> {
    let (_, took) =
        timed(async { Ok(client.hibernate(&name(APP), &name(db), true).await?) }).await?;
    Ok(took)
}

/// `mib` rows of one MiB of random bytes each.
async fn fill_rqlite(info: &DatabaseInfo, mib: usize) -> Result<()> {
    let url = engine_url(info, &info.endpoints[0]);
    rqlite_execute(
        &url,
        "CREATE TABLE blobs (id INTEGER PRIMARY KEY, body BLOB)",
    )
    .await?;
    for _ in 0..mib {
        rqlite_execute(
            &url,
            "INSERT INTO blobs (body) VALUES (randomblob(1048576))",
        )
        .await?;
    }
    Ok(())
}

fn conninfo(info: &DatabaseInfo) -> String {
    let e = &info.endpoints[0];
    format!(
        "host={} port={} user={USER} dbname={} sslmode=disable",
        e.host, e.port, info.name
    )
}

fn fill_postgres(info: &DatabaseInfo, scale: u32) -> Result<()> {
    let out = Command::new(postgres_bin_dir()?.join("pgbench"))
        .args(["-i", "-q", "-s", &scale.to_string(), &conninfo(info)])
        .env("PGPASSWORD", PASSWORD)
        .output()?;
    if !out.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

async fn pg_session(info: &DatabaseInfo) -> Result<tokio_postgres::Client> {
    let config = format!("{} password={PASSWORD}", conninfo(info));
    let (client, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn postgres_mib(info: &DatabaseInfo) -> Result<f64> {
    let session = pg_session(info).await?;
    let bytes: i64 = session
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await?
        .get(0);
    Ok(bytes as f64 / 1048576.0)
}

/// One changed row in each database, so that the next backup has work.
async fn write_row(client: &Client, lite: &str, pg: &str) -> Result<()> {
    let info = client.wake(&name(APP), &name(lite)).await?;
    rqlite_execute(
        &engine_url(&info, &info.endpoints[0]),
        "INSERT INTO blobs (body) VALUES (randomblob(16))",
    )
    .await?;
    let info = client.wake(&name(APP), &name(pg)).await?;
    pg_session(&info)
        .await?
        .batch_execute("UPDATE pgbench_branches SET bbalance = bbalance + 1 WHERE bid = 1")
        .await?;
    Ok(())
}
