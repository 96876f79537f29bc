//! Whether a statement leaves state in a pooled backend's session that the
//! next client must not inherit, so the connection is reset before reuse.

/// Whether SQL a client sends may leave state in the session beyond its
/// transaction. Errs on the side of a reset; the backend's ParameterStatus
/// messages catch reported settings changed any other way.
pub(super) fn leaves_session_state(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    if lower.contains("pg_advisory_lock") || lower.contains("pg_try_advisory_lock") {
        return true;
    }
    lower.split(';').any(|statement| {
        let text = strip_comments(statement);
        let mut words = text
            .split(|c: char| c.is_whitespace() || c == '(')
            .filter(|w| !w.is_empty());
        match (words.next(), words.next(), words.next()) {
            (Some("set"), Some("local" | "transaction" | "constraints"), _) => false,
            (Some("set" | "reset" | "prepare" | "deallocate" | "listen" | "load"), ..) => true,
            (Some("declare" | "discard"), ..) => true,
            (Some("create"), Some("temp" | "temporary"), _) => true,
            (Some("create"), Some("local" | "global"), Some("temp" | "temporary")) => true,
            _ => false,
        }
    })
}

/// `sql` without `-- ...` and `/* ... */` comments (not nested).
fn strip_comments(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = [rest.find("--"), rest.find("/*")]
        .into_iter()
        .flatten()
        .min()
    {
        out.push_str(&rest[..at]);
        out.push(' ');
        rest = if rest[at..].starts_with("--") {
            rest[at..].find('\n').map_or("", |end| &rest[at + end..])
        } else {
            rest[at + 2..]
                .find("*/")
                .map_or("", |end| &rest[at + 2 + end + 2..])
        };
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::leaves_session_state;

    #[test]
    fn session_state_is_recognised() {
        for sql in [
            "SET search_path TO x",
            "  set   application_name = 'a'",
            "SET SESSION statement_timeout = 5",
            "BEGIN; SET x.y = 1; COMMIT",
            "/* hi */ RESET ALL",
            "-- note\nPREPARE p AS SELECT 1",
            "CREATE TEMP TABLE t (x int)",
            "create local temporary table t (x int)",
            "SELECT pg_advisory_lock(1)",
            "select pg_try_advisory_lock(1)",
            "LISTEN chan",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        ] {
            assert!(leaves_session_state(sql), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "SET LOCAL search_path TO x",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "INSERT INTO settings VALUES ('set')",
            "SELECT pg_advisory_xact_lock(1)",
            "CREATE TABLE temp (x int)",
            "-- SET x = 1\nSELECT 1",
        ] {
            assert!(!leaves_session_state(sql), "{sql}");
        }
    }
}
