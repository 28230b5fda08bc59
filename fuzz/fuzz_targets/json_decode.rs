//! The JSON decoder on arbitrary WebSocket payloads. It must never panic, and whatever it accepts
//! must survive a round trip: decode -> encode -> decode gives the same header and route and the
//! same bytes again (content numbers are compared through their Go rendering, since an exact
//! integer and its float64 rounding render alike), and the message survives the protobuf form.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::{json, pb};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = json::from_slice(data) else {
        return;
    };
    let text = json::to_vec(&msg);
    let back = json::from_slice(&text).expect("our own JSON decodes");
    assert_eq!(back.header, msg.header);
    assert_eq!(back.route, msg.route);
    assert_eq!(json::to_vec(&back), text);
    let ws = json::to_ws_text(&msg);
    assert_eq!(
        json::from_slice(ws.as_bytes()).map(|m| json::to_vec(&m)),
        Ok(text)
    );

    let via_pb = pb::decode(&pb::encode(&msg)).expect("our own protobuf decodes");
    assert_eq!(via_pb.header, msg.header);
    assert_eq!(via_pb.route, msg.route);
    assert_eq!(via_pb.content.to_bytes(), msg.content.to_bytes());
});
