//! A full disk, end to end: the real `cloudcore` and `edgecore` over each protocol, with one
//! side's databases on a small tmpfs the test mounts itself (root; skipped with the reason
//! printed where mounting is impossible) and fills to the last page.
//!
//! Edge: its outbox and local store live on the small disk. New upstream messages are refused
//! at the local endpoint (507 with `Retry-After`), the failure is logged once (not once per
//! message), what was accepted (202: committed) is kept, a cloud message that cannot be stored is not
//! acknowledged; once the filler is removed the node recovers by itself: everything accepted
//! reaches the cloud exactly once, the cloud message is stored once, and every queue drains.
//!
//! Cloud: its message store lives on the small disk. Driven directly, every operation in a
//! group commit either happened or reported failure (SQLite may roll back the statement or the
//! whole transaction on `SQLITE_FULL`), the writer thread survives and works again once space
//! returns. With the daemons: the API answers 507 with `Retry-After`, the store logs the episode
//! once, what was queued before is delivered, upstream messages the edge sent meanwhile are
//! stored and acknowledged once space returns (no reconnect, no restart), and every queue drains.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_tests::daemon::{
    CloudCore as Cloud, Daemon, EdgeConfig, EdgeCore as Edge, Sse, fields, http, http_with,
    json_of, wait_until,
};
use causeway_tests::disk::SmallDisk;
use causeway_tests::drain::{exactly_once, wait_drained};
use cloudhub::store::MessageStore;
use cloudhub::store::sqlite::{SqliteConfig, SqliteStore};
use serde_json::{Value, json};

/// Bound on each wait; generous, since the suite runs beside builds on two cores.
const PATIENCE: Duration = Duration::from_secs(120);
/// Most upstream POSTs tried on a full disk before the edge must have refused one.
const MAX_ACCEPTED_WHILE_FULL: usize = 200;

/// Mounts the small disk, or prints why not (the test then passes without running).
fn small_disk(test: &str) -> Option<SmallDisk> {
    match SmallDisk::mount("16m") {
        Ok(disk) => Some(disk),
        Err(why) => {
            println!("SKIPPED {test}: cannot mount a small tmpfs ({why}); run as root");
            None
        }
    }
}

fn edge_config(dir: &Path, data: &Path, protocol: &str, node: &str, cloud: &Cloud) -> PathBuf {
    EdgeConfig::for_cloud(dir, protocol, node, cloud)
        .stores_in(data)
        .outbox("dedup-pending-ttl: 2")
        .write_in(dir)
}

/// One upstream POST at the edge's local endpoint: the status, the head and the JSON body.
fn post_upstream(edge: &Edge, n: usize) -> (u16, String, Value) {
    let body = json!({"group": "user", "resource": "sensors/t1", "operation": "upload",
                      "content": {"n": n, "pad": "x".repeat(512)}});
    let (code, head, body) = http_with(edge.local, "POST", "/v1/upstream", &[], &body.to_string());
    (code, head, json_of(&body))
}

fn message_state(cloud: &Cloud, node: &str, id: &str) -> Value {
    let (_, body) = http(
        cloud.api,
        "GET",
        &format!("/v1/nodes/{node}/messages/{id}"),
        "",
    );
    json_of(&body)
}

/// Queues an ACK-required message for `node` at the cloud.
fn post_downstream(cloud: &Cloud, node: &str, id: &str) {
    let msg = json!({
        "header": {"msg_id": id},
        "route": {"source": "disk", "group": "resource", "operation": "update",
                  "resource": "default/configmap/full"},
        "content": {"id": id}
    });
    let (code, body) = http(
        cloud.api,
        "POST",
        &format!("/v1/nodes/{node}/messages?ack=true"),
        &msg.to_string(),
    );
    assert_eq!(code, 202, "{body}");
}

