//! The QUIC form of a message: viaduct's protobuf `message.Message` (PROTOCOL.md B§3,
//! `proto/message.proto`), plus Causeway's extension fields for what viaduct drops.
//!
//! Two encodings exist. [`encode`] is Causeway's: viaduct's bytes for every field viaduct carries,
//! then `MessageHeader.MessageType` (field 5, KubeEdge's own schema field that its translator never
//! fills), `MessageHeader.resource_version` (field 100) and `MessageRouter.destination` (field 100)
//! when they are not empty, and `Message.content_kind` (field 100, [`ContentKind`]) when the
//! content is JSON. KubeEdge decoders skip fields they do not use, so a stock peer reads it as
//! viaduct's. [`encode_kubeedge`] is exactly viaduct's output, without those four fields. When
//! they are empty (bytes or nil content) the two are identical.
//!
//! The content kind is what lets the receiver give back the content the sender had, as a
//! WebSocket peer does from the JSON document: viaduct's protobuf content is bare bytes (a JSON
//! object as its JSON text, a string as its UTF-8), so without it an object sent over QUIC
//! would reach cloud applications as base64 bytes and over WebSocket as an object.
//!
//! Encoding writes straight from a borrowed [`Message`] (no intermediate protobuf struct, so no
//! string copies); the derived [`schema`] types define the format and decoding, and the tests check
//! that both agree. Both encoders always write fields 1 and 2, even empty: KubeEdge's decoder
//! crashes without them (B§3.4).

use std::borrow::Cow;

use bytes::{Buf, BufMut, Bytes};
use prost::Message as _;

use crate::error::DecodeError;
use crate::message::{Content, Header, Message, Route};

/// Causeway's protobuf form of `msg`: viaduct's, plus the extension fields when they are set.
pub fn encode(msg: &Message) -> Vec<u8> {
    let enc = Encoder::new(msg, Form::Causeway);
    let mut out = Vec::with_capacity(enc.len);
    enc.write(&mut out);
    out
}

/// [`encode`], appended to `dst`.
pub fn encode_to(msg: &Message, dst: &mut impl BufMut) {
    Encoder::new(msg, Form::Causeway).write(dst);
}

/// The length [`encode`] gives `msg`. It serialises non-string JSON content to measure it.
pub fn encoded_len(msg: &Message) -> usize {
    Encoder::new(msg, Form::Causeway).len
}

/// Exactly what viaduct's translator writes for `msg`: resource version, destination and type are
/// dropped. For tests against KubeEdge's vectors and for peers that must see viaduct's bytes.
pub fn encode_kubeedge(msg: &Message) -> Vec<u8> {
    let enc = Encoder::new(msg, Form::KubeEdge);
    let mut out = Vec::with_capacity(enc.len);
    enc.write(&mut out);
    out
}

/// Decodes a protobuf payload. Content comes back as [`Content::Bytes`] (B§1.5) unless the
/// sender marked its kind ([`ContentKind`]): JSON content is parsed back into the value it was
/// ([`DecodeError::ContentKind`] if it does not parse), string content into a JSON string.
/// Unmarked absent or empty content, which protobuf cannot tell apart from nil, is
/// [`Content::Json`]`(Null)`: Go's nil, printed `"content":null` by [`crate::json`]. A missing
/// header or router is an error, not an empty one: only a broken peer omits them.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    decode_buf(bytes)
}

/// [`decode`] from a [`Bytes`], whose content then shares the payload's memory instead of being
/// copied.
pub fn decode_bytes(bytes: Bytes) -> Result<Message, DecodeError> {
    decode_buf(bytes)
}

/// How the content bytes of a protobuf message are to be read: Causeway's extension field
/// `Message.content_kind` (number 100, varint; PROTOCOL.md Part A item 3). Written by [`encode`]
/// for JSON content only, so bytes and nil content keep viaduct's exact bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentKind {
    /// 0 (absent): bytes, as viaduct has them. Also what a decoder assumes for values it does not
    /// know, so that later kinds degrade to bytes.
    Bytes,
    /// 1: a JSON value other than a string; the bytes are its JSON text as Go writes it.
    Json,
    /// 2: a JSON string; the bytes are its UTF-8 (as viaduct writes a string), possibly none.
    String,
}

