//! Control daemons of several nodes find each other over libp2p and keep a
//! health view of one another.
//!
//! Each daemon listens on `node.listen_addresses`, dials
//! `discovery.bootstrap_peers` (with or without their `/p2p/<peer id>`
//! suffix) and re-dials every `discovery.discovery_interval` whatever it is
//! not connected to. Every `discovery.health_check_interval` it publishes a
//! small JSON [`Heartbeat`] on the gossipsub topic [`HEALTH_TOPIC`]; a peer
//! whose last heartbeat is older than [`MISSED_CHECKS`] intervals is
//! unhealthy. Peers learn one another's addresses from heartbeats and
//! identify and connect directly, so that losing the bootstrap node does not
//! split the others.
//!
//! The peer id comes from an ed25519 key kept in `<data_dir>/p2p_key`, so
//! that a restarted node is the same peer to the others.
//!
//! The network is private: every connection starts with libp2p's
//! pre-shared-key handshake (a key derived from the cluster key), so a host
//! without the cluster key cannot complete one. With
//! `discovery.allowed_peers` set, other peers are disconnected and their
//! messages ignored even when they hold the key.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use libp2p::gossipsub::IdentTopic;
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use rouse_config::Config;
use rouse_control_api::types::NodeInfo;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::key::load_or_create_key;
use super::protocol::{
    NodeRequest, NodeResponse, ACTIVITY_TOPIC, CLUSTER_TOPIC, EVENTS_TOPIC, HEALTH_TOPIC,
    MISSED_CHECKS,
};
use super::swarm::{build_swarm, parse_addr, Bootstrap, SwarmTask, MIN_INTERVAL};
use super::wire::{Heartbeat, Inbound, PeerView, PeersError, SystemMember};

/// A peer as the last heartbeat described it.
pub(super) struct Known {
    pub(super) heartbeat: Heartbeat,
    /// Our clock, not the sender's: health must not depend on clock skew.
    pub(super) received: Instant,
    pub(super) received_ms: u64,
    /// What the last health sweep found, to log transitions once.
    pub(super) healthy: bool,
}

#[derive(Default)]
pub(super) struct View {
    pub(super) listen: Vec<Multiaddr>,
    pub(super) peers: HashMap<PeerId, Known>,
}

pub(super) struct PeerState {
    pub(super) peer_id: PeerId,
    pub(super) health_check_interval: Duration,
    pub(super) view: Mutex<View>,
    /// What this node's heartbeats say; kept current by its manager.
    pub(super) local: Mutex<Heartbeat>,
}

impl PeerState {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        // The view holds no invariant a panicking writer could break.
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn unhealthy_after(&self) -> Duration {
        self.health_check_interval * MISSED_CHECKS
    }

    /// This node's heartbeat as of now, with its current listen addresses.
    pub(super) fn heartbeat(&self) -> Heartbeat {
        let mut beat = self.local.lock().unwrap_or_else(|e| e.into_inner()).clone();
        beat.addresses = self.lock().listen.iter().map(|a| a.to_string()).collect();
        beat
    }
}

pub(super) enum Command {
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), PeersError>>,
    },
    Request {
        peer: PeerId,
        /// Boxed: a create request is much larger than the other commands.
        request: Box<NodeRequest>,
        reply: oneshot::Sender<Result<NodeResponse, PeersError>>,
    },
}

/// A reply the manager is still working on, and where it goes.
pub(super) type PendingReply = futures::future::BoxFuture<
    'static,
    (
        Result<NodeResponse, oneshot::error::RecvError>,
        ResponseChannel<NodeResponse>,
    ),
>;

