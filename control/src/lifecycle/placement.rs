//! Choosing the nodes and ports a database's replicas get, and giving
//! them back.

use rouse_control_api::*;
use tracing::info;

use super::Manager;
use crate::cluster::{NodeRequest, NodeResponse};
use crate::engine;
use crate::error::{ControlError, Result};
use crate::model::{DatabaseRecord, ReplicaRecord};

/// Where the replicas of a database are, for logs and the decision log.
pub(super) fn placement(replicas: &[ReplicaRecord]) -> String {
    replicas
        .iter()
        .map(|r| format!("{}@{}", engine::rqlite::node_id(r), r.node_id))
        .collect::<Vec<_>>()
        .join(",")
}

impl Manager {
    /// Ports for replica `idx` of a database on node `node_id`.
    pub(super) async fn allocate_on(
        &self,
        node_id: &str,
        key: &DbKey,
        engine: Engine,
        idx: u32,
        previous: Option<&ReplicaRecord>,
    ) -> Result<ReplicaRecord> {
        let request = NodeRequest::Allocate {
            key: key.clone(),
            engine,
            idx,
            previous: previous.cloned(),
        };
        let here = async {
            self.allocate_local(engine, idx, previous)
                .map(NodeResponse::Replica)
        };
        match self.on_node(node_id, request, here).await? {
            NodeResponse::Replica(r) => Ok(r),
            other => Err(ControlError::Internal(format!(
                "unexpected answer to a port request: {other:?}"
            ))),
        }
    }

    /// Ports on this node for replica `idx`, preferring `previous`'s.
    pub(super) fn allocate_local(
        &self,
        engine: Engine,
        idx: u32,
        previous: Option<&ReplicaRecord>,
    ) -> Result<ReplicaRecord> {
        if engine == Engine::Patroni {
            return Err(ControlError::Internal(
                "a Patroni cluster keeps its own addresses".into(),
            ));
        }
        let d = &self.config.database;
        let hosts = &self.config.control.replica_hosts;
        let host = hosts[idx as usize % hosts.len()];
        let (port, raft_port) = match engine {
            Engine::Rqlite => {
                let http = self.ports.allocate(
                    d.port_range_http_start..=d.port_range_http_end,
                    host,
                    previous.map(|p| p.port),
                )?;
                let raft = self
                    .ports
                    .allocate(
                        d.port_range_raft_start..=d.port_range_raft_end,
                        host,
                        previous.and_then(|p| p.raft_port),
                    )
                    .inspect_err(|_| self.ports.release([http]))?;
                (http, Some(raft))
            }
            _ => (
                self.ports.allocate(
                    d.port_range_postgres_start..=d.port_range_postgres_end,
                    host,
                    previous.map(|p| p.port),
                )?,
                None,
            ),
        };
        Ok(ReplicaRecord {
            idx,
            node_id: self.node_id.clone(),
            host: host.to_string(),
            port,
            raft_port,
        })
    }

    pub(super) fn release(&self, replicas: &[ReplicaRecord]) {
        self.ports.release(
            replicas
                .iter()
                .filter(|r| r.node_id == self.node_id)
                .flat_map(ReplicaRecord::ports),
        );
    }

    /// Ports for a wake: each live holder allocates again, preferring the
    /// previous ones; a move is recorded. Returns the record to start and
    /// whether Raft addresses moved.
    pub(super) async fn reallocate(&self, rec: &DatabaseRecord) -> Result<(DatabaseRecord, bool)> {
        if rec.engine == Engine::Patroni {
            return Ok((rec.clone(), false));
        }
        let membership = self.membership().await;
        let mut replicas = Vec::with_capacity(rec.replicas.len());
        for r in &rec.replicas {
            if !membership.is_live(&r.node_id) {
                replicas.push(r.clone());
                continue;
            }
            match self
                .allocate_on(&r.node_id, &rec.key, rec.engine, r.idx, Some(r))
                .await
            {
                Ok(new) => replicas.push(new),
                Err(e) => {
                    self.release(&replicas);
                    return Err(e);
                }
            }
        }
        let raft_moved = replicas
            .iter()
            .zip(&rec.replicas)
            .any(|(a, b)| a.raft_port != b.raft_port || a.host != b.host);
        if replicas != rec.replicas {
            info!(database = %rec.key, "previous ports taken; waking on new ones");
            if let Err(e) = self.store.set_replicas(&rec.key, &replicas).await {
                self.release(&replicas);
                return Err(e);
            }
        }
        Ok((
            DatabaseRecord {
                replicas,
                ..rec.clone()
            },
            raft_moved,
        ))
    }
}
