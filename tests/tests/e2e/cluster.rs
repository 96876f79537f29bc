//! Several nodes, each a real `rouse-control` on its own loopback address
//! (127.0.0.1-4) running real rqlited replicas: replicas on distinct nodes,
//! a fourth node taking new databases, proxies reaching any node's
//! databases, coordinated hibernation and wake, and a node killed under
//! write load.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rouse_control_api::*;
use rouse_tests::{
    engine_curl_args, engine_url, name, Cluster, Control, ControlBuilder, Network, Proxy, APP,
};
use serde_json::{json, Value};

/// Checks every 200 ms: a dead node is noticed in about 0.6 s.
pub(crate) fn fast(b: ControlBuilder) -> ControlBuilder {
    b.hibernation_timeout("0")
        .discovery_intervals("200ms", "500ms")
}

pub(crate) fn rqlite_db(db: &str, replicas: u32) -> CreateDatabase {
    CreateDatabase {
        app: name(APP),
        name: name(db),
        engine: Engine::Rqlite,
        replication_factor: Some(replicas),
        patroni: None,
    }
}

pub(crate) fn holders(info: &DatabaseInfo) -> BTreeSet<String> {
    info.endpoints.iter().map(|e| e.node_id.clone()).collect()
}

/// An rqlite API call straight to one replica.
pub(crate) async fn replica_call(
    info: &DatabaseInfo,
    e: &Endpoint,
    path: &str,
    body: Value,
) -> Result<Value> {
    let url = format!("{}{path}", engine_url(info, e));
    let resp = rouse_tests::http_client()
        .post(url)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    Ok(resp.error_for_status()?.json().await?)
}

/// An rqlite API call to the database's leader.
pub(crate) async fn leader_call(info: &DatabaseInfo, path: &str, body: Value) -> Result<Value> {
    let leader = info
        .endpoints
        .iter()
        .find(|e| e.leader)
        .context("a leader")?;
    replica_call(info, leader, path, body).await
}

