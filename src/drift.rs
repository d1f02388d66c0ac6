//! Drift: how the live cluster differs from what driftless applied. The comparison is pure:
//! only fields present in the desired object count (server defaults and fields other managers
//! own are not drift), and ignore rules (JSON pointers, optionally per kind) exclude fields
//! something else legitimately owns. The engine confirms each suspect with a server-side
//! dry-run before calling it drift. Also the timer that spreads checks over the interval.

use std::time::Duration;

use serde_json::Value;

use crate::settings::IgnoreRule;

/// Metadata the API server owns, never compared.
const SERVER_METADATA: [&str; 7] = [
    "managedFields",
    "resourceVersion",
    "generation",
    "uid",
    "creationTimestamp",
    "selfLink",
    "finalizers",
];

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn ignored(pointer: &str, kind: &str, rules: &[IgnoreRule]) -> bool {
    rules.iter().any(|r| {
        r.kind.as_deref().is_none_or(|k| k == kind)
            && (pointer == r.pointer || pointer.starts_with(&format!("{}/", r.pointer)))
    })
}

fn numbers_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// JSON pointers of the desired fields whose live value differs (or is missing).
pub fn differing_fields(
    kind: &str,
    desired: &Value,
    live: &Value,
    rules: &[IgnoreRule],
) -> Vec<String> {
    let mut out = Vec::new();
    let desired = as_stored(kind, desired);
    walk(kind, "", &desired, Some(live), rules, &mut out);
    out
}

/// The desired object as the API server stores it, where the two differ by design: a
/// Secret's write-only `stringData` is stored base64-encoded under `data`.
fn as_stored(kind: &str, desired: &Value) -> Value {
    use base64::Engine as _;
    let mut v = desired.clone();
    if kind != "Secret" {
        return v;
    }
    let Some(map) = v.as_object_mut() else {
        return v;
    };
    if let Some(Value::Object(string_data)) = map.remove("stringData") {
        let data = map
            .entry("data")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(data) = data.as_object_mut() {
            for (k, val) in string_data {
                if let Some(text) = val.as_str() {
                    let encoded = base64::engine::general_purpose::STANDARD.encode(text);
                    data.insert(k, Value::String(encoded));
                }
            }
        }
    }
    v
}

fn walk(
    kind: &str,
    at: &str,
    desired: &Value,
    live: Option<&Value>,
    rules: &[IgnoreRule],
    out: &mut Vec<String>,
) {
    if ignored(at, kind, rules) {
        return;
    }
    let Some(live) = live else {
        out.push(at.to_string());
        return;
    };
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => {
            for (k, v) in d {
                if at.is_empty() && (k == "status" || k == "apiVersion" || k == "kind") {
                    continue;
                }
                if at == "/metadata" && SERVER_METADATA.contains(&k.as_str()) {
                    continue;
                }
                let child = format!("{at}/{}", escape(k));
                walk(kind, &child, v, l.get(k), rules, out);
            }
        }
        (Value::Array(d), Value::Array(l)) => {
            if d.len() != l.len() {
                out.push(at.to_string());
                return;
            }
            for (i, v) in d.iter().enumerate() {
                walk(kind, &format!("{at}/{i}"), v, l.get(i), rules, out);
            }
        }
        (Value::Null, _) => {}
        (d, l) if d == l || numbers_equal(d, l) => {}
        _ => out.push(at.to_string()),
    }
}

/// The live object and a dry-run result, with what the server owns removed, for comparing
/// whether an apply would change anything.
pub fn normalized(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("status");
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            for k in SERVER_METADATA {
                meta.remove(k);
            }
        }
    }
    v
}

/// `/spec/replicas` → `spec.replicas` for messages.
pub fn dotted(pointer: &str) -> String {
    pointer
        .trim_start_matches('/')
        .split('/')
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect::<Vec<_>>()
        .join(".")
}

/// Where in the interval app `index` of `count` is checked: evenly spread, plus up to
/// `jitter` of random delay, so checks never line up.
pub fn slot(interval: Duration, index: usize, count: usize, jitter: Duration) -> Duration {
    let base = interval.mul_f64(index as f64 / count.max(1) as f64);
    let extra = if jitter.is_zero() {
        Duration::ZERO
    } else {
        jitter.mul_f64(rand::random::<f64>())
    };
    (base + extra).min(interval)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(kind: Option<&str>, pointer: &str) -> IgnoreRule {
        IgnoreRule {
            kind: kind.map(String::from),
            pointer: pointer.into(),
        }
    }

    #[test]
    fn only_desired_fields_count() {
        let desired = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "web", "image": "nginx:1"}]}}}});
        let mut live = desired.clone();
        live["metadata"]["labels"]["added-by-someone"] = json!("x");
        live["metadata"]["resourceVersion"] = json!("42");
        live["spec"]["progressDeadlineSeconds"] = json!(600);
        live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] =
            json!("IfNotPresent");
        live["status"] = json!({"replicas": 2});
        assert!(differing_fields("Deployment", &desired, &live, &[]).is_empty());

        live["spec"]["replicas"] = json!(5);
        live["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:2");
        live["metadata"]["labels"]["app"] = json!("other");
        let got = differing_fields("Deployment", &desired, &live, &[]);
        assert_eq!(
            got,
            [
                "/metadata/labels/app",
                "/spec/replicas",
                "/spec/template/spec/containers/0/image"
            ]
        );
        assert_eq!(dotted(&got[1]), "spec.replicas");
    }

    #[test]
    fn secret_string_data_compares_as_data() {
        let desired = json!({"stringData": {"password": "pw"}});
        let live = json!({"data": {"password": "cHc="}});
        assert!(differing_fields("Secret", &desired, &live, &[]).is_empty());
        let live = json!({"data": {"password": "b3RoZXI="}});
        assert_eq!(
            differing_fields("Secret", &desired, &live, &[]),
            ["/data/password"]
        );
    }

    #[test]
    fn ignore_rules_by_kind() {
        let desired = json!({"spec": {"replicas": 2}});
        let live = json!({"spec": {"replicas": 3}});
        assert!(differing_fields(
            "Deployment",
            &desired,
            &live,
            &[rule(Some("Deployment"), "/spec/replicas")]
        )
        .is_empty());
        assert!(differing_fields("Deployment", &desired, &live, &[rule(None, "/spec")]).is_empty());
        assert_eq!(
            differing_fields(
                "StatefulSet",
                &desired,
                &live,
                &[rule(Some("Deployment"), "/spec/replicas")]
            )
            .len(),
            1
        );
    }

    #[test]
    fn missing_fields_and_list_lengths() {
        let desired =
            json!({"data": {"a": "1", "b": "2"}, "spec": {"ports": [{"port": 80}, {"port": 443}]}});
        let live = json!({"data": {"a": "1"}, "spec": {"ports": [{"port": 80}]}});
        assert_eq!(
            differing_fields("X", &desired, &live, &[]),
            ["/data/b", "/spec/ports"]
        );
        assert!(differing_fields("X", &json!({"n": 1}), &json!({"n": 1.0}), &[]).is_empty());
    }

    #[test]
    fn slots_spread_over_the_interval() {
        let i = Duration::from_secs(600);
        assert_eq!(slot(i, 0, 4, Duration::ZERO), Duration::ZERO);
        assert_eq!(slot(i, 2, 4, Duration::ZERO), Duration::from_secs(300));
        let s = slot(i, 3, 4, Duration::from_secs(60));
        assert!(s >= Duration::from_secs(450) && s <= Duration::from_secs(510));
    }
}
