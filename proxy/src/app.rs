//! The running proxy: the services every front shares, built once from the
//! configuration; the fronts served on the listeners; the background work
//! (control's events, revocations, activity reports, reloads); and the
//! drain when the proxy stops or hands its sockets to a new process.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rouse_config::{Config, MemberRole};
use rouse_control_api::Client;
use rouse_runtime::tasks::Tasks;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::activity::Activity;
use crate::auth::Authenticator;
use crate::fleet::ratelimit::RateLimits;
use crate::fleet::Fleet;
use crate::health::Health;
use crate::http::upstream::Upstream;
use crate::http::{Proxy, ResponseCache};
use crate::listeners::Listeners;
use crate::metrics::CONFIG_RELOADS;
use crate::net::Connections;
use crate::patroni::{Cluster, PatroniError};
use crate::pg::PgFront;
use crate::quota::{Admission, AppQuotas};
use crate::reload::Reloader;
use crate::resolve::{Bounds, Resolver};
use crate::stats::Stats;
use crate::throttle::FailedLogins;
use crate::{events, http, redis_front, tcp, upgrade};

/// What the fronts share, built once.
pub(crate) struct Services {
    pub(crate) control: Client,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) verifiers: crate::pg::Verifiers,
    pub(crate) resolver: Arc<Resolver>,
    pub(crate) limits: Arc<RateLimits>,
    pub(crate) cache: Arc<ResponseCache>,
    pub(crate) activity: Arc<Activity>,
    pub(crate) health: Arc<Health>,
    pub(crate) failed_logins: Arc<FailedLogins>,
    pub(crate) quotas: Arc<AppQuotas>,
    /// This proxy's name towards control and in wake locks.
    pub(crate) proxy_id: String,
}

impl Services {
    fn build(config: &Config) -> anyhow::Result<Services> {
        let p = &config.proxy;
        let control = control_client(config)?;
        let fleet = Arc::new(Fleet::new(&config.redis, &config.node.data_dir)?);
        let auth = Arc::new(Authenticator::new(control.clone(), fleet.clone(), &p.auth)?);
        let proxy_id = format!("{}-{}", hostname(), std::process::id());
        let quotas = AppQuotas::new(config.apps.clone());
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
        Ok(Services {
            control,
            fleet,
            auth,
            verifiers: Default::default(),
            resolver,
            limits: Arc::new(RateLimits::new(
                p.rate_limits.http.clone(),
                p.rate_limits.postgres.clone(),
            )),
            cache: Arc::new(ResponseCache::new(&p.response_cache)),
            activity: Arc::new(Activity::default()),
            health: Arc::new(Health::default()),
            failed_logins: Arc::new(FailedLogins::new(p.failed_login_limit)),
            quotas,
            proxy_id,
        })
    }
}

