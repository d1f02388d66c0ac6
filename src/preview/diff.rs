//! What one object's dry-run says the merge would change, as a reviewer reads it: the live
//! object and the dry-run result, both normalised as the drift comparison does (server-owned
//! metadata and status dropped), rendered as YAML and diffed line by line. Secret values never
//! leave here: a Secret shows its key names and whether each value changed.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use similar::TextDiff;

use crate::drift::normalized;
use crate::reconcile::dry_run::{DryRunObject, DryRunOutcome};

/// kubectl's copy of the last applied object: it would carry a Secret's values.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// What a Secret value is shown as.
const HIDDEN: &str = "(hidden)";
const HIDDEN_CHANGED: &str = "(hidden, changed)";

/// What the merge would do to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Changed,
    Unchanged,
    /// The API server refused the object's dry-run.
    Rejected,
}

/// One object of a preview.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectChange {
    /// `apps/v1 Deployment demo/web`.
    pub object: String,
    pub source: String,
    pub change: ChangeKind,
    /// A unified diff from the live object to the dry-run result (empty when unchanged).
    pub diff: String,
    /// Why the object could not be validated, or the API server's refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What one object's dry-run means for the reviewer.
pub fn object_change(o: &DryRunObject) -> ObjectChange {
    let (after, note) = match &o.outcome {
        DryRunOutcome::Unchanged => {
            return ObjectChange {
                object: o.id.to_string(),
                source: o.source.clone(),
                change: ChangeKind::Unchanged,
                diff: String::new(),
                note: None,
            }
        }
        DryRunOutcome::Accepted(after) => (after, None),
        DryRunOutcome::NotValidated { desired, reason } => {
            (desired, Some(format!("not validated: {reason}")))
        }
        DryRunOutcome::Rejected(message) => {
            return ObjectChange {
                object: o.id.to_string(),
                source: o.source.clone(),
                change: ChangeKind::Rejected,
                diff: String::new(),
                note: Some(format!("rejected by the API server: {message}")),
            }
        }
    };
    let mut after = normalized(after);
    let mut live = o.live.as_ref().map(normalized);
    if o.id.kind == "Secret" && o.id.api_version == "v1" {
        hide_secret_values(live.as_mut(), &mut after);
    }
    let after_text = yaml(&after);
    let (change, live_text) = match &live {
        None => (ChangeKind::Added, String::new()),
        Some(l) if *l == after => (ChangeKind::Unchanged, String::new()),
        Some(l) => (ChangeKind::Changed, yaml(l)),
    };
    let diff = if change == ChangeKind::Unchanged {
        String::new()
    } else {
        unified(&live_text, &after_text)
    };
    ObjectChange {
        object: o.id.to_string(),
        source: o.source.clone(),
        change,
        diff,
        note,
    }
}

fn yaml(v: &Value) -> String {
    serde_yaml::to_string(v).unwrap_or_else(|e| format!("# cannot show as YAML: {e}\n"))
}

/// A unified diff with three lines of context and no file header.
fn unified(before: &str, after: &str) -> String {
    let diff = TextDiff::from_lines(before, after);
    let mut out = String::new();
    for hunk in diff.unified_diff().context_radius(3).iter_hunks() {
        out.push_str(&hunk.to_string());
    }
    out
}

/// Replaces every value of a Secret's `data` and `stringData` by a marker, on both sides:
/// `(hidden)` where the value stays, `(hidden, changed)` on the new side where it changes. The
/// key names stay, so added and removed keys show. kubectl's last-applied annotation, which
/// would hold the values, is dropped.
fn hide_secret_values(live: Option<&mut Value>, after: &mut Value) {
    let live_data = live.as_deref().map(secret_values).unwrap_or_default();
    let after_data = secret_values(after);
    mask(after, |k| {
        let changed = live_data
            .get(k)
            .is_some_and(|old| Some(old) != after_data.get(k));
        if changed {
            HIDDEN_CHANGED
        } else {
            HIDDEN
        }
    });
    if let Some(live) = live {
        mask(live, |_| HIDDEN);
    }
}

