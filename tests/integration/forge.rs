//! The forge clients against the forge simulator over real git repositories: what a push
//! costs in requests, statuses and hooks round-tripping, rate limits waited out, 401s failing
//! at once, truncated trees walked, and unsafe or oversized app trees refused.

use std::time::{Duration, Instant};

use driftless::forge::github::GithubForge;
use driftless::forge::gitlab::GitlabForge;
use driftless::forge::{
    fetch_app, BlobCache, Comment, CommitStatus, Comparison, Fetched, Forge, ForgeError, HookSpec,
    StatusState,
};
use driftless::settings::{FetchSettings, Settings};
use driftless::simulator::{Fault, FaultKind, ForgeSimulator, SimConfig};

use crate::support::git::GitRepo;
use crate::support::openapi::assert_github_requests_exist;

const GH_TOKEN: &str = "ghp_simulated_token";
const GL_TOKEN: &str = "glpat-simulated";

/// 1,000 files: three apps of 10 manifests each and 970 unrelated files.
fn big_repo() -> (GitRepo, String) {
    let repo = GitRepo::new();
    for app in ["a", "b", "c"] {
        for i in 0..10 {
            repo.write(
                &format!("apps/{app}/cm-{i}.yaml"),
                &format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {app}-{i}\ndata:\n  n: \"{i}\"\n"),
            );
        }
    }
    for i in 0..970 {
        repo.write(
            &format!("docs/part-{}/page-{i}.md", i % 20),
            &format!("page {i}\n"),
        );
    }
    let c1 = repo.commit("initial");
    (repo, c1)
}

async fn simulator() -> ForgeSimulator {
    ForgeSimulator::start(SimConfig {
        github_token: GH_TOKEN.into(),
        gitlab_token: GL_TOKEN.into(),
    })
    .await
    .expect("starting the forge simulator")
}

struct Clients {
    _dir: tempfile::TempDir,
    github: GithubForge,
    gitlab: GitlabForge,
    fetch: FetchSettings,
}

fn clients(sim: &ForgeSimulator, gh_token: &str, extra: &str) -> Clients {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, v: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, v).unwrap();
        p.display().to_string()
    };
    let text = format!(
        r#"
[forges.github]
api_url = "{gh_url}"
token_file = "{gh_token}"
webhook_secret_file = "{secret}"
[forges.gitlab]
api_url = "{gl_url}"
token_file = "{gl_token}"
webhook_token_file = "{secret}"
[fetch]
max_rate_limit_wait = "5s"
{extra}
"#,
        gh_url = sim.github_api_url(),
        gl_url = sim.gitlab_api_url(),
        gh_token = file("gh", gh_token),
        gl_token = file("gl", GL_TOKEN),
        secret = file("secret", "s"),
    );
    let settings = Settings::from_toml_str(&text).unwrap();
    Clients {
        github: GithubForge::new(settings.forges.github.as_ref().unwrap(), &settings.fetch)
            .unwrap(),
        gitlab: GitlabForge::new(settings.forges.gitlab.as_ref().unwrap(), &settings.fetch)
            .unwrap(),
        fetch: settings.fetch,
        _dir: dir,
    }
}

fn count(sim: &ForgeSimulator, forge: &str, needle: &str) -> u64 {
    sim.request_counts()
        .iter()
        .filter(|(route, _)| route.starts_with(forge) && route.contains(needle))
        .map(|(_, n)| *n)
        .sum()
}

fn total(sim: &ForgeSimulator, forge: &str) -> u64 {
    count(sim, forge, "")
}

fn tree_sha(f: &Fetched) -> String {
    match f {
        Fetched::Unchanged { tree_sha } | Fetched::Changed { tree_sha, .. } => tree_sha.clone(),
    }
}

