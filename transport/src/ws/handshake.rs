//! The HTTP/1.1 upgrade of KubeEdge's WebSocket wire, written by hand on both sides so the bytes are
//! exactly KubeEdge's (PROTOCOL.md B§4.2, C.2) and so the server can refuse a client with an HTTP
//! status and a reason before the upgrade (W8), then close the TLS session cleanly.
//!
//! The client request mirrors `conformance/vectors/kepeer/capture_ws_upgrade_request.http`: the
//! same path, the same header names in Go's canonical spelling and in Go's (sorted) order. Parsing
//! and key derivation reuse tungstenite's.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::client::{Response, generate_key};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::handshake::machine::TryParse;
use tokio_tungstenite::tungstenite::handshake::server::{Request, create_response};

use crate::Capabilities;

/// Request header carrying the node id (Go canonical form of KubeEdge's `node_id`).
pub(crate) const NODE_ID_HEADER: &str = "Node_id";
/// Request header carrying the project id (KubeEdge's `project_id`).
pub(crate) const PROJECT_ID_HEADER: &str = "Project_id";
/// Request header saying what the connection is for (KubeEdge's `ConnectionUse`).
pub(crate) const CONNECTION_USE_HEADER: &str = "Connectionuse";
/// The only `ConnectionUse` value served: a message connection.
pub(crate) const CONNECTION_USE_MSG: &str = "msg";
/// Causeway's capability header, on the request (offered) and the 101 response (accepted).
pub(crate) const CAPABILITIES_HEADER: &str = "Causeway-Capabilities";
/// What we send as `User-Agent` (KubeEdge's edge sends Go's default; the server ignores it).
const USER_AGENT: &str = concat!("causeway/", env!("CARGO_PKG_VERSION"));
/// Largest request or response head accepted (Go's default is 1 MiB; ours are a few hundred bytes).
const MAX_HEAD_LEN: usize = 16 * 1024;
/// Largest error body read from a refusing server.
const MAX_ERROR_BODY: usize = 1024;

/// The request line and headers an edge sends; `host` is the dialled `host:port`.
pub(crate) fn client_request(
    host: &str,
    project_id: &str,
    node_id: &str,
    capabilities: Capabilities,
    key: &str,
) -> String {
    let mut req = format!(
        "GET /{project_id}/{node_id}/events HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
    );
    // Go writes the remaining headers sorted by name; ours sorts before "Connection".
    if capabilities != Capabilities::NONE {
        req.push_str(&format!(
            "{CAPABILITIES_HEADER}: {}\r\n",
            capabilities.header_value()
        ));
    }
    req.push_str(&format!(
        "Connection: Upgrade\r\n{CONNECTION_USE_HEADER}: {CONNECTION_USE_MSG}\r\n\
         {NODE_ID_HEADER}: {node_id}\r\n{PROJECT_ID_HEADER}: {project_id}\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n\r\n"
    ));
    req
}

/// A fresh `Sec-WebSocket-Key`.
pub(crate) fn new_key() -> String {
    generate_key()
}

/// How the client-side upgrade failed.
#[derive(Debug)]
pub(crate) enum ClientUpgradeError {
    /// The socket failed (including TLS alerts, which arrive as I/O errors).
    Io(std::io::Error),
    /// The server answered with an HTTP status other than 101.
    Refused { status: u16, reason: String },
    /// The answer is not a valid upgrade response.
    Protocol(String),
}

/// The outcome of a successful client upgrade.
#[derive(Debug)]
pub(crate) struct Upgraded {
    /// Bytes read past the response head (the start of the first frame, if any).
    pub(crate) tail: Vec<u8>,
    /// The capabilities the server accepted (intersected with what we offered).
    pub(crate) capabilities: Capabilities,
}

