//! A slow edge against the real `cloudcore`: a node that reads very slowly and acknowledges
//! nothing while the cloud API queues 10,000 messages of 16 KiB (160 MiB) for it. The cloud
//! keeps them in its store, not in memory: its resident memory grows by a small fraction of
//! that, the next POST is refused with 503 and `Retry-After` (nothing half-stored), and once the
//! edge catches up and acknowledges, every message arrives exactly once and the queue drains.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use causeway_tests::daemon::{Daemon, fields, http, json_of, wait_until};
use causeway_tests::drain::{answer_node_object, wait_cloud_drained};
use serde_json::json;
use transport::{Connection, Protocol};

const PATIENCE: Duration = Duration::from_secs(180);
const NODE: &str = "edge-slow";
/// The queue bound configured for the test (cloudcore's default, too).
const LIMIT: usize = 10_000;
const PAD: usize = 16 * 1024;

/// `VmRSS` of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// One POST on a kept-alive connection; returns the status line and headers, and the body.
fn post(stream: &mut TcpStream, api: SocketAddr, path: &str, body: &str) -> (String, String) {
    // One write: several small ones would wait on Nagle and delayed ACKs every request.
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

fn slow_edge(protocol: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let d = root.display();
    let config = root.join("cloudcore.yaml");
    std::fs::write(
        &config,
        format!(
            "cloudhub:
  websocket: {{ address: 127.0.0.1, port: 0 }}
  quic: {{ address: 127.0.0.1, port: 0 }}
  https: {{ enable: false }}
  api: {{ port: 0 }}
  tls: {{ cert-dir: {d}/pki }}
  queue: {{ path: {d}/cloudcore.db, limit-per-node: {LIMIT}, durability: normal }}
  delivery: {{ ack-timeout: 60, max-ack-timeout: 60 }}
"
        ),
    )
    .expect("config");
    let mut cloud = Daemon::start("cloudcore", &config, PATIENCE);
    let line = cloud.logged("cloudcore listening");
    let f = fields(&line);
    let addr = |k: &str| -> SocketAddr { f[k].parse().expect("address") };
    let api = addr("api");
    let server = if protocol == "quic" {
        addr("quic")
    } else {
        addr("websocket")
    };
    let ca = certs::files::CertDir::new(root.join("pki"))
        .load_ca()
        .expect("the cloud's CA");
    let node = certs::NodeId::new(NODE).expect("node id");
    let now = time::OffsetDateTime::now_utc();
    let identity = ca
        .issue_node(&node, certs::Validity::days_from(now, 1))
        .expect("node certificate")
        .identity;
    let dial = transport::DialConfig::new(server.to_string(), node, identity, ca.trust_anchors());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let tp: Protocol = protocol.parse().expect("protocol");
    let conn: Arc<dyn Connection> = Arc::from(
        runtime
            .block_on(transport::connect(tp, &dial))
            .expect("connect"),
    );
    // Keepalives keep the session; nothing is read yet.
    let keepalive = {
        let conn = Arc::clone(&conn);
        runtime.spawn(async move {
            loop {
                let ka = proto::Message::new("")
                    .route("websocket", "resource", "node", "keepalive")
                    .content(proto::Content::text("ping"));
                if conn.send(ka).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    wait_until("node connected", PATIENCE, || {
        let (code, body) = http(api, "GET", &format!("/v1/nodes/{NODE}"), "");
        if code == 200 && json_of(&body)["connected"] == true {
            Ok(())
        } else {
            Err(body)
        }
    });
    // The cloud sends a node that connects its Node object (edgecontroller); answered here, so
    // the queue's whole room is left for the test's messages.
    runtime.block_on(answer_node_object(&*conn, NODE, PATIENCE));
    wait_cloud_drained(api, NODE, PATIENCE);
    let pid = cloud.pid();
    let before = rss_kib(pid);

    let pad = "x".repeat(PAD);
    let mut stream = TcpStream::connect(api).expect("api");
    stream
        .set_read_timeout(Some(Duration::from_secs(90)))
        .expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    let path = format!("/v1/nodes/{NODE}/messages?ack=true");
    let mut ids = Vec::with_capacity(LIMIT);
    let mut peak = before;
    for n in 0..LIMIT {
        let id = format!("{protocol}-slow-{n}");
        let msg = json!({
            "header": {"msg_id": id},
            "route": {"source": "slow", "group": "resource", "operation": "update",
                      "resource": format!("default/configmap/c{}", n % 32)},
            "content": {"n": n, "pad": pad}
        });
        let (head, body) = post(&mut stream, api, &path, &msg.to_string());
        assert!(
            head.starts_with("HTTP/1.1 202"),
            "message {n}: {head}{body}"
        );
        ids.push(id);
        if n % 500 == 0 {
            peak = peak.max(rss_kib(pid));
        }
    }
    peak = peak.max(rss_kib(pid));
    // The queue is full: refused with a retry hint, and nothing of it is stored.
    let extra = json!({"header": {"msg_id": "one-too-many"},
        "route": {"source": "slow", "group": "resource", "operation": "update",
                  "resource": "default/configmap/extra"}, "content": {}});
    let (head, body) = post(&mut stream, api, &path, &extra.to_string());
    assert!(head.starts_with("HTTP/1.1 503"), "{head}{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    assert_eq!(json_of(&body)["code"], "queue_full", "{body}");
    let grew_mib = peak.saturating_sub(before) as f64 / 1024.0;
    let queued_mib = (LIMIT * PAD) as f64 / (1024.0 * 1024.0);
    println!(
        "{protocol}: {LIMIT} messages ({queued_mib:.0} MiB) queued for a node that reads \
         nothing: cloudcore RSS {:.1} -> {:.1} MiB (+{grew_mib:.1} MiB)",
        before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    assert!(
        grew_mib < queued_mib / 2.0,
        "cloudcore's memory grew by {grew_mib:.1} MiB for {queued_mib:.0} MiB queued: the \
         queue is held in memory, not in the store"
    );

    // The edge catches up: reads everything, acknowledging each message once.
    let counts = runtime.block_on(async {
        let mut counts: HashMap<String, usize> = HashMap::new();
        while counts.len() < LIMIT {
            let msg = tokio::time::timeout(PATIENCE, conn.recv())
                .await
                .expect("the backlog keeps coming")
                .expect("recv")
                .expect("open");
            if msg.route.operation == "keepalive" || msg.route.group == "causeway" {
                continue;
            }
            let first = !counts.contains_key(&msg.header.id);
            *counts.entry(msg.header.id.clone()).or_default() += 1;
            if first {
                conn.send(proto::Message::response_to(
                    &msg,
                    proto::Content::text("OK"),
                ))
                .await
                .expect("ack");
            }
        }
        counts
    });
    for id in &ids {
        assert!(counts.contains_key(id), "{id} never arrived");
    }
    wait_cloud_drained(api, NODE, PATIENCE);
    keepalive.abort();
    let _ = runtime.block_on(conn.close("done"));
    assert_eq!(cloud.stop(), Some(0));
}

#[test]
fn websocket_slow_edge_bounded_memory_and_503() {
    slow_edge("websocket");
}

#[test]
fn quic_slow_edge_bounded_memory_and_503() {
    slow_edge("quic");
}
