//! Density: one node holding thousands of mostly hibernated rqlite
//! databases. How fast they are created, what control and `_system` cost
//! per stored database, what a running engine costs, and a storm of 100
//! distinct wakes from two apps through the proxy, beside 100 bare
//! `rqlited` cold starts at once on the same data, ports and flags; then
//! the same node with an active set of 50 under a Zipf-distributed stream
//! over every tenant.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use rouse_control_api::{CreateDatabase, DatabaseInfo, Engine};
use rouse_tests::{Control, Proxy};

use crate::active_set::{ActiveSetResults, ACTIVE_SET};
use crate::cpu::{cpu_time, machine_busy, rqlited_under, rqlited_used};
use crate::stats::{ms, percentile, table};
use crate::wake::{bare_boot, name};

const APPS: [&str; 2] = ["tenants-a", "tenants-b"];
/// Databases woken at once in the storm, half per app.
const STORM: usize = 100;
/// Running databases whose engine memory is averaged.
const SAMPLE_ACTIVE: usize = 20;
/// Creates under way at once.
const CREATING: usize = 8;
/// Storm rounds, the order of rouse and bare alternating: a shared machine
/// is noisy, and the median round says more than one.
const ROUNDS: usize = 3;

pub struct DensityResults {
    databases: usize,
    create_rate: f64,
    control_rss_kib: u64,
    control_kib_per_db: f64,
    system_kib_per_db: f64,
    engine_mib_per_active: f64,
    rounds: Vec<Round>,
    active_set: ActiveSetResults,
}

/// One storm through rouse and one of bare cold starts on the same databases.
#[derive(Default)]
struct Round {
    storm: Vec<Duration>,
    storm_by_app: [Vec<Duration>; 2],
    bare: Vec<Duration>,
    /// Mean time per wake phase during the storm: the proxy's whole wait,
    /// then control's phases.
    phases: [Duration; PHASES.len()],
    /// CPU spent on each storm until its last answer.
    cpu_storm: StormCpu,
    cpu_bare: StormCpu,
}

/// Where a storm's CPU went.
#[derive(Default)]
struct StormCpu {
    /// The whole machine, every core.
    machine: Duration,
    /// The databases' rqlited.
    engines: Duration,
    /// Control's `_system` rqlited, control and the proxy.
    system: Duration,
    control: Duration,
    proxy: Duration,
}

impl StormCpu {
    /// Snapshots taken before a storm.
    fn before(control: &Control, proxy: Option<&Proxy>) -> impl FnOnce() -> StormCpu {
        let dir = control.data_dir();
        let pids = (control.pid(), proxy.map(Proxy::pid));
        let cpu = |pid| cpu_time(pid).unwrap_or_default();
        let (machine, engines) = (machine_busy(), rqlited_under(&dir));
        let (control0, proxy0) = (cpu(pids.0), pids.1.map(cpu).unwrap_or_default());
        move || {
            let (tenants, system) = rqlited_used(&engines, &rqlited_under(&dir));
            StormCpu {
                machine: machine_busy().saturating_sub(machine),
                engines: tenants,
                system,
                control: cpu(pids.0).saturating_sub(control0),
                proxy: pids.1.map(cpu).unwrap_or_default().saturating_sub(proxy0),
            }
        }
    }
}

impl fmt::Display for StormCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |d: Duration| format!("{:.1}", d.as_secs_f64());
        write!(
            f,
            "{} ({} / {} / {} / {})",
            s(self.machine),
            s(self.engines),
            s(self.system),
            s(self.control),
            s(self.proxy)
        )
    }
}

/// Where `rouse_wake_duration_seconds` is read for each column: the
/// proxy's wait for control, then control's phases in the order they happen.
const PHASES: [(Side, &str, &str); 4] = [
    (Side::Proxy, "any", "wait"),
    (Side::Control, "rqlite", "wait"),
    (Side::Control, "rqlite", "start"),
    (Side::Control, "rqlite", "first_answer"),
];

