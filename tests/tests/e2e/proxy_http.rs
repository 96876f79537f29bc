//! `rouse-proxy` over HTTP against real control, real rqlited and real
//! rqlite clients: the gateway API, the rqlite API and its four kinds of
//! routing, transparent wake-up, failover, isolation and bad input.

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use rouse_control_api::*;
use rouse_tests::{name, pids_mentioning, run_ok, Proxy, Stack, APP};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_executes_queries_and_transacts() {
    let s = Stack::builder().start().await;
    // First access creates the database.
    let (st, r) = s
        .gateway("create-table", json!({"database": "users", "schema": "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT UNIQUE)"}))
        .await;
    assert_eq!((st, &r), (StatusCode::OK, &json!({"rows_affected": 0})));
    for (i, who) in ["Alice", "Bob"].iter().enumerate() {
        let (st, r) = s
            .gateway("exec", json!({"database": "users", "sql": "INSERT INTO users (name, email) VALUES (?, ?)", "args": [who, format!("{who}@example.com")]}))
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(r, json!({"rows_affected": 1, "last_insert_id": i + 1}));
    }
    let (st, r) = s
        .gateway(
            "exec",
            json!({"database": "users", "sql": "UPDATE users SET email = lower(email)"}),
        )
        .await;
    assert_eq!((st, r["rows_affected"].as_u64()), (StatusCode::OK, Some(2)));

    let (_, r) = s.gateway("query", json!({"database": "users", "sql": "SELECT * FROM users WHERE name LIKE ?", "args": ["A%"]})).await;
    assert_eq!(
        r,
        json!({"items": [{"id": 1, "name": "Alice", "email": "alice@example.com"}], "count": 1})
    );

    // All or nothing: the second statement fails, the first is undone.
    let (st, r) = s
        .gateway("transaction", json!({"database": "users", "queries": ["INSERT INTO users (name) VALUES ('Carol')", "INSERT INTO users (name) VALUES (NULL)"]}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{r}");
    assert_eq!(r["code"], "sql_error");
    let (_, r) = s
        .gateway(
            "query",
            json!({"database": "users", "sql": "SELECT count(*) AS n FROM users"}),
        )
        .await;
    assert_eq!(r["items"][0]["n"], 2);
    let (st, r) = s
        .gateway("transaction", json!({"database": "users", "queries": ["INSERT INTO users (name) VALUES ('Carol')", ["UPDATE users SET email = ? WHERE name = ?", "c@x", "Carol"]]}))
        .await;
    assert_eq!((st, r), (StatusCode::OK, json!({"success": true})));

    let resp = s
        .http
        .get(format!(
            "{}/v1/database/schema?database=users",
            s.proxy().url()
        ))
        .header("X-API-Key", &s.key)
        .send()
        .await
        .unwrap();
    let schema: Value = resp.json().await.unwrap();
    assert_eq!(
        schema,
        json!({"tables": [{"name": "users", "columns": ["id", "name", "email"]}]})
    );

    s.gateway(
        "create-table",
        json!({"database": "users", "schema": "CREATE TABLE old_table (x)"}),
    )
    .await;
    let (st, r) = s
        .gateway(
            "drop-table",
            json!({"database": "users", "table_name": "old_table"}),
        )
        .await;
    assert_eq!((st, r), (StatusCode::OK, json!({"rows_affected": 0})));
    let (st, _) = s
        .gateway(
            "drop-table",
            json!({"database": "users", "table_name": "x; DROP TABLE users"}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = s
        .gateway(
            "create-table",
            json!({"database": "users", "schema": "DROP TABLE users"}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    s.gateway(
        "exec",
        json!({"database": "orders", "sql": "CREATE TABLE o (x)"}),
    )
    .await;
    let resp = s
        .http
        .get(format!("{}/v1/database/list", s.proxy().url()))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"databases": ["orders", "users"]})
    );

    // A query cannot write; a bad statement is the client's error.
    let (st, r) = s
        .gateway(
            "query",
            json!({"database": "users", "sql": "DELETE FROM users"}),
        )
        .await;
    assert_eq!(
        (st, r["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("sql_error"))
    );
    let (_, r) = s
        .gateway(
            "query",
            json!({"database": "users", "sql": "SELECT count(*) AS n FROM users"}),
        )
        .await;
    assert_eq!(r["items"][0]["n"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_rqlite_clients_work_through_every_kind_of_routing() {
    let s = Stack::builder()
        .proxy(|p| p.static_listener(APP, "sidecar"))
        .start()
        .await;
    let port = s.proxy().http_addr().port();
    let key = &s.key;

    // pyrqlite, routed by its basic-auth user <db>.<app>.
    let script = format!(
        "from pyrqlite import dbapi2\n\
         c = dbapi2.connect(host='127.0.0.1', port={port}, user='py.{APP}', password='{key}')\n\
         cur = c.cursor()\n\
         cur.execute('CREATE TABLE foo (id INTEGER PRIMARY KEY, name TEXT)')\n\
         cur.execute('INSERT INTO foo(name) VALUES(?)', ('from python',))\n\
         cur.execute('SELECT name FROM foo')\n\
         print(cur.fetchall())\n"
    );
    assert!(run_ok(Command::new("python3").args(["-c", &script])).contains("[('from python',)]"));

    // rqlite-js, routed by the path prefix.
    let script = format!(
        "const {{ DataApiClient }} = require('rqlite-js');\n\
         (async () => {{\n\
           const c = new DataApiClient('http://127.0.0.1:{port}/{APP}/js', {{ authentication: {{ username: 'js', password: '{key}' }} }});\n\
           for (const sql of ['CREATE TABLE foo (name TEXT)', 'INSERT INTO foo VALUES (\"from node\")']) {{\n\
             const r = await c.execute(sql); if (r.hasError()) throw r.getFirstError();\n\
           }}\n\
           const q = await c.query('SELECT name FROM foo');\n\
           console.log(JSON.stringify(q.toArray()));\n\
         }})().catch(e => {{ console.error(e); process.exit(1); }});\n"
    );
    let deps = std::env::var("ROUSE_DEPS_DIR").unwrap_or_else(|_| "/opt/rouse-deps".into());
    let out = run_ok(
        Command::new("node")
            .args(["-e", &script])
            .env("NODE_PATH", format!("{deps}/node_modules")),
    );
    assert!(out.contains(r#"[{"name":"from node"}]"#), "{out}");

    // The rqlite shell, which knows only host:port: a static listener.
    let mut shell = Command::new("rqlite");
    shell
        .args([
            "-H",
            "127.0.0.1",
            "-p",
            &s.proxy().static_addr(0).port().to_string(),
            "-u",
            &format!("me:{key}"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = shell.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"CREATE TABLE foo (name TEXT);\nINSERT INTO foo VALUES ('from the shell');\nSELECT name FROM foo;\n.exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("from the shell"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // curl, routed by Host <db>.<app>.<base_domain>.
    let host = format!("web.{APP}.localhost");
    let base = format!("http://{host}:{port}");
    let auth = format!("Authorization: Bearer {key}");
    let resolve = format!("{host}:{port}:127.0.0.1");
    let curl = |path: &str, body: &str| {
        run_ok(Command::new("curl").args([
            "-sS",
            "--fail-with-body",
            "--resolve",
            &resolve,
            "-H",
            &auth,
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            &format!("{base}{path}"),
        ]))
    };
    curl(
        "/db/execute",
        r#"["CREATE TABLE foo (name TEXT)", "INSERT INTO foo VALUES ('from curl')"]"#,
    );
    assert!(curl("/db/query?level=strong", r#"["SELECT name FROM foo"]"#).contains("from curl"));

    // Each client reached its own database of the app.
    let dbs: Vec<String> = s
        .control
        .client()
        .list_databases(Some(&name(APP)))
        .await
        .unwrap()
        .databases
        .iter()
        .map(|d| d.name.to_string())
        .collect();
    assert_eq!(dbs, vec!["js", "py", "sidecar", "web"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_requests_wake_a_hibernated_database_once() {
    let s = Stack::builder().start().await;
    s.gateway(
        "exec",
        json!({"database": "herd", "sql": "CREATE TABLE t (x)"}),
    )
    .await;
    s.gateway(
        "exec",
        json!({"database": "herd", "sql": "INSERT INTO t VALUES (42)"}),
    )
    .await;
    s.control
        .client()
        .hibernate(&name(APP), &name("herd"), true)
        .await
        .unwrap();
    let starts = r#"rouse_wake_duration_seconds_count{engine="rqlite",phase="start"}"#;
    let before = s.control_metric(starts).await;

    let requests = (0..500).map(|_| s.rqlite("herd", "/db/query", json!(["SELECT x FROM t"])));
    let results = futures::future::join_all(requests).await;
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["results"][0]["values"], json!([[42]]));
    }
    assert_eq!(
        s.control_metric(starts).await - before,
        1.0,
        "one wake for 500 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_the_loss_of_the_leader_without_a_visible_redirect() {
    let s = Stack::builder().start().await;
    let client = s.control.client();
    client
        .create_database(&CreateDatabase {
            app: name(APP),
            name: name("ha"),
            engine: Engine::Rqlite,
            replication_factor: Some(3),
            patroni: None,
        })
        .await
        .unwrap();
    let (st, _) = s
        .rqlite("ha", "/db/execute", json!(["CREATE TABLE t (n INTEGER)"]))
        .await;
    assert_eq!(st, StatusCode::OK);
    let info = client.database(&name(APP), &name("ha")).await.unwrap();
    let leader = &info.endpoints[0];
    let dir = s.control.data_dir().join(format!("{APP}_ha"));
    let leader_pid = pids_mentioning(&format!("-http-addr {}:{}", leader.host, leader.port));
    assert_eq!(leader_pid.len(), 1, "{}", dir.display());
    unsafe { libc::kill(leader_pid[0] as i32, libc::SIGKILL) };

    // `redirect` asks followers for a 301 instead of forwarding: the proxy
    // must follow it itself.
    let mut ok = 0;
    let mut failures = Vec::new();
    for n in 0..50 {
        let (st, body) = s
            .rqlite(
                "ha",
                "/db/execute?redirect",
                json!([["INSERT INTO t VALUES (?)", n]]),
            )
            .await;
        assert_ne!(
            st.as_u16() / 100,
            3,
            "a redirect reached the client: {body}"
        );
        if st == StatusCode::OK && body["results"][0]["error"].is_null() {
            ok += 1;
        } else {
            failures.push(format!("write {n}: {st} {body}"));
        }
    }
    assert_eq!(
        ok, 50,
        "every write succeeds once a new leader is elected: {failures:?}"
    );
    let (_, r) = s
        .rqlite(
            "ha",
            "/db/query?level=strong",
            json!(["SELECT count(*) FROM t"]),
        )
        .await;
    assert_eq!(r["results"][0]["values"][0][0], ok);
}

fn jwt_hs256(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_app_never_reaches_another_apps_databases() {
    const SECRET: &str = "isolation-secret";
    let s = Stack::builder()
        .proxy(|p| {
            p.auth("jwt_hs256_secret", SECRET)
                .static_listener("rival", "vault")
        })
        .start()
        .await;
    let client = s.control.client();
    client.create_app(&name("rival")).await.unwrap();
    let rival_key = client.create_key(&name("rival")).await.unwrap().key;
    // The rival's data, and one database of the rival left hibernated.
    for db in ["vault", "sleeper"] {
        client
            .create_database(&CreateDatabase {
                app: name("rival"),
                name: name(db),
                engine: Engine::Rqlite,
                replication_factor: Some(1),
                patroni: None,
            })
            .await
            .unwrap();
        let info = client.database(&name("rival"), &name(db)).await.unwrap();
        let e = rouse_tests::engine_url(&info, &info.endpoints[0]);
        rouse_tests::rqlite_execute(&e, "CREATE TABLE secrets (s TEXT)")
            .await
            .unwrap();
        rouse_tests::rqlite_execute(&e, "INSERT INTO secrets VALUES ('rival data')")
            .await
            .unwrap();
    }
    client
        .hibernate(&name("rival"), &name("sleeper"), true)
        .await
        .unwrap();

    let token = jwt_hs256(SECRET, json!({"namespace": APP, "exp": now() + 600}));
    let port = s.proxy().http_addr().port();
    let basic = |user: &str| {
        format!(
            "Basic {}",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{user}:{}", s.key)
            )
        )
    };
    // (credential header name, value) of app `shop`.
    let credentials: Vec<(&str, String)> = vec![
        ("authorization", format!("Bearer {}", s.key)),
        ("authorization", format!("ApiKey {}", s.key)),
        ("x-api-key", s.key.clone()),
        ("authorization", basic("whoever")),
        ("authorization", format!("Bearer {token}")),
    ];
    let endpoints = [
        (
            "POST",
            "/db/execute",
            r#"["INSERT INTO secrets VALUES ('pwned')"]"#,
        ),
        ("POST", "/db/query", r#"["SELECT * FROM secrets"]"#),
        ("POST", "/db/request", r#"["SELECT * FROM secrets"]"#),
        ("GET", "/status", ""),
        ("GET", "/nodes", ""),
        ("GET", "/readyz", ""),
    ];
    let mut checked = 0;
    for target in ["vault", "sleeper", "missing"] {
        for (header, value) in &credentials {
            for (method, path, body) in endpoints {
                // Path prefix, Host, basic-auth user and the rival's static listener.
                let routes: Vec<(String, Option<String>, Option<String>)> = vec![
                    (
                        format!("http://127.0.0.1:{port}/rival/{target}{path}"),
                        None,
                        None,
                    ),
                    (
                        format!("http://127.0.0.1:{port}{path}"),
                        Some(format!("{target}.rival.localhost")),
                        None,
                    ),
                    (
                        format!("http://127.0.0.1:{port}{path}"),
                        None,
                        Some(basic(&format!("{target}.rival"))),
                    ),
                    (
                        format!("http://{}{path}", s.proxy().static_addr(0)),
                        None,
                        None,
                    ),
                ];
                for (url, host, basic_user) in routes {
                    let mut req = s
                        .http
                        .request(method.parse().unwrap(), &url)
                        .header("content-type", "application/json")
                        .body(body.to_string());
                    req = match &basic_user {
                        Some(b) => req.header("authorization", b),
                        None => req.header(*header, value),
                    };
                    if let Some(h) = &host {
                        req = req.header("host", h);
                    }
                    let resp = req.send().await.unwrap();
                    let status = resp.status();
                    let text = resp.text().await.unwrap();
                    assert_eq!(
                        status,
                        StatusCode::NOT_FOUND,
                        "{method} {url} host={host:?}: {text}"
                    );
                    assert!(
                        !text.contains("rival data") && !text.contains("secrets"),
                        "{text}"
                    );
                    assert_eq!(
                        serde_json::from_str::<Value>(&text).unwrap()["code"],
                        "not_found"
                    );
                    checked += 1;
                }
            }
        }
    }
    // The gateway names databases inside the caller's own app only.
    let (st, r) = s
        .gateway(
            "query",
            json!({"database": "vault", "sql": "SELECT * FROM secrets"}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{r}");
    assert!(r["error"].as_str().unwrap().contains("no such table"));
    let resp = s
        .http
        .get(format!("{}/v1/database/list", s.proxy().url()))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    let listed = resp.text().await.unwrap();
    assert_eq!(
        listed, r#"{"databases":["vault"]}"#,
        "only the caller's own (just created) database"
    );

    // Nothing of the rival was written, woken or created.
    let rival = client
        .list_databases(Some(&name("rival")))
        .await
        .unwrap()
        .databases;
    assert_eq!(rival.len(), 2);
    let sleeper = rival.iter().find(|d| d.name.as_str() == "sleeper").unwrap();
    assert_eq!(
        sleeper.status,
        DatabaseStatus::Hibernating,
        "woken by another app"
    );
    let vault = rival.iter().find(|d| d.name.as_str() == "vault").unwrap();
    let e = rouse_tests::engine_url(vault, &vault.endpoints[0]);
    assert_eq!(
        rouse_tests::rqlite_query(&e, "SELECT count(*) FROM secrets")
            .await
            .unwrap(),
        vec![vec![json!(1)]]
    );
    // The rival's own key still works where ours did not.
    let resp = s
        .http
        .post(format!("http://{}/db/query", s.proxy().static_addr(0)))
        .header("x-api-key", rival_key)
        .json(&json!(["SELECT s FROM secrets"]))
        .send()
        .await
        .unwrap();
    assert!(resp.text().await.unwrap().contains("rival data"));
    assert_eq!(checked, 3 * 5 * 6 * 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_harms_nothing_else() {
    const SECRET: &str = "bad-input-secret";
    let s = Stack::builder()
        .proxy(|p| {
            p.auth("jwt_hs256_secret", SECRET)
                .set("max_body_bytes", "65536")
                .set("header_read_timeout", "1s")
                .set("body_read_timeout", "1s")
        })
        .start()
        .await;
    let url = s.proxy().url();
    s.gateway(
        "exec",
        json!({"database": "main", "sql": "CREATE TABLE t (x)"}),
    )
    .await;

    // Missing and bad credentials: 401 with WWW-Authenticate.
    for auth in [
        None,
        Some("Bearer ak_nope"),
        Some("Basic Zm9v"),
        Some("Digest abc"),
    ] {
        let mut req = s
            .http
            .post(format!("{url}/{APP}/main/db/query"))
            .json(&json!(["SELECT 1"]));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert!(resp.headers().contains_key("www-authenticate"));
    }
    // Expired, not yet valid, forged and app-less tokens.
    for token in [
        jwt_hs256(SECRET, json!({"namespace": APP, "exp": now() - 3600})),
        jwt_hs256(
            SECRET,
            json!({"namespace": APP, "exp": now() + 3600, "nbf": now() + 3600}),
        ),
        jwt_hs256(
            "another-secret",
            json!({"namespace": APP, "exp": now() + 600}),
        ),
        jwt_hs256(SECRET, json!({"exp": now() + 600})),
        jwt_hs256(SECRET, json!({"namespace": "../etc", "exp": now() + 600})),
    ] {
        let resp = s
            .http
            .post(format!("{url}/{APP}/main/db/query"))
            .bearer_auth(&token)
            .json(&json!(["SELECT 1"]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    // Within the 60 s skew, and via the `app` claim: accepted.
    let token = jwt_hs256(SECRET, json!({"app": APP, "exp": now() - 30}));
    let resp = s
        .http
        .post(format!("{url}/{APP}/main/db/query"))
        .bearer_auth(&token)
        .json(&json!(["SELECT 1"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Bodies over the limit, bad JSON, unknown routes, invalid names.
    let big = "x".repeat(100_000);
    let (st, r) = s
        .gateway("exec", json!({"database": "main", "sql": big}))
        .await;
    assert_eq!(
        (st, r["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
    );
    let resp = s
        .http
        .post(format!("{url}/v1/database/exec"))
        .bearer_auth(&s.key)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (st, _) = s
        .gateway(
            "exec",
            json!({"database": "main", "sql": "SELECT 1", "extra": 1}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    for path in [
        "/admin",
        "/v1/database/nothing",
        "/shop/main/secret",
        "/db/query",
    ] {
        let resp = s
            .http
            .get(format!("{url}{path}"))
            .bearer_auth(&s.key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(resp.json::<Value>().await.unwrap()["error"].is_string());
    }
    for db in ["Main", "a_b", "../x", ""] {
        let (st, r) = s
            .gateway("query", json!({"database": db, "sql": "SELECT 1"}))
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{db}: {r}");
    }

    // A client that stalls mid-request is cut off; others are served meanwhile.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut slow = tokio::net::TcpStream::connect(s.proxy().http_addr())
        .await
        .unwrap();
    slow.write_all(b"POST /v1/database/query HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (st, _) = s
        .gateway(
            "query",
            json!({"database": "main", "sql": "SELECT count(*) FROM t"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a stalled client is not kept forever");
    // One that sends its head but stalls in its body gets 408.
    let mut slow = tokio::net::TcpStream::connect(s.proxy().http_addr())
        .await
        .unwrap();
    let head = format!("POST /v1/database/query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 100\r\n\r\n{{", s.key);
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );

    let metrics = s.proxy().metrics().await.unwrap();
    assert!(
        metrics.contains(r#"outcome="auth""#) && metrics.contains(r#"outcome="user""#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_is_bounded_by_time_and_queue_length() {
    let s = Stack::builder()
        .proxy(|p| p.set("wake_timeout", "1ms"))
        .start()
        .await;
    s.create("slow", Engine::Rqlite).await;
    s.control
        .client()
        .hibernate(&name(APP), &name("slow"), true)
        .await
        .unwrap();
    let resp = s
        .http
        .post(format!("{}/{APP}/slow/db/query", s.proxy().url()))
        .bearer_auth(&s.key)
        .json(&json!(["SELECT 1"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "wake_timeout");
    // The wake goes on without the impatient client; the next request is served.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, _) = s.rqlite("slow", "/db/query", json!(["SELECT 1"])).await;
        if st == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "never served after the wake");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let s = Stack::builder()
        .proxy(|p| p.set("max_waiting", "1"))
        .start()
        .await;
    s.create("busy", Engine::Rqlite).await;
    s.control
        .client()
        .hibernate(&name(APP), &name("busy"), true)
        .await
        .unwrap();
    let results = futures::future::join_all(
        (0..20).map(|_| s.rqlite("busy", "/db/query", json!(["SELECT 1"]))),
    )
    .await;
    let full = results
        .iter()
        .filter(|(st, r)| *st == StatusCode::SERVICE_UNAVAILABLE && r["code"] == "wake_queue_full")
        .count();
    let ok = results
        .iter()
        .filter(|(st, _)| *st == StatusCode::OK)
        .count();
    assert!(
        full >= 1 && ok >= 1 && full + ok == 20,
        "full={full} ok={ok}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_keeps_a_database_awake_and_idleness_hibernates_it() {
    let s = Stack::builder()
        .hibernation("3s")
        .proxy(|p| p.set("activity_interval", "200ms"))
        .start()
        .await;
    s.gateway(
        "exec",
        json!({"database": "busy", "sql": "CREATE TABLE t (x)"}),
    )
    .await;
    // Requests every 300 ms for 6 s: twice the idle timeout.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let (st, _) = s
            .gateway(
                "exec",
                json!({"database": "busy", "sql": "INSERT INTO t VALUES (1)"}),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let info = s
            .control
            .client()
            .database(&name(APP), &name("busy"))
            .await
            .unwrap();
        assert_eq!(
            info.status,
            DatabaseStatus::Active,
            "hibernated while in use"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let info = s
            .control
            .client()
            .database(&name(APP), &name("busy"))
            .await
            .unwrap();
        if info.status == DatabaseStatus::Hibernating {
            break;
        }
        assert!(Instant::now() < deadline, "never hibernated when idle");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And the next request wakes it transparently, data intact.
    let (st, r) = s
        .gateway(
            "query",
            json!({"database": "busy", "sql": "SELECT count(*) AS n FROM t"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(r["items"][0]["n"].as_u64().unwrap() >= 5);

    // /status and /nodes name the proxy, not the engine.
    let resp = s
        .http
        .get(format!("{}/{APP}/busy/nodes?ver=2", s.proxy().url()))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    let nodes: Value = resp.json().await.unwrap();
    assert_eq!(
        nodes["nodes"][0]["api_addr"],
        format!("{}/{APP}/busy", s.proxy().url())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_are_checked_against_the_configured_public_key() {
    let keys = tempfile::tempdir().unwrap();
    let private = keys.path().join("private.pem");
    let public = keys.path().join("public.pem");
    let other = keys.path().join("other.pem");
    for (args, what) in [
        (
            vec!["genrsa", "-out", private.to_str().unwrap(), "2048"],
            "key",
        ),
        (
            vec![
                "rsa",
                "-in",
                private.to_str().unwrap(),
                "-pubout",
                "-out",
                public.to_str().unwrap(),
            ],
            "public key",
        ),
        (
            vec!["genrsa", "-out", other.to_str().unwrap(), "2048"],
            "other key",
        ),
    ] {
        let out = Command::new("openssl").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = Stack::builder()
        .proxy(|p| p.auth("jwt_rs256_public_key_file", public.to_str().unwrap()))
        .start()
        .await;
    s.gateway(
        "exec",
        json!({"database": "main", "sql": "CREATE TABLE t (x)"}),
    )
    .await;
    let sign = |key: &std::path::Path| {
        let pem = std::fs::read(key).unwrap();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &json!({"namespace": APP, "exp": now() + 600}),
            &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
        )
        .unwrap()
    };
    for (token, want) in [
        (sign(&private), StatusCode::OK),
        (sign(&other), StatusCode::UNAUTHORIZED),
    ] {
        let resp = s
            .http
            .post(format!("{}/{APP}/main/db/query", s.proxy().url()))
            .bearer_auth(token)
            .json(&json!(["SELECT count(*) FROM t"]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want);
    }
    // The same key published in a JWKS, chosen by the token's `kid`.
    let modulus = run_ok(Command::new("openssl").args([
        "rsa",
        "-in",
        private.to_str().unwrap(),
        "-noout",
        "-modulus",
    ]));
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let n = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes);
    let jwks = keys.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig", "n": n, "e": "AQAB"}]}).to_string()).unwrap();
    let jwks_proxy = Proxy::builder(&s.control)
        .auth("jwt_jwks_file", jwks.to_str().unwrap())
        .start()
        .await
        .unwrap();
    let pem = std::fs::read(&private).unwrap();
    for (kid, want) in [("k1", StatusCode::OK), ("k2", StatusCode::UNAUTHORIZED)] {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(kid.into());
        let token = jsonwebtoken::encode(
            &header,
            &json!({"namespace": APP, "exp": now() + 600}),
            &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
        )
        .unwrap();
        let resp = s
            .http
            .post(format!("{}/{APP}/main/db/query", jwks_proxy.url()))
            .bearer_auth(token)
            .json(&json!(["SELECT count(*) FROM t"]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want, "kid {kid}");
    }

    // An HS256 token is refused when no HS256 secret is configured.
    let resp = s
        .http
        .post(format!("{}/{APP}/main/db/query", s.proxy().url()))
        .bearer_auth(jwt_hs256(
            "guess",
            json!({"namespace": APP, "exp": now() + 600}),
        ))
        .json(&json!(["SELECT 1"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_may_forbid_creating_databases_on_first_access() {
    let s = Stack::builder().start().await;
    let client = s.control.client();
    // By default both HTTP APIs create a database on its first access.
    client.create_app(&name("open")).await.unwrap();
    let key = client.create_key(&name("open")).await.unwrap().key;
    let resp = s
        .http
        .post(format!("{}/v1/database/exec", s.proxy().url()))
        .bearer_auth(&key)
        .json(&json!({"database": "adhoc", "sql": "CREATE TABLE t (x)"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = s
        .http
        .post(format!("{}/open/other/db/query", s.proxy().url()))
        .bearer_auth(&key)
        .json(&json!(["SELECT 1"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let open = client.list_databases(Some(&name("open"))).await.unwrap();
    let mut open: Vec<String> = open.databases.iter().map(|d| d.name.to_string()).collect();
    open.sort();
    assert_eq!(open, ["adhoc", "other"]);

    client
        .create_app_with(&CreateApp {
            name: name("strict"),
            create_on_first_access: false,
        })
        .await
        .unwrap();
    let key = client.create_key(&name("strict")).await.unwrap().key;
    let resp = s
        .http
        .post(format!("{}/v1/database/exec", s.proxy().url()))
        .bearer_auth(&key)
        .json(&json!({"database": "adhoc", "sql": "CREATE TABLE t (x)"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = s
        .http
        .post(format!("{}/strict/adhoc/db/query", s.proxy().url()))
        .bearer_auth(&key)
        .json(&json!(["SELECT 1"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(client
        .list_databases(Some(&name("strict")))
        .await
        .unwrap()
        .databases
        .is_empty());
    // An operator still creates them, and then they are served.
    client
        .create_database(&CreateDatabase {
            app: name("strict"),
            name: name("adhoc"),
            engine: Engine::Rqlite,
            replication_factor: Some(1),
            patroni: None,
        })
        .await
        .unwrap();
    let resp = s
        .http
        .post(format!("{}/strict/adhoc/db/query", s.proxy().url()))
        .bearer_auth(&key)
        .json(&json!(["SELECT 1"]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}
