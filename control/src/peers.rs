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
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use libp2p::core::upgrade::Version;
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    identify, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, Transport,
};
use rouse_control_api::config::Config;
use rouse_control_api::types::NodeInfo;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use crate::clock::now_ms;
use crate::cluster::{NodeRequest, NodeResponse};

/// The gossipsub topic of the heartbeats.
pub const HEALTH_TOPIC: &str = "rouse/health";

/// Status changes, leader changes and the like, as control's `/events`
/// carries them, so that proxies on every node learn them.
pub const EVENTS_TOPIC: &str = "rouse/events";

/// What proxies report about their databases, so that the coordinator sees
/// the activity of every node before it hibernates anything.
pub const ACTIVITY_TOPIC: &str = "rouse/activity";

/// The coordinator's notices (see [`crate::cluster::Notice`]).
pub const CLUSTER_TOPIC: &str = "rouse/cluster";

/// Node-to-node requests (lifecycle decisions, work on replicas).
const RPC_PROTOCOL: &str = "/rouse/node/1";

/// Health checks a peer may miss before it counts as unhealthy.
pub const MISSED_CHECKS: u32 = 3;

/// The node's libp2p key, under `node.data_dir`.
const KEY_FILE: &str = "p2p_key";

/// Identify protocol version: peers of another protocol family are not ours.
const PROTOCOL_VERSION: &str = "/rouse/1.0.0";

#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    #[error("cannot {what} the libp2p key {path}: {source}")]
    KeyIo {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the libp2p key {path} is not a valid key: {message}")]
    KeyDecode { path: PathBuf, message: String },
    #[error("{key}: `{addr}` is not a valid multiaddr: {message}")]
    BadAddress {
        key: &'static str,
        addr: String,
        message: String,
    },
    #[error("cannot set up libp2p: {0}")]
    Setup(String),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: Multiaddr, message: String },
    #[error("cannot publish on {topic}: {message}")]
    Publish { topic: String, message: String },
    #[error("request to peer {peer} failed: {message}")]
    Request { peer: PeerId, message: String },
    /// No connection to the peer could be made: nothing was sent.
    #[error("cannot dial peer {peer}: {message}")]
    Dial { peer: PeerId, message: String },
    #[error("the peer-to-peer task has stopped")]
    Stopped,
}

/// What a node tells its peers about itself every health check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: String,
    pub peer_id: String,
    pub api_addr: String,
    pub max_databases: u32,
    pub databases: u32,
    pub active_databases: u32,
    /// The sender's listen addresses, so that receivers can dial it directly.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Where the sender runs replicas (its first `control.replica_hosts`).
    #[serde(default)]
    pub replica_host: String,
    /// The sender's member of the `_system` cluster, once it runs one.
    #[serde(default)]
    pub system: Option<SystemMember>,
}

/// A node's member of the `_system` rqlite cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemMember {
    pub raft_addr: String,
    pub voter: bool,
}

/// A peer as this node sees it now.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub peer_id: PeerId,
    pub healthy: bool,
    pub heartbeat: Heartbeat,
}

/// What peers send this node: requests to answer and gossip to apply.
pub enum Inbound {
    Request {
        from: PeerId,
        request: NodeRequest,
        reply: oneshot::Sender<NodeResponse>,
    },
    Gossip {
        /// The signed source of the message (not the peer that relayed it).
        from: PeerId,
        topic: String,
        data: Vec<u8>,
    },
}

/// A peer as the last heartbeat described it.
struct Known {
    heartbeat: Heartbeat,
    /// Our clock, not the sender's: health must not depend on clock skew.
    received: Instant,
    received_ms: u64,
    /// What the last health sweep found, to log transitions once.
    healthy: bool,
}

#[derive(Default)]
struct View {
    listen: Vec<Multiaddr>,
    peers: HashMap<PeerId, Known>,
}

