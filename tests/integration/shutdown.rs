//! Graceful shutdown of `driftless serve`: on SIGTERM new webhooks get 503, a reconcile that
//! outlasts the grace period is interrupted with its state recording what it did, the lease
//! goes back, the process exits 0, and the next start finishes the job.

use std::time::{Duration, Instant};

use driftless::reconcile::state::{self, AppState};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::reconcile::Env;
use crate::support::serve::{Serve, ServeConfig};

const REPO: &str = "acme/deploy";

async fn wait_state(env: &Env, what: &str, ok: impl Fn(&AppState) -> bool) -> AppState {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = state::load(&env.ns.client, &env.state_ns.name, "demo")
            .await
            .unwrap();
        if ok(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn sigterm_interrupts_cleanly_and_the_next_start_finishes_the_job() {
    let env = Env::new("github", "health_timeout = \"300s\"").await;
    let cfg = ServeConfig::new(
        &env.config_file,
        "[log]\nformat = \"json\"\n",
        "shutdown_grace = \"2s\"\n",
    );
    let (config, base) = (&cfg.path, &cfg.base);
    env.repo.write("app/a.yaml", &env.cm("a", "0"));
    let c0 = env.repo.commit("start");
    let serve = Serve::start(config, base, cfg.log("serve-1.log")).await;
    // The start-up catch-up applies the branch head.
    wait_state(&env, "the catch-up of c0", |st| {
        st.revision.as_deref() == Some(c0.as_str())
    })
    .await;

    // A push whose Deployment never becomes healthy on its own: the run waits for health.
    env.repo.write(
        "app/web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx:1.27}]}\n",
    );
    env.repo.write("app/a.yaml", &env.cm("a", "1"));
    let c1 = env.repo.commit("add web");
    let code = serve.github_push(&env.sim, base, REPO, &c0, &c1).await;
    assert_eq!(code, 202, "{}", serve.log());
    let deployments: Api<Deployment> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
    let deadline = Instant::now() + Duration::from_secs(30);
    while deployments.get_opt("web").await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "web never applied: {}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    serve.sigterm();
    // Draining: a new delivery is refused with 503 so the forge retries it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let code = serve.github_push(&env.sim, base, REPO, &c0, &c1).await;
    assert_eq!(code, 503, "{}", serve.log());
    let ready = reqwest::get(format!("{base}/readyz"))
        .await
        .unwrap()
        .status();
    assert_eq!(ready.as_u16(), 503);
    let (code, log) = serve.exit_code(Duration::from_secs(30)).await;
    assert_eq!(code, 0, "{log}");
    // log.format = "json": every line is one JSON object with a level and a message.
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(log.contains("grace period over"), "{log}");
    assert!(lines > 5, "{log}");

    // What happened is recorded: the run of c1 was interrupted after writing; the applied
    // revision is still c0, so the next start knows c1 is not done.
    let st = state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    assert_eq!(st.revision.as_deref(), Some(c0.as_str()));
    let last = st.last_result.clone().unwrap();
    assert_eq!(last.outcome, "interrupted", "{last:?}");
    assert_eq!(last.revision.as_deref(), Some(c1.as_str()));
    assert!(last.applied >= 2, "{last:?}");
    assert!(
        st.inventory
            .iter()
            .any(|i| i.id.kind == "Deployment" && i.id.name == "web"),
        "the written Deployment is in the inventory, so it can be pruned later: {:?}",
        st.inventory
    );
    let statuses = env.sim.statuses(REPO, &c1);
    let latest = statuses.last().unwrap();
    assert_eq!(latest.state, "pending", "{statuses:?}");
    assert!(
        latest
            .description
            .as_deref()
            .unwrap_or("")
            .contains("interrupted"),
        "{statuses:?}"
    );
    // The lease was let go: the run's record of the interruption released it.
    let leases: Api<Lease> = Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    let lease = leases.get("driftless-app-demo").await.unwrap();
    let released = state::released_lease(&env.ns.client, &env.state_ns.name, "demo").await;
    assert!(
        released.is_some() && released == driftless::reconcile::lease::token(&lease),
        "the lease is still held: {lease:?}, released {released:?}"
    );

    // The controller makes web available; the next start finishes c1.
    let generation = deployments.get("web").await.unwrap().metadata.generation;
    let status = json!({"status": {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1, "readyReplicas": 1}});
    deployments
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let serve = Serve::start(config, base, cfg.log("serve-2.log")).await;
    let st = wait_state(&env, "the resumed c1", |st| {
        st.revision.as_deref() == Some(c1.as_str())
    })
    .await;
    assert_eq!(st.last_result.unwrap().outcome, "applied");
    let statuses = env.sim.statuses(REPO, &c1);
    assert_eq!(statuses.last().unwrap().state, "success", "{statuses:?}");
    // The run shows in the metrics.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
    };
    assert_eq!(
        value("driftless_reconcile_runs_total{app=\"demo\",outcome=\"applied\"}"),
        1.0
    );
    assert_eq!(
        value("driftless_reconcile_seconds_count{app=\"demo\",outcome=\"applied\"}"),
        1.0
    );
    // The resumed run rewrites what the interrupted one wrote: the Deployment and the ConfigMap.
    assert_eq!(value("driftless_objects_applied_total{app=\"demo\"}"), 2.0);
    assert_eq!(value("driftless_objects_pruned_total{app=\"demo\"}"), 0.0);
    assert!(value("driftless_forge_requests_total{forge=\"github\",outcome=\"ok\"}") >= 3.0);
    assert!(value("driftless_queue_wait_seconds_count") >= 1.0);
    serve.sigterm();
    let (code, log) = serve.exit_code(Duration::from_secs(30)).await;
    assert_eq!(code, 0, "{log}");
    env.cleanup().await;
}
