//! The [`Beehive`] builder (register modules, enabled or not) and the running [`Hive`] (bus handle,
//! shutdown). Each started module runs in its own task under a small supervisor task that logs how
//! it ended, aborts it if it outlives the shutdown grace period, and then runs its cleanup, so one
//! module failing or panicking never takes the others down (PROTOCOL.md B§10.2).

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::bus::Bus;
use crate::error::{ModuleError, RegisterError};
use crate::module::{Module, ModuleContext};
use crate::shutdown::{Shutdown, TerminationSignals};

/// Inbox capacity per module unless configured: KubeEdge's `ChannelSizeDefault`.
pub const DEFAULT_INBOX_CAPACITY: NonZeroUsize = match NonZeroUsize::new(1024) {
    Some(n) => n,
    None => unreachable!(),
};

/// How long modules get to finish after shutdown fires before they are aborted, unless configured.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Builder of a hive: a table of modules, each enabled or not, and the hive's settings.
pub struct Beehive {
    /// Every registered module with its enable flag, in registration order.
    modules: Vec<(Arc<dyn Module>, bool)>,
    inbox_capacity: NonZeroUsize,
    shutdown_grace: Duration,
}

impl Default for Beehive {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Beehive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beehive")
            .field("enabled", &self.enabled())
            .field("disabled", &self.disabled())
            .field("inbox_capacity", &self.inbox_capacity)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

impl Beehive {
    /// An empty hive with [`DEFAULT_INBOX_CAPACITY`] and [`DEFAULT_SHUTDOWN_GRACE`].
    pub fn new() -> Self {
        Self {
            modules: Vec::new(),
            inbox_capacity: DEFAULT_INBOX_CAPACITY,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    /// Sets the capacity of every module's inbox. A full inbox makes senders wait.
    pub fn inbox_capacity(mut self, capacity: NonZeroUsize) -> Self {
        self.inbox_capacity = capacity;
        self
    }

    /// Sets how long modules get to return after shutdown fires before they are aborted.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Registers a module; only enabled modules start. Names must be unique and non-empty, also
    /// across disabled modules, so a configuration can enable any of them without clashes.
    pub fn register(&mut self, module: impl Module, enabled: bool) -> Result<(), RegisterError> {
        self.register_arc(Arc::new(module), enabled)
    }

    /// [`register`](Self::register) for a module already shared (for example to inspect it after
    /// shutdown).
    pub fn register_arc(
        &mut self,
        module: Arc<dyn Module>,
        enabled: bool,
    ) -> Result<(), RegisterError> {
        let name = module.name();
        if name.is_empty() {
            return Err(RegisterError::EmptyName);
        }
        if self.modules.iter().any(|(m, _)| m.name() == name) {
            return Err(RegisterError::DuplicateName {
                name: name.to_owned(),
            });
        }
        self.modules.push((module, enabled));
        Ok(())
    }

    /// Names of the enabled modules, in registration order.
    pub fn enabled(&self) -> Vec<&str> {
        self.names(true)
    }

    /// Names of the disabled modules, in registration order.
    pub fn disabled(&self) -> Vec<&str> {
        self.names(false)
    }

    /// Starts every enabled module in its own task, each with its own inbox and membership in
    /// its group, and logs the disabled ones. Must be called within a tokio runtime.
    pub fn start(self) -> Hive {
        let shutdown = Shutdown::new();
        let mut inboxes = HashMap::new();
        let mut groups: HashMap<String, Vec<_>> = HashMap::new();
        let mut receivers = Vec::new();
        let mut disabled = Vec::new();
        for (module, enabled) in self.modules {
            let name = module.name().to_owned();
            if !enabled {
                tracing::info!(module = %name, "module disabled, not started");
                disabled.push(name);
                continue;
            }
            let (tx, rx) = mpsc::channel(self.inbox_capacity.get());
            if !module.group().is_empty() {
                let members = groups.entry(module.group().to_owned()).or_default();
                members.push((name.clone(), tx.clone()));
            }
            inboxes.insert(name.clone(), tx);
            receivers.push((module, name, rx));
        }
        let bus = Bus::new(inboxes, groups);
        let mut tasks = Vec::with_capacity(receivers.len());
        for (module, name, rx) in receivers {
            tracing::info!(module = %name, group = module.group(), "starting module");
            let ctx = ModuleContext::new(name.clone(), rx, bus.clone(), shutdown.clone());
            let task = tokio::spawn(supervise(
                module,
                ctx,
                shutdown.clone(),
                self.shutdown_grace,
            ));
            tasks.push((name, task));
        }
        Hive {
            bus,
            shutdown,
            tasks,
            disabled,
        }
    }

    fn names(&self, enabled: bool) -> Vec<&str> {
        self.modules
            .iter()
            .filter(|(_, e)| *e == enabled)
            .map(|(m, _)| m.name())
            .collect()
    }
}

/// A running hive. Dropping it triggers the shutdown without waiting for the modules; call
/// [`shutdown`](Self::shutdown) (or a `run_until*`) to wait for them and their cleanups.
#[derive(Debug)]
pub struct Hive {
    bus: Bus,
    shutdown: Shutdown,
    /// Supervisor task of every started module, by name.
    tasks: Vec<(String, JoinHandle<ModuleOutcome>)>,
    disabled: Vec<String>,
}

impl Hive {
    /// Shuts the hive down and waits for every module: triggers the shutdown, ends pending sync
    /// waits, waits for each module to return (aborting those still running after the grace
    /// period), and runs every cleanup. Returns how each module ended.
    pub async fn shutdown(mut self) -> ShutdownReport {
        self.shutdown.trigger();
        self.bus.close_sync();
        let mut exits = Vec::with_capacity(self.tasks.len());
        for (name, task) in std::mem::take(&mut self.tasks) {
            // A supervisor catches the module's panics and its cleanup's, so it fails only if
            // the runtime itself is shutting down.
            let outcome = task.await.unwrap_or(ModuleOutcome::Aborted);
            exits.push(ModuleExit { name, outcome });
        }
        tracing::info!("hive stopped");
        ShutdownReport { exits }
    }

    /// Runs until `stop` completes or the shutdown is triggered from elsewhere (a module, a
    /// [`Shutdown`] clone), then [`shutdown`](Self::shutdown)s.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> ShutdownReport {
        tokio::select! {
            () = stop => {}
            () = self.shutdown.triggered() => {}
        }
        self.shutdown().await
    }

    /// Runs until one of `signals` (SIGINT, SIGTERM, SIGHUP, SIGQUIT) arrives or the shutdown is
    /// triggered, then shuts down gracefully, so a daemon can return from `main` and exit 0.
    /// Install the signals before starting the hive, so that a signal during start-up is kept:
    ///
    /// ```no_run
    /// # async fn daemon(beehive: causeway_beehive::Beehive) -> Result<(), causeway_beehive::SignalError> {
    /// let signals = causeway_beehive::TerminationSignals::install()?;
    /// let report = beehive.start().run_until_signal(signals).await;
    /// # let _ = report; Ok(())
    /// # }
    /// ```
    pub async fn run_until_signal(self, mut signals: TerminationSignals) -> ShutdownReport {
        self.run_until(async {
            let signal = signals.recv().await;
            tracing::info!(signal, "termination signal received, shutting down");
        })
        .await
    }

    /// The bus, to send into the hive from outside (tests, HTTP handlers).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// A clone of the shutdown latch, to trigger the shutdown from elsewhere.
    pub fn shutdown_signal(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Names of the started modules, in registration order.
    pub fn modules(&self) -> Vec<&str> {
        self.tasks.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// Names of the modules that were registered disabled and did not start.
    pub fn disabled(&self) -> &[String] {
        &self.disabled
    }
}

impl Drop for Hive {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// How every started module ended, in registration order.
#[derive(Debug)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// One entry per started module.
    pub exits: Vec<ModuleExit>,
}

impl ShutdownReport {
    /// Whether every module returned `Ok(())`.
    pub fn is_clean(&self) -> bool {
        self.exits
            .iter()
            .all(|e| matches!(e.outcome, ModuleOutcome::Finished))
    }

    /// What went wrong, one entry per module that failed or panicked (`module localstore
    /// failed: …`), for the daemon's exit message. A module aborted at the end of the grace
    /// period is not listed: the shutdown itself was asked for, and [`ShutdownReport::is_clean`]
    /// still tells it apart for a warning.
    pub fn problems(&self) -> Vec<String> {
        self.exits
            .iter()
            .filter_map(|e| {
                let what = match &e.outcome {
                    ModuleOutcome::Finished => return None,
                    ModuleOutcome::Failed(err) => {
                        format!("failed: {}", crate::error::report(err))
                    }
                    ModuleOutcome::Panicked => "panicked".to_owned(),
                    ModuleOutcome::Aborted => return None,
                };
                Some(format!("module {} {what}", e.name))
            })
            .collect()
    }

    /// How the module `name` ended, if it was started.
    pub fn outcome(&self, name: &str) -> Option<&ModuleOutcome> {
        self.exits
            .iter()
            .find(|e| e.name == name)
            .map(|e| &e.outcome)
    }
}

/// How one module ended.
#[derive(Debug)]
#[non_exhaustive]
pub struct ModuleExit {
    /// The module's name.
    pub name: String,
    /// How it ended.
    pub outcome: ModuleOutcome,
}

/// How a module's `start` ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum ModuleOutcome {
    /// It returned `Ok(())`.
    Finished,
    /// It returned an error.
    Failed(ModuleError),
    /// It panicked (a bug in the module).
    Panicked,
    /// It was still running when the shutdown grace period ran out, and was aborted.
    Aborted,
}

/// Runs one module to its end, logs how it ended, and runs its cleanup.
async fn supervise(
    module: Arc<dyn Module>,
    ctx: ModuleContext,
    shutdown: Shutdown,
    grace: Duration,
) -> ModuleOutcome {
    let name = module.name().to_owned();
    let runner = Arc::clone(&module);
    // `start` is called inside the task, so a panic while building the future is caught too.
    let mut task = tokio::spawn(async move { runner.start(ctx).await });
    let deadline = async {
        shutdown.triggered().await;
        tokio::time::sleep(grace).await;
    };
    let joined = tokio::select! {
        joined = &mut task => joined,
        () = deadline => {
            tracing::warn!(module = %name, ?grace, "module ignored shutdown; aborting it");
            task.abort();
            // Wait for the future to be dropped, so cleanup never races the module's own code.
            task.await
        }
    };
    let outcome = match joined {
        Ok(Ok(())) => {
            tracing::info!(module = %name, "module stopped");
            ModuleOutcome::Finished
        }
        Ok(Err(err)) => {
            tracing::error!(module = %name, error = %err, "module failed");
            ModuleOutcome::Failed(err)
        }
        Err(err) if err.is_cancelled() => ModuleOutcome::Aborted,
        Err(_) => {
            tracing::error!(module = %name, "module panicked");
            ModuleOutcome::Panicked
        }
    };
    if std::panic::catch_unwind(AssertUnwindSafe(|| module.cleanup())).is_err() {
        tracing::error!(module = %name, "module cleanup panicked");
    }
    outcome
}
