//! The rqlite HTTP API, passed through with every query parameter to the
//! database's leader. `/status` and `/nodes` name the proxy as `api_addr`,
//! so that clients with cluster discovery keep talking to the proxy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};
use rouse_control_api::DbKey;
use serde_json::{json, Value};

use super::{read_body, Body, Proxy};
use crate::error::Result;

const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) async fn handle(
    proxy: &Arc<Proxy>,
    key: &DbKey,
    path: &str,
    prefix: &str,
    host: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let _in_flight = proxy.activity.begin(key);
    let method = req.method().clone();
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
    let body = if reply.status.is_success() && (path == "/status" || path == "/nodes") {
        let own_addr = host.map_or_else(|| proxy.config.http_addr.to_string(), str::to_string);
        reduce(
            path,
            &reply.body,
            &format!("http://{own_addr}{prefix}"),
            &own_addr,
        )
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
    Ok(resp)
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