/// Sends the upgrade request and reads the server's answer.
pub(crate) async fn client_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &str,
    key: &str,
    offered: Capabilities,
) -> Result<Upgraded, ClientUpgradeError> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ClientUpgradeError::Io)?;
    stream.flush().await.map_err(ClientUpgradeError::Io)?;
    let (response, mut tail) = read_head::<Response, _>(stream)
        .await
        .map_err(|e| match e {
            HeadError::Io(e) => ClientUpgradeError::Io(e),
            HeadError::TooLarge => {
                ClientUpgradeError::Protocol("response head over 16 KiB".to_owned())
            }
            HeadError::Parse(detail) => ClientUpgradeError::Protocol(detail),
        })?;
    let status = response.status().as_u16();
    if status != 101 {
        let reason = read_error_body(stream, &response, &mut tail).await;
        return Err(ClientUpgradeError::Refused { status, reason });
    }
    let headers = response.headers();
    let has_token = |name: &str, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(ClientUpgradeError::Protocol(
            "101 response without Upgrade: websocket / Connection: Upgrade".to_owned(),
        ));
    }
    let expected = derive_accept_key(key.as_bytes());
    if headers
        .get("sec-websocket-accept")
        .and_then(|v| v.to_str().ok())
        != Some(expected.as_str())
    {
        return Err(ClientUpgradeError::Protocol(
            "wrong or missing Sec-WebSocket-Accept".to_owned(),
        ));
    }
    let accepted = headers
        .get(CAPABILITIES_HEADER)
        .and_then(|v| v.to_str().ok())
        .map_or(Capabilities::NONE, Capabilities::from_header_value);
    Ok(Upgraded {
        tail,
        capabilities: accepted.intersection(offered),
    })
}

/// Reads the body of a refusal (bounded by `Content-Length`, [`MAX_ERROR_BODY`] and a short wait),
/// to report the server's reason.
async fn read_error_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    response: &Response,
    tail: &mut Vec<u8>,
) -> String {
    let want = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_ERROR_BODY);
    let read_rest = async {
        let mut buf = [0u8; 512];
        while tail.len() < want {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => tail.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read_rest).await;
    let body = String::from_utf8_lossy(&tail[..tail.len().min(want)])
        .trim()
        .to_owned();
    if body.is_empty() {
        response
            .status()
            .canonical_reason()
            .unwrap_or("refused")
            .to_owned()
    } else {
        body
    }
}

/// Why an HTTP head could not be read.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The socket failed or closed early.
    Io(std::io::Error),
    /// The head exceeds [`MAX_HEAD_LEN`].
    TooLarge,
    /// The head is not HTTP/1.x or not the expected kind.
    Parse(String),
}

/// Reads one HTTP head (request or response) and returns it with the bytes read past it.
pub(crate) async fn read_head<H: TryParse, S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(H, Vec<u8>), HeadError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let n = stream.read_buf(&mut buf).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed during the upgrade",
            )));
        }
        match H::try_parse(&buf) {
            Ok(Some((consumed, head))) => return Ok((head, buf[consumed..].to_vec())),
            Ok(None) if buf.len() >= MAX_HEAD_LEN => return Err(HeadError::TooLarge),
            Ok(None) => {}
            Err(e) => return Err(HeadError::Parse(e.to_string())),
        }
    }
}

/// What the server learned from a valid upgrade request.
#[derive(Debug)]
pub(crate) struct ClientHello {
    /// The `node_id` header, if present and non-empty.
    pub(crate) node_id: Option<String>,
    /// The `project_id` header (empty when absent, as KubeEdge reads it).
    pub(crate) project_id: String,
    /// The first `ConnectionUse` value, if any.
    pub(crate) connection_use: Option<String>,
    /// Capabilities the client offered, if it sent the header at all.
    pub(crate) offered: Option<Capabilities>,
    /// The `Sec-WebSocket-Accept` value to answer with.
    pub(crate) accept_key: String,
}

/// Validates an upgrade request (RFC 6455 §4.2.1) and extracts KubeEdge's identity headers.
pub(crate) fn parse_request(request: &Request) -> Result<ClientHello, String> {
    create_response(request).map_err(|e| format!("not a WebSocket upgrade: {e}"))?;
    let headers = request.headers();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let key = text("sec-websocket-key").unwrap_or_default();
    Ok(ClientHello {
        node_id: text(NODE_ID_HEADER).filter(|v| !v.is_empty()),
        project_id: text(PROJECT_ID_HEADER).unwrap_or_default(),
        connection_use: text(CONNECTION_USE_HEADER),
        offered: text(CAPABILITIES_HEADER).map(|v| Capabilities::from_header_value(&v)),
        accept_key: derive_accept_key(key.as_bytes()),
    })
}

