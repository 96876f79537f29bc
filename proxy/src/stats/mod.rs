//! The stats address (HAProxy's `:7000` place): a page a person would rather
//! look at than read a log (`/`, self-contained, refreshing itself from
//! `/stats.json`), Prometheus text (`/metrics`) and `/healthz`.
//!
//! The page names every tenant: it asks for `proxy.stats_auth` when that is
//! set, and is shown to loopback clients only when it is not. `/metrics`
//! and `/healthz` answer everyone, for scrapers and probes.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use rouse_control_api::{Client, DbKey};
use serde_json::json;

use crate::activity::Activity;
use crate::health::Health;
use crate::http::Body;
use crate::resolve::Resolver;

const PAGE: &str = include_str!("page.html");

/// What the page shows, from control (every database), the wake path and
/// this proxy's own counters.
pub(crate) struct Stats {
    pub(crate) control: Client,
    pub(crate) resolver: Arc<Resolver>,
    pub(crate) activity: Arc<Activity>,
    pub(crate) health: Arc<Health>,
    pub(crate) proxy_id: String,
    pub(crate) started: Instant,
    /// `user:password` the page asks for (`proxy.stats_auth`).
    pub(crate) auth: Option<String>,
    /// The background loops; `/healthz` fails while one is down.
    pub(crate) loops: Arc<rouse_runtime::tasks::Tasks>,
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
        let waiting = self.resolver.waiting_counts();
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
                    "last_backup": d.last_backup,
                    "pool_mode": d.pool_mode,
                })
            })
            .collect();
        let capacity = self
            .control
            .capacity()
            .await
            .map(|c| c.nodes)
            .unwrap_or_default();
        let backends = self.health.backends();
        json!({
            "proxy": {
                "id": self.proxy_id,
                "uptime_s": self.started.elapsed().as_secs(),
                "now": rouse_runtime::clock::now_ms(),
            },
            "control_error": control_error,
            "databases": databases,
            "backends": backends,
            "wakes": self.resolver.wake_history(),
            "capacity": capacity,
        })
    }

    /// Serves the stats address.
    pub(crate) async fn handle(
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
            "/healthz" => match self.loops.dead() {
                dead if dead.is_empty() => (StatusCode::OK, "text/plain", "ok\n".to_string()),
                dead => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("background loops not running: {}\n", dead.join(", ")),
                ),
            },
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
