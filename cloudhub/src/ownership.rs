//! Node ownership across cloudcore instances (scale-out mode): which instance holds a node's
//! session, as a lease in a JetStream key-value bucket that the owner renews.
//!
//! This module is the decision logic alone, sans-IO: it reads the lease it is shown and the
//! time it is handed and says what to write; the caller does the compare-and-set on the bucket
//! (a write conditioned on the revision it read, so two instances cannot both win a race) and
//! acts on the answer. Rules:
//! - **Newest session wins across instances**, as it does inside one: a claim by a session that
//!   started later than the lease's takes the node over, whoever holds it; an older session's
//!   claim is refused (a late reconnect must not steal a node back). Equal start times are
//!   broken by instance id so every instance decides the same way.
//! - **A lease expires** `ttl` after its last renewal; an expired lease belongs to nobody, so a
//!   crashed instance's nodes are adopted by whichever instance they reconnect to.
//! - **The owner renews** a third of the way into the lease and **steps down** (closes the
//!   node's session) as soon as a renewal finds another session's lease, or its own expired
//!   (it may have been adopted meanwhile: the new owner's session is the live one).
//!
//! Clocks: `now` is wall-clock Unix milliseconds; instances' clocks must agree to well within
//! the lease ttl (NTP), which is why the default ttl is seconds, not milliseconds.

use serde::{Deserialize, Serialize};

/// A node's lease: the value stored under the node's key in the ownership bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The owning instance's id (`cloudhub.scaleOut.instance`).
    pub instance: String,
    /// When the owning session started, Unix milliseconds: orders sessions across instances.
    pub session_started_ms: i64,
    /// The lease ends here unless renewed, Unix milliseconds.
    pub expires_ms: i64,
}

/// One instance's view of the lease rules.
#[derive(Debug, Clone)]
pub struct Leases {
    instance: String,
    ttl_ms: i64,
}

/// What a claim decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Write this lease (conditioned on the revision read): the session owns the node.
    Take(Lease),
    /// A newer session holds a live lease on `instance`: close this one.
    Refuse {
        /// The instance that keeps the node.
        instance: String,
    },
}

/// What a renewal decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Write this lease (conditioned on the revision read).
    Renew(Lease),
    /// The node is no longer this session's: close the session.
    Lost,
}

