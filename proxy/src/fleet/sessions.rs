//! Validated credentials shared by the fleet (`rouse:sess:*`, indexed per
//! API key under `rouse:keysess:*`), revoked tokens (`rouse:revoked:*`) and
//! the revocation channel that tells every proxy to forget a credential.
//! What a session holds is the authenticator's business: here it is sealed
//! text.

use futures::StreamExt;
use redis::AsyncCommands;
use tracing::{info, warn};

use super::{keys, Fleet, Unavailable, PAUSE_AFTER_FAILURE};

/// A revocation as published on [`keys::REVOCATIONS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Revocation {
    /// Every session of an API key, by key id.
    Key(String),
    /// One token, by its sha256.
    Token(String),
}

impl Revocation {
    fn encode(&self) -> String {
        match self {
            Revocation::Key(id) => format!("key:{id}"),
            Revocation::Token(hash) => format!("token:{hash}"),
        }
    }

    fn decode(text: &str) -> Option<Revocation> {
        match text.split_once(':')? {
            ("key", id) => Some(Revocation::Key(id.into())),
            ("token", hash) => Some(Revocation::Token(hash.into())),
            _ => None,
        }
    }
}

impl Fleet {
    /// The session another proxy filed for the credential of digest `hash`.
    pub(crate) async fn session(&self, hash: &str) -> Result<Option<String>, Unavailable> {
        let key = keys::session(hash);
        let sealed = self.get("session", &key).await?;
        Ok(sealed.and_then(|s| self.open_str("session", &key, &s)))
    }

    /// Files a session for `ttl_secs`; an API key's (`key_id`) is also
    /// indexed for `index_ttl_secs`, so that revoking the key finds it.
    pub(crate) async fn store_session(
        &self,
        hash: &str,
        session: &str,
        ttl_secs: u64,
        key_id: Option<&str>,
        index_ttl_secs: u64,
    ) -> Result<(), Unavailable> {
        let key = keys::session(hash);
        let sealed = self.seal(&key, session.as_bytes());
        let index = key_id.map(keys::key_sessions);
        self.call("session", |mut c| {
            let hash = hash.to_string();
            async move {
                let mut pipe = redis::pipe();
                pipe.set_ex(&key, sealed, ttl_secs).ignore();
                if let Some(index) = index {
                    pipe.sadd(&index, hash)
                        .ignore()
                        .expire(&index, index_ttl_secs as i64)
                        .ignore();
                }
                pipe.query_async::<()>(&mut c).await
            }
        })
        .await
        .map(drop)
    }

    /// Whether a proxy revoked the token of digest `hash` (logout).
    pub(crate) async fn token_revoked(&self, hash: &str) -> Result<bool, Unavailable> {
        let marker = keys::revoked(hash);
        let sealed = self.get("session", &marker).await?;
        Ok(sealed.is_some_and(|s| self.open("revocation", &marker, &s).is_some()))
    }

    /// Deletes every session of an API key, and tells every proxy.
    pub(crate) async fn revoke_key(&self, key_id: &str) {
        let index = keys::key_sessions(key_id);
        let _ = self
            .call("revocation", |mut c| async move {
                let hashes: Vec<String> = c.smembers(&index).await?;
                let mut pipe = redis::pipe();
                for h in &hashes {
                    pipe.del(keys::session(h)).ignore();
                }
                pipe.del(&index).ignore();
                pipe.query_async::<()>(&mut c).await
            })
            .await;
        let _ = self.publish(&Revocation::Key(key_id.to_string())).await;
    }

    /// Marks the token of digest `hash` revoked for `ttl_secs` (its
    /// remaining life), deletes its session, and tells every proxy.
    pub(crate) async fn revoke_token(&self, hash: &str, ttl_secs: u64) -> Result<(), Unavailable> {
        let marker = keys::revoked(hash);
        let sealed = self.seal(&marker, b"1");
        let session = keys::session(hash);
        self.call("revocation", |mut c| async move {
            redis::pipe()
                .set_ex(marker, sealed, ttl_secs)
                .ignore()
                .del(session)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await?;
        self.publish(&Revocation::Token(hash.to_string())).await
    }

    /// Publishes a revocation to every proxy (this one included).
    async fn publish(&self, revocation: &Revocation) -> Result<(), Unavailable> {
        let message = self.seal(keys::REVOCATIONS, revocation.encode().as_bytes());
        self.call("revocation", |mut c| async move {
            c.publish::<_, _, ()>(keys::REVOCATIONS, message).await
        })
        .await
        .map(drop)
    }

    /// Hands every revocation published by any proxy to `apply`, for the
    /// life of the proxy (resubscribing after Redis comes back).
    pub(crate) async fn follow_revocations(&self, apply: impl Fn(Revocation)) {
        let Some(r) = &self.redis else {
            return std::future::pending().await;
        };
        loop {
            match r.client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(keys::REVOCATIONS).await {
                    Ok(()) => {
                        info!("following revocations through Redis");
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            let sealed: Vec<u8> = msg.get_payload().unwrap_or_default();
                            let text = self.open_str("revocation", keys::REVOCATIONS, &sealed);
                            if let Some(rev) = text.as_deref().and_then(Revocation::decode) {
                                apply(rev);
                            }
                        }
                        warn!("Redis revocation channel closed; resubscribing");
                    }
                    Err(e) => warn!(error = %e, "cannot subscribe to revocations"),
                },
                Err(e) => tracing::debug!(error = %e, "Redis unavailable for revocations"),
            }
            tokio::time::sleep(PAUSE_AFTER_FAILURE).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_round_trip() {
        for r in [
            Revocation::Key("k_1".into()),
            Revocation::Token("ab12".into()),
        ] {
            assert_eq!(Revocation::decode(&r.encode()), Some(r));
        }
        assert_eq!(Revocation::decode("nonsense"), None);
        assert_eq!(Revocation::decode("user:x"), None);
    }
}
