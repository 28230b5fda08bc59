//! The cloud API for applications (HTTP/JSON, default `127.0.0.1:10003`):
//!
//! | Method & path | Scope | What |
//! |---|---|---|
//! | `GET /v1/nodes` | read | every known node: id, project, connected, protocol, since, remote address, last keepalive, queue depths |
//! | `GET /v1/nodes/{id}` | read | one node (404 if unknown) |
//! | `POST /v1/nodes/{id}/messages` | send | queue a KubeEdge JSON message for the node (id and timestamp filled in if absent); `?ack=true\|false` overrides the ACK classification, `?wait=ack&timeout=10s` waits for the edge's ACK; 503 `queue_full` or 507 `insufficient_storage` (the store's disk is full) with `Retry-After` when nothing was queued |
//! | `GET /v1/nodes/{id}/messages/{msg_id}` | read | where a queued message stands (pending, in flight, acked, failed with the edge's `error`, cancelled) |
//! | `DELETE /v1/nodes/{id}/messages/{msg_id}` | send | cancel a pending or in-flight message: it leaves the queue for good (404 unknown, 409 already acked or failed) |
//! | any method `/v1/nodes/{id}/proxy/{port}[/{path}]` | send | call an HTTP service on the node through its servicebus ([`crate::proxy`]); answers with the service's status, headers and body; 503 `node_offline` (never queued), 504 `edge_timeout` |
//! | `GET /v1/messages?node=&group=&since=` | read | upstream messages as Server-Sent Events (`id:` = log sequence; resume with `Last-Event-ID` or `since`) |
//! | `GET /v1/api-tokens` | admin | the API tokens (names, scopes, times; never the tokens) |
//! | `POST /v1/api-tokens` | admin | create a token `{"name", "scope"}`; the answer holds it, once |
//! | `DELETE /v1/api-tokens/{name}` | admin | revoke a token |
//! | `GET /metrics` | read | Prometheus text |
//! | `GET /healthz` | none | `ok` |
//! | `GET /v1/openapi.json` | none | the OpenAPI 3.1 document ([`crate::api_doc`]; `docs/openapi.json`, `docs/api.md`) |
//!
//! Every error is JSON: `{"error": "<text>", "code": "<stable code>"}` with a 4xx/5xx status.
//!
//! Authentication ([`crate::auth`]): `Authorization: Bearer <token>`, or a client certificate
//! from the cloud CA on the TLS listener. Credentials are required once any API token exists,
//! and always off loopback; a request without a usable one gets 401 (`WWW-Authenticate: Bearer`),
//! one whose scope is too small 403. A presented token is never logged.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRef, MatchedPath, Path, Query, Request, State,
};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use axum::{Extension, Router};
use futures_util::Stream;
use proto::Message;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};

use utoipa::{IntoParams, OpenApi as _};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api_doc::{ApiDoc, ErrorBody};
use crate::auth::{
    AuthStoreError, Principal, Scope, TokenInfo, TokenStore, TokenVerdict, principal_from_cert,
};
use crate::bootstrap::{PeerInfo, TlsListener};
use crate::conn_limit::ConnLimit;
use crate::hub::{AckInfo, Hub, NodeView, SendError};
use crate::proxy::ProxyError;
use crate::store::{Cancelled, MessageState, MessageStore, UpstreamRecord};
use session::node::delivery::needs_ack;

mod objects;

/// Largest accepted POST body: the transport's per-message cap.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default and longest `wait=ack` timeouts.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Upstream records read from the store per replay step.
const REPLAY_BATCH: usize = 512;

/// How the API is served: credentials and limits. [`ApiOptions::default`] is an open API
/// (no token file, credentials never required), as tests and a loopback-only cloud use it.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// The API token file; `None`: no tokens (and no `/v1/api-tokens`).
    pub tokens: Option<Arc<TokenStore>>,
    /// Require credentials even while no token exists (the API is not on loopback).
    pub require_credentials: bool,
    /// Largest accepted POST body (larger gets 413 with a JSON error).
    pub max_body: usize,
    /// Most connections held open (SSE streams included); at the bound, new connections wait
    /// in the kernel's accept queue.
    pub max_connections: usize,
    /// Most requests handled at once (SSE streams, `/healthz` and the wait for an ACK not
    /// counted); a request beyond it waits for its turn.
    pub max_concurrent_requests: usize,
    /// How long a request waits for its turn before it is refused with 503 `overloaded` and
    /// `Retry-After`.
    pub request_wait: Duration,
    /// The object store served under `/v1/namespaces/...` and `/v1/cluster/...`; `None`: those
    /// endpoints answer 404.
    pub objects: Option<Arc<crate::objects::sqlite::SqliteObjects>>,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            tokens: None,
            require_credentials: false,
            max_body: MAX_BODY_BYTES,
            max_connections: 1024,
            max_concurrent_requests: 64,
            request_wait: Duration::from_secs(5),
            objects: None,
        }
    }
}

/// The state every handler can reach.
#[derive(Debug, Clone)]
struct ApiState {
    hub: Hub,
    auth: Arc<ApiAuth>,
    turns: Arc<Turns>,
    objects: objects::Objects,
}

