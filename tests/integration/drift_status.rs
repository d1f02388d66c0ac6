//! `drift.report_status`: drift found on an app turns the applied commit's status
//! (`driftless/<app>`) to `failure` while it remains and back to `success` once the cluster
//! matches again, posted once per change of the finding, never on every tick; healed drift
//! and the setting left off post nothing. Against the control plane and the forge simulator.

use driftless::metrics::Metrics;
use driftless::reconcile::Outcome;
use driftless::worker::drift_tick;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::reconcile::Env;

const REPO: &str = "acme/deploy";

/// The app's settings: a drift policy, and `[drift] report_status` when `report`.
fn settings(policy: &str, report: bool) -> String {
    // health_timeout is the app's; the [drift] table must come after it.
    let mut extra = format!("drift = \"{policy}\"\nhealth_timeout = \"20s\"\n");
    if report {
        extra.push_str("[drift]\nreport_status = true\n");
    }
    extra
}

/// An app of one ConfigMap `a`, applied at a commit returned.
async fn apply_one_configmap(env: &Env) -> String {
    env.repo.write("app/a.yaml", &env.cm("a", "from git"));
    let c1 = env.repo.commit("a");
    let report = env.push(&env.engine(), &c1).await.unwrap();
    assert_eq!(report.outcome, Outcome::Applied);
    c1
}

/// Sets `a`'s value by hand, as `kubectl edit` would.
async fn edit(env: &Env, value: &str) {
    let params = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(env.ns.client.clone(), &env.ns.name)
        .patch(
            "a",
            &params,
            &Patch::Merge(&json!({"data": {"value": value}})),
        )
        .await
        .unwrap();
}

/// The statuses of `sha`, as `state: description`.
fn statuses(env: &Env, sha: &str) -> Vec<String> {
    env.sim
        .statuses(REPO, sha)
        .into_iter()
        .map(|s| {
            assert_eq!(s.context, "driftless/demo");
            format!("{}: {}", s.state, s.description.unwrap_or_default())
        })
        .collect()
}

#[tokio::test]
async fn drift_turns_the_applied_commit_red_while_it_remains() {
    let env = Env::new("github", &settings("alert", true)).await;
    let c1 = apply_one_configmap(&env).await;
    let applied = statuses(&env, &c1);
    assert_eq!(applied.len(), 2, "{applied:?}");
    let engine = env.engine();
    let metrics = Metrics::new();

    // In sync: nothing to say.
    assert!(!drift_tick(&engine, &metrics, "demo").await.unwrap());
    assert_eq!(statuses(&env, &c1), applied);

    // Drift found and left (alert): the applied commit turns red, naming object and field.
    edit(&env, "by hand").await;
    assert!(drift_tick(&engine, &metrics, "demo").await.unwrap());
    let red = format!(
        "failure: Drifted: 1 objects (v1 ConfigMap {}/a: data.value)",
        env.ns.name
    );
    assert_eq!(
        statuses(&env, &c1),
        [&applied[..], std::slice::from_ref(&red)].concat()
    );
    // The same drift at the next ticks: not posted again.
    assert!(drift_tick(&engine, &metrics, "demo").await.unwrap());
    assert!(drift_tick(&engine, &metrics, "demo").await.unwrap());
    assert_eq!(statuses(&env, &c1).len(), 3);

    // Another hand edit of the same field: the same finding, so nothing new.
    edit(&env, "by hand again").await;
    assert!(drift_tick(&engine, &metrics, "demo").await.unwrap());
    assert_eq!(statuses(&env, &c1).len(), 3);

    // Put back by hand: green again, once.
    edit(&env, "from git").await;
    assert!(!drift_tick(&engine, &metrics, "demo").await.unwrap());
    let green = format!("success: In sync again with {}", &c1[..12]);
    assert_eq!(statuses(&env, &c1), [&applied[..], &[red, green]].concat());
    assert!(!drift_tick(&engine, &metrics, "demo").await.unwrap());
    assert_eq!(statuses(&env, &c1).len(), 4);
    env.cleanup().await;
}

#[tokio::test]
async fn healed_drift_and_the_setting_left_off_post_nothing() {
    // Healed: no drift remains, so the commit stays green.
    let env = Env::new("github", &settings("heal", true)).await;
    let c1 = apply_one_configmap(&env).await;
    let applied = statuses(&env, &c1);
    let engine = env.engine();
    let metrics = Metrics::new();
    edit(&env, "by hand").await;
    assert!(!drift_tick(&engine, &metrics, "demo").await.unwrap());
    assert_eq!(env.cm_value("a").await.as_deref(), Some("from git"));
    assert_eq!(statuses(&env, &c1), applied);
    env.cleanup().await;

    // report_status = false (the default): drift is recorded, no status posted.
    let env = Env::new("github", &settings("alert", false)).await;
    let c1 = apply_one_configmap(&env).await;
    let applied = statuses(&env, &c1);
    let engine = env.engine();
    edit(&env, "by hand").await;
    assert!(drift_tick(&engine, &metrics, "demo").await.unwrap());
    assert_eq!(statuses(&env, &c1), applied);
    env.cleanup().await;
}
