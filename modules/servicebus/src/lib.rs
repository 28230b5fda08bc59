//! servicebus: the edge module that lets the cloud call an HTTP service on this node
//! (KubeEdge's servicebus, rule `rest` → `servicebus`; MODULES.md §4.1).
//!
//! EdgeHub delivers it `user`-group messages whose source is `router_servicebus`: op = the HTTP
//! method, resource `<port>:<path>`, content KubeEdge's `HTTPRequest` (base64 body). It calls the
//! allowed target with that port (`modules.service-bus.allowed-targets`, none by default) within
//! the timeout, reads at most `max-response-bytes` of the answer, and sends the service's status,
//! headers and body back as an `HTTPResponse` in a message of op `upload` whose parent id is the
//! request's id (source `servicebus`, group `user`), through EdgeHub's outbox.
//!
//! Every request gets exactly one such reply, errors included (KubeEdge's error replies lack the
//! operation and the resource and never reach the caller, M7): a malformed request 400, a port
//! not allowed 403, too many calls at once 503, a refused connection or a broken or oversized
//! answer 502, a timeout 504; each with `Server: causeway-edgecore` and the body
//! `{"error": "<what happened>", "code": "<stable code>"}` ([`call::CallError`]).
//!
//! Not here: KubeEdge's other direction (rule `servicebus` → `rest`: an HTTP server on the edge
//! whose requests go to the cloud, ops `start` / `stop`); such messages are logged and ignored.
//!
//! Layout: [`config`] (the section of `edgecore.yaml`), [`call`] (reading a request, making the
//! call, shaping the answer), and the [`ServiceBus`] module here.

pub mod call;
pub mod config;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use beehive::{BoxFuture, Bus, Module, ModuleContext, ModuleError};
use proto::Message;
use proto::http::{GROUP_USER, HttpResponse, SOURCE_ROUTER_SERVICEBUS};
use session::edge::route::{
    CONNECTION_EVENT_OPERATION, CONNECTION_EVENT_SOURCE, GROUP_BUS, MODULE_EDGEHUB,
    MODULE_SERVICEBUS,
};

pub use call::CallError;
pub use config::ServiceBusConfig;

/// How long calls still in progress at shutdown may finish (their replies go to the outbox).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The servicebus module: `servicebus` in group `bus`, where EdgeHub routes its requests.
#[derive(Debug)]
pub struct ServiceBus {
    config: ServiceBusConfig,
}

impl ServiceBus {
    /// The module for `config`.
    pub fn new(config: ServiceBusConfig) -> Self {
        Self { config }
    }
}

impl Module for ServiceBus {
    fn name(&self) -> &str {
        MODULE_SERVICEBUS
    }

    fn group(&self) -> &str {
        GROUP_BUS
    }

    fn start(self: Arc<Self>, ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move {
            run(self.config.clone(), ctx).await;
            Ok(())
        })
    }
}

