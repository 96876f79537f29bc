//! Async client of the control API, used by the proxy, the command line,
//! the tests and the benchmarks.

use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};

use crate::access::{CreateToken, Role, TokenCreated, TokenInfo};
use crate::backup::{BackupInfo, BackupList, RestoreRequest, Restored};
use crate::error::{ErrorBody, ErrorCode};
use crate::name::Name;
use crate::sealed::SealKey;
use crate::types::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Control answered with an error body.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("control unreachable at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected answer from control ({status}): {body}")]
    Protocol { status: u16, body: String },
}

impl ClientError {
    /// The machine code of an API error (`not_found`, `conflict`, ...).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Control answered that the resource does not exist (404): an unknown
    /// database, key or login.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Api { status: 404, .. })
    }

    /// Control could not answer: unreachable, timed out, or a gateway in
    /// front of it said so. Worth asking again; its own refusals are not.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Protocol { status, .. } => matches!(status, 502..=504),
            ClientError::Api { .. } => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::Protocol { status, .. } => Some(*status),
            ClientError::Transport { .. } => None,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// The bearer token sent with every call.
    token: Option<String>,
    /// How long a call may take (a wake: see [`Client::wake_within`]).
    timeout: Option<Duration>,
}

impl Client {
    /// `base` is control's address, e.g. `http://127.0.0.1:8001`.
    pub fn new(base: &str) -> Self {
        let http = Self::builder()
            .build()
            .expect("a client without extra roots builds");
        Client {
            base: base.trim_end_matches('/').to_string(),
            http,
            token: None,
            timeout: None,
        }
    }

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            // Whatever features other crates switch on for reqwest, the
            // system's roots never vouch for a control.
            .tls_built_in_root_certs(false)
    }

    /// Trusts the CA certificates in `pem` for an `https://` control
    /// (`control.tls`); the only roots this client has.
    pub fn with_ca(mut self, pem: &[u8]) -> Result<Self, String> {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
        if certs.is_empty() {
            return Err("no certificate in the CA bundle".into());
        }
        let builder = certs
            .into_iter()
            .fold(Self::builder(), |b, cert| b.add_root_certificate(cert));
        self.http = builder.build().map_err(|e| e.to_string())?;
        Ok(self)
    }

    /// Every call fails after `timeout` without an answer (a wedged control
    /// must not hold its callers forever). The event stream is exempt.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Calls with `Authorization: Bearer <token>` (see [`crate::Role`]).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into().trim().to_string());
        self
    }

    /// The engine login in `info`, opened with this client's token.
    pub fn engine_login(&self, info: &DatabaseInfo) -> Option<BackendCredentials> {
        let key = SealKey::for_bearer(self.token.as_deref()?);
        serde_json::from_slice(&key.open(info.engine_login.as_ref()?)?).ok()
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `path` is built from validated [`Name`]s and [`segment`]-encoded text.
    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{}", self.base, path)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send_within(req, self.timeout).await
    }

    async fn send_within<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Option<Duration>,
    ) -> Result<T, ClientError> {
        let transport = |source| ClientError::Transport {
            url: self.base.clone(),
            source,
        };
        let req = match timeout {
            Some(t) => req.timeout(t),
            None => req,
        };
        let resp = self.authorized(req).send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(transport)?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).map_err(|_| ClientError::Protocol {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => Err(ClientError::Api {
                status,
                code: e.code,
                message: e.error,
            }),
            Err(_) => Err(ClientError::Protocol {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            }),
        }
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn create_app(&self, name: &Name) -> Result<AppInfo, ClientError> {
        self.create_app_with(&CreateApp {
            name: name.clone(),
            create_on_first_access: true,
        })
        .await
    }

    pub async fn create_app_with(&self, req: &CreateApp) -> Result<AppInfo, ClientError> {
        self.post("/apps", req).await
    }

    pub async fn create_key(&self, app: &Name) -> Result<ApiKeyCreated, ClientError> {
        self.post(&format!("/apps/{app}/keys"), &serde_json::json!({}))
            .await
    }

    pub async fn list_keys(&self, app: &Name) -> Result<Vec<ApiKeyInfo>, ClientError> {
        self.get(&format!("/apps/{app}/keys")).await
    }

    pub async fn delete_key(&self, app: &Name, id: &str) -> Result<serde_json::Value, ClientError> {
        self.send(
            self.http
                .delete(self.url(&format!("/apps/{app}/keys/{}", segment(id)))),
        )
        .await
    }

    /// Which app a key belongs to; `not_found` for an unknown or revoked key.
    pub async fn verify_key(&self, key: &str) -> Result<KeyOwner, ClientError> {
        self.post(
            "/keys/verify",
            &VerifyKey {
                key: key.to_string(),
            },
        )
        .await
    }

    pub async fn create_user(
        &self,
        app: &Name,
        name: &str,
        password: &str,
    ) -> Result<UserInfo, ClientError> {
        let body = CreateUser {
            name: name.to_string(),
            password: password.to_string(),
        };
        self.post(&format!("/apps/{app}/users"), &body).await
    }

    /// Removes a Postgres login; every proxy refuses it within a second.
    pub async fn delete_user(
        &self,
        app: &Name,
        name: &str,
    ) -> Result<serde_json::Value, ClientError> {
        self.send(
            self.http
                .delete(self.url(&format!("/apps/{app}/users/{}", segment(name)))),
        )
        .await
    }

    /// Deletes an app with its databases (data removed), keys and logins.
    /// `confirm` must repeat the app's name.
    pub async fn delete_app(&self, app: &Name, confirm: &str) -> Result<AppDeleted, ClientError> {
        self.send(
            self.http
                .delete(self.url(&format!("/apps/{app}")))
                .query(&[("confirm", confirm)]),
        )
        .await
    }

    pub async fn get_user(&self, app: &Name, name: &str) -> Result<UserInfo, ClientError> {
        self.get(&format!("/apps/{app}/users/{}", segment(name)))
            .await
    }

    pub async fn create_database(&self, req: &CreateDatabase) -> Result<DatabaseInfo, ClientError> {
        self.post("/databases", req).await
    }

    /// A create on a client's first access to the database: refused as
    /// `not_found` when the app's policy forbids it.
    pub async fn create_database_on_first_access(
        &self,
        req: &CreateDatabase,
    ) -> Result<DatabaseInfo, ClientError> {
        self.post("/databases?on_first_access=true", req).await
    }

    pub async fn list_databases(&self, app: Option<&Name>) -> Result<DatabaseList, ClientError> {
        match app {
            Some(app) => self.get(&format!("/databases?app={app}")).await,
            None => self.get("/databases").await,
        }
    }

    pub async fn database(&self, app: &Name, db: &Name) -> Result<DatabaseInfo, ClientError> {
        self.get(&format!("/databases/{app}/{db}")).await
    }

    pub async fn wake(&self, app: &Name, db: &Name) -> Result<DatabaseInfo, ClientError> {
        self.wake_within(app, db, None).await
    }

    /// [`Client::wake`] that gives up after `limit` (a start may take
    /// longer than other calls' timeout).
    pub async fn wake_within(
        &self,
        app: &Name,
        db: &Name,
        limit: Option<Duration>,
    ) -> Result<DatabaseInfo, ClientError> {
        let req = self
            .http
            .post(self.url(&format!("/databases/{app}/{db}/wake")))
            .json(&serde_json::json!({}));
        self.send_within(req, limit).await
    }

    /// Backs `app`/`db` up now (no time limit: a large database takes a while).
    pub async fn backup(&self, app: &Name, db: &Name) -> Result<BackupInfo, ClientError> {
        let req = self
            .http
            .post(self.url(&format!("/databases/{app}/{db}/backups")))
            .json(&serde_json::json!({}));
        self.send_within(req, None).await
    }

    /// The backups of `app`/`db`, oldest first (also of a dropped database).
    pub async fn backups(&self, app: &Name, db: &Name) -> Result<BackupList, ClientError> {
        self.get(&format!("/databases/{app}/{db}/backups")).await
    }

    pub async fn restore(
        &self,
        app: &Name,
        db: &Name,
        request: &RestoreRequest,
    ) -> Result<Restored, ClientError> {
        let req = self
            .http
            .post(self.url(&format!("/databases/{app}/{db}/restore")))
            .json(request);
        self.send_within(req, None).await
    }

    pub async fn hibernate(
        &self,
        app: &Name,
        db: &Name,
        force: bool,
    ) -> Result<DatabaseInfo, ClientError> {
        let q = if force { "?force=true" } else { "" };
        self.post(
            &format!("/databases/{app}/{db}/hibernate{q}"),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn set_pool_mode(
        &self,
        app: &Name,
        db: &Name,
        pool_mode: PoolMode,
    ) -> Result<DatabaseInfo, ClientError> {
        self.post(
            &format!("/databases/{app}/{db}/pool_mode"),
            &SetPoolMode { pool_mode },
        )
        .await
    }

    pub async fn drop_database(
        &self,
        app: &Name,
        db: &Name,
    ) -> Result<serde_json::Value, ClientError> {
        self.send(
            self.http
                .delete(self.url(&format!("/databases/{app}/{db}"))),
        )
        .await
    }

    pub async fn report_activity(
        &self,
        report: &ActivityReport,
    ) -> Result<serde_json::Value, ClientError> {
        self.post("/activity", report).await
    }

    pub async fn scale(&self, req: &ScaleRequest) -> Result<ScalePlan, ClientError> {
        self.post("/cluster/scale", req).await
    }

    /// The CA of the engines' certificates (see [`crate::engine_tls`]).
    pub async fn engine_ca(&self) -> Result<crate::engine_tls::EngineCa, ClientError> {
        self.get("/cluster/engine-ca").await
    }

    pub async fn nodes(&self) -> Result<NodeList, ClientError> {
        self.get("/nodes").await
    }

    pub async fn capacity(&self) -> Result<Capacity, ClientError> {
        self.get("/capacity").await
    }

    pub async fn create_token(&self, role: &Role) -> Result<TokenCreated, ClientError> {
        self.post("/tokens", &CreateToken { role: role.clone() })
            .await
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        self.get("/tokens").await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.send(
            self.http
                .delete(self.url(&format!("/tokens/{}", segment(id)))),
        )
        .await
    }

    /// The raw `/api/v1/events` response, for callers that read the SSE stream.
    pub async fn events(&self) -> Result<reqwest::Response, ClientError> {
        self.authorized(self.http.get(self.url("/events")))
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: self.base.clone(),
                source,
            })
    }
}

/// A path segment from free text (a user name, a key id), percent-encoded
/// so that `/`, `..`, `?` or `#` in it cannot change which resource is
/// asked for.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cannot_leave_their_place_in_the_path() {
        assert_eq!(segment("alice"), "alice");
        assert_eq!(segment("../../databases"), "%2E%2E%2F%2E%2E%2Fdatabases");
        assert_eq!(segment("a?b#c d"), "a%3Fb%23c%20d");
    }
}
