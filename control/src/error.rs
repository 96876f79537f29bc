//! Errors of the control daemon. Each knows the HTTP status and machine code
//! a caller sees, and its kind, which is also the `kind` label of
//! `rouse_control_errors_total`.

use hyper::StatusCode;
use rouse_control_api::{ErrorCode, NameError};
use rouse_runtime::error_kind::ErrorKind;

/// Serialisable so that a peer's refusal reaches the caller as it was made
/// (see [`ControlError::portable`]).
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ControlError {
    #[error("{0}")]
    #[serde(skip)]
    InvalidName(#[from] NameError),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body over {0} bytes")]
    BodyTooLarge(usize),
    /// No token, or one that is unknown or revoked.
    #[error("a valid bearer token is required (Authorization: Bearer <token>)")]
    Unauthorized,
    /// A valid token whose role does not allow this call (never crosses
    /// to a peer: only the API refuses calls).
    #[error("role {role} may not {action}")]
    #[serde(skip)]
    Forbidden { role: String, action: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Refused because proxies report open sessions.
    #[error("{0}")]
    InUse(String),
    /// The app is at one of its limits (`apps:`); `limit` names it.
    #[error("app {app} is at its limit {limit} = {max}")]
    AppLimit {
        app: String,
        limit: AppLimit,
        max: u32,
    },
    #[error("max_databases reached: this node holds {held} of at most {max} databases")]
    MaxDatabases { held: u32, max: u32 },
    /// A wake found the node's active set full of databases in use, and
    /// waited its turn in vain; `limit` names the limit.
    #[error("{limit} reached: every database running on this node has open sessions")]
    ActiveSetFull { limit: String },
    #[error("no free port in range {start}-{end}")]
    PortsExhausted { start: u16, end: u16 },
    #[error("insufficient nodes for one replica each: got {got}, need {need}")]
    InsufficientNodes { got: u32, need: u32 },
    /// Another node, needed for this, cannot be reached or does not answer.
    #[error("{0}")]
    Peer(String),
    /// The engine did not start or did not answer its first query.
    #[error("{0}")]
    Engine(String),
    #[error("metadata store unavailable: {0}")]
    Store(String),
    /// The backup destination failed (unreachable, refused, not found).
    #[error("backup: {0}")]
    Backup(String),
    /// A backup that does not match its checksum.
    #[error("backup {id} is corrupt: {why}; it is not restored")]
    CorruptBackup { id: String, why: String },
    /// A restore that would overwrite data, without `force`.
    #[error("{0} has data; restore with force to overwrite it")]
    HasData(String),
    #[error("{0}")]
    Internal(String),
}

impl ControlError {
    pub fn status(&self) -> StatusCode {
        match self {
            ControlError::InvalidName(_) | ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ControlError::Unauthorized => StatusCode::UNAUTHORIZED,
            ControlError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::AlreadyExists(_) | ControlError::InUse(_) | ControlError::HasData(_) => {
                StatusCode::CONFLICT
            }
            ControlError::CorruptBackup { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ControlError::Backup(_) => StatusCode::BAD_GATEWAY,
            ControlError::AppLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
            ControlError::MaxDatabases { .. }
            | ControlError::ActiveSetFull { .. }
            | ControlError::PortsExhausted { .. }
            | ControlError::InsufficientNodes { .. }
            | ControlError::Store(_)
            | ControlError::Peer(_) => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Engine(_) => StatusCode::BAD_GATEWAY,
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ControlError::InvalidName(_) => ErrorCode::InvalidName,
            ControlError::BadRequest(_) => ErrorCode::BadRequest,
            ControlError::BodyTooLarge(_) => ErrorCode::BodyTooLarge,
            ControlError::Unauthorized => ErrorCode::Unauthorized,
            ControlError::Forbidden { .. } => ErrorCode::Forbidden,
            ControlError::NotFound(_) => ErrorCode::NotFound,
            ControlError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            ControlError::InUse(_) => ErrorCode::InUse,
            ControlError::AppLimit {
                limit: AppLimit::MaxDatabases,
                ..
            } => ErrorCode::AppDatabaseLimit,
            ControlError::AppLimit {
                limit: AppLimit::CreatesPerMinute,
                ..
            } => ErrorCode::AppCreateRate,
            ControlError::MaxDatabases { .. } => ErrorCode::MaxDatabases,
            ControlError::ActiveSetFull { .. } => ErrorCode::ActiveSetFull,
            ControlError::PortsExhausted { .. } => ErrorCode::PortsExhausted,
            ControlError::InsufficientNodes { .. } => ErrorCode::InsufficientNodes,
            ControlError::Engine(_) => ErrorCode::EngineFailed,
            ControlError::Store(_) => ErrorCode::StoreUnavailable,
            ControlError::Peer(_) => ErrorCode::PeerUnavailable,
            ControlError::Backup(_) => ErrorCode::BackupFailed,
            ControlError::CorruptBackup { .. } => ErrorCode::BackupCorrupt,
            ControlError::HasData(_) => ErrorCode::HasData,
            ControlError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// Whose fault: the request (its token included), capacity, a backend
    /// (an engine, the store or a peer) or control itself.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ControlError::InvalidName(_)
            | ControlError::BadRequest(_)
            | ControlError::BodyTooLarge(_)
            | ControlError::Unauthorized
            | ControlError::Forbidden { .. }
            | ControlError::NotFound(_)
            | ControlError::AlreadyExists(_)
            | ControlError::InUse(_)
            | ControlError::HasData(_)
            | ControlError::AppLimit { .. } => ErrorKind::User,
            ControlError::MaxDatabases { .. }
            | ControlError::ActiveSetFull { .. }
            | ControlError::PortsExhausted { .. }
            | ControlError::InsufficientNodes { .. } => ErrorKind::Capacity,
            ControlError::Engine(_)
            | ControlError::Store(_)
            | ControlError::Peer(_)
            | ControlError::Backup(_)
            | ControlError::CorruptBackup { .. } => ErrorKind::Backend,
            ControlError::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl ControlError {
    /// The same error in a form that crosses to another node.
    pub fn portable(self) -> ControlError {
        match self {
            ControlError::InvalidName(e) => ControlError::BadRequest(e.to_string()),
            other => other,
        }
    }
}

/// Which of an app's limits (`apps:`) a create ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AppLimit {
    MaxDatabases,
    CreatesPerMinute,
}

impl AppLimit {
    /// Its key under `apps:`, also the `limit` label of
    /// `rouse_app_limit_refusals_total`.
    pub fn key(self) -> &'static str {
        match self {
            AppLimit::MaxDatabases => "max_databases",
            AppLimit::CreatesPerMinute => "creates_per_minute",
        }
    }
}

impl std::fmt::Display for AppLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;
