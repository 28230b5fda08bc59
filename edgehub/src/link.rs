//! The tasks around one connection to the cloud: the dial, a reader and a writer per
//! established connection, and a closer when it ends. Each is tagged with the connection's
//! [`Generation`]; closing a connection aborts its reader and writer and waits for them (and for
//! a bounded graceful close) in the closer, and the next dial starts only after every closer has
//! finished, so no task of an old connection outlives it or touches its successor (W10).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use proto::close::SessionCloseCode;
use proto::{Fault, Message};
use session::edge::{EdgeSession, Generation, Transmit, TransmitKind};
use transport::{CloseReason, Connection, DialConfig, Protocol, RecvError, SendError};

use crate::config::EdgeHubConfig;
use crate::stats::Counters;

/// Transmits queued for a connection's writer.
const WRITER_CAPACITY: usize = 64;

/// What the driver hears from the link tasks.
// Messages are nearly all of the traffic; boxing them to shrink the rare variants would add an
// allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Inbound {
    /// A dial finished.
    Dialed {
        generation: Generation,
        protocol: Protocol,
        result: Result<Box<dyn Connection>, Fault>,
    },
    /// A background probe of the configured protocol finished (protocol fallback).
    Probed {
        protocol: Protocol,
        result: Result<Box<dyn Connection>, Fault>,
    },
    /// The connection received a message.
    Message(Generation, Message),
    /// The connection failed (or the peer closed it), with the cloud's session close code if it
    /// gave one (PROTOCOL.md Part A item 9).
    Failed(Generation, Fault, Option<SessionCloseCode>),
    /// A message the session said to forget once written was written.
    Written { id: String },
}

/// The tasks of one established connection.
pub(crate) struct Link {
    pub(crate) generation: Generation,
    conn: Arc<dyn Connection>,
    pub(crate) writer_tx: mpsc::Sender<Transmit>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Link {
    /// Starts the reader and the writer of `conn`; both report to `inbound`.
    pub(crate) fn spawn(
        generation: Generation,
        conn: Arc<dyn Connection>,
        inbound: &mpsc::Sender<Inbound>,
    ) -> Self {
        let (writer_tx, writer_rx) = mpsc::channel(WRITER_CAPACITY);
        let reader = tokio::spawn(read_loop(generation, conn.clone(), inbound.clone()));
        let writer = tokio::spawn(write_loop(
            generation,
            conn.clone(),
            writer_rx,
            inbound.clone(),
        ));
        Self {
            generation,
            conn,
            writer_tx,
            reader,
            writer,
        }
    }

    /// Moves the session's transmits into the writer's queue while it has room. Returns whether
    /// any moved, and whether the queue is full (then wait for room before polling more).
    pub(crate) fn fill_writer(
        &self,
        session: &mut EdgeSession,
        now: Instant,
        counters: &Counters,
    ) -> (bool, bool) {
        let mut progress = false;
        loop {
            let permit = match self.writer_tx.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(())) => return (progress, true),
                // The writer ended; its failure report is on its way.
                Err(mpsc::error::TrySendError::Closed(())) => return (progress, false),
            };
            let Some(transmit) = session.poll_transmit(now) else {
                return (progress, false);
            };
            counters.transmitted(transmit.kind);
            permit.send(transmit);
            progress = true;
        }
    }

    /// Ends the reader and the writer, then closes the connection within `deadline`, with
    /// `code` if given.
    pub(crate) fn close(
        self,
        code: Option<SessionCloseCode>,
        reason: String,
        deadline: Duration,
    ) -> JoinHandle<()> {
        spawn_closer(
            Some((self.reader, self.writer)),
            self.conn,
            code,
            reason,
            deadline,
        )
    }
}

/// Waits for room in a connection's writer queue (`None` without a connection, or once its
/// writer ended).
pub(crate) async fn writer_room<T>(tx: Option<mpsc::Sender<T>>) -> Option<mpsc::OwnedPermit<T>> {
    tx?.reserve_owned().await.ok()
}

/// Closes a connection that never got tasks (a dial that completed after the session moved on).
pub(crate) fn close_unused(
    conn: Arc<dyn Connection>,
    reason: String,
    deadline: Duration,
) -> JoinHandle<()> {
    spawn_closer(None, conn, None, reason, deadline)
}

/// Dials the cloud over `protocol` once every closer in `closers` has finished, and reports
/// the outcome.
pub(crate) fn dial(
    generation: Generation,
    protocol: Protocol,
    config: &EdgeHubConfig,
    closers: Vec<JoinHandle<()>>,
    inbound: mpsc::Sender<Inbound>,
) -> JoinHandle<()> {
    let dial = dial_config(config, protocol);
    tokio::spawn(async move {
        // Every task of the previous connection has ended before we dial again.
        for closer in closers {
            let _ = closer.await;
        }
        let result = connect(protocol, dial).await;
        let _ = inbound
            .send(Inbound::Dialed {
                generation,
                protocol,
                result,
            })
            .await;
    })
}

