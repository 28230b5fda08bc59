//! The cloud's end of servicebus (KubeEdge's router, rule `rest` → `servicebus`; MODULES.md
//! §4.1): [`Hub::proxy`] sends a node the request to call one of its local HTTP services and
//! waits for the answer, which the node's driver hands over by parent id ([`Replies`]).
//!
//! A call is never queued for later: a node without a live session is refused at once
//! ([`ProxyError::NodeOffline`]), and a call that times out takes its request out of the
//! node's queue if it is still there, so a node that comes back does not make a call nobody
//! waits for. Waiters are bounded ([`MAX_PENDING_CALLS`]) and each is removed when its call
//! ends, answered, timed out or abandoned; a reply nobody waits for is dropped with a debug log.
//! Replies are consumed here, never stored in the upstream log (they may carry whatever a local
//! service answered, and the call's client is the only one meant to read it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::Message;
use proto::http::{HttpRequest, HttpResponse, ServiceTarget};
use tokio::sync::oneshot;

use crate::hub::{Hub, SendError};
use crate::store::StoreError;

/// Most proxy calls waiting for their node at once, all nodes together; more are refused
/// ([`ProxyError::TooManyCalls`]).
pub const MAX_PENDING_CALLS: usize = 1024;

/// The callers waiting for servicebus replies, by (node, request id).
#[derive(Debug, Default)]
pub(crate) struct Replies {
    waiting: Mutex<HashMap<(String, String), oneshot::Sender<Message>>>,
}

/// One call's place in [`Replies`]; dropping it removes the entry.
#[derive(Debug)]
pub(crate) struct ReplyWaiter {
    rx: oneshot::Receiver<Message>,
    key: (String, String),
    replies: Arc<Replies>,
}

/// Why [`Hub::proxy`] has no answer from the node's service. Each maps to a status and a code
/// of the cloud API's error body.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The node never connected (the caller's mistake): 404 `unknown_node`.
    #[error("unknown node {0:?}: it has never connected")]
    UnknownNode(String),
    /// The node has no live session: 503 `node_offline`. Proxy calls are not queued; retry
    /// once the node is connected.
    #[error("node {0:?} is not connected; proxy calls are not queued, retry when it is")]
    NodeOffline(String),
    /// [`MAX_PENDING_CALLS`] calls are waiting already: 503 `overloaded`.
    #[error("{MAX_PENDING_CALLS} proxy calls are waiting for their nodes already; retry later")]
    TooManyCalls,
    /// The node's queue is full: 503 `queue_full`.
    #[error(transparent)]
    QueueFull(SendError),
    /// The store failed (500, or 507 for a full disk).
    #[error(transparent)]
    Store(StoreError),
    /// The node did not answer within the timeout: 504 `edge_timeout`. Is servicebus enabled
    /// there (`modules.service-bus.enable`)? The request was taken out of the queue if it was
    /// still there.
    #[error(
        "node {node:?} did not answer within {after:?} (is modules.service-bus enabled on it?)"
    )]
    Timeout {
        /// The node.
        node: String,
        /// How long the call waited.
        after: Duration,
    },
    /// The node answered something that is not an `HTTPResponse`: 502 `bad_reply`.
    #[error("node {node:?} answered with something other than an HTTPResponse: {why}")]
    BadReply {
        /// The node.
        node: String,
        /// What was wrong.
        why: String,
    },
}

impl Replies {
    /// Registers a caller waiting for the reply to request `id` sent to `node`; `None` when
    /// [`MAX_PENDING_CALLS`] wait already.
    pub(crate) fn wait_for(self: &Arc<Self>, node: &str, id: &str) -> Option<ReplyWaiter> {
        let (tx, rx) = oneshot::channel();
        let key = (node.to_owned(), id.to_owned());
        let mut waiting = lock(&self.waiting);
        if waiting.len() >= MAX_PENDING_CALLS {
            return None;
        }
        waiting.insert(key.clone(), tx);
        Some(ReplyWaiter {
            rx,
            key,
            replies: Arc::clone(self),
        })
    }

    /// Hands a servicebus reply from `node` to the caller waiting for its parent id; a reply
    /// nobody waits for (its call timed out, or a resend after a reconnect) is dropped. Only a
    /// reply from the node the request went to counts.
    pub(crate) fn deliver(&self, node: &str, reply: Message) {
        let key = (node.to_owned(), reply.header.parent_id.clone());
        let waiter = lock(&self.waiting).remove(&key);
        match waiter {
            Some(tx) => {
                if let Err(reply) = tx.send(reply) {
                    tracing::debug!(%node, parent_id = %reply.header.parent_id,
                        "servicebus reply arrived as its call gave up; dropped");
                }
            }
            None => tracing::debug!(%node, parent_id = %key.1,
                "servicebus reply for a call nobody waits for (timed out, or answered); dropped"),
        }
    }

