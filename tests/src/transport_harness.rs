//! Fixtures for the transport conformance suite (`tests/tests/conformance.rs`) and anything else
//! that needs a real link: a throw-away PKI ([`Pki`]), a server on `127.0.0.1:0` ([`TestServer`]),
//! loopback relays that can black-hole a live link ([`Relay`]), and raw clients that speak just
//! enough TLS, WebSocket or QUIC to send bytes no well-behaved peer would ([`raw`]).
//!
//! Everything binds port 0 and hands the bound socket over; nothing sleeps to synchronise: waits
//! are on events, bounded by [`WAIT`] so a broken implementation fails instead of hanging.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use certs::{CertificateAuthority, Identity, NodeId, TrustAnchors, Validity};
use proto::{Content, Message};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use transport::config::LinkConfig;
use transport::{
    AcceptError, Connection, DialConfig, ListenConfig, ListenSocket, Listener, Protocol,
    RejectReason,
};

/// Upper bound of any single wait in a test: generous, so only a hang trips it.
pub const WAIT: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A CA, a server certificate for `127.0.0.1` / `localhost`, and node certificates on demand.
pub struct Pki {
    /// The CA every certificate here chains to.
    pub ca: CertificateAuthority,
    /// The server certificate (valid for a day).
    pub server: Identity,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

fn valid_for_a_day() -> Validity {
    Validity::days_from(OffsetDateTime::now_utc() - time::Duration::hours(1), 1)
}

/// A window that ended yesterday.
fn expired() -> Validity {
    let now = OffsetDateTime::now_utc();
    Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    }
}

impl Pki {
    /// A fresh CA and server certificate.
    pub fn new() -> Self {
        let ca = CertificateAuthority::generate(Validity::days_from(
            OffsetDateTime::now_utc() - time::Duration::hours(1),
            30,
        ))
        .expect("CA");
        let server = Self::server_cert(&ca, valid_for_a_day());
        Self { ca, server }
    }

    fn server_cert(ca: &CertificateAuthority, validity: Validity) -> Identity {
        ca.issue_server(
            &["localhost".to_owned()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            validity,
        )
        .expect("server certificate")
        .identity
    }

    /// The CA as trust anchor.
    pub fn anchors(&self) -> TrustAnchors {
        self.ca.trust_anchors()
    }

    /// A valid node certificate for `node`.
    pub fn node(&self, node: &str) -> Identity {
        self.ca
            .issue_node(&node_id(node), valid_for_a_day())
            .expect("node certificate")
            .identity
    }

    /// A node certificate for `node` that expired yesterday.
    pub fn expired_node(&self, node: &str) -> Identity {
        self.ca
            .issue_node(&node_id(node), expired())
            .expect("node certificate")
            .identity
    }

    /// A server certificate that expired yesterday.
    pub fn expired_server(&self) -> Identity {
        Self::server_cert(&self.ca, expired())
    }

    /// Server configuration with `link`.
    pub fn listen_config(&self, link: LinkConfig) -> ListenConfig {
        let mut config = ListenConfig::new(self.server.clone(), self.anchors());
        config.link = link;
        config
    }

    /// Client configuration for `node`, dialling `server`, with `link`.
    pub fn dial_config(&self, server: SocketAddr, node: &str, link: LinkConfig) -> DialConfig {
        let mut config = DialConfig::new(
            server.to_string(),
            node_id(node),
            self.node(node),
            self.anchors(),
        );
        config.link = link;
        config
    }
}

/// `s` as a node id (test inputs are valid).
pub fn node_id(s: &str) -> NodeId {
    NodeId::new(s).expect("valid node id")
}

/// Timeouts suited to loopback tests: short enough to exercise deadlines, long enough for a
/// loaded 2-core machine.
pub fn test_link() -> LinkConfig {
    LinkConfig {
        handshake_timeout: Duration::from_secs(10),
        read_deadline: Duration::from_secs(10),
        write_deadline: Duration::from_secs(10),
        keep_alive_interval: Duration::from_secs(2),
        ..LinkConfig::default()
    }
}

/// A listener on `127.0.0.1:0` with its shutdown trigger.
pub struct TestServer {
    /// The listener under test.
    pub listener: Box<dyn Listener>,
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestServer {
    /// Binds `127.0.0.1:0` for `protocol` and serves it with `config`.
    pub async fn start(protocol: Protocol, config: ListenConfig) -> Self {
        let socket = ListenSocket::bind(protocol, (Ipv4Addr::LOCALHOST, 0).into())
            .await
            .expect("bind");
        let addr = socket.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = rx.await;
        });
        let listener = transport::listen(protocol, socket, config, shutdown).expect("listen");
        Self {
            listener,
            addr,
            shutdown: Some(tx),
        }
    }

