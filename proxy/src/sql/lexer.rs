//! SQLite's tokenizer rules (tokenize.c), reduced to what the statement
//! filter needs: words, quoted identifiers, strings and statement ends, with
//! comments, blobs, numbers and variables recognised so that nothing inside
//! them is mistaken for a word, and nothing outside them is hidden.

/// One token of SQLite SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Token<'a> {
    /// A bare identifier or keyword, as written.
    Word(&'a str),
    /// `"x"`, `` `x` `` or `[x]`: always an identifier to SQLite, never a
    /// keyword; here with its quotes removed.
    Quoted(String),
    /// `'x'` with its quotes removed.
    Str(String),
    /// `;`: the end of a statement.
    Semicolon,
    /// `(`
    Open,
    /// Anything else: operators, numbers, blobs, variables.
    Other,
}

/// Bytes SQLite accepts inside a bare identifier (`IdChar`): ASCII letters,
/// digits, `_`, `$`, and every byte of a multi-byte UTF-8 character.
fn id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// The tokens of `sql`. Whitespace and comments produce none. An
/// unterminated string or identifier runs to the end, as SQLite then
/// refuses the statement anyway.
pub(crate) fn tokens(sql: &str) -> Vec<Token<'_>> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b' ' | b'\t' | b'\n' | b'\x0c' | b'\r' => i += 1,
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = bytes[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(bytes.len(), |p| i + p + 1);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = find(bytes, i + 2, b"*/").map_or(bytes.len(), |p| p + 2);
            }
            b';' => {
                out.push(Token::Semicolon);
                i += 1;
            }
            b'(' => {
                out.push(Token::Open);
                i += 1;
            }
            b'\'' => {
                let (text, next) = quoted(sql, i, b'\'');
                out.push(Token::Str(text));
                i = next;
            }
            b'"' | b'`' => {
                let (text, next) = quoted(sql, i, b);
                out.push(Token::Quoted(text));
                i = next;
            }
            b'[' => {
                let end = bytes[i + 1..]
                    .iter()
                    .position(|&c| c == b']')
                    .map_or(bytes.len(), |p| i + 1 + p);
                out.push(Token::Quoted(sql[i + 1..end].to_string()));
                i = (end + 1).min(bytes.len());
            }
            // Blob literal x'..': a string that is never an identifier.
            b'x' | b'X' if bytes.get(i + 1) == Some(&b'\'') => {
                let (_, next) = quoted(sql, i + 1, b'\'');
                out.push(Token::Other);
                i = next;
            }
            b'0'..=b'9' => {
                // A number, possibly with identifier characters glued on
                // (SQLite refuses those): consumed whole either way.
                i += 1;
                while i < bytes.len() && (id_char(bytes[i]) || bytes[i] == b'.') {
                    i += 1;
                }
                out.push(Token::Other);
            }
            // Variables `?NNN`, `:name`, `@name`, `$name`.
            b'?' | b':' | b'@' | b'$' => {
                i += 1;
                while i < bytes.len() && id_char(bytes[i]) {
                    i += 1;
                }
                out.push(Token::Other);
            }
            _ if id_char(b) => {
                let start = i;
                while i < bytes.len() && id_char(bytes[i]) {
                    i += 1;
                }
                out.push(Token::Word(&sql[start..i]));
            }
            _ => {
                out.push(Token::Other);
                // Stay on a character boundary.
                i += sql[i..].chars().next().map_or(1, char::len_utf8);
            }
        }
    }
    out
}

/// The text of a quoted token starting at `start` (the opening quote), with
/// doubled quotes unescaped, and the index after its closing quote.
fn quoted(sql: &str, start: usize, quote: u8) -> (String, usize) {
    let bytes = sql.as_bytes();
    let mut text = Vec::new();
    let mut i = start + 1;
    while i < bytes.len() {
        if bytes[i] == quote {
            if bytes.get(i + 1) == Some(&quote) {
                text.push(quote);
                i += 2;
                continue;
            }
            return (String::from_utf8_lossy(&text).into_owned(), i + 1);
        }
        text.push(bytes[i]);
        i += 1;
    }
    (String::from_utf8_lossy(&text).into_owned(), bytes.len())
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| from + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_strings_and_quotes_hide_nothing_and_invent_nothing() {
        assert_eq!(
            tokens("AT/**/TACH"),
            vec![Token::Word("AT"), Token::Word("TACH")]
        );
        assert_eq!(
            tokens("select 'it''s' -- attach\n;"),
            vec![
                Token::Word("select"),
                Token::Str("it's".into()),
                Token::Semicolon
            ]
        );
        assert_eq!(
            tokens(r#""load""_x"(1)"#),
            vec![
                Token::Quoted("load\"_x".into()),
                Token::Open,
                Token::Other,
                Token::Other
            ]
        );
        assert_eq!(
            tokens("[a b]`c`"),
            vec![Token::Quoted("a b".into()), Token::Quoted("c".into())]
        );
        assert_eq!(tokens("x'00' 1e5 ?1 :v"), vec![Token::Other; 4]);
        assert_eq!(tokens("attaché"), vec![Token::Word("attaché")]);
        assert_eq!(tokens("/* unterminated attach"), vec![]);
    }
}
