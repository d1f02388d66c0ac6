//! Manifest files → Kubernetes objects: every `*.yaml`, `*.yml` and `*.json` of an app,
//! multi-document YAML with empty documents skipped, `List` kinds expanded. Errors name the
//! file, the document and the line. Parsing is bounded ([`Limits`]): YAML aliases are expanded
//! against a budget shared by all files of an app, so a small file cannot make the process
//! build an unbounded tree. Knows nothing of the cluster: scope, namespace defaulting and
//! ordering take what the caller learnt from API discovery.

mod bounded;

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeSeed;
use serde::Deserialize;
use serde_json::Value;

use bounded::Bounded;
pub use bounded::{Budget, Limits, LIMITS};

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

    /// What the API server treats as one object, whatever version it is read or written in:
    /// moving an Ingress from `networking.k8s.io/v1beta1` to `v1` keeps its identity.
    pub fn identity(&self) -> Identity {
        Identity {
            group: canonical_group(self.group_version().0, &self.kind).to_string(),
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// The group an object lives in whatever group it is spoken to through: the API server
/// serves the same objects under the old `extensions` group and under their new groups (and
/// Events under both the core group and `events.k8s.io`), so moving a manifest from one to
/// the other must not prune the object it just applied.
fn canonical_group<'a>(group: &'a str, kind: &str) -> &'a str {
    match (group, kind) {
        ("extensions", "Deployment" | "DaemonSet" | "ReplicaSet") => "apps",
        ("extensions", "Ingress" | "NetworkPolicy") => "networking.k8s.io",
        ("extensions", "PodSecurityPolicy") => "policy",
        ("events.k8s.io", "Event") => "",
        _ => group,
    }
}

/// Group, kind, namespace and name: the key of inventory, prune and duplicate checks. The
/// version is only how an object is spoken to, never part of what it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub group: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
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
    /// A bound of [`Limits`] crossed; `document` is 1-based.
    #[error("{file} (document {document}): {message}")]
    Limit {
        file: String,
        document: usize,
        message: String,
    },
    #[error("{id} is defined twice: in {first} and in {second}")]
    Duplicate {
        id: String,
        first: String,
        second: String,
    },
}

/// Parses every manifest file (already filtered to `*.yaml`, `*.yml`, `*.json`), in path order,
/// all of them within one [`Budget`].
pub fn parse_files<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<Vec<Object>, ManifestError> {
    let mut files: Vec<_> = files.into_iter().collect();
    files.sort_by(|a, b| a.0.cmp(b.0));
    let mut budget = Budget::default();
    let mut out = Vec::new();
    let mut seen: BTreeMap<Identity, Source> = BTreeMap::new();
    for (path, bytes) in files {
        for obj in parse_file(path, bytes, &mut budget)? {
            if let Some(first) = seen.get(&obj.id.identity()) {
                return Err(ManifestError::Duplicate {
                    id: obj.id.to_string(),
                    first: first.to_string(),
                    second: obj.source.to_string(),
                });
            }
            seen.insert(obj.id.identity(), obj.source.clone());
            out.push(obj);
        }
    }
    Ok(out)
}

/// Parses one file into objects, taking what it builds from `budget` (shared by the files of
/// one app, so that together they stay within [`Limits`]).
pub fn parse_file(
    path: &str,
    bytes: &[u8],
    budget: &mut Budget,
) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    if path.to_ascii_lowercase().ends_with(".json") {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let value = Bounded {
            budget: &mut *budget,
            depth: 0,
        }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| failed(path, 1, budget, || (e.line(), e.to_string())))?;
        push_value(path, 0, value, &mut out)?;
        return Ok(out);
    }
    for (index, doc) in serde_yaml::Deserializer::from_slice(bytes).enumerate() {
        if index >= budget.limits().documents_per_file {
            return Err(ManifestError::Limit {
                file: path.to_string(),
                document: index + 1,
                message: budget.too_many_documents(),
            });
        }
        let value = Bounded {
            budget: &mut *budget,
            depth: 0,
        }
        .deserialize(doc)
        .map_err(|e| {
            failed(path, index + 1, budget, || {
                (
                    e.location().map_or(0, |l| l.line()),
                    strip_location(&e.to_string()),
                )
            })
        })?;
        push_value(path, index, value, &mut out)?;
    }
    Ok(out)
}

