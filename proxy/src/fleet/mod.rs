//! What a fleet of proxies shares through Redis (`redis.url`): validated
//! credentials and their revocation, rate limits, one wake per database,
//! cancel keys and the response cache. This module is the only one that
//! speaks to Redis. When Redis does not answer, a proxy goes on with
//! in-process state as `redis.fail_open` allows, counts each fallback in
//! `rouse_redis_fallback_total`, and tries Redis again a moment later.

mod cache_store;
mod cancel_keys;
mod keys;
pub(crate) mod ratelimit;
mod sessions;
mod wake_lock;

pub(crate) use sessions::Revocation;
pub(crate) use wake_lock::Holder;

use crate::error::ProxyError;
use crate::metrics::{REDIS_FALLBACK, REDIS_TAMPERED};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use rouse_config::RedisConfig;
use tokio::sync::OnceCell;
use tracing::warn;

/// How long Redis is left alone after it failed a call.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Redis was needed, failed, and the policy (`fail_open: false`) forbids
/// going on without it.
#[derive(Debug, thiserror::Error)]
#[error("shared state (Redis) is unavailable")]
pub(crate) struct Unavailable;

impl From<Unavailable> for ProxyError {
    fn from(_: Unavailable) -> Self {
        ProxyError::SharedState
    }
}

/// This proxy's side of the shared state: Redis when configured, the
/// fallback policy and the fleet's seal.
pub(crate) struct Fleet {
    redis: Option<Redis>,
    fail_open: bool,
    seal: Seal,
}

/// Whoever can write to the shared Redis must not be able to make a proxy
/// act: every entry read back (sessions, revocations, cached answers,
/// cancel owners, wake locks) carries an HMAC over its key and value with a
/// secret only the proxies hold. An entry without a valid one is ignored
/// and counted in `rouse_redis_tampered_total{what}`.
struct Seal {
    secret: Vec<u8>,
}

/// Hex digits of the HMAC-SHA256 that leads a sealed value.
const MAC_LEN: usize = 64;

impl Seal {
    fn mac(&self, name: &str, value: &[u8]) -> String {
        use hmac::{Hmac, Mac};
        let mut m =
            Hmac::<sha2::Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        m.update(name.as_bytes());
        m.update(&[0]);
        m.update(value);
        hex::encode(m.finalize().into_bytes())
    }

    fn seal(&self, name: &str, value: &[u8]) -> Vec<u8> {
        let mut out = self.mac(name, value).into_bytes();
        out.extend_from_slice(value);
        out
    }

    fn open<'a>(&self, name: &str, sealed: &'a [u8]) -> Option<&'a [u8]> {
        let (mac, value) = sealed.split_at_checked(MAC_LEN)?;
        let expected = self.mac(name, value);
        // Constant time: the MAC is a secret until it is right.
        let same = mac
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        same.then_some(value)
    }
}