/// The cost of a one-file push for one forge: app A refetched, B and C unchanged.
async fn one_file_push(
    forge: &dyn Forge,
    sim: &ForgeSimulator,
    repo: &GitRepo,
    c1: &str,
    fetch: &FetchSettings,
    name: &str,
) {
    let cache = BlobCache::new(64 << 20);
    let mut known = Vec::new();
    for app in ["a", "b", "c"] {
        let f = fetch_app(forge, &cache, fetch, name, c1, &format!("apps/{app}"), None)
            .await
            .unwrap();
        let Fetched::Changed { files, .. } = &f else {
            panic!("first fetch of {app} unchanged")
        };
        assert_eq!(files.len(), 10);
        known.push(tree_sha(&f));
    }
    repo.write(
        "apps/a/cm-3.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a-3\ndata:\n  n: \"changed\"\n",
    );
    let c2 = repo.commit("change one file in a");
    sim.clear_requests();

    let a = fetch_app(forge, &cache, fetch, name, &c2, "apps/a", Some(&known[0]))
        .await
        .unwrap();
    let Fetched::Changed { files, tree_sha } = a else {
        panic!("app a did not change")
    };
    assert_ne!(tree_sha, known[0]);
    let changed = files.iter().find(|f| f.path == "cm-3.yaml").unwrap();
    assert!(String::from_utf8_lossy(&changed.content).contains("changed"));
    assert_eq!(files.len(), 10);
    for (i, app) in ["b", "c"].iter().enumerate() {
        let f = fetch_app(
            forge,
            &cache,
            fetch,
            name,
            &c2,
            &format!("apps/{app}"),
            Some(&known[i + 1]),
        )
        .await
        .unwrap();
        assert_eq!(
            f,
            Fetched::Unchanged {
                tree_sha: known[i + 1].clone()
            },
            "app {app}"
        );
    }
}

#[tokio::test]
async fn github_push_fetches_one_tree_and_one_blob() {
    let (repo, c1) = big_repo();
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");
    one_file_push(&c.github, &sim, &repo, &c1, &c.fetch, "acme/deploy").await;
    let counts = sim.request_counts();
    assert_eq!(count(&sim, "github", "git/trees"), 1, "{counts:?}");
    assert_eq!(count(&sim, "github", "git/blobs"), 1, "{counts:?}");
    assert_eq!(total(&sim, "github"), 2, "{counts:?}");
    assert_github_requests_exist(&sim.requests());
}

#[tokio::test]
async fn gitlab_push_fetches_one_listing_page_per_directory_and_one_blob() {
    let (repo, c1) = big_repo();
    let sim = simulator().await;
    sim.add_repo("acme/platform/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");
    one_file_push(
        &c.gitlab,
        &sim,
        &repo,
        &c1,
        &c.fetch,
        "acme/platform/deploy",
    )
    .await;
    let counts = sim.request_counts();
    // The parent directory "apps" (3 entries, one page) gives all three subtree SHAs; app a
    // (10 files, one page) is listed recursively; one blob changed.
    assert_eq!(count(&sim, "gitlab", "repository/tree"), 2, "{counts:?}");
    assert_eq!(count(&sim, "gitlab", "blobs"), 1, "{counts:?}");
    assert_eq!(total(&sim, "gitlab"), 3, "{counts:?}");
}

#[tokio::test]
async fn gitlab_tree_pagination_is_followed() {
    let repo = GitRepo::new();
    for i in 0..250 {
        repo.write(&format!("app/m-{i:03}.yaml"), "kind: ConfigMap\n");
    }
    let c1 = repo.commit("many files");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");
    let entries = c
        .gitlab
        .subtree_entries("acme/deploy", &c1, "app")
        .await
        .unwrap();
    assert_eq!(entries.len(), 250);
    let mut names: Vec<_> = entries.iter().map(|e| e.path.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        250,
        "an entry came twice or went missing across pages"
    );
    assert_eq!(
        count(&sim, "gitlab", "repository/tree"),
        3,
        "{:?}",
        sim.request_counts()
    );
}

