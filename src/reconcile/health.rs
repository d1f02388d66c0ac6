//! Is an applied object healthy yet? Read from its live status the way its controller reports
//! progress: Deployments, StatefulSets, DaemonSets, Jobs, PersistentVolumeClaims, and any object
//! with a `Ready` condition. Everything else is healthy once applied. Pure functions on JSON.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Not there yet; the reason says what is missing.
    Progressing(String),
    /// Will not get there by waiting (a failed Job, a `Ready=False` with a failure reason).
    Failed(String),
}

fn i(v: &Value, path: &[&str]) -> Option<i64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_i64()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj.get("status")?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

/// Whether the controller has seen the latest spec.
fn observed(obj: &Value) -> Result<(), Health> {
    let generation = i(obj, &["metadata", "generation"]).unwrap_or(0);
    let observed = i(obj, &["status", "observedGeneration"]).unwrap_or(-1);
    if observed < generation {
        Err(Health::Progressing(format!(
            "controller has not observed generation {generation} yet"
        )))
    } else {
        Ok(())
    }
}

/// Whether an object of this kind can be anything but healthy once applied: the workload
/// kinds, claims, and anything outside the core kinds that never carry a status (which may
/// have a `Ready` condition). Saves a GET per written ConfigMap, Service, RBAC object, ...
pub fn may_report_health(id: &crate::manifest::ObjectRef) -> bool {
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

pub fn health(kind: &str, obj: &Value) -> Health {
    let progressing = |what: String| Health::Progressing(what);
    match kind {
        "Deployment" => {
            if let Err(h) = observed(obj) {
                return h;
            }
            let want = i(obj, &["spec", "replicas"]).unwrap_or(1);
            let updated = i(obj, &["status", "updatedReplicas"]).unwrap_or(0);
            let available = i(obj, &["status", "availableReplicas"]).unwrap_or(0);
            if let Some(c) = condition(obj, "Progressing") {
                if s(c, &["reason"]) == Some("ProgressDeadlineExceeded") {
                    return Health::Failed(format!(
                        "progress deadline exceeded: {}",
                        s(c, &["message"]).unwrap_or("")
                    ));
                }
            }
            if updated < want || available < want {
                progressing(format!(
                    "{updated} of {want} replicas updated, {available} available"
                ))
            } else {
                Health::Healthy
            }
        }
        "StatefulSet" => {
            if let Err(h) = observed(obj) {
                return h;
            }
            let want = i(obj, &["spec", "replicas"]).unwrap_or(1);
            let ready = i(obj, &["status", "readyReplicas"]).unwrap_or(0);
            let updated = i(obj, &["status", "updatedReplicas"]).unwrap_or(0);
            if ready < want || updated < want {
                progressing(format!(
                    "{ready} of {want} replicas ready, {updated} updated"
                ))
            } else {
                Health::Healthy
            }
        }
        "DaemonSet" => {
            if let Err(h) = observed(obj) {
                return h;
            }
            let want = i(obj, &["status", "desiredNumberScheduled"]).unwrap_or(0);
            let available = i(obj, &["status", "numberAvailable"]).unwrap_or(0);
            let updated = i(obj, &["status", "updatedNumberScheduled"]).unwrap_or(0);
            if available < want || updated < want {
                progressing(format!(
                    "{available} of {want} pods available, {updated} updated"
                ))
            } else {
                Health::Healthy
            }
        }
        "Job" => {
            let is_true = |c: Option<&Value>| c.and_then(|c| s(c, &["status"])) == Some("True");
            if is_true(condition(obj, "Failed")) {
                let msg = condition(obj, "Failed")
                    .and_then(|c| s(c, &["message"]))
                    .unwrap_or("");
                Health::Failed(format!("job failed: {msg}"))
            } else if is_true(condition(obj, "Complete")) {
                Health::Healthy
            } else {
                progressing("job has not completed".into())
            }
        }
        "PersistentVolumeClaim" => match s(obj, &["status", "phase"]) {
            Some("Bound") => Health::Healthy,
            Some("Lost") => Health::Failed("claim lost its volume".into()),
            phase => progressing(format!("claim is {}", phase.unwrap_or("Pending"))),
        },
        _ => match condition(obj, "Ready") {
            Some(c) if s(c, &["status"]) == Some("True") => Health::Healthy,
            Some(c) => progressing(format!(
                "Ready is {}: {}",
                s(c, &["status"]).unwrap_or("Unknown"),
                s(c, &["message"]).or(s(c, &["reason"])).unwrap_or("")
            )),
            None => Health::Healthy,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deployments() {
        let d = json!({"metadata": {"generation": 2}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, "updatedReplicas": 2, "availableReplicas": 2}});
        assert!(matches!(health("Deployment", &d), Health::Progressing(_)));
        let d = json!({"metadata": {"generation": 2}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 2, "updatedReplicas": 2, "availableReplicas": 1}});
        assert_eq!(
            health("Deployment", &d),
            Health::Progressing("2 of 2 replicas updated, 1 available".into())
        );
        let d = json!({"metadata": {"generation": 2}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 2, "updatedReplicas": 2, "availableReplicas": 2}});
        assert_eq!(health("Deployment", &d), Health::Healthy);
        let d = json!({"metadata": {"generation": 1}, "spec": {}, "status": {"observedGeneration": 1,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "image pull"}]}});
        assert!(matches!(health("Deployment", &d), Health::Failed(_)));
    }

    #[test]
    fn jobs_claims_and_ready_conditions() {
        let j = json!({"status": {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}});
        assert!(
            matches!(health("Job", &j), Health::Failed(m) if m.contains("BackoffLimitExceeded"))
        );
        let j = json!({"status": {"conditions": [{"type": "Complete", "status": "True"}]}});
        assert_eq!(health("Job", &j), Health::Healthy);
        assert_eq!(
            health(
                "PersistentVolumeClaim",
                &json!({"status": {"phase": "Bound"}})
            ),
            Health::Healthy
        );
        assert!(matches!(
            health("PersistentVolumeClaim", &json!({})),
            Health::Progressing(_)
        ));
        let c = json!({"status": {"conditions": [{"type": "Ready", "status": "False", "message": "waiting"}]}});
        assert!(matches!(health("Certificate", &c), Health::Progressing(_)));
        assert_eq!(health("ConfigMap", &json!({"data": {}})), Health::Healthy);
    }
}
