//! The configuration file shared by `rouse-control` and `rouse-proxy`: one
//! YAML document with `node`, `database`, `discovery`, `control`, `proxy`
//! and `redis` sections (each binary uses its own), the keys of the
//! reference `node.yaml` loading as they are. Every key can be overridden by
//! `ROUSE_<SECTION>__<KEY>` environment variables; `REDIS_URL` sets
//! `redis.url`. Unknown keys are refused with the file, line and key.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `configs/local.yaml`, the default when no `--config` is given.
pub const LOCAL_CONFIG: &str = include_str!("../../../configs/local.yaml");

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub database: DatabaseConfig,
    pub discovery: DiscoveryConfig,
    pub control: ControlConfig,
    pub proxy: ProxyConfig,
    pub redis: RedisConfig,
    pub apps: crate::apps::AppsConfig,
}

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub replication_factor: u32,
    /// Idle time before a database hibernates; zero disables hibernation.
    #[serde(with = "crate::duration")]
    pub hibernation_timeout: Duration,
    pub max_databases: u32,
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
            port_range_http_start: 5001,
            port_range_http_end: 5999,
            port_range_raft_start: 7001,
            port_range_raft_end: 7999,
            port_range_postgres_start: 55001,
            port_range_postgres_end: 55999,
        }
    }
}

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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub api_addr: SocketAddr,
    /// `rqlited` binary; found on PATH when unset.
    pub rqlited_path: Option<PathBuf>,
    /// Directory with `initdb` and `postgres`; PATH, then the newest
    /// `/usr/lib/postgresql/*/bin`, when unset.
    pub postgres_bin_dir: Option<PathBuf>,
    /// Unprivileged user that runs PostgreSQL when control runs as root.
    pub run_as: String,
    /// Loopback addresses the replicas of one database take on this node,
    /// so that a 3-replica Raft cluster runs on distinct hosts locally.
    pub replica_hosts: Vec<IpAddr>,
    /// rqlite `-raft-election-timeout`: short, so that a woken cluster
    /// elects its leader fast.
    #[serde(with = "crate::duration")]
    pub raft_election_timeout: Duration,
    /// rqlite `-raft-timeout` (heartbeat timeout).
    #[serde(with = "crate::duration")]
    pub raft_heartbeat_timeout: Duration,
    /// How long an engine may take to answer its first query after a start.
    #[serde(with = "crate::duration")]
    pub start_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when stopping an engine.
    #[serde(with = "crate::duration")]
    pub stop_grace: Duration,
    /// PostgreSQL `max_connections` of each managed instance.
    pub postgres_max_connections: u32,
    /// Engine processes may touch only their own data directory (Landlock).
    /// Off only to test the proxy's statement filter on its own.
    pub sandbox: bool,
    /// rqlite's HTTP API over TLS (certificates of the cluster CA). Unset:
    /// on when a replica host is not a loopback address, that is when
    /// engine traffic leaves the machine. Every node of a cluster must
    /// agree.
    pub engine_https: Option<bool>,
    /// TLS on the control API (PEM files); absent: plain HTTP. Clients then
    /// use `https://` and trust its CA (`proxy.control_ca_file`,
    /// `ROUSE_CONTROL_CA` for the command line).
    pub tls: Option<TlsConfig>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            api_addr: SocketAddr::from(([127, 0, 0, 1], 8001)),
            rqlited_path: None,
            postgres_bin_dir: None,
            run_as: "postgres".into(),
            replica_hosts: (1..=3)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
                .collect(),
            raft_election_timeout: Duration::from_millis(100),
            raft_heartbeat_timeout: Duration::from_millis(100),
            start_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
            postgres_max_connections: 300,
            sandbox: true,
            engine_https: None,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub control_url: String,
    /// The proxy's control API token (role `proxy`); unset, the proxy reads
    /// `<node.data_dir>/tokens/proxy`, which the founding node writes.
    pub control_token: Option<String>,
    /// PEM CA bundle to check control's certificate with when
    /// `control_url` is `https://`.
    pub control_ca_file: Option<PathBuf>,
    pub http_addr: SocketAddr,
    pub postgres_addr: SocketAddr,
    pub postgres_ro_addr: SocketAddr,
    pub redis_addr: SocketAddr,
    /// Unset: `127.0.0.1:7000`, or `0.0.0.0:7000` once `stats_auth` is set
    /// (see [`ProxyConfig::stats_listen_addr`]).
    pub stats_addr: Option<SocketAddr>,
    /// `user:password` the stats page asks for (HAProxy's `stats auth`).
    /// Unset, only loopback clients see the page; `/metrics` and
    /// `/healthz` answer everyone either way.
    pub stats_auth: Option<String>,
    /// For routing by Host `<db>.<app>.<base_domain>` and TLS SNI.
    pub base_domain: Option<String>,
    #[serde(with = "crate::duration")]
    pub wake_timeout: Duration,
    pub max_waiting: u32,
    /// Credentials other than API keys.
    pub auth: AuthConfig,
    /// TLS for the PostgreSQL front (SSLRequest answered `S`); absent: `N`.
    pub tls: Option<TlsConfig>,
    /// Listeners bound to one database each, for clients that only know
    /// `host:port` (sidecar mode).
    pub static_listeners: Vec<StaticListener>,
    /// Request bodies above this get 413.
    pub max_body_bytes: usize,
    /// A client must send its request head within this time.
    #[serde(with = "crate::duration")]
    pub header_read_timeout: Duration,
    /// ... and its request body within this time.
    #[serde(with = "crate::duration")]
    pub body_read_timeout: Duration,
    /// How often activity and open requests are reported to control.
    #[serde(with = "crate::duration")]
    pub activity_interval: Duration,
    /// Create a database on first access through the proxy.
    pub auto_create: bool,
    /// Threads serving clients; 0 means half the cores, at least one.
    pub worker_threads: usize,
    /// PostgreSQL client connections beyond this get `53300`.
    pub max_client_connections: usize,
    /// PostgreSQL connections still logging in (before authentication);
    /// more are refused with `53300`, so that silent clients cannot hold
    /// the slots of those who log in.
    pub max_pending_logins: usize,
    /// Failed logins (bad API key, token or password) per client address
    /// within 10 s before its next attempts are refused; 0: no limit.
    pub failed_login_limit: u32,
    /// Backend connections per database and role in transaction pooling.
    pub pool_size: usize,
    /// How Patroni members are checked; every cluster uses these.
    pub patroni: PatroniChecks,
    /// Patroni clusters the proxy follows by their members' REST API.
    pub patroni_clusters: Vec<PatroniCluster>,
    /// Plain L4 listeners to a cluster's leader or replicas, the drop-in
    /// equivalent of an HAProxy `mode tcp` listen block.
    pub tcp_listeners: Vec<TcpListenerConfig>,
    /// The Redis servers behind `redis_addr`; absent: no Redis front.
    pub redis_backend: Option<RedisBackend>,
    /// Requests per second per app and per credential, by protocol.
    pub rate_limits: RateLimitsConfig,
    /// Databases whose rqlite reads (`level=none|weak`) are cached.
    pub response_cache: Vec<CachedDatabase>,
    /// Where other proxies reach this one's PostgreSQL port to forward a
    /// cancel request; the listener's address when unset.
    pub advertise_postgres_addr: Option<SocketAddr>,
    /// Unix socket through which a new binary (`serve --upgrade`) takes over
    /// the listening sockets; absent: no graceful upgrade.
    pub upgrade_socket: Option<PathBuf>,
    /// After a shutdown or an upgrade began, how long open sessions may go on.
    #[serde(with = "crate::duration")]
    pub drain_grace: Duration,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    pub http: ProtocolLimits,
    /// New PostgreSQL connections.
    pub postgres: ProtocolLimits,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolLimits {
    pub per_app: Option<Limit>,
    pub per_credential: Option<Limit>,
}

