//! The cloud API for applications (HTTP/JSON, default `127.0.0.1:10003`):
//!
//! | Method & path | What |
//! |---|---|
//! | `GET /v1/nodes` | every known node: id, project, connected, protocol, since, remote address, last keepalive, queue depths |
//! | `GET /v1/nodes/{id}` | one node (404 if unknown) |
//! | `POST /v1/nodes/{id}/messages` | queue a KubeEdge JSON message for the node (id and timestamp filled in if absent); `?ack=true\|false` overrides the ACK classification, `?wait=ack&timeout=10s` waits for the edge's ACK |
//! | `GET /v1/nodes/{id}/messages/{msg_id}` | where a queued message stands (pending, in flight, acked) |
//! | `GET /v1/messages?node=&group=&since=` | upstream messages as Server-Sent Events (`id:` = log sequence; resume with `Last-Event-ID` or `since`) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | `ok` |
//!
//! Every error is JSON: `{"error": "<text>", "code": "<stable code>"}` with a 4xx/5xx status.
//! The API has no authentication of its own: bind it to loopback (the default) or put it behind
//! a proxy that authenticates.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use proto::Message;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::hub::{Hub, SendError};
use crate::store::{MessageState, MessageStore, UpstreamRecord};
use session::node::delivery::needs_ack;

/// Largest accepted POST body: the transport's per-message cap.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default and longest `wait=ack` timeouts.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Upstream records read from the store per replay step.
const REPLAY_BATCH: usize = 512;

/// The API's routes over `hub`, accepting bodies up to [`MAX_BODY_BYTES`].
pub fn router(hub: Hub) -> Router {
    router_with_body_limit(hub, MAX_BODY_BYTES)
}

/// [`router`] with another body limit (larger bodies get 413 with a JSON error).
pub fn router_with_body_limit(hub: Hub, max_body: usize) -> Router {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(get_node))
        .route("/v1/nodes/{id}/messages", post(post_message))
        .route("/v1/nodes/{id}/messages/{msg_id}", get(get_message))
        .route("/v1/messages", get(stream_messages))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(hub)
}

/// Serves the API on `listener` (already bound) until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Hub,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(hub))
        .with_graceful_shutdown(shutdown)
        .await
}

fn error(status: StatusCode, code: &str, msg: impl std::fmt::Display) -> Response {
    (
        status,
        axum::Json(json!({ "error": msg.to_string(), "code": code })),
    )
        .into_response()
}

fn store_error(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, "store_error", e)
}

async fn list_nodes(State(hub): State<Hub>) -> Response {
    match hub.nodes().await {
        Ok(nodes) => axum::Json(nodes).into_response(),
        Err(e) => store_error(e),
    }
}

async fn get_node(State(hub): State<Hub>, Path(id): Path<String>) -> Response {
    match hub.node(&id).await {
        Ok(Some(node)) => axum::Json(node).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_node",
            format!("unknown node {id:?}"),
        ),
        Err(e) => store_error(e),
    }
}

/// Query of `POST /v1/nodes/{id}/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostQuery {
    /// `ack`: wait for the edge's ACK.
    wait: Option<String>,
    /// How long to wait: `10s`, `500ms`, `2m` or plain seconds.
    timeout: Option<String>,
    /// Overrides [`needs_ack`].
    ack: Option<bool>,
}

async fn post_message(
    State(hub): State<Hub>,
    Path(node): Path<String>,
    query: Result<Query<PostQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let status = e.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "bad_body"
            };
            return error(status, code, e.body_text());
        }
    };
    let wait = match query.wait.as_deref() {
        None => false,
        Some("ack") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("wait={other:?}: only wait=ack is supported"),
            );
        }
    };
    let timeout = match query.timeout.as_deref().map(parse_duration) {
        None => DEFAULT_WAIT,
        Some(Some(d)) if d <= MAX_WAIT => d,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("timeout must be a duration such as 10s or 500ms, at most {MAX_WAIT:?}"),
            );
        }
    };
    let mut msg = match proto::json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "malformed_message",
                format!("not a KubeEdge JSON message: {e}"),
            );
        }
    };
    // A message without a group or an operation matches no handler on any edge: queued, it would
    // be resent forever and hold back every later message for its resource.
    if msg.route.group.is_empty() || msg.route.operation.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "missing_route",
            "route.group and route.operation are required: the body is a KubeEdge message, \
             {\"header\": {...}, \"route\": {\"source\", \"group\", \"resource\", \"operation\"}, \
             \"content\": ...}",
        );
    }
    if msg.header.id.is_empty() {
        msg.header.id = proto::new_id();
    }
    if msg.header.timestamp == 0 {
        msg.header.timestamp = proto::now_millis();
    }
    let ack = match (query.ack, wait) {
        (Some(false), true) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                "wait=ack needs an ACK; it cannot be combined with ack=false",
            );
        }
        (Some(a), _) => a,
        // Waiting for an ACK asks for one.
        (None, true) => true,
        (None, false) => needs_ack(&msg),
    };
    let id = msg.header.id.clone();
    // Registered before queueing, so an immediate ACK is not missed.
    let waiter = wait.then(|| hub.ack_waiter(&node, &id));
    let queued = match hub.send(&node, msg, ack).await {
        Ok(q) => q,
        Err(SendError::UnknownNode(_)) => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_node",
                format!("unknown node {node:?}: it has never connected"),
            );
        }
        Err(SendError::QueueFull(e)) => {
            let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, "queue_full", e);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            return resp;
        }
        Err(e) => return store_error(e),
    };
    let mut out = json!({
        "id": id,
        "node": node,
        "seq": queued.seq,
        "duplicate": queued.duplicate,
        "needs_ack": ack,
    });
    let Some(waiter) = waiter else {
        return (StatusCode::ACCEPTED, axum::Json(out)).into_response();
    };
    // A duplicate POST of a message acked earlier: nothing more will come.
    if queued.duplicate {
        if let Ok(Some(MessageState::Acked { at_ms })) = hub.message_state(&node, &id).await {
            out["acked"] = json!(true);
            out["acked_at_ms"] = json!(at_ms);
            return (StatusCode::OK, axum::Json(out)).into_response();
        }
    }
    match waiter.wait(timeout).await {
        Some(info) => {
            out["acked"] = json!(true);
            out["ack_latency_ms"] = json!(info.latency.map(|l| l.as_secs_f64() * 1000.0));
            out["response"] = info.response.as_ref().map_or(Value::Null, message_json);
            (StatusCode::OK, axum::Json(out)).into_response()
        }
        None => {
            out["acked"] = json!(false);
            (StatusCode::ACCEPTED, axum::Json(out)).into_response()
        }
    }
}

