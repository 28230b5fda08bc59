//! The [`Module`] contract every beehive module implements, the [`ModuleContext`] a started module
//! receives (its inbox, the bus, the shutdown signal), and [`SimpleModule`], a module made from a
//! closure (KubeEdge's `SimpleModule`), handy for small modules and tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use proto::Message;
use tokio::sync::mpsc;

use crate::bus::Bus;
use crate::error::ModuleError;
use crate::shutdown::Shutdown;

/// A boxed, sendable future: what [`Module::start`] returns, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An in-process module: a named member of a group with its own inbox, run by the hive.
///
/// `start` runs the module until [`ModuleContext::shutdown`] fires (or until the module is done
/// or fails); it takes `Arc<Self>` so the returned future can own the module while the hive
/// keeps a reference for [`cleanup`](Module::cleanup). See the crate documentation for an example.
pub trait Module: Send + Sync + 'static {
    /// The module's unique name; other modules send to it by this name.
    fn name(&self) -> &str;

    /// The group the module belongs to (for example `hub`, `meta`); group sends reach every
    /// member. An empty group means none. By default a module is the one member of a group
    /// named after it, as KubeEdge's cloud modules are.
    fn group(&self) -> &str {
        self.name()
    }

    /// Runs the module. Return `Ok(())` after shutdown, or an error if the module cannot go on;
    /// either way the other modules keep running. A module still running `grace` after shutdown
    /// fires is aborted.
    fn start(self: Arc<Self>, ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>>;

    /// Final synchronous tidy-up, called exactly once after `start`'s future has finished, failed,
    /// panicked or been aborted. Keep it quick; asynchronous work belongs at the end of `start`.
    fn cleanup(&self) {}
}

/// What a started module gets: its inbox, a bus handle, and the shutdown signal.
#[derive(Debug)]
pub struct ModuleContext {
    /// The module's name, for logs.
    name: String,
    /// The module's bounded inbox.
    inbox: mpsc::Receiver<Message>,
    /// The hive's bus.
    bus: Bus,
    /// The hive's shutdown latch.
    shutdown: Shutdown,
}

impl ModuleContext {
    /// A context over an inbox; built by the hive when it starts the module.
    pub(crate) fn new(
        name: String,
        inbox: mpsc::Receiver<Message>,
        bus: Bus,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            name,
            inbox,
            bus,
            shutdown,
        }
    }

    /// The next message in the inbox, waiting for one; `None` once shutdown has fired, so
    /// `while let Some(msg) = ctx.recv().await { .. }` is a complete module loop. Messages still
    /// queued then can be drained with [`try_recv`](Self::try_recv); whatever is left when the
    /// context drops is counted in `undelivered_at_stop` and logged. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Message> {
        tokio::select! {
            biased;
            () = self.shutdown.triggered() => None,
            msg = self.inbox.recv() => msg,
        }
    }

    /// The next queued message without waiting, if any (also after shutdown, to drain).
    pub fn try_recv(&mut self) -> Option<Message> {
        self.inbox.try_recv().ok()
    }

    /// Completes once the hive shuts down. For loops that wait on something other than the inbox
    /// (a socket); when selecting on both, [`recv`](Self::recv) already ends at shutdown.
    pub async fn shutdown(&self) {
        self.shutdown.triggered().await;
    }

    /// A clone of the shutdown latch, to hand to tasks the module spawns or to stop the whole
    /// hive with [`Shutdown::trigger`].
    pub fn shutdown_signal(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// The bus, to send to other modules and groups.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ModuleContext {
    fn drop(&mut self) {
        let left = self.inbox.len();
        if left > 0 {
            self.bus.count_undelivered(left);
            tracing::warn!(
                module = %self.name,
                left,
                "module stopped with messages left in its inbox"
            );
        }
    }
}

/// A module made from a name, a group and an async closure, like KubeEdge's `SimpleModule`.
///
/// ```
/// use causeway_beehive::{ModuleError, SimpleModule};
///
/// let echo = SimpleModule::new("echo", "test", |mut ctx| async move {
///     while let Some(req) = ctx.recv().await {
///         let resp = proto::Message::response_to(&req, proto::Content::text("OK"));
///         let _ = ctx.bus().send_resp(resp);
///     }
///     Ok::<(), ModuleError>(())
/// });
/// # let _ = echo;
/// ```
pub struct SimpleModule<F> {
    name: String,
    group: String,
    run: F,
}

impl<F> std::fmt::Debug for SimpleModule<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimpleModule")
            .field("name", &self.name)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl<F, Fut> SimpleModule<F>
where
    F: Fn(ModuleContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), ModuleError>> + Send + 'static,
{
    /// A module named `name` in `group` whose `start` runs `run(ctx)`.
    pub fn new(name: impl Into<String>, group: impl Into<String>, run: F) -> Self {
        Self {
            name: name.into(),
            group: group.into(),
            run,
        }
    }
}

impl<F, Fut> Module for SimpleModule<F>
where
    F: Fn(ModuleContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), ModuleError>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn group(&self) -> &str {
        &self.group
    }

    fn start(self: Arc<Self>, ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin((self.run)(ctx))
    }
}
