//! One call to a local service: [`prepare`] reads a cloud request message into a [`Call`] (or the
//! error the edge answers with), [`perform`] sends it over HTTP/1.1 within the timeout and reads
//! at most the size limit of the answer, and [`shape_response`] turns the service's answer into
//! KubeEdge's `HTTPResponse`. `prepare` and `shape_response` are pure; `perform` is the only I/O.
//!
//! The client is plain HTTP/1.1 on a fresh connection per call (hyper's connection API): no
//! proxy from the environment, no redirects followed, no TLS, no pooling; a loopback service
//! needs none of them, and each refusal can be told apart (refused, timed out, too large).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use proto::Message;
use proto::http::{HttpRequest, HttpResponse, ServiceTarget, canonical_header_name, is_hop_by_hop};

use crate::config::ServiceBusConfig;

/// A request ready to send to an allowed service.
#[derive(Debug)]
pub struct Call {
    /// The service's address (from `allowed-targets`).
    pub target: SocketAddr,
    /// The request; its URI is the path and query.
    pub request: Request<Bytes>,
}

/// Why the edge answers a call itself instead of the service. Each maps to a status and a
/// stable code ([`CallError::status`], [`CallError::code`]) in the reply's JSON body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The message is not a servicebus request (resource, method, content or a header). The
    /// cloud's fault: 400 `bad_request`.
    #[error("malformed servicebus request: {0}")]
    BadRequest(String),
    /// No allowed target has this port (`modules.service-bus.allowed-targets`): 403
    /// `target_not_allowed`. Add it on the edge if the cloud should reach it.
    #[error(
        "port {port} is not an allowed target on this node (modules.service-bus.allowed-targets)"
    )]
    NotAllowed {
        /// The requested port.
        port: u16,
    },
    /// `max-concurrent-calls` calls are in progress: 503 `busy`. Retry.
    #[error("servicebus is making {limit} calls already; retry")]
    Busy {
        /// The bound.
        limit: usize,
    },
    /// Nothing listens on the target (connection refused): 502 `connection_refused`.
    #[error("connection to {target} refused: is the service running?")]
    Refused {
        /// The target.
        target: SocketAddr,
    },
    /// Connecting failed otherwise: 502 `connect_failed`.
    #[error("cannot connect to {target}: {why}")]
    Connect {
        /// The target.
        target: SocketAddr,
        /// The system's error.
        why: String,
    },
    /// The service did not answer completely within the timeout: 504 `timeout`.
    #[error("{target} did not answer within {after:?}")]
    Timeout {
        /// The target.
        target: SocketAddr,
        /// The configured timeout.
        after: Duration,
    },
    /// The response body is over `max-response-bytes`: 502 `response_too_large`.
    #[error("the response of {target} is larger than {limit} bytes (max-response-bytes)")]
    TooLarge {
        /// The target.
        target: SocketAddr,
        /// The limit.
        limit: u64,
    },
    /// The service broke the exchange (not HTTP, connection reset): 502 `bad_response`.
    #[error("{target} did not answer with HTTP: {why}")]
    BadResponse {
        /// The target.
        target: SocketAddr,
        /// hyper's error.
        why: String,
    },
}

impl CallError {
    /// The HTTP status the reply carries.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::NotAllowed { .. } => 403,
            Self::Busy { .. } => 503,
            Self::Timeout { .. } => 504,
            Self::Refused { .. }
            | Self::Connect { .. }
            | Self::TooLarge { .. }
            | Self::BadResponse { .. } => 502,
        }
    }

    /// The stable code in the reply's body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::NotAllowed { .. } => "target_not_allowed",
            Self::Busy { .. } => "busy",
            Self::Refused { .. } => "connection_refused",
            Self::Connect { .. } => "connect_failed",
            Self::Timeout { .. } => "timeout",
            Self::TooLarge { .. } => "response_too_large",
            Self::BadResponse { .. } => "bad_response",
        }
    }

    /// The answer the edge sends for this error.
    pub fn to_response(&self) -> HttpResponse {
        HttpResponse::edge_error(self.status(), self.code(), self)
    }
}

