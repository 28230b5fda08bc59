//! `transport`: message rate and round-trip latency of Causeway's two adapters on loopback, each
//! printed beside raw baselines measured in the same process run, as a ratio (STYLE.md lesson 15,
//! PERFORMANCE.md).
//!
//! ```text
//! cargo run --release -p causeway-benches --bin transport
//! ```
//!
//! Measures, for each transport:
//! - pipelined rate: one task sends N messages back to back (64 B and 4 KiB of content), the
//!   peer receives them; N is calibrated so each run lasts about a second;
//! - echo latency: 64 B, one message in flight, p50 and p99 of the round trip.
//!
//! Baselines: raw TCP with 4-byte length prefixes (no TLS), one raw quinn stream with the same
//! framing (TLS 1.3), and raw tokio-tungstenite over rustls (TLS 1.3, binary messages). Adapters
//! carry whole `proto::Message`s (route, id, JSON or protobuf encoding), baselines bare payloads,
//! so the ratio is the cost of the message layer and the connection machinery. Ratios, not
//! absolute numbers, are the result: the machine is shared and noisy.
//!
//! `TRANSPORT_BENCH_ONLY=<substring>` measures only the transports whose name contains it (for
//! profiling one of them).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use certs::{CertificateAuthority, Identity, NodeId, TrustAnchors, Validity};
use futures_util::{SinkExt as _, StreamExt as _};
use proto::{Content, Message};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use transport::config::LinkConfig;
use transport::{Connection, DialConfig, ListenConfig, ListenSocket, Protocol};

/// Target duration of one pipelined run after calibration.
const RUN: Duration = Duration::from_millis(800);
/// Messages in the calibration run.
const CALIBRATE: u64 = 20_000;
/// Round trips sampled for latency (after a warm-up of a tenth as many).
const ECHOES: usize = 5_000;
const SMALL: usize = 64;
const LARGE: usize = 4096;

/// Certificates for one run.
struct Pki {
    server: Identity,
    node: Identity,
    anchors: TrustAnchors,
}

impl Pki {
    fn new() -> Result<Self> {
        let now = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        let ca = CertificateAuthority::generate(Validity::days_from(now, 2))?;
        let server = ca
            .issue_server(
                &["localhost".to_owned()],
                &[Ipv4Addr::LOCALHOST.into()],
                Validity::days_from(now, 2),
            )?
            .identity;
        let node = ca
            .issue_node(&NodeId::new("bench-1")?, Validity::days_from(now, 2))?
            .identity;
        Ok(Self {
            server,
            node,
            anchors: ca.trust_anchors(),
        })
    }
}

/// One measured transport: how to run N pipelined payloads of a size, and one echo.
trait Bench {
    /// Sends `n` payloads of `size` bytes back to back; returns when the peer has received all.
    async fn pipelined(&mut self, n: u64, size: usize) -> Result<Duration>;
    /// `samples` round trips of `size` bytes, one at a time.
    async fn echo(&mut self, samples: usize, size: usize) -> Result<Vec<Duration>>;
}

// --- the adapters -------------------------------------------------------------------------------

struct Adapter {
    client: Arc<dyn Connection>,
    served: Arc<dyn Connection>,
    /// Keeps the listener (and its endpoint) alive.
    _listener: Box<dyn transport::Listener>,
}

fn bench_message(size: usize, seq: u64) -> Message {
    let mut msg = Message::new("")
        .route("bench", "resource", "default/pod/bench", "update")
        .content(Content::text("x".repeat(size)));
    msg.header.id = seq.to_string();
    msg
}

impl Adapter {
    async fn start(protocol: Protocol, pki: &Pki) -> Result<Self> {
        let link = LinkConfig {
            send_buffer: 4 * 1024 * 1024,
            recv_buffer: 4 * 1024 * 1024,
            ..LinkConfig::default()
        };
        let socket = ListenSocket::bind(protocol, (Ipv4Addr::LOCALHOST, 0).into()).await?;
        let addr = socket.local_addr()?;
        let mut listen = ListenConfig::new(pki.server.clone(), pki.anchors.clone());
        listen.link = link.clone();
        let mut listener =
            transport::listen(protocol, socket, listen, Box::pin(std::future::pending()))?;
        let mut dial = DialConfig::new(
            addr.to_string(),
            NodeId::new("bench-1")?,
            pki.node.clone(),
            pki.anchors.clone(),
        );
        dial.link = link;
        let client = transport::connect(protocol, &dial).await?;
        let served = listener
            .accept()
            .await
            .context("listener ended")?
            .context("accept")?;
        Ok(Self {
            client: Arc::from(client),
            served: Arc::from(served),
            _listener: listener,
        })
    }
}

