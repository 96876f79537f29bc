//! The messages of a result set the proxy answers itself (the admin
//! console): RowDescription with text columns, DataRow, CommandComplete,
//! a non-fatal ErrorResponse, and the cleartext password exchange the
//! console logs in with.

use bytes::{BufMut, BytesMut};

use super::messages::message;
use super::tags::backend::{AUTHENTICATION, COMMAND_COMPLETE, DATA_ROW, ROW_DESCRIPTION};
use super::tags::AuthCode;

/// The OID of `text`: every console column is text, as in PgBouncer's.
const TEXT_OID: u32 = 25;
const INT8_OID: u32 = 20;

/// RowDescription: every column `text`, in text format.
pub(crate) fn row_description(columns: &[&str], is_number: impl Fn(&str) -> bool) -> BytesMut {
    message(ROW_DESCRIPTION, |b| {
        b.put_u16(columns.len() as u16);
        for name in columns {
            b.put_slice(name.as_bytes());
            b.put_u8(0);
            b.put_u32(0); // table OID
            b.put_u16(0); // column number
                          // Numbers are typed so that clients read them as numbers.
            b.put_u32(if is_number(name) { INT8_OID } else { TEXT_OID });
            b.put_i16(-1); // type size: variable
            b.put_i32(-1); // type modifier
            b.put_u16(0); // text format
        }
    })
}

/// DataRow; `None` is SQL NULL.
pub(crate) fn data_row(values: &[Option<String>]) -> BytesMut {
    message(DATA_ROW, |b| put_values(b, values))
}

/// A count, then each value with its length (-1 for NULL): the values of
/// DataRow and the parameters of Bind alike.
pub(crate) fn put_values(b: &mut BytesMut, values: &[Option<String>]) {
    b.put_u16(values.len() as u16);
    for v in values {
        match v {
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v.as_bytes());
            }
            None => b.put_i32(-1),
        }
    }
}

/// CommandComplete with its tag, such as `SHOW` or `PAUSE`.
pub(crate) fn command_complete(tag: &str) -> BytesMut {
    message(COMMAND_COMPLETE, |b| {
        b.put_slice(tag.as_bytes());
        b.put_u8(0);
    })
}

/// An ErrorResponse the session survives (severity ERROR).
pub(crate) fn error(code: &str, text: &str) -> BytesMut {
    super::messages::error_response("ERROR", code, text)
}

/// ParameterStatus.
pub(crate) fn parameter_status(name: &str, value: &str) -> BytesMut {
    message(b'S', |b| {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(value.as_bytes());
        b.put_u8(0);
    })
}

/// AuthenticationCleartextPassword.
pub(crate) fn auth_cleartext() -> BytesMut {
    message(AUTHENTICATION, |b| {
        b.put_u32(AuthCode::CleartextPassword.code())
    })
}

/// The password of a PasswordMessage body (NUL-terminated UTF-8).
pub(crate) fn parse_password(body: &[u8]) -> Option<String> {
    let text = body.strip_suffix(&[0])?;
    (!text.contains(&0))
        .then(|| String::from_utf8(text.to_vec()).ok())
        .flatten()
}

/// The text of a simple Query body (NUL-terminated UTF-8).
pub(crate) fn parse_query(body: &[u8]) -> Option<String> {
    parse_password(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rows_carry_their_columns_and_nulls() {
        let d = data_row(&[Some("db".into()), None]);
        assert_eq!(d[0], DATA_ROW);
        assert_eq!(&d[5..7], &[0, 2]);
        assert_eq!(&d[7..11], &2i32.to_be_bytes());
        assert_eq!(&d[13..17], &(-1i32).to_be_bytes());
        let t = row_description(&["database", "port"], |c| c == "port");
        assert_eq!(
            u32::from_be_bytes([t[1], t[2], t[3], t[4]]) as usize,
            t.len() - 1
        );
        // The type OIDs: text, then int8.
        assert_eq!(&t[7 + 9 + 6..7 + 9 + 10], &TEXT_OID.to_be_bytes());
        assert_eq!(
            &t[7 + 9 + 18 + 5 + 6..7 + 9 + 18 + 5 + 10],
            &INT8_OID.to_be_bytes()
        );
    }

    #[test]
    fn a_password_is_one_nul_terminated_string() {
        assert_eq!(parse_password(b"secret\0").as_deref(), Some("secret"));
        assert_eq!(parse_password(b"secret"), None);
        assert_eq!(parse_password(b"se\0cret\0"), None);
        assert_eq!(parse_password(b"\xff\0"), None);
    }

    proptest! {
        #[test]
        fn parsing_never_panics(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_password(&body);
            let _ = parse_query(&body);
        }
    }
}