#[tokio::test]
async fn statuses_round_trip_on_both_forges() {
    let repo = GitRepo::new();
    repo.write("app/a.yaml", "kind: ConfigMap\n");
    let c1 = repo.commit("one");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");
    for (forge, name) in [
        (&c.github as &dyn Forge, "github"),
        (&c.gitlab as &dyn Forge, "gitlab"),
    ] {
        for state in [StatusState::Pending, StatusState::Success] {
            forge
                .set_status(
                    "acme/deploy",
                    &c1,
                    &CommitStatus {
                        context: "driftless/web".into(),
                        state,
                        description: format!("{name} {state:?}"),
                        target_url: Some("https://driftless.example.com/apps/web".into()),
                    },
                )
                .await
                .unwrap();
        }
        let got: Vec<_> = sim
            .statuses("acme/deploy", &c1)
            .into_iter()
            .filter(|s| s.forge == name)
            .collect();
        assert_eq!(got.len(), 2, "{name}");
        assert_eq!(got[0].state, "pending");
        assert_eq!(got[1].state, "success");
        assert_eq!(got[1].context, "driftless/web");
        assert_eq!(
            got[1].target_url.as_deref(),
            Some("https://driftless.example.com/apps/web")
        );
    }
    assert_github_requests_exist(&sim.requests());
}

#[tokio::test]
async fn hooks_round_trip_on_both_forges() {
    let repo = GitRepo::new();
    repo.commit("empty");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");
    for forge in [&c.github as &dyn Forge, &c.gitlab as &dyn Forge] {
        let spec = HookSpec {
            url: "https://driftless.example.com/hooks/x".into(),
            secret: "first".into(),
            pull_requests: false,
        };
        assert!(forge
            .list_hooks("acme/deploy")
            .await
            .unwrap()
            .iter()
            .all(|h| h.url != spec.url));
        let created = forge.create_hook("acme/deploy", &spec).await.unwrap();
        assert!(created.push_events && created.active);
        let moved = HookSpec {
            url: "https://driftless.example.com/hooks/y".into(),
            secret: "second".into(),
            pull_requests: false,
        };
        let updated = forge
            .update_hook("acme/deploy", created.id, &moved)
            .await
            .unwrap();
        assert_eq!(updated.id, created.id);
        assert_eq!(updated.url, moved.url);
        let listed = forge.list_hooks("acme/deploy").await.unwrap();
        assert!(listed
            .iter()
            .any(|h| h.id == created.id && h.url == moved.url));
    }
    let hooks = sim.hooks("acme/deploy");
    assert_eq!(hooks.len(), 2, "one hook per forge: {hooks:?}");
    assert!(hooks.iter().all(|h| h.secret.as_deref() == Some("second")));
    assert_github_requests_exist(&sim.requests());
}

