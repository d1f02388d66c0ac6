//! Reading one kustomization file: which other kustomizations it builds on (the directories a
//! render will read) and whether any path it names could reach outside the commit. Pure
//! functions over the parsed file, so every refusal is tested without a forge.

use serde_json::Value;

/// The names Kustomize looks for in a directory, in its own order of preference.
pub const FILE_NAMES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// A path named by a kustomization, with the field that names it (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub field: &'static str,
    pub path: String,
}

/// What a kustomization refers to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct References {
    /// `resources`, `bases` and `components`: files in or below the kustomization's directory,
    /// or directories of other kustomizations anywhere in the repository.
    pub builds_on: Vec<Reference>,
    /// Every other path (patches, generator files and env files, `crds`, `openapi`,
    /// `replacements`, plugin configurations): Kustomize's load restrictor keeps these in or
    /// below the kustomization's directory, which is fetched whole.
    pub files: Vec<Reference>,
    /// Fields driftless refuses whatever their value (Helm charts).
    pub unsupported: Vec<&'static str>,
}

/// The references of a parsed kustomization. Values of the wrong type are left to Kustomize,
/// which reports them with its own message; inline patches (text with a line break) are not
/// paths.
pub fn references(doc: &Value) -> References {
    let mut out = References::default();
    for field in ["resources", "bases", "components"] {
        for path in strings(doc.get(field)) {
            out.builds_on.push(Reference { field, path });
        }
    }
    for field in [
        "patchesStrategicMerge",
        "crds",
        "generators",
        "transformers",
        "validators",
        "configurations",
    ] {
        for path in strings(doc.get(field)).filter(|p| !p.contains('\n')) {
            out.files.push(Reference { field, path });
        }
    }
    for field in ["patches", "patchesJson6902", "replacements"] {
        for item in items(doc.get(field)) {
            if let Some(path) = item.get("path").and_then(Value::as_str) {
                out.files.push(Reference {
                    field,
                    path: path.to_string(),
                });
            }
        }
    }
    if let Some(path) = doc.pointer("/openapi/path").and_then(Value::as_str) {
        out.files.push(Reference {
            field: "openapi",
            path: path.to_string(),
        });
    }
    for field in ["configMapGenerator", "secretGenerator"] {
        for item in items(doc.get(field)) {
            // `files` entries may be `key=path`.
            for file in strings(item.get("files")) {
                let path = file.split_once('=').map_or(file.as_str(), |(_, p)| p);
                out.files.push(Reference {
                    field,
                    path: path.to_string(),
                });
            }
            let env = item.get("env").and_then(Value::as_str).map(str::to_string);
            for path in strings(item.get("envs")).chain(env) {
                out.files.push(Reference { field, path });
            }
        }
    }
    for field in ["helmCharts", "helmChartInflationGenerator", "helmGlobals"] {
        if doc.get(field).is_some_and(|v| !v.is_null()) {
            out.unsupported.push(field);
        }
    }
    out
}

fn strings(v: Option<&Value>) -> impl Iterator<Item = String> + '_ {
    items(v).filter_map(|s| s.as_str().map(str::to_string))
}

fn items(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    v.and_then(Value::as_array).into_iter().flatten()
}

/// Whether a reference names something outside the repository by its form alone: a URL, a
/// git address, or a go-getter style query (`?ref=`).
pub fn is_remote(reference: &str) -> bool {
    reference.contains("://")
        || reference.starts_with("git@")
        || reference.starts_with("git::")
        || ["?ref=", "?version=", "?submodules=", "?timeout="]
            .iter()
            .any(|q| reference.contains(q))
}

/// Whether a reference that was not found in the commit looks like a repository on a host
/// (`github.com/org/repo[/path]`: a host name, then at least an owner and a repository),
/// which Kustomize would try to clone.
pub fn looks_like_host(reference: &str) -> bool {
    let segments: Vec<&str> = reference.split('/').filter(|s| !s.is_empty()).collect();
    if segments.len() < 3 {
        return false;
    }
    let first = segments[0];
    let labels: Vec<&str> = first.split('.').collect();
    labels.len() >= 2
        && labels
            .iter()
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()))
}

