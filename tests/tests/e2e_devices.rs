//! End to end: the device path with the real `cloudcore` (object store, edgecontroller's
//! placement of devices and models, devicecontroller) and the real `edgecore` (metamanager,
//! devicetwin with its SQLite file) on loopback, over each protocol:
//!
//! - a Device with a desired twin applied through the cloud API reaches the node: devicetwin's
//!   `device_twin` table holds the desired value as the twin's expected value;
//! - a report sent upstream as devicetwin sends it (source `twin`,
//!   `device/<ns>/<name>/twin/edge_updated`, through EdgeHub's outbox) lands in the device's
//!   DeviceStatus in the cloud API, and the status write sends nothing back to the node;
//! - a device added while the edge is down reaches it after the restart (membership is
//!   reliable, M9); a deleted device leaves the node;
//! - queues drain.
//!
//! The same path over MQTT (eventbus, both brokers) is `e2e_device_mqtt.rs`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, http, json_of, wait_until,
};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(60);
const NODE: &str = "edge-dev";

fn put(api: SocketAddr, path: &str, body: &Value) -> Value {
    let (code, text) = http(api, "PUT", path, &body.to_string());
    assert!(code == 200 || code == 201, "PUT {path}: {code} {text}");
    json_of(&text)
}

fn device(desired: &str) -> Value {
    json!({"metadata": {"labels": {"description": "lab"}},
           "spec": {"deviceModelRef": {"name": "thermo"}, "nodeName": NODE,
                    "properties": [{"name": "temperature"},
                                   {"name": "setpoint", "desired": {"value": desired}}]}})
}

/// One row of devicetwin's view: device id, twin name (empty without twins), expected, actual.
type TwinRow = (String, String, Option<String>, Option<String>);

/// devicetwin's devices and their twins' (expected, actual) values, read from its file.
fn edge_twins(db: &Path) -> Result<Vec<TwinRow>, String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare(
            "SELECT d.id, IFNULL(t.name, ''), t.expected, t.actual FROM device d
             LEFT JOIN device_twin t ON t.deviceid = d.id ORDER BY d.id, t.name",
        )
        .map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .map_err(|e| e.to_string())?;
    rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
}

fn queue_drained(api: SocketAddr) -> Result<(), String> {
    let (code, body) = http(api, "GET", &format!("/v1/nodes/{NODE}"), "");
    let view = json_of(&body);
    if code == 200 && view["queue"]["pending"] == 0 && view["queue"]["in_flight"] == 0 {
        Ok(())
    } else {
        Err(body)
    }
}

