//! Where each database runs, and waking it when it does not. Endpoints are
//! cached until a control event or a failed connect says otherwise. A
//! request for a database that is not running triggers one wake per
//! database (all waiters share it), waits at most `wake_timeout`, and at
//! most `max_waiting` requests wait per database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{self, BoxFuture, FutureExt};
use rouse_control_api::apps::{CREATE_RATE_CODE, DATABASE_LIMIT_CODE};
use rouse_control_api::event;
use rouse_control_api::{
    Client, ClientError, CreateDatabase, DatabaseInfo, DatabaseStatus, DbKey, Endpoint, Engine,
    Event,
};
use tracing::{debug, info, warn};

use crate::auth::Authenticator;
use crate::error::{ProxyError, Result};
use crate::fleet::{Fleet, Holder};
use crate::stats::WakeHistory;

/// A database's running replicas, leader first.
#[derive(Debug, Clone)]
pub struct Target {
    pub engine: Engine,
    pub endpoints: Arc<Vec<Endpoint>>,
    pub pool_mode: rouse_control_api::PoolMode,
    /// `Authorization` for the engine's HTTP API (rqlited `-auth`).
    pub login: Option<hyper::header::HeaderValue>,
}

type WakeFuture = future::Shared<BoxFuture<'static, Result<Target>>>;
type Cache = Arc<Mutex<HashMap<DbKey, Target>>>;

pub struct Routes {
    control: Client,
    /// One wake per database across proxies, when Redis is there.
    fleet: Arc<Fleet>,
    /// This proxy's name in wake locks.
    proxy_id: String,
    cache: Cache,
    wakes: Arc<Mutex<HashMap<DbKey, WakeFuture>>>,
    waiting: Mutex<HashMap<DbKey, Arc<AtomicUsize>>>,
    /// `wake_timeout` and `max_waiting`, replaced together on reload.
    bounds: Mutex<(Duration, usize)>,
    auto_create: bool,
    wakes_seen: Arc<WakeHistory>,
    /// Each app's bound on waiting requests.
    quotas: Arc<crate::quota::AppQuotas>,
}

/// Decrements a database's waiting count when a waiter leaves.
struct Waiter {
    key: DbKey,
    count: Arc<AtomicUsize>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let now = self.count.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("rouse_waiting_requests", "db" => self.key.internal()).set(now as f64);
    }
}

impl Routes {
    pub fn new(
        control: Client,
        fleet: Arc<Fleet>,
        proxy_id: String,
        wake_timeout: Duration,
        max_waiting: usize,
        auto_create: bool,
        quotas: Arc<crate::quota::AppQuotas>,
    ) -> Arc<Routes> {
        Arc::new(Routes {
            control,
            fleet,
            proxy_id,
            cache: Arc::default(),
            wakes: Arc::default(),
            waiting: Mutex::new(HashMap::new()),
            bounds: Mutex::new((wake_timeout, max_waiting)),
            auto_create,
            wakes_seen: Arc::default(),
            quotas,
        })
    }

