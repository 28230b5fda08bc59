//! The cloud's durable message store: per-node downstream queues (pending → in flight → acked, or
//! failed when the edge answers with an error, or cancelled by the operator),
//! the log of accepted upstream messages (which is also the per-node deduplication window), and
//! the registry of known nodes.
//!
//! It is a trait, [`MessageStore`], so that a distributed engine (NATS JetStream: streams for
//! the queues and the upstream log, KV for nodes) can replace the embedded
//! [`sqlite::SqliteStore`] when several cloudcores share nodes (DESIGN.md §4). Methods return
//! boxed futures so the trait stays object-safe (`Arc<dyn MessageStore>`) and async engines fit.
//!
//! Ordering contract: an operation is submitted when its method is called, not when its future
//! is first polled, and operations take effect in call order (a later `pending` sees an earlier
//! `mark_acked`; upstream messages of one node are logged in the order they were handed in).
//! The futures borrow nothing, so a driver may call in order and await elsewhere. Upstream
//! records are numbered and published in commit order, so a consumer resuming after sequence
//! `n` misses nothing.

pub mod jetstream;
pub mod nats_server;
pub mod sqlite;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use proto::Message;
use tokio::sync::broadcast;

use session::node::Downstream;

/// A store operation in progress.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Durable state of the cloud hub. See the module docs for the ordering contract.
pub trait MessageStore: Send + Sync + std::fmt::Debug + 'static {
    /// Records that `node` connected (creating it on first contact): it becomes known, so
    /// messages can be queued for it while it is offline.
    fn register_node(&self, node: NodeRecord) -> StoreFuture<'static, Result<(), StoreError>>;

    /// Every known node.
    fn nodes(&self) -> StoreFuture<'static, Result<Vec<NodeRecord>, StoreError>>;

    /// One known node, or `None` if it never connected.
    fn node(&self, node: &str) -> StoreFuture<'static, Result<Option<NodeRecord>, StoreError>>;

    /// Durably queues `msg` for `node`. A message whose id is already queued (or recently acked)
    /// for the node is not queued twice: the first copy's sequence number is returned with
    /// `duplicate: true`, so a client may retry a POST safely.
    fn enqueue(
        &self,
        node: &str,
        msg: Message,
        needs_ack: bool,
    ) -> StoreFuture<'static, Result<Enqueued, EnqueueError>>;

    /// Queues `msg` for `node` *in place of* every open (pending or in-flight) message of the
    /// node with the same route source, group and resource, in one all-or-nothing step: per node
    /// and object only the newest version is worth sending (edgecontroller's object sync). The
    /// replaced messages leave the queue as if they had never been queued and their ids are
    /// returned. A session that already holds a replaced message in memory may still send it
    /// once; the store forgets its ACK.
    fn enqueue_superseding(
        &self,
        node: &str,
        msg: Message,
        needs_ack: bool,
    ) -> StoreFuture<'static, Result<Superseded, EnqueueError>>;

    /// Up to `limit` messages for `node` not yet acked (pending or in flight) with a sequence
    /// number above `after`, in queue order.
    fn pending(
        &self,
        node: &str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'static, Result<Vec<Downstream>, StoreError>>;

    /// Message `seq` was written to the node (attempt `attempt`) and now waits for its ACK.
    fn mark_in_flight(
        &self,
        node: &str,
        seq: u64,
        attempt: u32,
    ) -> StoreFuture<'static, Result<(), StoreError>>;

    /// The node acknowledged message `id`; returns its sequence number if it was still open
    /// (`None` for an unknown or already acked id).
    fn mark_acked(
        &self,
        node: &str,
        id: &str,
    ) -> StoreFuture<'static, Result<Option<u64>, StoreError>>;

    /// The node answered message `id`, which awaits its ACK, with an error (it could not deliver
    /// it): the message leaves the queue as failed, keeping `reason`. Returns its sequence number
    /// if it was open and needs an ACK (`None` otherwise: nothing changes).
    fn mark_failed(
        &self,
        node: &str,
        id: &str,
        reason: &str,
    ) -> StoreFuture<'static, Result<Option<u64>, StoreError>>;

    /// The operator cancels message `id` of `node`: a pending or in-flight message leaves the
    /// queue for good as cancelled (kept like an acked one, for status queries). A message
    /// already acked, failed or cancelled is left as it is and its state returned.
    fn cancel(&self, node: &str, id: &str) -> StoreFuture<'static, Result<Cancelled, StoreError>>;

    /// Forgets message `seq` of `node`: a no-ACK message once written.
    fn remove(&self, node: &str, seq: u64) -> StoreFuture<'static, Result<(), StoreError>>;

    /// Where message `id` for `node` stands, if the store still knows it.
    fn message_state(
        &self,
        node: &str,
        id: &str,
    ) -> StoreFuture<'static, Result<Option<MessageState>, StoreError>>;

    /// Open (pending + in flight) messages of every node that has any.
    fn queue_depths(&self) -> StoreFuture<'static, Result<Vec<(String, QueueDepth)>, StoreError>>;

    /// Durably accepts upstream message `msg` from `node`, once per id within the node's
    /// deduplication window. A new record is published to [`Self::subscribe_upstream`] after it
    /// is durable.
    fn accept_upstream(
        &self,
        node: &str,
        msg: Message,
    ) -> StoreFuture<'static, Result<Accepted, StoreError>>;

    /// Up to `limit` upstream records with a sequence number above `after`, oldest first.
    fn upstream_since(
        &self,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'static, Result<Vec<Arc<UpstreamRecord>>, StoreError>>;

    /// A live feed of newly accepted upstream records, in sequence order. A receiver that lags
    /// catches up with [`Self::upstream_since`].
    fn subscribe_upstream(&self) -> broadcast::Receiver<Arc<UpstreamRecord>>;
}

/// A node the cloud has seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Node id (the certificate's `system:node:<id>`).
    pub id: String,
    /// Project id the node last claimed.
    pub project: String,
    /// First connection, Unix milliseconds.
    pub first_seen_ms: i64,
    /// Latest connection, Unix milliseconds.
    pub last_seen_ms: i64,
}