    /// Calls waiting now.
    pub(crate) fn len(&self) -> usize {
        lock(&self.waiting).len()
    }
}

impl ReplyWaiter {
    /// The reply, or `None` after `timeout`.
    async fn wait(mut self, timeout: Duration) -> Option<Message> {
        tokio::time::timeout(timeout, &mut self.rx).await.ok()?.ok()
    }
}

impl Drop for ReplyWaiter {
    fn drop(&mut self) {
        lock(&self.replies.waiting).remove(&self.key);
    }
}

impl Hub {
    /// Asks `node`'s servicebus to send `request` to its local service `target` and waits up to
    /// `timeout` for the answer: the service's, or the edge's own error answer (403 for a port
    /// it does not allow, 502, 504, ...; `Server: causeway-edgecore`).
    pub async fn proxy(
        &self,
        node: &str,
        target: &ServiceTarget,
        request: HttpRequest,
        timeout: Duration,
    ) -> Result<HttpResponse, ProxyError> {
        if !self.is_connected(node) {
            return Err(match self.node(node).await {
                Ok(Some(_)) => ProxyError::NodeOffline(node.to_owned()),
                Ok(None) => ProxyError::UnknownNode(node.to_owned()),
                Err(e) => ProxyError::Store(e),
            });
        }
        let id = proto::new_id();
        let msg = request.into_message(target, id.clone(), proto::now_millis());
        // Registered before the request is queued, so a quick reply finds it.
        let waiter = self
            .inner
            .registry
            .replies()
            .wait_for(node, &id)
            .ok_or(ProxyError::TooManyCalls)?;
        // No ACK: the reply answers it, and a resend would call the service twice.
        let queued = match self.send(node, msg, false).await {
            Ok(q) => q,
            Err(SendError::UnknownNode(n)) => return Err(ProxyError::UnknownNode(n)),
            Err(SendError::Store(e)) => return Err(ProxyError::Store(e)),
            Err(e) => return Err(ProxyError::QueueFull(e)),
        };
        match waiter.wait(timeout).await {
            Some(reply) => {
                HttpResponse::from_content(&reply.content).map_err(|e| ProxyError::BadReply {
                    node: node.to_owned(),
                    why: e.to_string(),
                })
            }
            None => {
                // Not sent yet (the node went away meanwhile): nobody will wait for it.
                if let Err(e) = self.store().remove(node, queued.seq).await {
                    tracing::debug!(%node, %id, error = %e, "timed-out proxy call not unqueued");
                }
                Err(ProxyError::Timeout {
                    node: node.to_owned(),
                    after: timeout,
                })
            }
        }
    }

    /// Proxy calls waiting for their nodes now.
    pub fn pending_proxy_calls(&self) -> usize {
        self.inner.registry.replies().len()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(parent: &str) -> Message {
        Message::with_header("a", parent, 0).route("servicebus", "user", "", "upload")
    }

    #[tokio::test]
    async fn replies_reach_their_waiter_once_and_entries_go_away() {
        let replies = Arc::new(Replies::default());
        let w = replies.wait_for("edge-1", "r-1").unwrap();
        // Another node's reply with the same parent id is not this call's.
        replies.deliver("edge-2", reply("r-1"));
        assert_eq!(replies.len(), 1);
        replies.deliver("edge-1", reply("r-1"));
        assert_eq!(replies.len(), 0);
        let got = w.wait(Duration::from_secs(1)).await.unwrap();
        assert_eq!(got.header.parent_id, "r-1");
        // A late one finds nobody and is dropped.
        replies.deliver("edge-1", reply("r-1"));

        // A call that times out leaves nothing behind.
        let w = replies.wait_for("edge-1", "r-2").unwrap();
        assert!(w.wait(Duration::from_millis(10)).await.is_none());
        assert_eq!(replies.len(), 0);
        // So does one abandoned (its client went away).
        let w = replies.wait_for("edge-1", "r-3").unwrap();
        drop(w);
        assert_eq!(replies.len(), 0);
    }

    #[test]
    fn waiters_are_bounded() {
        let replies = Arc::new(Replies::default());
        let held: Vec<_> = (0..MAX_PENDING_CALLS)
            .map(|i| replies.wait_for("n", &i.to_string()).unwrap())
            .collect();
        assert!(replies.wait_for("n", "one-more").is_none());
        drop(held);
        assert!(replies.wait_for("n", "one-more").is_some());
    }
}
