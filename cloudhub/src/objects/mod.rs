//! The cloud's object store: Kubernetes-shaped objects (`apiVersion`, `kind`, `metadata` with
//! namespace, name, uid, labels, resourceVersion, creationTimestamp; `spec` / `status`), the
//! desired state the cloud API writes (`PUT /v1/namespaces/{ns}/{resource}/{name}`) and
//! edgecontroller syncs to the nodes.
//!
//! There is no Kubernetes API server here, so this store plays its part: one monotonically
//! increasing resourceVersion across every object (a write gets the next one), a deletion leaves a
//! *tombstone* (the last object, marked deleted, under the deletion's resourceVersion) until
//! nothing needs it any more (edgecontroller purges it once no node holds the object), and a watch
//! resumes from any resourceVersion at or above the compaction floor (the newest purged
//! tombstone), else it is told the version is gone (410).
//!
//! - [`model`]: the resource table, validation of a written object, label selectors.
//! - [`sqlite`]: [`sqlite::SqliteObjects`], the durable store (its own SQLite file beside the
//!   message store).
//! - [`ObjectSource`]: the seam edgecontroller reads through, which a Kubernetes informer could
//!   implement instead.

pub mod model;
pub mod sqlite;

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

pub use model::{KINDS, ObjectKind, Selector};

/// `ms` (Unix milliseconds) as Kubernetes writes times: RFC 3339 in UTC, whole seconds.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// One object as stored: its identity, version and the whole JSON object (with `metadata`
/// filled in). A tombstone (`deleted`) holds the object as it was when it was deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    /// Path resource (plural, lower case): `pods`, `configmaps`, ...
    pub resource: String,
    /// Namespace; empty for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.resourceVersion` (of the deletion, for a tombstone).
    pub rv: u64,
    /// The resourceVersion that created this incarnation (a watch replay says ADDED after it).
    pub created_rv: u64,
    /// A tombstone: the object was deleted at `rv`.
    pub deleted: bool,
    /// The object JSON.
    pub body: Value,
}

impl StoredObject {
    /// The resource's kind entry, if it is one of [`KINDS`].
    pub fn kind(&self) -> Option<&'static ObjectKind> {
        model::kind_by_resource(&self.resource)
    }

    /// The KubeEdge wire resource `{ns}/{type}/{name}` (`null` as the namespace of a
    /// cluster-scoped object), e.g. `default/configmap/demo`, `null/node/edge-1`.
    pub fn wire_resource(&self) -> String {
        let ty = self.kind().map_or(self.resource.as_str(), |k| k.wire);
        let ns = if self.namespace.is_empty() {
            "null"
        } else {
            &self.namespace
        };
        format!("{ns}/{ty}/{}", self.name)
    }

    /// The object's labels (`metadata.labels`), as strings.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> + Clone {
        self.body["metadata"]["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
    }
}

/// What a watch sees: one change of one object. `ADDED`, `MODIFIED` or `DELETED`.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The object after the change (the tombstone for a deletion).
    pub object: Arc<StoredObject>,
    /// `ADDED` (first version), `MODIFIED` or `DELETED`.
    pub kind: ChangeKind,
}

/// The type of a watch event, as Kubernetes names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A new object (or one created again after a deletion).
    Added,
    /// A new version of an existing object.
    Modified,
    /// The object was deleted.
    Deleted,
}

impl ChangeKind {
    /// `ADDED`, `MODIFIED`, `DELETED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// Why an object operation failed. Each maps to one API status and stable code
/// ([`ObjectError::status_code`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// The object is not acceptable (not a JSON object, bad metadata, bad name); nothing was
    /// written. 400 `invalid_object`.
    #[error("{0}")]
    Invalid(String),
    /// `kind` (or `metadata.name` / `metadata.namespace`) disagrees with the path. 400
    /// `kind_mismatch` / `name_mismatch`.
    #[error("{what}")]
    Mismatch {
        /// `kind_mismatch` or `name_mismatch`.
        code: &'static str,
        /// What disagrees.
        what: String,
    },
    /// The path names no resource this store keeps. 404 `unknown_resource`.
    #[error("unknown resource {0:?}: known are {known}", known = model::known_resources())]
    UnknownResource(String),
    /// No such object. 404 `not_found`.
    #[error("{0} not found")]
    NotFound(String),
    /// A conditional write (`metadata.resourceVersion` given) whose version is not the stored
    /// one. 409 `conflict`.
    #[error("{0}")]
    Conflict(String),
    /// A watch asked to resume from a version older than the compaction floor. 410 `gone`.
    #[error(
        "resourceVersion {asked} is too old (changes before {floor} were compacted); list again"
    )]
    Gone {
        /// The version asked for.
        asked: u64,
        /// The oldest version a watch may resume from.
        floor: u64,
    },
    /// A selector that does not parse. 400 `bad_selector`.
    #[error("bad label selector: {0}")]
    BadSelector(String),
    /// The database failed; nothing was written. 500 `store_error` (507 for a full disk).
    #[error("object store database: {0}")]
    Database(#[from] rusqlite::Error),
    /// A stored row could not be read back.
    #[error("object store holds an unreadable row: {0}")]
    Corrupt(String),
}

impl ObjectError {
    /// The HTTP status and the stable error code the API answers with.
    pub fn status_code(&self) -> (u16, &'static str) {
        match self {
            Self::Invalid(_) => (400, "invalid_object"),
            Self::Mismatch { code, .. } => (400, code),
            Self::UnknownResource(_) => (404, "unknown_resource"),
            Self::NotFound(_) => (404, "not_found"),
            Self::Conflict(_) => (409, "conflict"),
            Self::Gone { .. } => (410, "gone"),
            Self::BadSelector(_) => (400, "bad_selector"),
            Self::Database(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) => {
                (507, "insufficient_storage")
            }
            Self::Database(_) | Self::Corrupt(_) => (500, "store_error"),
        }
    }
}

/// The seam edgecontroller reads desired state through: the embedded store implements it
/// ([`sqlite::SqliteObjects`]); a Kubernetes informer (list + watch of pods, configmaps, secrets
/// and nodes) could implement it too and feed the same controller. Writes of status reported by
/// the edges go back through it.
pub trait ObjectSource: Send + Sync + std::fmt::Debug + 'static {
    /// Every object, tombstones included, changed after `after` (each object once, in its latest
    /// state), oldest change first, at most `limit`; a `Gone` error when `after` is below the
    /// compaction floor.
    fn changed_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Arc<StoredObject>>, ObjectError>;

    /// One live object (no tombstone).
    fn get(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<StoredObject>, ObjectError>;

    /// A live feed of changes in resourceVersion order; a lagging receiver catches up with
    /// [`Self::changed_since`].
    fn subscribe(&self) -> broadcast::Receiver<Change>;

    /// Replaces the object's `status` (a new resourceVersion), if the object exists and, when
    /// `uid` is given, has that uid. `None` when it does not.
    fn write_status(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        status: Value,
    ) -> Result<Option<StoredObject>, ObjectError>;

    /// Creates the cluster-scoped or namespaced object `body` if absent (edge registration of its
    /// node); returns it, new or existing.
    fn create_if_absent(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        body: Value,
    ) -> Result<StoredObject, ObjectError>;

    /// Forgets the tombstone of an object deleted at `rv` (nothing needs it any more); raises
    /// the compaction floor.
    fn purge_tombstone(
        &self,
        resource: &str,
        namespace: &str,
        name: &str,
        rv: u64,
    ) -> Result<(), ObjectError>;
}
