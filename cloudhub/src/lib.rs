//! CloudHub: the cloud end of the edge/cloud link.
//!
//! It accepts edge nodes over WebSocket and QUIC (mutual TLS, one session per node id), keeps
//! a durable queue of downstream messages per node and delivers them under KubeEdge's ACK
//! contract, accepts upstream messages exactly once and acknowledges them to Causeway edges,
//! signs node certificates (KubeEdge-compatible bootstrap on HTTPS), and offers applications a
//! small HTTP/JSON API.
//!
//! Layout:
//! - [`session`]: [`session::NodeSession`], the per-node state machine (sans-IO).
//! - [`delivery`]: [`delivery::needs_ack`], KubeEdge's ACK classification.
//! - [`store`]: [`store::MessageStore`], the durable queues and upstream log, and its SQLite
//!   implementation [`store::sqlite::SqliteStore`].
//!
//! It is not a Kubernetes controller: there is no edgecontroller or synccontroller; the
//! applications behind the API play their part.

pub mod delivery;
pub mod session;
pub mod store;
