//! The [`MessageStore`] on NATS JetStream, for several cloudcores sharing one fleet (scale-out
//! mode, docs/scale-out.md). Every instance connected to the same JetStream sees the same
//! queues, upstream log and node records.
//!
//! Layout (names start with the configured prefix, `causeway` by default):
//! - KV bucket `<prefix>_queues`: per node, key `q.<node>` holds the queue's index (next
//!   sequence number, each open message's state, and ended messages kept for status queries and
//!   duplicate POSTs for `acked_retention`); key `b.<node>.<nuid>` holds one message's body.
//!   Every change of a node's index is a compare-and-set on the revision read (retried on a
//!   conflict), so instances enqueueing for the same node at once never lose or reorder each
//!   other's writes, and the queue bound and the deduplication of ids hold across instances.
//! - Stream `<prefix>_upstream` on subjects `<prefix>.up.<node>`: the upstream log. Its sequence
//!   is the log's sequence; `max_msgs_per_subject` keeps the newest `upstream_window` records per
//!   node; deduplication uses `Nats-Msg-Id` (node and message id) within the stream's duplicate
//!   window, a time (`upstream_dedup_window`), where SQLite's is a count of records.
//! - KV bucket `<prefix>_nodes`: one node record per key.
//!
//! **Durability.** Every bucket and stream uses file storage with `replicas` copies, and the
//! server must run with `jetstream { sync_interval: always }`: JetStream then fsyncs each write
//! before it acknowledges it (its default syncs every two minutes, so an acknowledged write can
//! be lost to a power cut, which is what Jepsen found). With 3 replicas an acknowledgement means
//! a quorum holds the write. An operation's future resolves after JetStream acknowledged it.
//!
//! **Ordering.** Operations are handed at call time to one of a few lanes (by node), each a task
//! running its operations one after the other, so a node's operations take effect in call
//! order, as the trait requires; different nodes proceed in parallel.
//!
//! Keys and subjects carry the node id hex-encoded, so any id is a valid key.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, kv, stream};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures_util::StreamExt;
use proto::Message;
use proto::row::HeadRow;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    Accepted, Cancelled, EnqueueError, Enqueued, MessageState, MessageStore, NodeRecord,
    QueueDepth, StoreError, StoreFuture, Superseded, UpstreamRecord,
};
use session::node::Downstream;

/// Lanes operations run in (a node's operations always share one).
const LANES: usize = 8;
/// Capacity of the live upstream feed; slower subscribers catch up with `upstream_since`.
const UPSTREAM_FEED: usize = 4096;
/// Compare-and-set attempts on a node's index before giving up (only other instances writing
/// the same node at the same moment cause retries).
const CAS_ATTEMPTS: usize = 64;

/// Settings of [`JetStreamStore`] (`cloudhub.queue` with `store: jetstream`).
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// NATS server URL(s), comma-separated (`nats://127.0.0.1:4222`).
    pub url: String,
    /// Prefix of the buckets, stream and subjects; instances sharing a fleet use the same one.
    /// Default `causeway`.
    pub prefix: String,
    /// Copies JetStream keeps of every write (1 for one server, 3 for a cluster). Default 1.
    pub replicas: usize,
    /// Most open messages per node; beyond it `enqueue` refuses. Default 10,000.
    pub queue_limit: u64,
    /// Upstream records kept per node (SSE replay). Default 10,000.
    pub upstream_window: u64,
    /// How long an upstream id is remembered for deduplication. Default 10 minutes: far longer
    /// than an edge takes to resend its outbox after a reconnect.
    pub upstream_dedup_window: Duration,
    /// How long ended (acked, failed, cancelled) messages are kept for status queries and
    /// duplicate POSTs. Default 10 minutes.
    pub acked_retention: Duration,
}

impl JetStreamConfig {
    /// Defaults for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "causeway".into(),
            replicas: 1,
            queue_limit: 10_000,
            upstream_window: 10_000,
            upstream_dedup_window: Duration::from_secs(600),
            acked_retention: Duration::from_secs(600),
        }
    }
}

/// The JetStream-backed [`MessageStore`]. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct JetStreamStore {
    lanes: Vec<mpsc::UnboundedSender<Job>>,
    feed: broadcast::Sender<Arc<UpstreamRecord>>,
    feeder: tokio::task::JoinHandle<()>,
}

type Job = Box<dyn FnOnce(Arc<Shared>) -> StoreFuture<'static, ()> + Send>;

