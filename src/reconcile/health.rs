//! Is an applied object healthy yet? Read from its live status the way its controller reports
//! progress, with `kubectl rollout status`'s rules for Deployments, StatefulSets and
//! DaemonSets, conditions for Jobs and anything with a `Ready` condition, the phase of
//! PersistentVolumeClaims. Everything else is healthy once applied. Pure functions on JSON.

use serde_json::Value;

use crate::manifest::ObjectRef;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Not there yet; the reason says what is missing.
    Progressing(String),
    /// Will not get there by waiting (a Deployment past its progress deadline, a failed Job, a
    /// lost claim).
    Failed(String),
}

/// The integer at `path`, if there is one.
fn int_at(v: &Value, path: &[&str]) -> Option<i64> {
    path.iter().try_fold(v, |cur, p| cur.get(p))?.as_i64()
}

/// The string at `path`, if there is one.
fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |cur, p| cur.get(p))?.as_str()
}

/// The status condition of type `kind`.
fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj.get("status")?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

fn is_true(c: Option<&Value>) -> bool {
    c.and_then(|c| str_at(c, &["status"])) == Some("True")
}

/// Whether the controller has seen the latest spec: kubectl's `generation <=
/// status.observedGeneration`, an absent one counting as 0.
fn observed(obj: &Value) -> Result<(), Health> {
    let generation = int_at(obj, &["metadata", "generation"]).unwrap_or(0);
    let seen = int_at(obj, &["status", "observedGeneration"]).unwrap_or(0);
    if generation <= seen {
        Ok(())
    } else {
        Err(unobserved(generation, seen))
    }
}

fn unobserved(generation: i64, seen: i64) -> Health {
    Health::Progressing(format!(
        "controller has not observed generation {generation} yet (its status is of generation {seen})"
    ))
}

/// Whether an object of this kind can be anything but healthy once applied: the workload
/// kinds, claims, and anything outside the core kinds that never carry a status (which may
/// have a `Ready` condition). Saves a GET per written ConfigMap, Service, RBAC object, ...
pub fn may_report_health(id: &ObjectRef) -> bool {
    let (group, _) = id.group_version();
    let statusless = matches!(
        (group, id.kind.as_str()),
        (
            "",
            "ConfigMap"
                | "Secret"
                | "Service"
                | "ServiceAccount"
                | "Endpoints"
                | "LimitRange"
                | "ResourceQuota"
                | "Namespace"
        ) | ("rbac.authorization.k8s.io", _)
            | ("networking.k8s.io", "NetworkPolicy")
            | ("policy", "PodDisruptionBudget")
            | ("scheduling.k8s.io", _)
            | ("admissionregistration.k8s.io", _)
            | ("apiextensions.k8s.io", _)
            | ("coordination.k8s.io", _)
    );
    !statusless
}

/// The health of the live object `obj` whose identity is `id` (its group and kind pick the
/// rules).
pub fn health(id: &ObjectRef, obj: &Value) -> Health {
    let (group, _) = id.group_version();
    match (group, id.kind.as_str()) {
        // `extensions` served both kinds up to Kubernetes 1.15.
        ("apps" | "extensions", "Deployment") => deployment(obj),
        ("apps", "StatefulSet") => stateful_set(obj),
        ("apps" | "extensions", "DaemonSet") => daemon_set(obj),
        ("batch", "Job") => job(obj),
        ("", "PersistentVolumeClaim") => claim(obj),
        _ => ready_condition(obj),
    }
}

