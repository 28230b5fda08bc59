//! The reconcile decision (sans-IO): a pod's desired spec, what the runtime has for it and the
//! clock in; the CRI actions that move one toward the other out. Also the pod's status from the
//! same inputs (`status`). Nothing here talks to the runtime or reads a clock.
//!
//! Kubelet's rules kept: one ready sandbox per pod (a dead one is replaced and its containers
//! with it); init containers one at a time, in order, each to a zero exit; then every container;
//! a container that exited restarts as the restart policy says, after a back-off that doubles
//! from `backoff_initial` to `backoff_max` (the first restart is immediate); an image that could
//! not be pulled is retried on the same back-off; deletion stops containers with the grace period,
//! then the sandbox, then removes both. Only the newest `keep_dead` exited instances of each
//! container are kept (for `lastState` and logs); older ones are removed.

use std::collections::BTreeMap;

use crate::pod::{Pod, RestartPolicy};

/// A sandbox the runtime has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSeen {
    /// Runtime id.
    pub id: String,
    /// The pod's uid (label).
    pub pod_uid: String,
    /// Which sandbox of the pod (0 first).
    pub attempt: u32,
    /// Whether it is ready (else: stopped / not ready).
    pub ready: bool,
    /// Creation time, ns since the epoch.
    pub created_at: i64,
}

/// A container's state at the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Exited.
    Exited,
    /// Unknown.
    Unknown,
}

/// A container the runtime has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSeen {
    /// Runtime id.
    pub id: String,
    /// The pod's uid (label).
    pub pod_uid: String,
    /// The sandbox it runs in.
    pub sandbox_id: String,
    /// Its name in the pod spec.
    pub name: String,
    /// Which instance (0 first; the restart count of the newest).
    pub attempt: u32,
    /// State.
    pub state: ContainerState,
    /// Exit code (when exited).
    pub exit_code: i32,
    /// ns since the epoch.
    pub created_at: i64,
    /// ns since the epoch (0: never started).
    pub started_at: i64,
    /// ns since the epoch (0: not finished).
    pub finished_at: i64,
    /// The runtime's reason (`Completed`, `Error`, `OOMKilled`).
    pub reason: String,
    /// The runtime's message.
    pub message: String,
    /// The image as asked.
    pub image: String,
    /// The image's resolved reference.
    pub image_ref: String,
}

/// What edged remembers of a pod between passes (none of it is the runtime's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMemory {
    /// Per image: the last pull failure.
    pub pull_failures: BTreeMap<String, PullFailure>,
    /// Per container name: why it could not be created (reason such as
    /// `CreateContainerConfigError` for a missing configmap key, and the message).
    pub config_errors: BTreeMap<String, (String, String)>,
    /// Per container name: readiness from its readiness probe (absent: no probe result yet).
    pub ready: BTreeMap<String, bool>,
}

/// A failed image pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullFailure {
    /// Failures in a row.
    pub count: u32,
    /// When the last failed, ms since the epoch.
    pub at_ms: u64,
    /// The runtime's message.
    pub message: String,
}

/// Back-off and garbage-collection bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The first back-off (ms).
    pub backoff_initial_ms: u64,
    /// The longest back-off (ms).
    pub backoff_max_ms: u64,
    /// Exited instances of a container kept besides the current one.
    pub keep_dead: usize,
}

impl Bounds {
    /// The wait before the `n`th retry (n = restarts or failures so far; 0 → none).
    pub fn backoff_ms(&self, n: u32) -> u64 {
        if n == 0 {
            return 0;
        }
        let doublings = (n - 1).min(32);
        self.backoff_initial_ms
            .saturating_mul(1u64 << doublings)
            .min(self.backoff_max_ms)
    }
}

