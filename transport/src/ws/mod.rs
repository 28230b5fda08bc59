//! KubeEdge's WebSocket wire (PROTOCOL.md B§4, Part C), byte for byte: WSS to
//! `/{projectID}/{nodeID}/events` with the `node_id`, `project_id` and `ConnectionUse: msg`
//! headers, one JSON message per text frame with a trailing LF, mutual TLS. A stock KubeEdge
//! edgecore can connect to [`WsAdapter::listen`]'s server and [`WsAdapter::connect`] to a stock
//! KubeEdge cloudcore.
//!
//! Where Causeway is stricter than KubeEdge (and stays compatible):
//! - the server refuses, with an HTTP status and a text reason before the upgrade, a client whose
//!   node id does not match its certificate, or whose `ConnectionUse` is not `msg` (W8);
//! - messages are capped (32 MiB by default) while reading (W3);
//! - a read deadline is enforced; both ends send WebSocket pings when idle, which stock gorilla
//!   peers answer, so a half-open link is noticed within the deadline (W7);
//! - control operations (`ping`, `pong`, `config`) are answered `ack` and not delivered, as viaduct
//!   does on both ends.

mod connection;
mod handshake;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::Request;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

pub use connection::WsConnection;

use crate::accept::{self, Accepted, verify_node};
use crate::config::LinkConfig;
use crate::{
    AcceptError, Capabilities, ConnectError, DialConfig, ListenConfig, ListenError, Listener,
    PeerIdentity, Protocol, RejectReason, Shutdown, tls,
};
use handshake::{ClientUpgradeError, HeadError};

/// tungstenite's eagerly allocated read buffer per connection. Its default (128 KiB) would
/// dominate the memory of an idle node connection (the cloud holds thousands); 4 KiB measured no
/// slower in `benches/src/bin/transport.rs` (large messages just take more reads).
const READ_BUFFER: usize = 4 * 1024;
/// Pause after the listening socket fails to accept (e.g. out of descriptors), so the loop does not
/// spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The WebSocket adapter.
#[derive(Clone, Copy, Debug, Default)]
pub struct WsAdapter;

impl_adapter!(WsAdapter, Protocol::WebSocket, Tcp, Udp, "TCP");

/// The tungstenite settings: the size cap enforced while reading, before buffering a frame.
fn ws_config(link: &LinkConfig) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(link.max_message_size))
        .max_frame_size(Some(link.max_message_size))
}

impl WsAdapter {
    /// Dials `config.server` as a KubeEdge edge would (see the module doc).
    pub async fn connect(config: &DialConfig) -> Result<WsConnection, ConnectError> {
        let (host, port) = accept::split_host_port(&config.server).map_err(|detail| {
            ConnectError::InvalidAddress {
                server: config.server.clone(),
                detail,
            }
        })?;
        check_path_segment(&config.project_id).map_err(|detail| ConnectError::InvalidAddress {
            server: config.server.clone(),
            detail: format!("project id: {detail}"),
        })?;
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| ConnectError::InvalidAddress {
                server: config.server.clone(),
                detail: e.to_string(),
            })?;
        let tls = tls::client_config(Protocol::WebSocket, &config.identity, &config.trust_anchors)?;
        let after = config.link.handshake_timeout;
        timeout(after, dial(config, host, port, server_name, tls))
            .await
            .unwrap_or(Err(ConnectError::Timeout { after }))
    }

    /// Serves WebSocket edges on `listener` until `shutdown` completes.
    pub fn listen(
        listener: TcpListener,
        config: ListenConfig,
        mut shutdown: Shutdown,
    ) -> Result<impl Listener + use<>, ListenError> {
        let tls = tls::server_config(Protocol::WebSocket, &config.identity, &config.trust_anchors)?;
        let local_addr = listener.local_addr().map_err(ListenError::Io)?;
        let ctx = Arc::new(ServerContext {
            acceptor: TlsAcceptor::from(tls),
            link: config.link,
            capabilities: config.capabilities,
        });
        Ok(accept::start(
            local_addr,
            config.max_concurrent_handshakes,
            move |mut handshakes| async move {
                while let Some((permit, accepted)) =
                    handshakes.next_turn(&mut shutdown, listener.accept()).await
                {
                    match accepted {
                        Ok((tcp, remote)) => {
                            handshakes.spawn(permit, serve_handshake(ctx.clone(), tcp, remote));
                        }
                        Err(e) => {
                            handshakes.report(Err(AcceptError::Io(e)));
                            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        }
                    }
                }
            },
        ))
    }
}

/// A project id goes into the URL path and a header: keep it to characters safe in both.
fn check_path_segment(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty".to_owned());
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~')))
    {
        Some(c) => Err(format!("character {c:?} not allowed")),
        None => Ok(()),
    }
}

/// An I/O error of the TLS session, classified: rustls errors (alerts) are TLS failures.
fn connect_io_error(err: std::io::Error) -> ConnectError {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => ConnectError::Tls(tls.clone()),
        None => ConnectError::Io(err),
    }
}

