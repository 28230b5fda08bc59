//! The conformance kit (`causeway conformance`) run against our own daemons, both roles, both
//! protocols: as an edge against a real `cloudcore`, as a cloud against a real `edgecore`. Every
//! case must PASS (none FAIL, none SKIP): what the kit checks is what PROTOCOL.md Part A says, so
//! this keeps the kit and our implementation honest with each other.
//!
//! The protocols run in parallel threads (each daemon and kit process is mostly waiting on
//! heartbeats), so the whole file takes about the length of the longest run (~30 s).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use causeway_tests::daemon::{
    CloudCore, EdgeConfig, EdgeCore, binary, http, json_of, outbox_rows, wait_until,
};
use causeway_tests::drain::exactly_once;
use certs::{CertificateAuthority, NodeId, Validity};

/// Bound on daemon start-up and on the kit's whole run.
const PATIENCE: Duration = Duration::from_secs(120);

/// The kit as a child process, its stdout read line by line.
struct Kit {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Kit {
    fn start(args: &[String]) -> Self {
        let mut child = Command::new(binary("causeway"))
            .arg("conformance")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting causeway conformance");
        let (tx, lines) = channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line containing `needle`; `None` once the kit's output ended.
    fn wait_for(&mut self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    println!("kit: {line}");
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("kit never printed {needle:?}:\n{}", self.seen.join("\n"))
                }
            }
        }
    }

    /// Reads the rest of the output; asserts every case passed and the exit code is 0.
    fn finish(mut self, what: &str) {
        while self.wait_for("\u{0}").is_some() {}
        let status = self.child.wait().expect("wait");
        let verdicts: Vec<&String> = self
            .seen
            .iter()
            .filter(|l| l.starts_with("PASS ") || l.starts_with("FAIL ") || l.starts_with("SKIP "))
            .collect();
        let not_passed: Vec<&&String> = verdicts
            .iter()
            .filter(|l| !l.starts_with("PASS "))
            .collect();
        assert!(
            not_passed.is_empty() && !verdicts.is_empty(),
            "{what}: every case must pass:\n{}",
            self.seen.join("\n")
        );
        assert!(status.success(), "{what}: kit exited {status}");
        println!("{what}: {} cases passed", verdicts.len());
    }
}

