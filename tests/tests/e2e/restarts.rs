//! Control going away is invisible to tenants: its engines outlive it, a
//! new control adopts them without a restart, the proxies keep serving and
//! hold what needs control until it is back. And a storm of wakes is
//! served in turn across apps.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rouse_control_api::{Engine, PoolMode};
use rouse_tests::{name, Stack, APP};
use serde_json::json;

/// Loops that run until stopped, each step counted as answered or failed
/// (the first failures kept to show).
#[derive(Default)]
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Runs `step` again and again, `pause` apart, until [`Load::finish`].
    fn spawn<F, Fut, E>(&mut self, what: &'static str, pause: Duration, step: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), E>> + Send,
        E: std::fmt::Debug,
    {
        let (stop, ok, failures) = (self.stop.clone(), self.ok.clone(), self.failures.clone());
        self.tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match step().await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{what}: {e:?}")),
                }
                tokio::time::sleep(pause).await;
            }
        }));
    }

    /// Stops the loops; asserts nothing failed and at least `min` steps
    /// were answered.
    async fn finish(self, min: u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failures = self.failures.lock().unwrap();
        let ok = self.ok.load(Ordering::Relaxed);
        assert!(
            failures.is_empty(),
            "{} failed, {ok} answered; the first: {:#?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
        assert!(ok >= min, "only {ok} answered");
    }
}

/// One rqlite API call to `url` with `key`; fails unless it succeeds.
async fn rqlite_call(
    http: reqwest::Client,
    key: String,
    url: String,
    body: serde_json::Value,
) -> Result<(), String> {
    let resp = http
        .post(url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let answer: serde_json::Value = resp.json().await.unwrap_or_default();
    if status.is_success() && answer["results"][0].get("error").is_none() {
        Ok(())
    } else {
        Err(format!("{status} {answer}"))
    }
}

/// One rqlite API call through the stack's first proxy, as a load step.
fn rqlite_step(
    s: &Stack,
    db: &str,
    path: &str,
    body: serde_json::Value,
) -> impl Fn() -> futures::future::BoxFuture<'static, Result<(), String>> {
    let (http, key) = (s.http.clone(), s.key.clone());
    let url = format!("{}/{APP}/{db}{path}", s.proxy().url());
    move || {
        Box::pin(rqlite_call(
            http.clone(),
            key.clone(),
            url.clone(),
            body.clone(),
        ))
    }
}

/// A new Postgres session through the first proxy and one query on it.
fn new_session_step(
    s: &Stack,
    db: &str,
) -> impl Fn() -> futures::future::BoxFuture<'static, Result<(), tokio_postgres::Error>> {
    let url = format!(
        "{}?sslmode=disable",
        s.pg_url("alice.shop", "wonderland", db)
    );
    move || {
        let url = url.clone();
        Box::pin(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client.simple_query("SELECT 1").await.map(|_| ())
        })
    }
}

/// A query on a session that stays open, as a load step.
fn session_step(
    client: tokio_postgres::Client,
    prepared: bool,
) -> impl Fn() -> futures::future::BoxFuture<'static, Result<(), tokio_postgres::Error>> {
    let client = Arc::new(client);
    move || {
        let client = client.clone();
        Box::pin(async move {
            if prepared {
                client
                    .query_one("SELECT $1::INT", &[&7i32])
                    .await
                    .map(|_| ())
            } else {
                client.simple_query("SELECT 1").await.map(|_| ())
            }
        })
    }
}

