//! The node section: where data lives, the libp2p listen addresses.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// libp2p listen multiaddrs of the control daemon.
    pub listen_addresses: Vec<String>,
    pub max_connections: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from("./data"),
            listen_addresses: vec!["/ip4/0.0.0.0/tcp/4001".into()],
            max_connections: 50,
        }
    }
}
