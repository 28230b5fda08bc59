//! Typed configuration: [`DialConfig`] (edge side), [`ListenConfig`] (cloud side) and the
//! [`LinkConfig`] timeouts and limits both share.
//!
//! Defaults are KubeEdge's (handshake 30 s, read and write deadline 15 s, 32 MiB per message) and
//! assume the edge link KubeEdge targets: a WAN path of tens to hundreds of milliseconds RTT where a
//! dead peer must be noticed within about two 15 s heartbeats, not the 15 minutes of TCP
//! retransmission (W7).

use std::time::Duration;

use certs::{Identity, NodeId, TrustAnchors};

use crate::Capabilities;

/// KubeEdge's default project id (edgecore `projectID`).
pub const DEFAULT_PROJECT_ID: &str = "e632aba927ea4ac2b575ec1603d56f10";

/// The per-message cap, 32 MiB: viaduct's packer limit, applied to both transports (fixes W2, W3).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 32 * 1024 * 1024;

/// Timeouts and limits of one link, the same on both ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// Time allowed for TCP/QUIC, TLS and the protocol handshake (WebSocket upgrade or QUIC
    /// control stream) together. Default 30 s (KubeEdge `handshakeTimeout`). Shorter fails faster
    /// on a dead server; too short fails on slow, lossy links.
    pub handshake_timeout: Duration,
    /// A connection on which nothing arrives for this long is declared dead (WebSocket read
    /// deadline; QUIC idle timeout). Default 15 s (KubeEdge `readDeadline`, which KubeEdge never
    /// applies). Keep-alives ([`LinkConfig::keep_alive_interval`]) keep an idle but healthy link
    /// inside it.
    pub read_deadline: Duration,
    /// A write (or a `send` waiting for buffer space) that makes no progress for this long fails
    /// and closes the connection: the peer stopped reading. Default 15 s (KubeEdge
    /// `writeDeadline`); it also bounds a graceful `close`.
    pub write_deadline: Duration,
    /// How often each end elicits traffic from an idle peer: a WebSocket ping frame (stock
    /// KubeEdge peers answer with a pong) or a QUIC PING. Default 5 s, a third of the read
    /// deadline, so one or two lost pings never end a healthy link. Clamped to half the read
    /// deadline.
    pub keep_alive_interval: Duration,
    /// Largest message accepted or sent, in encoded bytes (JSON text on WebSocket, protobuf
    /// payload on QUIC). Enforced while reading, before buffering. Default 32 MiB.
    pub max_message_size: usize,
    /// Bytes of encoded messages a connection queues for sending before `send` waits (on top of
    /// socket buffers). Default 1 MiB. Bounds the sender's memory when the peer reads slowly.
    pub send_buffer: usize,
    /// Bytes of decoded messages a connection buffers for `recv` before it stops reading from the
    /// socket (which in turn throttles the peer). Default 1 MiB.
    pub recv_buffer: usize,
    /// QUIC only: how many message streams each end spreads its messages over (by route
    /// resource). Default 8. More streams mean less head-of-line blocking under loss; 1 gives
    /// viaduct's single stream (total order).
    pub quic_streams: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            read_deadline: Duration::from_secs(15),
            write_deadline: Duration::from_secs(15),
            keep_alive_interval: Duration::from_secs(5),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            send_buffer: 1024 * 1024,
            recv_buffer: 1024 * 1024,
            quic_streams: 8,
        }
    }
}

impl LinkConfig {
    /// The keep-alive interval actually used: at most half the read deadline, at least 1 ms.
    pub(crate) fn effective_keep_alive(&self) -> Duration {
        self.keep_alive_interval
            .min(self.read_deadline / 2)
            .max(Duration::from_millis(1))
    }

    /// Message streams actually used: 1 to [`MAX_QUIC_STREAMS`].
    pub(crate) fn effective_quic_streams(&self) -> usize {
        self.quic_streams.clamp(1, MAX_QUIC_STREAMS)
    }
}

