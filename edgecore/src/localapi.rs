//! The edge's local HTTP endpoint for applications on the node: loopback only, no
//! authentication (the address is refused at configuration time unless it is a loopback
//! address). It serves metamanager's routes (MetaServer: the node's objects; the journal of cloud
//! messages, see [`metamanager::metaserver`]) and its own:
//!
//! | Method & path | What |
//! |---|---|
//! | `POST /v1/upstream` | send a message to the cloud: `{"group", "resource", "operation", "content"?, "source"? (default "localapp"), "id"?}`; 202 `{"id": ...}` once it is committed to EdgeHub's outbox (it survives a crash); refusals carry `{"error", "code"}` and `Retry-After`: 507 `insufficient_storage` (disk full), 503 `outbox_full`, `storage_failing`, `busy`, or `unconfirmed` (not confirmed within 30 s; retry under the returned `id`, stored once per id); 413 larger than the outbox |
//! | `GET /v1/status` | `{"cloud": "connected" \| "disconnected", "last_error": <the link's last failure, or null>, "protocol": <"quic" \| "websocket": the link's protocol, or null>, "fallback": <true while on the other protocol than the configured one (`edgehub.controller.fallback`)>, "stored": <journaled cloud messages>, "objects": <objects stored>, "storage_error": <why the outbox or metamanager cannot write (a full disk), or null>, "eventbus": <only when eventbus runs: {"broker": "connecting" \| "connected" \| "failed", "last_error", "connects", "to_twin", "uploads_stored", "uploads_not_stored", "published", "publish_dropped"}>}` |
//! | `GET /healthz` | `ok` |
//!
//! **A full disk.** While EdgeHub's outbox cannot write, `POST /v1/upstream` is refused at once
//! (507 `insufficient_storage` for a full disk) rather than taken into memory; what was taken
//! before is kept and stored once space returns. While metamanager cannot write, cloud messages
//! are not acknowledged, so the cloud resends them and they are stored once space returns.
//!
//! It is a beehive module only to hold a bus handle (upstream messages go to EdgeHub on it); it
//! joins its own group and receives nothing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use beehive::{BoxFuture, Bus, Module, ModuleContext, ModuleError};
use edgehub::{Receipt, StatsHandle};
use metamanager::MetaStore;
use proto::{Content, Message};
use session::edge::route::MODULE_EDGEHUB;

use crate::config::LocalApiConfig;

/// The module's name on the bus (also its group: nothing is sent to it).
pub const MODULE_NAME: &str = "localapi";
/// Default `source` of messages local applications send.
pub const DEFAULT_SOURCE: &str = "localapp";
/// How long a `POST /v1/upstream` waits for room in EdgeHub's inbox before answering 503.
const UPSTREAM_WAIT: Duration = Duration::from_secs(5);
/// How long it then waits for EdgeHub to commit the message to the outbox: a refusal comes at
/// once, so only a very slow disk makes it wait this long.
const STORE_WAIT: Duration = Duration::from_secs(30);
/// `Retry-After` (seconds) of a refused `POST /v1/upstream`: EdgeHub retries its storage every
/// second, so a few seconds suffice once space returns.
const RETRY_AFTER_SECS: &str = "5";

/// The local endpoint module.
#[derive(Debug)]
pub struct LocalApi {
    config: LocalApiConfig,
    /// Filled in once the HTTP endpoint is bound (useful with port 0).
    bound: Arc<Mutex<Option<SocketAddr>>>,
    /// EdgeHub's link state, when EdgeHub runs: `/v1/status` then also says why the link is down.
    link: Option<StatsHandle>,
    /// metamanager's store, when metamanager runs: its routes are served then.
    meta: Option<Arc<MetaStore>>,
    /// How long MetaServer waits for metamanager when it asks the cloud for an object.
    meta_query_timeout: Duration,
    /// eventbus's state, when eventbus runs.
    eventbus: Option<eventbus::StatusHandle>,
    /// devicetwin's counters, when devicetwin runs.
    devicetwin: Option<Arc<devicetwin::TwinStats>>,
}

/// Why the local endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalApiError {
    /// The HTTP endpoint could not be bound (address in use, not local).
    #[error("local endpoint {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

