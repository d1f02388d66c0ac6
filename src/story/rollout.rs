//! The workload controllers the test control plane lacks (it has no nodes, so no pod ever
//! runs), played through the status subresource. A played controller reports a scripted
//! rollout for every new generation, step by step (the spec not yet observed, old pods still
//! running, new pods not yet available, done, or a Deployment past its progress deadline), so
//! the story and the tests can show what driftless does at each step, not only at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

/// How often a played controller looks for new generations.
const POLL: Duration = Duration::from_millis(100);
/// The nodes a played DaemonSet controller schedules a pod on.
const DAEMON_NODES: i64 = 2;

/// A workload kind of `apps/v1` whose controller can be played.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl Workload {
    fn kind(self) -> &'static str {
        match self {
            Workload::Deployment => "Deployment",
            Workload::StatefulSet => "StatefulSet",
            Workload::DaemonSet => "DaemonSet",
        }
    }
}

/// One status a played controller reports for a workload's newest generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutStep {
    /// The new generation is not observed yet: the status is left as it was.
    Unobserved,
    /// Observed, and a pod of the old revision still runs: a Deployment has every new replica
    /// up and one old replica pending termination; a StatefulSet and a DaemonSet have every
    /// pod to update but one updated (all ready).
    OldPodsRemain,
    /// Every pod updated, one of them not yet available (ready).
    UpdatedNotAvailable,
    /// The rollout is done. For a StatefulSet with a partition, only the pods at or above
    /// the partition are updated, as the real controller does.
    Complete,
    /// A Deployment's controller gave up: `Progressing` is `False` with reason
    /// `ProgressDeadlineExceeded`. StatefulSets and DaemonSets have no deadline: for them it
    /// is [`RolloutStep::OldPodsRemain`] forever.
    DeadlineExceeded,
}

/// A step a played controller reported (or is about to: see `written`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub name: String,
    pub generation: i64,
    pub step: RolloutStep,
    /// Whether the status is in the API server. An entry is logged before its status is
    /// written, so whoever saw the status finds its entry.
    pub written: bool,
}

/// The steps to report for one generation of a workload (given the live object).
pub type Script = Arc<dyn Fn(&Value) -> Vec<RolloutStep> + Send + Sync>;

/// A played controller of one workload kind in one namespace. It reports the first step of
/// its script as soon as it sees a new generation, and each further step only after
/// [`advance`](PlayedController::advance): whoever drives it decides when a rollout moves
/// on. A new generation starts its script over. Stops when dropped.
pub struct PlayedController {
    task: tokio::task::JoinHandle<()>,
    advance: Arc<Semaphore>,
    reported: watch::Receiver<Vec<Reported>>,
}

/// Where one workload is in its script.
struct Rollout {
    generation: i64,
    steps: Vec<RolloutStep>,
    at: usize,
    /// Index of the current step's entry in the log, once logged.
    entry: Option<usize>,
    written: bool,
}

impl PlayedController {
    /// Starts playing the controller of `workload` in `namespace`. Workloads whose status
    /// already observed their generation when first seen are left alone until it moves.
    pub fn start(
        client: Client,
        namespace: &str,
        workload: Workload,
        script: impl Fn(&Value) -> Vec<RolloutStep> + Send + Sync + 'static,
    ) -> PlayedController {
        let gvk = GroupVersionKind::gvk("apps", "v1", workload.kind());
        let api: Api<DynamicObject> =
            Api::namespaced_with(client, namespace, &ApiResource::from_gvk(&gvk));
        let advance = Arc::new(Semaphore::new(0));
        let (log, reported) = watch::channel(Vec::new());
        let script: Script = Arc::new(script);
        let task = tokio::spawn(play(api, workload, script, advance.clone(), log));
        PlayedController {
            task,
            advance,
            reported,
        }
    }

    /// Lets the controller report the next step of a rollout (one step in all).
    pub fn advance(&self) {
        self.advance.add_permits(1);
    }

    /// Stops playing (as dropping it does).
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Every step reported so far, in order.
    pub fn reported(&self) -> Vec<Reported> {
        self.reported.borrow().clone()
    }