impl ContentKind {
    /// The kind [`encode`] marks `content` with.
    pub fn of(content: &Content) -> Self {
        match content {
            Content::Bytes(_) | Content::Json(serde_json::Value::Null) => Self::Bytes,
            Content::Json(serde_json::Value::String(_)) => Self::String,
            Content::Json(_) => Self::Json,
        }
    }

    /// The number on the wire.
    pub fn number(self) -> u64 {
        match self {
            Self::Bytes => 0,
            Self::Json => 1,
            Self::String => 2,
        }
    }

    /// The kind for a number read off the wire (unknown numbers read as bytes).
    pub fn from_number(n: u64) -> Self {
        match n {
            1 => Self::Json,
            2 => Self::String,
            _ => Self::Bytes,
        }
    }
}

fn decode_buf(buf: impl Buf) -> Result<Message, DecodeError> {
    let pb = schema::Message::decode(buf).map_err(|e| DecodeError::Protobuf {
        detail: e.to_string(),
    })?;
    Message::try_from(pb)
}

/// The protobuf schema as prost types, field for field `proto/message.proto`. They define what
/// [`decode`] accepts, and are a baseline for benchmarks ("a straight prost round trip").
pub mod schema {
    use bytes::Bytes;

    /// `message.Message`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Message {
        /// Field 1; required in practice (viaduct always writes it, and crashes without it).
        #[prost(message, optional, tag = "1")]
        pub header: Option<MessageHeader>,
        /// Field 2; required in practice, as the header.
        #[prost(message, optional, tag = "2")]
        pub router: Option<MessageRouter>,
        /// Field 3: the content as bytes; empty when the content is nil or empty.
        #[prost(bytes = "bytes", tag = "3")]
        pub content: Bytes,
        /// Field 100, Causeway extension: how to read the content ([`super::ContentKind`]).
        #[prost(uint64, tag = "100")]
        pub content_kind: u64,
    }

    /// `message.MessageHeader`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MessageHeader {
        /// Field 1, `ID`.
        #[prost(string, tag = "1")]
        pub id: String,
        /// Field 2, `ParentID`.
        #[prost(string, tag = "2")]
        pub parent_id: String,
        /// Field 3, `Timestamp`, milliseconds, zigzag-encoded.
        #[prost(sint64, tag = "3")]
        pub timestamp: i64,
        /// Field 4, `Sync`.
        #[prost(bool, tag = "4")]
        pub sync: bool,
        /// Field 5, `MessageType`: in KubeEdge's schema, never filled by its translator; Causeway
        /// fills it.
        #[prost(string, tag = "5")]
        pub message_type: String,
        /// Field 100, Causeway extension: the resource version.
        #[prost(string, tag = "100")]
        pub resource_version: String,
    }

    /// `message.MessageRouter`. Note that field 2 is the group and field 4 the resource.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MessageRouter {
        /// Field 1, `Source`.
        #[prost(string, tag = "1")]
        pub source: String,
        /// Field 2, `Group`.
        #[prost(string, tag = "2")]
        pub group: String,
        /// Field 3, `Operation`.
        #[prost(string, tag = "3")]
        pub operation: String,
        /// Field 4, `Resouce` (sic).
        #[prost(string, tag = "4")]
        pub resource: String,
        /// Field 100, Causeway extension: the destination module.
        #[prost(string, tag = "100")]
        pub destination: String,
    }

    impl From<&crate::Message> for Message {
        /// The Causeway form, as [`super::encode`] writes it.
        fn from(msg: &crate::Message) -> Self {
            let h = &msg.header;
            let r = &msg.route;
            Self {
                header: Some(MessageHeader {
                    id: h.id.clone(),
                    parent_id: h.parent_id.clone(),
                    timestamp: h.timestamp,
                    sync: h.sync,
                    message_type: h.message_type.clone(),
                    resource_version: h.resource_version.clone(),
                }),
                router: Some(MessageRouter {
                    source: r.source.clone(),
                    group: r.group.clone(),
                    operation: r.operation.clone(),
                    resource: r.resource.clone(),
                    destination: r.destination.clone(),
                }),
                content: Bytes::copy_from_slice(&msg.content.to_bytes()),
                content_kind: super::ContentKind::of(&msg.content).number(),
            }
        }
    }
}

impl TryFrom<schema::Message> for Message {
    type Error = DecodeError;

