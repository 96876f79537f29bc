//! The rqlite HTTP API, passed through with every query parameter to the
//! database's leader. `/status` and `/nodes` name the proxy as `api_addr`,
//! so that clients with cluster discovery keep talking to the proxy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use rouse_control_api::{DatabaseStatus, DbKey};
use serde_json::{json, Value};

use super::upstream::{Reply, UpstreamError};
use super::{read_body, Body, Proxy};
use crate::error::{ProxyError, Result};
use crate::resolve::Probe;

const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// A health probe gets a quick answer or an error.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a probe asks again about a database that stopped answering.
const PROBE_RETRY: Duration = Duration::from_millis(100);

pub(crate) async fn handle(
    proxy: &Arc<Proxy>,
    key: &DbKey,
    path: &str,
    prefix: &str,
    host: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let method = req.method().clone();
    let own_addr = host.map_or_else(|| proxy.config.http_addr.to_string(), str::to_string);
    let own = Own {
        addr: &own_addr,
        url: &format!("http://{own_addr}{prefix}"),
    };
    if method == Method::GET && matches!(path, "/readyz" | "/status") {
        let path_and_query = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        if let Some(answer) = probe(proxy, key, path, &path_and_query, &own).await? {
            return Ok(answer);
        }
    }
    let _in_flight = proxy.activity.begin(key);
    let carries_sql = matches!(path, "/db/execute" | "/db/query" | "/db/request");
    let query = match req.uri().query() {
        Some(q) if carries_sql => Some(crate::sql::checked_query(q)?),
        other => other.map(str::to_string),
    };
    let path_and_query = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let content_type = req.headers().get(CONTENT_TYPE).cloned();
    let mut body = read_body(proxy, req).await?;
    if carries_sql {
        body = crate::sql::checked_body(&body)?;
    }
    let transaction = path == "/db/request"
        || query.as_deref().is_some_and(|q| {
            q.split('&')
                .any(|p| p == "transaction" || p.starts_with("transaction="))
        });
    let timeout = if transaction {
        TRANSACTION_TIMEOUT
    } else {
        QUERY_TIMEOUT
    };
    let reply = proxy
        .send(
            key,
            &method,
            &path_and_query,
            content_type.as_ref(),
            body,
            timeout,
        )
        .await?;
    Ok(respond(path, reply, &own))
}

/// The proxy's own address, which clients are told instead of the engines'.
struct Own<'a> {
    addr: &'a str,
    /// With the path prefix that chose the database.
    url: &'a str,
}

