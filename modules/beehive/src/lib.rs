//! Beehive: the in-process module bus used by both the edge and the cloud daemons. Modules are
//! named members of groups, each with a bounded inbox; they talk through a [`Bus`] by unicast,
//! group send, and sync request/response, and stop together on a shutdown signal. It follows
//! KubeEdge's beehive (PROTOCOL.md B§10) without its hazards (W13):
//!
//! - sends wait for room instead of dropping, and unknown names are typed errors;
//! - a group send keeps each member's order and spawns no task per message;
//! - a sync request registers its waiter *before* it is sent and the response goes through a
//!   one-slot channel, so an early response is never lost; every wait is bounded by one deadline;
//! - late and orphan responses are counted, logged once per request id, and handed back
//!   ([`RespOutcome`]);
//! - shutdown cancels every module, bounds how long they may take, and runs every cleanup.
//!
//! It is not a transport (that is `transport`, and the hubs bridge the two) and it does not
//! persist messages: what sits in an inbox at shutdown is counted and logged, not kept.
//!
//! Layout:
//! - [`module`]: the [`Module`] trait, [`ModuleContext`], [`SimpleModule`].
//! - [`bus`]: the [`Bus`] and its counters ([`BusStats`]).
//! - [`hive`]: the [`Beehive`] builder and the running [`Hive`], shutdown reports.
//! - [`shutdown`]: the [`Shutdown`] latch and [`TerminationSignals`].
//! - [`error`]: one error enum per operation.
//! - [`config`]: YAML configuration loading with key paths in errors, [`config::Seconds`].
//! - [`daemon`]: a daemon's start-up (logging, runtime) and exit status.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use causeway_beehive::{BoxFuture, Beehive, Module, ModuleContext, ModuleError};
//! use proto::{Content, Message};
//!
//! /// Answers every request with "OK".
//! struct Echo;
//!
//! impl Module for Echo {
//!     fn name(&self) -> &str {
//!         "echo"
//!     }
//!     fn group(&self) -> &str {
//!         "test"
//!     }
//!     fn start(self: Arc<Self>, mut ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>> {
//!         Box::pin(async move {
//!             // `recv` ends with `None` at shutdown.
//!             while let Some(req) = ctx.recv().await {
//!                 let resp = Message::response_to(&req, Content::text("OK"));
//!                 // Not delivered only if the requester gave up; nothing more to do then.
//!                 let _ = ctx.bus().send_resp(resp);
//!             }
//!             Ok(())
//!         })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut beehive = Beehive::new();
//! beehive.register(Echo, true).expect("unique name");
//! let hive = beehive.start();
//! let resp = hive
//!     .bus()
//!     .send_sync("echo", Message::new(""), Duration::from_secs(5))
//!     .await
//!     .expect("echo answers");
//! assert_eq!(resp.content.as_text(), Some("OK"));
//! let report = hive.shutdown().await; // or `run_until_signal()` in a daemon
//! assert!(report.is_clean());
//! # }
//! ```

pub mod bus;
pub mod config;
pub mod daemon;
pub mod error;
pub mod hive;
pub mod module;
pub mod shutdown;
mod waiters;

pub use bus::{Bus, BusStats, DEFAULT_SYNC_TIMEOUT, RespOutcome};
pub use error::{GroupSendError, ModuleError, RegisterError, SendError, SignalError, SyncError};
pub use hive::{
    Beehive, DEFAULT_INBOX_CAPACITY, DEFAULT_SHUTDOWN_GRACE, Hive, ModuleExit, ModuleOutcome,
    ShutdownReport,
};
pub use module::{BoxFuture, Module, ModuleContext, SimpleModule};
pub use shutdown::{Shutdown, TerminationSignals};