/// One CRI step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run a new sandbox for the pod.
    RunSandbox {
        /// Its attempt number.
        attempt: u32,
    },
    /// Stop a sandbox.
    StopSandbox {
        /// Runtime id.
        id: String,
    },
    /// Remove a stopped sandbox.
    RemoveSandbox {
        /// Runtime id.
        id: String,
    },
    /// Pull the image if needed, create and start a container (init or not) in the sandbox.
    StartContainer {
        /// The sandbox.
        sandbox_id: String,
        /// The container's name in the spec.
        name: String,
        /// Whether it is an init container.
        init: bool,
        /// Its attempt number (the restart count).
        attempt: u32,
    },
    /// Stop a running container with a grace period.
    StopContainer {
        /// Runtime id.
        id: String,
        /// Seconds before SIGKILL.
        grace_secs: i64,
    },
    /// Remove an exited container.
    RemoveContainer {
        /// Runtime id.
        id: String,
    },
}

/// The runtime's objects of one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Sandboxes, newest first.
    pub sandboxes: Vec<SandboxSeen>,
    /// Containers.
    pub containers: Vec<ContainerSeen>,
}

impl Observed {
    /// The newest ready sandbox.
    pub fn ready_sandbox(&self) -> Option<&SandboxSeen> {
        self.sandboxes.iter().find(|s| s.ready)
    }

    /// The instances of container `name` in sandbox `sandbox`, newest first.
    pub fn instances<'a>(&'a self, sandbox: &str, name: &str) -> Vec<&'a ContainerSeen> {
        let mut v: Vec<&ContainerSeen> = self
            .containers
            .iter()
            .filter(|c| c.sandbox_id == sandbox && c.name == name)
            .collect();
        v.sort_by(|a, b| {
            b.attempt
                .cmp(&a.attempt)
                .then(b.created_at.cmp(&a.created_at))
        });
        v
    }

    /// Whether the runtime has nothing of the pod.
    pub fn is_empty(&self) -> bool {
        self.sandboxes.is_empty() && self.containers.is_empty()
    }
}

/// Whether a container that exited with `code` restarts under `policy`.
pub fn restarts(policy: RestartPolicy, code: i32) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => code != 0,
        RestartPolicy::Never => false,
    }
}

/// Tears everything of a pod down: running containers stopped with `grace`, then removed; the
/// sandboxes stopped and removed.
pub fn teardown(observed: &Observed, grace_secs: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    for c in &observed.containers {
        if matches!(c.state, ContainerState::Running | ContainerState::Unknown) {
            actions.push(Action::StopContainer {
                id: c.id.clone(),
                grace_secs,
            });
        }
    }
    for c in &observed.containers {
        actions.push(Action::RemoveContainer { id: c.id.clone() });
    }
    for s in &observed.sandboxes {
        actions.push(Action::StopSandbox { id: s.id.clone() });
        actions.push(Action::RemoveSandbox { id: s.id.clone() });
    }
    actions
}

/// Whether the pod has run to its end (nothing will restart): then its sandbox is not replaced.
fn finished(pod: &Pod, observed: &Observed) -> bool {
    let policy = pod.restart_policy();
    if policy == RestartPolicy::Always {
        return false;
    }
    let newest = |name: &str| {
        observed
            .containers
            .iter()
            .filter(|c| c.name == name)
            .max_by_key(|c| (c.attempt, c.created_at))
    };
    let init_failed = pod.spec.init_containers.iter().any(|i| {
        newest(&i.name).is_some_and(|c| {
            c.state == ContainerState::Exited && c.exit_code != 0 && !restarts(policy, c.exit_code)
        })
    });
    init_failed
        || pod.spec.containers.iter().all(|spec| {
            newest(&spec.name).is_some_and(|c| {
                c.state == ContainerState::Exited && !restarts(policy, c.exit_code)
            })
        })
}

