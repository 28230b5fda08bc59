//! A node whose certificate expired while it was offline comes back, with the real daemons over
//! each protocol. The certificate is issued to expire seconds after it is written, and edgecore
//! starts only once it has expired.
//!
//! Without a token edgecore does not exit: it says once what to do (the command to run), keeps
//! running and keeps trying the cloud, which refuses the handshake with TLS's
//! `certificate_expired` alert on both protocols; edgecore's `/v1/status` shows that reason.
//! With a token it obtains a new certificate at start and connects.

use std::path::Path;
use std::time::{Duration, SystemTime};

use causeway_tests::daemon::{
    CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, Sse, bootstrap_token, http, json_of,
    wait_until,
};
use causeway_tests::drain::{exactly_once, wait_drained};
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(90);

fn write_config(root: &Path, protocol: &str, node: &str, cloud: &Cloud, token: Option<&str>) {
    EdgeConfig::new(protocol, node, cloud.server(protocol), &root.join("edge"))
        .bootstrap(cloud.https, token)
        .write_in(root);
}

fn expired_certificate_comes_back(protocol: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let node = format!("edge-expired-{protocol}");
    let cloud = Cloud::start(root, [0; 4], 30, PATIENCE);

    // A certificate valid for three more seconds, written while edgecore is not running.
    let ca = certs::files::CertDir::new(root.join("pki"))
        .load_ca()
        .expect("the cloud's CA");
    let now = time::OffsetDateTime::now_utc();
    let validity = certs::Validity {
        not_before: now - time::Duration::days(1),
        not_after: now + time::Duration::seconds(3),
    };
    let issued = ca
        .issue_node(&certs::NodeId::new(node.as_str()).expect("id"), validity)
        .expect("node certificate");
    let edge_dir = root.join("edge");
    std::fs::create_dir_all(&edge_dir).expect("edge dir");
    std::fs::write(edge_dir.join("ca.crt"), ca.cert_pem()).expect("ca");
    certs::files::write_cert(&edge_dir.join("node.crt"), &issued.cert_pem).expect("crt");
    certs::files::write_key(&edge_dir.join("node.key"), &issued.key_pem).expect("key");
    // Certificates count whole seconds and rustls checks in whole seconds: a margin of two.
    let expiry = SystemTime::from(validity.not_after) + Duration::from_secs(2);
    wait_until("the certificate expired", PATIENCE, || {
        if SystemTime::now() > expiry {
            Ok(())
        } else {
            Err("still valid".into())
        }
    });

    // No token: edgecore runs, says once what to do, and shows the cloud's refusal.
    write_config(root, protocol, &node, &cloud, None);
    let mut edge = Edge::start(&root.join("edgecore.yaml"), PATIENCE);
    let status = wait_until("the cloud's refusal on /v1/status", PATIENCE, || {
        let status = edge.status();
        let error = status["last_error"].as_str().unwrap_or_default();
        if error.contains("CertificateExpired") {
            Ok(status)
        } else {
            Err(status.to_string())
        }
    });
    assert_eq!(status["cloud"], "disconnected", "{status}");
    wait_until("a second attempt", PATIENCE, || {
        let attempts = edge.daemon.count_logged("connecting to the cloud");
        if attempts >= 2 {
            Ok(())
        } else {
            Err(format!("{attempts} attempts"))
        }
    });
    let status = edge.status();
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("CertificateExpired")),
        "still refused: {status}"
    );
    assert_eq!(
        edge.daemon.count_logged("causeway token create"),
        1,
        "what to do, said once"
    );
    // The local endpoint still serves applications meanwhile; the message waits in the outbox.
    let up = vec![edge.send(1)];
    println!(
        "{protocol}: an expired certificate without a token: {}",
        status["last_error"]
    );
    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");

    // With a token: a new certificate at start, then connected.
    let token = bootstrap_token(root);
    write_config(root, protocol, &node, &cloud, Some(&token));
    let edge = Edge::start(&root.join("edgecore.yaml"), PATIENCE);
    edge.wait_connected();
    let renewed = std::fs::read_to_string(edge_dir.join("node.crt")).expect("node.crt");
    assert_ne!(renewed, issued.cert_pem, "a new certificate");
    // What waited in the outbox arrives once, a message from the cloud too, and every queue
    // drains.
    let counts = Sse::open(cloud.api, PATIENCE, &format!("node={node}&since=0")).until_all(&up);
    exactly_once(
        "upstream sent while the certificate was expired",
        &counts,
        &up,
    );
    let down = vec![format!("{protocol}-after-renewal")];
    let msg = json!({
        "header": {"msg_id": down[0]},
        "route": {"source": "e2e", "group": "resource", "operation": "update",
                  "resource": "default/configmap/renewed"},
        "content": {"renewed": true}
    });
    let (code, body) = http(
        cloud.api,
        "POST",
        &format!("/v1/nodes/{node}/messages?wait=ack&timeout=60s"),
        &msg.to_string(),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json_of(&body)["acked"], true, "{body}");
    exactly_once("downstream after the renewal", &edge.received(), &down);
    wait_drained(cloud.api, &node, &edge_dir.join("outbox.db"), PATIENCE);
    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");
    assert_eq!(cloud.daemon.stop(), Some(0), "cloudcore exits 0 on SIGTERM");
}

#[test]
fn websocket_expired_certificate_comes_back() {
    expired_certificate_comes_back("websocket");
}

#[test]
fn quic_expired_certificate_comes_back() {
    expired_certificate_comes_back("quic");
}