/// A health probe (`GET /readyz`, `/status`): answered without waking the
/// database and without counting as activity, so monitoring never keeps a
/// tenant awake. A database that is not running is described from what
/// control says of it; one that does not exist is left to the usual path
/// (created on first access where the app allows it), so `None`.
async fn probe(
    proxy: &Arc<Proxy>,
    key: &DbKey,
    path: &str,
    path_and_query: &str,
    own: &Own<'_>,
) -> Result<Option<Response<Body>>> {
    // A database being put to sleep stops answering a moment before
    // control says it sleeps: asked again until then, it is told as
    // asleep; one that control still calls running after the probe's time
    // is down.
    let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
    loop {
        let target = match proxy.resolver.probe(key).await {
            Ok(Probe::Running(target)) => target,
            Ok(Probe::Asleep { engine, status }) => {
                super::rqlite_only(key, engine)?;
                return Ok(Some(asleep(path, status, own)));
            }
            Err(ProxyError::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        super::rqlite_only(key, target.engine)?;
        let sent = proxy
            .upstream
            .send(
                &target,
                &Method::GET,
                path_and_query,
                None,
                Bytes::new(),
                deadline,
            )
            .await;
        let reason = match sent {
            Ok(reply) => return Ok(Some(respond(path, reply, own))),
            Err(UpstreamError::Unreachable(_)) if tokio::time::Instant::now() < deadline => {
                proxy.resolver.invalidate(key);
                tokio::time::sleep(PROBE_RETRY).await;
                continue;
            }
            Err(UpstreamError::Route(e)) => return Err(e),
            Err(UpstreamError::Timeout) => {
                return Err(ProxyError::UpstreamTimeout(key.db.to_string()))
            }
            Err(UpstreamError::Unreachable(reason) | UpstreamError::Failed(reason)) => reason,
        };
        return Err(ProxyError::Backend {
            db: key.db.to_string(),
            reason,
        });
    }
}

/// What a probe of a database that is not running is told: the proxy
/// serves it (it wakes on first use), so `/readyz` is 200 and `/status`
/// names the proxy as leader; both say what the database is doing.
fn asleep(path: &str, status: DatabaseStatus, own: &Own<'_>) -> Response<Body> {
    let status_name = serde_json::to_value(status).expect("a status serialises");
    let status_name = status_name.as_str().unwrap_or("unknown");
    let failed = status == DatabaseStatus::Failed;
    let (content_type, body) = if path == "/readyz" {
        let line = if failed {
            "[-]database failed: it is woken again on use\n".to_string()
        } else {
            format!("[+]node ok\n[+]database {status_name}: it wakes on use\n")
        };
        ("text/plain; charset=utf-8", Bytes::from(line))
    } else {
        let doc = json!({
            "http": {"bind_addr": own.addr},
            "store": {"ready": !failed, "leader": {"addr": own.addr}},
            "rouse": {"status": status_name, "wakes_on_use": true},
        });
        (
            "application/json",
            Bytes::from(serde_json::to_vec(&doc).expect("JSON values serialise")),
        )
    };
    let mut resp = Response::new(Full::new(body));
    if failed {
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The engine's answer as the client gets it: `/status` and `/nodes`
/// reduced and naming the proxy.
fn respond(path: &str, reply: Reply, own: &Own<'_>) -> Response<Body> {
    let body = if reply.status.is_success() && (path == "/status" || path == "/nodes") {
        reduce(path, &reply.body, own.url, own.addr)
    } else {
        reply.body
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = reply.status;
    if let Some(ct) = reply.content_type {
        resp.headers_mut().insert(CONTENT_TYPE, ct);
    } else {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    resp
}

/// `/status` and `/nodes` reduced to what rqlite clients read: the
/// version, readiness, which member leads, and every address the proxy's
/// own (so clients with cluster discovery stay on the proxy). Paths,
/// executables, the OS and Raft addresses stay inside.
fn reduce(path: &str, body: &Bytes, own_url: &str, own_addr: &str) -> Bytes {
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return Bytes::from_static(b"{}");
    };
    let reduced = if path == "/status" {
        let store = &doc["store"];
        json!({
            "build": {"version": doc["build"]["version"]},
            "http": {"bind_addr": own_addr},
            "store": {
                "ready": store["ready"],
                "leader": {"node_id": store["leader"]["node_id"], "addr": own_addr},
            },
        })
    } else {
        reduce_nodes(&doc, own_url, own_addr)
    };
    Bytes::from(serde_json::to_vec(&reduced).expect("JSON values serialise"))
}

/// Both `/nodes` forms: `{"<id>": node}` and `{"nodes": [node]}` (`ver=2`).
fn reduce_nodes(doc: &Value, own_url: &str, own_addr: &str) -> Value {
    let node = |n: &Value| {
        let mut out = serde_json::Map::new();
        for field in ["id", "leader", "reachable", "voter"] {
            if let Some(v) = n.get(field) {
                out.insert(field.to_string(), v.clone());
            }
        }
        out.insert("api_addr".into(), Value::String(own_url.to_string()));
        out.insert("addr".into(), Value::String(own_addr.to_string()));
        Value::Object(out)
    };
    match doc {
        Value::Object(map) => match map.get("nodes") {
            Some(Value::Array(nodes)) => {
                json!({"nodes": nodes.iter().map(node).collect::<Vec<_>>()})
            }
            _ => Value::Object(map.iter().map(|(id, n)| (id.clone(), node(n))).collect()),
        },
        _ => json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_nodes_keep_what_clients_use_and_nothing_of_the_host() {
        let status = Bytes::from(
            r#"{"build":{"version":"v8.26.8","path":"/opt/x"},"os":{"executable":"/opt/rqlited","hostname":"h"},
                "store":{"dir":"/data/shop_users","ready":true,"leader":{"node_id":"node-0","addr":"127.0.0.1:7001"},
                "sqlite3":{"path":"/data/shop_users/db.sqlite"}},"http":{"bind_addr":"127.0.0.1:5001"}}"#,
        );
        let out = reduce("/status", &status, "http://proxy:8080/a/b", "proxy:8080");
        let text = String::from_utf8_lossy(&out);
        for leak in ["/opt", "/data", "7001", "5001", "hostname"] {
            assert!(!text.contains(leak), "{leak} in {text}");
        }
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["build"]["version"], "v8.26.8");
        assert_eq!(out["store"]["leader"]["node_id"], "node-0");
        assert_eq!(out["store"]["ready"], true);

        for nodes in [
            r#"{"nodes":[{"id":"node-0","api_addr":"http://127.0.0.1:5001","addr":"127.0.0.1:7001","leader":true,"reachable":true,"voter":true,"time":0.1}]}"#,
            r#"{"node-0":{"id":"node-0","api_addr":"http://127.0.0.1:5001","addr":"127.0.0.1:7001","leader":true,"reachable":true}}"#,
        ] {
            let out = reduce(
                "/nodes",
                &Bytes::from(nodes),
                "http://proxy:8080/a/b",
                "proxy:8080",
            );
            let out: Value = serde_json::from_slice(&out).unwrap();
            let node = if out["nodes"].is_array() {
                &out["nodes"][0]
            } else {
                &out["node-0"]
            };
            assert_eq!(node["api_addr"], "http://proxy:8080/a/b");
            assert_eq!(node["addr"], "proxy:8080");
            assert_eq!(node["leader"], true);
            assert!(!out.to_string().contains("127.0.0.1"), "{out}");
        }
    }
}
