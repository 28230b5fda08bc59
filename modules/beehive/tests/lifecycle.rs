//! Module lifecycle on a real hive: registration rules, disabled modules, shutdown reaching every
//! module and cleanup, failing/panicking/stuck modules not taking the others down, and
//! `run_until` driven by a future the test controls.

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use causeway_beehive::{
    Beehive, GroupSendError, ModuleOutcome, RegisterError, SendError, SimpleModule,
};
use common::{Behaviour, Gated, Tracked, echo, msg, recorder};
use tokio::sync::oneshot;

#[test]
fn registration_rejects_empty_and_duplicate_names() {
    let mut beehive = Beehive::new();
    beehive.register(echo("a", "g"), true).expect("unique");
    beehive.register(echo("b", "g"), false).expect("unique");
    assert!(matches!(
        beehive.register(echo("", "g"), true),
        Err(RegisterError::EmptyName)
    ));
    // Also against a disabled module: a configuration may enable it later.
    assert!(matches!(
        beehive.register(echo("b", "h"), true),
        Err(RegisterError::DuplicateName { ref name }) if name == "b"
    ));
    assert_eq!(beehive.enabled(), ["a"]);
    assert_eq!(beehive.disabled(), ["b"]);
}

#[tokio::test]
async fn disabled_modules_do_not_start_and_are_listed() {
    let on = Tracked::new("on", "g", Behaviour::Serve);
    let off = Tracked::new("off", "g", Behaviour::Serve);
    let mut beehive = Beehive::new();
    beehive.register_arc(on.clone(), true).expect("unique");
    beehive.register_arc(off.clone(), false).expect("unique");
    let hive = beehive.start();

    assert_eq!(hive.modules(), ["on"]);
    assert_eq!(hive.disabled(), ["off"]);
    assert_eq!(hive.bus().modules(), ["on"]);
    assert_eq!(hive.bus().group_members("g"), ["on"]);
    let report = hive.shutdown().await;
    assert_eq!(report.exits.len(), 1);
    assert_eq!((on.starts(), on.cleanups()), (1, 1));
    assert_eq!((off.starts(), off.cleanups()), (0, 0));
}

#[tokio::test]
async fn shutdown_stops_every_module_and_runs_every_cleanup() {
    let modules: Vec<_> = (0..5)
        .map(|i| Tracked::new(&format!("m{i}"), "g", Behaviour::Serve))
        .collect();
    let mut beehive = Beehive::new();
    for m in &modules {
        beehive.register_arc(m.clone(), true).expect("unique");
    }
    let hive = beehive.start();
    hive.bus()
        .send_to_group("g", msg("1"))
        .await
        .expect("all live");

    let report = hive.shutdown().await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.exits.len(), 5);
    for m in &modules {
        assert_eq!((m.starts(), m.cleanups()), (1, 1));
    }
}

#[tokio::test]
async fn failing_and_panicking_modules_do_not_take_others_down() {
    let failing = Tracked::new("failing", "g", Behaviour::Fail);
    let panicking = Tracked::new("panicking", "g", Behaviour::Panic);
    let mut beehive = Beehive::new();
    beehive.register_arc(failing.clone(), true).expect("unique");
    beehive
        .register_arc(panicking.clone(), true)
        .expect("unique");
    beehive.register(echo("echo", "g"), true).expect("unique");
    let hive = beehive.start();

    // Cleanup runs once a module has ended, so after these its inbox is gone.
    failing.cleaned.notified().await;
    panicking.cleaned.notified().await;
    assert!(matches!(
        hive.bus().send("failing", msg("x")).await,
        Err(SendError::Stopped { ref module, .. }) if module == "failing"
    ));
    match hive.bus().send_to_group("g", msg("y")).await {
        Err(GroupSendError::MembersStopped {
            delivered, stopped, ..
        }) => {
            assert_eq!(delivered, 1);
            assert_eq!(stopped, ["failing", "panicking"]);
        }
        other => panic!("expected MembersStopped, got {other:?}"),
    }
    // The survivor still serves.
    let resp = hive
        .bus()
        .send_sync("echo", msg("req"), Duration::from_secs(5))
        .await
        .expect("echo still runs");
    assert_eq!(resp.header.parent_id, "req");

    let report = hive.shutdown().await;
    assert!(!report.is_clean());
    assert!(matches!(
        report.outcome("failing"),
        Some(ModuleOutcome::Failed(_))
    ));
    assert!(matches!(
        report.outcome("panicking"),
        Some(ModuleOutcome::Panicked)
    ));
    assert!(matches!(
        report.outcome("echo"),
        Some(ModuleOutcome::Finished)
    ));
    assert_eq!(failing.cleanups(), 1);
    assert_eq!(panicking.cleanups(), 1);
}

