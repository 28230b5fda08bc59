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
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeCore as Edge, Sse, bootstrap_token, http, json_of, outbox_rows,
    wait_until,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn installed(tool: &str) -> bool {
    Command::new(tool).arg("--help").output().is_ok()
}

/// mosquitto on a loopback port with a temporary config; killed on drop.
struct Mosquitto(Child);

impl Mosquitto {
    fn start(dir: &Path, port: u16) -> Self {
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 10000\n"
            ),
        )
        .expect("conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto");
        wait_until("mosquitto listening", PATIENCE, || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(drop)
                .map_err(|e| e.to_string())
        });
        Self(child)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A device: a rumqttc client on its own runtime; what it receives, and how many of its
/// publishes were acknowledged.
struct Device {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    got: std::sync::mpsc::Receiver<(String, String)>,
    acks: Arc<AtomicUsize>,
    subacks: Arc<AtomicUsize>,
}

impl Device {
    fn connect(port: u16, id: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(o, 512);
        let (tx, got) = std::sync::mpsc::channel();
        let acks = Arc::new(AtomicUsize::new(0));
        let subacks = Arc::new(AtomicUsize::new(0));
        let (a, s) = (acks.clone(), subacks.clone());
        rt.spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let body = String::from_utf8_lossy(&p.payload).into_owned();
                        let _ = tx.send((p.topic.clone(), body));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self {
            rt,
            client,
            got,
            acks,
            subacks,
        }
    }

    fn subscribe(&self, topic: &str) {
        let before = self.subacks.load(Ordering::SeqCst);
        self.rt
            .block_on(self.client.subscribe(topic, QoS::AtLeastOnce))
            .expect("subscribe");
        wait_until("SUBACK", PATIENCE, || {
            if self.subacks.load(Ordering::SeqCst) > before {
                Ok(())
            } else {
                Err("none".into())
            }
        });
    }

    fn publish(&self, topic: &str, payload: &str) {
        self.rt
            .block_on(self.client.publish(topic, QoS::AtLeastOnce, false, payload))
            .expect("publish");
    }

    fn acked(&self) -> usize {
        self.acks.load(Ordering::SeqCst)
    }

    fn recv(&self) -> (String, String) {
        self.got.recv_timeout(PATIENCE).expect("a publication")
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Internal,
    External,
}

fn edge_config(
    dir: &Path,
    protocol: &str,
    cloud: &Cloud,
    token: &str,
    mode: Mode,
    mqtt_port: u16,
) -> PathBuf {
    let d = dir.display();
    let server = cloud.server(protocol);
    let https = cloud.https;
    let mode_keys = match mode {
        Mode::Internal => {
            format!("mode: internal\n    internal: {{ listen: '127.0.0.1:{mqtt_port}' }}")
        }
        Mode::External => format!(
            "mode: external\n    external: {{ server: '127.0.0.1:{mqtt_port}', client-id: eventbus-e2e-{mqtt_port} }}"
        ),
    };
    let config = dir.join("edgecore.yaml");
    std::fs::write(
        &config,
        format!(
            "edgehub:
  controller: {{ protocol: {protocol}, heartbeat: 1, node-id: edge-eb }}
  {protocol}: {{ server: '{server}', handshake-timeout: 5, read-deadline: 2, write-deadline: 2 }}
  tls: {{ ca-file: {d}/edge/ca.crt, cert-file: {d}/edge/node.crt, key-file: {d}/edge/node.key }}
  http-server: 'https://{https}'
  token: '{token}'
  outbox: {{ path: {d}/edge/outbox.db }}
modules:
  metamanager: {{ path: {d}/edge/meta.db }}
  local-api: {{ listen: '127.0.0.1:0' }}
  eventbus:
    enable: true
    {mode_keys}
    path: {d}/edge/eventbus.db
"
        ),
    )
    .expect("write config");
    config
}

const NODE: &str = "edge-eb";

fn wait_broker(edge: &Edge) {
    wait_until("eventbus connected to its broker", PATIENCE, || {
        let s = edge.status();
        if s["eventbus"]["broker"] == "connected" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
}

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
    if mode == Mode::External && !installed("mosquitto") {
        println!("SKIP: mosquitto is not installed (apt-get install mosquitto; CI has it)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mqtt_port = free_port();
    let _broker = (mode == Mode::External).then(|| Mosquitto::start(root, mqtt_port));
    let mut cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let token = bootstrap_token(root);
    let config = edge_config(root, protocol, &cloud, &token, mode, mqtt_port);
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
/// up; then edgecore is killed while a device publishes, and everything mosquitto acknowledged
/// to the device reaches the cloud after the restart.
#[test]
fn external_broker_down_at_start_and_kill_during_publishing() {
    if !installed("mosquitto") {
        println!("SKIP: mosquitto is not installed (apt-get install mosquitto; CI has it)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mqtt_port = free_port();
    let cloud = Cloud::start(root, [0; 4], 5, PATIENCE);
    let token = bootstrap_token(root);
    let config = edge_config(root, "websocket", &cloud, &token, Mode::External, mqtt_port);
    let outbox = root.join("edge/outbox.db");
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

    let dev = Device::connect(mqtt_port, "dev-kill");
    let payloads: Vec<String> = (0..300).map(|i| format!("k-{i}")).collect();
    let mut sse = Sse::open(cloud.api, PATIENCE, &format!("node={NODE}&since=0"));
    let mut edge = Some(edge);
    for (i, p) in payloads.iter().enumerate() {
        dev.publish("default/user/kill", p);
        if i == 150 {
            edge.take().expect("edge").daemon.kill();
        }
    }
    wait_until("300 PUBACKs from the broker", PATIENCE, || {
        let n = dev.acked();
        if n >= 300 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    });
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    wait_broker(&edge);
    let counts = until_uploaded(&mut sse, "default/user/kill", &payloads);
    wait_drained(&cloud, &outbox);
    let counts_now = upload_counts(&sse, "default/user/kill");
    let lost = payloads
        .iter()
        .filter(|p| !counts_now.contains_key(*p))
        .count();
    let dups: usize = counts_now.values().map(|n| n - 1).sum();
    println!(
        "kill -9 during 300 QoS 1 publishes (external broker): {} of 300 arrived, {lost} lost, \
         {dups} duplicates",
        counts.len()
    );
    assert_eq!(lost, 0);
    assert_eq!(edge.daemon.stop(), Some(0));
}
