//! The few protocol messages the proxy writes or reads itself during
//! startup; after that, bytes are relayed untouched.

use bytes::{Buf, BufMut, BytesMut};

/// A simple Query.
pub(crate) fn query(sql: &str) -> BytesMut {
    message(b'Q', |b| {
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
    })
}

/// Messages the proxy sends, each as one complete frame.
pub(crate) fn message(tag: u8, body: impl FnOnce(&mut BytesMut)) -> BytesMut {
    let mut b = BytesMut::with_capacity(64);
    b.put_u8(tag);
    b.put_u32(0);
    body(&mut b);
    let len = (b.len() - 1) as u32;
    b[1..5].copy_from_slice(&len.to_be_bytes());
    b
}

pub(crate) fn auth_sasl() -> BytesMut {
    message(b'R', |b| {
        b.put_u32(10);
        b.put_slice(crate::pg::scram::MECHANISM.as_bytes());
        b.put_slice(b"\0\0");
    })
}

pub(crate) fn auth_sasl_continue(data: &str) -> BytesMut {
    message(b'R', |b| {
        b.put_u32(11);
        b.put_slice(data.as_bytes());
    })
}

pub(crate) fn auth_sasl_final(data: &str) -> BytesMut {
    message(b'R', |b| {
        b.put_u32(12);
        b.put_slice(data.as_bytes());
    })
}

/// ReadyForQuery, idle (outside a transaction).
pub(crate) fn ready_for_query_idle() -> BytesMut {
    message(b'Z', |b| b.put_u8(b'I'))
}

pub(crate) fn auth_ok() -> BytesMut {
    message(b'R', |b| b.put_u32(0))
}

pub(crate) fn backend_key_data(pid: i32, secret: i32) -> BytesMut {
    message(b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    })
}

/// A FATAL ErrorResponse with a SQLSTATE.
pub(crate) fn fatal(code: &str, text: &str) -> BytesMut {
    message(b'E', |b| {
        for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', text)] {
            b.put_u8(field);
            b.put_slice(value.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
    })
}

pub(crate) fn startup(params: &[(&str, &str)]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(0);
    b.put_u32(super::startup::PROTOCOL_3);
    for (k, v) in params {
        b.put_slice(k.as_bytes());
        b.put_u8(0);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_be_bytes());
    b
}

pub(crate) fn cancel_request(pid: i32, secret: i32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(16);
    b.put_u32(super::startup::CANCEL_REQUEST);
    b.put_i32(pid);
    b.put_i32(secret);
    b
}

pub(crate) fn sasl_initial_response(data: &str) -> BytesMut {
    message(b'p', |b| {
        b.put_slice(crate::pg::scram::MECHANISM.as_bytes());
        b.put_u8(0);
        b.put_i32(data.len() as i32);
        b.put_slice(data.as_bytes());
    })
}

pub(crate) fn sasl_response(data: &str) -> BytesMut {
    message(b'p', |b| b.put_slice(data.as_bytes()))
}

/// SASLInitialResponse body: mechanism and client-first-message.
pub(crate) fn parse_sasl_initial(mut body: BytesMut) -> Option<(String, String)> {
    let nul = body.iter().position(|b| *b == 0)?;
    let mechanism = String::from_utf8(body.split_to(nul).to_vec()).ok()?;
    body.advance(1);
    if body.len() < 4 {
        return None;
    }
    let len = body.get_i32();
    if len < 0 || len as usize != body.len() {
        return None;
    }
    Some((mechanism, String::from_utf8(body.to_vec()).ok()?))
}

/// An Authentication message's code and data.
pub(crate) fn parse_auth(mut body: BytesMut) -> Option<(u32, BytesMut)> {
    (body.len() >= 4).then(|| (body.get_u32(), body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_carry_their_length() {
        let m = fatal("28P01", "nope");
        assert_eq!(m[0], b'E');
        assert_eq!(
            u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize,
            m.len() - 1
        );
        let s = startup(&[("user", "a")]);
        assert_eq!(
            u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize,
            s.len()
        );
        let mut body = BytesMut::from(&sasl_initial_response("n,,n=,r=x")[5..]);
        assert_eq!(
            parse_sasl_initial(body.split()),
            Some(("SCRAM-SHA-256".into(), "n,,n=,r=x".into()))
        );
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse_sasl_initial(BytesMut::from(&bytes[..]));
            let _ = parse_auth(BytesMut::from(&bytes[..]));
        }
    }
}
