//! PostgreSQL: one instance per database, `initdb` on create, the postmaster
//! run directly under supervision (stopped with a fast shutdown). The app's
//! users become login roles with their SCRAM verifiers; all of them act as
//! one owner role, so objects one user creates are the others' too.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;

use rouse_control_api::name::API_USER;
use rouse_control_api::Endpoint;

use super::{poll_until, EngineEnv, Instance};
use crate::error::{ControlError, Result};
use crate::model::{ReplicaRecord, UserRecord};
use crate::process::chown_tree;

/// How a server archives its WAL (set up by the backups, which own the
/// destination).
#[derive(Debug, Clone)]
pub struct Archive {
    /// `archive_command`.
    pub command: String,
    /// Directories the (sandboxed) server and what it runs write.
    pub writes: Vec<PathBuf>,
}

/// The engine's superuser, used by control and, for the backend leg, by proxies.
pub const ADMIN_USER: &str = "rouse_admin";
/// The role every app user acts as.
const OWNER_ROLE: &str = "rouse_owner";
/// The proxies' login for the app's API credentials on a database whose
/// secret is `secret` (an app user, never a superuser).
pub fn api_login(secret: &str) -> rouse_control_api::BackendCredentials {
    super::derived_login(secret, API_USER)
}
/// Left in the instance's directory by a restore, holding the name the
/// database was backed up under: at the next start the superuser's password
/// is set anew and the database takes its new name.
pub const RESTORED: &str = "restored-from";

fn io(what: &str) -> impl Fn(std::io::Error) -> ControlError + '_ {
    move |e| ControlError::Internal(format!("{what}: {e}"))
}

