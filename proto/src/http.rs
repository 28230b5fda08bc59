//! KubeEdge's servicebus contents (`common/types/http.go`, MODULES.md §4.1): the cloud asks an
//! edge to call an HTTP service on that node with an [`HttpRequest`] (op = the HTTP method,
//! source `router_servicebus`, group `user`, resource `<port>:<path>`), and the edge answers with
//! an [`HttpResponse`] in a message of op `upload` whose parent id is the request's id.
//!
//! Pure data and message shapes, shared by the edge module (`modules/servicebus`, which makes the
//! call) and the cloud API (which sends the request and waits for the answer). Bodies are Go byte
//! slices, so base64 in JSON.
//!
//! Unlike KubeEdge (MODULES.md M7), an error the edge reports is an [`HttpResponse`] in the same
//! `upload` reply as a success: a status, `Server: causeway-edgecore`, and a JSON body in the
//! cloud API's error shape `{"error": "<what happened>", "code": "<stable code>"}`.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::message::{Content, Message};

/// Source of a cloud request meant for servicebus (KubeEdge's router).
pub const SOURCE_ROUTER_SERVICEBUS: &str = "router_servicebus";
/// Source of servicebus's replies.
pub const SOURCE_SERVICEBUS: &str = "servicebus";
/// Route group of servicebus requests and replies.
pub const GROUP_USER: &str = "user";
/// Operation of servicebus's replies (KubeEdge's `upload`).
pub const OP_UPLOAD: &str = "upload";
/// `Server` header of the answers the edge makes up itself (errors), so a caller can tell them
/// from the service's own.
pub const EDGE_SERVER: &str = "causeway-edgecore";

/// Go's `http.Header`: canonical names to values, in key order as Go's encoder writes them.
pub type HeaderValues = BTreeMap<String, Vec<String>>;

/// KubeEdge's `HTTPRequest`: what the cloud asks the edge to send.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpRequest {
    /// Request headers.
    #[serde(default, deserialize_with = "null_as_default")]
    pub header: HeaderValues,
    /// Request body (base64 in JSON).
    #[serde(default, with = "go_bytes")]
    pub body: Vec<u8>,
    /// The method; the message's operation says it too, and wins.
    #[serde(default, deserialize_with = "null_as_default")]
    pub method: String,
    /// Unused by KubeEdge (empty); kept for the form.
    #[serde(default, deserialize_with = "null_as_default")]
    pub url: String,
}

/// KubeEdge's `HTTPResponse`: what the service (or the edge, for an error) answered.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpResponse {
    /// Response headers.
    #[serde(default, deserialize_with = "null_as_default")]
    pub header: HeaderValues,
    /// The status code.
    pub status_code: u16,
    /// Response body (base64 in JSON).
    #[serde(default, with = "go_bytes")]
    pub body: Vec<u8>,
}

/// Where a servicebus request goes on the edge: the resource `<port>:<path>` read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTarget {
    /// The service's port.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

/// Why a servicebus request or reply could not be read. The sender's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpContentError {
    /// The resource is not `<port>:<path>` with a port 1–65535 and a path starting with `/`.
    #[error("resource {0:?} is not <port>:<path> (a port 1-65535, a path starting with /)")]
    BadResource(String),
    /// The content is not the JSON form of the expected struct.
    #[error("content is not a {what}: {why}")]
    BadContent {
        /// `HTTPRequest` or `HTTPResponse`.
        what: &'static str,
        /// The decoder's complaint.
        why: String,
    },
}

impl ServiceTarget {
    /// Reads `<port>:<path>` (what the edge receives after CloudHub trimmed `node/<id>/`). The
    /// port is everything before the first `:`, so a path may itself contain `:`, which
    /// KubeEdge refuses.
    pub fn parse(resource: &str) -> Result<Self, HttpContentError> {
        let bad = || HttpContentError::BadResource(resource.to_owned());
        let (port, path) = resource.split_once(':').ok_or_else(bad)?;
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        let path = if path.is_empty() { "/" } else { path };
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad());
        }
        Ok(Self {
            port,
            path: path.to_owned(),
        })
    }

    /// The resource string of this target, `<port>:<path>`.
    pub fn resource(&self) -> String {
        format!("{}:{}", self.port, self.path)
    }
}

impl HttpRequest {
    /// The request a message carries: JSON content as WebSocket (and QUIC's JSON content kind)
    /// gives it, or bytes / a string holding that JSON.
    pub fn from_content(content: &Content) -> Result<Self, HttpContentError> {
        from_content(content, "HTTPRequest")
    }

