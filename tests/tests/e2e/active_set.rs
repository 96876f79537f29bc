//! A node's active set (`database.max_active_databases`): touching more
//! databases than may run keeps at most that many engines running and
//! answers every request, putting the least recently used idle database to
//! sleep first and never one a Postgres session holds; with every running
//! database in use, a wake waits and is refused naming the limit; two apps
//! hammering disjoint sets both make progress.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use rouse_control_api::*;
use rouse_tests::{name, Stack, APP};
use serde_json::{json, Value};

const MAX_ACTIVE: usize = 5;

/// A stack whose node runs at most [`MAX_ACTIVE`] databases; a wake waits
/// `active_wait` for room.
async fn stack(active_wait: &str) -> Stack {
    Stack::builder()
        .control(|c| {
            c.env(
                "ROUSE_DATABASE__MAX_ACTIVE_DATABASES",
                MAX_ACTIVE.to_string(),
            )
            .env("ROUSE_DATABASE__ACTIVE_WAIT", active_wait)
        })
        .start()
        .await
}

/// A process's arguments and parent.
fn process(pid: &str) -> Option<(Vec<String>, String)> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args = cmd
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ppid = stat
        .rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .to_string();
    Some((args, ppid))
}

/// Databases' engines running under `dir` (control's data directory):
/// rqlited processes and PostgreSQL postmasters, not their children (which
/// carry the postmaster's arguments for a moment after they fork), nor
/// control's own metadata store (`_system`).
fn engines_running(dir: &Path) -> usize {
    let dir = dir.display().to_string();
    let system = format!("{dir}/_system");
    let is_engine = |args: &[String]| {
        (args[0].ends_with("rqlited") || args[0].ends_with("/postgres"))
            && args.iter().any(|a| a.contains(&dir))
            && !args.iter().any(|a| a.contains(&system))
    };
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let Some((args, ppid)) = process(&e.file_name().to_string_lossy()) else {
                return false;
            };
            is_engine(&args) && !process(&ppid).is_some_and(|(parent, _)| is_engine(&parent))
        })
        .count()
}

/// Samples [`engines_running`] every 20 ms until [`Sampler::most`].
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<usize>,
}

impl Sampler {
    fn start(s: &Stack) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped, dir) = (stop.clone(), s.control.data_dir());
        let task = tokio::task::spawn_blocking(move || {
            let mut most = 0;
            while !stopped.load(Ordering::Relaxed) {
                most = most.max(engines_running(&dir));
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        });
        Sampler { stop, task }
    }

    /// The most engines seen running at once.
    async fn most(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        (&mut self.task).await.unwrap()
    }
}

impl Drop for Sampler {
    /// A failed test ends the sampling too (the runtime waits for it).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A gateway query through the first proxy as `key`'s app.
async fn query(s: &Stack, key: &str, db: &str) -> (StatusCode, Value) {
    let resp = s
        .http
        .post(format!("{}/v1/database/query", s.proxy().url()))
        .bearer_auth(key)
        .json(&json!({"database": db, "sql": "SELECT 1 AS one"}))
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap_or(Value::Null))
}

