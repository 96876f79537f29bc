//! The HTTP front (port 8080 and static listeners): credentials, routing,
//! then the gateway API or the rqlite API.

mod cache;
pub(crate) mod gateway;
mod gateway_pg;
pub(crate) mod rqlite;
pub(crate) mod sql;
pub(crate) mod upstream;

use crate::metrics::{REQUESTS, REQUEST_DURATION};
use rouse_runtime::error_kind::ErrorKind;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use rouse_config::ProxyConfig;
use rouse_control_api::{Client, DbKey, Name};
use serde::Serialize;

use crate::activity::Activity;
use crate::auth::{self, Authenticator, Credential};
use crate::error::{ProxyError, Result};
use crate::fleet::ratelimit::{Protocol, RateLimits};
use crate::fleet::Fleet;
use crate::resolve::{Resolver, Target};
use crate::route::{self, Route, RouteError, RouteInput};
pub(crate) use cache::ResponseCache;
use upstream::{Upstream, UpstreamError};

pub(crate) type Body = Full<Bytes>;

/// Everything a request needs, shared by all listeners.
pub(crate) struct Proxy {
    pub(crate) config: ProxyConfig,
    pub(crate) control: Client,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) limits: Arc<RateLimits>,
    pub(crate) cache: Arc<ResponseCache>,
    pub(crate) resolver: Arc<Resolver>,
    pub(crate) upstream: Arc<Upstream>,
    pub(crate) activity: Arc<Activity>,
    pub(crate) metrics: RequestMetrics,
    /// Shared with the PostgreSQL front: one count per client address.
    pub(crate) failed_logins: Arc<crate::throttle::FailedLogins>,
    /// Runs SQL over HTTP (`/sql`) as the PostgreSQL front would.
    pub(crate) pg: Arc<crate::pg::PgFront>,
    /// Where a WebSocket's session is counted, so that a drain waits for it.
    pub(crate) connections: Arc<crate::net::Connections>,
}

/// How one request was served, for metrics.
struct Served {
    db: Option<DbKey>,
    outcome: &'static str,
}

pub(crate) async fn handle(
    proxy: Arc<Proxy>,
    bound: Option<Arc<DbKey>>,
    peer: std::net::IpAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let mut served = Served {
        db: None,
        outcome: "ok",
    };
    let resp = match dispatch(&proxy, bound.as_deref(), peer, req, &mut served).await {
        Ok(resp) => resp,
        Err(e) => {
            served.outcome = e.kind().label();
            if e.kind() == ErrorKind::Backend {
                tracing::warn!(error = %e, "request failed");
            }
            error_response(&e)
        }
    };
    proxy
        .metrics
        .record(served.db, served.outcome, started.elapsed());
    Ok(resp)
}

