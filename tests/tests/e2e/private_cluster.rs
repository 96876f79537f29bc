//! The nodes' plane: a host without the cluster key cannot complete a
//! libp2p handshake; one with the key that `_system` does not record as a
//! member is heard but not obeyed (its requests are refused, its forged
//! events change no route, it is given no replicas); `discovery.allowed_peers`
//! shuts out even a holder of the key. The intruder is rouse's own
//! peer-to-peer stack, driven by the test. And a proxy whose route points
//! at another database's engine serves nothing from it.

use std::time::{Duration, Instant};

use rouse_config::Config;
use rouse_control::cluster::{NodeRequest, NodeResponse};
use rouse_control::cluster::{Peers, EVENTS_TOPIC};
use rouse_control::cluster_key::ClusterKey;
use rouse_control_api::*;
use rouse_tests::{name, Control, ControlBuilder, Proxy};
use serde_json::json;

/// An rqlite database `db` of `app` with `replicas` replicas.
fn rqlite_db(app: &str, db: &str, replicas: u32) -> CreateDatabase {
    CreateDatabase {
        app: name(app),
        name: name(db),
        engine: Engine::Rqlite,
        replication_factor: Some(replicas),
        patroni: None,
    }
}

fn founder() -> ControlBuilder {
    Control::builder()
        .hibernation_timeout("0")
        .discovery_intervals("200ms", "200ms")
}

/// The founder's libp2p address with its peer id, and the peer id.
async fn address_of(control: &Control) -> (String, libp2p::PeerId) {
    let me = control.client().nodes().await.unwrap().nodes.remove(0);
    let addr = me.addresses.first().expect("a libp2p address").clone();
    (
        format!("{addr}/p2p/{}", me.peer_id),
        me.peer_id.parse().unwrap(),
    )
}

/// A peer dialing `bootstrap`, with `network_key` for the private network.
fn intruder(bootstrap: &str, network_key: [u8; 32], dir: &std::path::Path) -> Peers {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.node.listen_addresses = vec!["/ip4/127.0.0.1/tcp/0".into()];
    config.discovery.bootstrap_peers = vec![bootstrap.to_string()];
    config.discovery.health_check_interval = Duration::from_millis(200);
    config.discovery.discovery_interval = Duration::from_millis(200);
    let (peers, _task, _inbound) = Peers::start(&config, "intruder", network_key).unwrap();
    peers
}

/// The network key of `control`'s cluster, as a holder of its key file has it.
fn network_key_of(control: &Control, dir: &std::path::Path) -> [u8; 32] {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.discovery.cluster_secret_file = Some(control.data_dir().join("cluster.key"));
    ClusterKey::load(&config).unwrap().network_key()
}

