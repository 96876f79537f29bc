//! The leg to rqlite: an HTTP/1.1 client of rouse's own (decision 0018;
//! connections in `connection.rs`, the answer's framing in `answer.rs`)
//! that tries the leader first, moves on to the other replicas when one
//! refuses connections (a follower forwards to the leader), follows a
//! follower's redirect to the leader itself (re-sending the body), and
//! retries while the cluster elects.
//!
//! Engines whose HTTP API speaks TLS (rqlite across nodes) are reached over
//! TLS checked against the cluster CA, which the proxy learns from control.
//!
//! Each database's engines know only that database's login: an engine that
//! refuses it (401) is not the database this route is for (a stale or
//! forged endpoint, a port taken over by another database), so its answer
//! is never served and the route counts as stale.

pub(crate) mod answer;
mod connection;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::metrics::ENGINE_LOGIN_REFUSALS;
use crate::resolve::Target;
use connection::{Answer, Connection, ExchangeError, Pool};

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

#[derive(Default)]
pub(crate) struct Upstream {
    idle: Pool,
    /// To engines over TLS; set once the engine CA is known.
    tls: OnceLock<TlsConnector>,
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

/// One request's head, as it goes to every engine tried.
struct RequestHead<'a> {
    method: &'a Method,
    path_and_query: &'a str,
    content_type: Option<&'a HeaderValue>,
    login: Option<&'a HeaderValue>,
}

impl RequestHead<'_> {
    /// The request line and headers. Every part is checked already (a
    /// parsed URI, header values), so this refuses only what would let one
    /// request be read as two.
    fn encode(&self, addr: &str, body_len: usize) -> Result<Vec<u8>, UpstreamError> {
        let unsafe_byte = |s: &str| s.bytes().any(|b| b <= b' ' || b == 0x7f);
        if unsafe_byte(self.path_and_query) || unsafe_byte(addr) {
            return Err(UpstreamError::Failed(
                "a request target with spaces or controls".into(),
            ));
        }
        let mut head = Vec::with_capacity(256);
        for part in [
            self.method.as_str(),
            " ",
            self.path_and_query,
            " HTTP/1.1\r\nHost: ",
            addr,
        ] {
            head.extend_from_slice(part.as_bytes());
        }
        for (name, value) in [
            ("\r\nContent-Type: ", self.content_type),
            ("\r\nAuthorization: ", self.login),
        ] {
            if let Some(value) = value {
                head.extend_from_slice(name.as_bytes());
                head.extend_from_slice(value.as_bytes());
            }
        }
        if body_len > 0 || !matches!(*self.method, Method::GET | Method::HEAD) {
            head.extend_from_slice(b"\r\nContent-Length: ");
            head.extend_from_slice(body_len.to_string().as_bytes());
        }
        head.extend_from_slice(b"\r\n\r\n");
        Ok(head)
    }
}

impl Upstream {
    /// Engines over TLS are checked against this configuration (see
    /// `rouse_control_api::engine_tls`) from now on.
    pub(crate) fn trust_engines(&self, config: Arc<rustls::ClientConfig>) {
        let _ = self.tls.set(TlsConnector::from(config));
    }

    /// One exchange with the engine at `addr`: on an idle connection when
    /// there is one (a fresh one if that had been closed meanwhile), else
    /// on a new one, which is kept for the next request.
    async fn exchange(
        &self,
        tls: bool,
        addr: &str,
        head: &RequestHead<'_>,
        body: &[u8],
    ) -> Result<Answer, UpstreamError> {
        let connector = match (tls, self.tls.get()) {
            (false, _) => None,
            (true, Some(connector)) => Some(connector),
            (true, None) => {
                return Err(UpstreamError::Unreachable(
                    "the engines speak TLS and the proxy does not know their CA yet".into(),
                ))
            }
        };
        let head_only = *head.method == Method::HEAD;
        if let Some(mut conn) = self.idle.take(addr, tls) {
            match conn
                .exchange(head.encode(addr, body.len())?, body, head_only)
                .await
            {
                Ok((answer, reusable)) => return Ok(self.keep(addr, tls, conn, reusable, answer)),
                Err(ExchangeError::NoAnswer(_)) => {}
                Err(e @ ExchangeError::Broken(_)) => {
                    return Err(UpstreamError::Failed(e.to_string()))
                }
            }
        }
        let mut conn = Connection::open(addr, connector)
            .await
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        match conn
            .exchange(head.encode(addr, body.len())?, body, head_only)
            .await
        {
            Ok((answer, reusable)) => Ok(self.keep(addr, tls, conn, reusable, answer)),
            Err(e @ ExchangeError::NoAnswer(_)) => Err(UpstreamError::Unreachable(e.to_string())),
            Err(e @ ExchangeError::Broken(_)) => Err(UpstreamError::Failed(e.to_string())),
        }
    }

    fn keep(
        &self,
        addr: &str,
        tls: bool,
        conn: Connection,
        reusable: bool,
        answer: Answer,
    ) -> Answer {
        if reusable {
            self.idle.put(addr, tls, conn);
        }
        answer
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
        let head = RequestHead {
            method,
            path_and_query,
            content_type,
            login,
        };
        let mut next = 0usize;
        let mut redirected: Option<String> = None;
        let mut hops = 0;
        let mut refused = 0;
        loop {
            let addr = match redirected.take() {
                Some(a) => a,
                None => endpoints[next % endpoints.len()].addr(),
            };
            let answer =
                match tokio::time::timeout_at(deadline, self.exchange(tls, &addr, &head, &body))
                    .await
                {
                    Err(_) => return Err(UpstreamError::Timeout),
                    // Refused, a replica that died, or a certificate not of the
                    // cluster CA: no answer came, so the next replica gets the
                    // request.
                    Ok(Err(e @ UpstreamError::Unreachable(_))) => {
                        refused += 1;
                        next += 1;
                        if refused >= endpoints.len() {
                            return Err(e);
                        }
                        continue;
                    }
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(answer)) => answer,
                };
            let status = answer.status;
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
                let target = answer
                    .location
                    .as_deref()
                    .and_then(|l| l.parse::<hyper::Uri>().ok())
                    .and_then(|u| u.authority().map(|a| a.to_string()));
                // Only ever towards a replica of this database.
                if let Some(a) = target.filter(|a| endpoints.iter().any(|e| e.addr() == *a)) {
                    hops += 1;
                    redirected = Some(a);
                    continue;
                }
            }
            if electing(status, &answer.body) && Instant::now() + ELECTION_RETRY < deadline {
                tokio::time::sleep(ELECTION_RETRY).await;
                next += 1;
                continue;
            }
            return Ok(Reply {
                status,
                content_type: answer.content_type,
                body: answer.body,
            });
        }
    }
}
