//! Backups of managed databases to a directory or an S3-compatible store:
//! rqlite as a consistent SQLite snapshot, compressed and checksummed,
//! beside a manifest ([`manifest`]); PostgreSQL through pgBackRest
//! ([`pgbackrest`]). What to back up and when is the lifecycle's call; this
//! module makes, lists, fetches and prunes backups.

mod manifest;
pub mod pgbackrest;
mod store;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rouse_config::BackupsConfig;
use rouse_control_api::{BackupInfo, DbKey, Engine};
use rouse_runtime::clock::now_ms;
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use tracing::{info, warn};

pub use manifest::{parse_rfc3339, rfc3339};
use manifest::{Manifest, SQLITE_GZIP};
use store::BackupStore;

use crate::error::{ControlError, Result};
use crate::metrics::{
    BACKUPS, BACKUP_BYTES, BACKUP_DURATION, BACKUP_FAILURES, BACKUP_LAST_SUCCESS,
};
use crate::rqlite::RqliteClient;

/// Why a backup is taken (the `reason` of its manifest and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Manual,
    Scheduled,
    Hibernate,
    /// A restored PostgreSQL database starts its own line of backups.
    Restore,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Manual => "manual",
            Reason::Scheduled => "scheduled",
            Reason::Hibernate => "hibernate",
            Reason::Restore => "restore",
        }
    }
}

pub struct Backups {
    store: BackupStore,
    config: BackupsConfig,
    destination: rouse_config::BackupDestination,
    /// uid/gid PostgreSQL (and so pgBackRest) runs as when control is root.
    engine_user: Option<(u32, u32)>,
    /// The `pgbackrest` program; without it PostgreSQL does not archive.
    pgbackrest: Option<PathBuf>,
    /// Temporary files of backups and restores under way.
    scratch: PathBuf,
    /// Backups under way at once.
    slots: tokio::sync::Semaphore,
}

