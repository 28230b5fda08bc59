//! The `causeway` binary, run for real in temporary directories: certificate files that parse,
//! chain and carry the right permissions; tokens that verify; KubeEdge's golden vectors decoded
//! and encoded byte for byte; and bad input reported as one line with an offset and exit code 2.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use certs::files::CertDir;
use certs::{NodeId, node_id_from_cert};

fn causeway(args: &[&str]) -> Output {
    causeway_stdin(args, &[])
}

fn causeway_stdin(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_causeway"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run causeway");
    let mut input = child.stdin.take().unwrap();
    // The child may exit before reading everything (bad input); ignore a broken pipe.
    let _ = input.write_all(stdin);
    drop(input);
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {}",
        out.status.code(),
        stderr(out)
    );
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn verify(leaf: &CertificateDer<'_>, root: &CertificateDer<'_>, usage: webpki::KeyUsage) {
    let anchor = webpki::anchor_from_trusted_cert(root).unwrap();
    let ee = webpki::EndEntityCert::try_from(leaf).unwrap();
    let now = UnixTime::since_unix_epoch(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap(),
    );
    ee.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &[anchor],
        &[],
        now,
        usage,
        None,
        None,
    )
    .unwrap();
}

fn init(dir: &Path) {
    let d = dir.to_str().unwrap();
    assert_ok(&causeway(&[
        "certs",
        "init",
        "--dir",
        d,
        "--advertise-address",
        "127.0.0.1,10.0.0.7",
        "--dns",
        "cloud.example.com",
    ]));
}

#[test]
fn certs_init_and_node_write_files_that_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    init(&pki);
    let d = pki.to_str().unwrap();
    assert_ok(&causeway(&[
        "certs",
        "node",
        "--dir",
        d,
        "--node-id",
        "edge-1",
        "--days",
        "30",
    ]));

    let dir = CertDir::new(&pki);
    let id = NodeId::new("edge-1").unwrap();
    for key in [dir.ca_key(), dir.server_key(), dir.node_key(&id)] {
        assert_eq!(mode(&key), 0o600, "{}", key.display());
    }
    for cert in [dir.ca_cert(), dir.server_cert(), dir.node_cert(&id)] {
        assert_eq!(mode(&cert), 0o644, "{}", cert.display());
    }

    let ca = dir.load_ca().unwrap();
    let server = dir.server_identity().unwrap();
    verify(
        &server.chain[0],
        ca.cert_der(),
        webpki::KeyUsage::server_auth(),
    );
    let ee = webpki::EndEntityCert::try_from(&server.chain[0]).unwrap();
    for name in ["127.0.0.1", "10.0.0.7", "cloud.example.com"] {
        ee.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
            .unwrap();
    }
    let node = dir.node_identity(&id).unwrap();
    verify(
        &node.chain[0],
        ca.cert_der(),
        webpki::KeyUsage::client_auth(),
    );
    assert_eq!(node_id_from_cert(&node.chain[0]).unwrap(), id);
}

#[test]
fn certs_init_refuses_to_replace_a_ca_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path());
    let d = tmp.path().to_str().unwrap();
    let ca_before = fs::read(tmp.path().join("ca.crt")).unwrap();
    let out = causeway(&[
        "certs",
        "init",
        "--dir",
        d,
        "--advertise-address",
        "127.0.0.1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(
        fs::read(tmp.path().join("ca.crt")).unwrap(),
        ca_before,
        "CA untouched"
    );

    let out = causeway(&[
        "certs",
        "init",
        "--dir",
        d,
        "--advertise-address",
        "127.0.0.1",
        "--force",
    ]);
    assert_ok(&out);
    assert_ne!(
        fs::read(tmp.path().join("ca.crt")).unwrap(),
        ca_before,
        "CA replaced"
    );
}

#[test]
fn certs_node_refuses_duplicates_missing_ca_and_bad_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let out = causeway(&["certs", "node", "--dir", d, "--node-id", "edge-1"]);
    assert_eq!(out.status.code(), Some(1), "no CA yet: {}", stderr(&out));

    init(tmp.path());
    assert_ok(&causeway(&[
        "certs",
        "node",
        "--dir",
        d,
        "--node-id",
        "edge-1",
    ]));
    let out = causeway(&["certs", "node", "--dir", d, "--node-id", "edge-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_ok(&causeway(&[
        "certs",
        "node",
        "--dir",
        d,
        "--node-id",
        "edge-1",
        "--force",
    ]));

    let out = causeway(&["certs", "node", "--dir", d, "--node-id", "../escape"]);
    assert_eq!(out.status.code(), Some(2), "invalid id is a usage error");
    assert!(!tmp.path().join("escape.crt").exists());
}

