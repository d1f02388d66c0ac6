//! The reconcile engine against the real control plane and the forge simulator: pushes that
//! add, edit, delete and revert; CRDs with their objects; all-or-nothing validation; safe
//! pruning; no rollback from a delayed delivery; leases across replicas; commit statuses; health.

use std::sync::Arc;
use std::time::Duration;

use driftless::forge;
use driftless::manifest::ObjectRef;
use driftless::queue::{Job, JobReason};
use driftless::reconcile::{lease, state, Engine, Outcome, ReconcileError, RunOptions, RunReport};
use driftless::settings::Settings;
use driftless::simulator::{Fault, FaultKind, ForgeSimulator, SimConfig};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

use crate::support::cluster::{Cluster, TestNamespace};
use crate::support::git::GitRepo;

pub const REPO: &str = "acme/deploy";

pub struct Env {
    pub ns: TestNamespace,
    pub state_ns: TestNamespace,
    pub sim: ForgeSimulator,
    pub repo: GitRepo,
    pub settings: Settings,
    /// The settings as a file, for running the binary.
    pub config_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    pub async fn new(forge: &str, app_extra: &str) -> Env {
        Env::new_in(Cluster::ControlPlane, forge, app_extra).await
    }

    /// The same on `cluster` (the node cluster, for rollouts of real pods).
    pub async fn new_in(cluster: Cluster, forge: &str, app_extra: &str) -> Env {
        let app = format!(
            r#"[[apps]]
name = "demo"
forge = "{forge}"
repo = "{REPO}"
path = "app"
namespace = "{{ns}}"
{app_extra}
"#
        );
        let app = if app_extra.contains("health_timeout") {
            app
        } else {
            format!("{app}health_timeout = \"20s\"\n")
        };
        Env::with_apps_in(cluster, &app).await
    }

    /// An environment whose settings end with `apps` (TOML; `{ns}` stands for the test
    /// namespace), on a repository `acme/deploy` served by the simulator on both forges.
    pub async fn with_apps(apps: &str) -> Env {
        Env::with_apps_in(Cluster::ControlPlane, apps).await
    }

    async fn with_apps_in(cluster: Cluster, apps: &str) -> Env {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let ns = TestNamespace::new_in(cluster, "it-rec").await;
        let state_ns = TestNamespace::new_in(cluster, "it-state").await;
        let sim = ForgeSimulator::start(SimConfig {
            github_token: "ghp_t".into(),
            gitlab_token: "glpat_t".into(),
        })
        .await
        .unwrap();
        let repo = GitRepo::new();
        sim.add_repo(REPO, repo.path());
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, v: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, v).unwrap();
            p.display().to_string()
        };
        let text = format!(
            r#"
[server]
public_url = "https://driftless.example.com"
[kubernetes]
state_namespace = "{state}"
[forges.github]
api_url = "{gh}"
token_file = "{ght}"
webhook_secret_file = "{secret}"
[forges.gitlab]
api_url = "{gl}"
token_file = "{glt}"
webhook_token_file = "{secret}"
{apps}"#,
            state = state_ns.name,
            gh = sim.github_api_url(),
            gl = sim.gitlab_api_url(),
            ght = file("ght", "ghp_t"),
            glt = file("glt", "glpat_t"),
            secret = file("secret", "s"),
            apps = apps.replace("{ns}", &ns.name),
        );
        let settings = Settings::from_toml_str(&text).unwrap();
        let config_file = dir.path().join("driftless.toml");
        std::fs::write(&config_file, &text).unwrap();
        Env {
            config_file,
            ns,
            state_ns,
            sim,
            repo,
            settings,
            _dir: dir,
        }
    }

    pub fn engine(&self) -> Engine {
        let forges = forge::from_settings(&self.settings).unwrap();
        Engine::new(
            self.ns.client.clone(),
            forges,
            Arc::new(self.settings.clone()),
        )
    }

    pub fn cm(&self, name: &str, value: &str) -> String {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n")
    }

    pub async fn push(&self, engine: &Engine, revision: &str) -> Result<RunReport, ReconcileError> {
        let job = Job::new(
            "demo",
            Some(revision.to_string()),
            JobReason::Push {
                delivery: None,
                before: String::new(),
            },
        );
        engine.run(&job, RunOptions::default()).await
    }

    pub fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.ns.client.clone(), &self.ns.name)
    }

    pub async fn cm_value(&self, name: &str) -> Option<String> {
        self.configmaps()
            .get_opt(name)
            .await
            .unwrap()
            .and_then(|c| c.data)
            .and_then(|d| d.get("value").cloned())
    }

    pub fn id(&self, kind: &str, name: &str) -> ObjectRef {
        let api_version = if kind == "Deployment" {
            "apps/v1"
        } else {
            "v1"
        };
        ObjectRef {
            api_version: api_version.into(),
            kind: kind.into(),
            namespace: Some(self.ns.name.clone()),
            name: name.into(),
        }
    }

    pub async fn cleanup(self) {
        self.sim.stop().await;
        self.ns.cleanup().await;
        self.state_ns.cleanup().await;
    }
}