async fn run(config: ServiceBusConfig, mut ctx: ModuleContext) {
    let config = Arc::new(config);
    tracing::info!(
        allowed_targets = ?config.allowed_targets,
        timeout_secs = config.timeout.get(),
        max_response_bytes = config.max_response_bytes.get(),
        "servicebus ready"
    );
    let slots = Arc::new(Semaphore::new(config.max_concurrent_calls.get()));
    let mut calls = JoinSet::new();
    let warned_other = AtomicBool::new(false);
    loop {
        tokio::select! {
            msg = ctx.recv() => {
                let Some(msg) = msg else { break };
                if !is_request(&msg) {
                    ignore(&msg, &warned_other);
                    continue;
                }
                let bus = ctx.bus().clone();
                let config = Arc::clone(&config);
                // Taken here, so a busy edge answers at once rather than queueing calls.
                let slot = Arc::clone(&slots).try_acquire_owned().ok();
                calls.spawn(async move {
                    let answer = match slot {
                        Some(_slot) => answer(&msg, &config).await,
                        None => {
                            let limit = config.max_concurrent_calls.get();
                            reject(&msg, &CallError::Busy { limit })
                        }
                    };
                    reply(&bus, &msg, answer).await;
                });
            }
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    }
    let finishing = async { while calls.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, finishing)
        .await
        .is_err()
    {
        tracing::info!(
            left = calls.len(),
            "servicebus stopping; calls still in progress are abandoned (their callers time out)"
        );
    }
}

/// Makes the call a request asks for and returns the service's answer or the edge's error.
async fn answer(msg: &Message, config: &ServiceBusConfig) -> HttpResponse {
    let started = Instant::now();
    let prepared = call::prepare(msg, config);
    let result = match prepared {
        Ok(c) => {
            let max = config.max_response_bytes.get();
            call::perform(c, config.call_timeout(), max).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(resp) => {
            tracing::debug!(id = %msg.header.id, method = %msg.route.operation,
                resource = %msg.route.resource, status = resp.status_code,
                elapsed_ms = started.elapsed().as_millis(), "servicebus call answered");
            resp
        }
        Err(e) => reject(msg, &e),
    }
}

/// The edge's own answer to a request it could not carry out, logged.
fn reject(msg: &Message, e: &CallError) -> HttpResponse {
    tracing::info!(id = %msg.header.id, method = %msg.route.operation,
        resource = %msg.route.resource, status = e.status(), code = e.code(), error = %e,
        "servicebus call not carried out");
    e.to_response()
}

/// Sends the answer to the cloud: op `upload`, parent id = the request's id.
async fn reply(bus: &Bus, request: &Message, answer: HttpResponse) {
    let reply = answer.into_reply(request, proto::new_id(), proto::now_millis());
    if let Err(e) = bus.send(MODULE_EDGEHUB, reply).await {
        tracing::warn!(id = %request.header.id, error = %e,
            "servicebus reply not handed to EdgeHub; the caller will time out");
    }
}

/// A cloud request for this module (not a response, a connection event, or a rule message).
fn is_request(msg: &Message) -> bool {
    msg.route.source == SOURCE_ROUTER_SERVICEBUS
        && msg.route.group == GROUP_USER
        && !msg.is_response()
}

fn ignore(msg: &Message, warned: &AtomicBool) {
    let route = &msg.route;
    if route.source == CONNECTION_EVENT_SOURCE && route.operation == CONNECTION_EVENT_OPERATION {
        return;
    }
    // Once: KubeEdge's servicebus → rest rules (start/stop) would otherwise log per message.
    if !warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(id = %msg.header.id, source = %route.source, group = %route.group,
            operation = %route.operation,
            "servicebus ignores messages that are not router_servicebus requests \
             (servicebus -> rest rules are not supported); further ones are logged at debug");
    } else {
        tracing::debug!(id = %msg.header.id, operation = %route.operation,
            "servicebus ignored a message");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use beehive::{Beehive, SimpleModule};
    use proto::Content;
    use proto::http::{HttpRequest, ServiceTarget, is_reply};
    use tokio::sync::mpsc;

    use super::*;

    /// The module on a real bus, with a stand-in EdgeHub that collects replies.
    #[tokio::test]
    async fn every_request_gets_one_reply_errors_included() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hub = SimpleModule::new(MODULE_EDGEHUB, "hub", move |mut ctx| {
            let tx = tx.clone();
            async move {
                while let Some(m) = ctx.recv().await {
                    let _ = tx.send(m);
                }
                Ok(())
            }
        });
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = free.local_addr().unwrap();
        drop(free);
        let config = ServiceBusConfig {
            enable: true,
            allowed_targets: vec![closed],
            ..ServiceBusConfig::default()
        };
        let mut beehive = Beehive::new();
        beehive.register(hub, true).unwrap();
        beehive.register(ServiceBus::new(config), true).unwrap();
        let hive = beehive.start();
        let request = |id: &str, port: u16| {
            HttpRequest {
                method: "GET".into(),
                ..HttpRequest::default()
            }
            .into_message(
                &ServiceTarget::parse(&format!("{port}:/x")).unwrap(),
                id.into(),
                1,
            )
        };
        let refused = request("r-refused", closed.port());
        let forbidden = request("r-forbidden", 1);
        let mut malformed = request("r-bad", closed.port());
        malformed.route.resource = "not a resource".into();
        let mut unrelated = Message::with_header("r-other", "", 1).route(
            "router_servicebus",
            "user",
            "8080:/x",
            "GET",
        );
        unrelated.route.source = "router_eventbus".into();
        unrelated.content = Content::text("x");
        for m in [refused, forbidden, malformed, unrelated] {
            hive.bus().send(MODULE_SERVICEBUS, m).await.unwrap();
        }
        let mut got = std::collections::HashMap::new();
        for _ in 0..3 {
            let reply = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a reply")
                .unwrap();
            assert!(is_reply(&reply), "{reply:?}");
            assert_eq!(reply.route.source, "servicebus");
            let resp = HttpResponse::from_content(&reply.content).unwrap();
            got.insert(reply.header.parent_id.clone(), resp.status_code);
        }
        assert_eq!(got["r-refused"], 502);
        assert_eq!(got["r-forbidden"], 403);
        assert_eq!(got["r-bad"], 400);
        let report = hive.shutdown().await;
        assert!(report.is_clean(), "{report:?}");
        // The unrelated message got no reply.
        assert!(rx.try_recv().is_err());
    }
}
