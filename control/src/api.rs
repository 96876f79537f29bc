//! The control API over HTTP/1.1 (hyper): `/api/v1/...`, `/healthz`,
//! `/metrics`. Errors are `{"error","code"}` with a fitting status.
//!
//! Everything under `/api/v1` needs a bearer token (see [`Tokens`]); each
//! route says which roles may call it.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use rouse_control_api::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;

use crate::error::ControlError;
use crate::lifecycle::Manager;
use crate::metrics::{CONTROL_ERRORS, CONTROL_REQUESTS, WAKE_REQUESTS};
use crate::tokens::Tokens;

type Body = BoxBody<Bytes, Infallible>;

/// Request bodies are small JSON documents.
const MAX_BODY: usize = 1 << 20;

/// Serves the API on `listener` until `shutdown` resolves; open connections
/// then get a few seconds to finish.
pub async fn serve(
    listener: TcpListener,
    manager: Arc<Manager>,
    tokens: Arc<Tokens>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    rouse_runtime::server::serve_http(
        listener,
        tls.map(|acceptor| rouse_runtime::server::ListenerTls {
            acceptor,
            plain: false,
        }),
        "control",
        Duration::from_secs(10),
        Duration::from_secs(5),
        shutdown,
        move |_peer| {
            let manager = manager.clone();
            let tokens = tokens.clone();
            hyper::service::service_fn(move |req| {
                let manager = manager.clone();
                let tokens = tokens.clone();
                async move { Ok::<_, Infallible>(handle(&manager, &tokens, req).await) }
            })
        },
    )
    .await
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("API types serialise");
    full(status, "application/json", body)
}

fn from_error(e: ControlError) -> Response<Body> {
    CONTROL_ERRORS
        .counter([e.kind().label().into(), e.code().as_str().into()])
        .increment(1);
    let mut resp = json(
        e.status(),
        &ErrorBody {
            error: e.to_string(),
            code: e.code(),
        },
    );
    if matches!(e, ControlError::Unauthorized) {
        resp.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"rouse-control\""),
        );
    }
    resp
}

async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ControlError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| ControlError::BodyTooLarge(MAX_BODY))?
        .to_bytes();
    let body = if body.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        body
    };
    serde_json::from_slice(&body)
        .map_err(|e| ControlError::BadRequest(format!("invalid JSON body: {e}")))
}

fn name(segment: &str) -> Result<Name, ControlError> {
    Ok(Name::new(segment)?)
}

fn db_key(app: &str, db: &str) -> Result<DbKey, ControlError> {
    Ok(DbKey::new(name(app)?, name(db)?))
}

fn query_param<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

fn reply<T: Serialize>(status: StatusCode, result: Result<T, ControlError>) -> Response<Body> {
    match result {
        Ok(v) => json(status, &v),
        Err(e) => from_error(e),
    }
}

async fn handle(m: &Arc<Manager>, tokens: &Tokens, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = route(m, tokens, req, &method, &path)
        .await
        .unwrap_or_else(from_error);
    CONTROL_REQUESTS
        .counter([resp.status().as_u16().to_string().into()])
        .increment(1);
    resp
}

/// Who is calling, as their token says.
struct Caller {
    role: Role,
    token: String,
}

impl Caller {
    async fn of(tokens: &Tokens, req: &Request<Incoming>) -> Result<Caller, ControlError> {
        let authorization = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let role = tokens.role(authorization).await?;
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .trim()
            .to_string();
        Ok(Caller { role, token })
    }

    fn allow(&self, allowed: bool, action: &'static str) -> Result<(), ControlError> {
        if allowed {
            return Ok(());
        }
        Err(ControlError::Forbidden {
            role: self.role.to_string(),
            action: action.to_string(),
        })
    }

    /// Operators only.
    fn admin(&self, action: &'static str) -> Result<(), ControlError> {
        self.allow(self.role == Role::Admin, action)
    }

