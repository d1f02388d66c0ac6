//! Ordering, heals and statuses against the real control plane and the forge simulator: a
//! heal takes the Lease and re-reads the state before writing (never re-applying an older
//! revision over a newer apply) and honours `force_conflicts = false`; a red branch head keeps
//! drift checks running and is reported once; a force push is applied (with or without its
//! webhook) while late deliveries never roll back; the `git revert` of a refused commit turns
//! green.

use std::time::Duration;

use driftless::metrics::Metrics;
use driftless::queue::{Job, JobReason};
use driftless::reconcile::{lease, state, Engine, Outcome, ReconcileError, RunOptions, RunReport};
use driftless::worker::drift_tick;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::reconcile::Env;

const REPO: &str = "acme/deploy";

/// A push delivery as the webhook queues it: the revision and the one the branch was at.
async fn push_from(
    engine: &Engine,
    before: &str,
    after: &str,
) -> Result<RunReport, ReconcileError> {
    let job = Job::new(
        "demo",
        Some(after.to_string()),
        JobReason::Push {
            delivery: None,
            before: before.to_string(),
        },
    );
    engine.run(&job, RunOptions::default()).await
}

/// The states posted on `sha`, oldest first.
fn states(env: &Env, sha: &str) -> Vec<String> {
    env.sim
        .statuses(REPO, sha)
        .into_iter()
        .map(|s| s.state)
        .collect()
}

/// A hand edit as `kubectl edit` makes it: a merge patch by another field manager.
async fn edit_by_hand(env: &Env, name: &str, value: &str) {
    let kubectl = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    env.configmaps()
        .patch(
            name,
            &kubectl,
            &Patch::Merge(json!({"data": {"value": value}})),
        )
        .await
        .unwrap();
}

/// A ConfigMap the API server refuses (`data` values must be strings): a commit carrying it
/// fails without writing anything.
fn refused_cm(name: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: 5\n")
}

/// The engine's state of the app, read from the cluster.
async fn app_state(env: &Env) -> state::AppState {
    state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap()
}

/// Plays another replica applying `revision` while it holds the app's Lease: writes the
/// ConfigMap `a` as driftless writes it and records `revision` as applied.
async fn play_replica_applying(env: &Env, revision: &str, value: &str) {
    let body = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "a", "namespace": env.ns.name, "labels": {
            "app.kubernetes.io/managed-by": "driftless", "driftless.dev/app": "demo"}},
        "data": {"value": value},
    });
    let mut pp = PatchParams::apply(driftless::reconcile::FIELD_MANAGER);
    pp.force = true;
    env.configmaps()
        .patch("a", &pp, &Patch::Apply(&body))
        .await
        .unwrap();
    let mut st = app_state(env).await;
    st.revision = Some(revision.to_string());
    st.tree_sha = None;
    state::save(&env.ns.client, &env.state_ns.name, "demo", &mut st)
        .await
        .unwrap();
}

/// A heal compares without the Lease (a sweep of apps in sync costs no writes), but writes only
/// under it, after reading the state again: a newer revision applied meanwhile by another
/// replica is what it then checks against, never the older one it first compared with.
#[tokio::test]
async fn a_heal_never_reapplies_an_older_revision_over_a_newer_apply() {
    let env = Env::new("github", "").await;
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    let r1 = env.repo.commit("v1");
    env.push(&env.engine(), &r1).await.unwrap();
    edit_by_hand(&env, "a", "hacked").await;
    env.repo.write("app/a.yaml", &env.cm("a", "v2"));
    let r2 = env.repo.commit("v2");

    // Another replica holds the app while the healer finds the drift against r1.
    let other = lease::Leases::new(
        &env.ns.client,
        &env.state_ns.name,
        "other-replica",
        lease::LeaseTiming::default(),
    )
    .acquire("demo")
    .await
    .unwrap();
    // Without the manifests kept beside the state, the check reads r1 from the forge: the
    // moment to apply r2 behind its back.
    let states: Api<ConfigMap> = Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    states
        .patch(
            "driftless-app-demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"binaryData": {"desired.gz": null}})),
        )
        .await
        .unwrap();
    env.sim.clear_requests();
    let healer = env.engine();
    let heal = tokio::spawn(async move { healer.check_drift("demo", true).await });
    // The healer has read the state (r1 applied) once it asks the forge for r1's files.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !env.sim.requests().iter().any(|r| r.path.contains(&r1)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the drift check never fetched r1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Meanwhile the other replica applies r2, then hands the app back.
    play_replica_applying(&env, &r2, "v2").await;
    other.release().await;

    let report = tokio::time::timeout(Duration::from_secs(90), heal)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        env.cm_value("a").await.as_deref(),
        Some("v2"),
        "the heal re-applied r1 over r2"
    );
    assert_eq!(report.revision.as_deref(), Some(r2.as_str()));
    assert!(report.drifted.is_empty(), "{}", report.summary());
    env.cleanup().await;
}

