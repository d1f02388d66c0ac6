//! GitHub's own OpenAPI description as a conformance oracle: finds the operation a concrete
//! request path belongs to and validates JSON against its schemas (types, `required`,
//! `nullable`, `enum`, `$ref`, `allOf`/`anyOf`/`oneOf`, `items`, `properties`,
//! `additionalProperties`), so the forge simulator is held to GitHub's published shapes and
//! a client can be shown to call only operations that exist.

use std::path::PathBuf;
use std::sync::OnceLock;

use driftless::simulator::RecordedRequest;
use serde_json::Value;

/// `tests/fixtures/github-openapi/api.github.com.subset.json`, parsed once.
pub fn description() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/github-openapi/api.github.com.subset.json");
        let text = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the real forge payloads, copied from the shared corpus into tests/fixtures)",
                path.display()
            )
        });
        serde_json::from_slice(&text).expect("the OpenAPI description is JSON")
    })
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    let mut v = value;
    // Component references can chain (a response pointing at a response).
    for _ in 0..16 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').unwrap_or(r);
                v = doc
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling $ref {r}"));
            }
            None => return v,
        }
    }
    panic!("$ref cycle at {value}")
}

/// The operation's parameters (its own and its path item's), `$ref`s resolved.
fn parameters<'a>(doc: &'a Value, path_item: &'a Value, op: &'a Value) -> Vec<&'a Value> {
    [path_item, op]
        .iter()
        .filter_map(|v| v.get("parameters").and_then(Value::as_array))
        .flatten()
        .map(|p| resolve(doc, p))
        .collect()
}

/// Whether a path parameter may span slashes. GitHub marks these `x-multi-segment` in its
/// description: `ref`, `basehead`, `path`, and also `tree_sha`, `sha` and `branch`.
fn multi_segment(params: &[&Value], name: &str) -> bool {
    params.iter().any(|p| {
        p.get("name").and_then(Value::as_str) == Some(name)
            && p.get("in").and_then(Value::as_str) == Some("path")
            && p.get("x-multi-segment").and_then(Value::as_bool) == Some(true)
    })
}

/// Matches template segments against concrete ones; a multi-segment parameter takes one or
/// more segments.
fn segments_match(template: &[&str], concrete: &[&str], multi: &dyn Fn(&str) -> bool) -> bool {
    let Some((first, rest)) = template.split_first() else {
        return concrete.is_empty();
    };
    let Some(name) = first.strip_prefix('{').and_then(|s| s.strip_suffix('}')) else {
        return concrete.first() == Some(first) && segments_match(rest, &concrete[1..], multi);
    };
    if concrete.first().is_none_or(|s| s.is_empty()) {
        return false;
    }
    if multi(name) {
        (1..=concrete.len()).any(|n| segments_match(rest, &concrete[n..], multi))
    } else {
        segments_match(rest, &concrete[1..], multi)
    }
}

/// The path template and operation a request belongs to, e.g. `("GET",
/// "/repos/a/b/git/ref/heads/feature/x")` → `/repos/{owner}/{repo}/git/ref/{ref}`. When
/// several templates match, the one with the most literal segments wins (as routers do).
pub fn find_operation(method: &str, concrete_path: &str) -> Option<(&'static str, &'static Value)> {
    let doc = description();
    let method = method.to_ascii_lowercase();
    let concrete: Vec<&str> = concrete_path
        .split('?')
        .next()
        .unwrap_or("")
        .trim_start_matches('/')
        .split('/')
        .collect();
    let paths = doc["paths"].as_object()?;
    paths
        .iter()
        .filter_map(|(template, item)| {
            let op = item.get(&method)?;
            let params = parameters(doc, item, op);
            let parts: Vec<&str> = template.trim_start_matches('/').split('/').collect();
            let multi = |name: &str| multi_segment(&params, name);
            segments_match(&parts, &concrete, &multi).then(|| {
                let literals = parts.iter().filter(|p| !p.starts_with('{')).count();
                (literals, template.as_str(), op)
            })
        })
        .max_by_key(|(literals, _, _)| *literals)
        .map(|(_, template, op)| (template, op))
}

/// The JSON schema of an operation's response with this status, if it has a JSON body.
pub fn response_schema(operation: &'static Value, status: u16) -> Option<&'static Value> {
    let doc = description();
    let response = operation["responses"].get(status.to_string())?;
    let response = resolve(doc, response);
    response
        .get("content")?
        .get("application/json")?
        .get("schema")
}

/// Validates `value` against `schema` (which may be or contain `$ref`s into the
/// description). Each error names the JSON path of the offending value.
pub fn validate(schema: &Value, value: &Value) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    check(description(), schema, value, "$", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(expected: &str, value: &Value) -> bool {
    match expected {
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "null" => value.is_null(),
        _ => true,
    }
}

fn check(doc: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if value.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
        return;
    }
    let passes = |s: &Value| {
        let mut sub = Vec::new();
        check(doc, s, value, path, &mut sub);
        sub.is_empty()
    };
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(doc, s, value, path, errors);
        }
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
        if !any.iter().any(passes) {
            errors.push(format!("{path}: matches none of anyOf: {value}"));
        }
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        let n = one.iter().filter(|s| passes(s)).count();
        if n != 1 {
            errors.push(format!(
                "{path}: matches {n} of oneOf, expected exactly 1: {value}"
            ));
        }
    }
    match schema.get("type") {
        Some(Value::String(t)) if !type_matches(t, value) => {
            errors.push(format!("{path}: expected {t}, got {} {value}", kind(value)));
            return;
        }
        Some(Value::Array(types))
            if !types
                .iter()
                .filter_map(Value::as_str)
                .any(|t| type_matches(t, value)) =>
        {
            errors.push(format!(
                "{path}: expected one of {types:?}, got {}",
                kind(value)
            ));
            return;
        }
        _ => {}
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            errors.push(format!("{path}: {value} is not one of {allowed:?}"));
        }
    }
    if let Value::Object(map) = value {
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for field in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(field) {
                    errors.push(format!("{path}: missing required field {field:?}"));
                }
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (key, v) in map {
            let child = format!("{path}.{key}");
            match properties.and_then(|p| p.get(key)) {
                Some(s) => check(doc, s, v, &child, errors),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => errors.push(format!(
                        "{child}: not allowed (additionalProperties: false)"
                    )),
                    Some(s @ Value::Object(_)) => check(doc, s, v, &child, errors),
                    _ => {}
                },
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            check(doc, item_schema, v, &format!("{path}[{i}]"), errors);
        }
    }
}