/// The bound on requests handled at once.
#[derive(Debug)]
struct Turns {
    slots: Arc<Semaphore>,
    wait: Duration,
}

impl FromRef<ApiState> for Arc<Turns> {
    fn from_ref(state: &ApiState) -> Self {
        Self::clone(&state.turns)
    }
}

/// A request's turn, handed to the handler so it can give it back early (before waiting for an
/// ACK, which costs nothing but time).
#[derive(Debug, Clone)]
struct Turn(Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>);

impl Turn {
    fn release(&self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

/// Routes that do not take a turn: they hold nothing (`/healthz`) or are long-lived streams
/// (bounded by the connection limit instead).
fn takes_no_turn(path: &str) -> bool {
    matches!(path, "/healthz" | "/v1/openapi.json" | "/v1/messages")
}

/// Waits for a turn (at most [`ApiOptions::request_wait`]), or refuses with 503.
async fn take_turn(
    State(turns): State<Arc<Turns>>,
    matched: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = matched.as_ref().map_or("", |m| m.as_str());
    if takes_no_turn(path) || objects::is_watch(path, req.uri().query()) {
        return next.run(req).await;
    }
    let slot = tokio::time::timeout(turns.wait, Arc::clone(&turns.slots).acquire_owned()).await;
    let Ok(Ok(slot)) = slot else {
        let mut resp = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the cloud API is handling as many requests as it may; retry later",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return resp;
    };
    let turn = Turn(Arc::new(std::sync::Mutex::new(Some(slot))));
    req.extensions_mut().insert(turn.clone());
    let resp = next.run(req).await;
    turn.release();
    resp
}

impl FromRef<ApiState> for Hub {
    fn from_ref(state: &ApiState) -> Self {
        state.hub.clone()
    }
}

impl FromRef<ApiState> for Arc<ApiAuth> {
    fn from_ref(state: &ApiState) -> Self {
        Self::clone(&state.auth)
    }
}

/// What the authorisation layer needs.
#[derive(Debug)]
struct ApiAuth {
    tokens: Option<Arc<TokenStore>>,
    require_credentials: bool,
}

/// The API's routes over `hub`, accepting bodies up to [`MAX_BODY_BYTES`], open (no credentials).
pub fn router(hub: Hub) -> Router {
    router_with_options(hub, ApiOptions::default())
}

/// [`router`] with another body limit (larger bodies get 413 with a JSON error).
pub fn router_with_body_limit(hub: Hub, max_body: usize) -> Router {
    router_with_options(
        hub,
        ApiOptions {
            max_body,
            ..ApiOptions::default()
        },
    )
}

/// The API's routes over `hub` as `options` say. Serve it with connection info
/// ([`bootstrap::PeerInfo`]) for client certificates to count.
pub fn router_with_options(hub: Hub, options: ApiOptions) -> Router {
    let state = ApiState {
        hub,
        auth: Arc::new(ApiAuth {
            tokens: options.tokens,
            require_credentials: options.require_credentials,
        }),
        turns: Arc::new(Turns {
            slots: Arc::new(Semaphore::new(options.max_concurrent_requests.max(1))),
            wait: options.request_wait,
        }),
        objects: objects::Objects(options.objects),
    };
    let (routes, _) = documented_routes().split_for_parts();
    routes
        // Layers run outside in: credentials first (cheap, and a stranger takes no turn).
        .route_layer(middleware::from_fn_with_state(state.clone(), take_turn))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(DefaultBodyLimit::max(options.max_body))
        .with_state(state)
}

/// Every route, each from a handler with its `#[utoipa::path]`: the router and the OpenAPI
/// document come from this one list, so neither can have what the other lacks.
fn documented_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_nodes))
        .routes(routes!(get_node))
        .routes(routes!(post_message))
        .routes(routes!(get_message, cancel_message))
        .routes(routes!(proxy_root))
        .routes(routes!(proxy_path))
        .routes(routes!(stream_messages))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(
            objects::put_namespaced,
            objects::get_namespaced,
            objects::delete_namespaced
        ))
        .routes(routes!(objects::list_namespaced, objects::post_namespaced))
        .routes(routes!(
            objects::put_cluster,
            objects::get_cluster,
            objects::delete_cluster
        ))
        .routes(routes!(objects::list_cluster, objects::post_cluster))
        .routes(routes!(metrics))
        .routes(routes!(healthz))
        .routes(routes!(openapi_json_handler))
}

/// The API's OpenAPI 3.1 document (what `/v1/openapi.json` serves; `docs/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = documented_routes().split_for_parts().1;
    // axum's catch-all `{*path}` is OpenAPI's `{path}` (a parameter that may hold `/`).
    let paths = std::mem::take(&mut doc.paths.paths);
    doc.paths.paths = paths
        .into_iter()
        .map(|(path, mut item)| {
            // One handler serving several methods names each operation alike; ids must differ.
            let ops = [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
                ("patch", &mut item.patch),
            ];
            let ids: Vec<_> = ops
                .iter()
                .filter_map(|(_, op)| op.as_ref().map(|o| o.operation_id.clone()))
                .collect();
            if ids
                .iter()
                .any(|id| ids.iter().filter(|other| *other == id).count() > 1)
            {
                for (method, op) in ops {
                    if let Some(op) = op.as_mut() {
                        let id = op.operation_id.take().unwrap_or_default();
                        op.operation_id = Some(format!("{id}_{method}"));
                    }
                }
            }
            (path.replace("{*", "{"), item)
        })
        .collect();
    doc
}