/// Per-request metrics with their handles kept, so that a request costs a
/// map lookup rather than a registry lookup with fresh label strings.
type MetricHandles = std::collections::HashMap<
    (Option<DbKey>, &'static str),
    (metrics::Counter, metrics::Histogram),
>;

#[derive(Default)]
pub(crate) struct RequestMetrics {
    handles: std::sync::RwLock<MetricHandles>,
}

impl RequestMetrics {
    fn record(&self, db: Option<DbKey>, outcome: &'static str, took: std::time::Duration) {
        let key = (db, outcome);
        if let Some((count, duration)) = self.handles.read().expect("metrics poisoned").get(&key) {
            count.increment(1);
            duration.record(took.as_secs_f64());
            return;
        }
        let (app, db) = key
            .0
            .as_ref()
            .map(|k| (k.app.to_string(), k.db.to_string()))
            .unwrap_or_default();
        let count = REQUESTS.counter([app.into(), db.into(), "http".into(), outcome.into()]);
        let duration = REQUEST_DURATION.histogram(["http".into(), outcome.into()]);
        count.increment(1);
        duration.record(took.as_secs_f64());
        self.handles
            .write()
            .expect("metrics poisoned")
            .insert(key, (count, duration));
    }
}

async fn dispatch(
    proxy: &Arc<Proxy>,
    bound: Option<&DbKey>,
    peer: std::net::IpAddr,
    req: Request<Incoming>,
    served: &mut Served,
) -> Result<Response<Body>> {
    // The PostgreSQL wire over a WebSocket, and SQL over HTTP, log in as
    // a Postgres role, with credentials of their own.
    if crate::net::websocket::is_upgrade(&req) {
        return Ok(postgres_websocket(proxy, peer, req));
    }
    if req.uri().path() == "/sql" {
        return Ok(sql::handle(proxy, peer, req, served).await);
    }
    let presented = auth::presented(req.headers());
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let path = req.uri().path().to_string();
    let route = route::route(&RouteInput {
        path: &path,
        host: host.as_deref(),
        basic_user: presented.as_ref().and_then(|p| p.basic_user.as_deref()),
        bound,
        base_domain: proxy.config.base_domain.as_deref(),
    });
    let route = match route {
        Ok(r) => r,
        Err(RouteError::Unknown) => return Err(ProxyError::NoRoute(path)),
        Err(RouteError::NoDatabase) => {
            return Err(ProxyError::NoRoute(format!(
                "{path}: name the database with /<app>/<db>{path}, Host <db>.<app>.<base_domain> or basic-auth user <db>.<app>"
            )))
        }
    };
    // Credentials first: nothing about databases is told to strangers.
    let presented = presented.ok_or(ProxyError::Unauthorized)?;
    proxy
        .failed_logins
        .check(peer)
        .map_err(ProxyError::FailedLogins)?;
    let app = proxy
        .auth
        .app_of(&presented.credential)
        .await
        .inspect_err(|e| {
            if matches!(e, ProxyError::Unauthorized) {
                proxy.failed_logins.record(peer);
            }
        })?;
    proxy
        .limits
        .check(&proxy.fleet, Protocol::Http, &app, || {
            presented.credential.id()
        })
        .await?;
    match route {
        Route::Gateway(op) => gateway::handle(proxy, &app, &op, req, served).await,
        Route::RevokeToken => match (&presented.credential, req.method()) {
            (Credential::Jwt(token), &hyper::Method::POST) => {
                proxy.auth.revoke_token(token).await?;
                Ok(json(StatusCode::OK, &serde_json::json!({"revoked": true})))
            }
            (Credential::Jwt(_), _) => {
                Err(ProxyError::BadRequest("revoke a token with POST".into()))
            }
            (Credential::ApiKey(_), _) => Err(ProxyError::BadRequest(
                "API keys are revoked through control: DELETE /api/v1/apps/<app>/keys/<id>".into(),
            )),
        },
        Route::Rqlite { key, path, prefix } => {
            // Another app's database answers exactly like a missing one.
            if key.app != app {
                return Err(ProxyError::NotFound);
            }
            served.db = Some(key.clone());
            rqlite::handle(proxy, &key, &path, &prefix, host.as_deref(), req).await
        }
    }
}

/// Switches to a WebSocket that carries a PostgreSQL session.
fn postgres_websocket(
    proxy: &Arc<Proxy>,
    peer: std::net::IpAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let (answer, upgraded) = crate::net::websocket::accept(req);
    if let Some(upgraded) = upgraded {
        let pg = proxy.pg.clone();
        let open = proxy.connections.track("postgres");
        tokio::spawn(async move {
            match upgraded.await {
                Ok(ws) => pg.serve_websocket(ws, (peer, 0).into(), open).await,
                Err(e) => tracing::debug!(%peer, error = %e, "WebSocket upgrade failed"),
            }
        });
    }
    answer
}

/// The request body, at most `max_body_bytes`, within `body_read_timeout`.
pub(crate) async fn read_body(proxy: &Proxy, req: Request<Incoming>) -> Result<Bytes> {
    let limit = proxy.config.max_body_bytes;
    let within = proxy.config.body_read_timeout;
    let collected = tokio::time::timeout(within, Limited::new(req.into_body(), limit).collect())
        .await
        .map_err(|_| ProxyError::SlowBody(within))?;
    collected.map(|b| b.to_bytes()).map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            ProxyError::PayloadTooLarge(limit)
        } else {
            ProxyError::BadRequest(format!("unreadable request body: {e}"))
        }
    })
}