impl Bench for Adapter {
    async fn pipelined(&mut self, n: u64, size: usize) -> Result<Duration> {
        let served = self.served.clone();
        let receiver = tokio::spawn(async move {
            for _ in 0..n {
                served.recv().await?.context("closed")?;
            }
            anyhow::Ok(Instant::now())
        });
        let template = bench_message(size, 0);
        let start = Instant::now();
        for _ in 0..n {
            self.client.send(template.clone()).await?;
        }
        let end = receiver.await??;
        Ok(end - start)
    }

    async fn echo(&mut self, samples: usize, size: usize) -> Result<Vec<Duration>> {
        let served = self.served.clone();
        let echoer = tokio::spawn(async move {
            for _ in 0..samples {
                let msg = served.recv().await?.context("closed")?;
                served.send(msg).await?;
            }
            anyhow::Ok(())
        });
        let msg = bench_message(size, 0);
        let mut rtts = Vec::with_capacity(samples);
        for _ in 0..samples {
            let start = Instant::now();
            self.client.send(msg.clone()).await?;
            self.client.recv().await?.context("closed")?;
            rtts.push(start.elapsed());
        }
        echoer.await??;
        Ok(rtts)
    }
}

// --- raw TCP, length-prefixed ---------------------------------------------------------------------

struct RawTcp {
    listener: TcpListener,
    addr: SocketAddr,
}

impl RawTcp {
    async fn start() -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }

    async fn pair(&self) -> Result<(TcpStream, TcpStream)> {
        let (client, accepted) =
            tokio::join!(TcpStream::connect(self.addr), self.listener.accept());
        let (client, (server, _)) = (client?, accepted?);
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        Ok((client, server))
    }
}

async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<()> {
    let len = r.read_u32().await? as usize;
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(())
}

impl Bench for RawTcp {
    async fn pipelined(&mut self, n: u64, size: usize) -> Result<Duration> {
        let (client, server) = self.pair().await?;
        let receiver = tokio::spawn(async move {
            let mut r = BufReader::with_capacity(64 * 1024, server);
            let mut buf = Vec::new();
            for _ in 0..n {
                read_frame(&mut r, &mut buf).await?;
            }
            anyhow::Ok(Instant::now())
        });
        let payload = vec![b'x'; size];
        let start = Instant::now();
        let mut w = BufWriter::with_capacity(64 * 1024, client);
        for _ in 0..n {
            w.write_u32(size as u32).await?;
            w.write_all(&payload).await?;
        }
        w.flush().await?;
        let end = receiver.await??;
        Ok(end - start)
    }

    async fn echo(&mut self, samples: usize, size: usize) -> Result<Vec<Duration>> {
        let (mut client, mut server) = self.pair().await?;
        let echoer = tokio::spawn(async move {
            let mut buf = Vec::new();
            for _ in 0..samples {
                read_frame(&mut server, &mut buf).await?;
                let mut out = Vec::with_capacity(4 + buf.len());
                out.put_u32(buf.len() as u32);
                out.extend_from_slice(&buf);
                server.write_all(&out).await?;
            }
            anyhow::Ok(())
        });
        let mut frame = Vec::with_capacity(4 + size);
        frame.put_u32(size as u32);
        frame.resize(4 + size, b'x');
        let mut buf = Vec::new();
        let mut rtts = Vec::with_capacity(samples);
        for _ in 0..samples {
            let start = Instant::now();
            client.write_all(&frame).await?;
            read_frame(&mut client, &mut buf).await?;
            rtts.push(start.elapsed());
        }
        echoer.await??;
        Ok(rtts)
    }
}

// --- raw quinn, one stream per run ----------------------------------------------------------------

