//! rouse in front of a real Patroni cluster (3 PostgreSQL members over a
//! 3-member etcd, on 127.0.0.2-4): the protocol-aware ports of a registered
//! cluster and the plain `tcp` listeners, through failovers under load.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rouse_control_api::*;
use rouse_tests::{name, postgres_bin_dir, Control, PatroniCluster, Proxy, APP};

const DB: &str = "orders";

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn in_recovery(c: &tokio_postgres::Client) -> bool {
    c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0)
}

/// The server's address as the session sees it: which member it is on.
async fn server_addr(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT host(inet_server_addr())", &[])
        .await
        .unwrap()
        .get(0)
}

/// A client that opens a new connection through the proxy for every write,
/// as web apps do: what it saw, with times.
#[derive(Default)]
struct Writer {
    refused: AtomicU64,
    written: AtomicU64,
    failed: AtomicU64,
    /// When each write was acknowledged.
    acknowledged: Mutex<Vec<Instant>>,
    refusals: Mutex<Vec<String>>,
}

impl Writer {
    async fn run(self: Arc<Self>, url: String, stop: Arc<std::sync::atomic::AtomicBool>) {
        let mut n = 0i64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let c = match connect(&url).await {
                Ok(c) => c,
                Err(e) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    self.refusals.lock().unwrap().push(e.to_string());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match c.execute("INSERT INTO ledger (n) VALUES ($1)", &[&n]).await {
                Ok(_) => {
                    self.written.fetch_add(1, Ordering::Relaxed);
                    self.acknowledged.lock().unwrap().push(Instant::now());
                }
                Err(_) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The first acknowledged write after `t`.
    fn first_write_after(&self, t: Instant) -> Option<Instant> {
        self.acknowledged
            .lock()
            .unwrap()
            .iter()
            .copied()
            .find(|a| *a > t)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn patroni_failover_under_load_through_both_fronts() {
    let mut cluster = PatroniCluster::start(3).await.unwrap();
    let leader = cluster.leader().await.unwrap();
    let admin = cluster.connect(leader).await.unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .await
        .unwrap();

    // Register the cluster for app `shop`; control makes alice a role
    // (`alice.shop`) on the leader.
    let control = Control::builder().start().await.unwrap();
    let api = control.client();
    api.create_app(&name(APP)).await.unwrap();
    api.create_user(&name(APP), "alice", "wonderland")
        .await
        .unwrap();
    // The operator's way: the CLI.
    let mut register = Command::new(rouse_tests::control_bin().unwrap());
    register
        .args([
            "--url",
            &control.api_url(),
            "db",
            "register-patroni",
            APP,
            DB,
        ])
        .env("ROUSE_ADMIN_PASSWORD", cluster.superuser_password())
        .env("ROUSE_TOKEN", control.admin_token());
    for (n, addr, api) in cluster.members() {
        register.arg("--member").arg(format!("{n}={addr},{api}"));
    }
    let out = rouse_tests::run_ok(&mut register);
    let registered: DatabaseInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(registered.status, DatabaseStatus::Active);
    // The app's user owns the database, as an operator would set it up.
    admin
        .batch_execute(&format!("ALTER DATABASE {DB} OWNER TO \"alice.{APP}\""))
        .await
        .unwrap();
    assert_eq!(registered.replication_factor, 3);
    // A registration without members is refused.
    let err = api
        .create_database(&CreateDatabase {
            app: name(APP),
            name: name("empty"),
            engine: Engine::Patroni,
            replication_factor: None,
            patroni: Some(PatroniRegistration {
                members: Vec::new(),
                discovery: None,
                admin: BackendCredentials {
                    user: "postgres".into(),
                    password: "x".into(),
                },
            }),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 400, .. }), "{err}");
    // Nor does rouse hibernate a cluster it does not run.
    let err = api
        .hibernate(&name(APP), &name(DB), true)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 400, .. }), "{err}");

    let proxy = Proxy::builder(&control)
        .set("patroni", "{check_interval: 500ms, failover_hold: 30s}")
        .patroni_cluster("pillar", &cluster.members())
        .tcp_listener("pillar", "primary")
        .tcp_listener("pillar", "replica")
        .start()
        .await
        .unwrap();
    let rw = format!(
        "postgres://alice.{APP}:wonderland@{}/{DB}?sslmode=disable",
        proxy.postgres_addr()
    );
    let ro = format!(
        "postgres://alice.{APP}:wonderland@{}/{DB}?sslmode=disable",
        proxy.postgres_ro_addr()
    );
    let superuser_password = cluster.superuser_password().to_string();
    let tcp = |i: usize| {
        format!(
            "postgres://postgres:{superuser_password}@{}/{DB}?sslmode=disable",
            proxy.tcp_addr(i)
        )
    };

    // Read-write reaches the leader, read-only the replicas, round-robin.
    let c = connect(&rw).await.unwrap();
    assert!(!in_recovery(&c).await);
    c.batch_execute("CREATE TABLE ledger (n bigint NOT NULL)")
        .await
        .unwrap();
    let mut replicas_seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let r = connect(&ro).await.unwrap();
        assert!(
            in_recovery(&r).await,
            "the read-only port reached the leader"
        );
        replicas_seen.insert(server_addr(&r).await);
        // A write on the read-only port is refused by the replica itself.
        assert!(r
            .batch_execute("INSERT INTO ledger VALUES (1)")
            .await
            .is_err());
    }
    assert_eq!(replicas_seen.len(), 2, "round-robin over both replicas");
    // The plain TCP listeners: the superuser's own login, passed through.
    assert!(!in_recovery(&connect(&tcp(0)).await.unwrap()).await);
    assert!(in_recovery(&connect(&tcp(1)).await.unwrap()).await);
    // Another app registers the same cluster and has an `alice` of its own,
    // with another password: two roles, neither opens the other's door.
    api.create_app(&name("rival")).await.unwrap();
    api.create_user(&name("rival"), "alice", "looking-glass")
        .await
        .unwrap();
    api.create_database(&CreateDatabase {
        app: name("rival"),
        name: name(DB),
        engine: Engine::Patroni,
        replication_factor: None,
        patroni: Some(PatroniRegistration {
            members: cluster
                .members()
                .into_iter()
                .map(|(name, addr, api)| rouse_control_api::PatroniMember { name, addr, api })
                .collect(),
            discovery: None,
            admin: BackendCredentials {
                user: "postgres".into(),
                password: cluster.superuser_password().into(),
            },
        }),
    })
    .await
    .unwrap();
    let as_rival = |password: &str| {
        format!(
            "postgres://alice.rival:{password}@{}/{DB}?sslmode=disable",
            proxy.postgres_addr()
        )
    };
    let rival = connect(&as_rival("looking-glass")).await.unwrap();
    let who: String = rival
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "alice.rival");
    assert!(connect(&as_rival("wonderland")).await.is_err());
    let shop = connect(&rw).await.unwrap();
    let who: String = shop
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, format!("alice.{APP}"));

    // A wrong password on the rouse port is refused by rouse.
    let bad = format!(
        "postgres://alice.{APP}:nope@{}/{DB}?sslmode=disable",
        proxy.postgres_addr()
    );
    let err = connect(&bad).await.unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.code().clone()),
        Some(tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );

    // Load: pgbench through the read-write port, and a writer that opens a
    // new connection per write through each front.
    let pgbench = postgres_bin_dir().unwrap().join("pgbench");
    let out = Command::new(&pgbench)
        .args(["-i", "-s", "1", "-q", &rw])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bench = Command::new(&pgbench)
        .args(["-c", "4", "-j", "2", "-T", "25", "-n", &rw])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let via_rouse = Arc::new(Writer::default());
    let via_tcp = Arc::new(Writer::default());
    let writers = [
        tokio::spawn(via_rouse.clone().run(rw.clone(), stop.clone())),
        tokio::spawn(via_tcp.clone().run(tcp(0), stop.clone())),
    ];
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = via_rouse.written.load(Ordering::Relaxed);
    assert!(before > 0, "no write went through before the failover");

    // Stop the leader the way an operator does.
    let stopped = Instant::now();
    cluster.stop_member(leader).await.unwrap();
    let new_leader = cluster
        .wait_leader_other_than(leader, Duration::from_secs(60))
        .await
        .unwrap();
    let promoted = stopped.elapsed();
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let bench = bench.wait_with_output().unwrap();
    let bench_out = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench_out.contains("number of transactions actually processed"),
        "pgbench did not run: {bench_out}{}",
        String::from_utf8_lossy(&bench.stderr)
    );

    for (front, w) in [("rouse", &via_rouse), ("tcp", &via_tcp)] {
        let back = w
            .first_write_after(stopped + promoted)
            .unwrap_or_else(|| panic!("{front}: no write succeeded after the failover"));
        let outage = back.saturating_duration_since(stopped);
        println!(
            "{front}: promotion took {promoted:?}; writes back {outage:?} after the stop; {} written, {} failed, {} refused",
            w.written.load(Ordering::Relaxed),
            w.failed.load(Ordering::Relaxed),
            w.refused.load(Ordering::Relaxed)
        );
        assert!(
            outage <= promoted + Duration::from_secs(3),
            "{front}: writes came back {outage:?} after the stop, promotion took {promoted:?}"
        );
    }
    // The protocol-aware port held new connections instead of refusing them.
    assert_eq!(
        via_rouse.refused.load(Ordering::Relaxed),
        0,
        "refused during the switch: {:?}",
        via_rouse.refusals.lock().unwrap()
    );
    // Every acknowledged write is on the new leader.
    let c = connect(&rw).await.unwrap();
    assert!(!in_recovery(&c).await);
    let rows: i64 = c
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    let acked = via_rouse.written.load(Ordering::Relaxed) + via_tcp.written.load(Ordering::Relaxed);
    assert!(
        rows as u64 >= acked,
        "{rows} rows for {acked} acknowledged writes"
    );

    // A leader whose Patroni stops answering while its PostgreSQL still
    // runs: the proxy closes the sessions on it once a new leader is elected.
    let old = new_leader;
    let on_old_rouse = connect(&rw).await.unwrap();
    let on_old_tcp = connect(&tcp(0)).await.unwrap();
    let old_addr = server_addr(&on_old_rouse).await;
    assert_eq!(server_addr(&on_old_tcp).await, old_addr);
    cluster.pause_member(old);
    let third = cluster
        .wait_leader_other_than(old, Duration::from_secs(90))
        .await
        .unwrap();
    // The old PostgreSQL still runs as a primary, reachable directly...
    let direct = cluster.connect(old).await.unwrap();
    assert!(!in_recovery(&direct).await);
    // ...but no session through the proxy stays on it.
    let deadline = Instant::now() + Duration::from_secs(15);
    for (front, session) in [("rouse", &on_old_rouse), ("tcp", &on_old_tcp)] {
        while session.simple_query("SELECT 1").await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "{front}: a session stayed on the demoted leader"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let c = connect(&rw).await.unwrap();
    assert_eq!(
        server_addr(&c).await,
        cluster.member(third).pg_addr().ip().to_string()
    );
    cluster.resume_member(old);
}
