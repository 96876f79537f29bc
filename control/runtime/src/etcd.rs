//! The only code that talks to etcd, for both daemons (the proxy follows
//! Patroni clusters of its configuration, control those registered with
//! it): it reads the members Patroni keeps under
//! `<namespace>/<scope>/members/` (the v3 API's JSON gateway), as confd
//! does to write HAProxy's configuration. Whatever etcd holds is
//! checked like any other input: bounded in size and count, each member's
//! addresses parsed strictly, a member that does not parse left out.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rouse_control_api::PatroniMember;
use serde::Deserialize;

/// At most this many members are read; an answer this size is plenty.
const MAX_MEMBERS: i64 = 64;
const MAX_ANSWER: usize = 1 << 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoint}: {reason}")]
    Unavailable { endpoint: String, reason: String },
    #[error("no etcd endpoint answered")]
    NoEndpoint,
}

/// One cluster's members in etcd.
pub struct Members {
    endpoints: Vec<String>,
    /// `<namespace>/<scope>/members/`.
    prefix: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Deserialize)]
struct RangeAnswer {
    #[serde(default)]
    kvs: Vec<KeyValue>,
}

#[derive(Deserialize)]
struct KeyValue {
    key: String,
    #[serde(default)]
    value: String,
}

/// What Patroni writes for a member.
#[derive(Deserialize)]
struct MemberValue {
    conn_url: String,
    api_url: String,
}

impl Members {
    pub fn new(endpoints: &[String], prefix: String) -> Members {
        Members {
            endpoints: endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            prefix,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The members now, sorted by name; the first endpoint that answers
    /// is believed.
    pub async fn read(&self) -> Result<Vec<PatroniMember>, EtcdError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = serde_json::json!({
            "key": b64.encode(&self.prefix),
            "range_end": b64.encode(range_end(&self.prefix)),
            "limit": MAX_MEMBERS,
        });
        let mut last = EtcdError::NoEndpoint;
        for endpoint in &self.endpoints {
            match self.range(endpoint, &body).await {
                Ok(answer) => return Ok(members(&self.prefix, answer).await),
                Err(reason) => {
                    last = EtcdError::Unavailable {
                        endpoint: endpoint.clone(),
                        reason,
                    }
                }
            }
        }
        Err(last)
    }

    async fn range(&self, endpoint: &str, body: &serde_json::Value) -> Result<RangeAnswer, String> {
        let req = hyper::Request::post(format!("{endpoint}/v3/kv/range"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let bytes = tokio::time::timeout(
            REQUEST_TIMEOUT,
            Limited::new(resp.into_body(), MAX_ANSWER).collect(),
        )
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())?
        .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| format!("unreadable answer: {e}"))
    }
}

/// The end of the key range that holds every key starting with `prefix`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The members in a range answer: name from the key, PostgreSQL address
/// from `conn_url`, REST API from `api_url`.
async fn members(prefix: &str, answer: RangeAnswer) -> Vec<PatroniMember> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    for kv in answer.kvs {
        let (Ok(key), Ok(value)) = (b64.decode(&kv.key), b64.decode(&kv.value)) else {
            continue;
        };
        let Some(name) = String::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(prefix).map(str::to_string))
            .filter(|n| valid_name(n))
        else {
            continue;
        };
        let Ok(member) = serde_json::from_slice::<MemberValue>(&value) else {
            tracing::warn!(member = %name, "unreadable Patroni member in etcd: left out");
            continue;
        };
        match member_of(name.clone(), &member).await {
            Some(m) => out.push(m),
            None => {
                tracing::warn!(member = %name, "Patroni member in etcd with unusable URLs: left out")
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

async fn member_of(name: String, value: &MemberValue) -> Option<PatroniMember> {
    let authority = |url: &str, scheme: &str| -> Option<String> {
        let rest = url.strip_prefix(scheme)?;
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        Some(rest[..end].to_string()).filter(|a| !a.is_empty())
    };
    let pg = authority(&value.conn_url, "postgres://")
        .or_else(|| authority(&value.conn_url, "postgresql://"))?;
    let addr = tokio::net::lookup_host(pg).await.ok()?.next()?;
    // Patroni names its `/patroni` endpoint; the checks want the base.
    let api = authority(&value.api_url, "http://")?;
    Some(PatroniMember {
        name,
        addr,
        api: format!("http://{api}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(entries: &[(&str, &str)]) -> RangeAnswer {
        let b64 = base64::engine::general_purpose::STANDARD;
        RangeAnswer {
            kvs: entries
                .iter()
                .map(|(k, v)| KeyValue {
                    key: b64.encode(k),
                    value: b64.encode(v),
                })
                .collect(),
        }
    }

    #[test]
    fn the_range_ends_after_every_key_of_the_prefix() {
        assert_eq!(range_end("/service/a/members/"), b"/service/a/members0");
        assert_eq!(range_end("a\u{7f}"), b"a\x80");
    }

    #[tokio::test]
    async fn members_are_read_from_what_patroni_writes_and_bad_ones_left_out() {
        let prefix = "/service/pillar/members/";
        let got = members(
            prefix,
            answer(&[
                (
                    "/service/pillar/members/pg1",
                    r#"{"conn_url":"postgres://127.0.0.1:5432/postgres","api_url":"http://127.0.0.1:8008/patroni","role":"master"}"#,
                ),
                (
                    "/service/pillar/members/pg0",
                    r#"{"conn_url":"postgresql://u:p@127.0.0.2:6432/postgres?x=1","api_url":"http://127.0.0.2:8009/patroni"}"#,
                ),
                ("/service/pillar/members/junk", "not json"),
                (
                    "/service/pillar/members/../x",
                    r#"{"conn_url":"postgres://127.0.0.1:1/p","api_url":"http://127.0.0.1:1/patroni"}"#,
                ),
                (
                    "/service/pillar/members/noport",
                    r#"{"conn_url":"postgres://127.0.0.1/p","api_url":"https://127.0.0.1:1/patroni"}"#,
                ),
                ("/service/other/members/pg9", "{}"),
            ]),
        )
        .await;
        let names: Vec<_> = got.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["pg0", "pg1"]);
        assert_eq!(got[0].addr.to_string(), "127.0.0.2:6432");
        assert_eq!(got[0].api, "http://127.0.0.2:8009");
        assert_eq!(got[1].api, "http://127.0.0.1:8008");
    }
}
