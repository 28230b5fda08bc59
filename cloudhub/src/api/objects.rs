//! The object endpoints of the cloud API ([`crate::objects`]): the desired state of the nodes'
//! objects, Kubernetes-shaped.
//!
//! | Method & path | Scope | What |
//! |---|---|---|
//! | `PUT /v1/namespaces/{ns}/{resource}/{name}` | send | create or replace (201 / 200); `metadata.resourceVersion` makes it conditional (409 if stale) |
//! | `POST /v1/namespaces/{ns}/{resource}` | send | create, the name from `metadata.name` (409 if it exists) |
//! | `GET /v1/namespaces/{ns}/{resource}/{name}` | read | one object |
//! | `DELETE /v1/namespaces/{ns}/{resource}/{name}` | send | delete; answers the deleted object with the deletion's resourceVersion |
//! | `GET /v1/namespaces/{ns}/{resource}?labelSelector=` | read | list (`{"kind": "...List", "metadata": {"resourceVersion"}, "items"}`) |
//! | `GET /v1/namespaces/{ns}/{resource}?watch=true&resourceVersion=N` | read | watch as Server-Sent Events from after `N` |
//! | the same under `/v1/cluster/{resource}[/{name}]` | | cluster-scoped resources (`nodes`, `namespaces`) |
//!
//! Cluster-scoped objects live under `/v1/cluster/...` rather than `/v1/{resource}/...`, which
//! would shadow (and be shadowed by) the API's own `/v1/nodes/{id}`, `/v1/messages` and
//! `/v1/api-tokens/{name}`.

// A refusal here is the answer itself, handed straight back to axum: boxing it buys nothing.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use utoipa::IntoParams;

use super::{ApiState, error};
use crate::api_doc::ErrorBody;
use crate::objects::sqlite::{PutOutcome, SqliteObjects};
use crate::objects::{
    Change, ChangeKind, ObjectError, ObjectKind, ObjectSource, Selector, StoredObject, model,
};

/// Objects replayed per step of a watch.
const REPLAY_BATCH: usize = 512;

/// The object store, if this API serves one.
#[derive(Debug, Clone)]
pub(super) struct Objects(pub(super) Option<Arc<SqliteObjects>>);

impl axum::extract::FromRef<ApiState> for Objects {
    fn from_ref(state: &ApiState) -> Self {
        state.objects.clone()
    }
}

/// Query of a list or watch.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only objects whose labels match: `a=b`, `a!=b`, `a`, `!a`, comma-separated.
    label_selector: Option<String>,
    /// `true`: a watch (Server-Sent Events) instead of a list.
    watch: Option<bool>,
    /// For a watch: replay every change after this version first (absent: only new changes).
    resource_version: Option<String>,
}

fn object_error(e: &ObjectError) -> Response {
    let (status, code) = e.status_code();
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, code, e)
}

fn kind_of(resource: &str, namespaced: bool) -> Result<&'static ObjectKind, Response> {
    match model::kind_by_resource(resource) {
        Some(k) if k.namespaced == namespaced => Ok(k),
        Some(k) if k.namespaced => Err(error(
            StatusCode::NOT_FOUND,
            "unknown_resource",
            format!("{resource} are namespaced: use /v1/namespaces/{{ns}}/{resource}"),
        )),
        Some(_) => Err(error(
            StatusCode::NOT_FOUND,
            "unknown_resource",
            format!("{resource} are cluster-scoped: use /v1/cluster/{resource}"),
        )),
        None => Err(object_error(&ObjectError::UnknownResource(
            resource.to_owned(),
        ))),
    }
}

fn store(objects: &Objects) -> Result<&Arc<SqliteObjects>, Response> {
    objects.0.as_ref().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this cloud API serves no object store",
        )
    })
}

/// Reads the body as JSON whatever the Content-Type says (as the message endpoint does).
fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, Response> {
    let bytes = match body {
        Ok(b) => b,
        Err(e) => {
            let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "bad_body"
            };
            return Err(error(e.status(), code, e.body_text()));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("the body is not JSON: {e}"),
        )
    })
}

