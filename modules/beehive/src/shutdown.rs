//! The shutdown signal every module selects on, and the thin layer that turns the process's
//! termination signals (SIGINT, SIGTERM, SIGHUP, SIGQUIT) into a shutdown. The signal is a
//! latch: once triggered it stays triggered, so a module that looks late still sees it.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::error::SignalError;

/// A cloneable, one-way shutdown latch shared by the hive and all its modules. Any clone can
/// trigger it (a module that cannot go on may stop the whole hive); every clone observes it.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// `true` once triggered; `watch` wakes every waiter and remembers the value for late ones.
    tx: std::sync::Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A new, untriggered latch.
    pub fn new() -> Self {
        Self {
            tx: std::sync::Arc::new(watch::Sender::new(false)),
        }
    }

    /// Triggers the shutdown. Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the shutdown is triggered (at once if it already was). Cancel-safe.
    pub async fn triggered(&self) {
        let mut rx = self.tx.subscribe();
        // `wait_for` fails only when the sender is dropped, and `self` holds it.
        let _ = rx.wait_for(|triggered| *triggered).await;
    }
}

/// The termination signals a daemon honours, installed up front so that none arriving between
/// start-up and the first wait is lost (tokio buffers a signal from installation on).
#[derive(Debug)]
pub struct TerminationSignals {
    /// `(name, stream)` for SIGINT, SIGTERM, SIGHUP and SIGQUIT.
    streams: Vec<(&'static str, Signal)>,
}

impl TerminationSignals {
    /// Installs handlers for SIGINT, SIGTERM, SIGHUP and SIGQUIT; from now on these signals no
    /// longer kill the process but are reported by [`TerminationSignals::recv`]. Needs a tokio
    /// runtime with the signal driver enabled.
    pub fn install() -> Result<Self, SignalError> {
        let kinds = [
            ("SIGINT", SignalKind::interrupt()),
            ("SIGTERM", SignalKind::terminate()),
            ("SIGHUP", SignalKind::hangup()),
            ("SIGQUIT", SignalKind::quit()),
        ];
        let mut streams = Vec::with_capacity(kinds.len());
        for (name, kind) in kinds {
            let stream = signal(kind).map_err(|source| SignalError {
                signal: name,
                source,
            })?;
            streams.push((name, stream));
        }
        Ok(Self { streams })
    }

    /// Waits for the next of the installed signals and returns its name (`"SIGTERM"`, ...).
    pub async fn recv(&mut self) -> &'static str {
        std::future::poll_fn(|cx| {
            for (name, stream) in &mut self.streams {
                // A stream yields `None` only once the runtime shuts down; treat it as pending.
                if let std::task::Poll::Ready(Some(())) = stream.poll_recv(cx) {
                    return std::task::Poll::Ready(*name);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
