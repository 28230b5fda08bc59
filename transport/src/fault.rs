//! Whose fault each transport error is ([`FaultClass`]), so the sessions above can react by class
//! (a configuration fault is not retried like a network blip) without matching on this crate's
//! types, and their logs can name the class. The classification follows each variant's doc
//! comment in [`crate::error`].

use proto::{Fault, FaultClass};

use crate::error::{CloseReason, ConnectError, RecvError, SendError};

/// HTTP statuses with which a cloud refuses who we are (WebSocket upgrade): fix the identity.
const IDENTITY_REFUSED: [u64; 2] = [401, 403];

impl ConnectError {
    /// Whose fault the failed connect is. A TLS failure (we do not trust the cloud's
    /// certificate, or it refused ours) and an invalid address or TLS setting are configuration
    /// faults; so is an upgrade refused with 401 or 403. Everything else is the network's, or the
    /// peer's when it does not speak the protocol.
    pub fn fault_class(&self) -> FaultClass {
        match self {
            Self::InvalidAddress { .. } | Self::Config(_) | Self::Tls(_) => {
                FaultClass::Configuration
            }
            Self::Rejected {
                status: Some(status),
                ..
            } if IDENTITY_REFUSED.contains(status) => FaultClass::Configuration,
            Self::Rejected { .. } | Self::Io(_) | Self::Timeout { .. } => FaultClass::Network,
            Self::PeerMisbehaved { .. } => FaultClass::Peer,
            Self::Lost { reason } => reason.fault_class(),
        }
    }

    /// The classified fault, with this error's text.
    pub fn fault(&self) -> Fault {
        Fault::new(self.fault_class(), self.to_string())
    }
}

impl CloseReason {
    /// Whose fault the end of the connection is: the peer's when it sent what it must not, the
    /// network's otherwise (including clean closes: the link is simply gone).
    pub fn fault_class(&self) -> FaultClass {
        match self {
            Self::Malformed { .. } | Self::TooLarge { .. } | Self::PeerMisbehaved { .. } => {
                FaultClass::Peer
            }
            _ => FaultClass::Network,
        }
    }
}

impl RecvError {
    /// Whose fault the failed receive is (as [`CloseReason::fault_class`]).
    pub fn fault_class(&self) -> FaultClass {
        match self {
            Self::Malformed { .. } | Self::TooLarge { .. } | Self::PeerMisbehaved { .. } => {
                FaultClass::Peer
            }
            Self::Closed { reason } => reason.fault_class(),
            _ => FaultClass::Network,
        }
    }

    /// The classified fault, with this error's text.
    pub fn fault(&self) -> Fault {
        Fault::new(self.fault_class(), self.to_string())
    }
}

impl SendError {
    /// Whose fault the failed send is: ours for a message over the limit (the caller should
    /// not have sent it), else the connection's end.
    pub fn fault_class(&self) -> FaultClass {
        match self {
            Self::TooLarge { .. } => FaultClass::Local,
            Self::Closed { reason } => reason.fault_class(),
            _ => FaultClass::Network,
        }
    }

    /// The classified fault, with this error's text.
    pub fn fault(&self) -> Fault {
        Fault::new(self.fault_class(), self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn connect_errors_are_classified_by_whose_fault_they_are() {
        let tls = ConnectError::Tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert_eq!(tls.fault_class(), FaultClass::Configuration);
        let refused = ConnectError::Rejected {
            status: Some(403),
            reason: "forbidden".into(),
        };
        assert_eq!(refused.fault_class(), FaultClass::Configuration);
        let busy = ConnectError::Rejected {
            status: Some(503),
            reason: "node limit".into(),
        };
        assert_eq!(busy.fault_class(), FaultClass::Network);
        let io = ConnectError::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert_eq!(io.fault().class, FaultClass::Network);
        let timeout = ConnectError::Timeout {
            after: Duration::from_secs(30),
        };
        assert_eq!(timeout.fault_class(), FaultClass::Network);
        let garbage = ConnectError::PeerMisbehaved {
            detail: "bad ack".into(),
        };
        assert_eq!(garbage.fault_class(), FaultClass::Peer);
        assert!(tls.fault().to_string().ends_with("(configuration fault)"));
    }

    #[test]
    fn connection_ends_are_the_peers_fault_only_when_it_broke_the_protocol() {
        let malformed = RecvError::Malformed {
            detail: "bad json".into(),
        };
        assert_eq!(malformed.fault_class(), FaultClass::Peer);
        let silent = RecvError::Timeout {
            after: Duration::from_secs(30),
        };
        assert_eq!(silent.fault_class(), FaultClass::Network);
        let closed = SendError::Closed {
            reason: CloseReason::TooLarge { len: 10, max: 1 },
        };
        assert_eq!(closed.fault_class(), FaultClass::Peer);
        let too_large = SendError::TooLarge { len: 10, max: 1 };
        assert_eq!(too_large.fault_class(), FaultClass::Local);
    }
}
