//! Machinery both listeners share: handshakes run as concurrent tasks (bounded in number, each
//! under the handshake timeout) and their outcomes queue for [`crate::Listener::accept`], so one
//! slow or bogus client never delays the others (fixes W15's sequential accept).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};

use crate::{AcceptError, BoxFuture, Connection, Listener, Shutdown};

/// What a handshake task yields.
pub(crate) type Accepted = Result<Box<dyn Connection>, AcceptError>;

/// Outcomes completed but not yet taken by `accept`; when full, handshake tasks wait (holding
/// their permits), which in turn stops the accept loop: back-pressure to the kernel's backlog.
const RESULT_QUEUE: usize = 64;

/// The handshake tasks of one listener.
#[derive(Debug)]
pub(crate) struct Handshakes {
    permits: Arc<Semaphore>,
    tasks: JoinSet<()>,
    results: mpsc::Sender<Accepted>,
}

impl Handshakes {
    /// Waits until fewer than the configured number of handshakes run.
    pub(crate) async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// Waits for a handshake slot as [`Handshakes::permit`] does; `None` once `shutdown`
    /// completes first.
    pub(crate) async fn permit_until(
        &self,
        shutdown: &mut Shutdown,
    ) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            () = shutdown => None,
            permit = self.permit() => permit,
        }
    }

    /// One turn of an accept loop: waits for a handshake slot, then for `accept` (the socket's
    /// next connection); `None` once `shutdown` completes first. Both adapters' loops are
    /// `while let Some((permit, accepted)) = handshakes.next_turn(..)`.
    pub(crate) async fn next_turn<T>(
        &self,
        shutdown: &mut Shutdown,
        accept: impl Future<Output = T>,
    ) -> Option<(OwnedSemaphorePermit, T)> {
        let permit = self.permit_until(shutdown).await?;
        tokio::select! {
            () = shutdown => None,
            accepted = accept => Some((permit, accepted)),
        }
    }

    /// Runs `handshake` in its own task; its outcome is queued for `accept`.
    pub(crate) fn spawn(
        &mut self,
        permit: OwnedSemaphorePermit,
        handshake: impl Future<Output = Accepted> + Send + 'static,
    ) {
        while self.tasks.try_join_next().is_some() {}
        let results = self.results.clone();
        self.tasks.spawn(async move {
            let outcome = handshake.await;
            let _ = results.send(outcome).await;
            drop(permit);
        });
    }

    /// Reports an error of the listening socket itself, dropping it if `accept` lags far behind.
    pub(crate) fn report(&self, outcome: Accepted) {
        let _ = self.results.try_send(outcome);
    }
}

/// The [`Listener`] handed to callers: outcomes in, the accept loop stopped when dropped.
#[derive(Debug)]
pub(crate) struct ListenerHandle {
    local_addr: SocketAddr,
    results: mpsc::Receiver<Accepted>,
    accept_loop: JoinHandle<()>,
}

/// Starts an accept loop: `run` receives the [`Handshakes`] to spawn into and returns when the
/// shutdown signal fires (dropping it aborts handshakes still running).
pub(crate) fn start<F, Fut>(
    local_addr: SocketAddr,
    max_concurrent_handshakes: usize,
    run: F,
) -> ListenerHandle
where
    F: FnOnce(Handshakes) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(RESULT_QUEUE);
    let handshakes = Handshakes {
        permits: Arc::new(Semaphore::new(max_concurrent_handshakes.max(1))),
        tasks: JoinSet::new(),
        results: tx,
    };
    ListenerHandle {
        local_addr,
        results: rx,
        accept_loop: tokio::spawn(run(handshakes)),
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl Listener for ListenerHandle {
    fn accept(&mut self) -> BoxFuture<'_, Option<Accepted>> {
        Box::pin(self.results.recv())
    }

    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Checks that the peer's claimed node id matches its certificate; returns the certified id.
pub(crate) fn verify_node(
    certificate: &[u8],
    claimed: Option<&str>,
) -> Result<certs::NodeId, crate::RejectReason> {
    let certified = certs::node_id_from_cert(certificate).map_err(|e| {
        crate::RejectReason::NotNodeCertificate {
            // The reason alone: the variant's own text already says "not a node certificate".
            detail: match e {
                certs::CertError::NotNodeCertificate { reason } => reason,
                other => other.to_string(),
            },
        }
    })?;
    let claimed = claimed.ok_or(crate::RejectReason::MissingNodeId)?;
    if claimed != certified.as_str() {
        return Err(crate::RejectReason::NodeIdMismatch {
            claimed: claimed.to_owned(),
            certified: certified.into_string(),
        });
    }
    Ok(certified)
}

/// Splits `host:port` (IPv6 hosts in brackets) for dialling and certificate verification.
pub(crate) fn split_host_port(server: &str) -> Result<(String, u16), String> {
    let (host, port) = server
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port".to_owned())?;
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err("empty host".to_owned());
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_that_is_not_a_node_certificate_is_refused_with_its_reason_once() {
        let now = time::OffsetDateTime::now_utc();
        let ca =
            certs::CertificateAuthority::generate(certs::Validity::days_from(now, 1)).expect("ca");
        let server = ca
            .issue_server(
                &["cloud".to_owned()],
                &[],
                certs::Validity::days_from(now, 1),
            )
            .expect("server certificate");
        let der = server.identity.chain[0].clone();
        let reason = verify_node(der.as_ref(), Some("edge-1")).expect_err("refused");
        let text = reason.to_string();
        assert!(text.starts_with("not a node certificate: "), "{text}");
        assert_eq!(text.matches("not a node certificate").count(), 1, "{text}");
    }

    #[test]
    fn host_port_splits_names_and_addresses() {
        assert_eq!(
            split_host_port("cloud.example:10000").unwrap(),
            ("cloud.example".to_owned(), 10000)
        );
        assert_eq!(
            split_host_port("127.0.0.1:1").unwrap(),
            ("127.0.0.1".to_owned(), 1)
        );
        assert_eq!(
            split_host_port("[::1]:443").unwrap(),
            ("::1".to_owned(), 443)
        );
        assert!(split_host_port("noport").is_err());
        assert!(split_host_port(":80").is_err());
        assert!(split_host_port("h:99999").is_err());
    }
}
