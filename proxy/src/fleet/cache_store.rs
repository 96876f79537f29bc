//! Where the response cache keeps its entries: a generation per database
//! (`rouse:cachegen:<db>`) that is part of every entry's key
//! (`rouse:cache:<db>:<generation>:<fingerprint>`), so that bumping it
//! retires every entry at once. Bytes in, bytes out; what to cache and how
//! an answer is encoded is `http::cache`'s business.

use std::sync::LazyLock;
use std::time::Duration;

use redis::AsyncCommands;
use rouse_control_api::DbKey;

use super::{keys, Fleet};

/// The generation and, under it, the entry: one round trip.
static LOOKUP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local generation = redis.call('GET', KEYS[1]) or '0'
return {generation, redis.call('GET', ARGV[1] .. generation .. ':' .. ARGV[2])}
"#,
    )
});

impl Fleet {
    /// The generation in force for `key`'s database and the entry filed
    /// under it for `fingerprint`, if this fleet wrote one. `None` when
    /// Redis does not answer.
    pub(crate) async fn cached(
        &self,
        key: &DbKey,
        fingerprint: &str,
    ) -> Option<(String, Option<Vec<u8>>)> {
        let mut invocation = LOOKUP.prepare_invoke();
        invocation
            .key(keys::cache_generation(key))
            .arg(keys::cache_entry_prefix(key))
            .arg(fingerprint);
        let (generation, entry): (String, Option<Vec<u8>>) = self
            .call("cache", |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await
            .ok()
            .flatten()?;
        let entry_key = keys::cache_entry(key, &generation, fingerprint);
        let opened = entry.and_then(|e| self.open("cache", &entry_key, &e).map(<[u8]>::to_vec));
        Some((generation, opened))
    }

    /// Files `value` for `ttl` under the generation its lookup saw: if a
    /// write came in between, the entry is never found.
    pub(crate) async fn cache(
        &self,
        key: &DbKey,
        generation: &str,
        fingerprint: &str,
        value: &[u8],
        ttl: Duration,
    ) {
        let entry_key = keys::cache_entry(key, generation, fingerprint);
        let value = self.seal(&entry_key, value);
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let _ = self
            .call("cache", |mut c| async move {
                c.pset_ex::<_, _, ()>(entry_key, value, ttl_ms).await
            })
            .await;
    }

    /// Retires every entry of `key`'s database, on every proxy.
    pub(crate) async fn bump_cache_generation(&self, key: &DbKey) {
        let generation = keys::cache_generation(key);
        let _ = self
            .call("cache", |mut c| async move {
                c.incr::<_, _, ()>(generation, 1).await
            })
            .await;
    }
}
