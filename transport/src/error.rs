//! Errors, one enum per operation ([`ConnectError`], [`ListenError`], [`AcceptError`],
//! [`SendError`], [`RecvError`], [`CloseError`]), each variant saying who is at fault and what to
//! do. [`CloseReason`] is why a connection ended; it is shared by every operation that observes
//! the end, so a `send` after the peer sent garbage says so instead of a bare "closed".

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use proto::close::SessionCloseCode;

use crate::tls::TlsConfigError;

/// Why a connection is no longer open. Cheap to clone: every later call reports the same reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// We closed it with [`crate::Connection::close`]. Nobody's fault.
    #[error("closed locally: {reason}")]
    Local {
        /// The reason given to `close`.
        reason: String,
    },
    /// The peer closed it gracefully (WebSocket close 1000, QUIC close code 0). Nobody's fault;
    /// reconnect if the link is still wanted.
    #[error("closed by peer: {reason}")]
    Peer {
        /// The reason the peer gave (may be empty).
        reason: String,
    },
    /// The peer aborted it with an error code (WebSocket close code other than 1000/1001, QUIC
    /// application code other than 0), or ended the session on purpose with a session close
    /// code ([`CloseReason::session_code`]). Peer's decision; its code and reason say why.
    #[error("{}", aborted_text(*code, reason))]
    PeerAborted {
        /// WebSocket close code or QUIC application error code.
        code: u64,
        /// The peer's reason text.
        reason: String,
    },
    /// The peer sent bytes that do not decode (bad JSON, bad frame, bad protobuf). Peer's fault;
    /// we closed the connection.
    #[error("peer sent malformed data: {detail}")]
    Malformed {
        /// What failed to decode.
        detail: String,
    },
    /// The peer sent a message over our size cap. Peer's fault; we closed the connection before
    /// buffering it.
    #[error("peer sent a message of {len} bytes; the limit is {max}")]
    TooLarge {
        /// Announced or observed length in bytes.
        len: u64,
        /// Our cap ([`crate::DialConfig::max_message_size`] / [`crate::ListenConfig`]).
        max: usize,
    },
    /// The peer sent well-formed data that breaks the protocol (unknown stream type, control
    /// flood, a stream it must not open). Peer's fault; we closed the connection.
    #[error("peer violated the protocol: {detail}")]
    PeerMisbehaved {
        /// What it did.
        detail: String,
    },
    /// Nothing arrived from the peer for the read deadline / QUIC idle timeout: the peer or the
    /// path is dead (half-open link). Network's or peer's fault; reconnect.
    #[error("no data from peer for {after:?}; link presumed dead")]
    ReadTimeout {
        /// The configured deadline.
        after: Duration,
    },
    /// A write made no progress for the write deadline: the peer stopped reading or the path is
    /// dead. Network's or peer's fault; reconnect.
    #[error("write made no progress for {after:?}; peer not reading")]
    WriteTimeout {
        /// The configured deadline.
        after: Duration,
    },
    /// The socket failed (reset, unreachable, local error). Network's fault; reconnect.
    #[error("connection lost: {detail}")]
    Io {
        /// The I/O error kind.
        kind: io::ErrorKind,
        /// The error text.
        detail: String,
    },
    /// TLS failed after the handshake (bad record, alert from the peer). Peer's or network's
    /// fault; reconnect.
    #[error("TLS failure: {detail}")]
    Tls {
        /// rustls' error text.
        detail: String,
    },
}

impl CloseReason {
    /// Whether the connection ended without any fault (closed by either side on purpose).
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Local { .. } | Self::Peer { .. })
    }

    /// The session close code the peer ended the connection with, if it gave one of Causeway's
    /// (PROTOCOL.md Part A item 9): the edge's cue for how to reconnect.
    pub fn session_code(&self) -> Option<SessionCloseCode> {
        match self {
            Self::PeerAborted { code, .. } => SessionCloseCode::from_code(*code),
            _ => None,
        }
    }

    pub(crate) fn from_io(err: &io::Error) -> Self {
        if let Some(tls) = err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Self::Tls {
                detail: tls.to_string(),
            };
        }
        Self::Io {
            kind: err.kind(),
            detail: err.to_string(),
        }
    }
}

/// [`CloseReason::PeerAborted`]'s text: a session close code is named, not called an abort.
fn aborted_text(code: u64, reason: &str) -> String {
    match SessionCloseCode::from_code(code) {
        Some(session) => format!("session closed by peer with code {session}: {reason}"),
        None => format!("aborted by peer (code {code}): {reason}"),
    }
}

