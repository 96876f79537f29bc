//! SQL over HTTP, the Postgres side: a request names a role, app, password
//! and database as a connection string does; it is checked as a login is
//! (the password against the role's SCRAM verifier, failed logins counted,
//! the app's limits), the database is woken as for a session, and the
//! statements run in one pipeline on a connection of the (database, role)
//! pool, so a request after the first costs no backend login. The HTTP
//! front owns the JSON; this owns everything below it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rouse_config::MemberRole;
use rouse_control_api::name::API_USER;
use rouse_control_api::{DbKey, Engine, Name};

use super::backend::BackendTarget;
use super::error::PgError;
use super::login::{route, sni_app};
use super::proto::extended::{self, Answer, StatementError};
use super::scram::Verifier;
use super::PgFront;
use crate::fleet::ratelimit::Protocol;
use crate::resolve::Target;

/// Most bytes of rows one request answers with.
pub(crate) const MAX_ANSWER: usize = 10 << 20;
/// How long a request's statements may run (the gateway's query timeout).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Who asks, as a connection string says it.
pub(crate) struct SqlLogin {
    /// `role.app`, or `role` with the app in the host name.
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) database: String,
    /// `<db>.<app>.<base_domain>` names the app when the user does not.
    pub(crate) host: String,
}

/// A login a connection string named, before its password is checked.
pub(crate) struct Identified {
    pub(crate) key: DbKey,
    role: String,
    app: Name,
    database: String,
    password: String,
}

pub(crate) struct Statement {
    pub(crate) sql: String,
    /// Text parameters; `None` is NULL.
    pub(crate) params: Vec<Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isolation {
    Serializable,
    RepeatableRead,
    ReadCommitted,
    ReadUncommitted,
}

impl Isolation {
    fn sql(self) -> &'static str {
        match self {
            Isolation::Serializable => "SERIALIZABLE",
            Isolation::RepeatableRead => "REPEATABLE READ",
            Isolation::ReadCommitted => "READ COMMITTED",
            Isolation::ReadUncommitted => "READ UNCOMMITTED",
        }
    }
}

/// A batch runs all-or-nothing in one transaction of these properties.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    pub(crate) isolation: Option<Isolation>,
    pub(crate) read_only: bool,
    pub(crate) deferrable: bool,
}

