//! metamanager: the edge's store of the objects the cloud syncs to this node (pods, configmaps,
//! secrets, the node itself), KubeEdge's `meta` module (MODULES.md §2), and MetaServer, its
//! read-only Kubernetes-style HTTP view for local applications.
//!
//! - It joins bus group `meta`, where EdgeHub routes the cloud's `resource` messages, applies
//!   `insert` / `update` / `delete` / `response` in resource-version order and acknowledges each
//!   only after the SQLite commit ([`module`], rules in [`decide`], table in [`store`]).
//! - Edge modules query it over the bus (`query`, resource `{ns}/{type}[/{name}]`, answered with
//!   a JSON array of the objects' JSON strings); a miss of a configmap or secret while the cloud
//!   is connected is asked of the cloud, and the answer stored ([`module`]).
//! - [`metaserver`] serves `/api/v1/...` list, get and watch from the same store, so a local
//!   application reads its node's objects as from a Kubernetes API server, with or without the
//!   cloud.
//!
//! What it is not: a writer towards the cloud (edge modules' updates, patches and status go
//! elsewhere), or a Kubernetes API server (no create, update, patch or delete over HTTP).

pub mod config;
pub mod decide;
pub mod metaserver;
pub mod module;
pub mod resource;
pub mod selector;
pub mod store;

pub use config::MetaManagerConfig;
pub use module::{MODULE_NAME, MetaManager};
pub use store::{MetaStore, StoreError};
