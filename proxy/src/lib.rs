//! rouse's data plane. It routes each request by app namespace to that
//! app's database, holds it while the database wakes, and serves it.
//!
//! - [`route`]: which database a request is for
//! - [`auth`]: which app a credential belongs to
//! - [`resolve`]: where a database runs, and waking it
//! - [`http`]: the gateway API and the rqlite API
//! - [`pg`]: the PostgreSQL front
//! - [`patroni`]: following Patroni clusters; [`tcp`]: plain L4 listeners to them
//! - [`redis_front`]: `REDIS_URL` at the proxy, always to the current master
//! - [`fleet`]: sessions, limits, wakes and cache shared through Redis
//! - [`sql`]: the statement filter (no SQL that names files or loads code)
//! - [`activity`]: what control is told about use

mod activity;
mod auth;
mod error;
mod events;
mod fleet;
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod http;
mod net;
mod patroni;
mod pg;
mod quota;
mod redis_front;
mod reload;
mod resolve;
mod route;
mod sql;
mod stats;
mod tcp;
mod throttle;
pub mod upgrade;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use rouse_control_api::config::{Config, ConfigError, MemberRole};
use rouse_control_api::{Client, DbKey};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::activity::Activity;
use crate::auth::Authenticator;
use crate::fleet::ratelimit::RateLimits;
use crate::fleet::Fleet;
use crate::health::Health;
use crate::http::upstream::Upstream;
use crate::http::Proxy;
use crate::http::ResponseCache;
use crate::net::Connections;
use crate::patroni::{Cluster, PatroniError};
use crate::reload::Reloader;
use crate::resolve::{Bounds, Resolver};
use crate::stats::Stats;
use crate::upgrade::Inherited;

/// Loads and checks a configuration file as the proxy would at start, and
/// returns the proxy section as the proxy would use it.
pub fn check_config(path: Option<&std::path::Path>) -> Result<serde_json::Value, ConfigError> {
    let config = Config::load(path)?;
    Ok(serde_json::json!({ "proxy": config.proxy, "redis": config.redis }))
}

/// Threads serving clients: `proxy.worker_threads`, or by default half the
/// cores (at least one), since a sidecar shares its machine with the app and
/// the database, and fewer threads mean fewer cross-thread wake-ups.
pub fn worker_threads(config: &rouse_control_api::config::ProxyConfig) -> usize {
    match config.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
        n => n,
    }
}

/// The proxy's listening sockets, bound before it runs (tests bind port 0).
pub struct Listeners {
    pub http: TcpListener,
    pub postgres: TcpListener,
    pub postgres_ro: TcpListener,
    pub stats: TcpListener,
    /// Static listeners, each bound to one database.
    pub bound: Vec<(TcpListener, DbKey)>,
    /// Plain TCP listeners, as `proxy.tcp_listeners` lists them.
    pub tcp: Vec<TcpListener>,
    /// The Redis front, when `proxy.redis_backend` is set.
    pub redis: Option<TcpListener>,
}

impl Listeners {
    /// Binds what `config` names; a socket in `inherited` (taken over from
    /// the process being upgraded) is used instead of a new one.
    pub async fn bind(config: &Config, inherited: &mut Inherited) -> std::io::Result<Listeners> {
        let p = &config.proxy;
        let mut take = |name: String, addr: SocketAddr| match inherited.remove(&name) {
            Some(l) => TcpListener::from_std(l),
            None => std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            }),
        };
        let mut bound = Vec::new();
        for s in &p.static_listeners {
            bound.push((
                take(format!("static:{}", s.addr), s.addr)?,
                DbKey::new(s.app.clone(), s.database.clone()),
            ));
        }
        let mut tcp = Vec::new();
        for t in &p.tcp_listeners {
            tcp.push(take(format!("tcp:{}", t.addr), t.addr)?);
        }
        Ok(Listeners {
            http: take("http".into(), p.http_addr)?,
            postgres: take("postgres".into(), p.postgres_addr)?,
            postgres_ro: take("postgres_ro".into(), p.postgres_ro_addr)?,
            stats: take("stats".into(), p.stats_listen_addr())?,
            bound,
            tcp,
            redis: match &p.redis_backend {
                Some(_) => Some(take("redis".into(), p.redis_addr)?),
                None => None,
            },
        })
    }

    /// Every socket with the name `bind` knows it by, for an upgrade.
    fn sockets(&self, config: &Config) -> Vec<(String, RawFd)> {
        let p = &config.proxy;
        let mut out = vec![
            ("http".to_string(), self.http.as_raw_fd()),
            ("postgres".to_string(), self.postgres.as_raw_fd()),
            ("postgres_ro".to_string(), self.postgres_ro.as_raw_fd()),
            ("stats".to_string(), self.stats.as_raw_fd()),
        ];
        for ((l, _), s) in self.bound.iter().zip(&p.static_listeners) {
            out.push((format!("static:{}", s.addr), l.as_raw_fd()));
        }
        for (l, t) in self.tcp.iter().zip(&p.tcp_listeners) {
            out.push((format!("tcp:{}", t.addr), l.as_raw_fd()));
        }
        if let Some(l) = &self.redis {
            out.push(("redis".to_string(), l.as_raw_fd()));
        }
        out
    }
}

