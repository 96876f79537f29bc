//! PostgreSQL wire framing in two steps: check that a whole frame is there
//! (within an explicit length limit), then hand out its payload. One reader
//! serves the untyped startup frames and the typed regular messages.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The limit PostgreSQL itself puts on a startup packet.
pub(crate) const MAX_STARTUP: usize = 10_000;
/// Messages during authentication are small.
pub(crate) const MAX_AUTH_MESSAGE: usize = 8_192;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("message length {0} outside 4..={1}")]
    BadLength(usize, usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Length of the frame starting at `buf` (header included), once known.
/// `typed`: regular messages have a one-byte type before the length.
pub(crate) fn frame_len(
    buf: &[u8],
    typed: bool,
    limit: usize,
) -> Result<Option<usize>, FrameError> {
    let off = usize::from(typed);
    if buf.len() < off + 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
    if !(4..=limit).contains(&len) {
        return Err(FrameError::BadLength(len, limit));
    }
    Ok(Some(off + len))
}

/// Whether a whole frame is buffered (a bad length counts: reading it fails at once).
pub(crate) fn has_frame(buf: &[u8], typed: bool, limit: usize) -> bool {
    match frame_len(buf, typed, limit) {
        Ok(Some(n)) => buf.len() >= n,
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Reads one whole frame into `buf` and splits it off (header included).
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    typed: bool,
    limit: usize,
) -> Result<BytesMut, FrameError> {
    loop {
        if let Some(n) = frame_len(buf, typed, limit)? {
            if buf.len() >= n {
                return Ok(buf.split_to(n));
            }
        }
        if r.read_buf(buf).await? == 0 {
            return Err(FrameError::Closed);
        }
    }
}

/// A typed message: its type byte and payload.
pub(crate) fn typed(mut frame: BytesMut) -> (u8, BytesMut) {
    let tag = frame[0];
    frame.advance(5);
    (tag, frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lengths() {
        assert!(matches!(frame_len(&[0, 0, 0], false, 100), Ok(None)));
        assert!(matches!(frame_len(&[0, 0, 0, 8], false, 100), Ok(Some(8))));
        assert!(matches!(frame_len(b"Q\0\0\0\x05", true, 100), Ok(Some(6))));
        assert!(matches!(
            frame_len(&[0, 0, 0, 3], false, 100),
            Err(FrameError::BadLength(3, 100))
        ));
        assert!(matches!(
            frame_len(&[0, 1, 0, 0], false, 100),
            Err(FrameError::BadLength(65536, 100))
        ));
    }

    proptest! {
        #[test]
        fn never_panics_and_respects_the_limit(bytes in proptest::collection::vec(any::<u8>(), 0..16), typed in any::<bool>()) {
            if let Ok(Some(n)) = frame_len(&bytes, typed, 1000) {
                prop_assert!((4..=1001).contains(&n));
            }
        }
    }
}