/// How many cloud messages for `resource` the edge's metamanager applied.
fn applied(edge: &Edge, resource: &str) -> usize {
    let (code, body) = http(edge.local, "GET", "/v1/messages?after=0&limit=1000", "");
    assert_eq!(code, 200, "{body}");
    json_of(&body)["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["message"]["route"]["resource"] == resource)
        .count()
}

fn devices(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let api = cloud.api;
    let config = EdgeConfig::for_cloud(root, protocol, NODE, &cloud)
        .deadlines(2)
        .modules(&format!(
            "  device-twin: {{ enable: true, path: {}/edge/devicetwin.db }}\n",
            root.display()
        ))
        .write_in(root);
    let db = root.join("edge/devicetwin.db");
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    wait_until("the node is known", PATIENCE, || {
        let (code, body) = http(api, "GET", &format!("/v1/nodes/{NODE}"), "");
        if code == 200 { Ok(()) } else { Err(body) }
    });

    // Bad devices are refused with a clear 400 and nothing is stored.
    let (code, body) = http(
        api,
        "PUT",
        "/v1/namespaces/default/devices/bad",
        &json!({"spec": {"nodeName": NODE}}).to_string(),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("deviceModelRef"), "{body}");

    put(
        api,
        "/v1/namespaces/default/devicemodels/thermo",
        &json!({"spec": {"properties": [{"name": "temperature", "type": "INT"},
                                         {"name": "setpoint", "type": "INT"}]}}),
    );
    put(
        api,
        "/v1/namespaces/default/devices/thermo-1",
        &device("25"),
    );
    wait_until("the desired value reached devicetwin", PATIENCE, || {
        let twins = edge_twins(&db)?;
        let want = (
            "default/thermo-1".to_owned(),
            "setpoint".to_owned(),
            Some("25".to_owned()),
        );
        if twins
            .iter()
            .any(|t| (t.0.clone(), t.1.clone(), t.2.clone()) == want)
        {
            Ok(())
        } else {
            Err(format!("{twins:?}"))
        }
    });
    wait_until("queue drained", PATIENCE, || queue_drained(api));

    // A report as devicetwin sends it, through the outbox, into the DeviceStatus.
    let report = json!({"source": "twin", "group": "resource", "operation": "update",
        "resource": "device/default/thermo-1/twin/edge_updated",
        "content": {"event_id": "r-1", "timestamp": 1, "twin": {
            "temperature": {"actual": {"value": "24", "metadata": {"timestamp": 1785999600101_i64}},
                            "metadata": {"type": "int"}, "actual_version": {"cloud": 0, "edge": 1}},
            "undeclared": {"actual": {"value": "1"}}}}});
    let (code, body) = http(edge.local, "POST", "/v1/upstream", &report.to_string());
    assert_eq!(code, 202, "{body}");
    let state = json!({"source": "twin", "group": "resource", "operation": "update",
        "resource": "device/default/thermo-1/state/update",
        "content": json!({"event_id": "s", "timestamp": 2, "device": {"name": "thermo-1",
            "state": "online", "lastOnlineTime": "2026-08-06T07:00:00Z"}}).to_string()});
    let (code, body) = http(edge.local, "POST", "/v1/upstream", &state.to_string());
    assert_eq!(code, 202, "{body}");
    let status = wait_until("the report is in the DeviceStatus", PATIENCE, || {
        let (code, body) = http(
            api,
            "GET",
            "/v1/namespaces/default/devicestatuses/thermo-1",
            "",
        );
        let v = json_of(&body);
        if code == 200
            && v["status"]["state"] == "online"
            && v["status"]["twins"][0]["reported"]["value"] == "24"
        {
            Ok(v)
        } else {
            Err(body)
        }
    });
    let twins = status["status"]["twins"].as_array().unwrap();
    assert_eq!(twins.len(), 1, "only declared properties: {status}");
    assert_eq!(
        twins[0]["reported"]["metadata"]["timestamp"],
        "1785999600101"
    );
    // The status write sent nothing back: one Device message at the edge, queue empty.
    wait_until("queue drained", PATIENCE, || queue_drained(api));
    assert_eq!(applied(&edge, "default/device/thermo-1"), 1);

    // A device added while the edge is down reaches it after the restart.
    assert_eq!(edge.daemon.stop(), Some(0));
    put(
        api,
        "/v1/namespaces/default/devices/thermo-2",
        &device("30"),
    );
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    wait_until(
        "the offline-added device reached devicetwin",
        PATIENCE,
        || {
            let twins = edge_twins(&db)?;
            if twins
                .iter()
                .any(|t| t.0 == "default/thermo-2" && t.2.as_deref() == Some("30"))
            {
                Ok(())
            } else {
                Err(format!("{twins:?}"))
            }
        },
    );
    // The first device's state survived the restart.
    assert!(
        edge_twins(&db)
            .unwrap()
            .iter()
            .any(|t| t.0 == "default/thermo-1")
    );

    // Deleted: it leaves the node.
    let (code, body) = http(api, "DELETE", "/v1/namespaces/default/devices/thermo-2", "");
    assert_eq!(code, 200, "{body}");
    wait_until("the deleted device left devicetwin", PATIENCE, || {
        let twins = edge_twins(&db)?;
        if twins.iter().all(|t| t.0 != "default/thermo-2") {
            Ok(())
        } else {
            Err(format!("{twins:?}"))
        }
    });
    wait_until("queue drained", PATIENCE, || queue_drained(api));
    let outbox = causeway_tests::daemon::outbox_rows(&root.join("edge/outbox.db"));
    assert_eq!(outbox, 0, "the edge's outbox drained");
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}

#[test]
fn devices_sync_over_quic() {
    devices("quic");
}

#[test]
fn devices_sync_over_websocket() {
    devices("websocket");
}
