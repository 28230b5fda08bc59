//! The session manager: admits authenticated connections from the transport listeners into the
//! per-node registry (`registry.rs`: one live session per node id, the newest wins, a node
//! limit), runs one driver (`driver.rs`) per connection, and offers the operations the cloud API
//! needs (node views, queueing a message, waiting for its ACK, cancelling it, metrics). Refused connections
//! (node limit, identity) are closed with a reason and a close code and never served (fixes W8).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use proto::Message;
use proto::close::SessionCloseCode;
use serde::Serialize;
use transport::{AcceptError, Connection, Listener, Protocol};

use crate::driver::Driver;
use crate::metrics::{Gauges, Metrics};
pub use crate::registry::{AckInfo, AckWaiter};
use crate::registry::{Admission, LiveInfo, Registry};
use crate::store::{
    Accepted, Cancelled, EnqueueError, Enqueued, MessageState, MessageStore, QueueDepth,
    StoreError, StoreFuture, Superseded,
};
use crate::upstream::UpstreamRouter;
use session::node::SessionConfig;

/// Settings of the session manager. Defaults are KubeEdge's where it has one.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Most nodes with a live session; further nodes are refused and closed. Default 500
    /// (KubeEdge `nodeLimit`). A reconnecting node replaces its own session and never counts
    /// twice.
    pub node_limit: usize,
    /// Per-session tunables (keepalive interval, window, resend backoff).
    pub session: SessionConfig,
    /// Bound on closing a connection gracefully at the end of a session. Default 5 s.
    pub close_timeout: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            node_limit: 500,
            session: SessionConfig::default(),
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// The cloud hub: cheap to clone, shared by the listeners, the drivers and the API.
#[derive(Clone, Debug)]
pub struct Hub {
    pub(crate) inner: Arc<Inner>,
}

/// State shared by the hub's handles; drivers get what they need of it, not the hub.
#[derive(Debug)]
pub(crate) struct Inner {
    config: HubConfig,
    store: Arc<dyn MessageStore>,
    metrics: Arc<Metrics>,
    pub(crate) registry: Arc<Registry>,
    /// Upstream messages to cloud modules (`upstream.rs`).
    pub(crate) router: Arc<UpstreamRouter>,
}

/// A node as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Project id the node claimed (last connection).
    pub project: String,
    /// Whether it has a live session.
    pub connected: bool,
    /// Protocol of the live session: `websocket` or `quic`.
    #[schema(value_type = Option<String>)]
    pub protocol: Option<Protocol>,
    /// Start of the live session, Unix milliseconds.
    pub connected_since_ms: Option<i64>,
    /// Address of the live session's peer.
    pub remote_addr: Option<String>,
    /// Last keepalive of the live session, Unix milliseconds.
    pub last_keepalive_ms: Option<i64>,
    /// First connection ever, Unix milliseconds (0 if it never connected but is live now).
    pub first_seen_ms: i64,
    /// When the node was last heard from, Unix milliseconds: its last message (keepalives
    /// included) while connected; the last message of its latest session otherwise (or that
    /// session's start, if the cloud stopped before recording it).
    pub last_seen_ms: i64,
    /// Open messages queued for it.
    pub queue: QueueView,
}

/// Queue depth as the API shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct QueueView {
    /// Queued, not yet written in the current session.
    pub pending: u64,
    /// Written, waiting for an ACK.
    pub in_flight: u64,
}

impl From<QueueDepth> for QueueView {
    fn from(d: QueueDepth) -> Self {
        Self {
            pending: d.pending,
            in_flight: d.in_flight,
        }
    }
}

