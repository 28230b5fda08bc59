//! MetaServer: metamanager's read-only HTTP view for local applications, an [`axum::Router`] the
//! edge's local endpoint serves on loopback (KubeEdge's MetaServer, MODULES.md §2.7, served from
//! the local store only, so it answers the same with the cloud gone).
//!
//! | Method & path | What |
//! |---|---|
//! | `GET /api/v1/namespaces/{ns}/{plural}` | the objects of that type in `ns` as a Kubernetes list (`ConfigMapList`, `metadata.resourceVersion` = the highest version stored) |
//! | `GET /api/v1/namespaces/{ns}/{plural}/{name}` | one object; 404 as a Kubernetes `Status`. A configmap or secret not stored here is asked of the cloud through metamanager while the cloud is connected (stored, then served; the cloud's NotFound is a 404, no answer in time a 503) |
//! | `GET /api/v1/{plural}` | every namespace's objects; for cluster-scoped types (`nodes`, `namespaces`, `persistentvolumes`) all of them |
//! | `GET /api/v1/{plural}/{name}` | one cluster-scoped object (`/api/v1/nodes/edge-1`) |
//! | `?labelSelector=app=web,tier!=db` | on lists and watches: Kubernetes label selector forms |
//! | `?watch=true` | on any of the above: chunked JSON lines `{"type":"ADDED","object":…}`, first the current contents, then each change (`ADDED`, `MODIFIED`, `DELETED`) as metamanager commits it; a watcher more than 1024 changes behind is ended (re-watch) |
//! | `GET /v1/messages?after=<seq>&limit=<n>` | the journal: cloud messages applied, after `seq` (default 0), oldest first, at most `n` (default 100, max 1000): `{"messages": [{"seq": 1, "message": <KubeEdge JSON>}], "next": <last seq>}` |
//!
//! Departures from KubeEdge: the local store answers first, and only a missing configmap or
//! secret is asked of the cloud (KubeEdge asks dynamiccontroller first for every get and list,
//! 10 s per request, M6); a watch's `resourceVersion` is ignored and the current contents
//! are replayed as `ADDED`, as KubeEdge does; no writes (KubeEdge forwards them to the cloud).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use beehive::{Bus, Shutdown};
use proto::message::OP_ERROR;
use proto::{Content, Message};
use session::edge::route::GROUP_META;

use crate::decide::OP_QUERY;
use crate::module::MODULE_NAME;
use crate::resource::{CLUSTER_SCOPE, Kind, kind_of_plural};
use crate::selector::Selector;
use crate::store::{Change, ChangeEvent, MetaStore, StoredObject};

/// How MetaServer asks metamanager (and through it the cloud) for an object it does not hold.
#[derive(Debug, Clone)]
pub struct RemoteGet {
    /// The bus metamanager runs on.
    pub bus: Bus,
    /// How long a get waits for metamanager's answer (its remote query timeout, and a margin).
    pub timeout: Duration,
}

/// The routes over `store`; with `remote`, a get that misses a configmap or secret asks
/// metamanager. Open watches end when `stop` is triggered, so they never hold a graceful
/// shutdown.
pub fn router(store: Arc<MetaStore>, remote: Option<RemoteGet>, stop: Shutdown) -> Router {
    let state = Arc::new(Server {
        store,
        remote,
        stop,
    });
    Router::new()
        .route("/api/v1/namespaces/{ns}/{plural}", get(namespaced_list))
        .route(
            "/api/v1/namespaces/{ns}/{plural}/{name}",
            get(namespaced_object),
        )
        .route("/api/v1/{plural}", get(cluster_list))
        .route("/api/v1/{plural}/{name}", get(cluster_object))
        .route("/v1/messages", get(journal))
        .with_state(state)
}

/// The route source of MetaServer's queries to metamanager.
const MODULE_METASERVER: &str = "metaserver";

struct Server {
    store: Arc<MetaStore>,
    remote: Option<RemoteGet>,
    stop: Shutdown,
}

#[derive(Debug, Deserialize)]
struct Params {
    #[serde(default, rename = "labelSelector")]
    label_selector: Option<String>,
    #[serde(default)]
    watch: Option<String>,
}

/// Which objects a request is about.
#[derive(Debug, Clone)]
struct Filter {
    kind: &'static Kind,
    /// `None`: every namespace.
    namespace: Option<String>,
    name: Option<String>,
    selector: Selector,
}

async fn namespaced_list(
    State(s): State<Arc<Server>>,
    Path((ns, plural)): Path<(String, String)>,
    Query(p): Query<Params>,
) -> Response {
    serve(&s, &plural, Some(ns), None, p)
}

