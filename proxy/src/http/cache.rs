//! The response cache of rqlite reads, opt-in per database
//! (`proxy.response_cache`): which requests are cached (reads at
//! `level=none|weak`, by method, path, parameters and body), for how long
//! (the database's TTL), and which requests retire a database's entries
//! (any write, through any proxy). The entries live in the fleet's Redis
//! (see `fleet::cache_store`); without Redis nothing is cached.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::StatusCode;
use rouse_config::CachedDatabase;
use rouse_control_api::DbKey;

use super::upstream::Reply;
use crate::fleet::{digest, Fleet};
use crate::metrics::CACHE;

pub(crate) struct ResponseCache {
    /// Replaced as a whole on reload.
    ttls: std::sync::RwLock<HashMap<DbKey, Duration>>,
}

/// A read that may be cached: where its answer is filed.
pub(crate) struct Cacheable {
    generation: String,
    fingerprint: String,
    ttl: Duration,
}

impl ResponseCache {
    pub(crate) fn new(databases: &[CachedDatabase]) -> ResponseCache {
        ResponseCache {
            ttls: std::sync::RwLock::new(ttls_of(databases)),
        }
    }

    /// New cached databases and TTLs (a reload).
    pub(crate) fn set(&self, databases: &[CachedDatabase]) {
        *self.ttls.write().expect("ttls poisoned") = ttls_of(databases);
    }

    /// Whether this database's requests concern the cache at all.
    fn covers(&self, key: &DbKey) -> bool {
        self.ttls.read().expect("ttls poisoned").contains_key(key)
    }

    /// The cached answer to a read, or where to file its answer. `None`
    /// when the request is no cacheable read or Redis does not answer.
    pub(crate) async fn lookup(
        &self,
        fleet: &Fleet,
        key: &DbKey,
        method: &hyper::Method,
        path_and_query: &str,
        body: &[u8],
    ) -> Option<Result<Reply, Cacheable>> {
        let ttl = *self.ttls.read().expect("ttls poisoned").get(key)?;
        if !is_cacheable_read(path_and_query) {
            return None;
        }
        let mut request = Vec::with_capacity(path_and_query.len() + body.len() + 8);
        request.extend_from_slice(method.as_str().as_bytes());
        request.push(b' ');
        request.extend_from_slice(path_and_query.as_bytes());
        request.push(b'\n');
        request.extend_from_slice(body);
        let fingerprint = digest(&request);
        let (generation, entry) = fleet.cached(key, &fingerprint).await?;
        match entry.as_deref().and_then(decode) {
            Some(reply) => {
                CACHE
                    .counter([key.internal().into(), "hit".into()])
                    .increment(1);
                Some(Ok(reply))
            }
            None => {
                CACHE
                    .counter([key.internal().into(), "miss".into()])
                    .increment(1);
                Some(Err(Cacheable {
                    generation,
                    fingerprint,
                    ttl,
                }))
            }
        }
    }

    /// Files a successful answer where its lookup said.
    pub(crate) async fn store(&self, fleet: &Fleet, key: &DbKey, slot: Cacheable, reply: &Reply) {
        if reply.status != StatusCode::OK {
            return;
        }
        fleet
            .cache(
                key,
                &slot.generation,
                &slot.fingerprint,
                &encode(reply),
                slot.ttl,
            )
            .await;
    }

    /// After a write: every proxy's entries of this database are stale.
    pub(crate) async fn invalidate(&self, fleet: &Fleet, key: &DbKey) {
        if self.covers(key) {
            fleet.bump_cache_generation(key).await;
        }
    }
}

fn ttls_of(databases: &[CachedDatabase]) -> HashMap<DbKey, Duration> {
    databases
        .iter()
        .map(|c| (DbKey::new(c.app.clone(), c.database.clone()), c.ttl))
        .collect()
}

/// `/db/query` at read consistency `none` or `weak` (rqlite's default).
fn is_cacheable_read(path_and_query: &str) -> bool {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    path == "/db/query"
        && query
            .split('&')
            .filter_map(|p| p.strip_prefix("level="))
            .all(|level| level == "none" || level == "weak")
}

/// Whether a request to rqlite may change data.
pub(crate) fn is_write(path_and_query: &str) -> bool {
    let path = path_and_query.split('?').next().unwrap_or_default();
    path == "/db/execute" || path == "/db/request"
}

/// `content-type` NUL body.
fn encode(reply: &Reply) -> Vec<u8> {
    let ct = reply
        .content_type
        .as_ref()
        .map(|v| v.as_bytes())
        .unwrap_or(b"application/json");
    let mut out = Vec::with_capacity(ct.len() + 1 + reply.body.len());
    out.extend_from_slice(ct);
    out.push(0);
    out.extend_from_slice(&reply.body);
    out
}

fn decode(entry: &[u8]) -> Option<Reply> {
    let nul = entry.iter().position(|b| *b == 0)?;
    Some(Reply {
        status: StatusCode::OK,
        content_type: HeaderValue::from_bytes(&entry[..nul]).ok(),
        body: Bytes::copy_from_slice(&entry[nul + 1..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_reads_are_cached() {
        assert!(is_cacheable_read("/db/query"));
        assert!(is_cacheable_read("/db/query?level=none&q=SELECT+1"));
        assert!(is_cacheable_read("/db/query?pretty&level=weak"));
        assert!(!is_cacheable_read("/db/query?level=strong"));
        assert!(!is_cacheable_read("/db/query?level=linearizable"));
        assert!(!is_cacheable_read("/db/execute"));
        assert!(is_write("/db/execute?transaction"));
        assert!(is_write("/db/request"));
        assert!(!is_write("/db/query"));
    }

    #[test]
    fn entries_round_trip() {
        let reply = Reply {
            status: StatusCode::OK,
            content_type: Some(HeaderValue::from_static("application/json")),
            body: Bytes::from_static(b"{\"results\":[]}\0tail"),
        };
        let back = decode(&encode(&reply)).unwrap();
        assert_eq!(back.body, reply.body);
        assert_eq!(back.content_type, reply.content_type);
        assert!(decode(b"no separator").is_none());
    }
}