/// What every lane uses.
#[derive(Debug)]
struct Shared {
    js: jetstream::Context,
    queues: kv::Store,
    nodes: kv::Store,
    upstream: stream::Stream,
    config: JetStreamConfig,
}

/// A node's queue index (the value of `q.<node>`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct QueueIndex {
    next_seq: u64,
    open: Vec<OpenEntry>,
    ended: Vec<EndedEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpenEntry {
    seq: u64,
    id: String,
    needs_ack: bool,
    /// 0 while pending; the send count once in flight.
    attempts: u32,
    in_flight: bool,
    source: String,
    group: String,
    resource: String,
    body: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EndedEntry {
    seq: u64,
    id: String,
    at_ms: i64,
    /// `acked`, `failed` or `cancelled`.
    state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    reason: String,
}

/// A stored message: KubeEdge JSON head, content kind and content (base64).
#[derive(Debug, Serialize, Deserialize)]
struct Body {
    head: String,
    kind: i64,
    content: String,
}

/// An upstream record's payload.
#[derive(Debug, Serialize, Deserialize)]
struct UpstreamBody {
    node: String,
    accepted_ms: i64,
    #[serde(flatten)]
    body: Body,
}

impl JetStreamStore {
    /// Connects, creates the buckets and stream if missing, and starts the lanes and the live
    /// upstream feed (which follows every instance's records).
    pub async fn open(config: JetStreamConfig) -> Result<Self, StoreError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(10))
            .retry_on_initial_connect()
            .connect(config.url.as_str())
            .await
            .map_err(engine)?;
        let js = jetstream::new(client);
        let bucket = |name: &str| kv::Config {
            bucket: format!("{}_{name}", config.prefix),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        };
        let queues = js
            .create_or_update_key_value(bucket("queues"))
            .await
            .map_err(engine)?;
        let nodes = js
            .create_or_update_key_value(bucket("nodes"))
            .await
            .map_err(engine)?;
        let upstream = js
            .create_or_update_stream(stream::Config {
                name: format!("{}_upstream", config.prefix),
                subjects: vec![format!("{}.up.*", config.prefix)],
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                max_messages_per_subject: i64::try_from(config.upstream_window.max(1))
                    .unwrap_or(i64::MAX),
                duplicate_window: config.upstream_dedup_window,
                ..Default::default()
            })
            .await
            .map_err(engine)?;
        let upstream = js.get_stream(upstream.config.name).await.map_err(engine)?;
        let (feed, _) = broadcast::channel(UPSTREAM_FEED);
        let last = upstream
            .get_info()
            .await
            .map_err(engine)?
            .state
            .last_sequence;
        let shared = Arc::new(Shared {
            js,
            queues,
            nodes,
            upstream,
            config,
        });
        let feeder = start_feed(&shared, last + 1, feed.clone()).await?;
        let lanes = (0..LANES)
            .map(|_| {
                let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    while let Some(job) = rx.recv().await {
                        job(Arc::clone(&shared)).await;
                    }
                });
                tx
            })
            .collect();
        Ok(Self {
            lanes,
            feed,
            feeder,
        })
    }

    /// Runs `f` in `node`'s lane after the operations called before it.
    fn submit<T, E, F, Fut>(&self, node: &str, f: F) -> StoreFuture<'static, Result<T, E>>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(Arc<Shared>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move |shared| {
            Box::pin(async move {
                let _ = reply.send(f(shared).await);
            })
        });
        let mut hasher = DefaultHasher::new();
        node.hash(&mut hasher);
        let lane = usize::try_from(hasher.finish() % LANES as u64).unwrap_or(0);
        let sent = self.lanes[lane].send(job).is_ok();
        Box::pin(async move {
            if !sent {
                return Err(E::from(StoreError::Closed));
            }
            rx.await
                .unwrap_or_else(|_| Err(E::from(StoreError::Closed)))
        })
    }
}

impl Drop for JetStreamStore {
    fn drop(&mut self) {
        self.feeder.abort();
    }
}