    fn try_from(pb: schema::Message) -> Result<Self, DecodeError> {
        let h = pb.header.ok_or(DecodeError::MissingHeader)?;
        let r = pb.router.ok_or(DecodeError::MissingRouter)?;
        Ok(Self {
            header: Header {
                id: h.id,
                parent_id: h.parent_id,
                timestamp: h.timestamp,
                resource_version: h.resource_version,
                sync: h.sync,
                message_type: h.message_type,
            },
            route: Route {
                source: r.source,
                destination: r.destination,
                group: r.group,
                operation: r.operation,
                resource: r.resource,
            },
            content: content_of(pb.content, ContentKind::from_number(pb.content_kind))?,
        })
    }
}

/// The content `bytes` of `kind` stand for.
fn content_of(bytes: Bytes, kind: ContentKind) -> Result<Content, DecodeError> {
    match kind {
        ContentKind::Bytes if bytes.is_empty() => Ok(Content::default()),
        ContentKind::Bytes => Ok(Content::Bytes(bytes)),
        ContentKind::String => match String::from_utf8(bytes.to_vec()) {
            Ok(text) => Ok(Content::text(text)),
            Err(e) => Err(DecodeError::ContentKind {
                detail: format!("string content is not UTF-8: {e}"),
            }),
        },
        // serde_json refuses trailing data, invalid UTF-8 and lone surrogates, as the WebSocket
        // decoder does; the nesting cap is the deepest content the WebSocket decoder accepts
        // inside a message, so whatever QUIC accepts, WebSocket carries too.
        ContentKind::Json if nesting(&bytes) > MAX_CONTENT_NESTING => {
            Err(DecodeError::ContentKind {
                detail: format!("JSON content nests deeper than {MAX_CONTENT_NESTING} levels"),
            })
        }
        ContentKind::Json => match serde_json::from_slice(&bytes) {
            Ok(value) => Ok(Content::Json(value)),
            Err(e) => Err(DecodeError::ContentKind {
                detail: format!("JSON content does not parse: {e}"),
            }),
        },
    }
}

/// Deepest nesting of JSON content: what the WebSocket decoder allows inside a message (its 128
/// levels less the two its message and content take; tested).
const MAX_CONTENT_NESTING: usize = 126;

/// The deepest nesting of arrays and objects in JSON text (strings skipped); malformed text is
/// left to the parser.
fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Which protobuf form to write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    /// viaduct's fields and Causeway's extension fields.
    Causeway,
    /// viaduct's fields only.
    KubeEdge,
}

/// Wire type of length-delimited fields (strings, bytes, sub-messages).
const LEN: u32 = 2;
/// Wire type of varint fields.
const VARINT: u32 = 0;
/// Field number of Causeway's extension fields in the header (resource version), the router
/// (destination) and the message (content kind).
const EXTENSION_TAG: u32 = 100;

/// One message measured for encoding: lengths are needed before the bytes (sub-messages are
/// length-prefixed), and measuring JSON content means serialising it, so both are done once.
pub(crate) struct Encoder<'a> {
    msg: &'a Message,
    form: Form,
    content: Cow<'a, [u8]>,
    /// The content kind to write (Causeway's form only; [`ContentKind::Bytes`] is not written).
    kind: ContentKind,
    header_len: usize,
    router_len: usize,
    /// Total encoded length.
    pub(crate) len: usize,
}

impl<'a> Encoder<'a> {
    /// Measures `msg` for Causeway's form.
    pub(crate) fn causeway(msg: &'a Message) -> Self {
        Self::new(msg, Form::Causeway)
    }

    fn new(msg: &'a Message, form: Form) -> Self {
        let ext = form == Form::Causeway;
        let h = &msg.header;
        let r = &msg.route;
        let mut header_len = bytes_len(1, &h.id)
            + bytes_len(2, &h.parent_id)
            + if h.timestamp == 0 {
                0
            } else {
                1 + varint_len(zigzag(h.timestamp))
            }
            + if h.sync { 2 } else { 0 };
        if ext {
            header_len +=
                bytes_len(5, &h.message_type) + bytes_len(EXTENSION_TAG, &h.resource_version);
        }
        let mut router_len = bytes_len(1, &r.source)
            + bytes_len(2, &r.group)
            + bytes_len(3, &r.operation)
            + bytes_len(4, &r.resource);
        if ext {
            router_len += bytes_len(EXTENSION_TAG, &r.destination);
        }
        let content = msg.content.to_bytes();
        let kind = if ext {
            ContentKind::of(&msg.content)
        } else {
            ContentKind::Bytes
        };
        let len = 1
            + varint_len(header_len as u64)
            + header_len
            + 1
            + varint_len(router_len as u64)
            + router_len
            + bytes_len(3, &content)
            + varint_field_len(EXTENSION_TAG, kind.number());
        Self {
            msg,
            form,
            content,
            kind,
            header_len,
            router_len,
            len,
        }
    }