/// kubectl's `DeploymentStatusViewer`, in its order: a `ProgressDeadlineExceeded` counts only
/// once the controller has observed this generation (a revert must not fail on the verdict
/// about the spec it replaces).
fn deployment(obj: &Value) -> Health {
    if let Err(wait) = observed(obj) {
        return wait;
    }
    if let Some(c) = condition(obj, "Progressing") {
        if str_at(c, &["reason"]) == Some("ProgressDeadlineExceeded") {
            return Health::Failed(format!(
                "exceeded its progress deadline: {}",
                str_at(c, &["message"]).unwrap_or("")
            ));
        }
    }
    let status = |field: &str| int_at(obj, &["status", field]).unwrap_or(0);
    let (replicas, updated, available) = (
        status("replicas"),
        status("updatedReplicas"),
        status("availableReplicas"),
    );
    if let Some(want) = int_at(obj, &["spec", "replicas"]) {
        if updated < want {
            return Health::Progressing(format!("{updated} of {want} new replicas updated"));
        }
    }
    if replicas > updated {
        return Health::Progressing(format!(
            "{} old replicas pending termination",
            replicas - updated
        ));
    }
    if available < updated {
        return Health::Progressing(format!(
            "{available} of {updated} updated replicas available"
        ));
    }
    Health::Healthy
}

/// The strategy of a workload's updates, `RollingUpdate` when unset (the API server's default).
fn update_strategy(obj: &Value) -> &str {
    str_at(obj, &["spec", "updateStrategy", "type"]).unwrap_or("RollingUpdate")
}

/// kubectl's `StatefulSetStatusViewer`, stricter in one place: a rollout with no partition is
/// done only when `updateRevision == currentRevision` and every replica is updated (kubectl
/// checks one or the other, depending on whether `rollingUpdate` is spelt out). An `OnDelete`
/// set is done once observed and ready: its controller replaces no pod by itself.
fn stateful_set(obj: &Value) -> Health {
    let generation = int_at(obj, &["metadata", "generation"]).unwrap_or(0);
    let seen = int_at(obj, &["status", "observedGeneration"]).unwrap_or(0);
    if seen == 0 || generation > seen {
        return unobserved(generation, seen);
    }
    let want = int_at(obj, &["spec", "replicas"]);
    let status = |field: &str| int_at(obj, &["status", field]).unwrap_or(0);
    let (ready, updated) = (status("readyReplicas"), status("updatedReplicas"));
    if let Some(want) = want {
        if ready < want {
            return Health::Progressing(format!("{ready} of {want} pods ready"));
        }
    }
    if update_strategy(obj) != "RollingUpdate" {
        return Health::Healthy;
    }
    let partition = int_at(
        obj,
        &["spec", "updateStrategy", "rollingUpdate", "partition"],
    )
    .unwrap_or(0);
    if partition > 0 {
        // A partitioned (canary) rollout updates only the pods at or above the partition;
        // the others stay at the current revision by design.
        return match want {
            Some(want) if updated < want - partition => Health::Progressing(format!(
                "partitioned rollout: {updated} of {} new pods updated",
                want - partition
            )),
            _ => Health::Healthy,
        };
    }
    let update_revision = str_at(obj, &["status", "updateRevision"]);
    let behind = want.is_some_and(|want| updated < want);
    if behind || update_revision != str_at(obj, &["status", "currentRevision"]) {
        return Health::Progressing(format!(
            "{updated} of {} pods updated to revision {}",
            want.map_or("all".to_string(), |w| w.to_string()),
            update_revision.unwrap_or("?")
        ));
    }
    Health::Healthy
}

/// kubectl's `DaemonSetStatusViewer`. An `OnDelete` set is done once observed and available:
/// its controller replaces no pod by itself.
fn daemon_set(obj: &Value) -> Health {
    if let Err(wait) = observed(obj) {
        return wait;
    }
    let status = |field: &str| int_at(obj, &["status", field]).unwrap_or(0);
    let desired = status("desiredNumberScheduled");
    let updated = status("updatedNumberScheduled");
    let available = status("numberAvailable");
    if update_strategy(obj) == "RollingUpdate" && updated < desired {
        return Health::Progressing(format!("{updated} of {desired} new pods updated"));
    }
    if available < desired {
        return Health::Progressing(format!("{available} of {desired} pods available"));
    }
    Health::Healthy
}

/// Done once `Complete`, failed once `Failed` (both final, set by the Job controller).
fn job(obj: &Value) -> Health {
    if let Some(failed) = condition(obj, "Failed").filter(|c| is_true(Some(c))) {
        return Health::Failed(format!(
            "job failed: {}",
            str_at(failed, &["message"])
                .or(str_at(failed, &["reason"]))
                .unwrap_or("")
        ));
    }
    if is_true(condition(obj, "Complete")) {
        Health::Healthy
    } else {
        Health::Progressing("job has not completed".into())
    }
}