impl MessageStore for JetStreamStore {
    fn register_node(&self, node: NodeRecord) -> StoreFuture<'static, Result<(), StoreError>> {
        self.submit(&node.id.clone(), move |s| async move {
            let key = node_key(&node.id);
            for _ in 0..CAS_ATTEMPTS {
                let entry = s.nodes.entry(key.as_str()).await.map_err(engine)?;
                let (old, revision) = match &entry {
                    Some(e) if e.operation == kv::Operation::Put => {
                        (Some(decode::<StoredNode>(&e.value)?), Some(e.revision))
                    }
                    Some(e) => (None, Some(e.revision)),
                    None => (None, None),
                };
                let record = StoredNode {
                    project: node.project.clone(),
                    first_seen_ms: old.map_or(node.first_seen_ms, |o| o.first_seen_ms),
                    last_seen_ms: node.last_seen_ms,
                };
                if write(&s.nodes, &key, encode(&record)?, revision).await? {
                    return Ok(());
                }
            }
            Err(contended())
        })
    }

    fn nodes(&self) -> StoreFuture<'static, Result<Vec<NodeRecord>, StoreError>> {
        self.submit("", |s| async move {
            let mut keys: Vec<String> = s
                .nodes
                .keys()
                .await
                .map_err(engine)?
                .filter_map(|k| async move { k.ok() })
                .collect()
                .await;
            keys.sort();
            let mut out = Vec::new();
            for key in keys {
                let Some(id) = node_id(&key) else { continue };
                if let Some(value) = s.nodes.get(key.as_str()).await.map_err(engine)? {
                    out.push(decode::<StoredNode>(&value)?.record(id));
                }
            }
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        })
    }

    fn node(&self, node: &str) -> StoreFuture<'static, Result<Option<NodeRecord>, StoreError>> {
        let id = node.to_owned();
        self.submit(node, move |s| async move {
            match s.nodes.get(node_key(&id)).await.map_err(engine)? {
                Some(value) => Ok(Some(decode::<StoredNode>(&value)?.record(id))),
                None => Ok(None),
            }
        })
    }

    fn enqueue(
        &self,
        node: &str,
        msg: Message,
        needs_ack: bool,
    ) -> StoreFuture<'static, Result<Enqueued, EnqueueError>> {
        let node = node.to_owned();
        self.submit(&node.clone(), move |s| async move {
            s.enqueue(&node, msg, needs_ack, false)
                .await
                .map(|(enqueued, _)| enqueued)
        })
    }

    fn enqueue_superseding(
        &self,
        node: &str,
        msg: Message,
        needs_ack: bool,
    ) -> StoreFuture<'static, Result<Superseded, EnqueueError>> {
        let node = node.to_owned();
        self.submit(&node.clone(), move |s| async move {
            let (enqueued, replaced) = s.enqueue(&node, msg, needs_ack, true).await?;
            Ok(Superseded { enqueued, replaced })
        })
    }

    fn pending(
        &self,
        node: &str,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'static, Result<Vec<Downstream>, StoreError>> {
        let node = node.to_owned();
        self.submit(&node.clone(), move |s| async move {
            let (index, _) = s.index(&node).await?;
            let mut out = Vec::new();
            for entry in index.open.iter().filter(|e| e.seq > after).take(limit) {
                let value = s
                    .queues
                    .get(entry.body.as_str())
                    .await
                    .map_err(engine)?
                    .ok_or_else(|| StoreError::Corrupt(format!("no body {}", entry.body)))?;
                out.push(Downstream {
                    seq: entry.seq,
                    needs_ack: entry.needs_ack,
                    message: decode::<Body>(&value)?.message()?,
                });
            }
            Ok(out)
        })
    }

    fn mark_in_flight(
        &self,
        node: &str,
        seq: u64,
        attempt: u32,
    ) -> StoreFuture<'static, Result<(), StoreError>> {
        let node = node.to_owned();
        self.submit(&node.clone(), move |s| async move {
            s.modify(&node, |index, _| {
                if let Some(e) = index.open.iter_mut().find(|e| e.seq == seq) {
                    e.in_flight = true;
                    e.attempts = attempt;
                    return Ok(((), true, None));
                }
                Ok(((), false, None))
            })
            .await
        })
    }

    fn mark_acked(
        &self,
        node: &str,
        id: &str,
    ) -> StoreFuture<'static, Result<Option<u64>, StoreError>> {
        let (node, id) = (node.to_owned(), id.to_owned());
        self.submit(&node.clone(), move |s| async move {
            s.end(&node, &id, "acked", "", false).await
        })
    }

    fn mark_failed(
        &self,
        node: &str,
        id: &str,
        reason: &str,
    ) -> StoreFuture<'static, Result<Option<u64>, StoreError>> {
        let (node, id, reason) = (node.to_owned(), id.to_owned(), reason.to_owned());
        self.submit(&node.clone(), move |s| async move {
            s.end(&node, &id, "failed", &reason, true).await
        })
    }

    fn cancel(&self, node: &str, id: &str) -> StoreFuture<'static, Result<Cancelled, StoreError>> {
        let (node, id) = (node.to_owned(), id.to_owned());
        self.submit(&node.clone(), move |s| async move {
            let (index, _) = s.index(&node).await?;
            if let Some(ended) = index.ended.iter().find(|e| e.id == id) {
                return Ok(Cancelled::Already(ended.state()));
            }
            Ok(match s.end(&node, &id, "cancelled", "", false).await? {
                Some(seq) => Cancelled::Now { seq },
                None => Cancelled::Unknown,
            })
        })
    }

    fn remove(&self, node: &str, seq: u64) -> StoreFuture<'static, Result<(), StoreError>> {
        let node = node.to_owned();
        self.submit(&node.clone(), move |s| async move {
            s.modify(&node, |index, _| {
                let before = (index.open.len(), index.ended.len());
                let body = index
                    .open
                    .iter()
                    .find(|e| e.seq == seq)
                    .map(|e| e.body.clone());
                index.open.retain(|e| e.seq != seq);
                index.ended.retain(|e| e.seq != seq);
                let changed = before != (index.open.len(), index.ended.len());
                Ok(((), changed, body))
            })
            .await
        })
    }

    fn message_state(
        &self,
        node: &str,
        id: &str,
    ) -> StoreFuture<'static, Result<Option<MessageState>, StoreError>> {
        let (node, id) = (node.to_owned(), id.to_owned());
        self.submit(&node.clone(), move |s| async move {
            let (index, _) = s.index(&node).await?;
            if let Some(open) = index.open.iter().find(|e| e.id == id) {
                return Ok(Some(if open.in_flight {
                    MessageState::InFlight {
                        attempts: open.attempts,
                    }
                } else {
                    MessageState::Pending
                }));
            }
            Ok(index
                .ended
                .iter()
                .find(|e| e.id == id)
                .map(EndedEntry::state))
        })
    }

    fn queue_depths(&self) -> StoreFuture<'static, Result<Vec<(String, QueueDepth)>, StoreError>> {
        self.submit("", |s| async move {
            let keys: Vec<String> = s
                .queues
                .keys()
                .await
                .map_err(engine)?
                .filter_map(|k| async move { k.ok().filter(|k| k.starts_with("q.")) })
                .collect()
                .await;
            let mut out = Vec::new();
            for key in keys {
                let Some(node) = key.strip_prefix("q.").and_then(unhex) else {
                    continue;
                };
                let (index, _) = s.index(&node).await?;
                let in_flight = index.open.iter().filter(|e| e.in_flight).count() as u64;
                let depth = QueueDepth {
                    pending: index.open.len() as u64 - in_flight,
                    in_flight,
                };
                if depth.total() > 0 {
                    out.push((node, depth));
                }
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(out)
        })
    }

    fn accept_upstream(
        &self,
        node: &str,
        msg: Message,
    ) -> StoreFuture<'static, Result<Accepted, StoreError>> {
        let node = node.to_owned();
        self.submit(&node.clone(), move |s| async move {
            let payload = encode(&UpstreamBody {
                node: node.clone(),
                accepted_ms: proto::now_millis(),
                body: Body::of(&msg),
            })?;
            let mut headers = HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("{}.{}", hex::encode(&node), msg.header.id).as_str(),
            );
            let subject = format!("{}.up.{}", s.config.prefix, hex::encode(&node));
            let ack =
                s.js.publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(engine)?
                    .await
                    .map_err(engine)?;
            Ok(if ack.duplicate {
                Accepted::Duplicate(ack.sequence)
            } else {
                Accepted::New(ack.sequence)
            })
        })
    }

    fn upstream_since(
        &self,
        after: u64,
        limit: usize,
    ) -> StoreFuture<'static, Result<Vec<Arc<UpstreamRecord>>, StoreError>> {
        self.submit("", move |s| async move {
            let last = s
                .upstream
                .get_info()
                .await
                .map_err(engine)?
                .state
                .last_sequence;
            let mut out = Vec::new();
            if after >= last || limit == 0 {
                return Ok(out);
            }
            let consumer = s
                .upstream
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: after + 1,
                    },
                    ..Default::default()
                })
                .await
                .map_err(engine)?;
            let mut messages = consumer.messages().await.map_err(engine)?;
            while out.len() < limit {
                let Some(message) = messages.next().await else {
                    break;
                };
                let message = message.map_err(engine)?;
                let seq = message.info().map_err(engine)?.stream_sequence;
                out.push(Arc::new(upstream_record(seq, &message.payload)?));
                if seq >= last {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn subscribe_upstream(&self) -> broadcast::Receiver<Arc<UpstreamRecord>> {
        self.feed.subscribe()
    }
}

impl Shared {
    /// Node `node`'s index and its revision (`None`: no index yet, or deleted).
    async fn index(&self, node: &str) -> Result<(QueueIndex, Option<u64>), StoreError> {
        match self.queues.entry(index_key(node)).await.map_err(engine)? {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok((decode(&e.value)?, Some(e.revision)))
            }
            Some(e) => Ok((QueueIndex::default(), Some(e.revision))),
            None => Ok((QueueIndex::default(), None)),
        }
    }

    /// Applies `change` to `node`'s index with compare-and-set, retrying on a conflict.
    /// `change` returns its result, whether it changed the index, and a body key to delete once
    /// the change is stored.
    async fn modify<T, E>(
        &self,
        node: &str,
        mut change: impl FnMut(&mut QueueIndex, i64) -> Result<(T, bool, Option<String>), E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let key = index_key(node);
        for _ in 0..CAS_ATTEMPTS {
            let (mut index, revision) = self.index(node).await?;
            let now = proto::now_millis();
            let (result, changed, drop_body) = change(&mut index, now)?;
            if !changed {
                return Ok(result);
            }
            let horizon =
                now - i64::try_from(self.config.acked_retention.as_millis()).unwrap_or(i64::MAX);
            index.ended.retain(|e| e.at_ms >= horizon);
            if write(&self.queues, &key, encode(&index)?, revision).await? {
                if let Some(body) = drop_body {
                    // Housekeeping: an orphaned body costs space, never correctness.
                    let _ = self.queues.purge(body.as_str()).await;
                }
                return Ok(result);
            }
        }
        Err(E::from(contended()))
    }

    /// Enqueues (optionally replacing the open messages for the same object).
    async fn enqueue(
        &self,
        node: &str,
        msg: Message,
        needs_ack: bool,
        supersede: bool,
    ) -> Result<(Enqueued, Vec<String>), EnqueueError> {
        let id = msg.header.id.clone();
        let known = |index: &QueueIndex| {
            index
                .open
                .iter()
                .map(|e| (e.seq, &e.id))
                .chain(index.ended.iter().map(|e| (e.seq, &e.id)))
                .find(|(_, i)| **i == id)
                .map(|(seq, _)| Enqueued {
                    seq,
                    duplicate: true,
                })
        };
        let (index, _) = self.index(node).await?;
        if !supersede && let Some(dup) = known(&index) {
            return Ok((dup, Vec::new()));
        }
        // The body first, under a key of its own: a lost race leaves an orphan, never a wrong
        // body under a live entry.
        let body = format!("b.{}.{}", hex::encode(node), uuid::Uuid::new_v4().simple());
        self.queues
            .put(body.as_str(), encode(&Body::of(&msg))?)
            .await
            .map_err(engine)?;
        let limit = self.config.queue_limit;
        let route = msg.route.clone();
        let result = self
            .modify(node, |index, _| {
                let mut replaced = Vec::new();
                if supersede {
                    index.open.retain(|e| {
                        let same = e.source == route.source
                            && e.group == route.group
                            && e.resource == route.resource;
                        if same {
                            replaced.push(e.id.clone());
                        }
                        !same
                    });
                } else if let Some(dup) = known(index) {
                    return Ok(((dup, replaced), false, None));
                }
                if index.open.len() as u64 >= limit {
                    return Err(EnqueueError::QueueFull {
                        node: node.to_owned(),
                        limit,
                    });
                }
                index.next_seq += 1;
                let seq = index.next_seq;
                index.open.push(OpenEntry {
                    seq,
                    id: id.clone(),
                    needs_ack,
                    attempts: 0,
                    in_flight: false,
                    source: route.source.clone(),
                    group: route.group.clone(),
                    resource: route.resource.clone(),
                    body: body.clone(),
                });
                let enqueued = Enqueued {
                    seq,
                    duplicate: false,
                };
                Ok(((enqueued, replaced), true, None))
            })
            .await;
        if !matches!(&result, Ok((e, _)) if !e.duplicate) {
            let _ = self.queues.purge(body.as_str()).await;
        }
        result
    }

    /// Ends open message `id` as `state`; returns its sequence number if it was open (and,
    /// with `needs_ack_only`, needed an ACK).
    async fn end(
        &self,
        node: &str,
        id: &str,
        state: &str,
        reason: &str,
        needs_ack_only: bool,
    ) -> Result<Option<u64>, StoreError> {
        self.modify(node, |index, now| {
            let Some(pos) = index
                .open
                .iter()
                .position(|e| e.id == id && (e.needs_ack || !needs_ack_only))
            else {
                return Ok((None, false, None));
            };
            let entry = index.open.remove(pos);
            index.ended.push(EndedEntry {
                seq: entry.seq,
                id: entry.id,
                at_ms: now,
                state: state.to_owned(),
                reason: reason.to_owned(),
            });
            Ok((Some(entry.seq), true, Some(entry.body)))
        })
        .await
    }
}