/// [`openapi`] as pretty JSON with a final newline, byte for byte `docs/openapi.json`.
pub fn openapi_json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| {
        let mut text = openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        text.push('\n');
        text
    })
}

/// Liveness: `ok` while the process serves.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    description = "Public: no credential needed.",
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain; charset=utf-8", example = "ok")))]
async fn healthz() -> &'static str {
    "ok"
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations", security(()),
    description = "Public: no credential needed (the document is the same for every cloudcore \
        of a version, and in the repository as docs/openapi.json).",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object, content_type = "application/json")))]
async fn openapi_json_handler() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

/// Serves the open API on `listener` (already bound) until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Hub,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_options(listener, hub, ApiOptions::default(), shutdown).await
}

/// Serves the API over plain HTTP on `listener` with `options` until `shutdown` completes.
pub async fn serve_with_options(
    listener: tokio::net::TcpListener,
    hub: Hub,
    options: ApiOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = ConnLimit::new(listener, options.max_connections);
    let app = router_with_options(hub, options).into_make_service_with_connect_info::<PeerInfo>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves the API over HTTPS on `listener` with `tls` (from `transport::tls::api_server_config`)
/// and `options` until `shutdown` completes. Client certificates verified by TLS count as
/// credentials.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    hub: Hub,
    options: ApiOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = TlsListener::named(
        listener,
        tls,
        handshake_timeout,
        "cloud API",
        Some(options.max_connections),
    )?;
    let app = router_with_options(hub, options).into_make_service_with_connect_info::<PeerInfo>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, ConnLimit<tokio::net::TcpListener>>>
    for PeerInfo
{
    fn connect_info(stream: IncomingStream<'_, ConnLimit<tokio::net::TcpListener>>) -> Self {
        Self {
            remote: *stream.remote_addr(),
            client_cert: None,
        }
    }
}

/// The scope a route needs; `None`: public.
fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    match path {
        "/healthz" | "/v1/openapi.json" => None,
        p if p.starts_with("/v1/api-tokens") => Some(Scope::Admin),
        // A proxied GET makes the node act as much as a POST does.
        p if p.starts_with("/v1/nodes/{id}/proxy/") => Some(Scope::Send),
        _ if method == Method::GET || method == Method::HEAD => Some(Scope::Read),
        _ => Some(Scope::Send),
    }
}

/// A 401 with the challenge of RFC 6750 (`invalid_token` when one was presented).
fn unauthorized(code: &str, msg: &str, presented: bool) -> Response {
    let mut resp = error(StatusCode::UNAUTHORIZED, code, msg);
    let challenge = if presented {
        "Bearer realm=\"causeway\", error=\"invalid_token\""
    } else {
        "Bearer realm=\"causeway\""
    };
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static(challenge),
    );
    resp
}

/// The authorisation layer: finds the request's credential, checks its scope, and hands the
/// [`Principal`] to the handler. Logs refusals with the peer and the reason, never the token.
async fn authorize(
    State(auth): State<Arc<ApiAuth>>,
    matched: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = matched.as_ref().map_or("", |m| m.as_str()).to_owned();
    let Some(needed) = required_scope(req.method(), &path) else {
        return next.run(req).await;
    };
    let required = match &auth.tokens {
        _ if auth.require_credentials => true,
        None => false,
        Some(tokens) => match tokens.any() {
            Ok(any) => any,
            Err(e) => {
                tracing::error!(error = %e, "cloud API: cannot read the token file; refusing");
                return store_error(e);
            }
        },
    };
    if !required {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<PeerInfo>>()
        .map(|c| &c.0);
    let remote = peer.map(|p| p.remote.to_string()).unwrap_or_default();
    let refuse = |reason: &str| {
        tracing::info!(%remote, method = %req.method(), %path, reason, "cloud API request refused");
    };
    let principal = match req.headers().get(header::AUTHORIZATION) {
        Some(value) => {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim());
            let Some(token) = token else {
                refuse("malformed Authorization header");
                return unauthorized(
                    "unauthenticated",
                    "malformed Authorization header (expected \"Bearer <token>\")",
                    true,
                );
            };
            let verdict = match &auth.tokens {
                Some(tokens) => tokens.verify(token),
                None => Ok(TokenVerdict::Unknown),
            };
            match verdict {
                Ok(TokenVerdict::Valid(p)) => p,
                Ok(TokenVerdict::Unknown) => {
                    refuse("unknown API token");
                    return unauthorized("invalid_token", "unknown API token", true);
                }
                Ok(TokenVerdict::Revoked(name)) => {
                    refuse(&format!("revoked API token {name:?}"));
                    return unauthorized("invalid_token", "this API token was revoked", true);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cloud API: cannot read the token file; refusing");
                    return store_error(e);
                }
            }
        }
        None => match peer.and_then(|p| p.client_cert.as_ref()) {
            Some(cert) => match principal_from_cert(cert) {
                Ok(p) => p,
                Err(why) => {
                    refuse(&why);
                    return unauthorized("unauthenticated", &why, false);
                }
            },
            None => {
                refuse("no credentials");
                return unauthorized(
                    "unauthenticated",
                    "this endpoint needs credentials: Authorization: Bearer <API token>, \
                     or an API client certificate",
                    false,
                );
            }
        },
    };
    if !principal.scope.allows(needed) {
        refuse(&format!(
            "{:?} has scope {}, needs {needed}",
            principal.name, principal.scope
        ));
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "credential {:?} has scope {}; this endpoint needs {needed}",
                principal.name, principal.scope
            ),
        );
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Body of `POST /v1/api-tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    /// Unique among live tokens: 1 to 64 of `A-Z a-z 0-9 . _ -`.
    name: String,
    /// `read`, `send` or `admin`.
    scope: Scope,
}

fn no_token_file() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "this API has no token file",
    )
}

fn token_error(e: AuthStoreError) -> Response {
    match e {
        AuthStoreError::BadName(_) | AuthStoreError::BadScope(_) => {
            error(StatusCode::BAD_REQUEST, "bad_body", e)
        }
        AuthStoreError::NameTaken(_) => error(StatusCode::CONFLICT, "name_taken", e),
        AuthStoreError::NoSuchToken(_) => error(StatusCode::NOT_FOUND, "unknown_token", e),
        e => store_error(e),
    }
}

/// The API tokens: names, scopes, times (never the tokens).
#[utoipa::path(get, path = "/v1/api-tokens", tag = "tokens",
    description = "Scope: admin.",
    responses((status = 200, description = "Every token, live and revoked, oldest first", body = [TokenInfo]),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 503, description = "`overloaded`: too many requests at once; retry after the `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32))), (status = 500, description = "`store_error`: the store failed", body = ErrorBody)))]
