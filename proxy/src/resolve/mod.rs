//! Where each database runs, and waking it when it does not. Endpoints are
//! cached until a control event or a failed connect says otherwise. A
//! request for a database that is not running triggers one wake per
//! database (all waiters share it, see [`wake`]), waits at most
//! `wake_timeout`, and at most `max_waiting` requests wait per database.
//! Only this module asks control where databases are; it does so through
//! [`ControlApi`], so that its rules are tested against a stand-in.

mod connect;
mod history;
#[cfg(test)]
mod tests;
mod wake;

use crate::metrics::WAITING_REQUESTS;
use rouse_runtime::metric::WAKE_DURATION;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{self, BoxFuture, FutureExt};
use hyper::header::HeaderValue;
use rouse_control_api::{
    BackendCredentials, Client, ClientError, CreateDatabase, DatabaseInfo, DatabaseStatus, DbKey,
    Endpoint, Engine, PoolMode,
};

use crate::error::{ProxyError, Result};
use crate::fleet::Fleet;
use crate::quota::AppQuotas;
pub(crate) use history::{Wake, WakeHistory};
use wake::WakeCall;

/// What the resolver needs from control.
pub(crate) trait ControlApi: Clone + Send + Sync + 'static {
    /// The database as control knows it.
    fn database(
        &self,
        key: &DbKey,
    ) -> impl Future<Output = Result<DatabaseInfo, ClientError>> + Send;
    /// Creates a database a client asked for (409 when it exists).
    fn create_on_first_access(
        &self,
        req: &CreateDatabase,
    ) -> impl Future<Output = Result<DatabaseInfo, ClientError>> + Send;
    /// Returns once the database is active, or fails with the reason;
    /// gives up after `within`.
    fn wake(
        &self,
        key: &DbKey,
        within: Duration,
    ) -> impl Future<Output = Result<DatabaseInfo, ClientError>> + Send;
    /// The engine login control sealed for this proxy's token: rqlite's
    /// data plane, or a PostgreSQL database's API login.
    fn engine_login(&self, info: &DatabaseInfo) -> Option<BackendCredentials>;
}

impl ControlApi for Client {
    fn database(
        &self,
        key: &DbKey,
    ) -> impl Future<Output = Result<DatabaseInfo, ClientError>> + Send {
        Client::database(self, &key.app, &key.db)
    }

    fn create_on_first_access(
        &self,
        req: &CreateDatabase,
    ) -> impl Future<Output = Result<DatabaseInfo, ClientError>> + Send {
        self.create_database_on_first_access(req)
    }

    fn wake(
        &self,
        key: &DbKey,
        within: Duration,
    ) -> impl Future<Output = Result<DatabaseInfo, ClientError>> + Send {
        self.wake_within(&key.app, &key.db, Some(within))
    }

    fn engine_login(&self, info: &DatabaseInfo) -> Option<BackendCredentials> {
        Client::engine_login(self, info)
    }
}

/// A database's running replicas, leader first.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The database, as its route holds it: sessions keep this one, so
    /// that thousands of them share its names instead of copying them.
    pub(crate) key: DbKey,
    pub(crate) engine: Engine,
    pub(crate) endpoints: Arc<Vec<Endpoint>>,
    pub(crate) pool_mode: PoolMode,
    /// `Authorization` for the engine's HTTP API (rqlited `-auth`).
    pub(crate) login: Option<HeaderValue>,
    /// A PostgreSQL database's login for the app's API credentials.
    pub(crate) api_login: Option<Arc<BackendCredentials>>,
}

impl Target {
    /// Where and how to reach a database: its endpoints and, for rqlite,
    /// the engine login that control sealed for this proxy's token.
    fn of(control: &impl ControlApi, info: &DatabaseInfo) -> Target {
        Target {
            key: DbKey::new(info.app.clone(), info.name.clone()),
            engine: info.engine,
            endpoints: Arc::new(info.endpoints.clone()),
            pool_mode: info.pool_mode,
            login: match info.engine {
                Engine::Rqlite => control.engine_login(info).and_then(|login| {
                    let mut value = HeaderValue::from_str(&login.basic_auth()).ok()?;
                    value.set_sensitive(true);
                    Some(value)
                }),
                _ => None,
            },
            api_login: match info.engine {
                Engine::Postgres => control.engine_login(info).map(Arc::new),
                _ => None,
            },
        }
    }
}

