//! Bad inputs kept as files under `tests/data/`, each fed to the decoder that would meet it and
//! expected to give its typed error: never a panic, never an allocation sized by the peer.

use bytes::BytesMut;
use causeway_proto::frame::{self, FrameDecoder, HEADER_LEN, MAX_PAYLOAD_LEN};
use causeway_proto::{DecodeError, FrameError, json, pb};

#[test]
fn frame_announcing_4_gib_is_refused_without_growing_the_buffer() {
    let mut src = BytesMut::with_capacity(64);
    src.extend_from_slice(include_bytes!("data/frame_len_ffffffff.bin"));
    let capacity = src.capacity();
    assert_eq!(
        frame::decode(&mut src),
        Err(FrameError::TooLarge {
            len: 0xffff_ffff,
            max: MAX_PAYLOAD_LEN
        })
    );
    assert_eq!(src.capacity(), capacity);
}

#[test]
fn frame_with_empty_payload_is_a_missing_header() {
    let mut src = BytesMut::from(&include_bytes!("data/frame_empty_payload.bin")[..]);
    assert_eq!(
        FrameDecoder::default().decode_message(&mut src),
        Err(FrameError::Message(DecodeError::MissingHeader))
    );
}

#[test]
fn truncated_frames_wait_then_fail_at_end_of_stream() {
    for (bytes, need) in [
        (
            &include_bytes!("data/frame_truncated_header.bin")[..],
            HEADER_LEN,
        ),
        (
            &include_bytes!("data/frame_truncated_payload.bin")[..],
            HEADER_LEN + 0x18,
        ),
    ] {
        let mut src = BytesMut::from(bytes);
        let mut decoder = FrameDecoder::default();
        assert_eq!(decoder.decode(&mut src), Ok(None));
        assert_eq!(src.len(), bytes.len(), "nothing consumed");
        assert_eq!(
            decoder.decode_eof(&mut src),
            Err(FrameError::Truncated {
                have: bytes.len(),
                need
            })
        );
    }
}

#[test]
fn protobuf_without_header_or_router_is_refused() {
    assert_eq!(
        pb::decode(include_bytes!("data/pb_no_header.bin")),
        Err(DecodeError::MissingHeader)
    );
    assert_eq!(
        pb::decode(include_bytes!("data/pb_no_router.bin")),
        Err(DecodeError::MissingRouter)
    );
    assert!(matches!(
        pb::decode(include_bytes!("data/pb_truncated.bin")),
        Err(DecodeError::Protobuf { .. })
    ));
}

#[test]
fn garbage_is_refused_by_every_decoder() {
    let garbage = include_bytes!("data/garbage_http.bin");
    // Bytes 6..10 ("HTTP") read as a length of 1.2 GB.
    let mut src = BytesMut::from(&garbage[..]);
    assert_eq!(
        frame::decode(&mut src),
        Err(FrameError::TooLarge {
            len: 0x4854_5450,
            max: MAX_PAYLOAD_LEN
        })
    );
    assert!(matches!(
        pb::decode(garbage),
        Err(DecodeError::Protobuf { .. })
    ));
    assert!(matches!(
        json::from_slice(garbage),
        Err(DecodeError::JsonSyntax { offset: 1, .. })
    ));
}

#[test]
fn json_errors_are_typed() {
    assert!(matches!(
        json::from_slice(include_bytes!("data/json_timestamp_string.json")),
        Err(DecodeError::JsonType {
            field: "header.timestamp",
            ..
        })
    ));
    let truncated = include_bytes!("data/json_truncated.json");
    assert!(matches!(
        json::from_slice(truncated),
        Err(DecodeError::JsonSyntax { offset, .. }) if offset == truncated.len()
    ));
}
