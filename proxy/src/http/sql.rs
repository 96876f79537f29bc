//! `POST /sql`: Neon's SQL-over-HTTP protocol, what `@neondatabase/serverless`
//! speaks in HTTP mode. The `Neon-Connection-String` header carries the
//! login (`postgresql://role.app:password@host/db`); the body is one query
//! (`{"query","params"}`) or a batch (`{"queries":[...]}`) that runs in one
//! transaction shaped by the `Neon-Batch-*` headers. Answers and errors
//! have Neon's JSON shapes: rows as text (`Neon-Raw-Text-Output`) or typed,
//! as arrays (`Neon-Array-Mode`) or objects; errors carry the SQLSTATE and
//! the Postgres message fields, never the server's source locations.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use rouse_runtime::error_kind::ErrorKind;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{json, read_body, Body, Proxy, Served};
use crate::error::ProxyError;
use crate::pg::over_http::{message, Batch, Isolation, SqlError, SqlLogin, Statement};
use crate::pg::proto::extended::{tag_rows, Answer, Field};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Query {
    query: String,
    #[serde(default)]
    params: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SqlBody {
    One(Query),
    Batch { queries: Vec<Query> },
}

/// What the request's headers ask of the answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Shape {
    raw_text: bool,
    arrays: bool,
}

/// A request refused before it reached Postgres, or what Postgres said.
struct Refusal {
    status: StatusCode,
    body: Value,
    retry_after: Option<u64>,
    kind: ErrorKind,
}

