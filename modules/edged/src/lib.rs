//! edged: runs the pods bound to this node through containerd's CRI (KubeEdge's edged, without
//! the embedded kubelet). Pods, configmaps and secrets come from metamanager's store, so pods
//! keep running and restarting with the cloud away; statuses go to the cloud through EdgeHub.
//!
//! - [`reconcile`]: the decision (spec + runtime state + clock → CRI actions), sans-IO;
//! - [`status`]: the pod status from the same inputs, sans-IO;
//! - [`make`]: CRI configs, environment, volume files from the local store;
//! - [`cri`]: the thin CRI client over the unix socket;
//! - [`module`]: the beehive module that runs the loop.

pub mod config;
pub mod cri;
pub mod make;
pub mod module;
pub mod pod;
pub mod reconcile;
pub mod status;

pub use config::EdgedConfig;
pub use module::{Edged, EdgedStats, MODULE_NAME};
