//! What the embedded relay reads from a client, checked as it arrives. The relay
//! (nostr-relay-builder's `LocalRelay`) reads WebSocket messages of up to 64 MiB and keeps
//! negentropy sessions (`NEG-OPEN`) without limit, and takes the stream as it is, so it
//! cannot be configured otherwise: one connection could hold gigabytes. [`Limited`] reads
//! the client's frames beside the relay and ends the connection (end of stream) at a
//! message larger than [`MAX_MESSAGE_BYTES`] — as soon as a frame header announces it,
//! before its bytes arrive — or at a message other than `EVENT`, `REQ`, `CLOSE`, `AUTH` or
//! `COUNT` (the relay stores nothing, so negentropy has nothing to reconcile).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest message a client may send: what keycast itself reads from a relay in one
/// message, and room for the largest event the relay carries (`embedded::MAX_EVENT_BYTES`)
/// and for keycast's own subscriptions (500 keys each).
pub const MAX_MESSAGE_BYTES: u64 = crate::transport::MAX_MESSAGE_BYTES as u64;

/// The NIP-01 messages a client may send (the label, as it must appear literally: one
/// spelled with an escape is refused rather than decoded).
const LABELS: [&[u8]; 5] = [b"EVENT", b"REQ", b"CLOSE", b"AUTH", b"COUNT"];

/// How much of a message's start is read to find its label: `[`, spaces, `"COUNT"`.
const LABEL_WINDOW: usize = 32;

/// A client stream whose frames are checked as they are read; see the module.
pub struct Limited<S> {
    inner: S,
    frames: FrameReader,
    ended: bool,
}

impl<S> Limited<S> {
    pub fn new(inner: S) -> Self {
        Limited {
            inner,
            frames: FrameReader::default(),
            ended: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.ended {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let this = &mut *self;
        if let Err(reason) = this.frames.feed(&buf.filled()[before..]) {
            // The end of the stream, not an error: the relay's session then ends, where an
            // error is logged and the next read tried again.
            this.ended = true;
            buf.set_filled(before);
            metrics::counter!("keycast_embedded_relay_cut_off_total").increment(1);
            tracing::debug!(
                reason,
                "embedded relay: a client's message is refused; closing its connection"
            );
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Follows the frames of a client's byte stream (RFC 6455 §5.2): headers, payload lengths,
/// and the start of each message, unmasked.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// Payload bytes of the current frame seen so far (for the mask's offset).
    seen: u64,
    mask: [u8; 4],
    /// The current frame is a data frame (text, binary or continuation).
    data: bool,
    fin: bool,
    /// Data bytes of the message being read.
    message: u64,
    /// The start of the message being read, unmasked, until its label is known.
    start: Vec<u8>,
    labelled: bool,
}

impl FrameReader {
    /// Reads `bytes`; an error says why the connection must end.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        let mut at = 0;
        while at < bytes.len() {
            // Between frames, or inside a header.
            if self.left == 0 {
                self.header.push(bytes[at]);
                at += 1;
                if let Some(len) = header_len(&self.header) {
                    if self.header.len() == len {
                        self.begin_frame()?;
                    }
                }
                continue;
            }
            let n = (self.left.min((bytes.len() - at) as u64)) as usize;
            if self.data && !self.labelled {
                for (k, byte) in bytes[at..at + n].iter().enumerate() {
                    if self.start.len() >= LABEL_WINDOW {
                        break;
                    }
                    self.start.push(byte ^ self.mask[((self.seen + k as u64) % 4) as usize]);
                }
                self.check_label(false)?;
            }
            self.seen += n as u64;
            self.left -= n as u64;
            at += n;
            if self.left == 0 {
                self.end_frame()?;
            }
        }
        Ok(())
    }

    fn begin_frame(&mut self) -> Result<(), &'static str> {
        let h = std::mem::take(&mut self.header);
        let opcode = h[0] & 0x0F;
        self.fin = h[0] & 0x80 != 0;
        let (len, rest) = match h[1] & 0x7F {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), &h[4..]),
            127 => (u64::from_be_bytes(h[2..10].try_into().expect("eight bytes")), &h[10..]),
            short => (u64::from(short), &h[2..]),
        };
        self.mask = if h[1] & 0x80 != 0 {
            rest[..4].try_into().expect("four bytes")
        } else {
            [0; 4]
        };
        match opcode {
            // A new text or binary message.
            1 | 2 => {
                self.message = 0;
                self.start.clear();
                self.labelled = false;
                self.data = true;
            }
            0 => self.data = true,
            // Control frames (close, ping, pong) carry at most 125 bytes.
            8..=10 if len <= 125 => self.data = false,
            _ => return Err("not a WebSocket frame a client sends"),
        }
        if self.data {
            self.message += len;
            if self.message > MAX_MESSAGE_BYTES {
                return Err("a message larger than the relay reads");
            }
        }
        self.left = len;
        self.seen = 0;
        if len == 0 {
            self.end_frame()?;
        }
        Ok(())
    }

