//! The control daemon against real engines: lifecycle, crash handling,
//! restarts, orphans and bad input.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rouse_control_api::*;
use rouse_tests::{
    engine_url, name, pids_mentioning, port_is_free, rqlite_execute, rqlite_query, Control, APP,
};

pub(crate) fn create_req(db: &str, engine: Engine, rf: Option<u32>) -> CreateDatabase {
    CreateDatabase {
        app: name(APP),
        name: name(db),
        engine,
        replication_factor: rf,
        patroni: None,
    }
}

pub(crate) async fn with_app(control: &Control) -> Client {
    let client = control.client();
    client.create_app(&name(APP)).await.unwrap();
    client
}

fn leader(info: &DatabaseInfo) -> String {
    let e = &info.endpoints[0];
    assert!(
        e.leader,
        "first endpoint is the leader: {:?}",
        info.endpoints
    );
    engine_url(info, e)
}

pub(crate) async fn wait_for_status(
    control: &Control,
    client: &Client,
    db: &str,
    want: DatabaseStatus,
    within: Duration,
) -> DatabaseInfo {
    let deadline = Instant::now() + within;
    loop {
        let info = client.database(&name(APP), &name(db)).await.unwrap();
        if info.status == want {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "{db} still {:?}, expected {want:?}; control's log ends with:\n{}",
            info.status,
            control.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tells control a proxy holds `open` sessions on `db`, active now.
async fn report_sessions(client: &Client, db: &str, open: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    client
        .report_activity(&ActivityReport {
            proxy_id: "test-proxy".into(),
            databases: vec![DatabaseActivity {
                app: name(APP),
                name: name(db),
                last_activity: now,
                open_sessions: open,
                requests: 1,
            }],
        })
        .await
        .unwrap();
}

pub(crate) fn db_dir(control: &Control, db: &str) -> String {
    control
        .data_dir()
        .join(format!("{APP}_{db}"))
        .to_string_lossy()
        .into_owned()
}

fn addrs(info: &DatabaseInfo) -> Vec<SocketAddr> {
    info.endpoints
        .iter()
        .flat_map(|e| {
            let host = e.host.parse().unwrap();
            std::iter::once(e.port)
                .chain(e.raft_port)
                .map(move |p| SocketAddr::new(host, p))
        })
        .collect()
}

pub(crate) async fn pg_client(
    info: &DatabaseInfo,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client> {
    let e = &info.endpoints[0];
    let (client, conn) = tokio_postgres::Config::new()
        .host(&e.host)
        .port(e.port)
        .user(user)
        .password(password)
        .dbname(info.name.as_str())
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

pub(crate) async fn write_row(info: &DatabaseInfo, value: &str) -> Result<()> {
    match info.engine {
        Engine::Rqlite => {
            rqlite_execute(
                &leader(info),
                "CREATE TABLE IF NOT EXISTS notes (body TEXT)",
            )
            .await?;
            rqlite_execute(
                &leader(info),
                &format!("INSERT INTO notes VALUES ('{value}')"),
            )
            .await?;
        }
        Engine::Postgres => {
            let c = pg_client(info, "alice", "wonderland").await?;
            c.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS notes (body TEXT); INSERT INTO notes VALUES ('{value}')"
            ))
            .await?;
        }
        Engine::Patroni => anyhow::bail!("control runs no Patroni cluster to write to"),
    }
    Ok(())
}

pub(crate) async fn read_rows(info: &DatabaseInfo) -> Result<Vec<String>> {
    Ok(match info.engine {
        Engine::Rqlite => rqlite_query(&leader(info), "SELECT body FROM notes")
            .await?
            .into_iter()
            .map(|row| row[0].as_str().unwrap_or_default().to_string())
            .collect(),
        Engine::Postgres => pg_client(info, "alice", "wonderland")
            .await?
            .query("SELECT body FROM notes", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect(),
        Engine::Patroni => anyhow::bail!("control runs no Patroni cluster to read from"),
    })
}

/// Create, write, hibernate after the idle timeout (processes gone, ports
/// free), wake on the same ports, read the data back.
async fn hibernate_and_wake(engine: Engine, rf: Option<u32>) {
    let control = Control::builder()
        .hibernation_timeout("2s")
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    client
        .create_user(&name(APP), "alice", "wonderland")
        .await
        .unwrap();

    let created = client
        .create_database(&create_req("orders", engine, rf))
        .await
        .unwrap();
    assert_eq!(created.status, DatabaseStatus::Active);
    assert_eq!(created.endpoints.len(), rf.unwrap_or(1) as usize);
    report_sessions(&client, "orders", 1).await;
    write_row(&created, "first").await.unwrap();
    report_sessions(&client, "orders", 0).await;

    wait_for_status(
        &control,
        &client,
        "orders",
        DatabaseStatus::Hibernating,
        Duration::from_secs(20),
    )
    .await;
    let dir = db_dir(&control, "orders");
    assert!(
        pids_mentioning(&dir).is_empty(),
        "engine processes still running: {:?}",
        pids_mentioning(&dir)
    );
    for addr in addrs(&created) {
        assert!(port_is_free(addr), "{addr} still bound after hibernation");
    }
    assert!(Path::new(&dir).is_dir(), "data kept on disk");

    let woken = client.wake(&name(APP), &name("orders")).await.unwrap();
    report_sessions(&client, "orders", 1).await;
    assert_eq!(woken.status, DatabaseStatus::Active);
    assert_eq!(woken.ports, created.ports, "ports are sticky across a wake");
    assert!(woken.last_wake_ms.is_some());
    assert_eq!(read_rows(&woken).await.unwrap(), vec!["first".to_string()]);

    // An open session keeps it awake well past the idle timeout.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let still = client.database(&name(APP), &name("orders")).await.unwrap();
    assert_eq!(
        still.status,
        DatabaseStatus::Active,
        "hibernated with an open session"
    );
    assert_eq!(still.open_sessions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rqlite_single_node_hibernates_and_wakes_with_its_data() {
    hibernate_and_wake(Engine::Rqlite, Some(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rqlite_three_replicas_hibernate_and_wake_with_their_data() {
    hibernate_and_wake(Engine::Rqlite, Some(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hibernates_and_wakes_with_its_data() {
    hibernate_and_wake(Engine::Postgres, None).await;
}

async fn metric(control: &Control, series: &str) -> f64 {
    rouse_tests::metric(&format!("{}/metrics", control.api_url()), series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_wakes_start_the_engine_once() {
    let control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    client
        .create_database(&create_req("herd", Engine::Rqlite, Some(1)))
        .await
        .unwrap();
    let hibernated = client
        .hibernate(&name(APP), &name("herd"), false)
        .await
        .unwrap();
    assert_eq!(hibernated.status, DatabaseStatus::Hibernating);
    let starts = r#"rouse_wake_duration_seconds_count{engine="rqlite",phase="start"}"#;
    let before = metric(&control, starts).await;

    let wakes = (0..50).map(|_| {
        let client = client.clone();
        async move { client.wake(&name(APP), &name("herd")).await }
    });
    let results = futures::future::join_all(wakes).await;
    let first = results[0].as_ref().unwrap();
    for r in &results {
        let info = r.as_ref().expect("every wake succeeds");
        assert_eq!(info.status, DatabaseStatus::Active);
        assert_eq!(info.endpoints, first.endpoints);
    }
    assert_eq!(
        metric(&control, starts).await - before,
        1.0,
        "engine started more than once"
    );
    assert_eq!(
        pids_mentioning(&db_dir(&control, "herd")).len(),
        1,
        "exactly one rqlited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rqlited_is_restarted_with_its_data() {
    let control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    let info = client
        .create_database(&create_req("sturdy", Engine::Rqlite, Some(1)))
        .await
        .unwrap();
    write_row(&info, "kept").await.unwrap();
    let dir = db_dir(&control, "sturdy");
    let old = pids_mentioning(&dir);
    assert_eq!(old.len(), 1);
    unsafe { libc::kill(old[0] as i32, libc::SIGKILL) };

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids = pids_mentioning(&dir);
        if pids.len() == 1 && pids[0] != old[0] {
            if let Ok(rows) = read_rows(&info).await {
                assert_eq!(rows, vec!["kept".to_string()]);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "rqlited not healed; log:\n{}",
            control.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = client.database(&name(APP), &name("sturdy")).await.unwrap();
    assert_eq!(status.status, DatabaseStatus::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_daemon_keeps_every_database() {
    let mut control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    client
        .create_user(&name(APP), "alice", "wonderland")
        .await
        .unwrap();
    let lite = client
        .create_database(&create_req("lite", Engine::Rqlite, Some(1)))
        .await
        .unwrap();
    let trio = client
        .create_database(&create_req("trio", Engine::Rqlite, Some(3)))
        .await
        .unwrap();
    let pg = client
        .create_database(&create_req("pg", Engine::Postgres, None))
        .await
        .unwrap();
    client
        .create_database(&create_req("sleepy", Engine::Rqlite, Some(1)))
        .await
        .unwrap();
    client
        .hibernate(&name(APP), &name("sleepy"), false)
        .await
        .unwrap();
    for info in [&lite, &trio, &pg] {
        write_row(info, "before restart").await.unwrap();
    }
    let key = client.create_key(&name(APP)).await.unwrap();

    for how in ["graceful", "crash"] {
        if how == "crash" {
            control.kill();
        }
        control.restart().await.unwrap();
        for db in ["lite", "trio", "pg"] {
            let info = wait_for_status(
                &control,
                &client,
                db,
                DatabaseStatus::Active,
                Duration::from_secs(30),
            )
            .await;
            assert_eq!(
                read_rows(&info).await.unwrap(),
                vec!["before restart".to_string()],
                "{db} after a {how} restart"
            );
        }
        let sleepy = client.database(&name(APP), &name("sleepy")).await.unwrap();
        assert_eq!(
            sleepy.status,
            DatabaseStatus::Hibernating,
            "after a {how} restart"
        );
        assert_eq!(client.verify_key(&key.key).await.unwrap().app, name(APP));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_directories_are_removed_and_live_ones_kept() {
    let mut control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    let live = client
        .create_database(&create_req("live", Engine::Rqlite, Some(1)))
        .await
        .unwrap();
    write_row(&live, "alive").await.unwrap();
    control.stop().await.unwrap();

    let data = control.data_dir();
    let orphan = data.join(format!("{APP}_ghost")).join("rqlite");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("db.sqlite"), b"stale").unwrap();
    let unrelated = data.join("backups");
    std::fs::create_dir_all(&unrelated).unwrap();

    control.restart().await.unwrap();
    let live = wait_for_status(
        &control,
        &client,
        "live",
        DatabaseStatus::Active,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        !data.join(format!("{APP}_ghost")).exists(),
        "orphan removed"
    );
    assert!(
        unrelated.exists(),
        "a directory that is no database's is left alone"
    );
    assert_eq!(read_rows(&live).await.unwrap(), vec!["alive".to_string()]);
    assert!(
        control.log_tail(200).contains("orphaned"),
        "the removal is logged"
    );

    // A lost metadata store must not turn every database into an orphan.
    control.stop().await.unwrap();
    std::fs::remove_dir_all(data.join("_system")).unwrap();
    control.restart().await.unwrap();
    assert!(
        data.join(format!("{APP}_live")).join("rqlite").is_dir(),
        "kept while metadata is new"
    );
}

async fn api_error<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, code, .. }) => (status, code.as_str().to_string()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn raw(
    control: &Control,
    method: reqwest::Method,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .request(method, format!("{}{path}", control.api_url()))
        .bearer_auth(control.admin_token())
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_leaves_nothing_behind() {
    use reqwest::Method;
    let control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    client
        .create_database(&create_req("main", Engine::Rqlite, Some(1)))
        .await
        .unwrap();

    // Invalid names never reach the disk.
    for body in [
        r#"{"app":"shop","name":"../etc","engine":"rqlite"}"#,
        r#"{"app":"shop","name":"Main","engine":"rqlite"}"#,
        r#"{"app":"shop","name":"a_b","engine":"rqlite"}"#,
        r#"{"app":"sh op","name":"x","engine":"rqlite"}"#,
    ] {
        let (status, err) = raw(&control, Method::POST, "/api/v1/databases", body).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert!(err["error"].as_str().unwrap().contains("name"), "{err}");
    }
    let (status, err) = raw(&control, Method::POST, "/api/v1/apps", r#"{"name":"-bad"}"#).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("bad_request")),
        "{err}"
    );
    let (status, err) = raw(&control, Method::GET, "/api/v1/databases/Shop/main", "").await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_name")));

    // Bad JSON, unknown routes, unknown engines.
    let (status, err) = raw(&control, Method::POST, "/api/v1/databases", "{not json").await;
    assert_eq!((status, err["code"].as_str()), (400, Some("bad_request")));
    let (status, err) = raw(
        &control,
        Method::POST,
        "/api/v1/databases",
        r#"{"app":"shop","name":"x","engine":"mysql"}"#,
    )
    .await;
    assert_eq!(status, 400, "{err}");
    let (status, err) = raw(&control, Method::GET, "/api/v1/nothing/here", "").await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
    let (status, _) = raw(&control, Method::POST, "/api/v1/apps", &"x".repeat(2 << 20)).await;
    assert_eq!(status, 413);

    // Duplicates, unknown apps and databases.
    assert_eq!(
        api_error(client.create_app(&name(APP)).await).await,
        (409, "already_exists".into())
    );
    assert_eq!(
        api_error(
            client
                .create_database(&create_req("main", Engine::Rqlite, None))
                .await
        )
        .await,
        (409, "already_exists".into())
    );
    let mut other_app = create_req("x", Engine::Rqlite, None);
    other_app.app = name("nobody");
    assert_eq!(
        api_error(client.create_database(&other_app).await).await,
        (404, "not_found".into())
    );
    assert_eq!(
        api_error(client.wake(&name(APP), &name("nope")).await).await,
        (404, "not_found".into())
    );
    assert_eq!(
        api_error(client.hibernate(&name(APP), &name("nope"), true).await).await,
        (404, "not_found".into())
    );
    assert_eq!(
        api_error(client.drop_database(&name(APP), &name("nope")).await).await,
        (404, "not_found".into())
    );
    assert_eq!(
        api_error(client.database(&name("nobody"), &name("main")).await).await,
        (404, "not_found".into())
    );

    // Impossible replication.
    for (db, engine, rf, want) in [
        ("r0", Engine::Rqlite, 0, (400, "bad_request")),
        ("r9", Engine::Rqlite, 9, (503, "insufficient_nodes")),
        ("pg3", Engine::Postgres, 3, (400, "bad_request")),
    ] {
        let got = api_error(
            client
                .create_database(&create_req(db, engine, Some(rf)))
                .await,
        )
        .await;
        assert_eq!(got, (want.0, want.1.to_string()), "{db}");
    }

    // Open sessions block a hibernation unless forced.
    report_sessions(&client, "main", 2).await;
    assert_eq!(
        api_error(client.hibernate(&name(APP), &name("main"), false).await).await,
        (409, "in_use".into())
    );
    let forced = client
        .hibernate(&name(APP), &name("main"), true)
        .await
        .unwrap();
    assert_eq!(forced.status, DatabaseStatus::Hibernating);

    let names: Vec<String> = client
        .list_databases(Some(&name(APP)))
        .await
        .unwrap()
        .databases
        .iter()
        .map(|d| d.name.to_string())
        .collect();
    assert_eq!(names, vec!["main"]);
    let dirs: Vec<String> = std::fs::read_dir(control.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(APP))
        .collect();
    assert_eq!(
        dirs,
        vec![format!("{APP}_main")],
        "no half-made directories"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_port_ranges_and_max_databases_are_refused_cleanly() {
    let http = rouse_tests::free_port("127.0.0.1".parse().unwrap());
    // Below the ephemeral range (32768 and up), where outgoing connections
    // of other tests would take ports from under the engines.
    let (raft, pg) = (
        rand::random_range(18_000..24_900u16),
        rand::random_range(25_000..31_900u16),
    );
    let control = Control::builder()
        .hibernation_timeout("0")
        .max_databases(2)
        .port_ranges((http, http), (raft, raft + 20), (pg, pg + 20))
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    // The metadata store took the only HTTP port of the range: no rqlite
    // database fits.
    let err = api_error(
        client
            .create_database(&create_req("one", Engine::Rqlite, Some(1)))
            .await,
    )
    .await;
    assert_eq!(err, (503, "ports_exhausted".into()));
    assert!(!control.data_dir().join(format!("{APP}_one")).exists());
    assert!(client
        .list_databases(None)
        .await
        .unwrap()
        .databases
        .is_empty());

    client
        .create_user(&name(APP), "alice", "wonderland")
        .await
        .unwrap();
    client
        .create_database(&create_req("pg1", Engine::Postgres, None))
        .await
        .unwrap();
    client
        .create_database(&create_req("pg2", Engine::Postgres, None))
        .await
        .unwrap();
    let err = api_error(
        client
            .create_database(&create_req("pg3", Engine::Postgres, None))
            .await,
    )
    .await;
    assert_eq!(err, (503, "max_databases".into()));
    assert!(!control.data_dir().join(format!("{APP}_pg3")).exists());
    assert_eq!(
        client.list_databases(None).await.unwrap().databases.len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_shown_once_verified_and_revoked_with_an_event() {
    let control = Control::builder().start().await.unwrap();
    let client = with_app(&control).await;
    client.create_app(&name("rival")).await.unwrap();
    let key = client.create_key(&name(APP)).await.unwrap();
    let rival = client.create_key(&name("rival")).await.unwrap();
    assert!(key.key.starts_with("ak_"));
    assert_eq!(client.verify_key(&key.key).await.unwrap().app, name(APP));
    assert_eq!(
        client.verify_key(&rival.key).await.unwrap().app,
        name("rival")
    );
    let listed = client.list_keys(&name(APP)).await.unwrap();
    assert_eq!(listed.len(), 1);
    let listing = serde_json::to_string(&listed).unwrap();
    assert!(
        !listing.contains(&key.key),
        "the key itself is never shown again"
    );
    let stored = std::fs::read(control.data_dir().join("_system/rqlite/node-0/db.sqlite"))
        .unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&stored).contains(&key.key),
        "only a hash is stored"
    );

    let mut events = client.events().await.unwrap();
    // Another app cannot revoke this app's key.
    assert_eq!(
        api_error(client.delete_key(&name("rival"), &key.id).await)
            .await
            .0,
        404
    );
    client.delete_key(&name(APP), &key.id).await.unwrap();
    assert_eq!(
        api_error(client.verify_key(&key.key).await).await,
        (404, "not_found".into())
    );
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.contains("key_revoked") && Instant::now() < deadline {
        if let Ok(Ok(Some(chunk))) =
            tokio::time::timeout(Duration::from_secs(1), events.chunk()).await
        {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(
        seen.contains("event: key_revoked") && seen.contains(&key.id),
        "{seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_users_added_while_hibernated_can_log_in_after_wake() {
    let control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    client
        .create_user(&name(APP), "alice", "wonderland")
        .await
        .unwrap();
    let db = client
        .create_database(&create_req("accounts", Engine::Postgres, None))
        .await
        .unwrap();
    write_row(&db, "by alice").await.unwrap();
    assert!(
        pg_client(&db, "alice", "wrong").await.is_err(),
        "wrong password refused"
    );

    client
        .hibernate(&name(APP), &name("accounts"), false)
        .await
        .unwrap();
    let bob = client
        .create_user(&name(APP), "bob", "builder")
        .await
        .unwrap();
    assert!(bob.scram_verifier.starts_with("SCRAM-SHA-256$"));
    let woken = client.wake(&name(APP), &name("accounts")).await.unwrap();
    let rows: Vec<String> = pg_client(&woken, "bob", "builder")
        .await
        .unwrap()
        .query("SELECT body FROM notes", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec!["by alice"], "users of one app share its tables");

    // A password change reaches the running database at once.
    client
        .create_user(&name(APP), "bob", "rebuilt")
        .await
        .unwrap();
    assert!(pg_client(&woken, "bob", "builder").await.is_err());
    assert!(pg_client(&woken, "bob", "rebuilt").await.is_ok());
    assert_eq!(
        api_error(client.create_user(&name(APP), "bob.shop", "x").await)
            .await
            .0,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_on_taken_ports_moves_the_database_and_keeps_its_data() {
    let control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    let info = client
        .create_database(&create_req("nomad", Engine::Rqlite, Some(3)))
        .await
        .unwrap();
    write_row(&info, "moved").await.unwrap();
    client
        .hibernate(&name(APP), &name("nomad"), false)
        .await
        .unwrap();
    // Somebody else takes every port the database had.
    let squatters: Vec<_> = addrs(&info)
        .into_iter()
        .map(|a| std::net::TcpListener::bind(a).unwrap())
        .collect();
    let woken = client.wake(&name(APP), &name("nomad")).await.unwrap();
    // Every replica moved off its taken address (a port number may come back
    // on another host, where it is free).
    let (before, after) = (addrs(&info), addrs(&woken));
    assert!(
        after.iter().all(|a| !before.contains(a)),
        "{after:?} vs {before:?}"
    );
    assert_eq!(read_rows(&woken).await.unwrap(), vec!["moved".to_string()]);
    drop(squatters);
}

fn control_cli(control: &Control, args: &[&str]) -> Result<(bool, String, String)> {
    // The daemon's own config: the command line finds the admin token
    // the node wrote under its data directory.
    let out = std::process::Command::new(rouse_tests::control_bin()?)
        .arg("--config")
        .arg(control.config_file())
        .args(args)
        .output()
        .context("run rouse-control")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_drives_the_daemon() {
    let control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    // (arguments, succeeds, what stdout or stderr shows)
    let steps: [(&[&str], bool, &str); 9] = [
        (&["app", "create", "cli"], true, "\"cli\""),
        (&["key", "create", "cli"], true, "ak_"),
        (&["db", "create", "cli", "notes"], true, "\"active\""),
        (
            &["db", "hibernate", "cli", "notes"],
            true,
            "\"hibernating\"",
        ),
        (&["db", "list"], true, "hibernating"),
        (&["db", "wake", "cli", "notes"], true, "\"active\""),
        (&["db", "status", "cli", "missing"], false, "does not exist"),
        (&["db", "create", "cli", "Bad_Name"], false, "Bad_Name"),
        (&["db", "drop", "cli", "notes"], true, "cli_notes"),
    ];
    for (args, succeeds, shows) in steps {
        let (ok, out, err) = control_cli(&control, args).unwrap();
        assert_eq!(ok, succeeds, "{args:?}: {out}{err}");
        assert!(
            out.contains(shows) || err.contains(shows),
            "{args:?}: {out}{err}"
        );
    }
    assert!(!control.data_dir().join("cli_notes").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_says_what_the_node_holds_and_how_much_more_fits() {
    let control = Control::builder()
        .hibernation_timeout("0")
        .max_databases(10)
        .port_ranges((16600, 16799), (23600, 23799), (30600, 30799))
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    for db in ["awake", "asleep"] {
        client
            .create_database(&create_req(db, Engine::Rqlite, Some(1)))
            .await
            .unwrap();
    }
    client
        .create_database(&create_req("pg", Engine::Postgres, None))
        .await
        .unwrap();
    client
        .hibernate(&name(APP), &name("asleep"), false)
        .await
        .unwrap();
    let capacity = client.capacity().await.unwrap();
    let node = &capacity.nodes[0];
    assert_eq!(capacity.nodes.len(), 1);
    assert_eq!(
        (
            node.databases,
            node.active,
            node.hibernating,
            node.max_databases
        ),
        (3, 2, 1, 10)
    );
    assert_eq!(node.room.databases, 7);
    // Two running engines, rqlited and a postmaster with its backends.
    assert!(
        node.engine_memory_bytes > 10 * 1024 * 1024,
        "{}",
        node.engine_memory_bytes
    );
    let per_engine = node.engine_memory_bytes / 2;
    let by_memory = node.room.active_by_memory.unwrap();
    assert_eq!(by_memory as u64, node.memory_available_bytes / per_engine);
    // _system and the awake rqlite database hold a port pair; a hibernated
    // database holds none. (Other tests' engines may take a few more.)
    let left = node.ports_left.rqlite_http;
    assert!((180..=198).contains(&left), "{left} of 200 HTTP ports left");
    assert_eq!(
        node.room.rqlite_by_ports,
        left.min(node.ports_left.rqlite_raft)
    );
    assert!((180..=199).contains(&node.ports_left.postgres));

    let (ok, out, err) = control_cli(&control, &["capacity"]).unwrap();
    assert!(ok, "{err}");
    let printed: rouse_control_api::Capacity = serde_json::from_str(&out).unwrap();
    assert_eq!(printed.nodes[0].databases, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_the_metadata_store_does_not_answer() {
    let control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let healthz = || async {
        let resp = reqwest::get(format!("{}/healthz", control.api_url()))
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    assert_eq!(healthz().await.0, 200);
    let pid_file = control.data_dir().join("_system/rqlite/node-0.pid");
    let pid: i32 = std::fs::read_to_string(pid_file)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // A wedged _system member: alive, answering nothing.
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let resume = Resume(pid);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = healthz().await;
        if status != 200 || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("_system"), "{body}");
    drop(resume);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while healthz().await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "healthy again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_bad_config_is_refused_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "node:\n  data_dir: ./d\ndatabase:\n  hibernate_after: 5s\n",
    )
    .unwrap();
    let out = std::process::Command::new(rouse_tests::control_bin().unwrap())
        .arg("--config")
        .arg(&file)
        .arg("serve")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.yaml:4") && err.contains("database.hibernate_after"),
        "{err}"
    );

    let out = std::process::Command::new(rouse_tests::control_bin().unwrap())
        .arg("serve")
        .env("ROUSE_DATABASE__HIBERNATION_TIMEOUT", "soonish")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ROUSE_DATABASE__HIBERNATION_TIMEOUT"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_leaves_the_daemon_and_its_databases_running() {
    let mut control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let client = with_app(&control).await;
    let info = client
        .create_database(&create_req("steady", Engine::Rqlite, Some(1)))
        .await
        .unwrap();
    write_row(&info, "still here").await.unwrap();
    // SAFETY: kill(2) on the daemon this test started.
    assert_eq!(
        unsafe { libc::kill(control.pid() as libc::pid_t, libc::SIGHUP) },
        0
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!control.has_exited(), "SIGHUP ended the daemon");
    let status = client.database(&name(APP), &name("steady")).await.unwrap();
    assert_eq!(status.status, DatabaseStatus::Active);
    assert_eq!(
        read_rows(&status).await.unwrap(),
        vec!["still here".to_string()]
    );
}
