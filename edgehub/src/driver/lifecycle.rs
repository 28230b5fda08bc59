//! Around the driver's loop: start-up (the outbox opened, the session seeded, the delivery
//! task spawned) and shutdown (the link closed, what modules still had queued stored in the
//! outbox, the connections' closes awaited, bounded).

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tracing::{error, info};

use beehive::ModuleContext;
use session::edge::{EdgeSession, Event};

use super::{Driver, now};
use crate::config::EdgeHubConfig;
use crate::deliver::Deliveries;
use crate::outbox::{OpenError, Outbox};
use crate::pump::OutboxPump;
use crate::stats::Counters;

/// Messages from a connection's reader and writer, and dial outcomes, to the driver.
const INBOUND_CAPACITY: usize = 256;

/// Runs EdgeHub until shutdown. `reconnect` forces a reconnect (certificate renewal).
pub(crate) async fn run(
    config: EdgeHubConfig,
    mut ctx: ModuleContext,
    counters: Arc<Counters>,
    reconnect: Arc<Notify>,
) -> Result<(), OpenError> {
    let outbox = Outbox::open(config.outbox_config())?;
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let session = EdgeSession::with_seed(config.session_config(), now(), seed);
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
    let (deliveries, delivery_task, refusals) =
        Deliveries::spawn(ctx.bus().clone(), counters.clone());
    info!(
        node = %config.controller.node_id,
        protocol = %config.controller.protocol,
        server = config.endpoint().server.as_str(),
        outbox_messages = outbox.usage().messages,
        "edgehub starting"
    );
    let choice = config.protocol_choice();
    let link_protocol = config.controller.protocol;
    counters.set_protocol(link_protocol, false);
    let mut driver = Driver {
        choice,
        link_protocol,
        probing: None,
        ready: None,
        config,
        session,
        pump: OutboxPump::new(outbox),
        counters,
        inbound_tx,
        deliveries,
        link: None,
        closing: Vec::new(),
        dialing: None,
        writer_blocked: false,
    };
    driver.run(&mut ctx, inbound_rx, refusals, &reconnect).await;
    driver.stop(&mut ctx).await;
    drop(driver);
    // The delivery task ends once the driver's sender is gone and its queue is drained; bound
    // the wait, since modules are stopping too.
    let _ = tokio::time::timeout(Duration::from_secs(2), delivery_task).await;
    Ok(())
}

impl Driver {
    /// Ends the session at shutdown: close the link, keep what modules still had queued.
    pub(super) async fn stop(&mut self, ctx: &mut ModuleContext) {
        self.session.handle_event(now(), Event::Shutdown);
        while let Some(msg) = ctx.try_recv() {
            self.pump.take(msg);
        }
        self.pump
            .store(&mut self.session, ctx.bus(), &self.counters);
        if self.pump.unstored() > 0 {
            error!(
                lost = self.pump.unstored(),
                "shutting down with module messages the full outbox could not take"
            );
        }
        self.turn(ctx);
        if let Some(dial) = self.dialing.take() {
            dial.abort();
        }
        if let Some(probe) = self.probing.take() {
            probe.abort();
        }
        if let Some((_, conn)) = self.ready.take() {
            self.close_unused(conn, "shutting down");
        }
        let closers = std::mem::take(&mut self.closing);
        // Within the hive's shutdown grace: a close the cloud does not confirm by then is
        // abandoned (dropping the connection aborts it).
        let bound = self.write_deadline().min(Duration::from_secs(5));
        for closer in closers {
            let _ = tokio::time::timeout(bound, closer).await;
        }
        info!("edgehub stopped");
    }
}
