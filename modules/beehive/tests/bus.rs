//! Bus behaviour on a real started hive: unicast, typed errors for unknown names, group fan-out
//! order, back-pressure, sync request/response (happy path, early response, timeouts, late and
//! orphan responses, waiter cleanup).

mod common;

use std::num::NonZeroUsize;
use std::pin::pin;
use std::time::Duration;

use causeway_beehive::{Beehive, GroupSendError, RespOutcome, SendError, SyncError};
use common::{Gated, echo, msg, poll_once, recorder};
use proto::{Content, Message};
use tokio::task::JoinSet;

fn capacity(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("non-zero")
}

#[tokio::test]
async fn unicast_reaches_the_named_module_only() {
    let mut beehive = Beehive::new();
    let (a, mut a_rx) = recorder("a", "g");
    let (b, mut b_rx) = recorder("b", "g");
    beehive.register(a, true).expect("unique");
    beehive.register(b, true).expect("unique");
    let hive = beehive.start();

    hive.bus().send("a", msg("1")).await.expect("a exists");
    hive.bus().send("b", msg("2")).await.expect("b exists");
    assert_eq!(a_rx.recv().await.expect("delivered").header.id, "1");
    assert_eq!(b_rx.recv().await.expect("delivered").header.id, "2");
    assert_eq!(hive.bus().stats().enqueued, 2);

    assert!(hive.shutdown().await.is_clean());
    assert!(a_rx.try_recv().is_err(), "a got only its own message");
    assert!(b_rx.try_recv().is_err(), "b got only its own message");
}

