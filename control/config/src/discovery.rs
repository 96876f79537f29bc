//! The discovery section: how control daemons of several nodes find each
//! other.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Peers as multiaddrs, with or without their `/p2p/<peer id>` suffix.
    pub bootstrap_peers: Vec<String>,
    /// A copy of the cluster key of the node that founded the cluster;
    /// a node without bootstrap peers makes `<data_dir>/cluster.key`.
    pub cluster_secret_file: Option<PathBuf>,
    /// Peer ids that may connect; empty: every holder of the cluster key.
    pub allowed_peers: Vec<String>,
    #[serde(with = "crate::duration")]
    pub discovery_interval: Duration,
    #[serde(with = "crate::duration")]
    pub health_check_interval: Duration,
    pub mdns: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            bootstrap_peers: Vec::new(),
            cluster_secret_file: None,
            allowed_peers: Vec::new(),
            discovery_interval: Duration::from_secs(30),
            health_check_interval: Duration::from_secs(10),
            mdns: false,
        }
    }
}
