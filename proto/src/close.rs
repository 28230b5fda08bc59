//! Session close codes (PROTOCOL.md Part A item 9): why a Causeway peer ended a session on
//! purpose, as one number that travels in the WebSocket close frame (private range 4000–4999) and
//! as the QUIC application error code of CONNECTION_CLOSE, so an edge can react to the reason
//! without parsing the reason text. The same number is used on both transports.
//!
//! Transport-level failures (malformed data, size cap, protocol violation, deadlines) keep their
//! transport codes (WebSocket 1002/1007/1008/1009, QUIC `0x11`–`0x16`); these codes are for the
//! decisions a session takes.

use std::fmt;

/// A session-level reason to end a connection, with its wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SessionCloseCode {
    /// 4000: the cloud heard no `keepalive` operation within its keepalive interval, however
    /// much other data arrived (Part A item 6).
    KeepaliveTimeout,
    /// 4001: a newer connection of the same node id took over the session (the newest wins).
    Replaced,
    /// 4002: the cloud serves its maximum number of nodes.
    NodeLimit,
    /// 4003: the node's identity was refused after the transport handshake (no node id, a node
    /// id other than the certificate's, not a node certificate).
    IdentityRefused,
    /// 4004: the closing side is shutting down or restarting.
    Shutdown,
    /// 4005: the closing side failed internally (its store failed); nothing of the peer's was
    /// wrong.
    InternalError,
}

/// What an edge does after a close, by [`SessionCloseCode::retry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reconnect after the usual wait (two heartbeats plus jitter).
    Normal,
    /// Count it as a failed attempt: exponential backoff with jitter.
    Backoff,
    /// Something outside this edge must change first (another instance holds the node id, the
    /// certificate is refused): wait the longest backoff, and log an error.
    Longest,
}

impl SessionCloseCode {
    /// Every code, in number order.
    pub const ALL: [Self; 6] = [
        Self::KeepaliveTimeout,
        Self::Replaced,
        Self::NodeLimit,
        Self::IdentityRefused,
        Self::Shutdown,
        Self::InternalError,
    ];

    /// The number on the wire: the WebSocket close code and the QUIC application error code.
    pub fn code(self) -> u16 {
        match self {
            Self::KeepaliveTimeout => 4000,
            Self::Replaced => 4001,
            Self::NodeLimit => 4002,
            Self::IdentityRefused => 4003,
            Self::Shutdown => 4004,
            Self::InternalError => 4005,
        }
    }

    /// The code for a number read off the wire; `None` for any other number.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| u64::from(c.code()) == code)
    }

    /// A stable, low-cardinality name (logs, metrics, the conformance kit).
    pub fn label(self) -> &'static str {
        match self {
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::Replaced => "replaced",
            Self::NodeLimit => "node_limit",
            Self::IdentityRefused => "identity_refused",
            Self::Shutdown => "shutdown",
            Self::InternalError => "internal_error",
        }
    }

    /// How an edge should reconnect after the cloud closed with this code.
    pub fn retry(self) -> Retry {
        match self {
            Self::KeepaliveTimeout | Self::Shutdown => Retry::Normal,
            Self::NodeLimit | Self::InternalError => Retry::Backoff,
            Self::Replaced | Self::IdentityRefused => Retry::Longest,
        }
    }
}

impl fmt::Display for SessionCloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_private_websocket_codes_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for code in SessionCloseCode::ALL {
            assert!((4000..5000).contains(&code.code()), "{code}");
            assert!(seen.insert(code.code()), "{code} twice");
            assert_eq!(
                SessionCloseCode::from_code(u64::from(code.code())),
                Some(code)
            );
        }
        assert_eq!(SessionCloseCode::from_code(1000), None);
        assert_eq!(SessionCloseCode::from_code(0), None);
        assert_eq!(SessionCloseCode::from_code(4999), None);
        assert_eq!(SessionCloseCode::Replaced.to_string(), "4001 (replaced)");
    }

    #[test]
    fn a_takeover_is_not_retried_like_a_blip() {
        assert_eq!(SessionCloseCode::Replaced.retry(), Retry::Longest);
        assert_eq!(SessionCloseCode::Shutdown.retry(), Retry::Normal);
        assert_eq!(SessionCloseCode::NodeLimit.retry(), Retry::Backoff);
    }
}
