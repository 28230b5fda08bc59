//! The certificate bootstrap server (HTTPS, port 10002), compatible with KubeEdge's
//! (PROTOCOL.md B§9.3): `GET /ca.crt` returns the CA certificate (DER); `GET /edge.crt` with a
//! DER CSR body, `NodeName` header and `Authorization: Bearer <jwt>` returns a signed node
//! certificate (DER), or 401 with a text reason.
//!
//! Stricter than KubeEdge (W14): the CSR's CN must be `system:node:<NodeName>` and the signed
//! certificate gets only what a node certificate has (the signer ignores requested extensions,
//! including the `ExtKeyUsages` header); a node renewing with its current certificate (a TLS
//! client certificate is requested, not required) may renew only its own name.
//!
//! TLS: the rustls configuration is built here rather than in `transport::tls`, because that
//! module's server builder *requires* a client certificate (right for the edge link, wrong for a
//! bootstrap endpoint that must serve nodes without one). Same provider (ring, explicit),
//! TLS 1.2+, ALPN `http/1.1`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use certs::{CertificateAuthority, CertificateDer, Identity, NodeId, Validity};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::conn_limit::Counted;

/// KubeEdge's limit on the CSR body.
pub const MAX_CSR_BYTES: usize = 1024 * 1024;

/// What the bootstrap server needs.
#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    /// The CA that signs node certificates (and whose key verifies bootstrap tokens).
    pub ca: Arc<CertificateAuthority>,
    /// The server certificate and key presented to edges.
    pub identity: Identity,
    /// Validity of signed node certificates, in days. Default 365 (KubeEdge
    /// `edgeCertSigningDuration`).
    pub edge_cert_days: u32,
    /// Bound on a TLS handshake. Default 30 s.
    pub handshake_timeout: Duration,
}

