//! MetaServer over a real store file and a real loopback socket: Kubernetes-style lists (with
//! their resourceVersion), gets, 404 as a `Status`, cluster-scoped nodes, label selectors, and a
//! watch that replays the contents, then sees each committed change, and ends at shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use beehive::Shutdown;
use causeway_metamanager::MetaStore;
use causeway_metamanager::decide::inspect;
use causeway_metamanager::metaserver::router;
use proto::{Content, Message};

const WAIT: Duration = Duration::from_secs(30);

fn apply(store: &MetaStore, id: &str, op: &str, resource: &str, rv: u64, object: Value) {
    let mut m = Message::with_header(id, "", 0)
        .route("edgecontroller", "resource", resource, op)
        .content(Content::Json(object));
    m.header.resource_version = rv.to_string();
    store.apply(&m, &inspect(&m).unwrap()).unwrap();
}

fn configmap(ns: &str, name: &str, app: &str, rv: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"),
                        "resourceVersion": rv.to_string(), "labels": {"app": app}},
           "data": {"v": rv.to_string()}})
}

async fn serve(store: Arc<MetaStore>, stop: Shutdown) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(store, None, stop.clone());
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.triggered().await })
            .await
    });
    addr
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_gets_and_selects_like_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MetaStore::open(&dir.path().join("meta.db"), 100).unwrap());
    apply(
        &store,
        "1",
        "insert",
        "default/configmap/a",
        3,
        configmap("default", "a", "web", 3),
    );
    apply(
        &store,
        "2",
        "insert",
        "default/configmap/b",
        7,
        configmap("default", "b", "db", 7),
    );
    apply(
        &store,
        "3",
        "insert",
        "other/configmap/c",
        5,
        configmap("other", "c", "web", 5),
    );
    apply(
        &store,
        "4",
        "update",
        "null/node/edge-1",
        9,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "edge-1"}}),
    );
    let stop = Shutdown::new();
    let addr = serve(store.clone(), stop.clone()).await;

    let (code, list) = get(addr, "/api/v1/namespaces/default/configmaps").await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "ConfigMapList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(list["metadata"]["resourceVersion"], "9");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let (_, all) = get(addr, "/api/v1/configmaps").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    let (_, web) = get(addr, "/api/v1/configmaps?labelSelector=app%3Dweb").await;
    assert_eq!(web["items"].as_array().unwrap().len(), 2);
    let (_, not_web) = get(
        addr,
        "/api/v1/namespaces/default/configmaps?labelSelector=app!%3Dweb",
    )
    .await;
    assert_eq!(not_web["items"][0]["metadata"]["name"], "b");
    let (code, bad) = get(addr, "/api/v1/configmaps?labelSelector=app%20in%20web").await;
    assert_eq!(code, 400);
    assert_eq!(
        (bad["kind"].as_str(), bad["reason"].as_str()),
        (Some("Status"), Some("BadRequest"))
    );

    let (code, a) = get(addr, "/api/v1/namespaces/default/configmaps/a").await;
    assert_eq!(code, 200);
    assert_eq!(a["data"]["v"], "3");
    let (code, missing) = get(addr, "/api/v1/namespaces/default/configmaps/zz").await;
    assert_eq!(code, 404);
    assert_eq!(missing["kind"], "Status");
    assert_eq!(missing["reason"], "NotFound");
    assert_eq!(missing["message"], "configmaps \"zz\" not found");
    assert_eq!(missing["code"], 404);

    let (code, node) = get(addr, "/api/v1/nodes/edge-1").await;
    assert_eq!(code, 200, "{node}");
    assert_eq!(
        node["metadata"]["resourceVersion"], "9",
        "filled in from the store"
    );
    let (_, nodes) = get(addr, "/api/v1/nodes").await;
    assert_eq!(nodes["kind"], "NodeList");
    assert_eq!(nodes["items"].as_array().unwrap().len(), 1);
    let (code, _) = get(addr, "/api/v1/namespaces/default/nodes").await;
    assert_eq!(code, 404, "nodes are cluster-scoped");
    let (code, unknown) = get(addr, "/api/v1/gizmos").await;
    assert_eq!(code, 404);
    assert_eq!(unknown["kind"], "Status");
    // an empty list still carries a resource version
    let (_, empty) = get(addr, "/api/v1/namespaces/none/pods").await;
    assert_eq!(empty["items"], json!([]));
    assert_eq!(empty["metadata"]["resourceVersion"], "9");
    stop.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_then_follows_changes_and_ends_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MetaStore::open(&dir.path().join("meta.db"), 100).unwrap());
    apply(
        &store,
        "1",
        "insert",
        "default/configmap/a",
        3,
        configmap("default", "a", "web", 3),
    );
    apply(
        &store,
        "2",
        "insert",
        "default/configmap/b",
        4,
        configmap("default", "b", "db", 4),
    );
    let stop = Shutdown::new();
    let addr = serve(store.clone(), stop.clone()).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /api/v1/namespaces/default/configmaps?watch=true&labelSelector=app%3Dweb HTTP/1.1\r\nHost: {addr}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(s).lines();
    // Chunked framing: skip the head, then every line that is not a JSON event (chunk sizes).
    let mut next_event = async || -> Option<Value> {
        loop {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .unwrap()
                .unwrap()?;
            if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim()) {
                return Some(v);
            }
        }
    };
    let first = next_event().await.unwrap();
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["metadata"]["name"], "a");
    apply(
        &store,
        "3",
        "update",
        "default/configmap/b",
        5,
        configmap("default", "b", "db", 5),
    );
    apply(
        &store,
        "4",
        "update",
        "default/configmap/a",
        6,
        configmap("default", "a", "web", 6),
    );
    let modified = next_event().await.unwrap();
    assert_eq!(
        modified["type"], "MODIFIED",
        "b (not selected) was skipped: {modified}"
    );
    assert_eq!(modified["object"]["data"]["v"], "6");
    apply(
        &store,
        "5",
        "insert",
        "default/configmap/n",
        7,
        configmap("default", "n", "web", 7),
    );
    assert_eq!(next_event().await.unwrap()["type"], "ADDED");
    apply(
        &store,
        "6",
        "delete",
        "default/configmap/a",
        6,
        configmap("default", "a", "web", 6),
    );
    let deleted = next_event().await.unwrap();
    assert_eq!(deleted["type"], "DELETED");
    assert_eq!(deleted["object"]["metadata"]["name"], "a");
    // An older version changes nothing and shows nothing; the stream ends at shutdown.
    apply(
        &store,
        "7",
        "update",
        "default/configmap/n",
        2,
        configmap("default", "n", "web", 2),
    );
    stop.trigger();
    assert_eq!(next_event().await, None, "the watch ended at shutdown");
}