    /// The message asking a node's servicebus to send this request to `target`: op = the
    /// method, resource `<port>:<path>` (the wire form; a cloud module addressing CloudHub
    /// prefixes `node/<id>/`), with the given id and timestamp.
    pub fn into_message(self, target: &ServiceTarget, id: String, timestamp_ms: i64) -> Message {
        let method = self.method.clone();
        Message::with_header(id, "", timestamp_ms)
            .route(
                SOURCE_ROUTER_SERVICEBUS,
                GROUP_USER,
                target.resource(),
                method,
            )
            .content(Content::Json(to_json(&self)))
    }
}

impl HttpResponse {
    /// The response a reply carries (see [`HttpRequest::from_content`]).
    pub fn from_content(content: &Content) -> Result<Self, HttpContentError> {
        from_content(content, "HTTPResponse")
    }

    /// An answer the edge makes up itself: `status`, `Server: causeway-edgecore`, and the JSON
    /// body `{"error": message, "code": code}`.
    pub fn edge_error(status: u16, code: &str, message: impl std::fmt::Display) -> Self {
        let body = serde_json::json!({ "error": message.to_string(), "code": code });
        let mut header = HeaderValues::new();
        header.insert("Content-Type".into(), vec!["application/json".into()]);
        header.insert("Server".into(), vec![EDGE_SERVER.into()]);
        Self {
            header,
            status_code: status,
            body: body.to_string().into_bytes(),
        }
    }

    /// Whether the edge made this answer up (an error of the call, not the service's answer).
    pub fn is_edge_error(&self) -> bool {
        self.header
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("server") && v.iter().any(|s| s == EDGE_SERVER))
    }

    /// The reply to `request`: op `upload`, parent id = the request's id, source `servicebus`,
    /// group `user`, resource empty (KubeEdge's form), with the given id and timestamp.
    pub fn into_reply(self, request: &Message, id: String, timestamp_ms: i64) -> Message {
        Message::with_header(id, request.header.id.clone(), timestamp_ms)
            .route(SOURCE_SERVICEBUS, GROUP_USER, "", OP_UPLOAD)
            .content(Content::Json(to_json(&self)))
    }
}

/// Whether `msg` is a servicebus reply (op `upload`, group `user`, with a parent id): what the
/// cloud hands to the caller waiting on that parent id.
pub fn is_reply(msg: &Message) -> bool {
    msg.route.operation == OP_UPLOAD && msg.route.group == GROUP_USER && msg.is_response()
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones a hop sets itself: never forwarded.
pub fn is_hop_by_hop(name: &str) -> bool {
    const HOP: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) || name.eq_ignore_ascii_case("host")
}

