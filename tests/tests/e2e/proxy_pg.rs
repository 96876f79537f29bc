//! `rouse-proxy`'s PostgreSQL front against real control, real PostgreSQL
//! and real clients (psql, psycopg, tokio-postgres).

use std::process::Command;
use std::time::{Duration, Instant};

use rouse_control_api::*;
use rouse_tests::{name, run_ok, Stack, APP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;

/// Control's count of PostgreSQL databases started by a wake.
const STARTS: &str = r#"rouse_wake_duration_seconds_count{engine="postgres",phase="start"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_clients_connect_and_a_hibernated_database_wakes_on_connect() {
    let s = Stack::builder().start().await;
    s.create("users", Engine::Postgres).await;
    s.hibernate("users").await;

    // psql with the app in the user name; the first connect wakes the database.
    for sslmode in ["disable", "prefer"] {
        let url = format!(
            "{}?sslmode={sslmode}",
            s.pg_url("alice.shop", "wonderland", "users")
        );
        run_ok(Command::new("psql").args([
            &url,
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "CREATE TABLE IF NOT EXISTS notes (body text)",
            "-c",
            "INSERT INTO notes VALUES ('psql')",
        ]));
    }
    // psycopg, with the app in options.
    let script = format!(
        "import psycopg\n\
         with psycopg.connect('{}', options='-c rouse.app={APP}') as c:\n\
         \x20   c.execute(\"INSERT INTO notes VALUES ('psycopg')\")\n\
         \x20   print(c.execute('SELECT count(*) FROM notes').fetchone()[0])\n",
        s.pg_url("alice", "wonderland", "users")
    );
    assert!(run_ok(Command::new("python3").args(["-c", &script]))
        .trim()
        .ends_with('3'));
    // tokio-postgres, with extended-protocol statements and parameters.
    let c = s
        .pg_connect("alice.shop", "wonderland", "users")
        .await
        .unwrap();
    let rows = c
        .query(
            "SELECT body FROM notes WHERE body <> $1 ORDER BY body",
            &[&"psql"],
        )
        .await
        .unwrap();
    let bodies: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(bodies, vec!["psycopg"]);
    let who: (String, String) = {
        let r = c
            .query_one("SELECT current_user::text, session_user::text", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        who.1, "alice",
        "the backend session belongs to the client's own role"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connects_to_a_hibernated_database_wake_it_once() {
    let s = Stack::builder().start().await;
    s.create("herd", Engine::Postgres).await;
    s.control
        .client()
        .hibernate(&name(APP), &name("herd"), true)
        .await
        .unwrap();
    let before = s.control_metric(STARTS).await;
    let connects = (0..200).map(|_| async {
        let c = s.pg_connect("alice.shop", "wonderland", "herd").await?;
        c.query_one("SELECT 1", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    let results = futures::future::join_all(connects).await;
    for r in &results {
        assert_eq!(r.as_ref().map_err(|e| format!("{e:?}")), Ok(&1));
    }
    assert_eq!(s.control_metric(STARTS).await - before, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_query_is_cancelled_with_the_clients_cancel_key() {
    let s = Stack::builder().start().await;
    s.create("slow", Engine::Postgres).await;
    let c = s
        .pg_connect("alice.shop", "wonderland", "slow")
        .await
        .unwrap();
    let token = c.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeper.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_connections_get_postgres_errors_and_harm_nobody() {
    let s = Stack::builder()
        .proxy(|p| p.set("header_read_timeout", "1s").set("wake_timeout", "2s"))
        .start()
        .await;
    s.create("main", Engine::Postgres).await;
    s.control.client().create_app(&name("rival")).await.unwrap();
    s.control
        .client()
        .create_user(&name("rival"), "mallory", "secret")
        .await
        .unwrap();
    s.control
        .client()
        .create_database(&CreateDatabase {
            app: name("rival"),
            name: name("vault"),
            engine: Engine::Postgres,
            replication_factor: None,
            patroni: None,
        })
        .await
        .unwrap();

    let code = |r: Result<tokio_postgres::Client, tokio_postgres::Error>| {
        r.err().and_then(|e| e.code().cloned())
    };
    assert_eq!(
        code(s.pg_connect("alice.shop", "nope", "main").await),
        Some(SqlState::INVALID_PASSWORD)
    );
    assert_eq!(
        code(s.pg_connect("nobody.shop", "x", "main").await),
        Some(SqlState::INVALID_PASSWORD)
    );
    assert_eq!(
        code(s.pg_connect("alice.ghost", "wonderland", "main").await),
        Some(SqlState::INVALID_PASSWORD)
    );
    assert_eq!(
        code(s.pg_connect("alice.shop", "wonderland", "missing").await),
        Some(SqlState::INVALID_CATALOG_NAME)
    );
    assert_eq!(
        code(s.pg_connect("alice", "wonderland", "main").await),
        Some(SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    );
    // Another app's database is not there for this app, whoever asks.
    assert_eq!(
        code(s.pg_connect("alice.shop", "wonderland", "vault").await),
        Some(SqlState::INVALID_CATALOG_NAME)
    );
    assert_eq!(
        code(s.pg_connect("mallory.shop", "secret", "vault").await),
        Some(SqlState::INVALID_PASSWORD)
    );
    // A login names a database, it never creates one: "missing" and
    // "vault" were not left behind in shop (the HTTP APIs create).
    let api = s.control.client();
    let shop = api.list_databases(Some(&name("shop"))).await.unwrap();
    let shop: Vec<String> = shop.databases.iter().map(|d| d.name.to_string()).collect();
    assert_eq!(shop, ["main"]);
    assert!(s
        .pg_connect("mallory.rival", "secret", "vault")
        .await
        .is_ok());

    // Malformed, oversized and stalled startups: an error, and the others go on.
    let pg_addr = s.proxy().postgres_addr();
    let raw = |bytes: Vec<u8>| async move {
        let mut sock = tokio::net::TcpStream::connect(pg_addr).await.unwrap();
        sock.write_all(&bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let garbage = raw(vec![0, 0, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8]).await;
    assert!(
        garbage.contains("08P01") && garbage.contains("unsupported protocol"),
        "{garbage}"
    );
    let oversized = raw(vec![0, 16, 0, 0, 0, 3, 0, 0]).await;
    assert!(oversized.contains("08P01"), "{oversized}");
    let mut stalled = tokio::net::TcpStream::connect(s.proxy().postgres_addr())
        .await
        .unwrap();
    stalled
        .write_all(&[0, 0, 0, 40, 0, 3, 0, 0, b'u'])
        .await
        .unwrap();
    let c = s
        .pg_connect("alice.shop", "wonderland", "main")
        .await
        .unwrap();
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    let mut out = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut out)).await;
    assert!(done.is_ok(), "a stalled handshake is cut off");

    // Past max_client_connections: 53300, and room again once one leaves.
    let small = Stack::builder()
        .proxy(|p| p.set("max_client_connections", "2"))
        .start()
        .await;
    small.create("tiny", Engine::Postgres).await;
    let first = small
        .pg_connect("alice.shop", "wonderland", "tiny")
        .await
        .unwrap();
    let second = small
        .pg_connect("alice.shop", "wonderland", "tiny")
        .await
        .unwrap();
    assert_eq!(
        code(small.pg_connect("alice.shop", "wonderland", "tiny").await),
        Some(SqlState::TOO_MANY_CONNECTIONS)
    );
    drop((first, second));
    let deadline = Instant::now() + Duration::from_secs(5);
    while small
        .pg_connect("alice.shop", "wonderland", "tiny")
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "slots not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A wake that does not finish in time is 57P03, not a bare disconnect.
    let slow = Stack::builder()
        .proxy(|p| p.set("wake_timeout", "1ms"))
        .start()
        .await;
    slow.create("sleepy", Engine::Postgres).await;
    slow.control
        .client()
        .hibernate(&name(APP), &name("sleepy"), true)
        .await
        .unwrap();
    assert_eq!(
        code(slow.pg_connect("alice.shop", "wonderland", "sleepy").await),
        Some(SqlState::CANNOT_CONNECT_NOW)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_offered_and_the_server_name_can_name_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=rouse-test",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    let tls = format!(
        "{{cert_file: {}, key_file: {}}}",
        cert.display(),
        key.display()
    );
    let s = Stack::builder().proxy(|p| p.set("tls", &tls)).start().await;
    s.create("secure", Engine::Postgres).await;
    s.control
        .client()
        .hibernate(&name(APP), &name("secure"), true)
        .await
        .unwrap();

    let url = format!(
        "{}?sslmode=require",
        s.pg_url("alice.shop", "wonderland", "secure")
    );
    let out = run_ok(Command::new("psql").args([&url, "-At", "-c", "SELECT 'encrypted'"]));
    assert!(out.contains("encrypted"), "{out}");
    let script = format!(
        "import psycopg\n\
         with psycopg.connect('{url}') as c:\n\
         \x20   print(c.pgconn.ssl_in_use, c.execute('SELECT 40 + 2').fetchone()[0])\n"
    );
    assert_eq!(
        run_ok(Command::new("python3").args(["-c", &script])).trim(),
        "True 42"
    );
    // tokio-postgres over rustls: the test trusts the proxy's self-signed
    // certificate, as a client configured with it as root would.
    let (c, conn) = tokio_postgres::connect(&url, rouse_tests::trust_any_certificate())
        .await
        .unwrap();
    tokio::spawn(conn);
    // With sslmode=require, tokio-postgres connects only over TLS.
    assert_eq!(
        c.query_one("SELECT $1::int + 1", &[&41i32])
            .await
            .unwrap()
            .get::<_, i32>(0),
        42
    );

    // The app from the TLS server name <db>.<app>.<base_domain>.
    let port = s.proxy().postgres_addr().port();
    let conninfo = format!("host=secure.{APP}.localhost hostaddr=127.0.0.1 port={port} user=alice password=wonderland dbname=secure sslmode=require");
    let out =
        run_ok(Command::new("psql").args([&conninfo, "-At", "-c", "SELECT current_database()"]));
    assert_eq!(out.trim(), "secure");
    // Without TLS there is no server name, and so no app.
    let plain = format!(
        "host=127.0.0.1 port={port} user=alice password=wonderland dbname=secure sslmode=disable"
    );
    let out = Command::new("psql")
        .args([&plain, "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("cannot tell the app")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_shares_few_backends_and_keeps_prepared_statements() {
    let s = Stack::builder()
        .proxy(|p| p.set("pool_size", "4"))
        .start()
        .await;
    s.create("pooled", Engine::Postgres).await;
    let info = s
        .control
        .client()
        .set_pool_mode(&name(APP), &name("pooled"), PoolMode::Transaction)
        .await
        .unwrap();
    assert_eq!(info.pool_mode, PoolMode::Transaction);

    // pgbench with protocol-level prepared statements, 8 clients over 4
    // backends. One client per pgbench thread: pgbench prepares statements
    // with a blocking call, which would stall a thread's other clients while
    // they hold every backend.
    let conninfo = format!(
        "host=127.0.0.1 port={} user=alice.shop dbname=pooled sslmode=disable",
        s.proxy().postgres_addr().port()
    );
    let pgbench = rouse_tests::postgres_bin_dir().unwrap().join("pgbench");
    run_ok(
        Command::new(&pgbench)
            .args(["-i", "-s", "1", "-q", &conninfo])
            .env("PGPASSWORD", "wonderland"),
    );
    let out = run_ok(
        Command::new(&pgbench)
            .args([
                "-M", "prepared", "-c", "8", "-j", "8", "-T", "3", "-n", &conninfo,
            ])
            .env("PGPASSWORD", "wonderland"),
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let c = s
        .pg_connect("alice.shop", "wonderland", "pooled")
        .await
        .unwrap();
    let row = c
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history), \
             (SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice')",
            &[],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "every transaction applied exactly once"
    );
    assert!(
        row.get::<_, i64>(1) <= 4,
        "{} backend connections for 8 clients",
        row.get::<_, i64>(1)
    );

    // Two clients whose statements share names (tokio-postgres calls them s0, s1, ...)
    // keep getting their own statements on whichever backend serves them.
    let a = s
        .pg_connect("alice.shop", "wonderland", "pooled")
        .await
        .unwrap();
    let b = s
        .pg_connect("alice.shop", "wonderland", "pooled")
        .await
        .unwrap();
    let plus = a.prepare("SELECT $1::int + 1").await.unwrap();
    let times = b.prepare("SELECT $1::int * 10").await.unwrap();
    for i in 0..50i32 {
        let args: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&i];
        let (x, y) = tokio::join!(a.query_one(&plus, &args), b.query_one(&times, &args));
        assert_eq!(x.unwrap().get::<_, i32>(0), i + 1);
        assert_eq!(y.unwrap().get::<_, i32>(0), i * 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_does_not_leak_to_the_next_pooled_client() {
    // One backend connection: every client gets the same one in turn.
    let s = Stack::builder()
        .proxy(|p| p.set("pool_size", "1"))
        .start()
        .await;
    s.create("shared", Engine::Postgres).await;
    s.control
        .client()
        .set_pool_mode(&name(APP), &name("shared"), PoolMode::Transaction)
        .await
        .unwrap();
    let a = s
        .pg_connect("alice.shop", "wonderland", "shared")
        .await
        .unwrap();
    let backend_pid = |c: tokio_postgres::Client| async move {
        c.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    };
    a.batch_execute(
        "SET search_path TO nowhere; SET application_name = 'client-a'; \
         CREATE TEMP TABLE scratch (x int); SELECT pg_advisory_lock(42)",
    )
    .await
    .unwrap();
    let pid = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get::<_, i32>(0);
    drop(a);

    let b = s
        .pg_connect("alice.shop", "wonderland", "shared")
        .await
        .unwrap();
    let row = b
        .query_one(
            "SELECT pg_backend_pid(), current_setting('search_path'), current_setting('application_name'), \
             (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'), to_regclass('pg_temp.scratch') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid, "the same backend connection");
    assert_eq!(row.get::<_, String>(1), "\"$user\", public");
    assert_ne!(row.get::<_, String>(2), "client-a");
    assert_eq!(
        row.get::<_, i64>(3),
        0,
        "client A's advisory lock was released"
    );
    assert!(row.get::<_, bool>(4), "client A's temporary table is gone");
    // The reset kept the connection: no new login.
    let c = s
        .pg_connect("alice.shop", "wonderland", "shared")
        .await
        .unwrap();
    assert_eq!(backend_pid(c).await, pid);
}

/// A database hibernated while the proxy missed control's events: the next
/// connect meets the stale route, and instead of failing the client the
/// proxy forgets the route, wakes the database and connects again. (In
/// transaction pooling the pool still holds its dead idle connections
/// after a hibernation; checking them out alive is the pools' own work.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_on_a_stale_route_wakes_the_database_and_gets_in() {
    let mut s = Stack::builder().proxies(0).start().await;
    let relay =
        rouse_tests::Relay::start(s.control.api_url().trim_start_matches("http://").into()).await;
    let proxy = s
        .proxy_builder()
        .control_url(&format!("http://{}", relay.addr()))
        .start()
        .await
        .unwrap();
    s.proxies.push(proxy);
    let retries = || s.proxy_metric(0, r#"rouse_stale_route_retries_total{protocol="postgres"}"#);
    s.create("orders", Engine::Postgres).await;
    let query = || async {
        let client = s.pg_connect("alice.shop", "wonderland", "orders").await?;
        client.simple_query("SELECT 1").await
    };
    query().await.unwrap();
    relay.block_events(true);
    // The relay closes the open event stream within 20 ms.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.control
        .client()
        .hibernate(&name(APP), &name("orders"), true)
        .await
        .unwrap();
    let before = retries().await;
    query()
        .await
        .unwrap_or_else(|e| panic!("the stale route failed the client: {e}"));
    assert_eq!(retries().await, before + 1.0);
}
