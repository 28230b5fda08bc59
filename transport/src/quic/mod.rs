//! The Causeway QUIC profile (PROTOCOL.md Part A item 3): QUIC v1 (RFC 9000) over TLS 1.3 with
//! mutual authentication and ALPN `causeway/1`, carrying viaduct's application layer — a control
//! stream with the `header`/`ack` exchange ([`control`]'s doc), then message streams that start with
//! `msg` and carry 10-byte packer frames of protobuf messages.
//!
//! Where it departs from viaduct (KubeEdge's gQUIC cannot talk to any RFC 9000 stack anyway):
//! - both ends accept the streams the other opens, and read the receive half of the streams they
//!   open (W4);
//! - each end sends on its own streams, one per resource hash bucket (`stream.rs`), instead of one
//!   shared stream picked at random;
//! - the server refuses, by closing the connection with an application error code and a reason,
//!   a client without a valid certificate, or whose `Node_id` differs from its certificate (W8);
//!   handshakes and the 3-byte stream prefix are read under a timeout (W15);
//! - a malformed frame closes the whole connection (viaduct frees only the stream);
//! - the idle timeout is the read deadline and keep-alive PINGs run at the keep-alive interval, so a
//!   silent peer is noticed within the deadline (W7);
//! - graceful close: finish every stream, wait for the peer to acknowledge their data, then close
//!   with code 0.
//! - a silent link is probed while data waits (`probe.rs`): one packet past the congestion window
//!   per round trip, a 1-byte DATAGRAM (discarded by the receiver) when no new data is queued.

mod connection;
mod control;
mod probe;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;

use proto::Message;
use quinn::{ConnectionError, IdleTimeout, TransportConfig, VarInt};
use rustls_pki_types::CertificateDer;
use tokio::time::timeout;

pub use connection::QuicConnection;

use crate::accept::{self, Accepted, split_host_port, verify_node};
use crate::config::LinkConfig;
use crate::tls::QUIC_ALPN;
use crate::{
    AcceptError, Capabilities, ConnectError, DialConfig, ListenConfig, ListenError, Listener,
    PeerIdentity, Protocol, RejectReason, Shutdown, tls,
};
use stream::{FrameReader, ReadEnd};

/// Largest control-stream message accepted (the header map is a few hundred bytes).
const CONTROL_MAX: usize = 64 * 1024;
/// Receive window per stream: bounds what one stream buffers when we read slowly.
const STREAM_WINDOW: u32 = 1024 * 1024;
/// Receive window for the whole connection, and the most we buffer unacknowledged to send.
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// What we keep of received DATAGRAM frames (only probes, never read): quinn drops the oldest
/// beyond it.
const PROBE_DATAGRAM_BUFFER: usize = 1024;

/// QUIC application error codes of the Causeway profile (CONNECTION_CLOSE of type 0x1d).
pub mod code {
    use quinn::VarInt;

    use crate::CloseReason;

    /// Graceful close: everything sent was delivered.
    pub const NO_ERROR: VarInt = VarInt::from_u32(0);
    /// The server refused the client's identity (certificate / `Node_id` mismatch).
    pub const REJECTED: VarInt = VarInt::from_u32(0x10);
    /// The control-stream exchange was not the protocol (bad header, no ack). A wrong or missing
    /// ALPN never gets here: TLS fails first with alert 120 (CRYPTO_ERROR `0x178`).
    pub const BAD_HANDSHAKE: VarInt = VarInt::from_u32(0x11);
    /// The peer sent bytes that do not decode (frame or protobuf).
    pub const MALFORMED: VarInt = VarInt::from_u32(0x12);
    /// The peer sent a message over the size cap.
    pub const TOO_LARGE: VarInt = VarInt::from_u32(0x13);
    /// The peer broke the protocol otherwise (bad stream prefix, reset stream).
    pub const PROTOCOL_VIOLATION: VarInt = VarInt::from_u32(0x14);
    /// A write made no progress within the write deadline.
    pub const WRITE_TIMEOUT: VarInt = VarInt::from_u32(0x15);
    /// The connection was dropped without a graceful close.
    pub const ABORTED: VarInt = VarInt::from_u32(0x16);

