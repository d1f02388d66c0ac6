//! The forge simulator against real git repositories: every GitHub endpoint answers with the
//! shapes of GitHub's OpenAPI description, GitLab's pagination, blobs, statuses, hooks and
//! project naming behave as GitLab documents them, faults are applied and consumed, the push
//! webhooks it sends are accepted by driftless's own receiver, and its pull/merge request
//! webhooks have the shape of the forges' real payloads.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine as _;
use driftless::metrics::Metrics;
use driftless::queue::JobQueue;
use driftless::server::{routes, Receiver};
use driftless::settings::{ForgeKind, Settings};
use driftless::simulator::{
    Fault, FaultKind, ForgeSimulator, RequestAction, RequestHook, SimConfig, UNKNOWN_ROUTE,
};
use driftless::webhook::{Event, PullRequestAction, PullRequestEvent};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::fixture;
use crate::support::openapi::{
    assert_github_requests_exist, find_operation, response_schema, validate,
};

const GH_TOKEN: &str = "ghp_simulator_token";
const GL_TOKEN: &str = "glpat-simulator-token";

/// A real git repository in a temporary directory, written and committed by the test.
pub struct TestRepo {
    dir: tempfile::TempDir,
}

impl TestRepo {
    /// `git init -b main`.
    pub fn new() -> Self {
        let repo = Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs git in the repository, isolated from the user's configuration, and returns its
    /// trimmed stdout; panics with stderr when git fails.
    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(self.path())
            .args([
                "-c",
                "user.name=Sim Tester",
                "-c",
                "user.email=tester@example.com",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env_remove("GIT_INDEX_FILE")
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Writes a file, creating its directories.
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) {
        let path = self.path().join(rel);
        std::fs::create_dir_all(path.parent().expect("a file has a directory")).unwrap();
        std::fs::write(&path, content).unwrap();
    }

    /// Stages everything and commits; returns the new commit's SHA.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    pub fn checkout(&self, branch: &str) {
        self.git(&["checkout", "-q", branch]);
    }

    pub fn checkout_new(&self, branch: &str) {
        self.git(&["checkout", "-q", "-b", branch]);
    }
}

async fn simulator() -> ForgeSimulator {
    ForgeSimulator::start(SimConfig {
        github_token: GH_TOKEN.into(),
        gitlab_token: GL_TOKEN.into(),
    })
    .await
    .expect("simulator starts")
}

/// One HTTP answer, its body parsed as JSON when it is JSON.
struct Answer {
    status: u16,
    headers: HeaderMap,
    bytes: Vec<u8>,
    json: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn read(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.expect("body").to_vec();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        bytes,
        json,
    }
}

/// A client of the simulated GitHub that checks every successful JSON answer against the
/// schema GitHub's OpenAPI description gives for that operation and status.
struct GithubClient {
    api: String,
    http: reqwest::Client,
    token: String,
}

impl GithubClient {
    /// A blob's bytes themselves (`Accept: application/vnd.github.raw+json`).
    async fn raw_blob(&self, repo: &str, sha: &str) -> Answer {
        self.send(
            Method::GET,
            &format!("/repos/{repo}/git/blobs/{sha}"),
            None,
            &[("accept", "application/vnd.github.raw+json")],
        )
        .await
    }