#[tokio::test]
async fn pushes_add_edit_delete_and_revert() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    for name in ["one", "two", "three"] {
        env.repo
            .write(&format!("app/{name}.yaml"), &env.cm(name, "v1"));
    }
    env.repo.write("README.md", "not a manifest\n");
    let c1 = env.repo.commit("add three");
    let r = env.push(&engine, &c1).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    assert_eq!(r.applied.len(), 3);
    for name in ["one", "two", "three"] {
        assert_eq!(env.cm_value(name).await.as_deref(), Some("v1"));
    }
    let live = env.configmaps().get("one").await.unwrap();
    let labels = live.metadata.labels.unwrap();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "driftless");
    assert_eq!(labels["driftless.dev/app"], "demo");
    assert!(live
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .any(|m| m.manager.as_deref() == Some("driftless")));

    // Editing one file writes only that object.
    env.repo.write("app/two.yaml", &env.cm("two", "v2"));
    let c2 = env.repo.commit("edit two");
    let r = env.push(&engine, &c2).await.unwrap();
    assert_eq!(r.applied, [env.id("ConfigMap", "two")]);
    assert_eq!(env.cm_value("two").await.as_deref(), Some("v2"));

    // A commit outside the app path applies nothing and posts no status.
    env.repo.write("README.md", "still not a manifest\n");
    let c3 = env.repo.commit("docs only");
    let statuses_before = env.sim.statuses(REPO, &c3).len();
    let r = env.push(&engine, &c3).await.unwrap();
    assert_eq!(r.outcome, Outcome::Unchanged);
    assert!(r.applied.is_empty());
    assert_eq!(env.sim.statuses(REPO, &c3).len(), statuses_before);

    // Deleting a file prunes its object.
    env.repo.remove("app/three.yaml");
    let c4 = env.repo.commit("delete three");
    let r = env.push(&engine, &c4).await.unwrap();
    assert_eq!(r.pruned, [env.id("ConfigMap", "three")]);
    assert!(env.configmaps().get_opt("three").await.unwrap().is_none());

    // Reverting brings it back.
    env.repo.git(&["revert", "--no-edit", "HEAD"]);
    let c5 = env.repo.head();
    let r = env.push(&engine, &c5).await.unwrap();
    assert_eq!(r.applied, [env.id("ConfigMap", "three")]);
    assert_eq!(env.cm_value("three").await.as_deref(), Some("v1"));

    // The state in the cluster says where the app is.
    let st = state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    assert_eq!(st.revision.as_deref(), Some(c5.as_str()));
    assert_eq!(st.inventory.len(), 3);
    assert_eq!(st.runs[0].outcome, "applied");

    // Statuses went pending → success on each applied commit.
    for c in [&c1, &c2, &c4, &c5] {
        let states: Vec<String> = env
            .sim
            .statuses(REPO, c)
            .into_iter()
            .map(|s| s.state)
            .collect();
        assert_eq!(states, ["pending", "success"], "commit {c}");
    }
    let last = env.sim.statuses(REPO, &c1).pop().unwrap();
    assert_eq!(last.context, "driftless/demo");
    assert_eq!(
        last.target_url.as_deref(),
        Some("https://driftless.example.com/apps/demo")
    );
    assert!(last
        .description
        .unwrap()
        .starts_with("Applied 3 objects (3 changed)"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_crd_and_its_object_apply_in_one_run() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    let group = format!("{}.example.com", env.ns.name);
    env.repo.write(
        "app/crd.yaml",
        &format!(
            r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.{group}
spec:
  group: {group}
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget}}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {{type: object, properties: {{size: {{type: integer}}}}}}
"#
        ),
    );
    env.repo.write(
        "app/widget.yaml",
        &format!("apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: w\nspec:\n  size: 3\n"),
    );
    env.repo.write("app/cm.yaml", &env.cm("plain", "x"));
    let c1 = env.repo.commit("crd and widget");
    let r = env.push(&engine, &c1).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    assert_eq!(r.applied.len(), 3, "{:?}", r.applied);
    assert!(r
        .applied
        .iter()
        .any(|id| id.kind == "Widget" && id.namespace.as_deref() == Some(env.ns.name.as_str())));
    // The CRD is cluster-scoped and outlives the namespace: remove it.
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(env.ns.client.clone());
    crds.delete(&format!("widgets.{group}"), &Default::default())
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn one_invalid_object_writes_nothing_and_fails_the_commit() {
    let env = Env::new("gitlab", "").await;
    let engine = env.engine();
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    let c1 = env.repo.commit("good");
    env.push(&engine, &c1).await.unwrap();

    env.repo.write("app/a.yaml", &env.cm("a", "v2"));
    env.repo.write("app/b.yaml", &env.cm("b", "new"));
    env.repo.write(
        "app/web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: two\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx}]}\n",
    );
    let c2 = env.repo.commit("bad deployment");
    let e = env.push(&engine, &c2).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "apps/v1 Deployment {}/web: rejected by the API server",
            env.ns.name
        )),
        "{msg}"
    );
    // The API server's own reason (its Status message), not only that it failed.
    assert!(msg.contains("replicas"), "{msg}");
    // Nothing was written: a keeps v1, b does not exist.
    assert_eq!(env.cm_value("a").await.as_deref(), Some("v1"));
    assert!(env.configmaps().get_opt("b").await.unwrap().is_none());
    let statuses = env.sim.statuses(REPO, &c2);
    let last = statuses.last().unwrap();
    assert_eq!(last.state, "failed");
    assert!(
        last.description.as_deref().unwrap().contains("Deployment"),
        "{last:?}"
    );
    let st = state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    assert_eq!(
        st.revision.as_deref(),
        Some(c1.as_str()),
        "the previous revision stays applied"
    );
    assert_eq!(st.runs[0].outcome, "failed");
    env.cleanup().await;
}

