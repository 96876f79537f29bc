//! The leg to rqlite: a pooled HTTP/1.1 client that tries the leader first,
//! moves on to the other replicas when one refuses connections (a follower
//! forwards to the leader), follows a follower's redirect to the leader
//! itself (re-sending the body), and retries while the cluster elects.
//!
//! Engines whose HTTP API speaks TLS (rqlite across nodes) are reached over
//! TLS checked against the cluster CA, which the proxy learns from control.
//!
//! Each database's engines know only that database's login: an engine that
//! refuses it (401) is not the database this route is for (a stale or
//! forged endpoint, a port taken over by another database), so its answer
//! is never served and the route counts as stale.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::metrics::ENGINE_LOGIN_REFUSALS;
use crate::resolve::Target;

pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) content_type: Option<HeaderValue>,
    pub(crate) body: Bytes,
}

#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// No replica answered: the route is stale.
    Unreachable(String),
    Timeout,
    Failed(String),
    /// The route could not be resolved again after a stale one.
    Route(crate::error::ProxyError),
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub(crate) struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    /// To engines over TLS; made once the engine CA is known.
    tls: OnceLock<HttpsClient>,
}

/// Redirects followed inside the proxy before giving up.
const MAX_HOPS: usize = 3;
/// Pause between tries while the cluster has no leader.
const ELECTION_RETRY: Duration = Duration::from_millis(50);

/// rqlite answers 503, or 500 "leader not found", while its cluster elects
/// a leader: worth another try shortly.
fn electing(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE
        || (status == StatusCode::INTERNAL_SERVER_ERROR && body.starts_with(b"leader not found"))
}

fn connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_nodelay(true);
    connector
}

fn pooled() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(512);
    builder
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            client: pooled().build(connector()),
            tls: OnceLock::new(),
        }
    }
}

impl Upstream {
    /// Engines over TLS are checked against this configuration (see
    /// `rouse_control_api::engine_tls`) from now on.
    pub(crate) fn trust_engines(&self, config: Arc<rustls::ClientConfig>) {
        let mut http = connector();
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*config).clone())
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let _ = self.tls.set(pooled().build(https));
    }

    async fn request(
        &self,
        tls: bool,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, UpstreamError> {
        let sent = if tls {
            match self.tls.get() {
                Some(client) => client.request(req).await,
                None => {
                    return Err(UpstreamError::Unreachable(
                        "the engines speak TLS and the proxy does not know their CA yet".into(),
                    ))
                }
            }
        } else {
            self.client.request(req).await
        };
        sent.map_err(|e| UpstreamError::Unreachable(e.to_string()))
    }

    /// Sends one request to the database, by the rules above, until `deadline`.
    pub(crate) async fn send(
        &self,
        target: &Target,
        method: &Method,
        path_and_query: &str,
        content_type: Option<&HeaderValue>,
        body: Bytes,
        deadline: Instant,
    ) -> Result<Reply, UpstreamError> {
        let (endpoints, login) = (&target.endpoints[..], target.login.as_ref());
        if endpoints.is_empty() {
            return Err(UpstreamError::Unreachable("no endpoints".into()));
        }
        // The replicas of one database all speak TLS or none does.
        let tls = endpoints.iter().any(|e| e.tls);
        let scheme = if tls { "https" } else { "http" };
        let mut next = 0usize;
        let mut redirected: Option<String> = None;
        let mut hops = 0;
        let mut refused = 0;
        loop {
            let addr = match redirected.take() {
                Some(a) => a,
                None => endpoints[next % endpoints.len()].addr(),
            };
            let mut req = Request::builder()
                .method(method.clone())
                .uri(format!("{scheme}://{addr}{path_and_query}"));
            if let Some(ct) = content_type {
                req = req.header(CONTENT_TYPE, ct.clone());
            }
            if let Some(login) = login {
                req = req.header(hyper::header::AUTHORIZATION, login.clone());
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| UpstreamError::Failed(e.to_string()))?;
            let resp = match tokio::time::timeout_at(deadline, self.request(tls, req)).await {
                Err(_) => return Err(UpstreamError::Timeout),
                // Refused, a pooled connection to a replica that died, or a
                // certificate not of the cluster CA: no answer came, so the
                // next replica gets the request.
                Ok(Err(e)) => {
                    refused += 1;
                    next += 1;
                    if refused >= endpoints.len() {
                        return Err(e);
                    }
                    continue;
                }
                Ok(Ok(resp)) => resp,
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED {
                ENGINE_LOGIN_REFUSALS.counter([]).increment(1);
                tracing::warn!(engine = %addr, "an engine refused this database's login: not serving its answer");
                refused += 1;
                next += 1;
                if refused >= endpoints.len() {
                    return Err(UpstreamError::Unreachable(format!(
                        "the engine at {addr} is not this database"
                    )));
                }
                continue;
            }
            refused = 0;
            if status.is_redirection() && hops < MAX_HOPS {
                let target = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| l.parse::<hyper::Uri>().ok())
                    .and_then(|u| u.authority().map(|a| a.to_string()));
                // Only ever towards a replica of this database.
                if let Some(a) = target.filter(|a| endpoints.iter().any(|e| e.addr() == *a)) {
                    hops += 1;
                    redirected = Some(a);
                    continue;
                }
            }
            let content_type = resp.headers().get(CONTENT_TYPE).cloned();
            let body = match tokio::time::timeout_at(deadline, resp.into_body().collect()).await {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Err(e)) => return Err(UpstreamError::Failed(e.to_string())),
                Ok(Ok(b)) => b.to_bytes(),
            };
            if electing(status, &body) && Instant::now() + ELECTION_RETRY < deadline {
                tokio::time::sleep(ELECTION_RETRY).await;
                next += 1;
                continue;
            }
            return Ok(Reply {
                status,
                content_type,
                body,
            });
        }
    }
}