struct RawQuinn {
    client: quinn::Connection,
    server: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

impl RawQuinn {
    async fn start(pki: &Pki) -> Result<Self> {
        let server_tls = transport::tls::server_config(Protocol::Quic, &pki.server, &pki.anchors)?;
        let client_tls = transport::tls::client_config(Protocol::Quic, &pki.node, &pki.anchors)?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .stream_receive_window(quinn::VarInt::from_u32(4 * 1024 * 1024))
            .send_window(8 * 1024 * 1024);
        let transport = Arc::new(transport);
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
        ));
        server_config.transport_config(transport.clone());
        let server_ep = quinn::Endpoint::server(server_config, (Ipv4Addr::LOCALHOST, 0).into())?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
        ));
        client_config.transport_config(transport);
        let client_ep = quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into())?;
        let connecting =
            client_ep.connect_with(client_config, server_ep.local_addr()?, "127.0.0.1")?;
        let accepting = async {
            let incoming = server_ep.accept().await.context("endpoint closed")?;
            anyhow::Ok(incoming.await?)
        };
        let (client, server) = tokio::join!(connecting, accepting);
        Ok(Self {
            client: client?,
            server: server?,
            _endpoints: (client_ep, server_ep),
        })
    }

    async fn stream(
        &self,
    ) -> Result<(
        (quinn::SendStream, quinn::RecvStream),
        (quinn::SendStream, quinn::RecvStream),
    )> {
        let (mut send, recv) = self.client.open_bi().await?;
        // A stream is announced by its first byte.
        send.write_all(b"s").await?;
        let (peer_send, mut peer_recv) = self.server.accept_bi().await?;
        let mut first = [0u8; 1];
        peer_recv.read_exact(&mut first).await?;
        Ok(((send, recv), (peer_send, peer_recv)))
    }
}

/// Splits length-prefixed frames off `buf`; returns how many.
fn count_frames(buf: &mut BytesMut) -> u64 {
    let mut n = 0;
    loop {
        if buf.len() < 4 {
            return n;
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if buf.len() < 4 + len {
            return n;
        }
        buf.advance(4 + len);
        n += 1;
    }
}

impl Bench for RawQuinn {
    async fn pipelined(&mut self, n: u64, size: usize) -> Result<Duration> {
        let ((mut send, _recv), (_peer_send, mut peer_recv)) = self.stream().await?;
        let receiver = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let mut got = 0;
            while got < n {
                let chunk = peer_recv
                    .read_chunk(1 << 20, true)
                    .await?
                    .context("ended")?;
                buf.extend_from_slice(&chunk.bytes);
                got += count_frames(&mut buf);
            }
            anyhow::Ok(Instant::now())
        });
        let start = Instant::now();
        let mut batch = BytesMut::with_capacity(64 * 1024);
        for _ in 0..n {
            batch.put_u32(size as u32);
            batch.put_bytes(b'x', size);
            if batch.len() >= 64 * 1024 {
                send.write_chunk(batch.split().freeze()).await?;
            }
        }
        send.write_chunk(batch.freeze()).await?;
        let end = receiver.await??;
        Ok(end - start)
    }

    async fn echo(&mut self, samples: usize, size: usize) -> Result<Vec<Duration>> {
        let ((mut send, mut recv), (mut peer_send, mut peer_recv)) = self.stream().await?;
        let echoer = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let mut echoed = 0;
            while echoed < samples {
                let chunk = peer_recv
                    .read_chunk(1 << 20, true)
                    .await?
                    .context("ended")?;
                buf.extend_from_slice(&chunk.bytes);
                while buf.len() >= 4 + size {
                    let frame = buf.split_to(4 + size).freeze();
                    peer_send.write_chunk(frame).await?;
                    echoed += 1;
                }
            }
            anyhow::Ok(())
        });
        let mut frame = BytesMut::with_capacity(4 + size);
        frame.put_u32(size as u32);
        frame.put_bytes(b'x', size);
        let frame = frame.freeze();
        let mut buf = BytesMut::new();
        let mut rtts = Vec::with_capacity(samples);
        for _ in 0..samples {
            let start = Instant::now();
            send.write_chunk(frame.clone()).await?;
            while count_frames(&mut buf) == 0 {
                let chunk = recv.read_chunk(1 << 20, true).await?.context("ended")?;
                buf.extend_from_slice(&chunk.bytes);
            }
            rtts.push(start.elapsed());
        }
        echoer.await??;
        Ok(rtts)
    }
}