async fn put(objects: Objects, ns: &str, resource: &str, name: &str, body: Value) -> Response {
    let (store, kind) = match (store(&objects), kind_of(resource, !ns.is_empty())) {
        (Ok(s), Ok(k)) => (Arc::clone(s), k),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let (ns, name) = (ns.to_owned(), name.to_owned());
    let done = tokio::task::spawn_blocking(move || store.put(kind, &ns, &name, body)).await;
    match done {
        Ok(Ok((object, outcome))) => {
            let status = if outcome == PutOutcome::Created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, axum::Json(object.body)).into_response()
        }
        Ok(Err(e)) => object_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "store_error", e),
    }
}

async fn create(objects: Objects, ns: &str, resource: &str, body: Value) -> Response {
    let name = match body["metadata"]["name"].as_str() {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_object",
                "metadata.name is required: the object has no name",
            );
        }
    };
    if let Ok(s) = store(&objects) {
        if let Ok(kind) = kind_of(resource, !ns.is_empty()) {
            if let Ok(Some(_)) = ObjectSource::get(s.as_ref(), kind.resource, ns, &name) {
                return error(
                    StatusCode::CONFLICT,
                    "already_exists",
                    format!("{resource} {name:?} already exists; PUT it to replace it"),
                );
            }
        }
    }
    put(objects, ns, resource, &name, body).await
}

async fn get_one(objects: Objects, ns: &str, resource: &str, name: &str) -> Response {
    let (store, kind) = match (store(&objects), kind_of(resource, !ns.is_empty())) {
        (Ok(s), Ok(k)) => (s, k),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    match ObjectSource::get(store.as_ref(), kind.resource, ns, name) {
        Ok(Some(o)) => axum::Json(o.body).into_response(),
        Ok(None) => object_error(&ObjectError::NotFound(format!("{resource} {name:?}"))),
        Err(e) => object_error(&e),
    }
}

async fn delete_one(objects: Objects, ns: &str, resource: &str, name: &str) -> Response {
    let (store, kind) = match (store(&objects), kind_of(resource, !ns.is_empty())) {
        (Ok(s), Ok(k)) => (Arc::clone(s), k),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let (ns, name) = (ns.to_owned(), name.to_owned());
    match tokio::task::spawn_blocking(move || store.delete(kind, &ns, &name)).await {
        Ok(Ok(o)) => axum::Json(o.body).into_response(),
        Ok(Err(e)) => object_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "store_error", e),
    }
}

async fn list_or_watch(
    objects: Objects,
    ns: Option<&str>,
    resource: &str,
    headers: &HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
    };
    let (store, kind) = match (store(&objects), kind_of(resource, ns.is_some())) {
        (Ok(s), Ok(k)) => (Arc::clone(s), k),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let selector = match Selector::parse(query.label_selector.as_deref().unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return object_error(&e),
    };
    if query.watch != Some(true) {
        return match store.list(kind, ns, &selector) {
            Ok((items, rv)) => axum::Json(json!({
                "apiVersion": kind.api_version,
                "kind": format!("{}List", kind.kind),
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items.into_iter().map(|o| o.body).collect::<Vec<_>>(),
            }))
            .into_response(),
            Err(e) => object_error(&e),
        };
    }
    let last_event = headers
        .get("Last-Event-ID")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let from = match last_event.or(query.resource_version) {
        None => None,
        Some(text) => match text.trim().parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    format!("resourceVersion {text:?} is not a decimal number"),
                );
            }
        },
    };
    // Subscribe before reading the position, so nothing committed in between is missed.
    let live = store.subscribe();
    let cursor = match from {
        Some(rv) => {
            let floor = match store.floor() {
                Ok(f) => f,
                Err(e) => return object_error(&e),
            };
            if rv < floor {
                return object_error(&ObjectError::Gone { asked: rv, floor });
            }
            rv
        }
        None => match store.current_rv() {
            Ok(rv) => rv,
            Err(e) => return object_error(&e),
        },
    };
    let watch = Watch {
        store,
        live,
        cursor,
        replaying: from.is_some(),
        backlog: VecDeque::new(),
        resource: kind.resource,
        namespace: ns.map(str::to_owned),
        selector,
    };
    Sse::new(watch.into_stream())
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// One watcher: replay from the table, then the live feed, back to the table when it lags.
struct Watch {
    store: Arc<SqliteObjects>,
    live: broadcast::Receiver<Change>,
    cursor: u64,
    replaying: bool,
    backlog: VecDeque<Change>,
    resource: &'static str,
    namespace: Option<String>,
    selector: Selector,
}