async fn list_tokens(State(auth): State<Arc<ApiAuth>>) -> Response {
    let Some(tokens) = &auth.tokens else {
        return no_token_file();
    };
    match tokens.list() {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => token_error(e),
    }
}

/// Creates an API token; the answer holds it, once.
#[utoipa::path(post, path = "/v1/api-tokens", tag = "tokens",
    description = "Scope: admin.",
    request_body = crate::api_doc::CreateTokenBody,
    responses((status = 201, description = "Created", body = crate::api_doc::CreatedToken),
        (status = 400, description = "`bad_body`: not `{name, scope}`, or an invalid name or scope", body = ErrorBody),
        (status = 409, description = "`name_taken`: a live token has this name", body = ErrorBody),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 503, description = "`overloaded`: too many requests at once; retry after the `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32))), (status = 500, description = "`store_error`: the store failed", body = ErrorBody)))]
async fn create_token(
    State(auth): State<Arc<ApiAuth>>,
    by: Option<Extension<Principal>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(tokens) = &auth.tokens else {
        return no_token_file();
    };
    // JSON whatever the Content-Type says, as the message endpoint reads its body.
    let body: CreateToken = match body.map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("expected {{\"name\": \"...\", \"scope\": \"read|send|admin\"}}: {e}"),
            );
        }
        Err(e) => return error(e.status(), "bad_body", e.body_text()),
    };
    match tokens.create(&body.name, body.scope) {
        Ok((token, info)) => {
            let by = by.map(|p| p.0.name);
            tracing::info!(name = %info.name, scope = %info.scope, by = ?by, "API token created");
            let mut out = json!(info);
            out["token"] = json!(token);
            (StatusCode::CREATED, axum::Json(out)).into_response()
        }
        Err(e) => token_error(e),
    }
}