/// Why [`Hub::send`] did not queue a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The node never connected, so nothing can be queued for it (a typo, or a node not yet
    /// enrolled). Caller's fault (the API answers 404).
    #[error("unknown node {0:?}: it has never connected")]
    UnknownNode(String),
    /// The node's queue is at its bound; nothing was stored. Retry later (503).
    #[error(transparent)]
    QueueFull(EnqueueError),
    /// The store failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Hub {
    /// A hub over `store`. Start serving with [`Hub::serve`].
    pub fn new(config: HubConfig, store: Arc<dyn MessageStore>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                store,
                metrics: Arc::default(),
                registry: Arc::default(),
                router: Arc::default(),
            }),
        }
    }

    /// Accepts connections from `listener` until it ends (its shutdown signal fired), admitting
    /// each and counting each rejection by reason.
    pub async fn serve(&self, mut listener: Box<dyn Listener>) {
        while let Some(accepted) = listener.accept().await {
            match accepted {
                Ok(conn) => self.admit(conn),
                Err(AcceptError::Rejected { remote, reason }) => {
                    self.inner.metrics.rejected(reason.label());
                    tracing::warn!(%remote, %reason, "connection rejected");
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            }
        }
    }

    /// Admits one authenticated connection: replaces the node's previous session if any, or
    /// refuses (and closes) it when the node limit is reached or its identity is inconsistent.
    pub fn admit(&self, conn: Box<dyn Connection>) {
        let conn: Arc<dyn Connection> = Arc::from(conn);
        let peer = conn.peer().clone();
        let Some(node) = peer.node_id.as_ref().map(|n| n.as_str().to_owned()) else {
            self.refuse(conn, Refusal::MissingNodeId, "no node id".into());
            return;
        };
        // Transport checked this; checked again here because acting as another node is the
        // one thing a node must never manage (W8).
        match certs::node_id_from_cert(&peer.certificate) {
            Ok(certified) if certified.as_str() == node => {}
            Ok(certified) => {
                let why = format!("node id {node:?} does not match certificate {certified:?}");
                self.refuse(conn, Refusal::NodeIdMismatch, why);
                return;
            }
            Err(e) => {
                self.refuse(conn, Refusal::NotNodeCertificate, e.to_string());
                return;
            }
        }
        let registry = &self.inner.registry;
        if registry.is_shutting_down() {
            self.refuse(conn, Refusal::ShuttingDown, "cloud is shutting down".into());
            return;
        }
        let info = LiveInfo {
            protocol: peer.protocol,
            project: peer.project_id.clone().unwrap_or_default(),
            remote: peer.remote_addr,
            connected_since_ms: proto::now_millis(),
            last_keepalive_ms: AtomicI64::new(0),
            last_frame_ms: AtomicI64::new(0),
        };
        let limit = self.inner.config.node_limit;
        let (entry, replaced) = match registry.admit(&node, info, limit) {
            Admission::Entered { entry, replaced } => (entry, replaced),
            Admission::LimitReached => {
                let why = format!("node limit of {limit} reached");
                self.refuse(conn, Refusal::NodeLimit, why);
                return;
            }
        };
        let generation = entry.generation;
        self.inner.metrics.session_started(peer.protocol);
        if let Some(old_generation) = replaced {
            self.inner.metrics.reconnect();
            tracing::info!(%node, protocol = %peer.protocol, remote = %peer.remote_addr,
                old_generation, generation, "node reconnected; replacing its previous session");
        } else {
            tracing::info!(%node, protocol = %peer.protocol, remote = %peer.remote_addr,
                upstream_ack = peer.capabilities.upstream_ack, generation, "node connected");
        }
        let driver = Driver {
            registry: Arc::clone(registry),
            store: Arc::clone(&self.inner.store),
            router: Arc::clone(&self.inner.router),
            metrics: Arc::clone(&self.inner.metrics),
            session: self.inner.config.session.clone(),
            close_timeout: self.inner.config.close_timeout,
            conn,
            node,
            entry,
        };
        tokio::spawn(driver.run());
    }

    /// Queues `msg` durably for `node` and wakes its session if it is connected. An offline
    /// node gets it when it reconnects.
    pub async fn send(
        &self,
        node: &str,
        msg: Message,
        needs_ack: bool,
    ) -> Result<Enqueued, SendError> {
        if !self.is_known(node).await? {
            return Err(SendError::UnknownNode(node.to_owned()));
        }
        let queued = match self.inner.store.enqueue(node, msg, needs_ack).await {
            Ok(q) => q,
            Err(e @ EnqueueError::QueueFull { .. }) => return Err(SendError::QueueFull(e)),
            Err(EnqueueError::Store(e)) => return Err(SendError::Store(e)),
        };
        self.inner.registry.wake(node);
        Ok(queued)
    }

    /// Queues `msg` for `node` in place of the node's open messages with the same source, group
    /// and resource ([`MessageStore::enqueue_superseding`]), and wakes its session. For cloud
    /// modules that sync objects: per node and object only the newest version is sent.
    pub async fn send_superseding(
        &self,
        node: &str,
        msg: Message,
        needs_ack: bool,
    ) -> Result<Superseded, SendError> {
        if !self.is_known(node).await? {
            return Err(SendError::UnknownNode(node.to_owned()));
        }
        let done = match self
            .inner
            .store
            .enqueue_superseding(node, msg, needs_ack)
            .await
        {
            Ok(d) => d,
            Err(e @ EnqueueError::QueueFull { .. }) => return Err(SendError::QueueFull(e)),
            Err(EnqueueError::Store(e)) => return Err(SendError::Store(e)),
        };
        self.inner.registry.wake(node);
        Ok(done)
    }

    /// Hands upstream messages that are not ACKs, keepalives or servicebus replies to the cloud
    /// modules on `bus` by their source (`upstream.rs`); CloudHub's module calls it when it
    /// starts. Without it every upstream message takes the application path.
    pub fn route_upstream_through(&self, bus: beehive::Bus) {
        self.inner.router.set_bus(bus);
    }

    /// Puts upstream message `msg` of `node`, as a cloud module received it (resource
    /// `node/<id>/<resource>`), on the application path (the upstream log, the API's stream)
    /// exactly as the edge sent it, once per id: what a cloud module does with a message it does
    /// not handle. The store takes the message when this is called (so calls keep their order);
    /// the future tells when it is durable.
    pub fn accept_upstream(
        &self,
        node: &str,
        msg: Message,
    ) -> StoreFuture<'static, Result<Accepted, StoreError>> {
        let msg = self.inner.router.original(node, msg);
        let accepting = self.inner.store.accept_upstream(node, msg);
        let metrics = Arc::clone(&self.inner.metrics);
        Box::pin(async move {
            let accepted = accepting.await?;
            metrics.upstream(matches!(accepted, Accepted::Duplicate(_)));
            Ok(accepted)
        })
    }

    /// Every ACK (and refusal: [`AckInfo::failed`]) of every node from now on, for cloud modules
    /// that track their deliveries. A receiver that lags misses some; it can ask
    /// [`Hub::message_state`] where its messages stand.
    pub fn subscribe_acks(&self) -> tokio::sync::broadcast::Receiver<Arc<(String, AckInfo)>> {
        self.inner.registry.subscribe_acks()
    }

    /// Registers interest in the ACK of message `id` for `node`. Register *before* queueing the
    /// message so an immediate ACK cannot be missed.
    pub fn ack_waiter(&self, node: &str, id: &str) -> AckWaiter {
        self.inner.registry.ack_waiter(node, id)
    }

    /// Cancels message `id` for `node` (the operator's way out for a message an edge never
    /// acknowledges): an open one leaves the queue for good as cancelled, its live session (if
    /// any) drops it, and whoever waits for its ACK hears `cancelled`. A message that already
    /// ended is left as it is ([`Cancelled::Already`]).
    pub async fn cancel(&self, node: &str, id: &str) -> Result<Cancelled, StoreError> {
        let outcome = self.inner.store.cancel(node, id).await?;
        if let Cancelled::Now { .. } = outcome {
            self.inner.metrics.cancelled();
            tracing::info!(%node, %id, "message cancelled");
            // After the store's cancel: a session admitted from now on never reads it.
            self.inner.registry.cancelled(node, id);
            self.inner.registry.notify_ack(
                node,
                &AckInfo {
                    id: id.to_owned(),
                    latency: None,
                    response: None,
                    failed: None,
                    cancelled: true,
                },
            );
        }
        Ok(outcome)
    }

    /// Where message `id` for `node` stands in the store.
    pub async fn message_state(
        &self,
        node: &str,
        id: &str,
    ) -> Result<Option<MessageState>, StoreError> {
        self.inner.store.message_state(node, id).await
    }

    /// Every known node, connected or not, with its queue.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, StoreError> {
        let known = self.inner.store.nodes().await?;
        let depths: HashMap<String, QueueDepth> =
            self.inner.store.queue_depths().await?.into_iter().collect();
        let mut live: HashMap<String, Arc<LiveInfo>> =
            self.inner.registry.live().into_iter().collect();
        let mut views: Vec<NodeView> = known
            .into_iter()
            .map(|rec| {
                let info = live.remove(&rec.id);
                let depth = depths.get(&rec.id).copied().unwrap_or_default();
                node_view(&rec.id.clone(), Some(rec), info.as_deref(), depth)
            })
            .collect();
        // Live sessions whose registration is not committed yet.
        for (id, info) in live {
            let depth = depths.get(&id).copied().unwrap_or_default();
            views.push(node_view(&id, None, Some(&info), depth));
        }
        views.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(views)
    }

    /// One node, or `None` if it is unknown.
    pub async fn node(&self, id: &str) -> Result<Option<NodeView>, StoreError> {
        let rec = self.inner.store.node(id).await?;
        let info = self.inner.registry.info(id);
        if rec.is_none() && info.is_none() {
            return Ok(None);
        }
        let depth = self
            .inner
            .store
            .queue_depths()
            .await?
            .into_iter()
            .find_map(|(n, d)| (n == id).then_some(d))
            .unwrap_or_default();
        Ok(Some(node_view(id, rec, info.as_deref(), depth)))
    }

    /// Nodes with a live session, per protocol.
    pub fn connected(&self) -> Vec<(Protocol, u64)> {
        self.inner.registry.connected()
    }

    /// Whether `node` has a live session.
    pub fn is_connected(&self, node: &str) -> bool {
        self.inner.registry.is_connected(node)
    }

    /// The hub's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// All metrics in the Prometheus text format.
    pub async fn metrics_text(&self) -> String {
        let queue_depths = self.inner.store.queue_depths().await.unwrap_or_default();
        let gauges = Gauges {
            connected: self.connected(),
            queue_depths,
        };
        self.inner.metrics.render(&gauges)
    }

    /// The store (for the upstream log and its live feed).
    pub fn store(&self) -> &Arc<dyn MessageStore> {
        &self.inner.store
    }

    /// Refuses new connections, closes every session and waits up to `grace` for the drivers
    /// to finish (their queued messages stay in the store).
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.registry.shut_down();
        if tokio::time::timeout(grace, self.wait_sessions_at_most(0))
            .await
            .is_err()
        {
            tracing::warn!("sessions still closing after the shutdown grace period");
        }
    }

    /// Waits until at most `n` sessions (drivers, including replaced ones still closing) run:
    /// after it returns, every teardown beyond them has finished.
    pub async fn wait_sessions_at_most(&self, n: usize) {
        self.inner.registry.wait_drivers_at_most(n).await;
    }

    async fn is_known(&self, node: &str) -> Result<bool, StoreError> {
        if self.inner.registry.is_connected(node) {
            return Ok(true);
        }
        Ok(self.inner.store.node(node).await?.is_some())
    }

    fn refuse(&self, conn: Arc<dyn Connection>, refusal: Refusal, why: String) {
        self.inner.metrics.rejected(refusal.label());
        let peer = conn.peer();
        tracing::warn!(remote = %peer.remote_addr, protocol = %peer.protocol, reason = %why,
            "connection refused");
        let timeout = self.inner.config.close_timeout;
        tokio::spawn(async move {
            let closing = conn.close_with(Some(refusal.session_code()), &why);
            let _ = tokio::time::timeout(timeout, closing).await;
        });
    }
}

