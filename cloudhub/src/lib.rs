//! CloudHub: the cloud end of the edge/cloud link.
//!
//! It accepts edge nodes over WebSocket and QUIC (mutual TLS, one session per node id), keeps
//! a durable queue of downstream messages per node and delivers them under KubeEdge's ACK
//! contract, accepts upstream messages exactly once and acknowledges them to Causeway edges,
//! signs node certificates (KubeEdge-compatible bootstrap on HTTPS), and offers applications a
//! small HTTP/JSON API.
//!
//! Upstream messages that are not ACKs, keepalives or servicebus replies go to the cloud module
//! KubeEdge would publish them to ([`upstream`]: edgecontroller, devicecontroller, ...), and
//! whatever no module handles goes to the applications behind the API.
//!
//! Layout:
//! - `session::node` (crate `causeway-session`): `NodeSession`, the per-node state machine
//!   (sans-IO), and `session::node::delivery::needs_ack`, KubeEdge's ACK classification.
//! - [`store`]: [`store::MessageStore`], the durable queues and upstream log, and its SQLite
//!   implementation [`store::sqlite::SqliteStore`].
//! - [`hub`]: [`hub::Hub`], the session manager (admission, refusals, node views); `registry`,
//!   the per-node registry (one session per node, node limit, reconnect safety, ACK waiters);
//!   and `driver`, the async loop around each session (its store work in `driver/store_work.rs`),
//!   which uses only the registry's narrow driver end (no import circle: hub → driver →
//!   registry).
//! - [`bootstrap`]: the certificate bootstrap server (`/ca.crt`, `/edge.crt`).
//! - [`api`]: the cloud API (nodes, send, SSE stream of upstream messages, proxy calls, metrics).
//! - [`objects`]: the object store (Kubernetes-shaped desired state, `objects.db`) the API's
//!   object endpoints write and edgecontroller reads.
//! - [`proxy`]: servicebus's cloud end: [`Hub::proxy`] calls a service on a node and waits for
//!   the reply, handed over by the node's driver.
//! - [`upstream`]: which cloud module an edge message goes to (by source, as KubeEdge), handed
//!   over by the node drivers; modules that are not registered leave it on the application path.
//! - [`ownership`]: scale-out mode's node leases across cloudcore instances (sans-IO rules; the
//!   bucket is JetStream key-value), and [`store::nats_server`], a local nats-server for tests.
//! - [`auth`]: the cloud API's credentials (hashed bearer tokens with scopes, client certificates).
//! - [`metrics`]: counters and the Prometheus text exposition.
//! - [`config`]: `cloudcore.yaml`, typed.
//! - [`module`]: [`module::CloudHubModule`], all of the above as one beehive module.
//!
//! ```text
//!   edges ══ WS 10000 / QUIC 10001 (mTLS) ══► transport::Listener ─► Hub::admit ─► driver ⇄ NodeSession
//!                                                                          │
//!   applications ── HTTP 10003 ──► api ─► Hub::send ─► MessageStore (SQLite) ◄──┘ upstream log ─► SSE
//! ```

// utoipa's generated code for `params(Type)` names the type by a full path.
#[allow(unused_qualifications)]
pub mod api;
pub mod api_doc;
pub mod auth;
pub mod bootstrap;
mod close;
pub mod config;
pub mod conn_limit;
mod driver;
pub mod hub;
pub mod metrics;
pub mod module;
pub mod objects;
pub mod ownership;
pub mod proxy;
mod registry;
pub mod store;
pub mod upstream;

pub use hub::{Hub, HubConfig};