    /// Writes exactly `self.len` bytes, fields in field-number order as protobuf encoders do.
    pub(crate) fn write(&self, dst: &mut impl BufMut) {
        let ext = self.form == Form::Causeway;
        let h = &self.msg.header;
        let r = &self.msg.route;
        put_key(dst, 1, LEN);
        put_varint(dst, self.header_len as u64);
        put_bytes(dst, 1, h.id.as_bytes());
        put_bytes(dst, 2, h.parent_id.as_bytes());
        if h.timestamp != 0 {
            put_key(dst, 3, VARINT);
            put_varint(dst, zigzag(h.timestamp));
        }
        if h.sync {
            put_key(dst, 4, VARINT);
            put_varint(dst, 1);
        }
        if ext {
            put_bytes(dst, 5, h.message_type.as_bytes());
            put_bytes(dst, EXTENSION_TAG, h.resource_version.as_bytes());
        }
        put_key(dst, 2, LEN);
        put_varint(dst, self.router_len as u64);
        put_bytes(dst, 1, r.source.as_bytes());
        put_bytes(dst, 2, r.group.as_bytes());
        put_bytes(dst, 3, r.operation.as_bytes());
        put_bytes(dst, 4, r.resource.as_bytes());
        if ext {
            put_bytes(dst, EXTENSION_TAG, r.destination.as_bytes());
        }
        put_bytes(dst, 3, &self.content);
        if self.kind != ContentKind::Bytes {
            put_key(dst, EXTENSION_TAG, VARINT);
            put_varint(dst, self.kind.number());
        }
    }
}