/// Panics, naming the request, when a recorded GitHub request is no operation of GitHub's
/// description (method and path without the simulator's `/github` root).
pub fn assert_github_requests_exist(requests: &[RecordedRequest]) {
    for r in requests.iter().filter(|r| r.forge == "github") {
        let path = r.path.strip_prefix("/github").unwrap_or(&r.path);
        assert!(
            find_operation(&r.method, path).is_some(),
            "{} {path} is not an operation of GitHub's REST API description: {r:?}",
            r.method
        );
    }
}

#[test]
fn operations_are_found_by_template() {
    let (t, op) = find_operation("GET", "/repos/a/b/git/ref/heads/feature/x").unwrap();
    assert_eq!(t, "/repos/{owner}/{repo}/git/ref/{ref}");
    assert_eq!(op["operationId"], "git/get-ref");
    let (t, _) = find_operation("GET", "/repos/a/b/commits/abc/status").unwrap();
    assert_eq!(t, "/repos/{owner}/{repo}/commits/{ref}/status");
    let (t, _) = find_operation("GET", "/repos/a/b/compare/main...feature/x").unwrap();
    assert_eq!(t, "/repos/{owner}/{repo}/compare/{basehead}");
    // The preview comment: listed and created on the pull request (an issue), edited by id.
    let (t, op) = find_operation("GET", "/repos/a/b/issues/7/comments?per_page=100").unwrap();
    assert_eq!(t, "/repos/{owner}/{repo}/issues/{issue_number}/comments");
    assert_eq!(op["operationId"], "issues/list-comments");
    let (_, op) = find_operation("POST", "/repos/a/b/issues/7/comments").unwrap();
    assert_eq!(op["operationId"], "issues/create-comment");
    let (t, op) = find_operation("PATCH", "/repos/a/b/issues/comments/42").unwrap();
    assert_eq!(t, "/repos/{owner}/{repo}/issues/comments/{comment_id}");
    assert_eq!(op["operationId"], "issues/update-comment");
    assert!(find_operation("PUT", "/repos/a/b/issues/comments/42").is_none());
    assert!(find_operation("PATCH", "/repos/a/b/issues/7/comments").is_none());
    assert!(find_operation("GET", "/repos/a/b/git/blobs/x/y").is_none());
    assert!(find_operation("PUT", "/repos/a/b/hooks/1").is_none());
    assert!(find_operation("GET", "/repos/a/git/ref/heads/x").is_none());
    assert!(find_operation("GET", "/repos/a/b/hooks/").is_none());
}

#[test]
fn validator_reports_paths_of_errors() {
    let (_, op) = find_operation("GET", "/repos/a/b/git/ref/heads/main").unwrap();
    let schema = response_schema(op, 200).unwrap();
    let good = serde_json::json!({
        "ref": "refs/heads/main", "node_id": "x", "url": "http://x",
        "object": {"type": "commit", "sha": "a".repeat(40), "url": "http://x"},
    });
    assert_eq!(validate(schema, &good), Ok(()));
    let mut bad = good.clone();
    bad["object"]["sha"] = 5.into();
    bad.as_object_mut().unwrap().remove("node_id");
    let errors = validate(schema, &bad).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("$.object.sha: expected string")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("\"node_id\"")),
        "{errors:?}"
    );

    // nullable, oneOf with an additionalProperties: false alternative, enum.
    let commit = serde_json::json!({"$ref": "#/components/schemas/commit"});
    let mut c = serde_json::json!({
        "url": "u", "sha": "s", "node_id": "n", "html_url": "h", "comments_url": "c",
        "commit": {"url": "u", "author": null, "committer": null, "message": "m",
                   "comment_count": 0, "tree": {"sha": "t", "url": "u"}},
        "author": null, "committer": {}, "parents": [],
    });
    assert_eq!(validate(&commit, &c), Ok(()));
    c["committer"] = serde_json::json!({"unexpected": 1});
    assert!(validate(&commit, &c).unwrap_err()[0].starts_with("$.committer: matches 0 of oneOf"));
    let comparison = serde_json::json!({"$ref": "#/components/schemas/commit-comparison"});
    let errors = validate(&comparison, &serde_json::json!({"status": "sideways"})).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("$.status: \"sideways\" is not one of")),
        "{errors:?}"
    );
}