/// Failure to establish a connection ([`crate::Adapter::connect`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// `DialConfig::server` is not `host:port`. Caller's fault: fix the configuration.
    #[error("invalid server address {server:?}: {detail}")]
    InvalidAddress {
        /// The configured address.
        server: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The TLS material in the configuration was refused (no certificate, key unusable). Caller's
    /// fault: fix the files.
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] TlsConfigError),
    /// Name resolution, the TCP connect or the UDP socket failed. Network's fault (or the server
    /// is down): retry with backoff.
    #[error("network error: {0}")]
    Io(#[source] io::Error),
    /// The TLS handshake failed: we did not trust the server's certificate, or the server refused
    /// ours (a received alert such as `CertificateRequired`, `UnknownCA`, `CertificateExpired`).
    /// Usually a deployment problem: check the CA and the node certificate.
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] rustls::Error),
    /// The server refused the connection after TLS: an HTTP error status before the WebSocket
    /// upgrade, or a QUIC close with an application error code. Its reason says why (for example
    /// a node id that does not match the certificate).
    #[error("rejected by server{}: {reason}", status.map(|s| format!(" (status {s})")).unwrap_or_default())]
    Rejected {
        /// HTTP status (WebSocket) or QUIC application error code.
        status: Option<u64>,
        /// The server's reason text.
        reason: String,
    },
    /// The server answered with something that is not the protocol (bad upgrade response, bad
    /// `ack`, unexpected ALPN). Peer's fault: is this really a Causeway/KubeEdge cloud?
    #[error("server violated the protocol: {detail}")]
    PeerMisbehaved {
        /// What was wrong.
        detail: String,
    },
    /// TLS and the protocol handshake did not complete within the handshake timeout. Network's or
    /// server's fault: retry with backoff.
    #[error("handshake did not complete within {after:?}")]
    Timeout {
        /// The configured handshake timeout.
        after: Duration,
    },
    /// The connection was lost during the handshake for another reason (QUIC transport error,
    /// reset). Retry with backoff.
    #[error("connection lost during handshake: {reason}")]
    Lost {
        /// What ended it.
        reason: CloseReason,
    },
}

/// Failure to start serving ([`crate::Adapter::listen`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The socket kind does not match the adapter (WebSocket needs TCP, QUIC needs UDP). Our
    /// caller's bug.
    #[error("{protocol} needs a {expected} socket")]
    WrongSocket {
        /// The adapter's protocol.
        protocol: crate::Protocol,
        /// `"TCP"` or `"UDP"`.
        expected: &'static str,
    },
    /// The TLS material in the configuration was refused. Caller's fault: fix the files.
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] TlsConfigError),
    /// The socket could not be set up (address, non-blocking mode, QUIC endpoint). Local
    /// environment's fault.
    #[error("cannot serve the socket: {0}")]
    Io(#[source] io::Error),
}

/// One connection attempt that did not yield a connection ([`crate::Listener::accept`]). The
/// listener keeps serving; count these by [`RejectReason::label`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// A client was refused and its connection closed (TLS alert, HTTP error status before the
    /// upgrade, or QUIC close with a reason) before any of its messages was delivered.
    #[error("rejected connection from {remote}: {reason}")]
    Rejected {
        /// The client's address.
        remote: SocketAddr,
        /// Why.
        reason: RejectReason,
    },
    /// The listening socket failed to accept (for example out of file descriptors). Local
    /// environment's fault; the listener pauses briefly and continues.
    #[error("accept failed: {0}")]
    Io(#[source] io::Error),
}

