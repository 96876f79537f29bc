//! What it takes to run each engine: preparing data directories, the
//! command line of each replica's process, and the check that the started
//! database answers real queries.

pub mod patroni;
pub mod postgres;
pub mod rqlite;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rouse_config::ControlConfig;
use rouse_control_api::{Endpoint, Engine};

use crate::error::{ControlError, Result};
use crate::model::{ReplicaRecord, UserRecord};
use crate::process::{lookup_user, ProcessSpec};
use crate::sandbox::Sandbox;

/// Binaries and tunables shared by all databases of this node.
pub struct EngineEnv {
    pub rqlited: PathBuf,
    pub postgres_bin: Option<PathBuf>,
    /// uid/gid PostgreSQL runs as when the daemon is root.
    pub postgres_user: Option<(u32, u32)>,
    pub raft_election_timeout: Duration,
    pub raft_heartbeat_timeout: Duration,
    pub start_timeout: Duration,
    pub postgres_max_connections: u32,
    /// `node.data_dir` when engines run sandboxed to their own directory.
    pub sandbox_root: Option<PathBuf>,
    /// Certificates for TLS between the engines of different nodes.
    pub node_tls: std::sync::Arc<tls::NodeTls>,
    /// How control reaches every rqlited's HTTP API, `_system`'s included:
    /// over TLS with `control.engine_https`.
    pub rqlite_http: crate::rqlite::RqliteTransport,
}

/// One database's processes on this node, as one start sees them.
pub struct Instance<'a> {
    /// For logs: `<app>_<db>` or `_system`.
    pub label: &'a str,
    /// `<data_dir>/<app>_<db>/<engine>/`
    pub dir: PathBuf,
    /// Every replica of the database, on whichever node.
    pub replicas: &'a [ReplicaRecord],
    /// This node: its replicas are the ones started here.
    pub node_id: &'a str,
    /// The engine's superuser password (Postgres).
    pub secret: &'a str,
    /// No data here yet: initialise (initdb, bootstrap or join the Raft cluster).
    pub first_start: bool,
    /// The Raft addresses differ from the last run's.
    pub raft_moved: bool,
    /// Raft addresses of a running cluster that a replica without data
    /// joins, instead of bootstrapping a new one with the others.
    pub join: Vec<String>,
    /// Join as a non-voting member (rqlite read-only node).
    pub non_voter: bool,
    /// The Raft member id, when it is not `node-<idx>` (`_system`).
    pub raft_id: Option<&'a str>,
    /// PostgreSQL: where its WAL is archived (pgBackRest).
    pub archive: Option<crate::engine::postgres::Archive>,
}

impl Instance<'_> {
    /// The replicas this node runs.
    pub fn local(&self) -> impl Iterator<Item = &ReplicaRecord> {
        self.replicas.iter().filter(|r| r.node_id == self.node_id)
    }

    pub fn replica_dir(&self, r: &ReplicaRecord) -> PathBuf {
        self.dir.join(format!("node-{}", r.idx))
    }

    fn log_file(&self, r: &ReplicaRecord) -> PathBuf {
        self.dir.join(format!("node-{}.log", r.idx))
    }

    pub fn pid_file(&self, r: &ReplicaRecord) -> PathBuf {
        pid_file(&self.dir, r)
    }
}

