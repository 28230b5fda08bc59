//! Malformed WebSocket traffic against the WebSocket listener (the one cloudcore serves nodes on),
//! in the manner of the Autobahn suite: raw frames written over a rustls client after a real
//! upgrade with a valid node certificate. Each case checks RFC 6455's answer (the close code the
//! server sends) and that the connection then ends cleanly (TLS close, EOF), or, for traffic the
//! RFC allows (fragments, control frames between fragments), that the message is delivered.

use std::time::Duration;

use causeway_tests::transport_harness::{self as h, Pki, TestServer, WAIT, raw, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use transport::config::LinkConfig;
use transport::{Connection, Protocol};

const P: Protocol = Protocol::WebSocket;
/// The cap the server under test enforces, small so that oversize cases are cheap.
const MAX: usize = 64 * 1024;

const TEXT: u8 = 0x1;
const CONT: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// One raw client frame: `first` is the whole first byte (FIN, RSV1-3, opcode); masked unless
/// `masked` is false; the length field as RFC 6455 §5.2 lays it out.
fn frame(first: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x13, 0xc7, 0x02];
    let bit = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= 0xffff => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A final, masked frame with `opcode`.
fn fin(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(0x80 | opcode, true, payload)
}

/// A non-final, masked frame with `opcode`.
fn part(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(opcode, true, payload)
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// A valid KubeEdge message as the edge writes it (JSON plus LF).
fn json_message(id: &str, body: &str) -> Vec<u8> {
    let msg = proto::Message::new("")
        .route("edge", "resource", "faults", "update")
        .content(proto::Content::text(body));
    let mut msg = msg;
    msg.header.id = id.to_owned();
    proto::json::to_ws_text(&msg).into_bytes()
}

/// The server under test (one PKI and listener per test: certificates are the slow part).
struct Bench {
    pki: Pki,
    server: TestServer,
}

/// One upgraded raw client and the server side of that connection.
struct Link {
    stream: TlsStream<TcpStream>,
    served: Box<dyn Connection>,
}

impl Bench {
    async fn new() -> Self {
        let pki = Pki::new();
        // No keep-alive ping or read deadline within a test's span: the server must end the
        // connection because of the closing handshake, not because a timer fired.
        let cfg = LinkConfig {
            max_message_size: MAX,
            read_deadline: Duration::from_secs(600),
            keep_alive_interval: Duration::from_secs(300),
            ..h::test_link()
        };
        let server = TestServer::start(P, pki.listen_config(cfg)).await;
        Self { pki, server }
    }

    async fn link(&mut self) -> Link {
        let tls = raw::client_tls(&self.pki.anchors(), Some(&self.pki.node("edge-1")), &[]);
        let mut stream = raw::tls_connect(self.server.addr, tls).await.expect("tls");
        let head = raw::ws_upgrade(&mut stream, &raw::ws_request("edge-1", "p", Some("msg")))
            .await
            .expect("upgrade");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let served = self.server.accept().await;
        Link { stream, served }
    }

    /// Sends `bytes` on a fresh link and returns the close code the server answers with.
    async fn answer_to(&mut self, bytes: &[u8]) -> Option<u16> {
        let mut link = self.link().await;
        link.send(bytes).await;
        link.expect_close().await
    }
}

/// One server frame: (FIN, opcode, payload). Server frames must be unmasked with RSV clear.
async fn read_frame(stream: &mut TlsStream<TcpStream>) -> std::io::Result<(bool, u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    assert_eq!(head[0] & 0x70, 0, "server sets no reserved bit");
    assert_eq!(head[1] & 0x80, 0, "server frames are unmasked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).await?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).await?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).expect("length")];
    stream.read_exact(&mut payload).await?;
    Ok((head[0] & 0x80 != 0, head[0] & 0x0f, payload))
}

impl Link {
    async fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed on an earlier frame: a failed write is fine, the
        // answer is checked by reading.
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// Reads until the server's close frame (skipping its keep-alive pings and any pongs),
    /// returns its status code (None for an empty close), then checks that the connection ends:
    /// EOF (TLS close_notify or FIN) after we answer with our close frame.
    async fn expect_close(&mut self) -> Option<u16> {
        let code = within("close frame", async {
            loop {
                let (_, opcode, payload) = self.read_frame_or_panic().await;
                match opcode {
                    CLOSE => {
                        assert_ne!(payload.len(), 1, "a close payload is 0 or >= 2 bytes");
                        break (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    }
                    PING | PONG | TEXT => continue,
                    other => panic!("unexpected opcode {other:#x} before the close frame"),
                }
            }
        })
        .await;
        // Complete the closing handshake as a well-behaved client would, then the server must end
        // the connection: read returns EOF (or a reset once it has gone), never hangs.
        let _ = self.stream.write_all(&fin(CLOSE, &[])).await;
        let _ = self.stream.flush().await;
        let mut buf = [0u8; 1024];
        let ended = tokio::time::timeout(WAIT, async {
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the server did not end the connection after its close"
        );
        // The server side reports the end too: recv returns, it does not hang.
        let _ = within("server recv after close", self.served.recv()).await;
        code
    }

    async fn read_frame_or_panic(&mut self) -> (bool, u8, Vec<u8>) {
        match self.read_frame_checked().await {
            Ok(f) => f,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }

    async fn read_frame_checked(&mut self) -> std::io::Result<(bool, u8, Vec<u8>)> {
        read_frame(&mut self.stream).await
    }

    /// Reads until a pong (skipping pings), returns its payload.
    async fn expect_pong(&mut self) -> Vec<u8> {
        within("pong", async {
            loop {
                let (fin, opcode, payload) = self.read_frame_or_panic().await;
                assert!(fin, "server control frames are final");
                match opcode {
                    PONG => break payload,
                    PING => continue,
                    other => panic!("expected a pong, got opcode {other:#x}"),
                }
            }
        })
        .await
    }

    /// The next message the server delivers (the connection must still be up).
    async fn delivered(&mut self) -> proto::Message {
        within("recv", self.served.recv())
            .await
            .expect("recv")
            .expect("a message")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_message_is_reassembled_with_control_frames_between() {
    let mut b = Bench::new().await;
    let mut link = b.link().await;
    let text = json_message("frag-1", "fragmented body");
    let (a, rest) = text.split_at(10);
    let (b, c) = rest.split_at(rest.len() / 2);
    link.send(&part(TEXT, a)).await;
    // RFC 6455 §5.4: control frames may be injected in the middle of a fragmented message.
    link.send(&fin(PING, b"mid-fragment")).await;
    link.send(&part(CONT, b)).await;
    link.send(&fin(PONG, b"unsolicited")).await;
    link.send(&part(CONT, &[])).await;
    link.send(&fin(CONT, c)).await;
    assert_eq!(link.expect_pong().await, b"mid-fragment");
    let got = link.delivered().await;
    assert_eq!(got.header.id, "frag-1");
    assert_eq!(got.content.to_bytes(), b"fragmented body".as_slice());

    // The link is still usable, and a later single-frame message arrives too.
    link.send(&fin(TEXT, &json_message("whole-2", "x"))).await;
    assert_eq!(link.delivered().await.header.id, "whole-2");
    // A normal close is echoed with 1000.
    link.send(&fin(CLOSE, &close_payload(1000, "bye"))).await;
    assert_eq!(link.expect_close().await, Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_1009() {
    let mut b = Bench::new().await;
    // The header alone announces more than the cap: refused before the payload is buffered.
    let mut bytes = vec![0x81, 0x80 | 127];
    bytes.extend_from_slice(&(MAX as u64 + 1).to_be_bytes());
    bytes.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(b.answer_to(&bytes).await, Some(1009));
    // A whole frame just over the cap.
    assert_eq!(
        b.answer_to(&fin(TEXT, &vec![b' '; MAX + 1])).await,
        Some(1009)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fragmented_message_is_1009() {
    let mut b = Bench::new().await;
    // Every fragment is under the cap; their sum is not.
    let chunk = vec![b' '; MAX / 4];
    let mut bytes = part(TEXT, &chunk);
    for _ in 0..4 {
        bytes.extend(part(CONT, &chunk));
    }
    bytes.extend(fin(CONT, &chunk));
    assert_eq!(b.answer_to(&bytes).await, Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_utf8_is_1007() {
    let mut b = Bench::new().await;
    assert_eq!(
        b.answer_to(&fin(TEXT, b"{\"a\":\"\xff\xfe\"}")).await,
        Some(1007)
    );
    // Invalid across fragments (a truncated sequence at the end of the message).
    let mut bytes = part(TEXT, b"{\"a\":\"\xce");
    bytes.extend(fin(CONT, b"\xba\xe1\xbd\xb9\xce"));
    assert_eq!(b.answer_to(&bytes).await, Some(1007));
    // Valid UTF-8 that is not a KubeEdge message: also 1007 (data inconsistent with the type).
    assert_eq!(
        b.answer_to(&fin(TEXT, "κόσμε".as_bytes())).await,
        Some(1007)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_bad_code_is_1002() {
    let mut b = Bench::new().await;
    for code in [
        0u16, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        assert_eq!(
            b.answer_to(&fin(CLOSE, &close_payload(code, ""))).await,
            Some(1002),
            "close code {code}"
        );
    }
    // A one-byte close payload cannot hold a code.
    assert_eq!(b.answer_to(&fin(CLOSE, &[0x03])).await, Some(1002));
    // Valid codes are echoed as a normal close.
    for code in [1000u16, 1001, 1003, 1007, 1011, 3000, 4999] {
        let answer = b.answer_to(&fin(CLOSE, &close_payload(code, "ok"))).await;
        assert!(
            matches!(answer, Some(c) if c == code || c == 1000),
            "close code {code} answered {answer:?}"
        );
    }
    // An empty close is answered (with an empty close or 1000).
    let answer = b.answer_to(&fin(CLOSE, &[])).await;
    assert!(matches!(answer, None | Some(1000)), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_after_close_is_not_delivered() {
    let mut b = Bench::new().await;
    let mut link = b.link().await;
    let mut bytes = fin(CLOSE, &close_payload(1000, ""));
    bytes.extend(fin(TEXT, &json_message("after-close", "x")));
    link.send(&bytes).await;
    assert_eq!(link.expect_close().await, Some(1000));
    // `expect_close` already saw `recv` return; it must not have been this message.
    let again = within("recv", link.served.recv()).await;
    assert!(
        !matches!(again, Ok(Some(_))),
        "data after close delivered: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmasked_client_frame_is_1002() {
    let mut b = Bench::new().await;
    let text = json_message("unmasked", "x");
    assert_eq!(
        b.answer_to(&frame(0x80 | TEXT, false, &text)).await,
        Some(1002)
    );
    assert_eq!(
        b.answer_to(&frame(0x80 | PING, false, b"p")).await,
        Some(1002)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_bits_and_opcodes_are_1002() {
    let mut b = Bench::new().await;
    let text = json_message("rsv", "x");
    for rsv in [0x40u8, 0x20, 0x10, 0x70] {
        assert_eq!(
            b.answer_to(&frame(0x80 | rsv | TEXT, true, &text)).await,
            Some(1002),
            "rsv {rsv:#x}"
        );
    }
    for opcode in [0x3u8, 0x7, 0xB, 0xF] {
        assert_eq!(
            b.answer_to(&fin(opcode, b"")).await,
            Some(1002),
            "opcode {opcode:#x}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_control_frames_and_fragment_sequences_are_1002() {
    let mut b = Bench::new().await;
    // A control frame over 125 bytes.
    assert_eq!(b.answer_to(&fin(PING, &[b'x'; 126])).await, Some(1002));
    // A fragmented control frame.
    assert_eq!(b.answer_to(&part(PING, b"a")).await, Some(1002));
    // A continuation with nothing to continue.
    assert_eq!(b.answer_to(&fin(CONT, b"x")).await, Some(1002));
    // A new data message before the fragmented one has ended.
    let mut bytes = part(TEXT, b"{");
    bytes.extend(fin(TEXT, b"}"));
    assert_eq!(b.answer_to(&bytes).await, Some(1002));
}

/// A valid message still arrives after a case that only ends its own link: the listener keeps
/// serving (no case takes the listener down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_survives_bad_peers() {
    let pki = Pki::new();
    let mut server = TestServer::start(P, pki.listen_config(h::test_link())).await;
    for i in 0..3 {
        let tls = raw::client_tls(&pki.anchors(), Some(&pki.node("edge-1")), &[]);
        let mut stream = raw::tls_connect(server.addr, tls).await.expect("tls");
        let head = raw::ws_upgrade(&mut stream, &raw::ws_request("edge-1", "p", Some("msg")))
            .await
            .expect("upgrade");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let served = server.accept().await;
        if i < 2 {
            stream.write_all(&fin(0x3, b"")).await.expect("write");
            let got = within("recv", served.recv()).await;
            assert!(
                got.is_err(),
                "a reserved opcode ends the link with an error: {got:?}"
            );
        } else {
            stream
                .write_all(&fin(TEXT, &json_message("ok", "x")))
                .await
                .expect("write");
            let got = within("recv", served.recv())
                .await
                .expect("recv")
                .expect("msg");
            assert_eq!(got.header.id, "ok");
        }
        drop(stream);
    }
}