    /// Operators and proxies.
    fn proxy(&self, action: &'static str) -> Result<(), ControlError> {
        self.allow(matches!(self.role, Role::Admin | Role::Proxy), action)
    }

    /// Operators and `app`'s own token.
    fn owner(&self, app: &Name, action: &'static str) -> Result<(), ControlError> {
        self.allow(self.role.owns(app), action)
    }

    /// Operators, proxies and `app`'s own token.
    fn reader(&self, app: &Name, action: &'static str) -> Result<(), ControlError> {
        self.allow(self.role == Role::Proxy || self.role.owns(app), action)
    }

    /// `info` with the engine login this caller may use, sealed for its token.
    fn present(&self, m: &Manager, mut info: DatabaseInfo) -> DatabaseInfo {
        info.engine_login = m.engine_login(&info, &self.role).map(|login| {
            SealKey::for_bearer(&self.token)
                .seal(&serde_json::to_vec(&login).expect("logins serialise"))
        });
        info
    }
}

async fn route(
    m: &Arc<Manager>,
    tokens: &Tokens,
    req: Request<Incoming>,
    method: &Method,
    path: &str,
) -> Result<Response<Body>, ControlError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    use StatusCode as S;
    let rest = match (method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => {
            let problems = m.health_problems().await;
            return Ok(if problems.is_empty() {
                json(
                    S::OK,
                    &serde_json::json!({"status": "ok", "node_id": m.node_id()}),
                )
            } else {
                json(
                    S::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "unhealthy", "node_id": m.node_id(), "problems": problems}),
                )
            });
        }
        (&Method::GET, ["metrics"]) => {
            m.update_status_gauges();
            return Ok(full(
                S::OK,
                "text/plain; version=0.0.4",
                rouse_runtime::telemetry::render_metrics(),
            ));
        }
        (_, ["api", "v1", rest @ ..]) => rest,
        _ => return Err(not_routed(method, path)),
    };
    // Before routing: an anonymous caller learns nothing, not even which
    // routes exist.
    let caller = Caller::of(tokens, &req).await?;
    let c = &caller;
    Ok(match (method, rest) {
        (&Method::POST, ["tokens"]) => {
            c.admin("create tokens")?;
            let body: CreateToken = read_json(req).await?;
            reply(S::CREATED, tokens.create(&body.role).await)
        }
        (&Method::GET, ["tokens"]) => {
            c.admin("list tokens")?;
            reply(S::OK, tokens.list().await)
        }
        (&Method::DELETE, ["tokens", id]) => {
            c.admin("revoke tokens")?;
            reply(
                S::OK,
                tokens
                    .revoke(id)
                    .await
                    .map(|_| serde_json::json!({"revoked": id})),
            )
        }
        (&Method::POST, ["apps"]) => {
            c.admin("create apps")?;
            let body: CreateApp = read_json(req).await?;
            reply(S::CREATED, m.create_app(&body).await)
        }
        (&Method::DELETE, ["apps", app]) => {
            let app = name(app)?;
            c.admin("delete apps")?;
            let confirm = query_param(&req, "confirm").map(str::to_string);
            let deleted = detached(m, move |m| async move {
                m.delete_app(&app, confirm.as_deref()).await
            })
            .await;
            reply(S::OK, deleted)
        }
        (&Method::POST, ["apps", app, "keys"]) => {
            let app = name(app)?;
            c.owner(&app, "issue keys of this app")?;
            reply(S::CREATED, m.create_key(&app).await)
        }
        (&Method::GET, ["apps", app, "keys"]) => {
            let app = name(app)?;
            c.owner(&app, "list keys of this app")?;
            reply(S::OK, m.list_keys(&app).await)
        }
        (&Method::DELETE, ["apps", app, "keys", id]) => {
            let app = name(app)?;
            c.owner(&app, "revoke keys of this app")?;
            reply(
                S::OK,
                m.revoke_key(&app, id)
                    .await
                    .map(|_| serde_json::json!({"revoked": id})),
            )
        }
        (&Method::POST, ["keys", "verify"]) => {
            c.proxy("verify API keys")?;
            let body: VerifyKey = read_json(req).await?;
            reply(S::OK, m.verify_key(&body.key).await)
        }
        (&Method::POST, ["apps", app, "users"]) => {
            let app = name(app)?;
            c.owner(&app, "create logins of this app")?;
            let body: CreateUser = read_json(req).await?;
            reply(
                S::CREATED,
                m.upsert_user(&app, &body.name, &body.password).await,
            )
        }
        (&Method::DELETE, ["apps", app, "users", user]) => {
            let app = name(app)?;
            c.owner(&app, "remove logins of this app")?;
            let removed = serde_json::json!({"removed": user});
            reply(S::OK, m.delete_user(&app, user).await.map(|_| removed))
        }
        (&Method::GET, ["apps", app, "users", user]) => {
            c.proxy("read login verifiers")?;
            reply(S::OK, m.user(&name(app)?, user).await)
        }
        (&Method::POST, ["databases"]) => {
            let first_access = query_param(&req, "on_first_access") == Some("true");
            let body: CreateDatabase = read_json(req).await?;
            if !(first_access && c.role == Role::Proxy) {
                c.owner(&body.app, "create databases of this app")?;
            }
            // A registration makes control connect to the addresses it
            // names (members, etcd): an operator's act, not a tenant's.
            if body.patroni.is_some() {
                c.admin("register Patroni clusters")?;
            }
            let info = detached(
                m,
                move |m| async move { m.create(&body, first_access).await },
            )
            .await;
            reply(S::CREATED, info.map(|i| c.present(m, i)))
        }
        (&Method::GET, ["databases"]) => {
            let app = match (query_param(&req, "app").map(name).transpose()?, &c.role) {
                (None, Role::App(own)) => Some(own.clone()),
                (app, _) => app,
            };
            match &app {
                Some(app) => c.reader(app, "list databases of this app")?,
                None => c.proxy("list the databases of every app")?,
            }
            reply(
                S::OK,
                m.list(app.as_ref()).await.map(|dbs| DatabaseList {
                    databases: dbs.into_iter().map(|i| c.present(m, i)).collect(),
                }),
            )
        }
        (&Method::GET, ["databases", app, db]) => {
            let key = db_key(app, db)?;
            c.reader(&key.app, "read databases of this app")?;
            reply(S::OK, m.status(&key).await.map(|i| c.present(m, i)))
        }
        (&Method::POST, ["databases", app, db, "wake"]) => {
            let key = db_key(app, db)?;
            c.reader(&key.app, "wake databases of this app")?;
            // How many wakes reach control: proxies coordinate to send one.
            WAKE_REQUESTS.counter([]).increment(1);
            let info = detached(m, move |m| async move { m.wake(&key).await }).await;
            reply(S::OK, info.map(|i| c.present(m, i)))
        }
        (&Method::POST, ["databases", app, db, "hibernate"]) => {
            let force = matches!(query_param(&req, "force"), Some("" | "true" | "1"));
            let key = db_key(app, db)?;
            c.owner(&key.app, "hibernate databases of this app")?;
            let info = detached(m, move |m| async move { m.hibernate(&key, force).await }).await;
            reply(S::OK, info.map(|i| c.present(m, i)))
        }
        (&Method::POST, ["databases", app, db, "backups"]) => {
            let key = db_key(app, db)?;
            c.owner(&key.app, "back up databases of this app")?;
            let made = detached(m, move |m| async move { m.backup_now(&key).await }).await;
            reply(S::CREATED, made)
        }
        (&Method::GET, ["databases", app, db, "backups"]) => {
            let key = db_key(app, db)?;
            c.owner(&key.app, "list backups of this app")?;
            reply(S::OK, m.list_backups(&key).await)
        }
        (&Method::POST, ["databases", app, db, "restore"]) => {
            let key = db_key(app, db)?;
            c.owner(&key.app, "restore databases of this app")?;
            let body: RestoreRequest = read_json(req).await?;
            let restored = detached(m, move |m| async move { m.restore(&key, &body).await }).await;
            reply(
                S::OK,
                restored.map(|r| Restored {
                    database: c.present(m, r.database),
                    ..r
                }),
            )
        }
        (&Method::POST, ["databases", app, db, "pool_mode"]) => {
            let key = db_key(app, db)?;
            c.owner(&key.app, "change databases of this app")?;
            let body: SetPoolMode = read_json(req).await?;
            reply(
                S::OK,
                m.set_pool_mode(&key, body.pool_mode)
                    .await
                    .map(|i| c.present(m, i)),
            )
        }
        (&Method::DELETE, ["databases", app, db]) => {
            let key = db_key(app, db)?;
            c.owner(&key.app, "drop databases of this app")?;
            let dropped = serde_json::json!({"dropped": key.internal()});
            let result = detached(m, move |m| async move { m.drop_database(&key).await }).await;
            reply(S::OK, result.map(|_| dropped))
        }
        (&Method::POST, ["activity"]) => {
            c.proxy("report activity")?;
            let body: ActivityReport = read_json(req).await?;
            reply(
                S::OK,
                m.report_activity(&body)
                    .await
                    .map(|n| serde_json::json!({"accepted": n})),
            )
        }
        (&Method::GET, ["events"]) => {
            c.proxy("follow events")?;
            events(m)
        }
        (&Method::POST, ["cluster", "scale"]) => {
            c.admin("scale the cluster")?;
            let body: ScaleRequest = read_json(req).await?;
            reply(S::OK, m.scale(&body).await)
        }
        (&Method::GET, ["cluster", "engine-ca"]) => {
            c.proxy("read the engine CA")?;
            json(
                S::OK,
                &rouse_control_api::engine_tls::EngineCa {
                    pem: m.engine_ca().to_string(),
                },
            )
        }
        (&Method::GET, ["nodes"]) => {
            c.proxy("list nodes")?;
            reply(S::OK, m.nodes().await)
        }
        (&Method::GET, ["capacity"]) => {
            c.proxy("read capacity")?;
            reply(S::OK, m.capacity().await)
        }
        _ => return Err(not_routed(method, path)),
    })
}

