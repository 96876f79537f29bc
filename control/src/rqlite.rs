//! A small client of rqlite's HTTP API: parameterised statements, readiness
//! and leader discovery. Used for the `_system` store and by the rqlite
//! engine's checks.

use std::time::Duration;

use rouse_control_api::BackendCredentials;
use serde::Deserialize;
use serde_json::Value;

/// How long a whole-database copy (`/db/backup`, `/db/load`) may take.
const BULK_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long a statement waits for a leader to be elected.
const ELECTION_WAIT: Duration = Duration::from_secs(5);

/// How current a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Through the Raft log: proves a working leader, costs a log entry.
    Strong,
    /// The leader's copy (`weak`): every acknowledged write, unless the
    /// leader changed a moment ago; no log entry.
    Leader,
    /// This member's own copy (`none`): possibly a moment behind.
    Local,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Strong => "strong",
            Level::Leader => "weak",
            Level::Local => "none",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RqliteError {
    #[error("rqlite at {addr} unreachable: {source}")]
    Transport {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("rqlite at {addr} answered HTTP {status}: {body}")]
    Http {
        addr: String,
        status: u16,
        body: String,
    },
    #[error("rqlite statement failed: {0}")]
    Statement(String),
    /// The node could not run the request at all (leadership lost while
    /// committing, the leader unreachable for a forward): rqlite says so in
    /// a 200 whose body holds an `error` and no results.
    #[error("rqlite at {addr} could not run the request: {message}")]
    Unanswered { addr: String, message: String },
}

/// SQL with positional `?` arguments.
#[derive(Clone)]
pub struct Stmt {
    sql: String,
    args: Vec<Value>,
}

impl Stmt {
    pub fn new(sql: impl Into<String>) -> Self {
        Stmt {
            sql: sql.into(),
            args: Vec::new(),
        }
    }

    pub fn arg(mut self, v: impl Into<Value>) -> Self {
        self.args.push(v.into());
        self
    }

    fn to_json(&self) -> Value {
        let mut parts = vec![Value::String(self.sql.clone())];
        parts.extend(self.args.iter().cloned());
        Value::Array(parts)
    }
}

#[derive(Debug, Deserialize)]
struct Response {
    #[serde(default)]
    results: Vec<StmtResult>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StmtResult {
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub values: Vec<Vec<Value>>,
    #[serde(default)]
    pub rows_affected: u64,
}

/// The results of a 200 answer to `statements` statements: an error when a
/// statement failed, when the node says it could not run the request, or
/// when results are missing (never "no rows").
fn answer(addr: &str, text: &str, statements: usize) -> Result<Vec<StmtResult>, RqliteError> {
    let parsed: Response = serde_json::from_str(text).map_err(|_| RqliteError::Http {
        addr: addr.to_string(),
        status: 200,
        body: text.to_string(),
    })?;
    if let Some(err) = parsed.results.iter().find_map(|r| r.error.clone()) {
        return Err(RqliteError::Statement(err));
    }
    if parsed.error.is_some() || parsed.results.len() != statements {
        return Err(RqliteError::Unanswered {
            addr: addr.to_string(),
            message: parsed.error.unwrap_or_else(|| {
                format!(
                    "{} results for {statements} statements",
                    parsed.results.len()
                )
            }),
        });
    }
    Ok(parsed.results)
}

/// One HTTP transport for every rqlited this daemon talks to. Built once:
/// building a client reads the system's certificate store, which a storm of
/// wakes cannot afford per call; shared, so connections are reused.
#[derive(Clone)]
pub struct RqliteTransport {
    http: reqwest::Client,
    /// `http` or `https`.
    scheme: &'static str,
}

impl RqliteTransport {
    pub fn is_https(&self) -> bool {
        self.scheme == "https"
    }

