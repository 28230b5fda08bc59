//! The async driver of one node connection: a thin loop around [`NodeSession`] in the shape of
//! quinn's `ConnectionDriver` (STYLE.md lesson 11). Each turn it feeds received messages, timer
//! expiries and store results in, writes `poll_transmit` out, re-arms its one `Sleep` to
//! `poll_timeout`, and turns `poll_event` into store operations.
//!
//! Its store work (operations in flight, the downstream refill, failed writes tried again each
//! second) is in `driver/store_work.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt as _;
use proto::close::SessionCloseCode;
use proto::{FaultClass, Message};
use tokio::sync::mpsc;
use tokio::time::Instant;
use transport::{Connection, RecvError};

use crate::close::CloseCause;
use crate::metrics::Metrics;
use crate::registry::{AckInfo, Entry, Registry};
use crate::store::{MessageStore, NodeRecord};
use crate::upstream::UpstreamRouter;
use session::node::{CloseReason, NodeSession, SessionConfig, SessionEvent, TransmitKind};

mod store_work;

use store_work::{Record, StoreWork};

/// Messages read ahead of the session before the reader stops reading (back-pressure).
const READ_AHEAD: usize = 256;

/// What the reader task forwards: boxed, so the channel's preallocated slots stay small (a
/// thousand idle nodes must not each hold a block of full-size messages).
type Received = Result<Option<Box<Message>>, Box<RecvError>>;

/// How long the driver waits for store results still pending when its session ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything one connection's driver owns: the connection, its registry entry, and what it
/// shares with every driver (the registry's driver end, the store, the counters, the settings).
pub(crate) struct Driver {
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: Arc<dyn MessageStore>,
    /// Where upstream messages go (cloud modules, else the application path).
    pub(crate) router: Arc<UpstreamRouter>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) session: SessionConfig,
    pub(crate) close_timeout: Duration,
    pub(crate) conn: Arc<dyn Connection>,
    pub(crate) node: String,
    pub(crate) entry: Entry,
}

