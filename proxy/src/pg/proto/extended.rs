//! The extended query protocol as the proxy speaks it itself, for SQL over
//! HTTP: Parse, Bind, Describe and Execute of the unnamed statement with
//! text parameters and text results, then Sync; and the answers read back:
//! RowDescription, DataRow, CommandComplete and ErrorResponse. Each parser
//! takes a whole message body (the frame was checked first) and says `None`
//! for anything malformed.

use bytes::{Buf, BufMut, BytesMut};

use super::messages::message;
use super::results::put_values;
use super::tags::{backend, frontend};

/// Most parameters one statement may carry (Bind counts them in 16 bits).
pub(crate) const MAX_PARAMS: usize = u16::MAX as usize;

/// Why a statement cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StatementError {
    #[error("a query may not contain a NUL character")]
    Nul,
    #[error("at most {MAX_PARAMS} parameters per query")]
    TooManyParams,
}

/// One statement's messages, appended to `out`: Parse of the unnamed
/// statement (parameter types left to the server), Bind with text
/// parameters (`None` is NULL) and text results, Describe of the portal,
/// Execute of every row.
pub(crate) fn statement(
    out: &mut BytesMut,
    sql: &str,
    params: &[Option<String>],
) -> Result<(), StatementError> {
    if sql.contains('\0') {
        return Err(StatementError::Nul);
    }
    if params.len() > MAX_PARAMS {
        return Err(StatementError::TooManyParams);
    }
    out.extend_from_slice(&message(frontend::PARSE, |b| {
        b.put_u8(0); // the unnamed statement
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_u16(0); // no parameter types given
    }));
    out.extend_from_slice(&message(frontend::BIND, |b| {
        b.put_u8(0); // the unnamed portal
        b.put_u8(0); // of the unnamed statement
        b.put_u16(0); // every parameter in text
        put_values(b, params);
        b.put_u16(0); // every result column in text
    }));
    out.extend_from_slice(&message(frontend::DESCRIBE, |b| {
        b.put_u8(frontend::PORTAL);
        b.put_u8(0);
    }));
    out.extend_from_slice(&message(frontend::EXECUTE, |b| {
        b.put_u8(0);
        b.put_u32(0); // every row
    }));
    Ok(())
}

/// Sync: the end of a pipeline (and of its implicit transaction).
pub(crate) fn sync() -> BytesMut {
    message(frontend::SYNC, |_| {})
}

/// A result column, as RowDescription describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Field {
    pub(crate) name: String,
    pub(crate) table_oid: u32,
    pub(crate) column: i16,
    pub(crate) type_oid: u32,
    pub(crate) type_size: i16,
    pub(crate) type_modifier: i32,
    /// 0 text, 1 binary.
    pub(crate) format: i16,
}

/// A NUL-terminated string at the start of `b`, consumed.
fn cstr(b: &mut &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0)?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Some(s)
}

/// The columns of a RowDescription body.
pub(crate) fn row_description(mut b: &[u8]) -> Option<Vec<Field>> {
    if b.len() < 2 {
        return None;
    }
    let count = b.get_u16() as usize;
    // Each column takes at least 19 bytes: no count can ask for more.
    let mut fields = Vec::with_capacity(count.min(b.len() / 19));
    for _ in 0..count {
        let name = cstr(&mut b)?;
        if b.len() < 18 {
            return None;
        }
        fields.push(Field {
            name,
            table_oid: b.get_u32(),
            column: b.get_i16(),
            type_oid: b.get_u32(),
            type_size: b.get_i16(),
            type_modifier: b.get_i32(),
            format: b.get_i16(),
        });
    }
    b.is_empty().then_some(fields)
}

/// The values of a DataRow body, as text; `None` is NULL.
pub(crate) fn data_row(mut b: &[u8]) -> Option<Vec<Option<String>>> {
    if b.len() < 2 {
        return None;
    }
    let count = b.get_u16() as usize;
    let mut values = Vec::with_capacity(count.min(b.len() / 4));
    for _ in 0..count {
        if b.len() < 4 {
            return None;
        }
        let len = b.get_i32();
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = len as usize;
        if b.len() < len {
            return None;
        }
        values.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
        b.advance(len);
    }
    b.is_empty().then_some(values)
}

/// The tag of a CommandComplete body, such as `INSERT 0 3` or `SELECT 2`.
pub(crate) fn command_tag(mut b: &[u8]) -> Option<String> {
    let tag = cstr(&mut b)?;
    b.is_empty().then_some(tag)
}

