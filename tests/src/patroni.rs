//! A real etcd cluster, and a real Patroni cluster of PostgreSQL servers on
//! top of it, for failover tests.
//!
//! Member `i` of a [`PatroniCluster`] is host `127.0.0.(i+2)`: its PostgreSQL
//! and its REST API listen there, each on a free port. etcd members listen on
//! 127.0.0.1. Timings are short (`loop_wait` 1s, `ttl` 10s), so that a stopped
//! leader is replaced within seconds, a killed one within about `ttl`.
//!
//! Patroni starts PostgreSQL in a session of its own (and each PostgreSQL
//! child takes one too), so killing Patroni's process group leaves PostgreSQL
//! running: a member also kills its postmaster and the postmaster's children,
//! found through the data directory.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;
use tempfile::TempDir;
use tokio::time::Instant;
use tokio_postgres::NoTls;

use crate::postgres::{bin_dir, RunAs};
use crate::process::ServerProcess;
use crate::{binary, free_port, http_client, pids_mentioning, temp_dir, LOCALHOST, START_TIMEOUT};

/// The PostgreSQL superuser, whose password is random per cluster.
const SUPERUSER: &str = "postgres";
/// The user replicas stream as.
const REPLICATOR: &str = "replicator";
/// etcd members under a [`PatroniCluster`].
const ETCD_MEMBERS: usize = 3;

/// Bootstrap of a whole cluster: initdb on the member that wins the race,
/// then base backups and streaming on the others; about 4s when the machine
/// is idle.
const CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopped Patroni may take to stop PostgreSQL and hand over.
const STOP_GRACE: Duration = Duration::from_secs(60);
/// One REST API call; a member that does not answer within it is not the leader.
const API_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(100);

/// An etcd cluster of a few members on 127.0.0.1, each a [`ServerProcess`].
pub struct Etcd {
    // Declared before `dir`, so that the processes die before their directory goes.
    members: Vec<EtcdMember>,
    dir: TempDir,
}

struct EtcdMember {
    process: ServerProcess,
    client_url: String,
}

impl Etcd {
    /// Starts `members` processes of `$ETCD` (else `etcd` on PATH) as one new
    /// cluster, and waits until every member reports itself healthy (which
    /// needs an elected leader).
    pub async fn start(members: usize) -> Result<Etcd> {
        ensure!(members > 0, "an etcd cluster needs a member");
        let dir = temp_dir("rouse-etcd-")?;
        let urls: Vec<(String, String)> = (0..members)
            .map(|_| {
                let client = format!("http://{LOCALHOST}:{}", free_port(LOCALHOST));
                let peer = format!("http://{LOCALHOST}:{}", free_port(LOCALHOST));
                (client, peer)
            })
            .collect();
        let initial_cluster = urls
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("etcd{i}={peer}"))
            .collect::<Vec<_>>()
            .join(",");
        // Unique per cluster, so that members never join another test's cluster.
        let token = dir.path().file_name().unwrap_or_default().to_string_lossy();

        let mut started = Vec::with_capacity(members);
        for (i, (client, peer)) in urls.iter().enumerate() {
            let name = format!("etcd{i}");
            let mut cmd = Command::new(binary("ETCD", "etcd"));
            cmd.current_dir(dir.path())
                .args(["--name", &name, "--data-dir"])
                .arg(dir.path().join(&name))
                .args(["--listen-client-urls", client])
                .args(["--advertise-client-urls", client])
                .args(["--listen-peer-urls", peer])
                .args(["--initial-advertise-peer-urls", peer])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .args(["--logger", "zap", "--log-level", "warn"]);
            let log = dir.path().join(format!("{name}.log"));
            started.push(EtcdMember {
                process: ServerProcess::spawn(&name, cmd, &log)?,
                client_url: client.clone(),
            });
        }
        // All members run before any is waited for: none is healthy without a quorum.
        for member in &mut started {
            let health = format!("{}/health", member.client_url);
            member
                .process
                .wait_ready(START_TIMEOUT, || etcd_healthy(&health))
                .await?;
        }
        Ok(Etcd {
            members: started,
            dir,
        })
    }

    /// `http://127.0.0.1:<port>` of every member.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The temporary directory holding the members' data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_tail(&self, member: usize, lines: usize) -> String {
        self.members[member].process.log_tail(lines)
    }
}

