//! The statement filter: SQL that names a file, loads code or tells where
//! the data lives is refused before it reaches rqlite, on every route that
//! carries SQL. It works on SQLite's own tokens, so comments, case,
//! whitespace, quoting and a second statement in one string hide nothing.
//! It is one of two layers: the engines run sandboxed to their own data
//! directory as well.

mod lexer;
mod rqlite_body;

pub(crate) use lexer::{tokens, Token};
pub(crate) use rqlite_body::{checked_body, checked_query, BodyError};

/// Names refused wherever they appear as an identifier, a function or a
/// pragma: they read or write files, load code, or disclose host paths.
const FORBIDDEN_NAMES: &[&str] = &[
    // load code
    "load_extension",
    "fts3_tokenizer",
    // read or write files (shell and extension functions and tables)
    "readfile",
    "writefile",
    "edit",
    "fsdir",
    "zipfile",
    "zipfile_cds",
    "sqlite_dbpage",
    "sqlite_dbdata",
    "sqlite_dbptr",
    // pragmas that name directories or disclose file paths, and their
    // table-valued forms
    "database_list",
    "pragma_database_list",
    "temp_store_directory",
    "pragma_temp_store_directory",
    "data_store_directory",
    "pragma_data_store_directory",
    // lets a statement rewrite the schema table (and corrupt the file)
    "writable_schema",
    "pragma_writable_schema",
];

/// Why a statement was refused; the text is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Forbidden {
    #[error("{0} is not allowed: it names a database file")]
    Keyword(&'static str),
    #[error("VACUUM INTO is not allowed: it writes a file")]
    VacuumInto,
    #[error("{0} is not allowed: it reaches files, code or host details")]
    Name(String),
}

/// Refuses `sql` when any statement in it names a file or loads code.
pub(crate) fn check(sql: &str) -> Result<(), Forbidden> {
    let tokens = tokens(sql);
    for (i, token) in tokens.iter().enumerate() {
        let name = match token {
            Token::Word(w) => {
                for keyword in ["ATTACH", "DETACH"] {
                    if w.eq_ignore_ascii_case(keyword) {
                        return Err(Forbidden::Keyword(keyword));
                    }
                }
                Some(w.to_string())
            }
            Token::Quoted(q) => Some(q.clone()),
            // 'name'(...) is not a call in SQLite, but refusing it costs nothing.
            Token::Str(s) if tokens.get(i + 1) == Some(&Token::Open) => Some(s.clone()),
            _ => None,
        };
        if let Some(name) = name {
            let lower = name.to_ascii_lowercase();
            if FORBIDDEN_NAMES.contains(&lower.trim()) {
                return Err(Forbidden::Name(lower));
            }
        }
    }
    for statement in tokens.split(|t| *t == Token::Semicolon) {
        let is =
            |t: &Token<'_>, word: &str| matches!(t, Token::Word(w) if w.eq_ignore_ascii_case(word));
        if let Some(vacuum) = statement.iter().position(|t| is(t, "VACUUM")) {
            if statement[vacuum..].iter().any(|t| is(t, "INTO")) {
                return Err(Forbidden::VacuumInto);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordinary_sql_passes() {
        for sql in [
            "SELECT * FROM t WHERE name = 'attach' AND note = 'VACUUM INTO x'",
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)",
            "INSERT INTO t(name) VALUES(?)",
            "VACUUM",
            "VACUUM; INSERT INTO t VALUES (1)",
            "PRAGMA table_info(t)",
            "SELECT m.name, p.name FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS p",
            "-- ATTACH in a comment\nSELECT 1",
            "SELECT \"attachment\" FROM t",
        ] {
            assert_eq!(check(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn files_and_code_are_refused_however_written() {
        for sql in [
            "ATTACH DATABASE '/data/_system/db.sqlite' AS s",
            "attach '/x' as y",
            "  /* hi */ aTtAcH\n'/x' AS y",
            "SELECT 1; ATTACH '/x' AS y",
            "SELECT 1;ATTACH'/x'AS y",
            "DETACH y",
            "VACUUM INTO '/tmp/copy.db'",
            "vacuum main\tinto '/tmp/copy.db'",
            "VACUUM /* c */ INTO '/tmp/x'",
            "SELECT load_extension('/tmp/evil.so')",
            "SELECT \"load_extension\"('/tmp/evil.so')",
            "SELECT [LOAD_EXTENSION]('/tmp/evil.so')",
            "SELECT `load_extension`('x')",
            "SELECT readfile('/etc/passwd')",
            "SELECT writefile('/tmp/x', 'y')",
            "PRAGMA database_list",
            "PRAGMA main.database_list",
            "SELECT file FROM pragma_database_list",
            "PRAGMA temp_store_directory = '/tmp'",
            "PRAGMA writable_schema = ON",
            "SELECT fts3_tokenizer('simple')",
            "SELECT * FROM sqlite_dbpage",
            "CREATE TRIGGER t AFTER INSERT ON x BEGIN SELECT load_extension('y'); END",
        ] {
            assert!(check(sql).is_err(), "{sql} passed");
        }
    }

    fn forbidden_statement() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("ATTACH DATABASE 'f' AS x".to_string()),
            Just("DETACH x".to_string()),
            Just("VACUUM INTO 'f'".to_string()),
            Just("SELECT load_extension('f')".to_string()),
            Just("PRAGMA database_list".to_string()),
        ]
    }

    /// Re-spells every separator with comments or whitespace and every
    /// letter in a random case.
    fn disguise(sql: &str, seps: &[u8], cases: &[bool]) -> String {
        let mut out = String::new();
        for (i, c) in sql.chars().enumerate() {
            match c {
                ' ' => out.push_str(match seps[i % seps.len()] % 4 {
                    0 => " ",
                    1 => "/**/",
                    2 => "\n-- note\n",
                    _ => "\t",
                }),
                c if cases[i % cases.len()] => out.push(c.to_ascii_lowercase()),
                c => out.push(c),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn never_panics(sql in any::<String>()) {
            let _ = check(&sql);
        }

        #[test]
        fn no_disguise_or_company_gets_a_forbidden_statement_through(
            bad in forbidden_statement(),
            before in "[a-zA-Z0-9 ,()*=']{0,30}",
            seps in prop::collection::vec(any::<u8>(), 1..8),
            cases in prop::collection::vec(any::<bool>(), 1..8),
        ) {
            let sql = format!("SELECT 1; {}", disguise(&bad, &seps, &cases));
            prop_assert!(check(&sql).is_err(), "{} passed", sql);
            // Whatever comes first, once its quotes are closed.
            let sql = format!("SELECT '{}'; {}", before.replace('\'', "''"), disguise(&bad, &seps, &cases));
            prop_assert!(check(&sql).is_err(), "{} passed", sql);
        }
    }
}
