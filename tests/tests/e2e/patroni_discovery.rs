//! A Patroni cluster named by its scope: the proxy (for a cluster of its
//! configuration) or control (for one registered with it) reads the members
//! from the real etcd Patroni keeps them in, and follows members added and
//! removed there without a reload.

use std::time::{Duration, Instant};

use base64::Engine as _;
use rouse_control_api::*;
use rouse_tests::{name, Control, PatroniCluster, Proxy};
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

/// Registers member `pg9` at 127.0.0.9 in etcd, as Patroni would.
async fn add_pg9(etcd_url: &str, scope: &str) {
    let value = json!({
        "conn_url": "postgres://127.0.0.9:5432/postgres",
        "api_url": "http://127.0.0.9:8008/patroni",
        "state": "running",
        "role": "replica",
    })
    .to_string();
    etcd(
        etcd_url,
        "put",
        json!({"key": B64.encode(format!("/service/{scope}/members/pg9")), "value": B64.encode(value)}),
    )
    .await;
}

async fn remove_pg9(etcd_url: &str, scope: &str) {
    etcd(
        etcd_url,
        "deleterange",
        json!({"key": B64.encode(format!("/service/{scope}/members/pg9"))}),
    )
    .await;
}

/// The members of `cluster` on the proxy's stats page.
async fn members_shown(proxy: &Proxy, cluster: &str) -> Vec<String> {
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
        .filter(|b| b["cluster"] == cluster)
        // A registered cluster's members are `<node>/<member>`.
        .map(|b| {
            b["member"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

async fn until_members(proxy: &Proxy, want: &[&str], what: &str) {
    until_members_of(proxy, "pillar", want, what, || async {}).await
}

/// Until the proxy shows `want` as `cluster`'s members, doing `touch`
/// before each look.
async fn until_members_of<F: std::future::Future<Output = ()>>(
    proxy: &Proxy,
    cluster: &str,
    want: &[&str],
    what: &str,
    touch: impl Fn() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        touch().await;
        let shown = members_shown(proxy, cluster).await;
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
    add_pg9(&etcd_urls[0], cluster.scope()).await;
    until_members(&proxy, &["pg0", "pg1", "pg9"], "a member added in etcd").await;
    // Unreachable, it takes no connection: the leader still serves.
    assert!(!in_recovery(&url(0)).await);

    // And one removed from etcd is dropped.
    remove_pg9(&etcd_urls[1], cluster.scope()).await;
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
    assert_eq!(members_shown(&proxy, "pillar").await, ["pg0", "pg1"]);
}

/// The members control records for a registered cluster.
async fn members_recorded(api: &Client, db: &str) -> Vec<String> {
    let info = api.database(&name("shop"), &name(db)).await.unwrap();
    let mut names: Vec<String> = info
        .endpoints
        .iter()
        .map(|e| e.node_id.rsplit('/').next().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_registered_by_its_scope_is_followed_by_control_and_its_proxies() {
    let cluster = PatroniCluster::start(2).await.unwrap();
    let leader = cluster.leader().await.unwrap();
    cluster
        .connect(leader)
        .await
        .unwrap()
        .batch_execute("CREATE DATABASE ledger")
        .await
        .unwrap();
    let control = Control::builder()
        .discovery_intervals("300ms", "1s")
        .start()
        .await
        .unwrap();
    let api = control.client();
    api.create_app(&name("shop")).await.unwrap();
    api.create_user(&name("shop"), "alice", "wonderland")
        .await
        .unwrap();
    let etcd_urls = cluster.etcd().client_urls();
    let admin = BackendCredentials {
        user: "postgres".into(),
        password: cluster.superuser_password().into(),
    };
    let register = |db: &str, members: Vec<PatroniMember>, discovery: PatroniDiscovery| {
        let request = CreateDatabase {
            app: name("shop"),
            name: name(db),
            engine: Engine::Patroni,
            replication_factor: None,
            patroni: Some(PatroniRegistration {
                members,
                discovery: Some(discovery),
                admin: admin.clone(),
            }),
        };
        let api = api.clone();
        async move { api.create_database(&request).await }
    };
    let by_scope = |scope: Option<&str>| PatroniDiscovery {
        etcd: etcd_urls.clone(),
        scope: scope.map(str::to_string),
        namespace: None,
    };
    // Refused: no scope (control's environment is not the cluster's), a
    // scope etcd holds no member of, members and a scope at once.
    let member = PatroniMember {
        name: "pg0".into(),
        addr: cluster.member(0).pg_addr(),
        api: cluster.member(0).api_url().into(),
    };
    for (members, discovery) in [
        (vec![], by_scope(None)),
        (vec![], by_scope(Some("nobody"))),
        (vec![member], by_scope(Some(cluster.scope()))),
    ] {
        let err = register("ledger", members, discovery).await.unwrap_err();
        assert!(matches!(err, ClientError::Api { status: 400, .. }), "{err}");
    }

    // The operator's way: the CLI, naming the scope and etcd.
    let mut cli = std::process::Command::new(rouse_tests::control_bin().unwrap());
    cli.args([
        "--url",
        &control.api_url(),
        "db",
        "register-patroni",
        "shop",
        "ledger",
    ])
    .args(["--scope", cluster.scope(), "--etcd", &etcd_urls[0]])
    .env("ROUSE_ADMIN_PASSWORD", cluster.superuser_password())
    .env("ROUSE_TOKEN", control.admin_token());
    rouse_tests::run_ok(&mut cli);
    assert_eq!(members_recorded(&api, "ledger").await, ["pg0", "pg1"]);

    let proxy = Proxy::builder(&control)
        .set("patroni", "{check_interval: 300ms, failover_hold: 30s}")
        .start()
        .await
        .unwrap();
    let url = format!(
        "postgres://alice.shop:wonderland@{}/ledger?sslmode=disable",
        proxy.postgres_addr()
    );
    assert!(!in_recovery(&url).await, "alice reaches the leader");
    let touch = || async { assert!(!in_recovery(&url).await) };

    // A member Patroni adds in etcd is recorded by control and reaches the
    // proxy; one removed leaves both. Sessions keep reaching the leader.
    add_pg9(&etcd_urls[0], cluster.scope()).await;
    until_members_of(
        &proxy,
        "shop_ledger",
        &["pg0", "pg1", "pg9"],
        "a member added in etcd",
        touch,
    )
    .await;
    assert_eq!(
        members_recorded(&api, "ledger").await,
        ["pg0", "pg1", "pg9"]
    );
    remove_pg9(&etcd_urls[0], cluster.scope()).await;
    until_members_of(
        &proxy,
        "shop_ledger",
        &["pg0", "pg1"],
        "a member removed from etcd",
        touch,
    )
    .await;
    assert_eq!(members_recorded(&api, "ledger").await, ["pg0", "pg1"]);
}