type WakeFuture = future::Shared<BoxFuture<'static, Result<Target>>>;
type Cache = Arc<Mutex<HashMap<DbKey, Target>>>;

pub(crate) struct Resolver<C = Client> {
    control: C,
    /// One wake per database across proxies, when Redis is there.
    fleet: Arc<Fleet>,
    /// This proxy's name in wake locks.
    proxy_id: String,
    cache: Cache,
    /// Wakes under way, by database and whether they may create it.
    wakes: Arc<Mutex<HashMap<(DbKey, bool), WakeFuture>>>,
    waiting: Mutex<HashMap<DbKey, Arc<AtomicUsize>>>,
    /// `wake_timeout` and `max_waiting`, replaced together on reload.
    bounds: Mutex<(Duration, usize)>,
    auto_create: bool,
    wakes_seen: Arc<WakeHistory>,
    /// Each app's bound on waiting requests.
    quotas: Arc<AppQuotas>,
    /// Databases control last said were put to sleep: their next request
    /// asks control to wake them straight away, without first reading the
    /// database (a read that, in a storm of wakes, waits on a busy `_system`).
    asleep: Mutex<HashSet<DbKey>>,
}

/// At most this many databases are remembered asleep; past it, a request
/// reads the database first, as for any other.
const ASLEEP_MAX: usize = 65_536;

/// Decrements a database's waiting count when a waiter leaves.
struct Waiter {
    key: DbKey,
    count: Arc<AtomicUsize>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let now = self.count.fetch_sub(1, Ordering::Relaxed) - 1;
        WAITING_REQUESTS
            .gauge([self.key.internal().into()])
            .set(now as f64);
    }
}

/// How the resolver waits and creates.
pub(crate) struct Bounds {
    pub(crate) wake_timeout: Duration,
    pub(crate) max_waiting: usize,
    /// Whether a database that does not exist is created on first access.
    pub(crate) auto_create: bool,
}

impl<C: ControlApi> Resolver<C> {
    pub(crate) fn new(
        control: C,
        fleet: Arc<Fleet>,
        proxy_id: String,
        bounds: Bounds,
        quotas: Arc<AppQuotas>,
    ) -> Arc<Resolver<C>> {
        Arc::new(Resolver {
            control,
            fleet,
            proxy_id,
            cache: Arc::default(),
            wakes: Arc::default(),
            waiting: Mutex::new(HashMap::new()),
            bounds: Mutex::new((bounds.wake_timeout, bounds.max_waiting)),
            auto_create: bounds.auto_create,
            wakes_seen: Arc::default(),
            quotas,
            asleep: Mutex::default(),
        })
    }

    /// The database's endpoints, waking it when needed; one that does not
    /// exist is not found (the Postgres and Redis fronts).
    pub(crate) async fn target(&self, key: &DbKey) -> Result<Target> {
        self.resolve(key, false).await
    }

    /// [`Self::target`] that creates a database that does not exist when
    /// the proxy's policy allows (the HTTP APIs: first access creates).
    pub(crate) async fn target_or_create(&self, key: &DbKey) -> Result<Target> {
        self.resolve(key, self.auto_create).await
    }

    async fn resolve(&self, key: &DbKey, create: bool) -> Result<Target> {
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
        WAITING_REQUESTS
            .gauge([key.internal().into()])
            .set(now as f64);
        let (wake_timeout, max_waiting) = *self.bounds.lock().expect("bounds poisoned");
        if now > max_waiting {
            return Err(ProxyError::QueueFull(key.db.to_string()));
        }
        let started = Instant::now();
        let wake = self.wake_future(key, create, wake_timeout);
        let result = tokio::time::timeout(wake_timeout, wake).await;
        WAKE_DURATION
            .histogram(["any".into(), "wait".into()])
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(result) => result,
            Err(_) => Err(ProxyError::WakeTimeout {
                db: key.db.to_string(),
                waited: wake_timeout,
            }),
        }
    }

    fn wake_future(&self, key: &DbKey, create: bool, wake_timeout: Duration) -> WakeFuture {
        let mut wakes = self.wakes.lock().expect("wakes poisoned");
        let wake_key = (key.clone(), create);
        if let Some(f) = wakes.get(&wake_key) {
            return f.clone();
        }
        let call = WakeCall {
            control: self.control.clone(),
            fleet: self.fleet.clone(),
            proxy_id: self.proxy_id.clone(),
            seen: self.wakes_seen.clone(),
        };
        let asleep = self.asleep.lock().expect("asleep poisoned").contains(key);
        let (cache, all_wakes) = (self.cache.clone(), self.wakes.clone());
        let (k, mine) = (key.clone(), wake_key.clone());
        // The wake files its own result: every waiter shares it, and the
        // next request after a failure tries again.
        let fut = async move {
            let result = call.resolve(&k, create, asleep, wake_timeout).await;
            if let Ok(t) = &result {
                cache
                    .lock()
                    .expect("route cache poisoned")
                    .insert(k.clone(), t.clone());
            }
            all_wakes.lock().expect("wakes poisoned").remove(&mine);
            result
        }
        .boxed()
        .shared();
        wakes.insert(wake_key, fut.clone());
        // Driven by a task of its own, so waiters that give up do not cancel it.
        tokio::spawn(fut.clone());
        fut
    }
}

