//! Logging a client in: the startup (TLS or not), which role and app it
//! is (`user.app`, the TLS server name, or `options=-c rouse.app=<app>`),
//! and SCRAM-SHA-256 with the client against the role's stored verifier.
//! An unknown role or app looks exactly like a wrong password.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use rouse_control_api::{DbKey, Name};
use tokio::io::AsyncWriteExt;

use super::error::{closed, PgError};
use super::proto::frame::{read_frame, typed, MAX_AUTH_MESSAGE, MAX_STARTUP};
use super::proto::messages;
use super::proto::results;
use super::proto::startup::{self, Startup};
use super::proto::tags::frontend;
use super::scram::{self, ScramError, ServerExchange, Verifier};
use super::PgFront;
use crate::net::MaybeTls;

/// Login verifiers as control gave them, kept briefly: a login changed or
/// removed is forgotten as soon as control announces it, so it stops
/// working on every proxy at once.
#[derive(Clone)]
pub(crate) struct Verifiers(moka::future::Cache<(Name, String), Option<Arc<Verifier>>>);

impl Default for Verifiers {
    fn default() -> Self {
        Verifiers(
            moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(30))
                .build(),
        )
    }
}

impl Verifiers {
    pub(crate) async fn forget(&self, app: &Name, role: &str) {
        self.0.invalidate(&(app.clone(), role.to_string())).await;
    }

    /// After a gap in control's news.
    pub(crate) fn forget_all(&self) {
        self.0.invalidate_all();
    }
}

/// A client that proved who it is.
pub(super) struct Login {
    pub(super) role: String,
    pub(super) app: Name,
    /// The database's name as the client gave it.
    pub(super) database: String,
    pub(super) key: DbKey,
    /// The startup parameters to pass on to the backend.
    pub(super) params: BTreeMap<String, String>,
    pub(super) verifier: Arc<Verifier>,
    /// What the client proved with SCRAM: what logs in to the backend.
    pub(super) client_key: [u8; 32],
}

pub(super) fn login_timed_out(_: tokio::time::error::Elapsed) -> PgError {
    PgError::Protocol("login not completed in time".into())
}

impl PgFront {
    /// The startup: SSLRequest (answered `S` and TLS when TLS is on) and
    /// GSSENCRequest (declined) until the StartupMessage's parameters.
    /// `None` when the connection was a cancel request (then acted on).
    pub(super) async fn negotiate(
        &self,
        client: &mut MaybeTls,
        buf: &mut BytesMut,
    ) -> Result<Option<BTreeMap<String, String>>, PgError> {
        loop {
            let frame = read_frame(client, buf, false, MAX_STARTUP).await?;
            match startup::parse(frame).map_err(|e| PgError::Protocol(e.to_string()))? {
                Startup::SslRequest => match (&self.tls, &*client) {
                    (Some(tls), MaybeTls::Plain(_)) => {
                        // Bytes sent before the answer would bypass TLS: refuse them.
                        if !buf.is_empty() {
                            return Err(PgError::Protocol(
                                "data received before the TLS handshake".into(),
                            ));
                        }
                        client.write_all(b"S").await.map_err(closed)?;
                        let MaybeTls::Plain(tcp) = std::mem::replace(client, MaybeTls::Upgrading)
                        else {
                            unreachable!("matched MaybeTls::Plain above")
                        };
                        let tls = tls
                            .accept(tcp)
                            .await
                            .map_err(|e| PgError::Protocol(format!("TLS handshake failed: {e}")))?;
                        *client = MaybeTls::Tls(Box::new(tls.into()));
                    }
                    _ => client.write_all(b"N").await.map_err(closed)?,
                },
                // GSS encryption is declined; libpq then goes on.
                Startup::GssEncRequest => client.write_all(b"N").await.map_err(closed)?,
                Startup::Cancel { pid, secret } => {
                    self.cancels.cancel(pid, secret).await;
                    return Ok(None);
                }
                Startup::Params(_) if self.require_tls && matches!(client, MaybeTls::Plain(_)) => {
                    return Err(PgError::Authorization(
                        "this server requires TLS: connect with sslmode=require".into(),
                    ))
                }
                Startup::Params(params) => return Ok(Some(params)),
            }
        }
    }