/// With `force_conflicts = false` a heal of a field another manager owns reports the conflict
/// (in the report, the tick's result and the state) and leaves the field alone.
#[tokio::test]
async fn a_heal_honours_force_conflicts_false() {
    let env = Env::new("github", "force_conflicts = false").await;
    let engine = env.engine();
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    env.repo.write("app/b.yaml", &env.cm("b", "v1"));
    let r1 = env.repo.commit("v1");
    env.push(&engine, &r1).await.unwrap();
    edit_by_hand(&env, "a", "hacked").await;
    env.configmaps()
        .delete("b", &Default::default())
        .await
        .unwrap();

    let report = engine.check_drift("demo", true).await.unwrap();
    assert_eq!(report.drifted.len(), 2, "{}", report.summary());
    assert!(!report.healed, "{}", report.summary());
    assert_eq!(
        env.cm_value("a").await.as_deref(),
        Some("hacked"),
        "the heal took a field another manager owns"
    );
    let why = report.heal_error.clone().unwrap_or_default();
    assert!(
        why.starts_with(&format!("v1 ConfigMap {}/a: not healed: ", env.ns.name))
            && why.contains("conflict")
            && why.contains("kubectl-edit"),
        "{why}"
    );
    // What did not conflict is healed.
    assert_eq!(env.cm_value("b").await.as_deref(), Some("v1"));
    let drift = app_state(&env).await.drift.unwrap();
    assert!(!drift.healed);
    // The tick says so too, every time, and still leaves the field alone.
    let e = drift_tick(&engine, &Metrics::new(), "demo")
        .await
        .unwrap_err();
    assert!(e.contains("conflict"), "{e}");
    assert_eq!(env.cm_value("a").await.as_deref(), Some("hacked"));
    env.cleanup().await;
}

/// A branch head that fails leaves the applied revision where it was: drift against that
/// revision is still healed on every tick, and the head's failure is posted once, whether its
/// webhook came or not.
#[tokio::test]
async fn a_red_head_keeps_drift_checks_on_and_fails_once() {
    let env = Env::new("github", "").await;
    let engine = env.engine();
    let metrics = Metrics::new();
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    let r1 = env.repo.commit("v1");
    env.push(&engine, &r1).await.unwrap();
    env.repo.write("app/b.yaml", &refused_cm("b"));
    let red = env.repo.commit("refused");
    push_from(&engine, &r1, &red).await.unwrap_err();
    assert_eq!(states(&env, &red), ["pending", "failure"]);

    for _ in 0..2 {
        edit_by_hand(&env, "a", "hacked").await;
        let remains = drift_tick(&engine, &metrics, "demo").await.unwrap();
        assert!(!remains);
        assert_eq!(env.cm_value("a").await.as_deref(), Some("v1"));
    }
    assert_eq!(states(&env, &red), ["pending", "failure"]);

    // A red head whose webhook was lost: the first tick tries it and says so, the drift
    // check still runs; later ticks do not try it again.
    env.repo.write("app/c.yaml", &refused_cm("c"));
    let lost = env.repo.commit("refused, webhook lost");
    edit_by_hand(&env, "a", "hacked").await;
    let e = drift_tick(&engine, &metrics, "demo").await.unwrap_err();
    assert!(e.contains("ConfigMap"), "{e}");
    assert_eq!(env.cm_value("a").await.as_deref(), Some("v1"));
    edit_by_hand(&env, "a", "hacked").await;
    assert!(!drift_tick(&engine, &metrics, "demo").await.unwrap());
    assert_eq!(env.cm_value("a").await.as_deref(), Some("v1"));
    assert_eq!(states(&env, &lost), ["pending", "failure"]);
    assert_eq!(app_state(&env).await.revision.as_deref(), Some(r1.as_str()));

    // A manual sync still retries it.
    let job = Job::new("demo", None, JobReason::Manual);
    engine.run(&job, RunOptions::default()).await.unwrap_err();
    assert_eq!(
        states(&env, &lost),
        ["pending", "failure", "pending", "failure"]
    );
    env.cleanup().await;
}

/// Three commits: `r1` and `r2` applied, then the branch is force-pushed to `r3`, a child of
/// `r1` (so `r2` is no longer on it).
async fn force_pushed(env: &Env, engine: &Engine) -> (String, String, String) {
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    let r1 = env.repo.commit("v1");
    push_from(engine, "", &r1).await.unwrap();
    env.repo.write("app/a.yaml", &env.cm("a", "v2"));
    let r2 = env.repo.commit("v2");
    push_from(engine, &r1, &r2).await.unwrap();
    env.repo.git(&["reset", "-q", "--hard", &r1]);
    env.repo.write("app/a.yaml", &env.cm("a", "v3"));
    let r3 = env.repo.commit("v3, force-pushed over v2");
    (r1, r2, r3)
}