/// Whether `control` lists a peer other than itself within `within`.
async fn hears_a_stranger(control: &Control, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if control.client().nodes().await.unwrap().nodes.len() > 1 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn refusals(control: &Control, what: &str) -> f64 {
    let series = format!("rouse_peer_refusals_total{{what=\"{what}\"}}");
    rouse_tests::metric(&format!("{}/metrics", control.api_url()), &series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_the_cluster_key_cannot_connect() {
    let control = founder().start().await.unwrap();
    let (bootstrap, _) = address_of(&control).await;
    let dir = tempfile::tempdir().unwrap();
    let stranger = intruder(&bootstrap, rand::random(), dir.path());
    assert!(
        !hears_a_stranger(&control, Duration::from_secs(3)).await,
        "a host with another key got through"
    );
    assert!(
        stranger.peers().is_empty(),
        "the stranger heard the cluster"
    );
    drop(stranger);

    // The same host with the key is heard: the handshake was the wall.
    let dir = tempfile::tempdir().unwrap();
    let holder = intruder(&bootstrap, network_key_of(&control, dir.path()), dir.path());
    assert!(hears_a_stranger(&control, Duration::from_secs(10)).await);
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holder_that_is_no_member_is_heard_but_not_obeyed() {
    let control = founder().start().await.unwrap();
    let admin = control.client();
    let mut keys = Vec::new();
    for (app, db, row) in [("shop", "main", "cart"), ("rival", "vault", "crown")] {
        admin.create_app(&name(app)).await.unwrap();
        let info = admin.create_database(&rqlite_db(app, db, 1)).await.unwrap();
        let url = rouse_tests::engine_url(&info, &info.endpoints[0]);
        rouse_tests::rqlite_execute(&url, "CREATE TABLE t (v TEXT)")
            .await
            .unwrap();
        rouse_tests::rqlite_execute(&url, &format!("INSERT INTO t VALUES ('{row}')"))
            .await
            .unwrap();
        keys.push(admin.create_key(&name(app)).await.unwrap().key);
    }
    let proxy = Proxy::builder(&control).start().await.unwrap();
    let http = reqwest::Client::new();
    let read_main = || async {
        http.post(format!("http://{}/shop/main/db/query", proxy.http_addr()))
            .header("X-API-Key", &keys[0])
            .json(&json!(["SELECT v FROM t"]))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(read_main().await.contains("cart"));

    let (bootstrap, founder_peer) = address_of(&control).await;
    let dir = tempfile::tempdir().unwrap();
    let holder = intruder(&bootstrap, network_key_of(&control, dir.path()), dir.path());
    assert!(hears_a_stranger(&control, Duration::from_secs(10)).await);

    // A request to drop a database is refused...
    let answer = holder
        .request(
            founder_peer,
            NodeRequest::Drop {
                key: DbKey::new(name("shop"), name("main")),
            },
        )
        .await
        .unwrap();
    assert!(matches!(answer, NodeResponse::Failed(_)), "{answer:?}");
    let main = admin.database(&name("shop"), &name("main")).await.unwrap();
    assert_eq!(main.status, DatabaseStatus::Active);

    // ...and a forged leader for `main`, pointing at `vault`'s engine,
    // moves no traffic.
    let vault = admin
        .database(&name("rival"), &name("vault"))
        .await
        .unwrap();
    let forged = serde_json::to_vec(&Event::Leader {
        app: name("shop"),
        name: name("main"),
        endpoints: vault.endpoints.clone(),
    })
    .unwrap();
    let before = refusals(&control, "not_a_member").await;
    let start = Instant::now();
    while refusals(&control, "not_a_member").await <= before + 2.0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the forged events never arrived"
        );
        let _ = holder.publish(EVENTS_TOPIC, forged.clone()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let answer = read_main().await;
    assert!(
        answer.contains("cart") && !answer.contains("crown"),
        "{answer}"
    );
    let main = admin.database(&name("shop"), &name("main")).await.unwrap();
    assert_eq!(main.endpoints[0].port, main.ports[0], "{main:?}");

    // It is no node to place a replica on.
    let pair = admin
        .create_database(&rqlite_db("shop", "pair", 2))
        .await
        .unwrap();
    assert!(
        pair.endpoints.iter().all(|e| e.node_id != "intruder"),
        "{:?}",
        pair.endpoints
    );
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_peers_shut_out_even_a_holder_of_the_key() {
    let only = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let control = founder()
        .env("ROUSE_DISCOVERY__ALLOWED_PEERS", format!("[\"{only}\"]"))
        .start()
        .await
        .unwrap();
    let (bootstrap, _) = address_of(&control).await;
    let dir = tempfile::tempdir().unwrap();
    let holder = intruder(&bootstrap, network_key_of(&control, dir.path()), dir.path());
    assert!(!hears_a_stranger(&control, Duration::from_secs(3)).await);
    assert!(refusals(&control, "connection").await >= 1.0);
    assert!(holder.peers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_sent_to_another_databases_engine_serves_nothing_from_it() {
    // Two HTTP and two Raft ports: `_system` holds one of each, so a
    // database created while `main` sleeps takes over `main`'s ports.
    // (The harness's ranges, below the ephemeral ports from 32768.)
    let base = 11_000 + rand::random_range(0..3_000u16) * 2;
    let control = founder()
        .port_ranges(
            (base, base + 1),
            (base + 7_000, base + 7_001),
            (base + 14_000, base + 14_009),
        )
        .start()
        .await
        .unwrap();
    let admin = control.client();
    let mut keys = Vec::new();
    for app in ["shop", "rival"] {
        admin.create_app(&name(app)).await.unwrap();
        keys.push(admin.create_key(&name(app)).await.unwrap().key);
    }
    let main = admin
        .create_database(&rqlite_db("shop", "main", 1))
        .await
        .unwrap();
    let url = rouse_tests::engine_url(&main, &main.endpoints[0]);
    rouse_tests::rqlite_execute(&url, "CREATE TABLE t (v TEXT)")
        .await
        .unwrap();
    rouse_tests::rqlite_execute(&url, "INSERT INTO t VALUES ('cart')")
        .await
        .unwrap();

    // The proxy reaches control through a relay the test cuts: it then
    // misses every event and keeps its cached route.
    let relay =
        rouse_tests::Relay::start(control.api_url().trim_start_matches("http://").to_string())
            .await;
    let proxy = Proxy::builder(&control)
        .control_url(&format!("http://{}", relay.addr()))
        .start()
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let read_main = || async {
        let resp = http
            .post(format!("http://{}/shop/main/db/query", proxy.http_addr()))
            .header("X-API-Key", &keys[0])
            .json(&json!(["SELECT v FROM t"]))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    assert!(read_main().await.1.contains("cart"));
    relay.set_cut(true);
    // The relay closes open connections within 20 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;

    admin
        .hibernate(&name("shop"), &name("main"), true)
        .await
        .unwrap();
    let vault = admin
        .create_database(&rqlite_db("rival", "vault", 1))
        .await
        .unwrap();
    assert_eq!(
        vault.endpoints[0].addr(),
        main.endpoints[0].addr(),
        "vault did not take over main's address"
    );
    let url = rouse_tests::engine_url(&vault, &vault.endpoints[0]);
    rouse_tests::rqlite_execute(&url, "CREATE TABLE t (v TEXT)")
        .await
        .unwrap();
    rouse_tests::rqlite_execute(&url, "INSERT INTO t VALUES ('crown')")
        .await
        .unwrap();

    let (status, body) = read_main().await;
    assert!(status >= 500 && !body.contains("crown"), "{status} {body}");
    let refused = rouse_tests::metric(
        &format!("http://{}/metrics", proxy.stats_addr()),
        "rouse_engine_login_refusals_total",
    )
    .await;
    assert!(
        refused >= 1.0,
        "the engine's refusal was not what stopped it: {status} {body}"
    );

    // With control back and main's address free again, main wakes there.
    admin
        .drop_database(&name("rival"), &name("vault"))
        .await
        .unwrap();
    relay.set_cut(false);
    let start = Instant::now();
    loop {
        let (status, body) = read_main().await;
        if status == 200 {
            assert!(body.contains("cart"), "{body}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts an rqlited that joins the Raft cluster at `raft` as control's own
/// engine user, with `tls` (the CA, certificate and key files) or without.
fn joiner(
    dir: &std::path::Path,
    raft: &str,
    login: &BackendCredentials,
    tls: Option<&std::path::Path>,
) -> std::process::Child {
    let http = rouse_tests::free_port("127.0.0.1".parse().unwrap());
    let own_raft = rouse_tests::free_port("127.0.0.1".parse().unwrap());
    let auth = dir.join("auth.json");
    std::fs::write(
        &auth,
        json!([{"username": login.user, "password": login.password, "perms": ["all"]}]).to_string(),
    )
    .unwrap();
    let mut cmd = std::process::Command::new("rqlited");
    cmd.args(["-node-id", "stranger"])
        .arg("-http-addr")
        .arg(format!("127.0.0.1:{http}"))
        .arg("-raft-addr")
        .arg(format!("127.0.0.1:{own_raft}"))
        .args([
            "-join",
            raft,
            "-join-as",
            &login.user,
            "-join-attempts",
            "5",
            "-join-interval",
            "200ms",
        ])
        .arg("-auth")
        .arg(&auth);
    if let Some(tls) = tls {
        cmd.arg("-node-ca-cert")
            .arg(tls.join("tls-ca.pem"))
            .arg("-node-cert")
            .arg(tls.join("tls-node.pem"))
            .arg("-node-key")
            .arg(tls.join("tls-node.key"))
            .args(["-node-verify-server-name", "rouse-engine"]);
    }
    cmd.arg(dir.join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap());
    cmd.spawn().unwrap()
}

/// The members of the Raft cluster of `info`'s leader.
async fn raft_members(info: &DatabaseInfo) -> String {
    let url = format!(
        "{}/nodes?nonvoters",
        rouse_tests::engine_url(info, &info.endpoints[0])
    );
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_a_cluster_certificate_cannot_join_a_raft_cluster() {
    let control = founder().start().await.unwrap();
    let admin = control.client();
    admin.create_app(&name("shop")).await.unwrap();
    let info = admin
        .create_database(&rqlite_db("shop", "main", 1))
        .await
        .unwrap();
    let login = rouse_tests::engine_login(&info).unwrap();
    let e = &info.endpoints[0];
    let raft = format!("{}:{}", e.host, e.raft_port.unwrap());

    // The engine's own login, but no certificate: refused.
    let dir = tempfile::tempdir().unwrap();
    let mut child = joiner(dir.path(), &raft, &login, None);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the joiner neither joined nor gave up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "an rqlited without a certificate joined");
    assert!(!raft_members(&info).await.contains("stranger"));

    // With a certificate of the cluster CA (a node's own), it joins: the
    // certificate was the wall.
    let replica = control
        .data_dir()
        .join("shop_main")
        .join("rqlite")
        .join("node-0");
    let dir = tempfile::tempdir().unwrap();
    let mut child = joiner(dir.path(), &raft, &login, Some(&replica));
    let start = Instant::now();
    while !raft_members(&info).await.contains("stranger") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{}",
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "a holder of a certificate could not join"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_speak_tls_to_control_and_proxies_when_asked() {
    let control = founder()
        .env("ROUSE_CONTROL__ENGINE_HTTPS", "true")
        .start()
        .await
        .unwrap();
    let admin = control.client();
    admin.create_app(&name("shop")).await.unwrap();
    let key = admin.create_key(&name("shop")).await.unwrap().key;
    let info = admin
        .create_database(&rqlite_db("shop", "main", 1))
        .await
        .unwrap();
    let e = info.endpoints[0].clone();
    assert!(e.tls, "{e:?}");

    // In clear, the engine answers nothing of its data.
    let login = rouse_tests::engine_login(&info).unwrap();
    let plain = reqwest::Client::new()
        .post(format!("http://{}:{}/db/query", e.host, e.port))
        .basic_auth(&login.user, Some(&login.password))
        .json(&json!(["SELECT 1"]))
        .send()
        .await;
    // A 400, or the connection closed on the request.
    assert!(plain.map_or(true, |r| !r.status().is_success()));
    // A client that trusts another cluster's CA cannot talk to it.
    let other = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.node.data_dir = other.path().to_path_buf();
    let stranger_ca = rouse_control::NodeTls::new(&ClusterKey::load(&config).unwrap())
        .unwrap()
        .ca_pem()
        .to_string();
    let tls = rouse_control_api::engine_tls::client_config(stranger_ca.as_bytes()).unwrap();
    let doubtful = reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .build()
        .unwrap();
    let url = rouse_tests::engine_url(&info, &e);
    assert!(doubtful.get(format!("{url}/status")).send().await.is_err());
    // One that trusts this cluster's CA does.
    rouse_tests::rqlite_execute(&url, "CREATE TABLE t (v TEXT)")
        .await
        .unwrap();

    // The proxy learns the CA from control and serves over TLS.
    let proxy = Proxy::builder(&control).start().await.unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://{}/shop/main/db", proxy.http_addr());
    let start = Instant::now();
    loop {
        let resp = http
            .post(format!("{base}/execute"))
            .header("X-API-Key", &key)
            .json(&json!(["INSERT INTO t VALUES ('sealed')"]))
            .send()
            .await
            .unwrap();
        if resp.status().is_success() {
            break;
        }
        // The CA arrives a moment after the proxy starts.
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            resp.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = http
        .post(format!("{base}/query"))
        .header("X-API-Key", &key)
        .json(&json!(["SELECT v FROM t"]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(rows.contains("sealed"), "{rows}");
}