    /// The next outcome of `accept` (bounded by [`WAIT`]).
    pub async fn next(&mut self) -> Option<Result<Box<dyn Connection>, AcceptError>> {
        within("accept", self.listener.accept()).await
    }

    /// The next accepted connection; panics on a rejection or shutdown.
    pub async fn accept(&mut self) -> Box<dyn Connection> {
        match self.next().await {
            Some(Ok(conn)) => conn,
            Some(Err(e)) => panic!("expected a connection, got {e}"),
            None => panic!("listener shut down"),
        }
    }

    /// The next rejection's reason; panics if a connection is accepted instead.
    pub async fn rejection(&mut self) -> RejectReason {
        match self.next().await {
            Some(Err(AcceptError::Rejected { reason, .. })) => reason,
            Some(Err(e)) => panic!("expected a rejection, got {e}"),
            Some(Ok(conn)) => panic!("expected a rejection, accepted {:?}", conn.peer()),
            None => panic!("listener shut down"),
        }
    }

    /// Fires the shutdown signal.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A message on `resource` whose id says `seq`, with `content`.
pub fn message(resource: &str, seq: u64, content: Content) -> Message {
    let mut msg = Message::new("")
        .route("conformance", "resource", resource, "update")
        .content(content);
    msg.header.id = format!("{resource}#{seq}");
    msg
}

/// The sequence number [`message`] put in the id.
pub fn seq_of(msg: &Message) -> u64 {
    msg.header
        .id
        .rsplit_once('#')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("not a harness message id: {}", msg.header.id))
}

/// Asserts that `got` is `sent` as the wire carries it: every field equal, content compared as
/// bytes (QUIC's protobuf turns JSON content into bytes, PROTOCOL.md B§1.5).
pub fn assert_same(sent: &Message, got: &Message) {
    assert_eq!(sent.header, got.header, "header");
    assert_eq!(sent.route, got.route, "route");
    assert_eq!(sent.content.to_bytes(), got.content.to_bytes(), "content");
}

/// A message whose encoded size on `protocol`'s wire is exactly `size` bytes.
pub fn message_of_wire_size(protocol: Protocol, size: usize) -> Message {
    let base = message("cap", 0, Content::text("x"));
    let overhead = transport::encoded_len(protocol, &base) - 1;
    let mut len = size.saturating_sub(overhead);
    // The protobuf length prefix can grow by a byte at a varint boundary: adjust until exact.
    for _ in 0..8 {
        let msg = message("cap", 0, Content::text("x".repeat(len)));
        let wire = transport::encoded_len(protocol, &msg);
        if wire == size {
            return msg;
        }
        len = if wire > size {
            len - (wire - size)
        } else {
            len + (size - wire)
        };
    }
    panic!("cannot build a message of exactly {size} bytes");
}

