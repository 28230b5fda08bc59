//! The golden vectors in `conformance/vectors/` (written by KubeEdge's own Go code) against
//! `proto`'s codecs, byte for byte. One test walks both folders and reports every mismatch with the
//! file name and the first differing offset, then fails once; it also fails if it finds fewer or
//! more vectors than the folders hold, so it cannot pass by finding nothing.

use std::fs;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use proto::frame::{self, FrameDecoder};
use proto::{Content, json, pb};

/// Vectors in the top-level folder and in `kepeer/`.
const TOP_LEVEL_VECTORS: usize = 16;
const KEPEER_VECTORS: usize = 15;

/// How a folder's JSON files end: the top-level `.json` and `.decoded.json` files carry the
/// WebSocket payload's trailing newline; kepeer's carry none and its `.ws` files carry it.
#[derive(Clone, Copy)]
enum Folder {
    TopLevel,
    Kepeer,
}

#[test]
fn golden_vectors_match_byte_for_byte() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors");
    let mut failures = Vec::new();
    let top = check_folder(&root, Folder::TopLevel, &mut failures);
    let kepeer = check_folder(&root.join("kepeer"), Folder::Kepeer, &mut failures);
    if top != TOP_LEVEL_VECTORS {
        failures.push(format!(
            "{}: {top} vectors, expected {TOP_LEVEL_VECTORS}",
            root.display()
        ));
    }
    if kepeer != KEPEER_VECTORS {
        failures.push(format!(
            "kepeer: {kepeer} vectors, expected {KEPEER_VECTORS}"
        ));
    }
    check_captures(&root.join("kepeer"), &mut failures);
    assert!(
        failures.is_empty(),
        "{} golden vector failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Checks every vector (one per `.pb` file) of `dir` and returns how many there were.
fn check_folder(dir: &Path, folder: Folder, failures: &mut Vec<String>) -> usize {
    let mut names: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pb"))
            .map(|p| p.with_extension(""))
            .collect(),
        Err(e) => {
            failures.push(format!("{}: {e}", dir.display()));
            return 0;
        }
    };
    names.sort();
    for name in &names {
        if let Err(e) = check_vector(name, folder, failures) {
            failures.push(e);
        }
    }
    names.len()
}

/// All checks of one vector. `Err` when a file is missing or does not decode at all; byte
/// mismatches are pushed to `failures` so that every one is reported.
fn check_vector(name: &Path, folder: Folder, failures: &mut Vec<String>) -> Result<(), String> {
    let file = |ext: &str| -> Result<(PathBuf, Vec<u8>), String> {
        let path = PathBuf::from(format!("{}.{ext}", name.display()));
        let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((path, bytes))
    };
    let (json_path, json_bytes) = file("json")?;
    let (pb_path, pb_bytes) = file("pb")?;
    let (frame_path, frame_bytes) = file("frame")?;
    let (decoded_path, decoded_bytes) = file("decoded.json")?;
    let (fromjson_path, fromjson_bytes) = file("fromjson.frame")?;
    // JSON: decode and re-encode to the same bytes (the WebSocket form).
    let msg = json::from_slice(&json_bytes).map_err(|e| format!("{}: {e}", json_path.display()))?;
    match folder {
        Folder::TopLevel => {
            same(
                failures,
                &json_path,
                "json::to_ws_text",
                json::to_ws_text(&msg).as_bytes(),
                &json_bytes,
            );
        }
        Folder::Kepeer => {
            same(
                failures,
                &json_path,
                "json::to_vec",
                &json::to_vec(&msg),
                &json_bytes,
            );
            let (ws_path, ws_bytes) = file("ws")?;
            same(
                failures,
                &ws_path,
                "json::to_ws_text",
                json::to_ws_text(&msg).as_bytes(),
                &ws_bytes,
            );
            match json::from_slice(&ws_bytes) {
                Ok(from_ws) if from_ws == msg => {}
                other => failures.push(format!("{}: decodes to {other:?}", ws_path.display())),
            }
        }
    }

    // Protobuf: what KubeEdge writes decodes and re-encodes to the same bytes.
    let from_pb = pb::decode(&pb_bytes).map_err(|e| format!("{}: {e}", pb_path.display()))?;
    same(
        failures,
        &pb_path,
        "pb::encode_kubeedge(pb::decode)",
        &pb::encode_kubeedge(&from_pb),
        &pb_bytes,
    );
    // What KubeEdge holds after decoding it, marshalled to JSON.
    let mut decoded_json = json::to_vec(&from_pb);
    if let Folder::TopLevel = folder {
        decoded_json.push(b'\n');
    }
    same(
        failures,
        &decoded_path,
        "json::to_vec(pb::decode)",
        &decoded_json,
        &decoded_bytes,
    );

    // Frame = header + protobuf, both ways.
    let mut framed = BytesMut::new();
    frame::encode(&pb_bytes, &mut framed).map_err(|e| e.to_string())?;
    same(
        failures,
        &frame_path,
        "frame::encode",
        &framed,
        &frame_bytes,
    );
    let mut src = BytesMut::from(&frame_bytes[..]);
    match FrameDecoder::default().decode(&mut src) {
        Ok(Some(f)) if f.payload[..] == pb_bytes[..] && src.is_empty() => {}
        other => failures.push(format!(
            "{}: frame::decode gave {other:?}",
            frame_path.display()
        )),
    }

    // JSON relayed onto QUIC, as KubeEdge does: string content as its bytes, other JSON
    // re-marshalled. Where the vector's content was Go bytes (base64 in JSON), the relayed frame
    // differs from NAME.frame, as in KubeEdge.
    let mut relayed = BytesMut::new();
    frame::encode(&pb::encode_kubeedge(&msg), &mut relayed).map_err(|e| e.to_string())?;
    same(
        failures,
        &fromjson_path,
        "frame of pb::encode_kubeedge(json)",
        &relayed,
        &fromjson_bytes,
    );
    if frame_bytes == fromjson_bytes {
        same(
            failures,
            &pb_path,
            "pb::encode_kubeedge(json::from_slice)",
            &pb::encode_kubeedge(&msg),
            &pb_bytes,
        );
    }

    // Causeway's form carries what viaduct drops, and is viaduct's when there is nothing to carry.
    // With its content kind, the content comes back as the JSON decoder gave it.
    let ours = pb::encode(&msg);
    match pb::decode(&ours) {
        Ok(back) if back.header == msg.header && back.route == msg.route => {
            if back.content != msg.content {
                failures.push(format!(
                    "{}: content {:?} came back through pb::encode as {:?}",
                    json_path.display(),
                    msg.content,
                    back.content
                ));
            }
        }
        other => failures.push(format!(
            "{}: pb::encode does not round-trip: {other:?}",
            json_path.display()
        )),
    }
    let carries_extensions = !msg.header.resource_version.is_empty()
        || !msg.header.message_type.is_empty()
        || !msg.route.destination.is_empty();
    // JSON content adds only its kind (field 100, varint) after viaduct's bytes.
    let kind = pb::ContentKind::of(&msg.content);
    if !carries_extensions {
        let mut expected = pb::encode_kubeedge(&msg);
        if kind != pb::ContentKind::Bytes {
            expected.extend([0xa0, 0x06, kind.number() as u8]);
        }
        same(
            failures,
            &json_path,
            "pb::encode == pb::encode_kubeedge + content kind",
            &ours,
            &expected,
        );
    }
    let mut ours_framed = BytesMut::new();
    frame::encode_message(&msg, &mut ours_framed).map_err(|e| e.to_string())?;
    if !carries_extensions && kind == pb::ContentKind::Bytes {
        same(
            failures,
            &fromjson_path,
            "frame::encode_message",
            &ours_framed,
            &fromjson_bytes,
        );
    }
    Ok(())
}

