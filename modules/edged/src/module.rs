//! The edged beehive module (name and group `edged`): every `sync-period`, and at once when
//! metamanager stores a pod, configmap or secret, it reads the node's pods from metamanager's
//! store and the runtime's sandboxes and containers from the CRI, reconciles each pod
//! (`reconcile::decide`), carries the actions out and sends each pod's status to the cloud when
//! it changed (`{ns}/podstatus/{name}`, a PodStatusRequest, through EdgeHub's durable outbox:
//! MODULES.md §1.3), and the node's status (`null/nodestatus/{node}`, capacity, allocatable,
//! conditions, node info) at start, on change and every `node-status-period`.
//!
//! Pods come from the local store, so with the cloud away running pods keep running, crashed
//! containers restart, and after an edgecore restart the pods found at the runtime are the
//! store's pods and are left running. Stopping edgecore stops no container.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use beehive::{BoxFuture, Bus, Module, ModuleContext, ModuleError};
use metamanager::store::MetaStore;
use proto::{Content, Message};
use session::edge::route::{GROUP_META, MODULE_EDGEHUB};

use crate::config::EdgedConfig;
use crate::cri::{Cri, CriError};
use crate::make;
use crate::pod::Pod;
use crate::reconcile::{self, Action, Bounds, Observed, PodMemory, PullFailure};
use crate::status;

/// The module's name (KubeEdge's).
pub const MODULE_NAME: &str = "edged";

/// What edged did, for status and tests. Every counter only grows.
#[derive(Debug, Default)]
pub struct EdgedStats {
    /// Reconcile passes over all pods.
    pub passes: AtomicU64,
    /// CRI actions carried out.
    pub actions: AtomicU64,
    /// CRI actions that failed.
    pub failed_actions: AtomicU64,
    /// Pod statuses handed to EdgeHub.
    pub pod_statuses: AtomicU64,
    /// Node statuses handed to EdgeHub.
    pub node_statuses: AtomicU64,
}

/// The edged module.
#[derive(Debug)]
pub struct Edged {
    config: EdgedConfig,
    node: String,
    meta: Arc<MetaStore>,
    stats: Arc<EdgedStats>,
}

impl Edged {
    /// The module for node `node`, running the pods of `meta` bound to it.
    pub fn new(config: EdgedConfig, node: &str, meta: Arc<MetaStore>) -> Self {
        Self {
            config,
            node: node.to_owned(),
            meta,
            stats: Arc::default(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<EdgedStats> {
        Arc::clone(&self.stats)
    }
}

impl Module for Edged {
    fn name(&self) -> &str {
        MODULE_NAME
    }

    fn start(
        self: Arc<Self>,
        mut ctx: ModuleContext,
    ) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move {
            std::fs::create_dir_all(&self.config.root_dir)
                .map_err(|e| ModuleError::opening(MODULE_NAME, &self.config.root_dir, e))?;
            tracing::info!(socket = %self.config.cri_socket.display(),
                root = %self.config.root_dir.display(), "edged started");
            let mut agent = Agent {
                config: self.config.clone(),
                node: self.node.clone(),
                bus: ctx.bus().clone(),
                meta: Arc::clone(&self.meta),
                stats: Arc::clone(&self.stats),
                cri: None,
                cri_warned: false,
                pods: BTreeMap::new(),
                bad_pods: BTreeSet::new(),
                node_status: None,
                runtime_version: String::new(),
            };
            let mut changes = self.meta.subscribe();
            let mut tick = tokio::time::interval(self.config.sync_period.duration());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    msg = ctx.recv() => match msg {
                        // Answers to its status messages and connection events: nothing to do.
                        Some(_) => {}
                        None => break,
                    },
                    change = changes.recv() => match change {
                        Ok(c) if matches!(c.object.kind.as_str(), "pod" | "configmap" | "secret") => {
                            agent.pass().await;
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => agent.pass().await,
                        Err(RecvError::Closed) => changes = self.meta.subscribe(),
                    },
                    _ = tick.tick() => agent.pass().await,
                }
            }
            tracing::info!("edged stopped (its containers keep running)");
            Ok(())
        })
    }
}

