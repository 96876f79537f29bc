//! One wake: control is asked for the database, creates it on first access
//! when allowed, and wakes it when it is not running, with one call to
//! control across the fleet (the proxy that takes the database's wake lock
//! asks; the others watch the database).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rouse_control_api::{
    ClientError, CreateDatabase, DatabaseInfo, DatabaseStatus, DbKey, Engine, ErrorCode,
};
use tracing::{debug, info};

use super::{ControlApi, Target, WakeHistory};
use crate::error::{ProxyError, Result};
use crate::fleet::{Fleet, Holder};

/// What a wake needs: control, and the fleet to agree with other proxies
/// on which of them asks control.
pub(super) struct WakeCall<C> {
    pub(super) control: C,
    pub(super) fleet: Arc<Fleet>,
    pub(super) proxy_id: String,
    /// Where each wake's duration is kept for the stats page.
    pub(super) seen: Arc<WakeHistory>,
}

/// How often a proxy waiting on another's wake looks at the database.
const WAKE_POLL: Duration = Duration::from_millis(50);
/// The longest pause between two calls to a control that does not answer.
const MAX_PAUSE: Duration = Duration::from_secs(1);

pub(super) fn is_active(info: &DatabaseInfo) -> bool {
    info.status == DatabaseStatus::Active && !info.endpoints.is_empty()
}

impl<C: ControlApi> WakeCall<C> {
    /// Asks control for the database, waking it as needed and creating it
    /// when `create` says so; a database known to be `asleep` is woken
    /// without being read first.
    /// While control cannot answer (restarting, wedged), it asks again for
    /// up to `wake_timeout`: the request is held, as during a wake, and
    /// times out as a wake does.
    pub(super) async fn resolve(
        &self,
        key: &DbKey,
        create: bool,
        mut asleep: bool,
        wake_timeout: Duration,
    ) -> Result<Target> {
        let deadline = Instant::now() + wake_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let attempt = if asleep {
                self.wake_target(key, deadline).await
            } else {
                self.attempt(key, create, deadline).await
            };
            match attempt {
                // Dropped meanwhile: the usual way, which may create it.
                Err(e) if asleep && e.is_not_found() => asleep = false,
                Err(e) if e.is_unavailable() => {
                    if Instant::now() + pause >= deadline {
                        return Err(ProxyError::WakeTimeout {
                            db: key.db.to_string(),
                            waited: wake_timeout,
                        });
                    }
                    debug!(database = %key, error = %e, "control unavailable; asking again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                result => return result.map_err(|e| resolve_error(key, e)),
            }
        }
    }

    async fn attempt(
        &self,
        key: &DbKey,
        create: bool,
        deadline: Instant,
    ) -> std::result::Result<Target, ClientError> {
        let control = &self.control;
        let info = match control.database(key).await {
            Ok(info) => info,
            Err(e) if e.is_not_found() && create => {
                let req = CreateDatabase {
                    app: key.app.clone(),
                    name: key.db.clone(),
                    engine: Engine::Rqlite,
                    replication_factor: None,
                    patroni: None,
                };
                match control.create_on_first_access(&req).await {
                    Ok(info) => {
                        info!(database = %key, "created on first access");
                        info
                    }
                    // Another proxy created it meanwhile.
                    Err(ClientError::Api { status: 409, .. }) => self.wake(key, deadline).await?,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        if is_active(&info) {
            return Ok(Target::of(control, &info));
        }
        self.wake_target(key, deadline).await
    }

    async fn wake_target(
        &self,
        key: &DbKey,
        deadline: Instant,
    ) -> std::result::Result<Target, ClientError> {
        let started = Instant::now();
        let info = self.wake(key, deadline).await?;
        info!(database = %key, waited_ms = started.elapsed().as_millis() as u64, "woke database for waiting requests");
        Ok(Target::of(&self.control, &info))
    }

    /// Wakes the database with one call to control across all proxies: the
    /// proxy that takes `rouse:wake:<db>` calls control; the others watch
    /// the database until it is active (or the lock goes without it,
    /// and they try to take it). Without Redis, each proxy calls control,
    /// which is idempotent.
    async fn wake(
        &self,
        key: &DbKey,
        deadline: Instant,
    ) -> std::result::Result<DatabaseInfo, ClientError> {
        let started = Instant::now();
        let woke = self.wake_once(key, deadline).await;
        self.seen.record(key, started.elapsed(), woke.is_ok());
        woke
    }

    async fn wake_once(
        &self,
        key: &DbKey,
        deadline: Instant,
    ) -> std::result::Result<DatabaseInfo, ClientError> {
        let within = || deadline.saturating_duration_since(Instant::now());
        let lock = self.fleet.wake_lock(key, &self.proxy_id);
        loop {
            match lock.take().await {
                None => return self.control.wake(key, within()).await,
                Some(true) => {
                    let woke = self.control.wake(key, within()).await;
                    lock.release().await;
                    return woke;
                }
                Some(false) => {
                    debug!(database = %key, "another proxy is waking the database");
                    loop {
                        tokio::time::sleep(WAKE_POLL).await;
                        let info = self.control.database(key).await?;
                        if is_active(&info) {
                            return Ok(info);
                        }
                        match lock.holder().await {
                            Holder::Fleet => {}
                            // A lock no proxy of this fleet set: wake without it
                            // (control is idempotent).
                            Holder::Stranger => return self.control.wake(key, within()).await,
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

/// What a client is told when control could not give `key`'s database:
/// control's own words stay inside; an app's limit is named by its code.
pub(super) fn resolve_error(key: &DbKey, e: ClientError) -> ProxyError {
    match e {
        e if e.is_not_found() => ProxyError::NotFound,
        ClientError::Api {
            code: ErrorCode::AppDatabaseLimit,
            ..
        } => ProxyError::AppLimit {
            app: key.app.to_string(),
            limit: "max_databases".into(),
        },
        ClientError::Api {
            code: ErrorCode::AppCreateRate,
            ..
        } => ProxyError::AppLimit {
            app: key.app.to_string(),
            limit: "creates_per_minute".into(),
        },
        ClientError::Api {
            code: ErrorCode::ActiveSetFull,
            ..
        } => ProxyError::ActiveSetFull(key.db.to_string()),
        ClientError::Api { message, .. } => ProxyError::Backend {
            db: key.db.to_string(),
            reason: message,
        },
        other => ProxyError::Control(other.to_string()),
    }
}
