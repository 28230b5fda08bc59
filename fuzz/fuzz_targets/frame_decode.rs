//! The packer frame decoder on arbitrary stream bytes, fed whole and in chunks. It must never
//! panic; both feedings must give the same frames and the same error; re-encoding the frames must
//! give back exactly the bytes consumed; every payload then goes through the protobuf decoder.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::FrameError;
use proto::frame::{Frame, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    // The first byte picks a chunk size and a cap, so small caps and split points are explored.
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(seed % 17) + 1;
    let cap = if seed & 0x80 == 0 {
        proto::frame::MAX_PAYLOAD_LEN
    } else {
        usize::from(seed) * 8
    };

    let (whole, whole_err, whole_left) = feed(stream, stream.len(), cap);
    let (chunked, chunked_err, chunked_left) = feed(stream, chunk, cap);
    assert_eq!(whole, chunked);
    assert_eq!(whole_err, chunked_err);
    if whole_err.is_none() {
        assert_eq!(whole_left, chunked_left);
    }

    let mut again = BytesMut::new();
    for frame in &whole {
        frame
            .encode(&mut again)
            .expect("decoded frames are within the cap");
        assert!(frame.payload.len() <= cap);
        if let Ok(msg) = frame.to_message() {
            // A payload that decodes re-encodes to a payload that decodes to the same message
            // (JSON content up to Go's float64 rounding of its numbers), stable from then on.
            let encoded = proto::pb::encode(&msg);
            let back = proto::pb::decode(&encoded).expect("re-encoded message");
            if proto::pb::ContentKind::of(&msg.content) == proto::pb::ContentKind::Json {
                assert_eq!((&back.header, &back.route), (&msg.header, &msg.route));
            } else {
                assert_eq!(back, msg);
            }
            assert_eq!(proto::pb::encode(&back), encoded);
        }
    }
    assert_eq!(&again[..], &stream[..again.len()]);
});

/// Feeds `stream` to a decoder `chunk` bytes at a time; returns the frames, the error that
/// stopped it if any, and how many bytes were left undecoded at the end.
fn feed(stream: &[u8], chunk: usize, cap: usize) -> (Vec<Frame>, Option<FrameError>, usize) {
    let mut decoder = FrameDecoder::new(cap);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e), buf.len()),
            }
        }
    }
    let err = decoder.decode_eof(&mut buf).err();
    (frames, err, buf.len())
}