impl Watch {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut w| async move {
            let change = w.next().await?;
            Some((Ok(change_event(&change)), w))
        })
    }

    async fn next(&mut self) -> Option<Change> {
        loop {
            if let Some(change) = self.backlog.pop_front() {
                if change.object.rv <= self.cursor {
                    continue;
                }
                self.cursor = change.object.rv;
                if self.wanted(&change.object) {
                    return Some(change);
                }
                continue;
            }
            if self.replaying {
                match self.store.changed_since(self.cursor, REPLAY_BATCH) {
                    Ok(batch) if !batch.is_empty() => {
                        let after = self.cursor;
                        self.backlog
                            .extend(batch.into_iter().map(|o| replayed(o, after)));
                    }
                    Ok(_) => self.replaying = false,
                    // Compacted while replaying (or the store failed): the watcher lists again.
                    Err(e) => {
                        tracing::info!(error = %e, "object watch ends");
                        return None;
                    }
                }
                continue;
            }
            match self.live.recv().await {
                Ok(change) => self.backlog.push_back(change),
                Err(broadcast::error::RecvError::Lagged(_)) => self.replaying = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn wanted(&self, o: &StoredObject) -> bool {
        o.resource == self.resource
            && self.namespace.as_ref().is_none_or(|n| *n == o.namespace)
            && self.selector.matches(o.labels())
    }
}

/// A change read back from the table: each object once, in its latest state.
fn replayed(object: Arc<StoredObject>, after: u64) -> Change {
    let kind = if object.deleted {
        ChangeKind::Deleted
    } else if object.created_rv > after {
        ChangeKind::Added
    } else {
        ChangeKind::Modified
    };
    Change { object, kind }
}

fn change_event(change: &Change) -> Event {
    let data = json!({"type": change.kind.as_str(), "object": change.object.body});
    Event::default()
        .id(change.object.rv.to_string())
        .event(change.kind.as_str())
        .data(data.to_string())
}

macro_rules! common_errors {
    () => {
        "401 / 403: credentials; 503 `overloaded`; 500 `store_error`"
    };
}

/// A handler of one object by its path: [`get_one`] or [`delete_one`] with the path's
/// namespace (none for a cluster-scoped object), resource and name. The OpenAPI attribute is
/// passed through.
macro_rules! one_object_handler {
    ($(#[$attr:meta])* $name:ident: namespaced => $op:ident) => {
        $(#[$attr])*
        pub(super) async fn $name(
            State(objects): State<Objects>,
            Path((ns, resource, name)): Path<(String, String, String)>,
        ) -> Response {
            $op(objects, &ns, &resource, &name).await
        }
    };
    ($(#[$attr:meta])* $name:ident: cluster => $op:ident) => {
        $(#[$attr])*
        pub(super) async fn $name(
            State(objects): State<Objects>,
            Path((resource, name)): Path<(String, String)>,
        ) -> Response {
            $op(objects, "", &resource, &name).await
        }
    };
}

/// Creates or replaces a namespaced object.
#[utoipa::path(put, path = "/v1/namespaces/{ns}/{resource}/{name}", tag = "objects",
    description = concat!("Scope: send. The body is the object (JSON): `kind` and `metadata.name` / `metadata.namespace` may be left out and are filled in; if given they must match the path. `metadata.resourceVersion` makes the write conditional: it succeeds only if the stored object has that version. `uid` and `creationTimestamp` are the store's; a body without `status` keeps the stored status. Writing the same object again changes nothing (same resourceVersion). ", common_errors!()),
    params(("ns" = String, Path, description = "Namespace"), ("resource" = String, Path, description = "`pods`, `configmaps`, `secrets`, `services`, `endpoints`"), ("name" = String, Path, description = "Name")),
    request_body(content = Object, description = "The object", content_type = "application/json"),
    responses((status = 200, description = "Replaced (or unchanged): the stored object", body = Object),
        (status = 201, description = "Created: the stored object", body = Object),
        (status = 400, description = "`invalid_object` (not a JSON object, bad name, bad metadata), `kind_mismatch`, `name_mismatch`, `bad_body` (not JSON)", body = ErrorBody),
        (status = 404, description = "`unknown_resource`", body = ErrorBody),
        (status = 409, description = "`conflict`: `metadata.resourceVersion` is not the stored one", body = ErrorBody),
        (status = 507, description = "`insufficient_storage`: the disk is full; nothing was written", body = ErrorBody)))]
pub(super) async fn put_namespaced(
    State(objects): State<Objects>,
    Path((ns, resource, name)): Path<(String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match json_body(body) {
        Ok(body) => put(objects, &ns, &resource, &name, body).await,
        Err(r) => r,
    }
}

one_object_handler! {
    /// One namespaced object.
    #[utoipa::path(get, path = "/v1/namespaces/{ns}/{resource}/{name}", tag = "objects",
        description = concat!("Scope: read. ", common_errors!()),
        params(("ns" = String, Path, description = "Namespace"), ("resource" = String, Path, description = "`pods`, `configmaps`, ..."), ("name" = String, Path, description = "Name")),
        responses((status = 200, description = "The object", body = Object),
            (status = 404, description = "`not_found`, `unknown_resource`", body = ErrorBody)))]
    get_namespaced: namespaced => get_one
}

one_object_handler! {
    /// Deletes a namespaced object.
    #[utoipa::path(delete, path = "/v1/namespaces/{ns}/{resource}/{name}", tag = "objects",
        description = concat!("Scope: send. Answers the deleted object, whose `metadata.resourceVersion` is the deletion's; nodes that hold it are told. ", common_errors!()),
        params(("ns" = String, Path, description = "Namespace"), ("resource" = String, Path, description = "`pods`, `configmaps`, ..."), ("name" = String, Path, description = "Name")),
        responses((status = 200, description = "Deleted: the last object", body = Object),
            (status = 404, description = "`not_found`, `unknown_resource`", body = ErrorBody)))]
    delete_namespaced: namespaced => delete_one
}

/// Lists or watches the objects of a namespace.
#[utoipa::path(get, path = "/v1/namespaces/{ns}/{resource}", tag = "objects",
    description = concat!("Scope: read. Without `watch`: `{\"apiVersion\", \"kind\": \"<Kind>List\", \"metadata\": {\"resourceVersion\"}, \"items\": [...]}`. With `watch=true`: a `text/event-stream` of events `event: ADDED|MODIFIED|DELETED`, `id: <resourceVersion>`, `data: {\"type\", \"object\"}`; with `resourceVersion` (or `Last-Event-ID`) every change after it is replayed first (each object once, in its latest state), then live changes follow. A version older than the compaction floor gets 410 `gone`: list again. ", common_errors!()),
    params(("ns" = String, Path, description = "Namespace"), ("resource" = String, Path, description = "`pods`, `configmaps`, ..."), ListQuery),
    responses((status = 200, description = "The list, or the watch stream", body = Object),
        (status = 400, description = "`bad_selector`, `bad_query`", body = ErrorBody),
        (status = 404, description = "`unknown_resource`", body = ErrorBody),
        (status = 410, description = "`gone`: the resourceVersion was compacted", body = ErrorBody)))]