fn edge_disk_full(protocol: &str) {
    let test = format!("{protocol}_edge_disk_full");
    let Some(disk) = small_disk(&test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let node = format!("edge-full-{protocol}");
    let cloud = Cloud::start(root, [0; 4], 30, PATIENCE);
    let config = edge_config(root, disk.path(), protocol, &node, &cloud);
    let mut edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    let mut sse = Sse::open(cloud.api, PATIENCE, &format!("node={node}&since=0"));

    // Both databases hold something before the disk fills.
    let mut accepted = vec![edge.send(0)];
    post_downstream(&cloud, &node, "before-full");
    wait_until("first cloud message stored", PATIENCE, || {
        match edge.received().get("before-full") {
            Some(1) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    disk.fill();
    // A 202 means committed to the outbox, so a POST accepted now found room in the files'
    // slack; the first that finds none is refused, and so is every later one, at the door.
    let mut refused = None;
    for n in 1..=MAX_ACCEPTED_WHILE_FULL {
        let (code, head, body) = post_upstream(&edge, n);
        match code {
            202 => accepted.push(body["id"].as_str().expect("id").to_owned()),
            507 => {
                refused = Some((head, body));
                break;
            }
            _ => panic!("POST on a full disk: {code} {body}"),
        }
    }
    let (head, body) = refused.unwrap_or_else(|| {
        panic!("{MAX_ACCEPTED_WHILE_FULL} POSTs accepted on a full disk, none refused")
    });
    assert_eq!(body["code"], "insufficient_storage", "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let status = edge.status();
    assert!(
        status["storage_error"]
            .as_str()
            .is_some_and(|e| e.contains("full")),
        "/v1/status names the full disk: {status}"
    );
    // A cloud message now cannot be stored at the edge, so it is not acknowledged.
    post_downstream(&cloud, &node, "while-full");
    for n in 0..20 {
        let (code, _, body) = post_upstream(&edge, 1000 + n);
        assert_eq!(code, 507, "still full: {body}");
    }
    let state = message_state(&cloud, &node, "while-full");
    assert_ne!(
        state["state"], "acked",
        "acknowledged without being stored: {state}"
    );
    println!(
        "{protocol}: {} upstream messages stored on the filled disk (slack in the files), then 507",
        accepted.len() - 1
    );

    disk.free();
    wait_until("the edge's storage works again", PATIENCE, || {
        let status = edge.status();
        if status["storage_error"].is_null() {
            Ok(())
        } else {
            Err(status.to_string())
        }
    });
    accepted.push(edge.send(2000));
    exactly_once("upstream", &sse.until_all(&accepted), &accepted);
    wait_until(
        "the cloud message stored after space returned",
        PATIENCE,
        || {
            let state = message_state(&cloud, &node, "while-full");
            if state["state"] == "acked" {
                Ok(())
            } else {
                Err(state.to_string())
            }
        },
    );
    let received = edge.received();
    for id in ["before-full", "while-full"] {
        assert_eq!(received.get(id), Some(&1), "{id}: {received:?}");
    }
    wait_drained(cloud.api, &node, &disk.path().join("outbox.db"), PATIENCE);
    // One line for the episode and one for its end, however many messages were refused.
    assert_eq!(edge.daemon.count_logged("outbox: the disk is full"), 1);
    assert_eq!(edge.daemon.count_logged("outbox: storage works again"), 1);
    assert!(edge.daemon.count_logged("metamanager: the disk is full") <= 1);
    // An open event stream would hold the cloud API's graceful shutdown.
    drop(sse);

    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");
    assert_eq!(cloud.daemon.stop(), Some(0), "cloudcore exits 0 on SIGTERM");
    drop(disk);
}

/// The cloud's store on a full disk, driven directly: many operations submitted together (one
/// group commit), so a failure in the middle of a batch is exercised. Whatever each operation
/// reported is what the database holds afterwards.
#[test]
fn cloud_store_on_a_full_disk_keeps_what_it_reported() {
    let Some(disk) = small_disk("cloud_store_on_a_full_disk_keeps_what_it_reported") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = SqliteStore::open(SqliteConfig::new(disk.path().join("cloud.db"))).expect("open");
    let node = "edge-store";
    let record = cloudhub::store::NodeRecord {
        id: node.into(),
        project: "e632aba927ea4ac2b575ec1603d56f10".into(),
        first_seen_ms: 1,
        last_seen_ms: 1,
    };
    runtime
        .block_on(store.register_node(record))
        .expect("register");
    let message = |id: &str| {
        proto::Message::with_header(id, "", 1)
            .route("test", "resource", "default/configmap/c", "update")
            .content(proto::Content::Json(json!({"pad": "y".repeat(48 * 1024)})))
    };
    let mut stored = Vec::new();
    runtime.block_on(async {
        for id in ["a", "b", "c"] {
            store
                .enqueue(node, message(id), true)
                .await
                .expect("enqueue");
            stored.push(id.to_owned());
        }
    });
    disk.fill();
    // Room for some of the first round: its transaction (larger than SQLite's page cache, so
    // pages spill to the WAL before the commit) runs out of space part way.
    disk.leave_free(1024 * 1024);
    // Rounds of 64 operations submitted at once, until a whole round fails.
    let mut refused = Vec::new();
    let mut upstream_refused = 0;
    for round in 0..50 {
        let ops: Vec<_> = (0..64)
            .map(|n| {
                let id = format!("r{round}-{n}");
                (id.clone(), store.enqueue(node, message(&id), true))
            })
            .collect();
        let up = store.accept_upstream(node, message(&format!("up-{round}")));
        let mut failed = 0;
        runtime.block_on(async {
            for (id, op) in ops {
                match op.await {
                    Ok(q) => {
                        assert!(!q.duplicate);
                        stored.push(id);
                    }
                    Err(e) => {
                        let cloudhub::store::EnqueueError::Store(e) = e else {
                            panic!("{id}: {e}");
                        };
                        assert!(e.is_disk_full(), "{id}: {e}");
                        refused.push(id);
                        failed += 1;
                    }
                }
            }
            if up.await.is_err() {
                upstream_refused += 1;
            }
        });
        if failed == 64 {
            break;
        }
    }
    assert!(!refused.is_empty(), "a full disk refused nothing");
    assert!(
        upstream_refused > 0,
        "a full disk accepted every upstream message"
    );
    // Still alive, and its counters match what it reported.
    let depth = runtime.block_on(store.queue_depths()).expect("depths");
    assert_eq!(
        depth,
        vec![(
            node.to_owned(),
            cloudhub::store::QueueDepth {
                pending: stored.len() as u64,
                in_flight: 0,
            }
        )]
    );

    disk.free();
    runtime.block_on(async {
        store
            .enqueue(node, message("after"), true)
            .await
            .expect("enqueue after");
        stored.push("after".into());
        let pending = store.pending(node, 0, 100_000).await.expect("pending");
        let ids: Vec<String> = pending
            .iter()
            .map(|d| d.message.header.id.clone())
            .collect();
        assert_eq!(ids, stored, "exactly what was reported stored, in order");
        for id in &refused {
            assert!(
                store
                    .message_state(node, id)
                    .await
                    .expect("state")
                    .is_none(),
                "{id}"
            );
        }
    });
    println!(
        "cloud store on a full disk: {} enqueues stored, {} refused (disk full), {upstream_refused} \
         upstream refused; all consistent",
        stored.len(),
        refused.len()
    );
    drop(store);
    drop(disk);
}

#[test]
fn websocket_edge_disk_full() {
    edge_disk_full("websocket");
}

#[test]
fn quic_edge_disk_full() {
    edge_disk_full("quic");
}

/// cloudcore with its message store on `data`; returns the daemon, the API and the edges'
/// server address for `protocol`.
fn start_cloud_on(dir: &Path, data: &Path, protocol: &str) -> (Daemon, SocketAddr, SocketAddr) {
    let d = dir.display();
    let data = data.display();
    let config = dir.join("cloudcore.yaml");
    std::fs::write(
        &config,
        format!(
            "cloudhub:
  websocket: {{ address: 127.0.0.1, port: 0 }}
  quic: {{ address: 127.0.0.1, port: 0 }}
  https: {{ address: 127.0.0.1, port: 0 }}
  api: {{ port: 0 }}
  tls: {{ cert-dir: {d}/pki }}
  advertise-address: [127.0.0.1]
  queue: {{ path: {data}/cloudcore.db }}
  delivery: {{ ack-timeout: 1, max-ack-timeout: 2 }}
"
        ),
    )
    .expect("config");
    let mut cloud = Daemon::start("cloudcore", &config, PATIENCE);
    let line = cloud.logged("cloudcore listening");
    let f = fields(&line);
    let addr = |k: &str| -> SocketAddr { f[k].parse().expect("address") };
    let (api, server) = (addr("api"), addr(protocol));
    (cloud, api, server)
}

fn cloud_disk_full(protocol: &str) {
    let test = format!("{protocol}_cloud_disk_full");
    let Some(disk) = small_disk(&test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let node = format!("cloud-full-{protocol}");
    let (mut cloud, api, server) = start_cloud_on(root, disk.path(), protocol);
    // The edge's certificate, issued from the cloud's CA (its disk is not the full one).
    let ca = certs::files::CertDir::new(root.join("pki"))
        .load_ca()
        .expect("the cloud's CA");
    let issued = ca
        .issue_node(
            &certs::NodeId::new(node.as_str()).expect("node id"),
            certs::Validity::days_from(time::OffsetDateTime::now_utc(), 1),
        )
        .expect("node certificate");
    let edge_dir = root.join("edge");
    std::fs::create_dir_all(&edge_dir).expect("edge dir");
    std::fs::write(edge_dir.join("ca.crt"), ca.cert_pem()).expect("ca");
    certs::files::write_cert(&edge_dir.join("node.crt"), &issued.cert_pem).expect("crt");
    certs::files::write_key(&edge_dir.join("node.key"), &issued.key_pem).expect("key");
    let config = EdgeConfig::new(protocol, &node, server, &edge_dir).write_in(root);
    let mut edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    let mut sse = Sse::open(api, PATIENCE, &format!("node={node}&since=0"));
    let post = |id: &str| -> (u16, String, String) {
        let msg = json!({
            "header": {"msg_id": id},
            "route": {"source": "disk", "group": "resource", "operation": "update",
                      "resource": "default/configmap/cloud-full"},
            "content": {"id": id, "pad": "z".repeat(2048)}
        });
        http_with(
            api,
            "POST",
            &format!("/v1/nodes/{node}/messages?ack=true"),
            &[],
            &msg.to_string(),
        )
    };
    let mut down: Vec<String> = Vec::new();
    let mut up: Vec<String> = Vec::new();
    for n in 0..5 {
        let id = format!("down-{n}");
        assert_eq!(post(&id).0, 202);
        down.push(id);
        up.push(edge.send(n));
    }

    disk.fill();
    // The API refuses once the store cannot write; nothing it refused is stored.
    let mut refused = None;
    for n in 5..5 + MAX_ACCEPTED_WHILE_FULL {
        let id = format!("down-{n}");
        let (code, head, body) = post(&id);
        match code {
            202 => down.push(id),
            507 => {
                refused = Some((id, head, body));
                break;
            }
            _ => panic!("POST on a full disk: {code} {body}"),
        }
    }
    let (refused_id, head, body) = refused.unwrap_or_else(|| {
        panic!("{MAX_ACCEPTED_WHILE_FULL} POSTs accepted on a full disk, none refused")
    });
    assert_eq!(json_of(&body)["code"], "insufficient_storage", "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    // The edge keeps sending; the cloud cannot store these yet, so it does not acknowledge them.
    for n in 100..110 {
        up.push(edge.send(n));
    }
    for _ in 0..5 {
        assert_eq!(post("refused-again").0, 507);
    }
    println!(
        "{protocol}: {} downstream messages queued after the fill (slack in the files), then 507",
        down.len() - 5
    );

    disk.free();
    // Without a restart or a reconnect: new messages are taken again, everything queued is
    // delivered and acknowledged, everything the edge sent is stored once.
    wait_until("the cloud API accepts again", PATIENCE, || {
        let (code, _, body) = post(&refused_id);
        if code == 202 {
            Ok(())
        } else {
            Err(format!("{code} {body}"))
        }
    });
    down.push(refused_id);
    exactly_once("upstream", &sse.until_all(&up), &up);
    wait_until("every downstream message delivered", PATIENCE, || {
        let received = edge.received();
        if down.iter().all(|id| received.contains_key(id)) {
            Ok(())
        } else {
            Err(format!("{} of {}", received.len(), down.len()))
        }
    });
    exactly_once("downstream", &edge.received(), &down);
    assert!(
        !edge.received().contains_key("refused-again"),
        "a refused POST was delivered"
    );
    wait_drained(api, &node, &root.join("edge/outbox.db"), PATIENCE);
    let status = edge.status();
    assert_eq!(status["cloud"], "connected", "{status}");
    assert_eq!(
        edge.daemon.count_logged("connected to the cloud"),
        1,
        "no reconnect"
    );
    assert_eq!(cloud.count_logged("message store: the disk is full"), 1);
    assert_eq!(cloud.count_logged("message store: writes succeed again"), 1);

    drop(sse);
    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");
    assert_eq!(cloud.stop(), Some(0), "cloudcore exits 0 on SIGTERM");
    drop(disk);
}

#[test]
fn websocket_cloud_disk_full() {
    cloud_disk_full("websocket");
}

#[test]
fn quic_cloud_disk_full() {
    cloud_disk_full("quic");
}
