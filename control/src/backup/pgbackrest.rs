//! PostgreSQL backups through pgBackRest: base backups plus archived WAL,
//! so that a database can be put back as it was at any moment covered.
//!
//! Each database has a repository of its own, named by the PostgreSQL
//! system identifier of its data (`postgres/<app>/<db>/<system id>/`, one
//! stanza `db`): a restored copy archives on into the repository of its
//! line, a database made anew under an old name starts its own beside it,
//! and both are found by listing. Control writes each database's
//! configuration (`<data_dir>/<app>_<db>/postgres/pgbackrest/`) before every
//! start; the server's `archive_command` pushes WAL with it, and control
//! runs `backup`, `info` and `restore`, as the server's own user.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use rouse_config::BackupDestination;
use rouse_control_api::{BackupInfo, DbKey, Engine};
use serde_json::Value;
use tracing::{info, warn};

use super::{manifest, Backups, Reason};
use crate::engine::postgres::Archive;
use crate::error::{ControlError, Result};
use crate::metrics::BACKUP_DURATION;
use crate::process::{chown_tree, open_to_traversal};

/// The one stanza of each repository.
const STANZA: &str = "db";
/// The configuration's directory, inside the database's engine directory.
const WORK_DIR: &str = "pgbackrest";
const CONF: &str = "pgbackrest.conf";
/// The configuration of a restore, kept until the restored server started.
const RESTORE_CONF: &str = "restore.conf";

/// A database's repository.
enum Repo {
    Dir(PathBuf),
    /// The repository's path in the bucket, `/`-rooted.
    S3(String),
}

/// The PostgreSQL system identifier of the data in `pgdata` (the first
/// eight bytes of `global/pg_control`).
pub fn system_id(pgdata: &Path) -> Option<String> {
    let bytes = std::fs::read(pgdata.join("global/pg_control")).ok()?;
    let id = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    Some(id.to_string())
}

fn io(what: &str) -> impl Fn(std::io::Error) -> ControlError + '_ {
    move |e| ControlError::Backup(format!("{what}: {e}"))
}

impl Backups {
    fn repo_name(key: &DbKey) -> String {
        format!("postgres/{}/{}", key.app, key.db)
    }

    fn repo(&self, key: &DbKey, system: &str) -> Repo {
        let rel = format!("{}/{system}", Self::repo_name(key));
        match &self.destination {
            BackupDestination::Dir(dir) => Repo::Dir(dir.join(rel)),
            BackupDestination::S3 { prefix, .. } if prefix.is_empty() => {
                Repo::S3(format!("/{rel}"))
            }
            BackupDestination::S3 { prefix, .. } => Repo::S3(format!("/{prefix}/{rel}")),
        }
    }

