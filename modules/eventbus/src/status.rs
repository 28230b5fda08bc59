//! eventbus's state for status endpoints and logs: whether the broker is connected (and why not),
//! and counters of what went where.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

/// The broker connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerState {
    /// Not connected yet (starting, or reconnecting after a loss).
    #[default]
    Connecting,
    /// Connected and subscribed.
    Connected,
    /// The embedded broker could not start (its port taken): nothing is bridged until restart.
    Failed,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<(BrokerState, Option<String>)>,
    counters: [AtomicU64; COUNTERS],
}

/// A counter of [`StatusHandle`].
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub enum Counter {
    /// Connections to the broker established.
    Connects,
    /// Device/node publications handed to devicetwin.
    ToTwin,
    /// Uploads the outbox stored (then acknowledged to the broker).
    UploadsStored,
    /// Uploads the outbox did not take (full, disk, timeout): left unacknowledged for redelivery.
    UploadsNotStored,
    /// Publishes handed to the broker.
    Published,
    /// Publishes dropped (broker down, queue full past the timeout, bad request).
    PublishDropped,
    /// Connection attempts that failed (refused, TLS, credentials, lost): each retried after a
    /// backoff.
    ConnectFailures,
}

const COUNTERS: usize = 7;

/// Shared view of eventbus's state; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct StatusHandle(Arc<Inner>);

/// A snapshot, as `/v1/status` shows it under `eventbus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventBusStatus {
    /// `connecting`, `connected` or `failed`.
    pub broker: BrokerState,
    /// The last connection failure, if any.
    pub last_error: Option<String>,
    /// See [`Counter::Connects`].
    pub connects: u64,
    /// See [`Counter::ToTwin`].
    pub to_twin: u64,
    /// See [`Counter::UploadsStored`].
    pub uploads_stored: u64,
    /// See [`Counter::UploadsNotStored`].
    pub uploads_not_stored: u64,
    /// See [`Counter::Published`].
    pub published: u64,
    /// See [`Counter::PublishDropped`].
    pub publish_dropped: u64,
    /// See [`Counter::ConnectFailures`].
    pub connect_failures: u64,
}

impl StatusHandle {
    /// Adds one to a counter.
    pub fn bump(&self, c: Counter) {
        self.0.counters[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, c: Counter) -> u64 {
        self.0.counters[c as usize].load(Ordering::Relaxed)
    }

    /// Sets the state; returns whether it or the error changed (the caller logs changes only:
    /// the first failure, and a failure that differs from the last one, are worth a line).
    pub fn set(&self, state: BrokerState, error: Option<String>) -> bool {
        let mut s = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = s.0 != state || (error.is_some() && s.1 != error);
        s.0 = state;
        if error.is_some() {
            s.1 = error;
        }
        changed
    }

    /// The current state.
    pub fn state(&self) -> BrokerState {
        self.0
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// A snapshot.
    pub fn snapshot(&self) -> EventBusStatus {
        let (broker, last_error) = self
            .0
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        EventBusStatus {
            broker,
            last_error,
            connects: self.get(Counter::Connects),
            to_twin: self.get(Counter::ToTwin),
            uploads_stored: self.get(Counter::UploadsStored),
            uploads_not_stored: self.get(Counter::UploadsNotStored),
            published: self.get(Counter::Published),
            publish_dropped: self.get(Counter::PublishDropped),
            connect_failures: self.get(Counter::ConnectFailures),
        }
    }
}
