//! End to end: the cloud API calls an HTTP service on an edge node through servicebus, with the
//! real `cloudcore` and `edgecore` over each protocol and a real HTTP server (axum) the test
//! starts on loopback beside the edge.
//!
//! A GET with a query and a POST with a body and headers round-trip (status, headers, body);
//! each refusal comes back as a clear answer: a port the edge does not allow (403, from the
//! edge), a refused connection (502), the service's timeout (504, from the edge), an oversized
//! answer (502), the cloud giving up first (504 `edge_timeout`, the late reply dropped), an
//! unknown node (404) and an offline node (503, nothing queued). Afterwards nothing waits: the
//! node's queue and the edge's outbox are empty.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, bootstrap_token, http_with, json_of,
    wait_until,
};
use causeway_tests::drain::{node_view, wait_drained};

const PATIENCE: Duration = Duration::from_secs(60);
const NODE: &str = "edge-sb";

/// The local service: a runtime on its own thread serving until the test ends.
struct Service {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl Service {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let app = Router::new()
            .route(
                "/hello",
                get(|RawQuery(q): RawQuery| async move {
                    (
                        [("x-served-by", "test-service")],
                        format!("hello {}", q.unwrap_or_default()),
                    )
                }),
            )
            .route(
                "/items/echo",
                post(|headers: HeaderMap, body: Bytes| async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    (
                        StatusCode::CREATED,
                        [
                            ("x-trace", header("x-trace")),
                            ("content-type", header("content-type")),
                            ("x-saw-authorization", header("authorization")),
                        ],
                        body,
                    )
                }),
            )
            .route("/big", get(|| async { vec![b'x'; 4096] }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            _runtime: runtime,
        }
    }
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn edge_config(
    dir: &Path,
    protocol: &str,
    cloud: &Cloud,
    token: &str,
    targets: &[SocketAddr],
) -> PathBuf {
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let targets = targets.join(", ");
    EdgeConfig::new(protocol, NODE, cloud.server(protocol), &dir.join("edge"))
        .bootstrap(cloud.https, Some(token))
        .deadlines(2)
        .modules(&format!(
            "  service-bus:
    enable: true
    allowed-targets: [{targets}]
    timeout: 2
    max-response-bytes: 1024
"
        ))
        .write_in(dir)
}

/// A proxy call through the cloud API: (status, response head, body).
fn call(
    cloud: &Cloud,
    method: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    http_with(
        cloud.api,
        method,
        &format!("/v1/nodes/{NODE}/proxy/{port}{path}"),
        headers,
        body,
    )
}

/// The `code` of an error body.
fn code(body: &str) -> String {
    json_of(body)["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn has_header(head: &str, name: &str, value: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(n, v)| n.trim().eq_ignore_ascii_case(name) && v.trim() == value)
    })
}

fn servicebus(protocol: &str) {
    let service = Service::start();
    let refused = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let token = bootstrap_token(root);
    let config = edge_config(root, protocol, &cloud, &token, &[service.addr, refused]);
    let port = service.addr.port();

    // Unknown node: nothing to call.
    let (status, _, body) = http_with(cloud.api, "GET", "/v1/nodes/nobody/proxy/80/x", &[], "");
    assert_eq!(
        (status, code(&body).as_str()),
        (404, "unknown_node"),
        "{body}"
    );

    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();

    // GET with a query string.
    let (status, head, body) = call(&cloud, "GET", port, "/hello?name=edge&n=1", &[], "");
    assert_eq!(status, 200, "{head}\n{body}");
    assert_eq!(body, "hello name=edge&n=1");
    assert!(has_header(&head, "x-served-by", "test-service"), "{head}");

    // POST with a body and headers; the API's Authorization is not forwarded.
    let payload = r#"{"item":"valve-7","open":true}"#;
    let (status, head, body) = call(
        &cloud,
        "POST",
        port,
        "/items/echo",
        &[
            ("X-Trace", "trace-42"),
            ("Authorization", "Bearer not-for-the-edge"),
        ],
        payload,
    );
    assert_eq!(status, 201, "{head}\n{body}");
    assert_eq!(body, payload);
    assert!(has_header(&head, "x-trace", "trace-42"), "{head}");
    assert!(
        has_header(&head, "content-type", "application/json"),
        "{head}"
    );
    assert!(has_header(&head, "x-saw-authorization", ""), "{head}");

    // The service's own 404 passes through as its answer.
    let (status, head, _) = call(&cloud, "GET", port, "/missing", &[], "");
    assert_eq!(status, 404);
    assert!(!head.contains("causeway-edgecore"), "{head}");

    // A port the edge does not allow: 403 from the edge.
    let (status, head, body) = call(&cloud, "GET", 1, "/x", &[], "");
    assert_eq!(
        (status, code(&body).as_str()),
        (403, "target_not_allowed"),
        "{body}"
    );
    assert!(has_header(&head, "server", "causeway-edgecore"), "{head}");
    assert!(body.contains("port 1 is not an allowed target"), "{body}");

    // Allowed, but nothing listens: 502 connection_refused.
    let (status, _, body) = call(&cloud, "GET", refused.port(), "/x", &[], "");
    assert_eq!(
        (status, code(&body).as_str()),
        (502, "connection_refused"),
        "{body}"
    );

    // Larger than max-response-bytes: 502 response_too_large.
    let (status, _, body) = call(&cloud, "GET", port, "/big", &[], "");
    assert_eq!(
        (status, code(&body).as_str()),
        (502, "response_too_large"),
        "{body}"
    );

    // The service is slower than the edge's timeout (2 s): 504 from the edge.
    let (status, head, body) = call(&cloud, "GET", port, "/slow", &[], "");
    assert_eq!((status, code(&body).as_str()), (504, "timeout"), "{body}");
    assert!(has_header(&head, "server", "causeway-edgecore"), "{head}");

    // The cloud gives up before the edge answers: 504 edge_timeout; the edge's late reply
    // (its own 504, a second later) is dropped and still acknowledged.
    let (status, _, body) = call(
        &cloud,
        "GET",
        port,
        "/slow",
        &[("X-Causeway-Timeout", "500ms")],
        "",
    );
    assert_eq!(
        (status, code(&body).as_str()),
        (504, "edge_timeout"),
        "{body}"
    );

    // Nothing waits: the node's queue is empty and every reply left the edge's outbox.
    let outbox = root.join("edge/outbox.db");
    wait_drained(cloud.api, NODE, &outbox, PATIENCE);

    // Offline: 503 at once, and nothing is queued for later.
    assert_eq!(edge.daemon.stop(), Some(0));
    wait_until("node offline", PATIENCE, || {
        let view = node_view(cloud.api, NODE);
        if view["connected"] == false {
            Ok(())
        } else {
            Err(view.to_string())
        }
    });
    let (status, head, body) = call(&cloud, "POST", port, "/items/echo", &[], "{}");
    assert_eq!(
        (status, code(&body).as_str()),
        (503, "node_offline"),
        "{body}"
    );
    assert!(body.contains("not queued"), "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
    let view = node_view(cloud.api, NODE);
    assert_eq!(view["queue"]["pending"], 0, "{view}");
    assert_eq!(cloud.daemon.stop(), Some(0));
}

#[test]
fn websocket_servicebus() {
    servicebus("websocket");
}

#[test]
fn quic_servicebus() {
    servicebus("quic");
}