/// Handle on the peer-to-peer task; cheap to clone.
#[derive(Clone)]
pub struct Peers {
    shared: Arc<PeerState>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Peers {
    /// Loads (or makes) the node's key, listens on `node.listen_addresses`
    /// and spawns the swarm task. Fails on a bad address or a port in use,
    /// so that a misconfigured node is refused at start. Requests and gossip
    /// from peers arrive on the returned receiver.
    pub fn start(
        config: &Config,
        node_id: &str,
        network_key: [u8; 32],
    ) -> Result<(Peers, JoinHandle<()>, mpsc::UnboundedReceiver<Inbound>), PeersError> {
        let key = load_or_create_key(&config.node.data_dir)?;
        let peer_id = key.public().to_peer_id();
        let allowed = config
            .discovery
            .allowed_peers
            .iter()
            .map(|p| {
                PeerId::from_str(p.trim()).map_err(|e| PeersError::BadAddress {
                    key: "discovery.allowed_peers",
                    addr: p.clone(),
                    message: e.to_string(),
                })
            })
            .collect::<Result<std::collections::HashSet<_>, _>>()?;
        let listen = config
            .node
            .listen_addresses
            .iter()
            .map(|a| parse_addr("node.listen_addresses", a))
            .collect::<Result<Vec<_>, _>>()?;
        let bootstrap = config
            .discovery
            .bootstrap_peers
            .iter()
            .map(|a| Bootstrap::parse(a))
            .collect::<Result<Vec<_>, _>>()?;
        let health = config.discovery.health_check_interval.max(MIN_INTERVAL);
        let discovery = config.discovery.discovery_interval.max(MIN_INTERVAL);
        if config.discovery.mdns {
            // Not built in: bootstrap peers are the supported discovery.
            warn!("discovery.mdns is not supported by this build; use discovery.bootstrap_peers");
        }
        // A request may wait for an engine to start (create, wake).
        let request_timeout = config.control.start_timeout * 2 + Duration::from_secs(10);

        let mut swarm = build_swarm(key, health, request_timeout, network_key)?;
        for addr in listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| PeersError::Listen {
                    addr,
                    message: e.to_string(),
                })?;
        }
        for topic in [HEALTH_TOPIC, EVENTS_TOPIC, ACTIVITY_TOPIC, CLUSTER_TOPIC] {
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&IdentTopic::new(topic))
                .map_err(|e| PeersError::Setup(format!("cannot subscribe to {topic}: {e}")))?;
        }

        let shared = Arc::new(PeerState {
            peer_id,
            health_check_interval: health,
            view: Mutex::new(View::default()),
            local: Mutex::new(Heartbeat {
                node_id: node_id.to_string(),
                peer_id: peer_id.to_string(),
                api_addr: config.control.api_addr.to_string(),
                max_databases: config.database.max_databases,
                databases: 0,
                active_databases: 0,
                addresses: Vec::new(),
                replica_host: config.control.replica_hosts[0].to_string(),
                system: None,
                capacity: None,
            }),
        });
        let (commands, rx) = mpsc::unbounded_channel();
        let (inbound, inbound_rx) = mpsc::unbounded_channel();
        let task = SwarmTask {
            swarm,
            shared: shared.clone(),
            bootstrap,
            commands: rx,
            discovery_interval: discovery,
            inbound,
            requests: HashMap::new(),
            replies: FuturesUnordered::new(),
            allowed,
        };
        info!(peer_id = %peer_id, "peer-to-peer ready");
        Ok((
            Peers { shared, commands },
            tokio::spawn(task.run()),
            inbound_rx,
        ))
    }

    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    pub fn health_check_interval(&self) -> Duration {
        self.shared.health_check_interval
    }

    /// The addresses this node listens on, as the swarm reports them
    /// (`0.0.0.0` expanded to each interface).
    pub fn listen_addresses(&self) -> Vec<String> {
        self.shared
            .lock()
            .listen
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// Updates what this node's heartbeats say about its load.
    pub fn set_load(&self, capacity: rouse_control_api::NodeCapacity) {
        let mut local = self.shared.local.lock().unwrap_or_else(|e| e.into_inner());
        local.databases = capacity.databases;
        local.active_databases = capacity.active;
        local.capacity = Some(capacity);
    }

    /// Announces this node's `_system` member in its heartbeats.
    pub fn set_system(&self, member: SystemMember) {
        self.shared
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .system = Some(member);
    }

    /// What this node's heartbeats say now.
    pub fn local(&self) -> Heartbeat {
        self.shared.heartbeat()
    }

    /// Every peer heard from, healthy or not.
    pub fn peers(&self) -> Vec<PeerView> {
        let limit = self.shared.unhealthy_after();
        self.shared
            .lock()
            .peers
            .iter()
            .map(|(peer_id, k)| PeerView {
                peer_id: *peer_id,
                healthy: k.received.elapsed() <= limit,
                heartbeat: k.heartbeat.clone(),
            })
            .collect()
    }

    /// Publishes `data` on gossipsub `topic`. Peers receive it only if they
    /// subscribe to the topic.
    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<(), PeersError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Publish {
                topic: topic.to_string(),
                data,
                reply,
            })
            .map_err(|_| PeersError::Stopped)?;
        rx.await.map_err(|_| PeersError::Stopped)?
    }

    /// Publishes without waiting; a node without peers drops it.
    pub fn gossip(&self, topic: &str, data: Vec<u8>) {
        let (reply, _) = oneshot::channel();
        let _ = self.commands.send(Command::Publish {
            topic: topic.to_string(),
            data,
            reply,
        });
    }

    /// Sends `request` to `peer` and waits for its answer.
    pub async fn request(
        &self,
        peer: PeerId,
        request: NodeRequest,
    ) -> Result<NodeResponse, PeersError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Request {
                peer,
                request: Box::new(request),
                reply,
            })
            .map_err(|_| PeersError::Stopped)?;
        rx.await.map_err(|_| PeersError::Stopped)?
    }

    /// This node (`local`, completed with its peer id and addresses) first,
    /// then every peer that ever sent a heartbeat, healthy or not, by node id.
    pub fn nodes(&self, mut local: NodeInfo) -> Vec<NodeInfo> {
        local.peer_id = self.shared.peer_id.to_string();
        local.addresses = self.listen_addresses();
        let limit = self.shared.unhealthy_after();
        let view = self.shared.lock();
        let mut peers: Vec<NodeInfo> = view
            .peers
            .iter()
            .map(|(peer_id, k)| NodeInfo {
                node_id: k.heartbeat.node_id.clone(),
                api_addr: k.heartbeat.api_addr.clone(),
                healthy: k.received.elapsed() <= limit,
                max_databases: k.heartbeat.max_databases,
                databases: k.heartbeat.databases,
                active_databases: k.heartbeat.active_databases,
                last_seen: k.received_ms,
                peer_id: peer_id.to_string(),
                addresses: k.heartbeat.addresses.clone(),
            })
            .collect();
        peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let mut nodes = vec![local];
        nodes.extend(peers);
        nodes
    }
}