struct Shared {
    peer_id: PeerId,
    health_check_interval: Duration,
    view: Mutex<View>,
    /// What this node's heartbeats say; kept current by its manager.
    local: Mutex<Heartbeat>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        // The view holds no invariant a panicking writer could break.
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unhealthy_after(&self) -> Duration {
        self.health_check_interval * MISSED_CHECKS
    }

    /// This node's heartbeat as of now, with its current listen addresses.
    fn heartbeat(&self) -> Heartbeat {
        let mut beat = self.local.lock().unwrap_or_else(|e| e.into_inner()).clone();
        beat.addresses = self.lock().listen.iter().map(|a| a.to_string()).collect();
        beat
    }
}

enum Command {
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), PeersError>>,
    },
    Request {
        peer: PeerId,
        request: NodeRequest,
        reply: oneshot::Sender<Result<NodeResponse, PeersError>>,
    },
}

/// A reply the manager is still working on, and where it goes.
type PendingReply = futures::future::BoxFuture<
    'static,
    (
        Result<NodeResponse, oneshot::error::RecvError>,
        ResponseChannel<NodeResponse>,
    ),
>;

/// Handle on the peer-to-peer task; cheap to clone.
#[derive(Clone)]
pub struct Peers {
    shared: Arc<Shared>,
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

