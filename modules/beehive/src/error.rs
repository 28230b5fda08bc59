//! The typed errors of beehive, one enum per operation (register, send, group send, sync request,
//! signal wiring) plus [`ModuleError`], the error a module's own work ends with. Each
//! variant says who is at fault and what to do about it. Errors of operations that consume a
//! message hand it back, so a caller can reroute it instead of losing it.

use std::time::Duration;

use proto::Message;

/// Why [`Beehive::register`](crate::Beehive::register) refused a module. Always the caller's bug:
/// fix the module table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The module's name is empty; names address inboxes, so every module needs one.
    #[error("a module name must not be empty")]
    EmptyName,
    /// Another module (enabled or not) already has this name; names must be unique.
    #[error("module {name:?} is registered twice")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
}

/// Why [`Bus::send`](crate::Bus::send) did not enqueue a message. The message is handed back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No started module has this name: it was never registered, or it is disabled. A routing or
    /// configuration bug of the caller (KubeEdge logged and dropped the message here).
    #[error("no started module named {module:?}")]
    UnknownModule {
        /// The name asked for.
        module: String,
        /// The message, returned unsent.
        msg: Box<Message>,
    },
    /// The module has stopped (its `start` returned, failed or was aborted at shutdown), so its
    /// inbox no longer exists. Reroute or report; waiting would never help.
    #[error("module {module:?} has stopped")]
    Stopped {
        /// The stopped module.
        module: String,
        /// The message, returned unsent.
        msg: Box<Message>,
    },
}

impl SendError {
    /// The message that was not sent, to reroute or report.
    pub fn into_message(self) -> Message {
        match self {
            Self::UnknownModule { msg, .. } | Self::Stopped { msg, .. } => *msg,
        }
    }
}

/// Why [`Bus::send_to_group`](crate::Bus::send_to_group) did not reach every member.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupSendError {
    /// No started module belongs to this group (none registered, or all disabled). A routing or
    /// configuration bug of the caller. The message is handed back.
    #[error("no started module in group {group:?}")]
    UnknownGroup {
        /// The group asked for.
        group: String,
        /// The message, returned unsent.
        msg: Box<Message>,
    },
    /// Some members have stopped; every live member did get the message.
    #[error("group {group:?}: delivered to {delivered}, not to stopped members {stopped:?}")]
    MembersStopped {
        /// The group.
        group: String,
        /// How many members got the message.
        delivered: usize,
        /// Names of the members that have stopped.
        stopped: Vec<String>,
    },
}

/// Why [`Bus::send_sync`](crate::Bus::send_sync) returned no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// No started module has this name (caller's routing or configuration bug).
    #[error("no started module named {module:?}")]
    UnknownModule {
        /// The name asked for.
        module: String,
    },
    /// The request has an empty id, so no response could be matched to it (caller's bug: build
    /// requests with `Message::new`).
    #[error("a sync request needs a message id")]
    MissingId,
    /// Another `send_sync` is already waiting on this id; ids must be unique (caller's bug).
    #[error("a sync request with id {id:?} is already waiting")]
    DuplicateId {
        /// The id in use.
        id: String,
    },
    /// The target module has stopped, so nobody will answer.
    #[error("module {module:?} has stopped")]
    Stopped {
        /// The stopped module.
        module: String,
    },
    /// The target's inbox stayed full until the deadline: it is overloaded or stuck. The request
    /// was not enqueued.
    #[error("timed out after {timeout:?} sending to {module:?} (inbox full)")]
    SendTimeout {
        /// The target module.
        module: String,
        /// The whole budget that elapsed.
        timeout: Duration,
    },
    /// The request was enqueued but no response arrived by the deadline. A response arriving
    /// later is counted as late ([`BusStats::late_responses`](crate::BusStats)).
    #[error("timed out after {timeout:?} waiting for {module:?} to respond")]
    ResponseTimeout {
        /// The target module.
        module: String,
        /// The whole budget that elapsed.
        timeout: Duration,
    },
    /// The hive is shutting down: pending waits end now rather than holding up the shutdown.
    #[error("the hive is shutting down")]
    ShuttingDown,
}

/// Why [`TerminationSignals::install`](crate::TerminationSignals::install) failed: the OS refused a
/// handler, or there is no tokio runtime with the signal driver. An environment problem.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {signal}")]
pub struct SignalError {
    /// The signal whose handler failed, for example `SIGTERM`.
    pub signal: &'static str,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// How a module's own work failed. Modules have their own typed errors; this wraps one so the
/// hive can log it and report it in [`ModuleExit`](crate::ModuleExit). Downcast the source to
/// inspect it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModuleError {
    /// The module failed for the reason in the source.
    #[error("{0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl ModuleError {
    /// Wraps a module's own error.
    pub fn new(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Failed(Box::new(err))
    }

    /// A failure described by text only, for modules without an error type of their own.
    pub fn msg(text: impl Into<String>) -> Self {
        Self::Failed(text.into().into())
    }

    /// `module` could not open its store at `path`: the start-up failure every module with a
    /// file of its own reports the same way.
    pub fn opening(module: &str, path: &std::path::Path, err: impl std::fmt::Display) -> Self {
        Self::msg(format!("{module}: opening {}: {err}", path.display()))
    }
}

macro_rules! module_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for ModuleError {
            fn from(err: $t) -> Self {
                Self::new(err)
            }
        }
    )*};
}
module_error_from!(SendError, GroupSendError, SyncError);

/// The one line a daemon prints when it cannot run: `err` and its causes joined by `: `, each
/// cause only if its text is not already in the line, since error types that embed their
/// source's text would otherwise print it twice (`file: key: missing field: missing field`).
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod report_tests {
    use super::report;

    #[derive(Debug, thiserror::Error)]
    #[error("cloudcore.yaml: cloudhub.quic: {source}")]
    struct Embeds {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading the config")]
    struct Wraps(#[source] Embeds);

    #[test]
    fn each_cause_is_printed_once() {
        let err = Wraps(Embeds {
            source: std::io::Error::other("missing field `address`"),
        });
        assert_eq!(
            report(&err),
            "loading the config: cloudcore.yaml: cloudhub.quic: missing field `address`"
        );
    }
}
