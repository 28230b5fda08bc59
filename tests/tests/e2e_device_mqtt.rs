//! End to end: the device path over MQTT, with the real `cloudcore` (object store,
//! devicecontroller) and the real `edgecore` (eventbus, devicetwin, metamanager) on loopback,
//! over each protocol and each broker (the embedded one; a real mosquitto the test starts,
//! skipped with a printed reason where it is not installed). The devices and applications are
//! real MQTT clients: rumqttc, and `mosquitto_pub` / `mosquitto_sub` where installed.
//!
//! One set-up per case, then in order:
//! - a desired twin set in the cloud API (a Device created, then changed) reaches an MQTT
//!   subscriber on the node as KubeEdge's `twin/update/document` and `twin/update/delta`;
//! - a device's reported values (`twin/update`) get `twin/update/result` and show in the device's
//!   status in the cloud API and in `causeway get devices`; its `state/update` too;
//! - bad payloads (malformed JSON, a value of the wrong type, unknown devices) get KubeEdge's
//!   error results (400, 404), a bad state update is counted (`/v1/status` `devicetwin.refused`),
//!   and a good message after them is handled;
//! - with cloudcore stopped, `twin/get` is answered on `twin/get/result` from the node's store,
//!   and a report made meanwhile reaches the cloud once it is back;
//! - every queue drains (the edge's outbox, the cloud's queue for the node), every request got
//!   exactly one result, and every delta the subscriber received has its own event id. (The
//!   reports themselves are handed to devicecontroller, not to the upstream log, so the cloud
//!   side is checked by the values in the DeviceStatus.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, binary, http, json_of, outbox_rows,
    wait_until,
};
use causeway_tests::mqtt::{
    Device, Mode, Mosquitto, eventbus_module, free_port, installed, mosquitto_or_skip, wait_broker,
};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(60);
const NODE: &str = "edge-mqtt";
const DEVICE: &str = "$hw/events/device/default/thermo-1";

/// What the application on the node received, kept whole: waits search it, so the order in
/// which devicetwin publishes (result, document, delta) does not matter.
struct Inbox {
    app: Device,
    got: Vec<(String, Value)>,
}

impl Inbox {
    /// Waits for a JSON payload on `topic` for which `wanted` holds.
    fn wait(&mut self, topic: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some((_, v)) = self.got.iter().find(|(t, v)| t == topic && wanted(v)) {
                return v.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nothing wanted on {topic}; received: {:?}",
                self.got
            );
            if let Some((t, body)) = self.app.recv_for(Duration::from_millis(200)) {
                let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
                self.got.push((t, v));
            }
        }
    }

    /// The result on `<DEVICE>/<suffix>/result` for event `event_id`.
    fn result(&mut self, suffix: &str, event_id: &str) -> Value {
        self.wait(&format!("{DEVICE}/{suffix}/result"), |v| {
            v["event_id"] == event_id
        })
    }
}

fn put(api: SocketAddr, path: &str, body: &Value) {
    let (code, text) = http(api, "PUT", path, &body.to_string());
    assert!(code == 200 || code == 201, "PUT {path}: {code} {text}");
}

fn device_object(desired: &str) -> Value {
    json!({"metadata": {"labels": {"description": "lab"}},
           "spec": {"deviceModelRef": {"name": "thermo"}, "nodeName": NODE,
                    "properties": [{"name": "temperature"},
                                   {"name": "setpoint", "desired": {"value": desired}}]}})
}

/// The device's status in the cloud API once `check` holds for it.
fn cloud_status(api: SocketAddr, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, PATIENCE, || {
        let (code, body) = http(
            api,
            "GET",
            "/v1/namespaces/default/devicestatuses/thermo-1",
            "",
        );
        let v = json_of(&body);
        if code == 200 && check(&v["status"]) {
            Ok(v)
        } else {
            Err(body)
        }
    })
}

fn reported(status: &Value, property: &str) -> Option<String> {
    status["twins"]
        .as_array()?
        .iter()
        .find(|t| t["propertyName"] == property)
        .and_then(|t| t["reported"]["value"].as_str())
        .map(str::to_owned)
}

fn report(event_id: &str, property: &str, value: &str) -> String {
    json!({"event_id": event_id, "timestamp": 1,
           "twin": {property: {"actual": {"value": value}, "metadata": {"type": "int"}}}})
    .to_string()
}

fn refused(edge: &Edge) -> u64 {
    edge.status()["devicetwin"]["refused"]
        .as_u64()
        .expect("devicetwin counters in /v1/status")
}

fn drained(cloud: &Cloud, outbox: &std::path::Path) {
    wait_until("every queue drained", PATIENCE, || {
        let rows = outbox_rows(outbox);
        let (code, body) = http(cloud.api, "GET", &format!("/v1/nodes/{NODE}"), "");
        let q = &json_of(&body)["queue"];
        if code == 200 && rows == 0 && q["pending"] == 0 && q["in_flight"] == 0 {
            Ok(())
        } else {
            Err(format!("outbox {rows} rows; cloud: {body}"))
        }
    });
}

