//! The PostgreSQL front (`DATABASE_URL` at the proxy): startup, routing by
//! `user.app` or `options=-c rouse.app=<app>`, SCRAM-SHA-256 done by the
//! proxy, then the wake (the client waits inside its connect), then the
//! backend connection as the same role and a byte-for-byte session.

pub mod conn;
pub mod frame;
pub mod messages;
pub mod pool;
pub mod scram;
pub mod startup;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BufMut;
use bytes::BytesMut;
use rouse_control_api::config::{MemberRole, PatroniChecks};
use rouse_control_api::{Client, DbKey, Engine, Name, PoolMode};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::activity::Activity;
use crate::error::ProxyError;
use crate::fleet::ratelimit::{Protocol, RateLimits};
use crate::fleet::Fleet;
use crate::listen::accept_forever;
use crate::patroni::{Cluster, ConnectError, Pick};
use crate::wake::Routes;
use conn::Conn;
use frame::{read_frame, typed, FrameError, MAX_AUTH_MESSAGE, MAX_STARTUP};
use scram::{ClientExchange, ScramError, ServerExchange, Verifier};
use startup::Startup;

/// What a client sees when its connection fails: a SQLSTATE and a message.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{0}")]
    Protocol(String),
    #[error("password authentication failed for user \"{0}\"")]
    Password(String),
    #[error("{0}")]
    Authorization(String),
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    #[error("the database system is starting up: database \"{0}\" is waking, try again")]
    Waking(String),
    #[error("{0}")]
    Backend(String),
    /// The backend's address did not take the connection: the database
    /// stopped or moved (a stale route).
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Closed(String),
    #[error("sorry, too many clients already")]
    TooManyClients,
    #[error("too many new connections for this app: retry in {0:?}")]
    RateLimited(Duration),
    #[error("too many failed logins from this address: retry in {0:?}")]
    FailedLogins(Duration),
    #[error("too many connections are logging in: try again")]
    PendingLogins,
    #[error("{0}")]
    AppLimit(String),
}

impl PgError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            PgError::Protocol(_) | PgError::Closed(_) => "08P01",
            PgError::Password(_) => "28P01",
            PgError::Authorization(_) => "28000",
            PgError::UnknownDatabase(_) => "3D000",
            PgError::Waking(_) => "57P03",
            PgError::Backend(_) | PgError::Unreachable(_) => "08006",
            PgError::TooManyClients
            | PgError::RateLimited(_)
            | PgError::FailedLogins(_)
            | PgError::PendingLogins
            | PgError::AppLimit(_) => "53300",
        }
    }

    /// What the client is told: a backend failure's detail (control's or
    /// the engine's words) goes to the log, never to the client.
    pub fn client_message(&self) -> String {
        match self {
            PgError::Backend(_) | PgError::Unreachable(_) => {
                "the database is unavailable, try again".into()
            }
            other => other.to_string(),
        }
    }

    /// The outcome label of `rouse_requests_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            PgError::Protocol(_) | PgError::UnknownDatabase(_) | PgError::Closed(_) => "user",
            PgError::Password(_) | PgError::Authorization(_) => "auth",
            PgError::Waking(_) => "wake_timeout",
            PgError::Backend(_) | PgError::Unreachable(_) => "backend",
            PgError::TooManyClients
            | PgError::RateLimited(_)
            | PgError::FailedLogins(_)
            | PgError::PendingLogins
            | PgError::AppLimit(_) => "rate_limit",
        }
    }
}

impl From<FrameError> for PgError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Closed | FrameError::Io(_) => PgError::Closed(e.to_string()),
            FrameError::BadLength(..) => PgError::Protocol(format!("invalid message: {e}")),
        }
    }
}

/// A client connection that passed startup, kept on the heap while it lives.
struct Opened {
    client: Conn,
    /// What the client sent beyond the startup.
    buf: BytesMut,
    started: Started,
}

/// A session that passed startup: its database, how it reaches the
/// backend, the client's cancel key and its slot among
/// `max_client_connections`.
struct Started {
    key: DbKey,
    mode: Mode,
    cancel: (i32, i32),
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// The session's place under its app's limits.
    _app_slot: crate::quota::Slot,
}

enum Mode {
    /// A backend connection of its own for the whole session; on a Patroni
    /// member, closed when the member loses its role.
    Session(Box<BackendSession>, Option<(Arc<Cluster>, Pick)>),
    /// Backend connections lent per transaction, to where `Upstream` says.
    Transaction(Arc<pool::Pool>, Upstream),
}

