//! Outbox pumping: between the modules, the durable outbox and the session. Module messages are
//! stored in batches (one transaction each); stored rows are offered to the session after a
//! cursor that restarts on every connection (so unacknowledged rows are resent under the same
//! ids); acknowledged rows are deleted in one transaction per driver turn; and a cloud message is
//! checked against the outbox's dedup window before it is delivered.
//!
//! Whoever waits for a module message ([`crate::StatsHandle::receipt`]) hears once it is
//! committed, or at once that it was not taken (a full outbox, a failing disk): such messages are
//! dropped rather than held, since their senders answer their callers. Other modules' messages
//! wait in the batch (back-pressure).
//!
//! **A failing disk** (`SQLITE_FULL`): the failure is logged once per episode and published
//! ([`crate::StorageProblem`]) so new messages are refused at the door; nothing stored or held is
//! dropped (failed deletions are kept too); every failed operation is retried each
//! [`STORAGE_RETRY`], and the end of the episode is logged once. No restart is needed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use beehive::Bus;
use proto::Message;
use proto::message::UpstreamClass;
use session::edge::EdgeSession;

use crate::outbox::{DedupVerdict, Outbox, PushError, Seq, StoreError};
use crate::stats::{Counters, Receipt, StorageProblem, bump};

/// Most module messages stored in one outbox transaction (one fsync).
pub(crate) const UPSTREAM_BATCH: usize = 256;
/// While the outbox's storage fails (a full disk), how often the failed operations are tried
/// again: one small transaction each time, so the node is back within about this long of space
/// returning.
pub(crate) const STORAGE_RETRY: Duration = Duration::from_secs(1);

/// The outbox and what the driver keeps about it.
pub(crate) struct OutboxPump {
    outbox: Outbox,
    /// The last outbox row offered to the current connection.
    cursor: Seq,
    /// The outbox may hold rows after `cursor` that the session could take.
    dirty: bool,
    /// Module messages taken from the inbox and not yet stored (the outbox is full).
    batch: VecDeque<Message>,
    /// A full outbox was reported (logged once per episode).
    full_warned: bool,
    /// The storage failed (a full disk) and has not worked since: logged once per episode;
    /// writes wait for `retry_at`.
    storage_failing: bool,
    /// When to try the failed storage operations again.
    retry_at: Option<tokio::time::Instant>,
    /// Outbox ids to delete at the end of this turn.
    forgets: Vec<String>,
    /// Ids whose deletion failed, deleted at the next retry (never dropped: their rows would
    /// otherwise wait for the next reconnect to leave).
    unforgotten: Vec<String>,
}

impl OutboxPump {
    /// Pumps `outbox`.
    pub(crate) fn new(outbox: Outbox) -> Self {
        Self {
            outbox,
            cursor: Seq::default(),
            dirty: true,
            batch: VecDeque::new(),
            full_warned: false,
            storage_failing: false,
            retry_at: None,
            forgets: Vec::new(),
            unforgotten: Vec::new(),
        }
    }

    /// A new connection is up: offer every stored row again, from the first.
    pub(crate) fn connected(&mut self) {
        self.cursor = Seq::default();
        self.dirty = true;
    }

    /// Takes a module message from the inbox; [`OutboxPump::store`] stores it.
    pub(crate) fn take(&mut self, message: Message) {
        self.batch.push_back(message);
    }

    /// Whether the inbox may be read: nothing waits to be stored, and the batch has room.
    pub(crate) fn accepts(&self) -> bool {
        self.batch.is_empty()
    }

    /// Whether module messages wait to be stored and storing is not paused by a failing disk
    /// (then [`OutboxPump::retry`] tries).
    pub(crate) fn wants_store(&self) -> bool {
        !self.batch.is_empty() && !self.storage_failing
    }