async fn namespaced_object(
    State(s): State<Arc<Server>>,
    Path((ns, plural, name)): Path<(String, String, String)>,
    Query(p): Query<Params>,
) -> Response {
    if p.watch.is_none()
        && let Some(missing) = remote_get(&s, &plural, &ns, &name).await
    {
        return missing;
    }
    serve(&s, &plural, Some(ns), Some(name), p)
}

/// A get of a configmap or secret the store does not hold, asked of metamanager (which asks the
/// cloud while connected). `None`: serve it locally (stored, another type, or no bus).
async fn remote_get(s: &Server, plural: &str, ns: &str, name: &str) -> Option<Response> {
    let remote = s.remote.as_ref()?;
    let kind = kind_of_plural(plural).filter(|k| k.remote && k.api_version == "v1")?;
    let key = format!("{ns}/{}/{name}", kind.name);
    if !matches!(s.store.get(&key), Ok(None)) {
        return None;
    }
    let ask = Message::new("").route(MODULE_METASERVER, GROUP_META, key, OP_QUERY);
    let not_found = || {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} \"{name}\" not found", kind.plural),
            Some(json!({"name": name, "kind": kind.plural})),
        )
    };
    let answer = match remote.bus.send_sync(MODULE_NAME, ask, remote.timeout).await {
        Ok(answer) => answer,
        Err(e) => {
            return Some(status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                &format!("metamanager did not answer: {e}"),
                None,
            ));
        }
    };
    if answer.route.operation == OP_ERROR {
        let text = String::from_utf8_lossy(&answer.content.to_bytes()).into_owned();
        return Some(if text.contains("not found") {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &text,
                Some(json!({"name": name, "kind": kind.plural})),
            )
        } else {
            status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                &text,
                None,
            )
        });
    }
    // The answer was stored: serve it as any stored object (or 404 if there was none).
    let object = match &answer.content {
        Content::Json(Value::Array(items)) => items
            .first()
            .and_then(Value::as_str)
            .map(|text| serde_json::from_str(text).unwrap_or(Value::String(text.to_owned()))),
        _ => None,
    };
    Some(match object {
        Some(object) => axum::Json(object).into_response(),
        None => not_found(),
    })
}

async fn cluster_list(
    State(s): State<Arc<Server>>,
    Path(plural): Path<String>,
    Query(p): Query<Params>,
) -> Response {
    serve(&s, &plural, None, None, p)
}

async fn cluster_object(
    State(s): State<Arc<Server>>,
    Path((plural, name)): Path<(String, String)>,
    Query(p): Query<Params>,
) -> Response {
    serve(&s, &plural, None, Some(name), p)
}

fn serve(
    s: &Server,
    plural: &str,
    namespace: Option<String>,
    name: Option<String>,
    p: Params,
) -> Response {
    let Some(kind) = kind_of_plural(plural).filter(|k| k.api_version == "v1") else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({plural})"),
            None,
        );
    };
    let namespace = match (namespace, kind.namespaced, &name) {
        (Some(_), false, _) => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{plural} are cluster-scoped: use /api/v1/{plural}"),
                None,
            );
        }
        // A namespaced object by name needs its namespace.
        (None, true, Some(_)) => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!(
                    "{plural} are namespaced: use /api/v1/namespaces/{{ns}}/{plural}/{{name}}"
                ),
                None,
            );
        }
        (None, false, _) => Some(CLUSTER_SCOPE.to_owned()),
        (ns, true, _) => ns,
    };
    let selector = match Selector::parse(p.label_selector.as_deref().unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string(), None),
    };
    let filter = Filter {
        kind,
        namespace,
        name,
        selector,
    };
    let watch = matches!(p.watch.as_deref(), Some("true" | "1"));
    let result = if watch {
        watch_response(s, filter)
    } else if filter.name.is_some() {
        get_response(s, &filter)
    } else {
        list_response(s, &filter)
    };
    result.unwrap_or_else(|e| {
        status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &e.to_string(),
            None,
        )
    })
}

fn get_response(s: &Server, f: &Filter) -> Result<Response, crate::StoreError> {
    let name = f.name.as_deref().unwrap_or_default();
    let key = format!(
        "{}/{}/{}",
        f.namespace.as_deref().unwrap_or(CLUSTER_SCOPE),
        f.kind.name,
        name
    );
    Ok(match s.store.get(&key)? {
        Some(o) => axum::Json(object_json(&o, f.kind)).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} \"{name}\" not found", f.kind.plural),
            Some(json!({"name": name, "kind": f.kind.plural})),
        ),
    })
}

