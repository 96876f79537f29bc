//! The error body of every failed control API call and its machine codes,
//! one list for the server that writes them and the clients that read them.

use serde::{Deserialize, Serialize};

/// Error body of every failed call: `{"error": "<message>", "code": "<machine_code>"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: String,
    pub code: ErrorCode,
}

/// What went wrong, for programs; the message is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidName,
    BadRequest,
    BodyTooLarge,
    Unauthorized,
    Forbidden,
    NotFound,
    AlreadyExists,
    InUse,
    /// A create past the app's `apps.*.max_databases`.
    AppDatabaseLimit,
    /// A create past the app's `apps.*.creates_per_minute`.
    AppCreateRate,
    MaxDatabases,
    /// A wake refused: the node's active set stayed full of databases in
    /// use (`database.max_active_databases` or `max_active_memory`).
    ActiveSetFull,
    PortsExhausted,
    InsufficientNodes,
    EngineFailed,
    StoreUnavailable,
    PeerUnavailable,
    /// The backup destination refused or failed a backup or restore.
    BackupFailed,
    /// A backup whose checksum does not match: never restored.
    BackupCorrupt,
    /// A restore onto a database that has data, without `force`.
    HasData,
    Internal,
    /// A code this client does not know (a newer control).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it is written on the wire, also a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::InUse => "in_use",
            ErrorCode::AppDatabaseLimit => "app_database_limit",
            ErrorCode::AppCreateRate => "app_create_rate",
            ErrorCode::MaxDatabases => "max_databases",
            ErrorCode::ActiveSetFull => "active_set_full",
            ErrorCode::PortsExhausted => "ports_exhausted",
            ErrorCode::InsufficientNodes => "insufficient_nodes",
            ErrorCode::EngineFailed => "engine_failed",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::PeerUnavailable => "peer_unavailable",
            ErrorCode::BackupFailed => "backup_failed",
            ErrorCode::BackupCorrupt => "backup_corrupt",
            ErrorCode::HasData => "has_data",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_written_as_serde_writes_them() {
        for code in [
            ErrorCode::InvalidName,
            ErrorCode::AppDatabaseLimit,
            ErrorCode::AppCreateRate,
            ErrorCode::InsufficientNodes,
            ErrorCode::PeerUnavailable,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        let newer: ErrorBody =
            serde_json::from_str(r#"{"error":"x","code":"something_new"}"#).unwrap();
        assert_eq!(newer.code, ErrorCode::Unknown);
    }
}
