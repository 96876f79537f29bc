//! A Patroni cluster named by its scope: the proxy reads the members from
//! the real etcd Patroni keeps them in, and follows members added and
//! removed there without a reload.

use std::time::{Duration, Instant};

use base64::Engine as _;
use rouse_tests::{Control, PatroniCluster, Proxy};
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A key write or delete through etcd's v3 JSON gateway, as Patroni or an
/// operator with etcdctl would make it.
async fn etcd(url: &str, op: &str, body: Value) {
    let resp = reqwest::Client::new()
        .post(format!("{url}/v3/kv/{op}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "etcd {op}: {}", resp.status());
}

/// The members of cluster `pillar` on the proxy's stats page.
async fn members_shown(proxy: &Proxy) -> Vec<String> {
    let stats: Value = reqwest::get(format!("http://{}/stats.json", proxy.stats_addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut names: Vec<String> = stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["cluster"] == "pillar")
        .map(|b| b["member"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

async fn until_members(proxy: &Proxy, want: &[&str], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let shown = members_shown(proxy).await;
        if shown == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the proxy shows {shown:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn in_recovery(url: &str) -> bool {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn members_are_read_from_etcd_by_scope_and_followed_live() {
    let cluster = PatroniCluster::start(2).await.unwrap();
    let control = Control::builder().start().await.unwrap();
    // No member is listed: the scope comes from PATRONI_SCOPE, as on a
    // Patroni host.
    let etcd_urls = cluster.etcd().client_urls();
    let proxy = Proxy::builder(&control)
        .set("patroni", "{check_interval: 300ms, failover_hold: 30s}")
        .patroni_discovered("pillar", &etcd_urls, None)
        .env("PATRONI_SCOPE", cluster.scope())
        .tcp_listener("pillar", "primary")
        .tcp_listener("pillar", "replica")
        .start()
        .await
        .unwrap();
    until_members(&proxy, &["pg0", "pg1"], "the members Patroni registered").await;
    let url = |i: usize| {
        format!(
            "postgres://postgres:{}@{}/postgres?sslmode=disable",
            cluster.superuser_password(),
            proxy.tcp_addr(i)
        )
    };
    assert!(!in_recovery(&url(0)).await, "the primary listener");
    assert!(in_recovery(&url(1)).await, "the replica listener");

    // A member registered in etcd is followed without a reload.
    let key = format!("/service/{}/members/pg9", cluster.scope());
    let value = json!({
        "conn_url": "postgres://127.0.0.9:5432/postgres",
        "api_url": "http://127.0.0.9:8008/patroni",
        "state": "running",
        "role": "replica",
    })
    .to_string();
    etcd(
        &etcd_urls[0],
        "put",
        json!({"key": B64.encode(&key), "value": B64.encode(value)}),
    )
    .await;
    until_members(&proxy, &["pg0", "pg1", "pg9"], "a member added in etcd").await;
    // Unreachable, it takes no connection: the leader still serves.
    assert!(!in_recovery(&url(0)).await);

    // And one removed from etcd is dropped.
    etcd(
        &etcd_urls[1],
        "deleterange",
        json!({"key": B64.encode(&key)}),
    )
    .await;
    until_members(&proxy, &["pg0", "pg1"], "a member removed from etcd").await;
    assert!(in_recovery(&url(1)).await);

    // A member that etcd holds in a shape the proxy cannot use is left out,
    // and the others stay.
    let junk = format!("/service/{}/members/junk", cluster.scope());
    etcd(
        &etcd_urls[0],
        "put",
        json!({"key": B64.encode(&junk), "value": B64.encode("{\"conn_url\": 1}")}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(members_shown(&proxy).await, ["pg0", "pg1"]);
}