/// Result of [`MessageStore::enqueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The message's sequence number in the node's queue.
    pub seq: u64,
    /// Whether a message with that id was already queued (nothing new was stored).
    pub duplicate: bool,
}

/// Result of [`MessageStore::enqueue_superseding`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superseded {
    /// The new message's place.
    pub enqueued: Enqueued,
    /// Ids of the open messages it replaced.
    pub replaced: Vec<String>,
}

/// Result of [`MessageStore::accept_upstream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// First time: stored and published under this sequence number.
    New(u64),
    /// Already accepted (a resend): nothing stored or published again.
    Duplicate(u64),
}

/// Where a downstream message stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageState {
    /// Queued, not written yet (or written by a session that ended before an ACK).
    Pending,
    /// Written, waiting for the ACK.
    InFlight {
        /// Sends so far in the current session.
        attempts: u32,
    },
    /// Acknowledged by the edge.
    Acked {
        /// When, in Unix milliseconds.
        at_ms: i64,
    },
    /// The edge answered it with an error (it could not deliver it): out of the queue, never
    /// resent.
    Failed {
        /// When, in Unix milliseconds.
        at_ms: i64,
        /// The edge's reason.
        reason: String,
    },
    /// The operator cancelled it ([`MessageStore::cancel`]): out of the queue, never resent.
    Cancelled {
        /// When, in Unix milliseconds.
        at_ms: i64,
    },
}

/// Result of [`MessageStore::cancel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// It was open (pending or in flight) and is cancelled now.
    Now {
        /// Its sequence number.
        seq: u64,
    },
    /// It had already ended; nothing changed. Its state ([`MessageState::Cancelled`] for a
    /// repeated cancel).
    Already(MessageState),
    /// No such message for the node (never queued, or pruned long after it ended).
    Unknown,
}

/// Open messages of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Queued and not yet written in the current session.
    pub pending: u64,
    /// Written and waiting for an ACK.
    pub in_flight: u64,
}

impl QueueDepth {
    /// Pending plus in flight: what counts against the queue bound.
    pub fn total(&self) -> u64 {
        self.pending + self.in_flight
    }
}

/// One accepted upstream message.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamRecord {
    /// Position in the upstream log (strictly increasing, never reused).
    pub seq: u64,
    /// The node that sent it.
    pub node: String,
    /// When it was accepted, Unix milliseconds.
    pub accepted_ms: i64,
    /// The message as the edge sent it.
    pub message: Message,
}

/// Failure of a store operation other than [`MessageStore::enqueue`]'s own refusals.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (I/O, disk full, locked by another process). A local fault: the
    /// operation did not happen; retry, and check the disk and the `queue.path` setting.
    #[error("message store database: {0}")]
    Database(#[from] rusqlite::Error),
    /// A stored row could not be read back (corruption, or a file from an incompatible
    /// version). Move the file aside.
    #[error("message store holds an unreadable row: {0}")]
    Corrupt(String),
    /// The batch this operation was committed with failed (I/O); the operation did not
    /// happen. A local fault: retry.
    #[error("message store commit failed: {0}")]
    Commit(String),
    /// The disk holding the store is full: the operation did not happen (it was rolled back
    /// whole). Retry once space is freed; the API answers 507 meanwhile.
    #[error("message store: the disk is full: {0}")]
    DiskFull(String),
    /// The distributed store (NATS JetStream) failed or could not be reached: the operation
    /// may not have happened. Retry; check the server (`cloudhub.queue.jetstream.url`) and its
    /// JetStream state.
    #[error("message store (JetStream): {0}")]
    Engine(String),
    /// The store has shut down (the process is stopping), or its writer could not start a
    /// transaction for this operation.
    #[error("message store is closed")]
    Closed,
}

impl StoreError {
    /// The disk holding the store is full (`SQLITE_FULL`), whether the failing statement or the
    /// commit said so.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::DiskFull(_) => true,
            Self::Database(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            _ => false,
        }
    }
}

/// Why [`MessageStore::enqueue`] refused a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The node already has `limit` open messages. Nothing was stored: the caller should
    /// retry later (the API answers 503); the node is probably offline or not acking.
    #[error("queue for node {node} is full ({limit} messages waiting)")]
    QueueFull {
        /// The node.
        node: String,
        /// The per-node bound.
        limit: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