impl Backups {
    pub fn open(
        config: &BackupsConfig,
        data_dir: &Path,
        engine_user: Option<(u32, u32)>,
    ) -> Result<Backups> {
        let scratch = data_dir.join("backup-scratch");
        // Files left by a daemon that died mid-backup are of no use.
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| {
            ControlError::Internal(format!("cannot create {}: {e}", scratch.display()))
        })?;
        if engine_user.is_some() {
            // pgBackRest, run as the server's user, passes through to its
            // own work directories here.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o711))
                .map_err(io)?;
        }
        Ok(Backups {
            store: BackupStore::open(config, data_dir)?,
            config: config.clone(),
            destination: config
                .destination(data_dir)
                .map_err(ControlError::BadRequest)?,
            engine_user,
            pgbackrest: crate::engine::find_on_path("pgbackrest"),
            scratch,
            slots: tokio::sync::Semaphore::new(config.max_concurrent),
        })
    }

    pub fn config(&self) -> &BackupsConfig {
        &self.config
    }

    /// Waits for a backup slot (`backups.max_concurrent`).
    pub async fn slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.slots
            .acquire()
            .await
            .expect("the backup semaphore is never closed")
    }

    fn temp(&self) -> Result<NamedTempFile> {
        NamedTempFile::new_in(&self.scratch)
            .map_err(|e| ControlError::Internal(format!("temporary file: {e}")))
    }

    /// A running rqlite database, through its leader's `/db/backup`.
    pub async fn rqlite_snapshot(
        &self,
        key: &DbKey,
        leader: &RqliteClient,
        reason: Reason,
    ) -> Result<BackupInfo> {
        let _slot = self.slot().await;
        let raw = self.temp()?;
        let mut out = tokio::fs::File::from_std(raw.reopen().map_err(io)?);
        leader
            .backup_to(&mut out)
            .await
            .map_err(|e| ControlError::Engine(format!("backup of {key}: {e}")))?;
        drop(out);
        let version = leader.version().await.unwrap_or_default();
        self.store_sqlite(key, raw, reason, version).await
    }

    /// A hibernated rqlite database: its SQLite file, as the engine left it.
    pub async fn rqlite_file(
        &self,
        key: &DbKey,
        sqlite: &Path,
        reason: Reason,
    ) -> Result<BackupInfo> {
        let _slot = self.slot().await;
        let raw = self.temp()?;
        std::fs::copy(sqlite, raw.path())
            .map_err(|e| ControlError::Backup(format!("cannot read {key}'s data file: {e}")))?;
        self.store_sqlite(key, raw, reason, String::new()).await
    }

    /// Compresses and stores an SQLite file, unless it is the same as the
    /// last backup's (then that one is the answer).
    async fn store_sqlite(
        &self,
        key: &DbKey,
        raw: NamedTempFile,
        reason: Reason,
        version: String,
    ) -> Result<BackupInfo> {
        let started = Instant::now();
        // Hashed first: an unchanged database is neither compressed nor stored.
        let (raw, data_sha256) =
            blocking(move || sha256_file(raw.path()).map(|sha| (raw, sha))).await?;
        let previous = self.manifests(key).await?;
        if let Some(last) = previous.last().filter(|m| m.data_sha256 == data_sha256) {
            info!(database = %key, backup = %last.info.id, reason = reason.as_str(), "unchanged since the last backup");
            record(Engine::Rqlite, reason, "unchanged");
            return Ok(last.info.clone());
        }
        let gz = self.temp()?;
        let gz_path = gz.path().to_path_buf();
        blocking(move || compress(raw.path(), &gz_path)).await?;
        let time_ms = now_ms();
        let id = manifest::id_at(time_ms);
        let (size, sha256) = self
            .store
            .put_file(&manifest::data_name(key, &id), gz.path())
            .await?;
        let m = Manifest {
            info: BackupInfo {
                id: id.clone(),
                app: key.app.clone(),
                database: key.db.clone(),
                engine: Engine::Rqlite,
                time_ms,
                time: rfc3339(time_ms),
                size,
                sha256: Some(sha256),
                kind: "snapshot".into(),
                reason: reason.as_str().into(),
                engine_version: version,
            },
            format: SQLITE_GZIP.into(),
            data_sha256,
        };
        self.store
            .put_small(
                &manifest::manifest_name(key, &id),
                serde_json::to_vec(&m).expect("manifests serialise"),
            )
            .await?;
        BACKUP_BYTES.counter(["rqlite".into()]).increment(size);
        BACKUP_DURATION
            .histogram(["rqlite".into(), "backup".into()])
            .record(started.elapsed().as_secs_f64());
        succeeded(key, time_ms);
        record(Engine::Rqlite, reason, "done");
        info!(database = %key, backup = %id, size, destination = self.store.describe(), "backed up");
        let mut all = previous.into_iter().map(|m| m.info).collect::<Vec<_>>();
        all.push(m.info.clone());
        self.prune(key, &all).await;
        Ok(m.info)
    }

    /// The rqlite backups of `key`, oldest first (also of a dropped database).
    async fn manifests(&self, key: &DbKey) -> Result<Vec<Manifest>> {
        let names = self.store.list(&manifest::rqlite_dir(key)).await?;
        let mut out = Vec::new();
        for name in names {
            let Some(id) = manifest::manifest_id(key, &name) else {
                continue;
            };
            match self.manifest(key, id).await {
                Ok(m) => out.push(m),
                Err(e) => {
                    warn!(database = %key, backup = id, error = %e, "unreadable backup manifest skipped")
                }
            }
        }
        out.sort_by_key(|m| m.info.time_ms);
        Ok(out)
    }

    async fn manifest(&self, key: &DbKey, id: &str) -> Result<Manifest> {
        let bytes = self
            .store
            .get_small(&manifest::manifest_name(key, id))
            .await?;
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| ControlError::CorruptBackup {
                id: id.into(),
                why: format!("its manifest does not parse: {e}"),
            })?;
        // A manifest names its own database and id, or it is not this one's.
        if m.info.id != id
            || m.info.app != key.app
            || m.info.database != key.db
            || m.format != SQLITE_GZIP
        {
            return Err(ControlError::CorruptBackup {
                id: id.into(),
                why: "its manifest names another backup".into(),
            });
        }
        Ok(m)
    }

    pub async fn rqlite_backups(&self, key: &DbKey) -> Result<Vec<BackupInfo>> {
        Ok(self
            .manifests(key)
            .await?
            .into_iter()
            .map(|m| m.info)
            .collect())
    }

    /// The SQLite file of backup `id` (the latest when `None`), checked
    /// against both of its checksums before anything is restored from it.
    pub async fn fetch_rqlite(
        &self,
        key: &DbKey,
        id: Option<&str>,
    ) -> Result<(BackupInfo, NamedTempFile)> {
        let m = match id {
            Some(id) if !manifest::valid_id(id) => {
                return Err(ControlError::BadRequest(format!(
                    "{id:?} is not a backup id"
                )))
            }
            Some(id) => self.manifest(key, id).await.map_err(|e| match e {
                ControlError::NotFound(_) => {
                    ControlError::NotFound(format!("{key} has no backup {id}"))
                }
                e => e,
            })?,
            None => self
                .manifests(key)
                .await?
                .pop()
                .ok_or_else(|| ControlError::NotFound(format!("{key} has no backup")))?,
        };
        let id = m.info.id.clone();
        let gz = self.temp()?;
        let (_, sha256) = self
            .store
            .get_file(&manifest::data_name(key, &id), gz.path())
            .await?;
        if Some(&sha256) != m.info.sha256.as_ref() {
            return Err(ControlError::CorruptBackup {
                id,
                why: "its checksum does not match its manifest".into(),
            });
        }
        let raw = self.temp()?;
        let raw_path = raw.path().to_path_buf();
        let unpacking = id.clone();
        let data_sha256 = blocking(move || {
            decompress(gz.path(), &raw_path)
                .map_err(|why| ControlError::CorruptBackup { id: unpacking, why })
        })
        .await?;
        if data_sha256 != m.data_sha256 {
            return Err(ControlError::CorruptBackup {
                id,
                why: "its data does not match its manifest".into(),
            });
        }
        Ok((m.info, raw))
    }

    /// Removes what retention no longer keeps; a failure is logged and
    /// tried again after the next backup.
    async fn prune(&self, key: &DbKey, all: &[BackupInfo]) {
        for old in manifest::expired(all, self.config.keep, self.config.max_age, now_ms()) {
            // The manifest first: a backup without one is not listed.
            let removed = async {
                self.store
                    .delete(&manifest::manifest_name(key, &old.id))
                    .await?;
                self.store.delete(&manifest::data_name(key, &old.id)).await
            };
            match removed.await {
                Ok(()) => info!(database = %key, backup = %old.id, "backup removed by retention"),
                Err(e) => {
                    warn!(database = %key, backup = %old.id, error = %e, "could not remove an expired backup")
                }
            }
        }
    }
}

