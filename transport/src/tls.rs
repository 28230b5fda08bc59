//! The only place rustls configurations are built, for both adapters, so WebSocket and QUIC cannot
//! drift in how they verify certificates (STYLE.md lesson 10).
//!
//! - Server: requires a client certificate and verifies it against the CA
//!   ([`WebPkiClientVerifier`]); presents its certificate chain.
//! - Client: verifies the server against the CA and the dialled host name; presents the leaf
//!   certificate only (KubeEdge's authorizer rejects chains, PROTOCOL.md C.3).
//! - WebSocket: TLS 1.2 and 1.3; TLS 1.2 limited to ECDHE-ECDSA with AES-GCM or ChaCha20 (as
//!   KubeEdge's cloudhub); the server offers ALPN `http/1.1` only, never `h2` (which breaks the
//!   upgrade, C.1), and the client offers none (as gorilla).
//! - QUIC: TLS 1.3 only, ALPN `causeway/1` on both sides.
//!
//! - Certificate bootstrap (HTTPS, KubeEdge's `/ca.crt` and `/edge.crt`): the server *requests* a
//!   client certificate and verifies it when presented (a renewing node), since a node that
//!   bootstraps has none yet; both sides offer ALPN `http/1.1`.
//! - Cloud API (HTTPS when it leaves loopback): as the bootstrap endpoint: a client certificate
//!   is requested and verified when presented (an API client's), a bearer token otherwise.
//!
//! The crypto provider is always ring, passed explicitly; no process default is relied on. The one
//! path that skips server verification is [`dangerous_unverified_bootstrap_client_config`], for
//! fetching `/ca.crt`, whose answer the caller then authenticates with the token's CA hash.

use std::sync::Arc;

use certs::{Identity, TrustAnchors};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite,
};

use crate::Protocol;

/// The QUIC ALPN of the Causeway profile (PROTOCOL.md Part A item 3).
pub const QUIC_ALPN: &[u8] = b"causeway/1";

/// The only ALPN the WebSocket server accepts when a client offers any (`h2` would be chosen by
/// HTTP/2-capable clients and break the upgrade, PROTOCOL.md C.1).
pub const WS_SERVER_ALPN: &[u8] = b"http/1.1";