/// Length of a varint field; proto3 omits zero.
fn varint_field_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        varint_len(u64::from(tag << 3)) + varint_len(value)
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn varint_len(v: u64) -> usize {
    // 1 byte per 7 bits, at least 1.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Length of a non-empty length-delimited field; proto3 omits empty ones.
fn bytes_len(tag: u32, value: impl AsRef<[u8]>) -> usize {
    let len = value.as_ref().len();
    if len == 0 {
        0
    } else {
        varint_len(u64::from(tag << 3)) + varint_len(len as u64) + len
    }
}

fn put_varint(dst: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

fn put_key(dst: &mut impl BufMut, tag: u32, wire_type: u32) {
    put_varint(dst, u64::from(tag << 3 | wire_type));
}

fn put_bytes(dst: &mut impl BufMut, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        put_key(dst, tag, LEN);
        put_varint(dst, value.len() as u64);
        dst.put_slice(value);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    fn full_message() -> Message {
        let mut msg = Message::with_header("id-1", "parent-1", 1_767_225_600_134)
            .route(
                "edgecontroller",
                "resource",
                "default/configmap/cm1",
                "update",
            )
            .content(Content::text("with-rv"));
        msg.header.resource_version = "987654".into();
        msg.header.message_type = "unixpacket".into();
        msg.header.sync = true;
        msg.route.destination = "edged".into();
        msg
    }

    #[test]
    fn minimal_vector_from_protocol_md() {
        let msg = Message::with_header("a", "", 1)
            .route("s", "g", "r", "o")
            .content(Content::text("c"));
        let want = hex("0a 05 0a 01 61 18 02 12 0c 0a 01 73 12 01 67 1a 01 6f 22 01 72 1a 01 63");
        assert_eq!(encode_kubeedge(&msg), want);
        // Causeway's form adds the content kind: field 100 (key a0 06), 2 = string.
        let mut ours = want.clone();
        ours.extend(hex("a0 06 02"));
        assert_eq!(encode(&msg), ours);
        assert_eq!(decode(&ours).unwrap(), msg);
        // viaduct's form of the same message reads back as bytes, as in KubeEdge.
        assert_eq!(
            decode(&want).unwrap().content,
            Content::Bytes(Bytes::from_static(b"c"))
        );
    }

    #[test]
    fn hand_encoder_agrees_with_prost() {
        let mut messages = vec![
            Message::default(),
            full_message(),
            Message::with_header("", "", i64::MIN).content(json!({"a": [1, "<"]})),
            Message::with_header("x", "", i64::MAX).content(Bytes::from(vec![7; 300])),
            Message::with_header("x", "", -1).content(Content::text("")),
        ];
        let mut long = full_message();
        long.route.resource = "r".repeat(20_000);
        messages.push(long);
        for msg in &messages {
            let via_prost = schema::Message::from(msg).encode_to_vec();
            assert_eq!(encode(msg), via_prost, "{msg:?}");
            assert_eq!(encoded_len(msg), via_prost.len());
            let mut buf = bytes::BytesMut::new();
            encode_to(msg, &mut buf);
            assert_eq!(buf, via_prost);
        }
    }

    #[test]
    fn extension_fields_only_when_set() {
        let mut msg = full_message();
        let ours = encode(&msg);
        let theirs = encode_kubeedge(&msg);
        assert!(ours.len() > theirs.len());
        // A KubeEdge-style decoder (ours, ignoring the extension) sees the same message.
        let back = decode(&ours).unwrap();
        assert_eq!(back.header.resource_version, "987654");
        assert_eq!(back.header.message_type, "unixpacket");
        assert_eq!(back.route.destination, "edged");
        assert_eq!(back.content.as_text(), Some("with-rv"));
        let viaduct_view = decode(&theirs).unwrap();
        assert_eq!(viaduct_view.header.resource_version, "");
        msg.header.resource_version.clear();
        msg.header.message_type.clear();
        msg.route.destination.clear();
        assert_ne!(
            encode(&msg),
            encode_kubeedge(&msg),
            "string content is marked"
        );
        msg.content = Content::Bytes(Bytes::from_static(b"with-rv"));
        assert_eq!(encode(&msg), encode_kubeedge(&msg));
        msg.content = Content::default();
        assert_eq!(encode(&msg), encode_kubeedge(&msg));
    }

    #[test]
    fn content_kind_gives_back_the_content_sent() {
        for content in [
            Content::Json(json!({"n": 1, "s": "<x>", "a": [1.5, null, true]})),
            Content::Json(json!([])),
            Content::Json(json!(42)),
            Content::Json(json!(false)),
            Content::text("hello"),
            Content::text(""),
            Content::Bytes(Bytes::from_static(b"\x00\xffraw")),
            Content::default(),
        ] {
            let msg = Message::with_header("id", "", 1).content(content.clone());
            assert_eq!(
                decode(&encode(&msg)).unwrap().content,
                content,
                "{content:?}"
            );
            let mut framed = bytes::BytesMut::new();
            crate::frame::encode_message(&msg, &mut framed).unwrap();
            assert_eq!(framed.len(), 10 + encoded_len(&msg));
        }
    }

    #[test]
    fn json_content_round_trips_up_to_go_float64_rounding() {
        // Content {"n": 9007199254740993} marked JSON (kind 1), as a peer may send it: it comes
        // back rounded once, as over WebSocket, and is stable from then on (the fuzz target's
        // property).
        let mut payload = hex("0a 00 12 00");
        let text = br#"{"n":9007199254740993}"#;
        payload.extend([0x1a, text.len() as u8]);
        payload.extend_from_slice(text);
        payload.extend(hex("a0 06 01"));
        let msg = decode(&payload).unwrap();
        assert_eq!(
            msg.content,
            Content::Json(json!({"n": 9_007_199_254_740_993_u64}))
        );
        let encoded = encode(&msg);
        let back = decode(&encoded).unwrap();
        assert_eq!(
            back.content,
            Content::Json(json!({"n": 9_007_199_254_740_992_u64}))
        );
        assert_eq!(encode(&back), encoded);
    }

    #[test]
    fn json_content_nests_as_deep_as_websocket_allows() {
        let nested = |levels: usize| {
            let text = format!("{}\"x\"{}", "[".repeat(levels), "]".repeat(levels));
            let mut payload = hex("0a 00 12 00 1a");
            put_varint(&mut payload, text.len() as u64);
            payload.extend_from_slice(text.as_bytes());
            payload.extend(hex("a0 06 01"));
            decode(&payload)
        };
        let deepest = nested(MAX_CONTENT_NESTING).unwrap();
        // Its WebSocket form decodes too.
        let ws = crate::json::to_vec(&deepest);
        assert_eq!(crate::json::from_slice(&ws).unwrap(), deepest);
        assert!(matches!(
            nested(MAX_CONTENT_NESTING + 1),
            Err(DecodeError::ContentKind { .. })
        ));
        assert_eq!(nesting(br#"{"a":"[[[{","b":[1,{"c":[]}]}"#), 4);
    }

    #[test]
    fn content_not_matching_its_kind_is_refused() {
        // Header 0a 00, router 12 00, content "{", kind 1 (JSON).
        assert!(matches!(
            decode(&hex("0a 00 12 00 1a 01 7b a0 06 01")),
            Err(DecodeError::ContentKind { .. })
        ));
        // Content ff, kind 2 (string).
        assert!(matches!(
            decode(&hex("0a 00 12 00 1a 01 ff a0 06 02")),
            Err(DecodeError::ContentKind { .. })
        ));
        // An unknown kind reads as bytes.
        assert_eq!(
            decode(&hex("0a 00 12 00 1a 01 ff a0 06 07"))
                .unwrap()
                .content,
            Content::Bytes(Bytes::from_static(b"\xff"))
        );
    }

    #[test]
    fn decode_rejects_missing_sub_messages() {
        assert_eq!(decode(&[]), Err(DecodeError::MissingHeader));
        assert_eq!(decode(&hex("12 00")), Err(DecodeError::MissingHeader));
        assert_eq!(decode(&hex("0a 00")), Err(DecodeError::MissingRouter));
        assert_eq!(
            decode(&hex("0a 00 1a 01 63")),
            Err(DecodeError::MissingRouter)
        );
        let empty = decode(&hex("0a 00 12 00")).unwrap();
        assert_eq!(empty, Message::default());
    }

    #[test]
    fn decode_rejects_malformed_protobuf() {
        for bad in [
            "0a",                                              // key, then nothing
            "0a 05 0a 01",                                     // sub-message longer than the input
            "0a 00 12 00 1a ff ff ff ff ff ff ff ff ff ff 01", // varint of 11 bytes
            "0a 02 0a ff 12 00",                               // string longer than its sub-message
            "0a 03 0a 01 ff 12 00",                            // header id not UTF-8
            "08 01 0a 00 12 00",                               // header field with varint wire type
            "0f",                                              // wire type 7
        ] {
            assert!(
                matches!(decode(&hex(bad)), Err(DecodeError::Protobuf { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_skipped() {
        // Header 0a 00, router 12 00, then field 15 varint, field 16 bytes, field 9 fixed32.
        let msg = decode(&hex("0a 00 12 00 78 05 82 01 02 aa bb 4d 01 02 03 04")).unwrap();
        assert_eq!(msg, Message::default());
    }

    #[test]
    fn every_prefix_is_handled() {
        let bytes = encode(&full_message());
        // The content kind is last (2 key bytes, 1 value byte), after the content: 1 key byte,
        // 1 length byte, 7 bytes of "with-rv".
        let without_kind = bytes.len() - 3;
        let without_content = without_kind - 9;
        for cut in 0..bytes.len() {
            // Every strict prefix is malformed or lacks a part, except those that end just
            // before the content (no content) or before the kind (bytes); none panics.
            match decode(&bytes[..cut]) {
                Ok(msg) if cut == without_content => assert!(msg.content.is_empty()),
                Ok(msg) if cut == without_kind => {
                    assert_eq!(msg.content, Content::Bytes(Bytes::from_static(b"with-rv")));
                }
                Ok(msg) => panic!("cut {cut} decoded: {msg:?}"),
                Err(_) => assert!(cut != without_content && cut != without_kind, "cut {cut}"),
            }
        }
        assert_eq!(decode(&bytes).unwrap().header.id, "id-1");
    }

    #[test]
    fn decode_bytes_shares_content_memory() {
        let payload = Bytes::from(encode(
            &Message::default().content(Bytes::from(vec![9; 64])),
        ));
        let msg = decode_bytes(payload.clone()).unwrap();
        let Content::Bytes(content) = msg.content else {
            panic!("bytes expected")
        };
        let within = payload.as_ptr_range();
        assert!(within.contains(&content.as_ptr()));
    }

    #[test]
    fn varint_lengths() {
        for (v, n) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u64::MAX, 10),
        ] {
            assert_eq!(varint_len(v), n, "{v}");
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), n);
        }
    }
}