/// The preview comment's life on both forges through the real clients: none at first, created
/// once, edited in place, a body over the forge's limit refused; on GitHub every call is an
/// operation of GitHub's description.
#[tokio::test]
async fn comments_round_trip_on_both_forges() {
    let repo = GitRepo::new();
    repo.commit("empty");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");
    // GitHub counts characters, not bytes: a two-byte character shows it. GitLab's limit is
    // tested in ASCII, as two-byte characters would exceed the simulator's 1 MiB body cap.
    for (forge, limit, fill) in [
        (&c.github as &dyn Forge, 65_536, "é"),
        (&c.gitlab as &dyn Forge, 1_000_000, "x"),
    ] {
        assert_eq!(forge.comment_limit(), limit);
        assert!(forge
            .list_comments("acme/deploy", 7)
            .await
            .unwrap()
            .is_empty());
        let created = forge
            .create_comment("acme/deploy", 7, "first preview")
            .await
            .unwrap();
        assert_eq!(created.body, "first preview");
        let edited = forge
            .update_comment("acme/deploy", 7, created.id, "second preview")
            .await
            .unwrap();
        assert_eq!(
            edited,
            Comment {
                id: created.id,
                body: "second preview".into()
            }
        );
        assert_eq!(
            forge.list_comments("acme/deploy", 7).await.unwrap(),
            [edited]
        );
        // Exactly the limit is accepted, one character more is refused.
        let at_limit = fill.repeat(limit);
        forge
            .update_comment("acme/deploy", 7, created.id, &at_limit)
            .await
            .unwrap();
        let over = fill.repeat(limit + 1);
        let refused = forge.create_comment("acme/deploy", 7, &over).await;
        assert!(
            matches!(refused, Err(ForgeError::InvalidResponse { .. })),
            "{refused:?}"
        );
        let refused = forge
            .update_comment("acme/deploy", 7, created.id, &over)
            .await;
        assert!(
            matches!(refused, Err(ForgeError::InvalidResponse { .. })),
            "{refused:?}"
        );
        assert_eq!(
            forge.list_comments("acme/deploy", 7).await.unwrap().len(),
            1
        );
    }
    let comments = sim.comments("acme/deploy", 7);
    assert_eq!(comments.len(), 2, "one comment per forge: {comments:?}");
    assert!(comments.iter().all(|c| c.edits == 2));
    assert_github_requests_exist(&sim.requests());
}

#[tokio::test]
async fn rate_limits_are_waited_out_and_bad_credentials_fail_at_once() {
    let repo = GitRepo::new();
    repo.write("app/a.yaml", "kind: ConfigMap\n");
    let c1 = repo.commit("one");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");

    sim.inject(Fault {
        forge: Some("github"),
        path_contains: "/commits/".into(),
        kind: FaultKind::RateLimited {
            reset_after: Duration::from_secs(2),
        },
        times: 1,
    });
    let started = Instant::now();
    assert_eq!(
        c.github.branch_head("acme/deploy", "main").await.unwrap(),
        c1
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "did not wait for the reset"
    );

    sim.inject(Fault {
        forge: Some("gitlab"),
        path_contains: "branches".into(),
        kind: FaultKind::RateLimited {
            reset_after: Duration::from_secs(1),
        },
        times: 1,
    });
    assert_eq!(
        c.gitlab.branch_head("acme/deploy", "main").await.unwrap(),
        c1
    );

    // A reset further away than fetch.max_rate_limit_wait fails with the time to come back.
    sim.inject(Fault {
        forge: Some("github"),
        path_contains: "git/trees".into(),
        kind: FaultKind::RateLimited {
            reset_after: Duration::from_secs(3600),
        },
        times: 1,
    });
    let e = c
        .github
        .subtree_sha("acme/deploy", &c1, "app")
        .await
        .unwrap_err();
    assert!(matches!(e, ForgeError::RateLimited { .. }), "{e}");

    // A server error is retried.
    sim.inject(Fault {
        forge: Some("gitlab"),
        path_contains: "blobs".into(),
        kind: FaultKind::Status(502),
        times: 1,
    });
    let entries = c
        .gitlab
        .subtree_entries("acme/deploy", &c1, "app")
        .await
        .unwrap();
    assert_eq!(
        c.gitlab
            .blob("acme/deploy", &entries[0].sha)
            .await
            .unwrap()
            .as_ref(),
        b"kind: ConfigMap\n"
    );

    sim.clear_requests();
    let bad = clients(&sim, "ghp_wrong", "");
    let e = bad
        .github
        .branch_head("acme/deploy", "main")
        .await
        .unwrap_err();
    assert!(
        matches!(e, ForgeError::Unauthorized { status: 401, .. }),
        "{e}"
    );
    assert!(!e.to_string().contains("ghp_wrong"), "token leaked: {e}");
    assert_eq!(total(&sim, "github"), 1, "a 401 was retried");
}