/// Upper bound of [`LinkConfig::quic_streams`]; the QUIC stream limit granted to the peer is
/// derived from it.
pub const MAX_QUIC_STREAMS: usize = 64;

/// How an edge dials the cloud.
#[derive(Clone, Debug)]
pub struct DialConfig {
    /// The cloud's `host:port` (KubeEdge `websocket.server` / `quic.server`), e.g.
    /// `10.0.0.1:10000`. The host is also the name the server certificate must carry (DNS name or
    /// IP address SAN).
    pub server: String,
    /// This node's id; must match the CN of [`DialConfig::identity`]'s certificate.
    pub node_id: NodeId,
    /// The project id sent to the cloud. Default [`DEFAULT_PROJECT_ID`].
    pub project_id: String,
    /// Our client certificate and key (only the leaf is presented, PROTOCOL.md C.3).
    pub identity: Identity,
    /// The CA the server certificate must chain to.
    pub trust_anchors: TrustAnchors,
    /// Optional features to offer. Default: all this build implements.
    pub capabilities: Capabilities,
    /// Timeouts and limits.
    pub link: LinkConfig,
}

impl DialConfig {
    /// A configuration with KubeEdge's defaults for everything not given.
    pub fn new(
        server: impl Into<String>,
        node_id: NodeId,
        identity: Identity,
        trust_anchors: TrustAnchors,
    ) -> Self {
        Self {
            server: server.into(),
            node_id,
            project_id: DEFAULT_PROJECT_ID.to_owned(),
            identity,
            trust_anchors,
            capabilities: Capabilities::ALL,
            link: LinkConfig::default(),
        }
    }
}

/// How the cloud serves edges.
#[derive(Clone, Debug)]
pub struct ListenConfig {
    /// The server certificate (with the SANs edges dial) and key.
    pub identity: Identity,
    /// The CA client certificates must chain to.
    pub trust_anchors: TrustAnchors,
    /// Optional features this server supports. Default: all this build implements.
    pub capabilities: Capabilities,
    /// Timeouts and limits. The read deadline is what notices a silent edge; the server also
    /// pings idle edges every keep-alive interval.
    pub link: LinkConfig,
    /// Handshakes in progress at once; further clients wait in the kernel's accept queue (TCP)
    /// or are refused (QUIC). Default 1024. Bounds memory under a connection flood.
    pub max_concurrent_handshakes: usize,
}

impl ListenConfig {
    /// A configuration with the defaults for everything not given.
    pub fn new(identity: Identity, trust_anchors: TrustAnchors) -> Self {
        Self {
            identity,
            trust_anchors,
            capabilities: Capabilities::ALL,
            link: LinkConfig::default(),
            max_concurrent_handshakes: 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_kubeedges() {
        let link = LinkConfig::default();
        assert_eq!(link.handshake_timeout, Duration::from_secs(30));
        assert_eq!(link.read_deadline, Duration::from_secs(15));
        assert_eq!(link.write_deadline, Duration::from_secs(15));
        assert_eq!(link.max_message_size, 33_554_432);
    }

    #[test]
    fn keep_alive_stays_inside_the_read_deadline() {
        let link = LinkConfig {
            read_deadline: Duration::from_secs(2),
            keep_alive_interval: Duration::from_secs(10),
            ..LinkConfig::default()
        };
        assert_eq!(link.effective_keep_alive(), Duration::from_secs(1));
        assert_eq!(
            LinkConfig::default().effective_keep_alive(),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn quic_stream_count_is_clamped() {
        let mut link = LinkConfig {
            quic_streams: 0,
            ..LinkConfig::default()
        };
        assert_eq!(link.effective_quic_streams(), 1);
        link.quic_streams = 1000;
        assert_eq!(link.effective_quic_streams(), MAX_QUIC_STREAMS);
    }
}
