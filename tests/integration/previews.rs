//! Previews of pull and merge requests, end to end: the real `driftless serve` with
//! `[previews] enabled = true`, the forge simulator sending the request webhooks and recording
//! statuses and comments, and the real control plane, whose objects must not move.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use driftless::reconcile::Outcome;
use driftless::simulator::{RequestAction, RequestHook};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::ListParams;
use kube::Api;

use crate::reconcile::{Env, REPO};
use crate::support::serve::{Serve, ServeConfig};

/// Three plain apps on `main`, each a directory of the repository, previews on.
fn apps(forge: &str) -> String {
    let mut out = String::new();
    for name in ["api", "db", "web"] {
        out.push_str(&format!(
            "[[apps]]\nname = \"{name}\"\nforge = \"{forge}\"\nrepo = \"{REPO}\"\npath = \"{name}\"\nnamespace = \"{{ns}}\"\nhealth_timeout = \"20s\"\n"
        ));
    }
    out.push_str("[previews]\nenabled = true\n");
    out
}

fn cm(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n"
    )
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: 80\n  selector:\n    app: web\n";

/// The three apps applied from `main`; returns the commit.
async fn applied(env: &Env) -> String {
    for name in ["api", "db", "web"] {
        env.repo.write(&format!("{name}/cm.yaml"), &cm(name, "one"));
    }
    let c1 = env.repo.commit("three apps");
    let engine = env.engine();
    for name in ["api", "db", "web"] {
        let job =
            driftless::queue::Job::new(name, Some(c1.clone()), driftless::queue::JobReason::Manual);
        let report = engine.run(&job, Default::default()).await.unwrap();
        assert_eq!(report.outcome, Outcome::Applied, "{name}");
    }
    engine.settle().await;
    c1
}

/// A branch off `main` with `edit` done and committed; returns its head. `main` stays.
fn branch(env: &Env, name: &str, edit: impl FnOnce(&Env)) -> String {
    env.repo.git(&["checkout", "-q", "-b", name, "main"]);
    edit(env);
    let head = env.repo.commit(name);
    env.repo.git(&["checkout", "-q", "main"]);
    head
}

/// Every object's resourceVersion in the test namespace.
async fn versions(env: &Env) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let cms: Api<ConfigMap> = env.configmaps();
    for o in cms.list(&ListParams::default()).await.unwrap() {
        out.insert(
            format!("cm/{}", o.metadata.name.unwrap()),
            o.metadata.resource_version.unwrap(),
        );
    }
    let svcs: Api<Service> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
    for o in svcs.list(&ListParams::default()).await.unwrap() {
        out.insert(
            format!("svc/{}", o.metadata.name.unwrap()),
            o.metadata.resource_version.unwrap(),
        );
    }
    out
}

/// Waits for `done` to hold, failing with the serve log after 60 s.
async fn wait_for(serve: &Serve, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen: {}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Preview statuses of `sha`, as `context state: description`.
fn preview_statuses(env: &Env, sha: &str) -> Vec<String> {
    env.sim
        .statuses(REPO, sha)
        .into_iter()
        .filter(|s| s.context.starts_with("driftless/preview/"))
        .map(|s| {
            format!(
                "{} {}: {}",
                s.context,
                s.state,
                s.description.unwrap_or_default()
            )
        })
        .collect()
}

/// The full preview page of request `number`, as JSON.
async fn page_json(base: &str, forge: &str, number: u64) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{base}/previews/{forge}/{REPO}/{number}"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn start(env: &Env) -> (ServeConfig, Serve) {
    let config = ServeConfig::new(&env.config_file, "", "");
    let serve = Serve::start(&config.path, &config.base, config.log("serve.log")).await;
    (config, serve)
}

fn hook(number: u64, action: RequestAction, head_branch: &str, head_sha: &str) -> RequestHook {
    RequestHook {
        number,
        action,
        base: "main".into(),
        head_branch: head_branch.into(),
        head_sha: head_sha.into(),
        fork: false,
    }
}

async fn send(env: &Env, base: &str, forge: &str, h: &RequestHook) -> u16 {
    let status = match forge {
        "github" => env.sim.send_github_pull_request(base, REPO, h, "s").await,
        _ => env.sim.send_gitlab_merge_request(base, REPO, h, "s").await,
    };
    status.unwrap().as_u16()
}

