//! Patroni clusters the proxy follows, and how it checks their members.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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

/// Where Patroni keeps a cluster's members: etcd (v3 API), under
/// `<namespace>/<scope>/members/`, as confd reads them for HAProxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PatroniDiscovery {
    /// etcd client URLs, such as `http://10.0.0.5:2379`.
    pub etcd: Vec<String>,
    /// Patroni's `scope`; unset, `PATRONI_SCOPE` from the environment.
    #[serde(default)]
    pub scope: Option<String>,
    /// Patroni's `namespace`; unset, `PATRONI_NAMESPACE`, else `/service`.
    #[serde(default)]
    pub namespace: Option<String>,
}

impl PatroniDiscovery {
    /// The etcd key prefix of the members, from the config or else the
    /// environment Patroni itself reads.
    pub fn members_prefix(&self) -> Result<String, String> {
        let env = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
        let scope = self
            .scope
            .clone()
            .or_else(|| env("PATRONI_SCOPE"))
            .ok_or("discovery needs a scope (or PATRONI_SCOPE)")?;
        if scope.is_empty() || scope.contains('/') {
            return Err(format!("invalid Patroni scope {scope:?}"));
        }
        let namespace = self
            .namespace
            .clone()
            .or_else(|| env("PATRONI_NAMESPACE"))
            .unwrap_or_else(|| "/service".into());
        let namespace = namespace.trim_end_matches('/');
        let namespace = if namespace.starts_with('/') {
            namespace.to_string()
        } else {
            format!("/{namespace}")
        };
        Ok(format!("{namespace}/{scope}/members/"))
    }
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
