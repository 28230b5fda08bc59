//! The metamanager beehive module (name `metamanager`, group `meta`): applies the cloud's
//! resource messages to the store and acknowledges them after the commit, answers edge modules'
//! queries, and asks the cloud on a local miss while connected.
//!
//! Answers to the cloud, per message:
//! - applied (or kept out as older, or a resend of an applied id): ACK, op `response`, parent id
//!   = the message id, content `"OK"`, after the commit;
//! - refused (bad resource string, unknown operation, bad resource version): op `error` with the
//!   reason; it can never be stored, so the cloud should not resend it;
//! - not stored because the disk is full, or the file is locked or failing: no answer at all;
//!   the cloud resends under the same id and it is stored once the disk works again (each
//!   episode logged once). Any other store failure: op `error` with the reason.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use beehive::{BoxFuture, Bus, Module, ModuleContext, ModuleError};
use proto::message::OP_ERROR;
use proto::{Content, Message};
use session::edge::route::{
    CLOUD_CONNECTED, CLOUD_DISCONNECTED, CONNECTION_EVENT_OPERATION, CONNECTION_EVENT_SOURCE,
    GROUP_FUNC, GROUP_META, GROUP_RESOURCE, MODULE_EDGEHUB,
};

use crate::config::MetaManagerConfig;
use crate::decide::{self, Action, CloudChange, OP_QUERY, Refusal};
use crate::resource::{KINDS, Resource};
use crate::store::{Applied, MetaStore, StoreError};

/// The module's name on the bus (KubeEdge's).
pub const MODULE_NAME: &str = "metamanager";
/// Most cloud messages stored in one transaction (one fsync for all of them).
const MAX_BATCH: usize = 256;

/// The metamanager module. Its store is opened when it is created, so a bad path fails
/// edgecore's start and MetaServer can share the store before the hive runs.
#[derive(Debug)]
pub struct MetaManager {
    config: MetaManagerConfig,
    store: Arc<MetaStore>,
}

/// What the module shares with its query tasks.
struct Shared {
    store: Arc<MetaStore>,
    bus: Bus,
    connected: AtomicBool,
    remote_timeout: Duration,
}

/// What became of one cloud message.
enum Outcome {
    /// Refused: it can never be stored.
    Refused(Refusal),
    /// The store failed.
    Failed(StoreError),
    /// Applied (or kept out, per the plan) and committed.
    Stored(CloudChange, Applied),
}

impl MetaManager {
    /// Opens the store of `config` and makes the module.
    pub fn open(config: MetaManagerConfig) -> Result<Self, StoreError> {
        let store = Arc::new(MetaStore::open(&config.path, config.journal_max.get())?);
        Ok(Self { config, store })
    }

    /// The store, to read (MetaServer, the local endpoint) while the module runs.
    pub fn store(&self) -> Arc<MetaStore> {
        self.store.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &MetaManagerConfig {
        &self.config
    }
}

impl Module for MetaManager {
    fn name(&self) -> &str {
        MODULE_NAME
    }

    fn group(&self) -> &str {
        GROUP_META
    }

    fn start(self: Arc<Self>, ctx: ModuleContext) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move {
            run(&self, ctx).await;
            Ok(())
        })
    }
}

async fn run(module: &MetaManager, mut ctx: ModuleContext) {
    let shared = Arc::new(Shared {
        store: module.store.clone(),
        bus: ctx.bus().clone(),
        connected: AtomicBool::new(false),
        remote_timeout: module.config.remote_query_timeout(),
    });
    tracing::info!(path = %module.store.path().display(), "metamanager started");
    // In arrival order: per key, the cloud's order is the order applied (KubeEdge's M4). Only a
    // query that asks the cloud runs beside the loop.
    let mut held = None;
    loop {
        let msg = match held.take() {
            Some(msg) => msg,
            None => match ctx.recv().await {
                Some(msg) => msg,
                None => break,
            },
        };
        let route = &msg.route;
        if route.source == CONNECTION_EVENT_SOURCE && route.operation == CONNECTION_EVENT_OPERATION
        {
            match msg.content.as_text() {
                Some(CLOUD_CONNECTED) => shared.connected.store(true, Ordering::Relaxed),
                Some(CLOUD_DISCONNECTED) => shared.connected.store(false, Ordering::Relaxed),
                _ => {}
            }
        } else if is_cloud_change(&msg) {
            // Group commit: the cloud messages already waiting are stored with this one in one
            // transaction and one fsync, then acknowledged; a lone message never waits for more.
            let mut batch = vec![msg];
            while batch.len() < MAX_BATCH {
                match ctx.try_recv() {
                    Some(next) if is_cloud_change(&next) => batch.push(next),
                    next => {
                        held = next;
                        break;
                    }
                }
            }
            let outcomes = store_cloud_batch(&shared, &batch);
            for (msg, outcome) in batch.iter().zip(&outcomes) {
                answer_cloud(&shared, msg, outcome).await;
            }
        } else if route.operation == OP_QUERY {
            query(&shared, msg);
        } else {
            let text = format!(
                "metamanager answers operation query from edge modules; {:?} (resource {:?}) \
                 is not handled",
                route.operation, route.resource
            );
            reply(&shared.bus, local_error(&msg, text));
        }
    }
}