/// What a health probe learns of a database without waking it.
pub(crate) enum Probe {
    Running(Target),
    /// Not running: what control says it is (hibernating, waking, ...).
    Asleep {
        engine: Engine,
        status: DatabaseStatus,
    },
}

impl<C: ControlApi> Resolver<C> {
    /// The database's endpoints when it runs, else its status: never wakes
    /// or creates it, so monitoring does not keep a tenant awake.
    pub(crate) async fn probe(&self, key: &DbKey) -> Result<Probe> {
        if let Some(t) = self.cache.lock().expect("route cache poisoned").get(key) {
            return Ok(Probe::Running(t.clone()));
        }
        let info = self
            .control
            .database(key)
            .await
            .map_err(|e| wake::resolve_error(key, e))?;
        if !wake::is_active(&info) {
            return Ok(Probe::Asleep {
                engine: info.engine,
                status: info.status,
            });
        }
        let target = Target::of(&self.control, &info);
        self.cache
            .lock()
            .expect("route cache poisoned")
            .insert(key.clone(), target.clone());
        Ok(Probe::Running(target))
    }
}

impl<C> Resolver<C> {
    /// Forgets a database's endpoints (a failed connect, or control says it
    /// changed: it may have been hibernated or moved).
    pub(crate) fn invalidate(&self, key: &DbKey) {
        self.cache.lock().expect("route cache poisoned").remove(key);
    }

    /// Control says the database's status changed: its route is read
    /// afresh, and a database put to sleep is remembered as such.
    pub(crate) fn status_changed(&self, key: &DbKey, status: DatabaseStatus) {
        self.invalidate(key);
        let mut asleep = self.asleep.lock().expect("asleep poisoned");
        if status != DatabaseStatus::Hibernating {
            asleep.remove(key);
        } else if asleep.len() < ASLEEP_MAX {
            asleep.insert(key.clone());
        }
    }

    /// The database is gone.
    pub(crate) fn dropped(&self, key: &DbKey) {
        self.invalidate(key);
        self.asleep.lock().expect("asleep poisoned").remove(key);
    }

    /// A new leader: the cached endpoints, if any, in their new order.
    pub(crate) fn set_endpoints(&self, key: &DbKey, endpoints: &[Endpoint]) {
        let mut cache = self.cache.lock().expect("route cache poisoned");
        if let Some(t) = cache.get_mut(key) {
            t.endpoints = Arc::new(endpoints.to_vec());
        }
    }

    /// Forgets every database's endpoints (control's news may have been missed).
    pub(crate) fn clear(&self) {
        self.cache.lock().expect("route cache poisoned").clear();
        self.asleep.lock().expect("asleep poisoned").clear();
    }

    /// New wait bounds (a reload); waiting requests keep theirs.
    pub(crate) fn set_bounds(&self, wake_timeout: Duration, max_waiting: usize) {
        *self.bounds.lock().expect("bounds poisoned") = (wake_timeout, max_waiting);
    }

    /// Requests waiting for a wake, per database.
    pub(crate) fn waiting_counts(&self) -> HashMap<DbKey, usize> {
        let waiting = self.waiting.lock().expect("waiting poisoned");
        waiting
            .iter()
            .map(|(k, n)| (k.clone(), n.load(Ordering::Relaxed)))
            .collect()
    }

    /// The wakes this proxy waited for, oldest first.
    pub(crate) fn wake_history(&self) -> Vec<Wake> {
        self.wakes_seen.all()
    }
}
