//! The link between an edge node and the cloud: one pair of traits, [`Adapter`] (dial and listen)
//! and [`Connection`] (an established, mutually authenticated link carrying whole
//! [`proto::Message`]s), with a WebSocket ([`ws::WsAdapter`]) and a QUIC ([`quic::QuicAdapter`])
//! implementation, both over mutual TLS.
//!
//! What it is not: it keeps no session state (heartbeats, ACKs, queues and reconnects live in
//! `edgehub` / `cloudhub`); it only moves messages, verifies identities and notices dead links.
//!
//! Layout:
//! - [`Adapter`], [`Connection`], [`Listener`], [`PeerIdentity`], [`Capabilities`], [`Protocol`]
//!   (this file): the API, chosen at run time by [`Protocol`] (`"websocket"` / `"quic"`).
//! - [`config`]: [`DialConfig`] and [`ListenConfig`], with KubeEdge's defaults.
//! - [`error`]: one error enum per operation, classified by who is at fault; `fault.rs` says
//!   which [`proto::FaultClass`] each is (`fault_class()`, `fault()` on the error types).
//! - [`tls`]: the only place rustls configurations are built, for both adapters.
//! - [`ws`]: KubeEdge's WebSocket wire, byte for byte (PROTOCOL.md B§4, Part C).
//! - [`quic`]: the Causeway QUIC profile (PROTOCOL.md Part A item 3, B§5).
//!
//! ```text
//!   edgehub ── connect(protocol, &DialConfig) ──► Box<dyn Connection> ◄── Listener::accept ── cloudhub
//!                          send(Message) / recv() / close(reason) / peer()
//!        ws:   TLS 1.2+/TCP ─ HTTP upgrade (node_id, project_id, ConnectionUse) ─ JSON text frames
//!        quic: QUIC v1, TLS 1.3, ALPN causeway/1 ─ control stream (header/ack) ─ `msg` streams of
//!              10-byte packer frames carrying protobuf, spread over streams by resource
//! ```
//!
//! **Why boxed futures.** The edge picks the protocol from its configuration, and cloudhub serves
//! both at once, so callers hold `Box<dyn Connection>` / `Arc<dyn Connection>`. `async fn` in traits
//! is not object-safe, so the trait methods return a [`BoxFuture`]. The allocation per call is
//! negligible next to a TLS record, and the trait stays open for a third adapter, which an enum
//! would not.

/// Implements [`Adapter`] for an adapter type from its inherent `connect(&DialConfig)` and
/// `listen(socket, ListenConfig, Shutdown)`: the two adapters differ only in their protocol and
/// the kind of socket they listen on (`ListenSocket::$socket`; the other kind is refused).
macro_rules! impl_adapter {
    ($adapter:ty, $protocol:expr, $socket:ident, $other:ident, $expected:literal) => {
        impl $crate::Adapter for $adapter {
            fn protocol(&self) -> $crate::Protocol {
                $protocol
            }

            fn connect<'a>(
                &'a self,
                config: &'a $crate::DialConfig,
            ) -> $crate::BoxFuture<'a, Result<Box<dyn $crate::Connection>, $crate::ConnectError>>
            {
                Box::pin(async move {
                    let conn = Self::connect(config).await?;
                    Ok(Box::new(conn) as Box<dyn $crate::Connection>)
                })
            }

            fn listen(
                &self,
                socket: $crate::ListenSocket,
                config: $crate::ListenConfig,
                shutdown: $crate::Shutdown,
            ) -> Result<Box<dyn $crate::Listener>, $crate::ListenError> {
                match socket {
                    $crate::ListenSocket::$socket(socket) => {
                        Ok(Box::new(Self::listen(socket, config, shutdown)?))
                    }
                    $crate::ListenSocket::$other(_) => Err($crate::ListenError::WrongSocket {
                        protocol: $protocol,
                        expected: $expected,
                    }),
                }
            }
        }
    };
}

pub mod config;
pub mod error;
pub mod quic;
pub mod tls;
pub mod ws;

mod accept;
mod fault;
mod queue;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;

use certs::NodeId;
use proto::Message;
use proto::close::SessionCloseCode;
use rustls_pki_types::CertificateDer;

pub use config::{DialConfig, ListenConfig};
pub use error::{
    AcceptError, CloseError, CloseReason, ConnectError, ListenError, RecvError, RejectReason,
    SendError,
};

