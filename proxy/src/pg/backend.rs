//! The backend leg: where a database's backend connections go (its managed
//! instance, or a Patroni cluster's member), and logging in there as the
//! client's role with the key the client proved (SCRAM as the client),
//! up to the greeting and ReadyForQuery.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use rouse_config::MemberRole;
use rouse_control_api::{DbKey, PoolMode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use super::clients::BackendKey;
use super::error::PgError;
use super::login::Login;
use super::proto::frame::{read_frame, typed, FrameError, MAX_STARTUP};
use super::proto::messages;
use super::proto::tags::{backend, error_field, AuthCode};
use super::scram::{ClientExchange, Verifier};
use super::{pool, Mode, OwnBackend, PgFront};
use crate::patroni::{Cluster, ConnectError};
use crate::resolve::{Resolver, Target};

/// Where a database's backend connections go.
#[derive(Clone)]
pub(super) enum BackendTarget {
    /// A database control runs: its (only) instance, as control reports it.
    Managed,
    /// A Patroni cluster: its leader or a replica, by the health checks.
    Cluster(Arc<Cluster>, MemberRole),
}

impl BackendTarget {
    /// The address for a new backend connection to `key`; `stale`: the
    /// last one there was gone, so the route is resolved afresh (and the
    /// database woken if it went to sleep).
    pub(super) async fn addr(
        &self,
        key: &DbKey,
        resolver: &Resolver,
        stale: bool,
    ) -> Result<SocketAddr, PgError> {
        match self {
            BackendTarget::Managed => {
                if stale {
                    resolver.invalidate(key);
                }
                let t = resolver
                    .target(key)
                    .await
                    .map_err(|e| PgError::Backend(e.to_string()))?;
                endpoint_addr(&t)
            }
            BackendTarget::Cluster(cluster, role) => cluster
                .pick(*role)
                .await
                .map(|p| p.addr)
                .map_err(|e| PgError::Backend(e.to_string())),
        }
    }
}

/// A logged-in backend connection.
pub(crate) struct BackendSession {
    pub(crate) stream: TcpStream,
    /// What the backend sent beyond ReadyForQuery.
    pub(crate) buf: BytesMut,
    /// Its address and cancel key, shared with the clients it serves so
    /// that a session's record points at it rather than holding a copy.
    pub(crate) key: Arc<BackendKey>,
    /// ParameterStatus and notices of the login.
    pub(crate) greeting: Vec<BytesMut>,
    /// The login's ReadyForQuery.
    pub(crate) ready: BytesMut,
}

pub(super) fn endpoint_addr(target: &Target) -> Result<SocketAddr, PgError> {
    let endpoint = target
        .endpoints
        .first()
        .ok_or_else(|| PgError::Backend("no endpoint".into()))?;
    // Asked at every pooled transaction: parsed without formatting first.
    endpoint
        .host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map(|ip| SocketAddr::new(ip, endpoint.port))
        .map_err(|_| PgError::Backend(format!("bad endpoint {}", endpoint.addr())))
}

/// A session's way to its backend, as just connected: the mode, what the
/// client is greeted with, and, in session pooling, its own backend.
pub(super) struct Connected {
    pub(super) mode: Mode,
    /// ParameterStatus and notices of a backend's login.
    pub(super) greeting: Vec<BytesMut>,
    /// The ReadyForQuery that ends the client's login.
    pub(super) ready: BytesMut,
    /// Session pooling: where its cancel requests go.
    pub(super) own_backend: Option<Arc<BackendKey>>,
}

impl PgFront {
    /// Connects `login` to its database at `target` in the database's pool
    /// mode, as `backend_role`. A managed database's route that turns out
    /// stale is resolved again (waking the database) and tried once more.
    pub(super) async fn connect_upstream(
        &self,
        login: &Login,
        target: &Target,
        upstream: BackendTarget,
        backend_role: &str,
        port: MemberRole,
    ) -> Result<Connected, PgError> {
        let Login {
            key,
            database,
            params,
            verifier,
            client_key,
            ..
        } = login;
        match target.pool_mode {
            PoolMode::Session => {
                let mut passed: Vec<(&str, &str)> = params
                    .iter()
                    .filter(|(k, _)| *k != "user" && *k != "database")
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                // One instance serves both ports; the read-only port keeps it so.
                if matches!(upstream, BackendTarget::Managed) && port == MemberRole::Replica {
                    passed.push(("default_transaction_read_only", "on"));
                }
                let connect = |addr| {
                    connect_backend(addr, backend_role, database, &passed, verifier, client_key)
                };
                let (session, member) = match &upstream {
                    BackendTarget::Managed => (
                        self.connect_managed(key, database, target, connect).await?,
                        None,
                    ),
                    BackendTarget::Cluster(cluster, role) => {
                        let (session, pick) =
                            cluster.connect(*role, connect).await.map_err(|e| match e {
                                ConnectError::NoMember(e) => {
                                    debug!(database = %key, error = %e, "no member to connect to");
                                    PgError::Waking(database.clone())
                                }
                                ConnectError::Member(e) => e,
                            })?;
                        (session, Some((cluster.clone(), pick)))
                    }
                };
                Ok(Connected {
                    greeting: session.greeting.clone(),
                    ready: session.ready.clone(),
                    own_backend: Some(session.key.clone()),
                    mode: Mode::Session(Box::new(OwnBackend { session, member })),
                })
            }
            PoolMode::Transaction => {
                let read_only = port == MemberRole::Replica;
                let pool = self.pool(
                    key,
                    backend_role,
                    database,
                    verifier,
                    *client_key,
                    read_only,
                );
                // The first login checks the route and fills the pool's
                // greeting. Later ones are greeted from it, as PgBouncer
                // does: a client logging in does not queue for a
                // connection of a busy pool (the route was resolved, and
                // the database woken, just before; the first transaction
                // finds a stale one as any transaction does).
                if pool.greeting().is_empty() {
                    let b = match &upstream {
                        BackendTarget::Managed => {
                            self.connect_managed(key, database, target, |addr| pool.checkout(addr))
                                .await?
                        }
                        BackendTarget::Cluster(..) => {
                            pool.checkout(upstream.addr(key, &self.resolver, false).await?)
                                .await?
                        }
                    };
                    pool.checkin(b);
                }
                Ok(Connected {
                    greeting: pool.greeting(),
                    ready: messages::ready_for_query_idle(),
                    mode: Mode::Transaction(pool, upstream),
                    own_backend: None,
                })
            }
        }
    }

    /// Connects to a managed database's instance with `connect`. A route
    /// that turns out stale (nothing takes the connection) is resolved
    /// again, which wakes the database, and `connect` is tried once more.
    pub(super) async fn connect_managed<T, Fut>(
        &self,
        key: &DbKey,
        database: &str,
        target: &Target,
        connect: impl Fn(SocketAddr) -> Fut,
    ) -> Result<T, PgError>
    where
        Fut: Future<Output = Result<T, PgError>>,
    {
        self.resolver
            .connect_with_wake(
                key,
                target.clone(),
                "postgres",
                |e: &PgError| matches!(e, PgError::Unreachable(_)),
                |e| PgError::resolving(e, database),
                |target| {
                    let connecting = endpoint_addr(&target).map(&connect);
                    async move { connecting?.await }
                },
            )
            .await
    }

    pub(super) fn pool(
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
            self.pool_times,
            read_only,
        ));
        pools.insert(id, p.clone());
        p
    }

    /// Every few seconds: closes pooled connections that went stale or
    /// idle too long, and drops pools nobody uses (those of databases that
    /// hibernated, moved or went away).
    pub(crate) async fn keep_pools(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            let pools: Vec<_> = {
                let pools = self.pools.lock().expect("pools poisoned");
                pools
                    .iter()
                    .map(|(id, p)| (id.clone(), p.clone()))
                    .collect()
            };
            let unused: Vec<_> = pools.into_iter().filter(|(_, p)| p.sweep()).collect();
            let mut pools = self.pools.lock().expect("pools poisoned");
            for (id, pool) in unused {
                // Unless a client took it up meanwhile.
                if pools.get(&id).is_some_and(|p| Arc::ptr_eq(p, &pool)) && pool.sweep() {
                    pools.remove(&id);
                }
            }
        }
    }

    /// The health-checked cluster of a registered Patroni database; a new
    /// one when its members changed.
    pub(super) fn cluster(&self, key: &DbKey, target: &Target) -> Result<Arc<Cluster>, PgError> {
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
        let cluster = Cluster::start(&key.internal(), &members, &self.checks, self.health.clone())
            .map_err(|e| PgError::Backend(e.to_string()))?;
        clusters.insert(key.clone(), cluster.clone());
        Ok(cluster)
    }
}