    /// Over TLS when `tls` is given.
    pub fn new(tls: Option<std::sync::Arc<rustls::ClientConfig>>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            // An engine that went to sleep leaves its connections behind.
            .pool_idle_timeout(Duration::from_secs(5))
            .tls_built_in_root_certs(false);
        let (http, scheme) = match tls {
            Some(config) => (http.use_preconfigured_tls((*config).clone()), "https"),
            None => (http, "http"),
        };
        RqliteTransport {
            http: http.build().expect("an rqlite client builds"),
            scheme,
        }
    }
}

#[derive(Clone)]
pub struct RqliteClient {
    addr: String,
    /// Basic auth: every request logs in (rqlited runs with `-auth`).
    login: reqwest::header::HeaderValue,
    transport: RqliteTransport,
}

impl RqliteClient {
    /// `addr` is `host:port` of the HTTP API.
    pub fn new(addr: &str, login: &BackendCredentials, transport: RqliteTransport) -> Self {
        let mut value = reqwest::header::HeaderValue::from_str(&login.basic_auth())
            .expect("base64 is a valid header value");
        value.set_sensitive(true);
        RqliteClient {
            addr: addr.to_string(),
            login: value,
            transport,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}://{}{path}", self.transport.scheme, self.addr);
        self.transport
            .http
            .request(method, url)
            .header(reqwest::header::AUTHORIZATION, self.login.clone())
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Posts `statements`, retrying while the cluster has no leader (503:
    /// an election after a member died), for up to [`ELECTION_WAIT`]. A read
    /// is also retried when the node could not run it (a leader change under
    /// way); a write is not, since it may have been applied all the same.
    async fn post(
        &self,
        path: &str,
        statements: &[Stmt],
        read: bool,
    ) -> Result<Vec<StmtResult>, RqliteError> {
        let body = Value::Array(statements.iter().map(Stmt::to_json).collect());
        let deadline = tokio::time::Instant::now() + ELECTION_WAIT;
        loop {
            let answer = self.post_once(path, &body, statements.len()).await;
            let retry = match &answer {
                Err(RqliteError::Http { status: 503, .. }) => true,
                Err(RqliteError::Unanswered { .. }) => read,
                _ => false,
            };
            if !retry || tokio::time::Instant::now() >= deadline {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One request; `Ok` only with one result per statement.
    async fn post_once(
        &self,
        path: &str,
        body: &Value,
        statements: usize,
    ) -> Result<Vec<StmtResult>, RqliteError> {
        let transport = |source| RqliteError::Transport {
            addr: self.addr.clone(),
            source,
        };
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(transport)?;
        if status != 200 {
            return Err(RqliteError::Http {
                addr: self.addr.clone(),
                status,
                body: text,
            });
        }
        answer(&self.addr, &text, statements)
    }

    /// Runs writes in one transaction: all of them or none.
    pub async fn execute(&self, stmts: Vec<Stmt>) -> Result<Vec<StmtResult>, RqliteError> {
        self.post("/db/execute?transaction", &stmts, false).await
    }

    /// A read at `level=strong`: it goes through Raft, so it proves there is
    /// a working leader.
    pub async fn query(&self, stmt: Stmt) -> Result<StmtResult, RqliteError> {
        let mut results = self.read(vec![stmt], Level::Strong).await?;
        Ok(results.pop().expect("one result per statement"))
    }

    /// A read of this member's own copy (`level=none`): no trip through
    /// Raft, possibly a moment behind. For background scans, where a stale
    /// row is seen again at the next turn.
    pub async fn query_local(&self, stmt: Stmt) -> Result<StmtResult, RqliteError> {
        let mut results = self.read(vec![stmt], Level::Local).await?;
        Ok(results.pop().expect("one result per statement"))
    }

    /// Several reads in one request (one Raft entry at `Level::Strong`).
    pub async fn read(
        &self,
        stmts: Vec<Stmt>,
        level: Level,
    ) -> Result<Vec<StmtResult>, RqliteError> {
        self.post(&format!("/db/query?level={}", level.as_str()), &stmts, true)
            .await
    }

    /// `/readyz` is 200: the node runs and knows a leader.
    pub async fn ready(&self) -> bool {
        self.answers("/readyz").await
    }

    /// The node answers HTTP at all (it may not know a leader yet). Asked of
    /// `/readyz`, not `/status`, whose document costs the node ~30 ms to
    /// build: a storm of starting engines is polled every few milliseconds.
    pub async fn alive(&self) -> bool {
        self.answers("/readyz?noleader").await
    }

    async fn answers(&self, path: &str) -> bool {
        matches!(
            self.request(reqwest::Method::GET, path).timeout(Duration::from_secs(1)).send().await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Removes the member `id` from the Raft configuration (rqlite forwards
    /// this to the leader). A member that is already gone is no error.
    pub async fn remove_node(&self, id: &str) -> Result<(), RqliteError> {
        let resp = self
            .request(reqwest::Method::DELETE, "/remove")
            .json(&serde_json::json!({ "id": id }))
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        if status == 200 || status == 404 {
            return Ok(());
        }
        Err(RqliteError::Http {
            addr: self.addr.clone(),
            status,
            body: resp.text().await.unwrap_or_default(),
        })
    }

    /// Sends a whole-database transfer (`/db/backup`, `/db/load`): the
    /// response when it is 200.
    async fn bulk(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, RqliteError> {
        let resp = req
            .timeout(BULK_TIMEOUT)
            .send()
            .await
            .map_err(|source| self.transport(source))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(RqliteError::Http {
                addr: self.addr.clone(),
                status,
                body: resp.text().await.unwrap_or_default(),
            });
        }
        Ok(resp)
    }

    fn transport(&self, source: reqwest::Error) -> RqliteError {
        RqliteError::Transport {
            addr: self.addr.clone(),
            source,
        }
    }

    /// A consistent copy of the whole database as an SQLite file
    /// (`/db/backup`, asked of the leader), streamed into `out`.
    pub async fn backup_to(&self, out: &mut tokio::fs::File) -> Result<u64, RqliteError> {
        use tokio::io::AsyncWriteExt;
        let mut resp = self
            .bulk(self.request(reqwest::Method::GET, "/db/backup"))
            .await?;
        let mut size = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(e))? {
            size += chunk.len() as u64;
            out.write_all(&chunk)
                .await
                .map_err(|e| RqliteError::Statement(format!("cannot write the backup: {e}")))?;
        }
        Ok(size)
    }

    /// Replaces the whole database with the SQLite file `sqlite`, through
    /// Raft (`/db/load`, asked of the leader): every replica gets it.
    pub async fn load(&self, sqlite: tokio::fs::File) -> Result<(), RqliteError> {
        let req = self
            .request(reqwest::Method::POST, "/db/load")
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::from(sqlite));
        self.bulk(req).await.map(|_| ())
    }

    /// The rqlited version, as `/status` reports it.
    pub async fn version(&self) -> Option<String> {
        let status = self.get_json("/status").await?;
        status["build"]["version"].as_str().map(str::to_string)
    }

    /// The ids of the cluster's members, voting or not, as this node knows them.
    pub async fn members(&self) -> Option<Vec<String>> {
        let nodes = self.get_json("/nodes?nonvoters&ver=2").await?;
        Some(
            nodes["nodes"]
                .as_array()?
                .iter()
                .filter_map(|n| n["id"].as_str().map(str::to_string))
                .collect(),
        )
    }

    /// A status endpoint's JSON, or `None` when the node does not answer.
    async fn get_json(&self, path: &str) -> Option<Value> {
        self.request(reqwest::Method::GET, path)
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// The node id of the current leader, as this node sees it.
    pub async fn leader_id(&self) -> Option<String> {
        let status = self.get_json("/status").await?;
        status["store"]["leader"]["node_id"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_that_could_not_run_a_read_is_an_error_not_an_empty_answer() {
        // What rqlited answers when leadership is lost mid-request.
        let lost = r#"{"error":"leadership lost while committing log","time":0.01}"#;
        assert!(matches!(
            answer("n:1", lost, 1),
            Err(RqliteError::Unanswered { message, .. }) if message.contains("leadership lost")
        ));
        assert!(matches!(
            answer("n:1", r#"{"results":[{"values":[[1]]}]}"#, 2),
            Err(RqliteError::Unanswered { .. })
        ));
        assert!(matches!(
            answer("n:1", r#"{"results":[{"error":"no such table: t"}]}"#, 1),
            Err(RqliteError::Statement(e)) if e == "no such table: t"
        ));
        let rows = answer("n:1", r#"{"results":[{"values":[[1]]},{}]}"#, 2).unwrap();
        assert_eq!(rows[0].values, vec![vec![Value::from(1)]]);
        assert!(rows[1].values.is_empty());
    }
}
