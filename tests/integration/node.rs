//! Rollouts of real pods on the node cluster (tests/cluster/up.sh --with-node): the Deployment
//! controller, the scheduler and the kubelet are real, the images come from the local
//! registry. A push succeeds only once its pods are Ready; a readiness probe that never passes
//! fails the run once the app's `health_timeout` is over, naming the Deployment. (The bad
//! image → progress deadline → revert story runs in the acceptance test on the same cluster.)

use driftless::reconcile::{Outcome, ReconcileError};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::Api;

use crate::reconcile::Env;
use crate::support::cluster::{self, Cluster};

/// A Deployment of two busybox web servers from the local registry, Ready when `GET /` on
/// `probe_port` answers. httpd as PID 1 ignores SIGTERM: a short grace period keeps the
/// namespace's deletion quick.
fn web(probe_port: u16) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  \
         selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    \
         spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: web\n        \
         image: {}/busybox-httpd:1\n        \
         readinessProbe: {{httpGet: {{path: /, port: {probe_port}}}, periodSeconds: 1}}\n",
        cluster::registry()
    )
}

async fn pods(env: &Env) -> Vec<Pod> {
    Api::<Pod>::namespaced(env.ns.client.clone(), &env.ns.name)
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

#[tokio::test]
async fn a_push_succeeds_once_its_pods_are_ready_on_the_node() {
    let env = Env::new_in(Cluster::WithNode, "github", "health_timeout = \"90s\"").await;
    let engine = env.engine();
    env.repo.write("app/web.yaml", &web(80));
    let sha = env.repo.commit("two web servers");
    let report = env.push(&engine, &sha).await.unwrap();
    assert_eq!(report.outcome, Outcome::Applied);
    // Read right after the verdict: the pods were Ready when driftless said success.
    let deployment = Api::<Deployment>::namespaced(env.ns.client.clone(), &env.ns.name)
        .get("web")
        .await
        .unwrap();
    let status = deployment.status.unwrap();
    assert_eq!(status.ready_replicas, Some(2), "{status:?}");
    let pods = pods(&env).await;
    assert_eq!(pods.iter().filter(|p| is_ready(p)).count(), 2, "{pods:?}");
    let last = env.sim.statuses("acme/deploy", &sha).pop().unwrap();
    assert_eq!(last.state, "success", "{last:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_readiness_probe_that_never_passes_fails_after_health_timeout() {
    let env = Env::new_in(Cluster::WithNode, "github", "health_timeout = \"20s\"").await;
    let engine = env.engine();
    // Nothing listens on port 81: the containers run, the probe never passes.
    env.repo.write("app/web.yaml", &web(81));
    let sha = env.repo.commit("a probe on the wrong port");
    let err = env.push(&engine, &sha).await.unwrap_err();
    let ReconcileError::Unhealthy { object, reason } = &err else {
        panic!("expected the Deployment to be reported unhealthy, got {err:?}");
    };
    assert_eq!(object, &format!("apps/v1 Deployment {}/web", env.ns.name));
    assert!(
        reason.contains("available") && reason.ends_with("(after 20s)"),
        "{reason}"
    );
    let last = env.sim.statuses("acme/deploy", &sha).pop().unwrap();
    assert_eq!(last.state, "failure", "{last:?}");
    let description = last.description.unwrap_or_default();
    assert!(
        description.contains("Deployment") && description.contains("web"),
        "{description}"
    );
    // The pods really ran; only the probe kept them from being Ready.
    let pods = pods(&env).await;
    assert!(pods.iter().any(is_running), "{pods:?}");
    assert!(!pods.iter().any(is_ready), "{pods:?}");
    env.cleanup().await;
}