/// Connects and logs in to the backend as `role`, with the key a client
/// proved, and reads its greeting up to ReadyForQuery.
pub(crate) async fn connect_backend(
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
        .map_err(|e| went_away(e.into()))?;
    backend_login(&mut stream, &mut buf, verifier, client_key).await?;
    let (mut pid, mut secret, mut greeting) = (0, 0, Vec::new());
    loop {
        let frame = read_frame(&mut stream, &mut buf, true, MAX_STARTUP * 10)
            .await
            .map_err(went_away)?;
        match frame[0] {
            backend::BACKEND_KEY_DATA => {
                let (_, mut body) = typed(frame);
                (pid, secret) = (body.get_i32(), body.get_i32());
            }
            backend::READY_FOR_QUERY => {
                return Ok(BackendSession {
                    stream,
                    buf,
                    key: Arc::new((addr, pid, secret)),
                    greeting,
                    ready: frame,
                })
            }
            backend::ERROR_RESPONSE => return Err(refused("session", &frame)),
            _ => greeting.push(frame),
        }
    }
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
            .map_err(went_away)?;
        let (tag, body) = typed(frame.clone());
        if tag == backend::ERROR_RESPONSE {
            return Err(refused("login", &frame));
        }
        if tag != backend::AUTHENTICATION {
            return Err(PgError::Backend(format!(
                "unexpected message {:?} during login",
                tag as char
            )));
        }
        let (code, data) = messages::parse_auth(body)
            .ok_or_else(|| PgError::Backend("malformed authentication message".into()))?;
        match code {
            AuthCode::Ok => return Ok(()),
            AuthCode::Sasl => backend
                .write_all(&messages::sasl_initial_response(&first))
                .await
                .map_err(|e| went_away(e.into()))?,
            AuthCode::SaslContinue => {
                let server_first = String::from_utf8_lossy(&data);
                let last = exchange
                    .respond(verifier, client_key, &server_first)
                    .map_err(|e| PgError::Backend(e.to_string()))?;
                backend
                    .write_all(&messages::sasl_response(&last))
                    .await
                    .map_err(|e| went_away(e.into()))?;
            }
            AuthCode::SaslFinal => exchange
                .verify(&String::from_utf8_lossy(&data))
                .map_err(|e| PgError::Backend(e.to_string()))?,
            // A backend never gets a password from the proxy: it holds none.
            other @ (AuthCode::CleartextPassword | AuthCode::Other(_)) => {
                return Err(PgError::Backend(format!(
                    "the database asks for authentication method {}, expected SCRAM-SHA-256",
                    other.code()
                )))
            }
        }
    }
}

/// The connection broke during login: the database went away (it is
/// stopping), to be resolved again and woken; a malformed answer is the
/// backend's fault.
fn went_away(e: FrameError) -> PgError {
    match e {
        FrameError::Closed | FrameError::Io(_) => PgError::Unreachable(format!(
            "the database closed the connection during login: {e}"
        )),
        FrameError::BadLength(..) => PgError::Backend(e.to_string()),
    }
}

/// A refusal at login. A database that is shutting down or starting up
/// (SQLSTATE class 57P: admin or crash shutdown, cannot connect now) is
/// unreachable for now, to be resolved again and woken; anything else is
/// the backend's answer.
fn refused(what: &str, frame: &[u8]) -> PgError {
    let text = format!("database refused the {what}: {}", error_text(frame));
    match messages::error_field(frame, error_field::CODE) {
        Some(code) if code.starts_with(b"57P") => PgError::Unreachable(text),
        _ => PgError::Backend(text),
    }
}

/// The `M` field of an ErrorResponse frame.
fn error_text(frame: &[u8]) -> String {
    messages::error_field(frame, error_field::MESSAGE)
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default()
}
