//! Test harness of rouse: real `rqlited`, PostgreSQL, Redis and
//! `rouse-control` processes on free loopback ports, each in a temporary
//! directory of its own. Dropping a server SIGKILLs its whole process group
//! and removes its directory, also when the test panics.

mod cluster;
mod control;
mod netns;
mod patroni;
mod postgres;
mod process;
mod proxy;
mod redis;
mod relay;
mod rqlite;
mod s3;
mod sentinel;
mod stack;
mod tls;

use std::fs::Permissions;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tempfile::TempDir;

pub use cluster::Cluster;
pub use control::{control_bin, engine_login, Control, ControlBuilder};
pub use netns::Network;
pub use patroni::{Etcd, PatroniCluster, PatroniMember};
pub use postgres::{bin_dir as postgres_bin_dir, Postgres, RunAs};
pub use process::{run, ServerProcess};
pub use proxy::{Proxy, ProxyBuilder};
pub use redis::{redis_cli, Redis, RedisBuilder, TlsFiles};
pub use relay::Relay;
pub use rqlite::{engine_curl_args, engine_url, rqlite_execute, rqlite_query, Rqlited};
pub use s3::S3;
pub use sentinel::{Sentinel, SentinelBuilder};
pub use stack::{name, Stack, StackBuilder, APP};
pub use tls::{pg_connect_url, trust_any_certificate};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// How long rqlited, PostgreSQL and Redis may take to answer after a start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A port nobody listens on right now. Another process may take it before
/// the caller binds it, which is rare enough for tests.
pub fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|listener| listener.local_addr())
        .unwrap_or_else(|e| panic!("cannot bind a port on {ip}: {e}"))
        .port()
}

/// Whether `addr` can be bound, i.e. nothing listens on it any more.
pub fn port_is_free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

/// Ids of the live processes whose command line contains `needle`, this
/// process excepted (so that a sweep never kills the test itself).
pub fn pids_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            // Arguments are NUL-separated; as spaces, a needle such as
            // "-D /some/dir" can span two of them.
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (pid != std::process::id() && cmdline.contains(needle)).then_some(pid)
        })
        .collect()
}

/// Runs a command to completion and returns its stdout and stderr; panics
/// with both when it fails (tests drive real clients such as psql with it).
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// The value of one series in the Prometheus text at `url` (0 when absent).
pub async fn metric(url: &str, series: &str) -> f64 {
    let text = http_client()
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A temporary directory that others may traverse: PostgreSQL runs as user
/// `postgres` when the tests run as root.
fn temp_dir(prefix: &str) -> Result<TempDir> {
    // `ROUSE_TEST_KEEP=1` leaves every directory (logs, data) behind for
    // a post-mortem of a failure that does not reproduce at will.
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(std::env::var_os("ROUSE_TEST_KEEP").is_some())
        .tempdir()
        .context("cannot create a temporary directory")?;
    std::fs::set_permissions(dir.path(), Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", dir.path().display()))?;
    Ok(dir)
}

/// The program named by environment variable `var`, else `name` on PATH.
fn binary(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| name.into(), PathBuf::from)
}

/// A fresh client per caller: a pooled connection is tied to the tokio
/// runtime that opened it, and every `#[tokio::test]` has its own runtime.
/// A client for tests; it trusts the engines of every control this process
/// started, when their HTTP API speaks TLS.
pub fn http_client() -> reqwest::Client {
    // No system roots: nothing here is vouched for by a public CA, and
    // reading the system's store costs each build milliseconds.
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .tls_built_in_root_certs(false);
    let cas = control::engine_cas();
    if !cas.is_empty() {
        let config = rouse_control_api::engine_tls::client_config(cas.as_bytes())
            .expect("controls' engine CAs are usable");
        builder = builder.use_preconfigured_tls((*config).clone());
    }
    builder.build().expect("a test client builds")
}

/// Succeeds when `GET url` answers 2xx: the readiness probe of HTTP servers.
async fn get_ok(url: &str) -> Result<()> {
    let status = http_client().get(url).send().await?.status();
    ensure!(status.is_success(), "GET {url}: HTTP {status}");
    Ok(())
}
