//! The table of pending sync requests, keyed by request id (fixes W13). A waiter is a `oneshot`
//! registered *before* its request is sent, so a response can never arrive "too early"; it is
//! removed on every exit path by a guard; and the ids of requests that gave up are remembered for
//! a while so a late response is told apart from an orphan and is logged only once.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use proto::Message;
use tokio::sync::oneshot;

/// How many given-up or already-logged request ids are remembered; older ones are forgotten, so
/// the memory stays bounded whatever responders do.
const RECENT_IDS: usize = 4096;

/// What [`Waiters::deliver`] did with a response.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// The waiting requester got it.
    Delivered,
    /// Its requester gave up. `first` is true the first time this id is reported.
    Late { first: bool, resp: Message },
    /// Nobody waited for it. `first` is true the first time this id is reported.
    Orphan { first: bool, resp: Message },
}

/// Why [`Waiters::register`] refused.
#[derive(Debug)]
pub(crate) enum RegisterRefused {
    /// A waiter with this id exists.
    Duplicate,
    /// The table is closed for shutdown.
    Closed,
}

/// Shared table of pending sync requests.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// Pending requests: id -> (registration token, response slot).
    pending: HashMap<String, (u64, oneshot::Sender<Message>)>,
    /// Next registration token; tells a guard's own entry from a later one reusing the id.
    next_token: u64,
    /// Recently seen ids that have no waiter, with what we know about them.
    recent: HashMap<String, Recent>,
    /// Insertion order of `recent`, to evict the oldest.
    order: VecDeque<String>,
    /// Set at shutdown: pending waits are released and new ones refused.
    closed: bool,
}

/// What is known about a recent id without a waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recent {
    /// Its requester gave up; no late response seen yet.
    GaveUp,
    /// A late response to it has been logged.
    LateLogged,
    /// An orphan response to it has been logged.
    OrphanLogged,
}

/// Removes its waiter when dropped, whatever way the request ends (response, timeout, error or
/// the requester's future being dropped); if no response came, remembers that the requester gave
/// up, so a response arriving later counts as late.
#[derive(Debug)]
pub(crate) struct WaiterGuard {
    waiters: Arc<Waiters>,
    id: String,
    token: u64,
}

