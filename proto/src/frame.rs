//! viaduct's packer frame (PROTOCOL.md B§2), sans-IO: a 10-byte big-endian header (version u32,
//! type u8, flags u8, payload length u32) followed by the payload, frames back to back on a QUIC
//! stream.
//!
//! The decoder works on whatever bytes have arrived: "need more bytes" is `Ok(None)` and consumes
//! nothing, a complete frame is split off the front of the buffer without copying its payload.
//! The announced length is checked against the cap from the header alone, so a peer announcing
//! 4 GiB makes nothing grow (fixes W2); nor does the decoder reserve room for a frame before its
//! bytes arrive, so a peer cannot make us allocate 32 MiB by sending 10 bytes. Like KubeEdge it
//! accepts any version, type and flags; it writes `01 01 01 00`, `01`, `00`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, FrameError};
use crate::message::Message;
use crate::pb;

/// Size of the packer header.
pub const HEADER_LEN: usize = 10;
/// Largest payload accepted or written: viaduct's cap, 32 MiB.
pub const MAX_PAYLOAD_LEN: usize = 32 * 1024 * 1024;
/// Version written: 1.1.1 as major<<24 | minor<<16 | fix<<8.
pub const VERSION: u32 = 0x0101_0100;
/// Package type of a message frame, the only one viaduct writes.
pub const KIND_MESSAGE: u8 = 0x01;
/// The 3 bytes that open every QUIC message stream except the control stream (B§5.3).
pub const MESSAGE_STREAM_PREFIX: &[u8; 3] = b"msg";

/// One packer frame as read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Version field, as sent (unchecked, as in KubeEdge).
    pub version: u32,
    /// Package type, as sent (`0x01` message; others are unused and unchecked).
    pub kind: u8,
    /// Flags, as sent (`0x80` "compressed" is defined but never set).
    pub flags: u8,
    /// The payload: a protobuf message for type `0x01`.
    pub payload: Bytes,
}

impl Frame {
    /// A message frame, as viaduct writes it, around `payload`.
    pub fn message(payload: Bytes) -> Self {
        Self {
            version: VERSION,
            kind: KIND_MESSAGE,
            flags: 0,
            payload,
        }
    }

    /// Appends this frame, header fields as they are, to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        check_len(self.payload.len())?;
        dst.reserve(HEADER_LEN + self.payload.len());
        put_header(dst, self.version, self.kind, self.flags, self.payload.len());
        dst.put_slice(&self.payload);
        Ok(())
    }

    /// Decodes the payload as a protobuf message ([`pb::decode_bytes`]; the content shares the
    /// frame's memory).
    pub fn to_message(&self) -> Result<Message, DecodeError> {
        pb::decode_bytes(self.payload.clone())
    }
}

/// Decodes one frame from the front of `src` with the default 32 MiB cap; see
/// [`FrameDecoder::decode`].
pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    FrameDecoder::default().decode(src)
}

/// Appends a message frame (`01 01 01 00`, `01`, `00`, length) around `payload` to `dst`.
/// Refuses a payload above [`MAX_PAYLOAD_LEN`], which no peer would accept, before writing.
pub fn encode(payload: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
    check_len(payload.len())?;
    dst.reserve(HEADER_LEN + payload.len());
    put_header(dst, VERSION, KIND_MESSAGE, 0, payload.len());
    dst.put_slice(payload);
    Ok(())
}

/// Appends a message frame holding `msg` in Causeway's protobuf form ([`pb::encode`]) to `dst`,
/// serialising straight into `dst`. Refuses, writing nothing, a message whose payload exceeds
/// [`MAX_PAYLOAD_LEN`].
pub fn encode_message(msg: &Message, dst: &mut BytesMut) -> Result<(), FrameError> {
    let enc = pb::Encoder::causeway(msg);
    check_len(enc.len)?;
    dst.reserve(HEADER_LEN + enc.len);
    put_header(dst, VERSION, KIND_MESSAGE, 0, enc.len);
    enc.write(dst);
    Ok(())
}

/// Decodes the payload of `frame` as a message; see [`Frame::to_message`].
pub fn decode_message(frame: &Frame) -> Result<Message, DecodeError> {
    frame.to_message()
}

/// A frame decoder with a configurable payload cap. Feed it the bytes of one stream in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameDecoder {
    /// Largest payload accepted; a larger announced length is [`FrameError::TooLarge`]. Defaults
    /// to [`MAX_PAYLOAD_LEN`]; lower it where messages are known to be small.
    pub max_payload_len: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_PAYLOAD_LEN)
    }
}

impl FrameDecoder {
    /// A decoder accepting payloads up to `max_payload_len` bytes.
    pub fn new(max_payload_len: usize) -> Self {
        Self { max_payload_len }
    }