impl EndedEntry {
    fn state(&self) -> MessageState {
        match self.state.as_str() {
            "failed" => MessageState::Failed {
                at_ms: self.at_ms,
                reason: self.reason.clone(),
            },
            "cancelled" => MessageState::Cancelled { at_ms: self.at_ms },
            _ => MessageState::Acked { at_ms: self.at_ms },
        }
    }
}

impl Body {
    fn of(msg: &Message) -> Self {
        let row = HeadRow::from_message(msg);
        Self {
            head: row.head,
            kind: row.content_kind,
            content: B64.encode(&row.content),
        }
    }

    fn message(self) -> Result<Message, StoreError> {
        let content = B64
            .decode(self.content.as_bytes())
            .map_err(|e| StoreError::Corrupt(format!("content: {e}")))?;
        HeadRow {
            head: self.head,
            content_kind: self.kind,
            content,
        }
        .into_message()
        .map_err(|e| StoreError::Corrupt(e.to_string()))
    }
}

/// A node record as stored (its id is the key).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredNode {
    project: String,
    first_seen_ms: i64,
    last_seen_ms: i64,
}

impl StoredNode {
    fn record(self, id: String) -> NodeRecord {
        NodeRecord {
            id,
            project: self.project,
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
        }
    }
}

/// Follows the upstream stream from `start` and publishes each record to `feed`.
async fn start_feed(
    shared: &Shared,
    start: u64,
    feed: broadcast::Sender<Arc<UpstreamRecord>>,
) -> Result<tokio::task::JoinHandle<()>, StoreError> {
    let consumer = shared
        .upstream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(engine)?;
    let mut messages = consumer.messages().await.map_err(engine)?;
    Ok(tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            let record = message.map_err(engine).and_then(|m| {
                let seq = m.info().map_err(engine)?.stream_sequence;
                upstream_record(seq, &m.payload)
            });
            match record {
                // No subscriber is fine: the record is in the stream.
                Ok(record) => drop(feed.send(Arc::new(record))),
                Err(e) => tracing::warn!(error = %e, "upstream feed: unreadable record"),
            }
        }
    }))
}