    fn end_frame(&mut self) -> Result<(), &'static str> {
        self.seen = 0;
        if self.data && self.fin && !self.labelled {
            self.check_label(true)?;
        }
        Ok(())
    }

    /// Judges the label once enough of the message is known (`whole`: all of it is).
    fn check_label(&mut self, whole: bool) -> Result<(), &'static str> {
        match label_of(&self.start) {
            Some(label) if LABELS.contains(&label) => {
                self.labelled = true;
                Ok(())
            }
            None if !whole && self.start.len() < LABEL_WINDOW => Ok(()),
            _ => Err("a message this relay does not serve"),
        }
    }
}

/// The total header length once its first bytes are known.
fn header_len(h: &[u8]) -> Option<usize> {
    let second = *h.get(1)?;
    let extended = match second & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    Some(2 + extended + mask)
}

/// The label of a message that starts `["LABEL"`, once its closing quote is in `start`.
fn label_of(start: &[u8]) -> Option<&[u8]> {
    let rest = start.trim_ascii_start().strip_prefix(b"[")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
    let end = rest.iter().position(|b| *b == b'"')?;
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Feeds `bytes` a few at a time, as a network delivers them.
    fn feed_in_pieces(bytes: &[u8]) -> Result<(), &'static str> {
        let mut reader = FrameReader::default();
        for piece in bytes.chunks(7) {
            reader.feed(piece)?;
        }
        Ok(())
    }

    #[test]
    fn nip01_messages_pass_in_any_split() {
        let mut stream = frame(1, true, br##"["REQ","sub",{"kinds":[24133],"#p":["ab"]}]"##);
        stream.extend(frame(9, true, b"ping"));
        stream.extend(frame(1, true, br#" [ "EVENT", {"id":"x"}]"#));
        // A message in three fragments, a ping between them.
        stream.extend(frame(1, false, br#"["CLO"#));
        stream.extend(frame(9, true, b""));
        stream.extend(frame(0, false, br#"SE","#));
        stream.extend(frame(0, true, br#""sub"]"#));
        stream.extend(frame(8, true, &[0x03, 0xE8]));
        assert_eq!(feed_in_pieces(&stream), Ok(()));
        let mut whole = FrameReader::default();
        assert_eq!(whole.feed(&stream), Ok(()));
    }

    #[test]
    fn a_message_past_the_limit_is_refused_from_its_header() {
        let big = frame(1, true, &vec![b' '; MAX_MESSAGE_BYTES as usize + 1]);
        let mut reader = FrameReader::default();
        assert!(reader.feed(&big[..14]).is_err(), "refused before its payload arrives");
        // Fragments add up.
        let half = vec![b' '; MAX_MESSAGE_BYTES as usize / 2 + 1];
        let mut stream = frame(1, false, &[b"[\"EVENT\"".as_slice(), &half].concat());
        stream.extend(frame(0, true, &half));
        assert!(feed_in_pieces(&stream).is_err());
        // A message of exactly the limit is read.
        let mut exact = b"[\"EVENT\"".to_vec();
        exact.resize(MAX_MESSAGE_BYTES as usize, b' ');
        assert_eq!(feed_in_pieces(&frame(1, true, &exact)), Ok(()));
    }

    #[test]
    fn negentropy_and_escaped_or_unknown_labels_are_refused() {
        for message in [
            br#"["NEG-OPEN","s",{},"61"]"#.as_slice(),
            br#"["\u004eEG-OPEN","s",{},"61"]"#,
            br#"["\u0052EQ","s",{}]"#,
            br#"{"not":"an array"}"#,
            br#"[]"#,
        ] {
            assert!(
                feed_in_pieces(&frame(1, true, message)).is_err(),
                "{}",
                String::from_utf8_lossy(message)
            );
        }
        // A label that never closes within the window.
        let long = [b"[\"".as_slice(), &[b'A'; 64]].concat();
        assert!(feed_in_pieces(&frame(1, true, &long)).is_err());
    }

    #[test]
    fn a_control_frame_claiming_a_large_payload_is_refused() {
        let mut ping = frame(9, true, &[0; 126]);
        assert!(feed_in_pieces(&ping).is_err());
        ping = frame(3, true, b"x");
        assert!(feed_in_pieces(&ping).is_err(), "reserved opcode");
    }
}