#[test]
fn token_create_then_verify() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path());
    let d = tmp.path().to_str().unwrap();
    let out = causeway(&["token", "create", "--dir", d, "--ttl", "30m"]);
    assert_ok(&out);
    let token = stdout(&out).trim().to_owned();
    assert_eq!(token.split('.').count(), 4, "{token}");

    let out = causeway(&["token", "verify", "--dir", d, &token]);
    assert_ok(&out);
    assert!(stdout(&out).starts_with("valid until "), "{}", stdout(&out));

    // Tampered: change the last signature character.
    let mut bad = token.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == 'A' { 'B' } else { 'A' });
    let out = causeway(&["token", "verify", "--dir", d, &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("token is not valid"),
        "{}",
        stderr(&out)
    );

    // A token for another CA.
    let other = tempfile::tempdir().unwrap();
    init(other.path());
    let out = causeway(&[
        "token",
        "verify",
        "--dir",
        other.path().to_str().unwrap(),
        &token,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("different CA"), "{}", stderr(&out));

    let out = causeway(&["token", "create", "--dir", d, "--ttl", "24"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a unitless TTL is a usage error"
    );
}

fn vector_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors");
    vec![root.clone(), root.join("kepeer")]
}

/// Every vector NAME with a `.frame`, with its directory.
fn vectors() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for dir in vector_dirs() {
        for entry in fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".frame") {
                if !stem.ends_with(".fromjson") {
                    out.push((dir.clone(), stem.to_owned()));
                }
            }
        }
    }
    out.sort();
    assert!(out.len() >= 30, "vectors present: {}", out.len());
    out
}

fn without_final_newline(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\n").unwrap_or(b)
}

#[test]
fn frame_decode_matches_every_decoded_json() {
    for (dir, name) in vectors() {
        let expected = fs::read(dir.join(format!("{name}.decoded.json"))).unwrap();
        for (format, ext) in [("frame", "frame"), ("pb", "pb")] {
            let file = dir.join(format!("{name}.{ext}"));
            let out = causeway(&[
                "frame",
                "decode",
                "--format",
                format,
                file.to_str().unwrap(),
            ]);
            assert_ok(&out);
            assert_eq!(
                without_final_newline(&out.stdout),
                without_final_newline(&expected),
                "{}",
                file.display()
            );
        }
    }
}

#[test]
fn frame_encode_matches_every_fromjson_frame_and_ws_text() {
    for (dir, name) in vectors() {
        let json = dir.join(format!("{name}.json"));
        let out = causeway(&[
            "frame",
            "encode",
            "--format",
            "frame",
            json.to_str().unwrap(),
        ]);
        assert_ok(&out);
        let expected = fs::read(dir.join(format!("{name}.fromjson.frame"))).unwrap();
        assert!(
            out.stdout == expected,
            "{} -> .fromjson.frame differs",
            json.display()
        );

        // The same through stdin, to pb: the frame's payload.
        let out = causeway_stdin(
            &["frame", "encode", "--format", "pb"],
            &fs::read(&json).unwrap(),
        );
        assert_ok(&out);
        assert!(
            out.stdout == expected[10..],
            "{} -> pb differs",
            json.display()
        );

        // JSON re-marshalled is the WebSocket text KubeEdge sends.
        let ws = dir.join(format!("{name}.ws"));
        let expected_ws = if ws.exists() {
            fs::read(&ws).unwrap()
        } else {
            fs::read(&json).unwrap() // the parent set's .json already is the ws form
        };
        let out = causeway(&[
            "frame",
            "encode",
            "--format",
            "json",
            json.to_str().unwrap(),
        ]);
        assert_ok(&out);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&expected_ws),
            "{}",
            json.display()
        );
    }
}