impl EngineEnv {
    pub fn from_config(
        c: &ControlConfig,
        data_dir: &Path,
        cluster_key: &crate::cluster_key::ClusterKey,
    ) -> Result<EngineEnv> {
        if c.sandbox && crate::sandbox::abi().is_none() {
            return Err(ControlError::Internal(
                "control.sandbox is on but this kernel has no Landlock: engines would reach every tenant's files; set control.sandbox: false to run them unconfined".into(),
            ));
        }
        let rqlited = match &c.rqlited_path {
            Some(p) => p.clone(),
            None => find_on_path("rqlited").ok_or_else(|| {
                ControlError::Internal(
                    "rqlited not found on PATH: install it or set control.rqlited_path".into(),
                )
            })?,
        };
        let postgres_bin = c.postgres_bin_dir.clone().or_else(find_postgres_bin);
        let node_tls = std::sync::Arc::new(tls::NodeTls::new(cluster_key)?);
        // PostgreSQL refuses to run as root; an unprivileged daemon runs it as itself.
        // SAFETY: geteuid has no preconditions.
        let postgres_user = if unsafe { libc::geteuid() } == 0 {
            lookup_user(&c.run_as)
        } else {
            None
        };
        let engine_https = c
            .engine_https
            .unwrap_or_else(|| c.replica_hosts.iter().any(|h| !h.is_loopback()))
            .then(|| node_tls.client_config())
            .transpose()?;
        Ok(EngineEnv {
            rqlited,
            postgres_bin,
            postgres_user,
            raft_election_timeout: c.raft_election_timeout,
            raft_heartbeat_timeout: c.raft_heartbeat_timeout,
            start_timeout: c.start_timeout,
            postgres_max_connections: c.postgres_max_connections,
            sandbox_root: c.sandbox.then(|| data_dir.to_path_buf()),
            node_tls: node_tls.clone(),
            rqlite_http: crate::rqlite::RqliteTransport::new(engine_https),
        })
    }

    /// Creates directories and initialises data where needed.
    pub async fn prepare(&self, engine: Engine, inst: &Instance<'_>) -> Result<()> {
        std::fs::create_dir_all(&inst.dir).map_err(|e| {
            ControlError::Internal(format!("cannot create {}: {e}", inst.dir.display()))
        })?;
        match engine {
            Engine::Rqlite => rqlite::prepare(self, inst),
            Engine::Postgres => postgres::prepare(self, inst).await,
            Engine::Patroni => Err(not_run_here()),
        }
    }

    pub fn process(
        &self,
        engine: Engine,
        inst: &Instance<'_>,
        r: &ReplicaRecord,
    ) -> Result<ProcessSpec> {
        let (program, args, user) = match engine {
            Engine::Rqlite => (self.rqlited.clone(), rqlite::args(self, inst, r), None),
            Engine::Postgres => (
                self.postgres_bin()?.join("postgres"),
                postgres::args(inst, r, self.postgres_max_connections),
                self.postgres_user,
            ),
            Engine::Patroni => return Err(not_run_here()),
        };
        let sandbox = match &self.sandbox_root {
            Some(root) => Some(Arc::new(
                Sandbox::new(&inst.replica_dir(r), &program, root, &extra_dirs(inst)).map_err(
                    |e| ControlError::Internal(format!("cannot sandbox {}: {e}", inst.label)),
                )?,
            )),
            None => None,
        };
        Ok(ProcessSpec {
            program,
            args,
            log: inst.log_file(r),
            pid_file: inst.pid_file(r),
            user,
            stop_signal: stop_signal(engine),
            sandbox,
        })
    }

    /// Waits until the database answers a real query; its endpoints, leader first.
    pub async fn wait_ready(&self, engine: Engine, inst: &Instance<'_>) -> Result<Vec<Endpoint>> {
        let deadline = tokio::time::Instant::now() + self.start_timeout;
        match engine {
            Engine::Rqlite => rqlite::wait_ready(self, inst, deadline).await,
            Engine::Postgres => postgres::wait_ready(inst, deadline).await,
            Engine::Patroni => Err(not_run_here()),
        }
    }

    /// Waits until this node's replicas answer at all; the database as a
    /// whole may still wait for its other replicas (a Raft quorum).
    pub async fn wait_alive(&self, engine: Engine, inst: &Instance<'_>) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.start_timeout;
        match engine {
            Engine::Rqlite => rqlite::wait_alive(self, inst, deadline).await,
            Engine::Postgres => postgres::wait_ready(inst, deadline).await.map(|_| ()),
            Engine::Patroni => Err(not_run_here()),
        }
    }

