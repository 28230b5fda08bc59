//! The edge's certificate bootstrap and renewal, KubeEdge's `certmanager` flow (PROTOCOL.md B§9.4)
//! against the cloud's HTTPS server (`/ca.crt`, `/edge.crt`).
//!
//! **Bootstrap** (a token and no usable certificate): fetch `/ca.crt` over an unverified TLS
//! connection, the only one Causeway ever makes, and accept the CA only if its SHA-256 equals the
//! token's first part (so the token authenticates the CA); write it; generate a P-256 key and a
//! CSR for `system:node:<node>`; `GET /edge.crt` with the CSR as body, `Authorization: Bearer
//! <jwt>` and `NodeName`, trusting only that CA; write the certificate and the key (mode 0600).
//!
//! **Renewal**: at a uniformly random point in 70–90 % of the certificate's lifetime, the same
//! CSR flow presenting the current certificate instead of a token; the new files replace the old
//! and EdgeHub is asked to reconnect ([`crate::ReconnectTrigger`]), so the new certificate is in
//! use without a restart.
//!
//! TLS configurations are built here with the ring provider explicitly (never a process
//! default). They are not `transport::tls`'s: this is plain HTTPS to a server that does not
//! require a client certificate.

use std::time::{Duration, SystemTime};

use certs::{CertError, NodeId};

use crate::config::{BootstrapToken, EdgeHubConfig};
use session::edge::SplitMix64;

/// Bound on each HTTPS request (KubeEdge: 30 s connect, 300 s response header).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the node has a certificate it can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertStatus {
    /// A certificate and key for this node, valid now.
    Valid {
        /// Start of validity.
        not_before: SystemTime,
        /// End of validity.
        not_after: SystemTime,
    },
    /// No certificate (or no key) file.
    Missing,
    /// A certificate that cannot be used; the reason says why (another node's, expired, damaged).
    Unusable(String),
}

/// Why a bootstrap or renewal failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// There is no usable certificate and no token to obtain one: the operator must set
    /// `edgehub.token` (`causeway token create` on the cloud).
    #[error("no usable node certificate ({status}) and no bootstrap token configured")]
    NoToken {
        /// What is wrong with the current certificate.
        status: String,
    },
    /// The cloud could not be reached or the exchange broke off. Transient: retry.
    #[error("{url}: {source}")]
    Unreachable {
        /// The URL.
        url: String,
        /// The HTTP client's error.
        source: reqwest::Error,
    },
    /// The server answered 5xx. Transient: retry.
    #[error("{url}: server error {status}: {body}")]
    ServerError {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// The server's text.
        body: String,
    },
    /// The server refused the request (bad or expired token, CSR refused). Fix the token.
    #[error("{url}: refused with {status}: {body}")]
    Refused {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// The server's text.
        body: String,
    },
    /// The CA the server sent is not the one the token names: a wrong token, or someone in the
    /// middle. Nothing was written.
    #[error("the CA served by {url} does not match the token's CA hash")]
    CaMismatch {
        /// The URL.
        url: String,
    },
    /// The server sent a certificate that is not a certificate for this node. The server's bug.
    #[error("the cloud returned an unusable certificate: {0}")]
    BadCertificate(String),
    /// Key generation, parsing or writing files failed. Local: check the paths and disk.
    #[error(transparent)]
    Local(#[from] CertError),
    /// An HTTPS client could not be built (bad CA material). Local.
    #[error("HTTPS client: {0}")]
    Client(String),
}

impl BootstrapError {
    /// Whether trying again later may succeed (network trouble, server errors).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::ServerError { .. })
    }
}

