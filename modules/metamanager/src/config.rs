//! `modules.metamanager` in `edgecore.yaml`. Every default is documented on its field and in
//! `edgecore --defaultconfig`.

use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// metamanager's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetaManagerConfig {
    /// Whether it runs. Default true.
    #[serde(default = "yes")]
    pub enable: bool,
    /// Its SQLite file (objects and the journal of cloud messages). Default
    /// `/var/lib/causeway/meta.db`.
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// Most journal rows kept (cloud messages applied, for `/v1/messages` and resend
    /// detection); the oldest are deleted beyond it. Default 100000.
    #[serde(default = "default_journal_max")]
    pub journal_max: NonZeroU64,
    /// Seconds a query waits for the cloud's answer when it asks the cloud (a local miss while
    /// connected). Default 10.
    #[serde(default = "default_remote_query_timeout")]
    pub remote_query_timeout: NonZeroU64,
}

impl MetaManagerConfig {
    /// [`MetaManagerConfig::remote_query_timeout`] as a duration.
    pub fn remote_query_timeout(&self) -> Duration {
        Duration::from_secs(self.remote_query_timeout.get())
    }
}

impl Default for MetaManagerConfig {
    fn default() -> Self {
        Self {
            enable: true,
            path: default_path(),
            journal_max: default_journal_max(),
            remote_query_timeout: default_remote_query_timeout(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_path() -> PathBuf {
    "/var/lib/causeway/meta.db".into()
}

fn default_journal_max() -> NonZeroU64 {
    NonZeroU64::MIN.saturating_add(99_999)
}

fn default_remote_query_timeout() -> NonZeroU64 {
    NonZeroU64::MIN.saturating_add(9)
}