#[tokio::test(start_paused = true)]
async fn module_ignoring_shutdown_is_aborted_after_the_grace_period_and_cleaned_up() {
    let stuck = Tracked::new("stuck", "g", Behaviour::IgnoreShutdown);
    let good = Tracked::new("good", "g", Behaviour::Serve);
    let mut beehive = Beehive::new().shutdown_grace(Duration::from_secs(2));
    beehive.register_arc(stuck.clone(), true).expect("unique");
    beehive.register_arc(good.clone(), true).expect("unique");
    let hive = beehive.start();

    let started = tokio::time::Instant::now();
    let report = hive.shutdown().await;
    assert!(matches!(
        report.outcome("stuck"),
        Some(ModuleOutcome::Aborted)
    ));
    assert!(matches!(
        report.outcome("good"),
        Some(ModuleOutcome::Finished)
    ));
    assert_eq!((stuck.cleanups(), good.cleanups()), (1, 1));
    // Virtual time: shutdown took exactly the grace period.
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}

#[tokio::test]
async fn messages_left_in_an_inbox_at_shutdown_are_counted() {
    let mut beehive = Beehive::new();
    let (gated, _permits, _taken) = Gated::new("idle");
    beehive.register(gated, true).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();
    for i in 0..3 {
        bus.send("idle", msg(&i.to_string())).await.expect("room");
    }
    hive.shutdown().await;
    assert_eq!(bus.stats().undelivered_at_stop, 3);
}

#[tokio::test]
async fn try_recv_drains_the_inbox_after_shutdown() {
    let (done_tx, done_rx) = oneshot::channel();
    let done_tx = std::sync::Mutex::new(Some(done_tx));
    let drainer = SimpleModule::new("drainer", "g", move |mut ctx| {
        let done = done_tx.lock().expect("not poisoned").take();
        async move {
            ctx.shutdown().await;
            let mut drained = 0;
            while ctx.try_recv().is_some() {
                drained += 1;
            }
            if let Some(done) = done {
                let _ = done.send(drained);
            }
            Ok(())
        }
    });
    let mut beehive = Beehive::new();
    beehive.register(drainer, true).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();
    for i in 0..3 {
        bus.send("drainer", msg(&i.to_string()))
            .await
            .expect("room");
    }
    assert!(hive.shutdown().await.is_clean());
    assert_eq!(done_rx.await.expect("module reported"), 3);
    assert_eq!(bus.stats().undelivered_at_stop, 0);
}

#[tokio::test]
async fn run_until_returns_when_the_stop_future_completes() {
    let served = Tracked::new("served", "g", Behaviour::Serve);
    let mut beehive = Beehive::new().inbox_capacity(NonZeroUsize::MIN);
    beehive.register_arc(served.clone(), true).expect("unique");
    let (rec, mut rec_rx) = recorder("rec", "h");
    beehive.register(rec, true).expect("unique");
    let hive = beehive.start();
    let bus = hive.bus().clone();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();

    let run = tokio::spawn(hive.run_until(async {
        let _ = stop_rx.await;
    }));
    // The hive serves while running.
    bus.send("rec", msg("1")).await.expect("running");
    assert_eq!(rec_rx.recv().await.expect("delivered").header.id, "1");
    stop_tx.send(()).expect("hive waits");
    let report = run.await.expect("no panic");
    assert!(report.is_clean());
    assert_eq!(served.cleanups(), 1);
}

#[tokio::test]
async fn a_module_can_stop_the_whole_hive() {
    let stopper = Tracked::new("stopper", "g", Behaviour::StopHive);
    let other = Tracked::new("other", "g", Behaviour::Serve);
    let mut beehive = Beehive::new();
    beehive.register_arc(stopper.clone(), true).expect("unique");
    beehive.register_arc(other.clone(), true).expect("unique");
    let hive = beehive.start();
    let report = hive.run_until(std::future::pending()).await;
    assert!(report.is_clean());
    assert_eq!((stopper.cleanups(), other.cleanups()), (1, 1));
}

#[tokio::test]
async fn dropping_the_hive_triggers_shutdown() {
    let module = Tracked::new("m", "g", Behaviour::Serve);
    let mut beehive = Beehive::new();
    beehive.register_arc(module.clone(), true).expect("unique");
    let hive = beehive.start();
    let signal = hive.shutdown_signal();
    drop(hive);
    assert!(signal.is_triggered());
    module.cleaned.notified().await;
    assert_eq!(module.cleanups(), 1);
}
