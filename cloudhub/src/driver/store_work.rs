//! A driver's store work: the operations one node session has in flight in the store, the refill
//! of its downstream window, and the failed writes it tries again (`Retry`, `Record`, `Done`).
//!
//! Store operations are issued in order as events come out of the session (the store applies
//! them in call order) and their results are awaited concurrently, so a slow fsync delays acks,
//! not the reading of the connection.
//!
//! A store write that fails (a full disk) is tried again every [`STORE_RETRY`] until it works,
//! rather than closing the session: an upstream message is acknowledged once it is stored (the
//! edge keeps it until then), an ACK or a send is recorded late, and reading the queue resumes,
//! so the node recovers without a reconnect once space returns. The store logs the episode once.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use proto::Message;
use tokio::time::Instant;

use crate::close::CloseCause;
use crate::metrics::Metrics;
use crate::registry::{AckInfo, Registry};
use crate::store::{Accepted, MessageStore, StoreError, StoreFuture};
use crate::upstream::{HandoverError, UpstreamRouter};
use session::node::{Downstream, NodeSession};

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
pub(super) enum Record {
    /// Message `seq` was sent (`attempt`) and waits for its ACK.
    InFlight { seq: u64, attempt: u32 },
    /// No-ACK message `seq` was written: forget it.
    Remove(u64),
    /// Message `id` was acknowledged.
    Ack(String),
}

/// A store result the driver acts on.
pub(super) enum Done {
    Refill {
        asked: usize,
        result: Result<Vec<Downstream>, StoreError>,
    },
    Accepted {
        msg: Box<Message>,
        result: Result<Accepted, StoreError>,
    },
    /// A cloud module answered the hand-over of an upstream message (`upstream.rs`).
    HandedOver {
        msg: Box<Message>,
        module: &'static str,
        result: Result<(), HandoverError>,
    },
    AckMarked {
        info: Option<Box<AckInfo>>,
        id: String,
        result: Result<Option<u64>, StoreError>,
    },
    /// The store settled an error answer: `Some(seq)` if it failed an open message.
    FailMarked {
        info: Box<AckInfo>,
        result: Result<Option<u64>, StoreError>,
    },
    Recorded {
        what: &'static str,
        record: Record,
        result: Result<(), StoreError>,
    },
}

/// One session's store operations in flight and to retry.
pub(super) struct StoreWork {
    store: Arc<dyn MessageStore>,
    router: Arc<UpstreamRouter>,
    node: String,
    /// Operations in flight, in the order they were issued.
    pub(super) ops: FuturesUnordered<StoreFuture<'static, Done>>,
    /// Operations that failed, tried again at `retry_at`.
    retries: Vec<Retry>,
    pub(super) retry_at: Option<Instant>,
    /// Highest store sequence handed to the session: refills continue after it.
    last_fed: u64,
    refilling: bool,
    /// Ids cancelled while a refill was under way: that refill may have read them before the
    /// store's cancel, so they are taken out of the session again once it is queued.
    cancelled_during_refill: Vec<String>,
    /// Whether the queue may hold more than the session has been given.
    pub(super) maybe_more: bool,
}

impl StoreWork {
    pub(super) fn new(
        store: Arc<dyn MessageStore>,
        router: Arc<UpstreamRouter>,
        node: String,
    ) -> Self {
        Self {
            store,
            router,
            node,
            ops: FuturesUnordered::new(),
            retries: Vec::new(),
            retry_at: None,
            last_fed: 0,
            refilling: false,
            cancelled_during_refill: Vec::new(),
            maybe_more: true,
        }
    }

