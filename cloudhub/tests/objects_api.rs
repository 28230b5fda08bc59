//! The object endpoints over real HTTP against real SQLite files: create, replace, conditional
//! update, delete, list with selectors, watch resuming from a resourceVersion, and every kind of
//! bad object refused with the JSON error body and nothing written.

extern crate causeway_cloudhub as cloudhub;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cloudhub::api::ApiOptions;
use cloudhub::objects::sqlite::SqliteObjects;
use cloudhub::store::sqlite::{SqliteConfig, SqliteStore};
use cloudhub::{Hub, HubConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

struct Api {
    addr: SocketAddr,
    http: reqwest::Client,
    objects: Arc<SqliteObjects>,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

impl Api {
    async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            SqliteStore::open(SqliteConfig::new(dir.path().join("cloudcore.db"))).expect("store");
        let hub = Hub::new(HubConfig::default(), Arc::new(store));
        let objects =
            Arc::new(SqliteObjects::open(&dir.path().join("objects.db")).expect("objects"));
        let options = ApiOptions {
            objects: Some(Arc::clone(&objects)),
            ..ApiOptions::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = cloudhub::api::router_with_options(hub, options);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
        });
        Self {
            addr,
            http: reqwest::Client::new(),
            objects,
            _dir: dir,
            _stop: stop,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn put(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::PUT, path, Some(body.to_string()))
            .await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
}

const CM: &str = "/v1/namespaces/default/configmaps";

#[tokio::test]
async fn objects_are_created_replaced_listed_and_deleted() {
    let api = Api::start().await;
    let (status, created) = api
        .put(
            &format!("{CM}/demo"),
            &json!({"metadata": {"labels": {"app": "web"}}, "data": {"k": "v1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["kind"], "ConfigMap");
    assert_eq!(created["metadata"]["resourceVersion"], "1");
    let uid = created["metadata"]["uid"].as_str().expect("uid").to_owned();
    assert!(created["metadata"]["creationTimestamp"].is_string());

    let (status, replaced) = api
        .put(
            &format!("{CM}/demo"),
            &json!({"kind": "ConfigMap", "metadata": {"labels": {"app": "web"}}, "data": {"k": "v2"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(replaced["metadata"]["resourceVersion"], "2");
    assert_eq!(replaced["metadata"]["uid"], uid.as_str());

    let (status, _) = api
        .put(&format!("{CM}/other"), &json!({"data": {"k": "x"}}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, list) = api.get(&format!("{CM}?labelSelector=app%3Dweb")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["kind"], "ConfigMapList");
    assert_eq!(list["metadata"]["resourceVersion"], "3");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo"]);

    let (status, gone) = api
        .send(reqwest::Method::DELETE, &format!("{CM}/demo"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(gone["metadata"]["resourceVersion"], "4");
    let (status, body) = api.get(&format!("{CM}/demo")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, _) = api
        .send(reqwest::Method::DELETE, &format!("{CM}/demo"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Cluster-scoped objects under /v1/cluster.
    let (status, node) = api
        .put(
            "/v1/cluster/nodes/edge-1",
            &json!({"metadata": {"labels": {"node-role.kubernetes.io/edge": ""}}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{node}");
    assert!(node["metadata"].get("namespace").is_none());
    let (status, body) = api.get("/v1/namespaces/default/nodes/edge-1").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_resource"))
    );
}

#[tokio::test]
async fn bad_objects_are_refused_and_nothing_is_written() {
    let api = Api::start().await;
    let (status, _) = api
        .put(&format!("{CM}/demo"), &json!({"data": {"k": "v"}}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let cases: Vec<(reqwest::Method, String, String, StatusCode, &str)> = vec![
        (
            reqwest::Method::PUT,
            format!("{CM}/demo"),
            "[1, 2]".into(),
            StatusCode::BAD_REQUEST,
            "invalid_object",
        ),
        (
            reqwest::Method::PUT,
            format!("{CM}/demo"),
            "\"text\"".into(),
            StatusCode::BAD_REQUEST,
            "invalid_object",
        ),
        (
            reqwest::Method::PUT,
            format!("{CM}/demo"),
            "{not json".into(),
            StatusCode::BAD_REQUEST,
            "bad_body",
        ),
        (
            reqwest::Method::PUT,
            format!("{CM}/demo"),
            json!({"kind": "Secret"}).to_string(),
            StatusCode::BAD_REQUEST,
            "kind_mismatch",
        ),
        (
            reqwest::Method::PUT,
            format!("{CM}/demo"),
            json!({"metadata": {"name": "x"}}).to_string(),
            StatusCode::BAD_REQUEST,
            "name_mismatch",
        ),
        (
            reqwest::Method::PUT,
            format!("{CM}/demo"),
            json!({"metadata": {"namespace": "kube-system"}}).to_string(),
            StatusCode::BAD_REQUEST,
            "name_mismatch",
        ),
        (
            reqwest::Method::PUT,
            format!("{CM}/demo"),
            json!({"metadata": "x"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_object",
        ),
        (
            reqwest::Method::PUT,
            format!("{CM}/Not_A_Name"),
            json!({}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_object",
        ),
        (
            reqwest::Method::PUT,
            format!("{CM}/demo"),
            json!({"metadata": {"resourceVersion": "99"}, "data": {"k": "stale"}}).to_string(),
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            reqwest::Method::PUT,
            format!("{CM}/fresh"),
            json!({"metadata": {"resourceVersion": "1"}}).to_string(),
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            reqwest::Method::PUT,
            "/v1/namespaces/default/widgets/w".into(),
            json!({}).to_string(),
            StatusCode::NOT_FOUND,
            "unknown_resource",
        ),
        (
            reqwest::Method::POST,
            CM.into(),
            json!({"data": {"k": "v"}}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_object",
        ),
        (
            reqwest::Method::POST,
            CM.into(),
            json!({"metadata": {"name": "demo"}}).to_string(),
            StatusCode::CONFLICT,
            "already_exists",
        ),
        (
            reqwest::Method::GET,
            format!("{CM}?labelSelector=a%3Db%3Dc"),
            String::new(),
            StatusCode::BAD_REQUEST,
            "bad_selector",
        ),
        (
            reqwest::Method::GET,
            format!("{CM}?watch=true&resourceVersion=abc"),
            String::new(),
            StatusCode::BAD_REQUEST,
            "bad_query",
        ),
    ];
    for (method, path, body, want, code) in cases {
        let body = (!body.is_empty()).then_some(body);
        let (status, answer) = api.send(method.clone(), &path, body.clone()).await;
        assert_eq!(status, want, "{method} {path} {body:?}: {answer}");
        assert_eq!(answer["code"], code, "{method} {path}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // Nothing was half-written: the one object is as it was.
    let (_, demo) = api.get(&format!("{CM}/demo")).await;
    assert_eq!(demo["metadata"]["resourceVersion"], "1");
    assert_eq!(demo["data"]["k"], "v");
    assert_eq!(api.objects.counts().expect("counts"), (1, 0));
    assert_eq!(api.objects.current_rv().expect("rv"), 1);
}

/// Reads SSE events (`id`, `data`) until `n` have arrived.
async fn read_events(resp: &mut reqwest::Response, n: usize) -> Vec<(u64, Value)> {
    let mut buf = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while events.len() < n {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .expect("events in time")
            .expect("stream")
            .expect("stream open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let id = event
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .map(|v| v.parse().unwrap());
            let data = event.lines().find_map(|l| l.strip_prefix("data: "));
            if let (Some(id), Some(data)) = (id, data) {
                events.push((id, serde_json::from_str(data).unwrap()));
            }
        }
    }
    events
}

#[tokio::test]
async fn a_watch_resumes_from_a_resource_version() {
    let api = Api::start().await;
    for i in 0..3 {
        api.put(
            &format!("{CM}/c{i}"),
            &json!({"data": {"i": i.to_string()}}),
        )
        .await;
    }
    api.send(reqwest::Method::DELETE, &format!("{CM}/c0"), None)
        .await;
    // From version 1: c1 and c2 added, c0 deleted (each object once, latest state).
    let mut resp = api
        .http
        .get(api.url(&format!("{CM}?watch=true&resourceVersion=1")))
        .send()
        .await
        .expect("watch");
    assert_eq!(resp.status(), StatusCode::OK);
    let replay = read_events(&mut resp, 3).await;
    let seen: Vec<(u64, &str, &str)> = replay
        .iter()
        .map(|(id, e)| {
            (
                *id,
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [(2, "ADDED", "c1"), (3, "ADDED", "c2"), (4, "DELETED", "c0")]
    );
    // Then live changes.
    api.put(&format!("{CM}/c1"), &json!({"data": {"i": "changed"}}))
        .await;
    let live = read_events(&mut resp, 1).await;
    assert_eq!(live[0].0, 5);
    assert_eq!(live[0].1["type"], "MODIFIED");
    // A compacted version is gone.
    use cloudhub::objects::ObjectSource as _;
    api.objects
        .purge_tombstone("configmaps", "default", "c0", 4)
        .expect("purge");
    let (status, body) = api.get(&format!("{CM}?watch=true&resourceVersion=2")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::GONE, Some("gone"))
    );
}
