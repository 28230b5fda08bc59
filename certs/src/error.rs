//! `CertError`: what can go wrong reading, issuing and checking certificates. Variants say whose
//! fault it is: the caller's (bad arguments), the supplier of a file or CSR (bad input), or ours.

use std::path::PathBuf;

/// Errors from loading, issuing, signing and inspecting certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A PEM text has no block of the expected kind (e.g. a key file without a key). Input's
    /// fault: point at the right file.
    #[error("no {what} found in PEM input")]
    MissingPem {
        /// What was looked for: "certificate" or "private key".
        what: &'static str,
    },
    /// A PEM text is malformed (bad base64, unterminated block). Input's fault.
    #[error("malformed PEM ({what}): {reason}")]
    InvalidPem {
        /// What was being read.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// A certificate's DER does not parse as X.509. Input's fault.
    #[error("invalid certificate: {reason}")]
    InvalidCertificate {
        /// The parser's complaint.
        reason: String,
    },
    /// A private key's DER does not parse. Input's fault.
    #[error("invalid private key: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },
    /// The key is valid but not ECDSA P-256, the only kind Causeway uses (ECDSA P-256 lets TLS 1.2
    /// KubeEdge peers find a cipher suite, PROTOCOL A§2). Input's fault.
    #[error("unsupported key: {reason}")]
    UnsupportedKey {
        /// What kind of key it is.
        reason: String,
    },
    /// The private key does not belong to the certificate (files from two different issuances).
    /// Input's fault: reissue or pick the matching pair.
    #[error("private key does not match the certificate's public key")]
    KeyMismatch,
    /// A certificate given as a CA lacks `basicConstraints CA:TRUE`. Input's fault.
    #[error("certificate is not a CA certificate")]
    NotCa,
    /// `not_after` is not after `not_before`. Caller's fault.
    #[error("validity window is empty: not_after must be later than not_before")]
    InvalidValidity,
    /// A server certificate was requested without any DNS name or IP address. Caller's fault.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoSubjectAltNames,
    /// A DNS name for a certificate is not a valid IA5 string. Caller's fault.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidDnsName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A CSR does not parse, is not signed by its own key, or carries a key we do not sign.
    /// Requester's fault: the request is refused.
    #[error("invalid certificate signing request: {reason}")]
    InvalidCsr {
        /// What is wrong with it.
        reason: String,
    },
    /// A CSR asks for a subject other than `system:node:<node>` for the node it was submitted for.
    /// Requester's fault; KubeEdge signs it anyway (W14), we refuse.
    #[error("CSR subject CN {found:?} does not match the expected {expected:?}")]
    CsrSubjectMismatch {
        /// The CN the CSR should carry.
        expected: String,
        /// The CN it carries, if any.
        found: Option<String>,
    },
    /// A certificate is not a node certificate: CN is not `system:node:<id>` with a valid id, or O
    /// is not `system:nodes`. Presenter's fault: the peer is refused.
    #[error("not a node certificate: {reason}")]
    NotNodeCertificate {
        /// What is wrong with the subject.
        reason: String,
    },
    /// rcgen failed to build or sign a certificate from parameters we produced. Our bug.
    #[error("certificate generation failed: {0}")]
    Generate(#[source] rcgen::Error),
    /// Reading or writing a certificate or key file failed. Local environment: check the path and
    /// its permissions.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}
