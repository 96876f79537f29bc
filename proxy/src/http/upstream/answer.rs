//! An engine's HTTP/1.1 answer, framed in two steps: is the whole head
//! there (then parse it), and how the body ends (length, chunks, or the
//! connection closing). Pure functions over the bytes read so far, so the
//! framing is tested and fuzzed without sockets; the engine is not trusted
//! to keep to sizes.

use bytes::{Buf, BytesMut};
use hyper::header::HeaderValue;
use hyper::StatusCode;

/// The most an answer's head may take.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most headers an answer may have.
const MAX_HEADERS: usize = 64;
/// The most an answer's body may take: a bigger one is refused, not held.
pub(crate) const MAX_BODY: usize = 256 * 1024 * 1024;
/// The most a chunk-size or trailer line may take.
const MAX_LINE: usize = 4096;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("the engine's answer is not HTTP/1.1: {0}")]
    Syntax(&'static str),
    #[error("the engine's answer head is over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the engine's answer is over {MAX_BODY} bytes")]
    BodyTooLarge,
}

/// How the body after the head ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(usize),
    Chunked,
    /// Until the engine closes the connection.
    UntilClose,
}

#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) content_type: Option<HeaderValue>,
    pub(crate) location: Option<String>,
    pub(crate) framing: Framing,
    /// The connection may carry another request after this answer.
    pub(crate) keep_alive: bool,
}

/// The head at the start of `buf` and its length, `None` while not all of
/// it has arrived. Informational (1xx) answers are skipped by the caller.
pub(crate) fn parse_head(
    buf: &[u8],
    head_request: bool,
) -> Result<Option<(Head, usize)>, Malformed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut headers);
    let len = match answer.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Malformed::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Malformed::Syntax("too many headers")),
        Err(_) => return Err(Malformed::Syntax("unreadable head")),
    };
    if len > MAX_HEAD {
        return Err(Malformed::HeadTooLarge);
    }
    let status = answer
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(Malformed::Syntax("no valid status"))?;
    let mut keep_alive = answer.version == Some(1);
    let (mut content_type, mut location, mut length, mut chunked) = (None, None, None, false);
    for header in answer.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-type") {
            content_type = HeaderValue::from_bytes(header.value).ok();
        } else if name.eq_ignore_ascii_case("location") {
            location = std::str::from_utf8(header.value).ok().map(str::to_string);
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or(Malformed::Syntax("bad Content-Length"))?;
            if length.is_some_and(|m| m != n) {
                return Err(Malformed::Syntax("two Content-Lengths"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding says how the body ends.
            let last = header
                .value
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            if !chunked {
                return Err(Malformed::Syntax("a transfer coding other than chunked"));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let value = header.value;
            if value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                keep_alive = false;
            }
        }
    }
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if chunked {
        // RFC 9112 6.3: chunked wins over a length, and such an answer
        // ends its connection.
        if length.is_some() {
            keep_alive = false;
        }
        Framing::Chunked
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(Malformed::BodyTooLarge);
        }
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    Ok(Some((
        Head {
            status,
            content_type,
            location,
            framing,
            keep_alive,
        },
        len,
    )))
}

/// A chunked body, decoded as its bytes arrive.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    Trailers,
    Done,
}

/// One line ending in CRLF at the start of `buf`, without it.
fn line(buf: &[u8]) -> Result<Option<usize>, Malformed> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) if end <= MAX_LINE => Ok(Some(end)),
        Some(_) => Err(Malformed::Syntax("a chunk line too long")),
        None if buf.len() > MAX_LINE => Err(Malformed::Syntax("a chunk line too long")),
        None => Ok(None),
    }
}

impl Chunked {
    /// Moves what `buf` holds of the body into `body`; true once the last
    /// chunk and the trailers are through.
    pub(crate) fn decode(
        &mut self,
        buf: &mut BytesMut,
        body: &mut BytesMut,
    ) -> Result<bool, Malformed> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = line(buf)? else {
                        return Ok(false);
                    };
                    let digits = buf[..end]
                        .split(|&b| b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .filter(|d| !d.is_empty() && d.len() <= 16)
                        .and_then(|d| usize::from_str_radix(d, 16).ok())
                        .ok_or(Malformed::Syntax("bad chunk size"))?;
                    buf.advance(end + 2);
                    if size > MAX_BODY - body.len() {
                        return Err(Malformed::BodyTooLarge);
                    }
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(false);
                    }
                    let n = left.min(buf.len());
                    body.extend_from_slice(&buf.split_to(n));
                    self.state = if n == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n)
                    };
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(false);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed::Syntax("a chunk not ended by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(end) = line(buf)? else {
                        return Ok(false);
                    };
                    buf.advance(end + 2);
                    if end == 0 {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(true),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes(), false).unwrap().unwrap().0
    }

    #[test]
    fn a_head_says_how_its_body_ends() {
        let h =
            head("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(
            (h.status.as_u16(), h.framing, h.keep_alive),
            (200, Framing::Length(12), true)
        );
        assert_eq!(h.content_type.unwrap(), "application/json");
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        let h = head("HTTP/1.1 301 Moved\r\nLocation: http://127.0.0.1:5002/db/query\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            h.location.as_deref(),
            Some("http://127.0.0.1:5002/db/query")
        );
        let h = head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);
        let (h, _) = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty);
    }

    #[test]
    fn a_head_that_lies_about_its_body_is_refused() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            assert!(parse_head(text.as_bytes(), false).is_err(), "{text}");
        }
        let endless = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            parse_head(endless.as_bytes(), false).unwrap_err(),
            Malformed::HeadTooLarge
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_chunked_body_ends_at_its_last_chunk_and_trailers() {
        let mut buf =
            BytesMut::from(&b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT"[..]);
        let (mut chunked, mut body) = (Chunked::default(), BytesMut::new());
        assert!(chunked.decode(&mut buf, &mut body).unwrap());
        assert_eq!(&body[..], b"hello world");
        assert_eq!(&buf[..], b"NEXT", "the next answer's bytes stay");
        for bad in [&b"zz\r\n"[..], b"5\r\nhelloXX", b"11111111111111111\r\n"] {
            let mut buf = BytesMut::from(bad);
            assert!(Chunked::default()
                .decode(&mut buf, &mut BytesMut::new())
                .is_err());
        }
    }

    proptest! {
        #[test]
        fn chunks_decode_the_same_however_the_bytes_arrive(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let mut wire = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(wire.len());
            let (mut chunked, mut body, mut buf, mut from, mut done) =
                (Chunked::default(), BytesMut::new(), BytesMut::new(), 0, false);
            for cut in cuts {
                buf.extend_from_slice(&wire[from..cut]);
                from = cut;
                done = chunked.decode(&mut buf, &mut body).unwrap();
            }
            prop_assert!(done);
            prop_assert_eq!(body.to_vec(), chunks.concat());
        }

        #[test]
        fn any_bytes_as_a_head_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_head(&bytes, false);
            let _ = Chunked::default().decode(&mut BytesMut::from(&bytes[..]), &mut BytesMut::new());
        }
    }
}