async fn etcd_healthy(url: &str) -> Result<()> {
    let body = http_client()
        .get(url)
        .timeout(API_TIMEOUT)
        .send()
        .await?
        .text()
        .await?;
    ensure!(body.contains(r#""health":"true""#), "GET {url}: {body}");
    Ok(())
}

/// A Patroni cluster of PostgreSQL servers (the newest installed major
/// version) over its own [`Etcd`]. Dropping it kills every process of it.
pub struct PatroniCluster {
    // Declared before `etcd`: members stop before the store they depend on.
    members: Vec<PatroniMember>,
    etcd: Etcd,
    scope: String,
    password: String,
}

/// One Patroni process and the PostgreSQL server it runs.
pub struct PatroniMember {
    name: String,
    pg_addr: SocketAddr,
    api_url: String,
    // Declared before `dir`, so that the processes die before their directory goes.
    process: ServerProcess,
    /// Until stopped or killed.
    running: bool,
    data: PathBuf,
    dir: TempDir,
}

impl PatroniCluster {
    /// Starts 3 etcd members and `members` Patroni members (named `pg0`,
    /// `pg1`, …), and returns once one member is the leader and all others
    /// are replicas streaming from it.
    pub async fn start(members: usize) -> Result<PatroniCluster> {
        ensure!(
            (1..=200).contains(&members),
            "{members} members: hosts are 127.0.0.2 to 127.0.0.201"
        );
        let deadline = Instant::now() + CLUSTER_START_TIMEOUT;
        let etcd = Etcd::start(ETCD_MEMBERS).await?;
        let replicator_password = random_password();
        let mut cluster = PatroniCluster {
            members: Vec::with_capacity(members),
            etcd,
            scope: format!("rouse-{}", random_password()[..8].to_lowercase()),
            password: random_password(),
        };
        for i in 0..members {
            let member = PatroniMember::spawn(
                i,
                &cluster.scope,
                &cluster.etcd.client_urls(),
                &cluster.password,
                &replicator_password,
            )?;
            cluster.members.push(member);
        }

        // Every member up: its PostgreSQL runs (GET /health answers 200),
        // which for a replica means the base backup is done.
        for member in &mut cluster.members {
            let health = format!("{}/health", member.api_url);
            member
                .process
                .wait_ready(remaining(deadline), || api_ok(&health))
                .await?;
        }
        let leader = cluster
            .wait_leader(|_| true, remaining(deadline))
            .await
            .context("no leader after the start")?;
        let replicas = members - 1;
        let (addr, password) = (cluster.members[leader].pg_addr, cluster.password.clone());
        let streaming = cluster.members[leader]
            .process
            .wait_ready(remaining(deadline), || {
                let password = password.clone();
                async move {
                    let client = connect(addr, &password).await?;
                    let row = client
                        .query_one(
                            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                            &[],
                        )
                        .await?;
                    let streaming = usize::try_from(row.get::<_, i64>(0))?;
                    ensure!(
                        streaming == replicas,
                        "{streaming} of {replicas} replicas stream"
                    );
                    Ok(())
                }
            })
            .await;
        if let Err(e) = streaming {
            bail!("{e:#}\n{}", cluster.all_logs(20));
        }
        Ok(cluster)
    }

    /// (name, PostgreSQL address, REST API base URL) of every member, the
    /// shape `ProxyBuilder::patroni_cluster` takes.
    pub fn members(&self) -> Vec<(String, SocketAddr, String)> {
        self.members
            .iter()
            .map(|m| (m.name.clone(), m.pg_addr, m.api_url.clone()))
            .collect()
    }

    pub fn member(&self, i: usize) -> &PatroniMember {
        &self.members[i]
    }

    /// Patroni's `scope`, unique per cluster: the cluster's key in etcd, and
    /// PostgreSQL's `cluster_name`, which its processes show as
    /// `postgres: <scope>: …`.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The password of superuser `postgres`.
    pub fn superuser_password(&self) -> &str {
        &self.password
    }

    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The index of the member whose REST API answers `GET /primary` with
    /// 200. Fails when none does, or more than one.
    pub async fn leader(&self) -> Result<usize> {
        let mut leaders = Vec::new();
        for (i, member) in self.members.iter().enumerate() {
            if api_ok(&format!("{}/primary", member.api_url)).await.is_ok() {
                leaders.push(i);
            }
        }
        match leaders[..] {
            [leader] => Ok(leader),
            [] => bail!("no member answers GET /primary with 200"),
            _ => bail!("several members answer GET /primary with 200: {leaders:?}"),
        }
    }

    /// Polls [`leader`](Self::leader) until it names a member other than
    /// `old`, and that member's PostgreSQL accepts writes: Patroni answers
    /// `GET /primary` with 200 as soon as it holds the leader key, a moment
    /// before its PostgreSQL is promoted.
    pub async fn wait_leader_other_than(&self, old: usize, timeout: Duration) -> Result<usize> {
        self.wait_leader(|i| i != old, timeout)
            .await
            .with_context(|| format!("no leader other than {}", self.members[old].name))
    }

    async fn wait_leader(
        &self,
        wanted: impl Fn(usize) -> bool,
        timeout: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.leader().await {
                Ok(i) if wanted(i) => match self.writable(i).await {
                    Ok(()) => return Ok(i),
                    Err(e) => format!("{e:#}"),
                },
                Ok(i) => format!("the leader is still {}", self.members[i].name),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "after {timeout:?}, {last}; the logs end with:\n{}",
                    self.all_logs(20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Succeeds when member `i`'s PostgreSQL is out of recovery.
    async fn writable(&self, i: usize) -> Result<()> {
        let client = self.connect(i).await?;
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get(0);
        ensure!(!in_recovery, "{} is not promoted yet", self.members[i].name);
        Ok(())
    }

    /// Stops member `i` the way an operator would: SIGTERM to Patroni, which
    /// stops PostgreSQL (fast shutdown) and, when it led, gives up the
    /// leader key, so that a replica takes over within a few seconds.
    pub async fn stop_member(&mut self, i: usize) -> Result<()> {
        let member = &mut self.members[i];
        // A paused Patroni would never see the SIGTERM.
        member.signal_patroni(libc::SIGCONT);
        let stopped = member.process.terminate(STOP_GRACE).await;
        // Whatever Patroni left behind: nothing, when it stopped cleanly.
        member.kill();
        stopped
    }

    /// SIGKILLs member `i`: Patroni and PostgreSQL at once, like a crashed
    /// host. The leader key stays until its `ttl` expires.
    pub fn kill_member(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// SIGSTOPs member `i`'s Patroni (its process group) but not its
    /// PostgreSQL, like a Patroni that hangs: once its leader key is `ttl`
    /// old, another member takes over, while this PostgreSQL still runs as
    /// it was (a primary stays a writable primary). Its REST API accepts
    /// connections but never answers.
    pub fn pause_member(&mut self, i: usize) {
        self.members[i].signal_patroni(libc::SIGSTOP);
    }

    /// SIGCONTs a [paused](Self::pause_member) member's Patroni, which then
    /// finds out who leads: a former leader demotes its PostgreSQL. Not
    /// always, with Patroni 3.0.2 (Debian 12): its stale view of etcd may
    /// make it renew its expired session and overwrite the leader key
    /// without a compare, taking the lead back from the new leader (fixed in
    /// 3.0.3, patroni/patroni#2689). Resume at the end of a test.
    pub fn resume_member(&mut self, i: usize) {
        self.members[i].signal_patroni(libc::SIGCONT);
    }

    /// A connection to member `i` as the superuser, to database `postgres`;
    /// its driving task runs on the current runtime.
    pub async fn connect(&self, i: usize) -> Result<tokio_postgres::Client> {
        connect(self.members[i].pg_addr, &self.password).await
    }

    /// The last `lines` lines of member `i`'s log: Patroni's and PostgreSQL's.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.members[i].process.log_tail(lines)
    }

    fn all_logs(&self, lines: usize) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {}:\n{}", m.name, m.process.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl PatroniMember {
    /// Writes the configuration of member `i` and starts its Patroni.
    fn spawn(
        i: usize,
        scope: &str,
        etcd: &[String],
        password: &str,
        replicator_password: &str,
    ) -> Result<Self> {
        let name = format!("pg{i}");
        let host = IpAddr::V4(Ipv4Addr::new(127, 0, 0, u8::try_from(i + 2)?));
        let pg_addr = SocketAddr::new(host, free_port(host));
        let api_addr = SocketAddr::new(host, free_port(host));
        let dir = temp_dir(&format!("rouse-patroni-{name}-"))?;
        let data = dir.path().join("data");
        let pg_bin = bin_dir()?;
        let hosts: Vec<&str> = etcd
            .iter()
            .map(|url| url.trim_start_matches("http://"))
            .collect();

        // JSON is YAML too.
        let config = json!({
            "scope": scope,
            "name": name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": api_addr.to_string(),
                "connect_address": api_addr.to_string(),
            },
            "etcd3": {"hosts": hosts},
            "bootstrap": {
                // The cluster-wide settings, stored in etcd by the first member.
                "dcs": {
                    // The leader renews its key every loop_wait; the others
                    // take over when it is ttl old. Patroni 3.0 validates no
                    // bounds; its rule loop_wait + 2 * retry_timeout <= ttl
                    // holds, and 10s leaves a loaded machine room before a
                    // slow leader loses its key.
                    "ttl": 10,
                    "loop_wait": 1,
                    "retry_timeout": 3,
                    // A replica far behind (say after a pgbench run) still
                    // gets promoted: tests want a leader, not zero data loss.
                    "maximum_lag_on_failover": 1u64 << 30,
                    "synchronous_mode": false,
                    "postgresql": {
                        "use_pg_rewind": true,
                        "use_slots": true,
                        "parameters": {
                            // Tests run pgbench through a proxy.
                            "max_connections": 200,
                            "shared_buffers": "16MB",
                            "password_encryption": "scram-sha-256",
                            // A throwaway cluster on a busy disk.
                            "fsync": "off",
                            // Replicas retry a lost primary (or a slot not
                            // created yet) every 5s by default.
                            "wal_retrieve_retry_interval": "500ms",
                        },
                    },
                },
                "initdb": [
                    {"encoding": "UTF8"},
                    {"locale": "C"},
                    {"auth": "scram-sha-256"},
                    "no-sync",
                ],
            },
            "postgresql": {
                "listen": pg_addr.to_string(),
                "connect_address": pg_addr.to_string(),
                "data_dir": data,
                "bin_dir": pg_bin,
                // Else ~/pgpass, shared by all members.
                "pgpass": dir.path().join("pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": password},
                    "replication": {"username": REPLICATOR, "password": replicator_password},
                },
                "parameters": {
                    // Not /var/run/postgresql, which may not exist, and is shared.
                    "unix_socket_directories": dir.path(),
                },
                "basebackup": [{"checkpoint": "fast"}],
                "pg_hba": [
                    "local all all scram-sha-256",
                    "host all all 127.0.0.0/8 scram-sha-256",
                    "host replication all 127.0.0.0/8 scram-sha-256",
                ],
            },
            // Patroni would try /dev/watchdog.
            "watchdog": {"mode": "off"},
        });
        let config_path = dir.path().join("patroni.yml");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("cannot write {}", config_path.display()))?;

        // `patroni` on a PATH of system directories: the Debian package's
        // script runs /usr/bin/python3, and a pyenv or virtualenv shim first
        // on the caller's PATH must not take its place. No other variable
        // of the caller's either: PATRONI_* would override the configuration,
        // PG* would redirect pg_basebackup, PYTHON* could break Python.
        let path = format!("{}:/usr/local/bin:/usr/bin:/bin", pg_bin.display());
        let mut cmd = Command::new(binary("PATRONI", "patroni"));
        cmd.env_clear()
            .env("PATH", path)
            // Patroni runs as postgres, which cannot read root's home.
            .env("HOME", dir.path())
            .env("LANG", "C.UTF-8")
            .current_dir(dir.path())
            .arg(&config_path);
        if let Some(user) = RunAs::when_root()? {
            // Patroni writes pgpass and the data directory in here.
            user.chown_path(dir.path())?;
            user.apply(&mut cmd);
        }
        let process = ServerProcess::spawn(
            &format!("patroni {name}"),
            cmd,
            &dir.path().join("patroni.log"),
        )?;
        Ok(PatroniMember {
            name,
            pg_addr,
            api_url: format!("http://{api_addr}"),
            process,
            running: true,
            data,
            dir,
        })
    }

    /// `pg0`, `pg1`, …
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pg_addr(&self) -> SocketAddr {
        self.pg_addr
    }

    /// `http://127.0.0.<i+2>:<port>`, without a trailing slash.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The temporary directory holding the configuration, the data
    /// directory, the socket and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Signals Patroni's process group, unless it was stopped or killed (its
    /// group id may belong to another process by now).
    fn signal_patroni(&self, signal: libc::c_int) {
        if self.running {
            // SAFETY: killpg(2) has no memory-safety preconditions.
            unsafe { libc::killpg(self.process.pid() as libc::pid_t, signal) };
        }
    }

    /// SIGKILLs Patroni's process group first, so that it cannot restart
    /// PostgreSQL, then the postmaster of the data directory and its children.
    fn kill(&mut self) {
        self.running = false;
        self.process.kill();
        kill_postmasters(&self.data);
    }
}

impl Drop for PatroniMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILLs every process started with `-D <data>` (a postmaster, also a
/// stray `pg_ctl` or `pg_basebackup`) and every child of those, then waits a
/// little for them to be gone. A postmaster is stopped first so that it forks
/// no child between the look-up of its children and its death.
fn kill_postmasters(data: &Path) {
    // Arguments end with a NUL, which `pids_mentioning` turns into a space:
    // the space keeps `<dir>/data` from matching `<dir>/data2`.
    let parents = pids_mentioning(&format!("-D {} ", data.display()));
    let mut killed = Vec::new();
    for &pid in &parents {
        signal(pid, libc::SIGSTOP);
        for child in children_of(pid) {
            signal(child, libc::SIGKILL);
            killed.push(child);
        }
        signal(pid, libc::SIGKILL);
        killed.push(pid);
    }
    // They are not our children, and init reaps them: wait until they are
    // zombies at least, so that their ports and files are released.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while killed.iter().any(|&pid| is_alive(pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// The fields of `/proc/<pid>/stat` after the command name, which may
/// contain spaces and parentheses: state, ppid, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat_fields(pid).is_some_and(|f| f.get(1).and_then(|p| p.parse().ok()) == Some(parent))
        })
        .collect()
}

/// Neither gone nor a zombie.
fn is_alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|state| state != "Z" && state != "X"))
}

/// Succeeds when `GET url` answers 200 within [`API_TIMEOUT`]: Patroni
/// answers its health checks with 503.
async fn api_ok(url: &str) -> Result<()> {
    let status = http_client()
        .get(url)
        .timeout(API_TIMEOUT)
        .send()
        .await?
        .status();
    ensure!(status.is_success(), "GET {url}: HTTP {status}");
    Ok(())
}

async fn connect(addr: SocketAddr, password: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::Config::new()
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(SUPERUSER)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5))
        .connect(NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {addr} as {SUPERUSER}"))?;
    // Connection errors also fail the client's calls, where tests see them.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn random_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
