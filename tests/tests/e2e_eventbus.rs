//! End to end: devices on MQTT through the edge's eventbus, with the real `cloudcore` and
//! `edgecore` over each protocol and each broker mode (the embedded broker; a real mosquitto the
//! test starts on a free loopback port with a temporary config and kills at the end, skipped
//! with a printed reason where mosquitto is not installed; CI installs it).
//!
//! - A user-topic message each way: a device's QoS 1 publish reaches the cloud's upstream stream
//!   as KubeEdge's `upload` (source `bus`, resource = the topic); the cloud's `publish` (source
//!   `router_eventbus`) reaches a device subscribed on the node (rumqttc, and `mosquitto_sub`
//!   where installed).
//! - 200 QoS 1 publishes while the cloud is down arrive exactly once after it returns, every
//!   queue drained (the edge's outbox, the cloud's queue for the node).
//! - A topic the cloud subscribed is still bridged after an edgecore restart.
//! - External broker: edgecore started while the broker is down serves and connects once it is
//!   up; edgecore killed (SIGKILL) while a device publishes: every publish the broker
//!   acknowledged reaches the cloud (duplicates across the kill are counted and printed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, Sse, http, json_of, outbox_rows, wait_until,
};
use causeway_tests::mqtt::{
    Device, Mode, Mosquitto, eventbus_module, free_port, installed, mosquitto_or_skip, wait_broker,
};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(60);

/// The edge of `cloud` with eventbus on, its broker on `mqtt_port`.
fn edge_config(dir: &Path, protocol: &str, cloud: &Cloud, mode: Mode, mqtt_port: u16) -> PathBuf {
    EdgeConfig::for_cloud(dir, protocol, NODE, cloud)
        .deadlines(2)
        .modules(&eventbus_module(&dir.join("edge"), mode, mqtt_port, ""))
        .write_in(dir)
}

const NODE: &str = "edge-eb";

/// Posts a `router_eventbus` message for the node through the cloud API.
fn cloud_send(cloud: &Cloud, op: &str, resource: &str, content: Option<&str>) {
    let mut body = serde_json::json!({"route": {"source": "router_eventbus", "group": "user",
        "operation": op, "resource": resource}});
    if let Some(c) = content {
        body["content"] = Value::String(c.to_owned());
    }
    let (code, answer) = http(
        cloud.api,
        "POST",
        &format!("/v1/nodes/{NODE}/messages"),
        &body.to_string(),
    );
    assert_eq!(code, 202, "{answer}");
}

fn is_upload(m: &Value, topic: &str, content: &str) -> bool {
    m["route"]["source"] == "bus"
        && m["route"]["group"] == "user"
        && m["route"]["operation"] == "upload"
        && m["route"]["resource"] == topic
        && m["content"] == content
}

/// How often each upload content on `topic` is in the stream so far.
fn upload_counts(sse: &Sse, topic: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in sse.messages() {
        if m["route"]["operation"] == "upload" && m["route"]["resource"] == topic {
            let c = m["content"].as_str().unwrap_or_default().to_owned();
            *counts.entry(c).or_default() += 1;
        }
    }
    counts
}

/// Waits until the edge's outbox has no row and the cloud's queue for the node nothing open.
fn wait_drained(cloud: &Cloud, outbox: &Path) {
    wait_until("every queue drained", PATIENCE, || {
        let rows = outbox_rows(outbox);
        let (code, body) = http(cloud.api, "GET", &format!("/v1/nodes/{NODE}"), "");
        assert_eq!(code, 200, "{body}");
        let view = json_of(&body);
        let q = &view["queue"];
        if rows == 0 && q["pending"] == 0 && q["in_flight"] == 0 {
            Ok(())
        } else {
            Err(format!("outbox {rows} rows; cloud: {view}"))
        }
    });
}

/// Reads the stream until every `payloads` upload on `topic` is there; then the counts.
fn until_uploaded(sse: &mut Sse, topic: &str, payloads: &[String]) -> HashMap<String, usize> {
    for p in payloads {
        sse.message_where(|m| is_upload(m, topic, p));
    }
    upload_counts(sse, topic)
}