/// Reads a cloud request (op = method, resource `<port>:<path>`, content `HTTPRequest`) into a
/// call to the allowed target with that port. The port is checked before the content, so a
/// call to a port not allowed is 403 whatever it carries.
pub fn prepare(msg: &Message, config: &ServiceBusConfig) -> Result<Call, CallError> {
    let bad = |e: &dyn std::fmt::Display| CallError::BadRequest(e.to_string());
    let target = ServiceTarget::parse(&msg.route.resource).map_err(|e| bad(&e))?;
    let addr = config
        .target_for_port(target.port)
        .ok_or(CallError::NotAllowed { port: target.port })?;
    let method = Method::from_bytes(msg.route.operation.as_bytes()).map_err(|_| {
        CallError::BadRequest(format!(
            "operation {:?} is not an HTTP method",
            msg.route.operation
        ))
    })?;
    let content = HttpRequest::from_content(&msg.content).map_err(|e| bad(&e))?;
    let mut request = Request::builder()
        .method(method)
        .uri(target.path.as_str())
        .body(Bytes::from(content.body))
        .map_err(|e| bad(&format!("path {:?}: {e}", target.path)))?;
    let headers = request.headers_mut();
    for (name, values) in &content.header {
        if is_hop_by_hop(name) {
            continue;
        }
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| CallError::BadRequest(format!("header name {name:?} is not valid")))?;
        for value in values {
            let value = HeaderValue::from_str(value).map_err(|_| {
                CallError::BadRequest(format!("header {name} has an invalid value"))
            })?;
            headers.append(name.clone(), value);
        }
    }
    let host = HeaderValue::from_str(&addr.to_string())
        .map_err(|_| CallError::BadRequest(format!("target {addr} is not a Host value")))?;
    headers.insert(HOST, host);
    // As KubeEdge does.
    if !headers.contains_key(ACCEPT) {
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    }
    Ok(Call {
        target: addr,
        request,
    })
}