/// Go's `CanonicalMIMEHeaderKey`: the first letter and each letter after `-` upper case, the
/// rest lower case (`content-type` → `Content-Type`), as `http.Header` keys are written.
pub fn canonical_header_name(name: &str) -> String {
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

fn from_content<T: for<'de> Deserialize<'de>>(
    content: &Content,
    what: &'static str,
) -> Result<T, HttpContentError> {
    let bad = |e: serde_json::Error| HttpContentError::BadContent {
        what,
        why: e.to_string(),
    };
    match content {
        Content::Json(serde_json::Value::String(text)) => serde_json::from_str(text).map_err(bad),
        Content::Json(value) => T::deserialize(value).map_err(bad),
        Content::Bytes(bytes) => serde_json::from_slice(bytes).map_err(bad),
    }
}

fn to_json<T: Serialize>(value: &T) -> serde_json::Value {
    // Maps of strings, numbers and strings: serialising cannot fail.
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Go's `[]byte` in JSON: base64 (standard, padded) or `null`; written `null` when empty, as Go
/// writes a nil slice.
mod go_bytes {
    use super::*;

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if bytes.is_empty() {
            s.serialize_none()
        } else {
            s.serialize_str(&STANDARD.encode(bytes))
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(Vec::new()),
            Some(text) => STANDARD
                .decode(text.as_bytes())
                .map_err(|e| serde::de::Error::custom(format!("body is not base64: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeedge_request_json_reads() {
        // MODULES.md §4.1, as KubeEdge's router writes it.
        let v = serde_json::json!({"header":{"Content-Type":["application/json"]},
            "body":"eyJtc2ciOiJjbG91ZCBzZW5kIn0=","method":"POST","url":""});
        let req = HttpRequest::from_content(&Content::Json(v)).unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.body, br#"{"msg":"cloud send"}"#);
        assert_eq!(req.header["Content-Type"], vec!["application/json"]);
        // The same as bytes (QUIC without the content kind) and with nil fields.
        let bytes = br#"{"header":null,"body":null,"method":"GET","url":""}"#;
        let req = HttpRequest::from_content(&Content::Bytes(bytes.to_vec().into())).unwrap();
        assert!(req.header.is_empty() && req.body.is_empty());
        let e = HttpRequest::from_content(&Content::text("nonsense")).unwrap_err();
        assert!(e.to_string().contains("HTTPRequest"), "{e}");
        let e = HttpRequest::from_content(&Content::Json(serde_json::json!({"body": "!!"})))
            .unwrap_err();
        assert!(e.to_string().contains("base64"), "{e}");
    }

    #[test]
    fn kubeedge_response_json_round_trips() {
        let text = r#"{"header":{"Content-Type":["application/json"],"Date":["Thu, 06 Aug 2026 07:00:00 GMT"]},"status_code":200,"body":"eyJyZXN1bHQiOiJvayJ9"}"#;
        let resp: HttpResponse = serde_json::from_str(text).unwrap();
        assert_eq!(resp.status_code, 200);
        assert_eq!(resp.body, br#"{"result":"ok"}"#);
        // Go's field order and sorted header keys: byte for byte.
        assert_eq!(serde_json::to_string(&resp).unwrap(), text);
    }

    #[test]
    fn resource_is_port_colon_path() {
        let t = ServiceTarget::parse("8080:/api/v1?x=1").unwrap();
        assert_eq!((t.port, t.path.as_str()), (8080, "/api/v1?x=1"));
        assert_eq!(t.resource(), "8080:/api/v1?x=1");
        assert_eq!(ServiceTarget::parse("80:").unwrap().path, "/");
        // A colon in the path is fine (KubeEdge refuses it).
        assert_eq!(ServiceTarget::parse("80:/a:b").unwrap().path, "/a:b");
        for bad in [
            "", "8080", ":/x", "0:/x", "65536:/x", "+80:/x", "x:/y", "80:x", "80:/a b", "80:@evil",
        ] {
            assert!(ServiceTarget::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_message_and_reply_have_kubeedge_routes() {
        let req = HttpRequest {
            method: "POST".into(),
            body: b"hi".to_vec(),
            ..HttpRequest::default()
        };
        let target = ServiceTarget::parse("9000:/p").unwrap();
        let msg = req.clone().into_message(&target, "r-1".into(), 5);
        assert_eq!(msg.route.source, "router_servicebus");
        assert_eq!(msg.route.group, "user");
        assert_eq!(msg.route.resource, "9000:/p");
        assert_eq!(msg.route.operation, "POST");
        assert_eq!(HttpRequest::from_content(&msg.content).unwrap(), req);

        let resp = HttpResponse::edge_error(403, "target_not_allowed", "port 9000 is not allowed");
        assert!(resp.is_edge_error());
        let reply = resp.clone().into_reply(&msg, "a-1".into(), 6);
        assert!(is_reply(&reply));
        assert_eq!(reply.header.parent_id, "r-1");
        assert_eq!(reply.route.source, "servicebus");
        assert_eq!(reply.route.operation, "upload");
        let back = HttpResponse::from_content(&reply.content).unwrap();
        assert_eq!(back, resp);
        let body: serde_json::Value = serde_json::from_slice(&back.body).unwrap();
        assert_eq!(body["code"], "target_not_allowed");
        assert_eq!(body["error"], "port 9000 is not allowed");
    }

    #[test]
    fn canonical_names() {
        assert_eq!(canonical_header_name("content-type"), "Content-Type");
        assert_eq!(canonical_header_name("x-REQUEST-id"), "X-Request-Id");
        assert_eq!(canonical_header_name("etag"), "Etag");
    }

    #[test]
    fn hop_by_hop_headers_are_named() {
        for h in [
            "Connection",
            "transfer-encoding",
            "Host",
            "Content-Length",
            "TE",
        ] {
            assert!(is_hop_by_hop(h), "{h}");
        }
        for h in ["Content-Type", "X-Trace", "Authorization"] {
            assert!(!is_hop_by_hop(h), "{h}");
        }
    }
}