/// Why a client was refused. [`RejectReason::label`] gives a stable metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// The client presented no certificate (TLS alert `certificate_required`).
    #[error("no client certificate")]
    NoClientCertificate,
    /// The client certificate is not issued by our CA (alert `unknown_ca`).
    #[error("client certificate not issued by the CA: {detail}")]
    UntrustedCertificate {
        /// rustls' verdict.
        detail: String,
    },
    /// The client certificate is outside its validity window (alert `certificate_expired`).
    #[error("client certificate expired or not yet valid")]
    ExpiredCertificate,
    /// The client certificate failed verification otherwise (wrong key usage, revoked, bad
    /// signature).
    #[error("bad client certificate: {detail}")]
    BadCertificate {
        /// rustls' verdict.
        detail: String,
    },
    /// The certificate is from the CA but is not a node certificate (CN is not
    /// `system:node:<id>`, e.g. the server certificate).
    #[error("not a node certificate: {detail}")]
    NotNodeCertificate {
        /// What is wrong with the subject.
        detail: String,
    },
    /// The node claimed an id other than its certificate's (KubeEdge lets it act as that node,
    /// W8; we refuse).
    #[error("claimed node id {claimed:?} does not match certificate node id {certified:?}")]
    NodeIdMismatch {
        /// The id in the `node_id` header / `Node_id` key.
        claimed: String,
        /// The id in the certificate.
        certified: String,
    },
    /// The client did not say which node it is (no `node_id` header / `Node_id` key).
    #[error("no node id claimed")]
    MissingNodeId,
    /// The WebSocket `ConnectionUse` header is missing or not `msg` (KubeEdge silently serves
    /// nothing then; we refuse explicitly).
    #[error("unsupported ConnectionUse {value:?}: only \"msg\" is served")]
    BadConnectionUse {
        /// The header value, if any.
        value: Option<String>,
    },
    /// TLS failed for a reason other than the certificate (no common version or suite, ALPN
    /// mismatch, garbage instead of a ClientHello).
    #[error("TLS handshake failed: {detail}")]
    Tls {
        /// rustls' or quinn's error text.
        detail: String,
    },
    /// The upgrade request or control-stream header is not the protocol.
    #[error("bad handshake: {detail}")]
    BadHandshake {
        /// What was wrong.
        detail: String,
    },
    /// The handshake did not complete within the handshake timeout (slowloris, dead client).
    #[error("handshake did not complete within {after:?}")]
    Timeout {
        /// The configured handshake timeout.
        after: Duration,
    },
    /// The connection dropped during the handshake.
    #[error("connection lost during handshake: {detail}")]
    Lost {
        /// The I/O or transport error text.
        detail: String,
    },
}

impl RejectReason {
    /// A stable, low-cardinality label for metrics ("rejected connections by reason").
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoClientCertificate => "no_client_certificate",
            Self::UntrustedCertificate { .. } => "untrusted_certificate",
            Self::ExpiredCertificate => "expired_certificate",
            Self::BadCertificate { .. } => "bad_certificate",
            Self::NotNodeCertificate { .. } => "not_node_certificate",
            Self::NodeIdMismatch { .. } => "node_id_mismatch",
            Self::MissingNodeId => "missing_node_id",
            Self::BadConnectionUse { .. } => "bad_connection_use",
            Self::Tls { .. } => "tls",
            Self::BadHandshake { .. } => "bad_handshake",
            Self::Timeout { .. } => "handshake_timeout",
            Self::Lost { .. } => "lost",
        }
    }

    /// Classifies the server-side rustls error of a failed TLS handshake.
    pub(crate) fn from_rustls(err: &rustls::Error) -> Self {
        use rustls::{CertificateError, Error};
        match err {
            Error::NoCertificatesPresented => Self::NoClientCertificate,
            Error::InvalidCertificate(cert) => match cert {
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Self::ExpiredCertificate,
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    Self::UntrustedCertificate {
                        detail: err.to_string(),
                    }
                }
                _ => Self::BadCertificate {
                    detail: err.to_string(),
                },
            },
            other => Self::Tls {
                detail: other.to_string(),
            },
        }
    }

    /// Classifies a failed server-side handshake I/O error (rustls errors arrive wrapped in it).
    pub(crate) fn from_handshake_io(err: &io::Error) -> Self {
        match err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => Self::from_rustls(tls),
            None => Self::Lost {
                detail: err.to_string(),
            },
        }
    }

    /// Classifies a TLS alert we sent (QUIC reports the handshake failure as a CRYPTO_ERROR
    /// carrying the alert, RFC 9001 §4.8).
    pub(crate) fn from_alert(alert: u8, detail: String) -> Self {
        match alert {
            116 => Self::NoClientCertificate,
            // unknown_ca; decrypt_error is what rustls sends for a bad signature, as when a CA
            // with the same name but another key issued the certificate.
            48 | 51 => Self::UntrustedCertificate { detail },
            45 => Self::ExpiredCertificate,
            42 | 43 | 44 | 46 => Self::BadCertificate { detail },
            _ => Self::Tls { detail },
        }
    }
}

/// Failure to send a message ([`crate::Connection::send`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The encoded message is larger than the size cap. Caller's fault: nothing was sent and the
    /// connection is still usable.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Encoded length in bytes.
        len: usize,
        /// The configured cap.
        max: usize,
    },
    /// No buffer space freed within the write deadline: the peer is not reading or the link is
    /// dead. The connection is now closed; reconnect.
    #[error("send made no progress for {after:?}; connection closed")]
    Timeout {
        /// The configured write deadline.
        after: Duration,
    },
    /// The connection is no longer open; `reason` says why.
    #[error("connection closed: {reason}")]
    Closed {
        /// Why it ended.
        reason: CloseReason,
    },
}

impl SendError {
    /// The session close code the peer ended the connection with, if any
    /// ([`CloseReason::session_code`]).
    pub fn session_code(&self) -> Option<SessionCloseCode> {
        match self {
            Self::Closed { reason } => reason.session_code(),
            _ => None,
        }
    }
}

