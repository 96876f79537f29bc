//! The cluster as operators see it: the node list and the scaling plan.

use rouse_control_api::*;
use rouse_runtime::clock::now_ms;

use super::settings::REPLICATION_TARGET;
use super::Manager;
use crate::error::{ControlError, Result};

impl Manager {
    pub async fn scale(&self, req: &ScaleRequest) -> Result<ScalePlan> {
        let replicas = req.min_ha_nodes.0;
        if replicas == 0 {
            return Err(ControlError::BadRequest(
                "min_ha_nodes must be at least 1".into(),
            ));
        }
        let membership = self.membership().await;
        let nodes = membership.live().len() as u32;
        // One node spreads replicas over its replica hosts; several nodes
        // put each on its own node.
        let hosts = if membership.clustered() {
            nodes
        } else {
            self.config.control.replica_hosts.len() as u32
        };
        if replicas > hosts {
            return Err(ControlError::InsufficientNodes {
                got: hosts,
                need: replicas,
            });
        }
        self.store
            .set_setting(REPLICATION_TARGET, &replicas.to_string())
            .await?;
        let current = self.store.databases_local(None).await?.len() as u32;
        let capacity: u32 = membership.live().iter().map(|m| m.max_databases).sum();
        let mut notes = vec![format!(
            "new rqlite databases get {} replicas unless they ask otherwise",
            replicas
        )];
        // Across nodes each replica takes a place on its node.
        let fits = if membership.clustered() {
            req.target_db_count.saturating_mul(replicas) <= capacity
        } else {
            req.target_db_count <= capacity
        };
        if !fits {
            notes.push(format!(
                "{} databases exceed the live nodes' max_databases of {capacity} in all: add nodes or raise the limit",
                req.target_db_count
            ));
        }
        Ok(ScalePlan {
            target_db_count: req.target_db_count,
            replication_factor: replicas,
            nodes,
            capacity,
            current_databases: current,
            replicas_needed: req.target_db_count.saturating_mul(replicas),
            fits,
            notes,
        })
    }

    /// This node, then every peer heard from (healthy or not).
    pub async fn nodes(&self) -> Result<NodeList> {
        let local = self.local_node();
        let nodes = self.peers.nodes(local);
        let coordinator = match self.membership().await.coordinator() {
            None => self.node_id.clone(),
            Some(peer) => nodes
                .iter()
                .find(|n| n.peer_id == peer.to_string())
                .map(|n| n.node_id.clone())
                .unwrap_or_default(),
        };
        Ok(NodeList { nodes, coordinator })
    }

    /// This node's capacity and load as its heartbeats say them (kept
    /// current by the upkeep loop), so that `/nodes` answers even while
    /// `_system` has no leader.
    pub(super) fn local_node(&self) -> NodeInfo {
        let beat = self.peers.local();
        NodeInfo {
            node_id: self.node_id.clone(),
            api_addr: self.config.control.api_addr.to_string(),
            healthy: true,
            max_databases: self.config.database.max_databases,
            databases: beat.databases,
            active_databases: beat.active_databases,
            last_seen: now_ms(),
            peer_id: String::new(),
            addresses: Vec::new(),
        }
    }
}
