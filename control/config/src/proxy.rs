//! The proxy section: listeners, wake-up, limits, pools, caches, the Patroni
//! and Redis fronts, and their validation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rouse_control_api::Name;
use serde::{Deserialize, Serialize};

use crate::*;

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
    /// How long one call to control may take (a wake: `wake_timeout`). A
    /// call that gets no answer is asked again while a request waits.
    #[serde(with = "crate::duration")]
    pub control_timeout: Duration,
    /// Credentials other than API keys.
    pub auth: AuthConfig,
    /// Logins (`<user>.<app>`) admitted to the admin console (database
    /// `rouse` or `pgbouncer` on the PostgreSQL port) beside user `admin`
    /// with an admin token as password.
    pub admin_users: Vec<String>,
    /// The certificate of the PostgreSQL front (SSLRequest answered `S`)
    /// and of TLS on the HTTP port. Absent: a self-signed one made at first
    /// start in `<node.data_dir>/proxy-tls/`, unless `self_signed_tls` is
    /// off (then SSLRequest is answered `N` and HTTP is plain only).
    pub tls: Option<TlsConfig>,
    pub self_signed_tls: bool,
    /// Refuse PostgreSQL clients that do not use TLS (PgBouncer's
    /// `client_tls_sslmode = require`).
    pub postgres_require_tls: bool,
    /// Refuse plain HTTP on the HTTP port and static listeners.
    pub http_require_tls: bool,
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
    /// Threads serving clients; 0 means one per core the proxy may use.
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
    /// A pooled backend connection unused this long is closed (PgBouncer's
    /// `server_idle_timeout`).
    #[serde(with = "crate::duration")]
    pub server_idle_timeout: Duration,
    /// A pooled backend connection this old is closed when it comes back
    /// (PgBouncer's `server_lifetime`).
    #[serde(with = "crate::duration")]
    pub server_lifetime: Duration,
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
            std::fs::read_to_string(
                data_dir
                    .join(rouse_control_api::access::TOKENS_DIR)
                    .join("proxy"),
            )
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
            control_timeout: Duration::from_secs(5),
            auth: AuthConfig::default(),
            admin_users: Vec::new(),
            tls: None,
            self_signed_tls: true,
            postgres_require_tls: false,
            http_require_tls: false,
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
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
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

impl ProxyConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        for login in &self.admin_users {
            let valid = login.rsplit_once('.').is_some_and(|(user, app)| {
                rouse_control_api::name::validate_user_name(user).is_ok() && Name::new(app).is_ok()
            });
            if !valid {
                return Err(format!(
                    "proxy.admin_users: {login:?} is not a login <user>.<app>"
                ));
            }
        }
        if (self.postgres_require_tls || self.http_require_tls)
            && self.tls.is_none()
            && !self.self_signed_tls
        {
            return Err(
                "proxy.postgres_require_tls and proxy.http_require_tls need TLS: set proxy.tls or leave proxy.self_signed_tls on".into(),
            );
        }
        let checks = &self.patroni;
        if checks.rise == 0 || checks.fall == 0 || checks.check_interval.is_zero() {
            return Err("proxy.patroni: check_interval, rise and fall must be above zero".into());
        }
        for (i, c) in self.patroni_clusters.iter().enumerate() {
            match &c.discovery {
                Some(d) => {
                    if d.etcd.is_empty() {
                        return Err(format!(
                            "proxy.patroni_clusters[{i}] ({}): discovery names no etcd endpoint",
                            c.name
                        ));
                    }
                    d.members_prefix()
                        .map_err(|e| format!("proxy.patroni_clusters[{i}] ({}): {e}", c.name))?;
                }
                None if c.members.is_empty() => {
                    return Err(format!(
                        "proxy.patroni_clusters[{i}] ({}) has no members and no discovery",
                        c.name
                    ));
                }
                None => {}
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
    pub app: Name,
    pub database: Name,
    #[serde(with = "crate::duration")]
    pub ttl: Duration,
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
pub struct StaticListener {
    pub addr: SocketAddr,
    pub app: Name,
    pub database: Name,
}