/// Revokes an API token: refused from the next request on; it stays listed as revoked.
#[utoipa::path(delete, path = "/v1/api-tokens/{name}", tag = "tokens",
    description = "Scope: admin.",
    params(("name" = String, Path, description = "The token's name")),
    responses((status = 200, description = "Revoked", body = TokenInfo),
        (status = 404, description = "`unknown_token`: no live token has this name", body = ErrorBody),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 503, description = "`overloaded`: too many requests at once; retry after the `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32))), (status = 500, description = "`store_error`: the store failed", body = ErrorBody)))]
async fn revoke_token(
    State(auth): State<Arc<ApiAuth>>,
    by: Option<Extension<Principal>>,
    Path(name): Path<String>,
) -> Response {
    let Some(tokens) = &auth.tokens else {
        return no_token_file();
    };
    match tokens.revoke(&name) {
        Ok(info) => {
            let by = by.map(|p| p.0.name);
            tracing::info!(name = %info.name, by = ?by, "API token revoked");
            axum::Json(info).into_response()
        }
        Err(e) => token_error(e),
    }
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

/// Every node the cloud knows, connected or not.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    description = "Scope: read.",
    responses((status = 200, description = "The nodes", body = [NodeView]),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 503, description = "`overloaded`: too many requests at once; retry after the `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32))), (status = 500, description = "`store_error`: the store failed", body = ErrorBody)))]
async fn list_nodes(State(hub): State<Hub>) -> Response {
    match hub.nodes().await {
        Ok(nodes) => axum::Json(nodes).into_response(),
        Err(e) => store_error(e),
    }
}

/// One node.
#[utoipa::path(get, path = "/v1/nodes/{id}", tag = "nodes",
    description = "Scope: read.",
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, description = "The node", body = NodeView),
        (status = 404, description = "`unknown_node`: it never connected", body = ErrorBody),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 503, description = "`overloaded`: too many requests at once; retry after the `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32))), (status = 500, description = "`store_error`: the store failed", body = ErrorBody)))]
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
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PostQuery {
    /// `ack`: wait (hold the request) until the edge acknowledges the message, or the timeout.
    wait: Option<String>,
    /// How long `wait=ack` waits: `10s` (default), `500ms`, `2m` or plain seconds; at most 300 s.
    timeout: Option<String>,
    /// Whether the edge must ACK it (and the cloud resend until it does), overriding KubeEdge's
    /// classification by route.
    ack: Option<bool>,
}

/// Queues a message for a node, durably; optionally waits for the edge's ACK.
#[utoipa::path(post, path = "/v1/nodes/{id}/messages", tag = "messages",
    description = "Scope: send. The node must have connected once (it may be offline now: the \
        message waits in its queue). `header.msg_id` and `header.timestamp` are filled in if \
        absent; a POST repeating a queued id is answered with `duplicate: true` and stores \
        nothing (retry safely). Whether the edge must ACK follows KubeEdge's rules unless `ack` \
        says; unacknowledged messages are resent.",
    params(("id" = String, Path, description = "Node id"), PostQuery),
    request_body(content = crate::api_doc::KubeEdgeMessage, description = "A KubeEdge message (JSON); `route.group` and `route.operation` are required"),
    responses(
        (status = 202, description = "Queued (with `wait=ack`: queued, and not acknowledged within the timeout: `acked: false`)", body = crate::api_doc::PostAnswer),
        (status = 200, description = "With `wait=ack`: acknowledged (`acked: true`), or refused by the edge (`acked: false, failed: true, error`: it could not deliver the message; it failed and is not resent)", body = crate::api_doc::PostAnswer),
        (status = 400, description = "`bad_query`, `bad_body`, `malformed_message` (not a KubeEdge JSON message) or `missing_route`", body = ErrorBody),
        (status = 404, description = "`unknown_node`: it never connected", body = ErrorBody),
        (status = 413, description = "`too_large`: the body is over 32 MiB", body = ErrorBody),
        (status = 503, description = "`queue_full`: the node's queue is at its bound, or `overloaded`; retry after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32))),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 500, description = "`store_error`: the store failed", body = ErrorBody)))]
async fn post_message(
    State(hub): State<Hub>,
    turn: Option<Extension<Turn>>,
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
        // Nothing was stored; the store logs the episode once.
        Err(SendError::Store(e)) if e.is_disk_full() => {
            let mut resp = error(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", e);
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
        match hub.message_state(&node, &id).await {
            Ok(Some(MessageState::Acked { at_ms })) => {
                out["acked"] = json!(true);
                out["acked_at_ms"] = json!(at_ms);
                return (StatusCode::OK, axum::Json(out)).into_response();
            }
            Ok(Some(MessageState::Failed { reason, .. })) => {
                return edge_refused(out, &reason);
            }
            Ok(Some(MessageState::Cancelled { .. })) => return operator_cancelled(out),
            _ => {}
        }
    }
    // Queued: waiting for the edge holds no turn from other requests.
    if let Some(Extension(turn)) = &turn {
        turn.release();
    }
    match waiter.wait(timeout).await {
        Some(AckInfo {
            failed: Some(reason),
            ..
        }) => edge_refused(out, &reason),
        Some(AckInfo {
            cancelled: true, ..
        }) => operator_cancelled(out),
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

/// `wait=ack` for a message the edge answered with an error (it could not deliver it): 200,
/// since the wait did end with the edge's terminal answer; `failed` and `error` say which.
fn edge_refused(mut out: Value, reason: &str) -> Response {
    out["acked"] = json!(false);
    out["failed"] = json!(true);
    out["error"] = json!(reason);
    (StatusCode::OK, axum::Json(out)).into_response()
}

/// `wait=ack` for a message the operator cancelled (`DELETE`): 200, since the wait ended for
/// good; `cancelled` says why.
fn operator_cancelled(mut out: Value) -> Response {
    out["acked"] = json!(false);
    out["cancelled"] = json!(true);
    (StatusCode::OK, axum::Json(out)).into_response()
}

/// Default and longest wait of a proxy call for the node's answer (`X-Causeway-Timeout`). Longer
/// than the edge's own call timeout (10 s by default), so the edge's 504 names the service.
const DEFAULT_PROXY_WAIT: Duration = Duration::from_secs(30);
/// Largest request body a proxy call carries (base64 in a message, under the transport's cap).
pub const MAX_PROXY_BODY_BYTES: usize = 8 * 1024 * 1024;
/// The request header that sets a proxy call's wait; not forwarded.
const PROXY_TIMEOUT_HEADER: &str = "x-causeway-timeout";

/// Calls `/` of a service on the node: see [`proxy_path`].
#[utoipa::path(method(get, post, put, patch, delete),
    path = "/v1/nodes/{id}/proxy/{port}", tag = "proxy",
    description = "Scope: send (whatever the method). The same as \
        `/v1/nodes/{id}/proxy/{port}/{path}` with the path `/`.",
    params(("id" = String, Path, description = "Node id"),
        ("port" = u16, Path, description = "The service's port on the node (one of its allowed targets)"),
        ("X-Causeway-Timeout" = Option<String>, Header, description = "How long to wait for the node's answer: `30s` (default), `500ms`, `2m`; at most 300 s. Not forwarded")),
    request_body(content = Vec<u8>, description = "Forwarded as is", content_type = "*/*"),
    responses(
        (status = 200, description = "The service's answer: its status (any), headers and body. Answers the edge makes itself carry `Server: causeway-edgecore` and an `ErrorBody`: 400 `bad_request`, 403 `target_not_allowed`, 502 `connection_refused` / `connect_failed` / `response_too_large` / `bad_response`, 503 `busy`, 504 `timeout`", body = Vec<u8>, content_type = "*/*"),
        (status = 503, description = "`node_offline`: the node is not connected (calls are not queued), `queue_full`, or `overloaded`; retry after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32))),
        (status = 400, description = "`bad_target`: the port or path cannot be a servicebus resource", body = ErrorBody),
        (status = 404, description = "`unknown_node`: it never connected", body = ErrorBody),
        (status = 413, description = "`too_large`: the request body is over 8 MiB", body = ErrorBody),
        (status = 502, description = "`bad_reply`: the node answered something that is not an HTTPResponse", body = ErrorBody),
        (status = 504, description = "`edge_timeout`: the node did not answer in time (is its servicebus enabled?)", body = ErrorBody),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 500, description = "`store_error`: the store failed", body = ErrorBody)))]
async fn proxy_root(
    State(hub): State<Hub>,
    turn: Option<Extension<Turn>>,
    Path((node, port)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    proxy(
        hub,
        turn,
        node,
        port,
        "/".to_owned(),
        method,
        uri,
        headers,
        body,
    )
    .await
}

/// Calls an HTTP service on the node through its servicebus and answers with the service's
/// status, headers and body.
#[utoipa::path(method(get, post, put, patch, delete),
    path = "/v1/nodes/{id}/proxy/{port}/{*path}", tag = "proxy",
    description = "Scope: send (whatever the method). The cloud sends the node KubeEdge's \
        servicebus request (op = the method, resource `<port>:/<path>?<query>`, content \
        HTTPRequest) and waits for its `upload` reply. The node calls `<allowed target with \
        that port>/<path>?<query>` with the method, the headers (but `Authorization`, which is \
        this API's, hop-by-hop headers and `X-Causeway-Timeout`) and the body. Nothing is \
        queued: an offline node is 503 at once, and a call that times out is taken out of the \
        node's queue if it was not sent yet. The edge's own refusals (a port it does not \
        allow, a refused connection, its timeout, an oversized answer) carry \
        `Server: causeway-edgecore` and an ErrorBody.",
    params(("id" = String, Path, description = "Node id"),
        ("port" = u16, Path, description = "The service's port on the node (one of its allowed targets)"),
        ("path" = String, Path, description = "The path on the service (may contain `/`); the query string is passed on"),
        ("X-Causeway-Timeout" = Option<String>, Header, description = "How long to wait for the node's answer: `30s` (default), `500ms`, `2m`; at most 300 s. Not forwarded")),
    request_body(content = Vec<u8>, description = "Forwarded as is", content_type = "*/*"),
    responses(
        (status = 200, description = "The service's answer: its status (any), headers and body. Answers the edge makes itself carry `Server: causeway-edgecore` and an `ErrorBody`: 400 `bad_request`, 403 `target_not_allowed`, 502 `connection_refused` / `connect_failed` / `response_too_large` / `bad_response`, 503 `busy`, 504 `timeout`", body = Vec<u8>, content_type = "*/*"),
        (status = 400, description = "`bad_target`: the port or path cannot be a servicebus resource; `bad_query` for a bad `X-Causeway-Timeout`", body = ErrorBody),
        (status = 404, description = "`unknown_node`: it never connected", body = ErrorBody),
        (status = 413, description = "`too_large`: the request body is over 8 MiB", body = ErrorBody),
        (status = 502, description = "`bad_reply`: the node answered something that is not an HTTPResponse", body = ErrorBody),
        (status = 503, description = "`node_offline`: the node is not connected (calls are not queued), `queue_full`, or `overloaded`; retry after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32))),
        (status = 504, description = "`edge_timeout`: the node did not answer in time (is its servicebus enabled?)", body = ErrorBody),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 500, description = "`store_error`: the store failed", body = ErrorBody)))]
async fn proxy_path(
    State(hub): State<Hub>,
    turn: Option<Extension<Turn>>,
    Path((node, port, path)): Path<(String, String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let path = format!("/{path}");
    proxy(hub, turn, node, port, path, method, uri, headers, body).await
}

/// Both proxy routes: checks the call, hands it to [`Hub::proxy`] and writes the answer.
#[allow(clippy::too_many_arguments)]
async fn proxy(
    hub: Hub,
    turn: Option<Extension<Turn>>,
    node: String,
    port: String,
    path: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) if b.len() > MAX_PROXY_BODY_BYTES => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("a proxied request body may be at most {MAX_PROXY_BODY_BYTES} bytes"),
            );
        }
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
    let timeout = match headers
        .get(PROXY_TIMEOUT_HEADER)
        .map(|v| v.to_str().ok().and_then(parse_duration))
    {
        None => DEFAULT_PROXY_WAIT,
        Some(Some(d)) if !d.is_zero() && d <= MAX_WAIT => d,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!(
                    "{PROXY_TIMEOUT_HEADER} must be a duration such as 30s or 500ms, above 0 \
                     and at most {MAX_WAIT:?}"
                ),
            );
        }
    };
    let path = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let target = match proto::http::ServiceTarget::parse(&format!("{port}:{path}")) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_target", e),
    };
    let mut forwarded = proto::http::HeaderValues::new();
    for (name, value) in &headers {
        let name = name.as_str();
        if proto::http::is_hop_by_hop(name)
            || name == header::AUTHORIZATION.as_str()
            || name == PROXY_TIMEOUT_HEADER
        {
            continue;
        }
        let Ok(value) = value.to_str() else { continue };
        forwarded
            .entry(proto::http::canonical_header_name(name))
            .or_default()
            .push(value.to_owned());
    }
    let request = proto::http::HttpRequest {
        header: forwarded,
        body: body.to_vec(),
        method: method.as_str().to_owned(),
        url: String::new(),
    };
    // Waiting for the node holds no turn from other requests.
    if let Some(Extension(turn)) = &turn {
        turn.release();
    }
    match hub.proxy(&node, &target, request, timeout).await {
        Ok(answer) => proxied_response(&node, answer),
        Err(e) => proxy_error(e),
    }
}