/// The shared secret: `redis.secret`, else `<data_dir>/redis.secret`,
/// made (0600) when missing. Proxies that share a Redis need the same one.
fn load_secret(config: &RedisConfig, data_dir: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    if let Some(secret) = &config.secret {
        anyhow::ensure!(
            secret.len() >= 16,
            "redis.secret must be at least 16 characters"
        );
        return Ok(secret.as_bytes().to_vec());
    }
    let path = data_dir.join("redis.secret");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 16 => return Ok(text.trim().as_bytes().to_vec()),
        Ok(_) => anyhow::bail!("{} holds less than 16 characters", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(data_dir)?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    file.write_all(secret.as_bytes())?;
    warn!(path = %path.display(), "made a new Redis secret: every proxy sharing this Redis needs the same file or redis.secret");
    Ok(secret.into_bytes())
}

struct Redis {
    client: redis::Client,
    /// Set once the first connection succeeds; reconnects by itself after.
    conn: OnceCell<ConnectionManager>,
    timeout: Duration,
    /// Until when calls skip Redis after a failure.
    paused_until: Mutex<Option<Instant>>,
}

impl Fleet {
    /// In-process state only.
    pub(crate) fn local() -> Fleet {
        Fleet {
            redis: None,
            fail_open: true,
            seal: Seal {
                secret: rand::random::<[u8; 32]>().to_vec(),
            },
        }
    }

    /// Shared state at `redis.url`; the connection is made in the background,
    /// so a proxy starts (and serves, if the policy allows) without Redis.
    pub(crate) fn new(config: &RedisConfig, data_dir: &std::path::Path) -> anyhow::Result<Fleet> {
        let Some(url) = &config.url else {
            return Ok(Fleet::local());
        };
        let secret = load_secret(config, data_dir)?;
        let client = redis::Client::open(url.as_str())
            .map_err(|e| anyhow::anyhow!("redis.url {url:?}: {e}"))?;
        Ok(Fleet {
            redis: Some(Redis {
                client,
                conn: OnceCell::new(),
                timeout: config.timeout,
                paused_until: Mutex::new(None),
            }),
            fail_open: config.fail_open,
            seal: Seal { secret },
        })
    }

    /// `value` with its HMAC, to be stored under `name`.
    pub(crate) fn seal(&self, name: &str, value: &[u8]) -> Vec<u8> {
        self.seal.seal(name, value)
    }

    /// The value of an entry read back from `name`, if this fleet wrote it;
    /// anything else is counted as tampering under `what` and ignored.
    pub(crate) fn open<'a>(
        &self,
        what: &'static str,
        name: &str,
        sealed: &'a [u8],
    ) -> Option<&'a [u8]> {
        let opened = self.seal.open(name, sealed);
        if opened.is_none() {
            REDIS_TAMPERED.counter([what.into()]).increment(1);
            warn!(
                what,
                key = name,
                "ignored a Redis entry this fleet did not write"
            );
        }
        opened
    }

    /// A key for `purpose` that every proxy of this fleet derives alike
    /// (from the Redis secret), so that what it shapes looks the same
    /// whichever proxy a client reaches.
    pub(crate) fn derive_key(&self, purpose: &str) -> [u8; 32] {
        let mac = self.seal.mac(purpose, b"derived key");
        let mut key = [0u8; 32];
        hex::decode_to_slice(&mac, &mut key).expect("a MAC is 64 hex digits");
        key
    }

    /// [`Fleet::open`] for text values.
    pub(crate) fn open_str(&self, what: &'static str, name: &str, sealed: &[u8]) -> Option<String> {
        self.open(what, name, sealed)
            .and_then(|v| String::from_utf8(v.to_vec()).ok())
    }

    pub(crate) fn enabled(&self) -> bool {
        self.redis.is_some()
    }

    /// Runs `call` on Redis. `Ok(None)`: no Redis configured, or it failed
    /// and the proxy may go on with its own state (counted as a fallback
    /// under `what`).
    pub(crate) async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        call: F,
    ) -> Result<Option<T>, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(r) = &self.redis else {
            return Ok(None);
        };
        let paused = r
            .paused_until
            .lock()
            .expect("pause poisoned")
            .is_some_and(|until| Instant::now() < until);
        let result = match (paused, r.connection().await) {
            (false, Some(conn)) => match tokio::time::timeout(r.timeout, call(conn)).await {
                Ok(Ok(v)) => return Ok(Some(v)),
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {:?}", r.timeout)),
            },
            _ => None,
        };
        if let Some(error) = result {
            let mut paused = r.paused_until.lock().expect("pause poisoned");
            if paused.is_none_or(|until| Instant::now() >= until) {
                warn!(%error, "Redis failed; using in-process state for a moment");
            }
            *paused = Some(Instant::now() + PAUSE_AFTER_FAILURE);
        }
        REDIS_FALLBACK.counter([what.into()]).increment(1);
        if self.fail_open {
            Ok(None)
        } else {
            Err(Unavailable)
        }
    }

    /// The raw (still sealed) value at `key`; `Ok(None)` when there is none
    /// or Redis may be done without.
    async fn get(&self, what: &'static str, key: &str) -> Result<Option<Vec<u8>>, Unavailable> {
        let got = self
            .call(what, |mut c| {
                let key = key.to_string();
                async move { redis::AsyncCommands::get::<_, Option<Vec<u8>>>(&mut c, key).await }
            })
            .await?;
        Ok(got.flatten())
    }
}

impl Redis {
    /// The connection, made now if it never was (a failure is retried on
    /// a later call).
    async fn connection(&self) -> Option<ConnectionManager> {
        if let Some(c) = self.conn.get() {
            return Some(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let made = tokio::time::timeout(
            self.timeout * 4,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        match made {
            Ok(Ok(c)) => Some(self.conn.get_or_init(|| async { c }).await.clone()),
            _ => None,
        }
    }
}

/// sha256 of a credential or statement, hex: what Redis keys carry instead
/// of secrets.
pub(crate) fn digest(text: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_entry_opens_only_under_its_own_name_and_secret() {
        let seal = Seal {
            secret: b"0123456789abcdef".to_vec(),
        };
        let sealed = seal.seal("rouse:sess:aa", b"{\"app\":\"shop\"}");
        assert_eq!(
            seal.open("rouse:sess:aa", &sealed),
            Some(&b"{\"app\":\"shop\"}"[..])
        );
        // Moved to another key, changed by a byte, or made with another secret.
        assert_eq!(seal.open("rouse:sess:bb", &sealed), None);
        let mut changed = sealed.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert_eq!(seal.open("rouse:sess:aa", &changed), None);
        let other = Seal {
            secret: b"fedcba9876543210".to_vec(),
        };
        assert_eq!(other.open("rouse:sess:aa", &sealed), None);
        assert_eq!(seal.open("rouse:sess:aa", b"{\"app\":\"rival\"}"), None);
        assert_eq!(seal.open("rouse:sess:aa", b""), None);
    }
}
