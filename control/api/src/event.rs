//! The wire format of control's event stream (`GET /api/v1/events`,
//! server-sent events), in one place: control encodes, proxies decode.
//!
//! A frame is `event: <kind>\ndata: <JSON of Event>\n\n`; `resync` says the
//! reader missed events and should forget what it cached; comment lines
//! (`: keep-alive`) keep an idle connection open.

use crate::types::Event;

/// What a reader does with one frame.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Event(Event),
    /// Events were missed: forget every cached route and credential.
    Resync,
    /// A keep-alive, or an event this reader does not know.
    Other,
}

/// Sent every [`KEEP_ALIVE_EVERY`] on an idle stream.
pub const KEEP_ALIVE: &str = ": keep-alive\n\n";

/// How often control sends [`KEEP_ALIVE`].
pub const KEEP_ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A stream silent this long is dead (a wedged control, a lost network):
/// readers connect again.
pub const SILENT_FOR: std::time::Duration = std::time::Duration::from_secs(20);

/// The longest frame a reader takes; a longer one is a broken stream.
pub const MAX_FRAME: usize = 1 << 20;

/// One event as a frame.
pub fn encode(event: &Event) -> String {
    format!(
        "event: {}\ndata: {}\n\n",
        event.kind(),
        serde_json::to_string(event).expect("events serialise")
    )
}

/// The frame telling a reader it missed `missed` events.
pub fn resync(missed: u64) -> String {
    format!("event: resync\ndata: {{\"missed\":{missed}}}\n\n")
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("an event frame over {MAX_FRAME} bytes")]
pub struct FrameTooLong;

/// Cuts a byte stream into frames (check a whole frame is there, then parse).
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// The frames completed by `chunk`.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Frame>, FrameTooLong> {
        self.buf.extend_from_slice(chunk);
        let mut frames = Vec::new();
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
            frames.push(parse(&String::from_utf8_lossy(&frame)));
        }
        if self.buf.len() > MAX_FRAME {
            return Err(FrameTooLong);
        }
        Ok(frames)
    }
}

fn parse(frame: &str) -> Frame {
    let mut kind = "";
    let mut data = String::new();
    for line in frame.lines() {
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k;
        } else if let Some(d) = line.strip_prefix("data: ") {
            data.push_str(d);
        }
    }
    if kind == "resync" {
        return Frame::Resync;
    }
    serde_json::from_str(&data).map_or(Frame::Other, Frame::Event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Name;
    use proptest::prelude::*;

    #[test]
    fn frames_read_as_they_were_written_in_any_cut() {
        let event = Event::Dropped {
            app: Name::new("shop").unwrap(),
            name: Name::new("main").unwrap(),
        };
        let stream = format!("{}{KEEP_ALIVE}{}", encode(&event), resync(3));
        for cut in 0..stream.len() {
            let mut d = Decoder::default();
            let mut frames = d.push(&stream.as_bytes()[..cut]).unwrap();
            frames.extend(d.push(&stream.as_bytes()[cut..]).unwrap());
            assert_eq!(
                frames,
                vec![Frame::Event(event.clone()), Frame::Other, Frame::Resync]
            );
        }
    }

    #[test]
    fn an_endless_frame_is_refused() {
        let mut d = Decoder::default();
        let junk = vec![b'x'; MAX_FRAME / 4];
        let refused = (0..8).find_map(|_| d.push(&junk).err());
        assert_eq!(refused, Some(FrameTooLong));
    }

    proptest! {
        #[test]
        fn no_bytes_make_the_decoder_panic(chunks: Vec<Vec<u8>>) {
            let mut d = Decoder::default();
            for c in &chunks {
                let _ = d.push(c);
            }
        }
    }
}
