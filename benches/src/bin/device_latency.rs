//! `device_latency`: how long a desired-twin change takes from the cloud API to a device on the
//! node, over each protocol in the same run. It starts a private cloudcore and, per protocol, an
//! edgecore with eventbus (the embedded broker) and devicetwin; an MQTT subscriber (rumqttc)
//! on the node listens on the device's `twin/update/delta`. Each sample is one `PUT` of the
//! Device with a new desired value, timed until the subscriber has the delta carrying it.
//!
//! ```text
//! cargo build --release -p causeway-cloudcore -p causeway-edgecore -p causeway-benches
//! target/release/device_latency --cloudcore target/release/cloudcore \
//!     --edgecore target/release/edgecore --samples 100
//! ```
//!
//! Prints median, p90, p99 and max per protocol. Samples are sequential (one change in flight).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use causeway_benches::SpawnedCloud;
use certs::NodeId;
use certs::files::CertDir;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use transport::Protocol;

/// Bound on every wait.
const PATIENCE: Duration = Duration::from_secs(60);

fn usage() -> ! {
    eprintln!("usage: device_latency --cloudcore BIN --edgecore BIN [--samples N]");
    std::process::exit(2);
}

/// A plain HTTP/1.1 request; (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: cloud\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((status, body.to_owned()))
}

fn put(api: &str, path: &str, body: &serde_json::Value) {
    let (code, text) = http(api, "PUT", path, &body.to_string()).expect("cloud API");
    assert!(code == 200 || code == 201, "PUT {path}: {code} {text}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An edgecore for `node` dialling the cloud over `protocol`, its certificate issued from the
/// cloud's CA, eventbus's embedded broker on `mqtt_port`.
fn start_edge(
    bin: &str,
    dir: &Path,
    cloud: &SpawnedCloud,
    protocol: Protocol,
    node: &str,
    mqtt_port: u16,
) -> Child {
    std::fs::create_dir_all(dir).expect("edge dir");
    let pki = CertDir::new(&cloud.cert_dir);
    let ca = pki.load_ca().expect("the cloud's CA");
    let id = NodeId::new(node).expect("node id");
    let validity = certs::Validity::days_from(time::OffsetDateTime::now_utc(), 1);
    let issued = ca.issue_node(&id, validity).expect("node certificate");
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).expect("ca");
    std::fs::write(dir.join("node.crt"), &issued.cert_pem).expect("cert");
    std::fs::write(dir.join("node.key"), &issued.key_pem).expect("key");
    let d = dir.display();
    let p = protocol.as_str();
    let server = &cloud.addrs[&protocol];
    let config = dir.join("edgecore.yaml");
    std::fs::write(
        &config,
        format!(
            "edgehub:
  controller: {{ protocol: {p}, heartbeat: 15, node-id: {node} }}
  {p}: {{ server: '{server}' }}
  tls: {{ ca-file: {d}/ca.crt, cert-file: {d}/node.crt, key-file: {d}/node.key }}
  outbox: {{ path: {d}/outbox.db }}
modules:
  metamanager: {{ path: {d}/meta.db }}
  local-api: {{ listen: '127.0.0.1:0' }}
  eventbus: {{ enable: true, mode: internal, internal: {{ listen: '127.0.0.1:{mqtt_port}' }}, path: {d}/eventbus.db }}
  device-twin: {{ enable: true, path: {d}/devicetwin.db }}
"
        ),
    )
    .expect("edge config");
    Command::new(bin)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"))
}

fn device(node: &str, desired: usize) -> serde_json::Value {
    serde_json::json!({"spec": {"deviceModelRef": {"name": "bench"}, "nodeName": node,
        "properties": [{"name": "setpoint", "desired": {"value": desired.to_string()}}]}})
}

/// Runs `samples` desired-twin changes through one edge; the latencies.
async fn measure(
    edgecore: &str,
    root: &Path,
    cloud: &SpawnedCloud,
    protocol: Protocol,
    samples: usize,
) -> Vec<Duration> {
    let node = format!("bench-{}", protocol.as_str());
    let mqtt_port = free_port();
    let mut edge = start_edge(
        edgecore,
        &root.join(&node),
        cloud,
        protocol,
        &node,
        mqtt_port,
    );
    // The subscriber connects once the embedded broker listens (it retries until then).
    let mut o = MqttOptions::new(format!("sub-{node}"), "127.0.0.1", mqtt_port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 64);
    let topic = format!("$hw/events/device/default/{node}-dev/twin/update/delta");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, String)>();
    let sub_topic = topic.clone();
    let driver = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(sub_topic.clone(), QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    let value = v["delta"]["setpoint"].as_str().unwrap_or("").to_owned();
                    let _ = tx.send((Instant::now(), value));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let api = cloud.api.clone();
    let path = format!("/v1/namespaces/default/devices/{node}-dev");
    // Warm-up: the device reaches the node (membership, then desired value 0). Until the
    // subscriber is connected and subscribed, the Device is written again with a new value.
    let mut value = 0;
    let deadline = Instant::now() + PATIENCE;
    'warm: loop {
        assert!(
            Instant::now() < deadline,
            "{protocol}: no delta reached the subscriber"
        );
        put(&api, &path, &device(&node, value));
        let until = Instant::now() + Duration::from_secs(1);
        while let Ok(Some((_, v))) = tokio::time::timeout_at(until.into(), rx.recv()).await {
            if v == value.to_string() {
                break 'warm;
            }
        }
        value += 1;
    }
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        value += 1;
        let want = value.to_string();
        let body = device(&node, value);
        let api = api.clone();
        let path = path.clone();
        let start = Instant::now();
        tokio::task::spawn_blocking(move || put(&api, &path, &body))
            .await
            .expect("put");
        loop {
            let (at, v) = tokio::time::timeout(PATIENCE, rx.recv())
                .await
                .expect("a delta within a minute")
                .expect("subscriber running");
            if v == want {
                latencies.push(at - start);
                break;
            }
        }
    }
    driver.abort();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(edge.id().to_string())
        .status();
    let _ = edge.wait();
    latencies
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut cloudcore, mut edgecore, mut samples) = (None, None, 100);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cloudcore" => cloudcore = args.next(),
            "--edgecore" => edgecore = args.next(),
            "--samples" => {
                samples = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            _ => usage(),
        }
    }
    let (Some(cloudcore), Some(edgecore)) = (cloudcore, edgecore) else {
        usage()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = SpawnedCloud::start(&cloudcore, dir.path(), 4, [0; 3]);
    put(
        &cloud.api,
        "/v1/namespaces/default/devicemodels/bench",
        &serde_json::json!({"spec": {"properties": [{"name": "setpoint", "type": "INT"}]}}),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "desired twin (cloud API PUT) -> delta at an MQTT subscriber on the node, {samples} samples"
    );
    println!("protocol   median      p90        p99        max");
    for protocol in [Protocol::Quic, Protocol::WebSocket] {
        let mut l = rt.block_on(measure(&edgecore, dir.path(), &cloud, protocol, samples));
        l.sort();
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
        println!(
            "{:<10} {:<11} {:<10} {:<10} {}",
            protocol.as_str(),
            ms(pct(&l, 0.5)),
            ms(pct(&l, 0.9)),
            ms(pct(&l, 0.99)),
            ms(*l.last().expect("samples"))
        );
    }
    cloud.stop();
}
