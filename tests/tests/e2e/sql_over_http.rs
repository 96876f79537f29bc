//! PostgreSQL over HTTP against real control and PostgreSQL: Neon's SQL
//! over HTTP (`POST /sql`), driven by `@neondatabase/serverless` from npm
//! unchanged but for where it sends its requests, and the gateway API.

use std::process::Command;

use reqwest::StatusCode;
use rouse_control_api::*;
use rouse_tests::{name, run_ok, Stack, APP};
use serde_json::json;

/// Runs `body` (JavaScript inside an async function, `sql` bound to the
/// driver for `user:password` on `db`) and returns what it printed.
fn neon(s: &Stack, user: &str, password: &str, db: &str, body: &str) -> String {
    let port = s.proxy().http_addr().port();
    let script = format!(
        "const {{ neon, neonConfig }} = require('@neondatabase/serverless');\n\
         neonConfig.fetchEndpoint = () => 'http://127.0.0.1:{port}/sql';\n\
         const connect = (user, password, db) => neon(`postgresql://${{user}}:${{password}}@127.0.0.1/${{db}}`);\n\
         const sql = connect('{user}', '{password}', '{db}');\n\
         (async () => {{\n{body}\n}})().catch(e => {{ console.error(e); process.exit(1); }});\n"
    );
    node(&script)
}

/// Runs a Node.js script with the test clients installed; what it printed.
fn node(script: &str) -> String {
    let deps = std::env::var("ROUSE_DEPS_DIR").unwrap_or_else(|_| "/opt/rouse-deps".into());
    run_ok(
        Command::new("node")
            .args(["-e", script])
            .env("NODE_PATH", format!("{deps}/node_modules")),
    )
}

