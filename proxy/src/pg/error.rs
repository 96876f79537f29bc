//! What a PostgreSQL client sees when its connection fails: an
//! ErrorResponse with a SQLSTATE and a message that never carries control's
//! or an engine's own words; and the outcome label it is counted under.

use std::time::Duration;

use bytes::BytesMut;
use rouse_runtime::error_kind::ErrorKind;

use super::proto::frame::FrameError;
use super::proto::messages;
use crate::error::ProxyError;

/// What a client sees when its connection fails: a SQLSTATE and a message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgError {
    #[error("{0}")]
    Protocol(String),
    #[error("password authentication failed for user \"{0}\"")]
    Password(String),
    #[error("{0}")]
    Authorization(String),
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    #[error("the database system is starting up: database \"{0}\" is waking, try again")]
    Waking(String),
    #[error("database \"{0}\" is paused by an operator, try again")]
    Paused(String),
    #[error("{0}")]
    Backend(String),
    /// The backend's address did not take the connection: the database
    /// stopped or moved (a stale route).
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Closed(String),
    #[error("sorry, too many clients already")]
    TooManyClients,
    #[error("too many new connections for this app: retry in {0:?}")]
    RateLimited(Duration),
    #[error("too many failed logins from this address: retry in {0:?}")]
    FailedLogins(Duration),
    #[error("too many connections are logging in: try again")]
    PendingLogins,
    #[error("{0}")]
    AppLimit(String),
    /// The node's active set is full: "starting up" as a wake that
    /// timed out, with the limit named.
    #[error("{0}")]
    Full(String),
}

impl PgError {
    pub(crate) fn sqlstate(&self) -> &'static str {
        match self {
            PgError::Protocol(_) | PgError::Closed(_) => "08P01",
            PgError::Password(_) => "28P01",
            PgError::Authorization(_) => "28000",
            PgError::UnknownDatabase(_) => "3D000",
            PgError::Waking(_) | PgError::Paused(_) | PgError::Full(_) => "57P03",
            PgError::Backend(_) | PgError::Unreachable(_) => "08006",
            PgError::TooManyClients
            | PgError::RateLimited(_)
            | PgError::FailedLogins(_)
            | PgError::PendingLogins
            | PgError::AppLimit(_) => "53300",
        }
    }

    /// What the client is told: a backend failure's detail (control's or
    /// the engine's words) goes to the log, never to the client.
    pub(crate) fn client_message(&self) -> String {
        match self {
            PgError::Backend(_) | PgError::Unreachable(_) => {
                "the database is unavailable, try again".into()
            }
            other => other.to_string(),
        }
    }

    /// The FATAL ErrorResponse that tells the client.
    pub(crate) fn frame(&self) -> BytesMut {
        messages::fatal(self.sqlstate(), &self.client_message())
    }

    /// The outcome label of `rouse_requests_total`.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            PgError::Protocol(_) | PgError::UnknownDatabase(_) | PgError::Closed(_) => {
                ErrorKind::User
            }
            PgError::Password(_) | PgError::Authorization(_) => ErrorKind::Auth,
            PgError::Waking(_) | PgError::Paused(_) => ErrorKind::WakeTimeout,
            PgError::Full(_) => ErrorKind::Capacity,
            PgError::Backend(_) | PgError::Unreachable(_) => ErrorKind::Backend,
            PgError::TooManyClients
            | PgError::RateLimited(_)
            | PgError::FailedLogins(_)
            | PgError::PendingLogins
            | PgError::AppLimit(_) => ErrorKind::RateLimit,
        }
    }
}

impl PgError {
    /// A failure to find or wake `database`, as the client is told it.
    pub(super) fn resolving(e: ProxyError, database: &str) -> PgError {
        match e {
            ProxyError::NotFound => PgError::UnknownDatabase(database.to_string()),
            ProxyError::WakeTimeout { .. } | ProxyError::QueueFull(_) => {
                PgError::Waking(database.to_string())
            }
            e @ ProxyError::AppLimit { .. } => PgError::AppLimit(e.to_string()),
            e @ ProxyError::ActiveSetFull(_) => PgError::Full(e.to_string()),
            other => PgError::Backend(other.to_string()),
        }
    }

    /// A refusal by the rate limits of new connections.
    pub(super) fn admitting(e: ProxyError) -> PgError {
        match e {
            ProxyError::RateLimited(wait) => PgError::RateLimited(wait),
            other => PgError::Backend(other.to_string()),
        }
    }
}

impl From<FrameError> for PgError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Closed | FrameError::Io(_) => PgError::Closed(e.to_string()),
            FrameError::BadLength(..) => PgError::Protocol(format!("invalid message: {e}")),
        }
    }
}

pub(super) fn closed(e: std::io::Error) -> PgError {
    PgError::Closed(e.to_string())
}
