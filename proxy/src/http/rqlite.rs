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
use serde_json::Value;

use super::{read_body, Body, Proxy};
use crate::error::Result;

const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn handle(
    proxy: &Arc<Proxy>,
    key: &DbKey,
    path: &str,
    prefix: &str,
    host: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let _in_flight = proxy.activity.begin(key);
    let method = req.method().clone();
    let query = req.uri().query().map(str::to_string);
    let path_and_query = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let content_type = req.headers().get(CONTENT_TYPE).cloned();
    let body = read_body(proxy, req).await?;
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
        let own = match host {
            Some(h) => format!("http://{h}{prefix}"),
            None => format!("http://{}{prefix}", proxy.config.http_addr),
        };
        rewrite_api_addr(&reply.body, &own)
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

/// Every `api_addr` in the document becomes the proxy's own address.
fn rewrite_api_addr(body: &Bytes, own: &str) -> Bytes {
    fn walk(v: &mut Value, own: &str) {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    if k == "api_addr" && child.is_string() {
                        *child = Value::String(own.to_string());
                    } else {
                        walk(child, own);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|c| walk(c, own)),
            _ => {}
        }
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(mut doc) => {
            walk(&mut doc, own);
            Bytes::from(serde_json::to_vec(&doc).unwrap_or_default())
        }
        Err(_) => body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_addr_is_rewritten_everywhere() {
        let body = Bytes::from(
            r#"{"nodes":[{"id":"node-0","api_addr":"http://127.0.0.1:5001","addr":"127.0.0.1:7001"}],"x":{"api_addr":"http://a"}}"#,
        );
        let out: Value =
            serde_json::from_slice(&rewrite_api_addr(&body, "http://proxy:8080")).unwrap();
        assert_eq!(out["nodes"][0]["api_addr"], "http://proxy:8080");
        assert_eq!(out["nodes"][0]["addr"], "127.0.0.1:7001");
        assert_eq!(out["x"]["api_addr"], "http://proxy:8080");
    }
}