/// The rows a command tag counts (`SELECT 2`, `INSERT 0 3`, `UPDATE 1`).
pub(crate) fn tag_rows(tag: &str) -> Option<u64> {
    let (command, last) = tag.rsplit_once(' ')?;
    (!command.is_empty()).then_some(())?;
    last.parse().ok()
}

/// The fields of an ErrorResponse or NoticeResponse body, by field code.
pub(crate) fn error_fields(mut b: &[u8]) -> Option<Vec<(u8, String)>> {
    let mut fields = Vec::new();
    loop {
        let code = *b.first()?;
        b.advance(1);
        if code == 0 {
            return b.is_empty().then_some(fields);
        }
        fields.push((code, cstr(&mut b)?));
    }
}

/// What one statement answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The command tag (`SELECT 2`); empty for an empty query.
    pub(crate) tag: String,
    pub(crate) fields: Vec<Field>,
    pub(crate) rows: Vec<Vec<Option<String>>>,
}

/// How a pipeline ended, once ReadyForQuery came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finished {
    /// Each statement's answer, up to the first error.
    pub(crate) answers: Vec<Answer>,
    /// The first ErrorResponse's fields, by code.
    pub(crate) error: Option<Vec<(u8, String)>>,
    /// ReadyForQuery's transaction status.
    pub(crate) status: u8,
    /// A setting was reported changed: the session is not as it was.
    pub(crate) settings_changed: bool,
    /// Rows past the size limit were left out.
    pub(crate) too_large: bool,
}

/// Gathers a pipeline's answers, message by message, holding at most
/// `limit` bytes of rows.
pub(crate) struct Collector {
    finished: Finished,
    current: Answer,
    row_bytes: usize,
    limit: usize,
}

/// A message that is not what the protocol allows here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0:?} message from the server")]
pub(crate) struct Malformed(pub(crate) char);

impl Collector {
    pub(crate) fn new(limit: usize) -> Collector {
        Collector {
            finished: Finished {
                answers: Vec::new(),
                error: None,
                status: 0,
                settings_changed: false,
                too_large: false,
            },
            current: Answer::default(),
            row_bytes: 0,
            limit,
        }
    }

    /// Takes one message; the whole outcome once it was ReadyForQuery.
    pub(crate) fn feed(&mut self, tag: u8, body: &[u8]) -> Result<Option<Finished>, Malformed> {
        let malformed = || Malformed(char::from(tag));
        match tag {
            backend::ROW_DESCRIPTION => {
                self.current.fields = row_description(body).ok_or_else(malformed)?
            }
            backend::NO_DATA => self.current.fields.clear(),
            backend::DATA_ROW => {
                self.row_bytes += body.len();
                if self.row_bytes > self.limit {
                    self.finished.too_large = true;
                } else {
                    self.current
                        .rows
                        .push(data_row(body).ok_or_else(malformed)?);
                }
            }
            backend::COMMAND_COMPLETE | backend::EMPTY_QUERY => {
                let mut done = std::mem::take(&mut self.current);
                if tag == backend::COMMAND_COMPLETE {
                    done.tag = command_tag(body).ok_or_else(malformed)?;
                }
                self.finished.answers.push(done);
            }
            backend::ERROR_RESPONSE => {
                let fields = error_fields(body).ok_or_else(malformed)?;
                self.finished.error.get_or_insert(fields);
            }
            backend::PARAMETER_STATUS => self.finished.settings_changed = true,
            backend::READY_FOR_QUERY => {
                self.finished.status = *body.first().ok_or_else(malformed)?;
                let fresh = Collector::new(self.limit);
                return Ok(Some(std::mem::replace(self, fresh).finished));
            }
            // ParseComplete, BindComplete, notices, notifications.
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::proto::frame::{frame_len, typed};
    use crate::pg::proto::messages;
    use proptest::prelude::*;

    /// The messages in `bytes`, as (tag, body).
    fn messages(mut bytes: BytesMut) -> Vec<(u8, BytesMut)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = frame_len(&bytes, true, 1 << 20).unwrap().unwrap();
            out.push(typed(bytes.split_to(len)));
        }
        out
    }