/// Until control has heard of `n` open sessions on `db`.
async fn until_sessions(s: &Stack, db: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let api = s.control.client();
    while api
        .database(&name(APP), &name(db))
        .await
        .unwrap()
        .open_sessions
        < n
    {
        assert!(Instant::now() < deadline, "{db}: sessions never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_databases_round_robin_run_five_at_a_time_and_a_held_one_stays() {
    let s = stack("10s").await;
    let api = s.control.client();
    s.create("held", Engine::Postgres).await;
    let held = s
        .pg_connect("alice.shop", "wonderland", "held")
        .await
        .unwrap();
    held.simple_query("CREATE TABLE kept (n int); INSERT INTO kept VALUES (1)")
        .await
        .unwrap();
    until_sessions(&s, "held", 1).await;

    let sampler = Sampler::start(&s);
    let dbs: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    // Created on first access, then touched round-robin: every request is
    // answered, each wake making room first.
    for round in 0..2 {
        for db in &dbs {
            let (status, body) = query(&s, &s.key, db).await;
            assert_eq!(status, StatusCode::OK, "round {round}, {db}: {body}");
            assert_eq!(body["items"][0]["one"], 1, "{body}");
        }
    }
    let most = sampler.most().await;
    assert_eq!(most, MAX_ACTIVE, "the most engines running at once");
    assert!(
        engines_running(&s.control.data_dir()) >= 2,
        "the held one and the last touched run"
    );

    // The database a session holds was never put to sleep: its session
    // goes on, on the same backend.
    let rows = held
        .simple_query("SELECT count(*) FROM kept")
        .await
        .unwrap();
    assert!(!rows.is_empty());
    let info = api.database(&name(APP), &name("held")).await.unwrap();
    assert_eq!(info.status, DatabaseStatus::Active);
    let evicted = s
        .control_metric("rouse_evictions_total{reason=\"max_active_databases\"}")
        .await;
    assert!(
        evicted >= 30.0,
        "{evicted} evictions for 40 wakes of 20 databases"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_running_database_in_use_a_wake_waits_then_is_refused_naming_the_limit() {
    let s = stack("3s").await;
    let api = s.control.client();
    // Asleep before the active set fills: one rqlite, one PostgreSQL.
    s.create("sixth", Engine::Rqlite).await;
    s.create("pg6", Engine::Postgres).await;
    for db in ["sixth", "pg6"] {
        api.hibernate(&name(APP), &name(db), true).await.unwrap();
    }
    let mut sessions = Vec::new();
    for i in 0..MAX_ACTIVE {
        let db = format!("busy{i}");
        s.create(&db, Engine::Postgres).await;
        sessions.push(s.pg_connect("alice.shop", "wonderland", &db).await.unwrap());
        until_sessions(&s, &db, 1).await;
    }

    let asked = Instant::now();
    let (status, body) = query(&s, &s.key, "sixth").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "active_set_full", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("max_active_databases"),
        "{body}"
    );
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "it waited its turn first"
    );
    let err = s
        .pg_connect("alice.shop", "wonderland", "pg6")
        .await
        .map(|_| ())
        .expect_err("pg6 cannot wake");
    let db_err = err.as_db_error().expect("a Postgres error");
    assert_eq!(db_err.code().code(), "57P03", "{db_err}");
    assert!(
        db_err.message().contains("max_active_databases"),
        "{db_err}"
    );
    // Still asleep, not failed.
    let info = api.database(&name(APP), &name("sixth")).await.unwrap();
    assert_eq!(info.status, DatabaseStatus::Hibernating);
    assert!(engines_running(&s.control.data_dir()) <= MAX_ACTIVE);

    // A session ends: its database is put to sleep and the wake gets in.
    drop(sessions.remove(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = query(&s, &s.key, "sixth").await;
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "never got in: {status} {body}");
    }
    let info = api.database(&name(APP), &name("busy0")).await.unwrap();
    assert_eq!(info.status, DatabaseStatus::Hibernating);
    for (i, c) in sessions.iter().enumerate() {
        c.simple_query("SELECT 1")
            .await
            .unwrap_or_else(|e| panic!("busy{}: {e}", i + 1));
    }
    assert!(
        s.control_metric("rouse_active_set_waits_total{outcome=\"refused\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_hammering_disjoint_sets_both_make_progress() {
    let s = stack("10s").await;
    let api = s.control.client();
    api.create_app(&name("other")).await.unwrap();
    let other_key = api.create_key(&name("other")).await.unwrap().key;
    let hammer = |key: String, prefix: &'static str| {
        let s = &s;
        async move {
            let mut answered = 0;
            for round in 0..3 {
                for i in 0..4 {
                    let db = format!("{prefix}{i}");
                    let (status, body) = query(s, &key, &db).await;
                    assert_eq!(
                        status,
                        StatusCode::OK,
                        "{prefix} round {round}, {db}: {body}"
                    );
                    answered += 1;
                }
            }
            answered
        }
    };
    let sampler = Sampler::start(&s);
    let (a, b) = tokio::join!(hammer(s.key.clone(), "a"), hammer(other_key, "b"));
    assert_eq!((a, b), (12, 12));
    let most = sampler.most().await;
    assert!(
        (2..=MAX_ACTIVE).contains(&most),
        "{most} engines ran at once"
    );
}