async fn get_message(
    State(hub): State<Hub>,
    Path((node, msg_id)): Path<(String, String)>,
) -> Response {
    match hub.message_state(&node, &msg_id).await {
        Ok(Some(state)) => {
            let (name, extra) = match state {
                MessageState::Pending => ("pending", Value::Null),
                MessageState::InFlight { attempts } => ("in_flight", json!(attempts)),
                MessageState::Acked { at_ms } => ("acked", json!(at_ms)),
            };
            let mut out = json!({ "id": msg_id, "node": node, "state": name });
            match state {
                MessageState::InFlight { .. } => out["attempts"] = extra,
                MessageState::Acked { .. } => out["acked_at_ms"] = extra,
                MessageState::Pending => {}
            }
            axum::Json(out).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_message",
            format!("no message {msg_id:?} for node {node:?} (unknown, or acked long ago)"),
        ),
        Err(e) => store_error(e),
    }
}

async fn metrics(State(hub): State<Hub>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics_text().await,
    )
        .into_response()
}

/// Query of `GET /v1/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    /// Only this node's messages.
    node: Option<String>,
    /// Only messages of this route group.
    group: Option<String>,
    /// Replay from after this log sequence (0: everything retained).
    since: Option<u64>,
}

async fn stream_messages(
    State(hub): State<Hub>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
    };
    let last_event = headers
        .get("Last-Event-ID")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let store = Arc::clone(hub.store());
    // Subscribe before replaying so nothing committed in between is missed.
    let live = store.subscribe_upstream();
    let tail = UpstreamTail {
        store,
        live,
        cursor: last_event.or(query.since),
        replaying: last_event.or(query.since).is_some(),
        backlog: VecDeque::new(),
        node: query.node,
        group: query.group,
    };
    Sse::new(tail.into_stream())
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The state of one SSE consumer: replay from the store, then the live feed, falling back to
/// the store whenever the feed lags.
struct UpstreamTail {
    store: Arc<dyn MessageStore>,
    live: broadcast::Receiver<Arc<UpstreamRecord>>,
    /// Last sequence delivered (or skipped); `None` until the first live record when the
    /// consumer asked for new messages only.
    cursor: Option<u64>,
    replaying: bool,
    backlog: VecDeque<Arc<UpstreamRecord>>,
    node: Option<String>,
    group: Option<String>,
}

impl UpstreamTail {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut tail| async move {
            let record = tail.next().await?;
            Some((Ok(record_event(&record)), tail))
        })
    }

    /// The next record passing the filters; `None` when the store shut down.
    async fn next(&mut self) -> Option<Arc<UpstreamRecord>> {
        loop {
            if let Some(record) = self.backlog.pop_front() {
                self.cursor = Some(record.seq);
                if self.wanted(&record) {
                    return Some(record);
                }
                continue;
            }
            if self.replaying {
                let after = self.cursor.unwrap_or(0);
                match self.store.upstream_since(after, REPLAY_BATCH).await {
                    Ok(batch) if !batch.is_empty() => self.backlog.extend(batch),
                    Ok(_) => self.replaying = false,
                    Err(e) => {
                        tracing::warn!(error = %e, "upstream replay failed; ending the stream");
                        return None;
                    }
                }
                continue;
            }
            match self.live.recv().await {
                Ok(record) => {
                    if self.cursor.is_some_and(|c| record.seq <= c) {
                        continue;
                    }
                    self.backlog.push_back(record);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind the live feed: catch up from the log.
                    self.replaying = self.cursor.is_some();
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn wanted(&self, record: &UpstreamRecord) -> bool {
        self.node.as_ref().is_none_or(|n| *n == record.node)
            && self
                .group
                .as_ref()
                .is_none_or(|g| *g == record.message.route.group)
    }
}

fn record_event(record: &UpstreamRecord) -> Event {
    let data = json!({
        "seq": record.seq,
        "node": record.node,
        "accepted_ms": record.accepted_ms,
        "message": message_json(&record.message),
    });
    Event::default()
        .id(record.seq.to_string())
        .event("message")
        .data(data.to_string())
}

/// A message in KubeEdge's JSON form, as a JSON value.
fn message_json(msg: &Message) -> Value {
    serde_json::from_slice(&proto::json::to_vec(msg)).unwrap_or(Value::Null)
}

/// Parses `10s`, `500ms`, `2m`, `1h` or a plain number of seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("10x"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
