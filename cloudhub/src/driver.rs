//! The async driver of one node connection: a thin loop around [`NodeSession`] in the shape of
//! quinn's `ConnectionDriver` (STYLE.md lesson 11). Each turn it feeds received messages, timer
//! expiries and store results in, writes `poll_transmit` out, re-arms its one `Sleep` to
//! `poll_timeout`, and turns `poll_event` into store operations.
//!
//! Store operations are issued in order as events come out of the session (the store applies
//! them in call order) and their results are awaited concurrently, so a slow fsync delays acks,
//! not the reading of the connection. A separate task reads the connection, so `recv` is never
//! cancelled halfway.
//!
//! A store write that fails (a full disk) is tried again every [`STORE_RETRY`] until it works,
//! rather than closing the session: an upstream message is acknowledged once it is stored (the
//! edge keeps it until then), an ACK or a send is recorded late, and reading the queue resumes,
//! so the node recovers without a reconnect once space returns. The store logs the episode once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use proto::close::SessionCloseCode;
use proto::{FaultClass, Message};
use tokio::sync::mpsc;
use tokio::time::Instant;
use transport::{Connection, RecvError};

use crate::close::CloseCause;
use crate::metrics::Metrics;
use crate::registry::{AckInfo, Entry, Registry};
use crate::store::{Accepted, MessageStore, NodeRecord, StoreError, StoreFuture};
use session::node::{
    CloseReason, Downstream, NodeSession, SessionConfig, SessionEvent, TransmitKind,
};

/// Messages read ahead of the session before the reader stops reading (back-pressure).
const READ_AHEAD: usize = 256;

/// What the reader task forwards: boxed, so the channel's preallocated slots stay small (a
/// thousand idle nodes must not each hold a block of full-size messages).
type Received = Result<Option<Box<Message>>, Box<RecvError>>;
/// How long the driver waits for store results still pending when its session ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often failed store operations are tried again.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Most upstream messages held for a retry; beyond them the oldest are left to the edge, which
/// keeps them and resends them after its next reconnect (more than an edge's upstream window).
const MAX_HELD_UPSTREAM: usize = 1024;

/// A store operation to try again.
enum Retry {
    /// Accept this upstream message (its ACK waits for it).
    Accept(Box<Message>),
    /// Record what happened to a downstream message.
    Record(Record),
    /// Read the queue again.
    Refill,
}

/// A downstream message's progress, as the store records it.
enum Record {
    /// Message `seq` was sent (`attempt`) and waits for its ACK.
    InFlight { seq: u64, attempt: u32 },
    /// No-ACK message `seq` was written: forget it.
    Remove(u64),
    /// Message `id` was acknowledged.
    Ack(String),
}

/// A store result the driver acts on.
enum Done {
    Refill {
        asked: usize,
        result: Result<Vec<Downstream>, StoreError>,
    },
    Accepted {
        msg: Box<Message>,
        result: Result<Accepted, StoreError>,
    },
    AckMarked {
        info: Option<Box<AckInfo>>,
        id: String,
        result: Result<Option<u64>, StoreError>,
    },
    Recorded {
        what: &'static str,
        record: Record,
        result: Result<(), StoreError>,
    },
}

/// Everything one connection's driver owns: the connection, its registry entry, and what it
/// shares with every driver (the registry's driver end, the store, the counters, the settings).
pub(crate) struct Driver {
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: Arc<dyn MessageStore>,
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
        let mut ops: FuturesUnordered<StoreFuture<'static, Done>> = FuturesUnordered::new();
        let cause = self.drive(rx, &mut ops).await;

        let protocol = self.entry.info.protocol;
        let timeout = self.close_timeout;
        if cause != CloseCause::PeerClosed {
            let closing = self.conn.close_with(cause.session_code(), &cause.text());
            let _ = tokio::time::timeout(timeout, closing).await;
        }
        reader.abort();
        // Results still pending (ACK marks, acceptances) are durable or not regardless; finish
        // them so ACK waiters hear about every recorded ACK.
        let drain = async {
            while let Some(done) = ops.next().await {
                if let Done::AckMarked {
                    info: Some(info), ..
                } = done
                {
                    self.registry.notify_ack(&self.node, &info);
                }
            }
        };
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
        ops: &mut FuturesUnordered<StoreFuture<'static, Done>>,
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
        // Highest store sequence handed to the session: refills continue after it.
        let mut last_fed = 0u64;
        let mut refilling = false;
        let mut maybe_more = true;
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        // Store operations that failed, tried again at `retry_at`.
        let mut retries: Vec<Retry> = Vec::new();
        let mut retry_at: Option<Instant> = None;