// --- raw WSS: tokio-tungstenite over rustls --------------------------------------------------------

type Wss<S> = tokio_tungstenite::WebSocketStream<S>;

struct RawWss {
    listener: TcpListener,
    addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

impl RawWss {
    async fn start(pki: &Pki) -> Result<Self> {
        let server_tls =
            transport::tls::server_config(Protocol::WebSocket, &pki.server, &pki.anchors)?;
        let client_tls =
            transport::tls::client_config(Protocol::WebSocket, &pki.node, &pki.anchors)?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        Ok(Self {
            listener,
            addr,
            acceptor: tokio_rustls::TlsAcceptor::from(server_tls),
            connector: tokio_rustls::TlsConnector::from(client_tls),
        })
    }

    async fn pair(
        &self,
    ) -> Result<(
        Wss<tokio_rustls::client::TlsStream<TcpStream>>,
        Wss<tokio_rustls::server::TlsStream<TcpStream>>,
    )> {
        let client = async {
            let tcp = TcpStream::connect(self.addr).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
            let tls = self.connector.connect(name, tcp).await?;
            let (ws, _) =
                tokio_tungstenite::client_async(format!("wss://{}/", self.addr), tls).await?;
            anyhow::Ok(ws)
        };
        let server = async {
            let (tcp, _) = self.listener.accept().await?;
            tcp.set_nodelay(true)?;
            let tls = self.acceptor.accept(tcp).await?;
            anyhow::Ok(tokio_tungstenite::accept_async(tls).await?)
        };
        let (client, server) = tokio::join!(client, server);
        Ok((client?, server?))
    }
}

impl Bench for RawWss {
    async fn pipelined(&mut self, n: u64, size: usize) -> Result<Duration> {
        let (mut client, mut server) = self.pair().await?;
        let receiver = tokio::spawn(async move {
            for _ in 0..n {
                server.next().await.context("ended")??;
            }
            anyhow::Ok(Instant::now())
        });
        let payload = Bytes::from(vec![b'x'; size]);
        let start = Instant::now();
        for _ in 0..n {
            client.feed(WsMessage::Binary(payload.clone())).await?;
        }
        client.flush().await?;
        let end = receiver.await??;
        Ok(end - start)
    }

