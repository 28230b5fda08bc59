//! `call::perform` against a real HTTP server on loopback (axum): a GET and a POST with headers
//! and a body round-trip, an oversized answer and a slow one are refused with their codes.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};

use causeway_servicebus::call::{perform, prepare};
use causeway_servicebus::config::ServiceBusConfig;
use proto::http::{HeaderValues, HttpRequest, ServiceTarget};

async fn server() -> SocketAddr {
    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/echo",
            post(|headers: HeaderMap, body: Bytes| async move {
                let trace = headers
                    .get("x-trace")
                    .map(|v| v.to_str().unwrap_or("").to_owned())
                    .unwrap_or_default();
                (StatusCode::CREATED, [("x-trace", trace)], body)
            }),
        )
        .route("/big", get(|| async { vec![b'x'; 2048] }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn call_msg(
    op: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> proto::Message {
    let mut header = HeaderValues::new();
    for (k, v) in headers {
        header.insert((*k).to_owned(), vec![(*v).to_owned()]);
    }
    let req = HttpRequest {
        header,
        body: body.to_vec(),
        method: op.to_owned(),
        url: String::new(),
    };
    let target = ServiceTarget::parse(&format!("{}:{path}", addr.port())).unwrap();
    req.into_message(&target, "r-1".into(), 1)
}

#[tokio::test]
async fn real_server_round_trips_and_refusals() {
    let addr = server().await;
    let config = ServiceBusConfig {
        enable: true,
        allowed_targets: vec![addr],
        ..ServiceBusConfig::default()
    };
    let go = |msg: proto::Message, timeout: Duration, max: u64| {
        let call = prepare(&msg, &config).unwrap();
        perform(call, timeout, max)
    };
    let t = Duration::from_secs(10);

    let resp = go(call_msg("GET", addr, "/hello", &[], b""), t, 1024)
        .await
        .unwrap();
    assert_eq!(resp.status_code, 200);
    assert_eq!(resp.body, b"hello");
    assert_eq!(resp.header["Content-Type"], ["text/plain; charset=utf-8"]);

    let msg = call_msg(
        "POST",
        addr,
        "/echo",
        &[("X-Trace", "t-42"), ("Content-Type", "application/json")],
        b"{\"a\":1}",
    );
    let resp = go(msg, t, 1024).await.unwrap();
    assert_eq!(resp.status_code, 201);
    assert_eq!(resp.body, b"{\"a\":1}");
    assert_eq!(resp.header["X-Trace"], ["t-42"]);

    let resp = go(call_msg("GET", addr, "/missing", &[], b""), t, 1024)
        .await
        .unwrap();
    assert_eq!(
        resp.status_code, 404,
        "the service's own status passes through"
    );

    let e = go(call_msg("GET", addr, "/big", &[], b""), t, 1024)
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (502, "response_too_large"));
    // Exactly at the limit is fine.
    let resp = go(call_msg("GET", addr, "/big", &[], b""), t, 2048)
        .await
        .unwrap();
    assert_eq!(resp.body.len(), 2048);

    let e = go(
        call_msg("GET", addr, "/slow", &[], b""),
        Duration::from_millis(300),
        1024,
    )
    .await
    .unwrap_err();
    assert_eq!((e.status(), e.code()), (504, "timeout"));
}