/// The branch head is authoritative: a force push applies. Late deliveries never roll back,
/// neither of an ancestor of the applied revision nor of a commit the force push left behind.
async fn force_push_and_late_deliveries(forge: &str) {
    let env = Env::new(forge, "").await;
    let engine = env.engine();
    let (r1, r2, r3) = force_pushed(&env, &engine).await;
    let r = push_from(&engine, &r2, &r3).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    assert_eq!(env.cm_value("a").await.as_deref(), Some("v3"));

    // The old head's delivery arrives late: it is not on the branch any more.
    let r = push_from(&engine, &r1, &r2).await.unwrap();
    assert!(
        matches!(r.outcome, Outcome::Skipped(ref why) if why.contains("not on branch")),
        "{:?}",
        r.outcome
    );
    // And r1's: an ancestor of the applied r3.
    let r = push_from(&engine, "", &r1).await.unwrap();
    assert!(
        matches!(r.outcome, Outcome::Skipped(ref why) if why.contains("behind")),
        "{:?}",
        r.outcome
    );
    assert_eq!(env.cm_value("a").await.as_deref(), Some("v3"));
    assert_eq!(app_state(&env).await.revision.as_deref(), Some(r3.as_str()));
    env.cleanup().await;
}

#[tokio::test]
async fn a_force_push_applies_and_late_deliveries_do_not_roll_back_github() {
    force_push_and_late_deliveries("github").await;
}

#[tokio::test]
async fn a_force_push_applies_and_late_deliveries_do_not_roll_back_gitlab() {
    force_push_and_late_deliveries("gitlab").await;
}

/// A force push whose webhook was lost is applied by the next drift tick, including one to a
/// history with no common ancestor (the forges answer "no merge base" with a 404).
async fn force_push_with_lost_webhook(forge: &str) {
    let env = Env::new(forge, "").await;
    let engine = env.engine();
    let metrics = Metrics::new();
    let (_, _, r3) = force_pushed(&env, &engine).await;
    assert!(!drift_tick(&engine, &metrics, "demo").await.unwrap());
    assert_eq!(env.cm_value("a").await.as_deref(), Some("v3"));
    assert_eq!(app_state(&env).await.revision.as_deref(), Some(r3.as_str()));

    env.repo.git(&["checkout", "-q", "--orphan", "rewritten"]);
    env.repo.write("app/a.yaml", &env.cm("a", "v4"));
    let r4 = env.repo.commit("a new history");
    env.repo.git(&["branch", "-q", "-f", "main", "rewritten"]);
    env.repo.git(&["checkout", "-q", "main"]);
    assert!(!drift_tick(&engine, &metrics, "demo").await.unwrap());
    assert_eq!(env.cm_value("a").await.as_deref(), Some("v4"));
    assert_eq!(app_state(&env).await.revision.as_deref(), Some(r4.as_str()));
    assert_eq!(
        states(&env, &r4).last().map(String::as_str),
        Some("success")
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_force_push_whose_webhook_is_lost_is_applied_by_the_timer_github() {
    force_push_with_lost_webhook("github").await;
}

#[tokio::test]
async fn a_force_push_whose_webhook_is_lost_is_applied_by_the_timer_gitlab() {
    force_push_with_lost_webhook("gitlab").await;
}

/// The `git revert` of a refused commit has the applied revision's tree: nothing to write, and
/// it still gets its terminal status, so the fix turns green while the refused commit stays red.
/// A push that does not touch the app still gets none.
async fn revert_of_a_refused_commit(forge: &str, failure: &str) {
    let env = Env::new(forge, "").await;
    let engine = env.engine();
    env.repo.write("app/a.yaml", &env.cm("a", "v1"));
    let r1 = env.repo.commit("v1");
    push_from(&engine, "", &r1).await.unwrap();
    env.repo.write("app/b.yaml", &refused_cm("b"));
    let refused = env.repo.commit("refused");
    push_from(&engine, &r1, &refused).await.unwrap_err();
    let revert = env.repo.revert(&refused);
    let r = push_from(&engine, &refused, &revert).await.unwrap();
    assert_eq!(r.outcome, Outcome::Unchanged);
    assert!(r.applied.is_empty());

    let posted = env.sim.statuses(REPO, &revert);
    assert_eq!(
        posted.iter().map(|s| s.state.as_str()).collect::<Vec<_>>(),
        ["success"]
    );
    assert_eq!(
        posted[0].description.as_deref(),
        Some(format!("In sync with {}", &r1[..12]).as_str())
    );
    assert_eq!(states(&env, &refused), ["pending", failure]);
    let st = app_state(&env).await;
    assert_eq!(st.revision.as_deref(), Some(revert.as_str()));
    assert_eq!(st.runs[0].revision.as_deref(), Some(revert.as_str()));

    env.repo.write("README.md", "docs\n");
    let docs = env.repo.commit("docs only");
    let r = push_from(&engine, &revert, &docs).await.unwrap();
    assert_eq!(r.outcome, Outcome::Unchanged);
    assert!(states(&env, &docs).is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn the_revert_of_a_refused_commit_turns_green_github() {
    revert_of_a_refused_commit("github", "failure").await;
}

#[tokio::test]
async fn the_revert_of_a_refused_commit_turns_green_gitlab() {
    revert_of_a_refused_commit("gitlab", "failed").await;
}
