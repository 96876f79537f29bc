//! Patroni clusters the proxy follows, and how it checks their members.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use rouse_control_api::PatroniDiscovery;

/// Health checks of Patroni members (HAProxy's `inter`, `rise`, `fall`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PatroniChecks {
    #[serde(with = "crate::duration")]
    pub check_interval: Duration,
    /// A check that has not answered within this time failed.
    #[serde(with = "crate::duration")]
    pub check_timeout: Duration,
    /// Consecutive passed checks that mark a member up.
    pub rise: u32,
    /// Consecutive failed checks that mark a member down.
    pub fall: u32,
    /// Replicas lagging more than this many bytes fail `/replica?lag=`.
    pub max_lag: Option<u64>,
    /// How long a new connection waits for a leader during a failover.
    #[serde(with = "crate::duration")]
    pub failover_hold: Duration,
}

impl Default for PatroniChecks {
    fn default() -> Self {
        PatroniChecks {
            check_interval: Duration::from_secs(1),
            check_timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            max_lag: None,
            failover_hold: Duration::from_secs(30),
        }
    }
}

/// A Patroni cluster by its members, or found in etcd by its scope.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatroniCluster {
    pub name: String,
    #[serde(default)]
    pub members: Vec<rouse_control_api::PatroniMember>,
    #[serde(default)]
    pub discovery: Option<PatroniDiscovery>,
}

/// Which members of a cluster a plain TCP listener reaches.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    /// The leader (`GET /primary` answers 200).
    Primary,
    /// Healthy replicas, round-robin (`GET /replica` answers 200).
    Replica,
}
