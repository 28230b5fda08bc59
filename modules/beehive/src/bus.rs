//! The [`Bus`]: KubeEdge's "channel context" without its hazards (PROTOCOL.md B§10.3, W13).
//! Unicast and group sends wait for room (back-pressure) and never drop a message silently;
//! unknown names are typed errors; group sends keep each member's order and spawn no task; sync
//! requests register their waiter before sending, and responses go through a `oneshot`, so an
//! early response is kept. The routing tables are fixed when the hive starts, so sends take no lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proto::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout_at};

use crate::error::{GroupSendError, SendError, SyncError};
use crate::waiters::{Delivery, RegisterRefused, WaiterGuard, Waiters};

/// The timeout [`Bus::send_sync`] uses when given zero, as KubeEdge does for a timeout ≤ 0.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// A cheap, cloneable handle to the hive's message bus. Every module gets one in its
/// [`ModuleContext`](crate::ModuleContext); code outside the hive gets one from
/// [`Hive::bus`](crate::Hive::bus).
#[derive(Debug, Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Inbox of every started module, by name.
    inboxes: HashMap<String, mpsc::Sender<Message>>,
    /// Members of every non-empty group with their inboxes, in registration order (the fan-out
    /// order).
    groups: HashMap<String, Vec<(String, mpsc::Sender<Message>)>>,
    /// Pending sync requests.
    waiters: Arc<Waiters>,
    /// Observability counters.
    counters: Counters,
}

/// Atomic counters behind [`BusStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    enqueued: AtomicU64,
    sync_requests: AtomicU64,
    sync_timeouts: AtomicU64,
    responses_delivered: AtomicU64,
    late_responses: AtomicU64,
    orphan_responses: AtomicU64,
    undelivered_at_stop: AtomicU64,
}

/// A snapshot of the bus counters, for metrics and tests. All counts since the hive started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusStats {
    /// Messages put into an inbox: unicast, each group member's copy, and sync requests.
    pub enqueued: u64,
    /// Sync requests enqueued to their target.
    pub sync_requests: u64,
    /// Sync requests that gave up at their deadline (inbox full, or no response in time).
    pub sync_timeouts: u64,
    /// Responses handed to a waiting requester.
    pub responses_delivered: u64,
    /// Responses that arrived after their requester gave up.
    pub late_responses: u64,
    /// Responses for which no requester was known.
    pub orphan_responses: u64,
    /// Messages still queued in an inbox when its module stopped (not processed, but counted
    /// and logged rather than dropped silently).
    pub undelivered_at_stop: u64,
}

/// What [`Bus::send_resp`] did with a response. Only `Delivered` reached a requester; the others
/// hand the response back. None is a failure of the responder, so this is an outcome to inspect
/// rather than an error to propagate with `?`.
#[derive(Debug)]
#[must_use = "an undelivered response is handed back: route it on, or drop it knowingly"]
#[non_exhaustive]
pub enum RespOutcome {
    /// The waiting requester got it.
    Delivered,
    /// The request it answers gave up waiting (timed out): the responder is slower than the
    /// requester's timeout. Counted in `late_responses`; logged once per request id.
    Late {
        /// The id of the request.
        parent_id: String,
        /// The response.
        resp: Box<Message>,
    },
    /// No request waits for it and none recently gave up: it answers an asynchronous message
    /// (an ACK), or a request forgotten long ago. Counted in `orphan_responses`; logged once per
    /// request id.
    NoWaiter {
        /// The id the response names as its parent.
        parent_id: String,
        /// The response.
        resp: Box<Message>,
    },
    /// The message has no parent id, so it answers nothing (the caller's bug); not counted.
    NotAResponse {
        /// The message.
        resp: Box<Message>,
    },
}

impl RespOutcome {
    /// Whether a waiting requester got the response.
    pub fn is_delivered(&self) -> bool {
        matches!(self, Self::Delivered)
    }

    /// The response if nobody took it, to route on.
    pub fn into_undelivered(self) -> Option<Message> {
        match self {
            Self::Delivered => None,
            Self::Late { resp, .. } | Self::NoWaiter { resp, .. } | Self::NotAResponse { resp } => {
                Some(*resp)
            }
        }
    }
}