/// Checks the configured certificate and key.
pub fn certificate_status(config: &EdgeHubConfig) -> CertStatus {
    let tls = &config.tls;
    if !tls.cert_file.exists() || !tls.key_file.exists() {
        return CertStatus::Missing;
    }
    let identity = match certs::Identity::load(&tls.cert_file, &tls.key_file) {
        Ok(identity) => identity,
        Err(e) => return CertStatus::Unusable(e.to_string()),
    };
    let Some(leaf) = identity.chain.first() else {
        return CertStatus::Unusable("the certificate file holds no certificate".into());
    };
    match certs::node_id_from_cert(leaf) {
        Ok(id) if id == config.controller.node_id => {}
        Ok(id) => return CertStatus::Unusable(format!("the certificate is node {id}'s")),
        Err(e) => return CertStatus::Unusable(e.to_string()),
    }
    match validity(leaf) {
        Ok((not_before, not_after)) if SystemTime::now() < not_after => CertStatus::Valid {
            not_before,
            not_after,
        },
        Ok(_) => CertStatus::Unusable("the certificate has expired".into()),
        Err(e) => CertStatus::Unusable(e),
    }
}

/// Makes sure the node has a usable certificate: keeps a valid one, otherwise bootstraps one with
/// the configured token.
pub async fn ensure_certificate(config: &EdgeHubConfig) -> Result<CertStatus, BootstrapError> {
    match certificate_status(config) {
        valid @ CertStatus::Valid { .. } => Ok(valid),
        other => {
            let status = match &other {
                CertStatus::Missing => "missing".to_owned(),
                CertStatus::Unusable(reason) => reason.clone(),
                CertStatus::Valid { .. } => unreachable!("handled above"),
            };
            let Some(token) = &config.token else {
                return Err(BootstrapError::NoToken { status });
            };
            tracing::info!(
                reason = status,
                server = config.http_server.as_str(),
                "bootstrapping the node certificate"
            );
            bootstrap(config, token).await?;
            match certificate_status(config) {
                valid @ CertStatus::Valid { .. } => Ok(valid),
                CertStatus::Missing => Err(BootstrapError::BadCertificate("not written".into())),
                CertStatus::Unusable(reason) => Err(BootstrapError::BadCertificate(reason)),
            }
        }
    }
}

/// Obtains a certificate with a bootstrap token (B§9.4 step 2).
pub async fn bootstrap(
    config: &EdgeHubConfig,
    token: &BootstrapToken,
) -> Result<(), BootstrapError> {
    let base = config.http_server.as_str();
    let ca_url = format!("{base}/ca.crt");
    let ca_der = {
        let client = client(dangerous_unverified_tls()?)?;
        let response =
            client
                .get(&ca_url)
                .send()
                .await
                .map_err(|source| BootstrapError::Unreachable {
                    url: ca_url.clone(),
                    source,
                })?;
        body_of(&ca_url, response).await?
    };
    if !certs::token::ca_hash_matches(token.expose(), &ca_der) {
        return Err(BootstrapError::CaMismatch { url: ca_url });
    }
    let ca_pem = pem("CERTIFICATE", &ca_der);
    certs::TrustAnchors::from_pem(&ca_pem)?;
    certs::files::write_cert(&config.tls.ca_file, &ca_pem)?;
    let (_, jwt) = certs::token::split(token.expose())
        .map_err(|e| BootstrapError::Client(format!("token: {e}")))?;
    request_certificate(config, Some(jwt), None).await
}

/// Renews the certificate, authenticating with the current one (no token).
pub async fn renew(config: &EdgeHubConfig) -> Result<(), BootstrapError> {
    let identity = certs::Identity::load(&config.tls.cert_file, &config.tls.key_file)?;
    request_certificate(config, None, Some(identity)).await
}

/// When to renew a certificate valid over `[not_before, not_after]`: at `not_before` plus a
/// fraction `0.7 + 0.2 * unit` of its lifetime (`unit` uniform in `[0, 1)`), KubeEdge's window.
pub fn renewal_time(not_before: SystemTime, not_after: SystemTime, unit: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let fraction = 0.7 + 0.2 * unit.clamp(0.0, 1.0);
    not_before + lifetime.mul_f64(fraction)
}