    /// A directory the server's user owns, with the parents it must pass
    /// through (from the destination down) opened to it.
    fn owned_dir(&self, dir: &Path, top: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io("cannot create a backup directory"))?;
        if let Some(user) = self.engine_user {
            let mut parent = dir.parent();
            while let Some(p) = parent.filter(|p| p.starts_with(top)) {
                open_to_traversal(p).map_err(io("chmod"))?;
                parent = p.parent();
            }
            chown_tree(dir, user).map_err(io("chown"))?;
        }
        Ok(())
    }

    /// The configuration of `repo`, with the server in `pgdata` when given.
    fn conf(
        &self,
        repo: &Repo,
        work: &Path,
        server: Option<(&Path, u16, Option<&Path>)>,
    ) -> Result<String> {
        let keep = match self.config.keep {
            0 => 9_999_999,
            n => n,
        };
        let mut c = format!(
            "[global]\nlog-path={w}/log\nlock-path={w}/lock\nspool-path={w}/spool\n\
             log-level-console=warn\nlog-level-file=warn\nstart-fast=y\ncompress-type=lz4\n\
             repo1-retention-full={keep}\n",
            w = work.display()
        );
        match repo {
            Repo::Dir(path) => {
                c.push_str(&format!(
                    "repo1-type=posix\nrepo1-path={}\n",
                    path.display()
                ));
            }
            Repo::S3(path) => {
                let BackupDestination::S3 { bucket, .. } = &self.destination else {
                    unreachable!("an S3 repository has an S3 destination");
                };
                let s3 = &self.config.s3;
                let endpoint = s3.endpoint.as_deref().unwrap_or("https://s3.amazonaws.com");
                let url = endpoint.trim_end_matches('/');
                let host_port = url.strip_prefix("https://").ok_or_else(|| {
                    ControlError::Backup(format!(
                        "backups.s3.endpoint {endpoint}: pgBackRest speaks S3 over https only"
                    ))
                })?;
                let (host, port) = match host_port.rsplit_once(':') {
                    Some((h, p)) if p.parse::<u16>().is_ok() => (h, p),
                    _ => (host_port, "443"),
                };
                let key_id = s3
                    .access_key_id
                    .clone()
                    .or_else(|| std::env::var("AWS_ACCESS_KEY_ID").ok());
                let secret = s3
                    .secret_access_key
                    .clone()
                    .or_else(|| std::env::var("AWS_SECRET_ACCESS_KEY").ok());
                let (Some(key_id), Some(secret)) = (key_id, secret) else {
                    return Err(ControlError::Backup(
                        "S3 credentials: set backups.s3.access_key_id and secret_access_key (or AWS_*)".into(),
                    ));
                };
                let region = s3
                    .region
                    .clone()
                    .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
                    .unwrap_or_else(|| "us-east-1".into());
                c.push_str(&format!(
                    "repo1-type=s3\nrepo1-path={path}\nrepo1-s3-bucket={bucket}\nrepo1-s3-endpoint={host}\n\
                     repo1-storage-port={port}\nrepo1-s3-region={region}\nrepo1-s3-uri-style={}\n\
                     repo1-s3-key={key_id}\nrepo1-s3-key-secret={secret}\n",
                    if s3.path_style { "path" } else { "host" }
                ));
                if let Some(ca) = &s3.ca_file {
                    // A copy in the work directory: the sandboxed server reads nothing else.
                    let copy = work.join("ca.pem");
                    std::fs::copy(ca, &copy).map_err(io("backups.s3.ca_file"))?;
                    c.push_str(&format!("repo1-storage-ca-file={}\n", copy.display()));
                }
            }
        }
        if let Some((pgdata, port, socket)) = server {
            c.push_str(&format!(
                "\n[{STANZA}]\npg1-path={}\npg1-port={port}\npg1-user={}\n",
                pgdata.display(),
                crate::engine::postgres::ADMIN_USER
            ));
            if let Some(socket) = socket {
                c.push_str(&format!("pg1-socket-path={}\n", socket.display()));
            }
        } else {
            c.push_str(&format!("\n[{STANZA}]\n"));
        }
        Ok(c)
    }

    /// A work directory with its configuration, owned by the server's user.
    fn write_conf(
        &self,
        work: &Path,
        name: &str,
        repo: &Repo,
        server: Option<(&Path, u16, Option<&Path>)>,
    ) -> Result<PathBuf> {
        for d in ["log", "lock", "spool"] {
            std::fs::create_dir_all(work.join(d))
                .map_err(io("cannot create pgBackRest's directories"))?;
        }
        let text = self.conf(repo, work, server)?;
        let conf = work.join(name);
        crate::secrets::write_private(&conf, text.as_bytes())?;
        if let BackupDestination::Dir(top) = &self.destination {
            if let Repo::Dir(path) = repo {
                self.owned_dir(path, top)?;
            }
        }
        if let Some(user) = self.engine_user {
            chown_tree(work, user).map_err(io("chown"))?;
        }
        Ok(conf)
    }

    /// Before a server starts: its configuration, and how it archives WAL.
    /// `None` for data without a control file (not initialised yet).
    pub fn pg_archive(
        &self,
        key: &DbKey,
        engine_dir: &Path,
        pgdata: &Path,
        port: u16,
        socket: Option<&Path>,
    ) -> Result<Option<Archive>> {
        let Some(system) = system_id(pgdata) else {
            return Ok(None);
        };
        let Some(program) = &self.pgbackrest else {
            // Archiving that cannot succeed would keep every WAL segment.
            warn!(database = %key, "pgbackrest is not installed: WAL is not archived and backups of PostgreSQL fail");
            return Ok(None);
        };
        let repo = self.repo(key, &system);
        let work = engine_dir.join(WORK_DIR);
        let conf = self.write_conf(&work, CONF, &repo, Some((pgdata, port, socket)))?;
        let mut writes = vec![work.clone()];
        if let Repo::Dir(path) = repo {
            writes.push(path);
        }
        // A restore under way reads WAL from the repository it came from.
        writes.extend(restoring_from(&work));
        Ok(Some(Archive {
            command: format!(
                "{} --config={} --stanza={STANZA} archive-push %p",
                program.display(),
                conf.display()
            ),
            writes,
        }))
    }

    /// After a restore's first start: its configuration goes, and with it
    /// the server's access to the repository it came from (at its next start).
    pub fn pg_restored(&self, engine_dir: &Path) {
        let _ = std::fs::remove_file(engine_dir.join(WORK_DIR).join(RESTORE_CONF));
    }

    /// Runs pgBackRest as the server's user; its standard output.
    async fn pgbackrest(
        &self,
        conf: &Path,
        args: &[String],
        password: Option<&str>,
    ) -> Result<String> {
        let program = self.pgbackrest.as_ref().ok_or_else(|| {
            ControlError::Backup("pgbackrest is not installed (Debian package pgbackrest)".into())
        })?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg(format!("--config={}", conf.display()))
            .arg(format!("--stanza={STANZA}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(password) = password {
            cmd.env("PGPASSWORD", password);
        }
        if let Some((uid, gid)) = self.engine_user {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd
            .output()
            .await
            .map_err(|e| ControlError::Backup(format!("cannot run pgbackrest: {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            let command = args.first().map(String::as_str).unwrap_or("");
            // Its messages name host paths: for the operator's log only.
            warn!(command, error = last.trim(), "pgbackrest failed");
            return Err(ControlError::Backup(format!(
                "pgbackrest {command} failed; control's log has the details"
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Backs up a running server whose configuration is in `engine_dir`
    /// (an incremental backup over the last full one, a full one first).
    /// Makes the repository of a server just created, so that its WAL is
    /// archived from the start (its first backup comes with the schedule).
    pub async fn pg_stanza(&self, engine_dir: &Path, secret: &str) -> Result<()> {
        let conf = engine_dir.join(WORK_DIR).join(CONF);
        if !conf.exists() {
            // Not archiving (no pgbackrest here): nothing to make.
            return Ok(());
        }
        self.pgbackrest(&conf, &["stanza-create".into()], Some(secret))
            .await
            .map(|_| ())
    }

    pub async fn pg_backup(
        &self,
        key: &DbKey,
        engine_dir: &Path,
        secret: &str,
        reason: Reason,
    ) -> Result<BackupInfo> {
        let _slot = self.slot().await;
        let started = Instant::now();
        let conf = engine_dir.join(WORK_DIR).join(CONF);
        if !conf.exists() {
            return Err(ControlError::Backup(format!(
                "{key} has not been started with archiving yet"
            )));
        }
        // Idempotent: a repository already made is left as it is.
        self.pgbackrest(&conf, &["stanza-create".into()], Some(secret))
            .await?;
        self.pgbackrest(
            &conf,
            &["backup".into(), "--type=incr".into()],
            Some(secret),
        )
        .await?;
        let system = std::fs::read_to_string(&conf)
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("pg1-path=").map(PathBuf::from))
            })
            .and_then(|pgdata| system_id(&pgdata))
            .unwrap_or_default();
        let (backups, _) = self.incarnation(key, &system, &conf).await?;
        let mut made = backups.into_iter().last().ok_or_else(|| {
            ControlError::Backup(format!(
                "{key}: pgbackrest lists no backup after making one"
            ))
        })?;
        made.reason = reason.as_str().into();
        BACKUP_DURATION
            .histogram(["postgres".into(), "backup".into()])
            .record(started.elapsed().as_secs_f64());
        crate::metrics::BACKUP_BYTES
            .counter(["postgres".into()])
            .increment(made.size);
        super::succeeded(key, made.time_ms);
        super::record(Engine::Postgres, reason, "done");
        info!(database = %key, backup = %made.id, size = made.size, "backed up");
        Ok(made)
    }

    /// Archives the running server's current WAL (`pgbackrest check`
    /// switches to a new segment and waits for the old one to be pushed),
    /// so that a restore reaches everything committed until now.
    pub async fn pg_flush(&self, engine_dir: &Path, secret: &str) -> Result<()> {
        let conf = engine_dir.join(WORK_DIR).join(CONF);
        self.pgbackrest(&conf, &["check".into()], Some(secret))
            .await
            .map(|_| ())
    }

    /// The backups of one repository of `key`, and the earliest time they
    /// can restore to.
    async fn incarnation(
        &self,
        key: &DbKey,
        system: &str,
        conf: &Path,
    ) -> Result<(Vec<BackupInfo>, Option<u64>)> {
        let out = self
            .pgbackrest(conf, &["info".into(), "--output=json".into()], None)
            .await?;
        let parsed: Value = serde_json::from_str(&out)
            .map_err(|e| ControlError::Backup(format!("pgbackrest info is not JSON: {e}")))?;
        let mut list = Vec::new();
        let mut earliest = None;
        for stanza in parsed.as_array().into_iter().flatten() {
            for b in stanza["backup"].as_array().into_iter().flatten() {
                let (Some(label), Some(stop)) =
                    (b["label"].as_str(), b["timestamp"]["stop"].as_u64())
                else {
                    continue;
                };
                let time_ms = stop * 1000;
                earliest = Some(earliest.map_or(time_ms, |e: u64| e.min(time_ms)));
                list.push(BackupInfo {
                    id: format!("{system}.{label}"),
                    app: key.app.clone(),
                    database: key.db.clone(),
                    engine: Engine::Postgres,
                    time_ms,
                    time: manifest::rfc3339(time_ms),
                    size: b["info"]["repository"]["delta"]
                        .as_u64()
                        .unwrap_or_default(),
                    sha256: None,
                    kind: b["type"].as_str().unwrap_or("full").into(),
                    reason: "pgbackrest".into(),
                    engine_version: stanza["db"][0]["version"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                });
            }
        }
        Ok((list, earliest))
    }

    /// Every backup of `key` in every repository of its name (also of a
    /// dropped database), oldest first, and the earliest restorable time.
    pub async fn pg_backups(&self, key: &DbKey) -> Result<(Vec<BackupInfo>, Option<u64>)> {
        let mut all = Vec::new();
        let mut earliest: Option<u64> = None;
        for system in self.store.subdirs(&Self::repo_name(key)).await? {
            if !system.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let work = self
                .scratch
                .join(format!("info-{}-{system}", key.internal()));
            let conf = self.write_conf(&work, CONF, &self.repo(key, &system), None)?;
            let listed = self.incarnation(key, &system, &conf).await;
            let _ = std::fs::remove_dir_all(&work);
            let (list, from) = listed?;
            all.extend(list);
            earliest = match (earliest, from) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        all.sort_by_key(|b| b.time_ms);
        Ok((all, earliest))
    }

    /// Restores `point` of `source`'s backups into the stopped server's
    /// `pgdata` (of the engine directory `engine_dir`).
    pub async fn pg_restore(
        &self,
        source: &DbKey,
        point: RestorePoint<'_>,
        engine_dir: &Path,
        pgdata: &Path,
        port: u16,
    ) -> Result<()> {
        let started = Instant::now();
        let work = engine_dir.join(WORK_DIR);
        let RestorePoint {
            system,
            label,
            time_ms,
        } = point;
        let conf = self.write_conf(
            &work,
            RESTORE_CONF,
            &self.repo(source, system),
            Some((pgdata, port, None)),
        )?;
        let mut args = vec!["restore".to_string(), "--delta".into()];
        if let Some(label) = label {
            args.push(format!("--set={label}"));
        }
        match (label, time_ms) {
            (_, Some(t)) => {
                let at = time::OffsetDateTime::from_unix_timestamp_nanos(t as i128 * 1_000_000)
                    .map_err(|e| ControlError::BadRequest(e.to_string()))?;
                args.push("--type=time".into());
                args.push(format!(
                    "--target={:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}+00",
                    at.year(),
                    u8::from(at.month()),
                    at.day(),
                    at.hour(),
                    at.minute(),
                    at.second(),
                    at.millisecond()
                ));
                args.push("--target-action=promote".into());
            }
            (Some(_), None) => {
                args.push("--type=immediate".into());
                args.push("--target-action=promote".into());
            }
            (None, None) => {}
        }
        // WAL comes from the repository restored from, whatever the
        // database archives into afterwards.
        let program = self
            .pgbackrest
            .as_deref()
            .unwrap_or(Path::new("pgbackrest"));
        args.push(format!(
            "--recovery-option=restore_command={} --config={} --stanza={STANZA} archive-get %f \"%p\"",
            program.display(),
            conf.display()
        ));
        self.pgbackrest(&conf, &args, None).await?;
        BACKUP_DURATION
            .histogram(["postgres".into(), "restore".into()])
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// What a restore puts back: from repository `system`, backup `label` as
/// it finished, or the state at `time_ms`, or (neither) the newest state
/// the archive reaches.
pub struct RestorePoint<'a> {
    pub system: &'a str,
    pub label: Option<&'a str>,
    pub time_ms: Option<u64>,
}

/// The directory repository a restore in `work` reads WAL from.
fn restoring_from(work: &Path) -> Option<PathBuf> {
    let conf = std::fs::read_to_string(work.join(RESTORE_CONF)).ok()?;
    if !conf.lines().any(|l| l == "repo1-type=posix") {
        return None;
    }
    conf.lines()
        .find_map(|l| l.strip_prefix("repo1-path="))
        .map(PathBuf::from)
}

/// Splits a PostgreSQL backup id into its repository and pgBackRest label.
pub fn split_id(id: &str) -> Option<(&str, &str)> {
    let (system, label) = id.split_once('.')?;
    (system.bytes().all(|b| b.is_ascii_digit())
        && !system.is_empty()
        && !label.is_empty()
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then_some((system, label))
}
