//! Several control daemons find each other over libp2p and keep a health
//! view of one another, shown by `GET /api/v1/nodes`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rouse_control_api::NodeInfo;
use rouse_tests::Control;

/// Short, so that the test runs in seconds; unhealthy after 3 × this.
const HEALTH_CHECK: Duration = Duration::from_millis(200);
const HEALTH_CHECK_CONFIG: &str = "200ms";
const DISCOVERY_CONFIG: &str = "500ms";

/// Time to find one another from a cold start (the gossipsub mesh forms on
/// its own one-second beat).
const CONVERGE: Duration = Duration::from_secs(20);

/// Time for the others to notice a dead node: 3 missed checks plus margin
/// for a loaded machine.
const NOTICE: Duration = Duration::from_secs(5);

fn host(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn node(host_last: u8) -> rouse_tests::ControlBuilder {
    Control::builder()
        .host(host(host_last))
        .discovery_intervals(HEALTH_CHECK_CONFIG, DISCOVERY_CONFIG)
}

async fn nodes(control: &Control) -> Result<Vec<NodeInfo>> {
    Ok(control.client().nodes().await?.nodes)
}

/// Polls every control's `/nodes` until `ok` holds for each list, or fails
/// with the lists last seen.
async fn wait_all(
    controls: &[&Control],
    within: Duration,
    what: &str,
    ok: impl Fn(&[NodeInfo]) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let mut lists = Vec::new();
        for control in controls {
            lists.push(nodes(control).await?);
        }
        if lists.iter().all(|l| ok(l)) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("not {what} within {within:?}; /nodes lists:\n{lists:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn health_of<'a>(list: &'a [NodeInfo], peer_id: &str) -> Option<&'a NodeInfo> {
    list.iter().find(|n| n.peer_id == peer_id)
}

/// Exactly `peers`, each healthy.
fn all_healthy(list: &[NodeInfo], peers: &BTreeSet<String>) -> bool {
    let listed: BTreeSet<String> = list.iter().map(|n| n.peer_id.clone()).collect();
    listed == *peers && list.len() == peers.len() && list.iter().all(|n| n.healthy)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_find_each_other_and_notice_a_dead_one() -> Result<()> {
    let mut first = node(1).start().await?;
    let me = nodes(&first).await?.remove(0);
    assert!(!me.peer_id.is_empty(), "{me:?}");
    assert!(me.healthy);
    let addr = me
        .addresses
        .iter()
        .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/"))
        .cloned()
        .unwrap_or_else(|| panic!("first node listens on 127.0.0.1: {me:?}"));

    // One bootstrap address names the peer, the other does not.
    let key = first.data_dir().join("cluster.key");
    let (second, third) = tokio::join!(
        node(2)
            .bootstrap_peers([format!("{addr}/p2p/{}", me.peer_id)])
            .cluster_key(&key)
            .tokens_in(first.tokens_dir())
            .start(),
        node(3)
            .bootstrap_peers([addr.clone()])
            .cluster_key(&key)
            .tokens_in(first.tokens_dir())
            .start(),
    );
    let (second, third) = (second?, third?);

    let mut peers = BTreeSet::new();
    for control in [&first, &second, &third] {
        let me = nodes(control).await?.remove(0);
        assert!(
            me.addresses.iter().all(|a| !a.contains("/tcp/4001")),
            "{me:?}"
        );
        peers.insert(me.peer_id);
    }
    assert_eq!(peers.len(), 3, "distinct peer ids: {peers:?}");

    let took = wait_all(&[&first, &second, &third], CONVERGE, "all healthy", |l| {
        all_healthy(l, &peers)
    })
    .await?;
    eprintln!("three nodes healthy everywhere after {took:?}");
    // A peer's entry carries what its heartbeat said.
    let seen = nodes(&second).await?;
    let one = health_of(&seen, &me.peer_id).expect("first node listed");
    assert_eq!(one.node_id, me.node_id);
    assert_eq!(one.api_addr, me.api_addr);
    assert_eq!(one.max_databases, me.max_databases);
    assert!(one.last_seen > 0);

    // The bootstrap node dies: the others must keep seeing each other.
    first.kill();
    let killed_at = Instant::now();
    let took = wait_all(&[&second, &third], NOTICE, "first node unhealthy", |l| {
        l.len() == 3 && l.iter().all(|n| n.healthy == (n.peer_id != me.peer_id))
    })
    .await?;
    eprintln!("dead node unhealthy everywhere after {took:?}");
    // Missed checks, not the closed connection, make a node unhealthy. (Not
    // 2 intervals: a heartbeat delayed on a loaded machine would flake it.)
    assert!(
        killed_at.elapsed() >= HEALTH_CHECK,
        "unhealthy only after 3 missed checks, not after {:?}",
        killed_at.elapsed()
    );

    first.restart().await?;
    let again = nodes(&first).await?.remove(0);
    assert_eq!(again.peer_id, me.peer_id, "same peer id after a restart");
    assert_eq!(again.node_id, me.node_id);
    let took = wait_all(
        &[&first, &second, &third],
        CONVERGE,
        "all healthy after the restart",
        |l| all_healthy(l, &peers),
    )
    .await?;
    eprintln!("restarted node healthy everywhere after {took:?}");
    Ok(())
}

/// Without bootstrap peers a node runs alone and lists itself.
#[tokio::test(flavor = "multi_thread")]
async fn single_node_lists_itself() -> Result<()> {
    let control = Control::builder().start().await?;
    let list = nodes(&control).await?;
    assert_eq!(list.len(), 1, "{list:#?}");
    assert!(list[0].healthy);
    assert!(!list[0].peer_id.is_empty());
    Ok(())
}

/// The State Pillar's own scaling call, byte for byte as its docs send it
/// (curl `-d`, no JSON content type): `true` asks for the HA quorum of 3
/// replicas, and a database created afterwards gets them.
#[tokio::test(flavor = "multi_thread")]
async fn the_state_pillar_scaling_call_sets_the_quorum_for_new_databases() -> Result<()> {
    use rouse_control_api::{CreateDatabase, Engine};
    use rouse_tests::{name, APP};
    let control = Control::builder().start().await?;
    let scale = |body: &'static str| {
        reqwest::Client::new()
            .post(format!("{}/api/v1/cluster/scale", control.api_url()))
            .bearer_auth(control.admin_token())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let resp = scale(r#"{ "target_db_count": 3, "min_ha_nodes": true }"#).await?;
    assert_eq!(resp.status(), 200);
    let plan: serde_json::Value = resp.json().await?;
    assert_eq!(plan["replication_factor"], 3, "{plan}");
    assert_eq!(plan["target_db_count"], 3, "{plan}");
    assert_eq!(plan["fits"], true, "{plan}");
    assert!(
        plan["notes"][0]
            .as_str()
            .unwrap_or("")
            .contains("3 replicas"),
        "{plan}"
    );

    let client = control.client();
    client.create_app(&name(APP)).await?;
    let info = client
        .create_database(&CreateDatabase {
            app: name(APP),
            name: name("after-scale"),
            engine: Engine::Rqlite,
            replication_factor: None,
            patroni: None,
        })
        .await?;
    assert_eq!(info.replication_factor, 3);

    // `false`: no HA, one copy; anything else is refused and changes nothing.
    let plan: serde_json::Value = scale(r#"{"target_db_count": 3, "min_ha_nodes": false}"#)
        .await?
        .json()
        .await?;
    assert_eq!(plan["replication_factor"], 1, "{plan}");
    let resp = scale(r#"{"target_db_count": 3, "min_ha_nodes": "yes"}"#).await?;
    assert_eq!(resp.status(), 400);
    let error: serde_json::Value = resp.json().await?;
    assert!(
        error["error"]
            .as_str()
            .unwrap_or("")
            .contains("min_ha_nodes"),
        "{error}"
    );
    Ok(())
}