#[tokio::test]
async fn unknown_module_and_group_are_typed_errors_that_return_the_message() {
    let mut beehive = Beehive::new();
    let (a, _a_rx) = recorder("a", "g");
    let (off, _off_rx) = recorder("off", "offgroup");
    beehive.register(a, true).expect("unique");
    beehive.register(off, false).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();

    match bus.send("nobody", msg("1")).await {
        Err(SendError::UnknownModule { module, msg }) => {
            assert_eq!(module, "nobody");
            assert_eq!(msg.header.id, "1");
        }
        other => panic!("expected UnknownModule, got {other:?}"),
    }
    // A disabled module has no inbox, and a group of only disabled modules does not exist.
    assert!(matches!(
        bus.send("off", msg("2")).await,
        Err(SendError::UnknownModule { .. })
    ));
    match bus.send_to_group("offgroup", msg("3")).await {
        Err(GroupSendError::UnknownGroup { group, msg }) => {
            assert_eq!(group, "offgroup");
            assert_eq!(msg.header.id, "3");
        }
        other => panic!("expected UnknownGroup, got {other:?}"),
    }
    assert!(matches!(
        bus.send_sync("nobody", msg("4"), Duration::from_secs(1))
            .await,
        Err(SyncError::UnknownModule { .. })
    ));
    assert_eq!(bus.stats().enqueued, 0);
    hive.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_send_keeps_each_members_order_under_back_pressure() {
    const N: usize = 3000;
    // Small inboxes force the sender to wait on members again and again.
    let mut beehive = Beehive::new().inbox_capacity(capacity(4));
    let mut outs = Vec::new();
    for name in ["m1", "m2", "m3"] {
        let (m, rx) = recorder(name, "fan");
        beehive.register(m, true).expect("unique");
        outs.push(rx);
    }
    let (other, mut other_rx) = recorder("other", "elsewhere");
    beehive.register(other, true).expect("unique");
    let hive = beehive.start();
    assert_eq!(hive.bus().group_members("fan"), ["m1", "m2", "m3"]);

    let bus = hive.bus().clone();
    let sender = tokio::spawn(async move {
        for i in 0..N {
            let delivered = bus
                .send_to_group("fan", msg(&i.to_string()))
                .await
                .expect("all members live");
            assert_eq!(delivered, 3);
        }
    });
    for rx in &mut outs {
        for i in 0..N {
            let got = rx.recv().await.expect("member alive");
            assert_eq!(
                got.header.id,
                i.to_string(),
                "member saw messages out of order"
            );
        }
    }
    sender.await.expect("sender finished");
    assert_eq!(hive.bus().stats().enqueued, 3 * N as u64);
    hive.shutdown().await;
    assert!(other_rx.try_recv().is_err(), "non-members get nothing");
}

#[tokio::test]
async fn full_inbox_makes_send_wait_then_everything_arrives_in_order() {
    const N: usize = 500;
    let mut beehive = Beehive::new().inbox_capacity(capacity(4));
    let (gated, permits, mut taken) = Gated::new("slow");
    beehive.register(gated, true).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();

    for i in 0..4 {
        bus.send("slow", msg(&i.to_string())).await.expect("room");
    }
    let mut fifth = pin!(bus.send("slow", msg("4")));
    assert!(
        poll_once(fifth.as_mut()).is_pending(),
        "a full inbox must make send wait"
    );
    assert!(
        poll_once(fifth.as_mut()).is_pending(),
        "and keep waiting, not drop"
    );

    permits.send(N).expect("module alive");
    fifth.await.expect("room after draining");
    for i in 5..N {
        bus.send("slow", msg(&i.to_string()))
            .await
            .expect("module alive");
    }
    for i in 0..N {
        assert_eq!(taken.recv().await.expect("taken").header.id, i.to_string());
    }
    assert_eq!(bus.stats().enqueued, N as u64);
    let stats = hive.shutdown().await;
    assert!(stats.is_clean());
}

#[tokio::test]
async fn send_sync_returns_the_response_and_leaves_no_waiter() {
    let mut beehive = Beehive::new();
    beehive
        .register(echo("echo", "test"), true)
        .expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();

    let req = msg("req-1");
    let resp = bus
        .send_sync("echo", req, Duration::from_secs(5))
        .await
        .expect("echo answers");
    assert_eq!(resp.header.parent_id, "req-1");
    assert_eq!(resp.content.as_text(), Some("OK"));
    assert_eq!(bus.pending_sync(), 0);
    let stats = bus.stats();
    assert_eq!((stats.sync_requests, stats.responses_delivered), (1, 1));
    hive.shutdown().await;
}

#[tokio::test]
async fn send_sync_marks_the_request_sync() {
    let mut beehive = Beehive::new();
    let (gated, permits, mut taken) = Gated::new("peer");
    beehive.register(gated, true).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();

    let mut call = pin!(bus.send_sync("peer", msg("req-1"), Duration::from_secs(5)));
    assert!(poll_once(call.as_mut()).is_pending());
    permits.send(1).expect("module alive");
    let req = taken.recv().await.expect("request delivered");
    assert!(req.header.sync);
    let outcome = bus.send_resp(Message::response_to(&req, Content::text("done")));
    assert!(outcome.is_delivered(), "requester waits: {outcome:?}");
    assert_eq!(
        call.await.expect("answered").content.as_text(),
        Some("done")
    );
    hive.shutdown().await;
}

#[tokio::test]
async fn response_arriving_before_the_request_is_even_enqueued_is_kept() {
    let mut beehive = Beehive::new().inbox_capacity(capacity(1));
    let (gated, permits, mut taken) = Gated::new("peer");
    beehive.register(gated, true).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();

    bus.send("peer", msg("filler")).await.expect("room for one");
    let mut call = pin!(bus.send_sync("peer", msg("req-1"), Duration::from_secs(5)));
    // First poll registers the waiter, then waits for inbox room: the request is not sent yet.
    assert!(poll_once(call.as_mut()).is_pending());
    assert_eq!(bus.pending_sync(), 1);

    // The answer comes first (KubeEdge discarded it: its waiter was not "ready").
    let early = Message::response_to(&msg("req-1"), Content::text("early"));
    let outcome = bus.send_resp(early);
    assert!(
        outcome.is_delivered(),
        "waiter registered before send: {outcome:?}"
    );

    permits.send(2).expect("module alive");
    let resp = call.await.expect("early response kept");
    assert_eq!(resp.content.as_text(), Some("early"));
    assert_eq!(taken.recv().await.expect("filler").header.id, "filler");
    assert_eq!(taken.recv().await.expect("request").header.id, "req-1");
    assert_eq!(bus.pending_sync(), 0);
    hive.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn response_arriving_while_the_request_never_fits_is_still_returned() {
    let mut beehive = Beehive::new().inbox_capacity(capacity(1));
    let (gated, _permits, _taken) = Gated::new("stuck");
    beehive.register(gated, true).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();

    bus.send("stuck", msg("filler"))
        .await
        .expect("room for one");
    let mut call = pin!(bus.send_sync("stuck", msg("req-1"), Duration::from_secs(1)));
    assert!(poll_once(call.as_mut()).is_pending());
    let answer = Message::response_to(&msg("req-1"), Content::text("answered"));
    assert!(bus.send_resp(answer).is_delivered());
    // The inbox never drains, so the enqueue times out; the answer is returned, not lost.
    let resp = call.await.expect("answered before the deadline");
    assert_eq!(resp.content.as_text(), Some("answered"));
    assert_eq!(bus.pending_sync(), 0);
    hive.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn response_after_timeout_is_counted_late_and_handed_back() {
    let mut beehive = Beehive::new();
    let (silent, mut requests) = recorder("silent", "test");
    beehive.register(silent, true).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();

    let err = bus
        .send_sync("silent", msg("req-1"), Duration::from_secs(3))
        .await
        .expect_err("nobody answers");
    assert!(matches!(err, SyncError::ResponseTimeout { ref module, .. } if module == "silent"));
    assert_eq!(bus.pending_sync(), 0);

    let req = requests.recv().await.expect("request delivered");
    for _ in 0..2 {
        let late = Message::response_to(&req, Content::text("too late"));
        match bus.send_resp(late) {
            RespOutcome::Late { parent_id, resp } => {
                assert_eq!(parent_id, "req-1");
                assert_eq!(resp.content.as_text(), Some("too late"));
            }
            other => panic!("expected Late, got {other:?}"),
        }
    }
    let orphan = Message::response_to(&msg("never-sent"), Content::text("?"));
    assert!(matches!(
        bus.send_resp(orphan),
        RespOutcome::NoWaiter { ref parent_id, .. } if parent_id == "never-sent"
    ));
    assert!(matches!(
        bus.send_resp(msg("not-a-response")),
        RespOutcome::NotAResponse { .. }
    ));
    let stats = bus.stats();
    assert_eq!(stats.sync_timeouts, 1);
    assert_eq!(stats.late_responses, 2);
    assert_eq!(stats.orphan_responses, 1);
    assert_eq!(stats.responses_delivered, 0);
    hive.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn waiters_are_removed_on_every_exit_path() {
    let mut beehive = Beehive::new().inbox_capacity(capacity(200));
    let (silent, _requests) = recorder("silent", "test");
    let (full, _permits, _taken) = Gated::new("full");
    beehive.register(silent, true).expect("unique");
    beehive.register(full, true).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();

    // Many concurrent requests that all time out waiting for a response.
    let mut calls = JoinSet::new();
    for i in 0..100 {
        let bus = bus.clone();
        calls.spawn(async move {
            bus.send_sync("silent", msg(&format!("t{i}")), Duration::from_secs(1))
                .await
        });
    }
    while let Some(done) = calls.join_next().await {
        let res = done.expect("no panic");
        assert!(matches!(res, Err(SyncError::ResponseTimeout { .. })));
    }
    assert_eq!(bus.pending_sync(), 0);

    // The request never fits into a full inbox: the deadline also bounds the enqueue.
    for i in 0..200 {
        bus.send("full", msg(&format!("f{i}"))).await.expect("room");
    }
    let err = bus
        .send_sync("full", msg("blocked"), Duration::from_secs(1))
        .await
        .expect_err("inbox stays full");
    assert!(matches!(err, SyncError::SendTimeout { .. }));
    assert_eq!(bus.pending_sync(), 0);

    // The caller drops the wait.
    {
        let mut call = pin!(bus.send_sync("silent", msg("dropped"), Duration::from_secs(1)));
        assert!(poll_once(call.as_mut()).is_pending());
        assert_eq!(bus.pending_sync(), 1);
    }
    assert_eq!(bus.pending_sync(), 0);

    // Refused requests register nothing.
    assert!(matches!(
        bus.send_sync(
            "silent",
            Message::with_header("", "", 0),
            Duration::from_secs(1)
        )
        .await,
        Err(SyncError::MissingId)
    ));
    let mut first = pin!(bus.send_sync("silent", msg("dup"), Duration::from_secs(1)));
    assert!(poll_once(first.as_mut()).is_pending());
    assert!(matches!(
        bus.send_sync("silent", msg("dup"), Duration::from_secs(1)).await,
        Err(SyncError::DuplicateId { ref id }) if id == "dup"
    ));
    assert!(matches!(
        first.await,
        Err(SyncError::ResponseTimeout { .. })
    ));
    assert_eq!(bus.pending_sync(), 0);
    assert_eq!(bus.stats().sync_timeouts, 102);
    hive.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn zero_timeout_means_thirty_seconds() {
    let mut beehive = Beehive::new();
    let (silent, _requests) = recorder("silent", "test");
    beehive.register(silent, true).expect("unique");
    let hive = beehive.start();

    let started = tokio::time::Instant::now();
    let err = hive
        .bus()
        .send_sync("silent", msg("r"), Duration::ZERO)
        .await
        .expect_err("nobody answers");
    assert!(
        matches!(err, SyncError::ResponseTimeout { timeout, .. } if timeout == Duration::from_secs(30))
    );
    // Virtual time: the clock advanced exactly to the deadline.
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    hive.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_pending_sync_waits() {
    let mut beehive = Beehive::new();
    let (silent, _requests) = recorder("silent", "test");
    beehive.register(silent, true).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();

    let mut call = pin!(bus.send_sync("silent", msg("r"), Duration::from_secs(3600)));
    assert!(poll_once(call.as_mut()).is_pending());
    hive.shutdown().await;
    assert!(matches!(call.await, Err(SyncError::ShuttingDown)));
    assert!(matches!(
        bus.send_sync("silent", msg("r2"), Duration::from_secs(1))
            .await,
        Err(SyncError::ShuttingDown)
    ));
    assert_eq!(bus.pending_sync(), 0);
}