/// The service's answer as KubeEdge's `HTTPResponse`: the status, the end-to-end headers under
/// Go's canonical names (hyper gives them lower-cased), the body.
pub fn shape_response(status: StatusCode, headers: &HeaderMap, body: Bytes) -> HttpResponse {
    let mut out = HttpResponse {
        status_code: status.as_u16(),
        body: body.to_vec(),
        ..HttpResponse::default()
    };
    for (name, value) in headers {
        if is_hop_by_hop(name.as_str()) {
            continue;
        }
        out.header
            .entry(canonical_header_name(name.as_str()))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    out
}

/// Sends `call` and reads the answer; the whole exchange, connecting included, is bounded by
/// `timeout`, and the body by `max_body` bytes.
pub async fn perform(
    call: Call,
    timeout: Duration,
    max_body: u64,
) -> Result<HttpResponse, CallError> {
    let target = call.target;
    let exchange = async move {
        let stream = TcpStream::connect(target).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                CallError::Refused { target }
            } else {
                CallError::Connect {
                    target,
                    why: e.to_string(),
                }
            }
        })?;
        let broken = |e: hyper::Error| CallError::BadResponse {
            target,
            why: e.to_string(),
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(broken)?;
        // Drives the connection; ends with the exchange (aborted on every exit path).
        let driver = AbortOnDrop(tokio::spawn(connection));
        let response = sender
            .send_request(call.request.map(Full::new))
            .await
            .map_err(broken)?;
        let (parts, body) = response.into_parts();
        let too_large = CallError::TooLarge {
            target,
            limit: max_body,
        };
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body) {
            return Err(too_large);
        }
        let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
        let body = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large),
            Err(e) => {
                return Err(CallError::BadResponse {
                    target,
                    why: e.to_string(),
                });
            }
        };
        drop(driver);
        Ok(shape_response(parts.status, &parts.headers, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CallError::Timeout {
            target,
            after: timeout,
        })?
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use proto::Content;
    use proto::http::HeaderValues;

    use super::*;

    fn config(targets: &[&str]) -> ServiceBusConfig {
        ServiceBusConfig {
            enable: true,
            allowed_targets: targets.iter().map(|t| t.parse().unwrap()).collect(),
            ..ServiceBusConfig::default()
        }
    }

    fn request(op: &str, resource: &str, content: Content) -> Message {
        Message::with_header("req-1", "", 1)
            .route("router_servicebus", "user", resource, op)
            .content(content)
    }

    fn http_request(headers: &[(&str, &str)], body: &[u8]) -> Content {
        let mut header = HeaderValues::new();
        for (k, v) in headers {
            header
                .entry((*k).to_owned())
                .or_default()
                .push((*v).to_owned());
        }
        let req = HttpRequest {
            header,
            body: body.to_vec(),
            method: String::new(),
            url: String::new(),
        };
        Content::Json(serde_json::to_value(req).unwrap())
    }

    #[test]
    fn a_request_becomes_a_call_to_the_allowed_target() {
        let msg = request(
            "POST",
            "8080:/api/items?x=1",
            http_request(
                &[
                    ("Content-Type", "application/json"),
                    ("X-Multi", "a"),
                    ("X-Multi", "b"),
                    ("Connection", "close"),
                    ("Host", "evil.example"),
                ],
                b"{\"n\":1}",
            ),
        );
        let call = prepare(&msg, &config(&["127.0.0.1:8080"])).unwrap();
        assert_eq!(call.target, "127.0.0.1:8080".parse().unwrap());
        let req = &call.request;
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "/api/items?x=1");
        assert_eq!(req.headers()["content-type"], "application/json");
        let multi: Vec<_> = req.headers().get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        // Hop-by-hop headers are not forwarded; Host names the target; Accept added.
        assert!(req.headers().get("connection").is_none());
        assert_eq!(req.headers()["host"], "127.0.0.1:8080");
        assert_eq!(req.headers()["accept"], "*/*");
        assert_eq!(req.body().as_ref(), b"{\"n\":1}");
    }

    #[test]
    fn refusals_are_clear() {
        let c = config(&["127.0.0.1:8080"]);
        let ok = http_request(&[], b"");
        let e = prepare(&request("GET", "9999:/x", ok.clone()), &c).unwrap_err();
        assert_eq!((e.status(), e.code()), (403, "target_not_allowed"));
        assert!(e.to_string().contains("port 9999"), "{e}");
        // Deny by default: nothing listed, nothing allowed.
        let e = prepare(&request("GET", "8080:/x", ok.clone()), &config(&[])).unwrap_err();
        assert_eq!(e.status(), 403);
        for (op, resource, content) in [
            ("GET", "8080", ok.clone()),
            ("GET", "x:/y", ok.clone()),
            ("G T", "8080:/x", ok.clone()),
            ("GET", "8080:/x", Content::text("not json")),
            ("GET", "8080:/x", http_request(&[("Bad Name", "v")], b"")),
            ("GET", "8080:/x", http_request(&[("X", "a\nb")], b"")),
        ] {
            let e = prepare(&request(op, resource, content), &c).unwrap_err();
            assert_eq!(
                (e.status(), e.code()),
                (400, "bad_request"),
                "{op} {resource}: {e}"
            );
        }
    }

    #[test]
    fn error_answers_carry_status_code_and_text() {
        let target = "127.0.0.1:1".parse().unwrap();
        let cases = [
            (CallError::Refused { target }, 502, "connection_refused"),
            (
                CallError::Timeout {
                    target,
                    after: Duration::from_secs(10),
                },
                504,
                "timeout",
            ),
            (
                CallError::TooLarge { target, limit: 5 },
                502,
                "response_too_large",
            ),
            (CallError::Busy { limit: 64 }, 503, "busy"),
        ];
        for (e, status, code) in cases {
            let resp = e.to_response();
            assert_eq!(resp.status_code, status);
            assert!(resp.is_edge_error());
            let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
            assert_eq!(body["code"], code);
            assert_eq!(body["error"], e.to_string());
        }
    }

    #[test]
    fn responses_are_shaped_like_go() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("x-request-id", HeaderValue::from_static("7"));
        let resp = shape_response(StatusCode::CREATED, &headers, Bytes::from_static(b"made"));
        assert_eq!(resp.status_code, 201);
        assert_eq!(resp.body, b"made");
        assert_eq!(resp.header["Content-Type"], ["text/plain"]);
        assert_eq!(resp.header["Set-Cookie"], ["a=1", "b=2"]);
        assert_eq!(resp.header["X-Request-Id"], ["7"]);
        assert!(!resp.header.contains_key("Transfer-Encoding"));
        assert!(!resp.is_edge_error());
    }

    /// The one I/O path run against a real listener: a refused port and a server that never
    /// answers. Full round trips with a real service are in `tests/servicebus.rs`.
    #[tokio::test]
    async fn refused_and_silent_targets() {
        let c = config(&["127.0.0.1:1"]);
        // Find a free port, then close it: connecting is refused.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let mut call = prepare(&request("GET", "1:/", http_request(&[], b"")), &c).unwrap();
        call.target = addr;
        let max = NonZeroU64::MIN.get();
        let e = perform(call, Duration::from_secs(5), max)
            .await
            .unwrap_err();
        assert_eq!(e, CallError::Refused { target: addr });

        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut call = prepare(&request("GET", "1:/", http_request(&[], b"")), &c).unwrap();
        call.target = silent.local_addr().unwrap();
        let e = perform(call, Duration::from_millis(300), max)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "timeout");
        drop(silent);
    }
}
