//! Manifest files → Kubernetes objects: every `*.yaml`, `*.yml` and `*.json` of an app,
//! multi-document YAML with empty documents skipped, `List` kinds expanded. Errors name the
//! file, the document and the line. Knows nothing of the cluster: scope, namespace defaulting
//! and ordering take what the caller learnt from API discovery.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// Where an object came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: String,
    /// 0-based index of the document in the file.
    pub document: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file, self.document + 1)
    }
}

/// Identity of an object in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize)]
pub struct ObjectRef {
    /// `apps/v1`, `v1`, ...
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    /// `(group, version)` of the apiVersion; the core group is `""`.
    pub fn group_version(&self) -> (&str, &str) {
        match self.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", self.api_version.as_str()),
        }
    }
}

impl fmt::Display for ObjectRef {
    /// `apps/v1 Deployment demo/web`, or `v1 Namespace demo` for cluster-scoped objects.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {} {}/{}", self.api_version, self.kind, ns, self.name),
            None => write!(f, "{} {} {}", self.api_version, self.kind, self.name),
        }
    }
}

/// One desired object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub id: ObjectRef,
    pub body: Value,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: document {document}, line {line}: {message}")]
    Parse {
        file: String,
        document: usize,
        line: usize,
        message: String,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("{id} is defined twice: in {first} and in {second}")]
    Duplicate {
        id: String,
        first: String,
        second: String,
    },
}

/// Parses every manifest file (already filtered to `*.yaml`, `*.yml`, `*.json`), in path order.
pub fn parse_files<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<Vec<Object>, ManifestError> {
    let mut files: Vec<_> = files.into_iter().collect();
    files.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::new();
    let mut seen: BTreeMap<ObjectRef, Source> = BTreeMap::new();
    for (path, bytes) in files {
        for obj in parse_file(path, bytes)? {
            if let Some(first) = seen.get(&obj.id) {
                return Err(ManifestError::Duplicate {
                    id: obj.id.to_string(),
                    first: first.to_string(),
                    second: obj.source.to_string(),
                });
            }
            seen.insert(obj.id.clone(), obj.source.clone());
            out.push(obj);
        }
    }
    Ok(out)
}

/// Parses one file into objects.
pub fn parse_file(path: &str, bytes: &[u8]) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    if path.to_ascii_lowercase().ends_with(".json") {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse {
            file: path.to_string(),
            document: 1,
            line: e.line(),
            message: e.to_string(),
        })?;
        push_value(path, 0, value, &mut out)?;
        return Ok(out);
    }
    for (index, doc) in serde_yaml::Deserializer::from_slice(bytes).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| ManifestError::Parse {
            file: path.to_string(),
            document: index + 1,
            line: e.location().map_or(0, |l| l.line()),
            message: strip_location(&e.to_string()),
        })?;
        push_value(path, index, value, &mut out)?;
    }
    Ok(out)
}

fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