/// The next actions for `pod` (`None`: no longer wanted here, or being deleted).
pub fn decide(
    pod: Option<&Pod>,
    observed: &Observed,
    memory: &PodMemory,
    bounds: Bounds,
    now_ms: u64,
) -> Vec<Action> {
    let Some(pod) = pod.filter(|p| !p.deleting()) else {
        let grace = pod.map_or(30, Pod::grace_seconds);
        return teardown(observed, grace);
    };
    let mut actions = Vec::new();
    let Some(sandbox) = observed.ready_sandbox() else {
        if finished(pod, observed) {
            return actions;
        }
        // A dead sandbox takes its containers with it; a new one starts from the first init.
        actions = teardown(observed, 0);
        let attempt = observed
            .sandboxes
            .iter()
            .map(|s| s.attempt + 1)
            .max()
            .unwrap_or(0);
        actions.push(Action::RunSandbox { attempt });
        return actions;
    };
    // Older sandboxes and whatever runs in them go.
    for old in observed.sandboxes.iter().filter(|s| s.id != sandbox.id) {
        let mut leftovers = Observed {
            sandboxes: vec![old.clone()],
            containers: Vec::new(),
        };
        leftovers.containers = observed
            .containers
            .iter()
            .filter(|c| c.sandbox_id == old.id)
            .cloned()
            .collect();
        actions.extend(teardown(&leftovers, 0));
    }
    let policy = pod.restart_policy();
    let sid = sandbox.id.clone();
    // Exited instances beyond the newest `keep_dead` + the current one are removed.
    let collect = |instances: &[&ContainerSeen], actions: &mut Vec<Action>| {
        for dead in instances.iter().skip(1 + bounds.keep_dead) {
            if dead.state == ContainerState::Exited || dead.state == ContainerState::Created {
                actions.push(Action::RemoveContainer {
                    id: dead.id.clone(),
                });
            }
        }
    };
    let image_waits = |image: &str| {
        memory
            .pull_failures
            .get(image)
            .is_some_and(|f| now_ms < f.at_ms + bounds.backoff_ms(f.count))
    };
    let start = |name: &str, image: &str, init: bool, attempt: u32, actions: &mut Vec<Action>| {
        if !image_waits(image) {
            actions.push(Action::StartContainer {
                sandbox_id: sid.clone(),
                name: name.to_owned(),
                init,
                attempt,
            });
        }
    };
    for init in &pod.spec.init_containers {
        let instances = observed.instances(&sandbox.id, &init.name);
        collect(&instances, &mut actions);
        match instances.first() {
            None => {
                start(&init.name, &init.image, true, 0, &mut actions);
                return actions;
            }
            Some(c) if c.state == ContainerState::Exited && c.exit_code == 0 => continue,
            Some(c) if c.state == ContainerState::Exited => {
                if restarts(policy, c.exit_code) && due(c, bounds, now_ms) {
                    start(&init.name, &init.image, true, c.attempt + 1, &mut actions);
                }
                return actions;
            }
            Some(_) => return actions,
        }
    }
    for spec in &pod.spec.containers {
        let instances = observed.instances(&sandbox.id, &spec.name);
        collect(&instances, &mut actions);
        match instances.first() {
            None => start(&spec.name, &spec.image, false, 0, &mut actions),
            Some(c) if c.state == ContainerState::Exited => {
                if restarts(policy, c.exit_code) && due(c, bounds, now_ms) {
                    start(&spec.name, &spec.image, false, c.attempt + 1, &mut actions);
                }
            }
            Some(_) => {}
        }
    }
    actions
}

/// Whether the back-off after `c`'s exit has passed (its attempt counts the restarts so far).
fn due(c: &ContainerSeen, bounds: Bounds, now_ms: u64) -> bool {
    let finished_ms = u64::try_from(c.finished_at / 1_000_000).unwrap_or(0);
    now_ms >= finished_ms + bounds.backoff_ms(c.attempt)
}

