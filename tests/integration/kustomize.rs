//! Kustomize apps against the real control plane, real Kustomize (kubectl's bundled v5) and the
//! forge simulator over a real git repository: two overlays on a shared base two directories
//! up, with every kind of input a real repository uses; exact change detection by the input
//! directories' SHAs; refusals that name the kustomization and the reference; generated names
//! and prune.

use std::collections::BTreeMap;

use driftless::manifest::{self, ObjectRef};
use driftless::reconcile::{Engine, Outcome, ReconcileError};
use driftless::simulator::RecordedStatus;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Api;
use serde_json::Value;

use crate::reconcile::{Env, REPO};

/// Two overlays of one base on `forge`, rendered with kubectl's Kustomize; short health waits.
fn apps_on(forge: &str) -> String {
    let app = |name: &str| {
        format!(
            "[[apps]]\nname = \"{name}\"\nforge = \"{forge}\"\nrepo = \"{REPO}\"\npath = \"envs/{name}\"\nhealth_timeout = \"20s\"\n"
        )
    };
    format!(
        "{}{}[render]\nkustomize_command = [\"kubectl\", \"kustomize\"]\n",
        app("prod"),
        app("staging")
    )
}

fn apps() -> String {
    apps_on("github")
}

const BASE: &str = "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- deployment.yaml
- service.yaml
configMapGenerator:
- name: web-config
  files:
  - app.conf
";

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: registry.local/web:1.0
        volumeMounts:
        - name: config
          mountPath: /etc/web
      volumes:
      - name: config
        configMap:
          name: web-config
";

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 8080
";

const COMPONENT: &str = "apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
patches:
- target:
    kind: Deployment
  patch: |-
    - op: add
      path: /spec/template/metadata/annotations
      value:
        probe: \"on\"
";

fn overlay(ns: &str, env: &str, tag: &str, extra: &str) -> String {
    format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: {ns}
namePrefix: {env}-
resources:
- ../../base/web
components:
- ../../components/probe
images:
- name: registry.local/web
  newTag: \"{tag}\"
configMapGenerator:
- name: extra
  literals:
  - tier={env}
{extra}"
    )
}

const PROD_PATCHES: &str = "patches:
- path: replicas.yaml
- path: service-port.yaml
  target:
    kind: Service
    name: web
";

/// Writes the base, the component and both overlays (prod with a strategic-merge and a JSON
/// 6902 patch) and commits.
fn write_repo(env: &Env) -> String {
    let ns = &env.ns.name;
    let r = &env.repo;
    r.commit("an empty start, so every commit has a parent");
    r.write("base/web/kustomization.yaml", BASE);
    r.write("base/web/deployment.yaml", DEPLOYMENT);
    r.write("base/web/service.yaml", SERVICE);
    r.write("base/web/app.conf", "color = blue\n");
    r.write("components/probe/kustomization.yaml", COMPONENT);
    r.write(
        "envs/prod/kustomization.yaml",
        &overlay(ns, "prod", "2.0", PROD_PATCHES),
    );
    r.write(
        "envs/prod/replicas.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 3\n",
    );
    r.write(
        "envs/prod/service-port.yaml",
        "- op: replace\n  path: /spec/ports/0/port\n  value: 8080\n",
    );
    r.write(
        "envs/staging/kustomization.yaml",
        &overlay(ns, "staging", "1.5", ""),
    );
    r.write("docs/README.md", "How we deploy.\n");
    r.commit("two overlays of one base")
}

/// Runs the job of a push of `revision` to `app`, from the commit before it (as a webhook's
/// `before` says).
async fn push(
    env: &Env,
    engine: &Engine,
    app: &str,
    revision: &str,
) -> Result<driftless::reconcile::RunReport, ReconcileError> {
    let before = env.repo.git(&["rev-parse", &format!("{revision}~1")]);
    let job = driftless::queue::Job::new(
        app,
        Some(revision.to_string()),
        driftless::queue::JobReason::Push {
            delivery: None,
            before,
        },
    );
    engine
        .run(&job, driftless::reconcile::RunOptions::default())
        .await
}

