//! The stats address (HAProxy's `:7000` place): a page a person would rather
//! look at than read a log (`/`, self-contained, refreshing itself from
//! `/stats.json`), Prometheus text (`/metrics`) and `/healthz`.
//!
//! The page names every tenant: it asks for `proxy.stats_auth` when that is
//! set, and is shown to loopback clients only when it is not. `/metrics`
//! and `/healthz` answer everyone, for scrapers and probes.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use rouse_control_api::{Client, DbKey};
use serde::Serialize;
use serde_json::json;

use crate::activity::Activity;
use crate::http::Body;
use crate::wake::Routes;

const PAGE: &str = include_str!("page.html");

/// (cluster, member, role)
type BackendId = (String, String, String);

/// Check state of every backend the proxy follows (Patroni members, the
/// Redis master).
static BACKENDS: LazyLock<Mutex<BTreeMap<BackendId, BackendState>>> =
    LazyLock::new(Default::default);

#[derive(Debug, Clone, Serialize)]
struct BackendState {
    up: bool,
    /// Unix ms of the last change.
    since: u64,
}

/// Records a backend's check state: in `rouse_backend_up` (HAProxy-style
/// up/down, for alerts) and on the stats page.
pub fn backend_state(cluster: &str, member: &str, role: &'static str, up: bool) {
    metrics::gauge!("rouse_backend_up", "cluster" => cluster.to_string(), "member" => member.to_string(), "role" => role)
        .set(if up { 1.0 } else { 0.0 });
    BACKENDS.lock().expect("backends poisoned").insert(
        (cluster.to_string(), member.to_string(), role.to_string()),
        BackendState {
            up,
            since: crate::activity::now_ms(),
        },
    );
}

/// One wake this proxy waited for.
#[derive(Debug, Clone, Serialize)]
pub struct Wake {
    pub db: String,
    /// Unix ms when it ended.
    pub at: u64,
    pub ms: u64,
    pub ok: bool,
}

/// The last wakes, oldest first.
#[derive(Default)]
pub struct WakeHistory(Mutex<VecDeque<Wake>>);

impl WakeHistory {
    const KEPT: usize = 200;

    pub fn record(&self, db: &DbKey, took: std::time::Duration, ok: bool) {
        let mut h = self.0.lock().expect("wake history poisoned");
        if h.len() == Self::KEPT {
            h.pop_front();
        }
        h.push_back(Wake {
            db: db.internal(),
            at: crate::activity::now_ms(),
            ms: took.as_millis() as u64,
            ok,
        });
    }