#[tokio::test]
async fn unchanged_branch_head_is_a_conditional_request() {
    let repo = GitRepo::new();
    let c1 = repo.commit("one");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");
    assert_eq!(
        c.github.branch_head("acme/deploy", "main").await.unwrap(),
        c1
    );
    assert_eq!(
        c.github.branch_head("acme/deploy", "main").await.unwrap(),
        c1
    );
    let statuses: Vec<u16> = sim.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 304]);
    let c2 = repo.commit("two");
    assert_eq!(
        c.github.branch_head("acme/deploy", "main").await.unwrap(),
        c2
    );

    // A fresh client told the head an earlier process saw gets its 304 too, for free.
    sim.clear_requests();
    let fresh = clients(&sim, GH_TOKEN, "");
    assert_eq!(
        fresh
            .github
            .branch_head_since("acme/deploy", "main", Some(&c2))
            .await
            .unwrap(),
        c2
    );
    let requests = sim.requests();
    assert_eq!(requests.iter().map(|r| r.status).collect::<Vec<_>>(), [304]);
    assert_eq!(requests[0].route, "/repos/{owner}/{repo}/commits/{ref}");
    // A stale known head is answered with the new one.
    assert_eq!(
        fresh
            .github
            .branch_head_since("acme/deploy", "main", Some(&c1))
            .await
            .unwrap(),
        c2
    );
}

#[tokio::test]
async fn truncated_trees_are_walked() {
    let (repo, c1) = big_repo();
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");
    sim.inject(Fault {
        forge: Some("github"),
        path_contains: "git/trees".into(),
        kind: FaultKind::TruncateTrees,
        times: 100,
    });
    let cache = BlobCache::new(1 << 20);
    let f = fetch_app(
        &c.github,
        &cache,
        &c.fetch,
        "acme/deploy",
        &c1,
        "apps/b",
        None,
    )
    .await
    .unwrap();
    let Fetched::Changed { files, .. } = f else {
        panic!()
    };
    let mut names: Vec<_> = files.iter().map(|f| f.path.as_str()).collect();
    names.sort();
    assert_eq!(names.len(), 10);
    assert_eq!(names[0], "cm-0.yaml");
    assert_github_requests_exist(&sim.requests());
}

#[tokio::test]
async fn symlinks_submodules_and_oversized_apps_are_refused() {
    let repo = GitRepo::new();
    repo.write("app/ok.yaml", "kind: ConfigMap\n");
    std::os::unix::fs::symlink("/etc/passwd", repo.path().join("app/evil.yaml")).unwrap();
    let c1 = repo.commit("symlink");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "max_app_files = 3");
    let cache = BlobCache::new(1 << 20);
    for forge in [&c.github as &dyn Forge, &c.gitlab as &dyn Forge] {
        let e = fetch_app(forge, &cache, &c.fetch, "acme/deploy", &c1, "app", None)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "app/evil.yaml: is a symbolic link; driftless applies only regular files"
        );
    }

    std::fs::remove_file(repo.path().join("app/evil.yaml")).unwrap();
    repo.git(&["add", "-A"]);
    repo.git(&[
        "update-index",
        "--add",
        "--cacheinfo",
        &format!("160000,{c1},app/vendor"),
    ]);
    // Committed directly: `commit()` would `git add -A` the gitlink away again.
    repo.git(&["commit", "-q", "-m", "submodule"]);
    let c2 = repo.head();
    let e = fetch_app(&c.github, &cache, &c.fetch, "acme/deploy", &c2, "app", None)
        .await
        .unwrap_err();
    assert!(
        e.to_string().starts_with("app/vendor: is a git submodule"),
        "{e}"
    );

    repo.git(&["rm", "-q", "--cached", "app/vendor"]);
    for i in 0..5 {
        repo.write(&format!("app/m{i}.yaml"), "kind: ConfigMap\n");
    }
    let c3 = repo.commit("too many");
    let e = fetch_app(&c.gitlab, &cache, &c.fetch, "acme/deploy", &c3, "app", None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("fetch.max_app_files = 3"), "{e}");
}