pub(super) async fn prepare(env: &EngineEnv, inst: &Instance<'_>) -> Result<()> {
    let bin = env.postgres_bin()?.to_path_buf();
    // The unprivileged server (initdb first) must be able to pass through
    // to its data directory, which control makes 0700.
    std::fs::create_dir_all(&inst.dir).map_err(io("cannot create data directory"))?;
    if env.postgres_user.is_some() {
        for d in [inst.dir.as_path(), inst.dir.parent().unwrap_or(&inst.dir)] {
            crate::process::open_to_traversal(d).map_err(io("chmod"))?;
        }
    }
    for r in inst.local() {
        let dir = inst.replica_dir(r);
        if !inst.first_start && dir.join("PG_VERSION").exists() {
            local_admin(env, inst, r)?;
            continue;
        }
        // A half-made directory from an interrupted create is made anew.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("cannot clear data directory"))?;
        }
        std::fs::create_dir_all(&dir).map_err(io("cannot create data directory"))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod"))?;
        let pwfile = inst.dir.join(format!("node-{}.pw", r.idx));
        std::fs::write(&pwfile, inst.secret).map_err(io("cannot write password file"))?;
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600))
            .map_err(io("chmod"))?;
        if let Some(user) = env.postgres_user {
            chown_tree(&dir, user).map_err(io("chown data directory"))?;
            chown_tree(&pwfile, user).map_err(io("chown password file"))?;
        }
        let mut cmd = tokio::process::Command::new(bin.join("initdb"));
        cmd.arg("-D")
            .arg(&dir)
            .args([
                "-U",
                ADMIN_USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = env.postgres_user {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().await;
        let _ = std::fs::remove_file(&pwfile);
        let out = out.map_err(|e| ControlError::Engine(format!("cannot run initdb: {e}")))?;
        if !out.status.success() {
            return Err(ControlError::Engine(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // Proxies on other nodes connect too; they authenticate with SCRAM.
        let hba = dir.join("pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).map_err(io("read pg_hba.conf"))?;
        rules.push_str("\nhost all all all scram-sha-256\n");
        std::fs::write(&hba, rules).map_err(io("write pg_hba.conf"))?;
        local_admin(env, inst, r)?;
    }
    Ok(())
}

/// Where the instance of replica `r` also listens on a Unix socket, for
/// pgBackRest and control's own sessions; `None` where the socket's path
/// would be longer than the kernel allows.
pub fn socket_dir(inst: &Instance<'_>, r: &ReplicaRecord) -> Option<PathBuf> {
    let dir = inst.dir.join("s");
    let path = dir.join(format!(".s.PGSQL.{}", r.port));
    (path.as_os_str().len() < 100).then_some(dir)
}

/// The map that lets control (and the server's own user, pgBackRest) log
/// in as the superuser over the Unix socket without a password: a restored
/// backup keeps the superuser password of the database it came from. The
/// socket's directory is 0700, the server's user's.
const PEER_RULE: &str = "local all rouse_admin peer map=rouse\n";

fn local_admin(env: &EngineEnv, inst: &Instance<'_>, r: &ReplicaRecord) -> Result<()> {
    let Some(socket) = socket_dir(inst, r) else {
        return Ok(());
    };
    std::fs::create_dir_all(&socket).map_err(io("cannot create the socket directory"))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o700))
        .map_err(io("chmod"))?;
    if let Some(user) = env.postgres_user {
        chown_tree(&socket, user).map_err(io("chown socket directory"))?;
    }
    let dir = inst.replica_dir(r);
    let hba = dir.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).map_err(io("read pg_hba.conf"))?;
    if !rules.contains(PEER_RULE) {
        // First: the first rule that matches decides.
        std::fs::write(&hba, format!("{PEER_RULE}{rules}")).map_err(io("write pg_hba.conf"))?;
    }
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
    let names: Vec<String> = [Some(me), env.postgres_user.map(|(uid, _)| uid)]
        .into_iter()
        .flatten()
        .filter_map(crate::process::user_name)
        .collect();
    let ident = dir.join("pg_ident.conf");
    let mut map = std::fs::read_to_string(&ident).unwrap_or_default();
    for name in names {
        let line = format!("rouse {name} {ADMIN_USER}\n");
        if !map.contains(&line) {
            map.push_str(&line);
        }
    }
    std::fs::write(&ident, map).map_err(io("write pg_ident.conf"))
}

pub(super) fn args(inst: &Instance<'_>, r: &ReplicaRecord, max_connections: u32) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "-D".into(),
        inst.replica_dir(r).into(),
        "-p".into(),
        r.port.to_string().into(),
        "-c".into(),
        format!("listen_addresses={}", r.host).into(),
        // The only socket is in the database's own directory.
        "-c".into(),
        format!(
            "unix_socket_directories={}",
            socket_dir(inst, r)
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        )
        .into(),
        "-c".into(),
        format!("max_connections={max_connections}").into(),
        // Shared memory segments as files in the data directory, not in
        // /dev/shm, which the sandbox does not open to engines.
        "-c".into(),
        "dynamic_shared_memory_type=mmap".into(),
    ];
    if let Some(archive) = &inst.archive {
        args.extend([
            "-c".into(),
            "archive_mode=on".into(),
            "-c".into(),
            format!("archive_command={}", archive.command).into(),
        ]);
    }
    args
}

async fn connect(
    r: &ReplicaRecord,
    secret: &str,
    db: &str,
) -> std::result::Result<tokio_postgres::Client, String> {
    connect_as(r, ADMIN_USER, secret, db).await
}

/// Control's superuser session on this node's replica: over the Unix
/// socket where there is one (no password needed), else TCP.
pub(crate) async fn admin(
    inst: &Instance<'_>,
    r: &ReplicaRecord,
    db: &str,
) -> std::result::Result<tokio_postgres::Client, String> {
    let mut cfg = session(ADMIN_USER, inst.secret, db);
    match socket_dir(inst, r).filter(|d| d.join(format!(".s.PGSQL.{}", r.port)).exists()) {
        Some(dir) => cfg.host_path(&dir),
        None => cfg.host(&r.host),
    };
    open(cfg.port(r.port)).await
}

fn session(user: &str, password: &str, db: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(std::time::Duration::from_secs(2));
    cfg
}

/// Connects, the connection driven by a task of its own.
async fn open(cfg: &tokio_postgres::Config) -> std::result::Result<tokio_postgres::Client, String> {
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A session as `user` on the replica's instance.
pub(super) async fn connect_as(
    r: &ReplicaRecord,
    user: &str,
    password: &str,
    db: &str,
) -> std::result::Result<tokio_postgres::Client, String> {
    open(session(user, password, db).host(&r.host).port(r.port)).await
}

pub(super) async fn wait_ready(
    inst: &Instance<'_>,
    deadline: tokio::time::Instant,
) -> Result<Vec<Endpoint>> {
    let r = inst
        .replicas
        .first()
        .ok_or_else(|| ControlError::Internal("database without replica".into()))?;
    let local = inst.local().next().unwrap_or(r);
    poll_until(deadline, inst.label, || async {
        let client = admin(inst, local, "postgres").await?;
        // A restored backup answers while it still replays WAL; it is
        // ready once it accepts writes.
        let recovering: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if recovering {
            return Err("still recovering".into());
        }
        Ok(())
    })
    .await?;
    Ok(super::endpoints(std::slice::from_ref(r), Some(0), false))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A verifier is base64, digits and `$:-=` only; anything else is refused
/// rather than quoted into SQL.
fn verifier_literal(v: &str) -> Result<String> {
    if v.chars()
        .all(|c| c.is_ascii_alphanumeric() || "$:+/=-".contains(c))
    {
        Ok(format!("'{v}'"))
    } else {
        Err(ControlError::Internal(
            "malformed SCRAM verifier in metadata".into(),
        ))
    }
}

pub(super) async fn after_start(
    inst: &Instance<'_>,
    db_name: &str,
    users: &[UserRecord],
) -> Result<()> {
    let r = &inst.replicas[0];
    let engine = |e: String| ControlError::Engine(format!("{}: {e}", inst.label));
    let admin = admin(inst, inst.local().next().unwrap_or(r), "postgres")
        .await
        .map_err(engine)?;
    // Restored from a backup of another database (or of one dropped since):
    // its superuser takes this database's password.
    // It holds the database of the name it was backed up under.
    let reset = inst.dir.join(RESTORED);
    if let Ok(restored_name) = std::fs::read_to_string(&reset) {
        let password = verifier_literal(&crate::secrets::scram_verifier(inst.secret))?;
        let mut sql = format!("ALTER ROLE {ADMIN_USER} PASSWORD {password};");
        let renamed = restored_name != db_name
            && admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db_name])
                .await
                .map_err(|e| engine(e.to_string()))?
                .is_none();
        if renamed {
            sql.push_str(&format!(
                "ALTER DATABASE {} RENAME TO {};",
                quote_ident(&restored_name),
                quote_ident(db_name)
            ));
        }
        admin
            .batch_execute(&sql)
            .await
            .map_err(|e| engine(e.to_string()))?;
        std::fs::remove_file(&reset).map_err(io("remove the restore mark"))?;
    }
    let exists = |sql: &'static str, name: String| {
        let admin = &admin;
        async move {
            admin
                .query_opt(sql, &[&name])
                .await
                .map(|row| row.is_some())
                .map_err(|e| e.to_string())
        }
    };
    if !exists(
        "SELECT 1 FROM pg_roles WHERE rolname = $1",
        OWNER_ROLE.into(),
    )
    .await
    .map_err(engine)?
    {
        admin
            .batch_execute(&format!("CREATE ROLE {OWNER_ROLE} NOLOGIN"))
            .await
            .map_err(|e| engine(e.to_string()))?;
    }
    if !exists(
        "SELECT 1 FROM pg_database WHERE datname = $1",
        db_name.into(),
    )
    .await
    .map_err(engine)?
    {
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {} OWNER {OWNER_ROLE}",
                quote_ident(db_name)
            ))
            .await
            .map_err(|e| engine(e.to_string()))?;
    }
    sync_own_users(&admin, inst.secret, users)
        .await
        .map_err(engine)
}

