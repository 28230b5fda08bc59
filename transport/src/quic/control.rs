//! The control stream of the Causeway QUIC profile: the first client-opened bidirectional stream,
//! without a `msg` prefix, carrying viaduct's `header` exchange (PROTOCOL.md B§5.2, vectors 14 and
//! 15) and Causeway's capability negotiation.
//!
//! ```text
//!  client                                               server
//!  header  resource=header op=header content={"Node_id":[..],"Project_id":[..]
//!                                             [,"Causeway_capabilities":[..]]}  ──►
//!                        ◄── ack  op=response parent=header.id content "ack" (vector 15 shape)
//!                        ◄── (only if the client sent Causeway_capabilities) header
//!                            resource=header op=header content={"Causeway_capabilities":[..]}
//! ```
//!
//! The ack stays byte-compatible with viaduct's (content `ack`); the server's accepted capabilities
//! follow in a second `header` message, sent only to clients that offered capabilities (and so
//! read it), so a viaduct-style client sees exactly KubeEdge's exchange.

use std::collections::BTreeMap;

use proto::{Content, Message};
use serde_json::Value;

use crate::Capabilities;

/// Key of the node id in the header map (Go-canonical; viaduct looks it up exactly).
pub(crate) const NODE_ID_KEY: &str = "Node_id";
/// Key of the project id.
pub(crate) const PROJECT_ID_KEY: &str = "Project_id";
/// Causeway's key for capability tokens; KubeEdge servers ignore unknown keys.
pub(crate) const CAPABILITIES_KEY: &str = "Causeway_capabilities";
/// Resource and operation of the header message.
pub(crate) const HEADER: &str = "header";
/// Content of a positive answer to the header (and to control operations).
pub(crate) const ACK: &str = "ack";

/// The client's header message: `Node_id`, `Project_id` and, when any is offered,
/// `Causeway_capabilities`, with Go's key order and escaping.
pub(crate) fn client_header(node_id: &str, project_id: &str, offered: Capabilities) -> Message {
    let mut map = serde_json::Map::new();
    map.insert(NODE_ID_KEY.to_owned(), Value::from(vec![node_id]));
    map.insert(PROJECT_ID_KEY.to_owned(), Value::from(vec![project_id]));
    if offered != Capabilities::NONE {
        map.insert(CAPABILITIES_KEY.to_owned(), Value::from(offered.tokens()));
    }
    header_message(map)
}

/// The server's capability answer (sent after the ack, only to clients that offered).
pub(crate) fn server_header(accepted: Capabilities) -> Message {
    let mut map = serde_json::Map::new();
    map.insert(CAPABILITIES_KEY.to_owned(), Value::from(accepted.tokens()));
    header_message(map)
}

fn header_message(map: serde_json::Map<String, Value>) -> Message {
    let content = proto::json::value_to_vec(&Value::Object(map));
    Message::new("")
        .route("", "", HEADER, HEADER)
        .content(Content::Bytes(content.into()))
}

/// One control-stream frame holding `msg` in viaduct's protobuf form, without Causeway's
/// extension fields: the control stream carries exactly viaduct's exchange (vectors 14 and 15).
pub(crate) fn frame(msg: &Message) -> bytes::Bytes {
    let mut frame = bytes::BytesMut::new();
    // Control messages are a few hundred bytes, far below the frame cap.
    let _ = proto::frame::encode(&proto::pb::encode_kubeedge(msg), &mut frame);
    frame.freeze()
}

/// viaduct's answer to a header or control message: `NewRespByMessage(msg, "ack")`.
pub(crate) fn ack_for(msg: &Message) -> Message {
    Message::response_to(msg, Content::text(ACK))
}

/// What a header message says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct HeaderMap {
    /// First `Node_id` value, if present and non-empty.
    pub(crate) node_id: Option<String>,
    /// First `Project_id` value (empty when absent).
    pub(crate) project_id: String,
    /// `Causeway_capabilities`, if the key is present at all.
    pub(crate) capabilities: Option<Capabilities>,
}