impl Driver {
    /// Runs the session to its end, then tears down: closes the connection, finishes pending
    /// store work and removes the registry entry if it is still this session's.
    pub(crate) async fn run(mut self) {
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let reader = tokio::spawn(read_loop(Arc::clone(&self.conn), tx));
        let mut work = StoreWork::new(
            Arc::clone(&self.store),
            Arc::clone(&self.router),
            self.node.clone(),
        );
        let cause = self.drive(rx, &mut work).await;

        let protocol = self.entry.info.protocol;
        let timeout = self.close_timeout;
        if cause != CloseCause::PeerClosed {
            let closing = self.conn.close_with(cause.session_code(), &cause.text());
            let _ = tokio::time::timeout(timeout, closing).await;
        }
        reader.abort();
        let drain = work.drain(&self.registry);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
        // The node record keeps when the node was last heard from, for the node list.
        let last_frame_ms = self.entry.info.last_frame_ms.load(Ordering::Relaxed);
        if last_frame_ms > 0 {
            let record = NodeRecord {
                id: self.node.clone(),
                project: self.entry.info.project.clone(),
                first_seen_ms: last_frame_ms,
                last_seen_ms: last_frame_ms,
            };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.store.register_node(record)).await;
        }
        let class = cause.fault_class().map_or("none", FaultClass::label);
        let generation = self.entry.generation;
        if self.registry.remove_if_current(&self.node, generation) {
            self.metrics.disconnected(cause.label());
            tracing::info!(node = %self.node, %protocol, reason = %cause.text(), class,
                generation, "node disconnected");
        } else {
            tracing::debug!(node = %self.node, %protocol, reason = %cause.text(), class,
                generation, "superseded session ended");
        }
        self.registry.driver_done();
    }

    async fn drive(
        &mut self,
        mut incoming: mpsc::Receiver<Received>,
        work: &mut StoreWork,
    ) -> CloseCause {
        let store = Arc::clone(&self.store);
        let peer = self.conn.peer().clone();
        let now_ms = proto::now_millis();
        let record = NodeRecord {
            id: self.node.clone(),
            project: self.entry.info.project.clone(),
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
        };
        match store.register_node(record).await {
            Ok(()) => {}
            // A known node is served anyway; its record is written again when the session ends.
            Err(e) if e.is_disk_full() => {
                tracing::debug!(node = %self.node, error = %e, "node record not updated");
            }
            Err(e) => return CloseCause::StoreFailed(e.to_string()),
        }
        let config = SessionConfig {
            upstream_ack: peer.capabilities.upstream_ack,
            ..self.session.clone()
        };
        let mut session = NodeSession::new(config, Instant::now().into_std());
        let mut last_keepalive = session.last_keepalive();
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);

        let cause = loop {
            if let Err(cause) = self.flush(&mut session, work).await {
                break cause;
            }
            if let Some(reason) = session.close_reason() {
                break match reason {
                    CloseReason::KeepaliveTimeout => CloseCause::KeepaliveTimeout,
                    _ => CloseCause::Shutdown,
                };
            }
            work.plan(&mut session);
            let timeout = session.poll_timeout();
            if let Some(t) = timeout {
                sleep.as_mut().reset(Instant::from_std(t));
            }
            tokio::select! {
                biased;
                stop = &mut self.entry.stop => break stop.map_or(CloseCause::Shutdown, CloseCause::from),
                received = incoming.recv() => match received {
                    Some(Ok(Some(msg))) => {
                        self.metrics.received(self.entry.info.protocol);
                        self.entry.info.last_frame_ms.store(proto::now_millis(), Ordering::Relaxed);
                        session.handle_message(Instant::now().into_std(), *msg);
                        if session.last_keepalive() != last_keepalive {
                            last_keepalive = session.last_keepalive();
                            self.entry.info.last_keepalive_ms.store(proto::now_millis(), Ordering::Relaxed);
                        }
                    }
                    Some(Ok(None)) | None => break CloseCause::PeerClosed,
                    // An edge that says it is shutting down closed on purpose.
                    Some(Err(e)) if e.session_code() == Some(SessionCloseCode::Shutdown) => {
                        break CloseCause::PeerClosed;
                    }
                    Some(Err(e)) => break CloseCause::Transport(e.fault()),
                },
                Some(done) = work.ops.next(), if !work.ops.is_empty() => {
                    let finished = work.finished(done, &mut session, &self.metrics, &self.registry);
                    if let Err(cause) = finished {
                        break cause;
                    }
                }
                () = until(work.retry_at), if work.retry_at.is_some() => work.retry_now(&self.metrics),
                () = self.entry.wake.notified() => {
                    work.maybe_more = true;
                    let cancelled = std::mem::take(&mut *lock(&self.entry.cancelled));
                    work.cancel(&mut session, cancelled);
                }
                () = &mut sleep, if timeout.is_some() => {
                    session.handle_timeout(Instant::now().into_std());
                }
            }
        };
        session.close();
        self.metrics.resends(session.stats().resent);
        cause
    }

    /// Writes every pending transmit and turns every event into a store operation.
    async fn flush(
        &self,
        session: &mut NodeSession,
        work: &mut StoreWork,
    ) -> Result<(), CloseCause> {
        // Again after the events when a consumed servicebus reply queued its acknowledgement.
        let mut again = true;
        while std::mem::take(&mut again) {
            while let Some(transmit) = session.poll_transmit() {
                if let Err(e) = self.conn.send(transmit.message).await {
                    return Err(CloseCause::SendFailed(e.fault()));
                }
                self.metrics.sent(self.entry.info.protocol);
                let record = match transmit.kind {
                    TransmitKind::Delivery {
                        seq,
                        needs_ack: false,
                        ..
                    } => {
                        self.metrics.unconfirmed();
                        Record::Remove(seq)
                    }
                    TransmitKind::Delivery { seq, attempt, .. } => {
                        Record::InFlight { seq, attempt }
                    }
                    TransmitKind::UpstreamAck => continue,
                };
                work.record(record);
            }
            while let Some(event) = session.poll_event() {
                match event {
                    // A servicebus reply goes to the API call waiting for it (KubeEdge: CloudHub
                    // routes `upload`/`user` to the router), never to the upstream log; it is
                    // acknowledged at once so the edge's outbox forgets it.
                    SessionEvent::Upstream(msg) if proto::http::is_reply(&msg) => {
                        let id = msg.header.id.clone();
                        self.metrics.upstream(false);
                        self.registry.replies().deliver(&self.node, msg);
                        session.upstream_accepted(&id);
                        again = true;
                    }
                    SessionEvent::Upstream(msg) => work.accept(Box::new(msg), &self.metrics),
                    SessionEvent::Acked {
                        id,
                        latency,
                        response,
                        ..
                    } => {
                        self.metrics.ack(latency);
                        let info = Box::new(AckInfo {
                            id: id.clone(),
                            latency,
                            response: Some(response),
                            failed: None,
                            cancelled: false,
                        });
                        work.ack(id, info);
                    }
                    SessionEvent::Failed { id, seq, reason } => {
                        if seq.is_some() {
                            tracing::warn!(node = %self.node, %id, %reason,
                                "the edge could not deliver the message; it failed");
                        }
                        work.fail(id, reason);
                    }
                    // Seen through `close_reason` by the loop.
                    SessionEvent::Closed(_) => {}
                }
            }
        }
        Ok(())
    }
}

/// Completes at `deadline`, or never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Reads the connection into `tx` until it ends; the terminal result is forwarded too.
async fn read_loop(conn: Arc<dyn Connection>, tx: mpsc::Sender<Received>) {
    loop {
        let received = conn.recv().await.map(|m| m.map(Box::new)).map_err(Box::new);
        let last = !matches!(received, Ok(Some(_)));
        if tx.send(received).await.is_err() || last {
            return;
        }
    }
}

/// Locks a mutex, recovering the data if a holder panicked (a list of ids stays consistent).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
