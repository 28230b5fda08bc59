//! `modules.device-twin` in `edgecore.yaml`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// devicetwin's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeviceTwinConfig {
    /// Whether it runs. Default false (a node without devices needs none of it; KubeEdge's
    /// default is true).
    #[serde(default)]
    pub enable: bool,
    /// Its SQLite file (tables `device`, `device_attr`, `device_twin`). Default
    /// `/var/lib/causeway/devicetwin.db`.
    #[serde(default = "default_path")]
    pub path: PathBuf,
}

impl Default for DeviceTwinConfig {
    fn default() -> Self {
        Self {
            enable: false,
            path: default_path(),
        }
    }
}

fn default_path() -> PathBuf {
    "/var/lib/causeway/devicetwin.db".into()
}
