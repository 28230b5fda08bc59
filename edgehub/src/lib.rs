//! EdgeHub: the edge end of the edge/cloud link.
//!
//! Layout:
//! - [`session`]: the link logic as a sans-IO state machine (connect, keepalive, dead-cloud
//!   detection, reconnect with backoff, rate limiting, routing); no tokio.
//! - [`outbox`]: the durable upstream queue (SQLite) and the downstream dedup window.
//! - [`route`]: where cloud messages go on the bus (KubeEdge's handler table) and the edge's
//!   module and group names.

pub mod outbox;
pub mod route;
pub mod session;
