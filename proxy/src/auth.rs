//! Credentials: API keys (verified by control) and JWTs (HS256 secret,
//! RS256 public key or JWKS, verified locally). Either names exactly one
//! app. A validated credential is cached in-process and in Redis, so that
//! a fleet of proxies validates it once (see `fleet::sessions`);
//! revocations reach every proxy through Redis.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hyper::header::{HeaderMap, AUTHORIZATION};
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use rouse_config::AuthConfig;
use rouse_control_api::{Client, Name};
use serde::{Deserialize, Serialize};

use crate::error::{ProxyError, Result};
use crate::fleet::{digest, Fleet, Revocation};
use crate::metrics::AUTH_VALIDATIONS;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    ApiKey(String),
    Jwt(String),
}

impl Credential {
    /// A name for the credential that does not reveal it: for rate limits.
    pub(crate) fn id(&self) -> String {
        let (Credential::ApiKey(s) | Credential::Jwt(s)) = self;
        digest(s.as_bytes())[..16].to_string()
    }
}

/// A credential and, for basic auth, the user name (`<db>.<app>` routes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Presented {
    pub(crate) credential: Credential,
    pub(crate) basic_user: Option<String>,
}

/// Reads `Authorization: Bearer|ApiKey|Basic ...` or `X-API-Key`.
pub(crate) fn presented(headers: &HeaderMap) -> Option<Presented> {
    if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, rest) = value.trim().split_once(' ')?;
        let rest = rest.trim();
        return match scheme.to_ascii_lowercase().as_str() {
            "bearer" if rest.matches('.').count() == 2 => Some(plain(Credential::Jwt(rest.into()))),
            "bearer" | "apikey" => Some(plain(Credential::ApiKey(rest.into()))),
            "basic" => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .ok()?;
                let text = String::from_utf8(decoded).ok()?;
                let (user, password) = text.split_once(':')?;
                Some(Presented {
                    credential: Credential::ApiKey(password.into()),
                    basic_user: Some(user.into()),
                })
            }
            _ => None,
        };
    }
    let key = headers.get("x-api-key")?.to_str().ok()?.trim();
    Some(plain(Credential::ApiKey(key.into())))
}

fn plain(credential: Credential) -> Presented {
    Presented {
        credential,
        basic_user: None,
    }
}

/// A validated credential, as cached in-process and in Redis
/// (`rouse:sess:<sha256(credential)>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session {
    app: Name,
    /// The API key's id, by which a revocation finds its sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    /// A token's `exp` (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
}

impl Session {
    /// Seconds it may be cached: API keys live until revoked, tokens until
    /// they expire.
    fn ttl(&self) -> u64 {
        match self.exp {
            Some(exp) => exp
                .saturating_sub(rouse_runtime::clock::now_secs())
                .min(SESSION_TTL.as_secs()),
            None => SESSION_TTL.as_secs(),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    namespace: Option<String>,
    app: Option<String>,
    exp: Option<u64>,
}

/// How long a validated credential is trusted without asking again.
const SESSION_TTL: Duration = Duration::from_secs(300);

pub(crate) struct Authenticator {
    control: Client,
    fleet: Arc<Fleet>,
    /// sha256(credential) -> session, in front of Redis.
    sessions: moka::future::Cache<String, Session>,
    /// sha256 of revoked tokens still within their lifetime.
    revoked: moka::future::Cache<String, ()>,
    /// sha256 of credentials found invalid a moment ago: asked again, they
    /// cost neither control nor Redis a call.
    rejected: moka::future::Cache<String, ()>,
    /// Replaced as a whole on reload.
    keys: std::sync::RwLock<Arc<JwtKeys>>,
}

/// What JWTs are verified with.
pub(crate) struct JwtKeys {
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    jwks: Option<JwkSet>,
}

impl JwtKeys {
    /// The keys `config` names; a file that cannot be read is an error.
    pub(crate) fn load(config: &AuthConfig) -> anyhow::Result<JwtKeys> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
        };
        let rs256 = match &config.jwt_rs256_public_key_file {
            Some(p) => Some(DecodingKey::from_rsa_pem(&read(p)?)?),
            None => None,
        };
        let jwks = match &config.jwt_jwks_file {
            Some(p) => Some(serde_json::from_slice(&read(p)?)?),
            None => None,
        };
        Ok(JwtKeys {
            hs256: config
                .jwt_hs256_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            rs256,
            jwks,
        })
    }
}