    /// Who the client is, proven with SCRAM by `deadline`; failed
    /// passwords count against `peer`'s address.
    pub(super) async fn login(
        &self,
        client: &mut MaybeTls,
        buf: &mut BytesMut,
        params: BTreeMap<String, String>,
        peer: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Result<Login, PgError> {
        let sni_app = client
            .sni()
            .and_then(|sni| sni_app(sni, self.base_domain.as_deref()));
        let (role, app, params) = route(params, sni_app)?;
        let database = params
            .get("database")
            .cloned()
            .unwrap_or_else(|| role.clone());
        let db = Name::new(&database).map_err(|_| PgError::UnknownDatabase(database.clone()))?;
        let key = DbKey::new(app.clone(), db);

        self.failed_logins
            .check(peer.ip())
            .map_err(PgError::FailedLogins)?;
        let (verifier, client_key) = tokio::time::timeout_at(deadline, async {
            let verifier = self.verifier(&app, &role).await?;
            let client_key = match client {
                // The serverless drivers send the password with the
                // startup, unasked: a cleartext login, inside the
                // WebSocket's TLS.
                MaybeTls::WebSocket(_) => self.cleartext_login(client, buf, &verifier, &role).await,
                _ => authenticate(client, buf, &verifier, &role).await,
            };
            if matches!(client_key, Err(PgError::Password(_))) {
                self.failed_logins.record(peer.ip());
            }
            Ok::<_, PgError>((verifier, client_key?))
        })
        .await
        .map_err(login_timed_out)??;
        Ok(Login {
            role,
            app,
            database,
            key,
            params,
            verifier,
            client_key,
        })
    }

    /// The role's verifier, or one no password matches when the role or
    /// app is unknown or the role is not a valid name (which is never
    /// looked up).
    pub(super) async fn verifier(&self, app: &Name, role: &str) -> Result<Arc<Verifier>, PgError> {
        let impossible = || {
            Arc::new(Verifier::impossible(
                &self.mock_key,
                &format!("{role}.{app}"),
            ))
        };
        if rouse_control_api::name::validate_user_name(role).is_err() {
            return Ok(impossible());
        }
        let control = self.control.clone();
        let (a, r) = (app.clone(), role.to_string());
        let found = self
            .verifiers
            .0
            .try_get_with((app.clone(), role.to_string()), async move {
                match control.get_user(&a, &r).await {
                    Ok(u) => Ok(Verifier::parse(&u.scram_verifier).map(Arc::new)),
                    Err(e) if e.is_not_found() => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await
            .map_err(|e| PgError::Backend(format!("control unavailable: {e}")))?;
        // Unknown users fail exactly like a wrong password.
        Ok(found.unwrap_or_else(impossible))
    }
}

/// The app named by a TLS server name `<db>.<app>.<base_domain>`.
pub(super) fn sni_app(sni: &str, base_domain: Option<&str>) -> Option<Name> {
    let sub = sni.strip_suffix(base_domain?)?.strip_suffix('.')?;
    let (_db, app) = sub.split_once('.')?;
    Name::new(app).ok()
}

/// Role, app and the parameters to pass on: the app from `user.app`, else
/// from the TLS server name, else from `options=-c rouse.app=<app>` (which
/// is then removed).
pub(super) fn route(
    mut params: BTreeMap<String, String>,
    sni_app: Option<Name>,
) -> Result<(String, Name, BTreeMap<String, String>), PgError> {
    let user = params
        .get("user")
        .cloned()
        .ok_or_else(|| PgError::Authorization("no user name given".into()))?;
    if let Some((role, app)) = user.rsplit_once('.') {
        let app = Name::new(app)
            .map_err(|_| PgError::Authorization(format!("invalid app in user name \"{user}\"")))?;
        return Ok((role.to_string(), app, params));
    }
    let mut app = sni_app.map(|a| a.to_string());
    if let Some(options) = params.get("options").cloned() {
        let mut kept = Vec::new();
        let mut words = options.split_whitespace().peekable();
        while let Some(w) = words.next() {
            let setting = match w {
                "-c" => words.next().unwrap_or_default().to_string(),
                other => match other.strip_prefix("-c") {
                    Some(s) if !s.is_empty() => s.to_string(),
                    _ => {
                        kept.push(other.to_string());
                        continue;
                    }
                },
            };
            match setting.strip_prefix("rouse.app=") {
                Some(a) => app = app.or(Some(a.to_string())),
                None => kept.push(format!("-c {setting}")),
            }
        }
        if kept.is_empty() {
            params.remove("options");
        } else {
            params.insert("options".into(), kept.join(" "));
        }
    }
    let app = app.ok_or_else(|| {
        PgError::Authorization(format!(
            "cannot tell the app of user \"{user}\": connect as <user>.<app> or with options=-c rouse.app=<app>"
        ))
    })?;
    let app =
        Name::new(&app).map_err(|_| PgError::Authorization(format!("invalid app \"{app}\"")))?;
    Ok((user, app, params))
}

impl PgFront {
    /// A cleartext password exchange; the ClientKey the password gives.
    async fn cleartext_login(
        &self,
        client: &mut MaybeTls,
        buf: &mut BytesMut,
        verifier: &Arc<Verifier>,
        role: &str,
    ) -> Result<[u8; 32], PgError> {
        client
            .write_all(&results::auth_cleartext())
            .await
            .map_err(closed)?;
        client.flush().await.map_err(closed)?;
        let (tag, body) = typed(read_frame(client, buf, true, MAX_AUTH_MESSAGE).await?);
        if tag != frontend::SASL_RESPONSE {
            return Err(PgError::Protocol("expected a PasswordMessage".into()));
        }
        let password = results::parse_password(&body)
            .ok_or_else(|| PgError::Protocol("malformed PasswordMessage".into()))?;
        self.cleartext_key(verifier, &password)
            .await
            .ok_or_else(|| PgError::Password(role.to_string()))
    }
}

/// SCRAM-SHA-256 with the client; the proven ClientKey on success.
pub(super) async fn authenticate(
    client: &mut MaybeTls,
    buf: &mut BytesMut,
    verifier: &Verifier,
    role: &str,
) -> Result<[u8; 32], PgError> {
    let wrong = || PgError::Password(role.to_string());
    client
        .write_all(&messages::auth_sasl())
        .await
        .map_err(closed)?;
    let (tag, body) = typed(read_frame(client, buf, true, MAX_AUTH_MESSAGE).await?);
    if tag != frontend::SASL_RESPONSE {
        return Err(PgError::Protocol("expected a SASLInitialResponse".into()));
    }
    let (mechanism, first) = messages::parse_sasl_initial(body)
        .ok_or_else(|| PgError::Protocol("malformed SASLInitialResponse".into()))?;
    if mechanism != scram::MECHANISM {
        return Err(PgError::Protocol(format!(
            "unsupported SASL mechanism {mechanism}"
        )));
    }
    let (exchange, server_first) =
        ServerExchange::start(verifier, &first).map_err(|e| match e {
            ScramError::ChannelBinding => PgError::Protocol(
                "channel binding is not supported: use channel_binding=disable or prefer".into(),
            ),
            _ => PgError::Protocol(e.to_string()),
        })?;
    client
        .write_all(&messages::auth_sasl_continue(&server_first))
        .await
        .map_err(closed)?;
    let (tag, body) = typed(read_frame(client, buf, true, MAX_AUTH_MESSAGE).await?);
    if tag != frontend::SASL_RESPONSE {
        return Err(PgError::Protocol("expected a SASLResponse".into()));
    }
    let last = String::from_utf8(body.to_vec()).map_err(|_| wrong())?;
    let (client_key, server_final) = exchange.finish(verifier, &last).map_err(|_| wrong())?;
    client
        .write_all(&messages::auth_sasl_final(&server_final))
        .await
        .map_err(closed)?;
    Ok(client_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_of(
        p: BTreeMap<String, String>,
    ) -> Result<(String, Name, BTreeMap<String, String>), PgError> {
        route(p, None)
    }

    #[test]
    fn app_from_the_tls_server_name() {
        assert_eq!(
            sni_app("users.shop.db.example", Some("db.example")),
            Some(Name::new("shop").unwrap())
        );
        assert_eq!(sni_app("users.shop.other", Some("db.example")), None);
        assert_eq!(sni_app("shop.db.example", Some("db.example")), None);
        let (role, app, _) =
            route(params(&[("user", "alice")]), sni_app("u.shop.x", Some("x"))).unwrap();
        assert_eq!((role.as_str(), app.as_str()), ("alice", "shop"));
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn app_from_user_suffix_or_options() {
        let (role, app, _) = route_of(params(&[("user", "alice.shop")])).unwrap();
        assert_eq!((role.as_str(), app.as_str()), ("alice", "shop"));
        let (role, app, rest) = route_of(params(&[
            ("user", "alice"),
            ("options", "-c rouse.app=shop -c search_path=x"),
        ]))
        .unwrap();
        assert_eq!((role.as_str(), app.as_str()), ("alice", "shop"));
        assert_eq!(rest["options"], "-c search_path=x");
        let (_, _, rest) = route_of(params(&[
            ("user", "alice"),
            ("options", "-crouse.app=shop"),
        ]))
        .unwrap();
        assert!(!rest.contains_key("options"));
        assert!(matches!(
            route_of(params(&[("user", "alice")])),
            Err(PgError::Authorization(_))
        ));
        assert!(matches!(
            route_of(params(&[("user", "alice.Bad_App")])),
            Err(PgError::Authorization(_))
        ));
        assert!(matches!(
            route_of(params(&[])),
            Err(PgError::Authorization(_))
        ));
    }
}
