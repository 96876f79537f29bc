//! The admin console on the PostgreSQL port, as PgBouncer's users drive
//! it: psql and a psycopg script on database `pgbouncer` (or `rouse`), as
//! `admin` with an admin token, reading SHOW tables by column name, and
//! PAUSE, RESUME, KILL, RECONNECT and RELOAD acting on real sessions.

use std::process::Command;
use std::time::Duration;

use rouse_control_api::*;
use rouse_tests::{name, run_ok, Stack, APP};
use tokio_postgres::error::SqlState;

/// `psql -At -F '|' -c <command>` on the console as `user`/`password`;
/// stdout, or the error output when psql fails.
fn psql(s: &Stack, db: &str, user: &str, password: &str, command: &str) -> Result<String, String> {
    let url = format!(
        "postgres://{user}:{password}@{}/{db}?sslmode=require",
        s.proxy().postgres_addr()
    );
    let out = Command::new("psql")
        .args([&url, "-At", "-F", "|", "-c", command])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs `command` on the console from a psycopg script that reads the
/// rows by column name, as exporters do (a client-side cursor: simple
/// queries, as PgBouncer needs), and prints `columns` of each row.
fn exporter_reads(s: &Stack, token: &str, command: &str, columns: &str) -> String {
    let script = format!(
        "import psycopg\n\
         with psycopg.connect('postgres://admin:{token}@{}/pgbouncer?sslmode=require', autocommit=True, cursor_factory=psycopg.ClientCursor) as c:\n\
         \x20   cur = c.execute('{command}')\n\
         \x20   cols = [d.name for d in cur.description]\n\
         \x20   for r in cur.fetchall():\n\
         \x20       r = dict(zip(cols, r))\n\
         \x20       print({columns})\n",
        s.proxy().postgres_addr()
    );
    run_ok(Command::new("python3").args(["-c", &script]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_drive_the_console_as_they_drive_pgbouncers() {
    let s = Stack::builder()
        .proxy(|p| p.set("admin_users", "[\"ops.shop\"]"))
        .start()
        .await;
    let api = s.control.client();
    s.create("main", Engine::Postgres).await;
    s.create("pooled", Engine::Postgres).await;
    api.set_pool_mode(&name(APP), &name("pooled"), PoolMode::Transaction)
        .await
        .unwrap();
    api.create_user(&name(APP), "ops", "console-pw")
        .await
        .unwrap();
    let token = s.control.admin_token();

    // Sessions to show: one with a backend of its own, one pooled.
    let url = format!(
        "{}?application_name=billing&sslmode=disable",
        s.pg_url("alice.shop", "wonderland", "main")
    );
    let (main, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let main_done = tokio::spawn(conn);
    main.simple_query("SELECT 1").await.unwrap();
    let pooled = s
        .pg_connect("alice.shop", "wonderland", "pooled")
        .await
        .unwrap();
    pooled.simple_query("SELECT 1").await.unwrap();

    // psql, as a shell script would call it; `rouse` names the console too.
    let pools = psql(&s, "pgbouncer", "admin", &token, "SHOW POOLS").unwrap();
    let row = |db: &str| {
        pools
            .lines()
            .find(|l| l.starts_with(&format!("{APP}_{db}|alice.{APP}|")))
            .unwrap_or_else(|| panic!("no pool of {db}: {pools}"))
            .split('|')
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // cl_active, sv_active, sv_idle, pool_mode
    let main_row = row("main");
    assert_eq!(
        (&*main_row[2], &*main_row[6], &*main_row[15]),
        ("1", "1", "session")
    );
    let pooled_row = row("pooled");
    assert_eq!(
        (&*pooled_row[2], &*pooled_row[9], &*pooled_row[15]),
        ("1", "1", "transaction")
    );
    let clients = psql(&s, "rouse", "admin", &token, "show clients;").unwrap();
    assert!(
        clients.lines().any(|l| l
            .starts_with(&format!("C|alice.{APP}|{APP}_main|active|127.0.0.1|"))
            && l.contains("|billing|")),
        "{clients}"
    );
    let servers = psql(&s, "rouse", "admin", &token, "SHOW SERVERS").unwrap();
    assert!(
        servers
            .lines()
            .any(|l| l.starts_with(&format!("S|alice.{APP}|{APP}_pooled|idle|"))),
        "{servers}"
    );
    let databases = psql(&s, "rouse", "admin", &token, "SHOW DATABASES").unwrap();
    assert!(
        databases
            .lines()
            .any(|l| l.starts_with(&format!("{APP}_main|127.0.0.1|"))),
        "{databases}"
    );

    // A script that reads SHOW POOLS by column name, as exporters do.
    let read = exporter_reads(
        &s,
        &token,
        "SHOW POOLS",
        "r['database'], r['user'], r['cl_active'], r['sv_active'], r['sv_idle'], r['cl_waiting'], r['maxwait'], r['pool_mode']",
    );
    assert!(
        read.contains(&format!("{APP}_main alice.{APP} 1 1 0 0 0 session")),
        "{read}"
    );

    // Who may not: a wrong token, an app's token, a stranger; an admin
    // login by SCRAM works.
    let app_token = api.create_token(&Role::App(name(APP))).await.unwrap().token;
    for (user, password) in [
        ("admin", "nope"),
        ("admin", app_token.as_str()),
        ("alice.shop", "wonderland"),
    ] {
        let err = psql(&s, "pgbouncer", user, password, "SHOW POOLS").unwrap_err();
        assert!(
            err.contains("password authentication failed"),
            "{user}: {err}"
        );
    }
    assert!(
        psql(&s, "pgbouncer", "ops.shop", "console-pw", "SHOW VERSION")
            .unwrap()
            .starts_with("rouse ")
    );
    let err = psql(&s, "pgbouncer", "admin", &token, "DROP TABLE x").unwrap_err();
    assert!(err.contains("unknown command"), "{err}");

    // PAUSE holds a new session as a wake does; RESUME lets it in.
    psql(&s, "rouse", "admin", &token, &format!("PAUSE {APP}_main")).unwrap();
    let held = tokio::spawn({
        let url = s.pg_url("alice.shop", "wonderland", "main") + "?sslmode=disable";
        async move {
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map(|_| ())
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!held.is_finished(), "a session started while paused");
    // Other databases go on.
    s.pg_connect("alice.shop", "wonderland", "pooled")
        .await
        .unwrap();
    psql(&s, "rouse", "admin", &token, &format!("RESUME {APP}_main")).unwrap();
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("RESUME let the session in")
        .unwrap()
        .unwrap();

    // KILL ends the database's sessions at once.
    psql(&s, "rouse", "admin", &token, &format!("KILL {APP}_main")).unwrap();
    let err = main.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
        "{err}"
    );
    let _ = main_done.await;
    pooled.simple_query("SELECT 1").await.unwrap();

    // RECONNECT makes pooled connections anew; RELOAD reads the file again.
    psql(&s, "rouse", "admin", &token, "RECONNECT").unwrap();
    pooled.simple_query("SELECT 2").await.unwrap();
    psql(&s, "rouse", "admin", &token, "RELOAD").unwrap();

    // SHOW WAKES tells the wakes this proxy waited for.
    api.hibernate(&name(APP), &name("main"), true)
        .await
        .unwrap();
    s.pg_connect("alice.shop", "wonderland", "main")
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();
    let wakes = psql(&s, "rouse", "admin", &token, "SHOW WAKES").unwrap();
    assert!(
        wakes
            .lines()
            .any(|l| l.starts_with(&format!("{APP}_main|")) && l.ends_with("|woke")),
        "{wakes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stats_counts_both_pool_modes_and_pause_waits_for_transactions() {
    let s = Stack::builder().start().await;
    let api = s.control.client();
    s.create("main", Engine::Postgres).await;
    s.create("pooled", Engine::Postgres).await;
    api.set_pool_mode(&name(APP), &name("pooled"), PoolMode::Transaction)
        .await
        .unwrap();
    let token = s.control.admin_token();

    // On each database: 20 one-query transactions and one of three queries.
    for db in ["main", "pooled"] {
        let c = s.pg_connect("alice.shop", "wonderland", db).await.unwrap();
        for _ in 0..20 {
            c.simple_query("SELECT 1").await.unwrap();
        }
        for q in ["BEGIN", "SELECT repeat('x', 5000)", "COMMIT"] {
            c.simple_query(q).await.unwrap();
        }
    }
    // Read by column name, as pgbouncer_exporter does: numbers as numbers.
    let stats = exporter_reads(
        &s,
        &token,
        "SHOW STATS",
        "r['database'], r['total_query_count'], r['total_xact_count'], r['total_received'] > 0, r['total_sent'] > 5000, r['total_query_time'] > 0, r['avg_wait_time'] >= 0",
    );
    for db in ["main", "pooled"] {
        assert!(
            stats.contains(&format!("{APP}_{db} 23 21 True True True True")),
            "{db}: {stats}"
        );
    }
    let totals = psql(&s, "rouse", "admin", &token, "SHOW STATS_TOTALS").unwrap();
    assert!(totals.contains(&format!("{APP}_main|")), "{totals}");

    // PAUSE answers once the transaction under way has ended, then holds
    // the next one until RESUME.
    let c = s
        .pg_connect("alice.shop", "wonderland", "pooled")
        .await
        .unwrap();
    c.simple_query("BEGIN").await.unwrap();
    let pause = tokio::task::spawn_blocking({
        let (url, token) = (s.proxy().postgres_addr(), token.clone());
        move || {
            let url = format!("postgres://admin:{token}@{url}/rouse?sslmode=require");
            run_ok(Command::new("psql").args([&url, "-c", &format!("PAUSE {APP}_pooled")]))
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !pause.is_finished(),
        "PAUSE answered with a transaction open"
    );
    c.simple_query("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), pause)
        .await
        .expect("PAUSE answered once the transaction ended")
        .unwrap();
    let held = tokio::spawn(async move { c.simple_query("SELECT 2").await.map(|_| c) });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!held.is_finished(), "a transaction began while paused");
    psql(
        &s,
        "rouse",
        "admin",
        &token,
        &format!("RESUME {APP}_pooled"),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("RESUME let the transaction go on")
        .unwrap()
        .unwrap();
}