/// Replaces each value of `data` and `stringData` by `marker(key)`, and drops kubectl's
/// last-applied annotation.
fn mask(secret: &mut Value, marker: impl Fn(&str) -> &'static str) {
    if let Some(meta) = secret.get_mut("metadata").and_then(Value::as_object_mut) {
        if let Some(ann) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            ann.remove(LAST_APPLIED);
            if ann.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    for field in ["data", "stringData"] {
        if let Some(map) = secret.get_mut(field).and_then(Value::as_object_mut) {
            for (k, v) in map.iter_mut() {
                *v = Value::String(marker(k).into());
            }
        }
    }
}

/// A Secret's values by key, `stringData` encoded as the API server stores it under `data`.
fn secret_values(v: &Value) -> Map<String, Value> {
    use base64::Engine as _;
    let mut out = v
        .get("data")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(sd) = v.get("stringData").and_then(Value::as_object) {
        for (k, val) in sd {
            let text = val.as_str().unwrap_or_default();
            let encoded = base64::engine::general_purpose::STANDARD.encode(text);
            out.insert(k.clone(), Value::String(encoded));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ObjectRef;
    use serde_json::json;

    fn obj(kind: &str, live: Option<Value>, after: Value) -> DryRunObject {
        DryRunObject {
            id: ObjectRef {
                api_version: "v1".into(),
                kind: kind.into(),
                namespace: Some("demo".into()),
                name: "a".into(),
            },
            source: "app/a.yaml".into(),
            live,
            outcome: DryRunOutcome::Accepted(after),
        }
    }

    fn cm(value: &str, rv: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "a", "namespace": "demo", "resourceVersion": rv,
                "managedFields": [{"manager": "driftless"}], "uid": "u"},
            "data": {"value": value}})
    }

    #[test]
    fn a_changed_value_is_one_line_of_diff_and_server_noise_is_not() {
        let c = object_change(&obj("ConfigMap", Some(cm("one", "1")), cm("two", "2")));
        assert_eq!(c.change, ChangeKind::Changed);
        assert!(
            c.diff.contains("-  value: one\n+  value: two\n"),
            "{}",
            c.diff
        );
        assert!(!c.diff.contains("resourceVersion") && !c.diff.contains("managedFields"));
        let same = object_change(&obj("ConfigMap", Some(cm("one", "1")), cm("one", "7")));
        assert_eq!(same.change, ChangeKind::Unchanged);
        assert!(same.diff.is_empty());
        let added = object_change(&obj("ConfigMap", None, cm("one", "1")));
        assert_eq!(added.change, ChangeKind::Added);
        assert!(added.diff.contains("+  value: one"), "{}", added.diff);
    }

    #[test]
    fn secrets_show_key_names_and_changed_never_values() {
        let live = json!({"kind": "Secret", "metadata": {"name": "a", "annotations": {
            LAST_APPLIED: "{\"data\":{\"password\":\"c2VjcmV0\"}}"}},
            "data": {"password": "c2VjcmV0", "user": "dXNlcg==", "old": "eA=="}});
        let after = json!({"kind": "Secret", "metadata": {"name": "a"},
            "data": {"password": "bmV3c2VjcmV0", "user": "dXNlcg==", "token": "dA=="}});
        let c = object_change(&obj("Secret", Some(live), after));
        assert_eq!(c.change, ChangeKind::Changed);
        for value in [
            "c2VjcmV0",
            "bmV3c2VjcmV0",
            "dXNlcg==",
            "eA==",
            "dA==",
            "secret",
        ] {
            assert!(!c.diff.contains(value), "{value} leaked: {}", c.diff);
        }
        assert!(
            c.diff.contains("+  password: (hidden, changed)"),
            "{}",
            c.diff
        );
        assert!(c.diff.contains("-  old: (hidden)"), "{}", c.diff);
        assert!(c.diff.contains("+  token: (hidden)"), "{}", c.diff);
        assert!(c.diff.contains("\n   user: (hidden)\n"), "{}", c.diff);
        assert!(!c.diff.contains("annotations"), "{}", c.diff);
    }

    #[test]
    fn a_rejection_carries_the_api_servers_message() {
        let mut o = obj("ConfigMap", None, Value::Null);
        o.outcome = DryRunOutcome::Rejected("data: must be a map".into());
        let c = object_change(&o);
        assert_eq!(c.change, ChangeKind::Rejected);
        assert_eq!(
            c.note.as_deref(),
            Some("rejected by the API server: data: must be a map")
        );
    }
}
