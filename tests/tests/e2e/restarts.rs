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

/// Requests a load made and the first failures it saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn record<E: std::fmt::Display>(&self, what: &str, result: Result<(), E>) {
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = self.errors.lock().unwrap();
                if errors.len() < 10 {
                    errors.push(format!("{what}: {e}"));
                }
            }
        }
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

    let s = Arc::new(tokio::sync::RwLock::new(s));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut load = Vec::new();
    // HTTP reads and writes on the rqlite database.
    for _ in 0..2 {
        let (s, stop, tally) = (s.clone(), stop.clone(), tally.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let s = s.read().await;
                let (status, body) = s
                    .rqlite(
                        "lite",
                        "/db/execute",
                        json!([["INSERT INTO t VALUES (?)", "x"]]),
                    )
                    .await;
                let ok = status.is_success() && body["results"][0].get("error").is_none();
                tally.record(
                    "rqlite write",
                    if ok {
                        Ok(())
                    } else {
                        Err(format!("{status} {body}"))
                    },
                );
                drop(s);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Postgres: an open session per database, and new sessions.
    for db in ["pg", "pooled"] {
        let (stack, stopped, counts) = (s.clone(), stop.clone(), tally.clone());
        load.push(tokio::spawn(async move {
            let session = stack
                .read()
                .await
                .pg_connect("alice.shop", "wonderland", db)
                .await
                .unwrap();
            while !stopped.load(Ordering::Relaxed) {
                let r = session.simple_query("SELECT 1").await.map(|_| ());
                counts.record(&format!("{db} session"), r);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
        let (s, stop, tally) = (s.clone(), stop.clone(), tally.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let connected = s
                    .read()
                    .await
                    .pg_connect("alice.shop", "wonderland", db)
                    .await;
                let r = match connected {
                    Ok(c) => c.simple_query("SELECT 1").await.map(|_| ()),
                    Err(e) => Err(e),
                };
                tally.record(&format!("{db} new session"), r);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    s.write().await.control.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Nothing stopped with control.
    for pid in &pids_before {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
    s.write().await.control.restart().await.unwrap();
    let hibernating = s
        .read()
        .await
        .control_metric(r#"rouse_databases{status="hibernating"}"#)
        .await;
    assert!(
        hibernating >= 1.0,
        "the status gauge is right after the restart: {hibernating}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }

    let s = s.read().await;
    let errors = tally.errors.lock().unwrap().clone();
    assert_eq!(
        tally.failed.load(Ordering::Relaxed),
        0,
        "{} requests succeeded; failures: {errors:#?}",
        tally.ok.load(Ordering::Relaxed)
    );
    assert!(tally.ok.load(Ordering::Relaxed) > 100);
    let pids_after = [
        engine_pid(&s, "lite", Engine::Rqlite),
        engine_pid(&s, "pg", Engine::Postgres),
        engine_pid(&s, "pooled", Engine::Postgres),
    ];
    assert_eq!(pids_after, pids_before, "the same engine processes run");
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
                let resp = http
                    .post(url)
                    .bearer_auth(key)
                    .json(&json!(["SELECT 1"]))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                done.lock().unwrap().push((app, t0.elapsed()));
                status
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for answer in futures::future::join_all(storm).await {
        let status = answer.unwrap();
        assert!(status.is_success(), "every wake answered: {status}");
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
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let reads = {
        let (http, key, stop, tally) = (s.http.clone(), s.key.clone(), stop.clone(), tally.clone());
        let url = format!("{}/{APP}/lite/db/query", s.proxy().url());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sent = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!(["SELECT 1"]))
                    .send()
                    .await;
                let r = match sent {
                    Ok(resp) if resp.status().is_success() => Ok(()),
                    Ok(resp) => Err(resp.status().to_string()),
                    Err(e) => Err(e.to_string()),
                };
                tally.record("read", r);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.control.start_another(true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    reads.await.unwrap();
    let errors = tally.errors.lock().unwrap().clone();
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "{errors:#?}");

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
