//! The resolver's rules against a stand-in for control: one wake for many
//! waiters, the bounds on waiting, creation on first access and control's
//! refusals. Bounds are a few hundred milliseconds of real time.
//!
//! Taking over another proxy's wake lock needs a Redis (without one, every
//! proxy asks control itself); the end-to-end tests cover it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rouse_config::AppsConfig;
use rouse_control_api::{
    BackendCredentials, ClientError, CreateDatabase, DatabaseInfo, DatabaseStatus, DbKey, Endpoint,
    Engine, ErrorCode, Name, PoolMode,
};

use super::{Bounds, ControlApi, Resolver};
use crate::error::ProxyError;
use crate::fleet::Fleet;
use crate::quota::AppQuotas;

/// How the stand-in answers.
#[derive(Clone, Copy, PartialEq)]
enum Wakes {
    /// After this long, with the database active.
    After(Duration),
    /// Never.
    Never,
}

#[derive(Clone)]
struct Control(Arc<State>);

struct State {
    /// `None`: the database does not exist (until it is created).
    status: Mutex<Option<DatabaseStatus>>,
    wakes: Wakes,
    /// What creating answers instead of creating.
    create_refusal: Option<(u16, ErrorCode)>,
    wake_calls: AtomicUsize,
    create_calls: AtomicUsize,
    database_calls: AtomicUsize,
    /// Calls that find control away (a restart) before it answers again.
    away_for: AtomicUsize,
}

fn key() -> DbKey {
    DbKey::new(Name::new("shop").unwrap(), Name::new("users").unwrap())
}

fn info(status: DatabaseStatus) -> DatabaseInfo {
    let endpoints = match status {
        DatabaseStatus::Active => vec![Endpoint {
            node_id: "n1".into(),
            host: "127.0.0.1".into(),
            port: 5001,
            raft_port: Some(7001),
            api: None,
            leader: true,
            tls: false,
        }],
        _ => Vec::new(),
    };
    DatabaseInfo {
        app: key().app,
        name: key().db,
        engine: Engine::Rqlite,
        replication_factor: 1,
        status,
        reason: None,
        endpoints,
        ports: Vec::new(),
        created_at: 0,
        last_activity: 0,
        last_wake_ms: None,
        last_backup: None,
        open_sessions: 0,
        engine_login: None,
        pool_mode: PoolMode::Session,
    }
}

fn api_error(status: u16, code: ErrorCode) -> ClientError {
    ClientError::Api {
        status,
        code,
        message: format!("control's own words ({code})"),
    }
}

impl Control {
    fn new(status: Option<DatabaseStatus>, wakes: Wakes) -> Control {
        Control(Arc::new(State {
            status: Mutex::new(status),
            wakes,
            create_refusal: None,
            wake_calls: AtomicUsize::new(0),
            create_calls: AtomicUsize::new(0),
            database_calls: AtomicUsize::new(0),
            away_for: AtomicUsize::new(0),
        }))
    }

    /// Control is away for the next `calls` calls: a gateway says 503.
    fn away(self, calls: usize) -> Control {
        self.0.away_for.store(calls, Ordering::SeqCst);
        self
    }

    fn refusing_creates(status: u16, code: ErrorCode) -> Control {
        let mut state = Arc::into_inner(Control::new(None, Wakes::After(Duration::ZERO)).0)
            .expect("no other handle yet");
        state.create_refusal = Some((status, code));
        Control(Arc::new(state))
    }

    fn wakes(&self) -> usize {
        self.0.wake_calls.load(Ordering::SeqCst)
    }
}

impl ControlApi for Control {
    async fn database(&self, _: &DbKey) -> Result<DatabaseInfo, ClientError> {
        self.0.database_calls.fetch_add(1, Ordering::SeqCst);
        let away = self.0.away_for.load(Ordering::SeqCst);
        if away > 0 {
            self.0.away_for.store(away - 1, Ordering::SeqCst);
            return Err(ClientError::Protocol {
                status: 503,
                body: "no healthy upstream".into(),
            });
        }
        match *self.0.status.lock().unwrap() {
            Some(status) => Ok(info(status)),
            None => Err(api_error(404, ErrorCode::NotFound)),
        }
    }

    async fn create_on_first_access(
        &self,
        _: &CreateDatabase,
    ) -> Result<DatabaseInfo, ClientError> {
        self.0.create_calls.fetch_add(1, Ordering::SeqCst);
        if let Some((status, code)) = self.0.create_refusal {
            if status == 409 {
                // Another proxy created it meanwhile; it is hibernating.
                *self.0.status.lock().unwrap() = Some(DatabaseStatus::Hibernating);
            }
            return Err(api_error(status, code));
        }
        *self.0.status.lock().unwrap() = Some(DatabaseStatus::Active);
        Ok(info(DatabaseStatus::Active))
    }

