//! QUIC-only checks of the Causeway profile (PROTOCOL.md Part A item 3), with a raw quinn peer so
//! the streams and bytes are seen exactly: the control-stream exchange, the `msg` prefix, the
//! per-resource stream mapping, and refusals as connection closes with a code and a reason.

use std::collections::HashMap;

use bytes::BytesMut;
use causeway_tests::transport_harness::{self as h, Pki, TestServer, message, raw, within};
use proto::{Content, Message};
use transport::quic::code;
use transport::{Protocol, RecvError, RejectReason};

const P: Protocol = Protocol::Quic;
const ALPN: &[u8] = b"causeway/1";

async fn raw_client(
    pki: &Pki,
    server: &TestServer,
    node: &str,
) -> (quinn::Endpoint, quinn::Connection) {
    let tls = raw::client_tls(&pki.anchors(), Some(&pki.node(node)), &[ALPN]);
    raw::quic_connect(server.addr, tls).await.expect("quic")
}

/// Reads frames off `recv` until it ends.
async fn read_frames(recv: &mut quinn::RecvStream) -> Vec<Message> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = recv.read_chunk(65536, true).await {
        buf.extend_from_slice(&chunk.bytes);
        while let Some(frame) = proto::frame::decode(&mut buf).expect("frame") {
            out.push(frame.to_message().expect("message"));
        }
    }
    out
}

/// viaduct's header (vector 14's shape, no capabilities) is answered with exactly viaduct's ack:
/// operation `response`, parent id = the header's id, resource `header`, content `ack`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viaduct_header_gets_viaducts_ack() {
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let (_endpoint, conn) = raw_client(&pki, &server, "edge-1").await;
    let (_send, _recv, ack) = raw::quic_handshake(&conn, "edge-1")
        .await
        .expect("handshake");
    let header = raw::quic_header("edge-1");
    assert_eq!(ack.route.operation, "response");
    assert_eq!(ack.route.resource, "header");
    assert_eq!(ack.route.source, "");
    assert_eq!(ack.route.group, "");
    assert_eq!(ack.content.as_text(), Some("ack"));
    assert_eq!(ack.header.parent_id.len(), header.header.id.len());
    let served = server.accept().await;
    assert_eq!(
        served.peer().node_id.as_ref().map(|n| n.as_str()),
        Some("edge-1")
    );
    assert_eq!(served.peer().capabilities, transport::Capabilities::NONE);
}

/// Messages the server sends arrive on server-opened streams that begin with `msg`; all messages
/// about one resource use one stream, and several resources use several streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_messages_use_msg_streams_keyed_by_resource() {
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let (_endpoint, conn) = raw_client(&pki, &server, "edge-1").await;
    let (_send, _recv, _) = raw::quic_handshake(&conn, "edge-1")
        .await
        .expect("handshake");
    let served = server.accept().await;
    let resources: Vec<String> = (0..12).map(|i| format!("ns/pod/p{i}")).collect();
    for round in 0..5 {
        for r in &resources {
            served
                .send(message(r, round, Content::text("v")))
                .await
                .expect("send");
        }
    }
    served.close("done").await.expect("close");
    let mut stream_of: HashMap<String, u64> = HashMap::new();
    let mut streams = 0;
    let mut total = 0;
    while let Ok((_s, mut recv)) = conn.accept_bi().await {
        let mut prefix = [0u8; 3];
        recv.read_exact(&mut prefix).await.expect("prefix");
        assert_eq!(&prefix, b"msg");
        streams += 1;
        let id = recv.id().index();
        let mut last: HashMap<String, u64> = HashMap::new();
        for msg in read_frames(&mut recv).await {
            total += 1;
            let seq = h::seq_of(&msg);
            if let Some(prev) = last.insert(msg.route.resource.clone(), seq) {
                assert_eq!(seq, prev + 1, "order within a stream");
            }
            let first = stream_of.entry(msg.route.resource.clone()).or_insert(id);
            assert_eq!(*first, id, "{} moved streams", msg.route.resource);
        }
    }
    assert_eq!(total, 60);
    assert!(streams > 1, "12 resources all on one stream");
    assert!(streams <= 8, "more streams than configured: {streams}");
}