/// Where a database's backend connections go.
#[derive(Clone)]
enum Upstream {
    /// A database control runs: its (only) instance, as control reports it.
    Managed(DbKey),
    /// A Patroni cluster: its leader or a replica, by the health checks.
    Cluster(Arc<Cluster>, MemberRole),
}

impl Upstream {
    /// The address for a new backend connection.
    async fn addr(&self, routes: &Routes) -> Result<SocketAddr, PgError> {
        match self {
            Upstream::Managed(key) => {
                let t = routes
                    .target(key)
                    .await
                    .map_err(|e| PgError::Backend(e.to_string()))?;
                endpoint_addr(&t)
            }
            Upstream::Cluster(cluster, role) => cluster
                .pick(*role)
                .await
                .map(|p| p.addr)
                .map_err(|e| PgError::Backend(e.to_string())),
        }
    }
}

/// A logged-in backend connection.
pub struct BackendSession {
    pub stream: TcpStream,
    /// What the backend sent beyond ReadyForQuery.
    pub buf: BytesMut,
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus and notices of the login.
    pub greeting: Vec<BytesMut>,
    /// The login's ReadyForQuery.
    pub ready: BytesMut,
}

pub struct PgFront {
    pub control: Client,
    pub routes: Arc<Routes>,
    pub activity: Arc<Activity>,
    verifiers: moka::future::Cache<(Name, String), Option<Arc<Verifier>>>,
    /// Derives the stable salt shown for unknown roles, alike on every
    /// proxy of a fleet.
    mock_key: [u8; 32],
    cancels: Mutex<HashMap<(i32, i32), pool::CancelSlot>>,
    /// By database, role and read-only port.
    pools: Mutex<HashMap<(DbKey, String, bool), Arc<pool::Pool>>>,
    /// Registered Patroni clusters being checked, by database.
    clusters: Mutex<HashMap<DbKey, Arc<Cluster>>>,
    checks: PatroniChecks,
    fleet: Arc<Fleet>,
    limits: Arc<RateLimits>,
    /// Where other proxies forward cancel requests for this one's sessions.
    advertised: std::sync::OnceLock<SocketAddr>,
    advertise_config: Option<SocketAddr>,
    pool_size: usize,
    startup_timeout: Duration,
    tls: Option<TlsAcceptor>,
    base_domain: Option<String>,
    /// One permit per client session.
    sessions: Arc<tokio::sync::Semaphore>,
    /// One permit per connection that has not authenticated yet.
    pending_logins: Arc<tokio::sync::Semaphore>,
    /// From the first byte to a finished authentication.
    login_timeout: Duration,
    failed_logins: Arc<crate::throttle::FailedLogins>,
    quotas: Arc<crate::quota::AppQuotas>,
}

