//! Handing cloud messages and connection events to the bus: a queue in the driver and one task
//! that delivers in order, waiting while a module's inbox is full (the driver stops reading the
//! connection meanwhile, so the cloud is throttled instead of messages dropped). A cloud message
//! the bus cannot take at all (no such module or group) comes back to the driver as a
//! [`Refusal`], which the session answers with an error so the cloud stops resending it.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

use beehive::{Bus, GroupSendError};
use proto::Message;
use session::edge::route::{self, Destination};

use crate::stats::{Counters, bump};

/// Cloud messages queued for the delivery task.
const DELIVERY_CAPACITY: usize = 1024;
/// Refusals queued for the driver, which reads them whatever else it waits for.
const REFUSAL_CAPACITY: usize = 64;

/// A cloud message the bus could not take (no such module, no member of the group): the driver
/// hands it to [`session::edge::EdgeSession::refuse`].
pub(crate) struct Refusal {
    /// The message.
    pub(crate) message: Message,
    /// Why, as the error answer's text.
    pub(crate) reason: String,
}

/// A cloud message or connection event for the bus.
pub(crate) enum Delivery {
    /// A connection event for every module of `group`.
    Publish {
        group: &'static str,
        message: Message,
    },
    /// A cloud message for `destination`.
    Deliver {
        destination: Destination,
        message: Message,
    },
}

/// The driver's end: deliveries waiting for room in the task's queue.
pub(crate) struct Deliveries {
    waiting: VecDeque<Delivery>,
    tx: mpsc::Sender<Delivery>,
    counters: Arc<Counters>,
}

/// A permit for one delivery, or the news that the delivery task is gone.
pub(crate) type Room = Result<mpsc::OwnedPermit<Delivery>, mpsc::error::SendError<()>>;

impl Deliveries {
    /// Starts the delivery task on `bus`; it ends once the returned queue is dropped and drained.
    /// The receiver yields the messages the bus refused.
    pub(crate) fn spawn(
        bus: Bus,
        counters: Arc<Counters>,
    ) -> (Self, JoinHandle<()>, mpsc::Receiver<Refusal>) {
        let (tx, rx) = mpsc::channel(DELIVERY_CAPACITY);
        let (refusals_tx, refusals) = mpsc::channel(REFUSAL_CAPACITY);
        let task = tokio::spawn(deliver_loop(bus, rx, counters.clone(), refusals_tx));
        let queue = Self {
            waiting: VecDeque::new(),
            tx,
            counters,
        };
        (queue, task, refusals)
    }

    /// Queues a delivery; [`Deliveries::flush`] hands it over.
    pub(crate) fn push(&mut self, delivery: Delivery) {
        self.waiting.push_back(delivery);
    }

    /// Hands over what the task's queue has room for, in order.
    pub(crate) fn flush(&mut self) {
        while let Some(delivery) = self.waiting.pop_front() {
            match self.tx.try_send(delivery) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d)) => {
                    self.waiting.push_front(d);
                    return;
                }
            }
        }
    }

    /// Whether deliveries wait for room (then the driver reads nothing more from the cloud).
    pub(crate) fn is_blocked(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Resolves once the task's queue has room for one delivery.
    pub(crate) fn room(&self) -> impl Future<Output = Room> + 'static {
        self.tx.clone().reserve_owned()
    }

    /// Hands over the oldest waiting delivery with the room [`Deliveries::room`] found.
    pub(crate) fn send(&mut self, room: Room) {
        match room {
            Ok(permit) => {
                if let Some(d) = self.waiting.pop_front() {
                    permit.send(d);
                }
            }
            Err(_) => {
                // The delivery task is gone (it only ends when it panicked): these messages
                // cannot reach the bus; say so rather than spin.
                let lost = self.waiting.len();
                bump(&self.counters.downstream_undeliverable, lost as u64);
                error!(lost, "bus delivery task ended");
                self.waiting.clear();
            }
        }
    }
}

/// Hands cloud messages and connection events to the bus, in order, waiting while a module's
/// inbox is full.
async fn deliver_loop(
    bus: Bus,
    mut rx: mpsc::Receiver<Delivery>,
    counters: Arc<Counters>,
    refusals: mpsc::Sender<Refusal>,
) {
    while let Some(delivery) = rx.recv().await {
        match delivery {
            Delivery::Publish { group, message } => {
                if let Err(e) = bus.send_to_group(group, message).await {
                    // Most edges run only some of KubeEdge's modules; an empty group is normal.
                    debug!(group, error = %e, "connection event not delivered");
                }
            }
            Delivery::Deliver {
                destination,
                message,
            } => {
                if let Some(refusal) = deliver(&bus, destination, message, &counters).await {
                    // The driver reads refusals unconditionally, so this wait is short; if it
                    // has gone, so has the connection the answer was for.
                    let _ = refusals.send(refusal).await;
                }
            }
        }
    }
}

/// Delivers one cloud message; a message that is not a response and that no module could take
/// comes back as a [`Refusal`] (a response nobody waits for needs no answer).
async fn deliver(
    bus: &Bus,
    destination: Destination,
    message: Message,
    counters: &Counters,
) -> Option<Refusal> {
    let id = message.header.id.clone();
    let answerable = (!message.is_response() && !id.is_empty()).then(|| message.clone());
    let result = match destination {
        Destination::Response => match bus.send_resp(message).into_undelivered() {
            None => Ok(()),
            // Nobody waits for it (any more): route it as an ordinary message.
            Some(message) => match route::route_without_waiter(&message) {
                Some(Destination::Group(group)) => group_send(bus, group, message).await,
                Some(Destination::Module(module)) => {
                    bus.send(module, message).await.map_err(|e| e.to_string())
                }
                _ => Err("a response nobody waits for".to_owned()),
            },
        },
        Destination::Group(group) => group_send(bus, group, message).await,
        Destination::Module(module) => bus.send(module, message).await.map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => {
            bump(&counters.downstream_delivered, 1);
            None
        }
        Err(reason) => {
            bump(&counters.downstream_undeliverable, 1);
            warn!(
                id,
                ?destination,
                reason,
                "cloud message not delivered; answered with an error"
            );
            answerable.map(|message| Refusal { message, reason })
        }
    }
}

async fn group_send(bus: &Bus, group: &str, message: Message) -> Result<(), String> {
    match bus.send_to_group(group, message).await {
        Ok(_) => Ok(()),
        Err(e @ GroupSendError::MembersStopped { delivered, .. }) if delivered > 0 => {
            debug!(error = %e, "some group members have stopped");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}