/// Whether container `c` waits in a crash-loop back-off (exited, will restart, not yet due).
pub fn in_backoff(c: &ContainerSeen, policy: RestartPolicy, bounds: Bounds, now_ms: u64) -> bool {
    c.state == ContainerState::Exited && restarts(policy, c.exit_code) && !due(c, bounds, now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const B: Bounds = Bounds {
        backoff_initial_ms: 10_000,
        backoff_max_ms: 300_000,
        keep_dead: 1,
    };

    fn pod(policy: &str, inits: &[&str]) -> Pod {
        let inits: Vec<_> = inits
            .iter()
            .map(|n| json!({"name": n, "image": "busybox"}))
            .collect();
        Pod::from_json(
            &json!({"metadata": {"name": "p", "namespace": "d", "uid": "u"},
                    "spec": {"restartPolicy": policy, "terminationGracePeriodSeconds": 7,
                             "initContainers": inits,
                             "containers": [{"name": "a", "image": "busybox"},
                                            {"name": "b", "image": "missing"}]}})
            .to_string(),
        )
        .unwrap()
    }

    fn sandbox(id: &str, ready: bool) -> SandboxSeen {
        SandboxSeen {
            id: id.into(),
            pod_uid: "u".into(),
            attempt: 0,
            ready,
            created_at: 1,
        }
    }

    fn container(
        id: &str,
        name: &str,
        attempt: u32,
        state: ContainerState,
        code: i32,
    ) -> ContainerSeen {
        ContainerSeen {
            id: id.into(),
            pod_uid: "u".into(),
            sandbox_id: "s".into(),
            name: name.into(),
            attempt,
            state,
            exit_code: code,
            created_at: i64::from(attempt),
            started_at: 1,
            finished_at: if state == ContainerState::Exited {
                100_000_000_000
            } else {
                0
            },
            reason: String::new(),
            message: String::new(),
            image: "busybox".into(),
            image_ref: String::new(),
        }
    }

    fn start(name: &str, init: bool, attempt: u32) -> Action {
        Action::StartContainer {
            sandbox_id: "s".into(),
            name: name.into(),
            init,
            attempt,
        }
    }

    #[test]
    fn a_new_pod_gets_a_sandbox_then_its_containers() {
        let p = pod("Always", &[]);
        let none = Observed::default();
        assert_eq!(
            decide(Some(&p), &none, &PodMemory::default(), B, 0),
            [Action::RunSandbox { attempt: 0 }]
        );
        let with_sandbox = Observed {
            sandboxes: vec![sandbox("s", true)],
            containers: vec![],
        };
        assert_eq!(
            decide(Some(&p), &with_sandbox, &PodMemory::default(), B, 0),
            [start("a", false, 0), start("b", false, 0)]
        );
    }

    #[test]
    fn init_containers_run_one_at_a_time_in_order() {
        let p = pod("Always", &["i1", "i2"]);
        let mut o = Observed {
            sandboxes: vec![sandbox("s", true)],
            containers: vec![],
        };
        let m = PodMemory::default();
        assert_eq!(decide(Some(&p), &o, &m, B, 0), [start("i1", true, 0)]);
        o.containers
            .push(container("c1", "i1", 0, ContainerState::Running, 0));
        assert_eq!(decide(Some(&p), &o, &m, B, 0), []);
        o.containers[0] = container("c1", "i1", 0, ContainerState::Exited, 0);
        assert_eq!(decide(Some(&p), &o, &m, B, 0), [start("i2", true, 0)]);
        o.containers
            .push(container("c2", "i2", 0, ContainerState::Exited, 1));
        // A failed init container restarts (policy Always) after its back-off; nothing after it.
        assert_eq!(decide(Some(&p), &o, &m, B, 100_000), [start("i2", true, 1)]);
        let never = pod("Never", &["i1", "i2"]);
        assert_eq!(decide(Some(&never), &o, &m, B, 100_000), []);
    }

    #[test]
    fn restarts_follow_the_policy_and_back_off() {
        let m = PodMemory::default();
        let exited = |code| Observed {
            sandboxes: vec![sandbox("s", true)],
            containers: vec![
                container("a2", "a", 2, ContainerState::Exited, code),
                container("a1", "a", 1, ContainerState::Exited, code),
                container("a0", "a", 0, ContainerState::Exited, code),
                container("b0", "b", 0, ContainerState::Running, 0),
            ],
        };
        let finished = 100_000;
        // Attempt 2 restarted twice: the third restart waits 2 × 10 s after the exit.
        let always = pod("Always", &[]);
        let early = decide(Some(&always), &exited(0), &m, B, finished + 19_999);
        assert_eq!(early, [Action::RemoveContainer { id: "a0".into() }]);
        let due = decide(Some(&always), &exited(0), &m, B, finished + 20_000);
        assert_eq!(
            due,
            [
                Action::RemoveContainer { id: "a0".into() },
                start("a", false, 3)
            ]
        );
        let on_failure = pod("OnFailure", &[]);
        assert_eq!(
            decide(Some(&on_failure), &exited(0), &m, B, finished + 99_000),
            [Action::RemoveContainer { id: "a0".into() }]
        );
        assert_eq!(
            decide(Some(&on_failure), &exited(3), &m, B, finished + 99_000),
            [
                Action::RemoveContainer { id: "a0".into() },
                start("a", false, 3)
            ]
        );
        assert_eq!(B.backoff_ms(0), 0);
        assert_eq!(B.backoff_ms(1), 10_000);
        assert_eq!(B.backoff_ms(6), 300_000);
        assert_eq!(B.backoff_ms(60), 300_000);
    }

    #[test]
    fn a_failed_pull_waits_its_back_off() {
        let p = pod("Always", &[]);
        let o = Observed {
            sandboxes: vec![sandbox("s", true)],
            containers: vec![container("a0", "a", 0, ContainerState::Running, 0)],
        };
        let mut m = PodMemory::default();
        m.pull_failures.insert(
            "missing".into(),
            PullFailure {
                count: 2,
                at_ms: 1_000,
                message: "not found".into(),
            },
        );
        assert_eq!(decide(Some(&p), &o, &m, B, 20_999), []);
        assert_eq!(decide(Some(&p), &o, &m, B, 21_000), [start("b", false, 0)]);
    }

    #[test]
    fn deletion_stops_with_the_grace_period_then_removes() {
        let mut p = pod("Always", &[]);
        let o = Observed {
            sandboxes: vec![sandbox("s", true)],
            containers: vec![
                container("a0", "a", 0, ContainerState::Running, 0),
                container("b0", "b", 0, ContainerState::Exited, 1),
            ],
        };
        let m = PodMemory::default();
        p.metadata.deletion_timestamp = Some("2026-01-01T00:00:00Z".into());
        p.metadata.deletion_grace_period_seconds = Some(3);
        let expected = [
            Action::StopContainer {
                id: "a0".into(),
                grace_secs: 3,
            },
            Action::RemoveContainer { id: "a0".into() },
            Action::RemoveContainer { id: "b0".into() },
            Action::StopSandbox { id: "s".into() },
            Action::RemoveSandbox { id: "s".into() },
        ];
        assert_eq!(decide(Some(&p), &o, &m, B, 0), expected);
        // Gone from the store: the last known grace period.
        p.metadata.deletion_timestamp = None;
        p.metadata.deletion_grace_period_seconds = None;
        let torn = teardown(&o, p.grace_seconds());
        assert_eq!(
            torn[0],
            Action::StopContainer {
                id: "a0".into(),
                grace_secs: 7
            }
        );
        assert_eq!(decide(None, &Observed::default(), &m, B, 0), []);
    }

    #[test]
    fn a_dead_sandbox_is_replaced_unless_the_pod_finished() {
        let p = pod("Always", &[]);
        let mut o = Observed {
            sandboxes: vec![sandbox("s", false)],
            containers: vec![container("a0", "a", 0, ContainerState::Exited, 0)],
        };
        let m = PodMemory::default();
        assert_eq!(
            decide(Some(&p), &o, &m, B, 0),
            [
                Action::RemoveContainer { id: "a0".into() },
                Action::StopSandbox { id: "s".into() },
                Action::RemoveSandbox { id: "s".into() },
                Action::RunSandbox { attempt: 1 },
            ]
        );
        let never = pod("Never", &[]);
        o.containers
            .push(container("b0", "b", 0, ContainerState::Exited, 0));
        assert_eq!(decide(Some(&never), &o, &m, B, 0), []);
    }
}