/// The node's answer as this API's response: status, end-to-end headers, body.
fn proxied_response(node: &str, answer: proto::http::HttpResponse) -> Response {
    let Ok(status) = StatusCode::from_u16(answer.status_code) else {
        return error(
            StatusCode::BAD_GATEWAY,
            "bad_reply",
            format!("node {node:?} answered with status {}", answer.status_code),
        );
    };
    let mut resp = (status, answer.body).into_response();
    let out = resp.headers_mut();
    out.remove(header::CONTENT_TYPE);
    for (name, values) in &answer.header {
        if proto::http::is_hop_by_hop(name) {
            continue;
        }
        let Ok(name) = header::HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        for value in values {
            if let Ok(value) = header::HeaderValue::from_str(value) {
                out.append(name.clone(), value);
            }
        }
    }
    resp
}

fn proxy_error(e: ProxyError) -> Response {
    let retry_after = |mut resp: Response, secs: &'static str| {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static(secs));
        resp
    };
    match e {
        ProxyError::UnknownNode(_) => error(StatusCode::NOT_FOUND, "unknown_node", e),
        ProxyError::NodeOffline(_) => retry_after(
            error(StatusCode::SERVICE_UNAVAILABLE, "node_offline", e),
            "5",
        ),
        ProxyError::TooManyCalls => {
            retry_after(error(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e), "1")
        }
        ProxyError::QueueFull(_) => {
            retry_after(error(StatusCode::SERVICE_UNAVAILABLE, "queue_full", e), "5")
        }
        ProxyError::Store(s) if s.is_disk_full() => retry_after(
            error(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", s),
            "5",
        ),
        ProxyError::Store(s) => store_error(s),
        ProxyError::Timeout { .. } => error(StatusCode::GATEWAY_TIMEOUT, "edge_timeout", e),
        ProxyError::BadReply { .. } => error(StatusCode::BAD_GATEWAY, "bad_reply", e),
    }
}