/// Failure to receive a message ([`crate::Connection::recv`]). Every variant is terminal: the
/// connection has been closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The peer sent bytes that do not decode. Peer's fault.
    #[error("peer sent malformed data: {detail}")]
    Malformed {
        /// What failed to decode.
        detail: String,
    },
    /// The peer sent a message over the size cap. Peer's fault.
    #[error("peer sent a message of {} bytes; the limit is {}", .len, .max)]
    TooLarge {
        /// Announced or observed length.
        len: u64,
        /// Our cap.
        max: usize,
    },
    /// The peer broke the protocol with well-formed data. Peer's fault.
    #[error("peer violated the protocol: {detail}")]
    PeerMisbehaved {
        /// What it did.
        detail: String,
    },
    /// Nothing arrived within the read deadline / idle timeout: half-open link. Reconnect.
    #[error("no data from peer for {:?}; link presumed dead", .after)]
    Timeout {
        /// The configured deadline.
        after: Duration,
    },
    /// The socket failed. Network's fault; reconnect.
    #[error("connection lost: {detail}")]
    Io {
        /// The I/O error kind.
        kind: io::ErrorKind,
        /// The error text.
        detail: String,
    },
    /// TLS failed (bad record, alert). Reconnect.
    #[error("TLS failure: {detail}")]
    Tls {
        /// rustls' error text.
        detail: String,
    },
    /// The connection ended abnormally for another reason (peer aborted, our write deadline).
    #[error("connection closed: {reason}")]
    Closed {
        /// Why it ended.
        reason: CloseReason,
    },
}

impl RecvError {
    /// The session close code the peer ended the connection with, if any
    /// ([`CloseReason::session_code`]).
    pub fn session_code(&self) -> Option<SessionCloseCode> {
        match self {
            Self::Closed { reason } => reason.session_code(),
            _ => None,
        }
    }

    /// What `recv` reports for a connection that ended with `reason`: `None` for a clean close.
    pub(crate) fn from_close(reason: CloseReason) -> Option<Self> {
        Some(match reason {
            CloseReason::Local { .. } | CloseReason::Peer { .. } => return None,
            CloseReason::Malformed { detail } => Self::Malformed { detail },
            CloseReason::TooLarge { len, max } => Self::TooLarge { len, max },
            CloseReason::PeerMisbehaved { detail } => Self::PeerMisbehaved { detail },
            CloseReason::ReadTimeout { after } => Self::Timeout { after },
            CloseReason::Io { kind, detail } => Self::Io { kind, detail },
            CloseReason::Tls { detail } => Self::Tls { detail },
            reason @ (CloseReason::PeerAborted { .. } | CloseReason::WriteTimeout { .. }) => {
                Self::Closed { reason }
            }
        })
    }
}

/// Failure of a graceful close ([`crate::Connection::close`]). The connection is closed either
/// way; the error says delivery of what was sent before is not confirmed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseError {
    /// The connection had already ended before `close`; messages still queued may be lost.
    #[error("connection had already ended: {reason}")]
    AlreadyClosed {
        /// Why it ended.
        reason: CloseReason,
    },
    /// The peer did not confirm within the write deadline; the connection was aborted.
    #[error("peer did not confirm the close within {after:?}")]
    Timeout {
        /// The configured write deadline.
        after: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_closes_end_recv_with_none() {
        assert_eq!(
            RecvError::from_close(CloseReason::Peer { reason: "x".into() }),
            None
        );
        assert_eq!(
            RecvError::from_close(CloseReason::Local { reason: "x".into() }),
            None
        );
        assert!(matches!(
            RecvError::from_close(CloseReason::ReadTimeout {
                after: Duration::from_secs(1)
            }),
            Some(RecvError::Timeout { .. })
        ));
    }

    #[test]
    fn rustls_verdicts_map_to_reject_reasons() {
        use rustls::{CertificateError, Error};
        assert_eq!(
            RejectReason::from_rustls(&Error::NoCertificatesPresented),
            RejectReason::NoClientCertificate
        );
        assert_eq!(
            RejectReason::from_rustls(&Error::InvalidCertificate(CertificateError::Expired)),
            RejectReason::ExpiredCertificate
        );
        assert_eq!(
            RejectReason::from_rustls(&Error::InvalidCertificate(CertificateError::UnknownIssuer))
                .label(),
            "untrusted_certificate"
        );
        assert_eq!(
            RejectReason::from_alert(116, String::new()),
            RejectReason::NoClientCertificate
        );
        assert_eq!(
            RejectReason::from_alert(45, String::new()),
            RejectReason::ExpiredCertificate
        );
    }
}