/// The live captures: the QUIC control stream is one frame holding the `header` message; the first
/// data stream is `msg` then the keepalive frame.
fn check_captures(dir: &Path, failures: &mut Vec<String>) {
    let control_path = dir.join("capture_quic_control_stream.bin");
    match fs::read(&control_path) {
        Ok(bytes) => {
            let mut src = BytesMut::from(&bytes[..]);
            match FrameDecoder::default().decode_message(&mut src) {
                Ok(Some(msg))
                    if src.is_empty()
                        && msg.route.operation == "header"
                        && msg.route.resource == "header"
                        && is_header_map(&msg.content) => {}
                other => failures.push(format!("{}: {other:?}", control_path.display())),
            }
        }
        Err(e) => failures.push(format!("{}: {e}", control_path.display())),
    }
    let data_path = dir.join("capture_quic_first_data_stream.bin");
    match fs::read(&data_path) {
        Ok(bytes) => {
            let Some(rest) = bytes.strip_prefix(&frame::MESSAGE_STREAM_PREFIX[..]) else {
                failures.push(format!("{}: no \"msg\" prefix", data_path.display()));
                return;
            };
            let mut src = BytesMut::from(rest);
            match FrameDecoder::default().decode_message(&mut src) {
                Ok(Some(msg))
                    if src.is_empty()
                        && msg.route.operation == proto::message::OP_KEEPALIVE
                        && msg.route.source == "websocket"
                        && msg.route.resource == "node"
                        && msg.content.as_text() == Some("ping") => {}
                other => failures.push(format!("{}: {other:?}", data_path.display())),
            }
        }
        Err(e) => failures.push(format!("{}: {e}", data_path.display())),
    }
}

/// Whether `content` is the JSON of an `http.Header` with the node and project ids.
fn is_header_map(content: &Content) -> bool {
    serde_json::from_slice::<serde_json::Value>(&content.to_bytes())
        .is_ok_and(|v| v["Node_id"][0].is_string() && v["Project_id"][0].is_string())
}

/// Records a failure naming `path`, `what` was compared and the first differing offset, unless
/// `got` equals `want`.
fn same(failures: &mut Vec<String>, path: &Path, what: &str, got: &[u8], want: &[u8]) {
    if let Some(offset) = first_difference(got, want) {
        failures.push(format!(
            "{}: {what}: first difference at byte {offset} (got {} bytes, want {})",
            path.display(),
            got.len(),
            want.len()
        ));
    }
}

/// The first offset where `got` and `want` differ, or `None` if they are equal.
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    if got == want {
        return None;
    }
    Some(
        got.iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len())),
    )
}