    /// The code we close with for `reason`.
    pub(crate) fn for_reason(reason: &CloseReason) -> VarInt {
        match reason {
            CloseReason::Local { .. } | CloseReason::Peer { .. } => NO_ERROR,
            CloseReason::Malformed { .. } => MALFORMED,
            CloseReason::TooLarge { .. } => TOO_LARGE,
            CloseReason::PeerMisbehaved { .. } | CloseReason::PeerAborted { .. } => {
                PROTOCOL_VIOLATION
            }
            CloseReason::WriteTimeout { .. } => WRITE_TIMEOUT,
            _ => ABORTED,
        }
    }
}

/// The QUIC adapter.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuicAdapter;

impl_adapter!(QuicAdapter, Protocol::Quic, Udp, Tcp, "UDP");

/// quinn's transport settings for a link: idle timeout = read deadline, PINGs at the keep-alive
/// interval, bidirectional streams only, bounded windows, BBR congestion control.
///
/// BBR, not quinn's default Cubic, by measurement (`docs/lossy-links.md`, `lossy_links`
/// benchmark): with 5 % random loss at 100 ms RTT Cubic took a loss in nearly every round trip
/// as congestion and kept its window at the minimum (median latency 153-191 ms at 50 msg/s
/// each way against 56 ms for BBR, and 10 MB not sent in 90 s against 20 Mb/s); on the 2 Mb/s
/// satellite link goodput went from 31-33 % to 70 % of the link and on `lossy-2` from 43-45 %
/// to 88 %; the clean link's latency did not change.
fn transport_config(link: &LinkConfig) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    let idle = IdleTimeout::try_from(link.read_deadline).unwrap_or(IdleTimeout::from(VarInt::MAX));
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(link.effective_keep_alive()))
        .max_concurrent_bidi_streams(connection::max_peer_streams())
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .datagram_receive_buffer_size(Some(PROBE_DATAGRAM_BUFFER))
        .congestion_controller_factory(Arc::new(probe::ProbingBbrConfig::default()));
    Arc::new(t)
}

impl QuicAdapter {
    /// Dials `config.server`, exchanges the control-stream header, and returns the connection.
    pub async fn connect(config: &DialConfig) -> Result<QuicConnection, ConnectError> {
        let (host, port) =
            split_host_port(&config.server).map_err(|detail| ConnectError::InvalidAddress {
                server: config.server.clone(),
                detail,
            })?;
        let crypto = tls::quic_client_crypto(&config.identity, &config.trust_anchors)?;
        let mut client_config = quinn::ClientConfig::new(crypto);
        client_config.transport_config(transport_config(&config.link));
        let after = config.link.handshake_timeout;
        timeout(after, dial(config, host, port, client_config))
            .await
            .unwrap_or(Err(ConnectError::Timeout { after }))
    }

    /// Serves QUIC edges on `socket` until `shutdown` completes; then new connections are refused
    /// and established ones continue.
    pub fn listen(
        socket: std::net::UdpSocket,
        config: ListenConfig,
        mut shutdown: Shutdown,
    ) -> Result<impl Listener + use<>, ListenError> {
        let crypto = tls::quic_server_crypto(&config.identity, &config.trust_anchors)?;
        let mut server_config = quinn::ServerConfig::with_crypto(crypto);
        server_config.transport_config(transport_config(&config.link));
        let local_addr = socket.local_addr().map_err(ListenError::Io)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config(&config.identity),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(ListenError::Io)?;
        let ctx = Arc::new(ServerContext {
            link: config.link,
            capabilities: config.capabilities,
        });
        Ok(accept::start(
            local_addr,
            config.max_concurrent_handshakes,
            move |mut handshakes| async move {
                while let Some((permit, incoming)) =
                    handshakes.next_turn(&mut shutdown, endpoint.accept()).await
                {
                    let Some(incoming) = incoming else { break };
                    handshakes.spawn(permit, serve_handshake(ctx.clone(), incoming));
                }
                // Refuse new connections; established ones keep the endpoint running.
                endpoint.set_server_config(None);
            },
        ))
    }
}