/// A header offering capabilities gets the ack and then the server's capability header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_follow_the_ack() {
    let pki = Pki::new();
    let server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let (_endpoint, conn) = raw_client(&pki, &server, "edge-1").await;
    let (mut send, mut recv) = conn.open_bi().await.expect("control");
    let content = br#"{"Causeway_capabilities":["upstream-ack","future"],"Node_id":["edge-1"],"Project_id":["p"]}"#;
    let header = Message::new("")
        .route("", "", "header", "header")
        .content(Content::Bytes(content.to_vec().into()));
    send.write_all(&raw::frame(&header)).await.expect("write");
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while got.len() < 2 {
        let chunk = within("answer", recv.read_chunk(4096, true))
            .await
            .expect("read")
            .expect("open");
        buf.extend_from_slice(&chunk.bytes);
        while let Some(frame) = proto::frame::decode(&mut buf).expect("frame") {
            got.push(frame.to_message().expect("message"));
        }
    }
    assert_eq!(got[0].header.parent_id, header.header.id);
    assert_eq!(got[0].content.as_text(), Some("ack"));
    assert_eq!(got[1].route.operation, "header");
    assert_eq!(
        got[1].content.as_text(),
        Some(r#"{"Causeway_capabilities":["upstream-ack"]}"#)
    );
}

async fn refused_header(content: &[u8]) -> (quinn::ConnectionError, RejectReason) {
    let (closed, reason, _) = refused_header_answer(content).await;
    (closed, reason)
}

/// Sends a control header with `content`; the close, the server's rejection, and what arrived
/// on the control stream before the close.
async fn refused_header_answer(
    content: &[u8],
) -> (quinn::ConnectionError, RejectReason, Vec<Message>) {
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let (_endpoint, conn) = raw_client(&pki, &server, "edge-1").await;
    let (mut send, mut recv) = conn.open_bi().await.expect("control");
    let header = Message::new("")
        .route("", "", "header", "header")
        .content(Content::Bytes(content.to_vec().into()));
    send.write_all(&raw::frame(&header)).await.expect("write");
    let answers = within("control answers", read_frames(&mut recv)).await;
    let closed = within("close", conn.closed()).await;
    (closed, server.rejection().await, answers)
}

fn app_close(err: &quinn::ConnectionError) -> (quinn::VarInt, String) {
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code,
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("expected an application close, got {other:?}"),
    }
}

/// A header that does not parse is refused (viaduct answers `nack` and serves anyway, W15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_header_closes_with_bad_handshake() {
    let (closed, reason, answers) = refused_header_answer(b"not json").await;
    // The `nack` arrives before the close (PROTOCOL.md Part A item 3), not lost to it.
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].route.operation, "response");
    assert_eq!(answers[0].content.as_text(), Some("nack"));
    let (code, _) = app_close(&closed);
    assert_eq!(code, code::BAD_HANDSHAKE);
    assert_eq!(reason.label(), "bad_handshake");
}

/// A header without `Node_id`, or with another node's, closes the connection with REJECTED and a
/// reason (KubeEdge keeps serving it, W8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_node_id_closes_with_rejected() {
    let (closed, reason) = refused_header(br#"{"Project_id":["p"]}"#).await;
    assert_eq!(app_close(&closed).0, code::REJECTED);
    assert_eq!(reason, RejectReason::MissingNodeId);
    let (closed, reason) = refused_header(br#"{"Node_id":["edge-2"],"Project_id":["p"]}"#).await;
    let (code, text) = app_close(&closed);
    assert_eq!(code, code::REJECTED);
    assert!(text.contains("does not match"), "{text}");
    assert!(matches!(reason, RejectReason::NodeIdMismatch { .. }));
}

/// A stream with a use type other than `msg` closes the connection as a protocol violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_stream_type_is_a_protocol_violation() {
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let (_endpoint, conn) = raw_client(&pki, &server, "edge-1").await;
    let (_c1, _c2, _) = raw::quic_handshake(&conn, "edge-1")
        .await
        .expect("handshake");
    let served = server.accept().await;
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    send.write_all(b"str").await.expect("write");
    send.write_all(b"raw bytes").await.expect("write");
    match within("recv", served.recv()).await {
        Err(RecvError::PeerMisbehaved { detail }) => assert!(detail.contains("str"), "{detail}"),
        other => panic!("expected PeerMisbehaved, got {other:?}"),
    }
    assert_eq!(
        app_close(&within("close", conn.closed()).await).0,
        code::PROTOCOL_VIOLATION
    );
}

