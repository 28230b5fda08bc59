//! Test helpers: generated certificates on disk, a real transport listener playing the cloud,
//! and a link-impairment proxy (TCP and UDP) that can blackhole the link without closing it.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

use causeway_edgehub::config::{EdgeHubConfig, EndpointConfig, Seconds, ServerAddr};
use certs::{CertificateAuthority, NodeId, Validity};
use transport::{Connection, ListenConfig, ListenSocket, Protocol};

/// How long a test waits for something that should happen within a few heartbeats.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A CA, a server identity for 127.0.0.1 and a node certificate written to files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
    pub node: NodeId,
}

impl Pki {
    pub fn new(node: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca = CertificateAuthority::generate(Validity::days_from(now, 30)).unwrap();
        let node = NodeId::new(node).unwrap();
        let issued = ca.issue_node(&node, Validity::days_from(now, 30)).unwrap();
        certs::files::write_cert(&dir.path().join("ca.crt"), &ca.cert_pem()).unwrap();
        certs::files::write_cert(&dir.path().join("node.crt"), &issued.cert_pem).unwrap();
        certs::files::write_key(&dir.path().join("node.key"), &issued.key_pem).unwrap();
        Self { dir, ca, node }
    }

    pub fn listen_config(&self) -> ListenConfig {
        let now = time::OffsetDateTime::now_utc();
        let server = self
            .ca
            .issue_server(
                &[],
                &["127.0.0.1".parse().unwrap()],
                Validity::days_from(now, 30),
            )
            .unwrap();
        let mut config = ListenConfig::new(server.identity, self.ca.trust_anchors());
        config.link.read_deadline = Duration::from_secs(5);
        config.link.keep_alive_interval = Duration::from_millis(500);
        config
    }

    /// An edge config with a 1 s heartbeat and 5 s deadlines (generous, so a loaded CI machine
    /// never drops a healthy link), dialing `server` over `protocol`.
    pub fn edge_config(&self, protocol: Protocol, server: SocketAddr) -> EdgeHubConfig {
        self.edge_config_with_deadline(protocol, server, 5)
    }

    /// [`Pki::edge_config`] with a read deadline of `read_deadline` seconds.
    pub fn edge_config_with_deadline(
        &self,
        protocol: Protocol,
        server: SocketAddr,
        read_deadline: u32,
    ) -> EdgeHubConfig {
        let mut config = EdgeHubConfig::new(self.node.clone());
        config.controller.protocol = protocol;
        config.controller.heartbeat = Seconds::new(1).unwrap();
        let mut endpoint =
            EndpointConfig::with_server(ServerAddr::new(server.to_string()).unwrap());
        endpoint.handshake_timeout = Seconds::new(5).unwrap();
        endpoint.read_deadline = Seconds::new(read_deadline).unwrap();
        endpoint.write_deadline = Seconds::new(5).unwrap();
        config.websocket = endpoint.clone();
        config.quic = endpoint;
        config.tls.ca_file = self.dir.path().join("ca.crt");
        config.tls.cert_file = self.dir.path().join("node.crt");
        config.tls.key_file = self.dir.path().join("node.key");
        config.outbox.path = self.outbox_path();
        config
    }

    pub fn outbox_path(&self) -> PathBuf {
        self.dir.path().join("outbox.db")
    }
}