    /// The database's endpoints, waking (or creating) it when needed.
    pub async fn target(&self, key: &DbKey) -> Result<Target> {
        if let Some(t) = self.cache.lock().expect("route cache poisoned").get(key) {
            return Ok(t.clone());
        }
        let _app_waiting = self.quotas.wait(&key.app)?;
        let count = self
            .waiting
            .lock()
            .expect("waiting poisoned")
            .entry(key.clone())
            .or_default()
            .clone();
        let now = count.fetch_add(1, Ordering::Relaxed) + 1;
        let _waiter = Waiter {
            key: key.clone(),
            count,
        };
        metrics::gauge!("rouse_waiting_requests", "db" => key.internal()).set(now as f64);
        let (wake_timeout, max_waiting) = *self.bounds.lock().expect("bounds poisoned");
        if now > max_waiting {
            return Err(ProxyError::QueueFull(key.db.to_string()));
        }
        let started = Instant::now();
        let wake = self.wake_future(key);
        let result = tokio::time::timeout(wake_timeout, wake).await;
        metrics::histogram!("rouse_wake_duration_seconds", "engine" => "any", "phase" => "wait")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(result) => result,
            Err(_) => Err(ProxyError::WakeTimeout {
                db: key.db.to_string(),
                waited: wake_timeout,
            }),
        }
    }

    fn wake_future(&self, key: &DbKey) -> WakeFuture {
        let mut wakes = self.wakes.lock().expect("wakes poisoned");
        if let Some(f) = wakes.get(key) {
            return f.clone();
        }
        let waker = Waker {
            control: self.control.clone(),
            fleet: self.fleet.clone(),
            proxy_id: self.proxy_id.clone(),
            seen: self.wakes_seen.clone(),
        };
        let auto_create = self.auto_create;
        let (cache, all_wakes) = (self.cache.clone(), self.wakes.clone());
        let k = key.clone();
        // The wake files its own result: every waiter shares it, and the
        // next request after a failure tries again.
        let fut = async move {
            let result = resolve(&waker, &k, auto_create).await;
            if let Ok(t) = &result {
                cache
                    .lock()
                    .expect("route cache poisoned")
                    .insert(k.clone(), t.clone());
            }
            all_wakes.lock().expect("wakes poisoned").remove(&k);
            result
        }
        .boxed()
        .shared();
        wakes.insert(key.clone(), fut.clone());
        // Driven by a task of its own, so waiters that give up do not cancel it.
        tokio::spawn(fut.clone());
        fut
    }

    /// Forgets a database's endpoints (a failed connect: it may have been
    /// hibernated or moved).
    pub fn invalidate(&self, key: &DbKey) {
        self.cache.lock().expect("route cache poisoned").remove(key);
    }

    /// Connects to `key`'s database with `connect`, starting from `target`,
    /// the route just resolved. When that fails in a way `stale` says an
    /// outdated route explains (the database hibernated or moved while this
    /// proxy missed the news), the route is forgotten and resolved again,
    /// which wakes the database, and `connect` gets one more try. A client
    /// then waits inside its connect instead of seeing the stale route.
    pub async fn connect_with_wake<T, E, Fut>(
        &self,
        key: &DbKey,
        target: Target,
        protocol: &'static str,
        stale: impl Fn(&E) -> bool,
        resolve_error: impl Fn(ProxyError) -> E,
        mut connect: impl FnMut(Target) -> Fut,
    ) -> std::result::Result<T, E>
    where
        Fut: std::future::Future<Output = std::result::Result<T, E>>,
    {
        match connect(target).await {
            Err(e) if stale(&e) => {
                self.invalidate(key);
                metrics::counter!("rouse_stale_route_retries_total", "protocol" => protocol)
                    .increment(1);
                debug!(database = %key, "route looked stale: resolving it again");
                let target = self.target(key).await.map_err(resolve_error)?;
                connect(target).await
            }
            done => done,
        }
    }

    pub fn clear(&self) {
        self.cache.lock().expect("route cache poisoned").clear();
    }

    /// New wait bounds (a reload); waiting requests keep theirs.
    pub fn set_bounds(&self, wake_timeout: Duration, max_waiting: usize) {
        *self.bounds.lock().expect("bounds poisoned") = (wake_timeout, max_waiting);
    }

    /// Requests waiting for a wake, per database.
    pub fn waiting_counts(&self) -> HashMap<DbKey, usize> {
        let waiting = self.waiting.lock().expect("waiting poisoned");
        waiting
            .iter()
            .map(|(k, n)| (k.clone(), n.load(Ordering::Relaxed)))
            .collect()
    }

    /// The wakes this proxy waited for, oldest first.
    pub fn wake_history(&self) -> Vec<crate::stats::Wake> {
        self.wakes_seen.all()
    }

    fn apply(&self, event: &Event, auth: &Arc<Authenticator>) {
        match event {
            // Any change of status or settings: read the database afresh.
            Event::Status { app, name, .. } => {
                self.invalidate(&DbKey::new(app.clone(), name.clone()))
            }
            Event::Leader {
                app,
                name,
                endpoints,
            } => {
                let key = DbKey::new(app.clone(), name.clone());
                let mut cache = self.cache.lock().expect("route cache poisoned");
                if let Some(t) = cache.get_mut(&key) {
                    t.endpoints = Arc::new(endpoints.clone());
                }
            }
            Event::Dropped { app, name } => self.invalidate(&DbKey::new(app.clone(), name.clone())),
            Event::KeyRevoked { id, .. } => {
                let (auth, id) = (auth.clone(), id.clone());
                tokio::spawn(async move { auth.revoke_key(&id).await });
            }
            Event::UserChanged { .. } => {}
        }
    }

    /// Follows control's `/events` for the life of the proxy; after a
    /// reconnect (events may have been missed) every cache starts empty.
    pub async fn follow_events(self: Arc<Self>, auth: Arc<Authenticator>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.control.events().await {
                Ok(mut resp) if resp.status().is_success() => {
                    self.clear();
                    auth.forget_all();
                    backoff = Duration::from_millis(100);
                    let mut frames = event::Decoder::default();
                    while let Ok(Some(chunk)) = resp.chunk().await {
                        match frames.push(&chunk) {
                            Ok(frames) => frames.into_iter().for_each(|f| self.on_frame(f, &auth)),
                            Err(e) => {
                                warn!(error = %e, "control's event stream is broken");
                                break;
                            }
                        }
                    }
                    warn!("control event stream ended; reconnecting");
                }
                Ok(resp) => warn!(status = %resp.status(), "control refused the event stream"),
                Err(e) => debug!(error = %e, "control event stream unavailable"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn on_frame(&self, frame: event::Frame, auth: &Arc<Authenticator>) {
        match frame {
            event::Frame::Event(event) => self.apply(&event, auth),
            event::Frame::Resync => {
                self.clear();
                auth.forget_all();
            }
            event::Frame::Other => {}
        }
    }
}

/// Where and how to reach a database: its endpoints and the engine login
/// that control sealed for this proxy's token.
fn target_of(control: &Client, info: &rouse_control_api::DatabaseInfo) -> Target {
    Target {
        engine: info.engine,
        endpoints: Arc::new(info.endpoints.clone()),
        pool_mode: info.pool_mode,
        login: match (info.engine, control.engine_login(info)) {
            (Engine::Rqlite, Some(b)) => hyper::header::HeaderValue::from_str(&b.basic_auth())
                .ok()
                .map(|mut v| {
                    v.set_sensitive(true);
                    v
                }),
            _ => None,
        },
    }
}

/// What a wake needs: control, and Redis to agree with other proxies on
/// which of them asks control.
struct Waker {
    control: Client,
    fleet: Arc<Fleet>,
    proxy_id: String,
    /// Where each wake's duration is kept for the stats page.
    seen: Arc<WakeHistory>,
}

/// How often a proxy waiting on another's wake looks at the database.
const WAKE_POLL: Duration = Duration::from_millis(50);

impl Waker {
    /// Wakes the database with one call to control across all proxies: the
    /// proxy that takes `rouse:wake:<db>` calls control; the others watch
    /// the database until it is active (or the lock goes without it,
    /// and they try to take it). Without Redis, each proxy calls control,
    /// which is idempotent.
    async fn wake(&self, key: &DbKey) -> std::result::Result<DatabaseInfo, ClientError> {
        let started = Instant::now();
        let woke = self.wake_once(key).await;
        self.seen.record(key, started.elapsed(), woke.is_ok());
        woke
    }

    async fn wake_once(&self, key: &DbKey) -> std::result::Result<DatabaseInfo, ClientError> {
        let lock = self.fleet.wake_lock(key, &self.proxy_id);
        loop {
            match lock.take().await {
                None => return self.control.wake(&key.app, &key.db).await,
                Some(true) => {
                    let woke = self.control.wake(&key.app, &key.db).await;
                    lock.release().await;
                    return woke;
                }
                Some(false) => {
                    debug!(database = %key, "another proxy is waking the database");
                    loop {
                        tokio::time::sleep(WAKE_POLL).await;
                        let info = self.control.database(&key.app, &key.db).await?;
                        if info.status == DatabaseStatus::Active && !info.endpoints.is_empty() {
                            return Ok(info);
                        }
                        match lock.holder().await {
                            Holder::Fleet => {}
                            // A lock no proxy of this fleet set: wake without it
                            // (control is idempotent).
                            Holder::Stranger => return self.control.wake(&key.app, &key.db).await,
                            // The lock went (the wake failed or its proxy died)
                            // or Redis did: take over.
                            Holder::Nobody => break,
                        }
                    }
                }
            }
        }
    }
}

/// Asks control for the database, waking or creating it as needed.
async fn resolve(waker: &Waker, key: &DbKey, auto_create: bool) -> Result<Target> {
    let control = &waker.control;
    let backend = |e: ClientError| match e {
        e if e.is_not_found() => ProxyError::NotFound,
        // Control's words stay inside; the limit is named by its code.
        ClientError::Api { code, .. } if code == DATABASE_LIMIT_CODE => ProxyError::AppLimit {
            app: key.app.to_string(),
            limit: "max_databases".into(),
        },
        ClientError::Api { code, .. } if code == CREATE_RATE_CODE => ProxyError::AppLimit {
            app: key.app.to_string(),
            limit: "creates_per_minute".into(),
        },
        ClientError::Api { message, .. } => ProxyError::Backend {
            db: key.db.to_string(),
            reason: message,
        },
        other => ProxyError::Control(other.to_string()),
    };
    let info = match control.database(&key.app, &key.db).await {
        Ok(info) => info,
        Err(e) if e.is_not_found() && auto_create => {
            let req = CreateDatabase {
                app: key.app.clone(),
                name: key.db.clone(),
                engine: Engine::Rqlite,
                replication_factor: None,
                patroni: None,
            };
            match control.create_database_on_first_access(&req).await {
                Ok(info) => {
                    info!(database = %key, "created on first access");
                    info
                }
                // Another proxy created it meanwhile.
                Err(ClientError::Api { status: 409, .. }) => {
                    waker.wake(key).await.map_err(backend)?
                }
                Err(e) => return Err(backend(e)),
            }
        }
        Err(e) => return Err(backend(e)),
    };
    if info.status == DatabaseStatus::Active && !info.endpoints.is_empty() {
        return Ok(target_of(control, &info));
    }
    let started = Instant::now();
    let info = waker.wake(key).await.map_err(backend)?;
    info!(database = %key, waited_ms = started.elapsed().as_millis() as u64, "woke database for waiting requests");
    Ok(target_of(control, &info))
}