/// `kubectl kustomize` of the overlay in the repository's working tree: what a user gets
/// from a checkout.
fn kustomize_build(env: &Env, overlay: &str) -> Vec<manifest::Object> {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(env.repo.path().join(overlay))
        .output()
        .expect("kubectl must be installed: the Kustomize tests render with `kubectl kustomize`");
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    manifest::parse_files([(overlay, out.stdout.as_slice())]).unwrap()
}

async fn live(env: &Env, id: &ObjectRef) -> Option<Value> {
    let (group, version) = id.group_version();
    let gvk = GroupVersionKind::gvk(group, version, &id.kind);
    let api: Api<DynamicObject> = Api::namespaced_with(
        env.ns.client.clone(),
        id.namespace.as_deref().unwrap_or(&env.ns.name),
        &ApiResource::from_gvk(&gvk),
    );
    api.get_opt(&id.name)
        .await
        .unwrap()
        .map(|o| serde_json::to_value(o).unwrap())
}

/// Every field of `want` is in `got` with the same value (the server adds defaults).
fn assert_subset(want: &Value, got: &Value, at: &str) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                let g = g
                    .get(k)
                    .unwrap_or_else(|| panic!("{at}/{k}: missing in the cluster"));
                assert_subset(v, g, &format!("{at}/{k}"));
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            assert_eq!(w.len(), g.len(), "{at}: list lengths differ");
            for (i, (w, g)) in w.iter().zip(g).enumerate() {
                assert_subset(w, g, &format!("{at}/{i}"));
            }
        }
        _ => assert_eq!(want, got, "{at}"),
    }
}

/// The app's objects in the namespace, by the app label.
async fn labelled(env: &Env, app: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (group, version, kind) in [
        ("", "v1", "ConfigMap"),
        ("", "v1", "Service"),
        ("apps", "v1", "Deployment"),
    ] {
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let api: Api<DynamicObject> = Api::namespaced_with(
            env.ns.client.clone(),
            &env.ns.name,
            &ApiResource::from_gvk(&gvk),
        );
        let lp = ListParams::default().labels(&format!("driftless.dev/app={app}"));
        for o in api.list(&lp).await.unwrap() {
            out.insert(
                format!("{kind}/{}", o.metadata.name.unwrap()),
                kind.to_string(),
            );
        }
    }
    out
}

fn success(statuses: &[RecordedStatus], app: &str) -> bool {
    statuses
        .iter()
        .any(|s| s.context == format!("driftless/{app}") && s.state == "success")
}

fn deployments(env: &Env) -> Api<Deployment> {
    Api::namespaced(env.ns.client.clone(), &env.ns.name)
}

#[tokio::test]
async fn an_overlay_applies_exactly_what_kustomize_builds() {
    overlay_applies_exactly_what_kustomize_builds("github").await;
}

#[tokio::test]
async fn an_overlay_applies_exactly_what_kustomize_builds_on_gitlab() {
    overlay_applies_exactly_what_kustomize_builds("gitlab").await;
}