struct Shared {
    bus: Bus,
    link: Option<StatsHandle>,
    meta: Option<Arc<MetaStore>>,
    meta_query_timeout: Duration,
    eventbus: Option<eventbus::StatusHandle>,
    devicetwin: Option<Arc<devicetwin::TwinStats>>,
}

impl LocalApi {
    /// The module for `config`.
    pub fn new(config: LocalApiConfig) -> Self {
        Self {
            config,
            bound: Arc::default(),
            link: None,
            meta: None,
            meta_query_timeout: Duration::ZERO,
            eventbus: None,
            devicetwin: None,
        }
    }

    /// Reports devicetwin's counters (refused payloads among them) on `/v1/status`.
    pub fn with_devicetwin(mut self, stats: Arc<devicetwin::TwinStats>) -> Self {
        self.devicetwin = Some(stats);
        self
    }

    /// Reports eventbus's broker state and counters on `/v1/status`.
    pub fn with_eventbus(mut self, status: eventbus::StatusHandle) -> Self {
        self.eventbus = Some(status);
        self
    }

    /// Reports EdgeHub's link state (and its last failure) on `/v1/status`.
    pub fn with_link(mut self, link: StatsHandle) -> Self {
        self.link = Some(link);
        self
    }

    /// Serves metamanager's routes over its store; a get of a configmap or secret it lacks
    /// asks metamanager, waiting `remote_query_timeout` (metamanager's) and a margin.
    pub fn with_meta(mut self, store: Arc<MetaStore>, remote_query_timeout: Duration) -> Self {
        self.meta = Some(store);
        self.meta_query_timeout = remote_query_timeout + Duration::from_secs(5);
        self
    }

    /// A handle that reads the bound endpoint address once the module has started.
    pub fn bound_addr(&self) -> Arc<Mutex<Option<SocketAddr>>> {
        self.bound.clone()
    }
}

impl Module for LocalApi {
    fn name(&self) -> &str {
        MODULE_NAME
    }

    fn group(&self) -> &str {
        MODULE_NAME
    }

    fn start(self: Arc<Self>, ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move { run(&self, ctx).await.map_err(ModuleError::new) })
    }
}

async fn run(module: &LocalApi, mut ctx: ModuleContext) -> Result<(), LocalApiError> {
    let config = &module.config;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| LocalApiError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| LocalApiError::Bind {
            addr: config.listen,
            source,
        })?;
    *lock(&module.bound) = Some(addr);
    tracing::info!(%addr, metaserver = module.meta.is_some(), "local API listening");
    let shared = Arc::new(Shared {
        bus: ctx.bus().clone(),
        link: module.link.clone(),
        meta: module.meta.clone(),
        meta_query_timeout: module.meta_query_timeout,
        eventbus: module.eventbus.clone(),
        devicetwin: module.devicetwin.clone(),
    });
    let shutdown = ctx.shutdown_signal();
    let app = router(shared, shutdown.clone());
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.triggered().await })
            .into_future(),
    );
    // Nothing is sent to this module; its inbox ends at shutdown.
    while ctx.recv().await.is_some() {}
    let _ = server.await;
    Ok(())
}

/// Its own routes and, with metamanager, MetaServer's (whose watches end at `stop`).
fn router(shared: Arc<Shared>, stop: beehive::Shutdown) -> Router {
    let own = Router::new()
        .route("/v1/upstream", post(send_upstream))
        .route("/v1/status", get(status))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared.clone());
    match &shared.meta {
        Some(store) => {
            let remote = metamanager::metaserver::RemoteGet {
                bus: shared.bus.clone(),
                timeout: shared.meta_query_timeout,
            };
            own.merge(metamanager::metaserver::router(
                store.clone(),
                Some(remote),
                stop,
            ))
        }
        None => own,
    }
}

/// What a local application sends upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Upstream {
    group: String,
    resource: String,
    operation: String,
    #[serde(default)]
    content: Value,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