/// How long a credential found invalid is refused without asking again
/// (a key created meanwhile works after this).
const REJECTED_TTL: Duration = Duration::from_secs(5);

/// Clock skew tolerated on `exp` and `nbf`.
const JWT_LEEWAY_SECS: u64 = 60;

impl Authenticator {
    pub(crate) fn new(
        control: Client,
        fleet: Arc<Fleet>,
        config: &AuthConfig,
    ) -> anyhow::Result<Authenticator> {
        Ok(Authenticator {
            control,
            fleet,
            sessions: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(SESSION_TTL)
                .support_invalidation_closures()
                .build(),
            revoked: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(24 * 3600))
                .build(),
            rejected: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(REJECTED_TTL)
                .build(),
            keys: std::sync::RwLock::new(Arc::new(JwtKeys::load(config)?)),
        })
    }

    /// New JWT keys (a reload): what was validated with the old ones is
    /// validated again.
    pub(crate) fn set_keys(&self, keys: JwtKeys) {
        *self.keys.write().expect("keys poisoned") = Arc::new(keys);
        self.forget_all();
    }

    /// The app a credential belongs to: from this proxy's cache, else from
    /// Redis (another proxy validated it), else validated here.
    pub(crate) async fn app_of(&self, credential: &Credential) -> Result<Name> {
        let secret = match credential {
            Credential::ApiKey(key) if !key.starts_with("ak_") || key.len() > 128 => {
                return Err(ProxyError::Unauthorized)
            }
            Credential::ApiKey(s) | Credential::Jwt(s) => s,
        };
        let hash = digest(secret.as_bytes());
        if self.revoked.contains_key(&hash) || self.rejected.contains_key(&hash) {
            return Err(ProxyError::Unauthorized);
        }
        let session = self
            .sessions
            .try_get_with(hash.clone(), self.validate(credential, &hash))
            .await
            .map_err(|e| (*e).clone());
        if let Err(ProxyError::Unauthorized) = session {
            self.rejected.insert(hash.clone(), ()).await;
        }
        let session = session?;
        if session
            .exp
            .is_some_and(|exp| exp + JWT_LEEWAY_SECS < rouse_runtime::clock::now_secs())
        {
            self.sessions.invalidate(&hash).await;
            return Err(ProxyError::Unauthorized);
        }
        Ok(session.app)
    }

    async fn validate(&self, credential: &Credential, hash: &str) -> Result<Session> {
        let stored = self.fleet.session(hash).await?;
        if let Some(session) = stored.and_then(|json| serde_json::from_str::<Session>(&json).ok()) {
            AUTH_VALIDATIONS.counter(["redis".into()]).increment(1);
            return Ok(session);
        }
        let session = match credential {
            Credential::ApiKey(key) => {
                AUTH_VALIDATIONS.counter(["control".into()]).increment(1);
                match self.control.verify_key(key).await {
                    Ok(o) => Session {
                        app: o.app,
                        key_id: Some(o.id),
                        exp: None,
                    },
                    Err(e) if e.is_not_found() => return Err(ProxyError::Unauthorized),
                    Err(e) => return Err(ProxyError::Control(e.to_string())),
                }
            }
            Credential::Jwt(token) => {
                AUTH_VALIDATIONS.counter(["token".into()]).increment(1);
                let session = self.jwt_session(token)?;
                // Revoked before this proxy heard of it.
                if self.fleet.token_revoked(hash).await? {
                    self.revoked.insert(hash.to_string(), ()).await;
                    return Err(ProxyError::Unauthorized);
                }
                session
            }
        };
        let json = serde_json::to_string(&session).expect("a session serialises");
        self.fleet
            .store_session(
                hash,
                &json,
                session.ttl(),
                session.key_id.as_deref(),
                SESSION_TTL.as_secs(),
            )
            .await?;
        Ok(session)
    }

    /// Forgets an API key's sessions here and in Redis, and tells every
    /// proxy (control announced the deletion).
    pub(crate) async fn revoke_key(&self, key_id: &str) {
        self.forget(&Revocation::Key(key_id.to_string()));
        self.fleet.revoke_key(key_id).await;
    }

    /// Revokes a token until it expires (logout), on every proxy.
    pub(crate) async fn revoke_token(&self, token: &str) -> Result<()> {
        let session = self.jwt_session(token)?;
        let hash = digest(token.as_bytes());
        self.revoked.insert(hash.clone(), ()).await;
        self.sessions.invalidate(&hash).await;
        self.fleet.revoke_token(&hash, session.ttl().max(1)).await?;
        Ok(())
    }

    /// Applies a revocation to this proxy's cache.
    pub(crate) fn forget(&self, revocation: &Revocation) {
        match revocation {
            Revocation::Key(id) => {
                let id = id.clone();
                let _ = self
                    .sessions
                    .invalidate_entries_if(move |_, s| s.key_id.as_deref() == Some(&id));
            }
            Revocation::Token(hash) => {
                let (sessions, revoked) = (self.sessions.clone(), self.revoked.clone());
                let hash = hash.clone();
                tokio::spawn(async move {
                    revoked.insert(hash.clone(), ()).await;
                    sessions.invalidate(&hash).await
                });
            }
        }
    }

    /// Forgets every cached credential (after missed control events).
    pub(crate) fn forget_all(&self) {
        self.sessions.invalidate_all();
        self.rejected.invalidate_all();
    }

    fn jwt_session(&self, token: &str) -> Result<Session> {
        let (app, exp) = self.jwt_app(token)?;
        Ok(Session {
            app,
            key_id: None,
            exp,
        })
    }

    fn jwt_app(&self, token: &str) -> Result<(Name, Option<u64>)> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| ProxyError::Unauthorized)?;
        let keys = self.keys.read().expect("keys poisoned").clone();
        let key = match header.alg {
            Algorithm::HS256 => keys.hs256.clone(),
            Algorithm::RS256 => match (&keys.jwks, &header.kid) {
                (Some(set), Some(kid)) => set
                    .find(kid)
                    .and_then(|jwk| DecodingKey::from_jwk(jwk).ok()),
                _ => keys.rs256.clone(),
            },
            _ => None,
        }
        .ok_or(ProxyError::Unauthorized)?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = JWT_LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|_| ProxyError::Unauthorized)?;
        let exp = data.claims.exp;
        let app = data
            .claims
            .namespace
            .or(data.claims.app)
            .ok_or(ProxyError::Unauthorized)?;
        let app = Name::new(&app).map_err(|_| ProxyError::Unauthorized)?;
        Ok((app, exp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn every_credential_form_is_read() {
        let key = |k: &str| Some(plain(Credential::ApiKey(k.into())));
        assert_eq!(
            presented(&headers("authorization", "Bearer ak_1")),
            key("ak_1")
        );
        assert_eq!(
            presented(&headers("authorization", "ApiKey ak_2")),
            key("ak_2")
        );
        assert_eq!(presented(&headers("x-api-key", "ak_3")), key("ak_3"));
        assert_eq!(
            presented(&headers("authorization", "Bearer a.b.c")),
            Some(plain(Credential::Jwt("a.b.c".into())))
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("users.shop:ak_4");
        assert_eq!(
            presented(&headers("authorization", &format!("Basic {basic}"))),
            Some(Presented {
                credential: Credential::ApiKey("ak_4".into()),
                basic_user: Some("users.shop".into())
            })
        );
        assert_eq!(presented(&headers("authorization", "Digest x")), None);
        assert_eq!(presented(&headers("authorization", "Basic !!!")), None);
        assert_eq!(presented(&HeaderMap::new()), None);
    }
}