/// The message a connection error during the client handshake means for the caller.
fn connect_error(err: ConnectionError, link: &LinkConfig) -> ConnectError {
    match err {
        ConnectionError::ApplicationClosed(close) => ConnectError::Rejected {
            status: Some(close.error_code.into_inner()),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        ConnectionError::ConnectionClosed(close)
            if crypto_alert(u64::from(close.error_code)).is_some() =>
        {
            let alert = crypto_alert(u64::from(close.error_code)).unwrap_or_default();
            ConnectError::Tls(rustls::Error::AlertReceived(alert.into()))
        }
        ConnectionError::TransportError(e) if crypto_alert(u64::from(e.code)).is_some() => {
            ConnectError::Tls(rustls::Error::General(e.reason))
        }
        other => ConnectError::Lost {
            reason: connection::reason_from_connection_error(other, link.read_deadline),
        },
    }
}

/// The TLS alert of a QUIC CRYPTO_ERROR code (0x100 + alert, RFC 9001 §4.8).
fn crypto_alert(code: u64) -> Option<u8> {
    code.checked_sub(0x100).and_then(|a| u8::try_from(a).ok())
}

fn read_end_to_connect(end: ReadEnd, conn: &quinn::Connection, link: &LinkConfig) -> ConnectError {
    match end {
        ReadEnd::ConnectionLost => match conn.close_reason() {
            Some(e) => connect_error(e, link),
            None => ConnectError::PeerMisbehaved {
                detail: "control stream failed".to_owned(),
            },
        },
        ReadEnd::Eof => ConnectError::PeerMisbehaved {
            detail: "server closed the control stream during the handshake".to_owned(),
        },
        ReadEnd::Failed(reason) => ConnectError::PeerMisbehaved {
            detail: reason.to_string(),
        },
    }
}

async fn dial(
    config: &DialConfig,
    host: String,
    port: u16,
    client_config: quinn::ClientConfig,
) -> Result<QuicConnection, ConnectError> {
    let link = &config.link;
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(ConnectError::Io)?
        .next()
        .ok_or_else(|| {
            ConnectError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host} has no address"),
            ))
        })?;
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(ConnectError::Io)?;
    let conn = endpoint
        .connect_with(client_config, addr, &host)
        .map_err(|e| ConnectError::InvalidAddress {
            server: config.server.clone(),
            detail: e.to_string(),
        })?
        .await
        .map_err(|e| connect_error(e, link))?;
    let certificate = peer_certificate(&conn).ok_or_else(|| ConnectError::PeerMisbehaved {
        detail: "server presented no certificate".to_owned(),
    })?;
    let (mut send, recv) = conn.open_bi().await.map_err(|e| connect_error(e, link))?;
    let header = control::client_header(
        config.node_id.as_str(),
        &config.project_id,
        config.capabilities,
    );
    if let Err(e) = send.write_chunk(control::frame(&header)).await {
        return Err(match e {
            quinn::WriteError::ConnectionLost(e) => connect_error(e, link),
            other => ConnectError::PeerMisbehaved {
                detail: other.to_string(),
            },
        });
    }
    let mut reader = FrameReader::new(recv, CONTROL_MAX);
    let (answer, _) = reader
        .next()
        .await
        .map_err(|end| read_end_to_connect(end, &conn, link))?;
    if !control::is_ack_of(&answer, &header) {
        return Err(ConnectError::Rejected {
            status: None,
            reason: format!(
                "server answered the header with {:?} ({})",
                answer.content.as_text().unwrap_or("non-text content"),
                answer.route.operation
            ),
        });
    }
    let capabilities = if config.capabilities == Capabilities::NONE {
        Capabilities::NONE
    } else {
        let (reply, _) = reader
            .next()
            .await
            .map_err(|end| read_end_to_connect(end, &conn, link))?;
        control::parse_header(&reply)
            .map_err(|detail| ConnectError::PeerMisbehaved { detail })?
            .capabilities
            .unwrap_or(Capabilities::NONE)
            .intersection(config.capabilities)
    };
    let peer = PeerIdentity {
        protocol: Protocol::Quic,
        remote_addr: conn.remote_address(),
        certificate,
        node_id: None,
        project_id: None,
        capabilities,
    };
    Ok(QuicConnection::spawn(
        conn,
        send,
        reader,
        peer,
        link,
        Some(endpoint),
    ))
}

