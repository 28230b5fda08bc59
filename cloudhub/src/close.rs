//! Why a node's session ended ([`CloseCause`]): the metric label, the fault class for the log
//! line, the session close code and reason text sent to the node (PROTOCOL.md Part A item 9).

use proto::Fault;
use proto::FaultClass;
use proto::close::SessionCloseCode;

use crate::registry::Stop;

/// Why a session ended, as logged and counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseCause {
    /// A newer connection of the same node took over.
    Replaced,
    /// The cloud is stopping.
    Shutdown,
    /// No keepalive within the keepalive interval.
    KeepaliveTimeout,
    /// The node closed the connection cleanly.
    PeerClosed,
    /// The transport reported an error while reading.
    Transport(Fault),
    /// Writing to the node failed.
    SendFailed(Fault),
    /// The store failed; the node will reconnect and start over from what is durable.
    StoreFailed(String),
}

impl CloseCause {
    /// Stable metric label.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Replaced => "replaced",
            Self::Shutdown => "shutdown",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::PeerClosed => "peer_closed",
            Self::Transport(_) => "transport_error",
            Self::SendFailed(_) => "send_failed",
            Self::StoreFailed(_) => "store_failed",
        }
    }

    /// Whose fault the end was, for the log line; `None` for a session ended on purpose.
    pub(crate) fn fault_class(&self) -> Option<FaultClass> {
        match self {
            Self::Replaced | Self::Shutdown | Self::PeerClosed => None,
            Self::KeepaliveTimeout => Some(FaultClass::Network),
            Self::Transport(fault) | Self::SendFailed(fault) => Some(fault.class),
            Self::StoreFailed(_) => Some(FaultClass::Local),
        }
    }

    /// The session close code sent with the close (PROTOCOL.md Part A item 9); `None` where the
    /// connection already failed and a plain close is all that is left to send.
    pub(crate) fn session_code(&self) -> Option<SessionCloseCode> {
        match self {
            Self::Replaced => Some(SessionCloseCode::Replaced),
            Self::Shutdown => Some(SessionCloseCode::Shutdown),
            Self::KeepaliveTimeout => Some(SessionCloseCode::KeepaliveTimeout),
            Self::StoreFailed(_) => Some(SessionCloseCode::InternalError),
            Self::PeerClosed | Self::Transport(_) | Self::SendFailed(_) => None,
        }
    }

    /// The reason text sent to the node with the close.
    pub(crate) fn text(&self) -> String {
        match self {
            Self::Replaced => "replaced by a newer connection of this node".into(),
            Self::Shutdown => "cloud is shutting down".into(),
            Self::KeepaliveTimeout => "no keepalive within the keepalive interval".into(),
            Self::PeerClosed => "closed by the node".into(),
            Self::Transport(e) => format!("transport error: {}", e.reason),
            Self::SendFailed(e) => format!("send failed: {}", e.reason),
            Self::StoreFailed(e) => format!("cloud store failure: {e}"),
        }
    }
}

impl From<Stop> for CloseCause {
    fn from(stop: Stop) -> Self {
        match stop {
            Stop::Replaced => Self::Replaced,
            Stop::Shutdown => Self::Shutdown,
        }
    }
}
