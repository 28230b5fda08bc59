//! The message model shared by every layer: a [`Header`], a [`Route`] and a [`Content`], exactly the
//! fields of KubeEdge's beehive `model.Message` (PROTOCOL.md B§1), plus the constructors KubeEdge's
//! helpers provide. Wire forms live in [`crate::json`] (WebSocket) and [`crate::pb`] (QUIC).

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Operation of a response: the reply to a request, and the ACK of a message that needs one
/// (its parent id is the id of the message it answers).
pub const OP_RESPONSE: &str = "response";
/// Operation of an error reply (KubeEdge's `NewErrorMessage`).
pub const OP_ERROR: &str = "error";
/// Operation of the edge's keepalive; the cloud treats any message with it as a keepalive.
pub const OP_KEEPALIVE: &str = "keepalive";
/// Group of Causeway's own link-level messages (never routed to modules).
pub const GROUP_CAUSEWAY: &str = "causeway";
/// Operation of the cloud's acknowledgement of an upstream message (parent id = the acked id); sent
/// only to edges that negotiated the `upstream-ack` capability.
pub const OP_ACK: &str = "ack";
/// KubeEdge's transport-level control operations: answered with `ack` by the transport on both
/// ends and never delivered to modules or applications (PROTOCOL.md B§4.4).
pub const CONTROL_OPERATIONS: [&str; 3] = ["ping", "pong", "config"];

/// How a Causeway cloud treats a message an edge sends it (PROTOCOL.md Part A item 7). It decides
/// how long the edge's outbox keeps the message: only [`UpstreamClass::Data`] is ever
/// acknowledged, so only it may wait in the outbox for an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamClass {
    /// Operation `keepalive`: liveness only; never stored, never acknowledged.
    Keepalive,
    /// Operation `response` with a parent id: the answer (the ACK) to a downstream message. The
    /// cloud consumes it as that message's ACK and does not acknowledge it in turn; a lost answer
    /// is repaired by the cloud's resend of the downstream message, which the edge answers again.
    Answer,
    /// One of [`CONTROL_OPERATIONS`]: answered `ack` by the cloud's transport, never delivered,
    /// never acknowledged.
    Control,
    /// Everything else: delivered to cloud applications once per id and acknowledged with
    /// `causeway`/`ack` once durably accepted.
    Data,
}

/// One message on the bus or on the wire.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    /// Identity, correlation and timing.
    pub header: Header,
    /// Where the message comes from and goes to, and what it does.
    pub route: Route,
    /// The payload.
    pub content: Content,
}

/// KubeEdge's `MessageHeader`. JSON keys in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// Message id (`msg_id`): a lowercase UUID v4 for messages we create; any string from a peer.
    pub id: String,
    /// Id of the message this one answers (`parent_msg_id`); empty when it answers none.
    pub parent_id: String,
    /// Creation time in milliseconds since the Unix epoch (`timestamp`).
    pub timestamp: i64,
    /// Kubernetes resource version of the object in the content (`resourceversion`).
    pub resource_version: String,
    /// Whether the sender waits for a response (`sync`).
    pub sync: bool,
    /// Context type used to route responses (`type`): empty or `channel`, or `unixpacket`.
    pub message_type: String,
}

/// KubeEdge's `MessageRoute` (JSON key `route`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    /// Sending module (`source`).
    pub source: String,
    /// Rarely used destination module (`destination`).
    pub destination: String,
    /// Destination module group (`group`).
    pub group: String,
    /// Verb (`operation`).
    pub operation: String,
    /// Slash-separated resource path (`resource`).
    pub resource: String,
}

/// The payload. KubeEdge's content is a Go `interface{}`: what it holds depends on the transport
/// it arrived on (PROTOCOL.md B§1.5), so both shapes are kept.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// Raw bytes: what protobuf (QUIC) always decodes to; base64 in JSON.
    Bytes(Bytes),
    /// A JSON value: what JSON (WebSocket) decodes to. `Json(Null)` is Go's nil content.
    Json(serde_json::Value),
}

impl Default for Content {
    fn default() -> Self {
        Self::Json(serde_json::Value::Null)
    }
}

impl Content {
    /// A JSON string, the usual content of control messages (`"ping"`, `"OK"`, `"ack"`).
    pub fn text(s: impl Into<String>) -> Self {
        Self::Json(serde_json::Value::String(s.into()))
    }

    /// Whether this is Go's nil content or empty bytes (protobuf cannot tell the two apart).
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Bytes(b) => b.is_empty(),
            Self::Json(v) => v.is_null(),
        }
    }

    /// The content as bytes, as KubeEdge's `GetContentData` gives it: bytes unchanged, a JSON
    /// string as its UTF-8 bytes, nil as nothing, any other value as its compact JSON.
    pub fn to_bytes(&self) -> Cow<'_, [u8]> {
        match self {
            Self::Bytes(b) => Cow::Borrowed(b),
            Self::Json(serde_json::Value::String(s)) => Cow::Borrowed(s.as_bytes()),
            Self::Json(serde_json::Value::Null) => Cow::Borrowed(&[]),
            Self::Json(v) => Cow::Owned(crate::json::value_to_vec(v)),
        }
    }

    /// The content as text when it is a JSON string or valid UTF-8 bytes; how a receiver compares
    /// content such as `"OK"` whatever transport it arrived on.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Self::Bytes(b) => std::str::from_utf8(b).ok(),
            Self::Json(serde_json::Value::String(s)) => Some(s),
            Self::Json(_) => None,
        }
    }
}

impl From<Bytes> for Content {
    fn from(b: Bytes) -> Self {
        Self::Bytes(b)
    }
}

