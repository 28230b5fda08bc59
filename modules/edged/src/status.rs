//! A pod's status as Kubernetes shows it (phase, conditions, container statuses), from the same
//! inputs as the reconcile decision (sans-IO). Times are RFC 3339 from the runtime's ns
//! timestamps; the caller stamps condition transition times (`stamp`).

use serde_json::{Value, json};

use crate::pod::{Container, Pod, RestartPolicy};
use crate::reconcile::{Bounds, ContainerSeen, ContainerState, Observed, PodMemory, in_backoff};

/// RFC 3339 (seconds) of ns since the epoch.
pub fn rfc3339_ns(ns: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn state_of(c: &ContainerSeen) -> Value {
    match c.state {
        ContainerState::Running => json!({"running": {"startedAt": rfc3339_ns(c.started_at)}}),
        ContainerState::Exited => {
            let reason = if !c.reason.is_empty() {
                c.reason.clone()
            } else if c.exit_code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            };
            let mut t = json!({"exitCode": c.exit_code, "reason": reason,
                "startedAt": rfc3339_ns(c.started_at), "finishedAt": rfc3339_ns(c.finished_at),
                "containerID": format!("containerd://{}", c.id)});
            if !c.message.is_empty() {
                t["message"] = json!(c.message);
            }
            json!({ "terminated": t })
        }
        ContainerState::Created => json!({"waiting": {"reason": "ContainerCreating"}}),
        ContainerState::Unknown => json!({"waiting": {"reason": "Unknown"}}),
    }
}

/// One container's status.
fn container_status(
    spec: &Container,
    instances: &[&ContainerSeen],
    memory: &PodMemory,
    policy: RestartPolicy,
    bounds: Bounds,
    now_ms: u64,
) -> Value {
    let current = instances.first();
    let mut status = json!({
        "name": spec.name,
        "image": spec.image,
        "imageID": current.map(|c| c.image_ref.clone()).unwrap_or_default(),
        "restartCount": current.map_or(0, |c| c.attempt),
        "ready": false,
        "started": current.is_some_and(|c| c.state == ContainerState::Running),
        "lastState": {},
    });
    if let Some(c) = current {
        status["containerID"] = json!(format!("containerd://{}", c.id));
        let running = c.state == ContainerState::Running;
        status["ready"] = json!(
            running
                && memory
                    .ready
                    .get(&spec.name)
                    .copied()
                    .unwrap_or(spec.readiness_probe.is_none())
        );
        status["state"] = state_of(c);
        if in_backoff(c, policy, bounds, now_ms) {
            status["lastState"] = state_of(c);
            status["state"] = json!({"waiting": {"reason": "CrashLoopBackOff",
                "message": format!("back-off restarting failed container {}", spec.name)}});
        } else if let Some(previous) = instances.get(1) {
            status["lastState"] = state_of(previous);
        }
    } else if let Some(f) = memory.pull_failures.get(&spec.image) {
        let reason = if f.count > 1 {
            "ImagePullBackOff"
        } else {
            "ErrImagePull"
        };
        status["state"] = json!({"waiting": {"reason": reason, "message": f.message}});
    } else if let Some((reason, message)) = memory.config_errors.get(&spec.name) {
        status["state"] = json!({"waiting": {"reason": reason, "message": message}});
    } else {
        status["state"] = json!({"waiting": {"reason": "ContainerCreating"}});
    }
    status
}

