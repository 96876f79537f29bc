//! JSON shapes of the control API (`/api/v1/...`).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::name::Name;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Rqlite,
    Postgres,
    /// An existing Patroni cluster, registered by its members; control runs
    /// nothing for it and the proxy follows its leader.
    Patroni,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Rqlite => "rqlite",
            Engine::Postgres => "postgres",
            Engine::Patroni => "patroni",
        }
    }
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rqlite" => Ok(Engine::Rqlite),
            "postgres" => Ok(Engine::Postgres),
            "patroni" => Ok(Engine::Patroni),
            other => Err(format!(
                "unknown engine {other:?}: expected rqlite, postgres or patroni"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseStatus {
    Initializing,
    Active,
    Hibernating,
    Waking,
    Failed,
}

impl DatabaseStatus {
    pub const ALL: [DatabaseStatus; 5] = [
        DatabaseStatus::Initializing,
        DatabaseStatus::Active,
        DatabaseStatus::Hibernating,
        DatabaseStatus::Waking,
        DatabaseStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DatabaseStatus::Initializing => "initializing",
            DatabaseStatus::Active => "active",
            DatabaseStatus::Hibernating => "hibernating",
            DatabaseStatus::Waking => "waking",
            DatabaseStatus::Failed => "failed",
        }
    }
}

impl std::str::FromStr for DatabaseStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DatabaseStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status {s:?}"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateApp {
    pub name: Name,
    /// Whether proxies may create a database on its first access (default).
    #[serde(default = "yes")]
    pub create_on_first_access: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppInfo {
    pub name: Name,
    pub created_at: u64,
    #[serde(default = "yes")]
    pub create_on_first_access: bool,
}

/// What deleting an app removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppDeleted {
    pub app: Name,
    /// Its databases, stopped and their data removed.
    pub databases: Vec<Name>,
    /// How many API keys were revoked.
    pub keys: usize,
    /// How many Postgres logins were removed.
    pub users: usize,
}

/// Returned once when a key is issued; only its hash is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyCreated {
    pub app: Name,
    pub id: String,
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    pub id: String,
    pub created_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyKey {
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyOwner {
    pub app: Name,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateUser {
    pub name: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserInfo {
    pub app: Name,
    pub name: String,
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, what the
    /// proxy authenticates clients against.
    pub scram_verifier: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateDatabase {
    pub app: Name,
    pub name: Name,
    pub engine: Engine,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<u32>,
    /// Engine `patroni` only: the cluster to register.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patroni: Option<PatroniRegistration>,
}

/// An existing Patroni cluster: its members (or where Patroni keeps them),
/// and a superuser through which control creates the app's users as login
/// roles on the leader.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PatroniRegistration {
    /// The members by address; or none, and `discovery`.
    #[serde(default)]
    pub members: Vec<PatroniMember>,
    /// Where Patroni keeps the members: read at registration and followed
    /// from then on (a member added or removed there is picked up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<PatroniDiscovery>,
    pub admin: BackendCredentials,
}

/// A member of a Patroni cluster: its PostgreSQL address and its REST API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PatroniMember {
    pub name: String,
    /// PostgreSQL `host:port`.
    pub addr: SocketAddr,
    /// Patroni REST API base URL, such as `http://10.0.0.5:8008`.
    pub api: String,
}

/// Where Patroni keeps a cluster's members: etcd (v3 API), under
/// `<namespace>/<scope>/members/`, as confd reads them for HAProxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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

/// One running replica's addresses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    pub node_id: String,
    pub host: String,
    /// rqlite HTTP API port, or the PostgreSQL port.
    pub port: u16,
    /// rqlite Raft port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_port: Option<u16>,
    /// Patroni REST API base URL of this member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    pub leader: bool,
    /// The engine's HTTP API speaks TLS, with a certificate of the cluster
    /// CA for [`crate::engine_tls::SERVER_NAME`] (rqlite across nodes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
}

impl Endpoint {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// This endpoint as a member of a registered Patroni cluster.
    pub fn patroni_member(&self) -> Option<PatroniMember> {
        Some(PatroniMember {
            name: self.node_id.clone(),
            addr: self.addr().parse().ok()?,
            api: self.api.clone()?,
        })
    }
}

/// A login to a database's engine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendCredentials {
    pub user: String,
    pub password: String,
}

impl BackendCredentials {
    /// The `Authorization` value of an HTTP basic login (rqlited `-auth`).
    pub fn basic_auth(&self) -> String {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        format!("Basic {token}")
    }