/// Where a queued message stands.
#[utoipa::path(get, path = "/v1/nodes/{id}/messages/{msg_id}", tag = "messages",
    description = "Scope: read.",
    params(("id" = String, Path, description = "Node id"), ("msg_id" = String, Path, description = "Message id")),
    responses((status = 200, description = "Its state", body = crate::api_doc::MessageStatus),
        (status = 404, description = "`unknown_message`: unknown, or acked long ago", body = ErrorBody),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 503, description = "`overloaded`: too many requests at once; retry after the `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32))), (status = 500, description = "`store_error`: the store failed", body = ErrorBody)))]
async fn get_message(
    State(hub): State<Hub>,
    Path((node, msg_id)): Path<(String, String)>,
) -> Response {
    match hub.message_state(&node, &msg_id).await {
        Ok(Some(state)) => axum::Json(status_json(&node, &msg_id, &state)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_message",
            format!("no message {msg_id:?} for node {node:?} (unknown, or acked long ago)"),
        ),
        Err(e) => store_error(e),
    }
}

/// Cancels a queued message: the operator's way out for a message the edge never acknowledges
/// (a stock KubeEdge edge drops what it cannot route, without an answer).
#[utoipa::path(delete, path = "/v1/nodes/{id}/messages/{msg_id}", tag = "messages",
    description = "Scope: send. A pending or in-flight (awaiting its ACK) message leaves the \
        queue for good: it is never sent or resent, its resource's later messages proceed, a \
        `wait=ack` waiting for it returns at once with `cancelled: true`, and an ACK that still \
        comes for it changes nothing. It is kept as `cancelled` for ten minutes (GET shows it). \
        Cancelling a cancelled message again answers the same 200. A message written to the \
        edge before the cancel may still have been delivered there.",
    params(("id" = String, Path, description = "Node id"), ("msg_id" = String, Path, description = "Message id")),
    responses((status = 200, description = "Cancelled (`state: cancelled`)", body = crate::api_doc::MessageStatus),
        (status = 404, description = "`unknown_message`: unknown, or ended long ago", body = ErrorBody),
        (status = 409, description = "`already_acked` or `already_failed`: it had already ended; nothing changed", body = ErrorBody),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 503, description = "`overloaded`: too many requests at once; retry after the `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32))), (status = 500, description = "`store_error`: the store failed", body = ErrorBody)))]
async fn cancel_message(
    State(hub): State<Hub>,
    Path((node, msg_id)): Path<(String, String)>,
) -> Response {
    match hub.cancel(&node, &msg_id).await {
        Ok(Cancelled::Now { .. }) => match hub.message_state(&node, &msg_id).await {
            Ok(Some(state)) => axum::Json(status_json(&node, &msg_id, &state)).into_response(),
            Ok(None) => error(
                StatusCode::NOT_FOUND,
                "unknown_message",
                format!("message {msg_id:?} for node {node:?} vanished after its cancel"),
            ),
            Err(e) => store_error(e),
        },
        Ok(Cancelled::Already(state @ MessageState::Cancelled { .. })) => {
            axum::Json(status_json(&node, &msg_id, &state)).into_response()
        }
        Ok(Cancelled::Already(MessageState::Acked { at_ms })) => error(
            StatusCode::CONFLICT,
            "already_acked",
            format!(
                "message {msg_id:?} for node {node:?} was already acknowledged by the edge \
                 (at {at_ms} ms); nothing to cancel"
            ),
        ),
        Ok(Cancelled::Already(MessageState::Failed { reason, .. })) => error(
            StatusCode::CONFLICT,
            "already_failed",
            format!(
                "message {msg_id:?} for node {node:?} already failed (the edge refused it: \
                 {reason}); nothing to cancel"
            ),
        ),
        // Open states are never `Already`; answered as a conflict all the same.
        Ok(Cancelled::Already(_)) => error(
            StatusCode::CONFLICT,
            "already_acked",
            format!("message {msg_id:?} for node {node:?} cannot be cancelled now"),
        ),
        Ok(Cancelled::Unknown) => error(
            StatusCode::NOT_FOUND,
            "unknown_message",
            format!("no message {msg_id:?} for node {node:?} (unknown, or ended long ago)"),
        ),
        Err(e) => store_error(e),
    }
}

/// The JSON of a message's state (`api_doc::MessageStatus`).
fn status_json(node: &str, msg_id: &str, state: &MessageState) -> Value {
    let name = match state {
        MessageState::Pending => "pending",
        MessageState::InFlight { .. } => "in_flight",
        MessageState::Acked { .. } => "acked",
        MessageState::Failed { .. } => "failed",
        MessageState::Cancelled { .. } => "cancelled",
    };
    let mut out = json!({ "id": msg_id, "node": node, "state": name });
    match state {
        MessageState::Pending => {}
        MessageState::InFlight { attempts } => out["attempts"] = json!(attempts),
        MessageState::Acked { at_ms } => out["acked_at_ms"] = json!(at_ms),
        MessageState::Failed { at_ms, reason } => {
            out["failed_at_ms"] = json!(at_ms);
            out["error"] = json!(reason);
        }
        MessageState::Cancelled { at_ms } => out["cancelled_at_ms"] = json!(at_ms),
    }
    out
}

/// Counters and gauges in Prometheus' text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    description = "Scope: read.",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody), (status = 503, description = "`overloaded`: too many requests at once; retry after the `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u32)))))]
async fn metrics(State(hub): State<Hub>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics_text().await,
    )
        .into_response()
}

/// Query of `GET /v1/messages`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StreamQuery {
    /// Only this node's messages.
    node: Option<String>,
    /// Only messages of this route group.
    group: Option<String>,
    /// Replay from after this log sequence (0: everything retained).
    since: Option<u64>,
}

/// Messages from the nodes (upstream), as Server-Sent Events.
#[utoipa::path(get, path = "/v1/messages", tag = "messages",
    description = "Scope: read. A `text/event-stream` of events `event: message`, `id: <seq>`, \
        `data: <UpstreamEvent JSON>` (one line), with keep-alive comments. Without `since` or \
        `Last-Event-ID` only new messages come; with either, the retained log is replayed from \
        after that sequence first, then the live feed follows, with nothing missed or repeated.",
    params(StreamQuery, ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this sequence (what an EventSource sends on reconnect); wins over `since`")),
    responses((status = 200, description = "The stream; each event's data is an `UpstreamEvent`", body = String, content_type = "text/event-stream",
            example = "event: message\nid: 7\ndata: {\"seq\":7,\"node\":\"edge-1\",\"accepted_ms\":1765123456789,\"message\":{...}}\n\n"),
        (status = 400, description = "`bad_query`", body = ErrorBody),
        (status = 401, description = "No usable credential", body = ErrorBody, headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"causeway\"`"))), (status = 403, description = "The credential's scope is too small", body = ErrorBody)))]
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