/// Why [`Hub::admit`] refused an authenticated connection.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    MissingNodeId,
    NodeIdMismatch,
    NotNodeCertificate,
    ShuttingDown,
    NodeLimit,
}

impl Refusal {
    /// Stable metric label (`cloudhub_rejected_connections_total{reason}`).
    fn label(self) -> &'static str {
        match self {
            Self::MissingNodeId => "missing_node_id",
            Self::NodeIdMismatch => "node_id_mismatch",
            Self::NotNodeCertificate => "not_node_certificate",
            Self::ShuttingDown => "shutting_down",
            Self::NodeLimit => "node_limit",
        }
    }

    /// The close code the node reads (PROTOCOL.md Part A item 9).
    fn session_code(self) -> SessionCloseCode {
        match self {
            Self::MissingNodeId | Self::NodeIdMismatch | Self::NotNodeCertificate => {
                SessionCloseCode::IdentityRefused
            }
            Self::ShuttingDown => SessionCloseCode::Shutdown,
            Self::NodeLimit => SessionCloseCode::NodeLimit,
        }
    }
}

/// A node's view from what the store knows and its live session, if any.
fn node_view(
    id: &str,
    rec: Option<crate::store::NodeRecord>,
    live: Option<&LiveInfo>,
    depth: QueueDepth,
) -> NodeView {
    let (project, first_seen_ms, last_seen_ms) = match rec {
        Some(r) => (r.project, r.first_seen_ms, r.last_seen_ms),
        None => (
            live.map(|l| l.project.clone()).unwrap_or_default(),
            0,
            live.map_or(0, |l| l.connected_since_ms),
        ),
    };
    let mut view = NodeView {
        id: id.to_owned(),
        project,
        connected: false,
        protocol: None,
        connected_since_ms: None,
        remote_addr: None,
        last_keepalive_ms: None,
        first_seen_ms,
        last_seen_ms,
        queue: depth.into(),
    };
    if let Some(info) = live {
        view.connected = true;
        view.project.clone_from(&info.project);
        view.protocol = Some(info.protocol);
        view.connected_since_ms = Some(info.connected_since_ms);
        view.remote_addr = Some(info.remote.to_string());
        let ka = info.last_keepalive_ms.load(Ordering::Relaxed);
        view.last_keepalive_ms = (ka > 0).then_some(ka);
        view.last_seen_ms = view
            .last_seen_ms
            .max(info.last_frame_ms.load(Ordering::Relaxed));
    }
    view
}
