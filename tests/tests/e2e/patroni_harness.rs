//! The Patroni harness itself: a 3-member cluster over 3 etcd members
//! replicates, fails over when its leader stops, and leaves no process behind.

use std::time::Duration;

use anyhow::{ensure, Result};
use rouse_tests::{pids_mentioning, port_is_free, PatroniCluster};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread")]
async fn patroni_cluster_replicates_and_fails_over_when_the_leader_stops() -> Result<()> {
    let started = Instant::now();
    let mut cluster = PatroniCluster::start(3).await?;
    println!("cluster of 3 started in {:?}", started.elapsed());
    let leader = cluster.leader().await?;
    let replica = (0..3).find(|&i| i != leader).expect("3 members");

    let client = cluster.connect(leader).await?;
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'hello')",
        )
        .await?;
    // Asynchronous replication: the row shows up on the replica a moment later.
    let replica_client = cluster.connect(replica).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = replica_client
            .query("SELECT v FROM t WHERE id = 1", &[])
            .await
            .unwrap_or_default();
        if let Some(row) = rows.first() {
            assert_eq!(row.get::<_, &str>(0), "hello");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the row did not reach replica {replica}; its log ends with:\n{}",
            cluster.log_tail(replica, 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((client, replica_client));

    let stopping = Instant::now();
    cluster.stop_member(leader).await?;
    let stopped = stopping.elapsed();
    // When another member first answers GET /primary with 200 (the proxy's
    // view), then when it accepts writes.
    let primary = loop {
        match cluster.leader().await {
            Ok(i) if i != leader => break stopping.elapsed(),
            _ if stopping.elapsed() > Duration::from_secs(60) => {
                anyhow::bail!(
                    "no new leader; its log ends with:\n{}",
                    cluster.log_tail(replica, 30)
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let new_leader = cluster
        .wait_leader_other_than(leader, Duration::from_secs(60))
        .await?;
    println!(
        "leader {} stopped in {stopped:?}; {} answered /primary 200 after {primary:?} and accepted writes after {:?}",
        cluster.member(leader).name(),
        cluster.member(new_leader).name(),
        stopping.elapsed()
    );

    let client = cluster.connect(new_leader).await?;
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    assert!(!in_recovery, "the new leader is still a standby");
    let v: String = client
        .query_one("SELECT v FROM t WHERE id = 1", &[])
        .await?
        .get(0);
    assert_eq!(v, "hello");
    client
        .execute("INSERT INTO t VALUES (2, 'after failover')", &[])
        .await?;
    drop(client);

    let dirs: Vec<String> = (0..3)
        .map(|i| cluster.member(i).dir())
        .chain([cluster.etcd().dir()])
        .map(|dir| dir.to_string_lossy().into_owned())
        .collect();
    let addrs: Vec<_> = cluster.members().into_iter().map(|(_, pg, _)| pg).collect();
    // PostgreSQL's children do not show the data directory, but the scope.
    let backends = format!("postgres: {}: ", cluster.scope());
    drop(cluster);

    assert_eq!(
        pids_mentioning(&backends),
        Vec::<u32>::new(),
        "PostgreSQL processes of the cluster still run"
    );
    for dir in &dirs {
        assert_eq!(
            pids_mentioning(dir),
            Vec::<u32>::new(),
            "processes still run from {dir}"
        );
        assert!(!std::path::Path::new(dir).exists(), "{dir} was not removed");
    }
    for addr in addrs {
        assert!(port_is_free(addr), "{addr} is still taken");
    }
    Ok(())
}
