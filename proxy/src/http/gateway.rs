//! The gateway API `/v1/database/{exec,query,transaction,schema,
//! create-table,drop-table,list}`: JSON in, rqlite statements out, or
//! PostgreSQL's ([`super::gateway_pg`]) for a PostgreSQL database. The app
//! is always the credential's; the database comes from the request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use rouse_control_api::Name;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::gateway_pg::On;
use super::{database_key, json, read_body, Body, Proxy, Served};
use crate::error::{ProxyError, Result};

const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    database: String,
    sql: String,
    #[serde(default)]
    args: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Transaction {
    database: String,
    queries: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseOnly {
    database: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTable {
    database: String,
    schema: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DropTable {
    database: String,
    table_name: String,
}

async fn body_json<T: DeserializeOwned>(proxy: &Proxy, req: Request<Incoming>) -> Result<T> {
    let body = read_body(proxy, req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ProxyError::BadRequest(format!("invalid JSON body: {e}")))
}

pub(super) async fn handle(
    proxy: &Arc<Proxy>,
    app: &Name,
    op: &str,
    req: Request<Incoming>,
    served: &mut Served,
) -> Result<Response<Body>> {
    let method = req.method().clone();
    let ok = |v: Value| Ok(json(StatusCode::OK, &v));
    match (&method, op) {
        (&Method::POST, "exec") => {
            let s: Statement = body_json(proxy, req).await?;
            if let Some(pg) = postgres(proxy, app, &s.database, served).await? {
                return ok(pg.exec(&s.sql, &s.args).await?);
            }
            let r = run(
                proxy,
                app,
                &s.database,
                served,
                "/db/execute",
                statement(&s.sql, &s.args),
                QUERY_TIMEOUT,
            )
            .await?;
            ok(
                json!({"rows_affected": r["rows_affected"].as_u64().unwrap_or(0), "last_insert_id": r["last_insert_id"].as_i64().unwrap_or(0)}),
            )
        }
        (&Method::POST, "query") => {
            let s: Statement = body_json(proxy, req).await?;
            if let Some(pg) = postgres(proxy, app, &s.database, served).await? {
                return ok(pg.query(&s.sql, &s.args).await?);
            }
            let r = run(
                proxy,
                app,
                &s.database,
                served,
                "/db/query?associative",
                statement(&s.sql, &s.args),
                QUERY_TIMEOUT,
            )
            .await?;
            let items = r["rows"].as_array().cloned().unwrap_or_default();
            ok(json!({"count": items.len(), "items": items}))
        }
        (&Method::POST, "transaction") => {
            let t: Transaction = body_json(proxy, req).await?;
            let stmts = t
                .queries
                .iter()
                .map(transaction_statement)
                .collect::<Result<Vec<_>>>()?;
            if stmts.is_empty() {
                return Err(ProxyError::BadRequest("queries must not be empty".into()));
            }
            if let Some(pg) = postgres(proxy, app, &t.database, served).await? {
                let statements: Vec<_> = stmts.iter().map(pg_statement).collect();
                return ok(pg.transaction(&statements).await?);
            }
            run_all(
                proxy,
                app,
                &t.database,
                served,
                "/db/execute?transaction",
                Value::Array(stmts),
                TRANSACTION_TIMEOUT,
            )
            .await?;
            ok(json!({"success": true}))
        }
        (&Method::GET | &Method::POST, "schema") => {
            let database = if method == Method::GET {
                query_param(&req, "database")
                    .ok_or_else(|| ProxyError::BadRequest("missing ?database=".into()))?
            } else {
                body_json::<DatabaseOnly>(proxy, req).await?.database
            };
            if let Some(pg) = postgres(proxy, app, &database, served).await? {
                return ok(pg.schema().await?);
            }
            let sql = "SELECT m.name, p.name FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS p \
                       WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' ORDER BY m.name, p.cid";
            let r = run(
                proxy,
                app,
                &database,
                served,
                "/db/query",
                statement(sql, &[]),
                QUERY_TIMEOUT,
            )
            .await?;
            let mut tables: Vec<Value> = Vec::new();
            for row in r["values"].as_array().into_iter().flatten() {
                let (table, column) = (row[0].clone(), row[1].clone());
                match tables.last_mut() {
                    Some(t) if t["name"] == table => t["columns"]
                        .as_array_mut()
                        .expect("built as array")
                        .push(column),
                    _ => tables.push(json!({"name": table, "columns": [column]})),
                }
            }
            ok(json!({"tables": tables}))
        }
        (&Method::POST, "create-table") => {
            let c: CreateTable = body_json(proxy, req).await?;
            let head: String = c.schema.trim_start().chars().take(12).collect();
            if !head.to_ascii_lowercase().starts_with("create table") {
                return Err(ProxyError::BadRequest(
                    "schema must be a CREATE TABLE statement".into(),
                ));
            }
            if let Some(pg) = postgres(proxy, app, &c.database, served).await? {
                return ok(pg.ddl(&c.schema).await?);
            }
            run(
                proxy,
                app,
                &c.database,
                served,
                "/db/execute",
                statement(&c.schema, &[]),
                QUERY_TIMEOUT,
            )
            .await?;
            // DDL changes no rows (SQLite would report the previous statement's count).
            ok(json!({"rows_affected": 0}))
        }
        (&Method::POST, "drop-table") => {
            let d: DropTable = body_json(proxy, req).await?;
            let valid = d
                .table_name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && d.table_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(ProxyError::BadRequest(format!(
                    "invalid table name {:?}",
                    d.table_name
                )));
            }
            let sql = format!("DROP TABLE \"{}\"", d.table_name);
            if let Some(pg) = postgres(proxy, app, &d.database, served).await? {
                return ok(pg.ddl(&sql).await?);
            }
            run(
                proxy,
                app,
                &d.database,
                served,
                "/db/execute",
                statement(&sql, &[]),
                QUERY_TIMEOUT,
            )
            .await?;
            // DDL changes no rows (SQLite would report the previous statement's count).
            ok(json!({"rows_affected": 0}))
        }
        (&Method::GET, "list") => {
            let list = proxy
                .control
                .list_databases(Some(app))
                .await
                .map_err(|e| ProxyError::Control(e.to_string()))?;
            let names: Vec<String> = list.databases.iter().map(|d| d.name.to_string()).collect();
            ok(json!({"databases": names}))
        }
        (
            _,
            "exec" | "query" | "transaction" | "schema" | "create-table" | "drop-table" | "list",
        ) => Err(ProxyError::BadRequest(format!(
            "{method} is not allowed on /v1/database/{op}"
        ))),
        _ => Err(ProxyError::NoRoute(format!("/v1/database/{op}"))),
    }
}

/// The PostgreSQL side of the app's `database`, when it is one.
async fn postgres<'a>(
    proxy: &'a Proxy,
    app: &Name,
    database: &str,
    served: &mut Served,
) -> Result<Option<On<'a>>> {
    let key = database_key(app, database)?;
    served.db = Some(key.clone());
    On::database(proxy, key).await
}