    pub fn all(&self) -> Vec<Wake> {
        self.0
            .lock()
            .expect("wake history poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

/// What the page shows, from control (every database), the wake path and
/// this proxy's own counters.
pub struct Stats {
    pub control: Client,
    pub routes: Arc<Routes>,
    pub activity: Arc<Activity>,
    pub proxy_id: String,
    pub started: Instant,
    /// `user:password` the page asks for (`proxy.stats_auth`).
    pub auth: Option<String>,
}

/// Whether a client at `peer` sending `authorization` may see the page.
fn admitted(auth: Option<&str>, peer: IpAddr, authorization: Option<&HeaderValue>) -> Access {
    let Some(expected) = auth else {
        return if peer.is_loopback() {
            Access::Granted
        } else {
            Access::LoopbackOnly
        };
    };
    use base64::Engine as _;
    let given = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        });
    // Compared as digests: the time taken says nothing about the password.
    use sha2::{Digest, Sha256};
    match given {
        Some(given) if Sha256::digest(&given) == Sha256::digest(expected.as_bytes()) => {
            Access::Granted
        }
        _ => Access::Ask,
    }
}

#[derive(Debug, PartialEq)]
enum Access {
    Granted,
    /// 401 with a Basic challenge.
    Ask,
    /// 403: no `stats_auth`, and the client is not on this host.
    LoopbackOnly,
}

impl Stats {
    async fn snapshot(&self) -> serde_json::Value {
        let (databases, control_error) = match self.control.list_databases(None).await {
            Ok(list) => (list.databases, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let waiting = self.routes.waiting_counts();
        let local = self.activity.totals();
        let databases: Vec<serde_json::Value> = databases
            .iter()
            .map(|d| {
                let key = DbKey::new(d.app.clone(), d.name.clone());
                let (requests, open_here) = local.get(&key).copied().unwrap_or_default();
                json!({
                    "app": d.app,
                    "name": d.name,
                    "engine": d.engine,
                    "status": d.status,
                    "reason": d.reason,
                    "replication_factor": d.replication_factor,
                    "replicas": d.endpoints,
                    "open_sessions": d.open_sessions,
                    "open_here": open_here,
                    "waiting": waiting.get(&key).copied().unwrap_or(0),
                    "requests": requests,
                    "last_wake_ms": d.last_wake_ms,
                    "last_activity": d.last_activity,
                    "pool_mode": d.pool_mode,
                })
            })
            .collect();
        let backends: Vec<serde_json::Value> = BACKENDS
            .lock()
            .expect("backends poisoned")
            .iter()
            .map(|((cluster, member, role), s)| {
                json!({"cluster": cluster, "member": member, "role": role, "up": s.up, "since": s.since})
            })
            .collect();
        json!({
            "proxy": {
                "id": self.proxy_id,
                "uptime_s": self.started.elapsed().as_secs(),
                "now": crate::activity::now_ms(),
            },
            "control_error": control_error,
            "databases": databases,
            "backends": backends,
            "wakes": self.routes.wake_history(),
        })
    }

    /// Serves the stats address.
    pub async fn handle(
        self: Arc<Self>,
        peer: IpAddr,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let path = req.uri().path();
        let access = match path {
            "/" | "/stats.json" => admitted(
                self.auth.as_deref(),
                peer,
                req.headers().get(hyper::header::AUTHORIZATION),
            ),
            _ => Access::Granted,
        };
        let (status, content_type, body) = match (access, path) {
            (Access::Ask, _) => (
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "the stats page needs the user and password of proxy.stats_auth\n".to_string(),
            ),
            (Access::LoopbackOnly, _) => (
                StatusCode::FORBIDDEN,
                "text/plain",
                "the stats page is shown to this host only: set proxy.stats_auth to show it elsewhere\n"
                    .to_string(),
            ),
            (Access::Granted, path) => match path {
            "/" => (StatusCode::OK, "text/html; charset=utf-8", PAGE.to_string()),
            "/stats.json" => (
                StatusCode::OK,
                "application/json",
                self.snapshot().await.to_string(),
            ),
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                rouse_runtime::telemetry::render_metrics(),
            ),
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_string(),
            ),
            },
        };
        let mut resp = Response::new(Full::new(body.into()));
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"rouse stats\""),
            );
        }
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        resp.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_states_are_kept_by_cluster_member_and_role() {
        backend_state("pillar", "pg1", "primary", true);
        backend_state("pillar", "pg1", "primary", false);
        backend_state("pillar", "pg1", "replica", true);
        let b = BACKENDS.lock().unwrap();
        let key = |role: &str| ("pillar".to_string(), "pg1".to_string(), role.to_string());
        assert!(!b[&key("primary")].up);
        assert!(b[&key("replica")].up);
    }

    #[test]
    fn the_page_needs_stats_auth_or_a_local_client() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let basic = |s: &str| {
            use base64::Engine as _;
            HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            ))
            .unwrap()
        };
        assert_eq!(admitted(None, local, None), Access::Granted);
        assert_eq!(admitted(None, remote, None), Access::LoopbackOnly);
        let auth = Some("ops:s3cret");
        assert_eq!(
            admitted(auth, local, None),
            Access::Ask,
            "loopback is no password"
        );
        assert_eq!(
            admitted(auth, remote, Some(&basic("ops:s3cret"))),
            Access::Granted
        );
        assert_eq!(
            admitted(auth, remote, Some(&basic("ops:wrong"))),
            Access::Ask
        );
        assert_eq!(
            admitted(auth, remote, Some(&HeaderValue::from_static("Basic !!"))),
            Access::Ask
        );
    }

    #[test]
    fn the_page_is_self_contained() {
        // Works offline: nothing is fetched from elsewhere.
        for outside in ["http://", "https://", "//cdn", "<link"] {
            assert!(!PAGE.contains(outside), "the page refers to {outside}");
        }
        assert!(PAGE.contains("stats.json"));
    }
}
