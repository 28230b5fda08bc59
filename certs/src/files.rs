//! Certificate files on disk. [`CertDir`] is the one layout every Causeway tool uses:
//!
//! ```text
//! DIR/ca.crt            CA certificate (PEM, 0644)        served as /ca.crt, trusted by all
//! DIR/ca.key            CA private key (SEC1 PEM, 0600)   cloud only; also the token MAC key
//! DIR/server.crt        cloud server certificate (0644)   SANs = advertise addresses + DNS names
//! DIR/server.key        its key (0600)
//! DIR/nodes/<id>.crt    node client certificate (0644)    CN system:node:<id>
//! DIR/nodes/<id>.key    its key (0600)
//! ```
//!
//! Writes are atomic (a temporary file in the same directory, then `rename`), so a reader never
//! sees half a certificate, even while an edge rotates its own. Keys are created 0600 from the
//! start, never widened afterwards.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::{CertError, CertificateAuthority, Identity, IssuedCert, NodeId, TrustAnchors};

/// Mode of certificate files: public, world-readable.
pub const CERT_MODE: u32 = 0o644;
/// Mode of private key files: owner only.
pub const KEY_MODE: u32 = 0o600;

/// The certificate directory layout (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertDir {
    root: PathBuf,
}

impl CertDir {
    /// A layout rooted at `root`; nothing is touched on disk until something is written.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ca.crt`.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }

    /// `ca.key`.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    /// `server.crt`.
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.crt")
    }

    /// `server.key`.
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }

    /// `nodes/`.
    pub fn nodes_dir(&self) -> PathBuf {
        self.root.join("nodes")
    }

    /// `nodes/<id>.crt`. A [`NodeId`] cannot contain `/` or be `..`, so this stays in `nodes/`.
    pub fn node_cert(&self, node: &NodeId) -> PathBuf {
        self.nodes_dir().join(format!("{node}.crt"))
    }

    /// `nodes/<id>.key`.
    pub fn node_key(&self, node: &NodeId) -> PathBuf {
        self.nodes_dir().join(format!("{node}.key"))
    }

    /// Whether a CA certificate or key is already present (either one blocks a fresh `init`).
    pub fn has_ca(&self) -> bool {
        self.ca_cert().exists() || self.ca_key().exists()
    }

    /// Writes `ca.crt` and `ca.key`, replacing existing files (callers decide about overwriting).
    pub fn write_ca(&self, ca: &CertificateAuthority) -> Result<(), CertError> {
        write_key(&self.ca_key(), &ca.key_pem())?;
        write_cert(&self.ca_cert(), &ca.cert_pem())
    }

    /// Loads the CA from `ca.crt` and `ca.key`.
    pub fn load_ca(&self) -> Result<CertificateAuthority, CertError> {
        CertificateAuthority::from_pem(&read(&self.ca_cert())?, &read(&self.ca_key())?)
    }

    /// Loads `ca.crt` as trust anchors.
    pub fn trust_anchors(&self) -> Result<TrustAnchors, CertError> {
        TrustAnchors::load(self.ca_cert())
    }

    /// Writes `server.crt` and `server.key`.
    pub fn write_server(&self, issued: &IssuedCert) -> Result<(), CertError> {
        write_key(&self.server_key(), &issued.key_pem)?;
        write_cert(&self.server_cert(), &issued.cert_pem)
    }

    /// Loads the server identity from `server.crt` and `server.key`.
    pub fn server_identity(&self) -> Result<Identity, CertError> {
        Identity::load(self.server_cert(), self.server_key())
    }

    /// Writes `nodes/<id>.crt` and `nodes/<id>.key`.
    pub fn write_node(&self, node: &NodeId, issued: &IssuedCert) -> Result<(), CertError> {
        write_key(&self.node_key(node), &issued.key_pem)?;
        write_cert(&self.node_cert(node), &issued.cert_pem)
    }

    /// Loads a node identity from `nodes/<id>.crt` and `nodes/<id>.key`.
    pub fn node_identity(&self, node: &NodeId) -> Result<Identity, CertError> {
        Identity::load(self.node_cert(node), self.node_key(node))
    }
}

/// Writes a certificate PEM with mode [`CERT_MODE`], creating parent directories.
pub fn write_cert(path: &Path, pem: &str) -> Result<(), CertError> {
    write_atomic(path, pem.as_bytes(), CERT_MODE)
}

/// Writes a private key PEM with mode [`KEY_MODE`], creating parent directories. The file is
/// created with that mode, so the key is never readable by others, even briefly.
pub fn write_key(path: &Path, pem: &str) -> Result<(), CertError> {
    write_atomic(path, pem.as_bytes(), KEY_MODE)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let io_err = |p: &Path| {
        let p = p.to_owned();
        move |source| CertError::Io { path: p, source }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{file_name}.tmp"));
    // A leftover from an interrupted write may have any mode; start fresh.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
    // The umask may have narrowed the mode (e.g. 0644 under umask 077); set it exactly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err(&tmp))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}
