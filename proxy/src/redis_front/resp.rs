//! The little RESP the checks speak: commands written as arrays of bulk
//! strings, replies framed in two steps (a header line within
//! [`MAX_LINE`], then the payload it announces within its own limit).
//! Client traffic never goes through here: it is relayed as bytes.

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// A header line: type byte, length or short text, CRLF.
pub(crate) const MAX_LINE: usize = 4096;
/// A bulk string: `INFO replication` of a master with many replicas is
/// the largest the checks ask for.
pub(crate) const MAX_BULK: usize = 64 << 10;
/// Elements of one array: `ROLE` of a master lists each replica.
pub(crate) const MAX_ELEMENTS: usize = 1024;
/// Arrays in arrays: `ROLE` nests three deep.
pub(crate) const MAX_DEPTH: usize = 4;
/// A whole reply, however it is nested.
pub(crate) const MAX_REPLY: usize = 256 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Simple(Vec<u8>),
    Error(String),
    Integer(i64),
    /// `None`: the nil bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None`: the nil array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The bytes of a simple or bulk string.
    pub(crate) fn text(&self) -> Option<&[u8]> {
        match self {
            Reply::Simple(s) | Reply::Bulk(Some(s)) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RespError {
    #[error("reply line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("unknown reply type {0:?}")]
    UnknownType(char),
    #[error("bad number {0:?} in a reply")]
    BadNumber(String),
    #[error("{what} of {len} exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        len: i64,
        limit: usize,
    },
    #[error("arrays nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("bulk string not followed by CRLF")]
    MissingCrlf,
    #[error("connection closed before the reply ended")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One command, as Redis reads commands from clients.
pub(crate) fn command(out: &mut BytesMut, args: &[&[u8]]) {
    out.put_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.put_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
}

/// The reply at the start of `buf` and its length in bytes, once all of it
/// is there. A header over a limit fails at once, before its payload arrives.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    let mut pos = 0;
    Ok(parse_at(buf, &mut pos, 0)?.map(|reply| (reply, pos)))
}

fn parse_at(buf: &[u8], pos: &mut usize, depth: usize) -> Result<Option<Reply>, RespError> {
    let Some(line) = line(&buf[*pos..])? else {
        return Ok(None);
    };
    let (kind, rest) = match line.split_first() {
        Some((kind, rest)) => (*kind, rest),
        None => return Err(RespError::UnknownType('\r')),
    };
    let body = *pos + line.len() + 2;
    let reply = match kind {
        b'+' => Reply::Simple(rest.to_vec()),
        b'-' => Reply::Error(String::from_utf8_lossy(rest).into_owned()),
        b':' => Reply::Integer(number(rest)?),
        b'$' => {
            let Some(len) = length(rest, "bulk string", MAX_BULK)? else {
                *pos = body;
                return Ok(Some(Reply::Bulk(None)));
            };
            if buf.len() < body + len + 2 {
                return Ok(None);
            }
            if &buf[body + len..body + len + 2] != b"\r\n" {
                return Err(RespError::MissingCrlf);
            }
            *pos = body + len + 2;
            return Ok(Some(Reply::Bulk(Some(buf[body..body + len].to_vec()))));
        }
        b'*' => {
            let Some(count) = length(rest, "array", MAX_ELEMENTS)? else {
                *pos = body;
                return Ok(Some(Reply::Array(None)));
            };
            if depth + 1 > MAX_DEPTH {
                return Err(RespError::TooDeep);
            }
            *pos = body;
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                match parse_at(buf, pos, depth + 1)? {
                    Some(item) => items.push(item),
                    None => return Ok(None),
                }
            }
            return Ok(Some(Reply::Array(Some(items))));
        }
        other => return Err(RespError::UnknownType(char::from(other))),
    };
    *pos = body;
    Ok(Some(reply))
}

/// The line at the start of `buf`, without its CRLF.
fn line(buf: &[u8]) -> Result<Option<&[u8]>, RespError> {
    let window = &buf[..buf.len().min(MAX_LINE + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some(&buf[..end])),
        None if window.len() == MAX_LINE + 2 => Err(RespError::LineTooLong),
        None => Ok(None),
    }
}

fn number(digits: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RespError::BadNumber(String::from_utf8_lossy(digits).into_owned()))
}

/// A length header: `None` for -1 (nil), refused above `limit`.
fn length(digits: &[u8], what: &'static str, limit: usize) -> Result<Option<usize>, RespError> {
    match number(digits)? {
        -1 => Ok(None),
        n if n < 0 || n as u64 > limit as u64 => Err(RespError::TooLarge {
            what,
            len: n,
            limit,
        }),
        n => Ok(Some(n as usize)),
    }
}

