//! CloudHub as a beehive module: other cloud modules queue messages for a node by sending them
//! to `cloudhub` with KubeEdge's `node/<id>/<resource>` resource; the node receives them with
//! the prefix trimmed, over a real connection; and the module shuts down with the hive.

extern crate causeway_cloudhub as cloudhub;

mod common;

use std::sync::Arc;

use beehive::Beehive;
use cloudhub::module::{Bound, CloudHubModule, MODULE_NAME};
use cloudhub::store::{MessageState, NodeRecord};
use cloudhub::{Hub, HubConfig};
use common::{Cloud, recv_app, within};
use proto::Message;
use transport::{Capabilities, ListenConfig, Protocol};

#[tokio::test]
async fn messages_from_cloud_modules_reach_the_node() {
    // The edge side: a real hub with real listeners...
    let cloud = Cloud::start(HubConfig::default()).await;
    // ...driven through the module, which serves nothing itself here (no sockets bound).
    let listen = ListenConfig::new(cloud.pki.server.clone(), cloud.pki.ca.trust_anchors());
    let module = CloudHubModule::new(cloud.hub.clone(), Bound::default(), listen, None);
    let mut beehive = Beehive::new();
    beehive.register(module, true).expect("register");
    let hive = beehive.start();

    let edge = cloud
        .connect_ready(Protocol::WebSocket, "edge-1", Capabilities::ALL)
        .await;
    let msg = Message::new("").route(
        "edgecontroller",
        "resource",
        "node/edge-1/default/configmap/cfg",
        "update",
    );
    let id = msg.header.id.clone();
    hive.bus().send(MODULE_NAME, msg).await.expect("bus send");
    let got = recv_app(edge.as_ref()).await;
    assert_eq!(got.header.id, id);
    assert_eq!(
        got.route.resource, "default/configmap/cfg",
        "node prefix trimmed"
    );
    assert!(matches!(
        cloud.hub.message_state("edge-1", &id).await.expect("state"),
        Some(MessageState::Pending | MessageState::InFlight { .. })
    ));
    // A message naming no node is refused (logged), not queued anywhere.
    let stray = Message::new("").route("x", "resource", "default/pod/p", "update");
    let stray_id = stray.header.id.clone();
    hive.bus().send(MODULE_NAME, stray).await.expect("bus send");
    let report = within(hive.shutdown()).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        cloud
            .hub
            .message_state("edge-1", &stray_id)
            .await
            .expect("state"),
        None
    );
    cloud.stop();
}

#[tokio::test]
async fn a_known_offline_node_gets_module_messages_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = cloudhub::store::sqlite::SqliteStore::open(
        cloudhub::store::sqlite::SqliteConfig::new(dir.path().join("q.db")),
    )
    .expect("store");
    let store: Arc<dyn cloudhub::store::MessageStore> = Arc::new(store);
    store
        .register_node(NodeRecord {
            id: "edge-9".into(),
            project: "p".into(),
            first_seen_ms: 1,
            last_seen_ms: 1,
        })
        .await
        .expect("register");
    let hub = Hub::new(HubConfig::default(), Arc::clone(&store));
    let pki = common::Pki::new();
    let listen = ListenConfig::new(pki.server.clone(), pki.ca.trust_anchors());
    let mut beehive = Beehive::new();
    beehive
        .register(
            CloudHubModule::new(hub.clone(), Bound::default(), listen, None),
            true,
        )
        .expect("register");
    let hive = beehive.start();
    let msg = Message::new("").route(
        "edgecontroller",
        "resource",
        "node/edge-9/ns/pod/p",
        "update",
    );
    let id = msg.header.id.clone();
    hive.bus().send(MODULE_NAME, msg).await.expect("bus send");
    let report = within(hive.shutdown()).await;
    assert!(report.is_clean(), "{report:?}");
    let pending = store.pending("edge-9", 0, 10).await.expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].message.header.id, id);
    assert_eq!(pending[0].message.route.resource, "ns/pod/p");
    assert!(pending[0].needs_ack);
}

/// Upstream routing by source (PROTOCOL.md B§8.3 item 8): a registered cloud module receives its
/// messages with the `node/<id>/` prefix and the edge's ACK waits for the module's answer (an
/// error answer is tried again); a message for a module that is not registered takes the
/// application path (upstream log), counted; nothing is lost either way.
#[tokio::test]
async fn upstream_goes_to_the_cloud_module_of_its_source() {
    let cloud = Cloud::start(HubConfig::default()).await;
    let listen = ListenConfig::new(cloud.pki.server.clone(), cloud.pki.ca.trust_anchors());
    let module = CloudHubModule::new(cloud.hub.clone(), Bound::default(), listen, None);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Message>();
    // A stand-in edgecontroller (a real beehive module): refuses each message's first hand-over,
    // takes the second.
    let controller = beehive::SimpleModule::new(
        "edgecontroller",
        "edgecontroller",
        move |mut ctx: beehive::ModuleContext| {
            let seen_tx = seen_tx.clone();
            async move {
                let mut refused = std::collections::HashSet::new();
                while let Some(msg) = ctx.recv().await {
                    let answer = if refused.insert(msg.header.id.clone()) {
                        Message::error_for(&msg, "not now")
                    } else {
                        let _ = seen_tx.send(msg.clone());
                        Message::response_to(&msg, proto::Content::text("OK"))
                    };
                    let _ = ctx.bus().send_resp(answer);
                }
                Ok(())
            }
        },
    );
    let mut beehive = Beehive::new();
    beehive.register(module, true).expect("register");
    beehive.register(controller, true).expect("register");
    let hive = beehive.start();
    let mut feed = cloud.hub.store().subscribe_upstream();

    let edge = cloud
        .connect(Protocol::WebSocket, "edge-1", Capabilities::ALL)
        .await;
    edge.send(common::keepalive()).await.expect("keepalive");
    let status = Message::new("").route("edged", "meta", "default/podstatus/p", "update");
    edge.send(status.clone()).await.expect("send");
    let ack = within(edge.recv()).await.expect("ok").expect("open");
    assert_eq!(ack.header.parent_id, status.header.id, "ACKed once taken");
    let got = within(seen.recv()).await.expect("handed over");
    assert_eq!(got.header.id, status.header.id);
    assert_eq!(got.route.resource, "node/edge-1/default/podstatus/p");

    // `metaserver` → dynamiccontroller, which is not registered: the application path.
    let app = Message::new("").route("metaserver", "meta", "default/pod/p", "query");
    edge.send(app.clone()).await.expect("send");
    let ack = within(edge.recv()).await.expect("ok").expect("open");
    assert_eq!(ack.header.parent_id, app.header.id);
    let rec = within(feed.recv()).await.expect("logged");
    assert_eq!(rec.message, app, "unchanged on the application path");
    let metrics = cloud.hub.metrics_text().await;
    assert!(
        metrics.contains("cloudhub_upstream_unrouted_total{module=\"dynamiccontroller\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cloudhub_upstream_routed_total{module=\"edgecontroller\"} 1"),
        "{metrics}"
    );
    assert!(seen.try_recv().is_err(), "the controller saw only its own");
    let report = within(hive.shutdown()).await;
    assert!(report.is_clean(), "{report:?}");
    cloud.stop();
}