    #[test]
    fn a_statement_is_parse_bind_describe_execute() {
        let mut out = BytesMut::new();
        statement(&mut out, "SELECT $1, $2", &[Some("7".into()), None]).unwrap();
        let tags: Vec<u8> = messages(out.clone()).iter().map(|(t, _)| *t).collect();
        assert_eq!(tags, b"PBDE");
        let bind = &messages(out)[1].1;
        // portal, statement, 0 formats, 2 params: "7" (len 1) and NULL (-1), 0 formats
        assert_eq!(
            &bind[..],
            &[0, 0, 0, 0, 0, 2, 0, 0, 0, 1, b'7', 255, 255, 255, 255, 0, 0]
        );
        assert_eq!(
            statement(&mut BytesMut::new(), "SELECT '\0'", &[]),
            Err(StatementError::Nul)
        );
        let many = vec![None; MAX_PARAMS + 1];
        assert_eq!(
            statement(&mut BytesMut::new(), "SELECT 1", &many),
            Err(StatementError::TooManyParams)
        );
    }

    #[test]
    fn answers_parse_back() {
        let desc = crate::pg::proto::results::row_description(&["n", "t"], |c| c == "n");
        let (_, body) = typed(desc);
        let fields = row_description(&body).unwrap();
        assert_eq!(fields.len(), 2);
        assert_eq!((fields[0].name.as_str(), fields[0].type_oid), ("n", 20));
        assert_eq!((fields[1].name.as_str(), fields[1].type_oid), ("t", 25));
        let (_, row) = typed(crate::pg::proto::results::data_row(&[
            Some("1".into()),
            None,
        ]));
        assert_eq!(data_row(&row).unwrap(), vec![Some("1".to_string()), None]);
        let (_, done) = typed(crate::pg::proto::results::command_complete("INSERT 0 3"));
        let tag = command_tag(&done).unwrap();
        assert_eq!(tag_rows(&tag), Some(3));
        assert_eq!(tag_rows("SELECT 2"), Some(2));
        assert_eq!(tag_rows("CREATE TABLE"), None);
        let (_, err) = typed(crate::pg::proto::results::error("42P01", "no such table"));
        let fields = error_fields(&err).unwrap();
        assert!(fields.contains(&(b'C', "42P01".to_string())));
        assert!(fields.contains(&(b'M', "no such table".to_string())));
    }

    #[test]
    fn truncated_answers_are_refused() {
        assert_eq!(row_description(&[0, 1, b'a', 0, 0]), None);
        assert_eq!(data_row(&[0, 1, 0, 0, 0, 5, b'a']), None);
        assert_eq!(data_row(&[0, 1, 0, 0, 0, 1, b'a', b'b']), None);
        assert_eq!(command_tag(b"SELECT 1"), None);
        assert_eq!(error_fields(b"Cabc"), None);
    }

    #[test]
    fn a_pipeline_collects_answers_until_ready() {
        use crate::pg::proto::results;
        let mut c = Collector::new(8);
        let feed = |c: &mut Collector, m: BytesMut| {
            let (tag, body) = typed(m);
            c.feed(tag, &body).unwrap()
        };
        assert_eq!(
            feed(&mut c, results::row_description(&["n"], |_| true)),
            None
        );
        feed(&mut c, results::data_row(&[Some("1".into())]));
        feed(&mut c, results::command_complete("SELECT 1"));
        // The second statement's rows pass the limit of 8 bytes.
        feed(&mut c, results::row_description(&["t"], |_| false));
        feed(&mut c, results::data_row(&[Some("long value".into())]));
        feed(&mut c, results::command_complete("SELECT 1"));
        feed(&mut c, results::error("23505", "duplicate key"));
        let done = feed(&mut c, messages::ready_for_query_idle()).unwrap();
        assert_eq!(done.answers.len(), 2);
        assert_eq!(done.answers[0].rows, vec![vec![Some("1".to_string())]]);
        assert!(done.answers[1].rows.is_empty() && done.too_large);
        let error = done.error.unwrap();
        assert!(error.contains(&(b'C', "23505".to_string())));
        assert_eq!(done.status, b'I');
        assert_eq!(c.feed(b'D', &[0, 1, 0]), Err(Malformed('D')));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = row_description(&body);
            let _ = data_row(&body);
            let _ = command_tag(&body);
            let _ = error_fields(&body);
            let mut c = Collector::new(64);
            for tag in [b'T', b'D', b'C', b'E', b'Z'] {
                let _ = c.feed(tag, &body);
            }
        }
    }
}