    /// Waits until the log has an entry at `index` (0-based, in reporting order) and its
    /// status is written to the API server; returns it. Fails after `within`, quoting the log.
    pub async fn wait_written(&self, index: usize, within: Duration) -> Result<Reported, String> {
        let mut rx = self.reported.clone();
        let found = tokio::time::timeout(within, async {
            loop {
                let hit = rx
                    .borrow_and_update()
                    .get(index)
                    .filter(|r| r.written)
                    .cloned();
                if hit.is_some() {
                    return hit;
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        found.ok().flatten().ok_or_else(|| {
            format!(
                "the played controller wrote no step #{index} within {within:?}; it reported {:?}",
                self.reported()
            )
        })
    }
}

impl Drop for PlayedController {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn play(
    api: Api<DynamicObject>,
    workload: Workload,
    script: Script,
    advance: Arc<Semaphore>,
    log: watch::Sender<Vec<Reported>>,
) {
    let mut rollouts: HashMap<String, Rollout> = HashMap::new();
    loop {
        if let Ok(list) = api.list(&ListParams::default()).await {
            for obj in list.items {
                let Some(name) = obj.metadata.name.clone() else {
                    continue;
                };
                let value = serde_json::to_value(&obj).unwrap_or(Value::Null);
                let rollout = next_step(&mut rollouts, &name, &value, &script, &advance);
                if rollout.written {
                    continue;
                }
                let step = rollout.steps[rollout.at];
                let entry = *rollout.entry.get_or_insert_with(|| {
                    let mut index = 0;
                    log.send_modify(|l| {
                        index = l.len();
                        l.push(Reported {
                            name: name.clone(),
                            generation: rollout.generation,
                            step,
                            written: false,
                        })
                    });
                    index
                });
                let written = match rollout_status(workload, step, &value) {
                    None => true,
                    Some(status) => api
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                        .is_ok(),
                };
                if written {
                    rollout.written = true;
                    log.send_modify(|l| l[entry].written = true);
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The rollout of `name` as of its live object `value`: a new one for a new generation, the
/// next step when the current one is written and a step may be taken.
fn next_step<'a>(
    rollouts: &'a mut HashMap<String, Rollout>,
    name: &str,
    value: &Value,
    script: &Script,
    advance: &Semaphore,
) -> &'a mut Rollout {
    let generation = value["metadata"]["generation"].as_i64().unwrap_or(0);
    let observed = value["status"]["observedGeneration"].as_i64().unwrap_or(0);
    let fresh = |steps: Vec<RolloutStep>| Rollout {
        generation,
        written: steps.is_empty(),
        steps,
        at: 0,
        entry: None,
    };
    let rollout = rollouts.entry(name.to_string()).or_insert_with(|| {
        // Already observed when first seen: not this controller's rollout.
        fresh(if observed >= generation {
            Vec::new()
        } else {
            script(value)
        })
    });
    if rollout.generation != generation {
        *rollout = fresh(script(value));
    } else if rollout.written && rollout.at + 1 < rollout.steps.len() {
        if let Ok(permit) = advance.try_acquire() {
            permit.forget();
            rollout.at += 1;
            rollout.entry = None;
            rollout.written = false;
        }
    }
    rollout
}

/// The status a workload's controller reports at `step` of its rollout (a merge patch of the
/// status subresource), or `None` when it reports nothing.
pub fn rollout_status(workload: Workload, step: RolloutStep, obj: &Value) -> Option<Value> {
    if step == RolloutStep::Unobserved {
        return None;
    }
    let generation = obj["metadata"]["generation"].as_i64().unwrap_or(0);
    let replicas = obj["spec"]["replicas"].as_i64().unwrap_or(1);
    let status = match workload {
        Workload::Deployment => deployment_status(step, replicas),
        Workload::StatefulSet => {
            let partition = obj["spec"]["updateStrategy"]["rollingUpdate"]["partition"]
                .as_i64()
                .unwrap_or(0);
            let name = obj["metadata"]["name"].as_str().unwrap_or("set");
            stateful_set_status(step, replicas, partition, name, generation)
        }
        Workload::DaemonSet => daemon_set_status(step),
    };
    let mut status = status;
    status["observedGeneration"] = json!(generation);
    Some(json!({ "status": status }))
}

fn deployment_status(step: RolloutStep, n: i64) -> Value {
    let progressing = |status: &str, reason: &str, message: &str| {
        json!([
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
            {"type": "Progressing", "status": status, "reason": reason, "message": message},
        ])
    };
    let (replicas, updated, available, conditions) = match step {
        RolloutStep::OldPodsRemain => (
            n + 1,
            n,
            n + 1,
            progressing("True", "ReplicaSetUpdated", "rolling out"),
        ),
        RolloutStep::UpdatedNotAvailable => (
            n,
            n,
            n - 1,
            progressing("True", "ReplicaSetUpdated", "rolling out"),
        ),
        RolloutStep::DeadlineExceeded => (
            n + 1,
            1,
            n,
            progressing(
                "False",
                "ProgressDeadlineExceeded",
                "ReplicaSet \"web\" has timed out progressing.",
            ),
        ),
        RolloutStep::Complete | RolloutStep::Unobserved => (
            n,
            n,
            n,
            progressing("True", "NewReplicaSetAvailable", "rolled out"),
        ),
    };
    json!({"replicas": replicas, "updatedReplicas": updated, "readyReplicas": available,
        "availableReplicas": available, "unavailableReplicas": replicas - available,
        "conditions": conditions})
}

/// Revisions are named after the generation that made them (the real controller hashes the
/// pod template); a set's first generation has no older revision.
fn stateful_set_status(
    step: RolloutStep,
    n: i64,
    partition: i64,
    name: &str,
    generation: i64,
) -> Value {
    let update = format!("{name}-{generation}");
    let current = format!("{name}-{}", (generation - 1).max(1));
    // The pods a rollout updates: those at or above the partition.
    let target = (n - partition).max(0);
    let (ready, updated, current_revision) = match step {
        RolloutStep::OldPodsRemain | RolloutStep::DeadlineExceeded => {
            (n, (target - 1).max(0), current)
        }
        RolloutStep::UpdatedNotAvailable => (n - 1, target, current),
        RolloutStep::Complete | RolloutStep::Unobserved if partition > 0 => (n, target, current),
        RolloutStep::Complete | RolloutStep::Unobserved => (n, n, update.clone()),
    };
    json!({"replicas": n, "readyReplicas": ready, "currentReplicas": n - updated,
        "updatedReplicas": updated, "currentRevision": current_revision,
        "updateRevision": update})
}

fn daemon_set_status(step: RolloutStep) -> Value {
    let n = DAEMON_NODES;
    let (updated, available) = match step {
        RolloutStep::OldPodsRemain | RolloutStep::DeadlineExceeded => (n - 1, n),
        RolloutStep::UpdatedNotAvailable => (n, n - 1),
        RolloutStep::Complete | RolloutStep::Unobserved => (n, n),
    };
    json!({"desiredNumberScheduled": n, "currentNumberScheduled": n,
        "updatedNumberScheduled": updated, "numberReady": available,
        "numberAvailable": available, "numberUnavailable": n - available,
        "numberMisscheduled": 0})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ObjectRef;
    use crate::reconcile::health::{health, Health};

    fn object(kind: &str, generation: i64, spec: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": kind,
            "metadata": {"name": "web", "generation": generation}, "spec": spec})
    }

    /// What driftless's health rules make of a played step.
    fn verdict(workload: Workload, step: RolloutStep, obj: &Value) -> Health {
        let mut live = obj.clone();
        if let Some(patch) = rollout_status(workload, step, obj) {
            live["status"] = patch["status"].clone();
        }
        let id = ObjectRef {
            api_version: "apps/v1".into(),
            kind: workload.kind().into(),
            namespace: Some("demo".into()),
            name: "web".into(),
        };
        health(&id, &live)
    }

    /// Every played step means to driftless what it says: only `Complete` is healthy, the
    /// deadline fails a Deployment, every other step is waited on.
    #[test]
    fn played_steps_are_judged_as_they_are_meant() {
        use RolloutStep::*;
        let deployment = object("Deployment", 2, json!({"replicas": 2}));
        let set = object("StatefulSet", 2, json!({"replicas": 3}));
        let partitioned = object(
            "StatefulSet",
            2,
            json!({"replicas": 3, "updateStrategy": {"type": "RollingUpdate",
                "rollingUpdate": {"partition": 2}}}),
        );
        let daemons = object("DaemonSet", 2, json!({}));
        let cases = [
            (Workload::Deployment, &deployment),
            (Workload::StatefulSet, &set),
            (Workload::StatefulSet, &partitioned),
            (Workload::DaemonSet, &daemons),
        ];
        for (workload, obj) in cases {
            for step in [Unobserved, OldPodsRemain, UpdatedNotAvailable] {
                let h = verdict(workload, step, obj);
                assert!(
                    matches!(h, Health::Progressing(_)),
                    "{workload:?} {step:?}: {h:?}"
                );
            }
            assert_eq!(
                verdict(workload, Complete, obj),
                Health::Healthy,
                "{workload:?}"
            );
        }
        assert!(matches!(
            verdict(Workload::Deployment, DeadlineExceeded, &deployment),
            Health::Failed(_)
        ));
        assert!(matches!(
            verdict(Workload::StatefulSet, DeadlineExceeded, &set),
            Health::Progressing(_)
        ));
    }
}