#[test]
fn frame_decode_reads_a_stream_of_frames() {
    let dir = &vector_dirs()[0];
    let mut stream = fs::read(dir.join("minimal.frame")).unwrap();
    stream.extend(fs::read(dir.join("keepalive.frame")).unwrap());
    let out = causeway_stdin(&["frame", "decode", "-"], &stream);
    assert_ok(&out);
    let expected = [
        fs::read(dir.join("minimal.decoded.json")).unwrap(),
        fs::read(dir.join("keepalive.decoded.json")).unwrap(),
    ];
    let lines: Vec<_> = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0], without_final_newline(&expected[0]));
    assert_eq!(lines[1], without_final_newline(&expected[1]));
}

/// Runs a decode/encode expected to fail on `input`; checks exit 2 and one stderr line naming
/// `byte <offset>`.
fn assert_bad_input(args: &[&str], input: &[u8], offset: usize, reason_part: &str) {
    let out = causeway_stdin(args, input);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains(&format!("byte {offset}:")), "{args:?}: {err}");
    assert!(err.contains(reason_part), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_one_line_with_an_offset_and_exit_2() {
    let frame = fs::read(vector_dirs()[0].join("keepalive.frame")).unwrap();
    let decode = ["frame", "decode", "-"];

    // Truncated inside the payload and inside the header.
    assert_bad_input(
        &decode,
        &frame[..frame.len() - 1],
        frame.len() - 1,
        "ends inside the frame",
    );
    assert_bad_input(&decode, &frame[..4], 4, "ends inside the frame");
    // A second, truncated frame after a good one: the offset is absolute.
    let mut two = frame.clone();
    two.extend_from_slice(&frame[..12]);
    assert_bad_input(
        &decode,
        &two,
        frame.len() + 12,
        &format!("starting at byte {}", frame.len()),
    );
    // Oversize length: refused from the header, before reading on.
    assert_bad_input(
        &decode,
        &[1, 1, 1, 0, 1, 0, 0xff, 0xff, 0xff, 0xff],
        6,
        "exceeds the maximum",
    );
    assert_bad_input(
        &decode,
        &[1, 1, 1, 0, 1, 0, 0x02, 0x00, 0x00, 0x01, 0],
        6,
        "exceeds the maximum",
    );
    // Garbage payload in a well-formed frame.
    let mut garbage = vec![1, 1, 1, 0, 1, 0, 0, 0, 0, 5];
    garbage.extend_from_slice(&[0xff; 5]);
    assert_bad_input(&decode, &garbage, 10, "payload");
    // An empty payload: no header (KubeEdge crashes on this, W1).
    assert_bad_input(&decode, &[1, 1, 1, 0, 1, 0, 0, 0, 0, 0], 10, "no header");
    assert_bad_input(&decode, b"", 0, "empty input");
    assert_bad_input(
        &["frame", "decode", "--format", "pb", "-"],
        &[0xff; 7],
        0,
        "protobuf",
    );

    // JSON: syntax and type errors at their offsets, for decode and encode.
    assert_bad_input(
        &["frame", "decode", "--format", "json", "-"],
        b"{\"header\":",
        10,
        "malformed JSON",
    );
    assert_bad_input(&["frame", "encode", "-"], b"  {\"route\":[]}", 13, "route");
    assert_bad_input(&["frame", "encode", "-"], b"garbage", 1, "malformed JSON");
    let doc = fs::read(vector_dirs()[0].join("minimal.json")).unwrap();
    let mut two_docs = doc.clone();
    two_docs.extend_from_slice(&doc);
    assert_bad_input(
        &["frame", "encode", "--format", "pb", "-"],
        &two_docs,
        doc.len(),
        "one message",
    );
}

#[test]
fn every_command_has_help_with_an_example() {
    for args in [
        &["--help"][..],
        &["certs", "--help"],
        &["token", "--help"],
        &["frame", "--help"],
        &["certs", "init", "--help"],
        &["certs", "node", "--help"],
        &["token", "create", "--help"],
        &["token", "verify", "--help"],
        &["frame", "decode", "--help"],
        &["frame", "encode", "--help"],
    ] {
        let out = causeway(args);
        assert_ok(&out);
        assert!(
            stdout(&out).contains("Example"),
            "{args:?}: {}",
            stdout(&out)
        );
    }
}
