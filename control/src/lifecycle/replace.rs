//! Replacing the replicas a dead node held, so a database keeps its
//! replication factor, and moving replicas off nodes whose active set is
//! full, so a database runs all its replicas.

use std::collections::HashSet;

use rouse_control_api::*;
use tracing::{info, warn};

use super::Manager;
use crate::cluster::{LocalStart, NodeRequest, NodeResponse, Notice};
use crate::engine;
use crate::error::Result;
use crate::metrics::REPLICA_REPLACEMENTS;
use crate::model::{DatabaseRecord, ReplicaRecord};
use crate::rqlite::RqliteClient;

impl Manager {
    /// Gives each replica of `rec` that sits on a dead node a replacement on
    /// a live node with capacity. The new placement is recorded in `_system`
    /// first; then the dead member leaves the Raft configuration and the new
    /// replica joins and syncs. Run with the database's decision lock held,
    /// on a running database.
    pub(super) async fn replace_dead(&self, rec: &DatabaseRecord) -> Result<()> {
        let membership = self.membership().await;
        let dead: Vec<ReplicaRecord> = rec
            .replicas
            .iter()
            .filter(|r| !membership.is_live(&r.node_id))
            .cloned()
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        if rec.engine != Engine::Rqlite {
            warn!(database = %rec.key, "the node holding this database is down; its engine keeps one copy, so it waits for that node");
            return Ok(());
        }
        self.replace(rec, dead, Leaving::Dead).await
    }

    /// Moves the replicas of `rec` on the nodes `full`, whose active sets
    /// had no place for them at its wake, to nodes with a free place, as a
    /// dead node's are replaced; the full nodes then drop their copies.
    /// Run with the database's decision lock held, on a running database.
    pub(super) async fn move_off(&self, rec: &DatabaseRecord, full: &[String]) -> Result<()> {
        let gone: Vec<ReplicaRecord> = rec
            .replicas
            .iter()
            .filter(|r| full.contains(&r.node_id))
            .cloned()
            .collect();
        if gone.is_empty() || rec.engine != Engine::Rqlite {
            return Ok(());
        }
        self.replace(rec, gone, Leaving::Full).await
    }

    async fn replace(
        &self,
        rec: &DatabaseRecord,
        gone_replicas: Vec<ReplicaRecord>,
        why: Leaving,
    ) -> Result<()> {
        let membership = self.membership().await;
        let mut replicas = rec.replicas.clone();
        for gone in gone_replicas {
            let placing = self.placing.lock().await;
            let load = self.store.load().await?;
            let mut exclude: HashSet<String> = replicas.iter().map(|r| r.node_id.clone()).collect();
            if why == Leaving::Full {
                exclude.extend(membership.without_active_room());
            }
            let target = match membership.place(1, &load, &exclude) {
                Ok(mut m) => m.remove(0),
                Err(e) => {
                    warn!(database = %rec.key, node_id = %gone.node_id, why = why.as_str(), error = %e, "no node can take a replacement replica");
                    REPLICA_REPLACEMENTS
                        .counter(["no_capacity".into()])
                        .increment(1);
                    continue;
                }
            };
            if why == Leaving::Dead {
                self.notify(Notice::ReplacementNeeded {
                    key: rec.key.clone(),
                    dead_node: gone.node_id.clone(),
                });
            }
            let idx = replicas.iter().map(|r| r.idx).max().unwrap_or(0) + 1;
            let new = self
                .allocate_on(&target.node_id, &rec.key, rec.engine, idx, None)
                .await?;
            replicas.retain(|r| r.idx != gone.idx);
            replicas.push(new.clone());
            // The decision first: a node that cannot record it (cut off from
            // the `_system` quorum) does not act on it.
            self.store.set_replicas(&rec.key, &replicas).await?;
            let detail = format!(
                "{} on {} replaced by {} on {}",
                engine::rqlite::node_id(&gone),
                gone.node_id,
                engine::rqlite::node_id(&new),
                new.node_id
            );
            self.record_decision(&rec.key, why.decision(), &detail)
                .await;
            drop(placing);
            info!(database = %rec.key, node_id = %gone.node_id, new_node = %new.node_id, why = why.as_str(), "replacing a replica");
            // The running members keep a quorum without the one leaving.
            // They may still be electing a leader when it held it.
            let survivors: Vec<RqliteClient> = replicas
                .iter()
                .filter(|r| r.idx != new.idx)
                .map(|r| engine::rqlite::client(&self.engines, r, &rec.secret))
                .collect();
            let dead_member = engine::rqlite::node_id(&gone);
            engine::poll_until(
                tokio::time::Instant::now() + self.engines.start_timeout,
                "removing the member that leaves",
                || async {
                    let mut last = String::from("no live member");
                    for client in &survivors {
                        match client.remove_node(&dead_member).await {
                            Ok(()) => return Ok(()),
                            Err(e) => last = e.to_string(),
                        }
                    }
                    Err(last)
                },
            )
            .await?;
            let start = LocalStart::default();
            self.on_node(
                &new.node_id,
                NodeRequest::Start {
                    key: rec.key.clone(),
                    start,
                },
                async {
                    let rec = DatabaseRecord {
                        replicas: replicas.clone(),
                        ..rec.clone()
                    };
                    self.start_seated(&rec, start)
                        .await
                        .map(|_| NodeResponse::Done)
                },
            )
            .await?;
            let client = engine::rqlite::client(&self.engines, &new, &rec.secret);
            engine::poll_until(
                tokio::time::Instant::now() + self.engines.start_timeout,
                "replacement replica",
                || async {
                    if client.ready().await {
                        Ok(())
                    } else {
                        Err(format!("{} has not joined yet", client.addr()))
                    }
                },
            )
            .await?;
            REPLICA_REPLACEMENTS.counter(["done".into()]).increment(1);
            match why {
                Leaving::Dead => self.notify(Notice::Replaced {
                    key: rec.key.clone(),
                    dead_node: gone.node_id.clone(),
                    new_node: new.node_id.clone(),
                }),
                // The full node's copy is stale from now on: it goes.
                Leaving::Full => {
                    let request = NodeRequest::Stop {
                        key: rec.key.clone(),
                        remove_data: true,
                    };
                    let here = async {
                        self.stop_local(&rec.key, true).await;
                        Ok(NodeResponse::Done)
                    };
                    if let Err(e) = self.on_node(&gone.node_id, request, here).await {
                        warn!(database = %rec.key, node_id = %gone.node_id, error = %e, "could not remove a moved replica's data");
                    }
                }
            }
            info!(database = %rec.key, new_node = %new.node_id, why = why.as_str(), "replacement replica joined");
        }
        let rec = DatabaseRecord {
            replicas,
            ..rec.clone()
        };
        self.announce_leader(&rec).await;
        Ok(())
    }
}

/// Why a replica leaves its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaving {
    /// The node is down.
    Dead,
    /// The node's active set had no place for it at a wake.
    Full,
}

impl Leaving {
    fn as_str(self) -> &'static str {
        match self {
            Leaving::Dead => "node_down",
            Leaving::Full => "active_set_full",
        }
    }

    /// The kind of decision written to `_system`'s log.
    fn decision(self) -> &'static str {
        match self {
            Leaving::Dead => "replace",
            Leaving::Full => "move",
        }
    }
}
