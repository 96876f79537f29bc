//! Backups and restores: what `POST/GET /databases/{app}/{db}/backups` and
//! `POST /databases/{app}/{db}/restore` carry.

use serde::{Deserialize, Serialize};

use crate::{DatabaseInfo, Engine, Name};

/// One backup of one database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupInfo {
    /// What `restore` takes as `backup`.
    pub id: String,
    pub app: Name,
    pub database: Name,
    pub engine: Engine,
    /// When it was taken, Unix milliseconds.
    pub time_ms: u64,
    /// RFC 3339 of `time_ms`.
    pub time: String,
    /// Bytes stored.
    pub size: u64,
    /// SHA-256 of what is stored (hex), checked before a restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `snapshot` (rqlite); `full`, `diff`, `incr` (PostgreSQL).
    pub kind: String,
    /// Why it was taken: `manual`, `scheduled`, `hibernate`.
    pub reason: String,
    /// The engine's version that made it.
    #[serde(default)]
    pub engine_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupList {
    /// Oldest first.
    pub backups: Vec<BackupInfo>,
    /// PostgreSQL: the span a point in time may be chosen from (RFC 3339),
    /// as far as archived WAL reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recoverable_from: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// A backup id; the latest when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// PostgreSQL: replay archived WAL up to this RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Restore into this database (created when absent) instead of the
    /// one backed up.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub as_name: Option<Name>,
    /// Overwrite a database that has data.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Restored {
    /// The backup restored from.
    pub backup: String,
    pub database: DatabaseInfo,
}