impl Bus {
    /// A bus over fixed inboxes and groups; built by the hive when it starts.
    pub(crate) fn new(
        inboxes: HashMap<String, mpsc::Sender<Message>>,
        groups: HashMap<String, Vec<(String, mpsc::Sender<Message>)>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                inboxes,
                groups,
                waiters: Arc::new(Waiters::default()),
                counters: Counters::default(),
            }),
        }
    }

    /// Sends `msg` to the inbox of `module`, waiting while it is full (back-pressure).
    ///
    /// Unknown or stopped modules are errors that hand the message back. Sending to one's own
    /// full inbox waits forever, as any bounded queue would. If the returned future is dropped
    /// before it completes, the message is dropped with it and not sent.
    pub async fn send(&self, module: &str, msg: Message) -> Result<(), SendError> {
        let Some(inbox) = self.inner.inboxes.get(module) else {
            return Err(SendError::UnknownModule {
                module: module.to_owned(),
                msg: Box::new(msg),
            });
        };
        match inbox.send(msg).await {
            Ok(()) => {
                bump(&self.inner.counters.enqueued);
                Ok(())
            }
            Err(mpsc::error::SendError(msg)) => Err(SendError::Stopped {
                module: module.to_owned(),
                msg: Box::new(msg),
            }),
        }
    }

    /// Sends a copy of `msg` to every member of `group`, in registration order, and returns how
    /// many got it.
    ///
    /// Each member's send is awaited in turn, so every member sees one sender's messages in the
    /// order they were sent, and no task is spawned (KubeEdge spawned one per message per member,
    /// unbounded and unordered). The cost is that a full member delays the members after it; the
    /// caller waits for the slowest member either way, and the alternative, a forwarder queue per
    /// member, would either be unbounded or wait just the same. Stopped members are skipped and
    /// reported after the live ones were served.
    pub async fn send_to_group(&self, group: &str, msg: Message) -> Result<usize, GroupSendError> {
        let Some(members) = self.inner.groups.get(group) else {
            return Err(GroupSendError::UnknownGroup {
                group: group.to_owned(),
                msg: Box::new(msg),
            });
        };
        let mut delivered = 0;
        let mut stopped = Vec::new();
        for (name, inbox) in members {
            if inbox.send(msg.clone()).await.is_ok() {
                bump(&self.inner.counters.enqueued);
                delivered += 1;
            } else {
                stopped.push(name.clone());
            }
        }
        if stopped.is_empty() {
            Ok(delivered)
        } else {
            Err(GroupSendError::MembersStopped {
                group: group.to_owned(),
                delivered,
                stopped,
            })
        }
    }

    /// Sends a request to `module` and waits for the response whose parent id is the request's id.
    ///
    /// Sets `msg.header.sync`. A zero `timeout` means [`DEFAULT_SYNC_TIMEOUT`]. One deadline
    /// bounds both the wait for inbox room and the wait for the response. The waiter is
    /// registered before the request is enqueued, so a response can never arrive too early (even
    /// one arriving before the request is enqueued is returned), and it is removed on every exit
    /// path, including the caller dropping this future.
    pub async fn send_sync(
        &self,
        module: &str,
        mut msg: Message,
        timeout: Duration,
    ) -> Result<Message, SyncError> {
        let timeout = if timeout.is_zero() {
            DEFAULT_SYNC_TIMEOUT
        } else {
            timeout
        };
        let deadline = Instant::now() + timeout;
        let Some(inbox) = self.inner.inboxes.get(module) else {
            return Err(SyncError::UnknownModule {
                module: module.to_owned(),
            });
        };
        if msg.header.id.is_empty() {
            return Err(SyncError::MissingId);
        }
        msg.header.sync = true;
        let (guard, mut response) = match self.inner.waiters.register(&msg.header.id) {
            Ok(registered) => registered,
            Err(RegisterRefused::Duplicate) => {
                return Err(SyncError::DuplicateId { id: msg.header.id });
            }
            Err(RegisterRefused::Closed) => return Err(SyncError::ShuttingDown),
        };
        match timeout_at(deadline, inbox.send(msg)).await {
            Ok(Ok(())) => {
                bump(&self.inner.counters.enqueued);
                bump(&self.inner.counters.sync_requests);
            }
            Ok(Err(_)) => {
                if let Some(resp) = unregister(guard, &mut response) {
                    return Ok(resp);
                }
                return Err(SyncError::Stopped {
                    module: module.to_owned(),
                });
            }
            Err(_elapsed) => {
                if let Some(resp) = unregister(guard, &mut response) {
                    return Ok(resp);
                }
                bump(&self.inner.counters.sync_timeouts);
                return Err(SyncError::SendTimeout {
                    module: module.to_owned(),
                    timeout,
                });
            }
        }
        match timeout_at(deadline, &mut response).await {
            Ok(Ok(resp)) => Ok(resp),
            // The sender is dropped without a response only when the table closes at shutdown.
            Ok(Err(_)) => Err(SyncError::ShuttingDown),
            Err(_elapsed) => {
                if let Some(resp) = unregister(guard, &mut response) {
                    return Ok(resp);
                }
                bump(&self.inner.counters.sync_timeouts);
                Err(SyncError::ResponseTimeout {
                    module: module.to_owned(),
                    timeout,
                })
            }
        }
    }

    /// Delivers a response to the [`send_sync`](Self::send_sync) waiting on its parent id.
    ///
    /// Never blocks and never loses a response because its requester was not "ready": the waiter
    /// is a one-slot channel. A response that finds no waiter is counted, logged once per request
    /// id (a late one at `warn`; an orphan at `debug`, since hubs offer every response here
    /// first) and handed back, so the caller can route it on as an ordinary message, as
    /// KubeEdge's edgehub does with responses that answer no sync request.
    pub fn send_resp(&self, resp: Message) -> RespOutcome {
        if resp.header.parent_id.is_empty() {
            return RespOutcome::NotAResponse {
                resp: Box::new(resp),
            };
        }
        let parent_id = resp.header.parent_id.clone();
        let counters = &self.inner.counters;
        match self.inner.waiters.deliver(&parent_id, resp) {
            Delivery::Delivered => {
                bump(&counters.responses_delivered);
                RespOutcome::Delivered
            }
            Delivery::Late { first, resp } => {
                bump(&counters.late_responses);
                if first {
                    tracing::warn!(parent_id, "response arrived after its requester gave up");
                }
                RespOutcome::Late {
                    parent_id,
                    resp: Box::new(resp),
                }
            }
            Delivery::Orphan { first, resp } => {
                bump(&counters.orphan_responses);
                if first {
                    tracing::debug!(parent_id, "response for a request nobody waits on");
                }
                RespOutcome::NoWaiter {
                    parent_id,
                    resp: Box::new(resp),
                }
            }
        }
    }

    /// Names of the started modules, sorted.
    pub fn modules(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.inner.inboxes.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Members of `group` in fan-out order; empty for an unknown group.
    pub fn group_members(&self, group: &str) -> Vec<&str> {
        self.inner
            .groups
            .get(group)
            .map_or_else(Vec::new, |members| {
                members.iter().map(|(name, _)| name.as_str()).collect()
            })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> BusStats {
        let c = &self.inner.counters;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        BusStats {
            enqueued: load(&c.enqueued),
            sync_requests: load(&c.sync_requests),
            sync_timeouts: load(&c.sync_timeouts),
            responses_delivered: load(&c.responses_delivered),
            late_responses: load(&c.late_responses),
            orphan_responses: load(&c.orphan_responses),
            undelivered_at_stop: load(&c.undelivered_at_stop),
        }
    }

    /// Number of sync requests currently waiting for a response.
    pub fn pending_sync(&self) -> usize {
        self.inner.waiters.len()
    }

    /// Ends every pending sync wait with [`SyncError::ShuttingDown`] and refuses new ones.
    pub(crate) fn close_sync(&self) {
        self.inner.waiters.close();
    }

    /// Counts `n` messages left unprocessed in a stopped module's inbox.
    pub(crate) fn count_undelivered(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.inner
            .counters
            .undelivered_at_stop
            .fetch_add(n, Ordering::Relaxed);
    }
}

/// Removes a sync waiter that is giving up, and returns a response that reached it before the
/// removal: it answered the request after all, so it is returned rather than lost.
fn unregister(guard: WaiterGuard, response: &mut oneshot::Receiver<Message>) -> Option<Message> {
    drop(guard);
    response.try_recv().ok()
}

/// Adds one to a counter; counters are statistics, so relaxed ordering suffices.
fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
