//! End to end: the real `cloudcore` and `edgecore` processes on loopback, over each protocol.
//!
//! The cloud creates its PKI on first start; the edge starts with nothing but a bootstrap token
//! (made from the cloud's CA, as `causeway token create` does), obtains its certificate from the
//! cloud's HTTPS server, connects, and keeps its link alive with keepalives. Then: a message from
//! the cloud API to the edge's local store (acknowledged after it is stored), a message from a
//! local application through the edge's outbox to the cloud's upstream stream, and the cloud killed
//! (SIGKILL) and restarted: what the edge's applications sent meanwhile arrives after the edge
//! reconnects, and a cloud message queued meanwhile reaches the edge. Nothing is lost.
//!
//! The binaries are found next to this test's executable (`target/<profile>/`); `cargo test
//! --workspace` builds them first, as it runs their own tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, Sse, bootstrap_token, http, json_of,
    outbox_rows, wait_until,
};
use causeway_tests::drain::wait_drained;
use serde_json::{Value, json};

/// Bound on anything that should happen within a few heartbeats (edge heartbeat: 1 s).
const PATIENCE: Duration = Duration::from_secs(60);

/// Reads the cloud's upstream Server-Sent Events stream from the start until every id in `ids`
/// has appeared; returns how many times each appeared.
fn upstream_ids(api: SocketAddr, node: &str, ids: &[String]) -> HashMap<String, usize> {
    Sse::open(api, PATIENCE, &format!("node={node}&since=0")).until_all(ids)
}

/// Starts cloudcore for these tests (keepalive interval 5 s).
fn start_cloud(dir: &Path, ports: [u16; 4]) -> Cloud {
    Cloud::start(dir, ports, 5, PATIENCE)
}

fn edge_config(
    dir: &Path,
    protocol: &str,
    server: SocketAddr,
    https: SocketAddr,
    token: &str,
) -> PathBuf {
    EdgeConfig::new(protocol, "edge-e2e", server, &dir.join("edge"))
        .bootstrap(https, Some(token))
        .deadlines(2)
        .write_in(dir)
}

/// Posts a cloud message for the edge and waits for its ACK; returns the message id.
fn send_to_edge(api: SocketAddr, id: &str) -> Value {
    let msg = json!({
        "header": {"msg_id": id, "timestamp": proto::now_millis()},
        "route": {"source": "edgecontroller", "group": "resource", "operation": "update",
                  "resource": "default/configmap/cm1"},
        "content": {"data": {"k": id}}
    });
    let (code, body) = http(
        api,
        "POST",
        "/v1/nodes/edge-e2e/messages?wait=ack&timeout=60s",
        &msg.to_string(),
    );
    assert!(code == 200 || code == 202, "{code} {body}");
    json_of(&body)
}

fn node_view(api: SocketAddr) -> Value {
    let (code, body) = http(api, "GET", "/v1/nodes/edge-e2e", "");
    assert_eq!(code, 200, "{body}");
    json_of(&body)
}