pub(super) async fn handle(
    proxy: &Arc<Proxy>,
    peer: IpAddr,
    req: Request<Incoming>,
    served: &mut Served,
) -> Response<Body> {
    match serve(proxy, peer, req, served).await {
        Ok(answer) => answer,
        Err(r) => {
            served.outcome = r.kind.label();
            let mut resp = json(r.status, &r.body);
            if let Some(secs) = r.retry_after {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            resp
        }
    }
}

async fn serve(
    proxy: &Arc<Proxy>,
    peer: IpAddr,
    req: Request<Incoming>,
    served: &mut Served,
) -> Result<Response<Body>, Refusal> {
    if req.method() != Method::POST {
        return Err(user_error("send queries with POST"));
    }
    let headers = req.headers().clone();
    let connection = header(&headers, "neon-connection-string")
        .ok_or_else(|| user_error("missing Neon-Connection-String header"))?
        .to_string();
    let shape = Shape {
        raw_text: header(&headers, "neon-raw-text-output") == Some("true"),
        arrays: header(&headers, "neon-array-mode") == Some("true"),
    };
    let body = read_body(proxy, req).await.map_err(from_proxy)?;
    let (login, statements, is_batch) = parse(&connection, &body).map_err(|e| user_error(&e))?;
    let batch = match is_batch {
        true => Some(batch_of(&headers).map_err(user_error)?),
        false => None,
    };
    let who = proxy.pg.identify(login).map_err(|e| refusal(e.into()))?;
    let key = who.key.clone();
    let answers = proxy.pg.run_sql(peer, who, &statements, batch).await;
    // Named in the metrics once the login was good: a stranger's names
    // would otherwise make label series at will.
    if matches!(answers, Ok(_) | Err(SqlError::Postgres(_))) {
        served.db = Some(key);
    }
    let answers = answers.map_err(refusal)?;
    let results: Vec<Value> = answers.iter().map(|a| answer_json(a, shape)).collect();
    Ok(match batch {
        Some(_) => json(StatusCode::OK, &json!({ "results": results })),
        None => json(StatusCode::OK, results.first().unwrap_or(&Value::Null)),
    })
}

/// The login a connection string gives, and the statements of a body;
/// whether they are a batch.
pub(crate) fn parse(
    connection: &str,
    body: &[u8],
) -> Result<(SqlLogin, Vec<Statement>, bool), String> {
    let login = connection_string(connection)?;
    let request: SqlBody =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let (queries, batch) = match request {
        SqlBody::One(q) => (vec![q], false),
        SqlBody::Batch { queries } => (queries, true),
    };
    let statements = queries
        .into_iter()
        .map(|q| Statement {
            params: q.params.iter().map(param_text).collect(),
            sql: q.query,
        })
        .collect();
    Ok((login, statements, batch))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

/// `postgres[ql]://user:password@host[:port]/database[?...]`, user and
/// password percent-decoded.
fn connection_string(s: &str) -> Result<SqlLogin, String> {
    let bad =
        || "Neon-Connection-String is not postgresql://user:password@host/database".to_string();
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .ok_or_else(bad)?;
    let (authority, path) = rest.split_once('/').ok_or_else(bad)?;
    let (userinfo, host) = authority.rsplit_once('@').ok_or_else(bad)?;
    let (user, password) = userinfo.split_once(':').ok_or_else(bad)?;
    let database = path.split(['?', '#']).next().unwrap_or_default();
    let decode = |v: &str| percent_decode(v).ok_or_else(bad);
    let login = SqlLogin {
        user: decode(user)?,
        password: decode(password)?,
        database: decode(database)?,
        host: host.to_string(),
    };
    if login.user.is_empty() || login.database.is_empty() {
        return Err(bad());
    }
    Ok(login)
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

fn batch_of(headers: &HeaderMap) -> Result<Batch, &'static str> {
    let isolation = match header(headers, "neon-batch-isolation-level") {
        None => None,
        Some("Serializable") => Some(Isolation::Serializable),
        Some("RepeatableRead") => Some(Isolation::RepeatableRead),
        Some("ReadCommitted") => Some(Isolation::ReadCommitted),
        Some("ReadUncommitted") => Some(Isolation::ReadUncommitted),
        Some(_) => return Err("Neon-Batch-Isolation-Level is one of Serializable, RepeatableRead, ReadCommitted, ReadUncommitted"),
    };
    Ok(Batch {
        isolation,
        read_only: header(headers, "neon-batch-read-only") == Some("true"),
        deferrable: header(headers, "neon-batch-deferrable") == Some("true"),
    })
}

/// A JSON parameter as Postgres text: the drivers send strings and nulls;
/// numbers and booleans are written as Postgres reads them; arrays and
/// objects as JSON.
pub(super) fn param_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const JSON: u32 = 114;
const JSONB: u32 = 3802;

/// One value: text as Postgres sent it, or typed.
fn value_json(text: &Option<String>, field: &Field, shape: Shape) -> Value {
    match (text, shape.raw_text) {
        (None, _) => Value::Null,
        (Some(text), true) => Value::String(text.clone()),
        (Some(text), false) => typed_value(text, field),
    }
}

/// A value typed where JSON has the type (booleans, numbers that fit a
/// double, JSON itself), else its text.
pub(super) fn typed_value(text: &str, field: &Field) -> Value {
    let number = || {
        serde_json::Number::from_f64(text.parse().ok()?)
            .map(Value::Number)
            .or_else(|| text.parse::<i64>().ok().map(Value::from))
    };
    let typed = match field.type_oid {
        BOOL => Some(Value::Bool(text == "t")),
        // Integers exactly as written (a JSON number has no size).
        INT2 | INT4 | INT8 | OID => text.parse::<i64>().ok().map(Value::from),
        FLOAT4 | FLOAT8 => number(),
        JSON | JSONB => serde_json::from_str(text).ok(),
        _ => None,
    };
    typed.unwrap_or_else(|| Value::String(text.to_string()))
}

fn answer_json(a: &Answer, shape: Shape) -> Value {
    let rows: Vec<Value> = a
        .rows
        .iter()
        .map(|row| {
            let values = row
                .iter()
                .zip(&a.fields)
                .map(|(v, f)| value_json(v, f, shape));
            match shape.arrays {
                true => Value::Array(values.collect()),
                false => Value::Object(
                    a.fields
                        .iter()
                        .map(|f| f.name.clone())
                        .zip(values)
                        .collect::<Map<_, _>>(),
                ),
            }
        })
        .collect();
    let fields: Vec<Value> = a
        .fields
        .iter()
        .map(|f| {
            json!({
                "name": f.name,
                "dataTypeID": f.type_oid,
                "tableID": f.table_oid,
                "columnID": f.column,
                "dataTypeSize": f.type_size,
                "dataTypeModifier": f.type_modifier,
                "format": if f.format == 0 { "text" } else { "binary" },
            })
        })
        .collect();
    json!({
        "command": a.tag.split(' ').next().unwrap_or_default(),
        "rowCount": tag_rows(&a.tag),
        "rows": rows,
        "fields": fields,
        "rowAsArray": shape.arrays,
    })
}

/// Postgres's error fields by the names the drivers read. The server's
/// source file, line and routine are its own business.
const FIELDS: [(u8, &str); 13] = [
    (b'V', "severity"),
    (b'C', "code"),
    (b'D', "detail"),
    (b'H', "hint"),
    (b'P', "position"),
    (b'p', "internalPosition"),
    (b'q', "internalQuery"),
    (b'W', "where"),
    (b's', "schema"),
    (b't', "table"),
    (b'c', "column"),
    (b'd', "dataType"),
    (b'n', "constraint"),
];

fn refusal(e: SqlError) -> Refusal {
    match e {
        SqlError::Postgres(fields) => {
            let mut body = Map::new();
            body.insert("message".into(), Value::String(message(&fields).into()));
            for (code, name) in FIELDS {
                if let Some((_, v)) = fields.iter().find(|(c, _)| *c == code) {
                    body.insert(name.into(), Value::String(v.clone()));
                }
            }
            Refusal {
                status: StatusCode::BAD_REQUEST,
                body: Value::Object(body),
                retry_after: None,
                kind: ErrorKind::User,
            }
        }
        SqlError::Refused(pg) => {
            let kind = pg.kind();
            let (status, retry_after) = match kind {
                ErrorKind::RateLimit => (StatusCode::TOO_MANY_REQUESTS, Some(1)),
                ErrorKind::WakeTimeout | ErrorKind::Capacity => {
                    (StatusCode::SERVICE_UNAVAILABLE, Some(1))
                }
                ErrorKind::Backend => (StatusCode::BAD_GATEWAY, None),
                _ => (StatusCode::BAD_REQUEST, None),
            };
            Refusal {
                status,
                body: json!({"message": pg.client_message(), "code": pg.sqlstate()}),
                retry_after,
                kind,
            }
        }
        SqlError::Statement(e) => Refusal {
            body: json!({"message": e.to_string(), "code": "08P01"}),
            ..user_error("")
        },
        SqlError::TooLarge => Refusal {
            body: json!({"message": SqlError::TooLarge.to_string(), "code": "54000"}),
            ..user_error("")
        },
    }
}

fn user_error(message: &str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        body: json!({"message": message, "code": "08P01"}),
        retry_after: None,
        kind: ErrorKind::User,
    }
}

/// A refusal of the HTTP layer (body too large, too slow).
fn from_proxy(e: ProxyError) -> Refusal {
    Refusal {
        status: e.status(),
        body: json!({"message": e.client_message(), "code": "08P01"}),
        retry_after: e.retry_after(),
        kind: e.kind(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_name_login_and_database() {
        let l = connection_string(
            "postgresql://alice.shop:p%40ss%2Fw@db.example:5432/users?application_name=x",
        )
        .unwrap();
        assert_eq!(
            (l.user.as_str(), l.password.as_str(), l.database.as_str()),
            ("alice.shop", "p@ss/w", "users")
        );
        assert_eq!(l.host, "db.example:5432");
        for bad in [
            "mysql://a:b@h/d",
            "postgresql://a@h/d",
            "postgresql://a:b@h",
            "postgresql://a:b@h/",
            "postgresql://a:%zz@h/d",
        ] {
            assert!(connection_string(bad).is_err(), "{bad}");
        }
    }

    fn field(type_oid: u32) -> Field {
        Field {
            name: "v".into(),
            table_oid: 0,
            column: 0,
            type_oid,
            type_size: -1,
            type_modifier: -1,
            format: 0,
        }
    }

    #[test]
    fn values_are_text_or_typed_as_asked() {
        let typed = Shape::default();
        let raw = Shape {
            raw_text: true,
            arrays: true,
        };
        let v = |t: &str, oid, shape| value_json(&Some(t.to_string()), &field(oid), shape);
        assert_eq!(v("t", BOOL, typed), json!(true));
        assert_eq!(v("t", BOOL, raw), json!("t"));
        assert_eq!(v("42", INT4, typed), json!(42));
        assert_eq!(
            v("9007199254740993", INT8, typed),
            json!(9007199254740993i64)
        );
        assert_eq!(v("1.5", FLOAT8, typed), json!(1.5));
        assert_eq!(v("NaN", FLOAT8, typed), json!("NaN"));
        assert_eq!(v("{\"a\":1}", JSONB, typed), json!({"a": 1}));
        assert_eq!(value_json(&None, &field(INT4), typed), Value::Null);
    }

    #[test]
    fn an_answer_has_neons_shape() {
        let a = Answer {
            tag: "SELECT 1".into(),
            fields: vec![field(INT4)],
            rows: vec![vec![Some("7".into())]],
        };
        let arrays = answer_json(
            &a,
            Shape {
                raw_text: true,
                arrays: true,
            },
        );
        assert_eq!(arrays["command"], "SELECT");
        assert_eq!(arrays["rowCount"], 1);
        assert_eq!(arrays["rows"], json!([["7"]]));
        assert_eq!(arrays["fields"][0]["dataTypeID"], 23);
        let objects = answer_json(&a, Shape::default());
        assert_eq!(objects["rows"], json!([{"v": 7}]));
    }

    #[test]
    fn postgres_errors_keep_their_fields_but_not_the_source_location() {
        let r = refusal(SqlError::Postgres(vec![
            (b'S', "ERROR".into()),
            (b'V', "ERROR".into()),
            (b'C', "42P01".into()),
            (b'M', "relation \"nope\" does not exist".into()),
            (b'P', "15".into()),
            (b'F', "parse_relation.c".into()),
            (b'L', "1392".into()),
            (b'R', "parserOpenTable".into()),
        ]));
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["code"], "42P01");
        assert_eq!(r.body["message"], "relation \"nope\" does not exist");
        assert_eq!(r.body["position"], "15");
        for internal in ["file", "line", "routine"] {
            assert!(r.body.get(internal).is_none());
        }
    }
}