/// A stack whose app has a hibernated PostgreSQL database `users`.
async fn hibernated_users() -> Stack {
    let s = Stack::builder().start().await;
    s.create("users", Engine::Postgres).await;
    s.hibernate("users").await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serverless_driver_queries_a_hibernated_database_over_http() {
    let s = hibernated_users().await;
    let api = s.control.client();

    let out = neon(
        &s,
        &format!("alice.{APP}"),
        "wonderland",
        "users",
        r#"
  // The first call wakes the database.
  await sql`CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL, n int)`;
  await sql.query('INSERT INTO notes (body, n) VALUES ($1, $2), ($3, $4)', ['one', 1, 'two', null]);
  const rows = await sql`SELECT body, n FROM notes WHERE body <> ${'three'} ORDER BY id`;
  console.log('rows', JSON.stringify(rows));
  const full = await sql.query('SELECT now() AS at, 2::int8 AS big', [], { fullResults: true });
  console.log('types', full.rowCount, full.fields.map(f => f.dataTypeID).join(','), full.rows[0].at instanceof Date, typeof full.rows[0].big);
  // A batch whose second statement fails leaves nothing behind.
  try {
    await sql.transaction([sql`INSERT INTO notes (body) VALUES ('three')`, sql`INSERT INTO notes (body) VALUES (NULL)`]);
    console.log('batch committed');
  } catch (e) {
    console.log('batch failed', e.code, e.column);
  }
  const [after] = await sql`SELECT count(*)::int AS c FROM notes`;
  console.log('count', after.c);
  // A batch in one serializable transaction: the second statement sees the first.
  const [, seen] = await sql.transaction(
    [sql`INSERT INTO notes (body) VALUES ('four')`, sql`SELECT count(*)::int AS c FROM notes`],
    { isolationLevel: 'Serializable' });
  console.log('batch saw', seen[0].c);
  // One backend connection serves request after request: no login each time.
  const pids = new Set();
  for (let i = 0; i < 5; i++) pids.add((await sql`SELECT pg_backend_pid() AS p`)[0].p);
  console.log('backends', pids.size);
  try { await sql`SELECT * FROM nope`; } catch (e) { console.log('missing', e.code, e.position, e.file === undefined); }
  try { await connect('alice.shop', 'nope', 'users')`SELECT 1`; } catch (e) { console.log('denied', e.code); }
"#,
    );
    let line = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"))
            .to_string()
    };
    assert_eq!(
        line("rows "),
        r#"rows [{"body":"one","n":1},{"body":"two","n":null}]"#
    );
    // timestamptz and int8 by their type ids, parsed as the pg driver does.
    assert_eq!(line("types "), "types 1 1184,20 true string");
    assert_eq!(line("batch failed"), "batch failed 23502 body");
    assert_eq!(line("count "), "count 2");
    assert_eq!(line("batch saw"), "batch saw 3");
    assert_eq!(line("backends "), "backends 1");
    assert_eq!(line("missing "), "missing 42P01 15 true");
    assert_eq!(line("denied "), "denied 28P01");
    let info = api.database(&name(APP), &name("users")).await.unwrap();
    assert_eq!(info.status, DatabaseStatus::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_apps_login_reaches_nothing_over_http() {
    let s = Stack::builder().start().await;
    s.create("users", Engine::Postgres).await;
    let api = s.control.client();
    api.create_app(&name("other")).await.unwrap();
    api.create_user(&name("other"), "alice", "other-secret")
        .await
        .unwrap();
    s.create("rq", Engine::Rqlite).await;

    let out = neon(
        &s,
        "alice.other",
        "other-secret",
        "users",
        r#"
  const show = async (label, q) => { try { await q; console.log(label, 'answered'); } catch (e) { console.log(label, e.code, e.message); } };
  // other's own login, on shop's database name: there is none in other.
  await show('cross', sql`SELECT 1`);
  // other's password for shop's alice; an unknown role; a bad app name.
  await show('borrowed', connect('alice.shop', 'other-secret', 'users')`SELECT 1`);
  await show('unknown', connect('nobody.shop', 'wonderland', 'users')`SELECT 1`);
  await show('badapp', connect('alice.Shop_', 'wonderland', 'users')`SELECT 1`);
  // shop's login on its rqlite database: not a Postgres database.
  await show('rqlite', connect('alice.shop', 'wonderland', 'rq')`SELECT 1`);
  // shop's login on shop's database works.
  await show('own', connect('alice.shop', 'wonderland', 'users')`SELECT 1`);
"#,
    );
    assert!(
        out.contains("cross 3D000 database \"users\" does not exist"),
        "{out}"
    );
    assert!(
        out.contains("borrowed 28P01 password authentication failed for user \"alice\""),
        "{out}"
    );
    assert!(
        out.contains("unknown 28P01 password authentication failed for user \"nobody\""),
        "{out}"
    );
    assert!(out.contains("badapp 28000"), "{out}");
    assert!(out.contains("rqlite 3D000"), "{out}");
    assert!(out.contains("own answered"), "{out}");
    // other's login named "users" and found none: none was made for it.
    let other = api.list_databases(Some(&name("other"))).await.unwrap();
    assert!(other.databases.is_empty(), "{:?}", other.databases);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_api_serves_a_postgres_database_like_an_rqlite_one() {
    let s = Stack::builder().start().await;
    s.create("pg", Engine::Postgres).await;
    s.hibernate("pg").await;
    let api = s.control.client();

    // The first call wakes the database.
    let (st, r) = s
        .gateway("create-table", json!({"database": "pg", "schema": "CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE, score float8, admin boolean)"}))
        .await;
    assert_eq!((st, &r), (StatusCode::OK, &json!({"rows_affected": 0})));
    for (i, who) in ["Alice", "Bob"].iter().enumerate() {
        let (st, r) = s
            .gateway("exec", json!({"database": "pg", "sql": "INSERT INTO users (name, email, score, admin) VALUES (?, ?, ?, ?) RETURNING id", "args": [who, format!("{who}@example.com"), 1.5, i == 0]}))
            .await;
        assert_eq!(st, StatusCode::OK, "{r}");
        assert_eq!(r, json!({"rows_affected": 1, "last_insert_id": i + 1}));
    }
    let (st, r) = s
        .gateway("exec", json!({"database": "pg", "sql": "UPDATE users SET email = upper(email) WHERE email LIKE '%?%' OR true"}))
        .await;
    assert_eq!(
        (st, &r),
        (
            StatusCode::OK,
            &json!({"rows_affected": 2, "last_insert_id": null})
        )
    );

    let (_, r) = s
        .gateway("query", json!({"database": "pg", "sql": "SELECT id, name, score, admin, NULL AS none FROM users WHERE name LIKE ? ORDER BY id", "args": ["A%"]}))
        .await;
    assert_eq!(
        r,
        json!({"items": [{"id": 1, "name": "Alice", "score": 1.5, "admin": true, "none": null}], "count": 1})
    );

    // All or nothing: the second statement fails, the first is undone; the
    // error carries PostgreSQL's SQLSTATE and words.
    let (st, r) = s
        .gateway("transaction", json!({"database": "pg", "queries": ["INSERT INTO users (name) VALUES ('Carol')", ["INSERT INTO users (name) VALUES (?)", null]]}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{r}");
    assert_eq!(
        (r["code"].as_str(), r["sqlstate"].as_str()),
        (Some("sql_error"), Some("23502"))
    );
    assert!(r["error"].as_str().unwrap().contains("\"name\""), "{r}");
    let (_, r) = s
        .gateway(
            "query",
            json!({"database": "pg", "sql": "SELECT count(*) AS n FROM users"}),
        )
        .await;
    assert_eq!(r["items"][0]["n"], 2);
    let (st, r) = s
        .gateway("transaction", json!({"database": "pg", "queries": ["INSERT INTO users (name) VALUES ('Carol')", {"sql": "UPDATE users SET email = ? WHERE name = ?", "args": ["c@x", "Carol"]}]}))
        .await;
    assert_eq!((st, r), (StatusCode::OK, json!({"success": true})));

    let (_, schema) = s.gateway("schema", json!({"database": "pg"})).await;
    assert_eq!(
        schema,
        json!({"tables": [{"name": "users", "columns": ["id", "name", "email", "score", "admin"]}]})
    );
    let (st, r) = s
        .gateway(
            "drop-table",
            json!({"database": "pg", "table_name": "users"}),
        )
        .await;
    assert_eq!((st, r), (StatusCode::OK, json!({"rows_affected": 0})));
    let (_, schema) = s.gateway("schema", json!({"database": "pg"})).await;
    assert_eq!(schema, json!({"tables": []}));

    // The API login acts as the app's owner role, never as a superuser,
    // and cannot read the server's files.
    let (_, r) = s
        .gateway("query", json!({"database": "pg", "sql": "SELECT current_user AS who, rolsuper AS su FROM pg_roles WHERE rolname = session_user"}))
        .await;
    assert_eq!(r["items"][0]["su"], false, "{r}");
    let (st, r) = s
        .gateway(
            "query",
            json!({"database": "pg", "sql": "SELECT pg_read_file('/etc/passwd') AS f"}),
        )
        .await;
    assert_eq!(
        (st, r["sqlstate"].as_str()),
        (StatusCode::BAD_REQUEST, Some("42501")),
        "{r}"
    );

    // Another app's key (one whose first access creates nothing): the same
    // answer as for a database that does not exist, and nothing changes.
    s.gateway(
        "exec",
        json!({"database": "pg", "sql": "CREATE TABLE kept AS SELECT 1 AS x"}),
    )
    .await;
    api.create_app_with(&CreateApp {
        name: name("rival"),
        create_on_first_access: false,
    })
    .await
    .unwrap();
    let rival = api.create_key(&name("rival")).await.unwrap().key;
    for (op, body) in [
        ("exec", json!({"database": "pg", "sql": "DROP TABLE kept"})),
        (
            "query",
            json!({"database": "pg", "sql": "SELECT * FROM kept"}),
        ),
        ("schema", json!({"database": "pg"})),
    ] {
        let resp = s
            .http
            .post(format!("{}/v1/database/{op}", s.proxy().url()))
            .bearer_auth(&rival)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{op}");
    }
    let (_, r) = s
        .gateway(
            "query",
            json!({"database": "pg", "sql": "SELECT x FROM kept"}),
        )
        .await;
    assert_eq!(r, json!({"items": [{"x": 1}], "count": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serverless_drivers_pool_speaks_postgres_over_a_websocket() {
    let s = hibernated_users().await;
    let api = s.control.client();
    let port = s.proxy().http_addr().port();
    let script = format!(
        r#"
const {{ Pool, Client, neonConfig }} = require('@neondatabase/serverless');
neonConfig.webSocketConstructor = require('ws');
neonConfig.wsProxy = () => '127.0.0.1:{port}/v2';
neonConfig.useSecureWebSocket = false;
const url = (password) => `postgresql://alice.{APP}:${{password}}@127.0.0.1/users`;
(async () => {{
  const pool = new Pool({{ connectionString: url('wonderland') }});
  // The first connect wakes the database.
  const client = await pool.connect();
  await client.query('CREATE TABLE notes (id serial PRIMARY KEY, body text)');
  // An interactive transaction: what it wrote is seen inside, gone after.
  await client.query('BEGIN');
  await client.query('INSERT INTO notes (body) VALUES ($1)', ['in a transaction']);
  const inside = await client.query('SELECT count(*)::int AS c FROM notes');
  await client.query('ROLLBACK');
  const after = await client.query('SELECT count(*)::int AS c FROM notes');
  console.log('transaction', inside.rows[0].c, after.rows[0].c);
  // LISTEN on one session, NOTIFY from another.
  const listener = new Client({{ connectionString: url('wonderland') }});
  await listener.connect();
  const heard = new Promise(resolve => listener.on('notification', m => resolve(m.payload)));
  await listener.query('LISTEN news');
  await client.query("SELECT pg_notify('news', 'hello')");
  console.log('notified', await heard);
  try {{ await client.query('SELECT * FROM nope'); }} catch (e) {{ console.log('missing', e.code); }}
  const still = await client.query('SELECT 1 AS one');
  console.log('still', still.rows[0].one);
  client.release();
  // A pipelined connect resolves before the login is answered: the
  // refusal comes as an error event or on the first query.
  const stranger = new Client({{ connectionString: url('nope') }});
  const refused = new Promise(resolve => stranger.on('error', e => resolve('denied ' + e.code)));
  const asked = (async () => {{
    try {{ await stranger.connect(); await stranger.query('SELECT 1'); return 'stranger answered'; }}
    catch (e) {{ return 'denied ' + e.code; }}
  }})();
  console.log(await Promise.race([refused, asked]));
  await listener.end();
  await pool.end();
}})().catch(e => {{ console.error(e); process.exit(1); }});
"#
    );
    let out = node(&script);
    for expected in [
        "transaction 1 0",
        "notified hello",
        "missing 42P01",
        "still 1",
        "denied 28P01",
    ] {
        assert!(
            out.lines().any(|l| l == expected),
            "no {expected:?} in:\n{out}"
        );
    }
    let info = api.database(&name(APP), &name("users")).await.unwrap();
    assert_eq!(info.status, DatabaseStatus::Active);
}