fn end_to_end(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = start_cloud(root, [0; 4]);
    let ports = cloud.ports();
    let server = cloud.server(protocol);
    let token = bootstrap_token(root);
    let config = edge_config(root, protocol, server, cloud.https, &token);

    // First start: no certificate, only a token.
    let started = Instant::now();
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    assert!(root.join("edge/node.crt").exists(), "bootstrapped");
    println!(
        "{protocol}: bootstrap and first connect took {:?}",
        started.elapsed()
    );

    // Keepalives flow: the cloud sees the node connected and its last keepalive advance.
    let first = node_view(cloud.api);
    assert_eq!(first["connected"], true, "{first}");
    assert_eq!(first["protocol"], protocol);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = node_view(cloud.api);
        // Both advance while the node is connected: its last keepalive and when it was last seen.
        if now["last_keepalive_ms"].as_i64() > first["last_keepalive_ms"].as_i64()
            && now["last_seen_ms"].as_i64() > first["last_seen_ms"].as_i64()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keepalives do not advance: {now}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A message each way.
    let acked = send_to_edge(cloud.api, "down-1");
    assert_eq!(acked["acked"], true, "{acked}");
    assert_eq!(edge.received().get("down-1"), Some(&1));
    let up1 = edge.send(1);
    let counts = upstream_ids(cloud.api, "edge-e2e", std::slice::from_ref(&up1));
    assert_eq!(counts[&up1], 1);

    // One shape of content for applications, whichever transport carried it (PROTOCOL.md Part A
    // item 3, content kind): an object stays that object, a string that string, both ways.
    let text = edge.send_content(&json!("plain text <&>"));
    let mut events = Sse::open(cloud.api, PATIENCE, "node=edge-e2e&since=0");
    assert_eq!(
        events.message(&up1)["content"],
        json!({"n": 1}),
        "{protocol}"
    );
    assert_eq!(
        events.message(&text)["content"],
        json!("plain text <&>"),
        "{protocol}"
    );
    let stored = edge.stored("down-1").expect("down-1 stored at the edge");
    assert_eq!(
        stored["content"],
        json!({"data": {"k": "down-1"}}),
        "{protocol}"
    );

    // The cloud dies without warning; the edge notices and keeps what applications send.
    cloud.daemon.kill();
    let killed = Instant::now();
    edge.wait_cloud(false);
    let status = edge.status();
    assert!(
        status["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "a disconnected edge says why: {status}"
    );
    println!(
        "{protocol}: edge noticed the killed cloud after {:?}",
        killed.elapsed()
    );
    let offline: Vec<String> = (2..5).map(|n| edge.send(n)).collect();

    // The cloud comes back on the same ports (its store and PKI on disk).
    let cloud = start_cloud(root, ports);
    let restarted = Instant::now();
    wait_until("node connected to the new cloudcore", PATIENCE, || {
        let node = node_view(cloud.api);
        if node["connected"] == true {
            Ok(())
        } else {
            Err(node.to_string())
        }
    });
    println!(
        "{protocol}: edge reconnected {:?} after the cloud restarted",
        restarted.elapsed()
    );
    let mut all = vec![up1.clone(), text.clone()];
    all.extend(offline.iter().cloned());
    let counts = upstream_ids(cloud.api, "edge-e2e", &all);
    for id in &all {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} accepted exactly once: {counts:?}"
        );
    }
    let acked = send_to_edge(cloud.api, "down-2");
    assert_eq!(acked["acked"], true, "{acked}");
    let received = edge.received();
    assert!(
        received.get("down-1") == Some(&1) && received.get("down-2") == Some(&1),
        "{received:?}"
    );
    // Every queue drained: nothing left in the outbox, nothing open in the cloud's queue.
    wait_drained(
        cloud.api,
        "edge-e2e",
        &root.join("edge/outbox.db"),
        PATIENCE,
    );

    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");
    assert_eq!(cloud.daemon.stop(), Some(0), "cloudcore exits 0 on SIGTERM");
}

#[test]
fn websocket_end_to_end() {
    end_to_end("websocket");
}

#[test]
fn quic_end_to_end() {
    end_to_end("quic");
}

