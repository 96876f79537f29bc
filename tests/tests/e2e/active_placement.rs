//! The active set across nodes (`database.max_active_databases: 1` on each
//! of four real nodes): a new database goes to a node whose active set has
//! a free place even when a full one holds fewer databases, and a wake of a
//! replicated database whose holder is full of databases in use runs on the
//! other replicas, then moves the full node's replica to a node with room,
//! losing nothing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rouse_control_api::*;
use rouse_tests::{name, Cluster, Control, Proxy, APP};
use serde_json::json;

use crate::cluster::{
    fast, holders, leader_call, rqlite_db, setup_app, through_proxy, until_replica_reads,
};

/// Until every node's heartbeat says how many databases run on it: a
/// placement reads them.
async fn until_running(cluster: &Cluster, want: &[(String, u32)]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen = Vec::new();
        for n in &cluster.nodes {
            let capacity = n.client().capacity().await?;
            seen.extend(capacity.nodes.into_iter().map(|c| (c.node_id, c.active)));
        }
        if want
            .iter()
            .all(|w| seen.iter().filter(|s| s == &w).count() == cluster.nodes.len())
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "capacity never showed {want:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn hibernate(control: &Control, db: &str) -> Result<()> {
    let info = control
        .client()
        .hibernate(&name(APP), &name(db), true)
        .await?;
    ensure!(info.status == DatabaseStatus::Hibernating, "{info:?}");
    Ok(())
}

fn the_one(set: BTreeSet<String>) -> Result<String> {
    ensure!(set.len() == 1, "one holder expected: {set:?}");
    Ok(set.into_iter().next().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_follows_free_places_and_a_full_holder_loses_its_replica_to_a_node_with_room(
) -> Result<()> {
    let cluster = Cluster::loopback(4, |b| {
        fast(b)
            .env("ROUSE_DATABASE__MAX_ACTIVE_DATABASES", "1")
            .env("ROUSE_DATABASE__ACTIVE_WAIT", "20s")
    })
    .await?;
    let key = setup_app(&cluster.nodes[0]).await?;
    let api = cluster.nodes[0].client();
    api.create_user(&name(APP), "alice", "wonderland").await?;
    let ids: BTreeSet<String> = cluster.node_ids().await?.into_iter().collect();

    // `orders` on three nodes, with a row; asleep.
    let orders = api.create_database(&rqlite_db("orders", 3)).await?;
    let orders_nodes = holders(&orders);
    leader_call(
        &orders,
        "/db/execute",
        json!([
            "CREATE TABLE t (v TEXT)",
            "INSERT INTO t (v) VALUES ('kept')"
        ]),
    )
    .await?;
    hibernate(&cluster.nodes[0], "orders").await?;
    // The fourth node, holding nothing, takes `busy` and runs it: full.
    let spare = the_one(ids.difference(&orders_nodes).cloned().collect())?;
    let busy = api.create_database(&rqlite_db("busy", 1)).await?;
    assert_eq!(holders(&busy), [spare.clone()].into(), "{busy:?}");
    // `pad` goes to the three with room (as their last heartbeats tell),
    // so the spare now holds the fewest.
    let mut running: Vec<(String, u32)> = orders_nodes.iter().map(|n| (n.clone(), 0)).collect();
    running.push((spare.clone(), 1));
    until_running(&cluster, &running).await?;
    let pad = api.create_database(&rqlite_db("pad", 3)).await?;
    assert_eq!(holders(&pad), orders_nodes, "{pad:?}");
    hibernate(&cluster.nodes[0], "pad").await?;
    until_running(&cluster, &running).await?;

    // A new database skips the least loaded node, whose active set is full.
    let shop = api
        .create_database(&CreateDatabase {
            engine: Engine::Postgres,
            ..rqlite_db("shop", 1)
        })
        .await?;
    let full = the_one(holders(&shop))?;
    assert!(
        orders_nodes.contains(&full),
        "{shop:?} went to {full}, not one with room"
    );

    // A session holds `shop`: its node is full of databases in use. The
    // spare's database sleeps: it has room.
    let proxy = Proxy::builder(&cluster.nodes[0]).start().await?;
    let url = format!(
        "postgres://alice.{APP}:wonderland@{}/shop?sslmode=disable",
        proxy.postgres_addr()
    );
    let (session, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    session.simple_query("SELECT 1").await?;
    let holder = cluster.nodes[cluster
        .node_ids()
        .await?
        .iter()
        .position(|n| *n == full)
        .unwrap()]
    .client();
    let deadline = Instant::now() + Duration::from_secs(15);
    while holder
        .database(&name(APP), &name("shop"))
        .await?
        .open_sessions
        == 0
    {
        ensure!(
            Instant::now() < deadline,
            "the session never reached {full}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hibernate(&cluster.nodes[0], "busy").await?;
    until_running(&cluster, &[(spare.clone(), 0), (full.clone(), 1)]).await?;

    // The wake runs on the two other holders...
    let woken = cluster.nodes[1]
        .client()
        .wake(&name(APP), &name("orders"))
        .await?;
    assert_eq!(woken.status, DatabaseStatus::Active, "{woken:?}");
    let (status, body) = through_proxy(
        &proxy,
        &key,
        "orders",
        "/db/query?level=strong",
        json!(["SELECT v FROM t"]),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["values"], json!([["kept"]]), "{body}");
    // ...and the full node's replica moves to the spare, which syncs.
    let want: BTreeSet<String> = orders_nodes
        .iter()
        .filter(|n| **n != full)
        .chain([&spare])
        .cloned()
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let moved = loop {
        let info = api.database(&name(APP), &name("orders")).await?;
        if holders(&info) == want {
            break info;
        }
        ensure!(
            Instant::now() < deadline,
            "never moved to {want:?}: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let on_spare = moved
        .endpoints
        .iter()
        .find(|e| e.node_id == spare)
        .context("a replica on the spare")?;
    until_replica_reads(&moved, on_spare, "SELECT v FROM t", json!([["kept"]])).await?;
    // The session was never cut off.
    session.simple_query("SELECT 1").await?;
    Ok(())
}