impl Drop for Kit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// The kit as an edge against cloudcore: node limit 3, keepalive interval 2 s, ACK timeout 1 s;
/// the cloud is stopped (SIGTERM) when the kit asks for it.
fn kit_edge_against_cloudcore(protocol: &'static str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cloud = CloudCore::start_with(root, [0; 4], 2, "  node-limit: 3\n", PATIENCE);
    let pki = root.join("pki");
    let ca = CertificateAuthority::from_pem(
        &std::fs::read_to_string(pki.join("ca.crt")).unwrap(),
        &std::fs::read_to_string(pki.join("ca.key")).unwrap(),
    )
    .unwrap();
    let node = NodeId::new("kit-edge").unwrap();
    let validity = Validity::days_from(time::OffsetDateTime::now_utc(), 365);
    let issued = ca.issue_node(&node, validity).unwrap();
    write(&root.join("kit.crt"), &issued.cert_pem);
    write(&root.join("kit.key"), &issued.key_pem);
    let p = |p: &Path| p.display().to_string();
    let args = [
        "--role",
        "edge",
        "--protocol",
        protocol,
        "--server",
        &cloud.server(protocol).to_string(),
        "--ca",
        &p(&pki.join("ca.crt")),
        "--cert",
        &p(&root.join("kit.crt")),
        "--key",
        &p(&root.join("kit.key")),
        "--keepalive-interval",
        "2s",
        "--resend-within",
        "5s",
        "--api",
        &format!("http://{}", cloud.api),
        "--ca-key",
        &p(&pki.join("ca.key")),
        "--node-limit",
        "3",
        "--expect-shutdown",
    ]
    .map(String::from);
    let mut kit = Kit::start(&args);
    kit.wait_for("ACTION: stop the cloud now")
        .expect("the kit asks for the cloud to be stopped");
    // Every case but the shutdown has run: whatever the kit's nodes were sent is acknowledged,
    // no queue holds anything of the kit's. Not counted: what edgecontroller sends each node that
    // connects (its Node object, KubeEdge's resource path). The kit is a bare KubeEdge transport
    // peer with no metamanager to store and answer it; the resource path has its own tests
    // (e2e_objects, e2e_metamanager) with an edge that does.
    let (code, body) = http(cloud.api, "GET", "/v1/nodes", "");
    assert_eq!(code, 200, "{body}");
    let nodes = json_of(&body);
    let nodes: Vec<&str> = nodes
        .as_array()
        .expect("a list of nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert!(nodes.contains(&"kit-edge"), "{nodes:?}");
    let store = root.join("cloudcore.db");
    wait_until(
        "the kit's downstream messages all acknowledged",
        PATIENCE,
        || {
            let db = rusqlite::Connection::open_with_flags(
                &store,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .map_err(|e| e.to_string())?;
            let open: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM downstream WHERE state < 2 AND source != 'edgecontroller'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| e.to_string())?;
            if open == 0 {
                Ok(())
            } else {
                Err(format!("{open} open"))
            }
        },
    );
    assert_eq!(cloud.daemon.stop(), Some(0), "cloudcore exits 0 on SIGTERM");
    kit.finish(&format!("edge role over {protocol}"));
    // The store, read once cloudcore is gone: each downstream message the kit was sent ended
    // acknowledged (none open, failed or cancelled; edgecontroller's Node objects aside, above), and the upstream log holds each id once.
    let db = rusqlite::Connection::open_with_flags(
        root.join("cloudcore.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("the cloud's store");
    let not_acked: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM downstream WHERE state != 2 AND source != 'edgecontroller'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    let acked: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM downstream WHERE source != 'edgecontroller'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(
        not_acked, 0,
        "{protocol}: downstream messages not acknowledged"
    );
    assert!(
        acked > 0,
        "{protocol}: the kit's downstream cases sent nothing"
    );
    let repeated: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM (SELECT 1 FROM upstream GROUP BY node, msg_id \
             HAVING COUNT(*) > 1)",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(
        repeated, 0,
        "{protocol}: upstream ids stored more than once"
    );
}

/// The kit as a cloud against edgecore (heartbeat 1 s), with its own PKI.
fn kit_cloud_against_edgecore(protocol: &'static str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let validity = Validity::days_from(time::OffsetDateTime::now_utc(), 365);
    let ca = CertificateAuthority::generate(validity).unwrap();
    let server = ca
        .issue_server(&[], &["127.0.0.1".parse().unwrap()], validity)
        .unwrap();
    let node = ca
        .issue_node(&NodeId::new("edge-under-test").unwrap(), validity)
        .unwrap();
    for (name, text) in [
        ("ca.crt", ca.cert_pem()),
        ("server.crt", server.cert_pem),
        ("server.key", server.key_pem),
        ("node.crt", node.cert_pem),
        ("node.key", node.key_pem),
    ] {
        write(&root.join(name), &text);
    }
    let p = |name: &str| root.join(name).display().to_string();
    let args = [
        "--role",
        "cloud",
        "--protocol",
        protocol,
        "--listen",
        "127.0.0.1:0",
        "--ca",
        &p("ca.crt"),
        "--cert",
        &p("server.crt"),
        "--key",
        &p("server.key"),
        "--heartbeat",
        "1s",
        "--edge-api",
        "-",
    ]
    .map(String::from);
    let mut kit = Kit::start(&args);
    let line = kit
        .wait_for("listening for the edge")
        .expect("the kit listens");
    let addr = line.rsplit(' ').next().expect("address").to_owned();
    let addr = addr.parse().expect("the kit's address");
    let config = EdgeConfig::new(protocol, "edge-under-test", addr, root).write_in(root);
    let edge = EdgeCore::start(&config, PATIENCE);
    let stdin = kit.stdin.as_mut().expect("kit stdin");
    writeln!(stdin, "http://{}", edge.local).expect("hand the edge API to the kit");
    kit.finish(&format!("cloud role over {protocol}"));
    // The kit acknowledged what the edge sent: its outbox drained; what the kit sent was
    // delivered to the edge's applications once per id.
    wait_until(
        "the edge's outbox drained",
        PATIENCE,
        || match outbox_rows(&root.join("outbox.db")) {
            0 => Ok(()),
            rows => Err(format!("{rows} rows")),
        },
    );
    let received = edge.received();
    let ids: Vec<String> = received.keys().cloned().collect();
    assert!(!ids.is_empty(), "{protocol}: the kit sent the edge nothing");
    exactly_once("the kit's messages at the edge", &received, &ids);
    assert_eq!(edge.daemon.stop(), Some(0), "edgecore exits 0 on SIGTERM");
}

/// Runs `each` for both protocols at once; a panic in either fails the test.
fn both_protocols(each: fn(&'static str)) {
    let runs: Vec<_> = ["websocket", "quic"]
        .into_iter()
        .map(|p| std::thread::spawn(move || each(p)))
        .collect();
    for run in runs {
        if let Err(panic) = run.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn kit_as_edge_passes_against_cloudcore() {
    both_protocols(kit_edge_against_cloudcore);
}

#[test]
fn kit_as_cloud_passes_against_edgecore() {
    both_protocols(kit_cloud_against_edgecore);
}