async fn overlay_applies_exactly_what_kustomize_builds(forge: &str) {
    let env = Env::with_apps(&apps_on(forge)).await;
    let _controller = driftless::story::play_deployment_controller(deployments(&env));
    let engine = env.engine();
    let c1 = write_repo(&env);

    let r = push(&env, &engine, "prod", &c1).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    let built = kustomize_build(&env, "envs/prod");
    // Deployment, Service, two generated ConfigMaps.
    assert_eq!(built.len(), 4, "{built:?}");
    assert_eq!(r.objects, built.len());
    let mut names = BTreeMap::new();
    for obj in &built {
        let got = live(&env, &obj.id)
            .await
            .unwrap_or_else(|| panic!("{} was not applied", obj.id));
        assert_subset(&obj.body, &got, &obj.id.to_string());
        names.insert(
            format!("{}/{}", obj.id.kind, obj.id.name),
            obj.id.kind.clone(),
        );
    }
    // Object for object: nothing else carries the app's label.
    assert_eq!(labelled(&env, "prod").await, names);
    // What the overlay asked for reached the cluster.
    let web = deployments(&env).get("prod-web").await.unwrap();
    let spec = web.spec.unwrap();
    assert_eq!(spec.replicas, Some(3), "strategic-merge patch");
    let pod = spec.template.spec.unwrap();
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.local/web:2.0")
    );
    let config = pod.volumes.unwrap()[0].config_map.clone().unwrap().name;
    assert!(
        config.starts_with("prod-web-config-"),
        "generated name with hash: {config}"
    );
    assert_eq!(
        spec.template.metadata.unwrap().annotations.unwrap()["probe"],
        "on",
        "component"
    );
    let svc = live(
        &env,
        &ObjectRef {
            api_version: "v1".into(),
            kind: "Service".into(),
            namespace: Some(env.ns.name.clone()),
            name: "prod-web".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080, "JSON 6902 patch");
    assert!(success(&env.sim.statuses(REPO, &c1), "prod"));

    // `driftless render` prints the same objects.
    let printed = driftless::cli::render(&env.settings, "prod", Some(c1.clone()))
        .await
        .unwrap();
    let printed = manifest::parse_files([("render", printed.as_bytes())]).unwrap();
    let ids = |objs: &[manifest::Object]| {
        let mut v: Vec<String> = objs.iter().map(|o| o.id.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&printed), ids(&built));
    env.cleanup().await;
}

#[tokio::test]
async fn a_base_change_reconciles_both_overlays_and_an_unrelated_change_neither() {
    let env = Env::with_apps(&apps()).await;
    let _controller = driftless::story::play_deployment_controller(deployments(&env));
    let engine = env.engine();
    let c1 = write_repo(&env);
    for app in ["prod", "staging"] {
        let r = push(&env, &engine, app, &c1).await.unwrap();
        assert_eq!(r.outcome, Outcome::Applied, "{app}");
    }
    let builds = engine.renderer().builds();
    let old_config = |app: &str| format!("{app}-web-config-");
    let config_of = |d: Deployment| {
        d.spec.unwrap().template.spec.unwrap().volumes.unwrap()[0]
            .config_map
            .clone()
            .unwrap()
            .name
    };
    let prod_config = config_of(deployments(&env).get("prod-web").await.unwrap());
    let staging_config = config_of(deployments(&env).get("staging-web").await.unwrap());

    // A change outside every input: nothing fetched beyond the tree, nothing rendered.
    env.repo
        .write("docs/README.md", "How we deploy, now with pictures.\n");
    let c2 = env.repo.commit("docs only");
    env.sim.clear_requests();
    for app in ["prod", "staging"] {
        let r = push(&env, &engine, app, &c2).await.unwrap();
        assert_eq!(r.outcome, Outcome::Unchanged, "{app}");
    }
    assert_eq!(
        engine.renderer().builds(),
        builds,
        "a docs change rendered something"
    );
    let requests: Vec<String> = env
        .sim
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.route))
        .collect();
    assert!(
        requests.iter().all(|r| r.contains("/git/trees/")),
        "only the commit's tree may be read: {requests:?}"
    );
    assert!(env.sim.statuses(REPO, &c2).is_empty());

    // A change in the base: both overlays render and apply, each with its status; the
    // generated ConfigMap gets a new name, the Deployments move to it, the old ones go.
    env.repo.write("base/web/app.conf", "color = green\n");
    let c3 = env.repo.commit("base: green");
    for app in ["prod", "staging"] {
        let r = push(&env, &engine, app, &c3).await.unwrap();
        assert_eq!(r.outcome, Outcome::Applied, "{app}");
        let pruned: Vec<&str> = r.pruned.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(pruned.len(), 1, "{app}: {pruned:?}");
        assert!(pruned[0].starts_with(&old_config(app)), "{app}: {pruned:?}");
    }
    let statuses = env.sim.statuses(REPO, &c3);
    assert!(
        success(&statuses, "prod") && success(&statuses, "staging"),
        "{statuses:?}"
    );
    assert_eq!(engine.renderer().builds(), builds + 2);
    for (app, old) in [("prod", &prod_config), ("staging", &staging_config)] {
        let now = config_of(deployments(&env).get(&format!("{app}-web")).await.unwrap());
        assert_ne!(
            &now, old,
            "{app}: the Deployment still references the old ConfigMap"
        );
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = env.configmaps();
        assert_eq!(
            cms.get(&now).await.unwrap().data.unwrap()["app.conf"],
            "color = green\n"
        );
        assert!(
            cms.get_opt(old).await.unwrap().is_none(),
            "{old} was not pruned"
        );
    }

    // A drift check of an unchanged app renders nothing new (the render is cached by its
    // inputs' SHAs).
    let report = engine.check_drift("prod", false).await.unwrap();
    assert!(report.drifted.is_empty(), "{}", report.summary());
    assert_eq!(engine.renderer().builds(), builds + 2);
    env.cleanup().await;
}

