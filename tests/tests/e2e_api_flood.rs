//! An API flood against the real `cloudcore`: 5,000 POSTs at once, from a few client tasks that
//! each hold a hundred connections, for a known node that is offline. The API bounds its open
//! connections and the requests it handles at once (low bounds here, so they bite), so each
//! POST is either accepted (202) or refused with 503 and `Retry-After`, nothing else; the
//! daemon stays up with bounded memory; every accepted message is queued exactly once and no
//! refused one is; when the node comes, it receives each accepted message once and the queue
//! drains. RSS before, at the peak of the flood and after is printed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use causeway_tests::daemon::{Daemon, fields, http, json_of, parse_response, wait_until};
use causeway_tests::drain::{answer_node_object, wait_cloud_drained};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use transport::{Connection, Protocol};

const PATIENCE: Duration = Duration::from_secs(180);
const NODE: &str = "edge-flood";
const TASKS: usize = 50;
const PER_TASK: usize = 100;
const TOTAL: usize = TASKS * PER_TASK;

/// `VmRSS` of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// What happened to one POST.
#[derive(Debug)]
enum Outcome {
    Accepted,
    /// 503 with Retry-After; the error code.
    Refused(String),
    /// Anything else: the test fails with it.
    Other(String),
}

async fn post_all(api: SocketAddr, first: usize) -> Vec<(String, Outcome)> {
    let mut open = Vec::with_capacity(PER_TASK);
    for n in first..first + PER_TASK {
        let id = format!("flood-{n}");
        let body = json!({
            "header": {"msg_id": id},
            "route": {"source": "flood", "group": "resource", "operation": "update",
                      "resource": format!("default/configmap/c{}", n % 64)},
            "content": {"n": n}
        })
        .to_string();
        let request = format!(
            "POST /v1/nodes/{NODE}/messages?ack=true HTTP/1.1\r\nHost: {api}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        // Beyond the server's connection bound the connect waits in the accept queue.
        let sent = async {
            let mut s = tokio::net::TcpStream::connect(api).await?;
            s.write_all(request.as_bytes()).await?;
            std::io::Result::Ok(s)
        };
        open.push((id, tokio::time::timeout(PATIENCE, sent).await));
    }
    let mut out = Vec::with_capacity(PER_TASK);
    for (id, sent) in open {
        let outcome = match sent {
            Ok(Ok(mut s)) => {
                let mut buf = Vec::new();
                match tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await {
                    Ok(Ok(_)) => {
                        let (status, head, body) = parse_response(&String::from_utf8_lossy(&buf));
                        match status {
                            202 => Outcome::Accepted,
                            503 if head.to_ascii_lowercase().contains("retry-after:") => {
                                Outcome::Refused(
                                    json_of(&body)["code"].as_str().unwrap_or("").into(),
                                )
                            }
                            _ => Outcome::Other(format!("{head}\n{body}")),
                        }
                    }
                    Ok(Err(e)) => Outcome::Other(format!("read: {e}")),
                    Err(_) => Outcome::Other("no answer".into()),
                }
            }
            Ok(Err(e)) => Outcome::Other(format!("connect/write: {e}")),
            Err(_) => Outcome::Other("connect timed out".into()),
        };
        out.push((id, outcome));
    }
    out
}

#[test]
fn api_flood_is_bounded_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let d = root.display();
    let config = root.join("cloudcore.yaml");
    std::fs::write(
        &config,
        format!(
            "cloudhub:
  websocket: {{ address: 127.0.0.1, port: 0 }}
  quic: {{ enable: false }}
  https: {{ enable: false }}
  api: {{ port: 0 }}
  api-server: {{ max-connections: 256, max-concurrent-requests: 16, request-wait: 2 }}
  tls: {{ cert-dir: {d}/pki }}
  queue: {{ path: {d}/cloudcore.db, durability: normal }}
  delivery: {{ ack-timeout: 60, max-ack-timeout: 60 }}
"
        ),
    )
    .expect("config");
    let mut cloud = Daemon::start("cloudcore", &config, PATIENCE);
    let line = cloud.logged("cloudcore listening");
    let f = fields(&line);
    let api: SocketAddr = f["api"].parse().expect("api");
    let server: SocketAddr = f["websocket"].parse().expect("websocket");
    let ca = certs::files::CertDir::new(root.join("pki"))
        .load_ca()
        .expect("the cloud's CA");
    let node = certs::NodeId::new(NODE).expect("node id");
    let identity = ca
        .issue_node(
            &node,
            certs::Validity::days_from(time::OffsetDateTime::now_utc(), 1),
        )
        .expect("node certificate")
        .identity;
    let dial = transport::DialConfig::new(server.to_string(), node, identity, ca.trust_anchors());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // The node connects once (the cloud knows it) and leaves: the flood queues for it.
    let conn = runtime
        .block_on(transport::connect(Protocol::WebSocket, &dial))
        .expect("connect");
    let node_state = |want: bool| {
        wait_until("node state", PATIENCE, || {
            let (code, body) = http(api, "GET", &format!("/v1/nodes/{NODE}"), "");
            if code == 200 && json_of(&body)["connected"] == want {
                Ok(())
            } else {
                Err(body)
            }
        });
    };
    node_state(true);
    // The cloud sends a node that connects its Node object (edgecontroller, the resource path);
    // this edge answers it as an edge does, so that afterwards the queue holds only the flood.
    runtime.block_on(answer_node_object(&*conn, NODE, PATIENCE));
    wait_cloud_drained(api, NODE, PATIENCE);
    let _ = runtime.block_on(conn.close("back later"));
    drop(conn);
    node_state(false);

    let pid = cloud.pid();
    let before = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(before));
    let flooding = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, flooding) = (Arc::clone(&peak), Arc::clone(&flooding));
        std::thread::spawn(move || {
            while flooding.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let started = Instant::now();
    let results: Vec<(String, Outcome)> = runtime.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| tokio::spawn(post_all(api, t * PER_TASK)))
            .collect();
        let mut all = Vec::with_capacity(TOTAL);
        for task in tasks {
            all.extend(task.await.expect("client task"));
        }
        all
    });
    let took = started.elapsed();
    flooding.store(false, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let peak = peak.load(Ordering::Relaxed).max(rss_kib(pid));

    let mut accepted = Vec::new();
    let mut refused: HashMap<String, usize> = HashMap::new();
    let mut refused_ids = Vec::new();
    for (id, outcome) in results {
        match outcome {
            Outcome::Accepted => accepted.push(id),
            Outcome::Refused(code) => {
                *refused.entry(code).or_default() += 1;
                refused_ids.push(id);
            }
            Outcome::Other(what) => panic!("{id}: neither accepted nor refused: {what}"),
        }
    }
    assert_eq!(accepted.len() + refused_ids.len(), TOTAL);
    assert!(!accepted.is_empty(), "nothing accepted: {refused:?}");
    for code in refused.keys() {
        assert!(code == "overloaded" || code == "queue_full", "{refused:?}");
    }
    // The daemon is up, and its queue holds exactly the accepted messages.
    let (code, body) = http(api, "GET", &format!("/v1/nodes/{NODE}"), "");
    assert_eq!(code, 200, "{body}");
    let queue = json_of(&body)["queue"].clone();
    assert_eq!(queue["pending"], accepted.len(), "{queue}");

    // The node comes back: each accepted message arrives once, no refused one, and the queue
    // drains.
    let conn: Arc<dyn Connection> = Arc::from(
        runtime
            .block_on(transport::connect(Protocol::WebSocket, &dial))
            .expect("reconnect"),
    );
    let counts = runtime.block_on(async {
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut last_ka = Instant::now();
        while counts.len() < accepted.len() {
            if last_ka.elapsed() > Duration::from_secs(2) {
                let ka = proto::Message::new("")
                    .route("websocket", "resource", "node", "keepalive")
                    .content(proto::Content::text("ping"));
                conn.send(ka).await.expect("keepalive");
                last_ka = Instant::now();
            }
            let Ok(msg) = tokio::time::timeout(Duration::from_secs(1), conn.recv()).await else {
                continue;
            };
            let msg = msg.expect("recv").expect("open");
            if msg.route.group == "causeway" || !msg.header.id.starts_with("flood-") {
                continue;
            }
            *counts.entry(msg.header.id.clone()).or_default() += 1;
            conn.send(proto::Message::response_to(
                &msg,
                proto::Content::text("OK"),
            ))
            .await
            .expect("ack");
        }
        counts
    });
    for id in &accepted {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }
    for id in &refused_ids {
        assert!(!counts.contains_key(id), "refused {id} was delivered");
    }
    wait_cloud_drained(api, NODE, PATIENCE);
    let after = rss_kib(pid);
    println!(
        "API flood: {TOTAL} concurrent POSTs ({TASKS} tasks x {PER_TASK} connections) in \
         {:.1} s: {} accepted, refused {refused:?}; cloudcore RSS {:.1} MiB before, {:.1} MiB \
         peak, {:.1} MiB after delivery",
        took.as_secs_f64(),
        accepted.len(),
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        after as f64 / 1024.0,
    );
    let _ = runtime.block_on(conn.close("done"));
    assert_eq!(cloud.stop(), Some(0));
}
