//! The SQL inside rqlite API requests: the JSON body of `/db/execute`,
//! `/db/query` and `/db/request`, and the `q` parameter of a GET query.
//! Each statement is checked, and what rqlite receives is written anew from
//! what was checked, so that no difference between two parsers can slip a
//! statement past the filter.

use bytes::Bytes;
use serde_json::Value;

use super::{check, Forbidden};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyError {
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
    #[error("{0}")]
    Malformed(String),
}

/// The body to send on: statements checked, JSON re-encoded. An empty body
/// (a GET query) stays empty.
pub(crate) fn checked_body(body: &[u8]) -> Result<Bytes, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Bytes::new());
    }
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| BodyError::Malformed(format!("invalid JSON body: {e}")))?;
    let Value::Array(statements) = &doc else {
        return Err(BodyError::Malformed(
            "the body must be a JSON array of statements".into(),
        ));
    };
    for statement in statements {
        let sql = match statement {
            Value::String(sql) => sql,
            Value::Array(parts) => match parts.first() {
                Some(Value::String(sql)) => sql,
                _ => {
                    return Err(BodyError::Malformed(
                        "a parameterised statement is [\"sql\", args...]".into(),
                    ))
                }
            },
            _ => {
                return Err(BodyError::Malformed(
                    "each statement is \"sql\" or [\"sql\", args...]".into(),
                ))
            }
        };
        check(sql)?;
    }
    Ok(Bytes::from(
        serde_json::to_vec(&doc).expect("JSON values serialise"),
    ))
}

/// The query string to send on: every `q` checked and re-encoded from what
/// was checked. Other pairs keep their spelling (rqlite reads `associative`
/// and `associative=` alike, but not every client knows that) when their
/// key is a plain word, and are re-encoded otherwise.
pub(crate) fn checked_query(query: &str) -> Result<String, BodyError> {
    let mut out = Vec::new();
    for raw in query.split('&').filter(|s| !s.is_empty()) {
        let raw_key = raw.split_once('=').map_or(raw, |(k, _)| k);
        let plain = raw_key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if plain && raw_key != "q" && !raw.contains(';') {
            out.push(raw.to_string());
            continue;
        }
        for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
            if key == "q" {
                check(&value)?;
            }
            out.push(
                form_urlencoded::Serializer::new(String::new())
                    .append_pair(&key, &value)
                    .finish(),
            );
        }
    }
    Ok(out.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_form_of_statement_is_checked() {
        for body in [
            r#"["ATTACH '/x' AS y"]"#,
            r#"[["ATTACH ? AS y", "/x"]]"#,
            r#"["SELECT 1", ["SELECT 2"], "\u0041TTACH '/x' AS y"]"#,
            r#"[["VACUUM INTO :f", {"f": "/x"}]]"#,
        ] {
            assert!(
                matches!(checked_body(body.as_bytes()), Err(BodyError::Forbidden(_))),
                "{body}"
            );
        }
        for body in [
            r#"{"sql": "x"}"#,
            "[1]",
            "[[]]",
            "not json",
            r#"["a"] ["b"]"#,
        ] {
            assert!(
                matches!(checked_body(body.as_bytes()), Err(BodyError::Malformed(_))),
                "{body}"
            );
        }
        let out = checked_body(br#" [ "SELECT 1" , ["SELECT ?", 1, "a"] ] "#).unwrap();
        assert_eq!(&out[..], br#"["SELECT 1",["SELECT ?",1,"a"]]"#);
        assert_eq!(checked_body(b"").unwrap(), Bytes::new());
    }

    #[test]
    fn the_query_parameter_is_decoded_checked_and_encoded_again() {
        assert!(checked_query("q=ATTACH%20%27%2Fx%27%20AS%20y").is_err());
        assert!(checked_query("level=weak&q=SELECT+1%3BATTACH+'x'+AS+y").is_err());
        assert!(checked_query("q=select+1&q=detach+y").is_err());
        assert_eq!(
            checked_query("q=SELECT+*+FROM+t&level=none&associative").unwrap(),
            "q=SELECT+*+FROM+t&level=none&associative"
        );
    }

    proptest! {
        #[test]
        fn bodies_never_panic(body in any::<Vec<u8>>()) {
            let _ = checked_body(&body);
        }

        #[test]
        fn what_is_sent_on_decodes_to_what_was_checked(query in any::<String>()) {
            if let Ok(sent) = checked_query(&query) {
                let before: Vec<_> = form_urlencoded::parse(query.as_bytes()).collect();
                let after: Vec<_> = form_urlencoded::parse(sent.as_bytes()).collect();
                prop_assert_eq!(before, after);
            }
        }
    }
}