async fn dial(
    config: &DialConfig,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<WsConnection, ConnectError> {
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(ConnectError::Io)?;
    let _ = tcp.set_nodelay(true);
    let remote_addr = tcp.peer_addr().map_err(ConnectError::Io)?;
    let mut stream = TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(connect_io_error)?;
    let key = handshake::new_key();
    let request = handshake::client_request(
        &config.server,
        &config.project_id,
        config.node_id.as_str(),
        config.capabilities,
        &key,
    );
    let upgraded = handshake::client_upgrade(&mut stream, &request, &key, config.capabilities)
        .await
        .map_err(|e| match e {
            ClientUpgradeError::Io(e) => connect_io_error(e),
            ClientUpgradeError::Refused { status, reason } => ConnectError::Rejected {
                status: Some(u64::from(status)),
                reason,
            },
            ClientUpgradeError::Protocol(detail) => ConnectError::PeerMisbehaved { detail },
        })?;
    let certificate = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .cloned()
        .ok_or_else(|| ConnectError::PeerMisbehaved {
            detail: "server presented no certificate".to_owned(),
        })?;
    let ws = WebSocketStream::from_partially_read(
        TlsStream::Client(stream),
        upgraded.tail,
        Role::Client,
        Some(ws_config(&config.link)),
    )
    .await;
    let peer = PeerIdentity {
        protocol: Protocol::WebSocket,
        remote_addr,
        certificate,
        node_id: None,
        project_id: None,
        capabilities: upgraded.capabilities,
    };
    Ok(WsConnection::spawn(ws, peer, &config.link))
}

/// What every server-side handshake needs.
struct ServerContext {
    acceptor: TlsAcceptor,
    link: LinkConfig,
    capabilities: Capabilities,
}

async fn serve_handshake(ctx: Arc<ServerContext>, tcp: TcpStream, remote: SocketAddr) -> Accepted {
    let after = ctx.link.handshake_timeout;
    match timeout(after, server_handshake(&ctx, tcp, remote)).await {
        Ok(Ok(conn)) => Ok(Box::new(conn)),
        Ok(Err(reason)) => Err(AcceptError::Rejected { remote, reason }),
        Err(_) => Err(AcceptError::Rejected {
            remote,
            reason: RejectReason::Timeout { after },
        }),
    }
}

/// TLS (client certificate verified by rustls), then the upgrade request, then identity checks;
/// a refusal is answered with an HTTP status and closes the connection.
async fn server_handshake(
    ctx: &ServerContext,
    tcp: TcpStream,
    remote_addr: SocketAddr,
) -> Result<WsConnection, RejectReason> {
    let _ = tcp.set_nodelay(true);
    let mut stream = ctx
        .acceptor
        .accept(tcp)
        .await
        .map_err(|e| RejectReason::from_handshake_io(&e))?;
    let certificate = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .cloned()
        .ok_or(RejectReason::NoClientCertificate)?;
    let (request, tail) = match handshake::read_head::<Request, _>(&mut stream).await {
        Ok(parsed) => parsed,
        Err(HeadError::Io(e)) => return Err(RejectReason::from_handshake_io(&e)),
        Err(HeadError::TooLarge) => {
            let reason = RejectReason::BadHandshake {
                detail: "request head over 16 KiB".to_owned(),
            };
            return Err(refuse(stream, 431, reason).await);
        }
        Err(HeadError::Parse(detail)) => {
            return Err(refuse(stream, 400, RejectReason::BadHandshake { detail }).await);
        }
    };
    let hello = match handshake::parse_request(&request) {
        Ok(hello) => hello,
        Err(detail) => {
            return Err(refuse(stream, 400, RejectReason::BadHandshake { detail }).await);
        }
    };
    let node_id = match verify_node(&certificate, hello.node_id.as_deref()) {
        Ok(node_id) => node_id,
        Err(reason) => return Err(refuse(stream, 403, reason).await),
    };
    if hello.connection_use.as_deref() != Some(handshake::CONNECTION_USE_MSG) {
        let reason = RejectReason::BadConnectionUse {
            value: hello.connection_use,
        };
        return Err(refuse(stream, 400, reason).await);
    }
    let accepted = hello
        .offered
        .map(|offered| offered.intersection(ctx.capabilities));
    let response = handshake::switching_protocols(&hello.accept_key, accepted);
    let written = async {
        stream.write_all(response.as_bytes()).await?;
        stream.flush().await
    };
    written
        .await
        .map_err(|e| RejectReason::from_handshake_io(&e))?;
    let ws = WebSocketStream::from_partially_read(
        TlsStream::Server(stream),
        tail,
        Role::Server,
        Some(ws_config(&ctx.link)),
    )
    .await;
    let peer = PeerIdentity {
        protocol: Protocol::WebSocket,
        remote_addr,
        certificate,
        node_id: Some(node_id),
        project_id: Some(hello.project_id),
        capabilities: accepted.unwrap_or(Capabilities::NONE),
    };
    Ok(WsConnection::spawn(ws, peer, &ctx.link))
}

/// Answers an HTTP error with `reason` as text, then closes TLS (close_notify) and TCP.
async fn refuse(
    mut stream: tokio_rustls::server::TlsStream<TcpStream>,
    status: u16,
    reason: RejectReason,
) -> RejectReason {
    let response = handshake::error_response(status, &reason.to_string());
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_ids_must_be_path_safe() {
        assert!(check_path_segment("e632aba927ea4ac2b575ec1603d56f10").is_ok());
        assert!(check_path_segment("").is_err());
        assert!(check_path_segment("a/b").is_err());
        assert!(check_path_segment("a\r\nX: y").is_err());
    }
}
