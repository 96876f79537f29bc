//! The admin console on the PostgreSQL port, PgBouncer's: database `rouse`
//! (or `pgbouncer`, so that its scripts and exporters work unchanged), as
//! user `admin` with an admin token of control as password, or as a login
//! `proxy.admin_users` names. It speaks simple queries only: SHOW, PAUSE,
//! RESUME, RECONNECT, KILL and RELOAD.

pub(crate) mod commands;
mod show;
mod stats;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::BytesMut;
use rouse_control_api::{ClientError, DbKey, Name};
use tokio::io::AsyncWriteExt;
use tracing::info;

use super::error::{closed, PgError};
use super::proto::frame::{read_frame, typed, MAX_AUTH_MESSAGE};
use super::proto::tags::frontend;
use super::proto::{messages, results};
use super::PgFront;
use crate::net::MaybeTls;
use commands::Command;

/// The names the console answers to.
const DATABASES: [&str; 2] = ["rouse", "pgbouncer"];
/// The user that logs in with an admin token.
const ADMIN: &str = "admin";
/// The longest token taken as a password.
const MAX_TOKEN: usize = 512;

/// Whether a startup asks for the console.
pub(super) fn wanted(params: &BTreeMap<String, String>) -> bool {
    params
        .get("database")
        .is_some_and(|d| DATABASES.contains(&d.as_str()))
}

impl PgFront {
    /// Logs an operator in: `admin` with a token control takes for an
    /// admin-only call (in clear inside the connection, so only over TLS or
    /// from loopback), or a login of `proxy.admin_users` by SCRAM. Who it
    /// is, for the log.
    pub(super) async fn console_login(
        &self,
        client: &mut MaybeTls,
        buf: &mut BytesMut,
        params: &BTreeMap<String, String>,
        peer: SocketAddr,
    ) -> Result<String, PgError> {
        let user = params
            .get("user")
            .cloned()
            .ok_or_else(|| PgError::Authorization("no user name given".into()))?;
        self.failed_logins
            .check(peer.ip())
            .map_err(PgError::FailedLogins)?;
        let admitted = if user == ADMIN {
            if matches!(client, MaybeTls::Plain(_)) && !peer.ip().is_loopback() {
                return Err(PgError::Authorization(
                    "the admin console takes a token only over TLS (sslmode=require) or from loopback"
                        .into(),
                ));
            }
            client
                .write_all(&results::auth_cleartext())
                .await
                .map_err(closed)?;
            let (tag, body) = typed(read_frame(client, buf, true, MAX_AUTH_MESSAGE).await?);
            if tag != frontend::SASL_RESPONSE {
                return Err(PgError::Protocol("expected a PasswordMessage".into()));
            }
            let token = results::parse_password(&body)
                .ok_or_else(|| PgError::Protocol("malformed PasswordMessage".into()))?;
            self.is_admin_token(&token).await?
        } else if self.admin_users.contains(&user) {
            // The configuration admits only `<user>.<app>` here.
            let (role, app) = user.rsplit_once('.').unwrap_or_default();
            let app = Name::new(app)
                .map_err(|_| PgError::Authorization(format!("invalid app in \"{user}\"")))?;
            let verifier = self.verifier(&app, role).await?;
            super::login::authenticate(client, buf, &verifier, &user)
                .await
                .is_ok()
        } else {
            false
        };
        if !admitted {
            self.failed_logins.record(peer.ip());
            return Err(PgError::Password(user));
        }
        let mut out = Vec::new();
        out.push(messages::auth_ok());
        for (name, value) in [
            ("server_version", "16.0 (rouse console)"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
        ] {
            out.push(results::parameter_status(name, value));
        }
        out.push(messages::backend_key_data(rand::random(), rand::random()));
        out.push(messages::ready_for_query_idle());
        write_all(client, &out).await?;
        info!(%peer, user = %user, "admin console session started");
        Ok(user)
    }

    /// Whether control takes `token` for an admin-only call.
    async fn is_admin_token(&self, token: &str) -> Result<bool, PgError> {
        if token.is_empty()
            || token.len() > MAX_TOKEN
            || !token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Ok(false);
        }
        match self.control.clone().with_token(token).list_tokens().await {
            Ok(_) => Ok(true),
            Err(ClientError::Api {
                status: 401 | 403, ..
            }) => Ok(false),
            Err(e) => Err(PgError::Backend(format!("control unavailable: {e}"))),
        }
    }

