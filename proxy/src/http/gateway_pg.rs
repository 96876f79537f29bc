//! The gateway API on a managed PostgreSQL database: the requests and
//! answers of the rqlite side, run by the PostgreSQL front as the
//! database's API login. `?` placeholders become `$n`, values come back
//! typed as JSON has them, and a transaction is one backend transaction.

use rouse_control_api::{DbKey, Engine};
use rouse_runtime::error_kind::ErrorKind;
use serde_json::{json, Map, Value};

use super::sql::{param_text, typed_value};
use super::Proxy;
use crate::error::{ProxyError, Result};
use crate::pg::over_http::{message, Batch, SqlError, Statement};
use crate::pg::placeholders::numbered;
use crate::pg::proto::extended::{tag_rows, Answer};
use crate::resolve::Target;

/// The tables of the current schema and their columns, in order.
const SCHEMA: &str = "SELECT c.table_name::text, c.column_name::text \
     FROM information_schema.columns c JOIN information_schema.tables t \
     USING (table_schema, table_name) \
     WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' \
     ORDER BY c.table_name, c.ordinal_position";

/// A statement with its arguments, `?` numbered when there are any (so
/// that without arguments jsonb's `?` operators keep their meaning).
pub(super) fn statement(sql: &str, args: &[Value]) -> Statement {
    Statement {
        sql: match args.is_empty() {
            true => sql.to_string(),
            false => numbered(sql).0,
        },
        params: args.iter().map(param_text).collect(),
    }
}

/// A managed PostgreSQL database the gateway serves, woken.
pub(super) struct On<'a> {
    proxy: &'a Proxy,
    key: DbKey,
    target: Target,
}

impl<'a> On<'a> {
    /// The PostgreSQL side when `key` is a managed PostgreSQL database
    /// (woken if need be); `None` for rqlite.
    pub(super) async fn database(proxy: &'a Proxy, key: DbKey) -> Result<Option<On<'a>>> {
        let target = proxy.resolver.target_or_create(&key).await?;
        match target.engine {
            Engine::Rqlite => Ok(None),
            Engine::Postgres => Ok(Some(On { proxy, key, target })),
            Engine::Patroni => Err(ProxyError::BadRequest(format!(
                "database {} is a Patroni cluster: connect to the Postgres port",
                key.db
            ))),
        }
    }

    async fn run(&self, statements: &[Statement], batch: bool) -> Result<Vec<Answer>> {
        self.proxy
            .pg
            .run_for_app(
                &self.key,
                &self.target,
                statements,
                batch.then(Batch::default),
            )
            .await
            .map_err(|e| error(e, &self.key))
    }

    async fn one(&self, statement: Statement) -> Result<Answer> {
        let mut answers = self.run(&[statement], false).await?;
        Ok(answers.pop().unwrap_or_default())
    }

    /// `{"rows_affected","last_insert_id"}`: PostgreSQL has no last insert
    /// id; a statement `RETURNING` an integer first gives it.
    pub(super) async fn exec(&self, sql: &str, args: &[Value]) -> Result<Value> {
        let a = self.one(statement(sql, args)).await?;
        let returned = a
            .rows
            .first()
            .and_then(|row| row.first()?.as_deref()?.parse::<i64>().ok());
        Ok(json!({
            "rows_affected": tag_rows(&a.tag).unwrap_or(0),
            "last_insert_id": returned,
        }))
    }

    /// `{"items":[{column: value}],"count"}`.
    pub(super) async fn query(&self, sql: &str, args: &[Value]) -> Result<Value> {
        let a = self.one(statement(sql, args)).await?;
        let items: Vec<Value> = a
            .rows
            .iter()
            .map(|row| {
                let object: Map<String, Value> = a
                    .fields
                    .iter()
                    .zip(row)
                    .map(|(f, v)| {
                        let value = v.as_deref().map_or(Value::Null, |t| typed_value(t, f));
                        (f.name.clone(), value)
                    })
                    .collect();
                Value::Object(object)
            })
            .collect();
        Ok(json!({"count": items.len(), "items": items}))
    }

    /// All or nothing, in one transaction.
    pub(super) async fn transaction(&self, statements: &[Statement]) -> Result<Value> {
        self.run(statements, true).await?;
        Ok(json!({"success": true}))
    }

    /// A statement that changes the schema: no rows.
    pub(super) async fn ddl(&self, sql: &str) -> Result<Value> {
        self.one(statement(sql, &[])).await?;
        Ok(json!({"rows_affected": 0}))
    }

    /// `{"tables":[{"name","columns"}]}`.
    pub(super) async fn schema(&self) -> Result<Value> {
        let a = self.one(statement(SCHEMA, &[])).await?;
        let mut tables: Vec<Value> = Vec::new();
        for row in &a.rows {
            let (Some(Some(table)), Some(Some(column))) = (row.first(), row.get(1)) else {
                continue;
            };
            match tables.last_mut() {
                Some(t) if t["name"] == table.as_str() => t["columns"]
                    .as_array_mut()
                    .expect("built as array")
                    .push(column.as_str().into()),
                _ => tables.push(json!({"name": table, "columns": [column]})),
            }
        }
        Ok(json!({"tables": tables}))
    }
}

/// What the gateway's client is told: PostgreSQL's own words and SQLSTATE
/// for a statement it refused; the usual answers for the rest.
fn error(e: SqlError, key: &DbKey) -> ProxyError {
    match e {
        SqlError::Postgres(fields) => {
            let field = |code: u8| {
                fields
                    .iter()
                    .find(|(c, _)| *c == code)
                    .map(|(_, v)| v.clone())
            };
            ProxyError::Postgres {
                message: message(&fields).to_string(),
                sqlstate: field(b'C').unwrap_or_default(),
                detail: field(b'D'),
                hint: field(b'H'),
            }
        }
        SqlError::Statement(e) => ProxyError::BadRequest(e.to_string()),
        e @ SqlError::TooLarge => ProxyError::BadRequest(e.to_string()),
        SqlError::Refused(pg) => match pg.kind() {
            ErrorKind::User => ProxyError::NotFound,
            ErrorKind::RateLimit => ProxyError::RateLimited(std::time::Duration::from_secs(1)),
            _ => ProxyError::Backend {
                db: key.db.to_string(),
                reason: pg.to_string(),
            },
        },
    }
}
