//! devicetwin as a running beehive module with its real SQLite file and a real metamanager
//! store: what it publishes is captured by a real module registered as `eventbus`, what it
//! sends the cloud by one registered as `websocket` (EdgeHub's name).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use beehive::{Beehive, Hive, ModuleError, SimpleModule};
use causeway_devicetwin::topic;
use causeway_devicetwin::{DeviceTwin, DeviceTwinConfig};
use metamanager::MetaStore;
use proto::{Content, Message};

const NODE: &str = "edge-1";
const DEV: &str = "default/thermo-1";

struct Rig {
    hive: Hive,
    published: mpsc::UnboundedReceiver<Message>,
    synced: mpsc::UnboundedReceiver<Message>,
}

fn capture(
    name: &'static str,
    group: &'static str,
) -> (impl beehive::Module, mpsc::UnboundedReceiver<Message>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let module = SimpleModule::new(name, group, move |mut ctx| {
        let tx = tx.clone();
        async move {
            while let Some(m) = ctx.recv().await {
                let _ = tx.send(m);
            }
            Ok::<(), ModuleError>(())
        }
    });
    (module, rx)
}

fn start(dir: &std::path::Path, meta: Option<Arc<MetaStore>>) -> Rig {
    let config = DeviceTwinConfig {
        enable: true,
        path: dir.join("devicetwin.db"),
    };
    let mut beehive = Beehive::new();
    beehive
        .register(DeviceTwin::new(config, NODE, meta), true)
        .unwrap();
    let (bus, published) = capture("eventbus", "bus");
    let (hub, synced) = capture("websocket", "hub");
    beehive.register(bus, true).unwrap();
    beehive.register(hub, true).unwrap();
    Rig {
        hive: beehive.start(),
        published,
        synced,
    }
}

impl Rig {
    /// A publication from MQTT, as eventbus hands it over.
    async fn mqtt(&self, topic: &str, payload: &str) {
        let msg = Message::new("")
            .route("bus", "user", topic::encode(topic), "response")
            .content(Content::text(payload));
        self.hive.bus().send_to_group("twin", msg).await.unwrap();
    }

    /// A message from the cloud, as EdgeHub delivers it.
    async fn cloud(&self, msg: Message) {
        self.hive.bus().send_to_group("twin", msg).await.unwrap();
    }

    /// The next publication on `topic` (others skipped).
    async fn published_on(&mut self, topic: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = tokio::time::timeout_at(deadline, self.published.recv())
                .await
                .unwrap_or_else(|_| panic!("nothing published on {topic}"))
                .unwrap();
            assert_eq!(m.route.operation, "publish");
            if m.route.resource == topic {
                return serde_json::from_str(m.content.as_text().unwrap()).unwrap();
            }
        }
    }

    async fn next_sync(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(20), self.synced.recv())
            .await
            .expect("a message for the cloud")
            .unwrap()
    }
}

fn membership_add() -> Message {
    Message::new("")
        .route("devicecontroller", "twin", "membership", "update")
        .content(Content::Json(json!({"event_id":"m","timestamp":1,
            "added_devices":[{"id": DEV, "name":"thermo-1","description":"lab"}],
            "removed_devices":null})))
}

fn dev_topic(suffix: &str) -> String {
    topic::device_topic(DEV, suffix)
}

