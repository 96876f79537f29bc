//! The first message of a connection: SSLRequest, GSSENCRequest,
//! CancelRequest or StartupMessage (protocol 3.0).

use std::collections::BTreeMap;

use bytes::{Buf, BytesMut};

use super::tags::{CANCEL_REQUEST, GSSENC_REQUEST, PROTOCOL_3, SSL_REQUEST};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Startup {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// A StartupMessage's parameters.
    Params(BTreeMap<String, String>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StartupError {
    #[error("unsupported protocol version {0}.{1}")]
    Version(u16, u16),
    #[error("malformed startup packet")]
    Malformed,
}

/// Parses a whole startup frame (length included).
pub(crate) fn parse(mut frame: BytesMut) -> Result<Startup, StartupError> {
    if frame.len() < 8 {
        return Err(StartupError::Malformed);
    }
    frame.advance(4);
    let code = frame.get_u32();
    match code {
        SSL_REQUEST if frame.is_empty() => Ok(Startup::SslRequest),
        GSSENC_REQUEST if frame.is_empty() => Ok(Startup::GssEncRequest),
        CANCEL_REQUEST if frame.len() == 8 => Ok(Startup::Cancel {
            pid: frame.get_i32(),
            secret: frame.get_i32(),
        }),
        PROTOCOL_3 => parse_params(&frame).map(Startup::Params),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(StartupError::Malformed),
        other => Err(StartupError::Version((other >> 16) as u16, other as u16)),
    }
}

/// `name\0value\0 ... \0`: pairs of C strings, then an empty name.
fn parse_params(mut body: &[u8]) -> Result<BTreeMap<String, String>, StartupError> {
    fn cstr<'a>(b: &mut &'a [u8]) -> Result<&'a str, StartupError> {
        let nul = b
            .iter()
            .position(|c| *c == 0)
            .ok_or(StartupError::Malformed)?;
        let s = std::str::from_utf8(&b[..nul]).map_err(|_| StartupError::Malformed)?;
        *b = &b[nul + 1..];
        Ok(s)
    }
    let mut params = BTreeMap::new();
    loop {
        let name = cstr(&mut body)?;
        if name.is_empty() {
            return if body.is_empty() {
                Ok(params)
            } else {
                Err(StartupError::Malformed)
            };
        }
        let value = cstr(&mut body)?;
        params.insert(name.to_string(), value.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use proptest::prelude::*;

    fn frame(code: u32, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32((8 + body.len()) as u32);
        b.put_u32(code);
        b.put_slice(body);
        b
    }

    #[test]
    fn parses_each_kind() {
        assert_eq!(parse(frame(SSL_REQUEST, b"")), Ok(Startup::SslRequest));
        assert_eq!(
            parse(frame(GSSENC_REQUEST, b"")),
            Ok(Startup::GssEncRequest)
        );
        assert_eq!(
            parse(frame(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9])),
            Ok(Startup::Cancel { pid: 7, secret: 9 })
        );
        let Startup::Params(p) =
            parse(frame(PROTOCOL_3, b"user\0alice.app\0database\0db\0\0")).unwrap()
        else {
            panic!()
        };
        assert_eq!(p["user"], "alice.app");
        assert_eq!(p["database"], "db");
        assert_eq!(
            parse(frame(PROTOCOL_3, b"user\0alice\0")),
            Err(StartupError::Malformed)
        );
        assert_eq!(
            parse(frame(PROTOCOL_3, b"user\0\0")),
            Err(StartupError::Malformed)
        );
        assert_eq!(
            parse(frame(131072, b"\0")),
            Err(StartupError::Version(2, 0))
        );
    }

    proptest! {
        #[test]
        fn never_panics(code in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(frame(code, &body));
        }
    }
}
