//! The PostgreSQL front (`DATABASE_URL` at the proxy): a session opens
//! (startup and SCRAM in [`login`]), then the wake (the client waits inside
//! its connect), then the backend connection as the same role
//! ([`backend`]), then the relay: byte for byte in session mode
//! ([`session`]), per transaction in transaction mode ([`pool`]). Cancel
//! requests go through [`cancel`]; failures reach the client as
//! [`error::PgError`].

mod backend;
mod cancel;
mod clients;
pub(crate) mod console;
mod error;
mod login;
pub(crate) use login::Verifiers;
pub(crate) mod over_http;
pub(crate) mod placeholders;
mod pool;
mod pooled;
pub(crate) mod proto;
pub(crate) mod scram;
mod session;
pub(crate) mod traffic;

use crate::metrics::REQUESTS;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rouse_config::{MemberRole, PatroniChecks};
use rouse_control_api::{Client, DbKey, Engine};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::activity::Activity;
use crate::fleet::ratelimit::{Protocol, RateLimits};
use crate::fleet::Fleet;
use crate::health::Health;
use crate::net::websocket::WsStream;
use crate::net::{accept_forever, Connections, MaybeTls, OpenConnection};
use crate::patroni::{Cluster, Pick};
use crate::resolve::Resolver;
use backend::{BackendSession, BackendTarget};
use cancel::Cancels;
use error::{closed, PgError};
use login::login_timed_out;
use pooled::PooledClient;
use proto::messages;

/// A client connection that passed startup, kept on the heap while it lives.
struct Opened {
    client: MaybeTls,
    /// What the client sent beyond the startup.
    buf: BytesMut,
    started: Begun,
    open: OpenConnection,
}

/// What a connection that passed startup is for.
enum Begun {
    Database(Started),
    /// The admin console, for this operator.
    Console(String),
}

/// A session that passed startup: its database, how it reaches the
/// backend, its slots among `max_client_connections` and the app's
/// limits, and its record (with its cancel key).
struct Started {
    key: DbKey,
    mode: Mode,
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// The session's place under its app's limits.
    _app_slot: crate::quota::Slot,
    /// Where the admin console sees it.
    registered: clients::Registered,
}

enum Mode {
    /// A backend connection of its own for the whole session. Boxed: a
    /// transaction-pooled session, which may idle for hours, keeps a
    /// [`Mode`] too.
    Session(Box<OwnBackend>),
    /// Backend connections lent per transaction, to where the target says.
    Transaction(Arc<pool::Pool>, BackendTarget),
}

/// A session-pooled session's backend; on a Patroni member, closed when
/// the member loses its role.
struct OwnBackend {
    session: BackendSession,
    member: Option<(Arc<Cluster>, Pick)>,
}

pub(crate) struct PgFront {
    control: Client,
    resolver: Arc<Resolver>,
    activity: Arc<Activity>,
    verifiers: Verifiers,
    /// Derives the stable salt shown for unknown roles, alike on every
    /// proxy of a fleet.
    mock_key: [u8; 32],
    cancels: Cancels,
    /// By database, role and read-only port.
    pools: Mutex<HashMap<(DbKey, String, bool), Arc<pool::Pool>>>,
    /// Registered Patroni clusters being checked, by database.
    clusters: Mutex<HashMap<DbKey, Arc<Cluster>>>,
    checks: PatroniChecks,
    /// Where the Patroni members' check states are shown.
    health: Arc<Health>,
    fleet: Arc<Fleet>,
    limits: Arc<RateLimits>,
    advertise_config: Option<SocketAddr>,
    pool_size: usize,
    pool_times: pool::PoolTimes,
    startup_timeout: Duration,
    tls: Option<TlsAcceptor>,
    /// Clients that do not use TLS are refused (`postgres_require_tls`).
    require_tls: bool,
    base_domain: Option<String>,
    /// One permit per client session.
    sessions: Arc<tokio::sync::Semaphore>,
    /// One permit per connection that has not authenticated yet.
    pending_logins: Arc<tokio::sync::Semaphore>,
    /// From the first byte to a finished authentication.
    login_timeout: Duration,
    failed_logins: Arc<crate::throttle::FailedLogins>,
    quotas: Arc<crate::quota::AppQuotas>,
    /// Live sessions and paused databases, for the admin console.
    clients: Arc<clients::Clients>,
    /// Logins admitted to the admin console beside `admin`.
    admin_users: Vec<String>,
    /// How long a new session waits for a paused database (`wake_timeout`).
    pause_hold: Duration,
    /// What went through each database, for SHOW STATS.
    traffic: traffic::Traffic,
    /// ClientKeys of cleartext passwords already checked (SQL over HTTP),
    /// by a keyed hash of verifier and password.
    cleartext_keys: moka::future::Cache<[u8; 32], [u8; 32]>,
    /// Databases' API logins (the gateway API) as verifier and key, by
    /// password.
    api_logins: moka::future::Cache<String, (Arc<scram::Verifier>, [u8; 32])>,
    /// Where parked clients are served again.
    runtime: tokio::runtime::Handle,
}