/// Runs a lifecycle operation in a task of its own: a caller that hangs up
/// must not cancel a start or stop halfway.
async fn detached<T, F, Fut>(m: &Arc<Manager>, op: F) -> Result<T, ControlError>
where
    T: Send + 'static,
    F: FnOnce(Arc<Manager>) -> Fut,
    Fut: Future<Output = Result<T, ControlError>> + Send + 'static,
{
    tokio::spawn(op(m.clone())).await.unwrap_or_else(|e| {
        Err(ControlError::Internal(format!(
            "lifecycle task failed: {e}"
        )))
    })
}

fn not_routed(method: &Method, path: &str) -> ControlError {
    ControlError::NotFound(format!("no route for {method} {path}"))
}

/// Server-sent events: one `event: <kind>` per lifecycle event, a comment
/// every few seconds, by which proxies know the stream is alive, and
/// `resync` when a slow reader missed events (it should drop all its cached
/// routes).
fn events(m: &Arc<Manager>) -> Response<Body> {
    let rx = m.subscribe();
    let tick = tokio::time::interval(rouse_control_api::event::KEEP_ALIVE_EVERY);
    let stream = futures::stream::unfold((rx, tick), |(mut rx, mut tick)| async move {
        let chunk = tokio::select! {
            ev = rx.recv() => match ev {
                Ok(ev) => rouse_control_api::event::encode(&ev),
                Err(RecvError::Lagged(n)) => rouse_control_api::event::resync(n),
                Err(RecvError::Closed) => return None,
            },
            _ = tick.tick() => rouse_control_api::event::KEEP_ALIVE.to_string(),
        };
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))),
            (rx, tick),
        ))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}