    /// Answers the operator's commands until it leaves.
    pub(super) async fn console(&self, client: &mut MaybeTls, buf: &mut BytesMut, who: &str) {
        loop {
            let Ok(frame) = read_frame(client, buf, true, commands::MAX_COMMAND + 64).await else {
                return;
            };
            let (tag, body) = typed(frame);
            let out = match tag {
                frontend::QUERY => {
                    let parsed = results::parse_query(&body)
                        .ok_or_else(|| "malformed Query".to_string())
                        .and_then(|q| commands::parse(&q));
                    match parsed {
                        Ok(command) => {
                            info!(user = %who, command = ?command, "admin console command");
                            self.run(command).await
                        }
                        Err(e) => vec![results::error("42601", &e)],
                    }
                }
                frontend::TERMINATE => return,
                _ => {
                    let fatal =
                        messages::fatal("0A000", "the admin console takes simple queries only");
                    let _ = write_all(client, &[fatal]).await;
                    return;
                }
            };
            let mut out = out;
            out.push(messages::ready_for_query_idle());
            if write_all(client, &out).await.is_err() {
                return;
            }
        }
    }

    async fn run(&self, command: Command) -> Vec<BytesMut> {
        let done = |tag: &str| vec![results::command_complete(tag)];
        match command {
            Command::Show(what) => {
                let (columns, rows) = self.show(what).await;
                let mut out = vec![results::row_description(columns, show::is_number)];
                out.extend(rows.iter().map(|r| results::data_row(r)));
                out.push(results::command_complete("SHOW"));
                out
            }
            Command::Pause(key) => {
                self.clients.pause(key.as_ref());
                // As PgBouncer's, PAUSE answers once the transactions under
                // way have ended (new ones are held from now on).
                let deadline = tokio::time::Instant::now() + self.pause_hold;
                while self.leased(key.as_ref()) > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                done("PAUSE")
            }
            Command::Resume(key) => {
                self.clients.resume(key.as_ref());
                done("RESUME")
            }
            Command::Reconnect(key) => {
                self.reconnect_pools(key.as_ref());
                done("RECONNECT")
            }
            Command::Kill(key) => {
                let killed = self.clients.kill(&key);
                self.reconnect_pools(Some(&key));
                info!(database = %key, sessions = killed, "killed from the admin console");
                done("KILL")
            }
            Command::Reload => {
                // Exactly what `kill -HUP` does: the file is read again.
                // SAFETY: kill(2) on this process with a handled signal.
                unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
                done("RELOAD")
            }
        }
    }

    /// Transaction-pool connections of `key` (or all) lent to a client.
    fn leased(&self, key: Option<&DbKey>) -> usize {
        self.pools
            .lock()
            .expect("pools poisoned")
            .iter()
            .filter(|((k, _, _), _)| key.is_none_or(|key| key == k))
            .map(|(_, pool)| pool.counts().active)
            .sum()
    }

    /// Pooled server connections of `key` (or all) are made anew.
    fn reconnect_pools(&self, key: Option<&DbKey>) {
        for ((k, _, _), pool) in self.pools.lock().expect("pools poisoned").iter() {
            if key.is_none_or(|key| key == k) {
                pool.reconnect();
            }
        }
    }
}

async fn write_all(client: &mut MaybeTls, frames: &[BytesMut]) -> Result<(), PgError> {
    let mut out = tokio::io::BufWriter::new(client);
    for f in frames {
        out.write_all(f).await.map_err(closed)?;
    }
    out.flush().await.map_err(closed)
}