#[tokio::test]
async fn compare_tells_ahead_behind_identical_and_diverged() {
    let repo = GitRepo::new();
    let c1 = repo.commit("one");
    let c2 = repo.commit("two");
    repo.git(&["checkout", "-q", "-b", "side", &c1]);
    let side = repo.commit("side");
    repo.git(&["checkout", "-q", "--orphan", "unrelated"]);
    let unrelated = repo.commit("no common ancestor");
    repo.git(&["checkout", "-q", "main"]);
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");
    for forge in [&c.github as &dyn Forge, &c.gitlab as &dyn Forge] {
        assert_eq!(
            forge.compare("acme/deploy", &c1, &c2).await.unwrap(),
            Comparison::Ahead
        );
        assert_eq!(
            forge.compare("acme/deploy", &c2, &c1).await.unwrap(),
            Comparison::Behind
        );
        assert_eq!(
            forge.compare("acme/deploy", &c2, &c2).await.unwrap(),
            Comparison::Identical
        );
        assert_eq!(
            forge.compare("acme/deploy", &c2, &side).await.unwrap(),
            Comparison::Diverged
        );
        // Both forges answer histories with no common ancestor with a 404; the engine takes
        // that for diverged and lets the branch decide.
        let e = forge
            .compare("acme/deploy", &c2, &unrelated)
            .await
            .unwrap_err();
        assert!(matches!(e, ForgeError::NotFound { .. }), "{e}");
    }
    assert_github_requests_exist(&sim.requests());
}

#[tokio::test]
async fn changed_since_is_exact_or_says_it_may_miss_paths() {
    let repo = GitRepo::new();
    repo.write("a/x.yaml", "kind: ConfigMap\n");
    repo.write("b/x.yaml", "kind: ConfigMap\n");
    let c1 = repo.commit("one");
    repo.write("b/x.yaml", "kind: Secret\n");
    let c2 = repo.commit("two");
    repo.git(&["checkout", "-q", "-b", "side", &c1]);
    repo.write("a/x.yaml", "kind: Secret\n");
    let side = repo.commit("side");
    repo.git(&["checkout", "-q", "main"]);
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    let c = clients(&sim, GH_TOKEN, "");
    let name = "acme/deploy";
    for forge in [&c.github as &dyn Forge, &c.gitlab as &dyn Forge] {
        let kind = forge.kind();
        let ahead = forge.changed_since(name, &c1, &c2).await.unwrap();
        assert_eq!(
            (ahead.paths, ahead.complete),
            (vec!["b/x.yaml".to_string()], true),
            "{kind}"
        );
        // Back to an ancestor: a merge-base diff lists nothing, yet b/x.yaml differs.
        let behind = forge.changed_since(name, &c2, &c1).await.unwrap();
        assert!(
            !behind.complete || behind.paths == ["b/x.yaml"],
            "{kind}: {behind:?}"
        );
        // A force push to another line: a/x.yaml and b/x.yaml both differ.
        let diverged = forge.changed_since(name, &c2, &side).await.unwrap();
        let mut paths = diverged.paths.clone();
        paths.sort();
        assert!(
            !diverged.complete || paths == ["a/x.yaml", "b/x.yaml"],
            "{kind}: {diverged:?}"
        );
    }
    assert_github_requests_exist(&sim.requests());
}

/// The simulator serving one empty repository as `acme/deploy` (GitHub) and
/// `acme/platform/deploy` (GitLab), for the hook tests.
async fn hook_repos() -> (GitRepo, ForgeSimulator) {
    let repo = GitRepo::new();
    repo.commit("empty");
    let sim = simulator().await;
    sim.add_repo("acme/deploy", repo.path());
    sim.add_repo("acme/platform/deploy", repo.path());
    (repo, sim)
}