impl From<serde_json::Value> for Content {
    fn from(v: serde_json::Value) -> Self {
        Self::Json(v)
    }
}

impl Message {
    /// KubeEdge's `NewMessage(parent)`: a fresh UUID v4 id and the current time; route and content
    /// empty. Use [`Message::with_header`] where the id and clock are injected (tests, state machines).
    pub fn new(parent_id: impl Into<String>) -> Self {
        Self::with_header(new_id(), parent_id, now_millis())
    }

    /// KubeEdge's `BuildHeader(id, parent, timestamp)` on an otherwise empty message.
    pub fn with_header(
        id: impl Into<String>,
        parent_id: impl Into<String>,
        timestamp_ms: i64,
    ) -> Self {
        Self {
            header: Header {
                id: id.into(),
                parent_id: parent_id.into(),
                timestamp: timestamp_ms,
                ..Header::default()
            },
            ..Self::default()
        }
    }

    /// KubeEdge's `BuildRouter(source, group, resource, operation)`; note the argument order.
    pub fn route(
        mut self,
        source: impl Into<String>,
        group: impl Into<String>,
        resource: impl Into<String>,
        operation: impl Into<String>,
    ) -> Self {
        self.route.source = source.into();
        self.route.group = group.into();
        self.route.resource = resource.into();
        self.route.operation = operation.into();
        self
    }

    /// KubeEdge's `FillBody`.
    pub fn content(mut self, content: impl Into<Content>) -> Self {
        self.content = content.into();
        self
    }

    /// KubeEdge's `NewRespByMessage(req, content)`: new id and time, parent id = the request's id,
    /// the request's source, group, resource and type kept, operation `response`.
    pub fn response_to(req: &Self, content: impl Into<Content>) -> Self {
        Self::response_to_with(req, content, new_id(), now_millis())
    }

    /// [`Message::response_to`] with the id and time injected.
    pub fn response_to_with(
        req: &Self,
        content: impl Into<Content>,
        id: impl Into<String>,
        timestamp_ms: i64,
    ) -> Self {
        let mut resp = Self::with_header(id, req.header.id.clone(), timestamp_ms)
            .route(
                req.route.source.clone(),
                req.route.group.clone(),
                req.route.resource.clone(),
                OP_RESPONSE,
            )
            .content(content);
        resp.header.message_type = req.header.message_type.clone();
        resp
    }

    /// KubeEdge's `NewErrorMessage(req, text)`: new id and time, parent id = the request's id, the
    /// request's resource, operation `error`, the text as content, source and group empty.
    pub fn error_for(req: &Self, text: impl Into<String>) -> Self {
        Self::with_header(new_id(), req.header.id.clone(), now_millis())
            .route("", "", req.route.resource.clone(), OP_ERROR)
            .content(Content::text(text))
    }

    /// Whether this answers another message (KubeEdge's only test: a non-empty parent id).
    pub fn is_response(&self) -> bool {
        !self.header.parent_id.is_empty()
    }

    /// How a Causeway cloud treats this message when an edge sends it ([`UpstreamClass`]).
    pub fn upstream_class(&self) -> UpstreamClass {
        let operation = self.route.operation.as_str();
        if operation == OP_KEEPALIVE {
            UpstreamClass::Keepalive
        } else if operation == OP_RESPONSE && self.is_response() {
            UpstreamClass::Answer
        } else if CONTROL_OPERATIONS.contains(&operation) {
            UpstreamClass::Control
        } else {
            UpstreamClass::Data
        }
    }
}

/// A fresh message id: a lowercase hyphenated UUID v4, as Go's `uuid.New().String()`.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Milliseconds since the Unix epoch, as KubeEdge stamps messages.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_keeps_request_route_and_sets_parent() {
        let req = Message::with_header("req-1", "", 5)
            .route("edgecontroller", "resource", "default/pod/nginx", "update")
            .content(Content::text("x"));
        let resp = Message::response_to_with(&req, Content::text("OK"), "resp-1", 6);
        assert_eq!(resp.header.parent_id, "req-1");
        assert_eq!(resp.route.operation, OP_RESPONSE);
        assert_eq!(resp.route.source, "edgecontroller");
        assert_eq!(resp.route.group, "resource");
        assert_eq!(resp.route.resource, "default/pod/nginx");
        assert!(resp.is_response());
    }

    #[test]
    fn upstream_class_follows_part_a_item_7() {
        let msg = |op: &str, parent: &str| Message::new(parent).route("m", "resource", "r", op);
        assert_eq!(
            msg("keepalive", "").upstream_class(),
            UpstreamClass::Keepalive
        );
        assert_eq!(msg("response", "p").upstream_class(), UpstreamClass::Answer);
        // A response to nothing and an error reply are ordinary data.
        assert_eq!(msg("response", "").upstream_class(), UpstreamClass::Data);
        assert_eq!(msg("error", "p").upstream_class(), UpstreamClass::Data);
        for op in CONTROL_OPERATIONS {
            assert_eq!(msg(op, "").upstream_class(), UpstreamClass::Control);
        }
        assert_eq!(msg("update", "").upstream_class(), UpstreamClass::Data);
    }

    #[test]
    fn content_bytes_follow_get_content_data() {
        assert_eq!(&*Content::text("OK").to_bytes(), b"OK");
        assert_eq!(
            &*Content::Bytes(Bytes::from_static(b"\x00\x01")).to_bytes(),
            b"\x00\x01"
        );
        assert!(Content::default().to_bytes().is_empty());
        assert!(Content::default().is_empty());
    }

    #[test]
    fn new_ids_are_uuid_v4_lowercase() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id, id.to_lowercase());
        assert_ne!(id, new_id());
    }
}