#[tokio::test]
async fn pruning_only_touches_our_inventory_and_aborts_on_any_doubt() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    env.repo.write("app/b.yaml", &env.cm("b", "v1"));
    let c1 = env.repo.commit("two");
    env.push(&engine, &c1).await.unwrap();

    // An object carrying our labels that we never applied, and one that opted out of pruning.
    let stranger = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "stranger", "labels": {"app.kubernetes.io/managed-by": "driftless", "driftless.dev/app": "demo"}}});
    env.configmaps()
        .create(
            &PostParams::default(),
            &serde_json::from_value(stranger).unwrap(),
        )
        .await
        .unwrap();
    env.configmaps()
        .patch(
            "b",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b", "annotations": {"driftless.dev/prune": "disabled"}}})),
        )
        .await
        .unwrap();

    // A forge 5xx, a missing app path and an empty app each abort before pruning.
    env.repo.remove("app/b.yaml");
    let c2 = env.repo.commit("remove b");
    env.sim.inject(Fault {
        forge: Some("github"),
        path_contains: "git/trees".into(),
        kind: FaultKind::Status(503),
        // The first try and the client's three retries.
        times: 4,
    });
    assert!(matches!(
        env.push(&engine, &c2).await,
        Err(ReconcileError::Forge(_))
    ));
    env.repo.git(&["mv", "app", "moved"]);
    let c3 = env.repo.commit("path gone");
    assert!(matches!(
        env.push(&engine, &c3).await,
        Err(ReconcileError::Forge(
            driftless::forge::ForgeError::NotFound { .. }
        ))
    ));
    env.repo.git(&["mv", "moved", "app"]);
    env.repo.remove("app/a.yaml");
    env.repo.write("app/.keep", "");
    let c4 = env.repo.commit("empty");
    assert!(matches!(
        env.push(&engine, &c4).await,
        Err(ReconcileError::EmptySet)
    ));
    for name in ["a", "b", "stranger"] {
        assert!(
            env.configmaps().get_opt(name).await.unwrap().is_some(),
            "{name} was deleted"
        );
    }

    // A real removal prunes b? No: b opted out. a is pruned; the stranger stays.
    env.repo.write("app/c.yaml", &env.cm("c", "v1"));
    let c5 = env.repo.commit("replace a and b with c");
    let r = env.push(&engine, &c5).await.unwrap();
    assert_eq!(r.pruned, [env.id("ConfigMap", "a")]);
    assert!(env.configmaps().get_opt("b").await.unwrap().is_some());
    assert!(env
        .configmaps()
        .get_opt("stranger")
        .await
        .unwrap()
        .is_some());
    env.cleanup().await;
}