    fn new(sim: &ForgeSimulator) -> Self {
        Self {
            api: sim.github_api_url(),
            http: reqwest::Client::new(),
            token: GH_TOKEN.into(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.api))
            .header("authorization", format!("Bearer {}", self.token));
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("accept"))
        {
            req = req.header("accept", "application/vnd.github+json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let answer = read(req.send().await.expect("request")).await;
        let is_json = answer
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json"));
        if (200..300).contains(&answer.status) && is_json {
            let concrete = path.split('?').next().unwrap_or(path);
            let (template, op) = find_operation(method.as_str(), concrete)
                .unwrap_or_else(|| panic!("{method} {concrete} is no GitHub operation"));
            let schema = response_schema(op, answer.status).unwrap_or_else(|| {
                panic!("{template} documents no JSON response {}", answer.status)
            });
            if let Err(errors) = validate(schema, &answer.json) {
                panic!(
                    "{method} {path} ({template}) {} does not match GitHub's schema:\n{}\n{}",
                    answer.status,
                    errors.join("\n"),
                    serde_json::to_string_pretty(&answer.json).unwrap()
                );
            }
        }
        answer
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, &[]).await
    }
}

/// A repository exercising every tree entry kind: directories, an executable, a symlink and a
/// submodule; `main` at the returned commit.
fn sample_repo() -> (TestRepo, String) {
    use std::os::unix::fs::PermissionsExt;
    let repo = TestRepo::new();
    repo.write("README.md", "hello\n");
    repo.write(
        "apps/web/deploy.yaml",
        "kind: Deployment\nmetadata:\n  name: web\n",
    );
    repo.write("apps/web/run.sh", "#!/bin/sh\necho run\n");
    let script = repo.path().join("apps/web/run.sh");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("README.md", repo.path().join("link")).unwrap();
    let first = repo.commit("first");
    repo.git(&[
        "update-index",
        "--add",
        "--cacheinfo",
        &format!("160000,{first},vendor/lib"),
    ]);
    repo.git(&["commit", "-q", "-m", "vendor a submodule"]);
    let head = repo.git(&["rev-parse", "HEAD"]);
    (repo, head)
}

#[tokio::test]
async fn github_refs_trees_and_blobs_match_the_openapi_description() {
    let (repo, head) = sample_repo();
    repo.checkout_new("feature/x");
    let feature = repo.commit("on a branch with a slash");
    repo.checkout("main");
    let sim = simulator().await;
    sim.add_repo("Acme/Deploy", repo.path());
    let gh = GithubClient::new(&sim);

    // Refs: names are case-insensitive, branch names may contain slashes (raw or encoded).
    let r = gh.get("/repos/acme/deploy/git/ref/heads/main").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["ref"], "refs/heads/main");
    assert_eq!(r.json["object"]["type"], "commit");
    assert_eq!(r.json["object"]["sha"], head.as_str());
    assert!(r.json["url"]
        .as_str()
        .unwrap()
        .contains("/repos/Acme/Deploy/"));
    for path in [
        "/repos/Acme/Deploy/git/ref/heads/feature/x",
        "/repos/Acme/Deploy/git/ref/heads/feature%2Fx",
    ] {
        let r = gh.get(path).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json["object"]["sha"], feature.as_str());
    }
    let missing = gh.get("/repos/acme/deploy/git/ref/heads/nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json["message"], "Not Found");
    assert_eq!(
        gh.get("/repos/acme/other/git/ref/heads/main").await.status,
        404
    );

    // A recursive tree by commit SHA lists subtrees and every entry kind.
    let t = gh
        .get(&format!("/repos/acme/deploy/git/trees/{head}?recursive=1"))
        .await;
    assert_eq!(t.status, 200);
    assert_eq!(t.json["truncated"], false);
    let entries: Vec<(String, String, String)> = t.json["tree"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["mode"].as_str().unwrap().to_string(),
                e["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = |path: &str, mode: &str, kind: &str| {
        assert!(
            entries.contains(&(path.into(), mode.into(), kind.into())),
            "{path} {mode} {kind} not in {entries:?}"
        );
    };
    expect("README.md", "100644", "blob");
    expect("apps", "040000", "tree");
    expect("apps/web", "040000", "tree");
    expect("apps/web/deploy.yaml", "100644", "blob");
    expect("apps/web/run.sh", "100755", "blob");
    expect("link", "120000", "blob");
    expect("vendor", "040000", "tree");
    expect("vendor/lib", "160000", "commit");
    let deploy = t.json["tree"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "apps/web/deploy.yaml")
        .unwrap()
        .clone();
    assert_eq!(deploy["size"], 39);
    let root_tree = repo.git(&["rev-parse", "main^{tree}"]);
    assert_eq!(t.json["sha"], root_tree.as_str());

    // Non-recursive, by branch name and by tree SHA; an explicit "0" still means recursive.
    let top = gh.get("/repos/acme/deploy/git/trees/main").await;
    let top_paths: Vec<&str> = top.json["tree"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(top_paths, ["README.md", "apps", "link", "vendor"]);
    let apps_tree = repo.git(&["rev-parse", "main:apps"]);
    let sub = gh
        .get(&format!(
            "/repos/acme/deploy/git/trees/{apps_tree}?recursive=0"
        ))
        .await;
    assert_eq!(sub.status, 200);
    assert_eq!(sub.json["tree"].as_array().unwrap().len(), 3);
    let by_branch = gh.get("/repos/acme/deploy/git/trees/feature/x").await;
    assert_eq!(by_branch.status, 200);
    assert_eq!(
        gh.get("/repos/acme/deploy/git/trees/nope").await.status,
        404
    );

    // The truncation fault: only the top level, truncated, once.
    sim.inject(Fault {
        forge: Some("github"),
        path_contains: "/git/trees/".into(),
        kind: FaultKind::TruncateTrees,
        times: 1,
    });
    // A non-recursive listing does not consume it.
    assert_eq!(
        gh.get("/repos/acme/deploy/git/trees/main").await.json["truncated"],
        false
    );
    let cut = gh
        .get("/repos/acme/deploy/git/trees/main?recursive=1")
        .await;
    assert_eq!(cut.json["truncated"], true);
    assert_eq!(cut.json["tree"].as_array().unwrap().len(), 4);
    let whole = gh
        .get("/repos/acme/deploy/git/trees/main?recursive=1")
        .await;
    assert_eq!(whole.json["truncated"], false);
    assert_eq!(whole.json["tree"].as_array().unwrap().len(), 8);

    // Blobs: base64 in lines of at most 60 characters, decoding to the file's bytes.
    let sha = deploy["sha"].as_str().unwrap();
    let b = gh.get(&format!("/repos/acme/deploy/git/blobs/{sha}")).await;
    assert_eq!(b.status, 200);
    assert_eq!(b.json["encoding"], "base64");
    assert_eq!(b.json["size"], 39);
    let content = b.json["content"].as_str().unwrap();
    assert!(content.lines().all(|l| l.len() <= 60), "{content:?}");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(content.replace('\n', ""))
        .unwrap();
    assert_eq!(
        decoded,
        std::fs::read(repo.path().join("apps/web/deploy.yaml")).unwrap()
    );
    let raw = gh.raw_blob("acme/deploy", sha).await;
    assert_eq!(raw.bytes, decoded);
    assert_eq!(
        gh.get(&format!("/repos/acme/deploy/git/blobs/{head}"))
            .await
            .status,
        404
    );
    assert_eq!(
        gh.get("/repos/acme/deploy/git/blobs/main").await.status,
        404
    );
    // The simulator keeps one `git cat-file --batch` for object lookups: a prefix names the
    // blob, and objects committed after the batch started are found too, empty ones included.
    let short = gh
        .get(&format!("/repos/acme/deploy/git/blobs/{}", &sha[..7]))
        .await;
    assert_eq!((short.status, short.json["sha"].as_str()), (200, Some(sha)));
    repo.write("apps/web/later.bin", b"\x00\n\xffafter\n\n");
    repo.write("apps/web/empty.yaml", b"");
    repo.commit("later");
    for (file, bytes) in [
        ("later.bin", &b"\x00\n\xffafter\n\n"[..]),
        ("empty.yaml", b""),
    ] {
        let sha = repo.git(&["rev-parse", &format!("HEAD:apps/web/{file}")]);
        let raw = gh.raw_blob("acme/deploy", &sha).await;
        assert_eq!((raw.status, &raw.bytes[..]), (200, bytes), "{file}");
    }

    assert_github_requests_exist(&sim.requests());
}

/// Validates an error answer against the schema GitHub's description documents for that
/// operation and status (the client above only checks successful answers).
fn assert_documented_error(method: &str, path: &str, answer: &Answer) {
    let (template, op) = find_operation(method, path).expect("a GitHub operation");
    let schema = response_schema(op, answer.status)
        .unwrap_or_else(|| panic!("{method} {template} documents no {}", answer.status));
    if let Err(errors) = validate(schema, &answer.json) {
        panic!(
            "{method} {path} {}: {}\n{}",
            answer.status,
            errors.join("\n"),
            answer.json
        );
    }
}

/// Issue comments (the preview comment on a pull request): created, listed and edited with
/// the `issue-comment` shape, and refused with GitHub's documented 422 when the body is
/// missing or over 65,536 characters (characters, not bytes).
#[tokio::test]
async fn github_issue_comments_match_the_openapi_description() {
    let repo = TestRepo::new();
    repo.write("a", "1\n");
    repo.commit("one");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let gh = GithubClient::new(&sim);

    let empty = gh.get("/repos/acme/deploy/issues/3/comments").await;
    assert_eq!((empty.status, &empty.json), (200, &json!([])));
    let created = gh
        .send(
            Method::POST,
            "/repos/acme/deploy/issues/3/comments",
            Some(json!({"body": "preview"})),
            &[],
        )
        .await;
    assert_eq!(created.status, 201);
    assert_eq!(created.json["body"], "preview");
    let id = created.json["id"].as_u64().unwrap();
    assert!(created.json["issue_url"]
        .as_str()
        .unwrap()
        .ends_with("/repos/acme/deploy/issues/3"));

    let at_limit = "é".repeat(65_536);
    let edited = gh
        .send(
            Method::PATCH,
            &format!("/repos/acme/deploy/issues/comments/{id}"),
            Some(json!({ "body": at_limit })),
            &[],
        )
        .await;
    assert_eq!(edited.status, 200);
    assert_eq!(edited.json["id"], id);
    assert_eq!(edited.json["body"], at_limit.as_str());

    let listed = gh
        .get("/repos/acme/deploy/issues/3/comments?per_page=100")
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json.as_array().unwrap().len(), 1);
    assert_eq!(listed.json[0]["id"], id);
    // Another pull request has its own comments.
    assert_eq!(
        gh.get("/repos/acme/deploy/issues/4/comments").await.json,
        json!([])
    );

    let over = "é".repeat(65_537);
    for (method, path) in [
        (
            Method::POST,
            "/repos/acme/deploy/issues/3/comments".to_string(),
        ),
        (
            Method::PATCH,
            format!("/repos/acme/deploy/issues/comments/{id}"),
        ),
    ] {
        for body in [json!({ "body": over }), json!({})] {
            let refused = gh.send(method.clone(), &path, Some(body), &[]).await;
            assert_eq!(refused.status, 422, "{method} {path}");
            assert_documented_error(method.as_str(), &path, &refused);
            assert_eq!(refused.json["errors"][0]["field"], "body");
        }
    }
    let unknown = gh
        .send(
            Method::PATCH,
            "/repos/acme/deploy/issues/comments/999999",
            Some(json!({"body": "x"})),
            &[],
        )
        .await;
    assert_eq!(unknown.status, 404);
    // Nothing refused was stored.
    let comments = sim.comments("acme/deploy", 3);
    assert_eq!(comments.len(), 1);
    assert_eq!(
        (comments[0].body.chars().count(), comments[0].edits),
        (65_536, 1)
    );

    assert_github_requests_exist(&sim.requests());
}

#[tokio::test]
async fn github_compare_reports_ahead_behind_identical_and_diverged() {
    let repo = TestRepo::new();
    repo.write("apps/web/deploy.yaml", "replicas: 1\n");
    let base = repo.commit("base");
    repo.checkout_new("feature");
    repo.write("apps/web/deploy.yaml", "replicas: 2\n");
    repo.write("apps/api/deploy.yaml", "replicas: 1\n");
    let feature = repo.commit("scale web, add api");
    repo.checkout("main");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let gh = GithubClient::new(&sim);
    let compare = |basehead: &str| format!("/repos/acme/deploy/compare/{basehead}");

    let ahead = gh.get(&compare("main...feature")).await;
    assert_eq!(ahead.status, 200);
    assert_eq!(
        (
            &ahead.json["status"],
            &ahead.json["ahead_by"],
            &ahead.json["behind_by"]
        ),
        (&json!("ahead"), &json!(1), &json!(0))
    );
    assert_eq!(ahead.json["total_commits"], 1);
    assert_eq!(ahead.json["commits"][0]["sha"], feature.as_str());
    assert_eq!(
        ahead.json["commits"][0]["commit"]["message"],
        "scale web, add api"
    );
    assert_eq!(ahead.json["merge_base_commit"]["sha"], base.as_str());
    assert_eq!(ahead.json["base_commit"]["sha"], base.as_str());
    let files: BTreeSet<(String, String)> = ahead.json["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["filename"].as_str().unwrap().to_string(),
                f["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        files,
        BTreeSet::from([
            ("apps/api/deploy.yaml".to_string(), "added".to_string()),
            ("apps/web/deploy.yaml".to_string(), "modified".to_string()),
        ])
    );

    let behind = gh.get(&compare("feature...main")).await;
    assert_eq!(
        (
            &behind.json["status"],
            &behind.json["ahead_by"],
            &behind.json["behind_by"]
        ),
        (&json!("behind"), &json!(0), &json!(1))
    );
    let same = gh.get(&compare(&format!("main...{base}"))).await;
    assert_eq!(same.json["status"], "identical");
    assert_eq!(same.json["files"], json!([]));

    repo.write("README.md", "diverge\n");
    let main2 = repo.commit("main moves on");
    let diverged = gh.get(&compare("main...feature")).await;
    assert_eq!(
        (
            &diverged.json["status"],
            &diverged.json["ahead_by"],
            &diverged.json["behind_by"]
        ),
        (&json!("diverged"), &json!(1), &json!(1))
    );
    assert_eq!(diverged.json["base_commit"]["sha"], main2.as_str());
    assert_eq!(diverged.json["merge_base_commit"]["sha"], base.as_str());
    assert_eq!(diverged.json["merge_base_commit"]["parents"], json!([]));

    // Unrelated history and unknown names.
    repo.git(&["checkout", "-q", "--orphan", "island"]);
    repo.write("other", "x\n");
    repo.commit("unrelated root");
    let unrelated = gh.get(&compare("main...island")).await;
    assert_eq!(unrelated.status, 404);
    assert!(unrelated.json["message"]
        .as_str()
        .unwrap()
        .contains("No common ancestor"));
    assert_eq!(gh.get(&compare("main...nope")).await.status, 404);

    assert_github_requests_exist(&sim.requests());
}

#[tokio::test]
async fn github_statuses_and_hooks_round_trip() {
    let (repo, head) = sample_repo();
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let gh = GithubClient::new(&sim);

    let status_path = format!("/repos/acme/deploy/statuses/{head}");
    let s = gh
        .send(
            Method::POST,
            &status_path,
            Some(json!({"state": "success", "context": "driftless/web",
                        "description": "applied 3 objects", "target_url": "http://x/web"})),
            &[],
        )
        .await;
    assert_eq!(s.status, 201);
    assert_eq!(s.json["state"], "success");
    assert_eq!(s.json["context"], "driftless/web");
    assert!(s
        .header("location")
        .unwrap()
        .ends_with(&format!("/statuses/{head}")));
    let minimal = gh
        .send(
            Method::POST,
            &status_path,
            Some(json!({"state": "pending"})),
            &[],
        )
        .await;
    assert_eq!(minimal.status, 201);
    assert_eq!(minimal.json["context"], "default");
    assert_eq!(minimal.json["description"], Value::Null);
    let recorded = sim.statuses("Acme/Deploy", &head[..10]);
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].forge, "github");
    assert_eq!(recorded[0].sha, head);
    assert_eq!(recorded[0].state, "success");
    assert_eq!(recorded[0].context, "driftless/web");
    assert_eq!(
        recorded[0].description.as_deref(),
        Some("applied 3 objects")
    );
    assert_eq!(recorded[0].target_url.as_deref(), Some("http://x/web"));
    assert_eq!(recorded[1].state, "pending");
    let unknown = gh
        .send(
            Method::POST,
            &format!("/repos/acme/deploy/statuses/{}", "f".repeat(40)),
            Some(json!({"state": "success"})),
            &[],
        )
        .await;
    assert_eq!(unknown.status, 422);
    let bad_state = gh
        .send(
            Method::POST,
            &status_path,
            Some(json!({"state": "done"})),
            &[],
        )
        .await;
    assert_eq!(bad_state.status, 422);
    assert_eq!(bad_state.json["message"], "Validation Failed");
    assert_eq!(sim.statuses("acme/deploy", &head).len(), 2);

    // Hooks: create, list, get, patch, delete; the secret is never shown.
    let created = gh
        .send(
            Method::POST,
            "/repos/acme/deploy/hooks",
            Some(json!({"name": "web", "active": true, "events": ["push"],
                        "config": {"url": "http://receiver/hooks/github", "content_type": "json",
                                   "secret": "s3cret", "insecure_ssl": "0"}})),
            &[],
        )
        .await;
    assert_eq!(created.status, 201);
    assert_eq!(created.json["config"]["secret"], "********");
    assert_eq!(created.json["config"]["content_type"], "json");
    let id = created.json["id"].as_u64().unwrap();
    let again = gh
        .send(
            Method::POST,
            "/repos/acme/deploy/hooks",
            Some(json!({"config": {"url": "http://receiver/hooks/github"}})),
            &[],
        )
        .await;
    assert_eq!(
        again.status, 422,
        "GitHub refuses a second hook with the same URL"
    );
    let no_url = gh
        .send(
            Method::POST,
            "/repos/acme/deploy/hooks",
            Some(json!({"config": {}})),
            &[],
        )
        .await;
    assert_eq!(no_url.status, 422);

    let list = gh.get("/repos/acme/deploy/hooks?per_page=100").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json.as_array().unwrap().len(), 1);
    assert!(!String::from_utf8_lossy(&list.bytes).contains("s3cret"));
    let one = gh.get(&format!("/repos/acme/deploy/hooks/{id}")).await;
    assert_eq!(one.json["events"], json!(["push"]));

    let patched = gh
        .send(
            Method::PATCH,
            &format!("/repos/acme/deploy/hooks/{id}"),
            Some(json!({"add_events": ["ping", "push"], "active": false,
                        "config": {"url": "http://receiver2/hooks/github", "secret": "n3w"}})),
            &[],
        )
        .await;
    assert_eq!(patched.status, 200);
    assert_eq!(patched.json["events"], json!(["push", "ping"]));
    assert_eq!(patched.json["active"], false);
    let hooks = sim.hooks("acme/deploy");
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].url, "http://receiver2/hooks/github");
    assert_eq!(hooks[0].secret.as_deref(), Some("n3w"));
    assert_eq!(hooks[0].content_type.as_deref(), Some("json"));
    assert!(!hooks[0].active);
    let removed = gh
        .send(
            Method::PATCH,
            &format!("/repos/acme/deploy/hooks/{id}"),
            Some(json!({"remove_events": ["ping"]})),
            &[],
        )
        .await;
    assert_eq!(removed.json["events"], json!(["push"]));

    let deleted = gh
        .send(
            Method::DELETE,
            &format!("/repos/acme/deploy/hooks/{id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(deleted.status, 204);
    assert!(deleted.bytes.is_empty());
    assert_eq!(
        gh.get(&format!("/repos/acme/deploy/hooks/{id}"))
            .await
            .status,
        404
    );
    assert_eq!(gh.get("/repos/acme/deploy/hooks").await.json, json!([]));
    assert!(sim.hooks("acme/deploy").is_empty());

    assert_github_requests_exist(&sim.requests());
}

/// A benchmark may give the token a larger window (as a GitHub App installation has); the
/// window still ends in GitHub's 403 once spent, and its headers say the limit set.
#[tokio::test]
async fn github_rate_limit_can_be_set_and_is_enforced_at_it() {
    let (repo, _) = sample_repo();
    let sim = simulator().await;
    sim.set_github_rate_limit(3);
    sim.add_repo("acme/deploy", repo.path());
    let gh = GithubClient::new(&sim);
    let path = "/repos/acme/deploy/git/ref/heads/main";
    for used in 1..=3 {
        let r = gh.get(path).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(
            r.header("x-ratelimit-used"),
            Some(used.to_string().as_str())
        );
    }
    let refused = gh.get(path).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(refused.header("x-ratelimit-limit"), Some("3"));
}

#[tokio::test]
async fn github_etag_gives_304_that_costs_no_rate_limit() {
    let (repo, head) = sample_repo();
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let gh = GithubClient::new(&sim);
    let path = "/repos/acme/deploy/git/ref/heads/main";

    let first = gh.get(path).await;
    let etag = first.header("etag").expect("an ETag").to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(first.header("x-ratelimit-limit"), Some("5000"));
    assert_eq!(first.header("x-ratelimit-resource"), Some("core"));
    let remaining: u64 = first
        .header("x-ratelimit-remaining")
        .unwrap()
        .parse()
        .unwrap();
    let used: u64 = first.header("x-ratelimit-used").unwrap().parse().unwrap();
    assert_eq!(remaining + used, 5000);
    let reset: i64 = first.header("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(reset > driftless_now(), "reset {reset} is in the future");

    let cached = gh
        .send(Method::GET, path, None, &[("if-none-match", &etag)])
        .await;
    assert_eq!(cached.status, 304);
    assert!(cached.bytes.is_empty());
    assert_eq!(
        cached.header("x-ratelimit-remaining"),
        Some(remaining.to_string().as_str()),
        "a 304 does not spend the rate limit"
    );
    let weak = format!("W/{etag}");
    let cached = gh
        .send(Method::GET, path, None, &[("if-none-match", &weak)])
        .await;
    assert_eq!(cached.status, 304);

    // A new commit changes the ETag; the old one no longer matches.
    repo.write("README.md", "changed\n");
    let next = repo.commit("change");
    assert_ne!(next, head);
    let fresh = gh
        .send(Method::GET, path, None, &[("if-none-match", &etag)])
        .await;
    assert_eq!(fresh.status, 200);
    assert_eq!(fresh.json["object"]["sha"], next.as_str());
    assert_ne!(fresh.header("etag"), Some(etag.as_str()));
    assert_eq!(
        fresh.header("x-ratelimit-remaining"),
        Some((remaining - 1).to_string().as_str())
    );
    assert_github_requests_exist(&sim.requests());
}

/// `commits/{ref}` as GitHub documents it: the `commit` schema in JSON; in the SHA media type
/// the bare SHA, whose quoted form is the ETag, so a client that sends the SHA it knows gets a
/// 304 that spends nothing, and the full SHA once the branch moves.
#[tokio::test]
async fn github_commit_sha_media_type_answers_an_unmoved_branch_with_a_free_304() {
    let (repo, head) = sample_repo();
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let gh = GithubClient::new(&sim);
    let path = "/repos/acme/deploy/commits/main";

    let json = gh.get(path).await;
    assert_eq!(json.status, 200);
    assert_eq!(json.json["sha"], head.as_str());

    let sha_type = [("accept", "application/vnd.github.sha")];
    let first = gh.send(Method::GET, path, None, &sha_type).await;
    assert_eq!(first.status, 200);
    assert_eq!(String::from_utf8_lossy(&first.bytes), head);
    let (_, op) = find_operation("GET", path).unwrap();
    assert!(
        op["responses"]["200"]["content"]["application/vnd.github.sha"]["schema"]["type"]
            == "string",
        "GitHub documents the SHA media type as a string"
    );
    let etag = format!("\"{head}\"");
    assert_eq!(first.header("etag"), Some(etag.as_str()));
    let remaining = first.header("x-ratelimit-remaining").unwrap().to_string();

    let known = [
        ("accept", "application/vnd.github.sha"),
        ("if-none-match", etag.as_str()),
    ];
    let unmoved = gh.send(Method::GET, path, None, &known).await;
    assert_eq!(unmoved.status, 304);
    assert!(unmoved.bytes.is_empty());
    assert_eq!(
        unmoved.header("x-ratelimit-remaining"),
        Some(remaining.as_str()),
        "a 304 does not spend the rate limit"
    );

    repo.write("README.md", "moved\n");
    let next = repo.commit("move");
    let moved = gh.send(Method::GET, path, None, &known).await;
    assert_eq!(moved.status, 200);
    assert_eq!(String::from_utf8_lossy(&moved.bytes), next);
    assert_eq!(moved.header("etag"), Some(format!("\"{next}\"").as_str()));
    assert_eq!(
        gh.send(
            Method::GET,
            "/repos/acme/deploy/commits/nope",
            None,
            &sha_type
        )
        .await
        .status,
        422
    );
    assert_github_requests_exist(&sim.requests());
}

fn driftless_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn github_wrong_or_missing_token_is_401() {
    let (repo, _) = sample_repo();
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let url = format!(
        "{}/repos/acme/deploy/git/ref/heads/main",
        sim.github_api_url()
    );
    let http = reqwest::Client::new();
    for auth in [None, Some("Bearer wrong"), Some("Basic Z2g6dG9rZW4=")] {
        let mut req = http.get(&url);
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let r = read(req.send().await.unwrap()).await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(
            (&r.json["message"], &r.json["documentation_url"]),
            (
                &json!("Bad credentials"),
                &json!("https://docs.github.com/rest")
            )
        );
    }
    let ok = read(
        http.get(&url)
            .header("authorization", format!("token {GH_TOKEN}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200);
    let recorded = sim.requests();
    assert_eq!(recorded.len(), 4);
    assert!(recorded[..3].iter().all(|r| r.status == 401
        && r.route == "/repos/{owner}/{repo}/git/ref/{ref}"
        && r.response_bytes > 0));
    assert_github_requests_exist(&recorded);
}

/// A client of the simulated GitLab.
struct GitlabClient {
    api: String,
    http: reqwest::Client,
}

impl GitlabClient {
    fn new(sim: &ForgeSimulator) -> Self {
        Self {
            api: sim.gitlab_api_url(),
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.send_url(method, &format!("{}{path}", self.api), body)
            .await
    }

    async fn send_url(&self, method: Method, url: &str, body: Option<Value>) -> Answer {
        let mut req = self
            .http
            .request(method, url)
            .header("PRIVATE-TOKEN", GL_TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        read(req.send().await.expect("request")).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None).await
    }
}

/// `acme/platform/deploy` as GitLab wants it in a URL.
const GL_PROJECT: &str = "acme%2Fplatform%2Fdeploy";

/// The `rel="next"` target of a `Link` header.
fn next_link(answer: &Answer) -> Option<String> {
    answer.header("link")?.split(',').find_map(|part| {
        let (url, rel) = part.split_once(';')?;
        (rel.trim() == "rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

#[tokio::test]
async fn gitlab_tree_keyset_pagination_returns_every_entry_once() {
    let repo = TestRepo::new();
    let mut expected = BTreeSet::new();
    for app in ["a", "b", "c"] {
        expected.insert(format!("apps/{app}"));
        for i in 0..45 {
            let path = format!("apps/{app}/object-{i:02}.yaml");
            // Identical contents on purpose: equal blob ids must not confuse the cursor.
            repo.write(&path, "kind: ConfigMap\n");
            expected.insert(path);
        }
    }
    expected.insert("apps".to_string());
    repo.write("README.md", "x\n");
    expected.insert("README.md".to_string());
    let head = repo.commit("many files");
    assert!(expected.len() > 130);

    let sim = simulator().await;
    sim.add_repo("acme/platform/deploy", repo.path());
    let gl = GitlabClient::new(&sim);

    for per_page in [100, 20, 7] {
        let mut url = format!(
            "{}/projects/{GL_PROJECT}/repository/tree?ref={head}&recursive=true&per_page={per_page}&pagination=keyset",
            gl.api
        );
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let page = gl.send_url(Method::GET, &url, None).await;
            assert_eq!(page.status, 200, "{url}: {:?}", page.json);
            let rows = page.json.as_array().unwrap();
            assert!(rows.len() <= per_page);
            for row in rows {
                for field in ["id", "name", "type", "path", "mode"] {
                    assert!(row[field].is_string(), "{field} in {row}");
                }
                let path = row["path"].as_str().unwrap();
                assert_eq!(row["name"], path.rsplit('/').next().unwrap());
                seen.push(path.to_string());
            }
            pages += 1;
            match next_link(&page) {
                Some(next) => url = next,
                None => break,
            }
        }
        assert_eq!(
            pages,
            expected.len().div_ceil(per_page),
            "per_page {per_page}"
        );
        let unique: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "an entry came twice");
        assert_eq!(unique, expected);
    }

    // A directory, not recursive; then one that does not exist.
    let dir = gl
        .get(&format!(
            "/projects/{GL_PROJECT}/repository/tree?ref=main&path=apps&pagination=keyset"
        ))
        .await;
    let rows = dir
        .json
        .as_array()
        .unwrap_or_else(|| panic!("{} {}", dir.status, dir.json));
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["path"], "apps/a");
    assert_eq!(rows[0]["type"], "tree");
    assert_eq!(rows[0]["mode"], "040000");
    let missing = gl
        .get(&format!(
            "/projects/{GL_PROJECT}/repository/tree?ref=main&path=nope"
        ))
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json["message"], "404 Tree Not Found");
}

#[tokio::test]
async fn gitlab_tree_offset_pagination_headers() {
    let repo = TestRepo::new();
    for i in 0..25 {
        repo.write(&format!("f{i:02}"), format!("{i}\n"));
    }
    repo.commit("25 files");
    let sim = simulator().await;
    sim.add_repo("acme/platform/deploy", repo.path());
    let gl = GitlabClient::new(&sim);

    let first = gl
        .get(&format!("/projects/{GL_PROJECT}/repository/tree"))
        .await;
    assert_eq!(
        first.json.as_array().unwrap().len(),
        20,
        "GitLab's default page is 20"
    );
    assert_eq!(first.header("x-page"), Some("1"));
    assert_eq!(first.header("x-per-page"), Some("20"));
    assert_eq!(first.header("x-next-page"), Some("2"));
    assert_eq!(first.header("x-prev-page"), Some(""));
    assert_eq!(first.header("x-total"), Some("25"));
    assert_eq!(first.header("x-total-pages"), Some("2"));
    let second = gl
        .send_url(Method::GET, &next_link(&first).unwrap(), None)
        .await;
    assert_eq!(second.json.as_array().unwrap().len(), 5);
    assert_eq!(second.json[4]["path"], "f24");
    assert_eq!(second.header("x-next-page"), Some(""));
    assert_eq!(next_link(&second), None);
    let capped = gl
        .get(&format!(
            "/projects/{GL_PROJECT}/repository/tree?per_page=1000"
        ))
        .await;
    assert_eq!(capped.header("x-per-page"), Some("100"));
}

#[tokio::test]
async fn gitlab_blob_raw_is_the_file_bytes() {
    let repo = TestRepo::new();
    let binary: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    repo.write("bin/data", &binary);
    repo.write("text.yaml", "a: 1\n");
    repo.commit("blobs");
    let sim = simulator().await;
    sim.add_repo("acme/platform/deploy", repo.path());
    let gl = GitlabClient::new(&sim);

    for (path, bytes, content_type) in [
        ("bin/data", binary.clone(), "application/octet-stream"),
        ("text.yaml", b"a: 1\n".to_vec(), "text/plain; charset=utf-8"),
    ] {
        let sha = repo.git(&["rev-parse", &format!("main:{path}")]);
        let raw = gl
            .get(&format!(
                "/projects/{GL_PROJECT}/repository/blobs/{sha}/raw"
            ))
            .await;
        assert_eq!(raw.status, 200);
        assert_eq!(raw.bytes, bytes, "{path}");
        assert_eq!(raw.header("content-type"), Some(content_type));
    }
    let missing = gl
        .get(&format!(
            "/projects/{GL_PROJECT}/repository/blobs/{}/raw",
            "0".repeat(40)
        ))
        .await;
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn gitlab_branch_and_merge_base() {
    let repo = TestRepo::new();
    repo.write("a", "1\n");
    let base = repo.commit("base\n\nwith a body");
    repo.checkout_new("feature/x");
    repo.write("b", "2\n");
    let feature = repo.commit("feature");
    repo.checkout("main");
    repo.write("c", "3\n");
    let main = repo.commit("main");
    let sim = simulator().await;
    sim.add_repo("acme/platform/deploy", repo.path());
    let gl = GitlabClient::new(&sim);

    let b = gl
        .get(&format!(
            "/projects/{GL_PROJECT}/repository/branches/feature%2Fx"
        ))
        .await;
    assert_eq!(b.status, 200);
    assert_eq!(b.json["name"], "feature/x");
    assert_eq!(b.json["commit"]["id"], feature.as_str());
    assert_eq!(b.json["commit"]["short_id"], &feature[..8]);
    assert_eq!(b.json["commit"]["parent_ids"], json!([base]));
    assert_eq!(b.json["commit"]["author_email"], "tester@example.com");
    assert_eq!(b.json["default"], false);
    assert_eq!(b.json["merged"], false);
    for field in [
        "protected",
        "developers_can_push",
        "developers_can_merge",
        "can_push",
    ] {
        assert!(b.json[field].is_boolean(), "{field}");
    }
    let m = gl
        .get(&format!("/projects/{GL_PROJECT}/repository/branches/main"))
        .await;
    assert_eq!(m.json["default"], true);
    assert_eq!(m.json["commit"]["id"], main.as_str());
    assert_eq!(
        gl.get(&format!("/projects/{GL_PROJECT}/repository/branches/nope"))
            .await
            .json["message"],
        "404 Branch Not Found"
    );

    let mb = gl
        .get(&format!(
            "/projects/{GL_PROJECT}/repository/merge_base?refs[]=main&refs%5B%5D=feature%2Fx"
        ))
        .await;
    assert_eq!(mb.status, 200);
    assert_eq!(mb.json["id"], base.as_str());
    assert_eq!(mb.json["title"], "base");
    assert_eq!(mb.json["message"], "base\n\nwith a body");
    let by_sha = gl
        .get(&format!(
            "/projects/{GL_PROJECT}/repository/merge_base?refs[]={main}&refs[]={feature}"
        ))
        .await;
    assert_eq!(by_sha.json["id"], base.as_str());
    let one = gl
        .get(&format!(
            "/projects/{GL_PROJECT}/repository/merge_base?refs[]=main"
        ))
        .await;
    assert_eq!(one.status, 400);
    let unknown = gl
        .get(&format!(
            "/projects/{GL_PROJECT}/repository/merge_base?refs[]=main&refs[]=nope"
        ))
        .await;
    assert_eq!(unknown.status, 400);
    assert_eq!(unknown.json["message"], "Could not find ref: nope");
}

#[tokio::test]
async fn gitlab_statuses_and_hooks_round_trip() {
    let repo = TestRepo::new();
    repo.write("a", "1\n");
    let head = repo.commit("one");
    let sim = simulator().await;
    sim.add_repo("acme/platform/deploy", repo.path());
    let gl = GitlabClient::new(&sim);

    // JSON body, then form body, then query string.
    let s = gl
        .send(
            Method::POST,
            &format!("/projects/{GL_PROJECT}/statuses/{head}"),
            Some(
                json!({"state": "running", "name": "driftless/web", "target_url": "http://x",
                        "description": "applying"}),
            ),
        )
        .await;
    assert_eq!(s.status, 201);
    for field in [
        "id",
        "sha",
        "ref",
        "status",
        "name",
        "target_url",
        "description",
        "created_at",
        "started_at",
        "finished_at",
        "allow_failure",
        "coverage",
        "author",
    ] {
        assert!(
            s.json.get(field).is_some(),
            "{field} missing from {}",
            s.json
        );
    }
    assert_eq!(s.json["status"], "running");
    assert_eq!(s.json["sha"], head.as_str());
    assert_eq!(s.json["ref"], "main");
    let form = reqwest::Client::new()
        .post(format!("{}/projects/{GL_PROJECT}/statuses/{head}", gl.api))
        .header("PRIVATE-TOKEN", GL_TOKEN)
        .form(&[("state", "success"), ("name", "driftless/web")])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 201);
    let query = gl
        .send(
            Method::POST,
            &format!("/projects/{GL_PROJECT}/statuses/{head}?state=failed&description=boom"),
            None,
        )
        .await;
    assert_eq!(query.status, 201);
    assert_eq!(query.json["name"], "default");
    let bad = gl
        .send(
            Method::POST,
            &format!("/projects/{GL_PROJECT}/statuses/{head}?state=exploded"),
            None,
        )
        .await;
    assert_eq!(bad.status, 400);
    let statuses = sim.statuses("acme/platform/deploy", &head);
    let states: Vec<(&str, &str, &str)> = statuses
        .iter()
        .map(|s| (s.forge, s.state.as_str(), s.context.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("gitlab", "running", "driftless/web"),
            ("gitlab", "success", "driftless/web"),
            ("gitlab", "failed", "default"),
        ]
    );

    // Hooks.
    let created = gl
        .send(
            Method::POST,
            &format!("/projects/{GL_PROJECT}/hooks"),
            Some(
                json!({"url": "http://receiver/hooks/gitlab", "push_events": true,
                        "tag_push_events": true, "token": "t0ken",
                        "enable_ssl_verification": false}),
            ),
        )
        .await;
    assert_eq!(created.status, 201);
    assert_eq!(created.json["push_events"], true);
    assert_eq!(created.json["tag_push_events"], true);
    assert_eq!(created.json["merge_requests_events"], false);
    assert_eq!(created.json["enable_ssl_verification"], false);
    assert_eq!(
        created.json["project_id"].as_u64(),
        sim.gitlab_project_id("acme/platform/deploy")
    );
    assert!(created.json.get("token").is_none());
    assert!(!String::from_utf8_lossy(&created.bytes).contains("t0ken"));
    let id = created.json["id"].as_u64().unwrap();
    let hooks = sim.hooks("acme/platform/deploy");
    assert_eq!(hooks[0].events, ["push", "tag_push"]);
    assert_eq!(hooks[0].secret.as_deref(), Some("t0ken"));
    assert!(hooks[0].active);

    let updated = gl
        .send(
            Method::PUT,
            &format!("/projects/{GL_PROJECT}/hooks/{id}"),
            Some(
                json!({"url": "http://receiver2/hooks/gitlab", "tag_push_events": false,
                        "token": "n3w"}),
            ),
        )
        .await;
    assert_eq!(updated.status, 200);
    assert_eq!(updated.json["url"], "http://receiver2/hooks/gitlab");
    assert_eq!(updated.json["tag_push_events"], false);
    let list = gl
        .get(&format!("/projects/{GL_PROJECT}/hooks?per_page=100"))
        .await;
    assert_eq!(list.json.as_array().unwrap().len(), 1);
    assert_eq!(list.json[0]["id"], id);
    let hooks = sim.hooks("acme/platform/deploy");
    assert_eq!(hooks[0].events, ["push"]);
    assert_eq!(hooks[0].secret.as_deref(), Some("n3w"));
    let no_url = gl
        .send(
            Method::POST,
            &format!("/projects/{GL_PROJECT}/hooks"),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (no_url.status, &no_url.json["error"]),
        (400, &json!("url is missing"))
    );

    let deleted = gl
        .send(
            Method::DELETE,
            &format!("/projects/{GL_PROJECT}/hooks/{id}"),
            None,
        )
        .await;
    assert_eq!(deleted.status, 204);
    assert!(sim.hooks("acme/platform/deploy").is_empty());
    assert_eq!(
        gl.get(&format!("/projects/{GL_PROJECT}/hooks/{id}"))
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn gitlab_projects_by_encoded_path_or_id_and_token_checks() {
    let repo = TestRepo::new();
    repo.write("a", "1\n");
    let head = repo.commit("one");
    let sim = simulator().await;
    sim.add_repo("Acme/Platform/Deploy", repo.path());
    let gl = GitlabClient::new(&sim);
    let id = sim.gitlab_project_id("acme/platform/deploy").unwrap();

    for project in [
        GL_PROJECT.to_string(),
        "ACME%2fplatform%2FDeploy".into(),
        id.to_string(),
    ] {
        let b = gl
            .get(&format!("/projects/{project}/repository/branches/main"))
            .await;
        assert_eq!(b.status, 200, "{project}");
        assert_eq!(b.json["commit"]["id"], head.as_str());
    }
    let unencoded = gl
        .get("/projects/acme/platform/deploy/repository/branches/main")
        .await;
    assert_eq!(unencoded.status, 404);
    let unknown = gl
        .get("/projects/acme%2Fnope/repository/branches/main")
        .await;
    assert_eq!(unknown.json["message"], "404 Project Not Found");

    let url = format!("{}/projects/{GL_PROJECT}/repository/branches/main", gl.api);
    let http = reqwest::Client::new();
    for token in [None, Some("wrong")] {
        let mut req = http.get(&url);
        if let Some(token) = token {
            req = req.header("PRIVATE-TOKEN", token);
        }
        let r = read(req.send().await.unwrap()).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.json, json!({"message": "401 Unauthorized"}));
    }
    let bearer = http.get(&url).bearer_auth(GL_TOKEN).send().await.unwrap();
    assert_eq!(bearer.status(), 200);
    // The GitHub token is not a GitLab token.
    let crossed = http
        .get(&url)
        .header("PRIVATE-TOKEN", GH_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(crossed.status(), 401);
}

#[tokio::test]
async fn faults_apply_then_are_consumed() {
    let (repo, _) = sample_repo();
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    sim.add_repo("acme/platform/deploy", repo.path());
    let gh = GithubClient::new(&sim);
    let gl = GitlabClient::new(&sim);
    let gh_path = "/repos/acme/deploy/git/ref/heads/main";
    let gl_path = format!("/projects/{GL_PROJECT}/repository/branches/main");

    sim.inject(Fault {
        forge: Some("github"),
        path_contains: "/git/ref/".into(),
        kind: FaultKind::Status(502),
        times: 2,
    });
    // Another forge or path is untouched.
    assert_eq!(gl.get(&gl_path).await.status, 200);
    assert_eq!(gh.get("/repos/acme/deploy/hooks").await.status, 200);
    for _ in 0..2 {
        let r = gh.get(gh_path).await;
        assert_eq!(r.status, 502);
        assert!(r.json["message"].is_string());
        assert!(r.header("x-ratelimit-remaining").is_some());
    }
    assert_eq!(gh.get(gh_path).await.status, 200);

    sim.inject(Fault {
        forge: None,
        path_contains: String::new(),
        kind: FaultKind::Status(500),
        times: 1,
    });
    let r = gl.get(&gl_path).await;
    assert_eq!(
        (r.status, &r.json["message"]),
        (500, &json!("500 Internal Server Error"))
    );
    assert_eq!(gh.get(gh_path).await.status, 200);

    // A fault withdrawn before any request used it up changes nothing.
    sim.inject(Fault {
        forge: Some("github"),
        path_contains: "/git/ref/".into(),
        kind: FaultKind::Status(502),
        times: 3,
    });
    assert_eq!(gh.get(gh_path).await.status, 502);
    assert_eq!(sim.clear_faults(), 1);
    assert_eq!(gh.get(gh_path).await.status, 200);

    // Primary rate limit: GitHub 403 with remaining 0, the reset time and the limit the
    // simulator enforces (raised here, as the fleet benchmark does).
    sim.set_github_rate_limit(15_100);
    sim.inject(Fault {
        forge: Some("github"),
        path_contains: "/git/ref/".into(),
        kind: FaultKind::RateLimited {
            reset_after: Duration::from_secs(60),
        },
        times: 1,
    });
    let limited = gh.get(gh_path).await;
    assert_eq!(limited.status, 403);
    assert_eq!(limited.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(limited.header("x-ratelimit-limit"), Some("15100"));
    let reset: i64 = limited
        .header("x-ratelimit-reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!((reset - driftless_now() - 60).abs() <= 2, "reset {reset}");
    assert!(limited.json["message"]
        .as_str()
        .unwrap()
        .starts_with("API rate limit exceeded"));
    assert_eq!(gh.get(gh_path).await.status, 200);

    // Secondary rate limit: 429 with Retry-After.
    sim.inject(Fault {
        forge: Some("github"),
        path_contains: String::new(),
        kind: FaultKind::SecondaryRateLimit {
            retry_after: Duration::from_secs(30),
        },
        times: 1,
    });
    let secondary = gh.get(gh_path).await;
    assert_eq!(secondary.status, 429);
    assert_eq!(secondary.header("retry-after"), Some("30"));

    // GitLab: 429 with Retry-After and RateLimit-Reset.
    sim.inject(Fault {
        forge: Some("gitlab"),
        path_contains: "/repository/".into(),
        kind: FaultKind::RateLimited {
            reset_after: Duration::from_secs(45),
        },
        times: 1,
    });
    let throttled = gl.get(&gl_path).await;
    assert_eq!(throttled.status, 429);
    assert_eq!(throttled.header("retry-after"), Some("45"));
    assert_eq!(throttled.header("ratelimit-remaining"), Some("0"));
    let reset: i64 = throttled
        .header("ratelimit-reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!((reset - driftless_now() - 45).abs() <= 2, "reset {reset}");
    assert_eq!(gl.get(&gl_path).await.status, 200);

    // Latency: answered normally, late, once.
    sim.inject(Fault {
        forge: Some("gitlab"),
        path_contains: "branches/main".into(),
        kind: FaultKind::Latency(Duration::from_millis(400)),
        times: 1,
    });
    let started = Instant::now();
    assert_eq!(gl.get(&gl_path).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(400));
    let started = Instant::now();
    assert_eq!(gl.get(&gl_path).await.status, 200);
    assert!(started.elapsed() < Duration::from_millis(400));

    let statuses: Vec<u16> = sim.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [200, 200, 502, 502, 200, 500, 200, 502, 200, 403, 200, 429, 429, 200, 200, 200]
    );
    assert_github_requests_exist(&sim.requests());
}

#[tokio::test]
async fn request_counts_group_by_route_template() {
    let (repo, head) = sample_repo();
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let gh = GithubClient::new(&sim);
    let gl = GitlabClient::new(&sim);

    gh.get(&format!("/repos/acme/deploy/git/trees/{head}"))
        .await;
    gh.get("/repos/acme/deploy/git/trees/main?recursive=1")
        .await;
    gh.get("/repos/acme/deploy/git/trees/nope").await;
    gh.get("/repos/acme/deploy/git/ref/heads/main").await;
    gl.get("/projects/acme%2Fdeploy/repository/tree?recursive=true")
        .await;
    gh.get("/repos/acme/deploy/no/such/endpoint").await;
    reqwest::get(format!("{}/projects/1/hooks", sim.gitlab_api_url()))
        .await
        .unwrap();

    let counts = sim.request_counts();
    let expected: Vec<(String, u64)> = vec![
        ("github GET (unknown)".into(), 1),
        ("github GET /repos/{owner}/{repo}/git/ref/{ref}".into(), 1),
        (
            "github GET /repos/{owner}/{repo}/git/trees/{tree_sha}".into(),
            3,
        ),
        ("gitlab GET /projects/:id/hooks".into(), 1),
        ("gitlab GET /projects/:id/repository/tree".into(), 1),
    ];
    assert_eq!(counts.into_iter().collect::<Vec<_>>(), expected);
    let requests = sim.requests();
    let unknown = requests.iter().find(|r| r.route == UNKNOWN_ROUTE).unwrap();
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.path, "/github/repos/acme/deploy/no/such/endpoint");
    let recursive = &requests[1];
    assert_eq!(recursive.query, "recursive=1");
    assert!(recursive.response_bytes > 0);
    assert_eq!(requests[6].status, 401);
    sim.clear_requests();
    assert!(sim.requests().is_empty() && sim.request_counts().is_empty());
}

/// driftless's own webhook receiver on a free port, with one GitHub app and one GitLab app on
/// the simulator's repositories.
struct LiveReceiver {
    url: String,
    queue: Arc<JobQueue>,
    _dir: tempfile::TempDir,
    server: actix_web::dev::ServerHandle,
}

impl Drop for LiveReceiver {
    fn drop(&mut self) {
        drop(self.server.stop(false));
    }
}

const HOOK_SECRET: &str = "hook-secret-for-sim";
const HOOK_TOKEN: &str = "hook-token-for-sim";

fn live_receiver() -> LiveReceiver {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, value: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        p.display().to_string()
    };
    let text = format!(
        r#"
[forges.github]
token_file = "{gh_token}"
webhook_secret_file = "{gh_secret}"
[forges.gitlab]
token_file = "{gl_token}"
webhook_token_file = "{gl_hook}"
[[apps]]
name = "web"
forge = "github"
repo = "acme/deploy"
branch = "main"
path = "apps/web"
[[apps]]
name = "platform"
forge = "gitlab"
repo = "acme/platform/deploy"
branch = "main"
"#,
        gh_token = write("gh-token", GH_TOKEN),
        gh_secret = write("gh-secret", HOOK_SECRET),
        gl_token = write("gl-token", GL_TOKEN),
        gl_hook = write("gl-hook", HOOK_TOKEN),
    );
    let settings = Settings::from_toml_str(&text).expect("receiver settings");
    let queue = Arc::new(JobQueue::new());
    let receiver =
        web::Data::new(Receiver::new(&settings, queue.clone(), Arc::new(Metrics::new())).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = HttpServer::new(move || App::new().app_data(receiver.clone()).configure(routes))
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
    let handle = server.handle();
    tokio::spawn(server);
    LiveReceiver {
        url,
        queue,
        _dir: dir,
        server: handle,
    }
}

/// Every delivery a [`CaptureReceiver`] got: headers and body, in order.
type Deliveries = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// A receiver that keeps every delivery's headers and body.
struct CaptureReceiver {
    url: String,
    deliveries: Deliveries,
    server: actix_web::dev::ServerHandle,
}

impl Drop for CaptureReceiver {
    fn drop(&mut self) {
        drop(self.server.stop(false));
    }
}

fn capture_receiver() -> CaptureReceiver {
    let deliveries = Deliveries::default();
    let store = deliveries.clone();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = HttpServer::new(move || {
        let store = store.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let store = store.clone();
            async move {
                let mut headers = HeaderMap::new();
                for (k, v) in req.headers() {
                    headers.insert(
                        reqwest::header::HeaderName::from_bytes(k.as_str().as_bytes()).unwrap(),
                        reqwest::header::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
                    );
                }
                store.lock().unwrap().push((headers, body.to_vec()));
                HttpResponse::Ok().finish()
            }
        }))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    CaptureReceiver {
        url,
        deliveries,
        server: handle,
    }
}

/// Every key of `fixture` (one level) is in `ours`, except the listed ones.
fn assert_same_keys(ours: &Value, fixture: &Value, except: &[&str], what: &str) {
    let ours: BTreeSet<&String> = ours.as_object().unwrap().keys().collect();
    let theirs: BTreeSet<&String> = fixture
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !except.contains(&k.as_str()))
        .collect();
    let missing: Vec<_> = theirs.difference(&ours).collect();
    assert!(missing.is_empty(), "{what}: missing {missing:?}");
}

#[tokio::test]
async fn send_github_push_is_verified_and_queued_by_the_receiver() {
    let repo = TestRepo::new();
    repo.write("apps/web/deploy.yaml", "replicas: 1\n");
    repo.write("apps/web/old.yaml", "x\n");
    let before = repo.commit("one");
    repo.write("apps/web/deploy.yaml", "replicas: 2\n");
    std::fs::remove_file(repo.path().join("apps/web/old.yaml")).unwrap();
    repo.write("apps/web/new.yaml", "y\n");
    let middle = repo.commit("two");
    repo.write("README.md", "z\n");
    let after = repo.commit("three");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());

    let receiver = live_receiver();
    let status = sim
        .send_github_push(
            &receiver.url,
            "acme/deploy",
            "main",
            &before,
            &after,
            HOOK_SECRET,
        )
        .await
        .unwrap();
    assert_eq!(status, 202);
    let job = receiver.queue.pending("web").expect("the push is queued");
    assert_eq!(job.revision.as_deref(), Some(after.as_str()));
    let wrong = sim
        .send_github_push(
            &receiver.url,
            "acme/deploy",
            "main",
            &before,
            &after,
            "not-it",
        )
        .await
        .unwrap();
    assert_eq!(wrong, 401);

    // The delivery itself: headers, signature over the exact bytes, payload like GitHub's.
    let capture = capture_receiver();
    let status = sim
        .send_github_push(
            &capture.url,
            "acme/deploy",
            "main",
            &before,
            &after,
            HOOK_SECRET,
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (headers, body) = capture.deliveries.lock().unwrap()[0].clone();
    assert_eq!(headers["x-github-event"], "push");
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers["user-agent"]
        .to_str()
        .unwrap()
        .starts_with("GitHub-Hookshot/"));
    assert!(!headers["x-github-delivery"].is_empty());
    assert_eq!(
        headers["x-hub-signature-256"],
        driftless::webhook::github::sign(HOOK_SECRET, &body).as_str()
    );
    let payload: Value = serde_json::from_slice(&body).unwrap();
    let fixture: Value = serde_json::from_slice(&fixture("github/push-5.json")).unwrap();
    // `installation` is only sent to GitHub Apps.
    assert_same_keys(&payload, &fixture, &["installation"], "push payload");
    assert_same_keys(
        &payload["commits"][0],
        &fixture["commits"][0],
        &[],
        "commit",
    );
    assert_same_keys(&payload["pusher"], &fixture["pusher"], &[], "pusher");
    assert_same_keys(&payload["sender"], &fixture["sender"], &[], "sender");
    assert_eq!(payload["repository"]["full_name"], "acme/deploy");
    assert_eq!(payload["ref"], "refs/heads/main");
    assert_eq!(
        (&payload["created"], &payload["forced"]),
        (&json!(false), &json!(false))
    );
    let ids: Vec<&str> = payload["commits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [middle.as_str(), after.as_str()]);
    let two = &payload["commits"][0];
    assert_eq!(two["added"], json!(["apps/web/new.yaml"]));
    assert_eq!(two["removed"], json!(["apps/web/old.yaml"]));
    assert_eq!(two["modified"], json!(["apps/web/deploy.yaml"]));
    assert_eq!(payload["head_commit"]["id"], after.as_str());
    assert_eq!(payload["head_commit"]["added"], json!(["README.md"]));

    // A force push (before is not an ancestor of after) and a branch creation.
    sim.send_github_push(
        &capture.url,
        "acme/deploy",
        "main",
        &after,
        &middle,
        HOOK_SECRET,
    )
    .await
    .unwrap();
    let zero = "0".repeat(40);
    sim.send_github_push(
        &capture.url,
        "acme/deploy",
        "main",
        &zero,
        &after,
        HOOK_SECRET,
    )
    .await
    .unwrap();
    let deliveries = capture.deliveries.lock().unwrap().clone();
    let forced: Value = serde_json::from_slice(&deliveries[1].1).unwrap();
    assert_eq!(forced["forced"], true);
    let created: Value = serde_json::from_slice(&deliveries[2].1).unwrap();
    assert_eq!(
        (&created["created"], &created["forced"]),
        (&json!(true), &json!(false))
    );
    assert_eq!(created["head_commit"]["id"], after.as_str());
}

#[tokio::test]
async fn send_gitlab_push_is_verified_and_queued_by_the_receiver() {
    let repo = TestRepo::new();
    repo.write("a", "1\n");
    let before = repo.commit("one");
    let mut after = before.clone();
    for i in 0..22 {
        repo.write("a", format!("{i}\n"));
        after = repo.commit(&format!("change {i}"));
    }
    let sim = simulator().await;
    sim.add_repo("acme/platform/deploy", repo.path());

    let receiver = live_receiver();
    let status = sim
        .send_gitlab_push(
            &receiver.url,
            "acme/platform/deploy",
            "main",
            &before,
            &after,
            HOOK_TOKEN,
        )
        .await
        .unwrap();
    assert_eq!(status, 202);
    let job = receiver
        .queue
        .pending("platform")
        .expect("the push is queued");
    assert_eq!(job.revision.as_deref(), Some(after.as_str()));
    let wrong = sim
        .send_gitlab_push(
            &receiver.url,
            "acme/platform/deploy",
            "main",
            &before,
            &after,
            "nope",
        )
        .await
        .unwrap();
    assert_eq!(wrong, 401);

    let capture = capture_receiver();
    sim.send_gitlab_push(
        &capture.url,
        "acme/platform/deploy",
        "main",
        &before,
        &after,
        HOOK_TOKEN,
    )
    .await
    .unwrap();
    let (headers, body) = capture.deliveries.lock().unwrap()[0].clone();
    assert_eq!(headers["x-gitlab-event"], "Push Hook");
    assert_eq!(headers["x-gitlab-token"], HOOK_TOKEN);
    assert!(!headers["idempotency-key"].is_empty());
    assert!(!headers["x-gitlab-event-uuid"].is_empty());
    let payload: Value = serde_json::from_slice(&body).unwrap();
    let fixture: Value = serde_json::from_slice(&fixture("gitlab/push.json")).unwrap();
    assert_same_keys(&payload, &fixture, &[], "push payload");
    assert_same_keys(&payload["project"], &fixture["project"], &[], "project");
    assert_same_keys(
        &payload["commits"][0],
        &fixture["commits"][0],
        &[],
        "commit",
    );
    assert_same_keys(
        &payload["repository"],
        &fixture["repository"],
        &[],
        "repository",
    );
    assert_eq!(
        payload["project"]["path_with_namespace"],
        "acme/platform/deploy"
    );
    assert_eq!(
        payload["project_id"].as_u64(),
        sim.gitlab_project_id("acme/platform/deploy")
    );
    // The newest 20 of 22 commits, oldest first; the count has all of them.
    assert_eq!(payload["total_commits_count"], 22);
    let commits = payload["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 20);
    assert_eq!(commits[19]["id"], after.as_str());
    assert_eq!(commits[0]["title"], "change 2");
    assert_eq!(commits[19]["modified"], json!(["a"]));
}

/// The default page size GitHub's OpenAPI description gives an operation's `per_page`.
fn documented_per_page_default(method: &str, path: &str) -> usize {
    let (_, op) = find_operation(method, path).expect("a GitHub operation");
    let doc = crate::support::openapi::description();
    op["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| match p.get("$ref").and_then(Value::as_str) {
            Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap(),
            None => p,
        })
        .find(|p| p["name"] == "per_page")
        .and_then(|p| p["schema"]["default"].as_u64())
        .expect("per_page has a documented default") as usize
}

/// GitHub's hook list pages as its description says: `per_page` (default 30, at most 100)
/// and `page`, a `Link` header (declared for the 200 answer) with `next` while more remain;
/// following `next` yields every hook exactly once, each page valid against the schema.
#[tokio::test]
async fn github_hook_listing_pages_as_documented() {
    let (repo, _) = sample_repo();
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let gh = GithubClient::new(&sim);
    let mut created = BTreeSet::new();
    for i in 0..65 {
        let hook = gh
            .send(
                Method::POST,
                "/repos/acme/deploy/hooks",
                Some(json!({"config": {"url": format!("https://ci-{i}.example.net/hook")}})),
                &[],
            )
            .await;
        assert_eq!(hook.status, 201);
        created.insert(hook.json["id"].as_u64().unwrap());
    }
    let path = "/repos/acme/deploy/hooks";
    let (_, op) = find_operation("GET", path).unwrap();
    assert!(
        op["responses"]["200"]["headers"].get("Link").is_some(),
        "the description declares Link on the hook list"
    );
    let default = documented_per_page_default("GET", path);
    assert_eq!(default, 30);
    for (query, per_page) in [("", default), ("?per_page=100", 100), ("?per_page=7", 7)] {
        let mut seen = BTreeSet::new();
        let mut pages = 0;
        let mut next = Some(format!("{path}{query}"));
        while let Some(p) = next {
            let page = gh.get(&p).await;
            assert_eq!(page.status, 200);
            let rows = page.json.as_array().unwrap();
            assert!(rows.len() <= per_page, "{query}");
            for row in rows {
                assert!(
                    seen.insert(row["id"].as_u64().unwrap()),
                    "{query}: repeated"
                );
            }
            pages += 1;
            next = next_link(&page).map(|url| {
                url.strip_prefix(&gh.api)
                    .unwrap_or_else(|| panic!("next page outside the API: {url}"))
                    .to_string()
            });
            if next.is_some() {
                assert!(page.header("link").unwrap().contains("rel=\"last\""));
            }
        }
        assert_eq!(seen, created, "{query}");
        assert_eq!(pages, created.len().div_ceil(per_page), "{query}");
    }
    let capped = gh.get(&format!("{path}?per_page=1000")).await;
    assert_eq!(capped.json.as_array().unwrap().len(), 65);
    assert_github_requests_exist(&sim.requests());
}

/// GitLab's hook list pages with its offset headers: `per_page` (default 20, at most 100),
/// `X-Next-Page` and `Link: rel="next"` while more remain, every hook exactly once.
#[tokio::test]
async fn gitlab_hook_listing_pages_as_documented() {
    let (repo, _) = sample_repo();
    let sim = simulator().await;
    sim.add_repo("acme/platform/deploy", repo.path());
    let gl = GitlabClient::new(&sim);
    let mut created = BTreeSet::new();
    for i in 0..45 {
        let hook = gl
            .send(
                Method::POST,
                &format!("/projects/{GL_PROJECT}/hooks"),
                Some(json!({"url": format!("https://ci-{i}.example.net/hook")})),
            )
            .await;
        assert_eq!(hook.status, 201);
        created.insert(hook.json["id"].as_u64().unwrap());
    }
    for (query, per_page) in [("", 20), ("?per_page=100", 100), ("?per_page=7", 7)] {
        let mut seen = BTreeSet::new();
        let mut pages = 0;
        let mut next = Some(format!("{}/projects/{GL_PROJECT}/hooks{query}", gl.api));
        while let Some(url) = next {
            let page = gl.send_url(Method::GET, &url, None).await;
            assert_eq!(page.status, 200);
            pages += 1;
            assert_eq!(page.header("x-page"), Some(pages.to_string().as_str()));
            assert_eq!(
                page.header("x-per-page"),
                Some(per_page.to_string().as_str())
            );
            assert_eq!(page.header("x-total"), Some("45"));
            for row in page.json.as_array().unwrap() {
                assert!(
                    seen.insert(row["id"].as_u64().unwrap()),
                    "{query}: repeated"
                );
            }
            next = next_link(&page);
            let x_next = page.header("x-next-page").unwrap_or("");
            assert_eq!(x_next.is_empty(), next.is_none(), "{query}");
            if let Some(n) = &next {
                assert!(n.contains(&format!("page={x_next}")), "{n} vs {x_next}");
            }
        }
        assert_eq!(seen, created, "{query}");
        assert_eq!(pages, created.len().div_ceil(per_page), "{query}");
    }
}

/// A JSON value's type, as the shape checks compare it.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The object at `pointer` in `ours` has every key the real payload has there, each with the
/// real payload's JSON type; `null` on either side passes (both forges send many fields as
/// `null` or a value depending on the request, and their examples fill some of them).
fn assert_shaped_like(ours: &Value, real: &Value, pointer: &str, except: &[&str], what: &str) {
    let theirs = real
        .pointer(pointer)
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("{what}: the real payload has no object at {pointer:?}"));
    let mine = ours
        .pointer(pointer)
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("{what}: no object at {pointer:?}"));
    for (key, real_value) in theirs.iter().filter(|(k, _)| !except.contains(&k.as_str())) {
        let Some(value) = mine.get(key) else {
            panic!("{what}: {pointer}/{key} is missing");
        };
        let (a, b) = (json_kind(value), json_kind(real_value));
        assert!(
            a == b || a == "null" || b == "null",
            "{what}: {pointer}/{key} is {a}, the real payload's is {b}"
        );
    }
}

/// Each field driftless's receiver reads is present, not null, and of the real type.
fn assert_read_fields(ours: &Value, real: &Value, pointers: &[&str], what: &str) {
    for pointer in pointers {
        let mine = ours
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{what}: {pointer} is missing"));
        let theirs = real
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{what}: the real payload has no {pointer}"));
        assert_eq!(
            json_kind(mine),
            json_kind(theirs),
            "{what}: {pointer} is {mine}, the real payload has {theirs}"
        );
    }
}

/// Fields of a `pull_request` delivery driftless's receiver reads.
const GITHUB_PULL_REQUEST_READS: &[&str] = &[
    "/action",
    "/number",
    "/pull_request/merged",
    "/pull_request/head/ref",
    "/pull_request/head/sha",
    "/pull_request/head/repo/full_name",
    "/pull_request/base/ref",
    "/pull_request/base/sha",
    "/pull_request/base/repo/full_name",
];

/// Fields of a `Merge Request Hook` delivery driftless's receiver reads.
const GITLAB_MERGE_REQUEST_READS: &[&str] = &[
    "/object_kind",
    "/project/path_with_namespace",
    "/object_attributes/iid",
    "/object_attributes/target_branch",
    "/object_attributes/source_project_id",
    "/object_attributes/target_project_id",
    "/object_attributes/last_commit/id",
    "/object_attributes/action",
];

/// A repository with `main` and a branch `change` one commit ahead: (repo, main, change).
fn request_repo() -> (TestRepo, String, String) {
    let repo = TestRepo::new();
    repo.write("apps/web/cm.yaml", "n: 1\n");
    let main = repo.commit("base");
    repo.checkout_new("change");
    repo.write("apps/web/cm.yaml", "n: 2\n");
    let change = repo.commit("Raise n\n\nbody");
    repo.checkout("main");
    (repo, main, change)
}

const REQUEST_CASES: [(RequestAction, PullRequestAction); 5] = [
    (RequestAction::Opened, PullRequestAction::Updated),
    (RequestAction::Pushed, PullRequestAction::Updated),
    (RequestAction::Reopened, PullRequestAction::Updated),
    (RequestAction::Closed, PullRequestAction::Closed),
    (RequestAction::Merged, PullRequestAction::Merged),
];

/// The simulator's `pull_request` deliveries have the shape of GitHub's real examples of the
/// same action (every key at each level driftless or a reviewer looks at, with the real
/// types), carry the repository's real commits, and parse to the request they describe.
#[tokio::test]
async fn send_github_pull_request_is_shaped_like_the_real_payloads() {
    let (repo, main, change) = request_repo();
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let capture = capture_receiver();
    for (action, expected) in REQUEST_CASES {
        let examples: &[u32] = match action {
            RequestAction::Opened => &[1, 13, 14, 15],
            RequestAction::Pushed => &[23],
            RequestAction::Reopened => &[19, 20],
            // No real example is merged: a merge is a `closed` with `merged: true`.
            RequestAction::Closed | RequestAction::Merged => &[4, 5],
        };
        for fork in [false, true] {
            let hook = RequestHook {
                number: 7,
                action,
                base: "main".into(),
                head_branch: "change".into(),
                head_sha: change.clone(),
                fork,
            };
            let status = sim
                .send_github_pull_request(&capture.url, "acme/deploy", &hook, HOOK_SECRET)
                .await
                .unwrap();
            assert_eq!(status, 200);
            let (headers, body) = capture.deliveries.lock().unwrap().last().unwrap().clone();
            assert_eq!(headers["x-github-event"], "pull_request");
            assert_eq!(
                headers["x-hub-signature-256"],
                driftless::webhook::github::sign(HOOK_SECRET, &body).as_str()
            );
            let payload: Value = serde_json::from_slice(&body).unwrap();
            let what = format!("{action:?} (fork: {fork})");
            for n in examples {
                let real: Value =
                    serde_json::from_slice(&fixture(&format!("github/pull_request-{n}.json")))
                        .unwrap();
                // `installation` and `organization` are only sent to Apps and org repositories.
                assert_shaped_like(
                    &payload,
                    &real,
                    "",
                    &["installation", "organization"],
                    &what,
                );
                for pointer in [
                    "/pull_request",
                    "/pull_request/head",
                    "/pull_request/base",
                    "/pull_request/_links",
                    "/pull_request/user",
                    "/sender",
                ] {
                    assert_shaped_like(&payload, &real, pointer, &[], &what);
                }
                assert_read_fields(&payload, &real, GITHUB_PULL_REQUEST_READS, &what);
            }
            assert_eq!(payload["pull_request"]["base"]["sha"], main.as_str());
            if action == RequestAction::Pushed {
                assert_eq!(
                    (&payload["before"], &payload["after"]),
                    (&json!(main), &json!(change))
                );
            }
            let Ok(Event::PullRequest(pr)) =
                driftless::webhook::github::parse("pull_request", &body)
            else {
                panic!("{what}: not a pull request event")
            };
            assert_eq!(
                pr,
                PullRequestEvent {
                    forge: ForgeKind::Github,
                    repo: "acme/deploy".into(),
                    number: 7,
                    action: expected,
                    base_branch: "main".into(),
                    head_sha: change.clone(),
                    from_fork: fork,
                },
                "{what}"
            );
        }
    }
}

/// The simulator's `Merge Request Hook` deliveries have the shape of GitLab's documented
/// example, carry the head commit from the repository and parse to the request they describe.
#[tokio::test]
async fn send_gitlab_merge_request_is_shaped_like_the_documented_payload() {
    let (repo, _, change) = request_repo();
    let sim = simulator().await;
    sim.add_repo("acme/platform/deploy", repo.path());
    let capture = capture_receiver();
    let real: Value = serde_json::from_slice(&fixture("gitlab/merge_request.json")).unwrap();
    for (action, expected) in REQUEST_CASES {
        for fork in [false, true] {
            let hook = RequestHook {
                number: 4,
                action,
                base: "main".into(),
                head_branch: "change".into(),
                head_sha: change.clone(),
                fork,
            };
            sim.send_gitlab_merge_request(&capture.url, "acme/platform/deploy", &hook, HOOK_TOKEN)
                .await
                .unwrap();
            let (headers, body) = capture.deliveries.lock().unwrap().last().unwrap().clone();
            assert_eq!(headers["x-gitlab-event"], "Merge Request Hook");
            assert_eq!(headers["x-gitlab-token"], HOOK_TOKEN);
            let payload: Value = serde_json::from_slice(&body).unwrap();
            let what = format!("{action:?} (fork: {fork})");
            for pointer in [
                "",
                "/user",
                "/project",
                "/repository",
                "/object_attributes",
                "/object_attributes/source",
                "/object_attributes/target",
                "/object_attributes/last_commit",
                "/object_attributes/last_commit/author",
            ] {
                assert_shaped_like(&payload, &real, pointer, &[], &what);
            }
            assert_read_fields(&payload, &real, GITLAB_MERGE_REQUEST_READS, &what);
            let last = &payload["object_attributes"]["last_commit"];
            assert_eq!(
                (&last["id"], &last["title"]),
                (&json!(change), &json!("Raise n"))
            );
            let Ok(Event::PullRequest(pr)) =
                driftless::webhook::gitlab::parse("Merge Request Hook", &body)
            else {
                panic!("{what}: not a pull request event")
            };
            assert_eq!(
                pr,
                PullRequestEvent {
                    forge: ForgeKind::Gitlab,
                    repo: "acme/platform/deploy".into(),
                    number: 4,
                    action: expected,
                    base_branch: "main".into(),
                    head_sha: change.clone(),
                    from_fork: fork,
                },
                "{what}"
            );
        }
    }
}
