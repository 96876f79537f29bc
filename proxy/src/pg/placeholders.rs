//! The gateway API's `?` placeholders in PostgreSQL's `$n` form. A `?`
//! inside a string, a quoted identifier, a dollar-quoted body or a comment
//! is text, not a placeholder, and stays as written.

/// `sql` with its `?` placeholders numbered `$1`, `$2`, ...; how many.
pub(crate) fn numbered(sql: &str) -> (String, usize) {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 8);
    let mut count = 0;
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        let skip_to = match bytes[i] {
            b'\'' => {
                // E'...' strings take backslash escapes.
                let escapes =
                    i > 0 && matches!(bytes[i - 1], b'e' | b'E') && !word_before(bytes, i - 1);
                Some(quoted_end(bytes, i, b'\'', escapes))
            }
            b'"' => Some(quoted_end(bytes, i, b'"', false)),
            b'-' if bytes.get(i + 1) == Some(&b'-') => Some(
                bytes[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(bytes.len(), |p| i + p + 1),
            ),
            b'/' if bytes.get(i + 1) == Some(&b'*') => Some(block_comment_end(bytes, i)),
            b'$' if !word_before(bytes, i) => dollar_quote_end(sql, i),
            b'?' => {
                out.push_str(&sql[copied..i]);
                count += 1;
                out.push('$');
                out.push_str(&count.to_string());
                copied = i + 1;
                None
            }
            _ => None,
        };
        i = skip_to.unwrap_or(i + 1);
    }
    out.push_str(&sql[copied..]);
    (out, count)
}

/// Whether the byte before `at` continues an identifier (so `$` or `E` at
/// `at` is part of a word, such as `a$b` or `tablE'`).
fn word_before(bytes: &[u8], at: usize) -> bool {
    at > 0
        && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_' || bytes[at - 1] >= 0x80)
}

/// The index after a quoted text opening at `start`; a doubled quote (and,
/// with `escapes`, a backslash) escapes. Unterminated: the end.
fn quoted_end(bytes: &[u8], start: usize, quote: u8, escapes: bool) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if escapes => i += 2,
            c if c == quote && bytes.get(i + 1) == Some(&quote) => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The index after a `/* ... */` comment opening at `start` (they nest).
fn block_comment_end(bytes: &[u8], start: usize) -> usize {
    let mut depth = 0;
    let mut i = start;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The index after a `$tag$ ... $tag$` body opening at `start`, when a tag
/// opens there (`$1` is a parameter, not a tag).
fn dollar_quote_end(sql: &str, start: usize) -> Option<usize> {
    let bytes = sql.as_bytes();
    let tag_len = bytes[start + 1..].iter().position(|&c| c == b'$')?;
    let tag = &bytes[start + 1..start + 1 + tag_len];
    let valid = tag
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80)
        && !tag.first().is_some_and(u8::is_ascii_digit);
    if !valid {
        return None;
    }
    let delimiter = &sql[start..start + tag_len + 2];
    let body = start + delimiter.len();
    Some(
        sql[body..]
            .find(delimiter)
            .map_or(sql.len(), |p| body + p + delimiter.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn question_marks_become_numbered_parameters() {
        assert_eq!(
            numbered("SELECT * FROM t WHERE a = ? AND b > ?"),
            ("SELECT * FROM t WHERE a = $1 AND b > $2".into(), 2)
        );
        assert_eq!(numbered("SELECT 1"), ("SELECT 1".into(), 0));
    }

    #[test]
    fn question_marks_in_text_stay() {
        for sql in [
            "SELECT '?', 'it''s ?'",
            "SELECT \"what?\" FROM t",
            "SELECT 1 -- why?\n",
            "SELECT /* a /* nested ? */ ? */ 1",
            "SELECT $$ ? $$, $fn$ ? $fn$",
            "SELECT E'\\' ?'",
        ] {
            assert_eq!(numbered(sql), (sql.to_string(), 0), "{sql}");
        }
        assert_eq!(
            numbered("SELECT $1, '?', ?"),
            ("SELECT $1, '?', $1".into(), 1)
        );
        // Outside E'' strings a backslash escapes nothing.
        assert_eq!(
            numbered("SELECT 'a\\' AND x = ?"),
            ("SELECT 'a\\' AND x = $1".into(), 1)
        );
    }

    proptest! {
        #[test]
        fn never_panics_and_only_replaces_question_marks(sql in "\\PC{0,80}") {
            let (out, n) = numbered(&sql);
            prop_assert_eq!(out.matches('?').count() + n, sql.matches('?').count());
        }
    }
}
