//! A FIFO channel bounded by bytes rather than by item count, between a connection's handles and
//! its I/O tasks. Messages range from 100 bytes to 32 MiB, so a count bound is either uselessly
//! large or starves throughput; a byte budget bounds memory whatever the mix (a message larger than
//! the whole budget takes all of it, so it still passes, alone).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Sending half; cheap to clone.
#[derive(Debug)]
pub(crate) struct ByteSender<T> {
    tx: mpsc::UnboundedSender<(T, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    capacity: u32,
}

impl<T> Clone for ByteSender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            budget: self.budget.clone(),
            capacity: self.capacity,
        }
    }
}

/// Receiving half. Dropping it closes the channel and wakes every waiting sender.
#[derive(Debug)]
pub(crate) struct ByteReceiver<T> {
    rx: mpsc::UnboundedReceiver<(T, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
}

/// The channel is closed: the other half is gone.
#[derive(Debug)]
pub(crate) struct Closed;

/// A channel holding at most `capacity` bytes of items (at least 1).
pub(crate) fn byte_channel<T>(capacity: usize) -> (ByteSender<T>, ByteReceiver<T>) {
    let capacity = u32::try_from(capacity.max(1)).unwrap_or(u32::MAX);
    let budget = Arc::new(Semaphore::new(capacity as usize));
    let (tx, rx) = mpsc::unbounded_channel();
    (
        ByteSender {
            tx,
            budget: budget.clone(),
            capacity,
        },
        ByteReceiver { rx, budget },
    )
}

impl<T> ByteSender<T> {
    /// Waits until `weight` bytes (capped at the capacity) are free, then queues `item`. Items
    /// from one caller keep their order; the semaphore is FIFO, so a large item is not starved.
    pub(crate) async fn send(&self, item: T, weight: usize) -> Result<(), Closed> {
        let permits = u32::try_from(weight)
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity);
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Closed)?;
        self.tx.send((item, permit)).map_err(|_| Closed)
    }
}

impl<T> ByteReceiver<T> {
    /// The next item, releasing its bytes; `None` once every sender is gone and the queue is empty.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await.map(|(item, _permit)| item)
    }

    /// The next item if one is queued now.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        self.rx.try_recv().ok().map(|(item, _permit)| item)
    }
}

impl<T> Drop for ByteReceiver<T> {
    fn drop(&mut self) {
        self.budget.close();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn senders_wait_for_budget_and_order_is_kept() {
        let (tx, mut rx) = byte_channel::<u32>(10);
        tx.send(1, 6).await.unwrap();
        tx.send(2, 4).await.unwrap();
        // The budget is spent: a third item must wait until one is taken.
        assert!(tx.send(3, 1).now_or_never().is_none());
        assert_eq!(rx.recv().await, Some(1));
        tx.send(3, 1).await.unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
    }

    #[tokio::test]
    async fn oversized_item_takes_the_whole_budget_and_passes() {
        let (tx, mut rx) = byte_channel::<&str>(4);
        tx.send("big", 1_000_000).await.unwrap();
        assert_eq!(rx.try_recv(), Some("big"));
    }

    #[tokio::test]
    async fn dropping_the_receiver_wakes_waiting_senders() {
        let (tx, rx) = byte_channel::<u8>(1);
        tx.send(0, 1).await.unwrap();
        let waiter = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(1, 1).await }
        });
        drop(rx);
        assert!(waiter.await.unwrap().is_err());
        assert!(tx.send(2, 1).await.is_err());
    }
}