impl Proxy {
    /// Sends to the database, waking it first when needed; a stale route
    /// (nothing accepts connections) is dropped and resolved once more.
    pub(crate) async fn send(
        &self,
        key: &DbKey,
        method: &hyper::Method,
        path_and_query: &str,
        content_type: Option<&HeaderValue>,
        body: Bytes,
        timeout: std::time::Duration,
    ) -> Result<upstream::Reply> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut slot = match self
            .cache
            .lookup(&self.fleet, key, method, path_and_query, &body)
            .await
        {
            // Served without waking or touching the database.
            Some(Ok(cached)) => return Ok(cached),
            Some(Err(slot)) => Some(slot),
            None => None,
        };
        let target = self.target(key).await?;
        let sent = self
            .resolver
            .connect_with_wake(
                key,
                target,
                "http",
                |e| matches!(e, UpstreamError::Unreachable(_)),
                UpstreamError::Route,
                |target| {
                    let body = body.clone();
                    async move {
                        self.upstream
                            .send(
                                &target,
                                method,
                                path_and_query,
                                content_type,
                                body,
                                deadline,
                            )
                            .await
                    }
                },
            )
            .await;
        let backend = |reason| ProxyError::Backend {
            db: key.db.to_string(),
            reason,
        };
        let reply = match sent {
            Ok(reply) => reply,
            Err(UpstreamError::Route(e)) => return Err(e),
            Err(UpstreamError::Timeout) => {
                return Err(ProxyError::UpstreamTimeout(key.db.to_string()))
            }
            Err(UpstreamError::Unreachable(reason) | UpstreamError::Failed(reason)) => {
                return Err(backend(reason))
            }
        };
        if let Some(slot) = slot.take() {
            self.cache.store(&self.fleet, key, slot, &reply).await;
        }
        if cache::is_write(path_and_query) {
            self.cache.invalidate(&self.fleet, key).await;
        }
        Ok(reply)
    }

    async fn target(&self, key: &DbKey) -> Result<Target> {
        let target = self.resolver.target_or_create(key).await?;
        rqlite_only(key, target.engine)?;
        Ok(target)
    }
}

/// The HTTP APIs serve rqlite databases.
pub(crate) fn rqlite_only(key: &DbKey, engine: rouse_control_api::Engine) -> Result<()> {
    if engine != rouse_control_api::Engine::Rqlite {
        return Err(ProxyError::BadRequest(format!(
            "database {} is a PostgreSQL database: connect to the Postgres port",
            key.db
        )));
    }
    Ok(())
}

pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("responses serialise");
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(crate) fn error_response(e: &ProxyError) -> Response<Body> {
    let mut body = serde_json::json!({"error": e.client_message(), "code": e.code()});
    if let ProxyError::Postgres {
        sqlstate,
        detail,
        hint,
        ..
    } = e
    {
        body["sqlstate"] = sqlstate.as_str().into();
        for (name, value) in [("detail", detail), ("hint", hint)] {
            if let Some(v) = value {
                body[name] = v.as_str().into();
            }
        }
    }
    let mut resp = json(e.status(), &body);
    if matches!(e, ProxyError::Unauthorized) {
        resp.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"rouse\", Bearer realm=\"rouse\""),
        );
    }
    if let Some(secs) = e.retry_after() {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// The app a gateway request acts for: always the credential's.
pub(crate) fn database_key(app: &Name, database: &str) -> Result<DbKey> {
    let db = Name::new(database)
        .map_err(|e| ProxyError::BadRequest(format!("invalid database name: {e}")))?;
    Ok(DbKey::new(app.clone(), db))
}