fn claim(obj: &Value) -> Health {
    match str_at(obj, &["status", "phase"]) {
        Some("Bound") => Health::Healthy,
        Some("Lost") => Health::Failed("claim lost its volume".into()),
        phase => Health::Progressing(format!("claim is {}", phase.unwrap_or("Pending"))),
    }
}

/// Any other kind: a status of an older generation (`status.observedGeneration`, or the
/// `Ready` condition's own `observedGeneration`) says nothing of this one; then the `Ready`
/// condition decides, and without one the object is healthy once applied.
fn ready_condition(obj: &Value) -> Health {
    let generation = int_at(obj, &["metadata", "generation"]);
    let stale = |seen: Option<i64>| match (generation, seen) {
        (Some(generation), Some(seen)) if seen < generation => Some(unobserved(generation, seen)),
        _ => None,
    };
    if let Some(wait) = stale(int_at(obj, &["status", "observedGeneration"])) {
        return wait;
    }
    let Some(ready) = condition(obj, "Ready") else {
        return Health::Healthy;
    };
    if let Some(wait) = stale(int_at(ready, &["observedGeneration"])) {
        return wait;
    }
    match str_at(ready, &["status"]) {
        Some("True") => Health::Healthy,
        status => Health::Progressing(format!(
            "Ready is {}: {}",
            status.unwrap_or("Unknown"),
            str_at(ready, &["message"])
                .or(str_at(ready, &["reason"]))
                .unwrap_or("")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The verdict for an object of `api_version` and `kind`.
    fn verdict(api_version: &str, kind: &str, obj: &Value) -> Health {
        let id = ObjectRef {
            api_version: api_version.into(),
            kind: kind.into(),
            namespace: Some("demo".into()),
            name: "foo".into(),
        };
        health(&id, obj)
    }

    fn waits(h: &Health) -> bool {
        matches!(h, Health::Progressing(_))
    }

    /// kubectl's `done` for an `apps/v1` workload is our `Healthy`; not done, we wait.
    fn assert_done_or_waiting(kind: &str, obj: &Value, done: bool) {
        let h = verdict("apps/v1", kind, obj);
        assert_eq!(h == Health::Healthy, done, "{}: {h:?}", obj["status"]);
        assert!(done || waits(&h), "{}: {h:?}", obj["status"]);
    }

    fn deployment(generation: i64, replicas: i64, status: Value) -> Value {
        json!({"metadata": {"name": "foo", "generation": generation},
            "spec": {"replicas": replicas}, "status": status})
    }

    /// kubectl's `TestDeploymentStatusViewerStatus`, case by case.
    #[test]
    fn deployments_as_kubectl_rollout_status() {
        let cases = [
            // 0 of 1 new replicas updated.
            (
                0,
                1,
                json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 0, "availableReplicas": 1}),
                false,
            ),
            // 1 old replica pending termination.
            (
                1,
                1,
                json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 2}),
                false,
            ),
            // 1 of 2 updated replicas available.
            (
                1,
                2,
                json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1}),
                false,
            ),
            // Rolled out.
            (
                1,
                2,
                json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}),
                true,
            ),
            // Spec update not observed yet.
            (
                2,
                2,
                json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}),
                false,
            ),
        ];
        for (generation, replicas, status, done) in cases {
            let d = deployment(generation, replicas, status);
            assert_done_or_waiting("Deployment", &d, done);
        }
    }

    #[test]
    fn a_deployment_with_old_pods_left_is_not_healthy() {
        // All new replicas up and available, one old replica still running: not done.
        let d = deployment(
            3,
            2,
            json!({"observedGeneration": 3, "replicas": 3,
            "updatedReplicas": 2, "readyReplicas": 3, "availableReplicas": 3}),
        );
        assert_eq!(
            verdict("apps/v1", "Deployment", &d),
            Health::Progressing("1 old replicas pending termination".into())
        );
        // Surged past spec.replicas: every updated replica must be available, not only
        // spec.replicas of them.
        let d = deployment(
            3,
            2,
            json!({"observedGeneration": 3, "replicas": 3,
            "updatedReplicas": 3, "availableReplicas": 2}),
        );
        assert_eq!(
            verdict("apps/v1", "Deployment", &d),
            Health::Progressing("2 of 3 updated replicas available".into())
        );
        // No status at all: the controller has not seen it.
        let d = json!({"metadata": {"generation": 1}, "spec": {"replicas": 1}});
        assert!(waits(&verdict("apps/v1", "Deployment", &d)));
    }

    #[test]
    fn a_deployment_past_its_progress_deadline_fails_once_observed() {
        let exceeded = json!([{"type": "Progressing", "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": "ReplicaSet \"web-5d4f\" has timed out progressing."}]);
        let d = deployment(
            2,
            2,
            json!({"observedGeneration": 2, "replicas": 3,
            "updatedReplicas": 1, "availableReplicas": 2, "conditions": exceeded}),
        );
        assert_eq!(
            verdict("apps/v1", "Deployment", &d),
            Health::Failed(
                "exceeded its progress deadline: ReplicaSet \"web-5d4f\" has timed out progressing."
                    .into()
            )
        );
        // The condition is of an older generation (say, the bad image a revert replaces):
        // wait for the controller to look at the new spec.
        let d = deployment(
            3,
            2,
            json!({"observedGeneration": 2, "conditions": exceeded}),
        );
        assert!(waits(&verdict("apps/v1", "Deployment", &d)));
        // Any other Progressing reason is progress.
        let d = deployment(
            2,
            1,
            json!({"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1,
            "availableReplicas": 1, "conditions": [{"type": "Progressing", "status": "True",
            "reason": "NewReplicaSetAvailable"}]}),
        );
        assert_eq!(verdict("apps/v1", "Deployment", &d), Health::Healthy);
    }

    fn stateful_set(generation: i64, strategy: Value, status: Value) -> Value {
        json!({"metadata": {"name": "foo", "generation": generation},
            "spec": {"replicas": 3, "updateStrategy": strategy}, "status": status})
    }

    /// kubectl's `TestStatefulSetStatusViewerStatus` (the OnDelete case is below), case by case.
    #[test]
    fn stateful_sets_as_kubectl_rollout_status() {
        let rolling = json!({"type": "RollingUpdate"});
        let partitioned = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 2}});
        let cases = [
            // Unobserved update.
            (
                2,
                rolling.clone(),
                json!({"observedGeneration": 1, "replicas": 3, "readyReplicas": 3, "currentReplicas": 3, "updatedReplicas": 0}),
                false,
            ),
            // Not all pods ready.
            (
                1,
                rolling.clone(),
                json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 2, "currentReplicas": 3, "updatedReplicas": 0}),
                false,
            ),
            // Every pod above the partition updated.
            (
                1,
                partitioned.clone(),
                json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 3, "currentReplicas": 2, "updatedReplicas": 1}),
                true,
            ),
            // Not every pod above the partition updated.
            (
                1,
                partitioned,
                json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 3, "currentReplicas": 3, "updatedReplicas": 0}),
                false,
            ),
            // Every pod current.
            (
                1,
                rolling,
                json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 3, "currentReplicas": 3, "updatedReplicas": 3, "currentRevision": "foo", "updateRevision": "foo"}),
                true,
            ),
        ];
        for (generation, strategy, status, done) in cases {
            let s = stateful_set(generation, strategy, status);
            assert_done_or_waiting("StatefulSet", &s, done);
        }
    }

    #[test]
    fn a_stateful_set_is_done_when_its_revisions_meet() {
        // Server-defaulted spec (partition 0): every pod updated and ready, but the
        // controller has not moved currentRevision yet.
        let defaulted = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}});
        let s = stateful_set(
            4,
            defaulted.clone(),
            json!({"observedGeneration": 4, "replicas": 3,
            "readyReplicas": 3, "updatedReplicas": 3, "currentReplicas": 0,
            "currentRevision": "foo-1", "updateRevision": "foo-2"}),
        );
        assert!(waits(&verdict("apps/v1", "StatefulSet", &s)));
        // Mid-update: one pod of three at the new revision.
        let s = stateful_set(
            4,
            defaulted.clone(),
            json!({"observedGeneration": 4, "replicas": 3,
            "readyReplicas": 3, "updatedReplicas": 1, "currentReplicas": 2,
            "currentRevision": "foo-1", "updateRevision": "foo-2"}),
        );
        assert_eq!(
            verdict("apps/v1", "StatefulSet", &s),
            Health::Progressing("1 of 3 pods updated to revision foo-2".into())
        );
        let s = stateful_set(
            4,
            defaulted,
            json!({"observedGeneration": 4, "replicas": 3,
            "readyReplicas": 3, "updatedReplicas": 3, "currentReplicas": 3,
            "currentRevision": "foo-2", "updateRevision": "foo-2"}),
        );
        assert_eq!(verdict("apps/v1", "StatefulSet", &s), Health::Healthy);
        // A status with no observedGeneration at all has observed nothing.
        let s = stateful_set(
            1,
            json!({"type": "RollingUpdate"}),
            json!({"replicas": 3, "readyReplicas": 3}),
        );
        assert!(waits(&verdict("apps/v1", "StatefulSet", &s)));
    }

    #[test]
    fn on_delete_workloads_wait_for_readiness_not_for_updates() {
        // The controller replaces no pod of an OnDelete workload: its update never rolls out
        // by itself, so only the generation and readiness are waited for.
        let on_delete = json!({"type": "OnDelete"});
        let s = stateful_set(
            2,
            on_delete.clone(),
            json!({"observedGeneration": 2, "replicas": 3,
            "readyReplicas": 3, "updatedReplicas": 0, "currentRevision": "a", "updateRevision": "b"}),
        );
        assert_eq!(verdict("apps/v1", "StatefulSet", &s), Health::Healthy);
        let s = stateful_set(
            2,
            on_delete.clone(),
            json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 2}),
        );
        assert!(waits(&verdict("apps/v1", "StatefulSet", &s)));
        let s = stateful_set(
            2,
            on_delete.clone(),
            json!({"observedGeneration": 1, "replicas": 3, "readyReplicas": 3}),
        );
        assert!(waits(&verdict("apps/v1", "StatefulSet", &s)));
        let d = daemon_set(
            2,
            on_delete.clone(),
            json!({"observedGeneration": 2,
            "desiredNumberScheduled": 2, "updatedNumberScheduled": 0, "numberAvailable": 2}),
        );
        assert_eq!(verdict("apps/v1", "DaemonSet", &d), Health::Healthy);
        let d = daemon_set(
            2,
            on_delete,
            json!({"observedGeneration": 2,
            "desiredNumberScheduled": 2, "updatedNumberScheduled": 0, "numberAvailable": 1}),
        );
        assert!(waits(&verdict("apps/v1", "DaemonSet", &d)));
    }

    fn daemon_set(generation: i64, strategy: Value, status: Value) -> Value {
        json!({"metadata": {"name": "foo", "generation": generation},
            "spec": {"updateStrategy": strategy}, "status": status})
    }

    /// kubectl's `TestDaemonSetStatusViewerStatus`, case by case.
    #[test]
    fn daemon_sets_as_kubectl_rollout_status() {
        let rolling = json!({"type": "RollingUpdate"});
        let cases = [
            (
                0,
                json!({"observedGeneration": 1, "updatedNumberScheduled": 0, "desiredNumberScheduled": 1, "numberAvailable": 0}),
                false,
            ),
            (
                1,
                json!({"observedGeneration": 1, "updatedNumberScheduled": 2, "desiredNumberScheduled": 2, "numberAvailable": 1}),
                false,
            ),
            (
                1,
                json!({"observedGeneration": 1, "updatedNumberScheduled": 2, "desiredNumberScheduled": 2, "numberAvailable": 2}),
                true,
            ),
            (
                2,
                json!({"observedGeneration": 1, "updatedNumberScheduled": 2, "desiredNumberScheduled": 2, "numberAvailable": 2}),
                false,
            ),
        ];
        for (generation, status, done) in cases {
            let d = daemon_set(generation, rolling.clone(), status);
            assert_done_or_waiting("DaemonSet", &d, done);
        }
        // Mid-update: both pods available, one of them still the old one.
        let d = daemon_set(
            3,
            rolling,
            json!({"observedGeneration": 3, "desiredNumberScheduled": 2,
            "currentNumberScheduled": 2, "updatedNumberScheduled": 1, "numberAvailable": 2}),
        );
        assert_eq!(
            verdict("apps/v1", "DaemonSet", &d),
            Health::Progressing("1 of 2 new pods updated".into())
        );
    }

    #[test]
    fn jobs() {
        let j = json!({"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}});
        assert_eq!(
            verdict("batch/v1", "Job", &j),
            Health::Failed("job failed: Job has reached the specified backoff limit".into())
        );
        let j = json!({"status": {"conditions": [{"type": "Complete", "status": "True"}]}});
        assert_eq!(verdict("batch/v1", "Job", &j), Health::Healthy);
        let j = json!({"status": {"active": 1, "conditions": [{"type": "Complete", "status": "False"}]}});
        assert!(waits(&verdict("batch/v1", "Job", &j)));
        assert!(waits(&verdict("batch/v1", "Job", &json!({}))));
    }

    #[test]
    fn claims() {
        let claim = |phase: &str| json!({"status": {"phase": phase}});
        assert_eq!(
            verdict("v1", "PersistentVolumeClaim", &claim("Bound")),
            Health::Healthy
        );
        assert!(matches!(
            verdict("v1", "PersistentVolumeClaim", &claim("Lost")),
            Health::Failed(_)
        ));
        assert!(waits(&verdict(
            "v1",
            "PersistentVolumeClaim",
            &claim("Pending")
        )));
        assert!(waits(&verdict("v1", "PersistentVolumeClaim", &json!({}))));
    }

    #[test]
    fn ready_conditions_respect_observed_generation() {
        let ready = |generation: i64, status: Value| json!({"metadata": {"generation": generation}, "status": status});
        let r = ready(
            2,
            json!({"conditions": [{"type": "Ready", "status": "True"}]}),
        );
        assert_eq!(
            verdict("example.com/v1", "Certificate", &r),
            Health::Healthy
        );
        let r = ready(
            2,
            json!({"conditions": [{"type": "Ready", "status": "False", "message": "waiting"}]}),
        );
        assert_eq!(
            verdict("example.com/v1", "Certificate", &r),
            Health::Progressing("Ready is False: waiting".into())
        );
        // A Ready condition written for an older generation says nothing of this one.
        let r = ready(
            2,
            json!({"conditions": [{"type": "Ready", "status": "True", "observedGeneration": 1}]}),
        );
        assert!(waits(&verdict("example.com/v1", "Certificate", &r)));
        let r = ready(
            2,
            json!({"conditions": [{"type": "Ready", "status": "True", "observedGeneration": 2}]}),
        );
        assert_eq!(
            verdict("example.com/v1", "Certificate", &r),
            Health::Healthy
        );
        // Nor does a status of an older generation, with or without a Ready condition.
        let r = ready(
            2,
            json!({"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}),
        );
        assert!(waits(&verdict("example.com/v1", "Certificate", &r)));
        let r = ready(2, json!({"observedGeneration": 1}));
        assert!(waits(&verdict("example.com/v1", "Certificate", &r)));
        let r = ready(2, json!({"observedGeneration": 2}));
        assert_eq!(
            verdict("example.com/v1", "Certificate", &r),
            Health::Healthy
        );
        // Nothing to go by: healthy once applied.
        assert_eq!(
            verdict("v1", "ConfigMap", &json!({"data": {}})),
            Health::Healthy
        );
    }

    #[test]
    fn kinds_are_told_apart_by_group() {
        // A custom `Deployment` is not the apps one: its Ready condition decides.
        let custom = json!({"metadata": {"generation": 1}, "spec": {"replicas": 3},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert_eq!(
            verdict("example.com/v1", "Deployment", &custom),
            Health::Healthy
        );
        assert!(waits(&verdict("apps/v1", "Deployment", &custom)));
    }
}