async fn send_upstream(
    State(shared): State<Arc<Shared>>,
    body: Result<axum::Json<Upstream>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let up = match body {
        Ok(axum::Json(up)) => up,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    if up.group.is_empty() || up.operation.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "group and operation must not be empty",
        );
    }
    // Refused at the door while the outbox cannot write.
    if let Some(problem) = shared.link.as_ref().and_then(StatsHandle::storage_problem) {
        return not_stored(&Receipt::StorageFailed(problem), None);
    }
    let id = up
        .id
        .filter(|id| !id.is_empty())
        .unwrap_or_else(proto::new_id);
    let msg = Message::with_header(id.clone(), "", proto::now_millis())
        .route(
            up.source.unwrap_or_else(|| DEFAULT_SOURCE.to_owned()),
            up.group,
            up.resource,
            up.operation,
        )
        .content(Content::Json(up.content));
    // Registered before the hand-over, so the receipt cannot be missed.
    let receipt = shared.link.as_ref().map(|link| link.receipt(&id));
    match tokio::time::timeout(UPSTREAM_WAIT, shared.bus.send(MODULE_EDGEHUB, msg)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let text = e.to_string();
            return refused(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &text, None);
        }
        Err(_) => {
            let text = "EdgeHub is busy (its inbox is full): not accepted; retry later";
            return refused(StatusCode::SERVICE_UNAVAILABLE, "busy", text, None);
        }
    }
    let accepted = || (StatusCode::ACCEPTED, axum::Json(json!({"id": id}))).into_response();
    // Without EdgeHub's receipts (EdgeHub not running), handed over is all that can be said.
    let Some(receipt) = receipt else {
        return accepted();
    };
    match receipt.wait(STORE_WAIT).await {
        Some(Receipt::Stored) => accepted(),
        Some(other) => not_stored(&other, None),
        None => {
            let text = format!(
                "not confirmed stored within {}s; it may still be: retry with the same id (a \
                 message is stored once per id)",
                STORE_WAIT.as_secs()
            );
            refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "unconfirmed",
                &text,
                Some(&id),
            )
        }
    }
}

/// The answer to a POST whose message EdgeHub did not take.
fn not_stored(receipt: &Receipt, id: Option<&str>) -> Response {
    match receipt {
        Receipt::StorageFailed(problem) if problem.disk_full => refused(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            &format!(
                "the edge's disk is full: not accepted; retry once space is freed ({})",
                problem.error
            ),
            id,
        ),
        Receipt::StorageFailed(problem) => refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_failing",
            &format!(
                "the edge's outbox cannot write: not accepted; retry later ({})",
                problem.error
            ),
            id,
        ),
        Receipt::OutboxFull => refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbox_full",
            "the edge's outbox is full (the cloud has been unreachable): not accepted; retry \
             later",
            id,
        ),
        Receipt::TooLarge { size, max } => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("message of {size} bytes exceeds the outbox limit of {max} bytes"),
        ),
        other => refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_stored",
            &format!("not accepted: {other:?}"),
            id,
        ),
    }
}

/// A refusal the caller should retry: `{"error", "code", "id"?}` with `Retry-After`.
fn refused(status: StatusCode, code: &str, text: &str, id: Option<&str>) -> Response {
    let mut body = json!({"error": text, "code": code});
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    let mut resp = (status, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    resp
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let (connected, last_error, protocol, fallback) = match &shared.link {
        Some(link) => {
            let link = link.link();
            let protocol = link.protocol.map(|p| p.as_str());
            (link.connected, link.last_error, protocol, link.fallback)
        }
        None => (false, None, None, false),
    };
    let cloud = if connected {
        "connected"
    } else {
        "disconnected"
    };
    let storage_error = shared
        .link
        .as_ref()
        .and_then(StatsHandle::storage_problem)
        .map(|p| format!("outbox: {}", p.error))
        .or_else(|| shared.meta.as_ref().and_then(|m| m.write_problem()));
    let counts = match &shared.meta {
        Some(meta) => meta
            .journal_count()
            .and_then(|stored| Ok((stored, meta.object_count()?)))
            .map(Some),
        None => Ok(None),
    };
    match counts {
        Ok(counts) => {
            let (stored, objects) = counts.unzip();
            let mut body = json!({"cloud": cloud, "last_error": last_error, "stored": stored,
                                  "objects": objects, "storage_error": storage_error,
                                  "protocol": protocol, "fallback": fallback});
            if let Some(eventbus) = &shared.eventbus {
                body["eventbus"] = json!(eventbus.snapshot());
            }
            if let Some(twin) = &shared.devicetwin {
                body["devicetwin"] = twin.to_json();
            }
            axum::Json(body).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, axum::Json(json!({"error": text}))).into_response()
}

/// Locks a mutex, recovering from poisoning: the data (an address) stays consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
