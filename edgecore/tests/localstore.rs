//! The local store module on a real beehive: it acknowledges a cloud message only after storing
//! it, stores a resend once but acknowledges it again, tracks the cloud connection, serves the
//! stored messages over loopback HTTP and forwards what local applications send to EdgeHub.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use beehive::{Beehive, ModuleError, SimpleModule};
use causeway_edgecore::config::LocalStoreConfig;
use causeway_edgecore::localstore::{LocalStore, MessageTable};
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

async fn next(rx: &mut mpsc::Receiver<(Message, bool)>) -> (Message, bool) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_then_acknowledges_dedups_and_serves_local_apps() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("local.db");
    let config = LocalStoreConfig {
        path: db.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..LocalStoreConfig::default()
    };
    let store = LocalStore::new(config);
    let bound = store.bound_addr();
    // EdgeHub's place on the bus: record what the store sends to the cloud.
    let (tx, mut to_cloud) = mpsc::channel(16);
    let db_probe = db.clone();
    let hub = SimpleModule::new("websocket", "hub", move |mut ctx| {
        let tx = tx.clone();
        let db = db_probe.clone();
        async move {
            while let Some(msg) = ctx.recv().await {
                // An ACK may only leave once the row is committed: check from another handle.
                let committed = MessageTable::open(&db, 100)
                    .and_then(|t| t.contains(&msg.header.parent_id))
                    .unwrap_or(false);
                let _ = tx.send((msg, committed)).await;
            }
            Ok::<(), ModuleError>(())
        }
    });
    let mut beehive = Beehive::new();
    beehive.register(store, true).unwrap();
    beehive.register(hub, true).unwrap();
    let hive = beehive.start();
    let bus = hive.bus().clone();

    let pod = Message::with_header("cloud-1", "", 1)
        .route("edgecontroller", "resource", "default/pod/p", "update")
        .content(Content::Json(serde_json::json!({"spec": {"x": 1}})));
    bus.send_to_group("meta", pod.clone()).await.unwrap();

    let (ack, committed) = next(&mut to_cloud).await;
    assert_eq!(
        (ack.route.operation.as_str(), ack.header.parent_id.as_str()),
        ("response", "cloud-1")
    );
    assert_eq!(ack.content.as_text(), Some("OK"));
    assert!(committed, "acknowledged only after the row was committed");

    // The cloud resends (its ACK was lost): stored once, acknowledged again.
    bus.send_to_group("meta", pod).await.unwrap();
    let (again, _) = next(&mut to_cloud).await;
    assert_eq!(again.header.parent_id, "cloud-1");

    // Before any connection event the cloud counts as disconnected, never "unknown".
    let addr = bound.lock().unwrap().expect("bound");
    let (_, before) = http(addr, "GET", "/v1/status", "").await;
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();
    assert_eq!(before["cloud"], "disconnected", "{before}");
    // Connection events set the status; they are not stored.
    let event =
        session::edge::route::connection_event("meta", true, proto::new_id(), proto::now_millis());
    bus.send_to_group("meta", event).await.unwrap();
    // The event crosses the bus asynchronously: poll, bounded by a generous deadline so a slow
    // machine cannot fail the test.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut status = String::new();
    while std::time::Instant::now() < deadline {
        status = http(addr, "GET", "/v1/status", "").await.1;
        if status.contains("\"connected\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status,
        serde_json::json!({"cloud": "connected", "last_error": null, "stored": 1,
                           "storage_error": null})
    );

    let (code, body) = http(addr, "GET", "/v1/messages?after=0", "").await;
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["messages"].as_array().unwrap().len(), 1);
    assert_eq!(
        list["messages"][0]["message"]["header"]["msg_id"],
        "cloud-1"
    );
    assert_eq!(list["messages"][0]["message"]["content"]["spec"]["x"], 1.0);
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
    let (up, _) = next(&mut to_cloud).await;
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