#[tokio::test]
async fn a_delayed_older_delivery_does_not_roll_back() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    env.repo.write("app/a.yaml", &env.cm("a", "old"));
    let c1 = env.repo.commit("old");
    env.repo.write("app/a.yaml", &env.cm("a", "new"));
    let c2 = env.repo.commit("new");
    env.push(&engine, &c2).await.unwrap();
    let r = env.push(&engine, &c1).await.unwrap();
    assert!(
        matches!(r.outcome, Outcome::Skipped(ref why) if why.contains("behind")),
        "{:?}",
        r.outcome
    );
    assert_eq!(env.cm_value("a").await.as_deref(), Some("new"));
    // An explicit `sync --revision` is obeyed.
    let job = Job::new("demo", Some(c1.clone()), JobReason::Manual);
    engine.run(&job, RunOptions::default()).await.unwrap();
    assert_eq!(env.cm_value("a").await.as_deref(), Some("old"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_second_replica_waits_for_the_lease() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    let c1 = env.repo.commit("one");
    // Another replica holds the app's lease.
    let held = lease::Leases::new(
        &env.ns.client,
        &env.state_ns.name,
        "other-replica",
        lease::LeaseTiming::default(),
    )
    .acquire("demo")
    .await
    .unwrap();
    let run = tokio::spawn({
        let job = Job::new(
            "demo",
            Some(c1.clone()),
            JobReason::Push {
                delivery: None,
                before: String::new(),
            },
        );
        async move { engine.run(&job, RunOptions::default()).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !run.is_finished(),
        "ran while another replica held the lease"
    );
    assert!(env.configmaps().get_opt("a").await.unwrap().is_none());
    held.release().await;
    let r = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    env.cleanup().await;
}

#[tokio::test]
async fn health_is_awaited_and_reported() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    env.repo.write("app/web.yaml", WEB);
    let c1 = env.repo.commit("web");
    // The run waits for health while we play the controller and report web available.
    let (r, ()) = tokio::join!(env.push(&engine, &c1), play_web_available(&env));
    let r = r.unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    let states: Vec<String> = env
        .sim
        .statuses(REPO, &c1)
        .into_iter()
        .map(|s| s.state)
        .collect();
    assert_eq!(states, ["pending", "success"]);
    env.cleanup().await;
}

#[tokio::test]
async fn an_unhealthy_deployment_fails_the_commit() {
    let env = Env::new("gitlab", "health_timeout = \"2s\"").await;
    let engine = env.engine();
    env.repo.write(
        "app/web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx:does-not-exist}]}\n",
    );
    let c1 = env.repo.commit("web");
    let e = env.push(&engine, &c1).await.unwrap_err();
    assert!(matches!(e, ReconcileError::Unhealthy { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!(
            "apps/v1 Deployment {}/web is not healthy",
            env.ns.name
        )),
        "{e}"
    );
    let states: Vec<String> = env
        .sim
        .statuses(REPO, &c1)
        .into_iter()
        .map(|s| s.state)
        .collect();
    assert_eq!(states, ["pending", "failed"]);
    env.cleanup().await;
}

/// A rollout that fails its health check has still changed the cluster: the `git revert` of
/// it (whose tree is the last applied one) must apply, not be taken for "unchanged".
#[tokio::test]
async fn the_revert_of_a_failed_rollout_applies() {
    let env = Env::new("github", "health_timeout = \"2s\"").await;
    let engine = env.engine();
    env.repo.write("app/web.yaml", WEB);
    let c1 = env.repo.commit("web");
    let (r, ()) = tokio::join!(env.push(&engine, &c1), play_web_available(&env));
    assert_eq!(r.unwrap().outcome, Outcome::Applied);
    // A bad tag: no controller makes it available, so the run fails on health.
    env.repo.write(
        "app/web.yaml",
        &WEB.replace("nginx:1.27", "nginx:1.27-typo"),
    );
    let c2 = env.repo.commit("bad tag");
    let e = env.push(&engine, &c2).await.unwrap_err();
    assert!(matches!(e, ReconcileError::Unhealthy { .. }), "{e}");
    let c3 = env.repo.revert(&c2);
    // The controller reports the reverted spec (nginx:1.27 again) available once written.
    let (r, ()) = tokio::join!(env.push(&engine, &c3), play_web_available(&env));
    let r = r.unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    assert_eq!(r.applied, [env.id("Deployment", "web")]);
    let states: Vec<String> = env
        .sim
        .statuses(REPO, &c3)
        .into_iter()
        .map(|s| s.state)
        .collect();
    assert_eq!(states, ["pending", "success"]);
    env.cleanup().await;
}

/// `/apps` and `/apps/<name>` show what the state in the cluster says, as JSON and HTML.
#[actix_web::test]
async fn status_pages_show_the_state_in_the_cluster() {
    use actix_web::{test, web, App};
    let env = Env::new("github", "").await;
    let engine = env.engine();
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    env.repo.write(
        "app/secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\nstringData:\n  password: hunter2-do-not-show\n",
    );
    env.repo.write("app/web.yaml", WEB);
    let c1 = env.repo.commit("one");
    let (pushed, ()) = tokio::join!(env.push(&engine, &c1), play_web_available(&env));
    pushed.unwrap();
    engine.check_drift("demo", false).await.unwrap();

    let mut rx = driftless::server::Receiver::new(
        &env.settings,
        Arc::new(driftless::queue::JobQueue::new()),
        Arc::new(driftless::metrics::Metrics::new()),
    )
    .unwrap();
    // Every request reads the cluster: the test changes health between two requests.
    rx.state_source = Some(driftless::status_pages::StateSource::with_ttl(
        env.ns.client.clone(),
        env.state_ns.name.clone(),
        Duration::ZERO,
    ));
    let app = test::init_service(
        App::new()
            .app_data(web::Data::new(rx))
            .configure(driftless::server::routes),
    )
    .await;

    let req = test::TestRequest::get()
        .uri("/apps")
        .insert_header(("Accept", "application/json"))
        .to_request();
    let list: serde_json::Value = test::call_and_read_body_json(&app, req).await;
    assert_eq!(list["apps"][0]["name"], "demo");
    assert_eq!(list["apps"][0]["revision"], c1.as_str());
    assert_eq!(list["apps"][0]["objects_count"], 3);

    let req = test::TestRequest::get()
        .uri("/apps/demo")
        .insert_header(("Accept", "application/json"))
        .to_request();
    let doc: serde_json::Value = test::call_and_read_body_json(&app, req).await;
    assert_eq!(doc["last_result"]["outcome"], "applied");
    assert_eq!(doc["runs"].as_array().unwrap().len(), 1);
    let health: Vec<(String, String)> = doc["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap().to_string(),
                o["health"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        health,
        [
            ("ConfigMap".to_string(), "no health to report".to_string()),
            ("Secret".to_string(), "no health to report".to_string()),
            ("Deployment".to_string(), "healthy".to_string()),
        ]
    );
    assert_eq!(doc["drift"]["objects"], serde_json::json!([]));
    assert!(
        !doc.to_string().contains("hunter2"),
        "secret data on the page"
    );

    let req = test::TestRequest::get().uri("/apps/demo").to_request();
    let html = String::from_utf8(test::call_and_read_body(&app, req).await.to_vec()).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(!html.contains("hunter2"));
    // Parsed as a browser parses it (html5ever, the WHATWG algorithm): no parse errors, and
    // the objects and runs are table rows, not just text somewhere in the page.
    let page = valid_html(&html);
    let cells: Vec<String> = page
        .select(&scraper::Selector::parse("td").unwrap())
        .map(|td| td.text().collect())
        .collect();
    assert!(
        cells.contains(&format!("v1 Secret {}/creds", env.ns.name)),
        "{cells:?}"
    );
    assert!(cells.iter().any(|c| c.contains(&c1[..12])), "{cells:?}");
    let req = test::TestRequest::get().uri("/apps").to_request();
    let html = String::from_utf8(test::call_and_read_body(&app, req).await.to_vec()).unwrap();
    let list = valid_html(&html);
    let links: Vec<&str> = list
        .select(&scraper::Selector::parse("a").unwrap())
        .filter_map(|a| a.value().attr("href"))
        .collect();
    assert!(links.contains(&"/apps/demo"), "{links:?}");

    // Health is read live: the Deployment loses its available replica.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.ns.client.clone(), &env.ns.name);
    deployments
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"availableReplicas": 0}})),
        )
        .await
        .unwrap();
    let req = test::TestRequest::get().uri("/apps/demo").to_request();
    let html = String::from_utf8(test::call_and_read_body(&app, req).await.to_vec()).unwrap();
    let page = valid_html(&html);
    let rows: Vec<String> = page
        .select(&scraper::Selector::parse("tr").unwrap())
        .map(|tr| tr.text().collect::<Vec<_>>().join("|"))
        .collect();
    assert!(
        rows.iter()
            .any(|r| r.starts_with("apps/v1 Deployment") && r.contains("|progressing: ")),
        "{rows:?}"
    );
    let req = test::TestRequest::get().uri("/apps/nope").to_request();
    assert_eq!(test::call_service(&app, req).await.status(), 404);
    env.cleanup().await;
}

