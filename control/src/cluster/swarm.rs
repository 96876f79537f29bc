//! The libp2p event loop: listening, dialling bootstrap peers and re-dialling
//! known ones, heartbeats, gossip in and out, and node-to-node requests.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use libp2p::core::upgrade::Version;
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    identify, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, Transport,
};
use rouse_runtime::clock::now_ms;
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use super::peers::{Command, Known, PeerState, PendingReply};
use super::protocol::{
    NodeRequest, NodeResponse, ACTIVITY_TOPIC, CLUSTER_TOPIC, EVENTS_TOPIC, HEALTH_TOPIC,
    MISSED_CHECKS, PROTOCOL_VERSION, RPC_PROTOCOL,
};
use super::wire::{Heartbeat, Inbound, PeersError};
use crate::metrics::PEER_REFUSALS;

/// Intervals below this would flood the network for nothing.
pub(super) const MIN_INTERVAL: Duration = Duration::from_millis(50);

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    identify: identify::Behaviour,
    pub(super) gossipsub: gossipsub::Behaviour,
    rpc: request_response::json::Behaviour<NodeRequest, NodeResponse>,
}

pub(super) fn build_swarm(
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

pub(super) fn parse_addr(key: &'static str, addr: &str) -> Result<Multiaddr, PeersError> {
    Multiaddr::from_str(addr.trim()).map_err(|e| PeersError::BadAddress {
        key,
        addr: addr.to_string(),
        message: e.to_string(),
    })
}

/// A configured bootstrap peer.
pub(super) struct Bootstrap {
    /// Without the `/p2p/...` suffix.
    pub(super) addr: Multiaddr,
    /// From the config, or learned from the first connection.
    pub(super) peer: Option<PeerId>,
    /// The config named the peer: a different peer there is an error, not a
    /// replacement.
    pub(super) given: bool,
    pub(super) dialing: Option<ConnectionId>,
    /// The entry is this node itself (a shared list of bootstrap peers).
    pub(super) is_self: bool,
}

impl Bootstrap {
    pub(super) fn parse(text: &str) -> Result<Bootstrap, PeersError> {
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

pub(super) struct SwarmTask {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) shared: Arc<PeerState>,
    pub(super) bootstrap: Vec<Bootstrap>,
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    pub(super) discovery_interval: Duration,
    pub(super) inbound: mpsc::UnboundedSender<Inbound>,
    /// Outbound requests waiting for their answer.
    pub(super) requests:
        HashMap<OutboundRequestId, oneshot::Sender<Result<NodeResponse, PeersError>>>,
    pub(super) replies: FuturesUnordered<PendingReply>,
    /// `discovery.allowed_peers`; empty: every holder of the cluster key.
    pub(super) allowed: std::collections::HashSet<PeerId>,
}

impl SwarmTask {
    /// Whether `peer` may talk to this node at all.
    fn allows(&self, peer: &PeerId) -> bool {
        self.allowed.is_empty() || self.allowed.contains(peer)
    }

    pub(super) async fn run(mut self) {
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
            // Alone, there is nobody to tell: signing the message would
            // be all the work (a storm of wakes publishes hundreds).
            Command::Publish { reply, .. } if self.swarm.connected_peers().next().is_none() => {
                let _ = reply.send(Ok(()));
            }
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
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, *request);
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
    PEER_REFUSALS.counter([what.into()]).increment(1);
    warn!(peer_id = %peer, what, "refused a peer outside discovery.allowed_peers");
}

fn addrs_of(heartbeat: &Heartbeat) -> Vec<Multiaddr> {
    heartbeat
        .addresses
        .iter()
        .filter_map(|a| Multiaddr::from_str(a).ok())
        .collect()
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
}
