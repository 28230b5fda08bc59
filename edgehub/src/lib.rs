//! EdgeHub: the edge end of the edge/cloud link. It keeps one mutually authenticated session
//! with the cloud over WebSocket or QUIC, sends keepalives, notices a silent cloud within about two
//! heartbeats, reconnects with jittered backoff, stores every module → cloud message durably until
//! the cloud acknowledges it, and routes cloud messages to the edge's modules as KubeEdge does.
//!
//! What it is not: a transport (that is `transport`), nor the modules that handle cloud messages
//! (metamanager and friends, or edgecore's local store).
//!
//! Layout:
//! - `session::edge` (crate `causeway-session`): the link logic as a sans-IO state machine
//!   (connect, keepalive, dead-cloud detection, reconnect with backoff, rate limiting, routing),
//!   and `session::edge::route`, where cloud messages go on the bus (KubeEdge's handler table)
//!   and the edge's module and group names.
//! - `driver`: the thin async loop around the session (private), with what it does around it in
//!   files of their own: `link` (the dial and each connection's reader, writer and closer),
//!   `pump` (outbox ⇄ session), `deliver` (cloud messages onto the bus) and `stats` (the
//!   counters, [`HubStats`], and the link status, [`LinkStatus`]).
//! - [`module`]: [`EdgeHubModule`], the beehive module (`websocket`, group `hub`).
//! - [`outbox`]: the durable upstream queue (SQLite) and the downstream dedup window.
//! - [`bootstrap`]: obtaining and renewing the node certificate (KubeEdge's certificate flow).
//! - [`config`]: the `edgehub:` configuration section and the YAML loader.
//! - [`fallback`]: which protocol each dial uses when `controller.fallback` is on (sans-IO).
//!
//! ```text
//!  modules ──send to `websocket` / group `hub`──► EdgeHub inbox ──► outbox (SQLite) ──┐
//!                                                                                    ▼
//!  bus ◄── delivery task ◄── dedup ◄── session.poll_event ◄── reader ◄── Connection ◄─ writer
//! ```

pub mod bootstrap;
pub mod config;
mod deliver;
mod driver;
pub mod fallback;
mod link;
pub mod module;
pub mod outbox;
mod pump;
mod stats;

pub use config::EdgeHubConfig;
pub use module::{EdgeHubModule, ReceiptWaiter, ReconnectTrigger, StartError, StatsHandle};
pub use stats::{HubStats, LinkStatus, Receipt, StorageProblem};
