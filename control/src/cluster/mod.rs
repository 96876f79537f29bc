//! Several nodes: who decides (the coordinator, lowest live peer id), where
//! replicas go (distinct nodes with capacity), and what nodes ask of each
//! other over libp2p.
//!
//! Lifecycle decisions (create, wake, hibernate, drop, replacing a dead
//! node's replicas) are made by the coordinator, which records them in
//! `_system` before acting. Work on replicas is done by the node that holds
//! them, at the coordinator's request. A single node is its own coordinator
//! and the holder of every replica, through the same code.

mod key;
mod peers;
mod protocol;
mod swarm;
mod wire;

pub use peers::Peers;
pub use protocol::*;
pub use wire::{Heartbeat, Inbound, PeerView, PeersError, SystemMember};

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use rouse_control_api::Endpoint;

use crate::error::{ControlError, Result};
use crate::model::ReplicaRecord;

/// A node that can take replicas.
#[derive(Debug, Clone)]
pub struct Member {
    pub node_id: String,
    /// `None`: this node.
    pub peer: Option<PeerId>,
    pub max_databases: u32,
    /// Whether its active set has a free place: a database started there
    /// puts no other to sleep.
    pub active_room: bool,
}

/// This node's view of the cluster, taken once per decision.
pub struct Membership {
    me: String,
    my_peer: PeerId,
    my_max: u32,
    my_active_room: bool,
    peers: Vec<PeerView>,
    /// Peers may be unknown for a while after this node starts: only a
    /// node seen unhealthy, or unheard of for long, counts as down.
    settled: bool,
    clustered: bool,
}

impl Membership {
    /// Only peers recorded in `_system` as `members` take part: a holder
    /// of the cluster key that is not one can neither coordinate nor be
    /// given replicas. `room`: this node's `max_databases` and whether its
    /// active set has a free place.
    pub fn new(
        peers: &Peers,
        members: &HashSet<PeerId>,
        me: &str,
        (max_databases, active_room): (u32, bool),
        started: Instant,
        has_bootstrap: bool,
    ) -> Membership {
        let mut views = peers.peers();
        views.retain(|p| members.contains(&p.peer_id));
        let settle = peers.health_check_interval() * (MISSED_CHECKS * 2);
        Membership::of(
            (me, peers.peer_id(), max_databases, active_room),
            views,
            started.elapsed() > settle.max(Duration::from_secs(1)),
            has_bootstrap,
        )
    }

    /// This node (`me`: node id, peer id, capacity, active room) and the
    /// member peers it sees; `settled` once unheard-of peers count as down.
    fn of(
        (me, my_peer, my_max, my_active_room): (&str, PeerId, u32, bool),
        peers: Vec<PeerView>,
        settled: bool,
        has_bootstrap: bool,
    ) -> Membership {
        Membership {
            me: me.to_string(),
            my_peer,
            my_max,
            my_active_room,
            clustered: has_bootstrap || !peers.is_empty(),
            peers,
            settled,
        }
    }

    /// Whether this node has (or is meant to have) peers: replicas then go
    /// to distinct nodes instead of this node's replica hosts.
    pub fn clustered(&self) -> bool {
        self.clustered
    }

    /// The node that decides now: `None` for this node.
    pub fn coordinator(&self) -> Option<PeerId> {
        let lowest = self
            .peers
            .iter()
            .filter(|p| p.healthy)
            .map(|p| p.peer_id)
            .min()?;
        (lowest < self.my_peer).then_some(lowest)
    }

    pub fn peer_of(&self, node_id: &str) -> Option<PeerId> {
        self.peers
            .iter()
            .find(|p| p.heartbeat.node_id == node_id)
            .map(|p| p.peer_id)
    }

    /// Whether `node_id` is up as far as this node can tell.
    pub fn is_live(&self, node_id: &str) -> bool {
        if node_id == self.me {
            return true;
        }
        match self.peers.iter().find(|p| p.heartbeat.node_id == node_id) {
            Some(p) => p.healthy,
            None => !self.settled,
        }
    }

