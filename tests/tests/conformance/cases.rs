//! The behaviour every adapter must have, written once against `transport`'s traits. Each case is
//! an `async fn(Protocol)`; `conformance.rs` instantiates all of them per adapter.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_tests::transport_harness::{
    self as h, Pki, Relay, TestServer, WAIT, message, raw, within,
};
use proto::close::SessionCloseCode;
use proto::{Content, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::config::{DEFAULT_PROJECT_ID, LinkConfig};
use transport::{
    AcceptError, Capabilities, CloseReason, ConnectError, Connection, DialConfig, Protocol,
    RecvError, RejectReason, SendError,
};

/// A server, and one client connected to it as `edge-1`.
struct Pair {
    pki: Pki,
    server: TestServer,
    client: Box<dyn Connection>,
    served: Box<dyn Connection>,
}

async fn pair_with(p: Protocol, server_link: LinkConfig, client_link: LinkConfig) -> Pair {
    let pki = Pki::new();
    let mut server = TestServer::start(p, pki.listen_config(server_link)).await;
    let config = pki.dial_config(server.addr, "edge-1", client_link);
    let client = within("connect", transport::connect(p, &config))
        .await
        .expect("connect");
    let served = server.accept().await;
    Pair {
        pki,
        server,
        client,
        served,
    }
}

async fn pair(p: Protocol) -> Pair {
    pair_with(p, h::test_link(), h::test_link()).await
}

async fn recv_one(conn: &dyn Connection) -> Message {
    match within("recv", conn.recv()).await {
        Ok(Some(msg)) => msg,
        Ok(None) => panic!("connection closed while a message was expected"),
        Err(e) => panic!("recv failed: {e}"),
    }
}

async fn connect_err(p: Protocol, config: &DialConfig) -> ConnectError {
    match within("connect", transport::connect(p, config)).await {
        Ok(conn) => panic!("connect succeeded, peer {:?}", conn.peer()),
        Err(e) => e,
    }
}

/// The listener still serves a well-behaved client after whatever the test did.
async fn still_serves(pki: &Pki, server: &mut TestServer, p: Protocol) {
    let config = pki.dial_config(server.addr, "edge-ok", h::test_link());
    let client = within("connect", transport::connect(p, &config))
        .await
        .expect("a good client must still connect");
    let served = loop {
        match server.next().await {
            Some(Ok(conn)) => break conn,
            // Late reports of the misbehaving client may still be queued.
            Some(Err(AcceptError::Rejected { .. })) => {}
            other => panic!("expected the good client, got {:?}", other.map(|r| r.err())),
        }
    };
    let ping = message("default/pod/ok", 1, Content::text("still here"));
    client.send(ping.clone()).await.expect("send");
    h::assert_same(&ping, &recv_one(&*served).await);
}

// --- round trip, identity, capabilities ------------------------------------------------------

/// Messages cross both ways, every field intact; the server may speak first (W4); both ends see
/// the verified identity of the other.
pub(crate) async fn round_trip(p: Protocol) {
    let Pair {
        pki,
        client,
        served,
        ..
    } = pair(p).await;

    let server_view = served.peer();
    assert_eq!(server_view.protocol, p);
    assert_eq!(
        server_view.node_id.as_ref().map(|n| n.as_str()),
        Some("edge-1")
    );
    assert_eq!(server_view.project_id.as_deref(), Some(DEFAULT_PROJECT_ID));
    assert_eq!(
        certs::node_id_from_cert(&server_view.certificate)
            .unwrap()
            .as_str(),
        "edge-1"
    );
    assert_eq!(server_view.capabilities, Capabilities::ALL);
    let client_view = client.peer();
    assert_eq!(client_view.certificate, pki.server.chain[0]);
    assert_eq!(client_view.node_id, None);
    assert_eq!(client_view.capabilities, Capabilities::ALL);

    // The cloud speaks first, before the edge has sent anything.
    let mut down = message("default/pod/nginx", 1, Content::text("hello edge"));
    down.header.resource_version = "987654".into();
    down.header.message_type = "channel".into();
    down.route.destination = "edged".into();
    served.send(down.clone()).await.expect("send down");
    h::assert_same(&down, &recv_one(&*client).await);

    let up = [
        message("node", 1, Content::text("ping")),
        message(
            "default/pod/nginx",
            2,
            Content::Json(serde_json::json!({"b": [1, 2.5, null], "a": "<&>"})),
        ),
        {
            let mut resp = Message::response_to(&down, Content::text("OK"));
            resp.header.sync = true;
            resp
        },
    ];
    for msg in &up {
        client.send(msg.clone()).await.expect("send up");
    }
    // Order is only promised per resource (QUIC spreads resources over streams).
    let mut got = HashMap::new();
    for _ in &up {
        let msg = recv_one(&*served).await;
        got.insert(msg.header.id.clone(), msg);
    }
    for msg in &up {
        h::assert_same(msg, &got[&msg.header.id]);
    }
}

/// Each side sees the intersection of what the client offers and the server supports.
pub(crate) async fn capabilities_are_negotiated(p: Protocol) {
    let pki = Pki::new();
    let mut config = pki.listen_config(h::test_link());
    config.capabilities = Capabilities::NONE;
    let mut server = TestServer::start(p, config).await;
    let dial = pki.dial_config(server.addr, "edge-1", h::test_link());
    let client = transport::connect(p, &dial).await.expect("connect");
    let served = server.accept().await;
    assert_eq!(client.peer().capabilities, Capabilities::NONE);
    assert_eq!(served.peer().capabilities, Capabilities::NONE);

    let mut server = TestServer::start(p, pki.listen_config(h::test_link())).await;
    let mut dial = pki.dial_config(server.addr, "edge-2", h::test_link());
    dial.capabilities = Capabilities::NONE;
    let client = transport::connect(p, &dial).await.expect("connect");
    let served = server.accept().await;
    assert_eq!(client.peer().capabilities, Capabilities::NONE);
    assert_eq!(served.peer().capabilities, Capabilities::NONE);
}

// --- concurrency and order --------------------------------------------------------------------

/// Many tasks send at once in both directions while each side receives concurrently.
pub(crate) async fn concurrent_senders_both_directions(p: Protocol) {
    const TASKS: u64 = 8;
    const EACH: u64 = 200;
    let Pair { client, served, .. } = pair(p).await;
    let client: Arc<dyn Connection> = Arc::from(client);
    let served: Arc<dyn Connection> = Arc::from(served);

    let mut senders = tokio::task::JoinSet::new();
    for (side, conn) in [("up", client.clone()), ("down", served.clone())] {
        for t in 0..TASKS {
            let conn = conn.clone();
            senders.spawn(async move {
                for i in 0..EACH {
                    let msg = message(&format!("{side}/r{t}"), i, Content::text("x".repeat(100)));
                    conn.send(msg).await.expect("send");
                }
            });
        }
    }
    let receive = |conn: Arc<dyn Connection>| async move {
        let mut ids = HashSet::new();
        while ids.len() < (TASKS * EACH) as usize {
            let msg = recv_one(&*conn).await;
            assert!(
                ids.insert(msg.header.id.clone()),
                "duplicate {}",
                msg.header.id
            );
        }
        ids
    };
    let (at_server, at_client) = tokio::join!(receive(served.clone()), receive(client.clone()));
    while let Some(done) = senders.join_next().await {
        done.expect("sender task");
    }
    assert!(at_server.iter().all(|id| id.starts_with("up/")));
    assert!(at_client.iter().all(|id| id.starts_with("down/")));
}

/// Messages about one resource arrive in the order they were sent, whatever else is in flight.
pub(crate) async fn per_key_order_under_load(p: Protocol) {
    const RESOURCES: usize = 16;
    const EACH: u64 = 150;
    let Pair { client, served, .. } = pair(p).await;
    let client: Arc<dyn Connection> = Arc::from(client);

    let mut senders = tokio::task::JoinSet::new();
    for task in 0..4 {
        let client = client.clone();
        senders.spawn(async move {
            for i in 0..EACH {
                for r in (task..RESOURCES).step_by(4) {
                    // Mixed sizes so streams and frames interleave unevenly.
                    let size = if (i as usize + r) % 7 == 0 { 8192 } else { 40 };
                    let msg = message(&format!("ns/pod/p{r}"), i, Content::text("y".repeat(size)));
                    client.send(msg).await.expect("send");
                }
            }
        });
    }
    let mut next: HashMap<String, u64> = HashMap::new();
    for _ in 0..RESOURCES as u64 * EACH {
        let msg = recv_one(&*served).await;
        let expected = next.entry(msg.route.resource.clone()).or_default();
        assert_eq!(
            h::seq_of(&msg),
            *expected,
            "out of order on {}",
            msg.route.resource
        );
        *expected += 1;
    }
    while let Some(done) = senders.join_next().await {
        done.expect("sender task");
    }
}

// --- size cap ---------------------------------------------------------------------------------

/// A message of exactly the cap passes; one byte more is refused by the sender with a clear
/// error (connection intact), and by a receiver whose cap is smaller (that connection closed,
/// others unaffected).
pub(crate) async fn message_size_cap(p: Protocol) {
    const CAP: usize = 64 * 1024;
    let link = LinkConfig {
        max_message_size: CAP,
        ..h::test_link()
    };
    let Pair {
        pki,
        mut server,
        client,
        served,
    } = pair_with(p, link.clone(), link).await;

    let at_cap = h::message_of_wire_size(p, CAP);
    assert_eq!(transport::encoded_len(p, &at_cap), CAP);
    client
        .send(at_cap.clone())
        .await
        .expect("a message at the cap");
    h::assert_same(&at_cap, &recv_one(&*served).await);

    let over = h::message_of_wire_size(p, CAP + 1);
    match client.send(over).await {
        Err(SendError::TooLarge { len, max }) => assert_eq!((len, max), (CAP + 1, CAP)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let after = message("default/pod/after", 1, Content::text("still usable"));
    client
        .send(after.clone())
        .await
        .expect("send after refusal");
    h::assert_same(&after, &recv_one(&*served).await);

    // A peer with a larger cap sends one byte over ours: we refuse it while reading.
    let mut big = pki.dial_config(server.addr, "edge-big", h::test_link());
    big.link.max_message_size = 4 * CAP;
    let big_client = transport::connect(p, &big).await.expect("connect");
    let big_served = server.accept().await;
    big_client
        .send(h::message_of_wire_size(p, CAP + 1))
        .await
        .expect("the sender's own cap allows it");
    match within("recv", big_served.recv()).await {
        Err(RecvError::TooLarge { max, .. }) => assert_eq!(max, CAP),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The offender learns its connection was closed ...
    match within("recv", big_client.recv()).await {
        Err(RecvError::Closed {
            reason: CloseReason::PeerAborted { .. },
        }) => {}
        other => panic!("expected the server to abort the connection, got {other:?}"),
    }
    // ... and the other connection is unaffected.
    let again = message("default/pod/again", 1, Content::text("unaffected"));
    client.send(again.clone()).await.expect("send");
    h::assert_same(&again, &recv_one(&*served).await);
}

// --- malformed input --------------------------------------------------------------------------

/// What a bad peer sends after a valid handshake.
#[derive(Clone, Copy, Debug)]
enum Garbage {
    /// Bytes that are not a message (bad JSON / bad protobuf).
    NotAMessage,
    /// An empty payload (W1: KubeEdge's decoder dereferences nil on it).
    Empty,
    /// A frame announcing 4 GiB (W2/W3: must be refused before allocating).
    Giant,
}

/// A raw client, authenticated as `node`, that sends `garbage` after the handshake. Returns a
/// handle keeping it alive and a future resolving when the server closes it.
async fn bad_peer(
    p: Protocol,
    pki: &Pki,
    addr: std::net::SocketAddr,
    node: &str,
    garbage: Garbage,
) -> Box<dyn std::any::Any + Send> {
    let identity = pki.node(node);
    match p {
        Protocol::WebSocket => {
            let tls = raw::client_tls(&pki.anchors(), Some(&identity), &[]);
            let mut stream = raw::tls_connect(addr, tls).await.expect("tls");
            let head = raw::ws_upgrade(&mut stream, &raw::ws_request(node, "p", Some("msg")))
                .await
                .expect("upgrade");
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            let bytes = match garbage {
                Garbage::NotAMessage => raw::ws_client_frame(1, b"{\"header\": not json}\n"),
                Garbage::Empty => raw::ws_client_frame(2, b""),
                Garbage::Giant => raw::ws_client_frame_header(1 << 32),
            };
            stream.write_all(&bytes).await.expect("write");
            stream.flush().await.expect("flush");
            Box::new(stream)
        }
        Protocol::Quic => {
            let tls = raw::client_tls(&pki.anchors(), Some(&identity), &[b"causeway/1"]);
            let (endpoint, conn) = raw::quic_connect(addr, tls).await.expect("quic");
            let (ctl_send, ctl_recv, ack) = raw::quic_handshake(&conn, node).await.expect("hs");
            assert_eq!(ack.route.operation, "response");
            let (mut send, recv) = conn.open_bi().await.expect("stream");
            let mut bytes = b"msg".to_vec();
            match garbage {
                Garbage::NotAMessage => {
                    // Field 1 announces 127 bytes that never come.
                    bytes.extend_from_slice(&[1, 1, 1, 0, 1, 0, 0, 0, 0, 3, 0x0a, 0x7f, 0x00]);
                }
                Garbage::Empty => bytes.extend_from_slice(&[1, 1, 1, 0, 1, 0, 0, 0, 0, 0]),
                Garbage::Giant => {
                    bytes.extend_from_slice(&[1, 1, 1, 0, 1, 0, 0xff, 0xff, 0xff, 0xff])
                }
            }
            send.write_all(&bytes).await.expect("write");
            Box::new((endpoint, conn, ctl_send, ctl_recv, send, recv))
        }
    }
}

async fn malformed_input(p: Protocol, garbage: Garbage) {
    let Pair {
        pki,
        mut server,
        client,
        served,
    } = pair(p).await;
    let _bad = bad_peer(p, &pki, server.addr, "edge-bad", garbage).await;
    let bad_served = server.accept().await;
    let err = within("recv from the bad peer", bad_served.recv())
        .await
        .expect_err("garbage must not decode");
    match (garbage, &err) {
        (Garbage::Giant, RecvError::TooLarge { len, .. }) => {
            assert!(*len >= 1 << 32 || p == Protocol::Quic)
        }
        (Garbage::NotAMessage | Garbage::Empty, RecvError::Malformed { .. }) => {}
        _ => panic!("{garbage:?}: unexpected {err:?}"),
    }
    // The well-behaved connection is unaffected, and the listener serves new ones.
    let msg = message("default/pod/fine", 1, Content::text("fine"));
    client.send(msg.clone()).await.expect("send");
    h::assert_same(&msg, &recv_one(&*served).await);
    still_serves(&pki, &mut server, p).await;
}

/// Bytes that are not a message close that connection with `Malformed`; nothing else is hurt.
pub(crate) async fn malformed_message_closes_only_that_connection(p: Protocol) {
    malformed_input(p, Garbage::NotAMessage).await;
}

/// An empty payload (KubeEdge crashes on it, W1) is refused cleanly.
pub(crate) async fn empty_payload_is_refused(p: Protocol) {
    malformed_input(p, Garbage::Empty).await;
}

/// A frame announcing 4 GiB is refused from its header, before any allocation (W2, W3).
pub(crate) async fn giant_frame_announcement_is_refused(p: Protocol) {
    malformed_input(p, Garbage::Giant).await;
}

// --- identity ---------------------------------------------------------------------------------

/// A client without a certificate is refused at the TLS layer and reported.
pub(crate) async fn no_client_certificate_is_rejected(p: Protocol) {
    let pki = Pki::new();
    let mut server = TestServer::start(p, pki.listen_config(h::test_link())).await;
    match p {
        Protocol::WebSocket => {
            let tls = raw::client_tls(&pki.anchors(), None, &[]);
            // TLS 1.3: the client finishes first; the refusal arrives as an alert on read.
            if let Ok(mut stream) = raw::tls_connect(server.addr, tls).await {
                let head =
                    raw::ws_upgrade(&mut stream, &raw::ws_request("edge-1", "p", Some("msg")))
                        .await;
                assert!(!head.is_ok_and(|h| h.starts_with("HTTP/1.1 101")));
            }
        }
        Protocol::Quic => {
            let tls = raw::client_tls(&pki.anchors(), None, &[b"causeway/1"]);
            if let Ok((_endpoint, conn)) = raw::quic_connect(server.addr, tls).await {
                assert!(raw::quic_handshake(&conn, "edge-1").await.is_err());
            }
        }
    }
    assert_eq!(server.rejection().await, RejectReason::NoClientCertificate);
    still_serves(&pki, &mut server, p).await;
}

/// A certificate from another CA is refused.
pub(crate) async fn certificate_from_another_ca_is_rejected(p: Protocol) {
    let pki = Pki::new();
    let other = Pki::new();
    let mut server = TestServer::start(p, pki.listen_config(h::test_link())).await;
    let mut config = pki.dial_config(server.addr, "edge-1", h::test_link());
    config.identity = other.node("edge-1");
    let err = connect_err(p, &config).await;
    assert!(matches!(err, ConnectError::Tls(_)), "{err:?}");
    let reason = server.rejection().await;
    assert_eq!(reason.label(), "untrusted_certificate", "{reason}");
    still_serves(&pki, &mut server, p).await;
}

/// An expired client certificate is refused.
pub(crate) async fn expired_client_certificate_is_rejected(p: Protocol) {
    let pki = Pki::new();
    let mut server = TestServer::start(p, pki.listen_config(h::test_link())).await;
    let mut config = pki.dial_config(server.addr, "edge-1", h::test_link());
    config.identity = pki.expired_node("edge-1");
    let err = connect_err(p, &config).await;
    assert!(matches!(err, ConnectError::Tls(_)), "{err:?}");
    assert_eq!(server.rejection().await, RejectReason::ExpiredCertificate);
    still_serves(&pki, &mut server, p).await;
}

/// The client refuses an expired server certificate.
pub(crate) async fn expired_server_certificate_is_refused_by_the_client(p: Protocol) {
    let pki = Pki::new();
    let mut config = pki.listen_config(h::test_link());
    config.identity = pki.expired_server();
    let mut server = TestServer::start(p, config).await;
    let dial = pki.dial_config(server.addr, "edge-1", h::test_link());
    let err = connect_err(p, &dial).await;
    assert!(matches!(err, ConnectError::Tls(_)), "{err:?}");
    let reason = server.rejection().await;
    assert_eq!(reason.label(), "tls", "{reason}");
}

/// A node claiming another node's id is refused with a reason, before any message is delivered.
pub(crate) async fn node_id_not_matching_certificate_is_rejected(p: Protocol) {
    let pki = Pki::new();
    let mut server = TestServer::start(p, pki.listen_config(h::test_link())).await;
    let mut config = pki.dial_config(server.addr, "edge-1", h::test_link());
    config.node_id = h::node_id("edge-2");
    match connect_err(p, &config).await {
        ConnectError::Rejected { status, reason } => {
            assert!(reason.contains("does not match"), "{reason}");
            if p == Protocol::WebSocket {
                assert_eq!(status, Some(403));
            }
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(
        server.rejection().await,
        RejectReason::NodeIdMismatch {
            claimed: "edge-2".into(),
            certified: "edge-1".into()
        }
    );
    still_serves(&pki, &mut server, p).await;
}

/// A certificate from the CA that is not a node certificate (the server's own) is refused.
pub(crate) async fn non_node_certificate_is_rejected(p: Protocol) {
    let pki = Pki::new();
    let mut server = TestServer::start(p, pki.listen_config(h::test_link())).await;
    let mut config = pki.dial_config(server.addr, "edge-1", h::test_link());
    config.identity = pki.server.clone();
    assert!(transport::connect(p, &config).await.is_err());
    let reason = server.rejection().await;
    assert!(
        matches!(
            reason,
            RejectReason::BadCertificate { .. } | RejectReason::NotNodeCertificate { .. }
        ),
        "{reason:?}"
    );
}

// --- liveness ---------------------------------------------------------------------------------

/// A link that goes silent (a black-holed path: no FIN, no RST, nothing) is noticed by both ends
/// within the read deadline; the bound asserted is 10x the deadline.
pub(crate) async fn silent_peer_is_detected(p: Protocol) {
    let deadline = Duration::from_secs(1);
    let link = LinkConfig {
        read_deadline: deadline,
        keep_alive_interval: Duration::from_millis(300),
        ..h::test_link()
    };
    let pki = Pki::new();
    let mut server = TestServer::start(p, pki.listen_config(link.clone())).await;
    let relay = Relay::start(p, server.addr).await;
    let config = pki.dial_config(relay.addr, "edge-1", link);
    let client = transport::connect(p, &config)
        .await
        .expect("connect via relay");
    let served = server.accept().await;
    let msg = message("node", 1, Content::text("ping"));
    client.send(msg.clone()).await.expect("send");
    h::assert_same(&msg, &recv_one(&*served).await);

    relay.blackhole();
    let cut = Instant::now();
    let bound = deadline * 10;
    for (side, conn) in [("server", &served), ("client", &client)] {
        match tokio::time::timeout(bound, conn.recv()).await {
            Ok(Err(RecvError::Timeout { after })) => assert_eq!(after, deadline),
            Ok(other) => panic!("{side}: expected a read timeout, got {other:?}"),
            Err(_) => panic!("{side}: silent peer not noticed within {bound:?}"),
        }
    }
    assert!(cut.elapsed() < bound);
    // Sending on a dead link fails too.
    assert!(
        client
            .send(message("node", 2, Content::text("x")))
            .await
            .is_err()
    );
}

/// When the receiver stops reading, the sender's `send` pends once the bounded buffers and
/// windows are full (its memory does not grow), and resumes when the receiver reads again.
pub(crate) async fn slow_reader_bounds_sender_memory(p: Protocol) {
    const MSG: usize = 64 * 1024;
    const BOUND: usize = 64 * 1024 * 1024;
    let link = LinkConfig {
        write_deadline: Duration::from_secs(120),
        ..h::test_link()
    };
    let Pair { client, served, .. } = pair_with(p, link.clone(), link).await;
    let client: Arc<dyn Connection> = Arc::from(client);
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = tokio::spawn({
        let client = client.clone();
        let stop = stop.clone();
        async move {
            let mut sent = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && sent * MSG < 4 * BOUND {
                let msg = message(
                    "default/pod/bulk",
                    sent as u64,
                    Content::text("z".repeat(MSG)),
                );
                client.send(msg).await.expect("send");
                sent += 1;
                let _ = progress_tx.send(sent);
            }
            sent
        }
    });
    // Progress stops when back-pressure applies; "stopped" = no send completed for 2 s.
    loop {
        match tokio::time::timeout(Duration::from_secs(2), progress.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!(
                "send never applied back-pressure: {} MiB accepted by a peer that reads nothing",
                (*progress.borrow() * MSG) >> 20
            ),
            Err(_) => break,
        }
    }
    let accepted = *progress.borrow();
    assert!(accepted > 0, "nothing could be sent at all");
    assert!(
        accepted * MSG < BOUND,
        "{} MiB accepted before send pended",
        (accepted * MSG) >> 20
    );
    // Reading again lets the sender continue; everything arrives in order.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut got = 0u64;
    let total = loop {
        let msg = recv_one(&*served).await;
        assert_eq!(h::seq_of(&msg), got);
        got += 1;
        if sender.is_finished() {
            let total = within("sender", sender).await.expect("sender task") as u64;
            while got < total {
                assert_eq!(h::seq_of(&recv_one(&*served).await), got);
                got += 1;
            }
            break total;
        }
    };
    assert_eq!(got, total);
    assert!(total as usize > accepted);
}

/// A peer that stops reading for longer than the write deadline fails the sender's `send` with
/// a timeout (KubeEdge's write deadline, enforced).
pub(crate) async fn write_deadline_fails_a_stalled_send(p: Protocol) {
    let deadline = Duration::from_secs(1);
    let link = LinkConfig {
        write_deadline: deadline,
        ..h::test_link()
    };
    let Pair {
        client,
        served: _served,
        ..
    } = pair_with(p, h::test_link(), link).await;
    let started = Instant::now();
    let mut i = 0u64;
    let err = within("a send to fail", async {
        loop {
            let msg = message("default/pod/bulk", i, Content::text("w".repeat(64 * 1024)));
            if let Err(e) = client.send(msg).await {
                break e;
            }
            i += 1;
        }
    })
    .await;
    assert!(
        matches!(
            err,
            SendError::Timeout { .. }
                | SendError::Closed {
                    reason: CloseReason::WriteTimeout { .. }
                }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < WAIT);
}

// --- close and shutdown -----------------------------------------------------------------------

async fn close_delivers(closer: &dyn Connection, reader: &dyn Connection) {
    const N: u64 = 300;
    for i in 0..N {
        let size = if i % 10 == 0 { 20_000 } else { 50 };
        let msg = message(
            &format!("ns/pod/p{}", i % 5),
            i,
            Content::text("c".repeat(size)),
        );
        closer.send(msg).await.expect("send");
    }
    let (closed, received) = tokio::join!(within("close", closer.close("done")), async {
        let mut count = 0u64;
        loop {
            match within("recv", reader.recv()).await {
                Ok(Some(_)) => count += 1,
                Ok(None) => break count,
                Err(e) => panic!("recv after {count} messages: {e}"),
            }
        }
    });
    closed.expect("graceful close");
    assert_eq!(received, N, "messages sent before close must all arrive");
    match closer.send(message("node", 0, Content::text("late"))).await {
        Err(SendError::Closed {
            reason: CloseReason::Local { .. },
        }) => {}
        other => panic!("send after close: {other:?}"),
    }
    assert!(matches!(within("recv", closer.recv()).await, Ok(None)));
}

/// `close` delivers everything sent before it, whichever side closes.
pub(crate) async fn graceful_close_delivers_what_was_sent(p: Protocol) {
    let Pair { client, served, .. } = pair(p).await;
    close_delivers(&*client, &*served).await;
    let Pair { client, served, .. } = pair(p).await;
    close_delivers(&*served, &*client).await;
}

/// A close with a session close code delivers what was sent before it, then reaches the peer as
/// that code (WebSocket close code, QUIC application error code), whichever side closes, for every
/// code of PROTOCOL.md Part A item 9.
pub(crate) async fn session_close_codes_reach_the_peer(p: Protocol) {
    for (i, code) in SessionCloseCode::ALL.into_iter().enumerate() {
        let Pair { client, served, .. } = pair(p).await;
        let (closer, reader) = if i % 2 == 0 {
            (&*served, &*client)
        } else {
            (&*client, &*served)
        };
        let before = message("ns/pod/last", 1, Content::text("before the close"));
        closer.send(before.clone()).await.expect("send");
        let (closed, got) = tokio::join!(
            within("close", closer.close_with(Some(code), "why")),
            async {
                h::assert_same(&before, &recv_one(reader).await);
                within("recv", reader.recv()).await
            }
        );
        closed.expect("close with a code");
        match got {
            Err(e) => {
                assert_eq!(e.session_code(), Some(code), "{code}: {e}");
                assert!(e.to_string().contains("why"), "{e}");
            }
            Ok(other) => panic!("{code}: expected the close code, got {other:?}"),
        }
        match reader.send(message("node", 0, Content::text("late"))).await {
            Err(e) => assert_eq!(e.session_code(), Some(code), "{code}: send: {e}"),
            Ok(()) => panic!("{code}: send after the peer closed succeeded"),
        }
    }
}

/// After the shutdown signal `accept` ends and new clients are refused; established connections
/// keep working.
pub(crate) async fn shutdown_stops_accepting_but_keeps_connections(p: Protocol) {
    let Pair {
        pki,
        mut server,
        client,
        served,
    } = pair(p).await;
    server.shutdown();
    assert!(server.next().await.is_none());
    let mut config = pki.dial_config(server.addr, "edge-late", h::test_link());
    config.link.handshake_timeout = Duration::from_secs(2);
    assert!(transport::connect(p, &config).await.is_err());
    let msg = message("node", 1, Content::text("after shutdown"));
    client.send(msg.clone()).await.expect("send");
    h::assert_same(&msg, &recv_one(&*served).await);
}

/// A client that connects and then says nothing neither blocks other handshakes nor stays
/// forever: it is rejected after the handshake timeout.
pub(crate) async fn stalled_handshake_does_not_block_others(p: Protocol) {
    let pki = Pki::new();
    let link = LinkConfig {
        handshake_timeout: Duration::from_secs(2),
        ..h::test_link()
    };
    let mut server = TestServer::start(p, pki.listen_config(link)).await;
    let _stalled: Box<dyn std::any::Any + Send> = match p {
        Protocol::WebSocket => Box::new(
            tokio::net::TcpStream::connect(server.addr)
                .await
                .expect("tcp"),
        ),
        Protocol::Quic => {
            // Completes QUIC and TLS, then never opens the control stream.
            let tls = raw::client_tls(&pki.anchors(), Some(&pki.node("edge-0")), &[b"causeway/1"]);
            Box::new(raw::quic_connect(server.addr, tls).await.expect("quic"))
        }
    };
    let config = pki.dial_config(server.addr, "edge-1", h::test_link());
    let client = within("connect", transport::connect(p, &config))
        .await
        .expect("a good client connects while another stalls");
    let mut accepted = None;
    let mut timed_out = false;
    while accepted.is_none() || !timed_out {
        match server.next().await {
            Some(Ok(conn)) => accepted = Some(conn),
            Some(Err(AcceptError::Rejected {
                reason: RejectReason::Timeout { .. },
                ..
            })) => timed_out = true,
            other => panic!("unexpected {:?}", other.map(|r| r.err())),
        }
    }
    let msg = message("node", 1, Content::text("hi"));
    client.send(msg.clone()).await.expect("send");
    h::assert_same(&msg, &recv_one(&*accepted.expect("accepted")).await);
}

/// KubeEdge's control operations (`ping`, `pong`, `config`) are answered `ack` by the transport
/// and never delivered (B§4.4).
pub(crate) async fn control_operations_are_acked_not_delivered(p: Protocol) {
    let Pair { client, served, .. } = pair(p).await;
    let mut ping = message("node", 1, Content::text("ping"));
    ping.route.operation = "ping".into();
    client.send(ping.clone()).await.expect("send");
    let data = message("node", 2, Content::text("data"));
    client.send(data.clone()).await.expect("send");
    h::assert_same(&data, &recv_one(&*served).await);
    let ack = recv_one(&*client).await;
    assert_eq!(ack.route.operation, "response");
    assert_eq!(ack.header.parent_id, ping.header.id);
    assert_eq!(ack.content.as_text(), Some("ack"));
}

/// Reading a response from a KubeEdge-format peer (the harness's raw clients) proves nothing hangs
/// on partial input: a connection that closes mid-message ends the reader cleanly.
pub(crate) async fn truncated_stream_is_reported(p: Protocol) {
    let pki = Pki::new();
    let mut server = TestServer::start(p, pki.listen_config(h::test_link())).await;
    let identity = pki.node("edge-cut");
    match p {
        Protocol::WebSocket => {
            let tls = raw::client_tls(&pki.anchors(), Some(&identity), &[]);
            let mut stream = raw::tls_connect(server.addr, tls).await.expect("tls");
            let head = raw::ws_upgrade(&mut stream, &raw::ws_request("edge-cut", "p", Some("msg")))
                .await
                .expect("upgrade");
            assert!(head.starts_with("HTTP/1.1 101"));
            let served = server.accept().await;
            let frame = raw::ws_client_frame(1, b"{\"header\":{\"msg_id\":\"x\"}}\n");
            stream
                .write_all(&frame[..frame.len() / 2])
                .await
                .expect("write");
            stream.shutdown().await.expect("shutdown");
            assert!(within("recv", served.recv()).await.is_err());
            let mut rest = Vec::new();
            let _ = within("eof", stream.read_to_end(&mut rest)).await;
        }
        Protocol::Quic => {
            let tls = raw::client_tls(&pki.anchors(), Some(&identity), &[b"causeway/1"]);
            let (_endpoint, conn) = raw::quic_connect(server.addr, tls).await.expect("quic");
            let (_ctl_send, _ctl_recv, _) =
                raw::quic_handshake(&conn, "edge-cut").await.expect("hs");
            let served = server.accept().await;
            let (mut send, _recv) = conn.open_bi().await.expect("stream");
            let frame = raw::frame(&message("node", 1, Content::text("cut")));
            send.write_all(b"msg").await.expect("write");
            send.write_all(&frame[..frame.len() / 2])
                .await
                .expect("write");
            send.finish().expect("finish");
            match within("recv", served.recv()).await {
                Err(RecvError::Malformed { detail }) => {
                    assert!(detail.contains("ended"), "{detail}")
                }
                other => panic!("expected Malformed, got {other:?}"),
            }
        }
    }
}