/// A real transport listener; accepted connections arrive on `conns`.
pub struct Cloud {
    pub addr: SocketAddr,
    pub conns: mpsc::Receiver<Box<dyn Connection>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cloud {
    pub async fn start(pki: &Pki, protocol: Protocol) -> Self {
        Self::start_at(pki, protocol, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_at(pki: &Pki, protocol: Protocol, addr: SocketAddr) -> Self {
        let socket = ListenSocket::bind(protocol, addr).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stop_rx.await;
        });
        let mut listener =
            transport::listen(protocol, socket, pki.listen_config(), shutdown).unwrap();
        let (tx, conns) = mpsc::channel(8);
        let task = tokio::spawn(async move {
            while let Some(accepted) = listener.accept().await {
                if let Ok(conn) = accepted {
                    if tx.send(conn).await.is_err() {
                        return;
                    }
                }
            }
        });
        Self {
            addr,
            conns,
            stop: Some(stop_tx),
            task,
        }
    }

    pub async fn accept(&mut self) -> Box<dyn Connection> {
        tokio::time::timeout(PATIENCE, self.conns.recv())
            .await
            .expect("the edge connects in time")
            .expect("listener running")
    }

    /// Stops listening (established connections are the test's to drop).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

/// The next message from `conn` that is not a keepalive.
pub async fn recv_data(conn: &dyn Connection) -> proto::Message {
    loop {
        let msg = tokio::time::timeout(PATIENCE, conn.recv())
            .await
            .expect("a message in time")
            .expect("recv ok")
            .expect("connection open");
        if msg.route.operation != "keepalive" {
            return msg;
        }
    }
}

/// The cloud's acknowledgement of an upstream message (PROTOCOL.md Part A item 7).
pub fn ack_of(msg: &proto::Message) -> proto::Message {
    proto::Message::new(msg.header.id.clone()).route(
        "cloudhub",
        proto::message::GROUP_CAUSEWAY,
        "",
        proto::message::OP_ACK,
    )
}

/// A proxy in front of `upstream` that can blackhole the link: data in both directions is
/// discarded, but no connection is closed and no error is sent (half-open TCP, UDP blackhole).
pub struct Proxy {
    pub addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(protocol: Protocol, upstream: SocketAddr) -> Self {
        let blackhole = Arc::new(AtomicBool::new(false));
        let (addr, task) = match protocol {
            Protocol::WebSocket => {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let hole = blackhole.clone();
                let task = tokio::spawn(async move {
                    while let Ok((client, _)) = listener.accept().await {
                        let hole = hole.clone();
                        tokio::spawn(async move {
                            if let Ok(server) = TcpStream::connect(upstream).await {
                                pipe_tcp(client, server, hole).await;
                            }
                        });
                    }
                });
                (addr, task)
            }
            Protocol::Quic => {
                let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let addr = front.local_addr().unwrap();
                let hole = blackhole.clone();
                let task = tokio::spawn(pipe_udp(front, upstream, hole));
                (addr, task)
            }
        };
        Self {
            addr,
            blackhole,
            task,
        }
    }

    pub fn blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe_tcp(client: TcpStream, server: TcpStream, hole: Arc<AtomicBool>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = copy_unless(cr, sw, hole.clone());
    let down = copy_unless(sr, cw, hole);
    let _ = tokio::join!(up, down);
}

async fn copy_unless(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hole: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if !hole.load(Ordering::SeqCst) {
                    let _ = to.shutdown().await;
                }
                // In a blackhole nothing reaches the other side, not even the FIN: keep `to` open.
                if hole.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                return;
            }
            Ok(n) => n,
        };
        if hole.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// One client (the edge) at a time is enough for these tests.
async fn pipe_udp(front: UdpSocket, upstream: SocketAddr, hole: Arc<AtomicBool>) {
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(upstream).await.unwrap();
    let mut client: Option<SocketAddr> = None;
    let mut a = vec![0u8; 65_536];
    let mut b = vec![0u8; 65_536];
    loop {
        tokio::select! {
            r = front.recv_from(&mut a) => {
                let Ok((n, from)) = r else { return };
                client = Some(from);
                if !hole.load(Ordering::SeqCst) {
                    let _ = back.send(&a[..n]).await;
                }
            }
            r = back.recv(&mut b) => {
                let Ok(n) = r else { continue };
                if let (Some(to), false) = (client, hole.load(Ordering::SeqCst)) {
                    let _ = front.send_to(&b[..n], to).await;
                }
            }
        }
    }
}
