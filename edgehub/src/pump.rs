//! Outbox pumping: between the modules, the durable outbox and the session. Module messages are
//! stored in batches (one transaction each); stored rows are offered to the session after a
//! cursor that restarts on every connection (so unacknowledged rows are resent under the same
//! ids); acknowledged rows are deleted in one transaction per driver turn; and a cloud message is
//! checked against the outbox's dedup window before it is delivered.

use std::collections::VecDeque;
use std::time::Instant;

use tracing::{debug, error, info, warn};

use beehive::Bus;
use proto::Message;
use session::edge::EdgeSession;

use crate::outbox::{Downstream, Outbox, PushError, Seq};
use crate::stats::{Counters, bump};

/// Most module messages stored in one outbox transaction (one fsync).
pub(crate) const UPSTREAM_BATCH: usize = 256;

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
    /// A storage error was reported (logged once per episode).
    store_error_logged: bool,
    /// Outbox ids to delete at the end of this turn.
    forgets: Vec<String>,
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
            store_error_logged: false,
            forgets: Vec::new(),
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
                    error!(error = %e, "outbox: could not read pending messages");
                    self.dirty = false;
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
                if !self.batch.is_empty() {
                    self.store(session, bus, counters);
                }
            }
            // The rows stay and are sent again later; the cloud deduplicates them.
            Err(e) => error!(error = %e, "outbox: could not delete acknowledged messages"),
        }
        true
    }

    /// Stores the pending module messages; on a full outbox (or a storage error) keeps the rest,
    /// and the inbox is not read until they are stored. Answers to cloud messages are recorded
    /// and go straight to the session's answer lane.
    pub(crate) fn store(&mut self, session: &mut EdgeSession, bus: &Bus, counters: &Counters) {
        while !self.batch.is_empty() {
            match self.outbox.push_batch(&mut self.batch) {
                Ok(outcome) => {
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
                    error!(
                        id = msg.header.id,
                        size, max, "message larger than the outbox; refused"
                    );
                    if msg.header.sync {
                        let text = format!("message of {size} bytes exceeds the outbox ({max})");
                        let _ = bus.send_resp(Message::error_for(&msg, text));
                    }
                }
                Err(e) => {
                    if !self.store_error_logged {
                        error!(error = %e, "outbox: could not store module messages; will retry");
                        self.store_error_logged = true;
                    }
                    return;
                }
            }
        }
        if self.full_warned {
            info!("outbox has room again");
        }
        self.full_warned = false;
        self.store_error_logged = false;
    }

    /// Whether a cloud message is delivered, answered again or left to the module that has it
    /// (the outbox's dedup window); duplicates are counted.
    pub(crate) fn check_downstream(
        &mut self,
        now: Instant,
        message: &Message,
        counters: &Counters,
    ) -> Downstream {
        let verdict = match self.outbox.check_downstream(now, message) {
            Ok(verdict) => verdict,
            Err(e) => {
                // Deliver rather than lose it; the module is idempotent by contract.
                error!(error = %e, "outbox: dedup lookup failed");
                Downstream::Deliver
            }
        };
        let id = message.header.id.as_str();
        match verdict {
            Downstream::Deliver => {}
            Downstream::AnsweredDuplicate => {
                bump(&counters.downstream_duplicates, 1);
                debug!(id, "cloud resent an answered message: answering again");
            }
            Downstream::PendingDuplicate => {
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
