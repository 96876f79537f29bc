//! Work on every node that holds a replica: start and stop a database on
//! all its holders (this node directly, others over libp2p), and attach a
//! registered Patroni cluster.

use std::time::{Duration, Instant};

use rouse_control_api::*;
use rouse_runtime::metric::WAKE_DURATION;
use tracing::warn;

use super::Manager;
use crate::cluster::{self, LocalStart, NodeRequest, NodeResponse};
use crate::engine::{self, Instance};
use crate::error::{ControlError, Result};
use crate::model::{DatabaseRecord, ReplicaRecord};

/// What a start did.
#[derive(Default)]
pub(super) struct Started {
    /// Where the database answers, leader first.
    pub(super) endpoints: Vec<Endpoint>,
    /// Nodes whose active set was full: their replicas were left out.
    pub(super) full: Vec<String>,
    /// How long this node's place in its active set took to find.
    pub(super) seat_wait: Duration,
}

impl Manager {
    /// Has every live holder start its replicas, each in a place of its
    /// own active set, then waits until the database answers (leader first
    /// in the endpoints). Holders that are down, and on a wake holders whose
    /// active set is full of databases in use, are left out while the
    /// others still make a quorum.
    pub(super) async fn start_everywhere(
        &self,
        rec: &DatabaseRecord,
        start: LocalStart,
    ) -> Result<Started> {
        if rec.engine == Engine::Patroni {
            return Ok(Started {
                endpoints: self.attach_patroni(rec).await?,
                ..Started::default()
            });
        }
        let membership = self.membership().await;
        let live: Vec<ReplicaRecord> = rec
            .replicas
            .iter()
            .filter(|r| membership.is_live(&r.node_id))
            .cloned()
            .collect();
        if live.len() * 2 <= rec.replicas.len() {
            let down: Vec<&str> = rec
                .replicas
                .iter()
                .filter(|r| !membership.is_live(&r.node_id))
                .map(|r| r.node_id.as_str())
                .collect();
            return Err(ControlError::Peer(format!(
                "database {}: {} of {} replicas are on nodes that are down ({}): no quorum",
                rec.key,
                down.len(),
                rec.replicas.len(),
                down.join(", ")
            )));
        }
        let holders = cluster::holders(&live);
        // A holder the others make a quorum without need not wait for room
        // (a new database's replicas bootstrap together: none is optional).
        let optional = |node: &str| {
            let without = live.iter().filter(|r| r.node_id != node).count();
            !start.bootstrap && without * 2 > rec.replicas.len()
        };
        // This node's place is found before a boot slot is taken: a wake
        // waiting for room holds no slot that another could boot in.
        let seat_asked = Instant::now();
        let mut seat_here = match holders.contains(&self.node_id) {
            true => Some(self.take_seat(&rec.key, optional(&self.node_id)).await),
            false => None,
        };
        let seat_wait = seat_asked.elapsed();
        let t0 = Instant::now();
        // Held while the engines boot, the part of a start that takes CPU
        // and disk: a storm of starts boots engines in bounded number, apps
        // in turn, and their elections (mostly waiting) overlap freely.
        let booting = self.starts.acquire(&rec.key.app).await;
        let started = futures::future::join_all(holders.iter().map(|node| {
            let start = LocalStart {
                optional: optional(node),
                ..start
            };
            let request = NodeRequest::Start {
                key: rec.key.clone(),
                start,
            };
            let seat = match node == &self.node_id {
                true => seat_here.take(),
                false => None,
            };
            let here = async move {
                let _seat = seat.transpose()?;
                self.start_local(rec, start)
                    .await
                    .map(|_| NodeResponse::Done)
            };
            async move { (node.clone(), self.on_node(node, request, here).await) }
        }))
        .await;
        drop(booting);
        let mut full = Vec::new();
        let mut failed = None;
        for (node, result) in started {
            match result {
                Ok(_) => {}
                Err(e @ ControlError::ActiveSetFull { .. }) if !start.bootstrap => {
                    full.push(node);
                    failed.get_or_insert(e);
                }
                Err(e) => {
                    failed = Some(e);
                    full.clear();
                    break;
                }
            }
        }
        let running: Vec<ReplicaRecord> = live
            .into_iter()
            .filter(|r| !full.contains(&r.node_id))
            .collect();
        if let Some(e) = failed {
            if full.is_empty() || running.len() * 2 <= rec.replicas.len() {
                self.stop_everywhere(rec, false).await;
                return Err(e);
            }
            warn!(database = %rec.key, full = ?full, "waking without the replicas of nodes whose active set is full");
        }
        let spawned = t0.elapsed();
        match self.ready_everywhere(rec, &running).await {
            Ok(endpoints) => {
                let answered = t0.elapsed();
                let engine = rec.engine.as_str();
                WAKE_DURATION
                    .histogram([engine.into(), "start".into()])
                    .record(spawned.as_secs_f64());
                WAKE_DURATION
                    .histogram([engine.into(), "first_answer".into()])
                    .record((answered - spawned).as_secs_f64());
                Ok(Started {
                    endpoints,
                    full,
                    seat_wait,
                })
            }
            Err(e) => {
                self.stop_everywhere(rec, false).await;
                Err(e)
            }
        }
    }