fn device_path(protocol: &str, mode: Mode) {
    if mode == Mode::External && !mosquitto_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mqtt_port = free_port();
    let _broker = (mode == Mode::External).then(|| Mosquitto::start(root, mqtt_port));
    let mut cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let edge_dir = root.join("edge");
    let config = EdgeConfig::for_cloud(root, protocol, NODE, &cloud)
        .deadlines(2)
        .modules(&format!(
            "{}  device-twin: {{ enable: true, path: {}/devicetwin.db }}\n",
            eventbus_module(&edge_dir, mode, mqtt_port, ""),
            edge_dir.display()
        ))
        .write_in(root);
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    wait_broker(&edge);
    let app = Device::connect(mqtt_port, "app-thermo");
    app.subscribe("$hw/events/device/#");
    let mut inbox = Inbox {
        app,
        got: Vec::new(),
    };

    // The cloud sets a desired value: document and delta on the node.
    let api = cloud.api;
    put(
        api,
        "/v1/namespaces/default/devicemodels/thermo",
        &json!({"spec": {"properties": [{"name": "temperature", "type": "INT"},
                                         {"name": "setpoint", "type": "INT"}]}}),
    );
    put(
        api,
        "/v1/namespaces/default/devices/thermo-1",
        &device_object("25"),
    );
    let delta = inbox.wait(&format!("{DEVICE}/twin/update/delta"), |v| {
        v["delta"]["setpoint"] == "25"
    });
    assert_eq!(delta["twin"]["setpoint"]["expected"]["value"], "25");
    put(
        api,
        "/v1/namespaces/default/devices/thermo-1",
        &device_object("26"),
    );
    inbox.wait(&format!("{DEVICE}/twin/update/delta"), |v| {
        v["delta"]["setpoint"] == "26"
    });
    let doc = inbox.wait(&format!("{DEVICE}/twin/update/document"), |v| {
        v["twin"]["setpoint"]["current"]["expected"]["value"] == "26"
    });
    assert_eq!(doc["twin"]["setpoint"]["last"]["expected"]["value"], "25");

    // The device reports; the result comes back and the cloud shows it.
    inbox.app.publish(
        &format!("{DEVICE}/twin/update"),
        &report("r-1", "temperature", "24"),
    );
    let result = inbox.result("twin/update", "r-1");
    assert_eq!(result["twin"]["temperature"]["actual"]["value"], "24");
    let setpoint = report("r-2", "setpoint", "26");
    if installed("mosquitto_pub") {
        let ok = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string(), "-q", "1"])
            .args(["-t", &format!("{DEVICE}/twin/update"), "-m", &setpoint])
            .status()
            .expect("mosquitto_pub");
        assert!(ok.success());
    } else {
        inbox
            .app
            .publish(&format!("{DEVICE}/twin/update"), &setpoint);
    }
    inbox.result("twin/update", "r-2");
    inbox.app.publish(
        &format!("{DEVICE}/state/update"),
        r#"{"event_id":"","timestamp":1,"state":"online"}"#,
    );
    inbox.wait(&format!("{DEVICE}/state/update/result"), |v| {
        v["device"]["state"] == "online"
    });
    cloud_status(api, "the reports are in the DeviceStatus", |s| {
        s["state"] == "online"
            && reported(s, "temperature").as_deref() == Some("24")
            && reported(s, "setpoint").as_deref() == Some("26")
    });
    let out = Command::new(binary("causeway"))
        .args(["get", "devices", "--api", &format!("http://{api}")])
        .env_remove("CAUSEWAY_API_TOKEN")
        .env_remove("CAUSEWAY_API")
        .stdin(Stdio::null())
        .output()
        .expect("causeway get devices");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let row = text
        .lines()
        .find(|l| l.contains("thermo-1"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("online") && row.contains("temperature=24") && row.contains("setpoint=26"),
        "{text}"
    );

    // Bad payloads: KubeEdge's error results, or counted; then a good one is handled.
    let refused_before = refused(&edge);
    let update = format!("{DEVICE}/twin/update");
    inbox.app.publish(&update, r#"{"event_id":"bad-1","twin":"#);
    inbox.wait(&format!("{update}/result"), |v| {
        v["code"] == 400 && v["reason"].as_str().is_some_and(|r| r.contains("not JSON"))
    });
    inbox
        .app
        .publish(&update, &report("bad-2", "temperature", "hot"));
    let r = inbox.result("twin/update", "bad-2");
    assert_eq!(r["code"], 400, "{r}");
    assert_eq!(r["reason"], "temperature: the value is not int or integer");
    let unknown = "$hw/events/device/default/no-such";
    inbox.app.publish(
        &format!("{unknown}/twin/update"),
        &report("bad-3", "temperature", "1"),
    );
    let r = inbox.wait(&format!("{unknown}/twin/update/result"), |v| {
        v["event_id"] == "bad-3"
    });
    assert_eq!(r["code"], 404, "{r}");
    inbox.app.publish(
        &format!("{unknown}/twin/get"),
        r#"{"event_id":"bad-4","timestamp":1}"#,
    );
    let r = inbox.wait(&format!("{unknown}/twin/get/result"), |v| {
        v["event_id"] == "bad-4"
    });
    assert_eq!(r["code"], 404, "{r}");
    // KubeEdge has no error result for state updates: logged and counted.
    inbox
        .app
        .publish(&format!("{DEVICE}/state/update"), "not json");
    inbox.app.publish(
        &format!("{DEVICE}/state/update"),
        r#"{"event_id":"","state":7}"#,
    );
    inbox
        .app
        .publish(&update, &report("r-3", "temperature", "25"));
    let r = inbox.result("twin/update", "r-3");
    assert_eq!(r["twin"]["temperature"]["actual"]["value"], "25", "{r}");
    wait_until("the bad payloads counted", PATIENCE, || {
        let n = refused(&edge) - refused_before;
        if n >= 6 {
            Ok(())
        } else {
            Err(format!("{n} refused"))
        }
    });

    // Cloud down: twin/get answered from the node's store; a report waits in the outbox.
    let ports = cloud.ports();
    assert_eq!(cloud.daemon.stop(), Some(0));
    edge.wait_cloud(false);
    inbox.app.publish(
        &format!("{DEVICE}/twin/get"),
        r#"{"event_id":"g-1","timestamp":1}"#,
    );
    let got = inbox.result("twin/get", "g-1");
    assert_eq!(got["twin"]["temperature"]["actual"]["value"], "25", "{got}");
    assert_eq!(got["twin"]["setpoint"]["expected"]["value"], "26", "{got}");
    if installed("mosquitto_sub") {
        let sub = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string(), "-q", "1"])
            .args(["-t", &format!("{DEVICE}/twin/get/result"), "-C", "1"])
            .args(["-W", "30"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub");
        let mut sub = Some(sub);
        // mosquitto_sub subscribes on its own schedule: ask until it has an answer and exits.
        wait_until("mosquitto_sub got a twin/get/result", PATIENCE, || {
            let s = sub.as_mut().expect("running");
            if s.try_wait().expect("mosquitto_sub").is_some() {
                return Ok(());
            }
            inbox.app.publish(
                &format!("{DEVICE}/twin/get"),
                r#"{"event_id":"g-sub","timestamp":1}"#,
            );
            std::thread::sleep(Duration::from_millis(200));
            Err("not yet".into())
        });
        let out = sub
            .take()
            .expect("mosquitto_sub")
            .wait_with_output()
            .expect("output");
        let v: Value = serde_json::from_slice(&out.stdout).expect("a JSON result");
        assert_eq!(v["event_id"], "g-sub");
        assert_eq!(v["twin"]["temperature"]["actual"]["value"], "25", "{v}");
    }
    inbox
        .app
        .publish(&update, &report("r-4", "temperature", "27"));
    inbox.result("twin/update", "r-4");

    cloud = Cloud::start(root, ports, 5, PATIENCE);
    edge.wait_connected();
    cloud_status(
        cloud.api,
        "the report made offline reached the cloud",
        |s| reported(s, "temperature").as_deref() == Some("27"),
    );
    drained(&cloud, &edge_dir.join("outbox.db"));

    // Every request answered once, every delta with its own event id.
    let mut results: HashMap<String, usize> = HashMap::new();
    for (t, v) in &inbox.got {
        if t.ends_with("/result") {
            *results
                .entry(v["event_id"].as_str().unwrap_or_default().into())
                .or_default() += 1;
        }
    }
    for id in ["r-1", "r-2", "r-3", "r-4", "bad-2", "bad-3", "bad-4", "g-1"] {
        assert_eq!(results.get(id), Some(&1), "{id}: {results:?}");
    }
    let mut deltas: HashMap<String, usize> = HashMap::new();
    for (t, v) in &inbox.got {
        if t.ends_with("/twin/update/delta") {
            *deltas
                .entry(v["event_id"].as_str().unwrap_or_default().into())
                .or_default() += 1;
        }
    }
    assert!(deltas.values().all(|n| *n == 1), "{deltas:?}");
    println!(
        "{protocol}/{mode:?}: 4 reports in the DeviceStatus, each request answered once, {} \
         deltas each once, queues drained",
        deltas.len()
    );
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}

#[test]
fn quic_embedded_broker() {
    device_path("quic", Mode::Internal);
}

#[test]
fn websocket_embedded_broker() {
    device_path("websocket", Mode::Internal);
}

#[test]
fn quic_external_broker() {
    device_path("quic", Mode::External);
}

#[test]
fn websocket_external_broker() {
    device_path("websocket", Mode::External);
}