impl Waiters {
    /// Registers a waiter for `id`; the guard removes it again.
    pub(crate) fn register(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<(WaiterGuard, oneshot::Receiver<Message>), RegisterRefused> {
        let mut table = self.lock();
        if table.closed {
            return Err(RegisterRefused::Closed);
        }
        let token = table.next_token;
        let (tx, rx) = oneshot::channel();
        match table.pending.entry(id.to_owned()) {
            Entry::Occupied(_) => return Err(RegisterRefused::Duplicate),
            Entry::Vacant(slot) => {
                slot.insert((token, tx));
            }
        }
        table.next_token += 1;
        let guard = WaiterGuard {
            waiters: Arc::clone(self),
            id: id.to_owned(),
            token,
        };
        Ok((guard, rx))
    }

    /// Hands `resp` to the waiter keyed by `parent_id`, or says why it could not.
    pub(crate) fn deliver(&self, parent_id: &str, resp: Message) -> Delivery {
        let mut table = self.lock();
        let resp = match table.pending.remove(parent_id) {
            // The send fails only if the requester is being dropped right now (its receiver
            // goes before its guard): then it gave up.
            Some((_, tx)) => match tx.send(resp) {
                Ok(()) => return Delivery::Delivered,
                Err(resp) => {
                    table.remember(parent_id, Recent::GaveUp);
                    resp
                }
            },
            None => resp,
        };
        match table.recent.get(parent_id).copied() {
            Some(Recent::GaveUp) => {
                table.remember(parent_id, Recent::LateLogged);
                Delivery::Late { first: true, resp }
            }
            Some(Recent::LateLogged) => Delivery::Late { first: false, resp },
            Some(Recent::OrphanLogged) => Delivery::Orphan { first: false, resp },
            None => {
                table.remember(parent_id, Recent::OrphanLogged);
                Delivery::Orphan { first: true, resp }
            }
        }
    }

    /// Releases every pending wait (their receivers see the sender dropped) and refuses new ones.
    pub(crate) fn close(&self) {
        let mut table = self.lock();
        table.closed = true;
        table.pending.clear();
    }

    /// Number of pending waiters (to check that none leak).
    pub(crate) fn len(&self) -> usize {
        self.lock().pending.len()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // No code path panics while holding the lock; recover the data if one ever did.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Table {
    /// Records what is known about an id without a waiter, evicting the oldest beyond the bound.
    fn remember(&mut self, id: &str, state: Recent) {
        if let Some(known) = self.recent.get_mut(id) {
            *known = state;
            return;
        }
        if self.order.len() == RECENT_IDS {
            if let Some(oldest) = self.order.pop_front() {
                self.recent.remove(&oldest);
            }
        }
        self.recent.insert(id.to_owned(), state);
        self.order.push_back(id.to_owned());
    }
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        let mut table = self.waiters.lock();
        // Only our own entry: after a delivery, a new request may reuse the id.
        let own = matches!(table.pending.get(&self.id), Some((t, _)) if *t == self.token);
        if own {
            // Still registered, so no response came: the requester timed out, failed to
            // enqueue, or was dropped.
            table.pending.remove(&self.id);
            table.remember(&self.id, Recent::GaveUp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(parent: &str) -> Message {
        Message::with_header("r", parent, 0)
    }

    #[test]
    fn response_before_wait_is_kept() {
        let waiters = Arc::new(Waiters::default());
        let (_guard, mut rx) = waiters.register("a").expect("fresh id");
        assert!(matches!(
            waiters.deliver("a", resp("a")),
            Delivery::Delivered
        ));
        assert_eq!(rx.try_recv().expect("kept").header.parent_id, "a");
    }

    #[test]
    fn late_then_orphan_are_told_apart_and_logged_once() {
        let waiters = Arc::new(Waiters::default());
        let (guard, _rx) = waiters.register("a").expect("fresh id");
        drop(guard); // the requester gives up
        assert_eq!(waiters.len(), 0);
        assert!(matches!(
            waiters.deliver("a", resp("a")),
            Delivery::Late { first: true, .. }
        ));
        assert!(matches!(
            waiters.deliver("a", resp("a")),
            Delivery::Late { first: false, .. }
        ));
        assert!(matches!(
            waiters.deliver("b", resp("b")),
            Delivery::Orphan { first: true, .. }
        ));
        assert!(matches!(
            waiters.deliver("b", resp("b")),
            Delivery::Orphan { first: false, .. }
        ));
    }

    #[test]
    fn duplicate_id_is_refused_and_old_guard_spares_new_waiter() {
        let waiters = Arc::new(Waiters::default());
        let (old, _rx) = waiters.register("a").expect("fresh id");
        assert!(matches!(
            waiters.register("a"),
            Err(RegisterRefused::Duplicate)
        ));
        // The old request is answered; a new request reuses the id before the old guard drops.
        assert!(matches!(
            waiters.deliver("a", resp("a")),
            Delivery::Delivered
        ));
        let (_new, _rx2) = waiters.register("a").expect("id free again");
        drop(old);
        assert_eq!(
            waiters.len(),
            1,
            "the old guard must not remove the new waiter"
        );
    }

    #[test]
    fn recent_ids_stay_bounded() {
        let waiters = Arc::new(Waiters::default());
        for i in 0..RECENT_IDS + 10 {
            let _ = waiters.deliver(&i.to_string(), resp("x"));
        }
        let table = waiters.lock();
        assert_eq!(table.recent.len(), RECENT_IDS);
        assert_eq!(table.order.len(), RECENT_IDS);
    }

    #[test]
    fn close_releases_waiters_and_refuses_new_ones() {
        let waiters = Arc::new(Waiters::default());
        let (_guard, mut rx) = waiters.register("a").expect("fresh id");
        waiters.close();
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            waiters.register("b"),
            Err(RegisterRefused::Closed)
        ));
    }
}