/// The story of one request on `forge`: opened, pushed again, then closed (or merged).
async fn one_request_from_open_to_close(forge: &str, end: RequestAction) {
    let env = Env::with_apps(&apps(forge)).await;
    applied(&env).await;
    let head = branch(&env, "change", |env| {
        env.repo.write("web/cm.yaml", &cm("web", "two"));
        env.repo.write("web/svc.yaml", SERVICE);
    });
    let (config, serve) = start(&env).await;
    let before = versions(&env).await;

    // Opened: exactly one app affected, one status, one comment with exactly that diff.
    assert_eq!(
        send(
            &env,
            &config.base,
            forge,
            &hook(7, RequestAction::Opened, "change", &head)
        )
        .await,
        202
    );
    wait_for(&serve, "the preview status", || {
        !preview_statuses(&env, &head).is_empty()
    })
    .await;
    assert_eq!(
        preview_statuses(&env, &head),
        ["driftless/preview/web success: 1 changed, 1 added, 0 pruned"]
    );
    wait_for(&serve, "the comment", || {
        !env.sim.comments(REPO, 7).is_empty()
    })
    .await;
    let comments = env.sim.comments(REPO, 7);
    assert_eq!(comments.len(), 1, "{comments:?}");
    let body = &comments[0].body;
    assert!(
        body.contains("| `web` | changes | 1 changed, 1 added, 0 pruned |"),
        "{body}"
    );
    assert!(body.contains("-  value: one\n+  value: two\n"), "{body}");
    assert!(
        body.contains(&format!(
            "# v1 Service {}/web (added, svc.yaml (document 1))",
            env.ns.name
        )),
        "{body}"
    );
    assert!(!body.contains("`api`") && !body.contains("`db`"), "{body}");
    assert!(
        body.contains(&format!(
            "Full preview: https://driftless.example.com/previews/{forge}/{REPO}/7"
        )),
        "{body}"
    );
    // Nothing in the cluster moved: no object written, the Service not created.
    assert_eq!(versions(&env).await, before);

    // The page holds the same preview, as JSON.
    let page = page_json(&config.base, forge, 7).await;
    assert_eq!(page["head_sha"], head.as_str());
    assert_eq!(page["apps"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["apps"][0]["app"], "web");
    // Kept in the cluster: a restarted replica (or any other) serves the same page.
    serve.kill().await;
    let serve = Serve::start(&config.path, &config.base, config.log("serve-2.log")).await;
    let page = page_json(&config.base, forge, 7).await;
    assert_eq!(page["head_sha"], head.as_str(), "{page}");

    // A new head: the same comment edited, no second one.
    env.repo.git(&["checkout", "-q", "change"]);
    env.repo.write("web/cm.yaml", &cm("web", "three"));
    let head2 = env.repo.commit("three");
    env.repo.git(&["checkout", "-q", "main"]);
    assert_eq!(
        send(
            &env,
            &config.base,
            forge,
            &hook(7, RequestAction::Pushed, "change", &head2)
        )
        .await,
        202
    );
    wait_for(&serve, "the second preview", || {
        !preview_statuses(&env, &head2).is_empty()
    })
    .await;
    wait_for(&serve, "the comment edit", || {
        env.sim.comments(REPO, 7)[0].body.contains("value: three")
    })
    .await;
    let comments = env.sim.comments(REPO, 7);
    assert_eq!(comments.len(), 1, "{comments:?}");
    assert_eq!(comments[0].edits, 1);
    assert_eq!(versions(&env).await, before);

    // Closed (or merged): the comment says so, the page is gone.
    assert_eq!(
        send(&env, &config.base, forge, &hook(7, end, "change", &head2)).await,
        202
    );
    let word = if end == RequestAction::Merged {
        "merged"
    } else {
        "closed"
    };
    wait_for(&serve, "the closing edit", || {
        env.sim.comments(REPO, 7)[0]
            .body
            .contains(&format!("was {word}"))
    })
    .await;
    assert_eq!(env.sim.comments(REPO, 7).len(), 1);
    let gone = reqwest::get(format!("{}/previews/{forge}/{REPO}/7", config.base))
        .await
        .unwrap();
    assert_eq!(gone.status().as_u16(), 404);
    assert_eq!(versions(&env).await, before);
}

#[tokio::test]
async fn a_github_pull_request_gets_exactly_its_diff_and_nothing_moves() {
    one_request_from_open_to_close("github", RequestAction::Closed).await;
}

#[tokio::test]
async fn a_gitlab_merge_request_gets_exactly_its_diff_and_nothing_moves() {
    one_request_from_open_to_close("gitlab", RequestAction::Merged).await;
}

/// A rejected manifest fails its app's status naming the object; a diff over GitHub's comment
/// limit is cut with a link and the page holds all of it; a fork's request is not previewed.
async fn rejected_truncated_and_forks(forge: &str) {
    let env = Env::with_apps(&apps(forge)).await;
    applied(&env).await;
    let bad = branch(&env, "bad", |env| {
        env.repo.write(
            "api/deploy.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: api\nspec:\n  replicas: \"two\"\n  selector:\n    matchLabels: {app: api}\n  template:\n    metadata:\n      labels: {app: api}\n    spec:\n      containers:\n      - name: api\n        image: nginx\n",
        );
    });
    // About 120,000 characters of diff, far over GitHub's 65,536.
    let big = branch(&env, "big", |env| {
        let mut data =
            String::from("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\ndata:\n");
        for i in 0..3000 {
            data.push_str(&format!(
                "  key{i:04}: \"a value long enough to fill the comment {i}\"\n"
            ));
        }
        env.repo.write("db/big.yaml", &data);
    });
    let (config, serve) = start(&env).await;
    let before = versions(&env).await;

    let mut fork = hook(9, RequestAction::Opened, "bad", &bad);
    fork.fork = true;
    assert_eq!(send(&env, &config.base, forge, &fork).await, 200);

    assert_eq!(
        send(
            &env,
            &config.base,
            forge,
            &hook(8, RequestAction::Opened, "bad", &bad)
        )
        .await,
        202
    );
    wait_for(&serve, "the rejection", || {
        !preview_statuses(&env, &bad).is_empty()
    })
    .await;
    let statuses = preview_statuses(&env, &bad);
    let failed = if forge == "github" {
        "failure"
    } else {
        "failed"
    };
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert!(
        statuses[0].starts_with(&format!("driftless/preview/api {failed}: apps/v1 Deployment {}/api: rejected by the API server:", env.ns.name)),
        "{statuses:?}"
    );

    assert_eq!(
        send(
            &env,
            &config.base,
            forge,
            &hook(10, RequestAction::Opened, "big", &big)
        )
        .await,
        202
    );
    wait_for(&serve, "the big comment", || {
        !env.sim.comments(REPO, 10).is_empty()
    })
    .await;
    let body = env.sim.comments(REPO, 10)[0].body.clone();
    let limit = if forge == "github" { 65_536 } else { 1_000_000 };
    assert!(body.chars().count() <= limit, "{}", body.chars().count());
    let page = page_json(&config.base, forge, 10).await;
    let whole = page["apps"][0]["objects"][0]["diff"].as_str().unwrap();
    assert!(whole.contains("key2999"), "the page holds the whole diff");
    if forge == "github" {
        assert!(!body.contains("key2999"), "the comment is cut");
        assert!(body.contains(&format!("more lines in the [full preview](https://driftless.example.com/previews/github/{REPO}/10)")), "{}", &body[body.len() - 400..]);
    } else {
        assert!(
            body.contains("key2999"),
            "a GitLab note holds a million characters"
        );
    }

    // The fork's request was answered and left alone: no status, no comment.
    assert!(env.sim.comments(REPO, 9).is_empty());
    assert_eq!(versions(&env).await, before);
}

#[tokio::test]
async fn github_rejections_truncation_and_forks() {
    rejected_truncated_and_forks("github").await;
}

#[tokio::test]
async fn gitlab_rejections_truncation_and_forks() {
    rejected_truncated_and_forks("gitlab").await;
}

/// `driftless preview <app> --revision SHA`, as a user runs it: exit 0 when nothing would
/// change, 1 with the diff when something would, 2 when the API server refuses an object.
#[tokio::test]
async fn the_preview_command_prints_the_diff_with_kubectl_diffs_exit_codes() {
    let env = Env::with_apps(&apps("github")).await;
    let c1 = applied(&env).await;
    let changed = branch(&env, "change", |env| {
        env.repo.write("web/cm.yaml", &cm("web", "two"))
    });
    let bad = branch(&env, "bad", |env| {
        env.repo.write(
            "web/cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\ndata: 5\n",
        )
    });
    let before = versions(&env).await;
    // Through tokio: the simulator answers on this test's runtime while the command runs.
    let run = |rev: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_driftless"))
            .args(["preview", "web", "--revision", rev, "--config"])
            .arg(&env.config_file)
            .env(
                "KUBECONFIG",
                std::env::var(crate::support::cluster::KUBECONFIG_ENV).unwrap(),
            )
            .output()
    };
    let out = run(&c1).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("0 changed, 0 added, 0 pruned (1 unchanged)"),
        "{text}"
    );
    let out = run(&changed).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("-  value: one\n+  value: two\n"), "{text}");
    let out = run(&bad).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "v1 ConfigMap {}/web: rejected by the API server",
            env.ns.name
        )),
        "{text}"
    );
    assert_eq!(versions(&env).await, before);
}