impl BootstrapConfig {
    /// Defaults for everything but the key material.
    pub fn new(ca: Arc<CertificateAuthority>, identity: Identity) -> Self {
        Self {
            ca,
            identity,
            edge_cert_days: 365,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the bootstrap server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// The server certificate, key or CA could not make a TLS configuration. Fix the files.
    #[error("bootstrap TLS configuration: {0}")]
    Tls(#[from] transport::tls::TlsConfigError),
    /// The listening socket failed.
    #[error("bootstrap server socket: {0}")]
    Io(#[from] io::Error),
}

/// Who is on the other end of a request: the address and, if presented (and verified against
/// the CA by TLS), the client certificate.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Client address.
    pub remote: SocketAddr,
    /// The client's leaf certificate, if it sent one.
    pub client_cert: Option<CertificateDer<'static>>,
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TlsListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let (_, tls) = stream.io().get_ref().get_ref();
        Self {
            remote: *stream.remote_addr(),
            client_cert: tls
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned()),
        }
    }
}

/// The rustls server configuration of the bootstrap endpoint (built by `transport::tls`, the one
/// place TLS configurations are made): client certificate optional but verified against the CA
/// when presented.
pub fn tls_config(config: &BootstrapConfig) -> Result<Arc<rustls::ServerConfig>, BootstrapError> {
    Ok(transport::tls::bootstrap_server_config(
        &config.identity,
        &config.ca.trust_anchors(),
    )?)
}

/// The routes, for serving over [`TlsListener`] (they need [`PeerInfo`]).
pub fn router(config: &BootstrapConfig) -> Router {
    let state = Arc::new(config.clone());
    Router::new()
        .route("/ca.crt", get(ca_cert))
        .route("/edge.crt", get(edge_cert))
        .layer(DefaultBodyLimit::max(MAX_CSR_BYTES))
        .with_state(state)
}

/// Serves the bootstrap endpoints on `listener` (already bound) until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    config: BootstrapConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BootstrapError> {
    let tls = TlsListener::new(listener, tls_config(&config)?, config.handshake_timeout)?;
    let app = router(&config).into_make_service_with_connect_info::<PeerInfo>();
    axum::serve(tls, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// A TLS listener for `axum::serve`: a background task accepts TCP connections and runs each
/// handshake in its own task (bounded by a timeout), so a slow client never delays others.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(Counted<TlsStream<TcpStream>>, SocketAddr)>,
    local: SocketAddr,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` with `tls`.
    pub fn new(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        handshake_timeout: Duration,
    ) -> io::Result<Self> {
        Self::named(listener, tls, handshake_timeout, "bootstrap", None)
    }

    /// [`TlsListener::new`] for the server `what` (named in its log lines), holding at most
    /// `max_connections` open (counting those in their handshake) if given: at the bound it
    /// stops accepting, and further connections wait in the kernel's accept queue.
    pub fn named(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        handshake_timeout: Duration,
        what: &'static str,
        max_connections: Option<usize>,
    ) -> io::Result<Self> {
        let slots = max_connections.map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1))));
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(tls);
        let acceptor_task = tokio::spawn(async move {
            loop {
                let slot = match &slots {
                    Some(slots) => Arc::clone(slots).acquire_owned().await.ok(),
                    None => None,
                };
                let (tcp, remote) = match listener.accept().await {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, server = what, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((Counted::new(stream, slot), remote)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%remote, error = %e, server = what, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::info!(%remote, server = what, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            acceptor_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Counted<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(pair) => pair,
            // The acceptor task only ends when aborted with us; wait for the shutdown signal.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn ca_cert(State(config): State<Arc<BootstrapConfig>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        config.ca.cert_der().to_vec(),
    )
        .into_response()
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.into(),
    )
        .into_response()
}

async fn edge_cert(
    State(config): State<Arc<BootstrapConfig>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let node = match headers.get("NodeName").map(|v| v.to_str()) {
        Some(Ok(name)) => match NodeId::new(name) {
            Ok(node) => node,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("invalid NodeName: {e}")),
        },
        _ => return text(StatusCode::BAD_REQUEST, "missing NodeName header"),
    };
    let now = time::OffsetDateTime::now_utc();
    if let Some(cert) = &peer.client_cert {
        // TLS verified it against the CA; it may renew only its own node's certificate.
        match certs::node_id_from_cert(cert) {
            Ok(owner) if owner == node => {}
            Ok(owner) => {
                tracing::warn!(remote = %peer.remote, %owner, requested = %node,
                    "certificate renewal for another node refused");
                return text(
                    StatusCode::UNAUTHORIZED,
                    format!("certificate of node {owner} may renew only its own certificate"),
                );
            }
            Err(e) => {
                return text(
                    StatusCode::UNAUTHORIZED,
                    format!("client certificate is not a node certificate: {e}"),
                );
            }
        }
    } else {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let parts: Vec<&str> = auth.split(' ').collect();
        let [scheme, jwt] = parts.as_slice() else {
            return text(
                StatusCode::UNAUTHORIZED,
                "missing or malformed Authorization header (expected \"Bearer <token>\")",
            );
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return text(
                StatusCode::UNAUTHORIZED,
                "Authorization scheme must be Bearer",
            );
        }
        if let Err(e) = certs::token::verify_jwt(jwt, &config.ca, now) {
            tracing::warn!(remote = %peer.remote, %node, error = %e, "bootstrap token refused");
            return text(StatusCode::UNAUTHORIZED, format!("invalid token: {e}"));
        }
    }
    let validity = Validity::days_from(now, config.edge_cert_days);
    match config.ca.sign_node_csr(&body, &node, validity) {
        Ok(cert) => {
            tracing::info!(remote = %peer.remote, %node, renewal = peer.client_cert.is_some(),
                "node certificate signed");
            (
                [(header::CONTENT_TYPE, "application/octet-stream")],
                cert.to_vec(),
            )
                .into_response()
        }
        Err(e @ certs::CertError::CsrSubjectMismatch { .. }) => {
            text(StatusCode::FORBIDDEN, format!("CSR refused: {e}"))
        }
        Err(e @ certs::CertError::InvalidCsr { .. }) => {
            text(StatusCode::BAD_REQUEST, format!("CSR refused: {e}"))
        }
        Err(e) => {
            tracing::error!(%node, error = %e, "signing a node certificate failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("signing failed: {e}"),
            )
        }
    }
}
