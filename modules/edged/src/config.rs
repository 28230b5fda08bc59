//! `modules.edged` in `edgecore.yaml`.

use std::path::PathBuf;

use beehive::config::Seconds;
use serde::{Deserialize, Serialize};

/// edged's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EdgedConfig {
    /// Whether it runs. Default false: a node runs pods only when it says so (and has a
    /// container runtime).
    #[serde(default)]
    pub enable: bool,
    /// containerd's CRI socket. Default `/run/containerd/containerd.sock`.
    #[serde(default = "default_socket")]
    pub cri_socket: PathBuf,
    /// The pod sandbox image (containerd's `sandbox_image` should name the same). Default
    /// `registry.k8s.io/pause:3.9`.
    #[serde(default = "default_sandbox_image")]
    pub pod_sandbox_image: String,
    /// Where pods' volumes and logs live (`pods/<uid>/volumes/<name>`, `pods/<uid>/logs`).
    /// Default `/var/lib/causeway/edged`.
    #[serde(default = "default_root")]
    pub root_dir: PathBuf,
    /// How often the runtime's state is read and every pod reconciled (kubelet's PLEG relist).
    /// Default 1.
    #[serde(default = "one")]
    pub sync_period: Seconds,
    /// How often the node's status is sent even when unchanged. Default 60.
    #[serde(default = "sixty")]
    pub node_status_period: Seconds,
    /// The first restart / image pull back-off; it doubles up to `backoff-max`. Default 10.
    #[serde(default = "ten")]
    pub backoff_initial: Seconds,
    /// The longest back-off. Default 300.
    #[serde(default = "five_minutes")]
    pub backoff_max: Seconds,
    /// Exited instances of each container kept (for `lastState` and logs). Default 1.
    #[serde(default = "keep_one")]
    pub max_dead_per_container: u32,
    /// Images (unused by any container) removed, oldest tag first, when the runtime holds more
    /// than this many bytes of images. Default 0: never.
    #[serde(default)]
    pub image_gc_bytes: u64,
}

impl Default for EdgedConfig {
    fn default() -> Self {
        Self {
            enable: false,
            cri_socket: default_socket(),
            pod_sandbox_image: default_sandbox_image(),
            root_dir: default_root(),
            sync_period: one(),
            node_status_period: sixty(),
            backoff_initial: ten(),
            backoff_max: five_minutes(),
            max_dead_per_container: keep_one(),
            image_gc_bytes: 0,
        }
    }
}

fn default_socket() -> PathBuf {
    "/run/containerd/containerd.sock".into()
}
fn default_sandbox_image() -> String {
    "registry.k8s.io/pause:3.9".into()
}
fn default_root() -> PathBuf {
    "/var/lib/causeway/edged".into()
}
fn one() -> Seconds {
    Seconds::at_least_one(1)
}
fn ten() -> Seconds {
    Seconds::at_least_one(10)
}
fn sixty() -> Seconds {
    Seconds::at_least_one(60)
}
fn five_minutes() -> Seconds {
    Seconds::at_least_one(300)
}
fn keep_one() -> u32 {
    1
}