fn push_value(
    path: &str,
    document: usize,
    value: Value,
    out: &mut Vec<Object>,
) -> Result<(), ManifestError> {
    let source = Source {
        file: path.to_string(),
        document,
    };
    let invalid = |message: String| ManifestError::Invalid {
        origin: source.to_string(),
        message,
    };
    match value {
        Value::Null => Ok(()), // an empty document
        Value::Object(ref map) => {
            let kind = map.get("kind").and_then(Value::as_str).unwrap_or_default();
            if kind.ends_with("List") && map.get("items").is_some() {
                let Some(items) = map.get("items").and_then(Value::as_array) else {
                    return Err(invalid("items: must be a list".into()));
                };
                for item in items {
                    push_object(source.clone(), item.clone(), out)?;
                }
                return Ok(());
            }
            push_object(source, value, out)
        }
        other => Err(invalid(format!(
            "a manifest must be an object with apiVersion and kind, got {}",
            type_name(&other)
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn push_object(source: Source, body: Value, out: &mut Vec<Object>) -> Result<(), ManifestError> {
    let invalid = |message: &str| ManifestError::Invalid {
        origin: source.to_string(),
        message: message.to_string(),
    };
    let field = |name: &str| {
        body.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let api_version = field("apiVersion").ok_or_else(|| invalid("apiVersion: is required"))?;
    let kind = field("kind").ok_or_else(|| invalid("kind: is required"))?;
    let meta = body
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("metadata: is required"))?;
    if meta.contains_key("generateName") && !meta.contains_key("name") {
        return Err(invalid(
            "metadata.generateName is not supported: give the object a metadata.name",
        ));
    }
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("metadata.name: is required"))?;
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    out.push(Object {
        id: ObjectRef {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
            namespace,
            name: name.to_string(),
        },
        body,
        source,
    });
    Ok(())
}

/// Apply stages, in order: what later objects depend on comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Namespaces and CustomResourceDefinitions.
    Foundation,
    /// Other cluster-scoped objects.
    Cluster,
    /// Namespaced objects.
    Namespaced,
}

pub fn is_crd(id: &ObjectRef) -> bool {
    id.kind == "CustomResourceDefinition" && id.group_version().0 == "apiextensions.k8s.io"
}

pub fn is_namespace(id: &ObjectRef) -> bool {
    id.kind == "Namespace" && id.api_version == "v1"
}

pub fn stage_of(id: &ObjectRef, namespaced: bool) -> Stage {
    if is_namespace(id) || is_crd(id) {
        Stage::Foundation
    } else if namespaced {
        Stage::Namespaced
    } else {
        Stage::Cluster
    }
}

/// `(group, kind)` a CRD object defines, so objects of that kind in the same set are known.
pub fn crd_defines(obj: &Object) -> Option<(String, String)> {
    crd_defines_body(&obj.id, &obj.body)
}

/// [`crd_defines`] of an object already taken apart.
pub fn crd_defines_body(id: &ObjectRef, body: &Value) -> Option<(String, String)> {
    if !is_crd(id) {
        return None;
    }
    let spec = body.get("spec")?;
    Some((
        spec.get("group")?.as_str()?.to_string(),
        spec.get("names")?.get("kind")?.as_str()?.to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_with_empty_documents_and_lists() {
        let yaml = b"---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n---\n# only a comment\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s, namespace: x}\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n";
        let objs = parse_file("app/all.yaml", yaml).unwrap();
        let ids: Vec<String> = objs.iter().map(|o| o.id.to_string()).collect();
        assert_eq!(
            ids,
            ["v1 ConfigMap a", "v1 Service x/s", "apps/v1 Deployment d"]
        );
    }

    #[test]
    fn json_files() {
        let objs = parse_file(
            "a.json",
            br#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"demo"}}"#,
        )
        .unwrap();
        assert_eq!(objs[0].id.to_string(), "v1 Namespace demo");
        let e = parse_file("b.json", b"{\n\"apiVersion\": }").unwrap_err();
        assert!(matches!(e, ManifestError::Parse { line: 2, .. }), "{e}");
    }

    #[test]
    fn parse_errors_name_file_document_and_line() {
        let yaml = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: [unclosed\n";
        let e = parse_file("app/bad.yaml", yaml).unwrap_err();
        let ManifestError::Parse {
            file,
            document,
            line,
            ..
        } = &e
        else {
            panic!("{e}")
        };
        assert_eq!(
            (file.as_str(), *document, *line),
            ("app/bad.yaml", 2, 8),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("app/bad.yaml: document 2, line 8:"),
            "{e}"
        );
    }

    #[test]
    fn missing_fields_are_named() {
        let e = parse_file("a.yaml", b"kind: ConfigMap\nmetadata: {name: a}\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "a.yaml (document 1): apiVersion: is required"
        );
        let e =
            parse_file("a.yaml", b"apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "a.yaml (document 1): metadata.name: is required"
        );
        let e = parse_file("a.yaml", b"- 1\n- 2\n").unwrap_err();
        assert!(e.to_string().contains("got a list"));
    }

    #[test]
    fn duplicates_are_refused() {
        let a = b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: n}\n";
        let e = parse_files([("x.yaml", &a[..]), ("y.yaml", &a[..])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "v1 ConfigMap n/a is defined twice: in x.yaml (document 1) and in y.yaml (document 1)"
        );
    }

    #[test]
    fn stages() {
        let id = |v: &str, k: &str| ObjectRef {
            api_version: v.into(),
            kind: k.into(),
            namespace: None,
            name: "x".into(),
        };
        assert_eq!(stage_of(&id("v1", "Namespace"), false), Stage::Foundation);
        assert_eq!(
            stage_of(
                &id("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
                false
            ),
            Stage::Foundation
        );
        assert_eq!(
            stage_of(&id("rbac.authorization.k8s.io/v1", "ClusterRole"), false),
            Stage::Cluster
        );
        assert_eq!(
            stage_of(&id("apps/v1", "Deployment"), true),
            Stage::Namespaced
        );
        assert_eq!(id("apps/v1", "Deployment").group_version(), ("apps", "v1"));
        assert_eq!(id("v1", "Pod").group_version(), ("", "v1"));
    }
}

/// Fills `protocol: TCP` where a port list omits it. Server-side apply before Kubernetes 1.20.x
/// patch releases rejects a Service or container port without its list-map key `protocol`
/// ("associative list with keys has an element that omits key field"), although TCP is the
/// default; the explicit default changes nothing on newer servers.
pub fn fill_port_protocols(kind: &str, body: &mut Value) {
    fn ports(list: Option<&mut Value>) {
        if let Some(Value::Array(items)) = list {
            for p in items {
                if let Some(map) = p.as_object_mut() {
                    map.entry("protocol")
                        .or_insert_with(|| Value::String("TCP".into()));
                }
            }
        }
    }
    fn pod_spec(spec: Option<&mut Value>) {
        let Some(spec) = spec else { return };
        for list in ["containers", "initContainers"] {
            if let Some(Value::Array(cs)) = spec.get_mut(list) {
                for c in cs {
                    ports(c.get_mut("ports"));
                }
            }
        }
    }
    let spec = body.get_mut("spec");
    match kind {
        "Service" => ports(spec.and_then(|s| s.get_mut("ports"))),
        "Pod" => pod_spec(spec),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => pod_spec(
            spec.and_then(|s| s.get_mut("template"))
                .and_then(|t| t.get_mut("spec")),
        ),
        "CronJob" => pod_spec(
            spec.and_then(|s| s.get_mut("jobTemplate"))
                .and_then(|j| j.get_mut("spec"))
                .and_then(|s| s.get_mut("template"))
                .and_then(|t| t.get_mut("spec")),
        ),
        _ => {}
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn port_protocols_are_filled() {
        let mut svc = json!({"spec": {"ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}});
        fill_port_protocols("Service", &mut svc);
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(svc["spec"]["ports"][1]["protocol"], "UDP");
        let mut d = json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}]}]}}}});
        fill_port_protocols("Deployment", &mut d);
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"],
            "TCP"
        );
        let mut cm = json!({"data": {"ports": "x"}});
        fill_port_protocols("ConfigMap", &mut cm);
        assert_eq!(cm, json!({"data": {"ports": "x"}}));
    }
}