    /// Work on a started database: its Postgres database and the app's roles.
    pub async fn after_start(
        &self,
        engine: Engine,
        inst: &Instance<'_>,
        db_name: &str,
        users: &[UserRecord],
    ) -> Result<()> {
        match engine {
            Engine::Rqlite => Ok(()),
            Engine::Postgres => postgres::after_start(inst, db_name, users).await,
            Engine::Patroni => Err(not_run_here()),
        }
    }

    pub(crate) fn postgres_bin(&self) -> Result<&Path> {
        self.postgres_bin.as_deref().ok_or_else(|| {
            ControlError::Engine(
                "PostgreSQL server binaries not found: install postgresql or set control.postgres_bin_dir".into(),
            )
        })
    }
}

/// Directories an engine writes besides its own: the socket of
/// PostgreSQL, and where its WAL is archived.
fn extra_dirs(inst: &Instance<'_>) -> Vec<PathBuf> {
    let mut dirs = vec![inst.dir.join("s")];
    if let Some(archive) = &inst.archive {
        dirs.extend(archive.writes.iter().cloned());
    }
    dirs.retain(|d| d.exists());
    dirs
}

/// Where a replica's process writes its pid, under `<data_dir>/<app>_<db>/<engine>/`.
/// Login `user` of a database whose secret is `secret`, its password
/// derived from the secret (so every node derives the same).
pub fn derived_login(secret: &str, user: &str) -> rouse_control_api::BackendCredentials {
    rouse_control_api::BackendCredentials {
        user: user.into(),
        password: hex::encode(rouse_control_api::scram::hmac(
            secret.as_bytes(),
            user.as_bytes(),
        )),
    }
}

pub fn pid_file(engine_dir: &Path, r: &ReplicaRecord) -> PathBuf {
    engine_dir.join(format!("node-{}.pid", r.idx))
}

/// The graceful stop signal: SIGTERM for rqlited, SIGINT (fast shutdown,
/// which does not wait for clients) for PostgreSQL.
pub fn stop_signal(engine: Engine) -> i32 {
    match engine {
        Engine::Postgres => libc::SIGINT,
        Engine::Rqlite | Engine::Patroni => libc::SIGTERM,
    }
}

/// Endpoints of the replicas, the leader first.
/// `tls`: the engines' HTTP API speaks TLS.
pub fn endpoints(replicas: &[ReplicaRecord], leader: Option<usize>, tls: bool) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| Endpoint {
            node_id: r.node_id.clone(),
            host: r.host.clone(),
            port: r.port,
            raft_port: r.raft_port,
            api: None,
            leader: Some(i) == leader,
            tls,
        })
        .collect();
    out.sort_by_key(|e| !e.leader);
    out
}

/// Whether the replicas already hold data from an earlier start.
pub fn has_data(engine: Engine, inst: &Instance<'_>) -> bool {
    inst.local().all(|r| {
        let dir = inst.replica_dir(r);
        match engine {
            Engine::Rqlite => dir.join("raft.db").exists(),
            Engine::Postgres => dir.join("PG_VERSION").exists(),
            Engine::Patroni => true,
        }
    })
}

/// Patroni clusters run on their own; the manager never starts them.
fn not_run_here() -> ControlError {
    ControlError::Internal("control does not run the processes of a Patroni cluster".into())
}

pub(crate) fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// `initdb` on PATH (following Debian's symlinks), else the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn find_postgres_bin() -> Option<PathBuf> {
    if let Some(initdb) = find_on_path("initdb") {
        if let Some(dir) = std::fs::canonicalize(initdb).ok()?.parent() {
            return Some(dir.to_path_buf());
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

/// Polls `check` until it succeeds or `deadline` passes; the last error
/// explains a timeout.
pub(crate) async fn poll_until<T, F, Fut>(
    deadline: tokio::time::Instant,
    what: &str,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, String>>,
{
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(last) if tokio::time::Instant::now() >= deadline => {
                return Err(ControlError::Engine(format!(
                    "{what} did not become ready in time: {last}"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(15)).await,
        }
    }
}