/// `rate` per second on average, up to `burst` at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub rate: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachedDatabase {
    pub app: crate::Name,
    pub database: crate::Name,
    #[serde(with = "crate::duration")]
    pub ttl: Duration,
}

/// Where the Redis front finds the current master: through Sentinel, or by
/// asking each of a static list of servers for its role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisBackend {
    /// Sentinels (`host:port`) to ask `SENTINEL get-master-addr-by-name`.
    #[serde(default)]
    pub sentinels: Vec<String>,
    /// The master's name among the sentinels.
    #[serde(default)]
    pub master_name: Option<String>,
    /// Without sentinels: the servers (`host:port`) whose `ROLE` decides.
    #[serde(default)]
    pub servers: Vec<String>,
    /// AUTH towards the Redis servers (the proxy's own checks).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// AUTH towards the sentinels.
    #[serde(default)]
    pub sentinel_password: Option<String>,
    /// TLS towards the Redis servers, verified against this PEM CA file.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default = "default_redis_check_interval", with = "crate::duration")]
    pub check_interval: Duration,
}

fn default_redis_check_interval() -> Duration {
    Duration::from_secs(1)
}

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

/// A Patroni cluster by its members.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatroniCluster {
    pub name: String,
    pub members: Vec<crate::PatroniMember>,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpListenerConfig {
    pub addr: SocketAddr,
    /// A name among `patroni_clusters`.
    pub cluster: String,
    pub role: MemberRole,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 shared secret for JWTs.
    pub jwt_hs256_secret: Option<String>,
    /// PEM file with the RS256 public key for JWTs.
    pub jwt_rs256_public_key_file: Option<PathBuf>,
    /// JWKS file (`{"keys":[...]}`) with RS256 keys, chosen by `kid`.
    pub jwt_jwks_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticListener {
    pub addr: SocketAddr,
    pub app: crate::Name,
    pub database: crate::Name,
}

impl ProxyConfig {
    /// Where the stats page listens: `stats_addr`, else loopback unless
    /// `stats_auth` protects the page.
    pub fn stats_listen_addr(&self) -> SocketAddr {
        self.stats_addr.unwrap_or_else(|| match self.stats_auth {
            Some(_) => SocketAddr::from(([0, 0, 0, 0], 7000)),
            None => SocketAddr::from(([127, 0, 0, 1], 7000)),
        })
    }

    /// The token the proxy calls control with: `control_token`, else the
    /// `proxy` token file under `data_dir`.
    pub fn control_token(&self, data_dir: &std::path::Path) -> Option<String> {
        self.control_token.clone().or_else(|| {
            std::fs::read_to_string(data_dir.join(crate::access::TOKENS_DIR).join("proxy"))
                .ok()
                .map(|t| t.trim().to_string())
        })
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        ProxyConfig {
            control_url: "http://127.0.0.1:8001".into(),
            control_token: None,
            control_ca_file: None,
            http_addr: any(8080),
            postgres_addr: any(5433),
            postgres_ro_addr: any(5434),
            redis_addr: any(6380),
            stats_addr: None,
            stats_auth: None,
            base_domain: None,
            wake_timeout: Duration::from_secs(30),
            max_waiting: 10_000,
            auth: AuthConfig::default(),
            tls: None,
            static_listeners: Vec::new(),
            max_body_bytes: 16 << 20,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            activity_interval: Duration::from_secs(2),
            auto_create: true,
            worker_threads: 0,
            max_client_connections: 10_000,
            max_pending_logins: 1_000,
            failed_login_limit: 50,
            pool_size: 20,
            patroni: PatroniChecks::default(),
            patroni_clusters: Vec::new(),
            tcp_listeners: Vec::new(),
            redis_backend: None,
            rate_limits: RateLimitsConfig::default(),
            response_cache: Vec::new(),
            advertise_postgres_addr: None,
            upgrade_socket: None,
            drain_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Shared state; absent means in-process only.
    pub url: Option<String>,
    /// When Redis does not answer: go on with in-process sessions and
    /// limits (true), or refuse what needs Redis (false).
    pub fail_open: bool,
    /// A Redis call that has not answered within this time failed.
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
    /// Authenticates what the proxies store in Redis (at least 16
    /// characters); `<data_dir>/redis.secret` when unset. Never printed.
    #[serde(skip_serializing)]
    pub secret: Option<String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            fail_open: true,
            timeout: Duration::from_millis(250),
            secret: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: key `{key}`: {message}")]
    File {
        file: String,
        line: usize,
        key: String,
        message: String,
    },
    #[error("environment {vars}: key `{key}`: {message}")]
    Env {
        vars: String,
        key: String,
        message: String,
    },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

const SECTIONS: [&str; 7] = [
    "node",
    "database",
    "discovery",
    "control",
    "proxy",
    "redis",
    "apps",
];

impl Config {
    /// Loads `path` (or the embedded `configs/local.yaml`), then applies the
    /// process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (name, text) = match path {
            Some(p) => (
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|source| ConfigError::Io {
                    path: p.to_path_buf(),
                    source,
                })?,
            ),
            None => (
                "configs/local.yaml (embedded)".to_string(),
                LOCAL_CONFIG.to_string(),
            ),
        };
        Config::parse(&name, &text, std::env::vars())
    }

    /// Parses `text` (named `file` in errors) and applies the `ROUSE_*` and
    /// `REDIS_URL` variables among `env`.
    pub fn parse(
        file: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = if text.trim().is_empty() { "{}" } else { text };
        let from_file: Config = serde_path_to_error::deserialize(
            serde_norway::Deserializer::from_str(text),
        )
        .map_err(|e| {
            let line = e.inner().location().map(|l| l.line()).unwrap_or(1);
            ConfigError::File {
                file: file.to_string(),
                line,
                key: e.path().to_string(),
                message: strip_location(&e.inner().to_string()),
            }
        })?;

        let overrides = env_overrides(env);
        let config = if overrides.is_empty() {
            from_file
        } else {
            let mut tree: serde_norway::Value =
                serde_norway::from_str(text).map_err(|e| ConfigError::Invalid {
                    file: file.to_string(),
                    message: e.to_string(),
                })?;
            if tree.is_null() {
                tree = serde_norway::Value::Mapping(Default::default());
            }
            for (path, value, _) in &overrides {
                set_path(&mut tree, path, value.clone());
            }
            let vars = overrides
                .iter()
                .map(|(_, _, var)| var.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            serde_path_to_error::deserialize(tree).map_err(|e| ConfigError::Env {
                vars,
                key: e.path().to_string(),
                message: strip_location(&e.inner().to_string()),
            })?
        };
        config.validate().map_err(|message| ConfigError::Invalid {
            file: file.to_string(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let d = &self.database;
        for (what, start, end) in [
            ("http", d.port_range_http_start, d.port_range_http_end),
            ("raft", d.port_range_raft_start, d.port_range_raft_end),
            (
                "postgres",
                d.port_range_postgres_start,
                d.port_range_postgres_end,
            ),
        ] {
            if start == 0 || start > end {
                return Err(format!(
                    "database.port_range_{what}_start..end ({start}..{end}) is not a range of ports"
                ));
            }
        }
        if d.replication_factor == 0 {
            return Err("database.replication_factor must be at least 1".into());
        }
        if self.control.replica_hosts.is_empty() {
            return Err("control.replica_hosts must name at least one address".into());
        }
        self.proxy.validate()
    }
}

impl ProxyConfig {
    fn validate(&self) -> Result<(), String> {
        let checks = &self.patroni;
        if checks.rise == 0 || checks.fall == 0 || checks.check_interval.is_zero() {
            return Err("proxy.patroni: check_interval, rise and fall must be above zero".into());
        }
        for (i, c) in self.patroni_clusters.iter().enumerate() {
            if c.members.is_empty() {
                return Err(format!(
                    "proxy.patroni_clusters[{i}] ({}) has no members",
                    c.name
                ));
            }
            if self.patroni_clusters[..i].iter().any(|o| o.name == c.name) {
                return Err(format!(
                    "proxy.patroni_clusters: cluster {} is named twice",
                    c.name
                ));
            }
        }
        for (what, limits) in [
            ("http", &self.rate_limits.http),
            ("postgres", &self.rate_limits.postgres),
        ] {
            for limit in [&limits.per_app, &limits.per_credential]
                .into_iter()
                .flatten()
            {
                if !(limit.rate > 0.0 && limit.rate.is_finite()) || limit.burst == 0 {
                    return Err(format!(
                        "proxy.rate_limits.{what}: rate must be above zero and burst at least 1"
                    ));
                }
            }
        }
        if let Some(r) = &self.redis_backend {
            match (r.sentinels.is_empty(), r.servers.is_empty(), &r.master_name) {
                (false, true, Some(_)) | (true, false, None) => {}
                _ => {
                    return Err(
                        "proxy.redis_backend: give either sentinels and master_name, or servers"
                            .into(),
                    )
                }
            }
        }
        for l in &self.tcp_listeners {
            if !self.patroni_clusters.iter().any(|c| c.name == l.cluster) {
                return Err(format!(
                    "proxy.tcp_listeners: {} names cluster {}, which is not among proxy.patroni_clusters",
                    l.addr, l.cluster
                ));
            }
        }
        Ok(())
    }
}

/// serde_norway appends " at line X column Y"; the line is reported on its own.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// `(key path, value, variable name)` for every variable that names a key.
fn env_overrides(
    env: impl IntoIterator<Item = (String, String)>,
) -> Vec<(Vec<String>, serde_norway::Value, String)> {
    let mut out = Vec::new();
    let mut redis_url = None;
    for (var, raw) in env {
        if var == "REDIS_URL" {
            redis_url = Some(raw);
            continue;
        }
        let Some(rest) = var.strip_prefix("ROUSE_") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        // Other ROUSE_* variables (of scripts, say) are not config keys.
        if path.len() < 2 || !SECTIONS.contains(&path[0].as_str()) {
            continue;
        }
        let value = serde_norway::from_str(&raw).unwrap_or(serde_norway::Value::String(raw));
        out.push((path, value, var));
    }
    if let Some(url) = redis_url {
        if !out.iter().any(|(p, _, _)| p == &["redis", "url"]) {
            out.push((
                vec!["redis".into(), "url".into()],
                serde_norway::Value::String(url),
                "REDIS_URL".into(),
            ));
        }
    }
    out.sort_by(|a, b| a.2.cmp(&b.2));
    out
}

fn set_path(tree: &mut serde_norway::Value, path: &[String], value: serde_norway::Value) {
    use serde_norway::Value;
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = tree;
    for key in parents {
        if !node.is_mapping() {
            *node = Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().expect("just made a mapping");
        node = map
            .entry(Value::String(key.clone()))
            .or_insert_with(|| Value::Mapping(Default::default()));
    }
    if !node.is_mapping() {
        *node = Value::Mapping(Default::default());
    }
    node.as_mapping_mut()
        .expect("just made a mapping")
        .insert(Value::String(last.clone()), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn embedded_local_config_loads() {
        let c = Config::parse("local.yaml", LOCAL_CONFIG, no_env()).unwrap();
        assert_eq!(c.database.replication_factor, 1);
    }

    #[test]
    fn reference_node_yaml_loads_as_is() {
        let text = include_str!("../../../configs/node.yaml");
        let c = Config::parse("node.yaml", text, no_env()).unwrap();
        assert_eq!(c.database.replication_factor, 3);
        assert_eq!(c.database.hibernation_timeout, Duration::from_secs(60));
        assert_eq!(c.database.port_range_raft_end, 7999);
        assert_eq!(c.discovery.health_check_interval, Duration::from_secs(10));
        assert_eq!(c.node.max_connections, 50);
    }

    #[test]
    fn sidecar_example_loads() {
        let text = include_str!("../../../configs/sidecar.yaml");
        let c = Config::parse("sidecar.yaml", text, no_env()).unwrap();
        assert_eq!(c.proxy.response_cache[0].ttl, Duration::from_secs(5));
        assert_eq!(
            c.proxy.rate_limits.postgres.per_app.as_ref().unwrap().burst,
            20
        );
        assert!(c.redis.fail_open);
        let bad = "proxy:\n  rate_limits:\n    http: {per_app: {rate: 0, burst: 1}}\n";
        let err = Config::parse("c.yaml", bad, no_env()).unwrap_err();
        assert!(err.to_string().contains("rate must be above zero"), "{err}");
    }

    #[test]
    fn patroni_example_loads_and_listeners_must_name_a_cluster() {
        let text = include_str!("../../../configs/patroni.yaml");
        let c = Config::parse("patroni.yaml", text, no_env()).unwrap();
        assert_eq!(c.proxy.patroni_clusters[0].members.len(), 3);
        assert_eq!(c.proxy.tcp_listeners[1].role, MemberRole::Replica);
        assert_eq!(c.proxy.patroni.fall, 3);

        let stray = "proxy:\n  tcp_listeners:\n    - {addr: \"127.0.0.1:5000\", cluster: nope, role: primary}\n";
        let err = Config::parse("c.yaml", stray, no_env()).unwrap_err();
        assert!(err.to_string().contains("cluster nope"), "{err}");
        let empty = "proxy:\n  patroni_clusters:\n    - {name: a, members: []}\n";
        let err = Config::parse("c.yaml", empty, no_env()).unwrap_err();
        assert!(err.to_string().contains("has no members"), "{err}");
        let bad_role = "proxy:\n  patroni_clusters:\n    - {name: a, members: []}\n  tcp_listeners:\n    - {addr: \"127.0.0.1:5000\", cluster: a, role: leader}\n";
        let err = Config::parse("c.yaml", bad_role, no_env()).unwrap_err();
        assert!(err.to_string().contains("role"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = "node:\n  data_dir: /tmp/x\ndatabase:\n  replication_factor: 1\n  hibernate_after: 5s\n";
        let err = Config::parse("c.yaml", text, no_env()).unwrap_err();
        match &err {
            ConfigError::File {
                file,
                line,
                key,
                message,
            } => {
                assert_eq!(file, "c.yaml");
                assert_eq!(*line, 5);
                assert!(key.contains("hibernate_after"), "{key}");
                assert!(message.contains("unknown field"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("c.yaml:5: key `database.hibernate_after`"),
            "{err}"
        );
    }

    #[test]
    fn bad_value_names_its_key() {
        let text = "database:\n  hibernation_timeout: soon\n";
        let err = Config::parse("c.yaml", text, no_env())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.yaml:2") && err.contains("database.hibernation_timeout"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_apply_and_are_checked() {
        let env = vec![
            (
                "ROUSE_DATABASE__HIBERNATION_TIMEOUT".to_string(),
                "5s".to_string(),
            ),
            (
                "ROUSE_CONTROL__API_ADDR".to_string(),
                "127.0.0.1:18001".to_string(),
            ),
            ("ROUSE_DEPS_DIR".to_string(), "/opt/x".to_string()),
            (
                "REDIS_URL".to_string(),
                "redis://127.0.0.1:6379/0".to_string(),
            ),
        ];
        let c = Config::parse("local.yaml", LOCAL_CONFIG, env).unwrap();
        assert_eq!(c.database.hibernation_timeout, Duration::from_secs(5));
        assert_eq!(c.control.api_addr.port(), 18001);
        assert_eq!(c.redis.url.as_deref(), Some("redis://127.0.0.1:6379/0"));

        let bad = vec![("ROUSE_DATABASE__TYPO".to_string(), "1".to_string())];
        let err = Config::parse("local.yaml", LOCAL_CONFIG, bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ROUSE_DATABASE__TYPO") && err.contains("typo"),
            "{err}"
        );
    }

    #[test]
    fn empty_file_means_defaults() {
        let c = Config::parse("empty.yaml", "# nothing\n", no_env()).unwrap();
        assert_eq!(c.control.api_addr.port(), 8001);
        assert_eq!(c.proxy.max_waiting, 10_000);
    }

    #[test]
    fn inverted_port_range_is_refused() {
        let text = "database:\n  port_range_http_start: 6000\n  port_range_http_end: 5000\n";
        assert!(matches!(
            Config::parse("c.yaml", text, no_env()),
            Err(ConfigError::Invalid { .. })
        ));
    }
}