/// Renews the certificate at its renewal time, again and again, asking EdgeHub to reconnect
/// after each renewal. Failed attempts are retried with backoff (2 s doubling to 64 s); a
/// certificate that expires meanwhile is not replaced by anything worse: the old files stay.
/// Runs until `stop` completes.
pub async fn run_renewal(
    config: EdgeHubConfig,
    reconnect: crate::ReconnectTrigger,
    stop: impl Future<Output = ()>,
) {
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut rng = SplitMix64::new(seed.as_nanos() as u64);
    let renew_loop = async {
        loop {
            let at = match certificate_status(&config) {
                CertStatus::Valid {
                    not_before,
                    not_after,
                } => renewal_time(not_before, not_after, rng.next_unit()),
                // Nothing to renew from; check again later (bootstrap is edgecore's start-up job).
                _ => SystemTime::now() + Duration::from_secs(3600),
            };
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tracing::info!(
                in_secs = wait.as_secs(),
                "next certificate renewal scheduled"
            );
            tokio::time::sleep(wait).await;
            let mut delay = Duration::from_secs(2);
            loop {
                match renew(&config).await {
                    Ok(()) => {
                        tracing::info!("node certificate renewed; reconnecting with it");
                        reconnect.trigger();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_secs = delay.as_secs(), "certificate renewal failed");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(64));
                    }
                }
            }
        }
    };
    tokio::select! {
        () = stop => {}
        () = renew_loop => {}
    }
}

/// Generates a key and CSR, gets it signed, and writes certificate and key.
async fn request_certificate(
    config: &EdgeHubConfig,
    jwt: Option<&str>,
    identity: Option<certs::Identity>,
) -> Result<(), BootstrapError> {
    let node: &NodeId = &config.controller.node_id;
    let anchors = certs::TrustAnchors::load(&config.tls.ca_file)?;
    let (csr_der, key_pem) = certs::generate_node_csr(node)?;
    let url = format!("{}/edge.crt", config.http_server.as_str());
    let client = client(verified_tls(&anchors, identity)?)?;
    let mut request = client
        .get(&url)
        .header("NodeName", node.as_str())
        .body(csr_der);
    if let Some(jwt) = jwt {
        request = request.header(reqwest::header::AUTHORIZATION, format!("Bearer {jwt}"));
    }
    let response = request
        .send()
        .await
        .map_err(|source| BootstrapError::Unreachable {
            url: url.clone(),
            source,
        })?;
    let cert_der = body_of(&url, response).await?;
    match certs::node_id_from_cert(&cert_der) {
        Ok(id) if &id == node => {}
        Ok(id) => {
            return Err(BootstrapError::BadCertificate(format!(
                "issued for node {id}"
            )));
        }
        Err(e) => return Err(BootstrapError::BadCertificate(e.to_string())),
    }
    let cert_pem = pem("CERTIFICATE", &cert_der);
    // Check the pair before replacing anything on disk.
    certs::Identity::from_pem(&cert_pem, &key_pem)?;
    certs::files::write_key(&config.tls.key_file, &key_pem)?;
    certs::files::write_cert(&config.tls.cert_file, &cert_pem)?;
    tracing::info!(node = %node, path = %config.tls.cert_file.display(), "node certificate written");
    Ok(())
}

async fn body_of(url: &str, response: reqwest::Response) -> Result<Vec<u8>, BootstrapError> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|source| BootstrapError::Unreachable {
            url: url.to_owned(),
            source,
        })?;
    if status.is_success() {
        return Ok(body.to_vec());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned();
    let (url, status) = (url.to_owned(), status.as_u16());
    if status >= 500 {
        Err(BootstrapError::ServerError {
            url,
            status,
            body: text,
        })
    } else {
        Err(BootstrapError::Refused {
            url,
            status,
            body: text,
        })
    }
}

fn client(tls: rustls::ClientConfig) -> Result<reqwest::Client, BootstrapError> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .http1_only()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| BootstrapError::Client(e.to_string()))
}