/// The pid in an engine's pid file under control's data directory.
fn engine_pid(s: &Stack, db: &str, engine: Engine) -> u32 {
    let file = s
        .control
        .data_dir()
        .join(format!("{APP}_{db}"))
        .join(engine.as_str())
        .join("node-0.pid");
    let text = std::fs::read_to_string(&file).unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_killed_and_restarted_under_load_fails_no_request_and_restarts_no_engine() {
    let s = Stack::builder().start().await;
    s.create("lite", Engine::Rqlite).await;
    s.create("pg", Engine::Postgres).await;
    s.create("pooled", Engine::Postgres).await;
    s.create("sleepy", Engine::Rqlite).await;
    s.create("asleep", Engine::Rqlite).await;
    let api = s.control.client();
    api.set_pool_mode(&name(APP), &name("pooled"), PoolMode::Transaction)
        .await
        .unwrap();
    for db in ["sleepy", "asleep"] {
        api.hibernate(&name(APP), &name(db), false).await.unwrap();
    }
    let (status, _) = s
        .rqlite("lite", "/db/execute", json!(["CREATE TABLE t (v TEXT)"]))
        .await;
    assert!(status.is_success());
    let pids_before = [
        engine_pid(&s, "lite", Engine::Rqlite),
        engine_pid(&s, "pg", Engine::Postgres),
        engine_pid(&s, "pooled", Engine::Postgres),
    ];

    let mut load = Load::default();
    for _ in 0..2 {
        let write = json!([["INSERT INTO t VALUES (?)", "x"]]);
        load.spawn(
            "rqlite write",
            Duration::from_millis(20),
            rqlite_step(&s, "lite", "/db/execute", write),
        );
    }
    for db in ["pg", "pooled"] {
        let session = s.pg_connect("alice.shop", "wonderland", db).await.unwrap();
        load.spawn(
            "session query",
            Duration::from_millis(20),
            session_step(session, false),
        );
        load.spawn(
            "new session",
            Duration::from_millis(50),
            new_session_step(&s, db),
        );
    }
    let mut s = s;
    tokio::time::sleep(Duration::from_secs(1)).await;

    s.control.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A hibernated database asked for while control is away is held.
    let held = tokio::spawn(rqlite_step(&s, "sleepy", "/db/query", json!(["SELECT 1"]))());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "held while control is away");
    // Nothing stopped with control.
    for pid in &pids_before {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
    s.control.restart().await.unwrap();
    let hibernating = s
        .control_metric(r#"rouse_databases{status="hibernating"}"#)
        .await;
    assert!(
        hibernating >= 1.0,
        "the status gauge is right after the restart: {hibernating}"
    );
    let answered = tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .expect("served once control is back")
        .unwrap();
    assert_eq!(answered, Ok(()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.finish(100).await;
    let pids_after = [
        engine_pid(&s, "lite", Engine::Rqlite),
        engine_pid(&s, "pg", Engine::Postgres),
        engine_pid(&s, "pooled", Engine::Postgres),
    ];
    assert_eq!(
        pids_after,
        pids_before,
        "the same engine processes run; control's log:\n{}",
        s.control.log_tail(100)
    );
    for pid in pids_after {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
    assert!(s
        .control
        .log_tail(400)
        .contains("adopted the running engine"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_wakes_from_two_apps_is_answered_in_turn() {
    const EACH: usize = 50;
    let s = Stack::builder()
        .control(|c| {
            c.max_databases(2 * EACH as u32 + 10)
                .env("ROUSE_CONTROL__MAX_CONCURRENT_STARTS", "4")
        })
        .start()
        .await;
    let api = s.control.client();
    let other = name("mall");
    api.create_app(&other).await.unwrap();
    let other_key = api.create_key(&other).await.unwrap().key;
    let apps = [(name(APP), s.key.clone()), (other, other_key)];
    let dbs: Vec<String> = (0..EACH).map(|i| format!("d{i}")).collect();
    // Created (eight at a time) and put to sleep.
    let jobs: Vec<_> = apps
        .iter()
        .flat_map(|(app, _)| dbs.iter().map(move |db| (app.clone(), name(db))))
        .collect();
    futures::future::join_all(jobs.chunks(8).map(|chunk| {
        let api = api.clone();
        let chunk = chunk.to_vec();
        async move {
            for (app, db) in chunk {
                let req = rouse_control_api::CreateDatabase {
                    app: app.clone(),
                    name: db.clone(),
                    engine: Engine::Rqlite,
                    replication_factor: None,
                    patroni: None,
                };
                api.create_database(&req).await.unwrap();
                api.hibernate(&app, &db, false).await.unwrap();
            }
        }
    }))
    .await;

    // The first app's whole burst is asked for before the second's.
    let t0 = Instant::now();
    let done = Arc::new(Mutex::new(Vec::new()));
    let mut storm = Vec::new();
    for (app, key) in &apps {
        for db in &dbs {
            let url = format!("{}/{app}/{db}/db/query", s.proxy().url());
            let (http, key, app, done) =
                (s.http.clone(), key.clone(), app.to_string(), done.clone());
            storm.push(tokio::spawn(async move {
                let answered = rqlite_call(http, key, url, json!(["SELECT 1"])).await;
                done.lock().unwrap().push((app, t0.elapsed()));
                answered
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for answer in futures::future::join_all(storm).await {
        assert_eq!(answer.unwrap(), Ok(()), "every wake answered");
    }
    let done = done.lock().unwrap().clone();
    assert_eq!(done.len(), 2 * EACH);
    // In turn: the second app's wakes do not wait behind the first's
    // burst; among the first half answered, both apps have a fair share.
    let first_half = &done[..EACH];
    let second_app = first_half.iter().filter(|(a, _)| a == "mall").count();
    assert!(
        second_app >= EACH / 4,
        "{second_app} of the first {EACH} answers were the second app's: {:?}",
        done.iter()
            .map(|(a, t)| format!("{a}@{}ms", t.as_millis()))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_upgrade_takes_over_from_the_running_control_without_restarting_an_engine() {
    let mut s = Stack::builder().start().await;
    s.create("lite", Engine::Rqlite).await;
    s.create("pg", Engine::Postgres).await;
    let pids_before = [
        engine_pid(&s, "lite", Engine::Rqlite),
        engine_pid(&s, "pg", Engine::Postgres),
    ];
    // A second daemon on the same data directory is refused.
    let (status, log) = s.control.start_another(false).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("another rouse-control"), "{log}");

    // Reads go on through the proxy while the new daemon takes over.
    let mut load = Load::default();
    let read = rqlite_step(&s, "lite", "/db/query", json!(["SELECT 1"]));
    load.spawn("read", Duration::from_millis(20), read);
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.control.start_another(true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.finish(10).await;

    let pids_after = [
        engine_pid(&s, "lite", Engine::Rqlite),
        engine_pid(&s, "pg", Engine::Postgres),
    ];
    assert_eq!(pids_after, pids_before, "the same engine processes run");
    let info = s
        .control
        .client()
        .database(&name(APP), &name("pg"))
        .await
        .unwrap();
    assert_eq!(info.status, rouse_control_api::DatabaseStatus::Active);
    let pg = s
        .pg_connect("alice.shop", "wonderland", "pg")
        .await
        .unwrap();
    pg.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pooled_database_put_to_sleep_and_woken_under_load_fails_no_query() {
    let s = Stack::builder().start().await;
    s.create("pooled", Engine::Postgres).await;
    let api = s.control.client();
    api.set_pool_mode(&name(APP), &name("pooled"), PoolMode::Transaction)
        .await
        .unwrap();
    let mut load = Load::default();
    // Sessions that stay: simple queries, and prepared statements (named
    // statements the pool prepares again on each new backend); and new
    // sessions all along.
    for i in 0..6 {
        let session = s
            .pg_connect("alice.shop", "wonderland", "pooled")
            .await
            .unwrap();
        load.spawn(
            "pooled query",
            Duration::from_millis(10),
            session_step(session, i % 2 == 1),
        );
    }
    load.spawn(
        "new pooled session",
        Duration::from_millis(50),
        new_session_step(&s, "pooled"),
    );
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Forced: the pooled sessions stay open. The next queries wake it.
        api.hibernate(&name(APP), &name("pooled"), true)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.finish(200).await;
    let info = api.database(&name(APP), &name("pooled")).await.unwrap();
    assert!(info.last_wake_ms.is_some(), "it was woken again");
}

/// SIGCONT on drop: a failing test never leaves control stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wedged_control_leaves_active_databases_served_and_the_rest_timing_out_cleanly() {
    let s = Stack::builder()
        .proxy(|p| p.set("wake_timeout", "3s").set("control_timeout", "1s"))
        .start()
        .await;
    for (db, engine) in [
        ("lite", Engine::Rqlite),
        ("pg", Engine::Postgres),
        ("sleepy", Engine::Rqlite),
        ("pgsleep", Engine::Postgres),
    ] {
        s.create(db, engine).await;
    }
    let api = s.control.client();
    for db in ["sleepy", "pgsleep"] {
        api.hibernate(&name(APP), &name(db), false).await.unwrap();
    }
    // Known to the proxy before control stops answering.
    assert!(s
        .rqlite("lite", "/db/query", json!(["SELECT 1"]))
        .await
        .0
        .is_success());
    let pg = s
        .pg_connect("alice.shop", "wonderland", "pg")
        .await
        .unwrap();

    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(s.control.pid() as libc::pid_t, libc::SIGSTOP) };
    let resume = Resume(s.control.pid());
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (status, body) = s.rqlite("lite", "/db/query", json!(["SELECT 1"])).await;
        assert!(status.is_success(), "{status} {body}");
        pg.simple_query("SELECT 1").await.unwrap();
        let fresh = s
            .pg_connect("alice.shop", "wonderland", "pg")
            .await
            .unwrap();
        fresh.simple_query("SELECT 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What needs control waits out wake_timeout and says so.
    let asked = Instant::now();
    let (status, body) = s.rqlite("sleepy", "/db/query", json!(["SELECT 1"])).await;
    assert_eq!(status.as_u16(), 503, "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    let Err(err) = s.pg_connect("alice.shop", "wonderland", "pgsleep").await else {
        panic!("no connection while control is wedged");
    };
    let code = err.as_db_error().map(|e| e.code().code().to_string());
    assert_eq!(code.as_deref(), Some("57P03"), "{err}");

    drop(resume);
    let (status, body) = s.rqlite("sleepy", "/db/query", json!(["SELECT 1"])).await;
    assert!(
        status.is_success(),
        "served once control answers: {status} {body}"
    );
}