/// Reads one whole reply (at most [`MAX_REPLY`] bytes), leaving whatever
/// follows it in `buf`.
pub(crate) async fn read_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Reply, RespError> {
    loop {
        if let Some((reply, n)) = parse(buf)? {
            buf.advance(n);
            return Ok(reply);
        }
        if buf.len() >= MAX_REPLY {
            return Err(RespError::TooLarge {
                what: "reply",
                len: buf.len() as i64,
                limit: MAX_REPLY,
            });
        }
        buf.reserve(4096);
        if r.read_buf(buf).await? == 0 {
            return Err(RespError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }

    /// Writes a reply as a server would.
    fn encode(reply: &Reply, out: &mut Vec<u8>) {
        match reply {
            Reply::Simple(s) => {
                out.push(b'+');
                out.extend_from_slice(s);
            }
            Reply::Error(e) => out.extend_from_slice(format!("-{e}").as_bytes()),
            Reply::Integer(n) => out.extend_from_slice(format!(":{n}").as_bytes()),
            Reply::Bulk(None) => out.extend_from_slice(b"$-1"),
            Reply::Bulk(Some(b)) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
            Reply::Array(None) => out.extend_from_slice(b"*-1"),
            Reply::Array(Some(items)) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    encode(item, out);
                }
                return;
            }
        }
        out.extend_from_slice(b"\r\n");
    }

    #[test]
    fn role_of_a_master() {
        let wire = b"*3\r\n$6\r\nmaster\r\n:3129659\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n9001\r\n$7\r\n3129242\r\n";
        let (reply, n) = parse(wire).unwrap().unwrap();
        assert_eq!(n, wire.len());
        assert_eq!(
            reply,
            Reply::Array(Some(vec![
                bulk("master"),
                Reply::Integer(3129659),
                Reply::Array(Some(vec![Reply::Array(Some(vec![
                    bulk("127.0.0.1"),
                    bulk("9001"),
                    bulk("3129242"),
                ]))])),
            ]))
        );
        for end in 0..wire.len() {
            assert!(parse(&wire[..end]).unwrap().is_none(), "prefix of {end}");
        }
    }

    #[test]
    fn simple_errors_nils_and_what_follows() {
        let (r, n) = parse(b"+OK\r\n-ERR x\r\n").unwrap().unwrap();
        assert_eq!((r, n), (Reply::Simple(b"OK".to_vec()), 5));
        let (r, _) = parse(b"-WRONGPASS invalid password\r\n").unwrap().unwrap();
        assert_eq!(r, Reply::Error("WRONGPASS invalid password".into()));
        assert_eq!(parse(b"$-1\r\n").unwrap().unwrap().0, Reply::Bulk(None));
        assert_eq!(parse(b"*-1\r\n").unwrap().unwrap().0, Reply::Array(None));
        assert_eq!(parse(b"$0\r\n\r\n").unwrap().unwrap().0, bulk(""));
    }

    #[test]
    fn limits_refuse_headers_before_their_payload() {
        assert!(matches!(
            parse(b"$65537\r\n"),
            Err(RespError::TooLarge { len: 65537, .. })
        ));
        assert!(matches!(
            parse(b"*1025\r\n"),
            Err(RespError::TooLarge { .. })
        ));
        assert!(matches!(parse(b"$-2\r\n"), Err(RespError::TooLarge { .. })));
        assert!(matches!(
            parse(b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n"),
            Err(RespError::TooDeep)
        ));
        assert!(matches!(
            parse(&[b'+'; MAX_LINE + 2]),
            Err(RespError::LineTooLong)
        ));
        assert!(parse(&[b'+'; MAX_LINE + 1]).unwrap().is_none());
        assert!(matches!(
            parse(b"$1\r\nab\r\n"),
            Err(RespError::MissingCrlf)
        ));
        assert!(matches!(parse(b":x\r\n"), Err(RespError::BadNumber(_))));
        assert!(matches!(parse(b"%1\r\n"), Err(RespError::UnknownType('%'))));
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = BytesMut::new();
        command(&mut out, &[b"AUTH", b"p w"]);
        command(&mut out, &[b"ROLE"]);
        assert_eq!(
            &out[..],
            b"*2\r\n$4\r\nAUTH\r\n$3\r\np w\r\n*1\r\n$4\r\nROLE\r\n"
        );
    }

    #[tokio::test]
    async fn read_reply_leaves_the_next_one() {
        let mut wire: &[u8] = b"+OK\r\n*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6379\r\n";
        let mut buf = BytesMut::new();
        assert_eq!(
            read_reply(&mut wire, &mut buf).await.unwrap(),
            Reply::Simple(b"OK".to_vec())
        );
        assert_eq!(
            read_reply(&mut wire, &mut buf).await.unwrap(),
            Reply::Array(Some(vec![bulk("127.0.0.1"), bulk("6379")]))
        );
        assert!(matches!(
            read_reply(&mut wire, &mut buf).await,
            Err(RespError::Closed)
        ));
    }

    fn reply() -> impl Strategy<Value = Reply> {
        let text = proptest::collection::vec(
            any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
            0..20,
        );
        let leaf = prop_oneof![
            text.clone().prop_map(Reply::Simple),
            "[a-zA-Z ]{0,20}".prop_map(Reply::Error),
            any::<i64>().prop_map(Reply::Integer),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(Reply::Bulk),
            Just(Reply::Array(None)),
        ];
        leaf.prop_recursive(MAX_DEPTH as u32 - 1, 64, 8, |inner| {
            proptest::collection::vec(inner, 0..8).prop_map(|v| Reply::Array(Some(v)))
        })
    }

    proptest! {
        #[test]
        fn replies_round_trip_and_prefixes_wait(r in reply(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut wire = Vec::new();
            encode(&r, &mut wire);
            let len = wire.len();
            wire.extend_from_slice(&tail);
            let (parsed, n) = parse(&wire).unwrap().unwrap();
            prop_assert_eq!(parsed, r);
            prop_assert_eq!(n, len);
            for end in 0..len {
                prop_assert!(parse(&wire[..end]).unwrap().is_none());
            }
        }

        #[test]
        fn never_panics_and_never_overreads(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some((_, n))) = parse(&bytes) {
                prop_assert!(n <= bytes.len());
            }
        }

        /// Near misses of real replies reach the deeper branches.
        #[test]
        fn near_misses_never_panic(text in "([-+:$*%][-0-9a-z]{0,4}\r?\n?){1,8}") {
            if let Ok(Some((_, n))) = parse(text.as_bytes()) {
                prop_assert!(n <= text.len());
            }
        }
    }
}
