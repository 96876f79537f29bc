//! A hostile tenant: app `shop`, holding its own valid API key and Postgres
//! login, tries to reach app `rival`'s data, the metadata and the host
//! through every route the proxy offers. Each attempt is refused and
//! `rival`'s data stays as it was. Each defence layer is also tried alone:
//! the engine sandbox with the proxy bypassed, and the proxy's statement
//! filter with the sandbox off.

use std::path::{Path, PathBuf};

use reqwest::{RequestBuilder, StatusCode};
use rouse_control_api::*;
use rouse_tests::{name, Control, Proxy, Stack};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Two apps with a key each; `rival` keeps a secret in its database `vault`.
struct Tenants {
    control: Control,
    proxy: Proxy,
    shop_key: String,
    rival_key: String,
    http: reqwest::Client,
}

impl Tenants {
    async fn start(control: rouse_tests::ControlBuilder) -> Tenants {
        Tenants::start_with(control, |p| p).await
    }

    /// As [`Tenants::start`], with more proxy configuration.
    async fn start_with(
        control: rouse_tests::ControlBuilder,
        proxy: impl FnOnce(rouse_tests::ProxyBuilder) -> rouse_tests::ProxyBuilder,
    ) -> Tenants {
        let control = control.hibernation_timeout("0").start().await.unwrap();
        let client = control.client();
        let mut keys = Vec::new();
        for app in ["shop", "rival"] {
            client.create_app(&name(app)).await.unwrap();
            keys.push(client.create_key(&name(app)).await.unwrap().key);
        }
        let proxy = proxy(Proxy::builder(&control).static_listener("shop", "main"))
            .start()
            .await
            .unwrap();
        let t = Tenants {
            control,
            proxy,
            shop_key: keys[0].clone(),
            rival_key: keys[1].clone(),
            http: reqwest::Client::new(),
        };
        for (key, db, sql) in [
            (&t.rival_key, "vault", "CREATE TABLE jewels (name TEXT)"),
            (&t.rival_key, "vault", "INSERT INTO jewels VALUES ('crown')"),
            (&t.shop_key, "main", "CREATE TABLE t (x)"),
        ] {
            let (status, body) = t
                .send(t.gateway("exec", key), json!({"database": db, "sql": sql}))
                .await;
            assert_eq!(status, StatusCode::OK, "{sql}: {body}");
        }
        t
    }

    fn gateway(&self, op: &str, key: &str) -> RequestBuilder {
        self.http
            .post(format!("{}/v1/database/{op}", self.proxy.url()))
            .bearer_auth(key)
    }

    async fn send(&self, req: RequestBuilder, body: Value) -> (StatusCode, Value) {
        let resp = req.json(&body).send().await.unwrap();
        (resp.status(), resp.json().await.unwrap_or(Value::Null))
    }

    /// The file that holds `app`'s database `db`.
    fn file_of(&self, app: &str, db: &str) -> PathBuf {
        let path = self
            .control
            .data_dir()
            .join(format!("{app}_{db}/rqlite/node-0/db.sqlite"));
        assert!(
            path.exists(),
            "{} is not where the test expects",
            path.display()
        );
        path
    }

