//! WebSocket-only checks of KubeEdge's wire (PROTOCOL.md B§4, Part C), with raw clients and a raw
//! server so the bytes are seen exactly: a stock KubeEdge edge's request is served, our client's
//! request matches the capture, refusals are HTTP errors, `h2` is never negotiated.

use std::time::Duration;

use causeway_tests::transport_harness::{self as h, Pki, TestServer, message, raw, within};
use proto::Content;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::config::LinkConfig;
use transport::{Capabilities, Protocol, RecvError, RejectReason};

const P: Protocol = Protocol::WebSocket;
const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../conformance/vectors/kepeer/"
);

fn vector(name: &str) -> Vec<u8> {
    std::fs::read(format!("{VECTORS}{name}")).expect("vector")
}

/// Reads one unmasked server frame (FIN set) and returns its opcode and payload.
async fn read_server_frame<S: AsyncReadExt + Unpin>(stream: &mut S) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.expect("frame head");
    assert_eq!(head[0] & 0x80, 0x80, "FIN");
    assert_eq!(head[1] & 0x80, 0, "server frames are unmasked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).await.expect("len");
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).await.expect("len");
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await.expect("payload");
    (head[0] & 0x0f, payload)
}

/// A stock KubeEdge edge (its exact upgrade request, JSON text frames with LF) is served, and what
/// the server writes back is KubeEdge's framing: unmasked text frames of JSON plus LF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeedge_edge_is_served() {
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let tls = raw::client_tls(&pki.anchors(), Some(&pki.node("edge-1")), &[]);
    let mut stream = raw::tls_connect(server.addr, tls).await.expect("tls");
    let request = raw::ws_request("edge-1", "e632aba927ea4ac2b575ec1603d56f10", Some("msg"));
    let head = raw::ws_upgrade(&mut stream, &request)
        .await
        .expect("upgrade");
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("causeway-capabilities"),
        "a client that offers none gets no capability header: {head}"
    );
    let served = server.accept().await;
    assert_eq!(served.peer().capabilities, Capabilities::NONE);

    // The edge's keepalive, byte for byte as gorilla sends it.
    let keepalive = vector("08_keepalive.ws");
    stream
        .write_all(&raw::ws_client_frame(1, &keepalive))
        .await
        .expect("write");
    let got = within("recv", served.recv())
        .await
        .expect("recv")
        .expect("msg");
    assert_eq!(
        got,
        proto::json::from_slice(&keepalive).expect("vector decodes")
    );

    let down = message("default/pod/nginx", 1, Content::text("OK"));
    served.send(down.clone()).await.expect("send");
    let (opcode, payload) = within("frame", read_server_frame(&mut stream)).await;
    assert_eq!(opcode, 1, "text frame");
    assert_eq!(payload, proto::json::to_ws_text(&down).into_bytes());
}

/// JSON in a binary frame is accepted, as gorilla's ReadJSON does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_accepted() {
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let tls = raw::client_tls(&pki.anchors(), Some(&pki.node("edge-1")), &[]);
    let mut stream = raw::tls_connect(server.addr, tls).await.expect("tls");
    let head = raw::ws_upgrade(&mut stream, &raw::ws_request("edge-1", "p", Some("msg")))
        .await
        .expect("upgrade");
    assert!(head.starts_with("HTTP/1.1 101"));
    let served = server.accept().await;
    let msg = vector("05_string_content.json");
    stream
        .write_all(&raw::ws_client_frame(2, &msg))
        .await
        .expect("write");
    let got = within("recv", served.recv())
        .await
        .expect("recv")
        .expect("msg");
    assert_eq!(got, proto::json::from_slice(&msg).expect("vector decodes"));
}

async fn refused(connection_use: Option<&str>) -> (String, RejectReason) {
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let tls = raw::client_tls(&pki.anchors(), Some(&pki.node("edge-1")), &[]);
    let mut stream = raw::tls_connect(server.addr, tls).await.expect("tls");
    stream
        .write_all(raw::ws_request("edge-1", "p", connection_use).as_bytes())
        .await
        .expect("write");
    // The whole answer, then the end of the connection.
    let mut answer = Vec::new();
    let _ = within("the server to close", stream.read_to_end(&mut answer)).await;
    (
        String::from_utf8_lossy(&answer).into_owned(),
        server.rejection().await,
    )
}

/// `ConnectionUse` other than `msg` (or missing) is refused with an HTTP error before the upgrade,
/// and the connection is closed (KubeEdge upgrades and then silently serves nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_use_other_than_msg_is_refused() {
    let (answer, reason) = refused(Some("str")).await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("ConnectionUse"), "{answer}");
    assert_eq!(
        reason,
        RejectReason::BadConnectionUse {
            value: Some("str".into())
        }
    );
    let (answer, reason) = refused(None).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(reason, RejectReason::BadConnectionUse { value: None });
}

/// An identity refusal is `403 Forbidden` with the reason as text, then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_refusal_is_403_with_reason_then_close() {
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let tls = raw::client_tls(&pki.anchors(), Some(&pki.node("edge-1")), &[]);
    let mut stream = raw::tls_connect(server.addr, tls).await.expect("tls");
    stream
        .write_all(raw::ws_request("edge-9", "p", Some("msg")).as_bytes())
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = within("the server to close", stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(
        answer.contains("\"edge-9\" does not match certificate node id \"edge-1\""),
        "{answer}"
    );
    assert!(matches!(
        server.rejection().await,
        RejectReason::NodeIdMismatch { .. }
    ));
}