/// A transaction entry (`[sql, args...]`, as [`transaction_statement`]
/// builds it) for PostgreSQL.
fn pg_statement(stmt: &Value) -> crate::pg::over_http::Statement {
    let parts = stmt.as_array().map(Vec::as_slice).unwrap_or_default();
    let sql = parts.first().and_then(Value::as_str).unwrap_or_default();
    super::gateway_pg::statement(sql, parts.get(1..).unwrap_or_default())
}

fn query_param(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

/// `[sql, arg, ...]`, rqlite's parameterised statement.
fn statement(sql: &str, args: &[Value]) -> Value {
    let mut s = vec![Value::String(sql.to_string())];
    s.extend(args.iter().cloned());
    Value::Array(s)
}

/// A transaction entry: `"sql"`, `["sql", args...]` or `{"sql", "args"}`.
pub(crate) fn transaction_statement(q: &Value) -> Result<Value> {
    match q {
        Value::String(sql) => Ok(statement(sql, &[])),
        Value::Array(parts) if parts.first().is_some_and(Value::is_string) => Ok(q.clone()),
        Value::Object(o) => match (o.get("sql").and_then(Value::as_str), o.get("args")) {
            (Some(sql), None) => Ok(statement(sql, &[])),
            (Some(sql), Some(Value::Array(args))) => Ok(statement(sql, args)),
            _ => Err(ProxyError::BadRequest(
                "a query object needs \"sql\" and optional \"args\" array".into(),
            )),
        },
        _ => Err(ProxyError::BadRequest(
            "each query is a string, [sql, args...] or {\"sql\",\"args\"}".into(),
        )),
    }
}

async fn run(
    proxy: &Arc<Proxy>,
    app: &Name,
    database: &str,
    served: &mut Served,
    path: &str,
    stmt: Value,
    timeout: Duration,
) -> Result<Value> {
    let mut results = run_all(
        proxy,
        app,
        database,
        served,
        path,
        Value::Array(vec![stmt]),
        timeout,
    )
    .await?;
    Ok(results.pop().unwrap_or(Value::Null))
}

/// Runs statements on the app's database; a statement error is the
/// client's (400), anything else the backend's.
async fn run_all(
    proxy: &Arc<Proxy>,
    app: &Name,
    database: &str,
    served: &mut Served,
    path: &str,
    stmts: Value,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let key = database_key(app, database)?;
    served.db = Some(key.clone());
    // Every statement is built as `[sql, args...]` above.
    for stmt in stmts.as_array().into_iter().flatten() {
        if let Some(sql) = stmt.get(0).and_then(Value::as_str) {
            crate::sql::check(sql)?;
        }
    }
    let _in_flight = proxy.activity.begin(&key);
    let body = Bytes::from(serde_json::to_vec(&stmts).expect("JSON values serialise"));
    let ct = HeaderValue::from_static("application/json");
    let reply = proxy
        .send(&key, &Method::POST, path, Some(&ct), body, timeout)
        .await?;
    let doc: Value = serde_json::from_slice(&reply.body).map_err(|_| ProxyError::Backend {
        db: key.db.to_string(),
        reason: format!(
            "HTTP {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        ),
    })?;
    if !reply.status.is_success() {
        return Err(ProxyError::Backend {
            db: key.db.to_string(),
            reason: doc["error"].as_str().unwrap_or("error").to_string(),
        });
    }
    results_of(&key.db, &doc, stmts.as_array().map_or(0, Vec::len))
}

/// The per-statement results of a 200 answer to `sent` statements. A 200
/// can still say the node could not run the request (leadership lost while
/// committing): that is neither an empty result nor a success.
fn results_of(db: &Name, doc: &Value, sent: usize) -> Result<Vec<Value>> {
    let results = doc["results"].as_array().cloned().unwrap_or_default();
    if let Some(err) = results.iter().find_map(|r| r["error"].as_str()) {
        return Err(ProxyError::Sql(err.to_string()));
    }
    if doc.get("error").is_some() || results.len() != sent {
        return Err(ProxyError::Backend {
            db: db.to_string(),
            reason: doc["error"].as_str().map_or_else(
                || format!("{} results for {sent} statements", results.len()),
                str::to_string,
            ),
        });
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unrun_request_is_a_backend_error_never_an_empty_answer() {
        let db = Name::new("users").unwrap();
        let lost = serde_json::json!({"error": "leadership lost while committing log"});
        assert!(matches!(
            results_of(&db, &lost, 1),
            Err(ProxyError::Backend { reason, .. }) if reason.contains("leadership lost")
        ));
        let short = serde_json::json!({"results": [{"rows_affected": 1}]});
        assert!(matches!(
            results_of(&db, &short, 2),
            Err(ProxyError::Backend { .. })
        ));
        let failed = serde_json::json!({"results": [{"error": "no such table: t"}]});
        assert!(matches!(
            results_of(&db, &failed, 1),
            Err(ProxyError::Sql(_))
        ));
        let ok = serde_json::json!({"results": [{"rows_affected": 1}, {"rows_affected": 2}]});
        assert_eq!(results_of(&db, &ok, 2).unwrap().len(), 2);
    }
}