#[tokio::test]
async fn a_bad_kustomization_fails_naming_the_file_and_changes_nothing() {
    let env = Env::with_apps(&apps()).await;
    let _controller = driftless::story::play_deployment_controller(deployments(&env));
    let engine = env.engine();
    let c1 = write_repo(&env);
    push(&env, &engine, "prod", &c1).await.unwrap();
    let before = labelled(&env, "prod").await;
    let ns = env.ns.name.clone();
    let good = overlay(&ns, "prod", "2.0", PROD_PATCHES);
    let with_resource =
        |r: &str| good.replace("- ../../base/web\n", &format!("- ../../base/web\n- {r}\n"));
    let cases = [
        (
            with_resource("github.com/acme/other//base?ref=v1"),
            "envs/prod/kustomization.yaml: resources \"github.com/acme/other//base?ref=v1\" is a remote base",
        ),
        (
            with_resource("https://example.com/base.yaml"),
            "envs/prod/kustomization.yaml: resources \"https://example.com/base.yaml\" is a remote base",
        ),
        (
            with_resource("../../../outside"),
            "envs/prod/kustomization.yaml: resources \"../../../outside\" points outside the repository",
        ),
        (
            with_resource("/etc/passwd"),
            "envs/prod/kustomization.yaml: resources \"/etc/passwd\" is an absolute path",
        ),
        (
            with_resource("missing.yaml"),
            "envs/prod/kustomization.yaml: resources \"missing.yaml\" is not in the commit",
        ),
        (
            with_resource("../../base/nothing-here"),
            "envs/prod/kustomization.yaml: resources \"../../base/nothing-here\" is not a directory of this commit",
        ),
        (
            format!("{good}helmCharts:\n- name: web\n  repo: https://charts.example.com\n"),
            "envs/prod/kustomization.yaml: helmCharts: Helm charts are not supported",
        ),
        (
            format!("{good}- not: [valid\n"),
            "envs/prod/kustomization.yaml: document 1, line",
        ),
        // Kustomize's own error, quoted, with repository paths.
        (
            good.replace("path: replicas.yaml", "path: no-such-patch.yaml"),
            "kustomize build envs/prod: ",
        ),
    ];
    for (text, want) in cases {
        env.repo.write("envs/prod/kustomization.yaml", &text);
        let c = env.repo.commit("a bad kustomization");
        let err = push(&env, &engine, "prod", &c)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "want {want:?} in: {err}");
        if want.starts_with("kustomize build") {
            assert!(err.contains("no-such-patch.yaml"), "{err}");
            assert!(!err.contains("/tmp/"), "temporary paths leak: {err}");
        }
        let statuses = env.sim.statuses(REPO, &c);
        let failure = statuses
            .iter()
            .find(|s| s.context == "driftless/prod" && s.state == "failure")
            .unwrap_or_else(|| panic!("no failure status: {statuses:?}"));
        let description = failure.description.clone().unwrap_or_default();
        assert!(description.chars().count() <= 140);
        assert!(
            description.contains("envs/prod"),
            "the status names the kustomization: {description}"
        );
        assert_eq!(
            labelled(&env, "prod").await,
            before,
            "something was applied or pruned"
        );
    }
    env.cleanup().await;
}