impl Leases {
    /// The rules for instance `instance` with leases of `ttl_ms` milliseconds.
    pub fn new(instance: impl Into<String>, ttl_ms: i64) -> Self {
        Self {
            instance: instance.into(),
            ttl_ms: ttl_ms.max(1),
        }
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// A session of this instance that started at `session_started_ms` claims a node whose
    /// stored lease is `current` (`None`: never owned, or deleted).
    pub fn claim(&self, current: Option<&Lease>, session_started_ms: i64, now_ms: i64) -> Claim {
        let mine = Lease {
            instance: self.instance.clone(),
            session_started_ms,
            expires_ms: now_ms.saturating_add(self.ttl_ms),
        };
        match current {
            Some(held) if is_live(held, now_ms) && newer(held, &mine) => Claim::Refuse {
                instance: held.instance.clone(),
            },
            _ => Claim::Take(mine),
        }
    }

    /// The session of this instance that started at `session_started_ms` renews its lease,
    /// which the bucket now holds as `current`.
    pub fn renew(&self, current: Option<&Lease>, session_started_ms: i64, now_ms: i64) -> Renewal {
        match current {
            Some(held)
                if held.instance == self.instance
                    && held.session_started_ms == session_started_ms
                    && is_live(held, now_ms) =>
            {
                Renewal::Renew(Lease {
                    expires_ms: now_ms.saturating_add(self.ttl_ms),
                    ..held.clone()
                })
            }
            _ => Renewal::Lost,
        }
    }

    /// When the owner should renew `lease`: a third of the way into it, so two renewals may
    /// fail before it lapses.
    pub fn renew_at(&self, lease: &Lease) -> i64 {
        lease.expires_ms.saturating_sub(self.ttl_ms * 2 / 3)
    }
}

/// The instance that owns the node under `lease` at `now_ms` (`None`: nobody; it is free to be
/// adopted).
pub fn owner(lease: Option<&Lease>, now_ms: i64) -> Option<&str> {
    lease
        .filter(|l| is_live(l, now_ms))
        .map(|l| l.instance.as_str())
}

fn is_live(lease: &Lease, now_ms: i64) -> bool {
    now_ms < lease.expires_ms
}

/// Whether `a`'s session is newer than `b`'s (later start; instance id breaks a tie).
fn newer(a: &Lease, b: &Lease) -> bool {
    (a.session_started_ms, &a.instance) > (b.session_started_ms, &b.instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: i64 = 9_000;

    fn lease(instance: &str, started: i64, expires: i64) -> Lease {
        Lease {
            instance: instance.into(),
            session_started_ms: started,
            expires_ms: expires,
        }
    }

    #[test]
    fn a_free_node_is_taken_for_one_ttl() {
        let a = Leases::new("a", TTL);
        assert_eq!(
            a.claim(None, 100, 1_000),
            Claim::Take(lease("a", 100, 10_000))
        );
        assert_eq!(owner(Some(&lease("a", 100, 10_000)), 9_999), Some("a"));
        assert_eq!(owner(Some(&lease("a", 100, 10_000)), 10_000), None);
        assert_eq!(owner(None, 0), None);
    }

    #[test]
    fn the_newest_session_wins_across_instances() {
        let a = Leases::new("a", TTL);
        let b = Leases::new("b", TTL);
        let held_by_a = lease("a", 100, 10_000);
        // The node reconnected to b later: b takes over a live lease.
        assert_eq!(
            b.claim(Some(&held_by_a), 200, 1_000),
            Claim::Take(lease("b", 200, 10_000))
        );
        // A stale claim from a's older session is refused while b's lease lives.
        let held_by_b = lease("b", 200, 10_000);
        assert_eq!(
            a.claim(Some(&held_by_b), 150, 1_500),
            Claim::Refuse {
                instance: "b".into()
            }
        );
        // And a's renewal finds b's lease: a steps down.
        assert_eq!(a.renew(Some(&held_by_b), 100, 3_000), Renewal::Lost);
    }

    #[test]
    fn equal_start_times_are_broken_by_instance_id_the_same_way_everywhere() {
        let a = Leases::new("a", TTL);
        let b = Leases::new("b", TTL);
        assert_eq!(
            a.claim(Some(&lease("b", 100, 10_000)), 100, 1_000),
            Claim::Refuse {
                instance: "b".into()
            }
        );
        assert!(matches!(
            b.claim(Some(&lease("a", 100, 10_000)), 100, 1_000),
            Claim::Take(_)
        ));
    }

    #[test]
    fn a_crashed_instances_expired_lease_is_adopted_even_by_an_older_session() {
        let b = Leases::new("b", TTL);
        let crashed = lease("a", 500, 10_000);
        assert_eq!(
            b.claim(Some(&crashed), 400, 10_000),
            Claim::Take(lease("b", 400, 19_000))
        );
    }

    #[test]
    fn the_owner_renews_until_its_lease_lapses_or_is_replaced() {
        let a = Leases::new("a", TTL);
        let held = lease("a", 100, 10_000);
        assert_eq!(a.renew_at(&held), 4_000);
        assert_eq!(
            a.renew(Some(&held), 100, 4_000),
            Renewal::Renew(lease("a", 100, 13_000))
        );
        // Its own lease, but expired: another instance may have adopted the node meanwhile.
        assert_eq!(a.renew(Some(&held), 100, 10_000), Renewal::Lost);
        // A newer session of the same instance replaced it (newest wins inside one too).
        assert_eq!(
            a.renew(Some(&lease("a", 300, 12_000)), 100, 5_000),
            Renewal::Lost
        );
        // The lease was deleted.
        assert_eq!(a.renew(None, 100, 5_000), Renewal::Lost);
    }
}
