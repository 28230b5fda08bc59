//! The certificate directory: layout, permissions (keys 0600 even under a permissive umask, certs
//! 0644), atomic replacement, and loading back what was written.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;

use causeway_certs::files::{self, CertDir};
use causeway_certs::{CertError, NodeId, node_id_from_cert};
use common::{ca, now, verify_chain, year};

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn layout_paths() {
    let dir = CertDir::new("/etc/causeway");
    let id = NodeId::new("edge-1").unwrap();
    assert_eq!(dir.ca_cert().to_str(), Some("/etc/causeway/ca.crt"));
    assert_eq!(dir.ca_key().to_str(), Some("/etc/causeway/ca.key"));
    assert_eq!(dir.server_cert().to_str(), Some("/etc/causeway/server.crt"));
    assert_eq!(dir.server_key().to_str(), Some("/etc/causeway/server.key"));
    assert_eq!(
        dir.node_cert(&id).to_str(),
        Some("/etc/causeway/nodes/edge-1.crt")
    );
    assert_eq!(
        dir.node_key(&id).to_str(),
        Some("/etc/causeway/nodes/edge-1.key")
    );
}

#[test]
fn write_and_load_everything_with_the_right_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = CertDir::new(tmp.path().join("pki")); // does not exist yet
    assert!(!dir.has_ca());
    let ca = ca();
    dir.write_ca(&ca).unwrap();
    assert!(dir.has_ca());
    let server = ca
        .issue_server(&["cloud".into()], &["10.0.0.1".parse().unwrap()], year())
        .unwrap();
    dir.write_server(&server).unwrap();
    let id = NodeId::new("edge-1").unwrap();
    dir.write_node(&id, &ca.issue_node(&id, year()).unwrap())
        .unwrap();

    for key in [dir.ca_key(), dir.server_key(), dir.node_key(&id)] {
        assert_eq!(mode(&key), 0o600, "{}", key.display());
    }
    for cert in [dir.ca_cert(), dir.server_cert(), dir.node_cert(&id)] {
        assert_eq!(mode(&cert), 0o644, "{}", cert.display());
    }
    let loaded = dir.load_ca().unwrap();
    assert_eq!(loaded.cert_der(), ca.cert_der());
    assert_eq!(
        dir.trust_anchors().unwrap().roots,
        vec![ca.cert_der().clone()]
    );
    let server_id = dir.server_identity().unwrap();
    verify_chain(
        &server_id.chain[0],
        ca.cert_der(),
        webpki::KeyUsage::server_auth(),
        now(),
    )
    .unwrap();
    let node_id = dir.node_identity(&id).unwrap();
    assert_eq!(node_id_from_cert(&node_id.chain[0]).unwrap(), id);
    // No temporary files left behind.
    let names: Vec<_> = fs::read_dir(dir.root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")),
        "{names:?}"
    );
}

#[test]
fn rewriting_a_key_replaces_it_and_narrows_a_wide_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("k.key");
    fs::write(&path, "old").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    files::write_key(&path, "new").unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "new");
    assert_eq!(mode(&path), 0o600);
    // A stale temporary file from an interrupted write does not block the next write.
    fs::write(tmp.path().join(".k.key.tmp"), "stale").unwrap();
    files::write_key(&path, "newer").unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "newer");
}

#[test]
fn loading_missing_files_names_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = CertDir::new(tmp.path());
    match dir.load_ca() {
        Err(CertError::Io { path, .. }) => assert_eq!(path, dir.ca_cert()),
        other => panic!("expected Io error, got {other:?}"),
    }
}
