//! The protobuf decoder on arbitrary payloads. It must never panic, and whatever it accepts must
//! survive a round trip: decode -> encode -> decode gives the same message (JSON content up to
//! Go's float64 rounding of its numbers), the re-encoding is stable, and the message also
//! survives the JSON form (header and route intact).

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use proto::{json, pb};

fuzz_target!(|data: &[u8]| {
    let decoded = pb::decode(data);
    assert_eq!(decoded, pb::decode_bytes(Bytes::copy_from_slice(data)));
    let Ok(msg) = decoded else {
        return;
    };
    let encoded = pb::encode(&msg);
    assert_eq!(encoded.len(), pb::encoded_len(&msg));
    let back = pb::decode(&encoded).expect("our own encoding decodes");
    let kind = pb::ContentKind::of(&msg.content);
    if kind == pb::ContentKind::Json {
        // JSON content (content kind 1) is written as Go writes it, numbers as float64, so an
        // integer beyond 2^53 comes back rounded, as over WebSocket; the rest is unchanged.
        assert_eq!(back.header, msg.header);
        assert_eq!(back.route, msg.route);
        assert_eq!(pb::ContentKind::of(&back.content), kind);
    } else {
        assert_eq!(back, msg);
    }
    assert_eq!(pb::encode(&back), encoded);
    if msg.header.resource_version.is_empty()
        && msg.header.message_type.is_empty()
        && msg.route.destination.is_empty()
        && kind == pb::ContentKind::Bytes
    {
        assert_eq!(pb::encode_kubeedge(&msg), encoded);
    }

    let text = json::to_vec(&msg);
    let via_json = json::from_slice(&text).expect("our own JSON decodes");
    assert_eq!(via_json.header, msg.header);
    assert_eq!(via_json.route, msg.route);
    assert_eq!(json::to_vec(&via_json), text);
});
