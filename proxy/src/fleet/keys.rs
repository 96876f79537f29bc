//! Every Redis key and channel a proxy uses, named in one place: all begin
//! with `rouse:`, and the secrets they concern appear only as digests.

use rouse_control_api::{DbKey, Name};

/// Channel on which revocations reach every proxy.
pub(crate) const REVOCATIONS: &str = "rouse:revocations";

/// A validated credential, by the sha256 of the credential.
pub(crate) fn session(hash: &str) -> String {
    format!("rouse:sess:{hash}")
}

/// The sessions of one API key (a set of credential digests), by key id.
pub(crate) fn key_sessions(key_id: &str) -> String {
    format!("rouse:keysess:{key_id}")
}

/// A revoked token, by its sha256, until it expires.
pub(crate) fn revoked(hash: &str) -> String {
    format!("rouse:revoked:{hash}")
}

/// The lock of the one proxy that asks control to wake a database.
pub(crate) fn wake(key: &DbKey) -> String {
    format!("rouse:wake:{}", key.internal())
}

/// The proxy that holds the session of a cancel key.
pub(crate) fn cancel((pid, secret): (i32, i32)) -> String {
    format!("rouse:cancel:{pid}:{secret}")
}

/// A rate limit's arrival time: per app and protocol, and per credential
/// when `credential` names one.
pub(crate) fn rate_limit(app: &Name, protocol: &str, credential: Option<&str>) -> String {
    match credential {
        Some(c) => format!("rouse:rl:{app}:{protocol}:{c}"),
        None => format!("rouse:rl:{app}:{protocol}"),
    }
}

/// A database's cache generation, bumped by every write.
pub(crate) fn cache_generation(key: &DbKey) -> String {
    format!("rouse:cachegen:{}", key.internal())
}

/// What a database's cached answers' keys begin with; the generation and
/// the request's fingerprint follow (see [`cache_entry`]).
pub(crate) fn cache_entry_prefix(key: &DbKey) -> String {
    format!("rouse:cache:{}:", key.internal())
}

/// One cached answer.
pub(crate) fn cache_entry(key: &DbKey, generation: &str, fingerprint: &str) -> String {
    format!("{}{generation}:{fingerprint}", cache_entry_prefix(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_their_shape() {
        let key = DbKey::new(Name::new("shop").unwrap(), Name::new("users").unwrap());
        let app = Name::new("shop").unwrap();
        assert_eq!(session("ab"), "rouse:sess:ab");
        assert_eq!(key_sessions("k1"), "rouse:keysess:k1");
        assert_eq!(revoked("ab"), "rouse:revoked:ab");
        assert_eq!(wake(&key), "rouse:wake:shop_users");
        assert_eq!(cancel((7, -9)), "rouse:cancel:7:-9");
        assert_eq!(rate_limit(&app, "http", None), "rouse:rl:shop:http");
        assert_eq!(
            rate_limit(&app, "postgres", Some("c")),
            "rouse:rl:shop:postgres:c"
        );
        assert_eq!(cache_generation(&key), "rouse:cachegen:shop_users");
        assert_eq!(cache_entry(&key, "3", "ff"), "rouse:cache:shop_users:3:ff");
    }
}