/// What edged keeps of one pod.
#[derive(Debug, Default)]
struct PodEntry {
    /// The last spec seen in the store (its grace period serves a deletion).
    pod: Option<Pod>,
    memory: PodMemory,
    /// The last status sent, without and with times.
    sent_plain: Option<Value>,
    sent: Option<Value>,
    /// The pod IP of a sandbox (id, IP).
    ip: Option<(String, String)>,
}

struct Agent {
    config: EdgedConfig,
    node: String,
    bus: Bus,
    meta: Arc<MetaStore>,
    stats: Arc<EdgedStats>,
    cri: Option<Cri>,
    cri_warned: bool,
    pods: BTreeMap<String, PodEntry>,
    /// Stored pods that cannot be read (logged once each).
    bad_pods: BTreeSet<String>,
    /// The node status last sent and when.
    node_status: Option<(Value, Instant)>,
    runtime_version: String,
}

fn now_ms() -> u64 {
    u64::try_from(proto::now_millis()).unwrap_or(0)
}

fn not_found(e: &CriError) -> bool {
    matches!(e, CriError::Call { message, .. } if message.contains("not found"))
}

impl Agent {
    fn bounds(&self) -> Bounds {
        Bounds {
            backoff_initial_ms: u64::from(self.config.backoff_initial.get()) * 1000,
            backoff_max_ms: u64::from(self.config.backoff_max.get()) * 1000,
            keep_dead: self.config.max_dead_per_container as usize,
        }
    }