/// The edge's certificate client against the real cloudcore's bootstrap server: a wrong CA hash
/// is refused before anything is written, a forged token is refused by the cloud, a good token
/// gets a certificate, and renewal with the current certificate (no token) replaces it.
#[test]
fn certificate_bootstrap_and_renewal_against_cloudcore() {
    use edgehub::bootstrap::{self, BootstrapError, CertStatus};
    use edgehub::config::{BootstrapToken, HttpsUrl};

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = start_cloud(root, [0; 4]);
    let good = bootstrap_token(root);
    let mut config = edgehub::EdgeHubConfig::new(certs::NodeId::new("edge-boot").unwrap());
    config.http_server = HttpsUrl::new(format!("https://{}", cloud.https)).unwrap();
    config.tls.ca_file = root.join("edge/ca.crt");
    config.tls.cert_file = root.join("edge/node.crt");
    config.tls.key_file = root.join("edge/node.key");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // A token made for another CA: the downloaded CA does not match its hash.
    let (_, jwt) = good.split_once('.').unwrap();
    config.token = Some(BootstrapToken::new(format!("{}.{jwt}", "0".repeat(64))).unwrap());
    let err = runtime
        .block_on(bootstrap::ensure_certificate(&config))
        .unwrap_err();
    assert!(matches!(err, BootstrapError::CaMismatch { .. }), "{err}");
    assert!(
        !config.tls.ca_file.exists(),
        "nothing written for an unauthenticated CA"
    );

    // The right CA hash but a forged JWT: the cloud refuses it.
    let (hash, _) = good.split_once('.').unwrap();
    config.token =
        Some(BootstrapToken::new(format!("{hash}.eyJhbGciOiJIUzI1NiJ9.e30.c2ln")).unwrap());
    let err = runtime
        .block_on(bootstrap::ensure_certificate(&config))
        .unwrap_err();
    assert!(
        matches!(err, BootstrapError::Refused { status: 401, .. }),
        "{err}"
    );
    assert!(!err.is_transient());

    // The real token.
    config.token = Some(BootstrapToken::new(good).unwrap());
    let status = runtime
        .block_on(bootstrap::ensure_certificate(&config))
        .unwrap();
    assert!(matches!(status, CertStatus::Valid { .. }), "{status:?}");
    let first = std::fs::read_to_string(&config.tls.cert_file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&config.tls.key_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A valid certificate is kept as it is.
    runtime
        .block_on(bootstrap::ensure_certificate(&config))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&config.tls.cert_file).unwrap(),
        first
    );

    // Renewal presents the current certificate and needs no token.
    config.token = None;
    runtime.block_on(bootstrap::renew(&config)).unwrap();
    let renewed = std::fs::read_to_string(&config.tls.cert_file).unwrap();
    assert_ne!(renewed, first);
    assert!(matches!(
        bootstrap::certificate_status(&config),
        CertStatus::Valid { .. }
    ));
    assert_eq!(cloud.daemon.stop(), Some(0));
}

/// A cloudcore killed and restarted at once (its first start made its PKI): the QUIC edge's next
/// packet reaches the new process, which recognises the connection as one of its previous life
/// and resets it, so the edge's reason is the stateless reset, not a silent link timing out.
#[test]
fn quic_edge_learns_of_a_cloud_restart_from_a_stateless_reset() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = start_cloud(root, [0; 4]);
    let ports = cloud.ports();
    let token = bootstrap_token(root);
    let config = edge_config(root, "quic", cloud.quic, cloud.https, &token);
    let mut edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    cloud.daemon.kill();
    let cloud = start_cloud(root, ports);
    let line = edge.daemon.wait_for("disconnected from the cloud");
    assert!(line.contains("stateless reset"), "{line}");
    edge.wait_connected();
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}

/// A 202 from the edge's local endpoint means the message is committed to the outbox: edgecore
/// SIGKILLed right after the last 202 (its cloud gone, so nothing leaves) has every one of them
/// in `outbox.db`, and sends them once it is back with a cloud.
#[test]
fn accepted_upstream_survives_an_immediate_kill() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = start_cloud(root, [0; 4]);
    let ports = cloud.ports();
    let token = bootstrap_token(root);
    let config = edge_config(root, "quic", cloud.quic, cloud.https, &token);
    let edge = Edge::start(&config, PATIENCE);
    edge.wait_connected();
    cloud.daemon.kill();
    edge.wait_cloud(false);
    let ids: Vec<String> = (0..30).map(|n| edge.send(n)).collect();
    edge.daemon.kill();
    assert_eq!(outbox_rows(&root.join("edge/outbox.db")), 30);

    let cloud = start_cloud(root, ports);
    let edge = Edge::start(&config, PATIENCE);
    let counts = upstream_ids(cloud.api, "edge-e2e", &ids);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id} exactly once: {counts:?}");
    }
    assert_eq!(edge.daemon.stop(), Some(0));
    assert_eq!(cloud.daemon.stop(), Some(0));
}