/// With previews on, `hooks register` subscribes each repository's hook to the request
/// events too (GitHub `pull_request`, GitLab `merge_requests_events`).
#[tokio::test]
async fn hooks_register_subscribes_to_request_events_when_previews_are_on() {
    let apps = format!(
        "[[apps]]\nname = \"hub\"\nforge = \"github\"\nrepo = \"{REPO}\"\npath = \"web\"\nnamespace = \"{{ns}}\"\n\
         [[apps]]\nname = \"lab\"\nforge = \"gitlab\"\nrepo = \"{REPO}\"\npath = \"web\"\nnamespace = \"{{ns}}\"\n\
         [previews]\nenabled = true\n"
    );
    let env = Env::with_apps(&apps).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["hooks", "register", "--config"])
        .arg(&env.config_file)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The simulator serves one repository to both forges with one list of hooks, so the
    // GitLab registration finds (by the secret's fingerprint) and updates the GitHub one:
    // one hook, with both forges' request events on.
    let hooks = env.sim.hooks(REPO);
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    for event in ["push", "pull_request", "tag_push", "merge_requests"] {
        assert!(
            hooks[0].events.iter().any(|e| e == event),
            "{event}: {hooks:?}"
        );
    }
}

/// A merge is a push, and a push writes only the objects whose content changed since the last
/// apply: the request's preview shows exactly those. A hand edit to another object of the app
/// is not the request's doing (the merge leaves it; the drift timer reports it) and is not
/// shown, while `driftless preview`, like a manual apply, considers every object and shows it.
#[tokio::test]
async fn a_request_previews_what_its_merge_writes_not_drift_elsewhere() {
    let env = Env::with_apps(&apps("github")).await;
    env.repo.write("web/other.yaml", &cm("other", "one"));
    applied(&env).await;
    let hand = serde_json::json!({"data": {"value": "by hand"}});
    env.configmaps()
        .patch(
            "other",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&hand),
        )
        .await
        .unwrap();
    let head = branch(&env, "change", |env| {
        env.repo.write("web/cm.yaml", &cm("web", "two"))
    });
    let (config, serve) = start(&env).await;
    assert_eq!(
        send(
            &env,
            &config.base,
            "github",
            &hook(11, RequestAction::Opened, "change", &head)
        )
        .await,
        202
    );
    wait_for(&serve, "the comment", || {
        !env.sim.comments(REPO, 11).is_empty()
    })
    .await;
    assert_eq!(
        preview_statuses(&env, &head),
        ["driftless/preview/web success: 1 changed, 0 added, 0 pruned"]
    );
    let body = &env.sim.comments(REPO, 11)[0].body;
    assert!(body.contains("+  value: two\n"), "{body}");
    assert!(!body.contains("by hand"), "{body}");

    // Every object, as a manual apply would write them: the hand edit shows.
    let set = env
        .engine()
        .dry_run_revision(
            "web",
            &head,
            driftless::reconcile::dry_run::Scope::EveryObject,
        )
        .await
        .unwrap();
    let changed: Vec<String> = set
        .objects
        .iter()
        .map(driftless::preview::diff::object_change)
        .filter(|c| c.change == driftless::preview::diff::ChangeKind::Changed)
        .map(|c| c.object)
        .collect();
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert!(changed.iter().any(|o| o.ends_with("/other")), "{changed:?}");
}
