//! Credentials: API keys (verified by control, cached in-process) and JWTs
//! (HS256 secret, RS256 public key or JWKS, verified locally). Either names
//! exactly one app.

use std::time::Duration;

use base64::Engine as _;
use hyper::header::{HeaderMap, AUTHORIZATION};
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use rouse_control_api::config::AuthConfig;
use rouse_control_api::{Client, ClientError, Name};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{ProxyError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    ApiKey(String),
    Jwt(String),
}

/// A credential and, for basic auth, the user name (`<db>.<app>` routes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub credential: Credential,
    pub basic_user: Option<String>,
}

/// Reads `Authorization: Bearer|ApiKey|Basic ...` or `X-API-Key`.
pub fn presented(headers: &HeaderMap) -> Option<Presented> {
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

#[derive(Clone)]
struct KeyOwner {
    app: Name,
    id: String,
}

#[derive(Deserialize)]
struct Claims {
    namespace: Option<String>,
    app: Option<String>,
}

pub struct Authenticator {
    control: Client,
    /// sha256(key) -> owner. Revocations arrive as control events.
    keys: moka::future::Cache<String, KeyOwner>,
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    jwks: Option<JwkSet>,
}

/// Clock skew tolerated on `exp` and `nbf`.
const JWT_LEEWAY_SECS: u64 = 60;

impl Authenticator {
    pub fn new(control: Client, config: &AuthConfig) -> anyhow::Result<Authenticator> {
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
        Ok(Authenticator {
            control,
            keys: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(300))
                .support_invalidation_closures()
                .build(),
            hs256: config
                .jwt_hs256_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            rs256,
            jwks,
        })
    }

    /// The app a credential belongs to.
    pub async fn app_of(&self, credential: &Credential) -> Result<Name> {
        match credential {
            Credential::ApiKey(key) => self.key_owner(key).await,
            Credential::Jwt(token) => self.jwt_app(token),
        }
    }

    async fn key_owner(&self, key: &str) -> Result<Name> {
        if !key.starts_with("ak_") || key.len() > 128 {
            return Err(ProxyError::Unauthorized);
        }
        let hash = hex::encode(Sha256::digest(key.as_bytes()));
        let control = self.control.clone();
        let key = key.to_string();
        let owner = self
            .keys
            .try_get_with(hash, async move {
                match control.verify_key(&key).await {
                    Ok(o) => Ok(KeyOwner {
                        app: o.app,
                        id: o.id,
                    }),
                    Err(ClientError::Api { status: 404, .. }) => Err(ProxyError::Unauthorized),
                    Err(e) => Err(ProxyError::Control(e.to_string())),
                }
            })
            .await
            .map_err(|e| match &*e {
                ProxyError::Unauthorized => ProxyError::Unauthorized,
                other => ProxyError::Control(other.to_string()),
            })?;
        Ok(owner.app)
    }

    /// Forgets a revoked key at once.
    pub fn revoke(&self, key_id: &str) {
        let id = key_id.to_string();
        let _ = self
            .keys
            .invalidate_entries_if(move |_, owner| owner.id == id);
    }

    /// Forgets every cached key (after missed control events).
    pub fn forget_all(&self) {
        self.keys.invalidate_all();
    }

    fn jwt_app(&self, token: &str) -> Result<Name> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| ProxyError::Unauthorized)?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.clone(),
            Algorithm::RS256 => match (&self.jwks, &header.kid) {
                (Some(set), Some(kid)) => set
                    .find(kid)
                    .and_then(|jwk| DecodingKey::from_jwk(jwk).ok()),
                _ => self.rs256.clone(),
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
        let app = data
            .claims
            .namespace
            .or(data.claims.app)
            .ok_or(ProxyError::Unauthorized)?;
        Name::new(&app).map_err(|_| ProxyError::Unauthorized)
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