    async fn wake(&self, _: &DbKey, _: Duration) -> Result<DatabaseInfo, ClientError> {
        self.0.wake_calls.fetch_add(1, Ordering::SeqCst);
        match self.0.wakes {
            Wakes::After(took) => tokio::time::sleep(took).await,
            Wakes::Never => std::future::pending().await,
        }
        if self.0.status.lock().unwrap().is_none() {
            return Err(api_error(404, ErrorCode::NotFound));
        }
        *self.0.status.lock().unwrap() = Some(DatabaseStatus::Active);
        Ok(info(DatabaseStatus::Active))
    }

    fn engine_login(&self, _: &DatabaseInfo) -> Option<BackendCredentials> {
        None
    }
}

fn resolver(
    control: &Control,
    wake_timeout: Duration,
    max_waiting: usize,
) -> Arc<Resolver<Control>> {
    Resolver::new(
        control.clone(),
        Arc::new(Fleet::local()),
        "proxy-test".into(),
        Bounds {
            wake_timeout,
            max_waiting,
            auto_create: true,
        },
        AppQuotas::new(AppsConfig::default()),
    )
}

/// `n` requests for the database, each on a task of its own.
fn spawn_waiters(
    r: &Arc<Resolver<Control>>,
    n: usize,
) -> Vec<tokio::task::JoinHandle<crate::error::Result<super::Target>>> {
    (0..n)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move { r.target(&key()).await })
        })
        .collect()
}

#[tokio::test]
async fn many_waiters_share_one_wake() {
    let control = Control::new(
        Some(DatabaseStatus::Hibernating),
        Wakes::After(Duration::from_millis(50)),
    );
    let r = resolver(&control, Duration::from_secs(30), 10_000);
    let waiters = spawn_waiters(&r, 100);
    for w in waiters {
        let target = w.await.unwrap().expect("woken");
        assert_eq!(target.endpoints[0].port, 5001);
    }
    assert_eq!(control.wakes(), 1, "one wake for every waiter");
    assert_eq!(r.waiting_counts()[&key()], 0);
    // The route is cached now: no more calls to control.
    let before = control.0.database_calls.load(Ordering::SeqCst);
    r.target(&key()).await.unwrap();
    assert_eq!(control.0.database_calls.load(Ordering::SeqCst), before);
    let history = r.wake_history();
    assert_eq!(history.len(), 1);
    assert!(history[0].ok);
}

#[tokio::test]
async fn requests_are_held_while_control_is_away_and_served_when_it_is_back() {
    let control = Control::new(
        Some(DatabaseStatus::Hibernating),
        Wakes::After(Duration::from_millis(10)),
    )
    .away(5);
    let r = resolver(&control, Duration::from_secs(30), 10_000);
    let waiters = spawn_waiters(&r, 10);
    for w in waiters {
        w.await.unwrap().expect("served once control answers");
    }
    assert_eq!(control.wakes(), 1);
    assert!(control.0.database_calls.load(Ordering::SeqCst) >= 6);
}

#[tokio::test]
async fn a_control_that_stays_away_is_a_wake_timeout_not_a_gateway_error() {
    let control = Control::new(Some(DatabaseStatus::Hibernating), Wakes::Never).away(usize::MAX);
    let r = resolver(&control, Duration::from_millis(400), 10_000);
    let err = r.target(&key()).await.unwrap_err();
    assert!(matches!(err, ProxyError::WakeTimeout { .. }), "{err:?}");
    assert!(
        control.0.database_calls.load(Ordering::SeqCst) > 2,
        "asked again while waiting"
    );
}

#[tokio::test]
async fn a_waiter_past_max_waiting_is_refused_at_once() {
    let control = Control::new(Some(DatabaseStatus::Hibernating), Wakes::Never);
    let r = resolver(&control, Duration::from_secs(30), 2);
    let waiting = spawn_waiters(&r, 2);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(r.waiting_counts()[&key()], 2);
    let started = tokio::time::Instant::now();
    let refused = r.target(&key()).await.unwrap_err();
    assert!(
        matches!(refused, ProxyError::QueueFull(ref db) if db == "users"),
        "{refused:?}"
    );
    assert_eq!(refused.code(), "wake_queue_full");
    // The wake never ends and wake_timeout is 30 s: an answer now is a refusal at once.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused without waiting"
    );
    assert_eq!(
        r.waiting_counts()[&key()],
        2,
        "the refused one left the queue"
    );
    for w in waiting {
        w.abort();
    }
}

