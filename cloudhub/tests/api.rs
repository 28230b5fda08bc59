//! The cloud API over real HTTP with a real client (reqwest), against a real hub with a real
//! edge connected over WebSocket and QUIC: node listing, sending with and without waiting for
//! the ACK, error bodies, the bounded queue, the SSE stream of upstream messages, metrics.

extern crate causeway_cloudhub as cloudhub;

mod common;

use std::net::SocketAddr;

use cloudhub::HubConfig;
use common::{Cloud, recv_app, upstream, within};
use proto::Content;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use transport::{Capabilities, Protocol};

struct Api {
    addr: SocketAddr,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Api {
    async fn start(cloud: &Cloud, max_body: usize) -> Self {
        // reqwest takes the process's provider; ring is the only one compiled in.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = cloudhub::api::router_with_body_limit(cloud.hub.clone(), max_body);
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
            http: reqwest::Client::builder().build().expect("client"),
            _stop: stop,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self.http.get(self.url(path)).send().await.expect("get");
        let status = resp.status();
        (status, resp.json().await.expect("json"))
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .delete(self.url(path))
            .send()
            .await
            .expect("delete");
        let status = resp.status();
        (status, resp.json().await.expect("json"))
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .body(body)
            .send()
            .await
            .expect("post");
        let status = resp.status();
        (status, resp.json().await.expect("json error body"))
    }
}

fn message_json(resource: &str) -> String {
    json!({
        "header": {},
        "route": { "source": "app", "group": "resource", "operation": "update", "resource": resource },
        "content": { "replicas": 3 }
    })
    .to_string()
}

#[tokio::test]
async fn send_and_wait_for_the_ack_over_both_protocols() {
    for protocol in Protocol::ALL {
        let cloud = Cloud::start(HubConfig::default()).await;
        let api = Api::start(&cloud, cloudhub::api::MAX_BODY_BYTES).await;
        assert_eq!(api.get("/v1/nodes").await, (StatusCode::OK, json!([])));
        let edge = cloud
            .connect_ready(protocol, "edge-1", Capabilities::ALL)
            .await;
        let (status, node) = api.get("/v1/nodes/edge-1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(node["connected"], json!(true));
        assert_eq!(node["protocol"], json!(protocol.as_str()));
        assert!(
            node["remote_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:"))
        );
        assert!(node["last_keepalive_ms"].as_i64().is_some());
        assert_eq!(node["queue"], json!({ "pending": 0, "in_flight": 0 }));

        let post = api.post(
            "/v1/nodes/edge-1/messages?wait=ack&timeout=30s",
            message_json("default/deployment/web"),
        );
        let edge_side = async {
            let msg = recv_app(edge.as_ref()).await;
            // The API filled in the id and timestamp.
            assert_eq!(msg.header.id.len(), 36);
            assert!(msg.header.timestamp > 0);
            // JSON on WebSocket, bytes of that JSON on QUIC (PROTOCOL.md B§1.5).
            let content: Value = serde_json::from_slice(&msg.content.to_bytes()).expect("json");
            assert_eq!(content, json!({ "replicas": 3 }));
            edge.send(proto::Message::response_to(&msg, Content::text("applied")))
                .await
                .expect("ack");
            msg.header.id
        };
        let ((status, body), id) = tokio::join!(post, edge_side);
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["id"], json!(id));
        assert_eq!(body["acked"], json!(true));
        assert_eq!(body["needs_ack"], json!(true));
        assert_eq!(body["response"]["route"]["operation"], json!("response"));
        assert_eq!(body["response"]["header"]["parent_msg_id"], json!(id));
        let (status, state) = api.get(&format!("/v1/nodes/edge-1/messages/{id}")).await;
        assert_eq!(
            (status, state["state"].clone()),
            (StatusCode::OK, json!("acked"))
        );
        cloud.stop();
    }
}

