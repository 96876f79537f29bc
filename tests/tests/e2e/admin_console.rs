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

    // A script that reads SHOW POOLS by column name, as exporters do
    // (psycopg's client-side cursor: simple queries, as PgBouncer needs).
    let script = format!(
        "import psycopg\n\
         with psycopg.connect('postgres://admin:{token}@{}/pgbouncer?sslmode=require', autocommit=True, cursor_factory=psycopg.ClientCursor) as c:\n\
         \x20   cur = c.execute('SHOW POOLS')\n\
         \x20   cols = [d.name for d in cur.description]\n\
         \x20   for r in cur.fetchall():\n\
         \x20       r = dict(zip(cols, r))\n\
         \x20       print(r['database'], r['user'], r['cl_active'], r['sv_active'], r['sv_idle'], r['cl_waiting'], r['maxwait'], r['pool_mode'])\n",
        s.proxy().postgres_addr()
    );
    let read = run_ok(Command::new("python3").args(["-c", &script]));
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