    /// Nodes that can take a replica now: this one and every healthy peer.
    pub fn live(&self) -> Vec<Member> {
        let mut out = vec![Member {
            node_id: self.me.clone(),
            peer: None,
            max_databases: self.my_max,
            active_room: self.my_active_room,
        }];
        out.extend(self.peers.iter().filter(|p| p.healthy).map(|p| Member {
            node_id: p.heartbeat.node_id.clone(),
            peer: Some(p.peer_id),
            max_databases: p.heartbeat.max_databases,
            active_room:
                p.heartbeat.capacity.as_ref().is_none_or(|c| {
                    c.max_active_databases == 0 || c.active < c.max_active_databases
                }),
        }));
        out
    }

    /// Live nodes whose active set is full: a replica moved off a full node
    /// does not go to another.
    pub fn without_active_room(&self) -> HashSet<String> {
        self.live()
            .into_iter()
            .filter(|m| !m.active_room)
            .map(|m| m.node_id)
            .collect()
    }

    /// `count` distinct live nodes with room for one more database, those
    /// with a free place in their active set first, then the least loaded
    /// (ties by node id, so every coordinator agrees), skipping `exclude`.
    /// `load` counts the databases each node holds.
    pub fn place(
        &self,
        count: u32,
        load: &HashMap<String, u32>,
        exclude: &HashSet<String>,
    ) -> Result<Vec<Member>> {
        let mut fit: Vec<Member> = self
            .live()
            .into_iter()
            .filter(|m| !exclude.contains(&m.node_id))
            .filter(|m| load.get(&m.node_id).copied().unwrap_or(0) < m.max_databases)
            .collect();
        if (fit.len() as u32) < count {
            return Err(ControlError::InsufficientNodes {
                got: fit.len() as u32,
                need: count,
            });
        }
        fit.sort_by(|a, b| {
            let la = load.get(&a.node_id).copied().unwrap_or(0);
            let lb = load.get(&b.node_id).copied().unwrap_or(0);
            (!a.active_room, la)
                .cmp(&(!b.active_room, lb))
                .then_with(|| a.node_id.cmp(&b.node_id))
        });
        fit.truncate(count as usize);
        Ok(fit)
    }
}

/// Whether every endpoint is one of `replicas` (host and port): a peer's
/// word on where a database's leader is counts only within what `_system`
/// records.
pub fn endpoints_agree(replicas: &[ReplicaRecord], endpoints: &[Endpoint]) -> bool {
    endpoints.iter().all(|e| {
        replicas
            .iter()
            .any(|r| r.host == e.host && r.port == e.port)
    })
}

