//! The database section: replication, hibernation, how many databases a node
//! holds and the engine port ranges.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub replication_factor: u32,
    /// Idle time before a database hibernates; zero disables hibernation.
    #[serde(with = "crate::duration")]
    pub hibernation_timeout: Duration,
    /// Databases held here, running or not (the reference's meaning).
    pub max_databases: u32,
    /// Engines running here at once (the active set); 0: three quarters of
    /// the machine's memory divided by 32 MiB, about an rqlited's RSS.
    pub max_active_databases: u32,
    /// Bytes of engine RSS here, measured; 0: three quarters of the memory.
    pub max_active_memory: u64,
    /// How long a wake waits for room in a full active set before it is
    /// refused naming the limit (below the proxies' `wake_timeout`, so that
    /// their clients hear which limit it was).
    #[serde(with = "crate::duration")]
    pub active_wait: Duration,
    pub port_range_http_start: u16,
    pub port_range_http_end: u16,
    pub port_range_raft_start: u16,
    pub port_range_raft_end: u16,
    pub port_range_postgres_start: u16,
    pub port_range_postgres_end: u16,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            replication_factor: 3,
            hibernation_timeout: Duration::from_secs(60),
            max_databases: 100,
            max_active_databases: 0,
            max_active_memory: 0,
            active_wait: Duration::from_secs(25),
            port_range_http_start: 5001,
            port_range_http_end: 5999,
            port_range_raft_start: 7001,
            port_range_raft_end: 7999,
            port_range_postgres_start: 55001,
            port_range_postgres_end: 55999,
        }
    }
}