/// A boxed, `Send` future: what the object-safe trait methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A future that completes when a listener must stop accepting (mini-redis' `shutdown`).
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The wire protocol of a link, chosen by name in configuration (`edgehub.controller.protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// KubeEdge's WebSocket wire (JSON text frames over WSS); interoperates with stock KubeEdge.
    #[serde(rename = "websocket")]
    WebSocket,
    /// The Causeway QUIC profile (RFC 9000, ALPN `causeway/1`); Causeway peers only.
    Quic,
}

impl Protocol {
    /// Every protocol, for code (tests, benchmarks) that runs once per adapter.
    pub const ALL: [Self; 2] = [Self::WebSocket, Self::Quic];

    /// The configuration name: `websocket` or `quic`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Quic => "quic",
        }
    }

    /// The adapter implementing this protocol.
    pub fn adapter(self) -> &'static dyn Adapter {
        match self {
            Self::WebSocket => &ws::WsAdapter,
            Self::Quic => &quic::QuicAdapter,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A protocol name that is neither `websocket` nor `quic`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?}: expected \"websocket\" or \"quic\"")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "websocket" => Ok(Self::WebSocket),
            "quic" => Ok(Self::Quic),
            other => Err(UnknownProtocol(other.to_owned())),
        }
    }
}

/// Optional Causeway features both ends must support; each side sees the intersection of what
/// the client offered ([`DialConfig::capabilities`]) and what the server supports
/// ([`ListenConfig::capabilities`]). A stock KubeEdge peer offers and accepts none.
///
/// On the wire each feature is a token: WebSocket carries them in the `Causeway-Capabilities`
/// header of the upgrade request and of the 101 response; QUIC in the `Causeway_capabilities` key
/// of the control-stream header maps (PROTOCOL.md Part A item 3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Capabilities {
    /// `upstream-ack`: the cloud acknowledges each upstream message it has durably accepted
    /// (PROTOCOL.md Part A item 7), so the edge's outbox can delete it.
    pub upstream_ack: bool,
}

impl Capabilities {
    /// Token of [`Capabilities::upstream_ack`].
    pub const UPSTREAM_ACK: &'static str = "upstream-ack";

    /// No optional feature: KubeEdge semantics.
    pub const NONE: Self = Self {
        upstream_ack: false,
    };

    /// Every feature this build implements.
    pub const ALL: Self = Self { upstream_ack: true };

    /// Parses tokens (unknown ones are ignored, so newer peers can offer more).
    pub fn from_tokens<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Self {
        let mut caps = Self::NONE;
        for token in tokens {
            if token.trim() == Self::UPSTREAM_ACK {
                caps.upstream_ack = true;
            }
        }
        caps
    }

    /// Parses a comma-separated header value such as `upstream-ack, foo`.
    pub fn from_header_value(value: &str) -> Self {
        Self::from_tokens(value.split(','))
    }

    /// The tokens of the features set, in a fixed order.
    pub fn tokens(self) -> Vec<&'static str> {
        let mut tokens = Vec::new();
        if self.upstream_ack {
            tokens.push(Self::UPSTREAM_ACK);
        }
        tokens
    }

    /// The comma-separated header form (empty when no feature is set).
    pub fn header_value(self) -> String {
        self.tokens().join(",")
    }

    /// The features both sets contain.
    #[must_use]
    pub fn intersection(self, other: Self) -> Self {
        Self {
            upstream_ack: self.upstream_ack && other.upstream_ack,
        }
    }
}

/// Who the other end of a [`Connection`] is, as verified during the handshake.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    /// The protocol of the link.
    pub protocol: Protocol,
    /// The peer's socket address (for QUIC, the address at handshake time; it may migrate).
    pub remote_addr: SocketAddr,
    /// The peer's leaf certificate, verified against the trust anchors: the node's client
    /// certificate on the server side, the cloud's server certificate on the client side.
    pub certificate: CertificateDer<'static>,
    /// Server side: the node id of the client certificate (CN `system:node:<id>`), which equals
    /// the id the node claimed (`node_id` header / `Node_id` key) — a mismatch is rejected before
    /// the connection is handed out. Client side: `None` (the peer is the cloud).
    pub node_id: Option<NodeId>,
    /// Server side: the project id the node claimed (`project_id` header / `Project_id` key).
    /// Client side: `None`.
    pub project_id: Option<String>,
    /// The optional features both ends agreed on.
    pub capabilities: Capabilities,
}

/// An established, authenticated link carrying whole messages.
///
/// `send` and `recv` take `&self` and may run concurrently from different tasks (share the
/// connection as `Arc<dyn Connection>`); several tasks may also send at once.
///
/// Ending a connection: [`Connection::close`] is graceful (everything sent before it is delivered
/// before the peer's `recv` returns `Ok(None)`); dropping every handle aborts it.
pub trait Connection: Send + Sync + fmt::Debug + 'static {
    /// Queues `msg` for the peer and returns once the transport has taken it.
    ///
    /// Back-pressure: when the peer reads slower than we send, `send` pends until buffer space
    /// frees (memory stays bounded), and fails with [`SendError::Timeout`] if no progress is made
    /// within the write deadline. Messages sent one after another by one task arrive in order
    /// (on QUIC: per route resource, see [`quic`]).
    ///
    /// Cancelling a pending `send` (dropping its future) never delivers a torn message: on
    /// WebSocket the message is queued whole or not at all; on QUIC a cancellation in the middle of
    /// writing a frame closes the connection.
    fn send(&self, msg: Message) -> BoxFuture<'_, Result<(), SendError>>;

    /// The next message from the peer; `Ok(None)` once the peer (or [`Connection::close`]) has
    /// closed the link cleanly. Errors are terminal: the connection is closed when one is returned.
    ///
    /// Transport control messages (KubeEdge's `ping`, `pong`, `config` operations and QUIC control
    /// stream traffic) are answered by the transport and never returned.
    ///
    /// Keep a task calling `recv`: received messages wait in a bounded buffer, and once it is
    /// full the connection stops reading, so a caller that stalls longer than the peer's
    /// deadlines gets the connection dropped by the peer (as a peer that stopped reading).
    fn recv(&self) -> BoxFuture<'_, Result<Option<Message>, RecvError>>;

    /// Closes gracefully: flushes what was sent, tells the peer `reason`, and waits (bounded by
    /// the write deadline) for the peer to take it all. Later `send`s fail; `recv` returns `None`.
    /// The peer sees WebSocket close code 1000 / QUIC application code 0.
    fn close(&self, reason: &str) -> BoxFuture<'_, Result<(), CloseError>> {
        self.close_with(None, reason)
    }

    /// [`Connection::close`] with a session close code (PROTOCOL.md Part A item 9): the peer sees
    /// `code` as the WebSocket close code and as the QUIC application error code, and reads it
    /// back with [`CloseReason::session_code`]. `None` is a plain graceful close.
    fn close_with(
        &self,
        code: Option<SessionCloseCode>,
        reason: &str,
    ) -> BoxFuture<'_, Result<(), CloseError>>;

    /// The verified identity of the peer.
    fn peer(&self) -> &PeerIdentity;
}

/// The server side of an adapter: hands out authenticated connections, reports rejected ones.
pub trait Listener: Send + fmt::Debug {
    /// The next accepted connection or rejection; `None` once the shutdown signal fired.
    ///
    /// Handshakes (TLS, upgrade or control stream, identity check) run concurrently in the
    /// background, each bounded by the handshake timeout, so a slow client never delays others.
    /// An `Err` concerns one connection attempt only: keep calling `accept`.
    fn accept(&mut self) -> BoxFuture<'_, Option<Result<Box<dyn Connection>, AcceptError>>>;

    /// The local address being served.
    fn local_addr(&self) -> SocketAddr;
}

/// A socket already bound by the caller, handed to [`Adapter::listen`] (never "find a free port,
/// then bind").
#[derive(Debug)]
pub enum ListenSocket {
    /// A TCP listener, for WebSocket.
    Tcp(tokio::net::TcpListener),
    /// A UDP socket, for QUIC.
    Udp(std::net::UdpSocket),
}

impl ListenSocket {
    /// Binds the kind of socket `protocol` serves on `addr` (`127.0.0.1:0` in tests).
    pub async fn bind(protocol: Protocol, addr: SocketAddr) -> std::io::Result<Self> {
        match protocol {
            Protocol::WebSocket => Ok(Self::Tcp(tokio::net::TcpListener::bind(addr).await?)),
            Protocol::Quic => Ok(Self::Udp(std::net::UdpSocket::bind(addr)?)),
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Tcp(l) => l.local_addr(),
            Self::Udp(s) => s.local_addr(),
        }
    }
}

/// One wire protocol: dials and listens. Obtain one with [`Protocol::adapter`].
pub trait Adapter: Send + Sync + fmt::Debug {
    /// The protocol implemented.
    fn protocol(&self) -> Protocol;

    /// Dials `config.server`, completes TLS and the protocol handshake within
    /// `config.handshake_timeout`, and returns the connection.
    fn connect<'a>(
        &'a self,
        config: &'a DialConfig,
    ) -> BoxFuture<'a, Result<Box<dyn Connection>, ConnectError>>;

    /// Serves `socket` until `shutdown` completes. Must be called inside a tokio runtime.
    fn listen(
        &self,
        socket: ListenSocket,
        config: ListenConfig,
        shutdown: Shutdown,
    ) -> Result<Box<dyn Listener>, ListenError>;
}

/// Dials with the adapter `protocol` names: how the edge's configured protocol picks the wire.
pub async fn connect(
    protocol: Protocol,
    config: &DialConfig,
) -> Result<Box<dyn Connection>, ConnectError> {
    protocol.adapter().connect(config).await
}

/// Serves `socket` with the adapter `protocol` names until `shutdown` completes.
pub fn listen(
    protocol: Protocol,
    socket: ListenSocket,
    config: ListenConfig,
    shutdown: Shutdown,
) -> Result<Box<dyn Listener>, ListenError> {
    protocol.adapter().listen(socket, config, shutdown)
}

/// The size of `msg` on `protocol`'s wire, which [`config::LinkConfig::max_message_size`] caps:
/// the JSON text (with its trailing LF) on WebSocket, the protobuf payload (without the 10-byte
/// packer header) on QUIC.
pub fn encoded_len(protocol: Protocol, msg: &Message) -> usize {
    match protocol {
        Protocol::WebSocket => proto::json::to_ws_text(msg).len(),
        Protocol::Quic => proto::pb::encoded_len(msg),
    }
}

/// KubeEdge's transport-level control operations ([`proto::message::CONTROL_OPERATIONS`]):
/// answered with `ack` by the transport on both ends and never delivered (PROTOCOL.md B§4.4).
pub(crate) fn is_control_operation(operation: &str) -> bool {
    proto::message::CONTROL_OPERATIONS.contains(&operation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_parses_and_prints_config_names() {
        assert_eq!("websocket".parse::<Protocol>(), Ok(Protocol::WebSocket));
        assert_eq!("quic".parse::<Protocol>(), Ok(Protocol::Quic));
        assert!("WebSocket".parse::<Protocol>().is_err());
        assert!("tcp".parse::<Protocol>().is_err());
        for p in Protocol::ALL {
            assert_eq!(p.to_string().parse::<Protocol>(), Ok(p));
            assert_eq!(p.adapter().protocol(), p);
        }
    }

    #[test]
    fn protocol_serde_uses_config_names() {
        assert_eq!(
            serde_json::to_string(&Protocol::WebSocket).unwrap(),
            "\"websocket\""
        );
        assert_eq!(
            serde_json::from_str::<Protocol>("\"quic\"").unwrap(),
            Protocol::Quic
        );
        assert!(serde_json::from_str::<Protocol>("\"Quic\"").is_err());
    }

    #[test]
    fn capabilities_tokens_round_trip_and_ignore_unknown() {
        let caps = Capabilities::from_header_value(" upstream-ack , future-thing");
        assert!(caps.upstream_ack);
        assert_eq!(caps.header_value(), "upstream-ack");
        assert_eq!(Capabilities::from_header_value(""), Capabilities::NONE);
        assert_eq!(Capabilities::NONE.header_value(), "");
        assert_eq!(
            Capabilities::ALL.intersection(Capabilities::NONE),
            Capabilities::NONE
        );
        assert_eq!(
            Capabilities::ALL.intersection(Capabilities::ALL),
            Capabilities::ALL
        );
    }

    #[test]
    fn control_operations_are_kubeedges() {
        for op in ["ping", "pong", "config"] {
            assert!(is_control_operation(op));
        }
        for op in ["keepalive", "response", "ack", "header", "Ping"] {
            assert!(!is_control_operation(op));
        }
    }
}