    async fn rival_jewels(&self) -> Value {
        let (status, body) = self
            .send(
                self.gateway("query", &self.rival_key),
                json!({"database": "vault", "sql": "SELECT name FROM jewels"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Every way `shop` can hand SQL to the proxy.
    fn routes(&self, sql: &str) -> Vec<(String, RequestBuilder, Option<Value>)> {
        let url = self.proxy.url();
        let key = &self.shop_key;
        let api_key = format!("ApiKey {key}");
        let q: String = form_urlencoded::byte_serialize(sql.as_bytes()).collect();
        let stmt = json!([sql]);
        vec![
            (
                "path prefix, execute".into(),
                self.http
                    .post(format!("{url}/shop/main/db/execute"))
                    .header("Authorization", &api_key),
                Some(stmt.clone()),
            ),
            (
                "path prefix, queued".into(),
                self.http
                    .post(format!("{url}/shop/main/db/execute?queue"))
                    .header("X-API-Key", key),
                Some(json!([[sql]])),
            ),
            (
                "path prefix, GET query".into(),
                self.http
                    .get(format!("{url}/shop/main/db/query?q={q}&level=weak"))
                    .header("Authorization", &api_key),
                None,
            ),
            (
                "Host, request".into(),
                self.http
                    .post(format!("{url}/db/request"))
                    .header("Host", "main.shop.localhost")
                    .bearer_auth(key),
                Some(stmt.clone()),
            ),
            (
                "basic auth, query".into(),
                self.http
                    .post(format!("{url}/db/query"))
                    .basic_auth("main.shop", Some(key)),
                Some(stmt.clone()),
            ),
            (
                "static listener".into(),
                self.http
                    .post(format!(
                        "http://{}/db/execute?transaction",
                        self.proxy.static_addr(0)
                    ))
                    .bearer_auth(key),
                Some(stmt.clone()),
            ),
            (
                "gateway exec".into(),
                self.gateway("exec", key),
                Some(json!({"database": "main", "sql": sql})),
            ),
            (
                "gateway query".into(),
                self.gateway("query", key),
                Some(json!({"database": "main", "sql": sql})),
            ),
            (
                "gateway transaction".into(),
                self.gateway("transaction", key),
                Some(
                    json!({"database": "main", "queries": ["INSERT INTO t VALUES (1)", {"sql": sql}]}),
                ),
            ),
            (
                "gateway create-table".into(),
                self.gateway("create-table", key),
                Some(json!({"database": "main", "schema": format!("CREATE TABLE u (x); {sql}")})),
            ),
        ]
    }
}

fn with_body(req: RequestBuilder, body: Option<Value>) -> RequestBuilder {
    match body {
        Some(body) => req.json(&body),
        None => req,
    }
}

fn attacks(victim: &Path) -> Vec<String> {
    let victim = victim.display();
    let beside = victim.to_string().replace("db.sqlite", "copy.db");
    vec![
        format!("ATTACH DATABASE '{victim}' AS v"),
        format!("SELECT 1; /* hi */ aTTach\n'{victim}' AS v"),
        format!("VACUUM INTO '{beside}'"),
        "SELECT load_extension('/tmp/evil.so')".into(),
        "SELECT \"load_extension\"('/tmp/evil.so')".into(),
        "PRAGMA database_list".into(),
        "SELECT file FROM pragma_database_list".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_naming_files_is_refused_on_every_route_and_the_other_app_keeps_its_data() {
    let t = Tenants::start(Control::builder()).await;
    let victim = t.file_of("rival", "vault");
    let before = t.rival_jewels().await;
    assert_eq!(before["items"], json!([{"name": "crown"}]));
    for sql in attacks(&victim) {
        for (route, req, body) in t.routes(&sql) {
            let resp = with_body(req, body).send().await.unwrap();
            let status = resp.status();
            let answer: Value = resp.json().await.unwrap_or(Value::Null);
            assert_eq!(
                (status, answer["code"].as_str()),
                (StatusCode::BAD_REQUEST, Some("forbidden_statement")),
                "{route}: {sql}: {answer}"
            );
        }
    }
    assert_eq!(t.rival_jewels().await, before);
    assert!(!victim.with_file_name("copy.db").exists());
    // Ordinary SQL still goes through every route.
    for (route, req, body) in t.routes("INSERT INTO t VALUES ('attach')") {
        let req = with_body(req, body);
        let status = req.send().await.unwrap().status();
        assert!(
            status.is_success() || status == StatusCode::BAD_REQUEST && route.contains("query"),
            "{route}: {status}"
        );
    }

    // /status and /nodes tell the client the version, the leader and the
    // proxy's own address: no path, executable, OS or Raft address.
    let data_dir = t.control.data_dir().display().to_string();
    for path in ["status", "nodes", "nodes?ver=2", "readyz"] {
        let resp = t
            .http
            .get(format!("{}/shop/main/{path}", t.proxy.url()))
            .bearer_auth(&t.shop_key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let text = resp.text().await.unwrap();
        for leak in [
            data_dir.as_str(),
            "rqlited",
            "executable",
            "hostname",
            "raft",
            "go_version",
        ] {
            assert!(!text.contains(leak), "/{path} shows {leak:?}: {text}");
        }
        if path == "status" {
            let doc: Value = serde_json::from_str(&text).unwrap();
            assert!(
                doc["build"]["version"]
                    .as_str()
                    .is_some_and(|v| !v.is_empty()),
                "{doc}"
            );
            assert_eq!(doc["store"]["leader"]["node_id"], "node-0");
        }
    }
}

/// Posts statements to an rqlited directly, as a process on the host
/// could, with the engine's own login (which only control and the proxies
/// hold): the filter is out of the way.
async fn rqlited_execute(engine: &str, statements: Value) -> Value {
    reqwest::Client::new()
        .post(format!("{engine}/db/execute"))
        .json(&statements)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The logged-in base URL of `app`'s database `db`, and the same without a login.
async fn engine(control: &Control, app: &str, db: &str) -> (String, String) {
    let info = control
        .client()
        .database(&name(app), &name(db))
        .await
        .unwrap();
    let e = info
        .endpoints
        .first()
        .expect("a running database has an endpoint");
    (
        rouse_tests::engine_url(&info, e),
        format!("http://{}:{}", e.host, e.port),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_sandbox_alone_keeps_a_database_from_another_databases_file() {
    let t = Tenants::start(Control::builder()).await;
    let victim = t.file_of("rival", "vault");
    let copy = victim.with_file_name("copy.db");
    let (shop, _) = engine(&t.control, "shop", "main").await;
    let r = rqlited_execute(
        &shop,
        json!([format!("ATTACH DATABASE '{}' AS v", victim.display())]),
    )
    .await;
    assert!(
        r["results"][0]["error"].is_string(),
        "ATTACH of another database's file passed the sandbox: {r}"
    );
    let r = rqlited_execute(&shop, json!([format!("VACUUM INTO '{}'", copy.display())])).await;
    assert!(
        r["results"][0]["error"].is_string(),
        "VACUUM INTO beside another database passed the sandbox: {r}"
    );
    assert!(!copy.exists());
    // Its own directory stays usable.
    let own = t.file_of("shop", "main").with_file_name("own-copy.db");
    let r = rqlited_execute(&shop, json!([format!("VACUUM INTO '{}'", own.display())])).await;
    assert!(r["results"][0]["error"].is_null(), "{r}");
    assert_eq!(t.rival_jewels().await["items"], json!([{"name": "crown"}]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_filter_alone_refuses_what_an_unconfined_engine_would_run() {
    let control = Control::builder().env("ROUSE_CONTROL__SANDBOX", "false");
    let t = Tenants::start(control).await;
    let victim = t.file_of("rival", "vault");
    let attach = format!("ATTACH DATABASE '{}' AS v", victim.display());
    // Without the sandbox the engine itself would hand over the other app's data...
    let (shop, _) = engine(&t.control, "shop", "main").await;
    let r = rqlited_execute(&shop, json!([attach.clone()])).await;
    assert!(
        r["results"][0]["error"].is_null(),
        "the unconfined engine refused: {r}"
    );
    rqlited_execute(&shop, json!(["DETACH v"])).await;
    // ...and the proxy alone refuses it on every route.
    for (route, req, body) in t.routes(&attach) {
        let req = with_body(req, body);
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{route}");
    }
    assert_eq!(t.rival_jewels().await["items"], json!([{"name": "crown"}]));
}

async fn read_message(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    let tag = s.read_u8().await.unwrap();
    let len = s.read_i32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.unwrap();
    (tag, body)
}

/// The salt a proxy shows in its first SCRAM message for `user`, or the
/// FATAL message when it answers with an error instead.
async fn scram_salt(addr: std::net::SocketAddr, user: &str) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut startup = Vec::new();
    startup.extend_from_slice(&196608i32.to_be_bytes());
    for part in ["user", user, "database", "main", ""] {
        startup.extend_from_slice(part.as_bytes());
        startup.push(0);
    }
    let mut packet = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend(startup);
    s.write_all(&packet).await.unwrap();
    let (tag, body) = read_message(&mut s).await;
    if tag == b'E' {
        return Err(String::from_utf8_lossy(&body).into_owned());
    }
    assert_eq!((tag, &body[..4]), (b'R', &10i32.to_be_bytes()[..]));
    let first = b"n,,n=,r=rouse-test-nonce";
    let mut msg = b"SCRAM-SHA-256\0".to_vec();
    msg.extend_from_slice(&(first.len() as i32).to_be_bytes());
    msg.extend_from_slice(first);
    let mut packet = vec![b'p'];
    packet.extend_from_slice(&((msg.len() + 4) as i32).to_be_bytes());
    packet.extend(msg);
    s.write_all(&packet).await.unwrap();
    let (tag, body) = read_message(&mut s).await;
    assert_eq!(tag, b'R');
    let server_first = String::from_utf8_lossy(&body[4..]).into_owned();
    Ok(server_first
        .split(',')
        .find_map(|f| f.strip_prefix("s="))
        .expect("server-first has a salt")
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_names_from_the_wire_never_reach_control_unchecked() {
    let mut s = Stack::builder().start().await;
    let addr = s.proxy().postgres_addr();
    // A known role, an unknown one and names that are no role at all each
    // show one salt, the same every time: nothing tells them apart.
    for user in [
        "alice.shop",
        "ghost.shop",
        "../../databases.shop",
        "a/../../apps.shop",
        "x%2F..%2F.shop",
    ] {
        let first = scram_salt(addr, user).await.unwrap();
        assert_eq!(scram_salt(addr, user).await.unwrap(), first, "{user}");
    }
    assert_ne!(
        scram_salt(addr, "ghost.shop").await.unwrap(),
        scram_salt(addr, "phantom.shop").await.unwrap()
    );
    // With control gone, a client hears that the database is unavailable,
    // not what control or the network said.
    s.control.stop().await.unwrap();
    let err = tokio_postgres::connect(
        &format!("postgres://newcomer.shop:pw@{addr}/main?sslmode=disable"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .unwrap();
    let db_error = err
        .as_db_error()
        .expect("a Postgres error, not a dropped connection");
    assert_eq!(db_error.message(), "the database is unavailable, try again");
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Whoever can write to the Redis the proxies share (in the State Pillar,
/// the apps' own Redis) tries to make a proxy act on forged entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_forged_in_the_shared_redis_grant_nothing() {
    let redis = rouse_tests::Redis::start().await.unwrap();
    let url = format!("redis://{}", redis.addr());
    let t = Tenants::start_with(Control::builder(), |p| {
        p.redis_url(&url, &[]).set("wake_timeout", "5s")
    })
    .await;
    let (proxy, client) = (&t.proxy, t.control.client());
    let keys = [t.shop_key.clone(), t.rival_key.clone()];
    let mut r = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let query = |token: String| {
        http.post(format!("{}/v1/database/query", proxy.url()))
            .bearer_auth(token)
            .json(&json!({"database": "vault", "sql": "SELECT 1"}))
            .send()
    };
    // The rival's own key works (the shop's worked on its own app at the start).
    assert_eq!(
        query(keys[1].clone()).await.unwrap().status(),
        StatusCode::OK
    );
    let shop_session: Vec<u8> = redis::cmd("GET")
        .arg(format!("rouse:sess:{}", sha256_hex(&keys[0])))
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(
        !shop_session.is_empty(),
        "the shop's session is not in Redis"
    );
    // A session written by hand, and the shop's genuine session copied
    // under another token: neither makes that token anyone.
    let forged = "ak_forgedforgedforgedforgedforged";
    let copied = "ak_copiedcopiedcopiedcopiedcopied";
    let _: () = redis::cmd("SET")
        .arg(format!("rouse:sess:{}", sha256_hex(forged)))
        .arg(r#"{"app":"rival","key_id":null,"exp":null}"#)
        .query_async(&mut r)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("rouse:sess:{}", sha256_hex(copied)))
        .arg(shop_session)
        .query_async(&mut r)
        .await
        .unwrap();
    for token in [forged, copied] {
        let resp = query(token.to_string()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{token}");
    }
    let metrics = proxy.metrics().await.unwrap();
    assert!(
        metrics.contains(r#"rouse_redis_tampered_total{what="session"} 2"#),
        "tampering not counted: {metrics}"
    );

    // A forged cancel owner would have the proxy send bytes anywhere.
    let bait = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("rouse:cancel:11:22")
        .arg(bait.local_addr().unwrap().to_string())
        .query_async(&mut r)
        .await
        .unwrap();
    let mut cancel = tokio::net::TcpStream::connect(proxy.postgres_addr())
        .await
        .unwrap();
    let mut request = 16i32.to_be_bytes().to_vec();
    request.extend_from_slice(&80877102i32.to_be_bytes());
    request.extend_from_slice(&11i32.to_be_bytes());
    request.extend_from_slice(&22i32.to_be_bytes());
    cancel.write_all(&request).await.unwrap();
    let reached = tokio::time::timeout(std::time::Duration::from_secs(1), bait.accept()).await;
    assert!(reached.is_err(), "the proxy followed a forged cancel owner");

    // A wake lock nobody of the fleet holds does not stop a wake.
    client
        .hibernate(&name("rival"), &name("vault"), true)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("rouse:wake:rival_vault")
        .arg("someone")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut r)
        .await
        .unwrap();
    let resp = query(keys[1].clone()).await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        resp.text().await.unwrap()
    );
}

/// Guessing keys and passwords, and holding connections open without
/// logging in, cost the guesser's own address and nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessers_and_silent_clients_wait_while_everyone_else_is_served() {
    let s = Stack::builder()
        .proxy(|p| {
            p.set("failed_login_limit", "5")
                .set("max_pending_logins", "3")
                .set("header_read_timeout", "2s")
        })
        .start()
        .await;
    let (proxy, key) = (s.proxy(), s.key.as_str());
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let (guesser, honest) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));
    let list = |http: &reqwest::Client, key: &str| {
        http.get(format!("{}/v1/database/list", proxy.url()))
            .bearer_auth(key.to_string())
            .send()
    };
    let validations = || async {
        let metrics = proxy.metrics().await.unwrap();
        metrics
            .lines()
            .find(|l| l.starts_with(r#"rouse_auth_validations_total{source="control"}"#))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // The same wrong key, asked again, is refused without asking control.
    let wrong = "ak_wrongwrongwrongwrongwrongwrongw";
    let asked = validations().await;
    for _ in 0..3 {
        let resp = list(&guesser, wrong).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(validations().await - asked, 1.0);
    // Past five failures the guesser's address waits, even with a good key...
    for i in 0..2 {
        let resp = list(&guesser, &format!("ak_guess{i:0>26}")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = list(&guesser, key).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "too_many_failed_logins");
    // ...and so do its Postgres logins; another address is served as ever.
    let pg = |host: &str| {
        let url = format!(
            "postgres://alice.shop:wonderland@{}:{}/main?sslmode=disable",
            host,
            proxy.postgres_addr().port()
        );
        async move { tokio_postgres::connect(&url, tokio_postgres::NoTls).await }
    };
    let refused = pg("127.0.0.1")
        .await
        .err()
        .expect("the guesser's login passed");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS)
    );
    assert_eq!(list(&honest, key).await.unwrap().status(), StatusCode::OK);

    // Silent connections hold at most max_pending_logins slots, each only
    // until the login timeout; the next one is told so at once.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(
            tokio::net::TcpStream::connect(proxy.postgres_addr())
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let refused = tokio_postgres::connect(
        &format!(
            "postgres://alice.shop:wonderland@{}/main?sslmode=disable",
            proxy.postgres_addr()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("a fourth login slot was given");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS)
    );
    for mut s in silent {
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest))
                .await;
        assert!(
            closed.is_ok(),
            "a silent client kept its slot past the login timeout"
        );
    }
    let body: Value = list(&honest, key).await.unwrap().json().await.unwrap();
    assert!(body["databases"].is_array(), "{body}");
}

/// The stack with a managed PostgreSQL database `main`.
async fn shop_postgres() -> Stack {
    let s = Stack::builder().start().await;
    s.create("main", Engine::Postgres).await;
    s
}

/// `alice.shop` on database `main` at `addr`.
async fn pg_connect(addr: std::net::SocketAddr) -> tokio_postgres::Client {
    let (pg, conn) = tokio_postgres::connect(
        &format!("postgres://alice.shop:wonderland@{addr}/main?sslmode=disable"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    pg
}

/// A tenant's Postgres login cannot read or write server files or run
/// programs, whatever it asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_tenant_reaches_no_server_file_or_program() {
    let s = shop_postgres().await;
    let proxy = s.proxy();
    let pg = pg_connect(proxy.postgres_addr()).await;
    let superuser: String = pg.query_one("SHOW is_superuser", &[]).await.unwrap().get(0);
    assert_eq!(superuser, "off");
    for sql in [
        "COPY (SELECT 1) TO PROGRAM 'true'",
        "COPY (SELECT 1) TO '/tmp/rouse-tenant-wrote-this'",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT pg_ls_dir('.')",
        "SELECT lo_import('/etc/passwd')",
        "CREATE TEMP TABLE f (x text); COPY f FROM '/etc/passwd'",
    ] {
        let err = pg
            .batch_execute(sql)
            .await
            .err()
            .unwrap_or_else(|| panic!("{sql} passed"));
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
    let roles: Vec<String> = pg
        .query(
            "SELECT b.rolname::text FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid \
             WHERE pg_has_role(current_user, b.oid, 'MEMBER') AND b.rolname IN \
             ('pg_read_server_files', 'pg_write_server_files', 'pg_execute_server_program')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(roles.is_empty(), "{roles:?}");
    assert!(!std::path::Path::new("/tmp/rouse-tenant-wrote-this").exists());
}

/// The read-only port of a managed instance holds whatever a session sends
/// to make itself writable, in session and in transaction pooling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_only_port_cannot_write_whatever_it_sends() {
    let s = shop_postgres().await;
    let (control, proxy) = (&s.control, s.proxy());
    let rw = pg_connect(proxy.postgres_addr()).await;
    rw.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        control
            .client()
            .set_pool_mode(&name("shop"), &name("main"), mode)
            .await
            .unwrap();
        let ro = pg_connect(proxy.postgres_ro_addr()).await;
        let n: i64 = ro
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{mode:?}: the read-only port reads");
        for sql in [
            "INSERT INTO t VALUES (2)",
            "BEGIN READ WRITE; INSERT INTO t VALUES (2); COMMIT",
            "SET default_transaction_read_only = off; INSERT INTO t VALUES (2)",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; UPDATE t SET x = 3",
            "BEGIN; SET TRANSACTION READ WRITE; DELETE FROM t; COMMIT",
            "RESET ALL; BEGIN READ WRITE; CREATE TABLE u (y int); COMMIT",
            "SET ROLE rouse_owner; BEGIN READ WRITE; TRUNCATE t; COMMIT",
        ] {
            assert!(
                ro.batch_execute(sql).await.is_err(),
                "{mode:?}: {sql} passed"
            );
            let _ = ro.batch_execute("ROLLBACK").await;
        }
        let rows: Vec<i32> = rw
            .query("SELECT x FROM t", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(rows, vec![1], "{mode:?}");
    }
}

/// One app at its limits (`apps:`) gets 429/53300 naming the limit, while
/// another app's creates and connections go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_at_its_limits_leaves_the_others_unharmed() {
    let control = Control::builder()
        .env("ROUSE_APPS__OVERRIDES__SHOP__MAX_DATABASES", "2")
        .env("ROUSE_APPS__OVERRIDES__HASTY__CREATES_PER_MINUTE", "1");
    let t = Tenants::start_with(control, |p| {
        p.section("apps:\n  overrides:\n    shop: {max_connections: 2}\n")
    })
    .await;
    // `shop` holds `main` (made at the start); one more, then its limit.
    let exec = |key: &str, db: &str| {
        t.send(
            t.gateway("exec", key),
            json!({"database": db, "sql": "CREATE TABLE IF NOT EXISTS t (x)"}),
        )
    };
    assert_eq!(exec(&t.shop_key, "second").await.0, StatusCode::OK);
    let (status, body) = exec(&t.shop_key, "third").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "app_limit");
    assert!(
        body["error"].as_str().unwrap().contains("max_databases"),
        "{body}"
    );
    // The other app creates on as before.
    for db in ["one", "two", "three"] {
        assert_eq!(exec(&t.rival_key, db).await.0, StatusCode::OK, "{db}");
    }
    // An app limited in create rate: one per minute.
    let client = t.control.client();
    client.create_app(&name("hasty")).await.unwrap();
    let hasty = client.create_key(&name("hasty")).await.unwrap().key;
    assert_eq!(exec(&hasty, "first").await.0, StatusCode::OK);
    let (status, body) = exec(&hasty, "next").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("creates_per_minute"),
        "{body}"
    );

    // PostgreSQL sessions: two for `shop`, the third refused; `rival` connects.
    for (app, user) in [("shop", "alice"), ("rival", "mallory")] {
        client
            .create_user(&name(app), user, "secret")
            .await
            .unwrap();
    }
    for (app, db) in [("shop", "second"), ("rival", "ledger")] {
        client.drop_database(&name(app), &name(db)).await.ok();
        client
            .create_database(&CreateDatabase {
                app: name(app),
                name: name(db),
                engine: Engine::Postgres,
                replication_factor: None,
                patroni: None,
            })
            .await
            .unwrap();
    }
    let connect = |user: &str, db: &str| {
        let url = format!(
            "postgres://{user}:secret@{}/{db}?sslmode=disable",
            t.proxy.postgres_addr()
        );
        async move { tokio_postgres::connect(&url, tokio_postgres::NoTls).await }
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let (c, conn) = connect("alice.shop", "second").await.unwrap();
        tokio::spawn(conn);
        held.push(c);
    }
    let refused = connect("alice.shop", "second")
        .await
        .err()
        .expect("a third session");
    let db_error = refused.as_db_error().expect("a Postgres error");
    assert_eq!(
        db_error.code(),
        &tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS
    );
    assert!(
        db_error.message().contains("max_connections"),
        "{}",
        db_error.message()
    );
    let (rival, conn) = connect("mallory.rival", "ledger").await.unwrap();
    tokio::spawn(conn);
    rival.simple_query("SELECT 1").await.unwrap();
    // A place comes back when a session ends.
    drop(held.pop());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(connect("alice.shop", "second").await.is_ok());
}

/// An engine port answers nobody without the database's own login: not a
/// process on the host, not another app's login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_ports_answer_only_their_own_login() {
    let t = Tenants::start(Control::builder()).await;
    let (vault, bare) = engine(&t.control, "rival", "vault").await;
    let (shop, _) = engine(&t.control, "shop", "main").await;
    let shop_login = shop
        .trim_start_matches("http://")
        .split('@')
        .next()
        .unwrap()
        .to_string();
    let with_shop_login = bare.replacen("http://", &format!("http://{shop_login}@"), 1);
    // The metadata store too: its keys, hashes and secrets.
    let system: Value = serde_json::from_slice(
        &std::fs::read(t.control.data_dir().join("_system/addr.json")).unwrap(),
    )
    .unwrap();
    let system = format!(
        "http://{}:{}",
        system["host"].as_str().unwrap(),
        system["http_port"]
    );
    let system_with_shop_login = system.replacen("http://", &format!("http://{shop_login}@"), 1);
    let http = reqwest::Client::new();
    for base in [&bare, &with_shop_login, &system, &system_with_shop_login] {
        for (method, path) in [
            ("POST", "/db/query"),
            ("POST", "/db/execute"),
            ("GET", "/db/query?q=SELECT+*+FROM+jewels"),
            ("GET", "/status"),
            ("GET", "/nodes"),
            ("GET", "/db/backup"),
        ] {
            let url = format!("{base}{path}");
            let req = match method {
                "POST" => http.post(&url).json(&json!(["SELECT * FROM jewels"])),
                _ => http.get(&url),
            };
            let status = req.send().await.unwrap().status();
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} from {base}"
            );
        }
    }
    // The database's own login works, and its data is there.
    let r: Value = http
        .post(format!("{vault}/db/query"))
        .json(&json!(["SELECT name FROM jewels"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["results"][0]["values"], json!([["crown"]]), "{r}");
}

/// Every proxy of a fleet shows an unknown role the same salt, so asking
/// several proxies tells nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_role_shows_one_salt_at_every_proxy_of_a_fleet() {
    let s = Stack::builder().proxies(2).redis().start().await;
    let salts = |user: &'static str| {
        let addrs: Vec<_> = s.proxies.iter().map(|p| p.postgres_addr()).collect();
        async move {
            let mut out = Vec::new();
            for addr in addrs {
                out.push(scram_salt(addr, user).await.unwrap());
            }
            out
        }
    };
    let ghost = salts("ghost.shop").await;
    assert_eq!(ghost[0], ghost[1]);
    let alice = salts("alice.shop").await;
    assert_eq!(alice[0], alice[1]);
}