/// Makes the app's users login roles with their current verifiers, members
/// of `owner` when given (so that what one creates, all may use). Beside
/// each, on an instance of its own (`owner` given), a read-only login for
/// the proxy's read-only port: the same verifier, `pg_read_all_data`, no
/// membership of `owner`, so no write is allowed whatever a session sends.
///
/// Every other login role of the app (`is_apps`) loses LOGIN: a removed
/// user cannot log in, directly or through a proxy, while what it created
/// stays. Superusers are never touched.
pub(super) async fn sync_users(
    admin: &tokio_postgres::Client,
    users: &[UserRecord],
    owner: Option<&str>,
    role_of: impl Fn(&str) -> String,
    is_apps: impl Fn(&str) -> bool,
) -> std::result::Result<(), String> {
    let mut wanted = std::collections::HashSet::new();
    for u in users {
        let name = role_of(&u.name);
        wanted.insert(name.clone());
        let password = verifier_literal(&u.verifier).map_err(|e| e.to_string())?;
        let role = quote_ident(&name);
        let joins = owner.map_or_else(String::new, |owner| {
            format!("IN ROLE {owner}; ALTER ROLE {role} SET role = {owner}")
        });
        upsert_login(admin, &name, &password, &joins).await?;
        if owner.is_some() {
            let reader = rouse_control_api::name::read_only_role(&name);
            let joins = format!(
                "IN ROLE pg_read_all_data; ALTER ROLE {} SET default_transaction_read_only = on",
                quote_ident(&reader)
            );
            upsert_login(admin, &reader, &password, &joins).await?;
            wanted.insert(reader);
        }
    }
    let logins = admin
        .query(
            "SELECT rolname FROM pg_roles WHERE rolcanlogin AND NOT rolsuper",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    for row in logins {
        let name: String = row.get(0);
        if is_apps(&name) && !wanted.contains(&name) {
            admin
                .batch_execute(&format!("ALTER ROLE {} NOLOGIN", quote_ident(&name)))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// [`sync_users`] on an instance of the app's own, where every login but
/// control's is the app's, the proxies' API login among them.
async fn sync_own_users(
    admin: &tokio_postgres::Client,
    secret: &str,
    users: &[UserRecord],
) -> std::result::Result<(), String> {
    let api = UserRecord {
        name: API_USER.into(),
        verifier: api_login(secret).scram_verifier(),
    };
    let users: Vec<UserRecord> = users.iter().cloned().chain([api]).collect();
    sync_users(admin, &users, Some(OWNER_ROLE), str::to_string, |role| {
        role != ADMIN_USER
    })
    .await
}

/// Gives login role `name` the verifier `password`, creating it (followed
/// by `on_create`) when it is new.
async fn upsert_login(
    admin: &tokio_postgres::Client,
    name: &str,
    password: &str,
    on_create: &str,
) -> std::result::Result<(), String> {
    let role = quote_ident(name);
    let known = admin
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .map_err(|e| e.to_string())?
        .is_some();
    let sql = if known {
        format!("ALTER ROLE {role} LOGIN PASSWORD {password}")
    } else {
        format!("CREATE ROLE {role} LOGIN PASSWORD {password} {on_create}")
    };
    admin.batch_execute(&sql).await.map_err(|e| e.to_string())
}

/// Whether database `db` of the instance holds a table or view of its users.
pub async fn has_user_tables(r: &ReplicaRecord, secret: &str, db: &str) -> Result<bool> {
    let client = connect(r, secret, db).await.map_err(ControlError::Engine)?;
    let row = client
        .query_opt(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'v', 'm', 'p') \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| ControlError::Engine(e.to_string()))?;
    Ok(row.is_some())
}

/// Applies the app's users to a running instance (after a user was added,
/// changed or removed).
pub async fn apply_users(r: &ReplicaRecord, secret: &str, users: &[UserRecord]) -> Result<()> {
    let admin = connect(r, secret, "postgres")
        .await
        .map_err(ControlError::Engine)?;
    sync_own_users(&admin, secret, users)
        .await
        .map_err(ControlError::Engine)
}
