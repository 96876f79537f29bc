//! How much this node holds and how much more it can take: measured at
//! every health check (and sent in heartbeats), answered for the cluster by
//! `GET /capacity`.

use rouse_control_api::*;

use super::Manager;
use crate::error::Result;
use crate::model::DatabaseRecord;
use crate::process::usage;

impl Manager {
    /// Every node's capacity: this one measured now, the others as their
    /// last heartbeat said.
    pub async fn capacity(&self) -> Result<Capacity> {
        let records = self.store.databases_local(None).await?;
        let mine: Vec<&DatabaseRecord> = records
            .iter()
            .filter(|r| r.replicas.iter().any(|p| p.node_id == self.node_id))
            .collect();
        let mut nodes = vec![self.measure_capacity(&mine).await];
        for peer in self.peers.peers() {
            if let Some(cap) = peer.heartbeat.capacity {
                nodes.push(NodeCapacity {
                    healthy: peer.healthy,
                    ..cap
                });
            }
        }
        Ok(Capacity { nodes })
    }

    /// Measures this node: `mine` are the databases with a replica here.
    pub(super) async fn measure_capacity(&self, mine: &[&DatabaseRecord]) -> NodeCapacity {
        let active = mine
            .iter()
            .filter(|r| self.info(r).status == DatabaseStatus::Active)
            .count() as u32;
        let hibernating = mine
            .iter()
            .filter(|r| self.info(r).status == DatabaseStatus::Hibernating)
            .count() as u32;
        let mut engine_memory = 0;
        let mut running = 0u64;
        for (_, slot) in self.all_slots() {
            if let Ok(run) = slot.running.try_lock() {
                if let Some(run) = run.as_ref() {
                    running += 1;
                    engine_memory += run
                        .processes
                        .iter()
                        .map(|p| usage::tree_memory(p.pid()))
                        .sum::<u64>();
                }
            }
        }
        let available = usage::memory_available();
        let d = &self.config.database;
        let host = self.config.control.replica_hosts[0];
        let (ports, ranges) = (
            self.ports.clone(),
            [
                d.port_range_http_start..=d.port_range_http_end,
                d.port_range_raft_start..=d.port_range_raft_end,
                d.port_range_postgres_start..=d.port_range_postgres_end,
            ],
        );
        let [rqlite_http, rqlite_raft, postgres] = tokio::task::spawn_blocking(move || {
            let bound = crate::ports::bound_ports(host);
            ranges.map(|range| ports.free_in(range, &bound))
        })
        .await
        .unwrap_or_default();
        let ports_left = PortsLeft {
            rqlite_http,
            rqlite_raft,
            postgres,
        };
        let max = d.max_databases;
        let held = mine.len() as u32;
        NodeCapacity {
            node_id: self.node_id.clone(),
            healthy: true,
            databases: held,
            active,
            hibernating,
            max_databases: max,
            max_active_databases: self.active.max_databases as u32,
            max_active_memory_bytes: self.active.max_memory,
            engine_memory_bytes: engine_memory,
            memory_available_bytes: available,
            room: Room {
                databases: max.saturating_sub(held),
                active_by_memory: (running > 0 && engine_memory > 0)
                    .then(|| (available / (engine_memory / running).max(1)) as u32),
                rqlite_by_ports: ports_left.rqlite_http.min(ports_left.rqlite_raft),
                postgres_by_ports: ports_left.postgres,
            },
            ports_left,
        }
    }
}