    /// The SCRAM verifier PostgreSQL keeps for this login: its salt is
    /// derived from the login, so control and the proxies, which both
    /// know it, derive the same verifier.
    pub fn scram_verifier(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"rouse login salt\0")
            .chain_update(self.user.as_bytes())
            .chain_update([0])
            .chain_update(self.password.as_bytes())
            .finalize();
        crate::scram::verifier(&self.password, &digest[..16])
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseInfo {
    pub app: Name,
    pub name: Name,
    pub engine: Engine,
    pub replication_factor: u32,
    pub status: DatabaseStatus,
    /// Why the database is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Leader first; empty unless active.
    pub endpoints: Vec<Endpoint>,
    /// Ports held (or, while hibernating, to be reused on wake).
    pub ports: Vec<u16>,
    pub created_at: u64,
    /// Unix milliseconds.
    pub last_activity: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_wake_ms: Option<u64>,
    /// When its last backup was made, Unix milliseconds, as the node that
    /// answers knows it (it made it, or listed it since it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<u64>,
    pub open_sessions: u64,
    /// The engine login this caller may use ([`BackendCredentials`] as
    /// JSON), sealed for its bearer token ([`crate::SealKey::for_bearer`]):
    /// for `proxy` tokens the data-plane login of an rqlite database or the
    /// API login of a PostgreSQL one (an app user, never a superuser), for
    /// `admin` tokens the engine's own superuser; nothing for `app:` tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_login: Option<crate::Sealed>,
    /// How the proxy pools PostgreSQL connections to this database.
    #[serde(default)]
    pub pool_mode: PoolMode,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A backend connection per client session.
    #[default]
    Session,
    /// A backend connection per transaction, shared between clients.
    Transaction,
}

impl std::str::FromStr for PoolMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "session" => Ok(PoolMode::Session),
            "transaction" => Ok(PoolMode::Transaction),
            other => Err(format!(
                "unknown pool mode {other:?}: expected session or transaction"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetPoolMode {
    pub pool_mode: PoolMode,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseList {
    pub databases: Vec<DatabaseInfo>,
}

/// What a proxy reports every few seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActivityReport {
    pub proxy_id: String,
    pub databases: Vec<DatabaseActivity>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseActivity {
    pub app: Name,
    pub name: Name,
    /// Unix milliseconds of the last request or statement.
    pub last_activity: u64,
    pub open_sessions: u64,
    #[serde(default)]
    pub requests: u64,
}

/// One server-sent event on `/events`; the SSE `event:` field is `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Status {
        app: Name,
        name: Name,
        status: DatabaseStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Leader {
        app: Name,
        name: Name,
        endpoints: Vec<Endpoint>,
    },
    Dropped {
        app: Name,
        name: Name,
    },
    KeyRevoked {
        app: Name,
        id: String,
    },
    UserChanged {
        app: Name,
        name: String,
    },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Status { .. } => "status",
            Event::Leader { .. } => "leader",
            Event::Dropped { .. } => "dropped",
            Event::KeyRevoked { .. } => "key_revoked",
            Event::UserChanged { .. } => "user_changed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleRequest {
    pub target_db_count: u32,
    pub min_ha_nodes: HaNodes,
}

/// `min_ha_nodes`: replicas per database. A count, or a flag as the State
/// Pillar's scaling call sends it: `true` for the smallest quorum that
/// survives the loss of a node ([`HaNodes::QUORUM`]), `false` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct HaNodes(pub u32);

impl HaNodes {
    pub const QUORUM: u32 = 3;
}

impl<'de> Deserialize<'de> for HaNodes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Count(u32),
            Flag(bool),
        }
        Ok(HaNodes(
            match Given::deserialize(d).map_err(|_| {
                serde::de::Error::custom("min_ha_nodes: a number of replicas, or true or false")
            })? {
                Given::Count(n) => n,
                Given::Flag(true) => HaNodes::QUORUM,
                Given::Flag(false) => 1,
            },
        ))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalePlan {
    pub target_db_count: u32,
    pub replication_factor: u32,
    pub nodes: u32,
    pub capacity: u32,
    pub current_databases: u32,
    pub replicas_needed: u32,
    pub fits: bool,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    pub api_addr: String,
    pub healthy: bool,
    pub max_databases: u32,
    pub databases: u32,
    pub active_databases: u32,
    pub last_seen: u64,
    /// libp2p peer id; empty from daemons that predate peer-to-peer.
    #[serde(default)]
    pub peer_id: String,
    /// libp2p listen multiaddrs, usable as `discovery.bootstrap_peers`.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// `GET /capacity`: what each node holds and how much more it can take.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Capacity {
    pub nodes: Vec<NodeCapacity>,
}

/// One node's load and room, as it measured them at its last health check
/// (the answering node: now).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct NodeCapacity {
    pub node_id: String,
    pub healthy: bool,
    /// Databases with a replica here, and how many of them run / sleep.
    pub databases: u32,
    pub active: u32,
    pub hibernating: u32,
    pub max_databases: u32,
    /// The active set's bounds: databases running here at once, and their
    /// engines' memory (`database.max_active_*`).
    #[serde(default)]
    pub max_active_databases: u32,
    #[serde(default)]
    pub max_active_memory_bytes: u64,
    /// Proportional set size of the engine processes running here
    /// (PostgreSQL with its backends).
    pub engine_memory_bytes: u64,
    /// The machine's available memory (`MemAvailable`).
    pub memory_available_bytes: u64,
    /// Free ports left in each configured range.
    pub ports_left: PortsLeft,
    /// How many more databases fit, by each bound, at the current averages.
    pub room: Room,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct PortsLeft {
    pub rqlite_http: u32,
    pub rqlite_raft: u32,
    pub postgres: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Room {
    /// `max_databases` minus the databases held.
    pub databases: u32,
    /// More databases that could run at once in the available memory, at
    /// the average engine memory of those running (absent while none runs).
    pub active_by_memory: Option<u32>,
    /// More rqlite databases (one HTTP and one Raft port each) and
    /// PostgreSQL databases the port ranges allow running at once.
    pub rqlite_by_ports: u32,
    pub postgres_by_ports: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeInfo>,
    /// Node id of the node that makes lifecycle decisions (the lowest live
    /// peer id), as the answering node sees it.
    #[serde(default)]
    pub coordinator: String,
}