/// Whether `msg` is a cloud message for the store (group `resource` or `func`).
fn is_cloud_change(msg: &Message) -> bool {
    msg.route.group == GROUP_RESOURCE || msg.route.group == GROUP_FUNC
}

/// Reads and stores cloud messages in one transaction, with the outcomes storing them one by one
/// would have (which it falls back to when anything in the batch fails).
fn store_cloud_batch(shared: &Shared, batch: &[Message]) -> Vec<Outcome> {
    if batch.len() == 1 {
        return vec![store_cloud(shared, &batch[0])];
    }
    let inspected: Vec<_> = batch.iter().map(decide::inspect).collect();
    let storable: Vec<(&Message, &CloudChange)> = batch
        .iter()
        .zip(&inspected)
        .filter_map(|(msg, change)| Some((msg, change.as_ref().ok()?)))
        .collect();
    let Some(applied) = shared.store.apply_batch(&storable) else {
        return batch.iter().map(|msg| store_cloud(shared, msg)).collect();
    };
    if !storable.is_empty() && shared.store.set_write_problem(None).is_some() {
        tracing::info!("metamanager: storing works again; acknowledging cloud messages");
    }
    let mut applied = applied.into_iter();
    inspected
        .into_iter()
        .zip(batch)
        .map(|(change, msg)| match change {
            Err(refusal) => Outcome::Refused(refusal),
            Ok(change) => match applied.next() {
                Some(applied) => Outcome::Stored(change, applied),
                // apply_batch answers every storable message; never reached.
                None => store_cloud(shared, msg),
            },
        })
        .collect()
}

/// Reads and stores one cloud message.
fn store_cloud(shared: &Shared, msg: &Message) -> Outcome {
    let change = match decide::inspect(msg) {
        Ok(change) => change,
        Err(refusal) => return Outcome::Refused(refusal),
    };
    match shared.store.apply(msg, &change) {
        Ok(applied) => {
            if shared.store.set_write_problem(None).is_some() {
                tracing::info!("metamanager: storing works again; acknowledging cloud messages");
            }
            Outcome::Stored(change, applied)
        }
        Err(e) => {
            if shared
                .store
                .set_write_problem(Some(e.to_string()))
                .is_none()
            {
                let what = if e.is_disk_full() {
                    "metamanager: the disk is full; cloud messages are not acknowledged, so the \
                     cloud resends them until they can be stored"
                } else {
                    "metamanager: cannot store cloud messages"
                };
                tracing::error!(id = msg.header.id, error = %e, "{what}");
            } else {
                tracing::debug!(id = msg.header.id, error = %e, "not stored");
            }
            Outcome::Failed(e)
        }
    }
}

/// Answers the cloud for one message: the ACK after the commit, an error for what can never be
/// stored, nothing while the disk cannot write (the cloud resends).
async fn answer_cloud(shared: &Shared, msg: &Message, outcome: &Outcome) {
    let answer = match outcome {
        Outcome::Stored(change, applied) => {
            tracing::debug!(
                id = msg.header.id,
                resource = msg.route.resource,
                ?applied,
                "applied"
            );
            if !change.ack {
                return;
            }
            Message::response_to(msg, Content::text("OK"))
        }
        Outcome::Refused(refusal) => {
            tracing::warn!(id = msg.header.id, resource = msg.route.resource,
                           operation = msg.route.operation, reason = %refusal,
                           "cloud message refused");
            Message::error_for(msg, refusal.to_string())
        }
        Outcome::Failed(e) if e.is_transient() => return,
        Outcome::Failed(e) => Message::error_for(msg, e.to_string()),
    };
    if let Err(e) = shared.bus.send(MODULE_EDGEHUB, answer).await {
        tracing::warn!(id = msg.header.id, error = %e, "could not hand the answer to EdgeHub");
    }
}