impl PgFront {
    /// The front as `proxy.*` configures it (TLS, limits, pool size).
    pub fn new(
        control: Client,
        routes: Arc<Routes>,
        activity: Arc<Activity>,
        fleet: Arc<Fleet>,
        admission: crate::quota::Admission,
        config: &rouse_control_api::config::ProxyConfig,
    ) -> anyhow::Result<Arc<PgFront>> {
        let tls = match &config.tls {
            Some(t) => {
                Some(rouse_control_api::server::tls_acceptor(t).map_err(|e| anyhow::anyhow!(e))?)
            }
            None => None,
        };
        Ok(Arc::new(PgFront {
            control,
            routes,
            activity,
            verifiers: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(30))
                .build(),
            mock_key: fleet.derive_key("unknown-role salt"),
            cancels: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
            clusters: Mutex::new(HashMap::new()),
            checks: config.patroni.clone(),
            fleet,
            limits: admission.limits,
            advertised: std::sync::OnceLock::new(),
            advertise_config: config.advertise_postgres_addr,
            pool_size: config.pool_size,
            // The startup includes the wake.
            startup_timeout: config.header_read_timeout + config.wake_timeout,
            tls,
            base_domain: config.base_domain.clone(),
            sessions: Arc::new(tokio::sync::Semaphore::new(config.max_client_connections)),
            pending_logins: Arc::new(tokio::sync::Semaphore::new(config.max_pending_logins)),
            login_timeout: config.header_read_timeout,
            failed_logins: admission.failed_logins,
            quotas: admission.quotas,
        }))
    }

    /// Serves clients of the read-write port (`Primary`) or the read-only
    /// port (`Replica`) until `stop` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        port: MemberRole,
        stop: impl std::future::Future<Output = ()>,
    ) {
        if port == MemberRole::Primary {
            if let Some(addr) = self.advertise_config.or(listener.local_addr().ok()) {
                let _ = self.advertised.set(addr);
            }
        }
        accept_forever(listener, "postgres", stop, move |socket, peer| {
            self.clone().session(socket, peer, port)
        })
        .await
    }

    async fn session(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, port: MemberRole) {
        // Boxed: the startup's large state is freed once it is done, instead
        // of staying in every session's task.
        let Some(opened) = Box::pin(self.open(tcp, peer, port)).await else {
            return;
        };
        self.relay(opened).await;
    }

    /// The startup, bounded in time; failures are answered here.
    async fn open(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        port: MemberRole,
    ) -> Option<Box<Opened>> {
        let mut buf = BytesMut::with_capacity(1024);
        let mut client = Conn::Plain(tcp);
        let started = match self.pending_logins.clone().try_acquire_owned() {
            Ok(pending) => {
                tokio::time::timeout(
                    self.startup_timeout,
                    self.start(&mut client, &mut buf, port, peer, pending),
                )
                .await
            }
            Err(_) => Ok(Err(PgError::PendingLogins)),
        };
        let e = match started {
            Ok(Ok(Some(started))) => {
                return Some(Box::new(Opened {
                    client,
                    buf,
                    started,
                }))
            }
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                match e {
                    PgError::Backend(_) => warn!(%peer, error = %e, "postgres connection failed"),
                    _ => debug!(%peer, error = %e, "postgres connection refused"),
                }
                metrics::counter!("rouse_requests_total", "app" => "", "db" => "", "protocol" => "postgres", "outcome" => e.kind()).increment(1);
                e
            }
            Err(_) => PgError::Protocol("startup not completed in time".into()),
        };
        let _ = client
            .write_all(&messages::fatal(e.sqlstate(), &e.client_message()))
            .await;
        let _ = client.flush().await;
        None
    }

    /// Relays a started session until it ends.
    async fn relay(&self, mut opened: Box<Opened>) {
        // Everything stays in `opened` on the heap and is borrowed from
        // there, so that no copy of it sits in this future.
        let Opened {
            client,
            buf,
            started,
        } = &mut *opened;
        let key = &started.key;
        metrics::counter!("rouse_requests_total", "app" => key.app.to_string(), "db" => key.db.to_string(), "protocol" => "postgres", "outcome" => "ok").increment(1);
        let _in_session = self.activity.begin(key);
        match &mut started.mode {
            // Boxed, so that the transaction-mode clients' tasks stay small.
            Mode::Session(backend, member) => {
                Box::pin(relay_session(client, buf, backend, member.as_ref(), key)).await
            }
            Mode::Transaction(pool, upstream) => {
                let slot = self
                    .cancels
                    .lock()
                    .expect("cancels poisoned")
                    .get(&started.cancel)
                    .cloned()
                    .unwrap_or_default();
                let (routes, upstream) = (self.routes.clone(), upstream.clone());
                let addr =
                    move || -> futures::future::BoxFuture<'static, Result<SocketAddr, PgError>> {
                        let (routes, upstream) = (routes.clone(), upstream.clone());
                        Box::pin(async move { upstream.addr(&routes).await })
                    };
                if let Err(e) = pool::relay(client, buf, pool, addr, &slot).await {
                    debug!(database = %key, error = %e, "pooled postgres session ended");
                    let _ = client
                        .write_all(&messages::fatal(e.sqlstate(), &e.client_message()))
                        .await;
                }
            }
        }
        self.cancels
            .lock()
            .expect("cancels poisoned")
            .remove(&started.cancel);
        self.fleet.drop_cancel_key(started.cancel).await;
    }

    /// Files a session's cancel key in Redis, so that a cancel request
    /// arriving at any proxy is forwarded here.
    async fn share_cancel_key(&self, cancel: (i32, i32)) {
        if let Some(addr) = self.advertised.get() {
            self.fleet.share_cancel_key(cancel, *addr).await;
        }
    }

    /// Startup, authentication, wake and backend login. `None` when the
    /// connection was a cancel request.
    async fn start(
        &self,
        client: &mut Conn,
        buf: &mut BytesMut,
        port: MemberRole,
        peer: SocketAddr,
        pending: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Option<Started>, PgError> {
        // Logging in is bounded on its own; the wake after it has its own bound.
        let login_deadline = tokio::time::Instant::now() + self.login_timeout;
        let login_timed_out = |_| PgError::Protocol("login not completed in time".into());
        let params = tokio::time::timeout_at(login_deadline, async {
            loop {
                let frame = read_frame(client, buf, false, MAX_STARTUP).await?;
                match startup::parse(frame).map_err(|e| PgError::Protocol(e.to_string()))? {
                    Startup::SslRequest => match (&self.tls, &*client) {
                        (Some(tls), Conn::Plain(_)) => {
                            // Bytes sent before the answer would bypass TLS: refuse them.
                            if !buf.is_empty() {
                                return Err(PgError::Protocol(
                                    "data received before the TLS handshake".into(),
                                ));
                            }
                            client.write_all(b"S").await.map_err(closed)?;
                            let Conn::Plain(tcp) = std::mem::replace(client, Conn::Upgrading)
                            else {
                                unreachable!("matched Conn::Plain above")
                            };
                            let tls = tls.accept(tcp).await.map_err(|e| {
                                PgError::Protocol(format!("TLS handshake failed: {e}"))
                            })?;
                            *client = Conn::Tls(Box::new(tls.into()));
                        }
                        _ => client.write_all(b"N").await.map_err(closed)?,
                    },
                    // GSS encryption is declined; libpq then goes on.
                    Startup::GssEncRequest => client.write_all(b"N").await.map_err(closed)?,
                    Startup::Cancel { pid, secret } => {
                        self.cancel(pid, secret).await;
                        return Ok(None);
                    }
                    Startup::Params(params) => break Ok(Some(params)),
                }
            }
        })
        .await
        .map_err(login_timed_out)??;
        let Some(params) = params else {
            return Ok(None);
        };
        // Over the limit: refused after the startup packet, as PostgreSQL does.
        let permit = self
            .sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| PgError::TooManyClients)?;
        let sni_app = client
            .sni()
            .and_then(|sni| sni_app(sni, self.base_domain.as_deref()));
        let (role, app, params) = route(params, sni_app)?;
        let database = params
            .get("database")
            .cloned()
            .unwrap_or_else(|| role.clone());
        let db = Name::new(&database).map_err(|_| PgError::UnknownDatabase(database.clone()))?;
        let key = DbKey::new(app.clone(), db);

        self.failed_logins
            .check(peer.ip())
            .map_err(PgError::FailedLogins)?;
        let client_key = tokio::time::timeout_at(login_deadline, async {
            let verifier = self.verifier(&app, &role).await?;
            let client_key = authenticate(client, buf, &verifier, &role).await;
            if matches!(client_key, Err(PgError::Password(_))) {
                self.failed_logins.record(peer.ip());
            }
            Ok::<_, PgError>((verifier, client_key?))
        })
        .await
        .map_err(login_timed_out)??;
        let (verifier, client_key) = client_key;
        drop(pending);
        self.limits
            .check(&self.fleet, Protocol::Postgres, &app, || role.clone())
            .await
            .map_err(|e| match e {
                ProxyError::RateLimited(wait) => PgError::RateLimited(wait),
                other => PgError::Backend(other.to_string()),
            })?;

        let resolve_error = |e| match e {
            ProxyError::NotFound => PgError::UnknownDatabase(database.clone()),
            ProxyError::WakeTimeout { .. } | ProxyError::QueueFull(_) => {
                PgError::Waking(database.clone())
            }
            e @ ProxyError::AppLimit { .. } => PgError::AppLimit(e.to_string()),
            other => PgError::Backend(other.to_string()),
        };
        let stale = |e: &PgError| matches!(e, PgError::Unreachable(_));
        let target = self.routes.target(&key).await.map_err(resolve_error)?;
        let app_slot = self
            .quotas
            .session(&key)
            .map_err(|e| PgError::AppLimit(e.to_string()))?;
        let upstream = match target.engine {
            Engine::Rqlite => return Err(PgError::UnknownDatabase(database)),
            Engine::Postgres => Upstream::Managed(key.clone()),
            Engine::Patroni => Upstream::Cluster(self.cluster(&key, &target)?, port),
        };
        // One managed instance serves both ports: on the read-only one the
        // session logs in as the role's read-only twin, which may not write
        // whatever it sends (a replica cannot anyway).
        // On a shared (Patroni) cluster the role carries its app.
        let backend_role = match (&upstream, port) {
            (Upstream::Managed(_), MemberRole::Replica) => {
                rouse_control_api::name::read_only_role(&role)
            }
            (Upstream::Managed(_), MemberRole::Primary) => role.clone(),
            (Upstream::Cluster(..), _) => rouse_control_api::name::cluster_role(&role, &app),
        };
        let slot: pool::CancelSlot = Arc::new(Mutex::new(None));
        let ours = (rand::random::<i32>(), rand::random::<i32>());
        let (mode, greeting, ready) = match target.pool_mode {
            PoolMode::Session => {
                let mut passed: Vec<(&str, &str)> = params
                    .iter()
                    .filter(|(k, _)| *k != "user" && *k != "database")
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let login = |addr| {
                    connect_backend(
                        addr,
                        &backend_role,
                        &database,
                        &passed,
                        &verifier,
                        &client_key,
                    )
                };
                let (session, member) = match &upstream {
                    Upstream::Managed(_) => {
                        // One instance serves both ports; the read-only port keeps it so.
                        if port == MemberRole::Replica {
                            passed.push(("default_transaction_read_only", "on"));
                        }
                        let session = self
                            .routes
                            .connect_with_wake(
                                &key,
                                target.clone(),
                                "postgres",
                                stale,
                                resolve_error,
                                |target| {
                                    let passed = &passed;
                                    let (role, database) = (&backend_role, &database);
                                    let (verifier, client_key) = (&verifier, &client_key);
                                    async move {
                                        let addr = endpoint_addr(&target)?;
                                        connect_backend(
                                            addr, role, database, passed, verifier, client_key,
                                        )
                                        .await
                                    }
                                },
                            )
                            .await?;
                        (session, None)
                    }
                    Upstream::Cluster(cluster, role) => {
                        let (session, pick) =
                            cluster.connect(*role, login).await.map_err(|e| match e {
                                ConnectError::NoMember(e) => {
                                    debug!(database = %key, error = %e, "no member to connect to");
                                    PgError::Waking(database.clone())
                                }
                                ConnectError::Member(e) => e,
                            })?;
                        (session, Some((cluster.clone(), pick)))
                    }
                };
                *slot.lock().expect("cancel poisoned") =
                    Some((session.addr, session.pid, session.secret));
                let (greeting, ready) = (session.greeting.clone(), session.ready.clone());
                (Mode::Session(Box::new(session), member), greeting, ready)
            }
            PoolMode::Transaction => {
                let read_only = port == MemberRole::Replica;
                let pool = self.pool(
                    &key,
                    &backend_role,
                    &database,
                    &verifier,
                    client_key,
                    read_only,
                );
                // A first login checks the route and fills the pool's greeting.
                let b = match &upstream {
                    Upstream::Managed(_) => {
                        self.routes
                            .connect_with_wake(
                                &key,
                                target.clone(),
                                "postgres",
                                stale,
                                resolve_error,
                                |target| {
                                    let pool = &pool;
                                    async move { pool.checkout(endpoint_addr(&target)?).await }
                                },
                            )
                            .await?
                    }
                    Upstream::Cluster(..) => {
                        pool.checkout(upstream.addr(&self.routes).await?).await?
                    }
                };
                pool.checkin(b);
                let greeting = pool.greeting();
                (
                    Mode::Transaction(pool, upstream),
                    greeting,
                    messages::message(b'Z', |b| b.put_u8(b'I')),
                )
            }
        };
        self.cancels
            .lock()
            .expect("cancels poisoned")
            .insert(ours, slot);
        self.share_cancel_key(ours).await;
        let mut out = BufWriter::new(&mut *client);
        out.write_all(&messages::auth_ok()).await.map_err(closed)?;
        for frame in &greeting {
            out.write_all(frame).await.map_err(closed)?;
        }
        out.write_all(&messages::backend_key_data(ours.0, ours.1))
            .await
            .map_err(closed)?;
        out.write_all(&ready).await.map_err(closed)?;
        out.flush().await.map_err(closed)?;
        info!(database = %key, role = %role, pool_mode = ?target.pool_mode, "postgres session started");
        Ok(Some(Started {
            key,
            mode,
            cancel: ours,
            _permit: permit,
            _app_slot: app_slot,
        }))
    }

    fn pool(
        &self,
        key: &DbKey,
        role: &str,
        database: &str,
        verifier: &Arc<Verifier>,
        client_key: [u8; 32],
        read_only: bool,
    ) -> Arc<pool::Pool> {
        let mut pools = self.pools.lock().expect("pools poisoned");
        let id = (key.clone(), role.to_string(), read_only);
        if let Some(p) = pools.get(&id) {
            if p.renew(verifier, client_key) {
                return p.clone();
            }
        }
        // New, or the role's password changed: a fresh pool.
        let p = Arc::new(pool::Pool::new(
            role,
            database,
            verifier.clone(),
            client_key,
            self.pool_size,
            read_only,
        ));
        pools.insert(id, p.clone());
        p
    }

    /// The health-checked cluster of a registered Patroni database; a new
    /// one when its members changed.
    fn cluster(&self, key: &DbKey, target: &crate::wake::Target) -> Result<Arc<Cluster>, PgError> {
        let members: Vec<_> = target
            .endpoints
            .iter()
            .filter_map(|e| e.patroni_member())
            .collect();
        let mut clusters = self.clusters.lock().expect("clusters poisoned");
        if let Some(c) = clusters.get(key) {
            if c.members() == members {
                return Ok(c.clone());
            }
        }
        let cluster = Cluster::start(&key.internal(), &members, &self.checks)
            .map_err(|e| PgError::Backend(e.to_string()))?;
        clusters.insert(key.clone(), cluster.clone());
        Ok(cluster)
    }

    /// The role's verifier, or one no password matches when the role or
    /// app is unknown or the role is not a valid name (which is never
    /// looked up).
    async fn verifier(&self, app: &Name, role: &str) -> Result<Arc<Verifier>, PgError> {
        let impossible = || {
            Arc::new(Verifier::impossible(
                &self.mock_key,
                &format!("{role}.{app}"),
            ))
        };
        if rouse_control_api::name::validate_user_name(role).is_err() {
            return Ok(impossible());
        }
        let control = self.control.clone();
        let (a, r) = (app.clone(), role.to_string());
        let found = self
            .verifiers
            .try_get_with((app.clone(), role.to_string()), async move {
                match control.get_user(&a, &r).await {
                    Ok(u) => Ok(Verifier::parse(&u.scram_verifier).map(Arc::new)),
                    Err(e) if e.is_not_found() => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await
            .map_err(|e| PgError::Backend(format!("control unavailable: {e}")))?;
        // Unknown users fail exactly like a wrong password.
        Ok(found.unwrap_or_else(impossible))
    }

    /// Forwards a client's CancelRequest to the backend that holds its session.
    async fn cancel(&self, pid: i32, secret: i32) {
        let slot = self
            .cancels
            .lock()
            .expect("cancels poisoned")
            .get(&(pid, secret))
            .cloned();
        let Some(slot) = slot else {
            return self.forward_cancel(pid, secret).await;
        };
        let target = *slot.lock().expect("cancel poisoned");
        if let Some((addr, bpid, bsecret)) = target {
            if let Ok(mut s) = TcpStream::connect(addr).await {
                let _ = s.write_all(&messages::cancel_request(bpid, bsecret)).await;
                let _ = s.shutdown().await;
                info!(backend = %addr, "query cancelled");
            }
        }
    }

    /// A cancel key this proxy did not hand out: the proxy that did, as
    /// Redis knows it, gets the request.
    async fn forward_cancel(&self, pid: i32, secret: i32) {
        let Some(owner) = self.fleet.cancel_key_owner((pid, secret)).await else {
            return;
        };
        if Some(&owner) == self.advertised.get() {
            return;
        }
        if let Ok(mut s) = TcpStream::connect(owner).await {
            let _ = s.write_all(&messages::cancel_request(pid, secret)).await;
            let _ = s.shutdown().await;
            info!(proxy = %owner, "cancel request forwarded to the proxy that holds the session");
        }
    }
}

/// Relays a session-mode client and its own backend connection byte for
/// byte, until either side leaves or the backend's member loses its role.
async fn relay_session(
    client: &mut Conn,
    early: &[u8],
    backend: &mut BackendSession,
    member: Option<&(Arc<Cluster>, Pick)>,
    key: &DbKey,
) {
    // Whatever either side sent early goes first, then bytes flow as they are.
    let relay = async {
        if !backend.buf.is_empty() {
            client.write_all(&backend.buf).await?;
        }
        if !early.is_empty() {
            backend.stream.write_all(early).await?;
        }
        tokio::io::copy_bidirectional(client, &mut backend.stream).await
    };
    let lost = async {
        match member {
            Some((cluster, pick)) => cluster.lost(*pick).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        relayed = relay => if let Err(e) = relayed {
            debug!(database = %key, error = %e, "postgres session ended");
        },
        _ = lost => {
            info!(database = %key, "the member lost its role: session closed");
            let _ = client
                .write_all(&messages::fatal(
                    "57P01",
                    "terminating connection: the database server changed role (failover)",
                ))
                .await;
        }
    }
}

fn endpoint_addr(target: &crate::wake::Target) -> Result<SocketAddr, PgError> {
    let endpoint = target
        .endpoints
        .first()
        .ok_or_else(|| PgError::Backend("no endpoint".into()))?;
    endpoint
        .addr()
        .parse()
        .map_err(|_| PgError::Backend(format!("bad endpoint {}", endpoint.addr())))
}

/// Connects and logs in to the backend as `role`, with the key a client
/// proved, and reads its greeting up to ReadyForQuery.
pub async fn connect_backend(
    addr: SocketAddr,
    role: &str,
    database: &str,
    params: &[(&str, &str)],
    verifier: &Verifier,
    client_key: &[u8; 32],
) -> Result<BackendSession, PgError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| PgError::Unreachable(format!("cannot reach database \"{database}\": {e}")))?;
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(1024);
    let mut startup = vec![("user", role), ("database", database)];
    startup.extend_from_slice(params);
    stream
        .write_all(&messages::startup(&startup))
        .await
        .map_err(backend_err)?;
    backend_login(&mut stream, &mut buf, verifier, client_key).await?;
    let (mut pid, mut secret, mut greeting) = (0, 0, Vec::new());
    loop {
        let frame = read_frame(&mut stream, &mut buf, true, MAX_STARTUP * 10)
            .await
            .map_err(|e| PgError::Backend(e.to_string()))?;
        match frame[0] {
            b'K' => {
                let (_, mut body) = typed(frame);
                use bytes::Buf;
                (pid, secret) = (body.get_i32(), body.get_i32());
            }
            b'Z' => {
                return Ok(BackendSession {
                    stream,
                    buf,
                    addr,
                    pid,
                    secret,
                    greeting,
                    ready: frame,
                })
            }
            b'E' => {
                return Err(PgError::Backend(format!(
                    "database refused the session: {}",
                    error_text(&frame)
                )))
            }
            _ => greeting.push(frame),
        }
    }
}

fn closed(e: std::io::Error) -> PgError {
    PgError::Closed(e.to_string())
}

fn backend_err(e: std::io::Error) -> PgError {
    PgError::Backend(e.to_string())
}

/// The app named by a TLS server name `<db>.<app>.<base_domain>`.
fn sni_app(sni: &str, base_domain: Option<&str>) -> Option<Name> {
    let sub = sni.strip_suffix(base_domain?)?.strip_suffix('.')?;
    let (_db, app) = sub.split_once('.')?;
    Name::new(app).ok()
}

/// Role, app and the parameters to pass on: the app from `user.app`, else
/// from the TLS server name, else from `options=-c rouse.app=<app>` (which
/// is then removed).
fn route(
    mut params: BTreeMap<String, String>,
    sni_app: Option<Name>,
) -> Result<(String, Name, BTreeMap<String, String>), PgError> {
    let user = params
        .get("user")
        .cloned()
        .ok_or_else(|| PgError::Authorization("no user name given".into()))?;
    if let Some((role, app)) = user.rsplit_once('.') {
        let app = Name::new(app)
            .map_err(|_| PgError::Authorization(format!("invalid app in user name \"{user}\"")))?;
        return Ok((role.to_string(), app, params));
    }
    let mut app = sni_app.map(|a| a.to_string());
    if let Some(options) = params.get("options").cloned() {
        let mut kept = Vec::new();
        let mut words = options.split_whitespace().peekable();
        while let Some(w) = words.next() {
            let setting = match w {
                "-c" => words.next().unwrap_or_default().to_string(),
                other => match other.strip_prefix("-c") {
                    Some(s) if !s.is_empty() => s.to_string(),
                    _ => {
                        kept.push(other.to_string());
                        continue;
                    }
                },
            };
            match setting.strip_prefix("rouse.app=") {
                Some(a) => app = app.or(Some(a.to_string())),
                None => kept.push(format!("-c {setting}")),
            }
        }
        if kept.is_empty() {
            params.remove("options");
        } else {
            params.insert("options".into(), kept.join(" "));
        }
    }
    let app = app.ok_or_else(|| {
        PgError::Authorization(format!(
            "cannot tell the app of user \"{user}\": connect as <user>.<app> or with options=-c rouse.app=<app>"
        ))
    })?;
    let app =
        Name::new(&app).map_err(|_| PgError::Authorization(format!("invalid app \"{app}\"")))?;
    Ok((user, app, params))
}

/// SCRAM-SHA-256 with the client; the proven ClientKey on success.
async fn authenticate(
    client: &mut Conn,
    buf: &mut BytesMut,
    verifier: &Verifier,
    role: &str,
) -> Result<[u8; 32], PgError> {
    let wrong = || PgError::Password(role.to_string());
    client
        .write_all(&messages::auth_sasl())
        .await
        .map_err(closed)?;
    let (tag, body) = typed(read_frame(client, buf, true, MAX_AUTH_MESSAGE).await?);
    if tag != b'p' {
        return Err(PgError::Protocol("expected a SASLInitialResponse".into()));
    }
    let (mechanism, first) = messages::parse_sasl_initial(body)
        .ok_or_else(|| PgError::Protocol("malformed SASLInitialResponse".into()))?;
    if mechanism != scram::MECHANISM {
        return Err(PgError::Protocol(format!(
            "unsupported SASL mechanism {mechanism}"
        )));
    }
    let (exchange, server_first) =
        ServerExchange::start(verifier, &first).map_err(|e| match e {
            ScramError::ChannelBinding => PgError::Protocol(
                "channel binding is not supported: use channel_binding=disable or prefer".into(),
            ),
            _ => PgError::Protocol(e.to_string()),
        })?;
    client
        .write_all(&messages::auth_sasl_continue(&server_first))
        .await
        .map_err(closed)?;
    let (tag, body) = typed(read_frame(client, buf, true, MAX_AUTH_MESSAGE).await?);
    if tag != b'p' {
        return Err(PgError::Protocol("expected a SASLResponse".into()));
    }
    let last = String::from_utf8(body.to_vec()).map_err(|_| wrong())?;
    let (client_key, server_final) = exchange.finish(verifier, &last).map_err(|_| wrong())?;
    client
        .write_all(&messages::auth_sasl_final(&server_final))
        .await
        .map_err(closed)?;
    Ok(client_key)
}

/// Logs in to the backend as the client's role with the proven ClientKey.
async fn backend_login(
    backend: &mut TcpStream,
    buf: &mut BytesMut,
    verifier: &Verifier,
    client_key: &[u8; 32],
) -> Result<(), PgError> {
    let (mut exchange, first) = ClientExchange::start();
    loop {
        let frame = read_frame(backend, buf, true, MAX_STARTUP)
            .await
            .map_err(|e| PgError::Backend(e.to_string()))?;
        let (tag, body) = typed(frame.clone());
        if tag == b'E' {
            return Err(PgError::Backend(format!(
                "database refused the login: {}",
                error_text(&frame)
            )));
        }
        if tag != b'R' {
            return Err(PgError::Backend(format!(
                "unexpected message {:?} during login",
                tag as char
            )));
        }
        let (code, data) = messages::parse_auth(body)
            .ok_or_else(|| PgError::Backend("malformed authentication message".into()))?;
        match code {
            0 => return Ok(()),
            10 => backend
                .write_all(&messages::sasl_initial_response(&first))
                .await
                .map_err(backend_err)?,
            11 => {
                let server_first = String::from_utf8_lossy(&data);
                let last = exchange
                    .respond(verifier, client_key, &server_first)
                    .map_err(|e| PgError::Backend(e.to_string()))?;
                backend
                    .write_all(&messages::sasl_response(&last))
                    .await
                    .map_err(backend_err)?;
            }
            12 => exchange
                .verify(&String::from_utf8_lossy(&data))
                .map_err(|e| PgError::Backend(e.to_string()))?,
            other => {
                return Err(PgError::Backend(format!(
                    "the database asks for authentication method {other}, expected SCRAM-SHA-256"
                )))
            }
        }
    }
}

/// The `M` field of an ErrorResponse frame.
fn error_text(frame: &[u8]) -> String {
    frame
        .get(5..)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_of(
        p: BTreeMap<String, String>,
    ) -> Result<(String, Name, BTreeMap<String, String>), PgError> {
        route(p, None)
    }

    #[test]
    fn app_from_the_tls_server_name() {
        assert_eq!(
            sni_app("users.shop.db.example", Some("db.example")),
            Some(Name::new("shop").unwrap())
        );
        assert_eq!(sni_app("users.shop.other", Some("db.example")), None);
        assert_eq!(sni_app("shop.db.example", Some("db.example")), None);
        let (role, app, _) =
            route(params(&[("user", "alice")]), sni_app("u.shop.x", Some("x"))).unwrap();
        assert_eq!((role.as_str(), app.as_str()), ("alice", "shop"));
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn app_from_user_suffix_or_options() {
        let (role, app, _) = route_of(params(&[("user", "alice.shop")])).unwrap();
        assert_eq!((role.as_str(), app.as_str()), ("alice", "shop"));
        let (role, app, rest) = route_of(params(&[
            ("user", "alice"),
            ("options", "-c rouse.app=shop -c search_path=x"),
        ]))
        .unwrap();
        assert_eq!((role.as_str(), app.as_str()), ("alice", "shop"));
        assert_eq!(rest["options"], "-c search_path=x");
        let (_, _, rest) = route_of(params(&[
            ("user", "alice"),
            ("options", "-crouse.app=shop"),
        ]))
        .unwrap();
        assert!(!rest.contains_key("options"));
        assert!(matches!(
            route_of(params(&[("user", "alice")])),
            Err(PgError::Authorization(_))
        ));
        assert!(matches!(
            route_of(params(&[("user", "alice.Bad_App")])),
            Err(PgError::Authorization(_))
        ));
        assert!(matches!(
            route_of(params(&[])),
            Err(PgError::Authorization(_))
        ));
    }
}