    /// Completes when the failed storage operations are to be tried again
    /// ([`OutboxPump::retry`]); never while none is scheduled.
    /// The future owns the deadline, so the driver's select holds no borrow of the pump (which
    /// is not `Sync`).
    pub(crate) fn retry_due(&self) -> impl Future<Output = ()> + Send + 'static {
        let retry_at = self.retry_at;
        async move {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        }
    }

    /// Tries the failed storage operations again: the held module messages, the deletions
    /// (at the end of this turn) and reading what is pending.
    pub(crate) fn retry(&mut self, session: &mut EdgeSession, bus: &Bus, counters: &Counters) {
        self.retry_at = None;
        self.forgets.append(&mut self.unforgotten);
        self.dirty = true;
        if !self.batch.is_empty() {
            self.store(session, bus, counters);
        } else if self.forgets.is_empty() {
            self.storage_works(counters);
        }
    }

    /// Whether the batch being read from the inbox has room for more.
    pub(crate) fn batch_has_room(&self) -> bool {
        self.batch.len() < UPSTREAM_BATCH
    }

    /// Deletes `id` at the end of this turn (the cloud acknowledged it, or it was written to a
    /// cloud that acknowledges nothing).
    pub(crate) fn forget(&mut self, id: String) {
        self.forgets.push(id);
    }

    /// Offers rows after the cursor to the session while it has room; whether any was taken.
    pub(crate) fn feed(&mut self, session: &mut EdgeSession) -> bool {
        let mut progress = false;
        while self.dirty && session.connected_generation().is_some() {
            let room = session.upstream_capacity();
            if room == 0 {
                break;
            }
            let rows = match self.outbox.pending_after(self.cursor, room) {
                Ok((rows, 0)) => rows,
                Ok((rows, damaged)) => {
                    error!(damaged, "outbox: discarded rows that no longer decode");
                    rows
                }
                Err(e) => {
                    // Retried with the other storage operations.
                    error!(error = %e, "outbox: could not read pending messages");
                    self.dirty = false;
                    self.retry_at
                        .get_or_insert_with(|| tokio::time::Instant::now() + STORAGE_RETRY);
                    break;
                }
            };
            if rows.len() < room {
                self.dirty = false;
            }
            for row in rows {
                if session.queue_upstream(row.message).is_err() {
                    // Not connected or the window is full: offered again later.
                    self.dirty = true;
                    return progress;
                }
                self.cursor = row.seq;
                progress = true;
            }
        }
        progress
    }

    /// Deletes the rows forgotten this turn; whether there were any.
    pub(crate) fn flush_forgets(
        &mut self,
        session: &mut EdgeSession,
        bus: &Bus,
        counters: &Counters,
    ) -> bool {
        if self.forgets.is_empty() {
            return false;
        }
        let ids = std::mem::take(&mut self.forgets);
        match self.outbox.remove_many(ids.iter().map(String::as_str)) {
            Ok(removed) => {
                bump(&counters.upstream_acked, removed as u64);
                self.dirty = true;
                if self.wants_store() {
                    self.store(session, bus, counters);
                }
                if self.batch.is_empty() {
                    self.storage_works(counters);
                }
            }
            // The rows stay (sent again after a reconnect, the cloud would deduplicate them);
            // deleting them is retried.
            Err(e) => {
                self.unforgotten.extend(ids);
                self.storage_failed("deleting acknowledged messages", &e, counters);
            }
        }
        true
    }

    /// Stores the pending module messages; on a full outbox (or a storage error) keeps the rest,
    /// and the inbox is not read until they are stored. Answers to cloud messages are recorded
    /// and go straight to the session's answer lane.
    pub(crate) fn store(&mut self, session: &mut EdgeSession, bus: &Bus, counters: &Counters) {
        while !self.batch.is_empty() {
            // The batch's ids, when someone waits for a receipt (a local application's POST).
            let watched: Vec<String> = if counters.watched() {
                self.batch.iter().map(|m| m.header.id.clone()).collect()
            } else {
                Vec::new()
            };
            match self.outbox.push_batch(&mut self.batch) {
                Ok(outcome) => {
                    for id in watched.iter().take(outcome.accepted) {
                        counters.settle(id, &Receipt::Stored);
                    }
                    let answers = outcome.answers.len();
                    bump(
                        &counters.upstream_stored,
                        (outcome.accepted - answers) as u64,
                    );
                    bump(&counters.answers_queued, answers as u64);
                    for answer in outcome.answers {
                        session.queue_answer(answer);
                    }
                    if outcome.accepted > answers {
                        self.dirty = true;
                    }
                    if outcome.full {
                        // Whoever waits hears now rather than waiting for room; other modules'
                        // messages wait here (back-pressure).
                        self.refuse_watched(&Receipt::OutboxFull, counters);
                        if !self.full_warned {
                            warn!(
                                usage = ?self.outbox.usage(),
                                "outbox full: modules wait until the cloud acknowledges messages"
                            );
                            self.full_warned = true;
                        }
                        return;
                    }
                }
                Err(PushError::TooLarge { size, max }) => {
                    let Some(msg) = self.batch.pop_front() else {
                        continue;
                    };
                    bump(&counters.upstream_refused, 1);
                    counters.settle(&msg.header.id, &Receipt::TooLarge { size, max });
                    error!(
                        id = msg.header.id,
                        size, max, "message larger than the outbox; refused"
                    );
                    if msg.header.sync {
                        let text = format!("message of {size} bytes exceeds the outbox ({max})");
                        let _ = bus.send_resp(Message::error_for(&msg, text));
                    }
                }
                // `push_batch` reports a full outbox in its outcome, not as an error.
                Err(PushError::Full { .. }) => return,
                Err(PushError::Store(e)) => {
                    self.storage_failed("storing module messages", &e, counters);
                    if let Some(problem) = counters.storage() {
                        self.refuse_watched(&Receipt::StorageFailed(problem), counters);
                    }
                    // Answers do not wait for the disk: sent without their dedup record (a
                    // resend of what they answer is then delivered again, which modules handle
                    // by contract), so the cloud's queue for this node can still drain.
                    let mut answers = 0;
                    self.batch.retain(|m| {
                        let answer = m.upstream_class() == UpstreamClass::Answer;
                        if answer {
                            answers += 1;
                            session.queue_answer(m.clone());
                        }
                        !answer
                    });
                    bump(&counters.answers_queued, answers);
                    return;
                }
            }
        }
        if self.full_warned {
            info!("outbox has room again");
        }
        self.full_warned = false;
        self.storage_works(counters);
    }

    /// Drops the held messages someone waits for, telling them why: they were never accepted,
    /// and their senders answer their callers (507, 503) instead of keeping them waiting.
    fn refuse_watched(&mut self, why: &Receipt, counters: &Counters) {
        if counters.watched() {
            self.batch
                .retain(|m| m.header.id.is_empty() || !counters.settle(&m.header.id, why));
        }
    }

    /// A storage operation failed: say so once per episode (not once per message), publish the
    /// problem (the local endpoint then refuses new messages at once) and retry in a while.
    fn storage_failed(&mut self, what: &str, e: &StoreError, counters: &Counters) {
        let problem = StorageProblem {
            disk_full: e.is_disk_full(),
            error: format!("{what}: {e}"),
        };
        if !self.storage_failing {
            let path = self.outbox.config().path.display().to_string();
            if problem.disk_full {
                error!(
                    path,
                    error = %problem.error,
                    "outbox: the disk is full; new module messages are refused until space \
                     returns, nothing stored is lost, retrying every second"
                );
            } else {
                error!(
                    path,
                    error = %problem.error,
                    "outbox: storage failing; new module messages are refused, retrying every \
                     second"
                );
            }
        }
        self.storage_failing = true;
        counters.set_storage(Some(problem));
        self.retry_at
            .get_or_insert_with(|| tokio::time::Instant::now() + STORAGE_RETRY);
    }

    /// A write succeeded after storage failures: the episode is over once nothing failed waits.
    fn storage_works(&mut self, counters: &Counters) {
        if self.storage_failing && self.unforgotten.is_empty() {
            info!("outbox: storage works again; taking module messages");
            self.storage_failing = false;
            counters.set_storage(None);
        }
    }

    /// Whether a cloud message is delivered, answered again or left to the module that has it
    /// (the outbox's dedup window); duplicates are counted.
    pub(crate) fn check_downstream(
        &mut self,
        now: Instant,
        message: &Message,
        counters: &Counters,
    ) -> DedupVerdict {
        let verdict = match self.outbox.check_downstream(now, message) {
            Ok(verdict) => verdict,
            Err(e) => {
                // Deliver rather than lose it; the module is idempotent by contract.
                error!(error = %e, "outbox: dedup lookup failed");
                DedupVerdict::Deliver
            }
        };
        let id = message.header.id.as_str();
        match verdict {
            DedupVerdict::Deliver => {}
            DedupVerdict::AnsweredDuplicate => {
                bump(&counters.downstream_duplicates, 1);
                debug!(id, "cloud resent an answered message: answering again");
            }
            DedupVerdict::PendingDuplicate => {
                bump(&counters.downstream_duplicates, 1);
                debug!(id, "cloud resent a message still being handled");
            }
        }
        verdict
    }

    /// Module messages taken from the inbox and not stored (reported at shutdown).
    pub(crate) fn unstored(&self) -> usize {
        self.batch.len()
    }
}