/// Why TLS material could not be turned into a configuration. Caller's fault: fix the files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// The identity has no certificate.
    #[error("identity has no certificate")]
    NoCertificate,
    /// No trust anchor was given.
    #[error("no trust anchor (CA certificate) given")]
    NoTrustAnchors,
    /// A trust anchor is not a usable CA certificate.
    #[error("unusable trust anchor: {0}")]
    BadTrustAnchor(#[source] rustls::Error),
    /// rustls refused the certificate or key (unsupported key type, key not matching).
    #[error("certificate or key refused: {0}")]
    Rustls(#[source] rustls::Error),
    /// The client-certificate verifier could not be built from the trust anchors.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The configuration lacks the cipher suite QUIC needs for its initial packets (our bug).
    #[error("QUIC needs TLS_AES_128_GCM_SHA256: {0}")]
    Quic(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// ring, restricted to the suites KubeEdge's cloudhub allows: every TLS 1.3 suite, and for TLS 1.2
/// only ECDHE-ECDSA with AES-128-GCM, AES-256-GCM or ChaCha20-Poly1305.
fn provider() -> Arc<CryptoProvider> {
    use ring::cipher_suite as cs;
    let suites: Vec<SupportedCipherSuite> = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(CryptoProvider {
        cipher_suites: suites,
        ..ring::default_provider()
    })
}

/// TLS 1.2 and 1.3 for WebSocket (KubeEdge peers may be TLS 1.2-only); 1.3 only for QUIC.
static WS_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
static QUIC_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions(protocol: Protocol) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match protocol {
        Protocol::WebSocket => WS_VERSIONS,
        Protocol::Quic => QUIC_VERSIONS,
    }
}

fn root_store(anchors: &TrustAnchors) -> Result<Arc<RootCertStore>, TlsConfigError> {
    if anchors.roots.is_empty() {
        return Err(TlsConfigError::NoTrustAnchors);
    }
    let mut roots = RootCertStore::empty();
    for cert in &anchors.roots {
        roots
            .add(cert.clone())
            .map_err(TlsConfigError::BadTrustAnchor)?;
    }
    Ok(Arc::new(roots))
}

/// ALPN of the certificate bootstrap endpoint (plain HTTP/1.1 over TLS, as KubeEdge's).
const BOOTSTRAP_ALPN: &[u8] = b"http/1.1";

/// The certificate bootstrap server's configuration: presents `identity`; requests a client
/// certificate and verifies it against `anchors` when one is presented (renewal), but admits
/// clients without one (first bootstrap, authorised by the token instead).
pub fn bootstrap_server_config(
    identity: &Identity,
    anchors: &TrustAnchors,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    if identity.chain.is_empty() {
        return Err(TlsConfigError::NoCertificate);
    }
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(root_store(anchors)?, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(TlsConfigError::Verifier)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(WS_VERSIONS)
        .map_err(TlsConfigError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(TlsConfigError::Rustls)?;
    config.alpn_protocols = vec![BOOTSTRAP_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The cloud API's HTTPS configuration: presents `identity` (the cloud's server certificate);
/// requests a client certificate and verifies it against `anchors` when one is presented (an API
/// client certificate), but admits clients without one (they authenticate with a bearer token).
/// TLS 1.2 and 1.3, ALPN `http/1.1`: the same shape as the bootstrap endpoint's.
pub fn api_server_config(
    identity: &Identity,
    anchors: &TrustAnchors,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    bootstrap_server_config(identity, anchors)
}

/// An HTTPS client of the cloud API: verifies the server against `anchors` (the cloud CA);
/// presents the leaf of `identity` when given (an API client certificate).
pub fn api_client_config(
    anchors: &TrustAnchors,
    identity: Option<&Identity>,
) -> Result<ClientConfig, TlsConfigError> {
    bootstrap_client_config(anchors, identity)
}

/// A bootstrap client's configuration: verifies the server against `anchors`; presents the leaf
/// of `identity` when given (renewal with the current certificate), none otherwise.
pub fn bootstrap_client_config(
    anchors: &TrustAnchors,
    identity: Option<&Identity>,
) -> Result<ClientConfig, TlsConfigError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(WS_VERSIONS)
        .map_err(TlsConfigError::Rustls)?
        .with_root_certificates(root_store(anchors)?);
    let mut config = match identity {
        Some(identity) => {
            let leaf = identity
                .chain
                .first()
                .ok_or(TlsConfigError::NoCertificate)?
                .clone();
            builder
                .with_client_auth_cert(vec![leaf], identity.key.clone_key())
                .map_err(TlsConfigError::Rustls)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![BOOTSTRAP_ALPN.to_vec()];
    Ok(config)
}

/// A client configuration that accepts **any** server certificate (handshake signatures are still
/// checked). Only for fetching the CA from `/ca.crt` at bootstrap, as KubeEdge does: the caller
/// must then check the received CA against the bootstrap token's hash before trusting anything.
pub fn dangerous_unverified_bootstrap_client_config() -> Result<ClientConfig, TlsConfigError> {
    let provider = provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(WS_VERSIONS)
        .map_err(TlsConfigError::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DangerousAnyServerCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![BOOTSTRAP_ALPN.to_vec()];
    Ok(config)
}

/// Accepts any server certificate but still checks the handshake signatures, so the peer holds
/// the key of the certificate it sent.
#[derive(Debug)]
struct DangerousAnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for DangerousAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The edge listeners' client verifier: a certificate from `anchors` is required. It names no
/// acceptable CAs in its certificate request: a Go client (a stock KubeEdge edge) whose
/// certificate is from another CA would otherwise send none at all, and the refusal could only
/// say "no client certificate" instead of the real reason, an unknown issuer.
fn node_verifier(
    anchors: &TrustAnchors,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsConfigError> {
    WebPkiClientVerifier::builder_with_provider(root_store(anchors)?, provider.clone())
        .clear_root_hint_subjects()
        .build()
        .map_err(TlsConfigError::Verifier)
}

/// The server configuration of `protocol`: mutual TLS against `anchors`, presenting `identity`.
pub fn server_config(
    protocol: Protocol,
    identity: &Identity,
    anchors: &TrustAnchors,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    if identity.chain.is_empty() {
        return Err(TlsConfigError::NoCertificate);
    }
    let provider = provider();
    let verifier = node_verifier(anchors, &provider)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(protocol))
        .map_err(TlsConfigError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(TlsConfigError::Rustls)?;
    config.alpn_protocols = match protocol {
        Protocol::WebSocket => vec![WS_SERVER_ALPN.to_vec()],
        Protocol::Quic => vec![QUIC_ALPN.to_vec()],
    };
    Ok(Arc::new(config))
}

/// The client configuration of `protocol`: verifies the server against `anchors`, presents the
/// leaf of `identity`.
pub fn client_config(
    protocol: Protocol,
    identity: &Identity,
    anchors: &TrustAnchors,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let leaf = identity
        .chain
        .first()
        .ok_or(TlsConfigError::NoCertificate)?
        .clone();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(protocol))
        .map_err(TlsConfigError::Rustls)?
        .with_root_certificates(root_store(anchors)?)
        .with_client_auth_cert(vec![leaf], identity.key.clone_key())
        .map_err(TlsConfigError::Rustls)?;
    config.alpn_protocols = match protocol {
        Protocol::WebSocket => Vec::new(),
        Protocol::Quic => vec![QUIC_ALPN.to_vec()],
    };
    Ok(Arc::new(config))
}

/// The QUIC server crypto: [`server_config`] for QUIC, wrapped for quinn.
pub(crate) fn quic_server_crypto(
    identity: &Identity,
    anchors: &TrustAnchors,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsConfigError> {
    let config = server_config(Protocol::Quic, identity, anchors)?;
    Ok(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(config).map_err(TlsConfigError::Quic)?,
    ))
}

/// The QUIC client crypto: [`client_config`] for QUIC, wrapped for quinn.
pub(crate) fn quic_client_crypto(
    identity: &Identity,
    anchors: &TrustAnchors,
) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, TlsConfigError> {
    let config = client_config(Protocol::Quic, identity, anchors)?;
    Ok(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(config).map_err(TlsConfigError::Quic)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls12_suites_are_ecdsa_only() {
        for suite in &provider().cipher_suites {
            if suite.version() == &rustls::version::TLS12 {
                let name = format!("{:?}", suite.suite());
                assert!(name.contains("ECDHE_ECDSA"), "{name}");
            }
        }
    }

    #[test]
    fn edge_listeners_name_no_acceptable_cas() {
        let now = time::OffsetDateTime::now_utc();
        let ca =
            certs::CertificateAuthority::generate(certs::Validity::days_from(now, 1)).expect("ca");
        let verifier = node_verifier(&ca.trust_anchors(), &provider()).expect("verifier");
        assert!(verifier.root_hint_subjects().is_empty());
        assert!(verifier.client_auth_mandatory());
    }

    #[test]
    fn empty_material_is_refused() {
        let anchors = TrustAnchors { roots: Vec::new() };
        let identity = Identity {
            chain: Vec::new(),
            key: rustls_pki_types::PrivateKeyDer::Pkcs8(Vec::new().into()),
        };
        assert!(matches!(
            server_config(Protocol::WebSocket, &identity, &anchors),
            Err(TlsConfigError::NoCertificate)
        ));
        assert!(matches!(
            client_config(Protocol::Quic, &identity, &anchors),
            Err(TlsConfigError::NoCertificate)
        ));
    }
}