const WEB: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx:1.27}]}\n";

/// Plays the Deployment controller once: waits for `web` running `WEB`'s image (nginx:1.27)
/// and reports that generation available.
async fn play_web_available(env: &Env) {
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.ns.client.clone(), &env.ns.name);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let generation = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "web with nginx:1.27 never appeared"
        );
        if let Some(d) = deployments.get_opt("web").await.unwrap() {
            let spec = serde_json::to_value(&d.spec).unwrap();
            if spec["template"]["spec"]["containers"][0]["image"] == "nginx:1.27" {
                break d.metadata.generation.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = json!({"status": {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1, "readyReplicas": 1}});
    deployments
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Parses a page as a browser does and fails on any HTML parse error.
fn valid_html(html: &str) -> scraper::Html {
    let page = scraper::Html::parse_document(html);
    assert!(
        page.errors.is_empty(),
        "HTML errors {:?} in:\n{html}",
        page.errors
    );
    page
}

/// A replica remembers the lease and state of its last run of an app, to take both back
/// without reading them. Once another replica has run the app, that memory is stale and must
/// not be used: here, a stale inventory would leave `c` unpruned.
#[tokio::test]
async fn a_replica_never_acts_on_a_stale_memory_of_the_app() {
    let env = Env::new("github", "").await;
    let (a, b) = (env.engine(), env.engine());
    env.repo.write("app/a.yaml", &env.cm("a", "1"));
    env.repo.write("app/b.yaml", &env.cm("b", "1"));
    let c1 = env.repo.commit("a and b");
    assert_eq!(env.push(&a, &c1).await.unwrap().outcome, Outcome::Applied);
    // The other replica takes the next push.
    env.repo.write("app/c.yaml", &env.cm("c", "1"));
    let c2 = env.repo.commit("add c");
    assert_eq!(
        env.push(&b, &c2).await.unwrap().applied,
        [env.id("ConfigMap", "c")]
    );
    // Back on the first: it must see c in the inventory to prune it.
    env.repo.remove("app/b.yaml");
    env.repo.remove("app/c.yaml");
    let c3 = env.repo.commit("remove b and c");
    let r = env.push(&a, &c3).await.unwrap();
    let mut pruned = r.pruned.clone();
    pruned.sort();
    assert_eq!(pruned, [env.id("ConfigMap", "b"), env.id("ConfigMap", "c")]);
    assert!(env.configmaps().get_opt("c").await.unwrap().is_none());
    // And again on the same replica: its memory is current now, one object changes.
    env.repo.write("app/a.yaml", &env.cm("a", "2"));
    let c4 = env.repo.commit("edit a");
    let r = env.push(&a, &c4).await.unwrap();
    assert_eq!(r.applied, [env.id("ConfigMap", "a")]);
    assert_eq!(env.cm_value("a").await.as_deref(), Some("2"));
    let st = state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    assert_eq!(st.revision.as_deref(), Some(c4.as_str()));
    assert_eq!(st.inventory.len(), 1);
    env.cleanup().await;
}

/// Two `driftless` processes syncing the same app: the second waits while the first holds
/// the app (here, waiting for its Deployment to become healthy) and applies only after it.
#[tokio::test]
async fn two_processes_never_apply_the_same_app_at_once() {
    let env = Env::new("github", "health_timeout = \"60s\"").await;
    env.repo.write(
        "app/web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx:1.27}]}\n",
    );
    env.repo.write("app/a.yaml", &env.cm("a", "first"));
    let c1 = env.repo.commit("first");
    env.repo.write("app/a.yaml", &env.cm("a", "second"));
    let c2 = env.repo.commit("second");
    let sync = |revision: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_driftless"))
            .args(["sync", "demo", "--revision", revision, "--config"])
            .arg(&env.config_file)
            .env(
                "KUBECONFIG",
                std::env::var(crate::support::cluster::KUBECONFIG_ENV).unwrap(),
            )
            .kill_on_drop(true)
            .output()
    };
    let first = tokio::spawn(sync(&c1));
    // The first process has applied and waits for the Deployment to become healthy.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.ns.client.clone(), &env.ns.name);
    let generation = loop {
        if let Some(d) = deployments.get_opt("web").await.unwrap() {
            break d.metadata.generation.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let second = tokio::spawn(sync(&c2));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!first.is_finished() && !second.is_finished());
    assert_eq!(
        env.cm_value("a").await.as_deref(),
        Some("first"),
        "the second process applied while the first held the app"
    );
    let status = json!({"status": {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1, "readyReplicas": 1}});
    deployments
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    for (name, p) in [("first", first), ("second", second)] {
        let out = tokio::time::timeout(Duration::from_secs(60), p)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{name} sync: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(env.cm_value("a").await.as_deref(), Some("second"));
    let st = state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    let revisions: Vec<_> = st
        .runs
        .iter()
        .map(|r| r.revision.clone().unwrap())
        .collect();
    assert_eq!(revisions, [c2, c1], "runs, newest first");
    env.cleanup().await;
}
