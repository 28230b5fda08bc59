//! The cloud API's request bound over real HTTP: with every turn taken (here: one request whose
//! body is still arriving), the next request waits `request_wait` for a turn and is then refused
//! with 503 `overloaded` and `Retry-After`; once the turn is free, requests pass again. Event
//! streams take no turn.

extern crate causeway_cloudhub as cloudhub;

mod common;

use std::time::Duration;

use cloudhub::HubConfig;
use cloudhub::api::ApiOptions;
use common::{Cloud, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn request(addr: std::net::SocketAddr, text: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(text.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_request_beyond_the_bound_waits_then_gets_503() {
    let cloud = Cloud::start(HubConfig::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let options = ApiOptions {
        max_concurrent_requests: 1,
        request_wait: Duration::from_millis(300),
        ..ApiOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cloudhub::api::serve_with_options(
        listener,
        cloud.hub.clone(),
        options,
        async {
            let _ = stopped.await;
        },
    ));

    // An open event stream takes no turn: the one turn stays free for a GET.
    let mut sse = TcpStream::connect(addr).await.expect("connect");
    sse.write_all(b"GET /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let get = "GET /v1/nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = within(request(addr, get)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // One POST holds the only turn while its body is still arriving.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(
        b"POST /v1/nodes/n/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .expect("write");
    // The turn is taken as soon as the request is routed; poll until a GET is refused.
    let refused = within(async {
        loop {
            let answer = request(addr, get).await;
            if answer.starts_with("HTTP/1.1 503") {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    assert!(refused.contains(r#""code":"overloaded""#), "{refused}");

    // The slow request ends (a bad body): the turn is free again.
    slow.write_all(&[b' '; 99]).await.expect("rest of the body");
    let mut buf = [0u8; 12];
    within(slow.read_exact(&mut buf)).await.expect("answer");
    assert_eq!(&buf, b"HTTP/1.1 400", "a body of blanks is no message");
    let answer = within(request(addr, get)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let _ = stop.send(());
}
