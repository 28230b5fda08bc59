//! The EdgeHub beehive module: registered as `websocket` in group `hub`, the names KubeEdge's
//! modules address it by. Its inbox takes every module → cloud message (metamanager's group
//! sends to `hub`, `SendSync` to `websocket`); it runs the driver ([`crate::driver`]) until the
//! hive shuts down.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use beehive::{BoxFuture, Module, ModuleContext, ModuleError};

use crate::config::EdgeHubConfig;
use crate::driver;
use crate::outbox::OpenError;
use crate::stats::{Counters, HubStats, LinkStatus, Receipt, StorageProblem};
use session::edge::route::{GROUP_HUB, MODULE_EDGEHUB};

/// The EdgeHub module. Create it, keep [`EdgeHubModule::stats`] / [`EdgeHubModule::reconnect_trigger`]
/// handles if needed, and register it on the beehive.
#[derive(Debug)]
pub struct EdgeHubModule {
    config: EdgeHubConfig,
    counters: Arc<Counters>,
    reconnect: Arc<Notify>,
}

/// Asks a running EdgeHub to reconnect (e.g. after its certificate was renewed, so the new one
/// is presented). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReconnectTrigger(Arc<Notify>);

/// Why EdgeHub could not start. Local: fix the path or disk named in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The outbox database could not be opened.
    #[error(transparent)]
    Outbox(#[from] OpenError),
}

impl EdgeHubModule {
    /// An EdgeHub for `config`; nothing happens until the hive starts it.
    pub fn new(config: EdgeHubConfig) -> Self {
        Self {
            config,
            counters: Arc::default(),
            reconnect: Arc::default(),
        }
    }

    /// A handle that forces a reconnect of the running hub.
    pub fn reconnect_trigger(&self) -> ReconnectTrigger {
        ReconnectTrigger(self.reconnect.clone())
    }

    /// The hub's counters so far.
    pub fn stats(&self) -> HubStats {
        self.counters.snapshot()
    }

    /// A handle that reads the counters after the module was handed to the hive.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.counters.clone())
    }

    /// The configuration.
    pub fn config(&self) -> &EdgeHubConfig {
        &self.config
    }
}

/// Reads a registered EdgeHub's counters, link and storage state, and waits for receipts.
#[derive(Debug, Clone)]
pub struct StatsHandle(Arc<Counters>);

impl StatsHandle {
    /// The counters so far.
    pub fn get(&self) -> HubStats {
        self.0.snapshot()
    }

    /// Whether the link to the cloud is up, and its last failure.
    pub fn link(&self) -> LinkStatus {
        self.0.link()
    }

    /// Why the outbox cannot store right now (a full disk), or `None` while it works.
    pub fn storage_problem(&self) -> Option<StorageProblem> {
        self.0.storage()
    }

    /// Registers interest in what becomes of the module message with this (non-empty) id; call
    /// it before handing the message to EdgeHub.
    pub fn receipt(&self, id: &str) -> ReceiptWaiter {
        ReceiptWaiter {
            rx: Some(self.0.watch(id)),
            id: id.to_owned(),
            counters: self.0.clone(),
        }
    }
}

/// Waits for a module message's [`Receipt`]; see [`StatsHandle::receipt`].
#[derive(Debug)]
pub struct ReceiptWaiter {
    rx: Option<oneshot::Receiver<Receipt>>,
    id: String,
    counters: Arc<Counters>,
}

impl ReceiptWaiter {
    /// The receipt, or `None` if none came within `timeout` (the message may still be stored
    /// later: a retry under the same id is stored at most once) or EdgeHub stopped.
    pub async fn wait(mut self, timeout: Duration) -> Option<Receipt> {
        let rx = self.rx.as_mut()?;
        tokio::time::timeout(timeout, rx).await.ok()?.ok()
    }
}

impl Drop for ReceiptWaiter {
    fn drop(&mut self) {
        // Close the channel first, so the registry sees this watcher as gone.
        drop(self.rx.take());
        self.counters.unwatch(&self.id);
    }
}

impl ReconnectTrigger {
    /// Requests a reconnect; requests made while one is pending coalesce.
    pub fn trigger(&self) {
        self.0.notify_one();
    }
}

impl Module for EdgeHubModule {
    fn name(&self) -> &str {
        MODULE_EDGEHUB
    }

    fn group(&self) -> &str {
        GROUP_HUB
    }

    fn start(self: Arc<Self>, ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move {
            driver::run(
                self.config.clone(),
                ctx,
                self.counters.clone(),
                self.reconnect.clone(),
            )
            .await
            .map_err(|e| ModuleError::new(StartError::from(e)))
        })
    }
}
