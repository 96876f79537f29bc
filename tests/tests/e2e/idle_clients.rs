//! Transaction-pooled clients that say nothing for a second are parked
//! outside the proxy's runtime, which is what keeps ten thousand idle
//! clients cheap. A parked client must come back exactly as it was: its
//! prepared statements, its cancel key, its place in SHOW CLIENTS, and
//! KILL must reach it without it sending anything, over plain TCP and over
//! TLS alike. A client idle inside a transaction keeps its backend and is
//! never parked.

use std::time::Duration;

use rouse_control_api::*;
use rouse_tests::{name, pg_connect_url, trust_any_certificate, Stack, APP};
use tokio_postgres::error::SqlState;

const CLIENTS: usize = 40;
const PARKED: &str = "rouse_parked_clients";

/// Until the proxy counts at least `n` parked clients.
async fn until_parked(s: &Stack, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let parked = s.proxy_metric(0, PARKED).await;
        if parked >= n as f64 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{parked} of {n} idle clients parked"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_clients_are_parked_and_come_back_as_they_were() {
    parked_clients_come_back_as_they_were(false).await;
}

/// The TLS layer keeps its state with the session while the parker
/// watches the socket under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_tls_clients_are_parked_and_come_back_as_they_were() {
    parked_clients_come_back_as_they_were(true).await;
}

async fn parked_clients_come_back_as_they_were(tls: bool) {
    let s = Stack::builder().start().await;
    let api = s.control.client();
    s.create("pooled", Engine::Postgres).await;
    api.set_pool_mode(&name(APP), &name("pooled"), PoolMode::Transaction)
        .await
        .unwrap();
    let url = format!(
        "{}?sslmode={}",
        s.pg_url("alice.shop", "wonderland", "pooled"),
        if tls { "require" } else { "disable" }
    );
    let tls_config = tls.then(trust_any_certificate);
    let connect = || pg_connect_url(&url, tls_config.as_ref());
    connect()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE t (n int)")
        .await
        .unwrap();

    // Each client prepares a statement (a named one, on whichever backend
    // served it), then says nothing.
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let c = connect().await.unwrap();
        let plus_one = c.prepare("SELECT $1::int + 1").await.unwrap();
        clients.push((c, plus_one));
    }
    // One holds a transaction open across the idle time: never parked.
    let open = connect().await.unwrap();
    open.batch_execute("BEGIN; INSERT INTO t VALUES (7)")
        .await
        .unwrap();
    until_parked(&s, CLIENTS).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        s.proxy_metric(0, PARKED).await,
        CLIENTS as f64,
        "exactly the clients idle between transactions are parked"
    );

    // Each comes back with its statement, and the open transaction goes on.
    for (i, (c, plus_one)) in clients.iter().enumerate() {
        let row = c.query_one(plus_one, &[&(i as i32)]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i as i32 + 1);
    }
    open.batch_execute("INSERT INTO t VALUES (8); COMMIT")
        .await
        .unwrap();
    let row = clients[0]
        .0
        .query_one("SELECT count(*)::int FROM t", &[])
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        2,
        "the open transaction committed whole"
    );

    // Parked again, a client's cancel key still cancels its query.
    until_parked(&s, CLIENTS).await;
    let (sleeper, _) = &clients[1];
    let cancel = sleeper.cancel_token();
    let slow = sleeper.simple_query("SELECT pg_sleep(30)");
    let cancelling = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if tls {
            cancel.cancel_query(trust_any_certificate()).await.unwrap();
        } else {
            cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        }
    };
    let (slept, ()) = tokio::join!(slow, cancelling);
    assert_eq!(
        slept.unwrap_err().code(),
        Some(&SqlState::QUERY_CANCELED),
        "the cancel key of a client that was parked"
    );

    // The console lists parked clients, and KILL ends them at once,
    // though they send nothing.
    until_parked(&s, CLIENTS).await;
    let token = s.control.admin_token();
    let console = s.pg_connect("admin", &token, "pgbouncer").await.unwrap();
    let listed = console
        .simple_query("SHOW CLIENTS")
        .await
        .unwrap()
        .into_iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert!(listed > CLIENTS, "SHOW CLIENTS listed {listed}");
    console
        .simple_query(&format!("KILL {APP}_pooled"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !clients.iter().all(|(c, _)| c.is_closed()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {CLIENTS} parked clients still open after KILL",
            clients.iter().filter(|(c, _)| !c.is_closed()).count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_gone(&s).await;
    // A new client of the database is served as before.
    let again = connect().await.unwrap();
    again.simple_query("SELECT 1").await.unwrap();
}

/// Until no client is parked.
async fn until_gone(s: &Stack) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.proxy_metric(0, PARKED).await > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "killed clients stayed parked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A huge page is resident whole once a byte of it is used: the proxy's
/// heap of small sessions is kept on ordinary pages, whatever the
/// system's transparent huge page setting.
#[tokio::test]
async fn the_proxys_memory_is_not_backed_by_huge_pages() {
    let s = Stack::builder().start().await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.proxy().pid())).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "the proxy's THP_enabled");
}