#[tokio::test]
async fn reports_are_answered_stored_and_synced_and_bad_payloads_get_error_results() {
    let dir = tempfile::tempdir().unwrap();
    let mut rig = start(dir.path(), None);
    rig.cloud(membership_add()).await;
    let updated = rig
        .published_on(&topic::node_topic(NODE, "membership/updated"))
        .await;
    assert_eq!(updated["added_devices"][0]["id"], DEV);

    rig.mqtt(
        &dev_topic("twin/update"),
        r#"{"event_id":"e-42","timestamp":1,"twin":{"temperature":{"actual":{"value":"24"},"metadata":{"type":"int"}}}}"#,
    )
    .await;
    let result = rig.published_on(&dev_topic("twin/update/result")).await;
    assert_eq!(result["event_id"], "e-42");
    assert_eq!(result["twin"]["temperature"]["actual"]["value"], "24");
    let doc = rig.published_on(&dev_topic("twin/update/document")).await;
    assert_eq!(doc["twin"]["temperature"]["last"], Value::Null);
    let sync = rig.next_sync().await;
    assert_eq!(sync.route.source, "twin");
    assert_eq!(sync.route.group, "resource");
    assert_eq!(sync.route.operation, "update");
    assert_eq!(
        sync.route.resource,
        format!("device/{DEV}/twin/edge_updated")
    );
    let Content::Json(body) = &sync.content else {
        panic!("edge_updated content is a JSON object")
    };
    assert_eq!(body["twin"]["temperature"]["actual_version"]["edge"], 1);

    // Bad payloads: error results, and the module keeps answering.
    for (payload, code) in [
        ("not json", 400),
        (
            r#"{"event_id":"b","twin":{"temperature":{"actual":{}}}}"#,
            400,
        ),
        (
            r#"{"event_id":"b","twin":{"temperature":{"actual":{"value":"hot"}}}}"#,
            400,
        ),
    ] {
        rig.mqtt(&dev_topic("twin/update"), payload).await;
        let r = rig.published_on(&dev_topic("twin/update/result")).await;
        assert_eq!(r["code"], code, "{payload}: {r}");
    }
    rig.mqtt(
        &topic::device_topic("default/ghost", "twin/update"),
        r#"{"event_id":"g","twin":{"t":{"actual":{"value":"1"}}}}"#,
    )
    .await;
    let r = rig
        .published_on(&topic::device_topic("default/ghost", "twin/update/result"))
        .await;
    assert_eq!(r["code"], 404);

    // State: stored, answered, synced as a JSON string.
    rig.mqtt(
        &dev_topic("state/update"),
        r#"{"event_id":"","State":"online"}"#,
    )
    .await;
    let r = rig.published_on(&dev_topic("state/update/result")).await;
    assert_eq!(r["device"]["state"], "online");
    let sync = rig.next_sync().await;
    assert_eq!(sync.route.resource, format!("device/{DEV}/state/update"));
    let text = sync.content.as_text().expect("a JSON string");
    assert_eq!(
        serde_json::from_str::<Value>(text).unwrap()["device"]["state"],
        "online"
    );

    rig.mqtt(
        &topic::node_topic(NODE, "membership/get"),
        r#"{"event_id":"m-1"}"#,
    )
    .await;
    let r = rig
        .published_on(&topic::node_topic(NODE, "membership/get/result"))
        .await;
    assert_eq!(r["event_id"], "m-1");
    assert_eq!(r["devices"][0]["state"], "online");

    // On connect it asks the cloud for the whole membership.
    rig.cloud(
        Message::new("")
            .route("edgehub", "twin", "node/connection", "connect")
            .content(Content::text("cloud_connected")),
    )
    .await;
    let ask = rig.next_sync().await;
    assert_eq!(ask.route.resource, "membership/detail");
    assert_eq!(ask.route.operation, "get");
    let ask: Value = serde_json::from_str(ask.content.as_text().unwrap()).unwrap();
    assert_eq!(ask["group_id"], NODE);
    rig.hive.shutdown().await;

    // Restarted: the stored twin serves `get` (no cloud involved).
    let mut rig = start(dir.path(), None);
    rig.mqtt(&dev_topic("twin/get"), r#"{"event_id":"g-7"}"#)
        .await;
    let r = rig.published_on(&dev_topic("twin/get/result")).await;
    assert_eq!(r["event_id"], "g-7");
    assert_eq!(r["twin"]["temperature"]["actual"]["value"], "24");

    // A detail answer without the device removes it.
    rig.cloud(
        Message::new("")
            .route("devicecontroller", "twin", "membership/detail", "update")
            .content(Content::text(
                r#"{"event_id":"d","timestamp":1,"devices":[]}"#,
            )),
    )
    .await;
    let u = rig
        .published_on(&topic::node_topic(NODE, "membership/updated"))
        .await;
    assert_eq!(u["removed_devices"][0]["id"], DEV);
    rig.mqtt(&dev_topic("twin/get"), r#"{"event_id":"g-8"}"#)
        .await;
    let r = rig.published_on(&dev_topic("twin/get/result")).await;
    assert_eq!(r["code"], 404);
    let report = rig.hive.shutdown().await;
    assert!(report.is_clean(), "{:?}", report.problems());
}

#[tokio::test]
async fn desired_values_from_device_objects_reach_the_delta_topic() {
    let dir = tempfile::tempdir().unwrap();
    let meta = Arc::new(MetaStore::open(&dir.path().join("meta.db"), 1000).unwrap());
    let device = |rv: u64, value: &str| {
        let mut m = Message::new("")
            .route(
                "devicecontroller",
                "resource",
                "default/device/thermo-1",
                "update",
            )
            .content(Content::Json(json!({
                "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
                "metadata": {"name": "thermo-1", "namespace": "default", "uid": "u1",
                             "resourceVersion": rv.to_string()},
                "spec": {"deviceModelRef": {"name": "thermo"}, "nodeName": NODE,
                         "properties": [{"name": "setpoint", "desired": {"value": value}}]}})));
        m.header.resource_version = rv.to_string();
        m
    };
    // Stored before devicetwin starts: read at start.
    let m = device(1, "25");
    meta.apply(&m, &metamanager::decide::inspect(&m).unwrap())
        .unwrap();
    let mut rig = start(dir.path(), Some(Arc::clone(&meta)));
    let delta = rig.published_on(&dev_topic("twin/update/delta")).await;
    assert_eq!(delta["delta"], json!({"setpoint": "25"}));
    // Changed while running: followed.
    let m = device(2, "27");
    meta.apply(&m, &metamanager::decide::inspect(&m).unwrap())
        .unwrap();
    let delta = rig.published_on(&dev_topic("twin/update/delta")).await;
    assert_eq!(delta["delta"], json!({"setpoint": "27"}));
    // The device reports the desired value: no delta is left.
    rig.mqtt(
        &dev_topic("twin/update"),
        r#"{"event_id":"r","twin":{"setpoint":{"actual":{"value":"27"}}}}"#,
    )
    .await;
    let r = rig.published_on(&dev_topic("twin/update/result")).await;
    assert_eq!(r["twin"]["setpoint"]["expected"]["value"], "27");
    rig.mqtt(&dev_topic("twin/get"), r#"{"event_id":"g"}"#)
        .await;
    let g = rig.published_on(&dev_topic("twin/get/result")).await;
    assert_eq!(g["twin"]["setpoint"]["actual"]["value"], "27");
    rig.hive.shutdown().await;
}