/// Parses a configuration file of one YAML document (a kustomization) into its JSON tree,
/// within `budget` like a manifest: a hostile file cannot expand aliases past the limits.
/// An empty file is `Null`; a second document is refused.
pub fn parse_config(path: &str, bytes: &[u8], budget: &mut Budget) -> Result<Value, ManifestError> {
    let mut out = Value::Null;
    for (index, doc) in serde_yaml::Deserializer::from_slice(bytes).enumerate() {
        if index > 0 {
            return Err(ManifestError::Invalid {
                origin: path.to_string(),
                message: "holds more than one YAML document".into(),
            });
        }
        out = Bounded {
            budget: &mut *budget,
            depth: 0,
        }
        .deserialize(doc)
        .map_err(|e| {
            failed(path, 1, budget, || {
                (
                    e.location().map_or(0, |l| l.line()),
                    strip_location(&e.to_string()),
                )
            })
        })?;
    }
    Ok(out)
}

/// The error of a document that did not parse: the bound it crossed, if the budget refused
/// it, or else the parser's error (line and message).
fn failed(
    path: &str,
    document: usize,
    budget: &mut Budget,
    parse: impl FnOnce() -> (usize, String),
) -> ManifestError {
    match budget.exceeded.take() {
        Some(why) => ManifestError::Limit {
            file: path.to_string(),
            document,
            message: why.describe(budget.limits()),
        },
        None => {
            let (line, message) = parse();
            ManifestError::Parse {
                file: path.to_string(),
                document,
                line,
                message,
            }
        }
    }
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
        Value::Object(mut map) => {
            let kind = map.get("kind").and_then(Value::as_str).unwrap_or_default();
            if kind.ends_with("List") && map.contains_key("items") {
                // Moved out, not copied: a large List costs its size once.
                let Some(Value::Array(items)) = map.remove("items") else {
                    return Err(invalid("items: must be a list".into()));
                };
                for item in items {
                    push_object(source.clone(), item, out)?;
                }
                return Ok(());
            }
            push_object(source, Value::Object(map), out)
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

/// An object from a JSON body that was parsed from `source` before (a copy kept by
/// driftless), checked as a parsed one is.
pub fn object_from_body(source: Source, body: Value) -> Result<Object, ManifestError> {
    let mut out = Vec::with_capacity(1);
    push_object(source, body, &mut out)?;
    Ok(out.pop().expect("an object pushed"))
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

    /// One file parsed with a budget of its own.
    fn parse(path: &str, bytes: &[u8]) -> Result<Vec<Object>, ManifestError> {
        parse_file(path, bytes, &mut Budget::default())
    }

    /// A ConfigMap whose `anchor` is a list of `n` strings, referenced `refs` times: it
    /// expands to about `n * refs` values from a file of about `12 * (n + refs)` bytes.
    fn alias_bomb(n: usize, refs: usize) -> String {
        let items: Vec<String> = (0..n).map(|i| format!("value-{i:05}")).collect();
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: bomb}}\nanchor: &a [{}]\nrefs: [{}]\n",
            items.join(", "),
            vec!["*a"; refs].join(", ")
        )
    }

    fn limit(e: &ManifestError) -> (&str, usize, &str) {
        match e {
            ManifestError::Limit {
                file,
                document,
                message,
            } => (file, *document, message),
            other => panic!("expected a limit error, got {other}"),
        }
    }

    #[test]
    fn an_alias_bomb_is_refused_naming_the_file_and_document() {
        // The file of issue 12: 3,000 references to an anchor of 3,000 scalars, 9 million
        // values from about 50 KB.
        let bomb = alias_bomb(3_000, 3_000);
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        let yaml = format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: a}}\n---\n{bomb}");
        let e = parse("app/bomb.yaml", yaml.as_bytes()).unwrap_err();
        let (file, document, message) = limit(&e);
        assert_eq!((file, document), ("app/bomb.yaml", 2), "{e}");
        assert!(message.contains("more than 1000000 values"), "{e}");
        assert!(
            e.to_string().starts_with("app/bomb.yaml (document 2): "),
            "{e}"
        );
    }

    #[test]
    fn aliases_within_the_budget_are_expanded() {
        let yaml = b"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, labels: &l {app: web}}\nspec:\n  selector: {matchLabels: *l}\n  template: {metadata: {labels: *l}}\n";
        let objs = parse("web.yaml", yaml).unwrap();
        assert_eq!(
            objs[0].body["spec"]["selector"]["matchLabels"]["app"],
            "web"
        );
        assert_eq!(
            objs[0].body["spec"]["template"]["metadata"]["labels"]["app"],
            "web"
        );
        // An anchor used 1,000 times is fine: it is the size, not the aliases, that is bounded.
        let objs = parse("big.yaml", alias_bomb(100, 1_000).as_bytes()).unwrap();
        assert_eq!(objs[0].body["refs"].as_array().unwrap().len(), 1_000);
        assert_eq!(objs[0].body["refs"][999][99], "value-00099");
    }

    #[test]
    fn the_budget_is_shared_by_the_files_of_an_app() {
        // Each file alone fits; together they do not.
        let limits = Limits {
            values: 1_000,
            ..LIMITS
        };
        let file = alias_bomb(20, 20); // about 450 values
        let mut budget = Budget::new(limits);
        parse_file("a.yaml", file.as_bytes(), &mut budget).unwrap();
        parse_file("b.yaml", file.as_bytes(), &mut budget).unwrap();
        let e = parse_file("c.yaml", file.as_bytes(), &mut budget).unwrap_err();
        assert_eq!(limit(&e).0, "c.yaml", "{e}");
        // parse_files shares one budget too; the default one takes an app of many files.
        let files: Vec<(String, String)> = (0..200)
            .map(|i| {
                (
                    format!("f{i:03}.yaml"),
                    alias_bomb(100, 100).replace("bomb", &format!("b{i}")),
                )
            })
            .collect();
        let e = parse_files(files.iter().map(|(p, c)| (p.as_str(), c.as_bytes()))).unwrap_err();
        let (file, document, _) = limit(&e);
        // 97 files of 10,213 values each fit in the million; the 98th crosses it.
        assert_eq!((file, document), ("f097.yaml", 1), "{e}");
    }

    #[test]
    fn documents_per_file_are_bounded() {
        let ok = "---\n".repeat(LIMITS.documents_per_file);
        assert_eq!(parse("empty.yaml", ok.as_bytes()).unwrap(), []);
        let over = "---\n".repeat(LIMITS.documents_per_file + 1);
        let e = parse("many.yaml", over.as_bytes()).unwrap_err();
        assert_eq!(limit(&e).0, "many.yaml");
        assert_eq!(limit(&e).1, LIMITS.documents_per_file + 1);
        assert!(e.to_string().contains("more than 10000 documents"), "{e}");
    }

    #[test]
    fn nesting_depth_is_bounded_in_yaml_and_json() {
        let nested = |depth: usize| {
            format!(
                "{{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {{\"name\": \"a\"}}, \"x\": {}{}}}",
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            )
        };
        // The document's own mapping is level 1.
        for path in ["deep.yaml", "deep.json"] {
            parse(path, nested(LIMITS.depth).as_bytes()).unwrap();
            let e = parse(path, nested(LIMITS.depth + 1).as_bytes()).unwrap_err();
            assert_eq!(limit(&e).0, path);
            assert!(
                e.to_string().contains("nested deeper than 100 levels"),
                "{e}"
            );
        }
        // Deeper than the parsers' own limit (128): still our error, not a stack overflow.
        let e = parse("deeper.yaml", nested(10_000).as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("nested deeper than 100 levels"),
            "{e}"
        );
    }

    #[test]
    fn scalar_size_is_bounded() {
        let cm = |len: usize| {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: a}}\ndata: {{big: {}}}\n",
                "x".repeat(len)
            )
        };
        parse("ok.yaml", cm(LIMITS.scalar_bytes).as_bytes()).unwrap();
        // The empty first document still counts: the big string is in document 2.
        let e = parse(
            "big.yaml",
            format!("---\n---\n{}", cm(LIMITS.scalar_bytes + 1)).as_bytes(),
        )
        .unwrap_err();
        assert_eq!(limit(&e).0, "big.yaml");
        assert_eq!(limit(&e).1, 2);
        assert!(e.to_string().contains("a string of 3145729 bytes"), "{e}");
        // Keys too.
        let key = format!("{{\"{}\": 1}}", "k".repeat(LIMITS.scalar_bytes + 1));
        let e = parse("key.json", key.as_bytes()).unwrap_err();
        assert_eq!(limit(&e), ("key.json", 1, limit(&e).2));
    }

    /// The documents of a YAML stream, each read or refused.
    type Documents = Vec<Result<Value, String>>;

    /// Each YAML document of `text` as `Value::deserialize` reads it, and as the bounded
    /// reader does (with the default limits, which these small inputs never reach), up to the
    /// first error (serde_yaml repeats a syntax error as a document forever).
    fn both_ways(text: &str) -> (Documents, Documents) {
        fn until_error(
            text: &str,
            mut read: impl FnMut(serde_yaml::Deserializer) -> Result<Value, String>,
        ) -> Documents {
            let mut out = Vec::new();
            for doc in serde_yaml::Deserializer::from_str(text) {
                let value = read(doc);
                let failed = value.is_err();
                out.push(value);
                if failed {
                    break;
                }
            }
            out
        }
        let plain = until_error(text, |d| Value::deserialize(d).map_err(|e| e.to_string()));
        let mut budget = Budget::default();
        let bounded = until_error(text, |d| {
            Bounded {
                budget: &mut budget,
                depth: 0,
            }
            .deserialize(d)
            .map_err(|e| e.to_string())
        });
        (plain, bounded)
    }

    fn any_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z0-9 :#&*!'\"-]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map("[a-z0-9 ]{0,6}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The bounded reader builds exactly what `Value::deserialize` builds, from YAML and
        /// from JSON.
        #[test]
        fn the_bounded_reader_reads_what_value_reads(v in any_value()) {
            let yaml = serde_yaml::to_string(&v).unwrap();
            let (plain, bounded) = both_ways(&yaml);
            proptest::prop_assert_eq!(&plain, &bounded);
            let json = serde_json::to_vec(&v).unwrap();
            let mut de = serde_json::Deserializer::from_slice(&json);
            let read = Bounded { budget: &mut Budget::default(), depth: 0 }
                .deserialize(&mut de)
                .unwrap();
            proptest::prop_assert_eq!(read, serde_json::from_slice::<Value>(&json).unwrap());
        }

        /// Any text, valid YAML or not: the same values, or an error both ways.
        #[test]
        fn the_bounded_reader_accepts_and_refuses_what_value_does(
            text in "([a-z0-9:&*!\\-\\[\\]{},'\" #|>]|\n  |\n- |\n---\n){0,40}"
        ) {
            let (plain, bounded) = both_ways(&text);
            proptest::prop_assert_eq!(plain.len(), bounded.len());
            for (p, b) in plain.iter().zip(&bounded) {
                match (p, b) {
                    (Ok(p), Ok(b)) => proptest::prop_assert_eq!(p, b),
                    (Err(_), Err(_)) => {}
                    _ => proptest::prop_assert!(false, "{:?} read as {:?} and {:?}", text, p, b),
                }
            }
        }
    }

    #[test]
    fn string_bytes_are_bounded_across_aliases() {
        // Few values, long strings: a 1 MiB string referenced 100 times.
        let yaml = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: a}}\nx: &s {}\ny: [{}]\n",
            "x".repeat(1 << 20),
            vec!["*s"; 100].join(", ")
        );
        let e = parse("long.yaml", yaml.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("bytes of strings"), "{e}");
    }

    #[test]
    fn identity_ignores_the_version_and_the_old_extensions_group() {
        let id = |api_version: &str, kind: &str| ObjectRef {
            api_version: api_version.into(),
            kind: kind.into(),
            namespace: Some("web".into()),
            name: "x".into(),
        };
        let ingress = id("networking.k8s.io/v1", "Ingress").identity();
        assert_eq!(
            id("networking.k8s.io/v1beta1", "Ingress").identity(),
            ingress
        );
        assert_eq!(id("extensions/v1beta1", "Ingress").identity(), ingress);
        assert_eq!(
            id("extensions/v1beta1", "Deployment").identity(),
            id("apps/v1", "Deployment").identity()
        );
        assert_ne!(id("apps/v1", "Deployment").identity(), ingress);
        assert_ne!(
            id("example.com/v1", "Ingress").identity(),
            ingress,
            "a custom kind of the same name is another object"
        );
    }

    #[test]
    fn multi_document_yaml_with_empty_documents_and_lists() {
        let yaml = b"---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n---\n# only a comment\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s, namespace: x}\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n";
        let objs = parse("app/all.yaml", yaml).unwrap();
        let ids: Vec<String> = objs.iter().map(|o| o.id.to_string()).collect();
        assert_eq!(
            ids,
            ["v1 ConfigMap a", "v1 Service x/s", "apps/v1 Deployment d"]
        );
    }

    #[test]
    fn json_files() {
        let objs = parse(
            "a.json",
            br#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"demo"}}"#,
        )
        .unwrap();
        assert_eq!(objs[0].id.to_string(), "v1 Namespace demo");
        let e = parse("b.json", b"{\n\"apiVersion\": }").unwrap_err();
        assert!(matches!(e, ManifestError::Parse { line: 2, .. }), "{e}");
    }

    #[test]
    fn parse_errors_name_file_document_and_line() {
        let yaml = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: [unclosed\n";
        let e = parse("app/bad.yaml", yaml).unwrap_err();
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
        let e = parse("a.yaml", b"kind: ConfigMap\nmetadata: {name: a}\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "a.yaml (document 1): apiVersion: is required"
        );
        let e = parse("a.yaml", b"apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "a.yaml (document 1): metadata.name: is required"
        );
        let e = parse("a.yaml", b"- 1\n- 2\n").unwrap_err();
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