/// A pull request that changes only the shared base previews both overlays (their inputs
/// reach it), a docs-only one neither. The recorded inputs come from the states'
/// annotations in one metadata-only LIST; a state an older driftless wrote (no annotation)
/// is read whole, and only that one.
#[tokio::test]
async fn a_request_changing_only_the_base_previews_both_overlays() {
    use driftless::preview::{Previewer, Steps};
    use driftless::settings::ForgeKind;
    use driftless::webhook::{PullRequestAction, PullRequestEvent};
    use std::sync::Arc;

    let env = Env::with_apps(&apps()).await;
    let _controller = driftless::story::play_deployment_controller(deployments(&env));
    let c1 = write_repo(&env);
    let engine = env.engine();
    for app in ["prod", "staging"] {
        let r = push(&env, &engine, app, &c1).await.unwrap();
        assert_eq!(r.outcome, Outcome::Applied, "{app}");
    }
    engine.settle().await;
    // staging's state as an older driftless left it: no inputs annotation.
    let states: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    let unannotate = serde_json::json!({"metadata": {"annotations": {
        driftless::reconcile::state::ANNOTATION_INPUTS: null}}});
    states
        .patch(
            "driftless-app-staging",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&unannotate),
        )
        .await
        .unwrap();

    let request = |branch: &str, file: &str, text: &str| {
        env.repo.git(&["checkout", "-q", "-b", branch]);
        env.repo.write(file, text);
        let head = env.repo.commit(branch);
        env.repo.git(&["checkout", "-q", "main"]);
        PullRequestEvent {
            forge: ForgeKind::Github,
            repo: REPO.into(),
            number: 1,
            action: PullRequestAction::Updated,
            base_branch: "main".into(),
            head_sha: head,
            from_fork: false,
        }
    };
    let base_change = request("base-green", "base/web/app.conf", "color = green\n");
    let docs_change = request("docs", "docs/README.md", "Pictures.\n");

    let (client, calls) = crate::support::api_calls::counting_client().await;
    let forges = driftless::forge::from_settings(&env.settings).unwrap();
    let settings = Arc::new(env.settings.clone());
    let engine = Arc::new(Engine::new(client, forges.clone(), settings.clone()));
    let previewer = Previewer::new(engine, forges.clone(), settings, Default::default());
    let github = forges.get(ForgeKind::Github).unwrap().as_ref();

    let p = previewer
        .preview(github, &base_change, &mut Steps::default())
        .await
        .unwrap();
    let previewed: Vec<&str> = p.apps.iter().map(|a| a.app.as_str()).collect();
    assert_eq!(previewed, ["prod", "staging"]);
    let mut state_reads: BTreeMap<String, usize> = BTreeMap::new();
    let prefix = format!("GET /api/v1/namespaces/{}/configmaps/", env.state_ns.name);
    for call in calls.take() {
        if let Some(name) = call.strip_prefix(&prefix) {
            *state_reads.entry(name.to_string()).or_default() += 1;
        }
    }
    // Each previewed app's dry-run reads its state (the hashes it applied); finding the
    // affected apps reads only the unannotated one.
    assert_eq!(
        state_reads,
        BTreeMap::from([
            ("driftless-app-prod".to_string(), 1),
            ("driftless-app-staging".to_string(), 2)
        ]),
        "only the unannotated state is read to find the affected apps"
    );

    let p = previewer
        .preview(github, &docs_change, &mut Steps::default())
        .await
        .unwrap();
    assert!(p.apps.is_empty(), "{:?}", p.apps);
    env.cleanup().await;
}