/// A client offering another ALPN (or none) does not get a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_alpn_is_refused() {
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    let offers: [&[&[u8]]; 2] = [&[b"h3"], &[]];
    for alpn in offers {
        let tls = raw::client_tls(&pki.anchors(), Some(&pki.node("edge-1")), alpn);
        // The TLS handshake fails with alert 120 (no_application_protocol, RFC 9001 §8.1): the
        // client sees CONNECTION_CLOSE with CRYPTO_ERROR 0x178, never an application code.
        match raw::quic_connect(server.addr, tls).await {
            Ok(_) => panic!("a connection offering ALPN {alpn:?} was established"),
            Err(quinn::ConnectionError::ConnectionClosed(close)) => {
                assert_eq!(
                    u64::from(close.error_code),
                    0x100 + 120,
                    "{alpn:?}: {close}"
                );
            }
            Err(other) => panic!("{alpn:?}: expected CRYPTO_ERROR 0x178, got {other:?}"),
        }
        let reason = server.rejection().await;
        assert_eq!(reason.label(), "tls", "{reason}");
    }
}

/// A stream whose `msg` prefix never completes does not hold a reader forever (W15): the
/// connection is closed as a protocol violation after the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_stream_prefix_times_out() {
    let pki = Pki::new();
    let link = transport::config::LinkConfig {
        handshake_timeout: std::time::Duration::from_secs(1),
        ..h::test_link()
    };
    let mut server = TestServer::start(P, pki.listen_config(link)).await;
    let (_endpoint, conn) = raw_client(&pki, &server, "edge-1").await;
    let (_c1, _c2, _) = raw::quic_handshake(&conn, "edge-1")
        .await
        .expect("handshake");
    let served = server.accept().await;
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    send.write_all(b"ms").await.expect("write");
    match within("recv", served.recv()).await {
        Err(RecvError::PeerMisbehaved { detail }) => {
            assert!(detail.contains("use type"), "{detail}")
        }
        other => panic!("expected PeerMisbehaved, got {other:?}"),
    }
    assert_eq!(
        app_close(&within("close", conn.closed()).await).0,
        code::PROTOCOL_VIOLATION
    );
}

/// A server that dies without a word (a SIGKILLed cloudcore) and comes back on the same address
/// with the same key: the edge's next packet is answered with a stateless reset it accepts, so
/// the edge learns of the restart at once (a connection reset), not after its idle timeout.
#[test]
fn a_restarted_server_resets_the_connections_of_its_previous_life() {
    let pki = Pki::new();
    let runtime = |name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let first_life = runtime("first-life");
    let client_rt = runtime("client");
    let link = h::test_link();
    let (addr, held) = first_life.block_on(async {
        let mut server = TestServer::start(P, pki.listen_config(link.clone())).await;
        let addr = server.addr;
        // The server's side stays alive until the runtime dies, as in a killed process.
        let held = tokio::spawn(async move {
            let conn = server.accept().await;
            let msg = conn.recv().await;
            std::future::pending::<()>().await;
            drop((server, conn, msg));
        });
        (addr, held)
    });
    let conn = client_rt.block_on(async {
        let conn = within(
            "connect",
            transport::connect(P, &pki.dial_config(addr, "edge-1", link.clone())),
        )
        .await
        .expect("connect");
        conn.send(message("r", 1, Content::text("hello")))
            .await
            .expect("send");
        conn
    });
    // Dies without closing anything: its tasks and socket vanish, no CONNECTION_CLOSE is sent.
    drop(held);
    first_life.shutdown_background();
    let second_life = runtime("second-life");
    let _server = second_life.block_on(async {
        // The old runtime drops its tasks, and with them the socket, in the background.
        let socket = within("the old socket to go", async {
            loop {
                match transport::ListenSocket::bind(P, addr).await {
                    Ok(socket) => return socket,
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = rx.await;
        });
        let listener = transport::listen(P, socket, pki.listen_config(link.clone()), shutdown)
            .expect("listen");
        (listener, _tx)
    });
    let outcome = client_rt.block_on(async {
        // Data makes the client send at once; the keep-alive would do it within 2 s anyway.
        let _ = conn
            .send(message("r", 2, Content::text("are you there")))
            .await;
        within("the restarted server's verdict", conn.recv()).await
    });
    match outcome {
        Err(RecvError::Io { kind, .. }) => assert_eq!(kind, std::io::ErrorKind::ConnectionReset),
        other => panic!(
            "expected a stateless reset, got {other:?} (the idle timeout is {:?})",
            link.read_deadline
        ),
    }
}