fn io(e: std::io::Error) -> ControlError {
    ControlError::Internal(e.to_string())
}

/// Runs file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ControlError::Internal(e.to_string()))?
}

/// Counts a backup attempt.
pub fn record(engine: Engine, reason: Reason, result: &'static str) {
    BACKUPS
        .counter([
            engine.as_str().into(),
            reason.as_str().into(),
            result.into(),
        ])
        .increment(1);
}

/// A backup of `key` succeeded at `time_ms`.
pub fn succeeded(key: &DbKey, time_ms: u64) {
    BACKUP_LAST_SUCCESS
        .gauge([key.app.to_string().into(), key.db.to_string().into()])
        .set(time_ms as f64 / 1000.0);
}

pub fn failed(key: &DbKey, engine: Engine, reason: Reason) {
    BACKUP_FAILURES
        .counter([key.app.to_string().into(), key.db.to_string().into()])
        .increment(1);
    record(engine, reason, "failed");
}

/// Copies `from` into `to`; the SHA-256 of what went through.
fn copy_hashing(mut from: impl Read, mut to: impl Write) -> std::io::Result<String> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
    to.flush()?;
    Ok(hex::encode(hash.finalize()))
}

/// The SHA-256 of the file `path`.
fn sha256_file(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).map_err(io)?;
    copy_hashing(std::io::BufReader::new(file), std::io::sink()).map_err(io)
}

/// gzip of `from` into `to`.
fn compress(from: &Path, to: &Path) -> Result<()> {
    let input = std::fs::File::open(from).map_err(io)?;
    let out = std::io::BufWriter::new(std::fs::File::create(to).map_err(io)?);
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    copy_hashing(input, &mut gz).map_err(io)?;
    gz.finish().and_then(|mut w| w.flush()).map_err(io)
}

/// Unpacks gzip `from` into `to`; the SHA-256 of what came out, or why it
/// is not gzip.
fn decompress(from: &Path, to: &Path) -> std::result::Result<String, String> {
    let input = std::fs::File::open(from).map_err(|e| e.to_string())?;
    let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(input));
    let out = std::io::BufWriter::new(std::fs::File::create(to).map_err(|e| e.to_string())?);
    copy_hashing(gz, out).map_err(|e| format!("it does not unpack: {e}"))
}