    /// Arms the retry timer for failed operations (leaving the oldest upstream messages beyond
    /// [`MAX_HELD_UPSTREAM`] to the edge) and reads the queue when the session wants more.
    pub(super) fn plan(&mut self, session: &mut NodeSession) {
        if !self.retries.is_empty() && self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + STORE_RETRY);
            let held = self
                .retries
                .iter()
                .filter(|r| matches!(r, Retry::Accept(_)))
                .count();
            if held > MAX_HELD_UPSTREAM {
                // The oldest are left to the edge, which resends them after a reconnect.
                let mut excess = held - MAX_HELD_UPSTREAM;
                self.retries.retain(|r| match r {
                    Retry::Accept(msg) if excess > 0 => {
                        excess -= 1;
                        session.upstream_failed(&msg.header.id);
                        false
                    }
                    _ => true,
                });
            }
        }
        if !self.refilling && self.maybe_more && session.wants() > 0 {
            self.refilling = true;
            let asked = session.wants();
            let fut = self.store.pending(&self.node, self.last_fed, asked);
            self.ops.push(Box::pin(async move {
                Done::Refill {
                    asked,
                    result: fut.await,
                }
            }));
        }
    }

    /// Acts on a finished operation: feeds the session, notifies ACK waiters, or keeps the
    /// operation for a retry. A store that cannot go on ends the session.
    pub(super) fn finished(
        &mut self,
        done: Done,
        session: &mut NodeSession,
        metrics: &Metrics,
        registry: &Registry,
    ) -> Result<(), CloseCause> {
        let node = &self.node;
        match done {
            Done::Refill { asked, result } => {
                self.refilling = false;
                match result {
                    Ok(downs) => {
                        self.maybe_more = downs.len() >= asked;
                        if let Some(last) = downs.last() {
                            self.last_fed = self.last_fed.max(last.seq);
                        }
                        let now = Instant::now().into_std();
                        session.queue(now, downs);
                        for id in self.cancelled_during_refill.drain(..) {
                            session.cancel(now, &id);
                        }
                    }
                    Err(e) if retryable(&e) => {
                        self.maybe_more = false;
                        self.retries.push(Retry::Refill);
                    }
                    Err(e) => return Err(CloseCause::StoreFailed(e.to_string())),
                }
            }
            Done::Accepted { msg, result } => match result {
                Ok(accepted) => {
                    metrics.upstream(matches!(accepted, Accepted::Duplicate(_)));
                    session.upstream_accepted(&msg.header.id);
                }
                // Held and stored later; its ACK waits until then.
                Err(e) if retryable(&e) => {
                    tracing::debug!(%node, id = %msg.header.id, error = %e,
                        "upstream message not accepted yet; retrying");
                    self.retries.push(Retry::Accept(msg));
                }
                Err(e) => {
                    tracing::warn!(%node, id = %msg.header.id, error = %e,
                        "upstream message not accepted; the edge will resend it");
                    session.upstream_failed(&msg.header.id);
                }
            },
            Done::HandedOver {
                msg,
                module,
                result,
            } => match result {
                Ok(()) => {
                    metrics.upstream_routed(module);
                    session.upstream_accepted(&msg.header.id);
                }
                Err(HandoverError::Retry(why)) => {
                    tracing::debug!(%node, id = %msg.header.id, module, reason = %why,
                        "cloud module did not take the upstream message yet; retrying");
                    self.retries.push(Retry::Accept(msg));
                }
                Err(HandoverError::Gone(why)) => {
                    tracing::info!(%node, id = %msg.header.id, module, reason = %why,
                        "cloud module gone; the upstream message takes the application path");
                    metrics.upstream_unrouted(module);
                    self.store_upstream(msg);
                }
            },
            Done::AckMarked { info, id, result } => {
                match result {
                    Ok(_) => {}
                    Err(e) if retryable(&e) => self.retries.push(Retry::Record(Record::Ack(id))),
                    Err(e) => tracing::warn!(%node, %id, error = %e,
                        "ACK not recorded; the message will be resent"),
                }
                if let Some(info) = info {
                    registry.notify_ack(node, &info);
                }
            }
            Done::FailMarked { info, result } => match result {
                Ok(Some(_)) => {
                    metrics.refused();
                    registry.notify_ack(node, &info);
                    // The resource's later messages may now be in the store's next refill.
                    self.maybe_more = true;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%node, id = %info.id, error = %e,
                    "failure not recorded; the message will be resent"),
            },
            Done::Recorded {
                what,
                record,
                result,
            } => match result {
                Ok(()) => {}
                Err(e) if retryable(&e) => self.retries.push(Retry::Record(record)),
                Err(e) => tracing::warn!(%node, what, error = %e, "store update failed"),
            },
        }
        Ok(())
    }

    /// Takes messages the operator cancelled (already cancelled in the store) out of the
    /// session, and out of the refill under way, if any.
    pub(super) fn cancel(&mut self, session: &mut NodeSession, ids: Vec<String>) {
        let now = Instant::now().into_std();
        for id in ids {
            session.cancel(now, &id);
            if self.refilling {
                self.cancelled_during_refill.push(id);
            }
        }
    }

    /// Submits the failed operations again and lets the queue be read again.
    pub(super) fn retry_now(&mut self, metrics: &Metrics) {
        self.retry_at = None;
        for retry in std::mem::take(&mut self.retries) {
            match retry {
                Retry::Accept(msg) => self.accept(msg, metrics),
                Retry::Refill => self.maybe_more = true,
                Retry::Record(record) => self.record(record),
            }
        }
    }

    /// Hands an upstream message to its cloud module (`upstream.rs`), or stores it on the
    /// application path when that module is not registered.
    pub(super) fn accept(&mut self, msg: Box<Message>, metrics: &Metrics) {
        match self.router.hand_over(&self.node, &msg) {
            Ok((module, fut)) => self.ops.push(Box::pin(async move {
                Done::HandedOver {
                    msg,
                    module,
                    result: fut.await,
                }
            })),
            Err(missing) => {
                if let Some(module) = missing {
                    metrics.upstream_unrouted(module);
                }
                self.store_upstream(msg);
            }
        }
    }

    /// Stores an upstream message; the message comes back with a failure, to be tried again.
    fn store_upstream(&mut self, msg: Box<Message>) {
        // The store takes its own copy: a failed attempt needs the message again.
        let fut = self.store.accept_upstream(&self.node, (*msg).clone());
        self.ops.push(Box::pin(async move {
            Done::Accepted {
                msg,
                result: fut.await,
            }
        }));
    }

    /// Records an ACK and then tells the ACK waiters (`info`).
    pub(super) fn ack(&mut self, id: String, info: Box<AckInfo>) {
        let fut = self.store.mark_acked(&self.node, &id);
        self.ops.push(Box::pin(async move {
            Done::AckMarked {
                info: Some(info),
                id,
                result: fut.await,
            }
        }));
    }

    /// Records that the edge refused message `id` (an error answer) and then tells the ACK
    /// waiters, if it was open.
    pub(super) fn fail(&mut self, id: String, reason: String) {
        let fut = self.store.mark_failed(&self.node, &id, &reason);
        let info = Box::new(AckInfo {
            id,
            latency: None,
            response: None,
            failed: Some(reason),
            cancelled: false,
        });
        self.ops.push(Box::pin(async move {
            let result = fut.await;
            Done::FailMarked { info, result }
        }));
    }

    /// Records a downstream message's progress.
    pub(super) fn record(&mut self, record: Record) {
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
        self.ops.push(Box::pin(async move {
            Done::Recorded {
                what,
                record,
                result: fut.await,
            }
        }));
    }

    /// Finishes the operations still pending when the session has ended (they are durable or
    /// not regardless), so ACK waiters hear about every recorded ACK.
    pub(super) async fn drain(&mut self, registry: &Registry) {
        while let Some(done) = self.ops.next().await {
            match done {
                Done::AckMarked {
                    info: Some(info), ..
                }
                | Done::FailMarked {
                    info,
                    result: Ok(Some(_)),
                } => registry.notify_ack(&self.node, &info),
                _ => {}
            }
        }
    }
}

/// Whether a failed store operation is worth trying again: the disk was full or a commit failed
/// (not a closed store or an unreadable row).
fn retryable(e: &StoreError) -> bool {
    e.is_disk_full() || matches!(e, StoreError::Commit(_) | StoreError::Database(_))
}