fn upstream_record(seq: u64, payload: &[u8]) -> Result<UpstreamRecord, StoreError> {
    let up: UpstreamBody = decode(payload)?;
    Ok(UpstreamRecord {
        seq,
        node: up.node,
        accepted_ms: up.accepted_ms,
        message: up.body.message()?,
    })
}

/// Writes `value` under `key` if the key is still at `revision` (`None`: absent). `false`: lost
/// a race, read again.
async fn write(
    bucket: &kv::Store,
    key: &str,
    value: Bytes,
    revision: Option<u64>,
) -> Result<bool, StoreError> {
    let result = match revision {
        Some(revision) => bucket
            .update(key, value, revision)
            .await
            .map(|_| ())
            .map_err(|e| {
                (
                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    e.to_string(),
                )
            }),
        None => bucket.create(key, value).await.map(|_| ()).map_err(|e| {
            (
                e.kind() == kv::CreateErrorKind::AlreadyExists,
                e.to_string(),
            )
        }),
    };
    match result {
        Ok(()) => Ok(true),
        Err((true, _)) => Ok(false),
        Err((false, e)) => Err(StoreError::Engine(e)),
    }
}

fn index_key(node: &str) -> String {
    format!("q.{}", hex::encode(node))
}

fn node_key(node: &str) -> String {
    hex::encode(node)
}

fn node_id(key: &str) -> Option<String> {
    unhex(key)
}

fn unhex(text: &str) -> Option<String> {
    String::from_utf8(hex::decode(text).ok()?).ok()
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, StoreError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn engine(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

fn contended() -> StoreError {
    StoreError::Engine("a node's queue index stayed contended; retry".into())
}
