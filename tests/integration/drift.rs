//! Drift between pushes, against the real control plane: hand edits (scale, image, label,
//! delete) are found and healed under `heal`, reported and left under `alert`; a freshly
//! applied app (workloads, Services, ConfigMaps, RBAC, a CRD and its instance) shows no false
//! drift; ignore rules hold; a push whose webhook never came is
//! applied by the next tick; `drift --once` exit codes.

use driftless::metrics::Metrics;
use driftless::reconcile::Outcome;
use driftless::worker::drift_tick;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::reconcile::Env;

const APP: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {tier: frontend}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports: [{containerPort: 80}]
        resources: {requests: {cpu: 100m, memory: 64Mi}}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  labels: {tier: frontend}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 80}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {greeting: hello}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reader}
rules:
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: web-reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}
subjects:
- {kind: ServiceAccount, name: web}
"#;

/// An edit as `kubectl` makes it: a merge patch by another field manager.
fn kubectl() -> PatchParams {
    PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    }
}

/// A CRD of a group unique to the test and one instance of it.
fn custom_resource(group: &str) -> String {
    format!(
        r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.{group}
spec:
  group: {group}
  scope: Namespaced
  names: {{plural: gadgets, singular: gadget, kind: Gadget}}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {{type: integer, default: 1}}
              colour: {{type: string}}
---
apiVersion: {group}/v1
kind: Gadget
metadata:
  name: g
spec:
  colour: blue
"#
    )
}

fn crd_group(env: &Env) -> String {
    format!("{}.example.com", env.ns.name)
}

async fn remove_crd(env: &Env) {
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(env.ns.client.clone());
    let _ = crds
        .delete(
            &format!("gadgets.{}", crd_group(env)),
            &DeleteParams::default(),
        )
        .await;
}

/// `driftless drift --once` as a CronJob runs it, against the test control plane.
async fn drift_once(env: &Env) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["drift", "--once", "--config"])
        .arg(&env.config_file)
        .env(
            "KUBECONFIG",
            std::env::var(crate::support::cluster::KUBECONFIG_ENV).unwrap(),
        )
        .output()
        .await
        .unwrap()
}

async fn applied_env(app_extra: &str) -> (Env, driftless::story::PlayedController) {
    let env = Env::new("github", app_extra).await;
    // Plays the (disabled) Deployment controller for the app's namespace.
    let controller = driftless::story::play_deployment_controller(Api::namespaced(
        env.ns.client.clone(),
        &env.ns.name,
    ));
    env.repo.write("app/all.yaml", APP);
    env.repo
        .write("app/gadget.yaml", &custom_resource(&crd_group(&env)));
    let c1 = env.repo.commit("app");
    let r = env.push(&env.engine(), &c1).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    (env, controller)
}

#[tokio::test]
async fn hand_edits_are_found_and_healed() {
    let (env, controller) = applied_env("").await;
    let engine = env.engine();
    let metrics = Metrics::new();

    // No false drift across several checks of a freshly applied app.
    for _ in 0..3 {
        let r = engine.check_drift("demo", false).await.unwrap();
        assert_eq!(r.checked, 8);
        assert!(r.drifted.is_empty(), "false drift: {}", r.summary());
    }

    let deployments: Api<Deployment> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
    let services: Api<Service> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
    let configmaps: Api<ConfigMap> = env.configmaps();
    deployments
        .patch(
            "web",
            &kubectl(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    deployments
        .patch("web", &kubectl(), &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:hacked"}]}}}})))
        .await
        .unwrap();
    services
        .patch(
            "web",
            &kubectl(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "hacked"}}})),
        )
        .await
        .unwrap();
    configmaps
        .delete("settings", &DeleteParams::default())
        .await
        .unwrap();

    let r = engine.check_drift("demo", false).await.unwrap();
    let summary = r.summary();
    assert_eq!(r.drifted.len(), 3, "{summary}");
    let web = r
        .drifted
        .iter()
        .find(|d| d.id.kind == "Deployment")
        .unwrap();
    assert_eq!(
        web.fields,
        ["spec.replicas", "spec.template.spec.containers.0.image"],
        "{summary}"
    );
    let svc = r.drifted.iter().find(|d| d.id.kind == "Service").unwrap();
    assert_eq!(svc.fields, ["metadata.labels.tier"]);
    assert!(r
        .drifted
        .iter()
        .any(|d| d.id.kind == "ConfigMap" && d.missing));
    assert!(
        !summary.contains("hacked"),
        "values must not be reported: {summary}"
    );
    // One LIST per kind (8 kinds) plus a GET for the missing object, dry-runs for the two
    // suspects, events, and the state read and write: far fewer than one request per object.
    assert!(r.api_requests <= 18, "{} requests", r.api_requests);

    // The tick heals under drift = heal.
    let remains = drift_tick(&engine, &metrics, "demo").await.unwrap();
    assert!(!remains);
    let d = deployments.get("web").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    assert_eq!(
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("nginx:1.27")
    );
    assert_eq!(
        services.get("web").await.unwrap().metadata.labels.unwrap()["tier"],
        "frontend"
    );
    assert!(configmaps.get_opt("settings").await.unwrap().is_some());
    assert!(engine
        .check_drift("demo", false)
        .await
        .unwrap()
        .drifted
        .is_empty());
    let st = driftless::reconcile::state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    assert!(st.drift.unwrap().objects.is_empty());
    controller.abort();
    remove_crd(&env).await;
    env.cleanup().await;
}

#[tokio::test]
async fn alert_reports_and_leaves_the_cluster_alone() {
    let (env, controller) = applied_env("drift = \"alert\"").await;
    let engine = env.engine();
    let deployments: Api<Deployment> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
    deployments
        .patch(
            "web",
            &kubectl(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    let remains = drift_tick(&engine, &Metrics::new(), "demo").await.unwrap();
    assert!(remains);
    assert_eq!(
        deployments.get("web").await.unwrap().spec.unwrap().replicas,
        Some(5)
    );
    let st = driftless::reconcile::state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    let drift = st.drift.unwrap();
    assert!(!drift.healed);
    assert_eq!(drift.objects[0].fields, ["spec.replicas"]);

    // `drift --once` exits non-zero while drift remains under alert.
    let out = drift_once(&env).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("demo: drift remains"));
    controller.abort();
    remove_crd(&env).await;
    env.cleanup().await;
}

#[tokio::test]
async fn ignore_rules_and_missed_pushes() {
    let (env, controller) =
        applied_env("ignore = [{ kind = \"Deployment\", pointer = \"/spec/replicas\" }]").await;
    let engine = env.engine();
    let deployments: Api<Deployment> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
    // An autoscaler owns replicas: not drift.
    deployments
        .patch(
            "web",
            &kubectl(),
            &Patch::Merge(json!({"spec": {"replicas": 7}})),
        )
        .await
        .unwrap();
    assert!(engine
        .check_drift("demo", false)
        .await
        .unwrap()
        .drifted
        .is_empty());

    // A commit whose webhook never arrived is applied by the next tick.
    env.repo.write("app/extra.yaml", &env.cm("extra", "late"));
    env.repo.commit("pushed while the webhook was lost");
    let remains = drift_tick(&engine, &Metrics::new(), "demo").await.unwrap();
    assert!(!remains);
    assert_eq!(env.cm_value("extra").await.as_deref(), Some("late"));

    // `drift --once` exits 0 when everything is in sync.
    let out = drift_once(&env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    controller.abort();
    remove_crd(&env).await;
    env.cleanup().await;
}