#[tokio::test]
async fn waiting_ends_with_202_when_the_edge_is_silent() {
    let cloud = Cloud::start(HubConfig::default()).await;
    let api = Api::start(&cloud, cloudhub::api::MAX_BODY_BYTES).await;
    let edge = cloud
        .connect_ready(Protocol::WebSocket, "edge-1", Capabilities::ALL)
        .await;
    let body = json!({
        "header": { "msg_id": "fixed-id-1" },
        "route": { "source": "app", "group": "resource", "operation": "update", "resource": "r" },
        "content": null
    });
    let (status, out) = api
        .post(
            "/v1/nodes/edge-1/messages?wait=ack&timeout=200ms",
            body.to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(out["acked"], json!(false));
    assert_eq!(out["id"], json!("fixed-id-1"), "a given id is kept");
    let msg = recv_app(edge.as_ref()).await;
    assert_eq!(msg.header.id, "fixed-id-1");
    let (_, state) = api.get("/v1/nodes/edge-1/messages/fixed-id-1").await;
    assert_eq!(state["state"], json!("in_flight"));
    // Posting the same id again is idempotent.
    let (status, out) = api
        .post("/v1/nodes/edge-1/messages", body.to_string())
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(out["duplicate"], json!(true));
    cloud.stop();
}

#[tokio::test]
async fn errors_are_json_with_a_4xx_status() {
    let cloud = Cloud::start(HubConfig::default()).await;
    let api = Api::start(&cloud, 1024).await;
    let (status, body) = api
        .post("/v1/nodes/nobody/messages", message_json("r"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], json!("unknown_node"));
    let (status, body) = api.get("/v1/nodes/nobody").await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::NOT_FOUND, json!("unknown_node"))
    );
    let _edge = cloud
        .connect_ready(Protocol::Quic, "edge-1", Capabilities::ALL)
        .await;
    for (body, code) in [
        ("{not json".to_owned(), "malformed_message"),
        ("[1, 2]".to_owned(), "malformed_message"),
        (
            r#"{"route": {"operation": 5}}"#.to_owned(),
            "malformed_message",
        ),
        // A body that is not a message in KubeEdge's shape decodes to an empty route.
        (
            r#"{"group": "resource", "operation": "update", "content": {}}"#.to_owned(),
            "missing_route",
        ),
        (
            r#"{"route": {"group": "resource", "resource": "default/configmap/a"}}"#.to_owned(),
            "missing_route",
        ),
    ] {
        let (status, out) = api.post("/v1/nodes/edge-1/messages", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{out}");
        assert_eq!(out["code"], json!(code));
        assert!(out["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (status, out) = api
        .post("/v1/nodes/edge-1/messages", "x".repeat(2048))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(out["code"], json!("too_large"));
    for query in [
        "wait=forever",
        "timeout=soon&wait=ack",
        "wait=ack&ack=false",
        "bogus=1",
    ] {
        let (status, out) = api
            .post(
                &format!("/v1/nodes/edge-1/messages?{query}"),
                message_json("r"),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {out}");
        assert_eq!(out["code"], json!("bad_query"));
    }
    let (status, out) = api.get("/v1/nowhere").await;
    assert_eq!(
        (status, out["code"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found"))
    );
    cloud.stop();
}

#[tokio::test]
async fn a_full_queue_answers_503_and_keeps_what_it_has() {
    let cloud = Cloud::start_with(HubConfig::default(), |store| store.queue_limit = 2).await;
    let api = Api::start(&cloud, cloudhub::api::MAX_BODY_BYTES).await;
    let edge = cloud
        .connect_ready(Protocol::WebSocket, "edge-1", Capabilities::ALL)
        .await;
    edge.close("offline").await.expect("close");
    cloud.hub.wait_sessions_at_most(0).await;
    for _ in 0..2 {
        let (status, _) = api
            .post("/v1/nodes/edge-1/messages", message_json("r"))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let resp = api
        .http
        .post(api.url("/v1/nodes/edge-1/messages"))
        .body(message_json("r"))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["code"], json!("queue_full"));
    let (_, node) = api.get("/v1/nodes/edge-1").await;
    assert_eq!(node["connected"], json!(false));
    assert_eq!(node["queue"]["pending"], json!(2));
    cloud.stop();
}

/// Reads server-sent events from `resp` until `n` `message` events arrived.
async fn read_events(resp: &mut reqwest::Response, n: usize) -> Vec<(u64, Value)> {
    let mut buf = String::new();
    let mut events = Vec::new();
    while events.len() < n {
        let chunk = within(resp.chunk()).await.expect("stream").expect("open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut id = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse::<u64>().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str::<Value>(v.trim()).ok();
                }
            }
            if let (Some(id), Some(data)) = (id, data) {
                events.push((id, data));
            }
        }
    }
    events
}

#[tokio::test]
async fn upstream_messages_stream_as_server_sent_events() {
    let cloud = Cloud::start(HubConfig::default()).await;
    let api = Api::start(&cloud, cloudhub::api::MAX_BODY_BYTES).await;
    let edge1 = cloud
        .connect_ready(Protocol::Quic, "edge-1", Capabilities::ALL)
        .await;
    let edge2 = cloud
        .connect_ready(Protocol::WebSocket, "edge-2", Capabilities::ALL)
        .await;
    let mut live = api
        .http
        .get(api.url("/v1/messages?node=edge-1"))
        .send()
        .await
        .expect("sse");
    assert_eq!(live.status(), StatusCode::OK);
    assert!(
        live.headers()["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/event-stream"))
    );
    edge2.send(upstream("from-2")).await.expect("send");
    edge1.send(upstream("from-1a")).await.expect("send");
    edge1.send(upstream("from-1b")).await.expect("send");
    let events = read_events(&mut live, 2).await;
    let ids: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["message"]["header"]["msg_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids, ["from-1a", "from-1b"], "filtered to edge-1, in order");
    assert_eq!(events[0].1["node"], json!("edge-1"));
    assert!(events[0].0 < events[1].0);
    // Resuming after the first event replays from the log.
    let mut resumed = api
        .http
        .get(api.url("/v1/messages?node=edge-1"))
        .header("Last-Event-ID", events[0].0.to_string())
        .send()
        .await
        .expect("sse");
    let replay = read_events(&mut resumed, 1).await;
    assert_eq!(replay[0].1["message"]["header"]["msg_id"], json!("from-1b"));
    // Everything retained, filtered by group.
    let mut all = api
        .http
        .get(api.url("/v1/messages?since=0&group=meta"))
        .send()
        .await
        .expect("sse");
    let every = read_events(&mut all, 5).await;
    assert_eq!(every.len(), 5, "two hellos and three messages");
    cloud.stop();
}

#[tokio::test]
async fn metrics_and_health() {
    let cloud = Cloud::start(HubConfig::default()).await;
    let api = Api::start(&cloud, cloudhub::api::MAX_BODY_BYTES).await;
    let _edge = cloud
        .connect_ready(Protocol::Quic, "edge-1", Capabilities::ALL)
        .await;
    let text = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    for expected in [
        "cloudhub_connected_nodes{protocol=\"quic\"} 1",
        "cloudhub_connected_nodes{protocol=\"websocket\"} 0",
        "cloudhub_upstream_accepted_total 1",
        "# TYPE cloudhub_ack_latency_seconds histogram",
    ] {
        assert!(text.contains(expected), "{expected} missing from\n{text}");
    }
    let health = api.http.get(api.url("/healthz")).send().await.expect("get");
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.expect("text"), "ok");
    cloud.stop();
}

#[tokio::test]
async fn cancelling_an_in_flight_message_ends_its_wait_and_frees_its_resource() {
    let cloud = Cloud::start(HubConfig::default()).await;
    let api = Api::start(&cloud, cloudhub::api::MAX_BODY_BYTES).await;
    let edge = cloud
        .connect_ready(Protocol::WebSocket, "edge-1", Capabilities::ALL)
        .await;
    let body = |id: &str| {
        json!({
            "header": { "msg_id": id },
            "route": { "source": "app", "group": "resource", "operation": "update", "resource": "r" },
            "content": null
        })
        .to_string()
    };
    let waiting = api.post(
        "/v1/nodes/edge-1/messages?wait=ack&timeout=60s",
        body("stuck"),
    );
    let edge_side = async {
        // Written once; the edge never answers it.
        let stuck = recv_app(edge.as_ref()).await;
        assert_eq!(stuck.header.id, "stuck");
        let (status, out) = api.post("/v1/nodes/edge-1/messages", body("next")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{out}");
        let (status, out) = api.delete("/v1/nodes/edge-1/messages/stuck").await;
        assert_eq!(status, StatusCode::OK, "{out}");
        assert_eq!(out["state"], json!("cancelled"), "{out}");
        assert!(
            out["cancelled_at_ms"].as_i64().is_some_and(|t| t > 0),
            "{out}"
        );
        stuck
    };
    let ((status, waited), stuck) = tokio::join!(waiting, edge_side);
    assert_eq!(status, StatusCode::OK, "{waited}");
    assert_eq!(waited["cancelled"], json!(true), "{waited}");
    assert_eq!(waited["acked"], json!(false), "{waited}");
    // The resource's next message goes at once (not after a resend of the cancelled one).
    let next = recv_app(edge.as_ref()).await;
    assert_eq!(next.header.id, "next");
    // A late ACK of the cancelled message changes nothing.
    edge.send(proto::Message::response_to(&stuck, Content::text("late")))
        .await
        .expect("late ack");
    edge.send(proto::Message::response_to(&next, Content::text("OK")))
        .await
        .expect("ack");
    within(async {
        while api.get("/v1/nodes/edge-1/messages/next").await.1["state"] != json!("acked") {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let (_, state) = api.get("/v1/nodes/edge-1/messages/stuck").await;
    assert_eq!(state["state"], json!("cancelled"), "{state}");
    let (status, out) = api.delete("/v1/nodes/edge-1/messages/next").await;
    assert_eq!(
        (status, &out["code"]),
        (StatusCode::CONFLICT, &json!("already_acked")),
        "{out}"
    );
    let (status, out) = api.delete("/v1/nodes/edge-1/messages/nope").await;
    assert_eq!(
        (status, &out["code"]),
        (StatusCode::NOT_FOUND, &json!("unknown_message")),
        "{out}"
    );
    let (_, node) = api.get("/v1/nodes/edge-1").await;
    assert_eq!(
        node["queue"],
        json!({ "pending": 0, "in_flight": 0 }),
        "{node}"
    );
    cloud.stop();
}