/// The verified leaf certificate of the peer.
fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

/// What every server-side handshake needs.
#[derive(Debug)]
struct ServerContext {
    link: LinkConfig,
    capabilities: Capabilities,
}

async fn serve_handshake(ctx: Arc<ServerContext>, incoming: quinn::Incoming) -> Accepted {
    let remote = incoming.remote_address();
    let after = ctx.link.handshake_timeout;
    match timeout(after, server_handshake(&ctx, incoming, remote)).await {
        Ok(Ok(conn)) => Ok(Box::new(conn)),
        Ok(Err(reason)) => Err(AcceptError::Rejected { remote, reason }),
        // Dropping the unfinished handshake drops its connection, which quinn then closes.
        Err(_) => Err(AcceptError::Rejected {
            remote,
            reason: RejectReason::Timeout { after },
        }),
    }
}

/// Classifies a connection error during the server handshake.
fn reject_reason(err: ConnectionError) -> RejectReason {
    match err {
        ConnectionError::TransportError(e) => match crypto_alert(u64::from(e.code)) {
            Some(alert) => RejectReason::from_alert(alert, e.reason),
            None => RejectReason::BadHandshake {
                detail: e.to_string(),
            },
        },
        ConnectionError::ConnectionClosed(close)
            if crypto_alert(u64::from(close.error_code)).is_some() =>
        {
            RejectReason::Tls {
                detail: format!("client refused our certificate: {close}"),
            }
        }
        other => RejectReason::Lost {
            detail: other.to_string(),
        },
    }
}

/// Longest the server waits for a client to acknowledge the `nack` to an unparsable header
/// before closing the connection.
const NACK_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Refuses an established connection: closes it with `code` and the reason as text.
fn refuse(conn: &quinn::Connection, code: VarInt, reason: RejectReason) -> RejectReason {
    conn.close(code, reason.to_string().as_bytes());
    reason
}

