//! A private containerd for edged's tests (`scripts/containerd.sh`): its own root, state and
//! socket under a temporary directory, the CRI plugin with a CNI bridge, the local busybox and
//! pause images imported; stopped and removed on drop. Where it cannot start (not root, the
//! packages missing, no overlayfs) [`Containerd::start`] says why, and tests print it and skip.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The image workloads use (a static busybox, entrypoint `sh`).
pub const BUSYBOX_IMAGE: &str = "causeway.local/busybox:1";
/// The sandbox image (busybox sleeping until killed).
pub const PAUSE_IMAGE: &str = "causeway.local/pause:1";

/// The script that starts and stops it.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/containerd.sh")
}

/// A running containerd; stopped (every task killed, mounts undone, directory removed) on drop.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
}

impl Containerd {
    /// Starts one, or says why it cannot here.
    pub fn start() -> Result<Self, String> {
        if !nix_is_root() {
            return Err("containerd needs root (CI runs as root)".into());
        }
        let dir = std::env::temp_dir().join(format!(
            "causeway-containerd-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
        if !out.status.success() {
            let _ = Command::new("bash")
                .arg(script())
                .arg("stop")
                .arg(&dir)
                .status();
            return Err(format!(
                "containerd did not start: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        let socket = dir.join("containerd.sock");
        Ok(Self { dir, socket })
    }

    /// Its CRI socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its directory (config, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ctr` against it in the CRI's namespace, e.g. `["containers", "ls", "-q"]`: stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}