/// Settings for `hooks register` against the simulator: two GitHub apps on `acme/deploy`, one
/// GitLab app on `acme/platform/deploy`, the webhook secret read from `secret`.
fn hooks_config(sim: &ForgeSimulator, dir: &std::path::Path, secret: &str) -> String {
    let file = |name: &str, v: &str| {
        let p = dir.join(name);
        std::fs::write(&p, v).unwrap();
        p.display().to_string()
    };
    file(
        "d.toml",
        &format!(
            r#"
[server]
public_url = "https://driftless.example.com"
[forges.github]
api_url = "{}"
token_file = "{}"
webhook_secret_file = "{secret}"
[forges.gitlab]
api_url = "{}"
token_file = "{}"
webhook_token_file = "{secret}"
[[apps]]
name = "web"
forge = "github"
repo = "acme/deploy"
[[apps]]
name = "api"
forge = "github"
repo = "acme/deploy"
path = "api"
[[apps]]
name = "pay"
forge = "gitlab"
repo = "acme/platform/deploy"
"#,
            sim.github_api_url(),
            file("ght", GH_TOKEN),
            sim.gitlab_api_url(),
            file("glt", GL_TOKEN),
        ),
    )
}

/// Runs `driftless hooks register` as a user does; fails the test on a non-zero exit.
async fn register(config: &str, extra: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["hooks", "register", "--config", config])
        .args(extra)
        .env_remove("DRIFTLESS_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `driftless hooks register`, run as a user runs it, against both simulated forges.
#[tokio::test]
async fn hooks_register_creates_once_and_updates_when_the_secret_changes() {
    let (_repo, sim) = hook_repos().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "first-secret").unwrap();
    let config = hooks_config(&sim, dir.path(), &secret.display().to_string());
    let run = |extra: &'static [&'static str]| {
        let config = config.clone();
        async move { register(&config, extra).await }
    };
    let first = run(&[]).await;
    assert!(
        first.contains("github acme/deploy: created hook"),
        "{first}"
    );
    assert!(
        first.contains("gitlab acme/platform/deploy: created hook"),
        "{first}"
    );
    assert!(
        first.contains("-> https://driftless.example.com/hooks/github"),
        "{first}"
    );
    let second = run(&[]).await;
    assert_eq!(second.matches("is up to date").count(), 2, "{second}");
    for name in ["acme/deploy", "acme/platform/deploy"] {
        let hooks = sim.hooks(name);
        assert_eq!(hooks.len(), 1, "{name}: {hooks:?}");
    }

    std::fs::write(&secret, "second-secret").unwrap();
    let planned = run(&["--dry-run"]).await;
    assert_eq!(planned.matches("updated hook").count(), 2, "{planned}");
    assert!(sim
        .hooks("acme/deploy")
        .iter()
        .all(|h| h.secret.as_deref() == Some("first-secret")));
    let third = run(&[]).await;
    assert_eq!(third.matches("updated hook").count(), 2, "{third}");
    assert_eq!(sim.hooks("acme/deploy").len(), 1);
    assert_eq!(
        sim.hooks("acme/deploy")[0].secret.as_deref(),
        Some("second-secret")
    );
    assert_eq!(sim.hooks("acme/deploy")[0].events, ["push"]);

    // The receiver moves: the same hook is pointed at the new URL, not duplicated.
    let moved = std::fs::read_to_string(&config).unwrap().replace(
        "https://driftless.example.com",
        "https://gitops.example.org",
    );
    std::fs::write(&config, moved).unwrap();
    let fourth = run(&[]).await;
    assert_eq!(fourth.matches("updated hook").count(), 2, "{fourth}");
    let hooks = sim.hooks("acme/deploy");
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert!(
        hooks[0]
            .url
            .starts_with("https://gitops.example.org/hooks/github?s="),
        "{hooks:?}"
    );
    assert_github_requests_exist(&sim.requests());
}