/// Offers `conn`, established by a probe, as the outcome of the dial of `generation`, once
/// every closer in `closers` has finished (so no task of the old connection outlives it).
pub(crate) fn adopt(
    generation: Generation,
    protocol: Protocol,
    conn: Box<dyn Connection>,
    closers: Vec<JoinHandle<()>>,
    inbound: mpsc::Sender<Inbound>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        for closer in closers {
            let _ = closer.await;
        }
        let dialed = Inbound::Dialed {
            generation,
            protocol,
            result: Ok(conn),
        };
        let _ = inbound.send(dialed).await;
    })
}

/// Tries `protocol` in the background while the edge runs on the other one (protocol
/// fallback): a completed handshake is the connection the edge moves onto.
pub(crate) fn probe(
    protocol: Protocol,
    config: &EdgeHubConfig,
    inbound: mpsc::Sender<Inbound>,
) -> JoinHandle<()> {
    let dial = dial_config(config, protocol);
    tokio::spawn(async move {
        let result = connect(protocol, dial).await;
        let _ = inbound.send(Inbound::Probed { protocol, result }).await;
    })
}

async fn connect(
    protocol: Protocol,
    dial: Result<DialConfig, Fault>,
) -> Result<Box<dyn Connection>, Fault> {
    transport::connect(protocol, &dial?)
        .await
        .map_err(|e| e.fault())
}

/// What to dial `protocol` with; certificate files that cannot be loaded are a configuration
/// fault.
fn dial_config(config: &EdgeHubConfig, protocol: Protocol) -> Result<DialConfig, Fault> {
    let tls = &config.tls;
    let identity = certs::Identity::load(&tls.cert_file, &tls.key_file)
        .map_err(|e| Fault::configuration(format!("loading the node certificate: {e}")))?;
    let anchors = certs::TrustAnchors::load(&tls.ca_file)
        .map_err(|e| Fault::configuration(format!("loading the CA certificate: {e}")))?;
    let mut dial = DialConfig::new(
        config.endpoint_for(protocol).server.as_str(),
        config.controller.node_id.clone(),
        identity,
        anchors,
    );
    dial.project_id = config.controller.project_id.as_str().to_owned();
    dial.link = config.link_config_for(protocol);
    Ok(dial)
}

/// Receives from the connection until it fails; every message and the final failure go to the
/// driver tagged with the connection's generation.
async fn read_loop(generation: Generation, conn: Arc<dyn Connection>, tx: mpsc::Sender<Inbound>) {
    loop {
        let inbound = match conn.recv().await {
            Ok(Some(message)) => Inbound::Message(generation, message),
            Ok(None) => Inbound::Failed(
                generation,
                Fault::network("the cloud closed the connection"),
                None,
            ),
            Err(e) => match (&e, e.session_code()) {
                (RecvError::Closed { reason }, Some(code)) => {
                    Inbound::Failed(generation, Fault::network(peer_text(reason)), Some(code))
                }
                _ => Inbound::Failed(generation, e.fault(), None),
            },
        };
        let last = matches!(inbound, Inbound::Failed(..));
        if tx.send(inbound).await.is_err() || last {
            return;
        }
    }
}

/// The reason text the cloud gave with its close (the code is carried separately).
fn peer_text(reason: &CloseReason) -> String {
    match reason {
        CloseReason::PeerAborted { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Writes transmits in order until the queue closes or a write fails.
async fn write_loop(
    generation: Generation,
    conn: Arc<dyn Connection>,
    mut rx: mpsc::Receiver<Transmit>,
    tx: mpsc::Sender<Inbound>,
) {
    while let Some(transmit) = rx.recv().await {
        if transmit.generation != generation {
            continue;
        }
        let id = transmit.message.header.id.clone();
        match conn.send(transmit.message).await {
            Ok(()) => {
                if let TransmitKind::Upstream {
                    forget_after_write: true,
                } = transmit.kind
                {
                    let _ = tx.send(Inbound::Written { id }).await;
                }
            }
            Err(e) => {
                let failed = match (&e, e.session_code()) {
                    (SendError::Closed { reason }, Some(code)) => {
                        Inbound::Failed(generation, Fault::network(peer_text(reason)), Some(code))
                    }
                    _ => Inbound::Failed(generation, e.fault(), None),
                };
                let _ = tx.send(failed).await;
                return;
            }
        }
    }
}

/// Ends a connection's tasks, then closes it gracefully within `deadline`.
fn spawn_closer(
    tasks: Option<(JoinHandle<()>, JoinHandle<()>)>,
    conn: Arc<dyn Connection>,
    code: Option<SessionCloseCode>,
    reason: String,
    deadline: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Some((reader, writer)) = tasks {
            reader.abort();
            writer.abort();
            let _ = reader.await;
            let _ = writer.await;
        }
        match tokio::time::timeout(deadline, conn.close_with(code, &reason)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "closing the old connection"),
            Err(_) => debug!("closing the old connection timed out; dropped"),
        }
    })
}