/// Answers a query from an edge module; a remote query runs in its own task.
fn query(shared: &Arc<Shared>, req: Message) {
    match local_answer(shared, &req) {
        Local::Answer(content) => reply(&shared.bus, local_response(&req, content)),
        Local::Error(text) => reply(&shared.bus, local_error(&req, text)),
        Local::AskCloud(resource) => {
            let shared = shared.clone();
            tokio::spawn(async move {
                let resp = match remote(&shared, &resource).await {
                    Ok(content) => local_response(&req, content),
                    Err(text) => local_error(&req, text),
                };
                reply(&shared.bus, resp);
            });
        }
    }
}

/// What the local store says to a query.
enum Local {
    /// The answer's content (the JSON array of object strings, or null).
    Answer(Value),
    /// The query is wrong or the store failed.
    Error(String),
    /// Not stored here; ask the cloud.
    AskCloud(Resource),
}

fn local_answer(shared: &Shared, req: &Message) -> Local {
    let resource = match Resource::query(&req.route.resource) {
        Ok(r) => r,
        Err(e) => return Local::Error(e.to_string()),
    };
    let Some(kind) = resource.known_kind() else {
        let known: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
        return Local::Error(format!(
            "unknown resource type {:?} in {:?} (known: {})",
            resource.kind,
            req.route.resource,
            known.join(", ")
        ));
    };
    let found = match &resource.name {
        Some(_) => shared
            .store
            .get(&resource.key())
            .map(|o| o.into_iter().collect()),
        None => {
            let namespace = Some(resource.namespace.as_str()).filter(|ns| *ns != "null");
            shared.store.list(&resource.kind, namespace)
        }
    };
    match found {
        Err(e) => Local::Error(e.to_string()),
        Ok(objects) if objects.is_empty() => {
            if resource.name.is_some() && kind.remote && shared.connected.load(Ordering::Relaxed) {
                Local::AskCloud(resource)
            } else {
                // KubeEdge's empty answer: a nil list, `null`.
                Local::Answer(Value::Null)
            }
        }
        Ok(objects) => Local::Answer(Value::Array(
            objects
                .into_iter()
                .map(|o| Value::String(o.value))
                .collect(),
        )),
    }
}

/// Asks the cloud for one object (MODULES.md §1.5 without M1 and M2): a fresh id, the answer
/// stored and acknowledged like any cloud object, an error answer returned as the error and
/// never stored.
async fn remote(shared: &Shared, resource: &Resource) -> Result<Value, String> {
    let key = resource.key();
    let ask = Message::new("").route(MODULE_NAME, GROUP_META, key.clone(), OP_QUERY);
    let answer = shared
        .bus
        .send_sync(MODULE_EDGEHUB, ask, shared.remote_timeout)
        .await
        .map_err(|e| format!("{key} is not stored here and the cloud did not answer: {e}"))?;
    if answer.route.operation == OP_ERROR {
        let text = String::from_utf8_lossy(&answer.content.to_bytes()).into_owned();
        return Err(format!("{key}: the cloud answered: {text}"));
    }
    let outcome = store_cloud(shared, &answer);
    answer_cloud(shared, &answer, &outcome).await;
    match outcome {
        Outcome::Stored(change, _) => match change.action {
            Action::Upsert(value) => Ok(Value::Array(vec![Value::String(value)])),
            Action::CloudError(text) => Err(format!("{key}: {text}")),
            Action::Nothing | Action::Delete => Ok(Value::Null),
        },
        Outcome::Refused(refusal) => {
            Err(format!("{key}: the cloud's answer was refused: {refusal}"))
        }
        Outcome::Failed(e) => Err(format!(
            "{key}: the cloud's answer could not be stored: {e}"
        )),
    }
}

/// KubeEdge's local answer: op `response`, source `metamanager`, parent id = the request's.
fn local_response(req: &Message, content: Value) -> Message {
    let mut resp = Message::response_to(req, Content::Json(content));
    resp.route.source = MODULE_NAME.to_owned();
    resp
}

/// KubeEdge's error answer to an edge module, from `metamanager`, parent id = the request's.
fn local_error(req: &Message, text: String) -> Message {
    let mut resp = Message::error_for(req, text);
    resp.route.source = MODULE_NAME.to_owned();
    resp.route.group = GROUP_META.to_owned();
    resp
}

/// Hands an answer to the module waiting for it; one that no longer waits is told in the log.
fn reply(bus: &Bus, resp: Message) {
    if let Some(resp) = bus.send_resp(resp).into_undelivered() {
        tracing::debug!(
            parent = resp.header.parent_id,
            "nobody waits for this answer"
        );
    }
}