        let cause = loop {
            if let Err(cause) = self.flush(&mut session, ops).await {
                break cause;
            }
            if !retries.is_empty() && retry_at.is_none() {
                retry_at = Some(Instant::now() + STORE_RETRY);
                let held = retries
                    .iter()
                    .filter(|r| matches!(r, Retry::Accept(_)))
                    .count();
                if held > MAX_HELD_UPSTREAM {
                    // The oldest are left to the edge, which resends them after a reconnect.
                    let mut excess = held - MAX_HELD_UPSTREAM;
                    retries.retain(|r| match r {
                        Retry::Accept(msg) if excess > 0 => {
                            excess -= 1;
                            session.upstream_failed(&msg.header.id);
                            false
                        }
                        _ => true,
                    });
                }
            }
            if let Some(reason) = session.close_reason() {
                break match reason {
                    CloseReason::KeepaliveTimeout => CloseCause::KeepaliveTimeout,
                    _ => CloseCause::Shutdown,
                };
            }
            if !refilling && maybe_more && session.wants() > 0 {
                refilling = true;
                let asked = session.wants();
                let fut = store.pending(&self.node, last_fed, asked);
                ops.push(Box::pin(async move {
                    Done::Refill {
                        asked,
                        result: fut.await,
                    }
                }));
            }
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
                Some(done) = ops.next(), if !ops.is_empty() => match done {
                    Done::Refill { asked, result } => {
                        refilling = false;
                        match result {
                            Ok(downs) => {
                                maybe_more = downs.len() >= asked;
                                if let Some(last) = downs.last() {
                                    last_fed = last_fed.max(last.seq);
                                }
                                session.queue(Instant::now().into_std(), downs);
                            }
                            Err(e) if retryable(&e) => {
                                maybe_more = false;
                                retries.push(Retry::Refill);
                            }
                            Err(e) => break CloseCause::StoreFailed(e.to_string()),
                        }
                    }
                    Done::Accepted { msg, result } => match result {
                        Ok(accepted) => {
                            self.metrics.upstream(matches!(accepted, Accepted::Duplicate(_)));
                            session.upstream_accepted(&msg.header.id);
                        }
                        // Held and stored later; its ACK waits until then.
                        Err(e) if retryable(&e) => {
                            tracing::debug!(node = %self.node, id = %msg.header.id, error = %e,
                                "upstream message not accepted yet; retrying");
                            retries.push(Retry::Accept(msg));
                        }
                        Err(e) => {
                            tracing::warn!(node = %self.node, id = %msg.header.id, error = %e,
                                "upstream message not accepted; the edge will resend it");
                            session.upstream_failed(&msg.header.id);
                        }
                    },
                    Done::AckMarked { info, id, result } => {
                        match result {
                            Ok(_) => {}
                            Err(e) if retryable(&e) => retries.push(Retry::Record(Record::Ack(id))),
                            Err(e) => tracing::warn!(node = %self.node, %id, error = %e,
                                "ACK not recorded; the message will be resent"),
                        }
                        if let Some(info) = info {
                            self.registry.notify_ack(&self.node, &info);
                        }
                    }
                    Done::Recorded { what, record, result } => match result {
                        Ok(()) => {}
                        Err(e) if retryable(&e) => retries.push(Retry::Record(record)),
                        Err(e) => {
                            tracing::warn!(node = %self.node, what, error = %e, "store update failed");
                        }
                    },
                },
                () = until(retry_at), if retry_at.is_some() => {
                    retry_at = None;
                    self.retry(std::mem::take(&mut retries), ops, &mut maybe_more);
                }
                () = self.entry.wake.notified() => maybe_more = true,
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
        ops: &mut FuturesUnordered<StoreFuture<'static, Done>>,
    ) -> Result<(), CloseCause> {
        let store = &self.store;
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
                TransmitKind::Delivery { seq, attempt, .. } => Record::InFlight { seq, attempt },
                TransmitKind::UpstreamAck => continue,
            };
            ops.push(self.record(record));
        }
        while let Some(event) = session.poll_event() {
            match event {
                SessionEvent::Upstream(msg) => ops.push(self.accept(Box::new(msg))),
                SessionEvent::Acked {
                    id,
                    latency,
                    response,
                    ..
                } => {
                    self.metrics.ack(latency);
                    let fut = store.mark_acked(&self.node, &id);
                    let info = Box::new(AckInfo {
                        id: id.clone(),
                        latency,
                        response: Some(response),
                    });
                    ops.push(Box::pin(async move {
                        Done::AckMarked {
                            info: Some(info),
                            id,
                            result: fut.await,
                        }
                    }));
                }
                // Seen through `close_reason` by the loop.
                SessionEvent::Closed(_) => {}
            }
        }
        Ok(())
    }
}

impl Driver {
    /// Stores an upstream message; the message comes back with a failure, to be tried again.
    fn accept(&self, msg: Box<Message>) -> StoreFuture<'static, Done> {
        // The store takes its own copy: a failed attempt needs the message again.
        let fut = self.store.accept_upstream(&self.node, (*msg).clone());
        Box::pin(async move {
            Done::Accepted {
                msg,
                result: fut.await,
            }
        })
    }

    /// Records a downstream message's progress.
    fn record(&self, record: Record) -> StoreFuture<'static, Done> {
        let store = &self.store;
        let (what, fut) = match &record {
            Record::InFlight { seq, attempt } => (
                "mark_in_flight",
                store.mark_in_flight(&self.node, *seq, *attempt),
            ),
            Record::Remove(seq) => ("remove", store.remove(&self.node, *seq)),
            Record::Ack(id) => {
                let fut = store.mark_acked(&self.node, id);
                let fut: StoreFuture<'static, _> = Box::pin(async move { fut.await.map(|_| ()) });
                ("mark_acked", fut)
            }
        };
        Box::pin(async move {
            Done::Recorded {
                what,
                record,
                result: fut.await,
            }
        })
    }

    /// Submits the failed operations again; `maybe_more` lets the queue be read again.
    fn retry(
        &self,
        retries: Vec<Retry>,
        ops: &mut FuturesUnordered<StoreFuture<'static, Done>>,
        maybe_more: &mut bool,
    ) {
        for retry in retries {
            match retry {
                Retry::Accept(msg) => ops.push(self.accept(msg)),
                Retry::Refill => *maybe_more = true,
                Retry::Record(record) => ops.push(self.record(record)),
            }
        }
    }
}

/// Whether a failed store operation is worth trying again: the disk was full or a commit failed
/// (not a closed store or an unreadable row).
fn retryable(e: &StoreError) -> bool {
    e.is_disk_full() || matches!(e, StoreError::Commit(_) | StoreError::Database(_))
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
