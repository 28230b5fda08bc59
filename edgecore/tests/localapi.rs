//! The local endpoint on a real beehive beside metamanager (a real SQLite file): it serves the
//! journal of cloud messages metamanager applied and its status, and forwards what local
//! applications send to EdgeHub (here a small module in EdgeHub's place that records it).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use beehive::{Beehive, ModuleError, SimpleModule};
use causeway_edgecore::config::LocalApiConfig;
use causeway_edgecore::localapi::LocalApi;
use metamanager::{MetaManager, MetaManagerConfig};
use proto::{Content, Message};

/// A plain HTTP/1.1 request on loopback; returns (status, body).
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn next(rx: &mut mpsc::Receiver<Message>) -> Message {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_journal_and_status_and_forwards_local_apps() {
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaManager::open(MetaManagerConfig {
        path: dir.path().join("meta.db"),
        ..MetaManagerConfig::default()
    })
    .unwrap();
    let api = LocalApi::new(LocalApiConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..LocalApiConfig::default()
    })
    .with_meta(meta.store(), Duration::from_secs(1));
    let bound = api.bound_addr();
    // EdgeHub's place on the bus: record what is sent to the cloud.
    let (tx, mut to_cloud) = mpsc::channel(16);
    let hub = SimpleModule::new("websocket", "hub", move |mut ctx| {
        let tx = tx.clone();
        async move {
            while let Some(msg) = ctx.recv().await {
                let _ = tx.send(msg).await;
            }
            Ok::<(), ModuleError>(())
        }
    });
    let mut beehive = Beehive::new();
    beehive.register(meta, true).unwrap();
    beehive.register(api, true).unwrap();
    beehive.register(hub, true).unwrap();
    let hive = beehive.start();
    let bus = hive.bus().clone();

    let cm = Message::with_header("cloud-1", "", 1)
        .route(
            "edgecontroller",
            "resource",
            "default/configmap/c",
            "update",
        )
        .content(Content::Json(serde_json::json!({"data": {"x": 1}})));
    bus.send_to_group("meta", cm).await.unwrap();
    let ack = next(&mut to_cloud).await;
    assert_eq!(ack.header.parent_id, "cloud-1");

    let addr = loop {
        if let Some(addr) = *bound.lock().unwrap() {
            break addr;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (_, status) = http(addr, "GET", "/v1/status", "").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status,
        serde_json::json!({"cloud": "disconnected", "last_error": null, "stored": 1,
                           "objects": 1, "storage_error": null, "protocol": null,
                           "fallback": false})
    );

    let (code, body) = http(addr, "GET", "/v1/messages?after=0", "").await;
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["messages"].as_array().unwrap().len(), 1);
    assert_eq!(
        list["messages"][0]["message"]["header"]["msg_id"],
        "cloud-1"
    );
    assert_eq!(list["messages"][0]["message"]["content"]["data"]["x"], 1.0);
    assert_eq!(list["next"], 1);
    let (_, body) = http(addr, "GET", "/v1/messages?after=1", "").await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["messages"],
        serde_json::json!([])
    );

    // A local application sends upstream through EdgeHub.
    let (code, body) = http(
        addr,
        "POST",
        "/v1/upstream",
        r#"{"group":"user","resource":"sensors/t1","operation":"upload","content":{"celsius":21.5}}"#,
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let up = next(&mut to_cloud).await;
    assert_eq!(up.header.id, id);
    assert_eq!(
        (up.route.source.as_str(), up.route.group.as_str()),
        ("localapp", "user")
    );
    let (code, _) = http(addr, "POST", "/v1/upstream", r#"{"group":"user"}"#).await;
    assert_eq!(code, 400, "missing fields are refused");

    let report = hive.shutdown().await;
    assert!(report.is_clean(), "{report:?}");
}