/// The pod's status without transition times: `phase`, `conditions` (type, status, reason),
/// `containerStatuses`, `initContainerStatuses`, `hostIP`/`podIP` when given.
pub fn pod_status(
    pod: &Pod,
    observed: &Observed,
    memory: &PodMemory,
    bounds: Bounds,
    now_ms: u64,
    pod_ip: Option<&str>,
) -> Value {
    let policy = pod.restart_policy();
    let sandbox = observed.ready_sandbox().map(|s| s.id.clone());
    let instances = |name: &str| match &sandbox {
        Some(s) => observed.instances(s, name),
        None => {
            let mut v: Vec<&ContainerSeen> = observed
                .containers
                .iter()
                .filter(|c| c.name == name)
                .collect();
            v.sort_by_key(|c| std::cmp::Reverse(c.attempt));
            v
        }
    };
    let statuses = |specs: &[Container]| -> Vec<Value> {
        specs
            .iter()
            .map(|s| container_status(s, &instances(&s.name), memory, policy, bounds, now_ms))
            .collect()
    };
    let init_statuses = statuses(&pod.spec.init_containers);
    let container_statuses = statuses(&pod.spec.containers);
    let exited = |s: &Value| s["state"]["terminated"].is_object();
    let exit_code = |s: &Value| s["state"]["terminated"]["exitCode"].as_i64().unwrap_or(0);
    let init_done = init_statuses.iter().all(|s| exited(s) && exit_code(s) == 0);
    let init_failed = policy == RestartPolicy::Never
        && init_statuses.iter().any(|s| exited(s) && exit_code(s) != 0);
    let running = container_statuses
        .iter()
        .filter(|s| s["state"]["running"].is_object())
        .count();
    let all_ended = container_statuses.iter().all(&exited);
    let all_zero = container_statuses.iter().all(|s| exit_code(s) == 0);
    let phase = if init_failed {
        "Failed"
    } else if !init_done {
        "Pending"
    } else if all_ended && policy != RestartPolicy::Always && all_zero {
        "Succeeded"
    } else if all_ended && policy == RestartPolicy::Never {
        "Failed"
    } else if running > 0
        || container_statuses
            .iter()
            .all(|s| s["restartCount"] != 0 || exited(s))
    {
        "Running"
    } else {
        "Pending"
    };
    let all_ready = container_statuses.iter().all(|s| s["ready"] == true);
    let condition = |ty: &str, ok: bool, reason: &str| {
        let mut c = json!({"type": ty, "status": if ok { "True" } else { "False" }});
        if !ok && !reason.is_empty() {
            c["reason"] = json!(reason);
        }
        c
    };
    let mut status = json!({
        "phase": phase,
        "conditions": [
            condition("Initialized", init_done, "ContainersNotInitialized"),
            condition("Ready", all_ready, "ContainersNotReady"),
            condition("ContainersReady", all_ready, "ContainersNotReady"),
            condition("PodScheduled", true, ""),
        ],
        "containerStatuses": container_statuses,
    });
    if !init_statuses.is_empty() {
        status["initContainerStatuses"] = json!(init_statuses);
    }
    if let Some(ip) = pod_ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    status
}