/// The distinct nodes holding `replicas`, in replica order.
pub fn holders(replicas: &[ReplicaRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in replicas {
        if !out.contains(&r.node_id) {
            out.push(r.node_id.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(idx: u32, port: u16) -> ReplicaRecord {
        ReplicaRecord {
            idx,
            node_id: format!("n{idx}"),
            host: "127.0.0.2".into(),
            port,
            raft_port: Some(port + 1000),
        }
    }

    fn endpoint(host: &str, port: u16) -> Endpoint {
        Endpoint {
            tls: false,
            node_id: "n0".into(),
            host: host.into(),
            port,
            raft_port: None,
            api: None,
            leader: true,
        }
    }

    #[test]
    fn a_gossiped_leader_must_be_one_of_the_recorded_replicas() {
        let replicas = [replica(0, 5001), replica(1, 5003)];
        assert!(endpoints_agree(&replicas, &[endpoint("127.0.0.2", 5003)]));
        assert!(endpoints_agree(&replicas, &[]));
        // Another database's engine, or the right port on another host.
        assert!(!endpoints_agree(&replicas, &[endpoint("127.0.0.2", 5099)]));
        assert!(!endpoints_agree(&replicas, &[endpoint("127.0.0.9", 5001)]));
        assert!(!endpoints_agree(
            &replicas,
            &[endpoint("127.0.0.2", 5001), endpoint("10.0.0.1", 5003)]
        ));
    }

    fn peer(node: &str, max_databases: u32, healthy: bool) -> PeerView {
        let peer_id = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        PeerView {
            peer_id,
            healthy,
            heartbeat: Heartbeat {
                node_id: node.into(),
                peer_id: peer_id.to_string(),
                api_addr: String::new(),
                max_databases,
                databases: 0,
                active_databases: 0,
                addresses: Vec::new(),
                replica_host: String::new(),
                system: None,
                capacity: None,
            },
        }
    }

    fn me() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn nodes(members: &[Member]) -> Vec<&str> {
        members.iter().map(|m| m.node_id.as_str()).collect()
    }

    #[test]
    fn placement_takes_the_least_loaded_live_nodes_with_room() {
        let peers = vec![
            peer("b", 10, true),
            peer("c", 10, true),
            peer("d", 10, false),
        ];
        let m = Membership::of(("a", me(), 10, true), peers, true, true);
        let load = HashMap::from([("a".to_string(), 5), ("b".to_string(), 1)]);
        let none = HashSet::new();
        // c holds nothing, b one, a five; d is down.
        assert_eq!(nodes(&m.place(2, &load, &none).unwrap()), ["c", "b"]);
        assert_eq!(nodes(&m.place(3, &load, &none).unwrap()), ["c", "b", "a"]);
        // A replacement skips the nodes that already hold the database.
        let held = HashSet::from(["c".to_string()]);
        assert_eq!(nodes(&m.place(1, &load, &held).unwrap()), ["b"]);
        // Ties go by node id, so that every coordinator places alike.
        let even = HashMap::new();
        assert_eq!(nodes(&m.place(2, &even, &none).unwrap()), ["a", "b"]);
    }

    #[test]
    fn placement_prefers_nodes_whose_active_set_has_room() {
        let mut busy = peer("b", 10, true);
        busy.heartbeat.capacity = Some(rouse_control_api::NodeCapacity {
            active: 5,
            max_active_databases: 5,
            ..Default::default()
        });
        let m = Membership::of(
            ("a", me(), 10, false),
            vec![busy, peer("c", 10, true)],
            true,
            true,
        );
        let load = HashMap::from([("c".to_string(), 7)]);
        let none = HashSet::new();
        // c holds the most but is the only one with a free place.
        assert_eq!(nodes(&m.place(1, &load, &none).unwrap()), ["c"]);
        // Full nodes still take replicas when nothing else can.
        assert_eq!(nodes(&m.place(3, &load, &none).unwrap()), ["c", "a", "b"]);
        let full = m.without_active_room();
        assert_eq!(full, HashSet::from(["a".to_string(), "b".to_string()]));
    }

    #[test]
    fn placement_refuses_when_too_few_nodes_have_room() {
        let peers = vec![peer("b", 1, true), peer("c", 10, false)];
        let m = Membership::of(("a", me(), 2, true), peers, true, true);
        let full = HashMap::from([("a".to_string(), 2), ("b".to_string(), 0)]);
        match m.place(2, &full, &HashSet::new()) {
            Err(ControlError::InsufficientNodes { got: 1, need: 2 }) => {}
            other => panic!("expected insufficient nodes, got {other:?}"),
        }
        assert_eq!(nodes(&m.place(1, &full, &HashSet::new()).unwrap()), ["b"]);
    }

    #[test]
    fn the_lowest_healthy_peer_id_coordinates() {
        let peers = vec![
            peer("b", 10, true),
            peer("c", 10, true),
            peer("d", 10, false),
        ];
        let lowest_healthy = peers
            .iter()
            .filter(|p| p.healthy)
            .map(|p| p.peer_id)
            .min()
            .unwrap();
        let mine = me();
        let m = Membership::of(("a", mine, 10, true), peers.clone(), true, true);
        match m.coordinator() {
            None => assert!(
                mine < lowest_healthy,
                "this node coordinates only when lowest"
            ),
            Some(c) => assert_eq!(c, lowest_healthy),
        }
        // Alone, a node is its own coordinator and not clustered.
        let alone = Membership::of(("a", mine, 10, true), Vec::new(), true, false);
        assert_eq!(alone.coordinator(), None);
        assert!(!alone.clustered());
    }

    #[test]
    fn an_unheard_of_node_counts_as_live_only_until_the_view_settles() {
        let peers = vec![peer("b", 10, false)];
        let early = Membership::of(("a", me(), 10, true), peers.clone(), false, true);
        assert!(early.is_live("a") && early.is_live("x") && !early.is_live("b"));
        let settled = Membership::of(("a", me(), 10, true), peers, true, true);
        assert!(settled.is_live("a") && !settled.is_live("x") && !settled.is_live("b"));
    }
}