        let shared = Arc::new(Shared {
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
    pub fn set_load(&self, databases: u32, active_databases: u32) {
        let mut local = self.shared.local.lock().unwrap_or_else(|e| e.into_inner());
        local.databases = databases;
        local.active_databases = active_databases;
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
                request,
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

/// Intervals below this would flood the network for nothing.
const MIN_INTERVAL: Duration = Duration::from_millis(50);

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    gossipsub: gossipsub::Behaviour,
    rpc: request_response::json::Behaviour<NodeRequest, NodeResponse>,
}

fn build_swarm(
    key: Keypair,
    health: Duration,
    request_timeout: Duration,
    network_key: [u8; 32],
) -> Result<Swarm<Behaviour>, PeersError> {
    let setup = |e: &dyn std::fmt::Display| PeersError::Setup(e.to_string());
    let gossip_config = gossipsub::ConfigBuilder::default()
        // The mesh is repaired on this beat: no slower than health checks,
        // so that a restarted peer is back in the mesh before it is missed.
        .heartbeat_interval(health.min(Duration::from_secs(1)))
        .validation_mode(ValidationMode::Strict)
        .build()
        .map_err(|e| setup(&e))?;
    let behaviour = Behaviour {
        identify: identify::Behaviour::new(identify::Config::new(
            PROTOCOL_VERSION.into(),
            key.public(),
        )),
        // Signed messages: a heartbeat's source is the authenticated sender.
        gossipsub: gossipsub::Behaviour::new(
            MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )
        .map_err(|e| setup(&e))?,
        rpc: request_response::json::Behaviour::new(
            [(StreamProtocol::new(RPC_PROTOCOL), ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(request_timeout),
        ),
    };
    // Heartbeats keep connections busy; the timeout only closes connections
    // to peers that stopped talking altogether.
    let idle = (health * 10).max(Duration::from_secs(60));
    let psk = PreSharedKey::new(network_key);
    let noise = noise::Config::new(&key).map_err(|e| setup(&e))?;
    let transport = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
        .upgrade(Version::V1)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .timeout(Duration::from_secs(20));
    Ok(SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| setup(&e))?
        .with_behaviour(|_| behaviour)
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build())
}

fn parse_addr(key: &'static str, addr: &str) -> Result<Multiaddr, PeersError> {
    Multiaddr::from_str(addr.trim()).map_err(|e| PeersError::BadAddress {
        key,
        addr: addr.to_string(),
        message: e.to_string(),
    })
}

/// A configured bootstrap peer.
struct Bootstrap {
    /// Without the `/p2p/...` suffix.
    addr: Multiaddr,
    /// From the config, or learned from the first connection.
    peer: Option<PeerId>,
    /// The config named the peer: a different peer there is an error, not a
    /// replacement.
    given: bool,
    dialing: Option<ConnectionId>,
    /// The entry is this node itself (a shared list of bootstrap peers).
    is_self: bool,
}

impl Bootstrap {
    fn parse(text: &str) -> Result<Bootstrap, PeersError> {
        let mut addr = parse_addr("discovery.bootstrap_peers", text)?;
        let peer = match addr.iter().last() {
            Some(Protocol::P2p(id)) => {
                addr.pop();
                Some(id)
            }
            _ => None,
        };
        Ok(Bootstrap {
            addr,
            given: peer.is_some(),
            peer,
            dialing: None,
            is_self: false,
        })
    }
}

struct SwarmTask {
    swarm: Swarm<Behaviour>,
    shared: Arc<Shared>,
    bootstrap: Vec<Bootstrap>,
    commands: mpsc::UnboundedReceiver<Command>,
    discovery_interval: Duration,
    inbound: mpsc::UnboundedSender<Inbound>,
    /// Outbound requests waiting for their answer.
    requests: HashMap<OutboundRequestId, oneshot::Sender<Result<NodeResponse, PeersError>>>,
    replies: FuturesUnordered<PendingReply>,
    /// `discovery.allowed_peers`; empty: every holder of the cluster key.
    allowed: std::collections::HashSet<PeerId>,
}

impl SwarmTask {
    /// Whether `peer` may talk to this node at all.
    fn allows(&self, peer: &PeerId) -> bool {
        self.allowed.is_empty() || self.allowed.contains(peer)
    }

    async fn run(mut self) {
        let mut redial = tokio::time::interval(self.discovery_interval);
        redial.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(self.shared.health_check_interval);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.command(command),
                    // Every handle is gone: the daemon is shutting down.
                    None => break,
                },
                _ = redial.tick() => self.redial(),
                _ = sweep.tick() => {
                    self.sweep();
                    self.heartbeat();
                }
                Some((answer, channel)) = self.replies.next(), if !self.replies.is_empty() => {
                    let answer = answer.unwrap_or_else(|_| NodeResponse::Failed(
                        crate::error::ControlError::Internal("the request was dropped".into()),
                    ));
                    if self.swarm.behaviour_mut().rpc.send_response(channel, answer).is_err() {
                        debug!("a peer left before its answer was ready");
                    }
                }
                event = self.swarm.select_next_some() => self.event(event),
            }
        }
    }

    /// Tells the peers this node lives, and what it holds.
    fn heartbeat(&mut self) {
        let beat = self.shared.heartbeat();
        let data = serde_json::to_vec(&beat).expect("plain struct serialises");
        // Alone (no peers yet) is normal for a single node.
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(IdentTopic::new(HEALTH_TOPIC), data)
        {
            debug!(error = %e, "heartbeat not sent");
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Publish { topic, data, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(IdentTopic::new(topic.clone()), data)
                    .map(|_| ())
                    .map_err(|e| PeersError::Publish {
                        topic,
                        message: e.to_string(),
                    });
                let _ = reply.send(result);
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
                self.requests.insert(id, reply);
            }
        }
    }

    fn rpc(&mut self, event: request_response::Event<NodeRequest, NodeResponse>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if !self.allows(&peer) {
                    refused("request", &peer);
                    return;
                }
                let (reply, answer) = oneshot::channel();
                if self
                    .inbound
                    .send(Inbound::Request {
                        from: peer,
                        request,
                        reply,
                    })
                    .is_ok()
                {
                    self.replies
                        .push(Box::pin(async move { (answer.await, channel) }));
                }
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.requests.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.requests.remove(&request_id) {
                    let message = error.to_string();
                    let _ = reply.send(Err(match error {
                        request_response::OutboundFailure::DialFailure => {
                            PeersError::Dial { peer, message }
                        }
                        _ => PeersError::Request { peer, message },
                    }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!(peer_id = %peer, error = %error, "answer to a peer failed")
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// Dials the bootstrap peers and every known peer we are not connected
    /// to, so that a restarted or reachable-again peer comes back.
    fn redial(&mut self) {
        let listen = self.shared.lock().listen.clone();
        for b in &mut self.bootstrap {
            if b.is_self || b.dialing.is_some() || listen.contains(&b.addr) {
                continue;
            }
            if b.peer.is_some_and(|p| self.swarm.is_connected(&p)) {
                continue;
            }
            let opts = match (b.given, b.peer) {
                (true, Some(peer)) => DialOpts::peer_id(peer)
                    .addresses(vec![b.addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                // A learned id may be stale (the node there got a new key):
                // dial the address and take whoever answers.
                _ => DialOpts::unknown_peer_id().address(b.addr.clone()).build(),
            };
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => b.dialing = Some(id),
                Err(e) => debug!(addr = %b.addr, error = %e, "cannot dial bootstrap peer"),
            }
        }
        let known: Vec<(PeerId, Vec<Multiaddr>)> = self
            .shared
            .lock()
            .peers
            .iter()
            .filter(|(peer, _)| !self.swarm.is_connected(peer))
            .map(|(peer, k)| (*peer, addrs_of(&k.heartbeat)))
            .collect();
        for (peer, addrs) in known {
            self.dial_known(peer, addrs);
        }
    }

    fn dial_known(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            // Identify remembers the addresses the peer announced.
            .extend_addresses_through_behaviour()
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(peer_id = %peer, error = %e, "cannot dial peer");
        }
    }

    /// Logs peers that went unhealthy or came back since the last sweep.
    fn sweep(&mut self) {
        let limit = self.shared.unhealthy_after();
        let mut view = self.shared.lock();
        for (peer, k) in view.peers.iter_mut() {
            let healthy = k.received.elapsed() <= limit;
            if k.healthy && !healthy {
                warn!(
                    node_id = %k.heartbeat.node_id,
                    peer_id = %peer,
                    missed = MISSED_CHECKS,
                    "peer missed its health checks: unhealthy"
                );
            }
            k.healthy = healthy;
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(address = %address, "peer-to-peer listening");
                let mut view = self.shared.lock();
                if !view.listen.contains(&address) {
                    view.listen.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.shared.lock().listen.retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                if let Some(b) = self
                    .bootstrap
                    .iter_mut()
                    .find(|b| b.dialing == Some(connection_id))
                {
                    b.dialing = None;
                    b.peer = Some(peer_id);
                }
                if !self.allows(&peer_id) {
                    refused("connection", &peer_id);
                    self.swarm.close_connection(connection_id);
                    return;
                }
                if num_established.get() == 1 {
                    let remote = match &endpoint {
                        ConnectedPoint::Dialer { address, .. } => address,
                        ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                    };
                    info!(peer_id = %peer_id, remote = %remote, "peer connected");
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                let cause = cause.map(|c| c.to_string()).unwrap_or_default();
                info!(peer_id = %peer_id, cause = %cause, "peer disconnected");
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let Some(b) = self
                    .bootstrap
                    .iter_mut()
                    .find(|b| b.dialing == Some(connection_id))
                else {
                    debug!(peer_id = ?peer_id, error = %error, "dial failed");
                    return;
                };
                b.dialing = None;
                match &error {
                    DialError::LocalPeerId { .. } => {
                        info!(addr = %b.addr, "bootstrap peer is this node; not dialing it");
                        b.is_self = true;
                    }
                    DialError::WrongPeerId { obtained, .. } => warn!(
                        addr = %b.addr,
                        expected = ?b.peer,
                        obtained = %obtained,
                        "bootstrap peer answers with another peer id"
                    ),
                    // Retried every discovery interval; a peer still starting
                    // is normal.
                    _ => debug!(addr = %b.addr, error = %error, "cannot reach bootstrap peer"),
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                ..
            })) => self.message(message),
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(event)) => self.rpc(event),
            // Identify's own cache keeps the addresses peers announce for
            // re-dials; here it only tells strangers apart.
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocol_version != PROTOCOL_VERSION => {
                debug!(peer_id = %peer_id, protocol = %info.protocol_version, "not a rouse peer");
            }
            _ => {}
        }
    }

    fn message(&mut self, message: gossipsub::Message) {
        // Strict validation guarantees a signed source.
        let Some(source) = message.source else { return };
        if source == self.shared.peer_id {
            return;
        }
        if !self.allows(&source) {
            refused("gossip", &source);
            return;
        }
        if message.topic != IdentTopic::new(HEALTH_TOPIC).hash() {
            let topic = [EVENTS_TOPIC, ACTIVITY_TOPIC, CLUSTER_TOPIC]
                .into_iter()
                .find(|t| message.topic == IdentTopic::new(*t).hash());
            match topic {
                Some(topic) => {
                    let _ = self.inbound.send(Inbound::Gossip {
                        from: source,
                        topic: topic.to_string(),
                        data: message.data,
                    });
                }
                None => debug!(topic = %message.topic, "message on a topic nobody reads here"),
            }
            return;
        }
        let heartbeat: Heartbeat = match serde_json::from_slice(&message.data) {
            Ok(h) => h,
            Err(e) => {
                warn!(peer_id = %source, error = %e, "unreadable heartbeat");
                return;
            }
        };
        let connected = self.swarm.is_connected(&source);
        let addrs = addrs_of(&heartbeat);
        {
            let mut view = self.shared.lock();
            let fresh = match view.peers.get(&source) {
                None => true,
                Some(k) => !k.healthy,
            };
            if fresh {
                info!(node_id = %heartbeat.node_id, peer_id = %source, "peer healthy");
            }
            view.peers.insert(
                source,
                Known {
                    heartbeat,
                    received: Instant::now(),
                    received_ms: now_ms(),
                    healthy: true,
                },
            );
        }
        // Heard through another peer: connect directly, so that this pair
        // does not depend on the one in between.
        if !connected {
            self.dial_known(source, addrs);
        }
    }
}

/// Logs and counts what a peer outside `discovery.allowed_peers` tried.
fn refused(what: &'static str, peer: &PeerId) {
    metrics::counter!("rouse_peer_refusals_total", "what" => what).increment(1);
    warn!(peer_id = %peer, what, "refused a peer outside discovery.allowed_peers");
}

fn addrs_of(heartbeat: &Heartbeat) -> Vec<Multiaddr> {
    heartbeat
        .addresses
        .iter()
        .filter_map(|a| Multiaddr::from_str(a).ok())
        .collect()
}

/// The node's key from `<data_dir>/p2p_key`, made (owner-only) on first use.
fn load_or_create_key(data_dir: &Path) -> Result<Keypair, PeersError> {
    let path = data_dir.join(KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            return Keypair::from_protobuf_encoding(&bytes).map_err(|e| PeersError::KeyDecode {
                path,
                message: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PeersError::KeyIo {
                what: "read",
                path,
                source,
            })
        }
    }
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| PeersError::Setup(format!("cannot encode the libp2p key: {e}")))?;
    write_private(&path, &bytes).map_err(|source| PeersError::KeyIo {
        what: "write",
        path: path.clone(),
        source,
    })?;
    info!(path = %path.display(), "made a new libp2p key");
    Ok(key)
}

/// Writes through a temporary file (a crash never leaves half a key) that
/// only the owner can read (the key is the node's identity).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_with_and_without_peer_id() {
        let id = Keypair::generate_ed25519().public().to_peer_id();
        let b = Bootstrap::parse(&format!("/ip4/10.0.0.1/tcp/4001/p2p/{id}")).unwrap();
        assert_eq!(b.addr.to_string(), "/ip4/10.0.0.1/tcp/4001");
        assert_eq!(b.peer, Some(id));
        assert!(b.given);
        let b = Bootstrap::parse("/ip4/10.0.0.1/tcp/4001").unwrap();
        assert_eq!(b.peer, None);
        assert!(!b.given);
        assert!(matches!(
            Bootstrap::parse("10.0.0.1:4001"),
            Err(PeersError::BadAddress { .. })
        ));
    }

    #[test]
    fn key_is_kept_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_key(dir.path()).unwrap();
        let b = load_or_create_key(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
}