impl Batch {
    fn begin(self) -> String {
        let mut sql = String::from("BEGIN");
        if let Some(level) = self.isolation {
            sql.push_str(" ISOLATION LEVEL ");
            sql.push_str(level.sql());
        }
        if self.read_only {
            sql.push_str(" READ ONLY");
        }
        if self.deferrable {
            sql.push_str(" DEFERRABLE");
        }
        sql
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SqlError {
    /// Refused before any statement ran: the login, a limit, the wake.
    #[error(transparent)]
    Refused(#[from] PgError),
    #[error(transparent)]
    Statement(#[from] StatementError),
    /// The database's own ErrorResponse, by field code; the statements
    /// before it in a batch were rolled back.
    #[error("{}", message(.0))]
    Postgres(Vec<(u8, String)>),
    #[error("the answer is larger than {MAX_ANSWER} bytes")]
    TooLarge,
}

/// The message of an ErrorResponse's fields.
pub(crate) fn message(fields: &[(u8, String)]) -> &str {
    fields
        .iter()
        .find_map(|(code, text)| (*code == b'M').then_some(text.as_str()))
        .unwrap_or("error")
}

impl PgFront {
    /// Who a connection string names: role, app and database, checked as
    /// the Postgres port checks a startup's (nothing is looked up yet).
    pub(crate) fn identify(&self, login: SqlLogin) -> Result<Identified, PgError> {
        let params = BTreeMap::from([
            ("user".to_string(), login.user),
            ("database".to_string(), login.database.clone()),
        ]);
        let host = login.host.split(':').next().unwrap_or_default();
        let (role, app, _) = route(params, sni_app(host, self.base_domain.as_deref()))?;
        let database = login.database;
        let db = Name::new(&database).map_err(|_| PgError::UnknownDatabase(database.clone()))?;
        Ok(Identified {
            key: DbKey::new(app.clone(), db),
            role,
            app,
            database,
            password: login.password,
        })
    }

    /// Runs `statements` as `who` from `peer`: each in a transaction of its
    /// own or, with `batch`, all in one.
    pub(crate) async fn run_sql(
        &self,
        peer: IpAddr,
        who: Identified,
        statements: &[Statement],
        batch: Option<Batch>,
    ) -> Result<Vec<Answer>, SqlError> {
        let Identified {
            key,
            role,
            app,
            database,
            password,
        } = who;
        self.failed_logins
            .check(peer)
            .map_err(PgError::FailedLogins)?;
        let verifier = self.verifier(&app, &role).await?;
        let Some(client_key) = self.cleartext_key(&verifier, &password).await else {
            self.failed_logins.record(peer);
            return Err(PgError::Password(role).into());
        };
        self.limits
            .check(&self.fleet, Protocol::Http, &app, || role.clone())
            .await
            .map_err(PgError::admitting)?;
        let target = self.waking(&key, &database).await?;
        let backend_role = match target.engine {
            Engine::Patroni => rouse_control_api::name::cluster_role(&role, &app),
            _ => role,
        };
        let as_role = (backend_role.as_str(), &verifier, client_key);
        self.run_statements(&key, &database, &target, as_role, statements, batch)
            .await
    }

    /// Runs `statements` on the managed PostgreSQL database `key` for the
    /// app's API credentials (the gateway API), as the database's API login.
    pub(crate) async fn run_for_app(
        &self,
        key: &DbKey,
        target: &Target,
        statements: &[Statement],
        batch: Option<Batch>,
    ) -> Result<Vec<Answer>, SqlError> {
        let database = key.db.to_string();
        let login = match (&target.engine, &target.api_login) {
            (Engine::Postgres, Some(login)) => login.clone(),
            _ => return Err(PgError::UnknownDatabase(database).into()),
        };
        let (verifier, client_key) = self
            .api_logins
            .try_get_with(login.password.clone(), async move {
                tokio::task::spawn_blocking(move || {
                    let verifier = Verifier::parse(&login.scram_verifier())?;
                    let key = verifier.client_key_for(&login.password)?;
                    Some((Arc::new(verifier), key))
                })
                .await
                .ok()
                .flatten()
                .ok_or(())
            })
            .await
            .map_err(|_| PgError::Backend("the API login's verifier cannot be made".into()))?;
        let as_role = (API_USER, &verifier, client_key);
        self.run_statements(key, &database, target, as_role, statements, batch)
            .await
    }

    /// The database's route, woken if need be, unless an operator paused it.
    async fn waking(&self, key: &DbKey, database: &str) -> Result<Target, PgError> {
        if !self.clients.unpaused(key, self.pause_hold).await {
            return Err(PgError::Paused(database.to_string()));
        }
        self.resolver
            .target(key)
            .await
            .map_err(|e| PgError::resolving(e, database))
    }

    /// Runs `statements` on `target` as a role (name, verifier, proven key),
    /// on a connection of the role's pool.
    async fn run_statements(
        &self,
        key: &DbKey,
        database: &str,
        target: &Target,
        (role, verifier, client_key): (&str, &Arc<Verifier>, [u8; 32]),
        statements: &[Statement],
        batch: Option<Batch>,
    ) -> Result<Vec<Answer>, SqlError> {
        let _app_slot = self
            .quotas
            .session(key)
            .map_err(|e| PgError::AppLimit(e.to_string()))?;
        let upstream = match target.engine {
            Engine::Rqlite => return Err(PgError::UnknownDatabase(database.to_string()).into()),
            Engine::Postgres => BackendTarget::Managed,
            Engine::Patroni => {
                BackendTarget::Cluster(self.cluster(key, target)?, MemberRole::Primary)
            }
        };
        let (frames, sql) = pipeline(statements, batch)?;
        let _in_flight = self.activity.begin(key);
        let pool = self.pool(key, role, database, verifier, client_key, false);
        // A pooled connection whose backend went away before answering
        // (the database slept, moved or restarted) is tried once more on
        // a new one, resolved afresh.
        let mut stale = false;
        let finished = loop {
            let conn = match &upstream {
                BackendTarget::Managed if !stale => {
                    self.connect_managed(key, database, target, |addr| pool.checkout(addr))
                        .await?
                }
                _ => {
                    pool.checkout(upstream.addr(key, &self.resolver, stale).await?)
                        .await?
                }
            };
            match pool
                .run_pipeline(conn, &frames, &sql, MAX_ANSWER, STATEMENT_TIMEOUT)
                .await
            {
                Err(PgError::Unreachable(_)) if !stale => stale = true,
                other => break other?,
            }
        };
        if let Some(fields) = finished.error {
            return Err(SqlError::Postgres(fields));
        }
        if finished.too_large {
            return Err(SqlError::TooLarge);
        }
        let mut answers = finished.answers;
        if batch.is_some() && answers.len() >= 2 {
            // BEGIN's and COMMIT's own answers.
            answers.pop();
            answers.remove(0);
        }
        Ok(answers)
    }

    /// The ClientKey a cleartext `password` gives, when it is the role's.
    /// The key derivation (thousands of HMACs) runs once per password and
    /// verifier, not once per request.
    pub(super) async fn cleartext_key(
        &self,
        verifier: &Arc<Verifier>,
        password: &str,
    ) -> Option<[u8; 32]> {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.mock_key)
            .expect("HMAC takes any key length");
        mac.update(&verifier.salt);
        mac.update(verifier.stored_key());
        mac.update(password.as_bytes());
        let id: [u8; 32] = mac.finalize().into_bytes().into();
        if let Some(key) = self.cleartext_keys.get(&id).await {
            return Some(key);
        }
        let (verifier, password) = (verifier.clone(), password.to_string());
        let key = tokio::task::spawn_blocking(move || verifier.client_key_for(&password))
            .await
            .ok()
            .flatten()?;
        self.cleartext_keys.insert(id, key).await;
        Some(key)
    }
}

/// The messages of `statements`, inside BEGIN ... COMMIT for a batch, and
/// the SQL they carry.
fn pipeline(
    statements: &[Statement],
    batch: Option<Batch>,
) -> Result<(BytesMut, Vec<&str>), StatementError> {
    let mut frames = BytesMut::with_capacity(256);
    if let Some(batch) = batch {
        extended::statement(&mut frames, &batch.begin(), &[])?;
    }
    for s in statements {
        extended::statement(&mut frames, &s.sql, &s.params)?;
    }
    if batch.is_some() {
        extended::statement(&mut frames, "COMMIT", &[])?;
    }
    frames.extend_from_slice(&extended::sync());
    Ok((frames, statements.iter().map(|s| s.sql.as_str()).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_opens_the_transaction_it_was_asked_for() {
        assert_eq!(Batch::default().begin(), "BEGIN");
        let strict = Batch {
            isolation: Some(Isolation::Serializable),
            read_only: true,
            deferrable: true,
        };
        assert_eq!(
            strict.begin(),
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"
        );
    }

    #[test]
    fn a_batch_is_wrapped_and_synced_once() {
        let s = [Statement {
            sql: "SELECT 1".into(),
            params: vec![],
        }];
        let (alone, _) = pipeline(&s, None).unwrap();
        let (batch, sql) = pipeline(&s, Some(Batch::default())).unwrap();
        // Parse, Bind, Describe, Execute per statement, then one Sync.
        let count = |b: &BytesMut, tag: u8| {
            let mut n = 0;
            let mut rest = &b[..];
            while !rest.is_empty() {
                let len = 1 + u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                n += usize::from(rest[0] == tag);
                rest = &rest[len..];
            }
            n
        };
        assert_eq!((count(&alone, b'P'), count(&alone, b'S')), (1, 1));
        assert_eq!((count(&batch, b'P'), count(&batch, b'S')), (3, 1));
        assert_eq!(sql, ["SELECT 1"]);
    }
}
