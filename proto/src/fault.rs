//! Whose fault a failure is. Every layer classifies its errors by who is at fault (CONTRIBUTING.md),
//! and [`FaultClass`] is that classification as a value: the transport says which class each of its
//! typed errors belongs to, the sessions decide how to react by class without knowing the
//! transport's types (a wrong certificate is not retried like a network blip), and every log line
//! about a failure names its class.

use std::fmt;

/// Who is at fault for a failure, which decides what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultClass {
    /// Our own configuration: a certificate, key or CA file that cannot be read, a certificate
    /// the other end refuses or one of its that ours does not verify, an invalid address or TLS
    /// setting. Retrying soon cannot help; a person must fix it. Retry slowly and say so once.
    Configuration,
    /// The network or the peer's availability: refused, reset, unreachable, timed out, silent,
    /// closed, or a peer that is busy or restarting. Retry with backoff and jitter.
    Network,
    /// The peer broke the protocol: malformed data, a violation, an oversized message. Drop the
    /// connection and retry with backoff (a restarted or fixed peer may behave).
    Peer,
    /// Our own machine: a store that fails (disk full, a damaged file). Retry later; an operator
    /// may have to act.
    Local,
}

impl FaultClass {
    /// A stable lower-case name for logs and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Self::Configuration => "configuration",
            Self::Network => "network",
            Self::Peer => "peer",
            Self::Local => "local",
        }
    }
}

impl fmt::Display for FaultClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A classified failure: its class and what happened, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Who is at fault.
    pub class: FaultClass,
    /// What happened (the error's text).
    pub reason: String,
}

impl Fault {
    /// A fault of `class`.
    pub fn new(class: FaultClass, reason: impl Into<String>) -> Self {
        Self {
            class,
            reason: reason.into(),
        }
    }

    /// A network fault.
    pub fn network(reason: impl Into<String>) -> Self {
        Self::new(FaultClass::Network, reason)
    }

    /// A configuration fault.
    pub fn configuration(reason: impl Into<String>) -> Self {
        Self::new(FaultClass::Configuration, reason)
    }
}

/// `reason (class fault)`, so a log line always says whose fault it was.
impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} fault)", self.reason, self.class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_class() {
        let fault = Fault::configuration("loading the CA certificate: no such file");
        assert_eq!(
            fault.to_string(),
            "loading the CA certificate: no such file (configuration fault)"
        );
        assert_eq!(Fault::network("reset").class.label(), "network");
    }
}
