//! The few protocol messages the proxy writes or reads itself during
//! startup; after that, bytes are relayed untouched.

use bytes::{Buf, BufMut, BytesMut};

use super::tags::{backend, error_field, frontend, AuthCode, CANCEL_REQUEST, PROTOCOL_3};

/// A simple Query.
pub(crate) fn query(sql: &str) -> BytesMut {
    message(frontend::QUERY, |b| {
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
    message(backend::AUTHENTICATION, |b| {
        b.put_u32(AuthCode::Sasl.code());
        b.put_slice(crate::pg::scram::MECHANISM.as_bytes());
        b.put_slice(b"\0\0");
    })
}

pub(crate) fn auth_sasl_continue(data: &str) -> BytesMut {
    message(backend::AUTHENTICATION, |b| {
        b.put_u32(AuthCode::SaslContinue.code());
        b.put_slice(data.as_bytes());
    })
}

pub(crate) fn auth_sasl_final(data: &str) -> BytesMut {
    message(backend::AUTHENTICATION, |b| {
        b.put_u32(AuthCode::SaslFinal.code());
        b.put_slice(data.as_bytes());
    })
}

/// ReadyForQuery, idle (outside a transaction).
pub(crate) fn ready_for_query_idle() -> BytesMut {
    message(backend::READY_FOR_QUERY, |b| b.put_u8(backend::IDLE))
}

pub(crate) fn auth_ok() -> BytesMut {
    message(backend::AUTHENTICATION, |b| b.put_u32(AuthCode::Ok.code()))
}

pub(crate) fn backend_key_data(pid: i32, secret: i32) -> BytesMut {
    message(backend::BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    })
}

/// A FATAL ErrorResponse with a SQLSTATE.
pub(crate) fn fatal(code: &str, text: &str) -> BytesMut {
    error_response("FATAL", code, text)
}

/// An ErrorResponse of `severity` (`ERROR`, `FATAL`) with a SQLSTATE.
pub(crate) fn error_response(severity: &str, code: &str, text: &str) -> BytesMut {
    message(backend::ERROR_RESPONSE, |b| {
        for (field, value) in [
            (error_field::SEVERITY, severity),
            (error_field::SEVERITY_V, severity),
            (error_field::CODE, code),
            (error_field::MESSAGE, text),
        ] {
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
    b.put_u32(PROTOCOL_3);
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
    b.put_u32(CANCEL_REQUEST);
    b.put_i32(pid);
    b.put_i32(secret);
    b
}

pub(crate) fn sasl_initial_response(data: &str) -> BytesMut {
    message(frontend::SASL_RESPONSE, |b| {
        b.put_slice(crate::pg::scram::MECHANISM.as_bytes());
        b.put_u8(0);
        b.put_i32(data.len() as i32);
        b.put_slice(data.as_bytes());
    })
}

pub(crate) fn sasl_response(data: &str) -> BytesMut {
    message(frontend::SASL_RESPONSE, |b| b.put_slice(data.as_bytes()))
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
pub(crate) fn parse_auth(mut body: BytesMut) -> Option<(AuthCode, BytesMut)> {
    (body.len() >= 4).then(|| (AuthCode::from_code(body.get_u32()), body))
}

/// A field of an ErrorResponse frame (tag and length included), e.g.
/// [`error_field::SEVERITY_V`].
pub(crate) fn error_field(frame: &[u8], field: u8) -> Option<&[u8]> {
    frame
        .get(5..)?
        .split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(&[field]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_carry_their_length() {
        let m = fatal("28P01", "nope");
        assert_eq!(m[0], backend::ERROR_RESPONSE);
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