/// TLS trusting only `anchors`, optionally presenting `identity` (renewal).
fn verified_tls(
    anchors: &certs::TrustAnchors,
    identity: Option<certs::Identity>,
) -> Result<rustls::ClientConfig, BootstrapError> {
    transport::tls::bootstrap_client_config(anchors, identity.as_ref())
        .map_err(|e| BootstrapError::Client(e.to_string()))
}

/// TLS that accepts any server certificate: used once, for `/ca.crt`, whose answer is then
/// authenticated by the token's CA hash.
fn dangerous_unverified_tls() -> Result<rustls::ClientConfig, BootstrapError> {
    transport::tls::dangerous_unverified_bootstrap_client_config()
        .map_err(|e| BootstrapError::Client(e.to_string()))
}

/// The validity window of a DER certificate.
fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let v = cert.validity();
    Ok((to_system(v.not_before), to_system(v.not_after)))
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_falls_in_70_to_90_percent_of_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(1000);
        assert_eq!(
            renewal_time(start, end, 0.0),
            start + Duration::from_secs(700)
        );
        assert_eq!(
            renewal_time(start, end, 0.5),
            start + Duration::from_secs(800)
        );
        let top = renewal_time(start, end, 1.0 - f64::EPSILON);
        assert!(top <= start + Duration::from_secs(900) && top > start + Duration::from_secs(899));
        assert_eq!(
            renewal_time(start, end, 7.0),
            start + Duration::from_secs(900)
        );
    }

    #[test]
    fn certificate_status_checks_presence_owner_and_validity() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeId::new("edge-9").unwrap();
        let mut config = EdgeHubConfig::new(node.clone());
        config.tls.ca_file = dir.path().join("ca.crt");
        config.tls.cert_file = dir.path().join("node.crt");
        config.tls.key_file = dir.path().join("node.key");
        assert_eq!(certificate_status(&config), CertStatus::Missing);

        let now = time::OffsetDateTime::now_utc();
        let ca =
            certs::CertificateAuthority::generate(certs::Validity::days_from(now, 10)).unwrap();
        let other = ca
            .issue_node(
                &NodeId::new("edge-8").unwrap(),
                certs::Validity::days_from(now, 10),
            )
            .unwrap();
        certs::files::write_cert(&config.tls.cert_file, &other.cert_pem).unwrap();
        certs::files::write_key(&config.tls.key_file, &other.key_pem).unwrap();
        let CertStatus::Unusable(reason) = certificate_status(&config) else {
            panic!()
        };
        assert!(reason.contains("edge-8"), "{reason}");

        let mine = ca
            .issue_node(&node, certs::Validity::days_from(now, 10))
            .unwrap();
        certs::files::write_cert(&config.tls.cert_file, &mine.cert_pem).unwrap();
        certs::files::write_key(&config.tls.key_file, &mine.key_pem).unwrap();
        let CertStatus::Valid {
            not_before,
            not_after,
        } = certificate_status(&config)
        else {
            panic!()
        };
        let lifetime = not_after.duration_since(not_before).unwrap();
        assert_eq!(lifetime.as_secs() / 86_400, 10);

        std::fs::write(&config.tls.cert_file, "garbage").unwrap();
        assert!(matches!(
            certificate_status(&config),
            CertStatus::Unusable(_)
        ));
    }

    #[tokio::test]
    async fn without_a_certificate_or_token_the_operator_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = EdgeHubConfig::new(NodeId::new("edge-9").unwrap());
        config.tls.cert_file = dir.path().join("node.crt");
        config.tls.key_file = dir.path().join("node.key");
        let err = ensure_certificate(&config).await.unwrap_err();
        assert!(matches!(err, BootstrapError::NoToken { .. }), "{err}");
        assert!(!err.is_transient());
    }

    #[test]
    fn pem_wraps_at_64_columns() {
        let text = pem("CERTIFICATE", &[7u8; 100]);
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(
            text.lines()
                .all(|l| l.len() <= 64 || l.starts_with("-----"))
        );
        assert!(text.ends_with("-----END CERTIFICATE-----\n"));
    }
}
