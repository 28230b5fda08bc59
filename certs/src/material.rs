//! Typed certificate material handed to `transport::tls`: an [`Identity`] (chain + key) to present
//! and [`TrustAnchors`] to verify the peer against, plus the [`Validity`] window used when issuing.
//! Everything here is parsed and checked on load, so a wrong file fails at startup with a named
//! error instead of at the first TLS handshake.

use std::fmt;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::CertError;
use crate::key::{P256Key, parse_key_pem};

/// A certificate chain (leaf first) and the leaf's private key: what a TLS endpoint presents.
///
/// Causeway presents the leaf only (KubeEdge's authorizer rejects chains, PROTOCOL C.3), so chains
/// built by this crate have one element; a longer chain loaded from a file is kept as is.
pub struct Identity {
    /// Certificates, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (ECDSA P-256, SEC1 or PKCS#8).
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Parses a certificate chain PEM (all `CERTIFICATE` blocks, leaf first) and a private key PEM
    /// (SEC1 `EC PRIVATE KEY` or PKCS#8 `PRIVATE KEY`), checking the key belongs to the leaf.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let chain = parse_certs_pem(cert_pem)?;
        let key = parse_key_pem(key_pem)?;
        let p256 = P256Key::from_key_der(&key)?;
        check_key_matches(&chain[0], &p256)?;
        Ok(Self { chain, key })
    }

    /// Reads [`Identity::from_pem`]'s inputs from files.
    pub fn load(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, CertError> {
        Self::from_pem(
            &read_text(cert_path.as_ref())?,
            &read_text(key_path.as_ref())?,
        )
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("chain_len", &self.chain.len())
            .field("key", &"[elided]")
            .finish()
    }
}

/// The CA certificates a peer's certificate must chain to.
#[derive(Clone, Debug)]
pub struct TrustAnchors {
    /// Root certificates (for Causeway: the one CA).
    pub roots: Vec<CertificateDer<'static>>,
}

impl TrustAnchors {
    /// Parses every `CERTIFICATE` block of a PEM text; at least one is required and each must be
    /// a valid X.509 certificate.
    pub fn from_pem(pem: &str) -> Result<Self, CertError> {
        Ok(Self {
            roots: parse_certs_pem(pem)?,
        })
    }

    /// Reads [`TrustAnchors::from_pem`]'s input from a file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, CertError> {
        Self::from_pem(&read_text(path.as_ref())?)
    }
}

/// The window a certificate is valid in, written verbatim into issued certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: OffsetDateTime,
    /// Last instant the certificate is valid.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// `days` days starting at `now`. Time is a parameter so tests can issue expired certificates
    /// (a window in the past) without waiting.
    pub fn days_from(now: OffsetDateTime, days: u32) -> Self {
        Self {
            not_before: now,
            not_after: now + time::Duration::days(i64::from(days)),
        }
    }

    pub(crate) fn check(&self) -> Result<(), CertError> {
        if self.not_after > self.not_before {
            Ok(())
        } else {
            Err(CertError::InvalidValidity)
        }
    }
}

/// Parses all `CERTIFICATE` blocks of a PEM text, each checked to be valid X.509.
pub(crate) fn parse_certs_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::InvalidPem {
            what: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::MissingPem {
            what: "certificate",
        });
    }
    for cert in &certs {
        parse_x509(cert)?;
    }
    Ok(certs)
}

/// Parses DER as X.509, refusing trailing bytes.
pub(crate) fn parse_x509(
    der: &[u8],
) -> Result<x509_parser::certificate::X509Certificate<'_>, CertError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CertError::InvalidCertificate {
            reason: "trailing bytes after certificate".into(),
        }),
        Err(e) => Err(CertError::InvalidCertificate {
            reason: e.to_string(),
        }),
    }
}

/// Checks that `key` is the private half of the certificate's public key.
pub(crate) fn check_key_matches(cert: &[u8], key: &P256Key) -> Result<(), CertError> {
    let parsed = parse_x509(cert)?;
    if parsed.public_key().subject_public_key.data.as_ref() == key.public_point() {
        Ok(())
    } else {
        Err(CertError::KeyMismatch)
    }
}

fn read_text(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}