pub(super) async fn list_namespaced(
    State(objects): State<Objects>,
    Path((ns, resource)): Path<(String, String)>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    list_or_watch(objects, Some(&ns), &resource, &headers, query).await
}

/// Creates a namespaced object named by its `metadata.name`.
#[utoipa::path(post, path = "/v1/namespaces/{ns}/{resource}", tag = "objects",
    description = concat!("Scope: send. As PUT, the name taken from `metadata.name` (required). ", common_errors!()),
    params(("ns" = String, Path, description = "Namespace"), ("resource" = String, Path, description = "`pods`, `configmaps`, ...")),
    request_body(content = Object, description = "The object", content_type = "application/json"),
    responses((status = 201, description = "Created", body = Object),
        (status = 400, description = "`invalid_object` (no name, ...), `kind_mismatch`, `name_mismatch`, `bad_body`", body = ErrorBody),
        (status = 409, description = "`already_exists`", body = ErrorBody)))]
pub(super) async fn post_namespaced(
    State(objects): State<Objects>,
    Path((ns, resource)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match json_body(body) {
        Ok(body) => create(objects, &ns, &resource, body).await,
        Err(r) => r,
    }
}

/// Creates or replaces a cluster-scoped object.
#[utoipa::path(put, path = "/v1/cluster/{resource}/{name}", tag = "objects",
    description = concat!("Scope: send. As the namespaced PUT, for `nodes` and `namespaces`. ", common_errors!()),
    params(("resource" = String, Path, description = "`nodes`, `namespaces`"), ("name" = String, Path, description = "Name")),
    request_body(content = Object, description = "The object", content_type = "application/json"),
    responses((status = 200, description = "Replaced (or unchanged)", body = Object),
        (status = 201, description = "Created", body = Object),
        (status = 400, description = "`invalid_object`, `kind_mismatch`, `name_mismatch`, `bad_body`", body = ErrorBody),
        (status = 404, description = "`unknown_resource`", body = ErrorBody),
        (status = 409, description = "`conflict`", body = ErrorBody)))]