/// Sets `lastTransitionTime` of each condition: kept from `previous` where the condition's
/// status did not change, `now` otherwise; `startTime` kept or `now`.
pub fn stamp(status: &mut Value, previous: Option<&Value>, now: &str) {
    let old = |ty: &str| {
        previous.and_then(|p| {
            p["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == ty)
                .cloned()
        })
    };
    if let Some(conditions) = status["conditions"].as_array_mut() {
        for c in conditions {
            let ty = c["type"].as_str().unwrap_or_default().to_owned();
            let time = match old(&ty) {
                Some(o) if o["status"] == c["status"] => o["lastTransitionTime"].clone(),
                _ => json!(now),
            };
            c["lastTransitionTime"] = time;
        }
    }
    status["startTime"] = previous
        .map(|p| p["startTime"].clone())
        .filter(|t| t.is_string())
        .unwrap_or_else(|| json!(now));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{PullFailure, SandboxSeen};

    const B: Bounds = Bounds {
        backoff_initial_ms: 10_000,
        backoff_max_ms: 300_000,
        keep_dead: 1,
    };

    fn pod(policy: &str) -> Pod {
        Pod::from_json(
            &json!({"metadata": {"name": "p", "namespace": "d", "uid": "u"},
                    "spec": {"restartPolicy": policy,
                             "containers": [{"name": "a", "image": "busybox"}]}})
            .to_string(),
        )
        .unwrap()
    }

    fn seen(attempt: u32, state: ContainerState, code: i32) -> ContainerSeen {
        ContainerSeen {
            id: format!("a{attempt}"),
            pod_uid: "u".into(),
            sandbox_id: "s".into(),
            name: "a".into(),
            attempt,
            state,
            exit_code: code,
            created_at: i64::from(attempt),
            started_at: 1_000_000_000,
            finished_at: if state == ContainerState::Exited {
                2_000_000_000
            } else {
                0
            },
            reason: String::new(),
            message: String::new(),
            image: "busybox".into(),
            image_ref: "sha256:x".into(),
        }
    }

    fn observed(containers: Vec<ContainerSeen>) -> Observed {
        Observed {
            sandboxes: vec![SandboxSeen {
                id: "s".into(),
                pod_uid: "u".into(),
                attempt: 0,
                ready: true,
                created_at: 0,
            }],
            containers,
        }
    }

    #[test]
    fn running_pod() {
        let s = pod_status(
            &pod("Always"),
            &observed(vec![seen(0, ContainerState::Running, 0)]),
            &PodMemory::default(),
            B,
            0,
            Some("10.0.0.2"),
        );
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["conditions"][1]["status"], "True");
        assert_eq!(s["containerStatuses"][0]["ready"], true);
        assert_eq!(
            s["containerStatuses"][0]["state"]["running"]["startedAt"],
            "1970-01-01T00:00:01Z"
        );
        assert_eq!(s["podIP"], "10.0.0.2");
    }

    #[test]
    fn crash_loop_and_restart_count() {
        let o = observed(vec![
            seen(2, ContainerState::Exited, 1),
            seen(1, ContainerState::Exited, 1),
        ]);
        let s = pod_status(&pod("Always"), &o, &PodMemory::default(), B, 3_000, None);
        let c = &s["containerStatuses"][0];
        assert_eq!(c["restartCount"], 2);
        assert_eq!(c["state"]["waiting"]["reason"], "CrashLoopBackOff");
        assert_eq!(c["lastState"]["terminated"]["exitCode"], 1);
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["conditions"][1]["status"], "False");
    }

    #[test]
    fn ended_pods() {
        let done = observed(vec![seen(0, ContainerState::Exited, 0)]);
        let failed = observed(vec![seen(0, ContainerState::Exited, 2)]);
        let m = PodMemory::default();
        assert_eq!(
            pod_status(&pod("Never"), &done, &m, B, 0, None)["phase"],
            "Succeeded"
        );
        assert_eq!(
            pod_status(&pod("OnFailure"), &done, &m, B, 0, None)["phase"],
            "Succeeded"
        );
        assert_eq!(
            pod_status(&pod("Never"), &failed, &m, B, 0, None)["phase"],
            "Failed"
        );
    }

    #[test]
    fn pull_errors_are_waiting_reasons() {
        let mut m = PodMemory::default();
        m.pull_failures.insert(
            "busybox".into(),
            PullFailure {
                count: 1,
                at_ms: 0,
                message: "pull access denied".into(),
            },
        );
        let s = pod_status(&pod("Always"), &observed(vec![]), &m, B, 0, None);
        assert_eq!(s["phase"], "Pending");
        let w = &s["containerStatuses"][0]["state"]["waiting"];
        assert_eq!(w["reason"], "ErrImagePull");
        assert_eq!(w["message"], "pull access denied");
        m.pull_failures.get_mut("busybox").unwrap().count = 2;
        let s = pod_status(&pod("Always"), &observed(vec![]), &m, B, 0, None);
        assert_eq!(
            s["containerStatuses"][0]["state"]["waiting"]["reason"],
            "ImagePullBackOff"
        );
    }

    #[test]
    fn transition_times_kept_while_unchanged() {
        let mut first = json!({"conditions": [{"type": "Ready", "status": "False"}]});
        stamp(&mut first, None, "T1");
        let mut same = json!({"conditions": [{"type": "Ready", "status": "False"}]});
        stamp(&mut same, Some(&first), "T2");
        assert_eq!(same["conditions"][0]["lastTransitionTime"], "T1");
        assert_eq!(same["startTime"], "T1");
        let mut changed = json!({"conditions": [{"type": "Ready", "status": "True"}]});
        stamp(&mut changed, Some(&same), "T3");
        assert_eq!(changed["conditions"][0]["lastTransitionTime"], "T3");
    }
}