    /// The store's pods bound to this node, by uid.
    fn desired(&mut self) -> BTreeMap<String, Pod> {
        let stored = match self.meta.list("pod", None) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "edged: cannot read metamanager's pods");
                return BTreeMap::new();
            }
        };
        let mut pods = BTreeMap::new();
        for o in stored {
            match Pod::from_json(&o.value) {
                Ok(p) if p.spec.node_name.is_empty() || p.spec.node_name == self.node => {
                    pods.insert(p.metadata.uid.clone(), p);
                }
                Ok(_) => {}
                Err(e) => {
                    if self.bad_pods.insert(o.key.clone()) {
                        tracing::warn!(key = %o.key, error = %e, "edged: a stored pod it cannot run");
                    }
                }
            }
        }
        pods
    }

    async fn connected(&mut self) -> Option<&mut Cri> {
        if self.cri.is_none() {
            match Cri::connect(&self.config.cri_socket).await {
                Ok(mut cri) => {
                    self.runtime_version = cri.version().await.unwrap_or_default();
                    tracing::info!(runtime = %self.runtime_version, "edged: container runtime reached");
                    self.cri_warned = false;
                    self.cri = Some(cri);
                }
                Err(e) => {
                    if !std::mem::replace(&mut self.cri_warned, true) {
                        tracing::warn!(error = %e, "edged: no container runtime (retried every sync period; said once)");
                    }
                    return None;
                }
            }
        }
        self.cri.as_mut()
    }

    async fn observe(&mut self) -> Result<BTreeMap<String, Observed>, CriError> {
        let Some(cri) = self.cri.as_mut() else {
            return Ok(BTreeMap::new());
        };
        let sandboxes = cri.sandboxes().await?;
        let containers = cri.containers().await?;
        let mut by_pod: BTreeMap<String, Observed> = BTreeMap::new();
        for s in sandboxes {
            by_pod
                .entry(s.pod_uid.clone())
                .or_default()
                .sandboxes
                .push(s);
        }
        for c in containers {
            by_pod
                .entry(c.pod_uid.clone())
                .or_default()
                .containers
                .push(c);
        }
        Ok(by_pod)
    }

    /// One pass over every pod.
    async fn pass(&mut self) {
        if self.connected().await.is_none() {
            return;
        }
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        let desired = self.desired();
        let mut observed = match self.observe().await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "edged: cannot read the runtime's state");
                self.cri = None;
                return;
            }
        };
        let uids: BTreeSet<String> = desired
            .keys()
            .chain(observed.keys())
            .chain(self.pods.keys())
            .cloned()
            .collect();
        for uid in uids {
            let seen = observed.remove(&uid).unwrap_or_default();
            self.sync_pod(&uid, desired.get(&uid), seen).await;
        }
        self.send_node_status().await;
        self.collect_images().await;
        if self.stats.passes.load(Ordering::Relaxed) == 1 {
            tracing::info!(
                pods = self.pods.len(),
                "edged: first pass done (pods found running are kept)"
            );
        }
    }

    /// Removes images no container uses while the runtime holds more than `image-gc-bytes`
    /// (0: never), largest first; the sandbox image is kept.
    async fn collect_images(&mut self) {
        let bound = self.config.image_gc_bytes;
        if bound == 0 {
            return;
        }
        let Some(cri) = self.cri.as_mut() else { return };
        let (Ok(images), Ok(containers)) = (cri.images().await, cri.containers().await) else {
            return;
        };
        let mut total: u64 = images.iter().map(|i| i.2).sum();
        let mut candidates: Vec<_> = images
            .into_iter()
            .filter(|(id, tags, _)| {
                !tags.contains(&self.config.pod_sandbox_image)
                    && !containers
                        .iter()
                        .any(|c| c.image_ref == *id || tags.contains(&c.image) || c.image == *id)
            })
            .collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.2));
        for (id, tags, size) in candidates {
            if total <= bound {
                break;
            }
            match cri.remove_image(&id).await {
                Ok(()) => {
                    total = total.saturating_sub(size);
                    tracing::info!(image = %id, ?tags, size, "edged: unused image removed");
                }
                Err(e) => tracing::warn!(image = %id, error = %e, "edged: image not removed"),
            }
        }
    }

    async fn sync_pod(&mut self, uid: &str, desired: Option<&Pod>, mut observed: Observed) {
        let bounds = self.bounds();
        let mut entry = self.pods.remove(uid).unwrap_or_default();
        if let Some(p) = desired {
            entry.pod = Some(p.clone());
        }
        // Gone from the store: torn down with the grace period of its last known spec.
        let wanted: Option<Pod> = match (desired, &entry.pod) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(last)) => {
                let mut gone = last.clone();
                gone.metadata
                    .deletion_timestamp
                    .get_or_insert_with(String::new);
                Some(gone)
            }
            (None, None) => None,
        };
        if let Some(p) = wanted.as_ref().filter(|p| !p.deleting()) {
            // Keeps mounted configmaps and secrets current.
            if observed.ready_sandbox().is_some() {
                if let Err(e) = make::volumes(p, &self.config.root_dir, &*self.meta) {
                    tracing::debug!(pod = %p.metadata.name, error = %e, "edged: volumes not refreshed");
                }
            }
        }
        for _round in 0..4 {
            let actions =
                reconcile::decide(wanted.as_ref(), &observed, &entry.memory, bounds, now_ms());
            if actions.is_empty() {
                break;
            }
            for action in actions {
                self.carry_out(action, wanted.as_ref(), &observed, &mut entry)
                    .await;
            }
            match self.observe().await {
                Ok(mut all) => observed = all.remove(uid).unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "edged: cannot read the runtime's state");
                    self.cri = None;
                    break;
                }
            }
        }
        match wanted.as_ref().filter(|p| !p.deleting()) {
            Some(pod) => {
                let ip = self.pod_ip(pod, &observed, &mut entry).await;
                let plain = status::pod_status(
                    pod,
                    &observed,
                    &entry.memory,
                    bounds,
                    now_ms(),
                    ip.as_deref(),
                );
                if entry.sent_plain.as_ref() != Some(&plain) {
                    let mut full = plain.clone();
                    let now = status::rfc3339_ns(proto::now_millis().saturating_mul(1_000_000));
                    status::stamp(&mut full, entry.sent.as_ref(), &now);
                    if self.send_pod_status(pod, &full).await {
                        entry.sent_plain = Some(plain);
                        entry.sent = Some(full);
                    }
                }
                self.pods.insert(uid.to_owned(), entry);
            }
            None if observed.is_empty() => {
                if let Some(p) = &entry.pod {
                    tracing::info!(pod = %p.metadata.name, "edged: pod removed from the runtime");
                    let _ = std::fs::remove_dir_all(make::pod_dir(&self.config.root_dir, uid));
                }
            }
            None => {
                self.pods.insert(uid.to_owned(), entry);
            }
        }
    }

    async fn pod_ip(
        &mut self,
        pod: &Pod,
        observed: &Observed,
        entry: &mut PodEntry,
    ) -> Option<String> {
        if pod.spec.host_network {
            return None;
        }
        let sandbox = observed.ready_sandbox()?;
        if let Some((id, ip)) = &entry.ip {
            if *id == sandbox.id {
                return Some(ip.clone()).filter(|ip| !ip.is_empty());
            }
        }
        let ip = self.cri.as_mut()?.sandbox_ip(&sandbox.id).await.ok()?;
        entry.ip = Some((sandbox.id.clone(), ip.clone()));
        Some(ip).filter(|ip| !ip.is_empty())
    }

    async fn carry_out(
        &mut self,
        action: Action,
        pod: Option<&Pod>,
        observed: &Observed,
        entry: &mut PodEntry,
    ) {
        let Some(cri) = self.cri.as_mut() else { return };
        self.stats.actions.fetch_add(1, Ordering::Relaxed);
        let name = pod.map(|p| p.metadata.name.clone()).unwrap_or_default();
        let result = match &action {
            Action::StopContainer { id, grace_secs } => cri.stop_container(id, *grace_secs).await,
            Action::RemoveContainer { id } => cri.remove_container(id).await,
            Action::StopSandbox { id } => cri.stop_sandbox(id).await,
            Action::RemoveSandbox { id } => cri.remove_sandbox(id).await,
            Action::RunSandbox { attempt } => {
                let Some(pod) = pod else { return };
                let image = self.config.pod_sandbox_image.clone();
                let present = cri.has_image(&image).await.unwrap_or(false);
                let pulled = if present {
                    Ok(String::new())
                } else {
                    cri.pull_image(&image).await
                };
                match pulled {
                    Ok(_) => {
                        let config = make::sandbox_config(pod, *attempt, &self.config.root_dir);
                        let _ = std::fs::create_dir_all(&config.log_directory);
                        cri.run_sandbox(config).await.map(|id| {
                            tracing::info!(pod = %name, sandbox = %id, "edged: sandbox running");
                        })
                    }
                    Err(e) => Err(e),
                }
            }
            Action::StartContainer {
                sandbox_id,
                name: container,
                init,
                attempt,
            } => {
                let Some(pod) = pod else { return };
                let list = if *init {
                    &pod.spec.init_containers
                } else {
                    &pod.spec.containers
                };
                let Some(spec) = list.iter().find(|c| c.name == *container) else {
                    return;
                };
                let made =
                    make::volumes(pod, &self.config.root_dir, &*self.meta).and_then(|dirs| {
                        make::container_config(pod, spec, *attempt, &*self.meta, &dirs)
                    });
                let config = match made {
                    Ok(c) => c,
                    Err(e) => {
                        if entry.memory.config_errors.get(container).map(|(_, m)| m) != Some(&e) {
                            tracing::warn!(pod = %name, %container, error = %e, "edged: container config");
                        }
                        entry
                            .memory
                            .config_errors
                            .insert(container.clone(), ("CreateContainerConfigError".into(), e));
                        return;
                    }
                };
                let always = spec.image_pull_policy.as_deref() == Some("Always");
                let present = !always && cri.has_image(&spec.image).await.unwrap_or(false);
                if !present && spec.image_pull_policy.as_deref() != Some("Never") {
                    match cri.pull_image(&spec.image).await {
                        Ok(_) => {
                            entry.memory.pull_failures.remove(&spec.image);
                        }
                        Err(e) => {
                            let count = entry
                                .memory
                                .pull_failures
                                .get(&spec.image)
                                .map_or(0, |f| f.count)
                                + 1;
                            tracing::info!(pod = %name, image = %spec.image, error = %e, count,
                                "edged: image pull failed");
                            entry.memory.pull_failures.insert(
                                spec.image.clone(),
                                PullFailure {
                                    count,
                                    at_ms: now_ms(),
                                    message: e.to_string(),
                                },
                            );
                            self.stats.failed_actions.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
                let sandbox_attempt = observed
                    .sandboxes
                    .iter()
                    .find(|s| s.id == *sandbox_id)
                    .map_or(0, |s| s.attempt);
                let sandbox_config =
                    make::sandbox_config(pod, sandbox_attempt, &self.config.root_dir);
                match cri
                    .create_and_start(sandbox_id, config, sandbox_config)
                    .await
                {
                    Ok(id) => {
                        entry.memory.config_errors.remove(container);
                        tracing::info!(pod = %name, %container, attempt, id = %id, "edged: container started");
                        Ok(())
                    }
                    Err(e) => {
                        entry.memory.config_errors.insert(
                            container.clone(),
                            ("CreateContainerError".into(), e.to_string()),
                        );
                        Err(e)
                    }
                }
            }
        };
        if let Err(e) = result {
            if !not_found(&e) {
                self.stats.failed_actions.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(pod = %name, ?action, error = %e, "edged: runtime action failed");
            }
        }
    }

    async fn send(&mut self, resource: String, content: Value) -> bool {
        let msg = Message::new("")
            .route(MODULE_NAME, GROUP_META, resource, "update")
            .content(Content::Json(content));
        match self.bus.send(MODULE_EDGEHUB, msg).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "edged: EdgeHub did not take a status");
                false
            }
        }
    }

    async fn send_pod_status(&mut self, pod: &Pod, status: &Value) -> bool {
        let resource = format!("{}/podstatus/{}", pod.metadata.namespace, pod.metadata.name);
        let request = json!({"UID": pod.metadata.uid, "Name": pod.metadata.name, "Status": status});
        let sent = self.send(resource, request).await;
        if sent {
            self.stats.pod_statuses.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(pod = %pod.metadata.name, phase = %status["phase"], "edged: pod status sent");
        }
        sent
    }

    async fn send_node_status(&mut self) {
        let status = node_status(&self.runtime_version);
        let period = self.config.node_status_period.duration();
        let due = match &self.node_status {
            Some((last, at)) => *last != status || at.elapsed() >= period,
            None => true,
        };
        if !due {
            return;
        }
        let resource = format!("null/nodestatus/{}", self.node);
        if self
            .send(resource, json!({"UID": "", "Status": status.clone()}))
            .await
        {
            self.stats.node_statuses.fetch_add(1, Ordering::Relaxed);
            self.node_status = Some((status, Instant::now()));
        }
    }
}

/// The node's status as edged reports it: capacity and allocatable (CPUs, memory, pods),
/// pressure conditions (the cloud sets Ready from the link), node info. No heartbeat times, so
/// an unchanged node sends nothing new until `node-status-period`.
pub fn node_status(runtime_version: &str) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                })
        })
        .unwrap_or(0);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let resources =
        json!({"cpu": cpus.to_string(), "memory": format!("{mem_kib}Ki"), "pods": "110"});
    let condition =
        |ty: &str, reason: &str| json!({"type": ty, "status": "False", "reason": reason});
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            condition("MemoryPressure", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "KubeletHasSufficientPID"),
        ],
        "addresses": [{"type": "Hostname", "address": hostname}],
        "nodeInfo": {
            "kernelVersion": kernel,
            "operatingSystem": std::env::consts::OS,
            "architecture": match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a },
            "containerRuntimeVersion": runtime_version,
            "kubeletVersion": concat!("causeway-edged/", env!("CARGO_PKG_VERSION")),
        },
    })
}