pub(super) async fn put_cluster(
    State(objects): State<Objects>,
    Path((resource, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match json_body(body) {
        Ok(body) => put(objects, "", &resource, &name, body).await,
        Err(r) => r,
    }
}

one_object_handler! {
    /// One cluster-scoped object.
    #[utoipa::path(get, path = "/v1/cluster/{resource}/{name}", tag = "objects",
        description = concat!("Scope: read. ", common_errors!()),
        params(("resource" = String, Path, description = "`nodes`, `namespaces`"), ("name" = String, Path, description = "Name")),
        responses((status = 200, description = "The object", body = Object),
            (status = 404, description = "`not_found`, `unknown_resource`", body = ErrorBody)))]
    get_cluster: cluster => get_one
}

one_object_handler! {
    /// Deletes a cluster-scoped object.
    #[utoipa::path(delete, path = "/v1/cluster/{resource}/{name}", tag = "objects",
        description = concat!("Scope: send. ", common_errors!()),
        params(("resource" = String, Path, description = "`nodes`, `namespaces`"), ("name" = String, Path, description = "Name")),
        responses((status = 200, description = "Deleted: the last object", body = Object),
            (status = 404, description = "`not_found`, `unknown_resource`", body = ErrorBody)))]
    delete_cluster: cluster => delete_one
}

/// Lists or watches cluster-scoped objects.
#[utoipa::path(get, path = "/v1/cluster/{resource}", tag = "objects",
    description = concat!("Scope: read. As the namespaced list and watch. ", common_errors!()),
    params(("resource" = String, Path, description = "`nodes`, `namespaces`"), ListQuery),
    responses((status = 200, description = "The list, or the watch stream", body = Object),
        (status = 400, description = "`bad_selector`, `bad_query`", body = ErrorBody),
        (status = 404, description = "`unknown_resource`", body = ErrorBody),
        (status = 410, description = "`gone`", body = ErrorBody)))]
pub(super) async fn list_cluster(
    State(objects): State<Objects>,
    Path(resource): Path<String>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    list_or_watch(objects, None, &resource, &headers, query).await
}

/// Creates a cluster-scoped object named by its `metadata.name`.
#[utoipa::path(post, path = "/v1/cluster/{resource}", tag = "objects",
    description = concat!("Scope: send. ", common_errors!()),
    params(("resource" = String, Path, description = "`nodes`, `namespaces`")),
    request_body(content = Object, description = "The object", content_type = "application/json"),
    responses((status = 201, description = "Created", body = Object),
        (status = 400, description = "`invalid_object` (no name, ...), `kind_mismatch`, `bad_body`", body = ErrorBody),
        (status = 409, description = "`already_exists`", body = ErrorBody)))]
pub(super) async fn post_cluster(
    State(objects): State<Objects>,
    Path(resource): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match json_body(body) {
        Ok(body) => create(objects, "", &resource, body).await,
        Err(r) => r,
    }
}

/// Whether a request to `path` with `query` is a watch (a long-lived stream that takes no
/// turn from other requests).
pub(super) fn is_watch(path: &str, query: Option<&str>) -> bool {
    matches!(
        path,
        "/v1/namespaces/{ns}/{resource}" | "/v1/cluster/{resource}"
    ) && query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true"))
}