impl PgFront {
    /// The front as `proxy.*` configures it (TLS, limits, pool size).
    pub(crate) fn new(
        control: Client,
        resolver: Arc<Resolver>,
        activity: Arc<Activity>,
        fleet: Arc<Fleet>,
        health: Arc<Health>,
        admission: crate::quota::Admission,
        config: &rouse_config::ProxyConfig,
    ) -> anyhow::Result<Arc<PgFront>> {
        let tls = config
            .tls
            .as_ref()
            .map(crate::net::tls::acceptor)
            .transpose()?;
        let clients: Arc<clients::Clients> = Default::default();
        Ok(Arc::new(PgFront {
            control,
            resolver,
            activity,
            verifiers: admission.verifiers,
            mock_key: fleet.derive_key("unknown-role salt"),
            cancels: Cancels::new(clients.clone(), fleet.clone()),
            pools: Mutex::new(HashMap::new()),
            clusters: Mutex::new(HashMap::new()),
            checks: config.patroni.clone(),
            health,
            fleet,
            limits: admission.limits,
            advertise_config: config.advertise_postgres_addr,
            pool_size: config.pool_size,
            pool_times: pool::PoolTimes {
                server_idle_timeout: config.server_idle_timeout,
                server_lifetime: config.server_lifetime,
            },
            // The startup includes the wake.
            startup_timeout: config.header_read_timeout + config.wake_timeout,
            tls,
            require_tls: config.postgres_require_tls,
            clients,
            admin_users: config.admin_users.clone(),
            pause_hold: config.wake_timeout,
            traffic: Default::default(),
            cleartext_keys: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
            api_logins: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            base_domain: config.base_domain.clone(),
            sessions: Arc::new(tokio::sync::Semaphore::new(config.max_client_connections)),
            pending_logins: Arc::new(tokio::sync::Semaphore::new(config.max_pending_logins)),
            login_timeout: config.header_read_timeout,
            failed_logins: admission.failed_logins,
            quotas: admission.quotas,
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    /// Serves clients of the read-write port (`Primary`) or the read-only
    /// port (`Replica`) until `stop` resolves.
    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        port: MemberRole,
        connections: Arc<Connections>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        if port == MemberRole::Primary {
            if let Some(addr) = self.advertise_config.or(listener.local_addr().ok()) {
                self.cancels.advertise(addr);
            }
        }
        accept_forever(
            listener,
            "postgres",
            connections,
            stop,
            move |socket, peer, open| {
                self.clone()
                    .session(MaybeTls::Plain(socket), peer, port, open)
            },
        )
        .await
    }

    /// Serves a client of the serverless drivers, whose PostgreSQL wire
    /// comes over a WebSocket of the HTTP port, as a client of the
    /// read-write port.
    pub(crate) async fn serve_websocket(
        self: Arc<Self>,
        ws: WsStream,
        peer: SocketAddr,
        open: OpenConnection,
    ) {
        let client = MaybeTls::WebSocket(Box::new(ws));
        self.session(client, peer, MemberRole::Primary, open).await
    }

    async fn session(
        self: Arc<Self>,
        client: MaybeTls,
        peer: SocketAddr,
        port: MemberRole,
        open: OpenConnection,
    ) {
        // Boxed: the startup's large state, and a session-pooled client's
        // relay, would otherwise size the task of every pooled client.
        let Some(opened) = Box::pin(self.open(client, peer, port, open)).await else {
            return;
        };
        match self.pooled(opened) {
            Ok((pooled, buf)) => pooled.serve(buf).await,
            Err(opened) => Box::pin(self.relay(opened)).await,
        }
    }

    /// A transaction-pooled session's state, moved to where it is served
    /// from, and what the client sent beyond its login; any other session
    /// is given back.
    fn pooled(
        self: &Arc<Self>,
        opened: Box<Opened>,
    ) -> Result<(Box<PooledClient>, BytesMut), Box<Opened>> {
        let Opened {
            client,
            buf,
            started:
                Begun::Database(
                    started @ Started {
                        mode: Mode::Transaction(..),
                        ..
                    },
                ),
            open,
        } = *opened
        else {
            return Err(opened);
        };
        let (in_session, meter) = self.session_began(&started.key);
        let pooled = Box::new(PooledClient {
            front: self.clone(),
            client,
            started,
            meter,
            statements: Default::default(),
            _in_session: in_session,
            _open: open,
        });
        Ok((pooled, buf))
    }

    /// Counts a session that begins, for the metrics, control's
    /// hibernation and SHOW STATS.
    fn session_began(&self, key: &DbKey) -> (crate::activity::InFlight, traffic::Meter) {
        REQUESTS
            .counter([
                key.app.to_string().into(),
                key.db.to_string().into(),
                "postgres".into(),
                "ok".into(),
            ])
            .increment(1);
        (self.activity.begin_session(key), self.traffic.meter(key))
    }

    /// The startup, bounded in time; failures are answered here.
    async fn open(
        &self,
        mut client: MaybeTls,
        peer: SocketAddr,
        port: MemberRole,
        open: OpenConnection,
    ) -> Option<Box<Opened>> {
        let mut buf = BytesMut::with_capacity(1024);
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
                    open,
                }))
            }
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                match e {
                    PgError::Backend(_) => warn!(%peer, error = %e, "postgres connection failed"),
                    _ => debug!(%peer, error = %e, "postgres connection refused"),
                }
                REQUESTS
                    .counter([
                        "".into(),
                        "".into(),
                        "postgres".into(),
                        e.kind().label().into(),
                    ])
                    .increment(1);
                e
            }
            Err(_) => PgError::Protocol("startup not completed in time".into()),
        };
        let _ = client.write_all(&e.frame()).await;
        let _ = client.flush().await;
        None
    }

    /// Relays a started session until it ends, or until KILL ends it.
    async fn relay(&self, mut opened: Box<Opened>) {
        // Everything stays in `opened` on the heap and is borrowed from
        // there, so that no copy of it sits in this future.
        let Opened {
            client,
            buf,
            started,
            ..
        } = &mut *opened;
        let started = match started {
            Begun::Database(started) => started,
            // Boxed: the console's state would otherwise size every
            // client's task.
            Begun::Console(who) => return Box::pin(self.console(client, buf, who)).await,
        };
        let registered = started.registered.client.clone();
        let killed = {
            let relaying = self.relay_started(client, buf, started);
            tokio::select! {
                _ = relaying => false,
                _ = registered.kill.notified() => true,
            }
        };
        if killed {
            let fatal = messages::fatal(
                "57P01",
                "terminating connection due to administrator command",
            );
            let _ = client.write_all(&fatal).await;
        }
        // Boxed: its state would otherwise size every idle client's task.
        Box::pin(self.cancels.unshare(registered.cancel_key)).await;
    }

    /// A session-pooled session: its own backend connection, byte for byte.
    async fn relay_started(
        &self,
        client: &mut MaybeTls,
        buf: &mut BytesMut,
        started: &mut Started,
    ) {
        let key = &started.key;
        let Mode::Session(own) = &mut started.mode else {
            unreachable!("transaction-pooled sessions are served as PooledClient");
        };
        let OwnBackend { session, member } = &mut **own;
        let (_in_session, mut meter) = self.session_began(key);
        session::relay_session(client, buf, session, member.as_ref(), key, &mut meter).await
    }

    /// Startup, authentication, wake and backend login. `None` when the
    /// connection was a cancel request.
    async fn start(
        &self,
        client: &mut MaybeTls,
        buf: &mut BytesMut,
        port: MemberRole,
        peer: SocketAddr,
        pending: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Option<Begun>, PgError> {
        // Logging in is bounded on its own; the wake after it has its own bound.
        let login_deadline = tokio::time::Instant::now() + self.login_timeout;
        let params = tokio::time::timeout_at(login_deadline, self.negotiate(client, buf))
            .await
            .map_err(login_timed_out)??;
        let Some(params) = params else {
            return Ok(None);
        };
        if console::wanted(&params) {
            if matches!(client, MaybeTls::WebSocket(_)) {
                return Err(PgError::Authorization(
                    "the admin console is not served over WebSocket".into(),
                ));
            }
            let who = tokio::time::timeout_at(
                login_deadline,
                self.console_login(client, buf, &params, peer),
            )
            .await
            .map_err(login_timed_out)??;
            return Ok(Some(Begun::Console(who)));
        }
        // Over the limit: refused after the startup packet, as PostgreSQL does.
        let permit = self
            .sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| PgError::TooManyClients)?;
        let mut login = self
            .login(client, buf, params, peer, login_deadline)
            .await?;
        drop(pending);
        let role = &login.role;
        self.limits
            .check(&self.fleet, Protocol::Postgres, &login.app, || role.clone())
            .await
            .map_err(PgError::admitting)?;

        if !self.clients.unpaused(&login.key, self.pause_hold).await {
            return Err(PgError::Paused(login.database));
        }
        let target = self
            .resolver
            .target(&login.key)
            .await
            .map_err(|e| PgError::resolving(e, &login.database))?;
        // The session keeps its route's key (the same names): thousands of
        // sessions share them instead of each holding copies.
        if target.key == login.key {
            login.key = target.key.clone();
        }
        let (key, role, app) = (&login.key, &login.role, &login.app);
        let app_slot = self
            .quotas
            .session(key)
            .map_err(|e| PgError::AppLimit(e.to_string()))?;
        let upstream = match target.engine {
            Engine::Rqlite => return Err(PgError::UnknownDatabase(login.database)),
            Engine::Postgres => BackendTarget::Managed,
            Engine::Patroni => BackendTarget::Cluster(self.cluster(key, &target)?, port),
        };
        // One managed instance serves both ports: on the read-only one the
        // session logs in as the role's read-only twin, which may not write
        // whatever it sends (a replica cannot anyway).
        // On a shared (Patroni) cluster the role carries its app.
        let backend_role = match (&upstream, port) {
            (BackendTarget::Managed, MemberRole::Replica) => {
                rouse_control_api::name::read_only_role(role)
            }
            (BackendTarget::Managed, MemberRole::Primary) => role.clone(),
            (BackendTarget::Cluster(..), _) => rouse_control_api::name::cluster_role(role, app),
        };
        let connected = self
            .connect_upstream(&login, &target, upstream, &backend_role, port)
            .await?;
        let registered = self.clients.register(clients::NewClient {
            key: key.clone(),
            role,
            addr: peer,
            tls: matches!(client, MaybeTls::Tls(_)),
            application_name: login
                .params
                .get("application_name")
                .map_or("", String::as_str),
            own_backend: connected.own_backend,
        });
        let ours = registered.client.cancel_key;
        self.cancels.share(ours).await;
        let mut out = BufWriter::new(&mut *client);
        out.write_all(&messages::auth_ok()).await.map_err(closed)?;
        for frame in &connected.greeting {
            out.write_all(frame).await.map_err(closed)?;
        }
        out.write_all(&messages::backend_key_data(ours.0, ours.1))
            .await
            .map_err(closed)?;
        out.write_all(&connected.ready).await.map_err(closed)?;
        out.flush().await.map_err(closed)?;
        info!(database = %key, role = %role, pool_mode = ?target.pool_mode, "postgres session started");
        Ok(Some(Begun::Database(Started {
            key: login.key,
            mode: connected.mode,
            _permit: permit,
            _app_slot: app_slot,
            registered,
        })))
    }
}