/// A loopback relay between a client and `target` that can black-hole the link: bytes keep
/// being accepted from both sides but nothing is forwarded, as on a cut path with no RST.
pub struct Relay {
    /// Where clients connect instead of the target.
    pub addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl Relay {
    /// A relay of `protocol`'s transport (TCP for WebSocket, UDP for QUIC) to `target`.
    pub async fn start(protocol: Protocol, target: SocketAddr) -> Self {
        match protocol {
            Protocol::WebSocket => Self::tcp(target).await,
            Protocol::Quic => Self::udp(target).await,
        }
    }

    /// Stops forwarding in both directions from now on.
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    async fn tcp(target: SocketAddr) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let blackhole = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        let bh = blackhole.clone();
        tasks.spawn(async move {
            let mut pipes = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                pipes.spawn(pipe(cr, sw, bh.clone()));
                pipes.spawn(pipe(sr, cw, bh.clone()));
            }
        });
        Self {
            addr,
            blackhole,
            tasks,
        }
    }

    async fn udp(target: SocketAddr) -> Self {
        let front = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind relay");
        let back = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind relay");
        back.connect(target).await.expect("connect relay");
        let addr = front.local_addr().expect("relay addr");
        let blackhole = Arc::new(AtomicBool::new(false));
        let bh = blackhole.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut up = vec![0u8; 65536];
            let mut down = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { continue };
                        client = Some(from);
                        if !bh.load(Ordering::SeqCst) {
                            let _ = back.send(&up[..n]).await;
                        }
                    }
                    r = back.recv(&mut down) => {
                        let Ok(n) = r else { continue };
                        if let (Some(c), false) = (client, bh.load(Ordering::SeqCst)) {
                            let _ = front.send_to(&down[..n], c).await;
                        }
                    }
                }
            }
        });
        Self {
            addr,
            blackhole,
            tasks,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // A cut path delivers no FIN either: keep `to` open (dropping it would send one)
                // until the relay goes away.
                if blackhole.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => {
                if !blackhole.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Raw clients: real TLS and QUIC, hand-written protocol bytes.
pub mod raw {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use bytes::{Bytes, BytesMut};
    use certs::{Identity, TrustAnchors};
    use proto::{Content, Message};
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    /// A rustls client configuration (ring) trusting `anchors`, presenting `identity` if any,
    /// offering `alpn`.
    pub fn client_tls(
        anchors: &TrustAnchors,
        identity: Option<&Identity>,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &anchors.roots {
            roots.add(cert.clone()).expect("root");
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// TLS to `addr` (server name 127.0.0.1).
    pub async fn tls_connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        TlsConnector::from(tls).connect(name, tcp).await
    }

    /// An upgrade request as KubeEdge's edge writes it (capture_ws_upgrade_request.http), with
    /// `connection_use` as given (None: header absent).
    pub fn ws_request(node: &str, project: &str, connection_use: Option<&str>) -> String {
        let mut req = format!(
            "GET /{project}/{node}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             User-Agent: Go-http-client/1.1\r\nConnection: Upgrade\r\n"
        );
        if let Some(cu) = connection_use {
            req.push_str(&format!("Connectionuse: {cu}\r\n"));
        }
        req.push_str(&format!(
            "Node_id: {node}\r\nProject_id: {project}\r\n\
             Sec-WebSocket-Key: vgQVZFfVEo45beO7fPQ8yQ==\r\nSec-WebSocket-Version: 13\r\n\
             Upgrade: websocket\r\n\r\n"
        ));
        req
    }

    /// Sends `request` and reads the response head (up to the blank line).
    pub async fn ws_upgrade(
        stream: &mut TlsStream<TcpStream>,
        request: &str,
    ) -> std::io::Result<String> {
        stream.write_all(request.as_bytes()).await?;
        stream.flush().await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        Ok(String::from_utf8_lossy(&head).into_owned())
    }

    /// A masked client frame (FIN set) with `opcode` (1 text, 2 binary) and `payload`.
    pub fn ws_client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    /// A client frame header announcing a masked text payload of `len` bytes (no payload).
    pub fn ws_client_frame_header(len: u64) -> Vec<u8> {
        let mut frame = vec![0x81, 0x80 | 127];
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        frame
    }

    /// A QUIC connection to `addr` with `tls` (ALPN must be set by the caller), with its endpoint.
    pub async fn quic_connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
        let endpoint =
            quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into()).expect("endpoint");
        let conn = endpoint
            .connect_with(
                quinn::ClientConfig::new(Arc::new(crypto)),
                addr,
                "127.0.0.1",
            )
            .expect("connect")
            .await?;
        Ok((endpoint, conn))
    }

    /// One packer frame around a protobuf message.
    pub fn frame(msg: &Message) -> Bytes {
        let mut buf = BytesMut::new();
        proto::frame::encode_message(msg, &mut buf).expect("frame");
        buf.freeze()
    }

    /// viaduct's control-stream header for `node` (vector 14's shape).
    pub fn quic_header(node: &str) -> Message {
        let content = format!(
            "{{\"Node_id\":[\"{node}\"],\"Project_id\":[\"e632aba927ea4ac2b575ec1603d56f10\"]}}"
        );
        Message::new("")
            .route("", "", "header", "header")
            .content(Content::Bytes(content.into_bytes().into()))
    }

    /// Opens the control stream, sends the header for `node` and reads the server's answer
    /// (one frame); returns the control stream for further use.
    pub async fn quic_handshake(
        conn: &quinn::Connection,
        node: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Message), String> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&frame(&quic_header(node)))
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = BytesMut::new();
        loop {
            if let Some(frame) = proto::frame::decode(&mut buf).map_err(|e| e.to_string())? {
                let msg = frame.to_message().map_err(|e| e.to_string())?;
                return Ok((send, recv, msg));
            }
            match recv.read_chunk(4096, true).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                Ok(None) => return Err("control stream ended".to_owned()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