/// The client for control: its CA when `proxy.control_ca_file` names one,
/// and the proxy's token.
fn control_client(config: &Config) -> anyhow::Result<Client> {
    let p = &config.proxy;
    let mut control = Client::new(&p.control_url).with_timeout(p.control_timeout);
    if let Some(file) = &p.control_ca_file {
        let pem = std::fs::read(file)
            .map_err(|e| anyhow::anyhow!("proxy.control_ca_file {}: {e}", file.display()))?;
        control = control
            .with_ca(&pem)
            .map_err(|e| anyhow::anyhow!("proxy.control_ca_file {}: {e}", file.display()))?;
    }
    Ok(match p.control_token(&config.node.data_dir) {
        Some(token) => control.with_token(token),
        None => {
            warn!("no control token: set proxy.control_token (or give the proxy node.data_dir of the node that founded the cluster); control will refuse every call");
            control
        }
    })
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
/// place (see `reload`).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reloads: mpsc::UnboundedReceiver<Config>,
) -> anyhow::Result<()> {
    rouse_runtime::telemetry::metrics();
    rouse_runtime::metric::describe(rouse_runtime::metric::CATALOGUE);
    rouse_runtime::metric::describe(crate::metrics::CATALOGUE);
    let mut p = config.proxy.clone();
    p.tls = crate::net::tls::certificate(&p, &config.node.data_dir)?;
    let http_tls = p
        .tls
        .as_ref()
        .map(crate::net::tls::acceptor)
        .transpose()?
        .map(|acceptor| rouse_runtime::server::ListenerTls {
            acceptor,
            plain: !p.http_require_tls,
        });
    let sockets = listeners.sockets(&config);
    let services = Arc::new(Services::build(&config)?);
    let s = &services;
    let upstream = Arc::new(Upstream::default());
    let learning = tokio::spawn(learn_engine_ca(s.control.clone(), upstream.clone()));
    // Watched: a loop that ends or panics starts again, and /healthz says
    // so while it is down.
    let loops = Arc::new(Tasks::default());
    let (fleet, auth) = (s.fleet.clone(), s.auth.clone());
    loops.restarting("revocations", move || {
        let (fleet, auth) = (fleet.clone(), auth.clone());
        async move { fleet.follow_revocations(|r| auth.forget(&r)).await }
    });
    let forget = events::Forget {
        resolver: s.resolver.clone(),
        auth: s.auth.clone(),
        verifiers: s.verifiers.clone(),
    };
    let control = s.control.clone();
    loops.restarting("control_events", move || {
        events::follow(control.clone(), forget.clone())
    });
    let (activity, control, proxy_id) = (s.activity.clone(), s.control.clone(), s.proxy_id.clone());
    let every = p.activity_interval;
    loops.restarting("activity_report", move || {
        activity
            .clone()
            .report_forever(control.clone(), proxy_id.clone(), every)
    });
    let pg = PgFront::new(
        s.control.clone(),
        s.resolver.clone(),
        s.activity.clone(),
        s.fleet.clone(),
        s.health.clone(),
        Admission {
            verifiers: s.verifiers.clone(),
            limits: s.limits.clone(),
            failed_logins: s.failed_logins.clone(),
            quotas: s.quotas.clone(),
        },
        &p,
    )?;
    let front = pg.clone();
    loops.restarting("pg_pools", move || front.clone().keep_pools());
    loops.restarting("memory_trim", rouse_runtime::memory::trim_forever);
    let connections = Arc::new(Connections::default());
    let proxy = Arc::new(Proxy {
        config: p.clone(),
        control: s.control.clone(),
        auth: s.auth.clone(),
        fleet: s.fleet.clone(),
        limits: s.limits.clone(),
        cache: s.cache.clone(),
        resolver: s.resolver.clone(),
        upstream,
        activity: s.activity.clone(),
        metrics: Default::default(),
        failed_logins: s.failed_logins.clone(),
        pg: pg.clone(),
        connections: connections.clone(),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    info!(proxy_id = %s.proxy_id, http = %listeners.http.local_addr()?, postgres = %listeners.postgres.local_addr()?, postgres_ro = %listeners.postgres_ro.local_addr()?, stats = %listeners.stats.local_addr()?, "rouse-proxy ready");
    let stats = Arc::new(Stats {
        control: s.control.clone(),
        resolver: s.resolver.clone(),
        health: s.health.clone(),
        activity: s.activity.clone(),
        proxy_id: s.proxy_id.clone(),
        started: std::time::Instant::now(),
        auth: p.stats_auth.clone(),
        loops: loops.clone(),
    });
    let upgrade_listener = p.upgrade_socket.as_ref().map(|path| {
        upgrade::bind(path)
            .inspect_err(|e| error!(error = %e, socket = %path.display(), "no graceful upgrade"))
    });
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
            let cluster = Cluster::start(&c.name, &c.members, &p.patroni, s.health.clone())?;
            Ok((c.name.clone(), watch::Sender::new(cluster)))
        })
        .collect::<Result<HashMap<_, _>, PatroniError>>()?;
    let discovered = p
        .patroni_clusters
        .iter()
        .filter_map(|c| Some((c.discovery.as_ref()?, clusters[&c.name].clone())))
        .map(|(d, cluster)| {
            let prefix = d.members_prefix().map_err(|e| anyhow::anyhow!(e))?;
            Ok((d.etcd.clone(), prefix, cluster))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !discovered.is_empty() {
        let health = s.health.clone();
        loops.restarting("patroni_discovery", move || {
            let follows = discovered.iter().map(|(endpoints, prefix, cluster)| {
                crate::discovery::follow(
                    rouse_runtime::etcd::Members::new(endpoints, prefix.clone()),
                    cluster.clone(),
                    health.clone(),
                )
            });
            futures::FutureExt::map(futures::future::join_all(follows), |_| ())
        });
    }
    if let (Some(listener), Some(backend)) = (listeners.redis, &p.redis_backend) {
        servers.push(tokio::spawn(redis_front::serve(
            listener,
            backend.clone(),
            s.health.clone(),
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
    let reloading = tokio::spawn(reload_forever(
        Reloader::new(config.clone(), services.clone(), clusters),
        reloads,
    ));
    let data_planes = std::iter::once((listeners.http, None)).chain(
        listeners
            .bound
            .into_iter()
            .map(|(l, k)| (l, Some(Arc::new(k)))),
    );
    for (listener, bound) in data_planes {
        let proxy = proxy.clone();
        servers.push(tokio::spawn(rouse_runtime::server::serve_http(
            listener,
            http_tls.clone(),
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
    servers.push(tokio::spawn(rouse_runtime::server::serve_http(
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
        match upgrade_listener {
            Some(Ok(listener)) => {
                if let Err(e) = upgrade::offer(listener, sockets).await {
                    error!(error = %e, "no graceful upgrade");
                    std::future::pending::<()>().await;
                }
            }
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown => info!("shutting down: draining"),
        _ = upgraded => info!("upgraded: draining"),
    }
    let _ = stop_tx.send(true);
    drain(servers, &connections, p.drain_grace).await;
    learning.abort();
    loops.abort_all();
    reloading.abort();
    Ok(())
}

/// Applies each configuration from `reloads`, or refuses it whole.
async fn reload_forever(reloader: Reloader, mut reloads: mpsc::UnboundedReceiver<Config>) {
    while let Some(new) = reloads.recv().await {
        match reloader.apply(new) {
            Ok(()) => {
                info!("configuration reloaded");
                CONFIG_RELOADS.counter(["applied".into()]).increment(1);
            }
            Err(e) => {
                error!(error = %e, "new configuration refused; the running one stays");
                CONFIG_RELOADS.counter(["refused".into()]).increment(1);
            }
        }
    }
}

/// Waits for the servers to stop accepting (HTTP requests in flight end
/// within their own grace), then for the sessions (PostgreSQL, Redis, tcp)
/// to end, at most `grace`.
async fn drain(servers: Vec<JoinHandle<()>>, connections: &Connections, grace: Duration) {
    for s in servers {
        let _ = s.await;
    }
    if tokio::time::timeout(grace, connections.drained())
        .await
        .is_err()
    {
        info!(
            open = connections.count(),
            "drain grace over: closing the remaining sessions"
        );
    }
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "proxy".into())
}