#[derive(Clone, Copy)]
enum Side {
    Proxy,
    Control,
}

/// Sum and count of each of [`PHASES`] so far.
async fn phase_totals(control: &Control, proxy: &Proxy) -> [(f64, f64); PHASES.len()] {
    let mut totals = [(0.0, 0.0); PHASES.len()];
    for (total, (side, engine, phase)) in totals.iter_mut().zip(PHASES) {
        let url = match side {
            Side::Proxy => format!("http://{}/metrics", proxy.stats_addr()),
            Side::Control => format!("{}/metrics", control.api_url()),
        };
        let series = format!("{{engine=\"{engine}\",phase=\"{phase}\"}}");
        *total = (
            rouse_tests::metric(&url, &format!("rouse_wake_duration_seconds_sum{series}")).await,
            rouse_tests::metric(&url, &format!("rouse_wake_duration_seconds_count{series}")).await,
        );
    }
    totals
}

fn p99(samples: &[Duration]) -> Duration {
    percentile(samples, 99.0)
}

impl Round {
    fn ratio(&self) -> f64 {
        p99(&self.storm).as_secs_f64() / p99(&self.bare).as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for DensityResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "### Density: {} rqlite databases on one node\n",
            self.databases
        )?;
        let rows = vec![
            vec![
                "create rate (each created, then hibernated)".into(),
                format!("{:.1} databases/s", self.create_rate),
                String::new(),
            ],
            vec![
                "control RSS per stored database".into(),
                format!(
                    "{:.1} KiB (control at {} MiB)",
                    self.control_kib_per_db,
                    self.control_rss_kib / 1024
                ),
                "≤ 10 KiB".into(),
            ],
            vec![
                "`_system` on disk per stored database".into(),
                format!("{:.1} KiB", self.system_kib_per_db),
                String::new(),
            ],
            vec![
                "engine RSS per active database".into(),
                format!("{:.1} MiB", self.engine_mib_per_active),
                String::new(),
            ],
        ];
        writeln!(f, "{}", table(&["measure", "value", "target"], &rows))?;
        let line = |label: &str, s: &[Duration]| {
            vec![
                label.to_string(),
                ms(percentile(s, 50.0)),
                ms(p99(s)),
                ms(s.iter().copied().max().unwrap_or_default()),
            ]
        };
        let all = |pick: fn(&Round) -> &Vec<Duration>| -> Vec<Duration> {
            self.rounds
                .iter()
                .flat_map(|r| pick(r).iter().copied())
                .collect()
        };
        let rows = vec![
            line("storm through rouse, both apps", &all(|r| &r.storm)),
            line(&format!("… {}", APPS[0]), &all(|r| &r.storm_by_app[0])),
            line(&format!("… {}", APPS[1]), &all(|r| &r.storm_by_app[1])),
            line(
                &format!("{STORM} bare rqlited cold starts at once"),
                &all(|r| &r.bare),
            ),
        ];
        writeln!(
            f,
            "{STORM} distinct hibernated databases woken at once, time to the first answer ({} rounds):\n",
            self.rounds.len()
        )?;
        writeln!(f, "{}", table(&["", "p50", "p99", "max"], &rows))?;
        let rows: Vec<Vec<String>> = self
            .rounds
            .iter()
            .enumerate()
            .map(|(i, r)| {
                vec![
                    format!("{}", i + 1),
                    ms(p99(&r.storm)),
                    ms(p99(&r.bare)),
                    format!("{:.2}×", r.ratio()),
                    format!(
                        "{}; {}; {}",
                        ms(r.storm.iter().sum::<Duration>() / r.storm.len().max(1) as u32),
                        ms(r.phases[0]),
                        r.phases[1..]
                            .iter()
                            .map(|d| ms(*d))
                            .collect::<Vec<_>>()
                            .join(" / ")
                    ),
                    r.cpu_storm.to_string(),
                    r.cpu_bare.to_string(),
                ]
            })
            .collect();
        writeln!(
            f,
            "{}",
            table(
                &[
                    "round",
                    "rouse p99",
                    "bare p99",
                    "ratio",
                    "means: client; proxy's wait; control's wait / start / first answer",
                    "rouse CPU s: machine (engines / _system / control / proxy)",
                    "bare CPU s",
                ],
                &rows
            )
        )?;
        let mut ratios: Vec<f64> = self.rounds.iter().map(Round::ratio).collect();
        ratios.sort_by(f64::total_cmp);
        let median = ratios.get(ratios.len() / 2).copied().unwrap_or_default();
        writeln!(
            f,
            "storm p99 ÷ bare p99, median round: {median:.2}× (target ≤ 1.2×)\n"
        )?;
        write!(f, "{}", self.active_set)
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The engine pid a database's pid file names.
fn engine_pid(control: &Control, app: &str, db: &str) -> Option<u32> {
    let file = control
        .data_dir()
        .join(format!("{app}_{db}"))
        .join("rqlite")
        .join("node-0.pid");
    std::fs::read_to_string(file)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn db_name(i: usize) -> String {
    format!("t{i:05}")
}

pub async fn run(databases: usize) -> Result<DensityResults> {
    let databases = databases.max(STORM);
    let mut control = Control::builder()
        .hibernation_timeout("0")
        .replication_factor(1)
        .max_databases(databases as u32 + 10)
        .port_ranges((11000, 12999), (18000, 19999), (25000, 25999))
        // A platform's own limits: each app holds half the node, created at once.
        .env("ROUSE_APPS__DEFAULT__MAX_DATABASES", databases.to_string())
        .env(
            "ROUSE_APPS__DEFAULT__CREATES_PER_MINUTE",
            (100 * databases).to_string(),
        )
        .start()
        .await?;
    let client = control.client();
    let mut keys = Vec::new();
    for app in APPS {
        client.create_app(&name(app)).await?;
        keys.push(client.create_key(&name(app)).await?.key);
    }
    let rss_empty = rss_kib(control.pid());

    // Created and put to sleep, a few at a time; database i is app i % 2's.
    let started = Instant::now();
    futures::stream::iter(0..databases)
        .map(|i| {
            let client = client.clone();
            async move {
                let (app, db) = (name(APPS[i % 2]), name(&db_name(i)));
                client
                    .create_database(&CreateDatabase {
                        app: app.clone(),
                        name: db.clone(),
                        engine: Engine::Rqlite,
                        replication_factor: Some(1),
                        patroni: None,
                    })
                    .await
                    .with_context(|| format!("create {db}"))?;
                client.hibernate(&app, &db, false).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CREATING)
        .try_collect::<Vec<()>>()
        .await?;
    let create_rate = databases as f64 / started.elapsed().as_secs_f64();
    // Let control settle (an upkeep turn) before its memory is read.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let control_rss_kib = rss_kib(control.pid());
    let system_bytes = dir_bytes(&control.data_dir().join("_system"));

    // A running engine's memory.
    let mut engine_kib = 0;
    for i in 0..SAMPLE_ACTIVE {
        let (app, db) = (APPS[i % 2], db_name(i));
        client.wake(&name(app), &name(&db)).await?;
        engine_kib += engine_pid(&control, app, &db).map_or(0, rss_kib);
    }
    for i in 0..SAMPLE_ACTIVE {
        client
            .hibernate(&name(APPS[i % 2]), &name(&db_name(i)), false)
            .await?;
    }

    // The storm: the last STORM databases, through the proxy.
    let proxy = Proxy::builder(&control).start().await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(STORM)
        .build()?;
    let storm_dbs: Vec<usize> = (databases - STORM..databases).collect();
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let mut r = Round::default();
        if round % 2 == 1 {
            (r.bare, r.cpu_bare) = bare_storm(&control, &storm_dbs).await?;
        }
        hibernate_all(&control, &storm_dbs).await?;
        let before = phase_totals(&control, &proxy).await;
        let cpu = StormCpu::before(&control, Some(&proxy));
        for (app, took) in rouse_storm(&proxy, &http, &keys, &storm_dbs).await? {
            r.storm.push(took);
            r.storm_by_app[app].push(took);
        }
        r.cpu_storm = cpu();
        let after = phase_totals(&control, &proxy).await;
        for ((mean, (s0, n0)), (s1, n1)) in r.phases.iter_mut().zip(before).zip(after) {
            *mean = Duration::from_secs_f64((s1 - s0) / (n1 - n0).max(1.0));
        }
        if round % 2 == 0 {
            (r.bare, r.cpu_bare) = bare_storm(&control, &storm_dbs).await?;
        }
        rounds.push(r);
    }
    drop(proxy);

    // The same node, now running at most ACTIVE_SET databases at once.
    control
        .restart_with(
            "ROUSE_DATABASE__MAX_ACTIVE_DATABASES",
            &ACTIVE_SET.to_string(),
        )
        .await?;
    let active_set = crate::active_set::run(&control, APPS, &keys, databases, db_name).await?;

    Ok(DensityResults {
        databases,
        create_rate,
        control_rss_kib,
        control_kib_per_db: control_rss_kib.saturating_sub(rss_empty) as f64 / databases as f64,
        system_kib_per_db: system_bytes as f64 / 1024.0 / databases as f64,
        engine_mib_per_active: engine_kib as f64 / 1024.0 / SAMPLE_ACTIVE as f64,
        rounds,
        active_set,
    })
}

/// Wakes `dbs` at once through the proxy (one query each); each answer's
/// app and time.
async fn rouse_storm(
    proxy: &Proxy,
    http: &reqwest::Client,
    keys: &[String],
    dbs: &[usize],
) -> Result<Vec<(usize, Duration)>> {
    let t0 = Instant::now();
    futures::future::try_join_all(dbs.iter().map(|&i| {
        let app = APPS[i % 2];
        let url = format!("{}/{app}/{}/db/query", proxy.url(), db_name(i));
        let (http, key) = (http.clone(), keys[i % 2].clone());
        async move {
            let resp = http
                .post(url)
                .bearer_auth(key)
                .json(&serde_json::json!(["SELECT 1"]))
                .send()
                .await?;
            anyhow::ensure!(
                resp.status().is_success(),
                "storm request: {}",
                resp.status()
            );
            Ok((i % 2, t0.elapsed()))
        }
    }))
    .await
}

/// Puts `dbs` to sleep; what control then says of each.
async fn hibernate_all(control: &Control, dbs: &[usize]) -> Result<Vec<(DatabaseInfo, usize)>> {
    let client = control.client();
    futures::future::try_join_all(dbs.iter().map(|&i| {
        let client = client.clone();
        async move {
            let (app, db) = (name(APPS[i % 2]), name(&db_name(i)));
            client.hibernate(&app, &db, true).await?;
            anyhow::Ok((client.database(&app, &db).await?, i))
        }
    }))
    .await
}

/// Puts `dbs` to sleep, starts them bare all at once, and stops them
/// again; the start times, and the machine's CPU until the last answered.
async fn bare_storm(control: &Control, dbs: &[usize]) -> Result<(Vec<Duration>, StormCpu)> {
    let infos = hibernate_all(control, dbs).await?;
    let cpu = StormCpu::before(control, None);
    // One clock for all, as for the storm through rouse: a start asked
    // for late in the burst counts the wait for its turn to spawn.
    let asked = Instant::now();
    let booted = futures::future::try_join_all(infos.iter().map(|(info, i)| {
        let dir = control
            .data_dir()
            .join(format!("{}_{}", APPS[i % 2], db_name(*i)))
            .join("rqlite");
        async move { bare_boot(info, &dir, asked).await }
    }))
    .await?;
    let used = cpu();
    let took = futures::future::try_join_all(booted.into_iter().map(|(t, mut ps)| async move {
        for p in &mut ps {
            p.terminate(Duration::from_secs(30)).await?;
        }
        anyhow::Ok(t)
    }))
    .await?;
    Ok((took, used))
}