/// A repository with more hooks than fit on one page: register finds its own hook on the
/// second page of the listing (both forges page their hook lists) and never adds another.
#[tokio::test]
async fn hooks_register_finds_its_hook_past_the_first_page() {
    let (_repo, sim) = hook_repos().await;
    let c = clients(&sim, GH_TOKEN, "");
    // 100 hooks of other services fill the first page (driftless asks for 100 a page, the
    // most either forge serves), so the one register creates is the 101st.
    for i in 0..100 {
        let spec = HookSpec {
            url: format!("https://ci-{i}.example.net/hook"),
            secret: format!("other-{i}"),
            pull_requests: false,
        };
        c.github.create_hook("acme/deploy", &spec).await.unwrap();
        c.gitlab
            .create_hook("acme/platform/deploy", &spec)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "ours").unwrap();
    let config = hooks_config(&sim, dir.path(), &secret.display().to_string());
    let first = register(&config, &[]).await;
    assert_eq!(first.matches("created hook").count(), 2, "{first}");
    for _ in 0..2 {
        let again = register(&config, &[]).await;
        assert_eq!(again.matches("is up to date").count(), 2, "{again}");
    }
    for name in ["acme/deploy", "acme/platform/deploy"] {
        let hooks = sim.hooks(name);
        assert_eq!(hooks.len(), 101, "{name}");
        let ours: Vec<_> = hooks
            .iter()
            .filter(|h| h.url.starts_with("https://driftless.example.com/"))
            .collect();
        assert_eq!(ours.len(), 1, "{name}: {ours:?}");
    }
    // The first run found one full page and no next link; the two after it read both pages
    // of each list, following the forge's next link.
    assert_eq!(count(&sim, "github", "GET /repos/{owner}/{repo}/hooks"), 5);
    assert_eq!(count(&sim, "gitlab", "GET /projects/:id/hooks"), 5);
    assert_github_requests_exist(&sim.requests());
}

/// `serve` registers hooks at start-up only on the forges whose section sets
/// `register_webhooks = true`.
#[tokio::test]
async fn serve_registers_hooks_only_where_asked() {
    let (_repo, sim) = hook_repos().await;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, v: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, v).unwrap();
        p.display().to_string()
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state_ns = crate::support::cluster::TestNamespace::new("it-hooks").await;
    let config = file(
        "d.toml",
        &format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
public_url = "https://driftless.example.com"
[kubernetes]
state_namespace = "{state}"
[forges.github]
api_url = "{}"
token_file = "{}"
webhook_secret_file = "{secret}"
register_webhooks = true
[forges.gitlab]
api_url = "{}"
token_file = "{}"
webhook_token_file = "{secret}"
[[apps]]
name = "web"
forge = "github"
repo = "acme/deploy"
[[apps]]
name = "pay"
forge = "gitlab"
repo = "acme/platform/deploy"
"#,
            sim.github_api_url(),
            file("ght", GH_TOKEN),
            sim.gitlab_api_url(),
            file("glt", GL_TOKEN),
            secret = file("secret", "s"),
            state = state_ns.name,
        ),
    );
    let serve = crate::support::serve::Serve::start(
        std::path::Path::new(&config),
        &format!("http://127.0.0.1:{port}"),
        dir.path().join("serve.log"),
    )
    .await;
    // Registration runs before the receiver listens, so it is done once /healthz answers.
    assert_eq!(sim.hooks("acme/deploy").len(), 1, "{}", serve.log());
    assert_eq!(
        sim.hooks("acme/platform/deploy").len(),
        0,
        "{}",
        serve.log()
    );
    serve.sigterm();
    let (code, log) = serve.exit_code(std::time::Duration::from_secs(30)).await;
    assert_eq!(code, 0, "{log}");
    state_ns.cleanup().await;
}
