//! What the metadata holds about a database and its replicas, as the rest
//! of control uses it: below both the engines and the metadata store.

use rouse_control_api::{DatabaseStatus, DbKey, Engine};

/// Where one replica of a database runs (or ran, while hibernating).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaRecord {
    pub idx: u32,
    /// The control node that holds this replica.
    pub node_id: String,
    pub host: String,
    pub port: u16,
    pub raft_port: Option<u16>,
}

impl ReplicaRecord {
    pub fn ports(&self) -> impl Iterator<Item = u16> {
        std::iter::once(self.port).chain(self.raft_port)
    }
}

#[derive(Debug, Clone)]
pub struct DatabaseRecord {
    pub key: DbKey,
    pub engine: Engine,
    pub replication_factor: u32,
    pub status: DatabaseStatus,
    pub reason: Option<String>,
    pub created_at: u64,
    pub last_activity: u64,
    pub last_wake_ms: Option<u64>,
    /// Password of the engine's own superuser (in clear here, sealed in
    /// `_system`).
    pub secret: String,
    pub replicas: Vec<ReplicaRecord>,
}

#[derive(Debug, Clone)]
pub struct UserRecord {
    pub name: String,
    pub verifier: String,
}
