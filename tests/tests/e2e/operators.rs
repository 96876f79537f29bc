//! The operators' plane: the control API refuses anonymous callers, each
//! token role reaches only what it is for, no answer and no `_system` row
//! gives a password away, and the stats page asks for its login.

use std::path::Path;

use reqwest::Method;
use rouse_control_api::*;
use rouse_tests::{name, rqlite_execute, rqlite_query, Control, Proxy};
use serde_json::{json, Value};

fn db(app: &str, db: &str, engine: Engine) -> CreateDatabase {
    CreateDatabase {
        app: name(app),
        name: name(db),
        engine,
        replication_factor: Some(1),
        patroni: None,
    }
}

/// Every route of the control API, as (method, path, body).
const ROUTES: [(&str, &str, &str); 21] = [
    ("POST", "/api/v1/tokens", r#"{"role":"admin"}"#),
    ("GET", "/api/v1/tokens", ""),
    ("DELETE", "/api/v1/tokens/x", ""),
    ("POST", "/api/v1/apps", r#"{"name":"evil"}"#),
    ("POST", "/api/v1/apps/shop/keys", "{}"),
    ("GET", "/api/v1/apps/shop/keys", ""),
    ("DELETE", "/api/v1/apps/shop/keys/x", ""),
    ("POST", "/api/v1/keys/verify", r#"{"key":"ak_x"}"#),
    (
        "POST",
        "/api/v1/apps/shop/users",
        r#"{"name":"eve","password":"x"}"#,
    ),
    ("GET", "/api/v1/apps/shop/users/alice", ""),
    (
        "POST",
        "/api/v1/databases",
        r#"{"app":"shop","name":"x","engine":"rqlite"}"#,
    ),
    ("GET", "/api/v1/databases", ""),
    ("GET", "/api/v1/databases/shop/main", ""),
    ("POST", "/api/v1/databases/shop/main/wake", "{}"),
    (
        "POST",
        "/api/v1/databases/shop/main/hibernate?force=true",
        "{}",
    ),
    ("DELETE", "/api/v1/databases/shop/main", ""),
    (
        "POST",
        "/api/v1/activity",
        r#"{"proxy_id":"p","databases":[]}"#,
    ),
    ("GET", "/api/v1/events", ""),
    ("POST", "/api/v1/cluster/scale", r#"{"target_db_count":1}"#),
    ("GET", "/api/v1/nodes", ""),
    ("GET", "/api/v1/capacity", ""),
];

async fn call(
    control: &Control,
    token: Option<&str>,
    (method, path, body): (&str, &str, &str),
) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .request(
            Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", control.api_url()),
        )
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    // The event stream never ends: its head is enough.
    if path.ends_with("/events") && status == 200 {
        return (status, String::new());
    }
    (status, resp.text().await.unwrap())
}

/// Control with app `shop` (user alice, database `main`) and app `rival`.
async fn two_apps() -> Control {
    let control = Control::builder()
        .hibernation_timeout("0")
        .start()
        .await
        .unwrap();
    let admin = control.client();
    for app in ["shop", "rival"] {
        admin.create_app(&name(app)).await.unwrap();
    }
    admin
        .create_user(&name("shop"), "alice", "wonderland")
        .await
        .unwrap();
    admin
        .create_database(&db("shop", "main", Engine::Rqlite))
        .await
        .unwrap();
    control
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_and_forged_callers_get_401_everywhere_but_health_and_metrics() {
    let control = two_apps().await;
    for route in ROUTES
        .into_iter()
        .chain([("GET", "/api/v1/no/such/route", "")])
    {
        for token in [None, Some("rt_forged"), Some(""), Some("ak_not_a_token")] {
            let (status, body) = call(&control, token, route).await;
            assert_eq!(status, 401, "{route:?} with {token:?}: {body}");
            assert!(body.contains("\"unauthorized\""), "{body}");
        }
    }
    let resp = reqwest::get(format!("{}/api/v1/databases", control.api_url()))
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"rouse-control\""
    );
    for open in ["/healthz", "/metrics"] {
        let resp = reqwest::get(format!("{}{open}", control.api_url()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{open}");
    }
    // Nothing was changed by all that.
    let admin = control.client();
    assert!(
        admin.create_app(&name("evil")).await.is_ok(),
        "no app evil was made before"
    );
    assert_eq!(admin.list_databases(None).await.unwrap().databases.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reaches_only_what_it_is_for() {
    let control = two_apps().await;
    let admin = control.client();
    let proxy = control.proxy_token();
    let shop = admin
        .create_token(&"app:shop".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(shop.role.to_string(), "app:shop");
    let shop = shop.token;

    // (route, allowed for proxy, allowed for app:shop)
    let expect: [(usize, bool, bool); 21] = [
        (0, false, false), // tokens
        (1, false, false),
        (2, false, false),
        (3, false, false), // apps
        (4, false, true),  // keys of shop
        (5, false, true),
        (6, false, true),
        (7, true, false),  // verify keys
        (8, false, true),  // users of shop
        (9, true, false),  // verifiers
        (10, false, true), // create a database (not on first access)
        (11, true, true),  // list: the app token sees its own app
        (12, true, true),
        (13, true, true),   // wake
        (14, false, true),  // hibernate
        (15, false, true),  // drop (tried last below)
        (16, true, false),  // activity
        (17, true, false),  // events
        (18, false, false), // scale
        (19, true, false),  // nodes
        (20, true, false),  // capacity: the whole node, not one app's
    ];
    for (i, proxy_may, app_may) in expect {
        if i == 15 {
            continue;
        }
        for (token, may, who) in [(&proxy, proxy_may, "proxy"), (&shop, app_may, "app:shop")] {
            let (status, body) = call(&control, Some(token), ROUTES[i]).await;
            if may {
                assert!(
                    status != 401 && status != 403,
                    "{who} refused {:?}: {status} {body}",
                    ROUTES[i]
                );
            } else {
                assert_eq!(status, 403, "{who} allowed {:?}: {body}", ROUTES[i]);
                assert!(body.contains("\"forbidden\""), "{body}");
            }
        }
    }

    // The app's token: another app's resources are out of reach...
    let shop_client = Client::new(&control.api_url()).with_token(&shop);
    admin
        .create_database(&db("rival", "vault", Engine::Rqlite))
        .await
        .unwrap();
    for refused in [
        shop_client
            .database(&name("rival"), &name("vault"))
            .await
            .map(|_| ()),
        shop_client
            .wake(&name("rival"), &name("vault"))
            .await
            .map(|_| ()),
        shop_client
            .drop_database(&name("rival"), &name("vault"))
            .await
            .map(|_| ()),
        shop_client.create_key(&name("rival")).await.map(|_| ()),
        shop_client
            .list_databases(Some(&name("rival")))
            .await
            .map(|_| ()),
        shop_client
            .create_database(&db("rival", "x", Engine::Rqlite))
            .await
            .map(|_| ()),
        // Nor may it point control at addresses of its choosing by
        // registering a Patroni cluster, even for its own app.
        shop_client
            .create_database(&CreateDatabase {
                patroni: Some(PatroniRegistration {
                    members: Vec::new(),
                    discovery: Some(PatroniDiscovery {
                        etcd: vec!["http://127.0.0.1:8001".into()],
                        scope: Some("x".into()),
                        namespace: None,
                    }),
                    admin: BackendCredentials {
                        user: "postgres".into(),
                        password: "x".into(),
                    },
                }),
                ..db("shop", "probe", Engine::Patroni)
            })
            .await
            .map(|_| ()),
    ] {
        assert_eq!(refused.unwrap_err().status(), Some(403));
    }
    // ...its listing names its own databases only, and it may drop them.
    let seen = shop_client.list_databases(None).await.unwrap().databases;
    assert!(
        seen.iter().all(|d| d.app.as_str() == "shop") && !seen.is_empty(),
        "{seen:?}"
    );
    let (status, body) = call(&control, Some(&shop), ROUTES[15]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        admin
            .database(&name("rival"), &name("vault"))
            .await
            .unwrap()
            .status,
        DatabaseStatus::Active
    );

    // A proxy creates on a client's first access, nothing else.
    let (status, body) = call(
        &control,
        Some(&proxy),
        (
            "POST",
            "/api/v1/databases?on_first_access=true",
            r#"{"app":"shop","name":"fresh","engine":"rqlite"}"#,
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_made_listed_and_revoked_and_rest_as_hashes() {
    let control = two_apps().await;
    // The founding node wrote the first two, for its own eyes only.
    let dir = control.tokens_dir();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for file in ["admin", "proxy"] {
        let mode = std::fs::metadata(dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let admin = control.client();
    let made = admin.create_token(&Role::Proxy).await.unwrap();
    let listed = admin.list_tokens().await.unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed
        .iter()
        .any(|t| t.id == made.id && t.role == Role::Proxy));
    let listing = serde_json::to_string(&listed).unwrap();
    assert!(!listing.contains(&made.token) && !listing.contains(&control.admin_token()));

    let theirs = Client::new(&control.api_url()).with_token(&made.token);
    assert!(theirs.database(&name("shop"), &name("main")).await.is_ok());
    admin.revoke_token(&made.id).await.unwrap();
    assert_eq!(
        theirs
            .database(&name("shop"), &name("main"))
            .await
            .unwrap_err()
            .status(),
        Some(401)
    );
    assert_eq!(
        admin.revoke_token(&made.id).await.unwrap_err().status(),
        Some(404)
    );
    // A bad role is a clear error.
    let (status, body) = call(
        &control,
        Some(&control.admin_token()),
        ("POST", "/api/v1/tokens", r#"{"role":"root"}"#),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // The command line, with the admin file of its config's data directory.
    let out = rouse_tests::run_ok(
        std::process::Command::new(rouse_tests::control_bin().unwrap())
            .arg("--config")
            .arg(control.config_file())
            .args(["token", "create", "--role", "app:rival"]),
    );
    let cli: TokenCreated = serde_json::from_str(&out).unwrap();
    assert_eq!(cli.role, Role::App(name("rival")));
    // ...and without it (the embedded config's data directory holds no
    // tokens), refused.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(rouse_tests::control_bin().unwrap())
        .args(["--url", &control.api_url(), "token", "list"])
        .current_dir(elsewhere.path())
        .env_remove("ROUSE_TOKEN")
        .env_remove("ROUSE_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unauthorized"),
        "{err}"
    );

    // Only hashes rest in `_system`.
    let system = control.data_dir().join("_system");
    for secret in [
        made.token.as_str(),
        cli.token.as_str(),
        control.admin_token().as_str(),
    ] {
        assert_eq!(files_holding(&system, secret), Vec::<String>::new());
    }
}

/// Files under `dir` whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_and_no_system_row_holds_a_password_in_clear() {
    let control = two_apps().await;
    let admin = control.client();
    admin
        .create_database(&db("shop", "orders", Engine::Postgres))
        .await
        .unwrap();
    let key = admin.create_key(&name("shop")).await.unwrap().key;
    let shop = admin
        .create_token(&"app:shop".parse().unwrap())
        .await
        .unwrap()
        .token;
    let proxy = control.proxy_token();

    // The engines' superuser logins, as only an admin can open them.
    let mut superusers = Vec::new();
    for d in admin.list_databases(None).await.unwrap().databases {
        let login = admin
            .engine_login(&d)
            .expect("an admin gets the engine login");
        superusers.push((d.clone(), login));
    }
    // The proxy gets the rqlite data-plane login only, sealed for it.
    let main = Client::new(&control.api_url())
        .with_token(&proxy)
        .database(&name("shop"), &name("main"))
        .await
        .unwrap();
    let proxy_login = Client::new(&control.api_url())
        .with_token(&proxy)
        .engine_login(&main)
        .expect("the proxy opens its rqlite login");
    assert!(
        admin.engine_login(&main).is_none(),
        "sealed for the proxy alone"
    );
    let orders = Client::new(&control.api_url())
        .with_token(&proxy)
        .database(&name("shop"), &name("orders"))
        .await
        .unwrap();
    // On PostgreSQL, the API login: an app user, never the superuser.
    let api_login = Client::new(&control.api_url())
        .with_token(&proxy)
        .engine_login(&orders)
        .expect("the proxy opens the API login of a PostgreSQL database");
    assert_eq!(api_login.user, rouse_control_api::name::API_USER);
    assert!(superusers
        .iter()
        .all(|(_, l)| l.user != api_login.user && l.password != api_login.password));

    let mut secrets: Vec<String> = superusers.iter().map(|(_, l)| l.password.clone()).collect();
    secrets.extend([
        proxy_login.password.clone(),
        api_login.password.clone(),
        "wonderland".into(),
        key.clone(),
    ]);
    for token in [control.admin_token(), proxy.clone(), shop.clone()] {
        for route in [
            ("GET", "/api/v1/databases", ""),
            ("GET", "/api/v1/databases/shop/main", ""),
            ("GET", "/api/v1/databases/shop/orders", ""),
            ("POST", "/api/v1/databases/shop/main/wake", "{}"),
            ("GET", "/api/v1/apps/shop/users/alice", ""),
            ("GET", "/api/v1/apps/shop/keys", ""),
        ] {
            let (_, body) = call(&control, Some(&token), route).await;
            for secret in &secrets {
                assert!(
                    !body.contains(secret.as_str()),
                    "{route:?} gave a secret away: {body}"
                );
            }
        }
    }
    let system = control.data_dir().join("_system");
    for secret in &secrets {
        assert_eq!(
            files_holding(&system, secret),
            Vec::<String>::new(),
            "a secret in clear in _system"
        );
    }

    // The proxy's login reads and writes, and can do nothing else.
    let (superuser_main, login) = superusers
        .iter()
        .find(|(d, _)| d.name.as_str() == "main")
        .unwrap();
    let e = &superuser_main.endpoints[0];
    let as_proxy = format!(
        "http://{}:{}@{}:{}",
        proxy_login.user, proxy_login.password, e.host, e.port
    );
    rqlite_execute(&as_proxy, "CREATE TABLE t (x)")
        .await
        .unwrap();
    assert_eq!(
        rqlite_query(&as_proxy, "SELECT count(*) FROM t")
            .await
            .unwrap(),
        vec![vec![json!(0)]]
    );
    let http = reqwest::Client::new();
    for (method, path) in [
        ("GET", "/db/backup"),
        ("DELETE", "/remove"),
        ("POST", "/db/load"),
    ] {
        let resp = http
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                format!("http://{}:{}{path}", e.host, e.port),
            )
            .basic_auth(&proxy_login.user, Some(&proxy_login.password))
            .body(r#"{"id":"node-0"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "the proxy's login may {method} {path}");
    }
    let as_admin = format!(
        "http://{}:{}@{}:{}",
        login.user, login.password, e.host, e.port
    );
    assert_eq!(
        reqwest::get(format!("{as_admin}/db/backup"))
            .await
            .unwrap()
            .status(),
        200,
        "control's own login may back up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_page_asks_for_stats_auth_and_metrics_stay_open() {
    let control = two_apps().await;
    let proxy = Proxy::builder(&control)
        .set("stats_auth", "\"ops:s3cret\"")
        .start()
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://{}", proxy.stats_addr());
    for page in ["/", "/stats.json"] {
        let resp = http.get(format!("{base}{page}")).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{page}");
        assert_eq!(
            resp.headers()["www-authenticate"],
            "Basic realm=\"rouse stats\""
        );
        let resp = http
            .get(format!("{base}{page}"))
            .basic_auth("ops", Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{page}");
        let resp = http
            .get(format!("{base}{page}"))
            .basic_auth("ops", Some("s3cret"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{page}");
    }
    let json: Value = http
        .get(format!("{base}/stats.json"))
        .basic_auth("ops", Some("s3cret"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(json["databases"].to_string().contains("\"main\""), "{json}");
    for open in ["/metrics", "/healthz"] {
        assert_eq!(
            http.get(format!("{base}{open}"))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{open}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_speaks_tls_when_given_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let control = Control::builder()
        .api_tls(rouse_tests::TlsFiles::make(dir.path()))
        .start()
        .await
        .unwrap();
    assert!(control.api_url().starts_with("https://"));
    let admin = control.client();
    admin.create_app(&name("shop")).await.unwrap();
    let key = admin.create_key(&name("shop")).await.unwrap().key;

    // In clear, or to a client that does not trust its CA, it says nothing.
    let plain = control.api_url().replace("https://", "http://");
    let answer = reqwest::Client::new()
        .get(format!("{plain}/api/v1/databases"))
        .bearer_auth(control.admin_token())
        .send()
        .await;
    assert!(answer.map_or(true, |r| !r.status().is_success()));
    let stranger = Client::new(&control.api_url()).with_token(control.admin_token());
    let err = stranger.list_databases(None).await.unwrap_err();
    assert!(matches!(err, ClientError::Transport { .. }), "{err}");

    // The proxy (proxy.control_ca_file) and the command line (--ca-file).
    let proxy = Proxy::builder(&control).start().await.unwrap();
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/database/exec", proxy.http_addr()))
        .header("X-API-Key", &key)
        .json(&json!({"database": "notes", "sql": "CREATE TABLE t (x)"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let out = rouse_tests::run_ok(
        std::process::Command::new(rouse_tests::control_bin().unwrap())
            .arg("--config")
            .arg(control.config_file())
            // control.tls came from the environment, not the file.
            .args(["--url", &control.api_url()])
            .arg("--ca-file")
            .arg(dir.path().join("ca.pem"))
            .args(["db", "list"]),
    );
    assert!(out.contains("notes"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_the_nodes_alone() {
    let control = two_apps().await;
    control
        .client()
        .create_database(&db("shop", "orders", Engine::Postgres))
        .await
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let data = control.data_dir();
    // Root passes through to PostgreSQL's own directory, nobody lists it.
    assert_eq!(mode(&data) & 0o066, 0, "{:o}", mode(&data));
    let mut seen = 0;
    let mut stack = vec![
        data.join("shop_main"),
        data.join("_system"),
        data.join("tokens"),
    ];
    while let Some(p) = stack.pop() {
        let m = mode(&p);
        if p.is_dir() {
            // Directories on the way to PostgreSQL's data may be passed through.
            assert_eq!(m & 0o066, 0, "{} is {m:o}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(m & 0o077, 0, "{} is {m:o}", p.display());
            seen += 1;
        }
    }
    assert!(seen > 5, "{seen} files");
    assert_eq!(mode(&data.join("cluster.key")), 0o600);
}