/// Until the replica at `e` reads `want` (rows of values) for `sql`
/// locally, within 15 s.
pub(crate) async fn until_replica_reads(
    info: &DatabaseInfo,
    e: &Endpoint,
    sql: &str,
    want: Value,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let r = replica_call(info, e, "/db/query?level=none", json!([sql])).await;
        match &r {
            Ok(r) if r["results"][0]["values"] == want => return Ok(()),
            _ if start.elapsed() > Duration::from_secs(15) => {
                anyhow::bail!("replica {e:?} never read {want}: {r:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The Raft members the replica at `e` knows: id → (voter, reachable).
async fn raft_members(info: &DatabaseInfo, e: &Endpoint) -> Result<Vec<(String, bool, bool)>> {
    let url = format!("{}/nodes?nonvoters&ver=2", engine_url(info, e));
    let v: Value = rouse_tests::http_client()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .json()
        .await?;
    let list = v["nodes"].as_array().context("nodes list")?;
    Ok(list
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap_or_default().to_string(),
                n["voter"].as_bool().unwrap_or(false),
                n["reachable"].as_bool().unwrap_or(false),
            )
        })
        .collect())
}

/// Whether something accepts connections on the replica's HTTP port.
async fn listening(e: &Endpoint) -> bool {
    tokio::net::TcpStream::connect((e.host.as_str(), e.port))
        .await
        .is_ok()
}

pub(crate) async fn through_proxy(
    proxy: &Proxy,
    key: &str,
    db: &str,
    path: &str,
    body: Value,
) -> Result<(u16, Value)> {
    let url = format!("{}/{APP}/{db}{path}", proxy.url());
    let resp = reqwest::Client::new()
        .post(url)
        .bearer_auth(key)
        .json(&body)
        .timeout(Duration::from_secs(20))
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// An rqlite execute answer with one result that inserted one row.
fn inserted_one(v: &Value) -> bool {
    v["results"]
        .as_array()
        .is_some_and(|r| r.len() == 1 && r[0].get("error").is_none() && r[0]["rows_affected"] == 1)
}

fn no_errors(v: &Value) -> bool {
    v["results"]
        .as_array()
        .is_some_and(|r| r.iter().all(|r| r.get("error").is_none()))
}

/// Inserts ids 1, 2, ... into a new `table` of `db` through a proxy, one request
/// at a time, and keeps the ids rqlite acknowledged.
struct Writer {
    acked: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Creates `table`, then starts writing.
    async fn start(proxy: &Proxy, key: &str, db: &str, table: &str) -> Result<Writer> {
        let create = format!("CREATE TABLE {table} (id INTEGER PRIMARY KEY)");
        let (status, body) = through_proxy(proxy, key, db, "/db/execute", json!([create])).await?;
        anyhow::ensure!(status == 200 && no_errors(&body), "{body}");
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("{}/{APP}/{db}/db/execute", proxy.url());
        let sql = format!("INSERT INTO {table} (id) VALUES (?)");
        let (key, done, acks) = (key.to_string(), stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut id = 0u64;
            while !done.load(Ordering::Relaxed) {
                id += 1;
                let sent = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!([[sql, id]]))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                // Acknowledged: one result, one row inserted.
                if let Ok(resp) = sent {
                    if resp.status() == 200
                        && resp.json::<Value>().await.is_ok_and(|b| inserted_one(&b))
                    {
                        acks.lock().unwrap().push(id);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Ok(Writer { acked, stop, task })
    }

    fn acked(&self) -> Vec<u64> {
        self.acked.lock().unwrap().clone()
    }

    /// Stops writing; every id acknowledged.
    async fn stop(self) -> Result<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?;
        Ok(self.acked.lock().unwrap().clone())
    }
}

pub(crate) async fn setup_app(control: &Control) -> Result<String> {
    let api = control.client();
    api.create_app(&name(APP)).await?;
    Ok(api.create_key(&name(APP)).await?.key)
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_go_to_distinct_nodes_and_a_new_node_takes_new_databases() -> Result<()> {
    let mut cluster = Cluster::loopback(3, fast).await?;
    let key = setup_app(&cluster.nodes[0]).await?;
    let ids: BTreeSet<String> = [
        cluster.node_id(0).await?,
        cluster.node_id(1).await?,
        cluster.node_id(2).await?,
    ]
    .into();

    // Created through a node that does not coordinate: its answer still
    // carries the engine login an operator may use.
    let api = cluster.nodes[(cluster.coordinator().await? + 1) % 3].client();
    let orders = api.create_database(&rqlite_db("orders", 3)).await?;
    assert_eq!(orders.status, DatabaseStatus::Active, "{orders:?}");
    assert!(rouse_tests::engine_login(&orders).is_some(), "{orders:?}");
    assert_eq!(holders(&orders), ids, "one replica per node: {orders:?}");
    let hosts: BTreeSet<&str> = orders.endpoints.iter().map(|e| e.host.as_str()).collect();
    assert_eq!(hosts, ["127.0.0.1", "127.0.0.2", "127.0.0.3"].into());

    // One Raft cluster across the nodes: written on the leader, read on
    // every replica.
    leader_call(
        &orders,
        "/db/execute",
        json!([
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
            "INSERT INTO t (v) VALUES ('a')"
        ]),
    )
    .await?;
    for e in &orders.endpoints {
        until_replica_reads(&orders, e, "SELECT v FROM t", json!([["a"]])).await?;
    }
    // Every node tells the same placement.
    for n in &cluster.nodes {
        let seen = n.client().database(&name(APP), &name("orders")).await?;
        assert_eq!(seen.ports.len(), 6, "{seen:?}");
        let mut ports = seen.ports.clone();
        ports.sort_unstable();
        let mut want = orders.ports.clone();
        want.sort_unstable();
        assert_eq!(ports, want);
    }

    // More replicas than nodes: a clear refusal, nothing made.
    let err = api
        .create_database(&rqlite_db("wide", 4))
        .await
        .expect_err("4 replicas on 3 nodes");
    assert_eq!(
        err.code(),
        Some(rouse_control_api::ErrorCode::InsufficientNodes),
        "{err}"
    );
    assert!(err.to_string().contains("got 3, need 4"), "{err}");
    assert!(api.database(&name(APP), &name("wide")).await.is_err());

    // A fourth node joins: it reads and writes the shared metadata (its
    // key works on the first node) and, the least loaded, takes new
    // databases.
    cluster.add().await?;
    let fourth = cluster.node_id(3).await?;
    let api4 = cluster.nodes[3].client();
    let key4 = api4.create_key(&name(APP)).await?.key;
    assert_eq!(
        cluster.nodes[0].client().verify_key(&key4).await?.app,
        name(APP)
    );
    // The least loaded node takes the next database.
    let single = cluster.nodes[0]
        .client()
        .create_database(&rqlite_db("single", 1))
        .await?;
    assert_eq!(holders(&single), [fourth.clone()].into(), "{single:?}");
    // Now that every node holds one, three replicas go to three of the four.
    let invoices = api4.create_database(&rqlite_db("invoices", 3)).await?;
    assert_eq!(holders(&invoices).len(), 3, "{invoices:?}");

    // A proxy beside the fourth node reaches a database the first three hold.
    let proxy = Proxy::builder(&cluster.nodes[3]).start().await?;
    let (status, body) = through_proxy(
        &proxy,
        &key,
        "orders",
        "/db/query",
        json!(["SELECT v FROM t"]),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["values"], json!([["a"]]), "{body}");
    let (status, body) = through_proxy(
        &proxy,
        &key,
        "orders",
        "/db/execute",
        json!(["INSERT INTO t (v) VALUES ('b')"]),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert!(no_errors(&body), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hibernation_waits_for_every_node_and_a_wake_anywhere_starts_every_replica() -> Result<()> {
    let cluster = Cluster::loopback(3, |b| fast(b).hibernation_timeout("3s")).await?;
    let key = setup_app(&cluster.nodes[0]).await?;
    let info = cluster.nodes[0]
        .client()
        .create_database(&rqlite_db("events", 3))
        .await?;
    let replicas = info.endpoints.clone();
    assert_eq!(replicas.len(), 3);
    // Proxies beside the two nodes that do not decide: their activity has
    // to reach the coordinator.
    let coordinator = cluster.coordinator().await?;
    let others: Vec<usize> = (0..3).filter(|i| *i != coordinator).collect();
    let proxies = [
        Proxy::builder(&cluster.nodes[others[0]])
            .set("activity_interval", "\"300ms\"")
            .start()
            .await?,
        Proxy::builder(&cluster.nodes[others[1]])
            .set("activity_interval", "\"300ms\"")
            .start()
            .await?,
    ];
    let (status, body) = through_proxy(
        &proxies[0],
        &key,
        "events",
        "/db/execute",
        json!([
            "CREATE TABLE e (id INTEGER PRIMARY KEY)",
            "INSERT INTO e (id) VALUES (7)"
        ]),
    )
    .await?;
    assert_eq!(status, 200, "{body}");

    // Traffic through one proxy alone, for twice the timeout: the
    // coordinator must not hibernate the database meanwhile.
    let busy = Instant::now();
    while busy.elapsed() < Duration::from_secs(7) {
        let (status, body) = through_proxy(
            &proxies[1],
            &key,
            "events",
            "/db/query",
            json!(["SELECT id FROM e"]),
        )
        .await?;
        assert_eq!(status, 200, "{body}");
        for n in &cluster.nodes {
            let seen = n.client().database(&name(APP), &name("events")).await?;
            assert_eq!(
                seen.status,
                DatabaseStatus::Active,
                "hibernated while a proxy on another node used it"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Idle everywhere: it hibernates, and every replica on every node stops.
    let idle = Instant::now();
    loop {
        let mut all = true;
        for n in &cluster.nodes {
            all &= n
                .client()
                .database(&name(APP), &name("events"))
                .await?
                .status
                == DatabaseStatus::Hibernating;
        }
        for e in &replicas {
            all &= !listening(e).await;
        }
        if all {
            break;
        }
        assert!(
            idle.elapsed() < Duration::from_secs(20),
            "not hibernated on every node within 20 s of idling"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("hibernated {:?} after the last request", idle.elapsed());

    // A request through the other proxy wakes it: every replica runs again
    // on its node, with the data.
    let woke = Instant::now();
    let (status, body) = through_proxy(
        &proxies[0],
        &key,
        "events",
        "/db/query",
        json!(["SELECT id FROM e"]),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["values"], json!([[7]]), "{body}");
    eprintln!("woken through another node in {:?}", woke.elapsed());
    // Every node hears of it: the news travels by gossip, a moment after
    // the coordinator answered the waiting proxy.
    let heard = Instant::now();
    let info = loop {
        let info = cluster.nodes[2]
            .client()
            .database(&name(APP), &name("events"))
            .await?;
        if info.status == DatabaseStatus::Active || heard.elapsed() > Duration::from_secs(5) {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(info.status, DatabaseStatus::Active);
    for e in &info.endpoints {
        assert!(listening(e).await, "replica {e:?} not started");
    }
    assert_eq!(holders(&info).len(), 3, "{info:?}");
    let members = raft_members(&info, &info.endpoints[0]).await?;
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(
        members
            .iter()
            .all(|(_, voter, reachable)| *voter && *reachable),
        "{members:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_node_is_replaced_and_no_acknowledged_write_is_lost() -> Result<()> {
    let mut cluster = Cluster::loopback(4, fast).await?;
    let key = setup_app(&cluster.nodes[0]).await?;
    let info = cluster.nodes[0]
        .client()
        .create_database(&rqlite_db("ledger", 3))
        .await?;
    let ids = cluster.node_ids().await?;
    // The node without a replica hosts the proxy. The coordinator dies if
    // it holds a replica (a new one has to take over), else the leader's node.
    let spare = ids
        .iter()
        .position(|id| !holders(&info).contains(id))
        .context("a spare node")?;
    let coordinator = cluster.coordinator().await?;
    let leader = info.endpoints.iter().find(|e| e.leader).context("leader")?;
    let victim = if coordinator != spare {
        coordinator
    } else {
        ids.iter()
            .position(|id| *id == leader.node_id)
            .context("leader's node")?
    };
    let stale = info
        .endpoints
        .iter()
        .find(|e| e.node_id == ids[victim])
        .context("victim's replica")?
        .clone();
    eprintln!(
        "killing node {} (coordinator: {}, leader: {})",
        victim + 1,
        victim == coordinator,
        stale.leader
    );
    let proxy = Proxy::builder(&cluster.nodes[spare]).start().await?;

    // Every id the writer saw acknowledged must survive.
    let writer = Writer::start(&proxy, &key, "ledger", "l").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = writer.acked().len();
    assert!(before > 10, "writes flow before the kill: {before}");

    let killed = Instant::now();
    cluster.nodes[victim].kill();
    let watcher = cluster.nodes[spare].client();
    let replaced = loop {
        // Control may answer 503 for a moment while `_system` elects.
        let Ok(info) = watcher.database(&name(APP), &name("ledger")).await else {
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "control unavailable for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let now = holders(&info);
        if now.len() == 3 && !now.contains(&ids[victim]) {
            if let Some(l) = info.endpoints.iter().find(|e| e.leader) {
                if let Ok(members) = raft_members(&info, l).await {
                    let ok = members.len() == 3
                        && members
                            .iter()
                            .all(|(_, voter, reachable)| *voter && *reachable);
                    if ok {
                        break killed.elapsed();
                    }
                }
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "not back to 3 replicas within 60 s: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("back to 3 replicas, the dead member removed, {replaced:?} after the kill");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked = writer.stop().await?;
    assert!(acked.len() > before, "writes resumed after the kill");

    let (status, body) = through_proxy(
        &proxy,
        &key,
        "ledger",
        "/db/query?level=strong",
        json!(["SELECT id FROM l"]),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let stored: BTreeSet<u64> = body["results"][0]["values"]
        .as_array()
        .context("rows")?
        .iter()
        .filter_map(|r| r[0].as_u64())
        .collect();
    let lost: Vec<u64> = acked
        .iter()
        .filter(|id| !stored.contains(id))
        .copied()
        .collect();
    if !lost.is_empty() {
        // What each replica holds, and the proxy's view, to tell where it went.
        let info = watcher.database(&name(APP), &name("ledger")).await?;
        for e in &info.endpoints {
            let r = replica_call(
                &info,
                e,
                "/db/query?level=none",
                json!(["SELECT count(*), max(id) FROM l"]),
            )
            .await;
            eprintln!("replica {e:?}: {r:?}");
        }
        eprintln!("proxy log:\n{}", proxy.log_tail(40));
        for n in &cluster.nodes {
            let dir = n.data_dir().join(format!("{APP}_ledger/rqlite"));
            for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if f.path().extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                    let keep: Vec<&str> = text
                        .lines()
                        .filter(|l| {
                            l.contains("[raft]") || l.contains("[store]") || l.contains("leader")
                        })
                        .collect();
                    eprintln!(
                        "---- {}\n{}",
                        f.path().display(),
                        keep[keep.len().saturating_sub(40)..].join("\n")
                    );
                }
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {lost:?}",
        lost.len()
    );
    eprintln!("{} acknowledged writes, none lost", acked.len());

    // The dead node comes back: its old replica stays down and is removed.
    let stale_dir = cluster.nodes[victim]
        .data_dir()
        .join(format!("{APP}_ledger"));
    assert!(stale_dir.exists());
    cluster.nodes[victim].restart().await?;
    cluster.wait_healthy().await?;
    let back = Instant::now();
    while stale_dir.exists() || listening(&stale).await {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "the returning node revived or kept its stale replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let info = watcher.database(&name(APP), &name("ledger")).await?;
    assert!(!holders(&info).contains(&ids[victim]), "{info:?}");
    let members = raft_members(&info, &info.endpoints[0]).await?;
    assert_eq!(members.len(), 3, "{members:?}");
    Ok(())
}

/// `store.raft.state` of the replica at `e` ("Leader", "Follower", ...),
/// asked from inside host `i`'s namespace, which sees it also while cut off.
fn raft_state_from(net: &Network, i: usize, info: &DatabaseInfo, e: &Endpoint) -> Option<String> {
    let out = net
        .command(i, "curl")
        .args(["-s", "-m", "1"])
        .args(engine_curl_args(info, e, "/status"))
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["store"]["raft"]["state"].as_str().map(str::to_string)
}

/// A write sent straight to the replica at `e` from inside host `i`:
/// whether rqlite acknowledged it.
fn acknowledged_from(
    net: &Network,
    i: usize,
    info: &DatabaseInfo,
    e: &Endpoint,
    sql: &str,
) -> bool {
    let body = serde_json::to_string(&json!([sql])).unwrap();
    let Ok(out) = net
        .command(i, "curl")
        .args([
            "-s",
            "-m",
            "3",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
        ])
        .args(engine_curl_args(info, e, "/db/execute"))
        .output()
    else {
        return false;
    };
    serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| no_errors(&v))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_node_makes_no_second_leader_and_loses_no_write() -> Result<()> {
    let net = Arc::new(Network::create(3)?);
    let hosts = net.clone();
    let cluster = Cluster::start(3, move |i| {
        let h = i as usize - 1;
        Control::builder()
            .netns(hosts.netns(h), hosts.addr(h))
            .hibernation_timeout("0")
            .discovery_intervals("200ms", "500ms")
    })
    .await?;
    let key = setup_app(&cluster.nodes[0]).await?;
    let info = cluster.nodes[0]
        .client()
        .create_database(&rqlite_db("accounts", 3))
        .await?;
    let ids = cluster.node_ids().await?;
    // Hosts on a network, not loopback: the engines' HTTP API speaks TLS.
    ensure!(info.endpoints.iter().all(|e| e.tls), "{:?}", info.endpoints);
    // The leader's node is cut off; the proxy follows another node.
    let leader = info
        .endpoints
        .iter()
        .find(|e| e.leader)
        .context("leader")?
        .clone();
    let victim = ids
        .iter()
        .position(|id| *id == leader.node_id)
        .context("leader's node")?;
    let proxy = Proxy::builder(&cluster.nodes[(victim + 1) % 3])
        .start()
        .await?;

    let writer = Writer::start(&proxy, &key, "accounts", "a").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    net.cut(victim)?;
    let cut = Instant::now();
    // Raft lets a cut-off leader believe in itself for at most its lease;
    // after that, never two leaders, and the cut-off side takes no write.
    let settle = Duration::from_secs(2);
    let mut leaders_seen = BTreeSet::new();
    let mut refused = 0;
    while cut.elapsed() < Duration::from_secs(8) {
        let mut leaders = Vec::new();
        for e in &info.endpoints {
            let from = ids.iter().position(|id| *id == e.node_id).unwrap();
            if raft_state_from(&net, from, &info, e).as_deref() == Some("Leader") {
                leaders.push(e.node_id.clone());
            }
        }
        if cut.elapsed() > settle {
            assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
            assert!(
                !leaders.contains(&ids[victim]),
                "the cut-off node still leads"
            );
            let sql = format!("INSERT INTO a (id) VALUES ({})", 1_000_000 + refused);
            assert!(
                !acknowledged_from(&net, victim, &info, &leader, &sql),
                "the cut-off replica acknowledged a write"
            );
            refused += 1;
        }
        leaders_seen.extend(leaders);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(refused > 3, "the cut-off side was tried");
    let during = writer.acked().len();
    net.join(victim)?;

    // Joined again: writes go on, and every replica ends with every
    // acknowledged write under one leader.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked = writer.stop().await?;
    assert!(
        acked.len() > during,
        "writes went on after the partition healed"
    );
    let want: BTreeSet<u64> = acked.iter().copied().collect();
    let start = Instant::now();
    loop {
        let mut complete = true;
        let mut leaders = 0;
        for e in &info.endpoints {
            let r = replica_call(
                &info,
                e,
                "/db/query?level=none",
                json!(["SELECT id FROM a WHERE id < 1000000"]),
            )
            .await?;
            let got: BTreeSet<u64> = r["results"][0]["values"]
                .as_array()
                .map(|rows| rows.iter().filter_map(|row| row[0].as_u64()).collect())
                .unwrap_or_default();
            complete &= want.is_subset(&got);
            let from = ids.iter().position(|id| *id == e.node_id).unwrap();
            leaders +=
                usize::from(raft_state_from(&net, from, &info, e).as_deref() == Some("Leader"));
        }
        if complete && leaders == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replicas did not converge on every acknowledged write under one leader"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{} acknowledged writes on every replica; leaders seen: {leaders_seen:?}",
        acked.len()
    );
    Ok(())
}