/// Parses a header message's content: a JSON object of string arrays (Go's `http.Header`).
pub(crate) fn parse_header(msg: &Message) -> Result<HeaderMap, String> {
    let bytes = msg.content.to_bytes();
    let map: BTreeMap<String, Vec<String>> = serde_json::from_slice(&bytes)
        .map_err(|e| format!("header content is not a JSON map of string arrays: {e}"))?;
    let first = |key: &str| map.get(key).and_then(|v| v.first()).cloned();
    Ok(HeaderMap {
        node_id: first(NODE_ID_KEY).filter(|s| !s.is_empty()),
        project_id: first(PROJECT_ID_KEY).unwrap_or_default(),
        capabilities: map
            .get(CAPABILITIES_KEY)
            .map(|tokens| Capabilities::from_tokens(tokens.iter().map(String::as_str))),
    })
}

/// Whether `msg` is the positive answer to the header `request` (viaduct's client ignores the
/// answer's content; we insist on the pairing and on `ack`, `nack` meaning refusal).
pub(crate) fn is_ack_of(msg: &Message, request: &Message) -> bool {
    msg.route.operation == proto::message::OP_RESPONSE
        && msg.header.parent_id == request.header.id
        && msg.content.as_text() == Some(ACK)
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    const VECTORS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/vectors/kepeer/"
    );

    fn vector(name: &str) -> Vec<u8> {
        std::fs::read(format!("{VECTORS}{name}")).unwrap()
    }

    fn decode_frame(bytes: &[u8]) -> Message {
        let mut buf = BytesMut::from(bytes);
        proto::frame::decode(&mut buf)
            .unwrap()
            .unwrap()
            .to_message()
            .unwrap()
    }

    #[test]
    fn client_header_matches_vector_14_except_id_and_time() {
        let golden = decode_frame(&vector("14_quic_ctrl_header.frame"));
        let mut ours = client_header(
            "edge-1",
            "e632aba927ea4ac2b575ec1603d56f10",
            Capabilities::NONE,
        );
        ours.header.id = golden.header.id.clone();
        ours.header.timestamp = golden.header.timestamp;
        assert_eq!(&frame(&ours)[..], &vector("14_quic_ctrl_header.frame")[..]);
    }

    #[test]
    fn ack_matches_vector_15_except_id_and_time() {
        let header = decode_frame(&vector("14_quic_ctrl_header.frame"));
        let golden = decode_frame(&vector("15_quic_ctrl_ack.frame"));
        let ours = Message::response_to_with(
            &header,
            Content::text(ACK),
            golden.header.id.clone(),
            golden.header.timestamp,
        );
        assert_eq!(&frame(&ours)[..], &vector("15_quic_ctrl_ack.frame")[..]);
        assert!(is_ack_of(&golden, &header));
        assert!(is_ack_of(&ack_for(&header), &header));
    }

    #[test]
    fn header_parses_with_and_without_capabilities() {
        let golden = decode_frame(&vector("14_quic_ctrl_header.frame"));
        let parsed = parse_header(&golden).unwrap();
        assert_eq!(parsed.node_id.as_deref(), Some("edge-1"));
        assert_eq!(parsed.project_id, "e632aba927ea4ac2b575ec1603d56f10");
        assert_eq!(parsed.capabilities, None);

        let ours = client_header("n1", "p", Capabilities::ALL);
        assert_eq!(
            ours.content.to_bytes().as_ref(),
            br#"{"Causeway_capabilities":["upstream-ack"],"Node_id":["n1"],"Project_id":["p"]}"#
        );
        let parsed = parse_header(&ours).unwrap();
        assert_eq!(parsed.capabilities, Some(Capabilities::ALL));
        assert_eq!(
            parse_header(&server_header(Capabilities::NONE))
                .unwrap()
                .capabilities,
            Some(Capabilities::NONE)
        );
    }

    #[test]
    fn malformed_header_content_is_an_error() {
        let bad = Message::new("").content(Content::text("{\"Node_id\":\"not-an-array\"}"));
        assert!(parse_header(&bad).is_err());
        let bad = Message::new("").content(Content::text("not json"));
        assert!(parse_header(&bad).is_err());
    }

    #[test]
    fn nack_is_not_an_ack() {
        let header = client_header("n", "p", Capabilities::NONE);
        let nack = Message::response_to(&header, Content::text("nack"));
        assert!(!is_ack_of(&nack, &header));
    }
}