    /// Splits one frame off the front of `src`, or returns `Ok(None)`, consuming nothing, when
    /// `src` does not hold a whole frame yet. After an error the stream cannot be resynchronised:
    /// close it.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(header) = src.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let [v0, v1, v2, v3, kind, flags, l0, l1, l2, l3] = *header;
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        let max = self.max_payload_len;
        let too_large = FrameError::TooLarge {
            len: u64::from(len),
            max,
        };
        let Ok(len) = usize::try_from(len) else {
            return Err(too_large);
        };
        if len > max {
            return Err(too_large);
        }
        if src.len() - HEADER_LEN < len {
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Ok(Some(Frame {
            version: u32::from_be_bytes([v0, v1, v2, v3]),
            kind,
            flags,
            payload: src.split_to(len).freeze(),
        }))
    }

    /// [`FrameDecoder::decode`] once the stream has ended: a frame if one is complete, `Ok(None)`
    /// if nothing is left, [`FrameError::Truncated`] if the stream stopped inside a frame.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        if src.is_empty() {
            return Ok(None);
        }
        let need = match src.first_chunk::<HEADER_LEN>() {
            // decode() refused lengths above the cap, so this is at most cap + 10.
            Some(h) => {
                HEADER_LEN.saturating_add(u32::from_be_bytes([h[6], h[7], h[8], h[9]]) as usize)
            }
            None => HEADER_LEN,
        };
        Err(FrameError::Truncated {
            have: src.len(),
            need,
        })
    }

    /// [`FrameDecoder::decode`] and then the payload as a message, for a QUIC message stream.
    /// A frame whose payload is not a message is consumed and reported as
    /// [`FrameError::Message`].
    pub fn decode_message(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame.to_message()?)),
            None => Ok(None),
        }
    }
}

fn check_len(len: usize) -> Result<(), FrameError> {
    if len > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: MAX_PAYLOAD_LEN,
        });
    }
    Ok(())
}