/// The server never negotiates `h2` (which would break the upgrade, C.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_never_negotiates_h2() {
    let pki = Pki::new();
    let server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let tls = raw::client_tls(
        &pki.anchors(),
        Some(&pki.node("edge-1")),
        &[b"h2", b"http/1.1"],
    );
    let stream = raw::tls_connect(server.addr, tls).await.expect("tls");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let tls = raw::client_tls(&pki.anchors(), Some(&pki.node("edge-1")), &[]);
    let stream = raw::tls_connect(server.addr, tls).await.expect("tls");
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
}

/// A client that completes the upgrade and then neither reads nor writes (no pong to our pings) is
/// noticed within the read deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_client_is_detected() {
    let deadline = Duration::from_secs(1);
    let link = LinkConfig {
        read_deadline: deadline,
        keep_alive_interval: Duration::from_millis(300),
        ..h::test_link()
    };
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(link)).await;
    let tls = raw::client_tls(&pki.anchors(), Some(&pki.node("edge-1")), &[]);
    let mut stream = raw::tls_connect(server.addr, tls).await.expect("tls");
    let head = raw::ws_upgrade(&mut stream, &raw::ws_request("edge-1", "p", Some("msg")))
        .await
        .expect("upgrade");
    assert!(head.starts_with("HTTP/1.1 101"));
    let served = server.accept().await;
    match tokio::time::timeout(deadline * 10, served.recv()).await {
        Ok(Err(RecvError::Timeout { .. })) => {}
        other => panic!("expected a read timeout, got {other:?}"),
    }
}

/// Our client's upgrade request, as a raw TLS server receives it, has the capture's request line
/// and headers (names in Go's spelling, same order, same values but host, key and agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_request_on_the_wire_matches_kubeedges_capture() {
    let pki = Pki::new();
    let server_tls = transport::tls::server_config(P, &pki.server, &pki.anchors()).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let raw_server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut stream = tokio_rustls::TlsAcceptor::from(server_tls)
            .accept(tcp)
            .await
            .expect("tls accept");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.expect("read");
            head.push(byte[0]);
        }
        let reply = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy";
        stream.write_all(reply.as_bytes()).await.expect("write");
        let _ = stream.shutdown().await;
        String::from_utf8(head).expect("ASCII head")
    });
    let mut config = pki.dial_config(addr, "edge-1", h::test_link());
    config.capabilities = Capabilities::NONE;
    match transport::connect(P, &config).await {
        Err(transport::ConnectError::Rejected { status, reason }) => {
            assert_eq!(status, Some(503));
            assert_eq!(reason, "busy");
        }
        other => panic!(
            "expected the 503 refusal, got {:?}",
            other.map(|c| c.peer().clone())
        ),
    }
    let ours = raw_server.await.expect("raw server");
    let capture = String::from_utf8(vector("capture_ws_upgrade_request.http")).expect("capture");
    let normalise = |head: &str| -> Vec<String> {
        head.split("\r\n")
            .map(|line| match line.split_once(": ") {
                Some((name @ ("Host" | "Sec-WebSocket-Key" | "User-Agent"), _)) => {
                    format!("{name}: *")
                }
                _ => line.to_owned(),
            })
            .collect()
    };
    assert_eq!(normalise(&ours), normalise(&capture));
}

/// Reads one masked client frame, skipping pings, and returns its unmasked payload.
async fn read_client_frame<S: AsyncReadExt + Unpin>(stream: &mut S) -> Vec<u8> {
    loop {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.expect("frame head");
        assert_eq!(head[1] & 0x80, 0x80, "client frames are masked");
        let len = match head[1] & 0x7f {
            126 => u64::from(stream.read_u16().await.expect("len")),
            127 => stream.read_u64().await.expect("len"),
            n => u64::from(n),
        };
        let mut mask = [0u8; 4];
        stream.read_exact(&mut mask).await.expect("mask");
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload).await.expect("payload");
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        if head[0] & 0x0f != 0x9 {
            return payload;
        }
    }
}

/// Our client against a server that behaves as KubeEdge's cloudhub on the wire (gorilla's 101,
/// no capability header, unmasked text frames of JSON plus LF): it connects without capabilities,
/// receives KubeEdge's bytes and sends JSON text frames with a trailing LF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_speaks_to_a_kubeedge_style_server() {
    let pki = Pki::new();
    let server_tls = transport::tls::server_config(P, &pki.server, &pki.anchors()).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let keepalive = vector("08_keepalive.ws");
    let server = tokio::spawn({
        let keepalive = keepalive.clone();
        async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut stream = tokio_rustls::TlsAcceptor::from(server_tls)
                .accept(tcp)
                .await
                .expect("tls accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).await.expect("read");
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).expect("ASCII head");
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .expect("key");
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            stream.write_all(response.as_bytes()).await.expect("101");
            let mut frame = vec![0x81, 126];
            frame.extend_from_slice(&(keepalive.len() as u16).to_be_bytes());
            frame.extend_from_slice(&keepalive);
            stream.write_all(&frame).await.expect("frame");
            read_client_frame(&mut stream).await
        }
    });
    let config = pki.dial_config(addr, "edge-1", h::test_link());
    let client = within("connect", transport::connect(P, &config))
        .await
        .expect("connect");
    assert_eq!(client.peer().capabilities, Capabilities::NONE);
    let got = within("recv", client.recv())
        .await
        .expect("recv")
        .expect("msg");
    assert_eq!(got, proto::json::from_slice(&keepalive).expect("vector"));
    let up = message("default/pod/nginx", 1, Content::text("OK"));
    client.send(up.clone()).await.expect("send");
    let sent = within("server", server).await.expect("server task");
    assert_eq!(sent, proto::json::to_ws_text(&up).into_bytes());
}
