//! What a node's heartbeat says about it, how peers look to the rest of
//! the daemon, and the errors of the peer-to-peer layer.

use std::path::PathBuf;

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::protocol::{NodeRequest, NodeResponse};

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
    /// The sender's load and room, as its last health check measured them.
    #[serde(default)]
    pub capacity: Option<rouse_control_api::NodeCapacity>,
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