fn list_response(s: &Server, f: &Filter) -> Result<Response, crate::StoreError> {
    let resource_version = s.store.max_resource_version()?;
    let items: Vec<Value> = s
        .store
        .list(f.kind.name, f.namespace.as_deref())?
        .iter()
        .map(|o| object_json(o, f.kind))
        .filter(|o| f.selector.matches(&labels(o)))
        .collect();
    Ok(axum::Json(json!({
        "kind": format!("{}List", f.kind.kind),
        "apiVersion": f.kind.api_version,
        "metadata": {"resourceVersion": resource_version.to_string()},
        "items": items,
    }))
    .into_response())
}

/// The current contents as `ADDED`, then live changes. Subscribed before the contents are
/// read, so no change falls between the two (one may be seen twice: as `ADDED`, then again).
fn watch_response(s: &Server, f: Filter) -> Result<Response, crate::StoreError> {
    let rx = s.store.subscribe();
    let mut replay = VecDeque::new();
    let current = match &f.name {
        Some(_) => {
            let key = format!(
                "{}/{}/{}",
                f.namespace.as_deref().unwrap_or(CLUSTER_SCOPE),
                f.kind.name,
                f.name.as_deref().unwrap_or_default()
            );
            s.store.get(&key)?.into_iter().collect()
        }
        None => s.store.list(f.kind.name, f.namespace.as_deref())?,
    };
    for o in &current {
        let object = object_json(o, f.kind);
        if f.selector.matches(&labels(&object)) {
            replay.push_back(event_line("ADDED", object));
        }
    }
    let watch = Watch {
        replay,
        rx,
        filter: f,
        stop: s.stop.clone(),
    };
    let stream = futures_util::stream::unfold(watch, |mut w| async move {
        if let Some(line) = w.replay.pop_front() {
            return Some((Ok::<_, Infallible>(line), w));
        }
        loop {
            tokio::select! {
                () = w.stop.triggered() => return None,
                change = w.rx.recv() => match change {
                    Ok(change) => {
                        if let Some(line) = w.filter.line(&change) {
                            return Some((Ok(line), w));
                        }
                    }
                    // Lagged or closed: end the watch; the client lists and watches again.
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => {
                        return None;
                    }
                },
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

struct Watch {
    replay: VecDeque<String>,
    rx: broadcast::Receiver<Change>,
    filter: Filter,
    stop: Shutdown,
}

impl Filter {
    /// The watch line for `change`, when it is about the objects watched.
    fn line(&self, change: &Change) -> Option<String> {
        let o = &change.object;
        if o.kind != self.kind.name
            || self.namespace.as_ref().is_some_and(|ns| *ns != o.namespace)
            || self.name.as_ref().is_some_and(|n| *n != o.name)
        {
            return None;
        }
        let object = object_json(o, self.kind);
        if !self.selector.matches(&labels(&object)) {
            return None;
        }
        let kind = match change.event {
            ChangeEvent::Added => "ADDED",
            ChangeEvent::Modified => "MODIFIED",
            ChangeEvent::Deleted => "DELETED",
        };
        Some(event_line(kind, object))
    }
}

fn event_line(kind: &str, object: Value) -> String {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    line
}

/// A stored object as served: its JSON, with `apiVersion`, `kind` and
/// `metadata.resourceVersion` filled in when the cloud left them out. Content that is not a JSON
/// object is served as it is (KubeEdge stores whatever the cloud sent).
fn object_json(o: &StoredObject, kind: &Kind) -> Value {
    let mut value: Value =
        serde_json::from_str(&o.value).unwrap_or_else(|_| Value::String(o.value.clone()));
    if let Value::Object(map) = &mut value {
        map.entry("apiVersion")
            .or_insert_with(|| Value::String(kind.api_version.to_owned()));
        map.entry("kind")
            .or_insert_with(|| Value::String(kind.kind.to_owned()));
        if let Value::Object(meta) = map.entry("metadata").or_insert_with(|| json!({})) {
            meta.entry("name")
                .or_insert_with(|| Value::String(o.name.clone()));
            if kind.namespaced {
                meta.entry("namespace")
                    .or_insert_with(|| Value::String(o.namespace.clone()));
            }
            if let Some(rv) = o.resource_version {
                meta.entry("resourceVersion")
                    .or_insert_with(|| Value::String(rv.to_string()));
            }
        }
    }
    value
}

fn labels(object: &Value) -> BTreeMap<String, String> {
    object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// A Kubernetes `Status` error body.
fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    (code, axum::Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
struct JournalQuery {
    #[serde(default)]
    after: i64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn journal(State(s): State<Arc<Server>>, Query(q): Query<JournalQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match s.store.journal(q.after, limit) {
        Ok(rows) => {
            let next = rows.last().map_or(q.after, |(seq, _)| *seq);
            let messages: Vec<Value> = rows
                .into_iter()
                .map(|(seq, message)| json!({"seq": seq, "message": message}))
                .collect();
            axum::Json(json!({"messages": messages, "next": next})).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}