/// Asks control for the CA of the engines' certificates, until it answers,
/// so that engines whose HTTP API speaks TLS can be checked.
async fn learn_engine_ca(control: Client, upstream: Arc<Upstream>) {
    let mut pause = Duration::from_millis(100);
    loop {
        match control.engine_ca().await {
            Ok(ca) => {
                match rouse_control_api::engine_tls::client_config(ca.pem.as_bytes()) {
                    Ok(config) => upstream.trust_engines(config),
                    Err(e) => {
                        error!(error = %e, "control's engine CA is unusable: engines over TLS stay unreachable")
                    }
                }
                return;
            }
            Err(e) => tracing::debug!(error = %e, "engine CA not known yet"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Runs the proxy until `shutdown` resolves; requests in flight then get a
/// few seconds to finish. Each configuration from `reloads` is applied in
/// place (see [`reload`]).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut reloads: tokio::sync::mpsc::UnboundedReceiver<Config>,
) -> anyhow::Result<()> {
    rouse_control_api::telemetry::metrics();
    let p = config.proxy.clone();
    let sockets = listeners.sockets(&config);
    let mut control = Client::new(&p.control_url);
    if let Some(file) = &p.control_ca_file {
        let pem = std::fs::read(file)
            .map_err(|e| anyhow::anyhow!("proxy.control_ca_file {}: {e}", file.display()))?;
        control = control
            .with_ca(&pem)
            .map_err(|e| anyhow::anyhow!("proxy.control_ca_file {}: {e}", file.display()))?;
    }
    let control = match p.control_token(&config.node.data_dir) {
        Some(token) => control.with_token(token),
        None => {
            warn!("no control token: set proxy.control_token (or give the proxy node.data_dir of the node that founded the cluster); control will refuse every call");
            control
        }
    };
    let fleet = Arc::new(Fleet::new(&config.redis, &config.node.data_dir)?);
    let auth = Arc::new(Authenticator::new(control.clone(), fleet.clone(), &p.auth)?);
    let proxy_id = format!("{}-{}", hostname(), std::process::id());
    let quotas = quota::AppQuotas::new(config.apps.clone());
    let resolver = Resolver::new(
        control.clone(),
        fleet.clone(),
        proxy_id.clone(),
        Bounds {
            wake_timeout: p.wake_timeout,
            max_waiting: p.max_waiting as usize,
            auto_create: p.auto_create,
        },
        quotas.clone(),
    );
    let health = Arc::new(Health::default());
    let activity = Arc::new(Activity::default());
    let revocations = {
        let (fleet, auth) = (fleet.clone(), auth.clone());
        async move { fleet.follow_revocations(|r| auth.forget(&r)).await }
    };
    let upstream = Arc::new(Upstream::default());
    let tasks = [
        tokio::spawn(learn_engine_ca(control.clone(), upstream.clone())),
        tokio::spawn(revocations),
        tokio::spawn(events::follow(
            control.clone(),
            resolver.clone(),
            auth.clone(),
        )),
        tokio::spawn(activity.clone().report_forever(
            control.clone(),
            proxy_id.clone(),
            p.activity_interval,
        )),
    ];
    let limits = Arc::new(RateLimits::new(
        p.rate_limits.http.clone(),
        p.rate_limits.postgres.clone(),
    ));
    let failed_logins = Arc::new(throttle::FailedLogins::new(p.failed_login_limit));
    let pg = pg::PgFront::new(
        control.clone(),
        resolver.clone(),
        activity.clone(),
        fleet.clone(),
        health.clone(),
        quota::Admission {
            limits: limits.clone(),
            failed_logins: failed_logins.clone(),
            quotas,
        },
        &p,
    )?;
    let proxy = Arc::new(Proxy {
        config: p.clone(),
        control,
        auth: auth.clone(),
        fleet: fleet.clone(),
        limits: limits.clone(),
        cache: ResponseCache::new(&p.response_cache),
        resolver,
        upstream,
        activity,
        metrics: Default::default(),
        failed_logins,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    info!(proxy_id = %proxy_id, http = %listeners.http.local_addr()?, postgres = %listeners.postgres.local_addr()?, postgres_ro = %listeners.postgres_ro.local_addr()?, stats = %listeners.stats.local_addr()?, "rouse-proxy ready");
    let stats = Arc::new(Stats {
        control: proxy.control.clone(),
        resolver: proxy.resolver.clone(),
        health: health.clone(),
        activity: proxy.activity.clone(),
        proxy_id: proxy_id.clone(),
        started: std::time::Instant::now(),
        auth: p.stats_auth.clone(),
    });
    let connections = Arc::new(Connections::default());
    let mut servers = vec![
        tokio::spawn(pg.clone().serve(
            listeners.postgres,
            MemberRole::Primary,
            connections.clone(),
            stopped(),
        )),
        tokio::spawn(pg.serve(
            listeners.postgres_ro,
            MemberRole::Replica,
            connections.clone(),
            stopped(),
        )),
    ];
    let clusters = p
        .patroni_clusters
        .iter()
        .map(|c| {
            let cluster = Cluster::start(&c.name, &c.members, &p.patroni, health.clone())?;
            Ok((c.name.clone(), watch::Sender::new(cluster)))
        })
        .collect::<Result<HashMap<_, _>, PatroniError>>()?;
    if let (Some(listener), Some(backend)) = (listeners.redis, &p.redis_backend) {
        servers.push(tokio::spawn(redis_front::serve(
            listener,
            backend.clone(),
            health.clone(),
            connections.clone(),
            stopped(),
        )));
    }
    for (listener, t) in listeners.tcp.into_iter().zip(&p.tcp_listeners) {
        let cluster = clusters[&t.cluster].subscribe();
        servers.push(tokio::spawn(tcp::serve(
            listener,
            cluster,
            t.role,
            connections.clone(),
            stopped(),
        )));
    }
    let reloader = Reloader::new(
        config.clone(),
        auth.clone(),
        proxy.clone(),
        clusters,
        health.clone(),
    );
    let reloading = tokio::spawn(async move {
        while let Some(new) = reloads.recv().await {
            match reloader.apply(new) {
                Ok(()) => {
                    info!("configuration reloaded");
                    metrics::counter!("rouse_config_reloads_total", "result" => "applied")
                        .increment(1);
                }
                Err(e) => {
                    error!(error = %e, "new configuration refused; the running one stays");
                    metrics::counter!("rouse_config_reloads_total", "result" => "refused")
                        .increment(1);
                }
            }
        }
    });
    let data_planes = std::iter::once((listeners.http, None)).chain(
        listeners
            .bound
            .into_iter()
            .map(|(l, k)| (l, Some(Arc::new(k)))),
    );
    for (listener, bound) in data_planes {
        let proxy = proxy.clone();
        servers.push(tokio::spawn(rouse_control_api::server::serve_http(
            listener,
            None,
            "http",
            p.header_read_timeout,
            p.drain_grace,
            stopped(),
            move |peer: std::net::SocketAddr| {
                let (proxy, bound) = (proxy.clone(), bound.clone());
                hyper::service::service_fn(move |req| {
                    http::handle(proxy.clone(), bound.clone(), peer.ip(), req)
                })
            },
        )));
    }
    servers.push(tokio::spawn(rouse_control_api::server::serve_http(
        listeners.stats,
        None,
        "stats",
        p.header_read_timeout,
        Duration::from_secs(1),
        stopped(),
        move |peer: std::net::SocketAddr| {
            let stats = stats.clone();
            hyper::service::service_fn(move |req| stats.clone().handle(peer.ip(), req))
        },
    )));
    let upgraded = async {
        match &p.upgrade_socket {
            Some(path) => {
                if let Err(e) = upgrade::offer(path.clone(), sockets).await {
                    error!(error = %e, socket = %path.display(), "no graceful upgrade");
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown => info!("shutting down: draining"),
        _ = upgraded => info!("upgraded: draining"),
    }
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    // Sessions (PostgreSQL, Redis, tcp) go on until they end or the grace does.
    let drained = tokio::time::timeout(p.drain_grace, connections.drained()).await;
    if drained.is_err() {
        info!(
            open = connections.count(),
            "drain grace over: closing the remaining sessions"
        );
    }
    for t in tasks {
        t.abort();
    }
    reloading.abort();
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "proxy".into())
}