/// Why a reference of the kustomization in `dir` cannot be followed, or the path it names
/// from the repository root (normalised: no `.`, no `..`, no empty segments).
pub fn resolve(dir: &str, reference: &str) -> Result<String, &'static str> {
    let r = reference.trim();
    if r.is_empty() {
        return Err("is empty");
    }
    if is_remote(r) {
        return Err(REMOTE);
    }
    if r.starts_with('/') || r.starts_with('\\') || r.get(1..3) == Some(":\\") {
        return Err("is an absolute path; a kustomization may only name paths relative to itself");
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in r.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("points outside the repository");
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// Why a remote base is refused.
pub const REMOTE: &str = "is a remote base; driftless builds only from the commit it applies (a remote base would need a clone and can change without a commit)";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_field_that_names_a_path_is_read() {
        let doc = json!({
            "resources": ["deploy.yaml", "../../base/web"],
            "bases": ["../old"],
            "components": ["../../components/probe"],
            "patchesStrategicMerge": ["patch.yaml", "apiVersion: v1\nkind: ConfigMap\n"],
            "patches": [{"path": "p.yaml"}, {"patch": "inline"}],
            "patchesJson6902": [{"path": "j.yaml"}],
            "replacements": [{"path": "r.yaml"}],
            "openapi": {"path": "schema.json"},
            "crds": ["crd.yaml"],
            "configMapGenerator": [{"files": ["app.conf", "key=other.conf"], "envs": ["a.env"], "env": "b.env"}],
            "secretGenerator": [{"files": ["s.txt"]}],
            "helmCharts": [{"name": "x"}],
        });
        let refs = references(&doc);
        let builds: Vec<_> = refs.builds_on.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            builds,
            [
                "deploy.yaml",
                "../../base/web",
                "../old",
                "../../components/probe"
            ]
        );
        let files: Vec<_> = refs.files.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            files,
            [
                "patch.yaml",
                "crd.yaml",
                "p.yaml",
                "j.yaml",
                "r.yaml",
                "schema.json",
                "app.conf",
                "other.conf",
                "a.env",
                "b.env",
                "s.txt"
            ]
        );
        assert_eq!(refs.unsupported, ["helmCharts"]);
    }

    #[test]
    fn references_resolve_inside_the_repository_only() {
        assert_eq!(resolve("envs/prod", "../../base/web").unwrap(), "base/web");
        assert_eq!(resolve("envs/prod", "./a//b/").unwrap(), "envs/prod/a/b");
        assert_eq!(resolve("", "base").unwrap(), "base");
        assert_eq!(
            resolve("envs/prod", "../../../x"),
            Err("points outside the repository")
        );
        assert!(resolve("a", "/etc/passwd")
            .unwrap_err()
            .contains("absolute"));
        assert!(resolve("a", "C:\\x").unwrap_err().contains("absolute"));
        assert_eq!(
            resolve("a", "https://github.com/org/repo//base?ref=v1"),
            Err(REMOTE)
        );
        assert_eq!(resolve("a", "git@github.com:org/repo.git"), Err(REMOTE));
        assert_eq!(resolve("a", "github.com/org/repo/base?ref=v1"), Err(REMOTE));
        assert_eq!(resolve("a", " "), Err("is empty"));
    }

    #[test]
    fn host_like_first_segments_are_told_apart_from_directories() {
        assert!(looks_like_host("github.com/org/repo/base"));
        assert!(looks_like_host("gitlab.example.org/group/p"));
        assert!(!looks_like_host("../base"));
        assert!(!looks_like_host("conf.d/x"));
        assert!(!looks_like_host("v1.2/x"));
        assert!(!looks_like_host("base"));
        assert!(!looks_like_host("missing.yaml"));
        assert!(!looks_like_host("github.com/org"));
    }
}