/// QUIC and TLS (client certificate verified by rustls), ALPN check, then the control stream:
/// the header's `Node_id` must match the certificate; then `ack` (and capabilities).
async fn server_handshake(
    ctx: &ServerContext,
    incoming: quinn::Incoming,
    remote_addr: SocketAddr,
) -> Result<QuicConnection, RejectReason> {
    let connecting = incoming.accept().map_err(reject_reason)?;
    let conn = connecting.await.map_err(reject_reason)?;
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() != Some(QUIC_ALPN) {
        let reason = RejectReason::Tls {
            detail: "client did not negotiate ALPN causeway/1".to_owned(),
        };
        return Err(refuse(&conn, code::BAD_HANDSHAKE, reason));
    }
    let Some(certificate) = peer_certificate(&conn) else {
        return Err(refuse(
            &conn,
            code::REJECTED,
            RejectReason::NoClientCertificate,
        ));
    };
    let (mut send, recv) = conn.accept_bi().await.map_err(reject_reason)?;
    let mut reader = FrameReader::new(recv, CONTROL_MAX);
    let header = match reader.next().await {
        Ok((header, _)) => header,
        Err(ReadEnd::ConnectionLost) => {
            return Err(reject_reason(
                conn.close_reason()
                    .unwrap_or(ConnectionError::LocallyClosed),
            ));
        }
        Err(ReadEnd::Eof) => {
            let reason = RejectReason::BadHandshake {
                detail: "control stream ended before the header".to_owned(),
            };
            return Err(refuse(&conn, code::BAD_HANDSHAKE, reason));
        }
        Err(ReadEnd::Failed(why)) => {
            let reason = RejectReason::BadHandshake {
                detail: format!("control stream: {why}"),
            };
            return Err(refuse(&conn, code::BAD_HANDSHAKE, reason));
        }
    };
    let parsed = match control::parse_header(&header) {
        Ok(parsed) => parsed,
        Err(detail) => {
            // viaduct answers `nack` (and then serves anyway, W15); we answer and refuse.
            // The close would discard stream data not yet acknowledged: finish the stream and
            // wait (briefly) until the client has acknowledged the nack, then close.
            let nack = Message::response_to(&header, proto::Content::text("nack"));
            let delivered = async {
                send.write_chunk(control::frame(&nack)).await.ok()?;
                send.finish().ok()?;
                send.stopped().await.ok()
            };
            let _ = timeout(NACK_LINGER, delivered).await;
            return Err(refuse(
                &conn,
                code::BAD_HANDSHAKE,
                RejectReason::BadHandshake { detail },
            ));
        }
    };
    let node_id = match verify_node(&certificate, parsed.node_id.as_deref()) {
        Ok(node_id) => node_id,
        Err(reason) => return Err(refuse(&conn, code::REJECTED, reason)),
    };
    let accepted = parsed
        .capabilities
        .map(|offered| offered.intersection(ctx.capabilities));
    let mut answer = vec![control::frame(&control::ack_for(&header))];
    if let Some(accepted) = accepted {
        answer.push(control::frame(&control::server_header(accepted)));
    }
    send.write_all_chunks(&mut answer)
        .await
        .map_err(|e| RejectReason::Lost {
            detail: e.to_string(),
        })?;
    let peer = PeerIdentity {
        protocol: Protocol::Quic,
        remote_addr,
        certificate,
        node_id: Some(node_id),
        project_id: Some(parsed.project_id),
        capabilities: accepted.unwrap_or(Capabilities::NONE),
    };
    Ok(QuicConnection::spawn(
        conn, send, reader, peer, &ctx.link, None,
    ))
}

/// The server endpoint's settings, with the stateless-reset key and the connection-id key
/// derived from the server's private key instead of drawn at random. A cloudcore restarted with
/// the same key (a crash, an upgrade) then recognises the connection ids its previous process
/// handed out and answers their packets with a stateless reset that the edge accepts (RFC 9000
/// §10.3), so the edge notices within one round trip and reconnects, instead of waiting out its
/// dead-peer timeout. Both keys are one-way functions of the private key's bytes under labels
/// of their own, so they reveal nothing of it; the key must be loaded in the same encoding on
/// every start (cloudcore serves its key as read from its file).
fn endpoint_config(identity: &certs::Identity) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| {
        let mut input = label.to_vec();
        input.extend_from_slice(identity.key.secret_der());
        ring::digest::digest(&ring::digest::SHA256, &input)
    };
    let reset = derive(b"causeway quic stateless reset key v1\0");
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    let cid = derive(b"causeway quic connection id key v1\0");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    // quinn sends at most one reset per 20 ms by default, which a restarted cloudcore with a
    // thousand edges exhausts at once (most edges then wait out the idle timeout instead). A
    // reset is always smaller than the packet that caused it, so a lower bound risks no
    // amplification; 1 ms allows a thousand edges a second.
    config.min_reset_interval(std::time::Duration::from_millis(1));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}