fn put_header(dst: &mut BytesMut, version: u32, kind: u8, flags: u8, len: usize) {
    dst.put_u32(version);
    dst.put_u8(kind);
    dst.put_u8(flags);
    // The caller checked len <= MAX_PAYLOAD_LEN, which fits a u32.
    dst.put_u32(len as u32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Content;

    fn keepalive() -> Message {
        Message::with_header(
            "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
            "",
            1_700_000_000_000,
        )
        .route("websocket", "resource", "node", "keepalive")
        .content(Content::text("ping"))
    }

    /// Three frames back to back: a keepalive, an empty payload, a 300-byte payload with odd
    /// header fields.
    fn stream() -> (Vec<u8>, Vec<Frame>) {
        let frames = vec![
            Frame::message(Bytes::from(pb::encode(&keepalive()))),
            Frame::message(Bytes::new()),
            Frame {
                version: 0xdead_beef,
                kind: 0x04,
                flags: 0x80,
                payload: Bytes::from(vec![0x5a; 300]),
            },
        ];
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf).unwrap();
        }
        (buf.to_vec(), frames)
    }

    fn drain(decoder: &mut FrameDecoder, buf: &mut BytesMut, out: &mut Vec<Frame>) {
        while let Some(f) = decoder.decode(buf).unwrap() {
            out.push(f);
        }
    }

    #[test]
    fn keepalive_frame_matches_protocol_md() {
        let mut buf = BytesMut::new();
        encode_message(&keepalive(), &mut buf).unwrap();
        // viaduct's 93-byte payload, plus the content kind (field 100 = 2, a string).
        assert_eq!(buf.len(), 106);
        assert_eq!(&buf[..10], &[1, 1, 1, 0, 1, 0, 0, 0, 0, 0x60]);
        let mut viaduct = pb::encode_kubeedge(&keepalive());
        assert_eq!(viaduct.len(), 0x5d);
        viaduct.extend([0xa0, 0x06, 0x02]);
        let mut plain = BytesMut::new();
        encode(&viaduct, &mut plain).unwrap();
        assert_eq!(buf, plain);
        let frame = decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        let msg = decode_message(&frame).unwrap();
        assert_eq!(msg.route.operation, "keepalive");
        assert_eq!(msg.content.as_text(), Some("ping"));
    }

    #[test]
    fn whole_split_and_byte_by_byte_give_the_same_frames() {
        let (bytes, frames) = stream();
        // Whole.
        let mut got = Vec::new();
        let mut buf = BytesMut::from(&bytes[..]);
        drain(&mut FrameDecoder::default(), &mut buf, &mut got);
        assert_eq!(got, frames);
        assert!(buf.is_empty());
        // Split at every offset.
        for cut in 0..=bytes.len() {
            let mut got = Vec::new();
            let mut decoder = FrameDecoder::default();
            let mut buf = BytesMut::from(&bytes[..cut]);
            drain(&mut decoder, &mut buf, &mut got);
            buf.extend_from_slice(&bytes[cut..]);
            drain(&mut decoder, &mut buf, &mut got);
            assert_eq!(got, frames, "cut at {cut}");
            assert!(buf.is_empty());
        }
        // One byte at a time; a partial frame is never consumed.
        let mut got = Vec::new();
        let mut decoder = FrameDecoder::default();
        let mut buf = BytesMut::new();
        for &b in &bytes {
            let before = buf.len() + 1;
            buf.put_u8(b);
            match decoder.decode(&mut buf).unwrap() {
                Some(f) => got.push(f),
                None => assert_eq!(buf.len(), before),
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn oversize_length_is_refused_before_any_allocation() {
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&[1, 1, 1, 0, 1, 0, 0xff, 0xff, 0xff, 0xff]);
        let capacity = buf.capacity();
        assert_eq!(
            decode(&mut buf),
            Err(FrameError::TooLarge {
                len: 0xffff_ffff,
                max: MAX_PAYLOAD_LEN
            })
        );
        assert_eq!(buf.capacity(), capacity);
        assert_eq!(buf.len(), HEADER_LEN);
        // The cap itself is accepted (need more bytes), one more is not.
        let mut at_cap = BytesMut::from(&[1, 1, 1, 0, 1, 0, 0x02, 0, 0, 0][..]);
        assert_eq!(decode(&mut at_cap), Ok(None));
        let mut above = BytesMut::from(&[1, 1, 1, 0, 1, 0, 0x02, 0, 0, 1][..]);
        assert!(matches!(
            decode(&mut above),
            Err(FrameError::TooLarge {
                len: 0x0200_0001,
                ..
            })
        ));
        // A configured cap applies the same way.
        let mut small = FrameDecoder::new(4);
        let mut five = BytesMut::from(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 5][..]);
        assert!(matches!(
            small.decode(&mut five),
            Err(FrameError::TooLarge { len: 5, max: 4 })
        ));
    }

    #[test]
    fn a_large_announced_length_reserves_nothing() {
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&[1, 1, 1, 0, 1, 0, 0x01, 0xff, 0xff, 0xff, 0xaa]);
        let capacity = buf.capacity();
        assert_eq!(decode(&mut buf), Ok(None));
        assert_eq!(buf.capacity(), capacity);
    }

    #[test]
    fn zero_length_payload_is_a_frame_but_not_a_message() {
        let mut buf = BytesMut::from(&[1, 1, 1, 0, 1, 0, 0, 0, 0, 0][..]);
        let frame = decode(&mut buf).unwrap().unwrap();
        assert!(frame.payload.is_empty());
        assert_eq!(decode_message(&frame), Err(DecodeError::MissingHeader));
        let mut buf = BytesMut::from(&[1, 1, 1, 0, 1, 0, 0, 0, 0, 0][..]);
        assert_eq!(
            FrameDecoder::default().decode_message(&mut buf),
            Err(FrameError::Message(DecodeError::MissingHeader))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn truncation_is_reported_at_end_of_stream() {
        let (bytes, _) = stream();
        let mut decoder = FrameDecoder::default();
        let mut header_only = BytesMut::from(&bytes[..4]);
        assert_eq!(
            decoder.decode_eof(&mut header_only),
            Err(FrameError::Truncated { have: 4, need: 10 })
        );
        let mut partial = BytesMut::from(&bytes[..50]);
        assert_eq!(
            decoder.decode_eof(&mut partial),
            Err(FrameError::Truncated {
                have: 50,
                need: 106
            })
        );
        let mut empty = BytesMut::new();
        assert_eq!(decoder.decode_eof(&mut empty), Ok(None));
        let mut whole = BytesMut::from(&bytes[..106]);
        assert!(decoder.decode_eof(&mut whole).unwrap().is_some());
    }

    #[test]
    fn encoders_refuse_oversize_payloads() {
        let big = vec![0; MAX_PAYLOAD_LEN + 1];
        let mut dst = BytesMut::new();
        assert_eq!(
            encode(&big, &mut dst),
            Err(FrameError::TooLarge {
                len: MAX_PAYLOAD_LEN as u64 + 1,
                max: MAX_PAYLOAD_LEN
            })
        );
        let msg = Message::default().content(Bytes::from(big));
        assert!(matches!(
            encode_message(&msg, &mut dst),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(dst.is_empty());
    }
}