fn both_ways(protocol: &str, mode: Mode) {
    if mode == Mode::External && !mosquitto_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mqtt_port = free_port();
    let _broker = (mode == Mode::External).then(|| Mosquitto::start(root, mqtt_port));
    let mut cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let config = edge_config(root, protocol, &cloud, mode, mqtt_port);
    let outbox = root.join("edge/outbox.db");
    let mut edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    wait_broker(&edge);

    // Cloud → device.
    let dev = Device::connect(mqtt_port, "dev-e2e");
    dev.subscribe("default/user/cmd");
    let sub = installed("mosquitto_sub").then(|| {
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
            .args(["-t", "default/user/cmd", "-C", "1", "-W", "30", "-q", "1"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub")
    });
    cloud_send(&cloud, "publish", "default/user/cmd", Some("on"));
    assert_eq!(dev.recv(), ("default/user/cmd".to_owned(), "on".to_owned()));
    if let Some(mut sub) = sub {
        // mosquitto_sub subscribes on its own schedule: publish until it has one and exits.
        wait_until(
            "mosquitto_sub received the cloud's publish",
            PATIENCE,
            || {
                if sub.try_wait().expect("mosquitto_sub").is_some() {
                    return Ok(());
                }
                cloud_send(&cloud, "publish", "default/user/cmd", Some("on"));
                std::thread::sleep(Duration::from_millis(200));
                Err("not yet".into())
            },
        );
        let out = sub.wait_with_output().expect("mosquitto_sub output");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "on");
    }

    // Device → cloud.
    let mut sse = Sse::open(cloud.api, PATIENCE, &format!("node={NODE}&since=0"));
    dev.publish("default/user/temp", "hello");
    sse.message_where(|m| is_upload(m, "default/user/temp", "hello"));
    if installed("mosquitto_pub") {
        let ok = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
            .args([
                "-t",
                "default/user/temp",
                "-m",
                "from-mosquitto_pub",
                "-q",
                "1",
            ])
            .status()
            .expect("mosquitto_pub");
        assert!(ok.success());
        sse.message_where(|m| is_upload(m, "default/user/temp", "from-mosquitto_pub"));
    }

    // 200 QoS 1 publishes while the cloud is down: exactly once after it returns.
    let ports = cloud.ports();
    assert_eq!(cloud.daemon.stop(), Some(0));
    edge.wait_cloud(false);
    let acked_before = dev.acked();
    let payloads: Vec<String> = (0..200).map(|i| format!("m-{i}")).collect();
    for p in &payloads {
        dev.publish("default/user/outage", p);
    }
    wait_until("200 PUBACKs", PATIENCE, || {
        let n = dev.acked() - acked_before;
        if n >= 200 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    });
    cloud = Cloud::start(root, ports, 5, PATIENCE);
    edge.wait_connected();
    let mut sse = Sse::open(cloud.api, PATIENCE, &format!("node={NODE}&since=0"));
    until_uploaded(&mut sse, "default/user/outage", &payloads);
    wait_drained(&cloud, &outbox);
    let counts = upload_counts(&sse, "default/user/outage");
    let wrong: Vec<_> = payloads
        .iter()
        .filter(|p| counts.get(*p) != Some(&1))
        .collect();
    assert!(wrong.is_empty(), "not exactly once: {wrong:?} ({counts:?})");
    println!("{protocol}/{mode:?}: 200 of 200 publishes during the outage arrived exactly once");

    // The cloud subscribes a topic; it stays subscribed across an edgecore restart.
    cloud_send(&cloud, "subscribe", "default/alerts", None);
    bridged(&mut sse, &dev, "default/alerts", "before");
    assert_eq!(edge.daemon.stop(), Some(0));
    edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    wait_broker(&edge);
    let dev2 = Device::connect(mqtt_port, "dev-e2e-2");
    bridged(&mut sse, &dev2, "default/alerts", "after");
    wait_drained(&cloud, &outbox);
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}

/// Publishes `<tag>-<n>` on `topic` until one reaches the cloud's stream (a subscription takes
/// effect on its own schedule; what was published before it is not bridged).
fn bridged(sse: &mut Sse, dev: &Device, topic: &str, tag: &str) {
    let mut n = 0;
    wait_until(&format!("{topic} bridged ({tag})"), PATIENCE, || {
        n += 1;
        dev.publish(topic, &format!("{tag}-{n}"));
        sse.read_for(Duration::from_millis(300));
        let prefix = format!("{tag}-");
        if upload_counts(sse, topic)
            .keys()
            .any(|k| k.starts_with(&prefix))
        {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
}

#[test]
fn websocket_embedded_broker() {
    both_ways("websocket", Mode::Internal);
}

#[test]
fn quic_embedded_broker() {
    both_ways("quic", Mode::Internal);
}

#[test]
fn websocket_external_broker() {
    both_ways("websocket", Mode::External);
}

#[test]
fn quic_external_broker() {
    both_ways("quic", Mode::External);
}

/// External broker: edgecore starts while mosquitto is down (and serves), connects once it is
/// up; then edgecore is killed while a device publishes (see [`kill_during_publishing`]).
#[test]
fn external_broker_down_at_start_and_kill_during_publishing() {
    if !mosquitto_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mqtt_port = free_port();
    let cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let config = edge_config(root, "websocket", &cloud, Mode::External, mqtt_port);
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    wait_until("eventbus reports the broker down", PATIENCE, || {
        let s = edge.status();
        if s["eventbus"]["broker"] == "connecting" && !s["eventbus"]["last_error"].is_null() {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let _broker = Mosquitto::start(root, mqtt_port);
    wait_broker(&edge);
    kill_during_publishing(root, &cloud, edge, &config, mqtt_port, Mode::External);
}

/// Embedded broker: edgecore (and with it the broker) killed while a device publishes.
#[test]
fn embedded_broker_kill_during_publishing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mqtt_port = free_port();
    let cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let config = edge_config(root, "quic", &cloud, Mode::Internal, mqtt_port);
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    wait_broker(&edge);
    kill_during_publishing(root, &cloud, edge, &config, mqtt_port, Mode::Internal);
}

/// A device publishes QoS 1 messages; edgecore is SIGKILLed after the 151st is queued and
/// started again. External broker: mosquitto takes all 300 meanwhile and holds what eventbus
/// did not acknowledge. Embedded broker: the broker dies with edgecore; the device reconnects
/// and, as a device with a clean session does (rumqttc drops its unacknowledged publishes when
/// the broker has no session for it), publishes again everything it got no PUBACK for, then the
/// rest. Every publish PUBACKed before the kill reaches the cloud exactly once; every publish at
/// least once (one the outbox committed but whose PUBACK the kill cut off is sent again, so it
/// may arrive twice: counted and printed).
fn kill_during_publishing(
    root: &Path,
    cloud: &Cloud,
    edge: Edge,
    config: &Path,
    mqtt_port: u16,
    mode: Mode,
) {
    let outbox = root.join("edge/outbox.db");
    let dev = Device::connect(mqtt_port, "dev-kill");
    // Connected before publishing (the SUBACK says so).
    dev.subscribe("default/user/nothing");
    let payloads: Vec<String> = (0..300).map(|i| format!("k-{i}")).collect();
    let mut sse = Sse::open(cloud.api, PATIENCE, &format!("node={NODE}&since=0"));
    let mut edge = Some(edge);
    let mut acked_at_kill = 0;
    let kill_after = 150;
    for (i, p) in payloads.iter().enumerate() {
        if mode == Mode::Internal && i > kill_after {
            break;
        }
        dev.publish("default/user/kill", p);
        if i == kill_after {
            // Mid-stream: a hundred acknowledged, the rest on their way.
            wait_until("100 PUBACKs before the kill", PATIENCE, || {
                let n = dev.acked();
                if n >= 100 {
                    Ok(())
                } else {
                    Err(format!("{n}"))
                }
            });
            edge.take().expect("edge").daemon.kill();
            // One connection's PUBACKs come in publish order: these are the first ones.
            acked_at_kill = dev.acked();
        }
    }
    let edge = Edge::start(config, PATIENCE);
    edge.wait_connected();
    wait_broker(&edge);
    let published = if mode == Mode::Internal {
        // Reconnected (a new SUBACK), then everything without a PUBACK again, and the rest.
        dev.subscribe("default/user/nothing");
        for p in &payloads[acked_at_kill..] {
            dev.publish("default/user/kill", p);
        }
        kill_after + 1 + payloads.len() - acked_at_kill
    } else {
        payloads.len()
    };
    // Each payload PUBACKed once: before the kill, or after it.
    let acks_wanted = payloads.len();
    wait_until("every publish PUBACKed", PATIENCE, || {
        let n = dev.acked();
        if n >= acks_wanted {
            Ok(())
        } else {
            Err(format!("{n} of {acks_wanted}"))
        }
    });
    until_uploaded(&mut sse, "default/user/kill", &payloads);
    wait_drained(cloud, &outbox);
    let counts = upload_counts(&sse, "default/user/kill");
    let lost = payloads.iter().filter(|p| !counts.contains_key(*p)).count();
    let dups: usize = counts.values().map(|n| n - 1).sum();
    // The broker acknowledges one connection's publishes in order: the first `acked_at_kill`.
    let acked_not_once: Vec<_> = payloads[..acked_at_kill]
        .iter()
        .filter(|p| counts.get(*p) != Some(&1))
        .collect();
    println!(
        "kill -9 during 300 QoS 1 publishes ({mode:?} broker): {published} publishes sent \
         (republished included), {acked_at_kill} PUBACKed before the kill, {} PUBACKed in all; \
         {} of 300 arrived, {lost} lost, {dups} duplicates; of those PUBACKed before the kill, \
         {} not exactly once",
        dev.acked(),
        counts.len(),
        acked_not_once.len()
    );
    assert_eq!(lost, 0);
    if mode == Mode::Internal {
        // The embedded broker PUBACKs only what the outbox committed.
        assert!(acked_not_once.is_empty(), "{acked_not_once:?}");
    }
    assert_eq!(edge.daemon.stop(), Some(0));
}
