//! Several nodes: how long creating and waking a 3-replica rqlite database
//! spread over 3 nodes takes (control API call until active, at a node that
//! may or may not coordinate), and how long until a database is back to 3
//! replicas after the node holding one of them is killed.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rouse_control_api::{CreateDatabase, DatabaseInfo, Engine};
use rouse_tests::Cluster;

use crate::stats::{ms, percentile, table};
use crate::wake::name;

const APP: &str = "bench";

/// Health checks every second: a dead node is noticed after 3 missed ones.
const HEALTH_CHECK: &str = "1s";

const TARGET_CREATE: Duration = Duration::from_secs(2);
const TARGET_WAKE: Duration = Duration::from_millis(1500);

pub struct ClusterResults {
    pub create: Vec<Duration>,
    pub wake: Vec<Duration>,
    /// Kill to 3 replicas again, each round.
    pub recovery: Vec<Duration>,
}

impl fmt::Display for ClusterResults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = |what: &str, samples: &[Duration], target: String| {
            vec![
                what.to_string(),
                samples.len().to_string(),
                ms(percentile(samples, 50.0)),
                ms(percentile(samples, 99.0)),
                target,
            ]
        };
        let rows = vec![
            row(
                "create, 3 replicas on 3 nodes",
                &self.create,
                format!("≤ {} (reference: < 10 s)", ms(TARGET_CREATE)),
            ),
            row(
                "wake, 3 replicas on 3 nodes",
                &self.wake,
                format!("≤ {} (reference: < 8 s)", ms(TARGET_WAKE)),
            ),
            row(
                "node killed → 3 replicas again",
                &self.recovery,
                format!("3 missed health checks of {HEALTH_CHECK} + replacement"),
            ),
        ];
        writeln!(f, "{}", table(&["", "runs", "p50", "p99", "target"], &rows))
    }
}

fn db(name_: &str) -> CreateDatabase {
    CreateDatabase {
        app: name(APP),
        name: name(name_),
        engine: Engine::Rqlite,
        replication_factor: Some(3),
        patroni: None,
    }
}

fn holders(info: &DatabaseInfo) -> Vec<String> {
    let mut h: Vec<String> = info.endpoints.iter().map(|e| e.node_id.clone()).collect();
    h.sort();
    h.dedup();
    h
}

pub async fn run(cycles: usize, kills: usize) -> Result<ClusterResults> {
    let mut cluster = Cluster::loopback(3, |b| {
        b.hibernation_timeout("0")
            .discovery_intervals(HEALTH_CHECK, "1s")
    })
    .await?;
    let api = cluster.nodes[0].client();
    api.create_app(&name(APP)).await?;

    // Creates, each asked of the next node in turn.
    let mut create = Vec::new();
    for i in 0..cycles {
        let at = cluster.nodes[i % 3].client();
        let t = Instant::now();
        let info = at.create_database(&db(&format!("c{i}"))).await?;
        create.push(t.elapsed());
        if holders(&info).len() != 3 {
            bail!("c{i} not on 3 nodes: {info:?}");
        }
    }

    // Hibernate, then wake through the next node in turn.
    let w = name("w");
    api.create_database(&db("w")).await?;
    let mut wake = Vec::new();
    for i in 0..cycles {
        api.hibernate(&name(APP), &w, true).await?;
        let at = cluster.nodes[i % 3].client();
        let t = Instant::now();
        at.wake(&name(APP), &w).await?;
        wake.push(t.elapsed());
    }

    // A fourth node gives the replacements somewhere to go. Each round
    // kills a node holding a replica of `w`, waits for 3 replicas again,
    // and brings the node back for the next round.
    cluster.add().await?;
    let mut recovery = Vec::new();
    for _ in 0..kills {
        let info = api.database(&name(APP), &w).await?;
        let ids = cluster.node_ids().await?;
        // Not the first node: it answers the polls below.
        let victim = (1..ids.len())
            .find(|i| holders(&info).contains(&ids[*i]))
            .context("a holder besides the first node")?;
        let t = Instant::now();
        cluster.nodes[victim].kill();
        loop {
            if let Ok(info) = api.database(&name(APP), &w).await {
                let h = holders(&info);
                if h.len() == 3 && !h.contains(&ids[victim]) {
                    break;
                }
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("w not back to 3 replicas within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        recovery.push(t.elapsed());
        cluster.nodes[victim].restart().await?;
        cluster.wait_healthy().await?;
    }
    Ok(ClusterResults {
        create,
        wake,
        recovery,
    })
}