    async fn echo(&mut self, samples: usize, size: usize) -> Result<Vec<Duration>> {
        let (mut client, mut server) = self.pair().await?;
        let echoer = tokio::spawn(async move {
            for _ in 0..samples {
                let msg = server.next().await.context("ended")??;
                server.send(msg).await?;
            }
            anyhow::Ok(())
        });
        let payload = Bytes::from(vec![b'x'; size]);
        let mut rtts = Vec::with_capacity(samples);
        for _ in 0..samples {
            let start = Instant::now();
            client.send(WsMessage::Binary(payload.clone())).await?;
            client.next().await.context("ended")??;
            rtts.push(start.elapsed());
        }
        echoer.await??;
        Ok(rtts)
    }
}

// --- measuring and printing ------------------------------------------------------------------------

/// Messages per second, pipelined, after a calibration run sizing N to about [`RUN`].
async fn rate(bench: &mut impl Bench, size: usize) -> Result<f64> {
    let probe = bench.pipelined(CALIBRATE, size).await?;
    let n = ((CALIBRATE as f64) * RUN.as_secs_f64() / probe.as_secs_f64().max(1e-6)) as u64;
    let n = n.clamp(CALIBRATE, 20_000_000);
    let took = bench.pipelined(n, size).await?;
    Ok(n as f64 / took.as_secs_f64())
}

/// p50 and p99 round trip in microseconds.
async fn latency(bench: &mut impl Bench) -> Result<(f64, f64)> {
    bench.echo(ECHOES / 10, SMALL).await?;
    let mut rtts = bench.echo(ECHOES, SMALL).await?;
    rtts.sort();
    let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Ok((pct(0.50), pct(0.99)))
}

/// Everything measured for one transport.
struct Figures {
    name: &'static str,
    small: f64,
    large: f64,
    p50: f64,
    p99: f64,
}

async fn measure(name: &'static str, bench: &mut impl Bench) -> Result<Figures> {
    if std::env::var("TRANSPORT_BENCH_ONLY").is_ok_and(|only| !name.contains(only.as_str())) {
        return Ok(Figures {
            name,
            small: f64::NAN,
            large: f64::NAN,
            p50: f64::NAN,
            p99: f64::NAN,
        });
    }
    let small = rate(bench, SMALL).await?;
    let large = rate(bench, LARGE).await?;
    let (p50, p99) = latency(bench).await?;
    eprintln!("  measured {name}");
    Ok(Figures {
        name,
        small,
        large,
        p50,
        p99,
    })
}

/// Messages per second one core encodes and decodes with `encode`/`decode` alone: the bound the
/// message layer puts on an adapter, printed to explain its ratio.
fn codec_rate(size: usize, protocol: Protocol) -> f64 {
    let msg = bench_message(size, 0);
    let n = 20_000u32;
    let start = Instant::now();
    for _ in 0..n {
        match protocol {
            Protocol::WebSocket => {
                let text = proto::json::to_ws_text(&msg);
                std::hint::black_box(proto::json::from_slice(text.as_bytes()).ok());
            }
            Protocol::Quic => {
                let mut frame = BytesMut::new();
                let _ = proto::frame::encode_message(&msg, &mut frame);
                let frame = frame.freeze();
                std::hint::black_box(proto::pb::decode_bytes(frame.slice(10..)).ok());
            }
        }
    }
    f64::from(n) / start.elapsed().as_secs_f64()
}

fn print_table(rows: &[&Figures]) {
    println!(
        "{:<34} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "transport", "64 B msg/s", "4 KiB msg/s", "4 KiB MB/s", "p50 µs", "p99 µs"
    );
    for f in rows {
        println!(
            "{:<34} {:>12.0} {:>12.0} {:>10.0} {:>10.1} {:>10.1}",
            f.name,
            f.small,
            f.large,
            f.large * LARGE as f64 / 1e6,
            f.p50,
            f.p99
        );
    }
}

fn print_ratio(candidate: &Figures, baseline: &Figures) {
    println!(
        "{:<58} {:>6.2}x {:>6.2}x {:>6.2}x {:>6.2}x",
        format!("{} / {}", candidate.name, baseline.name),
        candidate.small / baseline.small,
        candidate.large / baseline.large,
        candidate.p50 / baseline.p50,
        candidate.p99 / baseline.p99
    );
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let pki = Pki::new()?;
        eprintln!("transport benchmark: loopback, one process, 2 worker threads");
        let tcp = measure("raw TCP (length-prefixed)", &mut RawTcp::start().await?).await?;
        let wss = measure(
            "raw WSS (tungstenite+rustls)",
            &mut RawWss::start(&pki).await?,
        )
        .await?;
        let quinn = measure("raw quinn (one stream)", &mut RawQuinn::start(&pki).await?).await?;
        let ws = measure(
            "causeway websocket",
            &mut Adapter::start(Protocol::WebSocket, &pki).await?,
        )
        .await?;
        let quic = measure(
            "causeway quic",
            &mut Adapter::start(Protocol::Quic, &pki).await?,
        )
        .await?;
        println!();
        print_table(&[&tcp, &wss, &quinn, &ws, &quic]);
        println!();
        println!(
            "{:<58} {:>7} {:>7} {:>7} {:>7}",
            "ratios (rates: higher is better; latency: lower)", "64 B", "4 KiB", "p50", "p99"
        );
        print_ratio(&ws, &wss);
        print_ratio(&ws, &tcp);
        print_ratio(&quic, &quinn);
        print_ratio(&quic, &ws);
        println!();
        println!(
            "message codec alone, encode + decode on one core (msg/s): JSON {:.0} (64 B) {:.0} \
             (4 KiB); protobuf frame {:.0} (64 B) {:.0} (4 KiB)",
            codec_rate(SMALL, Protocol::WebSocket),
            codec_rate(LARGE, Protocol::WebSocket),
            codec_rate(SMALL, Protocol::Quic),
            codec_rate(LARGE, Protocol::Quic),
        );
        anyhow::Ok(())
    })
}
