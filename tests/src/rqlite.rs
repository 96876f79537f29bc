//! A single-node `rqlited`, and calls of rqlite's HTTP API.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use crate::process::ServerProcess;
use crate::{binary, free_port, get_ok, http_client, temp_dir, LOCALHOST, START_TIMEOUT};

pub struct Rqlited {
    // Declared before `dir`, so that the process dies before its directory goes.
    process: ServerProcess,
    http_addr: SocketAddr,
    dir: TempDir,
}

impl Rqlited {
    /// Starts `$RQLITED` (else `rqlited` on PATH) and waits until `/readyz` answers.
    pub async fn start() -> Result<Self> {
        let dir = temp_dir("rouse-rqlited-")?;
        let http_addr = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let raft_addr = SocketAddr::new(LOCALHOST, free_port(LOCALHOST));
        let mut cmd = Command::new(binary("RQLITED", "rqlited"));
        cmd.current_dir(dir.path())
            .args(["-node-id", "1"])
            .args(["-http-addr", &http_addr.to_string()])
            .args(["-raft-addr", &raft_addr.to_string()])
            // Short timeouts: the lone node elects itself in a fraction of a
            // second. Raft refuses a leader lease longer than the heartbeat
            // timeout, and the lease defaults to 500ms.
            .args(["-raft-election-timeout", "100ms", "-raft-timeout", "100ms"])
            .args(["-raft-leader-lease-timeout", "100ms"])
            .arg(dir.path().join("data"));
        let mut process = ServerProcess::spawn("rqlited", cmd, &dir.path().join("rqlited.log"))?;
        let readyz = format!("http://{http_addr}/readyz");
        process
            .wait_ready(START_TIMEOUT, || get_ok(&readyz))
            .await?;
        Ok(Rqlited {
            process,
            http_addr,
            dir,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// The temporary directory holding the data and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

/// The base URL of replica `e` of an rqlite database, with the engine login
/// control sealed into `info` for an admin (rqlited runs with `-auth`).
pub fn engine_url(
    info: &rouse_control_api::DatabaseInfo,
    e: &rouse_control_api::Endpoint,
) -> String {
    let scheme = if e.tls { "https" } else { "http" };
    match &crate::control::engine_login(info) {
        Some(login) => format!(
            "{scheme}://{}:{}@{}:{}",
            login.user, login.password, e.host, e.port
        ),
        None => format!("{scheme}://{}:{}", e.host, e.port),
    }
}

/// curl's arguments to reach `path` of replica `e` the way [`engine_url`]
/// does, checking the engine's certificate against the controls' CAs when
/// its HTTP API speaks TLS (the certificate names `rouse-engine`, not the
/// address).
pub fn engine_curl_args(
    info: &rouse_control_api::DatabaseInfo,
    e: &rouse_control_api::Endpoint,
    path: &str,
) -> Vec<String> {
    let url = format!("{}{path}", engine_url(info, e));
    if !e.tls {
        return vec![url];
    }
    let ca = std::env::temp_dir().join(format!("rouse-engine-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, crate::control::engine_cas()).expect("write the engine CAs");
    let name = rouse_control_api::engine_tls::SERVER_NAME;
    let host = format!("{}:{}", e.host, e.port);
    vec![
        "--cacert".into(),
        ca.to_string_lossy().into_owned(),
        "--resolve".into(),
        format!("{name}:{}:{}", e.port, e.host),
        url.replace(&host, &format!("{name}:{}", e.port)),
    ]
}

/// Runs one statement through `POST /db/execute` of the rqlite node at
/// `addr` (`host:port` or a URL); fails on any error rqlite reports.
pub async fn rqlite_execute(addr: &str, sql: &str) -> Result<Value> {
    post(addr, "/db/execute", sql).await
}

/// The rows of one strongly consistent query (`POST /db/query?level=strong`).
pub async fn rqlite_query(addr: &str, sql: &str) -> Result<Vec<Vec<Value>>> {
    let mut answer = post(addr, "/db/query?level=strong", sql).await?;
    // A statement without rows has no `values` at all.
    let values = answer.pointer_mut("/results/0/values").map(Value::take);
    Ok(match values {
        Some(values) => serde_json::from_value(values).context("rqlite rows are not arrays")?,
        None => Vec::new(),
    })
}

async fn post(addr: &str, path: &str, sql: &str) -> Result<Value> {
    let base = if addr.contains("://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{addr}")
    };
    let url = format!("{base}{path}");
    // Like rqlite's own clients, wait out an election (503, "leader not
    // found"): a loaded machine makes a young Raft cluster elect again.
    let elected_by = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (status, body) = loop {
        let response = http_client()
            .post(&url)
            .json(&[sql])
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .with_context(|| format!("POST {url}"))?;
        if status != reqwest::StatusCode::SERVICE_UNAVAILABLE
            || std::time::Instant::now() > elected_by
        {
            break (status, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    ensure!(status.is_success(), "POST {url}: HTTP {status}: {body}");
    let answer: Value =
        serde_json::from_str(&body).with_context(|| format!("POST {url}: not JSON: {body}"))?;
    // rqlite answers 200 to failed statements and reports them per result.
    let results = answer["results"].as_array().into_iter().flatten();
    if let Some(error) = std::iter::once(&answer)
        .chain(results)
        .find_map(|r| r["error"].as_str())
    {
        bail!("rqlite refused {sql:?}: {error}");
    }
    Ok(answer)
}