    /// Starts this node's replicas of `rec`, at a peer's request, in a
    /// place of this node's active set.
    pub(super) async fn start_seated(&self, rec: &DatabaseRecord, start: LocalStart) -> Result<()> {
        let _seat = match self.runs_here(&rec.key) {
            true => None,
            false => Some(self.take_seat(&rec.key, start.optional).await?),
        };
        self.start_local(rec, start).await
    }

    /// Waits until the started replicas `live` answer a real query, and
    /// gives a Postgres database the app's roles; the endpoints, leader
    /// first.
    pub(super) async fn ready_everywhere(
        &self,
        rec: &DatabaseRecord,
        live: &[ReplicaRecord],
    ) -> Result<Vec<Endpoint>> {
        let label = rec.key.internal();
        let inst = Instance {
            label: &label,
            dir: self.db_dir(&rec.key).join(rec.engine.as_str()),
            replicas: live,
            node_id: &self.node_id,
            secret: &rec.secret,
            first_start: false,
            raft_moved: false,
            join: Vec::new(),
            non_voter: false,
            raft_id: None,
            archive: None,
        };
        let endpoints = self.engines.wait_ready(rec.engine, &inst).await?;
        if rec.engine == Engine::Postgres {
            let users = self.store.users(&rec.key.app).await?;
            self.engines
                .after_start(rec.engine, &inst, rec.key.db.as_str(), &users)
                .await?;
        }
        Ok(endpoints)
    }

    /// Has every live holder stop its replicas (and remove their data).
    pub(super) async fn stop_everywhere(&self, rec: &DatabaseRecord, remove_data: bool) {
        if rec.engine == Engine::Patroni {
            return;
        }
        let membership = self.membership().await;
        let holders: Vec<String> = cluster::holders(&rec.replicas)
            .into_iter()
            .filter(|n| membership.is_live(n))
            .collect();
        futures::future::join_all(holders.into_iter().map(|node| {
            let request = NodeRequest::Stop {
                key: rec.key.clone(),
                remove_data,
            };
            let here = async {
                self.stop_local(&rec.key, remove_data).await;
                Ok(NodeResponse::Done)
            };
            async move {
                if let Err(e) = self.on_node(&node, request, here).await {
                    warn!(database = %rec.key, node_id = %node, error = %e, "could not stop a replica");
                }
            }
        }))
        .await;
    }

    /// A registered Patroni cluster "starts" when its leader takes the
    /// app's users; nothing runs here.
    pub(super) async fn attach_patroni(&self, rec: &DatabaseRecord) -> Result<Vec<Endpoint>> {
        let reg = self.load_patroni(&rec.key).await?;
        let users = self.store.users(&rec.key.app).await?;
        engine::patroni::apply_users(&rec.key.app, &rec.replicas, &reg, &rec.secret, &users)
            .await?;
        Ok(engine::patroni::endpoints(&rec.replicas, &reg))
    }
}