#[tokio::test]
async fn a_wake_that_never_ends_fails_its_waiters_at_wake_timeout() {
    let control = Control::new(Some(DatabaseStatus::Hibernating), Wakes::Never);
    let r = resolver(&control, Duration::from_millis(200), 10_000);
    let started = tokio::time::Instant::now();
    let waiters = spawn_waiters(&r, 3);
    for w in waiters {
        let e = w.await.unwrap().unwrap_err();
        assert!(
            matches!(e, ProxyError::WakeTimeout { waited, .. } if waited == Duration::from_millis(200)),
            "{e:?}"
        );
        assert_eq!(e.status(), hyper::StatusCode::SERVICE_UNAVAILABLE);
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert_eq!(control.wakes(), 1);
    assert_eq!(r.waiting_counts()[&key()], 0);
}

#[tokio::test]
async fn a_database_created_meanwhile_by_another_proxy_is_woken() {
    let control = Control::refusing_creates(409, ErrorCode::AlreadyExists);
    let r = resolver(&control, Duration::from_secs(30), 10_000);
    let target = r
        .target_or_create(&key())
        .await
        .expect("woken after the conflict");
    assert_eq!(target.engine, Engine::Rqlite);
    assert_eq!(control.0.create_calls.load(Ordering::SeqCst), 1);
    assert_eq!(control.wakes(), 1);
}

#[tokio::test]
async fn a_missing_database_is_created_on_first_access_or_not_found() {
    let control = Control::new(None, Wakes::After(Duration::ZERO));
    let r = resolver(&control, Duration::from_secs(30), 10_000);
    r.target_or_create(&key()).await.expect("created");
    assert_eq!(control.0.create_calls.load(Ordering::SeqCst), 1);
    assert_eq!(control.wakes(), 0, "a created database is active");

    let control = Control::new(None, Wakes::After(Duration::ZERO));
    let r = Resolver::new(
        control.clone(),
        Arc::new(Fleet::local()),
        "proxy-test".into(),
        Bounds {
            wake_timeout: Duration::from_secs(30),
            max_waiting: 10_000,
            auto_create: false,
        },
        AppQuotas::new(AppsConfig::default()),
    );
    let e = r.target_or_create(&key()).await.unwrap_err();
    assert!(matches!(e, ProxyError::NotFound), "{e:?}");
    assert_eq!(control.0.create_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_front_that_does_not_create_finds_a_missing_database_not_found() {
    // A Postgres login naming a database that does not exist must not
    // leave an rqlite database behind, whatever the HTTP policy says.
    let control = Control::new(None, Wakes::After(Duration::ZERO));
    let r = resolver(&control, Duration::from_secs(30), 10_000);
    let e = r.target(&key()).await.unwrap_err();
    assert!(matches!(e, ProxyError::NotFound), "{e:?}");
    assert_eq!(control.0.create_calls.load(Ordering::SeqCst), 0);
    // The HTTP API's request that follows still creates it.
    r.target_or_create(&key()).await.expect("created");
    assert_eq!(control.0.create_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn controls_refusals_reach_clients_by_their_code_only() {
    let control = Control::refusing_creates(429, ErrorCode::AppDatabaseLimit);
    let r = resolver(&control, Duration::from_secs(30), 10_000);
    let e = r.target_or_create(&key()).await.unwrap_err();
    assert!(
        matches!(e, ProxyError::AppLimit { ref limit, .. } if limit == "max_databases"),
        "{e:?}"
    );
    let control = Control::refusing_creates(500, ErrorCode::Internal);
    let r = resolver(&control, Duration::from_secs(30), 10_000);
    let e = r.target_or_create(&key()).await.unwrap_err();
    assert!(matches!(e, ProxyError::Backend { .. }), "{e:?}");
    assert!(!e.client_message().contains("control's own words"));
}

#[tokio::test]
async fn a_stale_route_is_resolved_again_and_tried_once_more() {
    let control = Control::new(Some(DatabaseStatus::Active), Wakes::After(Duration::ZERO));
    let r = resolver(&control, Duration::from_secs(30), 10_000);
    let target = r.target(&key()).await.unwrap();
    let tries = AtomicUsize::new(0);
    let connected: Result<u16, &str> = r
        .connect_with_wake(
            &key(),
            target,
            "test",
            |e: &&str| *e == "stale",
            |_| "resolve failed",
            |t| {
                let n = tries.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Err("stale"),
                        _ => Ok(t.endpoints[0].port),
                    }
                }
            },
        )
        .await;
    assert_eq!(connected, Ok(5001));
    assert_eq!(tries.load(Ordering::SeqCst), 2);
    // The route was forgotten and read afresh from control.
    assert_eq!(control.0.database_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_database_control_put_to_sleep_is_woken_without_being_read_first() {
    let control = Control::new(
        Some(DatabaseStatus::Hibernating),
        Wakes::After(Duration::ZERO),
    );
    let r = resolver(&control, Duration::from_secs(5), 10);
    r.status_changed(&key(), DatabaseStatus::Hibernating);
    let target = r.target(&key()).await.expect("woken");
    assert_eq!(target.endpoints[0].port, 5001);
    assert_eq!(control.wakes(), 1);
    assert_eq!(control.0.database_calls.load(Ordering::SeqCst), 0);

    // Awake again, it is read first as any other.
    r.status_changed(&key(), DatabaseStatus::Active);
    r.target(&key()).await.expect("active");
    assert_eq!(control.wakes(), 1);
    assert_eq!(control.0.database_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_database_dropped_while_asleep_is_created_on_first_access_again() {
    let control = Control::new(None, Wakes::After(Duration::ZERO));
    let r = resolver(&control, Duration::from_secs(5), 10);
    // Its drop was missed: the resolver still thinks it asleep.
    r.status_changed(&key(), DatabaseStatus::Hibernating);
    r.target_or_create(&key()).await.expect("created");
    assert_eq!(control.wakes(), 1, "the wake found nothing");
    assert_eq!(control.0.create_calls.load(Ordering::SeqCst), 1);
}