/// The 101 response, as gorilla's server writes it, plus the capability header when the client
/// offered capabilities.
pub(crate) fn switching_protocols(accept_key: &str, accepted: Option<Capabilities>) -> String {
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept_key}\r\n"
    );
    if let Some(caps) = accepted {
        resp.push_str(&format!(
            "{CAPABILITIES_HEADER}: {}\r\n",
            caps.header_value()
        ));
    }
    resp.push_str("\r\n");
    resp
}

/// An HTTP error response carrying `reason` as a plain-text body; the connection closes after it.
pub(crate) fn error_response(status: u16, reason: &str) -> String {
    let phrase = http_phrase(status);
    let body = format!("{reason}\n");
    format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn http_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURE: &str =
        include_str!("../../../conformance/vectors/kepeer/capture_ws_upgrade_request.http");

    /// Header lines as (name, value), with the values that are random or host-specific blanked.
    fn header_lines(head: &str) -> Vec<(String, String)> {
        head.split("\r\n")
            .skip(1)
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(": "))
            .map(|(n, v)| {
                let v = match n {
                    "Host" | "Sec-WebSocket-Key" | "User-Agent" => "*",
                    _ => v,
                };
                (n.to_owned(), v.to_owned())
            })
            .collect()
    }

    #[test]
    fn request_matches_kubeedges_capture() {
        let ours = client_request(
            "127.0.0.1:38207",
            "e632aba927ea4ac2b575ec1603d56f10",
            "edge-1",
            Capabilities::NONE,
            "vgQVZFfVEo45beO7fPQ8yQ==",
        );
        assert_eq!(
            ours.lines().next(),
            CAPTURE.lines().next(),
            "request line differs"
        );
        assert_eq!(header_lines(&ours), header_lines(CAPTURE));
        assert!(ours.ends_with("\r\n\r\n"));
    }

    #[test]
    fn capabilities_header_is_added_in_go_order() {
        let ours = client_request("h:1", "p", "n", Capabilities::ALL, "k");
        let names: Vec<_> = header_lines(&ours).into_iter().map(|(n, _)| n).collect();
        let mut sorted = names[2..].to_vec();
        sorted.sort();
        assert_eq!(names[2..], sorted[..]);
        assert!(ours.contains("Causeway-Capabilities: upstream-ack\r\n"));
    }

    #[test]
    fn server_parses_a_kubeedge_request() {
        let (_, req) = Request::try_parse(CAPTURE.as_bytes()).unwrap().unwrap();
        let hello = parse_request(&req).unwrap();
        assert_eq!(hello.node_id.as_deref(), Some("edge-1"));
        assert_eq!(hello.project_id, "e632aba927ea4ac2b575ec1603d56f10");
        assert_eq!(hello.connection_use.as_deref(), Some("msg"));
        assert_eq!(hello.offered, None);
        assert_eq!(
            hello.accept_key,
            derive_accept_key(b"vgQVZFfVEo45beO7fPQ8yQ==")
        );
    }

    #[test]
    fn lowercase_header_names_are_accepted() {
        let raw = "GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                   sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   node_id: a\r\nproject_id: b\r\nconnectionuse: str\r\n\r\n";
        let (_, req) = Request::try_parse(raw.as_bytes()).unwrap().unwrap();
        let hello = parse_request(&req).unwrap();
        assert_eq!(hello.node_id.as_deref(), Some("a"));
        assert_eq!(hello.connection_use.as_deref(), Some("str"));
    }

    #[test]
    fn a_plain_get_is_not_an_upgrade() {
        let raw = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let (_, req) = Request::try_parse(raw.as_bytes()).unwrap().unwrap();
        assert!(parse_request(&req).is_err());
    }

    #[test]
    fn error_response_has_length_and_reason() {
        let resp = error_response(403, "node id mismatch");
        assert!(resp.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(resp.contains("Content-Length: 17\r\n"));
        assert!(resp.ends_with("\r\n\r\nnode id mismatch\n"));
    }
}
