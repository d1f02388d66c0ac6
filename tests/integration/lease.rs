//! Per-app Leases against the real API server: one holder at a time, also within one process;
//! renewal that survives a conflicting write; a lease taken over or not renewed stops its run
//! before the run's next write; a job that cannot get the lease is requeued, never dropped;
//! and a `kill -9` of `serve` blocks the app for at most one lease duration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use driftless::metrics::{Metrics, RunLabels};
use driftless::queue::{Job, JobQueue, JobReason};
use driftless::reconcile::lease::{LeaseTiming, Leases};
use driftless::reconcile::state;
use driftless::reconcile::{Engine, ReconcileError, RunOptions, RunReport};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::reconcile::Env;
use crate::support::cluster::TestNamespace;
use crate::support::partition::Partition;
use crate::support::serve::{Serve, ServeConfig};

const REPO: &str = "acme/deploy";
const LEASE: &str = "driftless-app-demo";
/// A Deployment that stays unhealthy until the test reports its rollout complete: a run
/// that applies it holds its lease while it waits for health.
const WEB: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx:1.27}]}\n";

/// The leases of `identity` in the test's namespace, with the default timing (15 s) but
/// waiting at most `wait` for another holder.
fn leases_of(client: &Client, ns: &str, identity: &str, wait: Duration) -> Leases {
    let timing = LeaseTiming {
        wait,
        ..LeaseTiming::default()
    };
    Leases::new(client, ns, identity, timing)
}

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone())
}

/// Polls `probe` until it returns `Some`, panicking with `what` after `within`. Only a bound
/// on how long the test waits for something that must happen, never a measurement.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Another replica writes itself into the lease as holder, as one does that judged the
/// lease expired.
async fn take_over(client: &Client, ns: &str, identity: &str) {
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    loop {
        let mut lease = api.get(LEASE).await.unwrap();
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = Some(identity.into());
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match api.replace(LEASE, &PostParams::default(), &lease).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => panic!("taking the lease over: {e}"),
        }
    }
}

/// Plays the Deployment controller once: `web`'s current generation rolled out.
async fn complete_rollout(client: &Client, ns: &str) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let generation = api.get("web").await.unwrap().metadata.generation;
    let status = json!({"status": {"observedGeneration": generation, "replicas": 1,
        "updatedReplicas": 1, "availableReplicas": 1, "readyReplicas": 1}});
    api.patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Waits until `web` exists: the run that applied it now waits for its health, holding the
/// app's lease.
async fn wait_for_web(env: &Env) {
    let api: Api<Deployment> = Api::namespaced(env.ns.client.clone(), &env.ns.name);
    eventually("web applied", Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.get_opt("web").await.unwrap().map(|_| ()) }
    })
    .await;
}

/// Applies `c0` (one ConfigMap) with `engine`, then starts the run of `c1` (adds web, edits
/// the ConfigMap) and returns once that run waits for web's health, holding the lease.
async fn run_holding_the_lease(env: &Env, engine: &Arc<Engine>) -> (String, String, Running) {
    env.repo.write("app/a.yaml", &env.cm("a", "0"));
    let c0 = env.repo.commit("start");
    env.push(engine, &c0).await.unwrap();
    env.repo.write("app/web.yaml", WEB);
    env.repo.write("app/a.yaml", &env.cm("a", "1"));
    let c1 = env.repo.commit("add web");
    let run = tokio::spawn({
        let (engine, job) = (engine.clone(), push_job(&c1, &c0));
        async move { engine.run(&job, RunOptions::default()).await }
    });
    wait_for_web(env).await;
    (c0, c1, run)
}

type Running = tokio::task::JoinHandle<Result<RunReport, ReconcileError>>;

fn push_job(revision: &str, before: &str) -> Job {
    Job::new(
        "demo",
        Some(revision.to_string()),
        JobReason::Push {
            delivery: None,
            before: before.to_string(),
        },
    )
}

#[tokio::test]
async fn two_guards_of_one_identity_in_one_process_exclude_each_other() {
    let ns = TestNamespace::new("it-lease").await;
    let first = leases_of(&ns.client, &ns.name, "replica-a", Duration::from_secs(5))
        .acquire("demo")
        .await
        .unwrap();
    // The same identity again, as a heal and a push of one replica would: it must wait.
    let second = leases_of(&ns.client, &ns.name, "replica-a", Duration::from_secs(1))
        .acquire("demo")
        .await;
    assert!(
        second.is_err(),
        "a second guard of the same identity was handed out while the first is held"
    );
    let waiting = tokio::spawn({
        let same = leases_of(&ns.client, &ns.name, "replica-a", Duration::from_secs(60));
        async move { same.acquire("demo").await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the waiting guard did not wait");
    first.release().await;
    let second = waiting
        .await
        .unwrap()
        .expect("taken once the first is released");
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    assert_eq!(
        holder(&leases.get(LEASE).await.unwrap()).as_deref(),
        Some("replica-a")
    );
    second.release().await;
    assert_eq!(holder(&leases.get(LEASE).await.unwrap()), None);
    ns.cleanup().await;
}

#[tokio::test]
async fn a_renewal_that_meets_a_conflict_rereads_and_keeps_the_lease() {
    let ns = TestNamespace::new("it-lease").await;
    let guard = leases_of(&ns.client, &ns.name, "replica-a", Duration::from_secs(5))
        .acquire("demo")
        .await
        .unwrap();
    // Someone else writes the lease without taking it (a label): the holder's copy is now
    // stale, so its next renewal meets a 409.
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    let touched = leases
        .patch(
            LEASE,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .unwrap();
    let renew_before = touched.spec.as_ref().unwrap().renew_time.clone();
    let renewed = eventually(
        "a renewal after the conflict",
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            let renew_before = renew_before.clone();
            async move {
                let lease = leases.get(LEASE).await.unwrap();
                let renew = lease.spec.as_ref().unwrap().renew_time.clone();
                (renew != renew_before).then_some(lease)
            }
        },
    )
    .await;
    assert_eq!(holder(&renewed).as_deref(), Some("replica-a"));
    assert_eq!(
        renewed
            .metadata
            .labels
            .unwrap()
            .get("touched")
            .map(String::as_str),
        Some("yes"),
        "the renewal re-read the lease instead of overwriting it"
    );
    assert_eq!(guard.watch().lost(), None);
    guard.release().await;
    assert_eq!(holder(&leases.get(LEASE).await.unwrap()), None);
    ns.cleanup().await;
}

/// Another replica takes the lease over (it judged it expired): the holder learns it at its
/// next renewal, and its release leaves the new holder's lease alone.
#[tokio::test]
async fn a_guard_whose_lease_is_taken_over_knows_it_and_leaves_it_alone() {
    let ns = TestNamespace::new("it-lease").await;
    let guard = leases_of(&ns.client, &ns.name, "replica-a", Duration::from_secs(5))
        .acquire("demo")
        .await
        .unwrap();
    take_over(&ns.client, &ns.name, "replica-b").await;
    let watch = guard.watch();
    tokio::time::timeout(Duration::from_secs(60), watch.cancelled())
        .await
        .expect("the holder never noticed the takeover");
    let why = watch.lost().unwrap();
    assert!(why.contains("taken over by replica-b"), "{why}");
    assert_eq!(guard.release().await, None);
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    assert_eq!(
        holder(&leases.get(LEASE).await.unwrap()).as_deref(),
        Some("replica-b")
    );
    ns.cleanup().await;
}

/// A holder cut off from the API server cannot renew: it gives the lease up as lost before
/// another replica, judging expiry by its own clock, may take it over.
#[tokio::test]
async fn a_lease_that_cannot_be_renewed_is_given_up_before_anyone_takes_it_over() {
    let ns = TestNamespace::new("it-lease").await;
    let partition = Partition::start().await;
    let guard = leases_of(
        &partition.client(),
        &ns.name,
        "replica-a",
        Duration::from_secs(5),
    )
    .acquire("demo")
    .await
    .unwrap();
    let watch = guard.watch();
    partition.cut();
    let taken = leases_of(&ns.client, &ns.name, "replica-b", Duration::from_secs(60))
        .acquire("demo")
        .await
        .expect("the unrenewed lease is taken over once it stayed unchanged for 15s");
    let why = watch
        .lost()
        .expect("the cut-off holder still took the lease for its own when it was taken over");
    assert!(why.contains("not renewed"), "{why}");
    assert_eq!(guard.release().await, None);
    taken.release().await;
    ns.cleanup().await;
}

/// The lease of a holder whose clock runs an hour ahead: its renewTime says "renewed in the
/// future". Expiry is judged by the observer's own clock since it last saw the record change,
/// so the lease is taken over once it stayed unchanged for its duration.
#[tokio::test]
async fn a_dead_holders_lease_is_taken_over_by_the_observers_clock() {
    let ns = TestNamespace::new("it-lease").await;
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    let ahead = Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(1);
    let dead: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEASE},
        "spec": {"holderIdentity": "dead-replica", "leaseDurationSeconds": 3,
                 "acquireTime": MicroTime(ahead), "renewTime": MicroTime(ahead)},
    }))
    .unwrap();
    leases.create(&PostParams::default(), &dead).await.unwrap();
    let guard = leases_of(&ns.client, &ns.name, "replica-a", Duration::from_secs(30))
        .acquire("demo")
        .await
        .expect("the dead holder's lease is taken over once it stayed unchanged for 3s");
    assert_eq!(
        holder(&leases.get(LEASE).await.unwrap()).as_deref(),
        Some("replica-a")
    );
    guard.release().await;
    ns.cleanup().await;
}

/// A run waiting for health when another replica takes its lease over: it stops at once,
/// writes nothing more (no state, no status, no release over the new holder), and the next
/// run applies the revision.
#[tokio::test]
async fn a_run_whose_lease_is_taken_over_stops_before_its_next_write() {
    let env = Env::new("github", "health_timeout = \"300s\"").await;
    let engine = Arc::new(env.engine());
    let (c0, c1, run) = run_holding_the_lease(&env, &engine).await;
    let (client, app_ns) = (env.ns.client.clone(), env.ns.name.clone());
    let states: Api<ConfigMap> = Api::namespaced(client.clone(), &env.state_ns.name);
    let state_version = states.get(LEASE).await.unwrap().metadata.resource_version;

    take_over(&client, &env.state_ns.name, "usurper").await;
    let result = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the run did not stop after its lease was taken over")
        .unwrap();
    let err = result.expect_err("a run that lost its lease reports it");
    assert!(
        matches!(&err, ReconcileError::LeaseLost { why, written, .. }
            if why.contains("taken over by usurper") && *written == 2),
        "{err}"
    );
    engine.settle().await;

    assert_eq!(
        states.get(LEASE).await.unwrap().metadata.resource_version,
        state_version,
        "the state was written after the lease was lost"
    );
    let st = state::load(&client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    assert_eq!(st.revision.as_deref(), Some(c0.as_str()));
    let statuses = env.sim.statuses(REPO, &c1);
    assert_eq!(
        statuses.last().map(|s| s.state.as_str()),
        Some("pending"),
        "a status was posted after the lease was lost: {statuses:?}"
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), &env.state_ns.name);
    assert_eq!(
        holder(&leases.get(LEASE).await.unwrap()).as_deref(),
        Some("usurper"),
        "the old holder released the lease over the new one"
    );

    // The other replica hands the lease back without having applied c1; the next run of
    // this replica does.
    let mut lease = leases.get(LEASE).await.unwrap();
    lease.spec.as_mut().unwrap().holder_identity = None;
    leases
        .replace(LEASE, &PostParams::default(), &lease)
        .await
        .unwrap();
    complete_rollout(&client, &app_ns).await;
    env.push(&engine, &c1).await.unwrap();
    let st = state::load(&client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    assert_eq!(st.revision.as_deref(), Some(c1.as_str()));
    assert_eq!(env.cm_value("a").await.as_deref(), Some("1"));
    env.cleanup().await;
}

/// Replica A applies a push and waits for health far longer than replica B waits for the
/// lease. B's push for the same app gives up waiting, is requeued with backoff, and is
/// applied once A is done.
#[tokio::test]
async fn a_push_that_cannot_get_the_lease_is_requeued_and_applied_after_the_holder() {
    let mut env = Env::new("github", "health_timeout = \"300s\"").await;
    // B waits 20s for the lease at each attempt; A waits for health until the test says.
    env.settings.kubernetes.lease_duration = Duration::from_secs(10);
    let a = Arc::new(env.engine());
    let b = Arc::new(env.engine());
    let (_, c1, first) = run_holding_the_lease(&env, &a).await;
    let (client, app_ns) = (env.ns.client.clone(), env.ns.name.clone());

    let queue = Arc::new(JobQueue::new());
    let metrics = Arc::new(Metrics::new());
    let workers = tokio::spawn(driftless::worker::run(
        queue.clone(),
        b.clone(),
        metrics.clone(),
        1,
    ));
    env.repo.write("app/a.yaml", &env.cm("a", "2"));
    let c2 = env.repo.commit("second");
    queue.enqueue(push_job(&c2, &c1)).unwrap();
    // B gives up waiting for the lease at least once while A waits for health.
    let runs = |outcome: &'static str| {
        metrics
            .reconcile_runs
            .get_or_create(&RunLabels {
                app: "demo".into(),
                outcome,
            })
            .get()
    };
    eventually("B to give up waiting", Duration::from_secs(120), || {
        let done = runs("requeued") + runs("failed") > 0;
        async move { done.then_some(()) }
    })
    .await;
    assert_eq!(runs("failed"), 0, "B's push was dropped, not requeued");
    assert!(!first.is_finished(), "A stopped waiting for health");

    complete_rollout(&client, &app_ns).await;
    first.await.unwrap().unwrap();
    let st = eventually("B's push applied", Duration::from_secs(120), || {
        let client = client.clone();
        let (state_ns, c2) = (env.state_ns.name.clone(), c2.clone());
        async move {
            let st = state::load(&client, &state_ns, "demo").await.unwrap();
            (st.revision.as_deref() == Some(c2.as_str())).then_some(st)
        }
    })
    .await;
    assert_eq!(st.last_result.unwrap().outcome, "applied");
    assert_eq!(env.cm_value("a").await.as_deref(), Some("2"));
    queue.close();
    workers.await.unwrap();
    env.cleanup().await;
}

/// `kill -9` of `serve` while it holds an app's lease (mid-run, right after acknowledging the
/// push), then a restart: the restarted process takes the dead holder's lease over and
/// applies the push.
#[tokio::test]
async fn after_kill_9_the_restarted_process_applies_the_push() {
    let env = Env::new("github", "health_timeout = \"300s\"").await;
    let cfg = ServeConfig::new(&env.config_file, "", "");
    let (config, base) = (&cfg.path, &cfg.base);
    let (client, app_ns, state_ns) = (
        env.ns.client.clone(),
        env.ns.name.clone(),
        env.state_ns.name.clone(),
    );
    let applied = |revision: String| {
        let (client, state_ns) = (client.clone(), state_ns.clone());
        move || {
            let (client, state_ns, revision) = (client.clone(), state_ns.clone(), revision.clone());
            async move {
                let st = state::load(&client, &state_ns, "demo").await.unwrap();
                (st.revision.as_deref() == Some(revision.as_str())).then_some(st)
            }
        }
    };

    env.repo.write("app/a.yaml", &env.cm("a", "0"));
    let c0 = env.repo.commit("start");
    let first = Serve::start(config, base, cfg.log("serve-1.log")).await;
    eventually(
        "the catch-up of c0",
        Duration::from_secs(60),
        applied(c0.clone()),
    )
    .await;

    env.repo.write("app/web.yaml", WEB);
    env.repo.write("app/a.yaml", &env.cm("a", "1"));
    let c1 = env.repo.commit("add web");
    let code = first.github_push(&env.sim, base, REPO, &c0, &c1).await;
    assert_eq!(code, 202, "{}", first.log());
    // The run has written web and waits for its health, holding the lease: kill it there.
    wait_for_web(&env).await;
    let first_log = first.kill().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &state_ns);
    let dead = holder(&leases.get(LEASE).await.unwrap());
    assert!(dead.is_some(), "the killed process held no lease");
    complete_rollout(&client, &app_ns).await;

    let second = Serve::start(config, base, cfg.log("serve-2.log")).await;
    let st = eventually(
        "the restarted process to apply c1",
        Duration::from_secs(90),
        applied(c1.clone()),
    )
    .await;
    assert_eq!(st.last_result.unwrap().outcome, "applied");
    assert_eq!(env.cm_value("a").await.as_deref(), Some("1"));
    let statuses = env.sim.statuses(REPO, &c1);
    assert_eq!(statuses.last().unwrap().state, "success", "{statuses:?}");
    let applied_c1 = |log: &str| {
        log.lines()
            .any(|l| l.contains("applied") && l.contains(&c1[..12]) && l.contains("Applied"))
    };
    assert!(
        !applied_c1(&first_log),
        "the killed process applied c1:\n{first_log}"
    );
    second.sigterm();
    let (code, log) = second.exit_code(Duration::from_secs(30)).await;
    assert!(
        applied_c1(&log),
        "the restarted process did not apply c1:\n{log}"
    );
    assert!(!log.contains("gave up waiting"), "{log}");
    assert_eq!(code, 0, "{log}");
    env.cleanup().await;
}

/// The lease of an app that has likely never run is created without a look first (one
/// request on a cold start), carrying the run's intent; one that exists after all is not
/// taken that way, and the ordinary take waits for its holder, then carries the intent on.
#[tokio::test]
async fn a_new_apps_lease_is_created_in_one_request_with_its_intent_and_an_existing_one_still_respected(
) {
    use driftless::reconcile::lease::{LeaseError, ANNOTATION_INTENT};
    let ns = TestNamespace::new("it-lease").await;
    let (client, calls) = crate::support::api_calls::counting_client().await;
    let intent = r#"[{"api_version":"v1","kind":"ConfigMap","namespace":"x","name":"a"}]"#;
    let first = leases_of(&client, &ns.name, "replica-a", Duration::from_secs(5))
        .create_new("demo", Some(intent.to_string()))
        .await
        .unwrap();
    let made = calls.take();
    let lease_calls: Vec<&String> = made.iter().filter(|c| c.contains("/leases")).collect();
    assert_eq!(lease_calls.len(), 1, "one creation: {lease_calls:#?}");
    assert!(lease_calls[0].starts_with("POST "), "{lease_calls:#?}");
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    let written = leases.get(LEASE).await.unwrap();
    assert_eq!(
        written
            .metadata
            .annotations
            .unwrap_or_default()
            .get(ANNOTATION_INTENT)
            .map(String::as_str),
        Some(intent)
    );

    // Held by replica-a: replica-b's guess is wrong, and the ordinary take must wait, then
    // give up.
    let b = leases_of(&client, &ns.name, "replica-b", Duration::from_secs(1));
    let second = b.create_new("demo", None).await;
    assert!(
        matches!(second, Err(LeaseError::Moved { .. })),
        "replica-b created a Lease that exists"
    );
    let second = b.acquire("demo").await;
    assert!(
        matches!(second, Err(LeaseError::Held { .. })),
        "replica-b took a lease replica-a holds"
    );
    // Released: replica-b takes it, and the first run's intent stays on it.
    first.release().await;
    let second = leases_of(&client, &ns.name, "replica-b", Duration::from_secs(5))
        .acquire("demo")
        .await
        .expect("a released lease is taken");
    assert_eq!(second.intent().as_deref(), Some(intent));
    assert_eq!(
        holder(&leases.get(LEASE).await.unwrap()).as_deref(),
        Some("replica-b")
    );
    second.release().await;
    ns.cleanup().await;
}

/// Another replica's take of app demo's lease that does not wait: it succeeds only if the
/// lease is free now (released by a record, or handed back).
async fn replica_b_takes_at_once(
    env: &Env,
) -> Result<driftless::reconcile::lease::LeaseGuard, driftless::reconcile::lease::LeaseError> {
    leases_of(
        &env.ns.client,
        &env.state_ns.name,
        "replica-b",
        Duration::ZERO,
    )
    .acquire("demo")
    .await
}

/// An engine for `env` whose every API request is recorded.
async fn counting_engine(env: &Env) -> (Arc<Engine>, crate::support::api_calls::ApiCalls) {
    let (client, calls) = crate::support::api_calls::counting_client().await;
    let forges = driftless::forge::from_settings(&env.settings).unwrap();
    let engine = Engine::new(client, forges, Arc::new(env.settings.clone()));
    (Arc::new(engine), calls)
}

/// A run's final record is its last write under the app's lease, and it releases the lease
/// itself: no Lease write follows it, and another replica takes the lease at once, without
/// waiting for it to expire. An earlier run's record does not release a later holding: while
/// the next run holds the lease, the other replica still waits.
#[tokio::test]
async fn a_runs_record_releases_its_lease_without_a_lease_write() {
    let env = Env::new("github", "health_timeout = \"300s\"").await;
    let (engine, calls) = counting_engine(&env).await;
    env.repo.write("app/b.yaml", &env.cm("b", "0"));
    let first = env.repo.commit("first");
    env.push(&engine, &first).await.unwrap();
    engine.settle().await;

    let made = calls.take();
    let state_path = format!("/namespaces/{}/configmaps/{LEASE}", env.state_ns.name);
    let record = made
        .iter()
        .rposition(|c| c.starts_with("PATCH ") && c.contains(&state_path))
        .unwrap_or_else(|| panic!("no record written: {made:#?}"));
    let lease_writes: Vec<&String> = made
        .iter()
        .filter(|c| c.contains("/leases") && !c.starts_with("GET "))
        .collect();
    assert!(!lease_writes.is_empty(), "no lease taken: {made:#?}");
    assert!(
        made[record..]
            .iter()
            .all(|c| !c.contains("/leases") || c.starts_with("GET ")),
        "a Lease write after the run's record: {:#?}",
        &made[record..]
    );

    // The record released it: another replica takes it with one look, no wait.
    let leases: Api<Lease> = Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    let lease = leases.get(LEASE).await.unwrap();
    let states: Api<ConfigMap> = Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    let state_cm = states.get(LEASE).await.unwrap();
    assert_eq!(
        state_cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(state::ANNOTATION_RELEASED)),
        driftless::reconcile::lease::token(&lease).as_ref(),
        "the record carries the lease's token"
    );
    let other = replica_b_takes_at_once(&env)
        .await
        .expect("a lease its run's record released is taken at once");
    assert_eq!(
        holder(&leases.get(LEASE).await.unwrap()).as_deref(),
        Some("replica-b")
    );
    other.release().await;

    // The next run holds the lease again (waiting for web's health); the record of c0 says
    // nothing of this holding, so the other replica waits and gives up.
    let (_, _, run) = run_holding_the_lease(&env, &engine).await;
    let waited = leases_of(
        &env.ns.client,
        &env.state_ns.name,
        "replica-b",
        Duration::from_secs(1),
    )
    .acquire("demo")
    .await;
    assert!(
        matches!(
            waited,
            Err(driftless::reconcile::lease::LeaseError::Held { .. })
        ),
        "replica-b took a lease a run holds, on an earlier run's record"
    );
    complete_rollout(&env.ns.client, &env.ns.name).await;
    run.await.unwrap().unwrap();
    engine.settle().await;
    let other = replica_b_takes_at_once(&env)
        .await
        .expect("the second run's record released the lease too");
    other.release().await;
    env.cleanup().await;
}

/// A cold start (a sweep found no state for the app) makes two writes besides the app's
/// objects: the Lease, created just before the first object with the run's intent on it,
/// and the state, created with the run's record, which releases that Lease. Nothing is
/// written before the Lease, and neither is written twice.
#[tokio::test]
async fn a_new_apps_first_run_creates_its_lease_with_the_intent_then_its_state_once() {
    use driftless::reconcile::lease::ANNOTATION_INTENT;
    let env = Env::new("github", "").await;
    let (engine, calls) = counting_engine(&env).await;
    env.repo.write("app/a.yaml", &env.cm("a", "0"));
    env.repo.write("app/b.yaml", &env.cm("b", "0"));
    let first = env.repo.commit("first");
    assert_eq!(engine.prefetch_states().await.unwrap(), 0);
    calls.take();
    env.push(&engine, &first).await.unwrap();
    engine.settle().await;

    let made = calls.take();
    let writes: Vec<&String> = made
        .iter()
        .filter(|c| !c.starts_with("GET ") && !c.contains("dryRun"))
        .collect();
    let state_ns = format!("/namespaces/{}/", env.state_ns.name);
    let (state_writes, object_writes): (Vec<&String>, Vec<&String>) =
        writes.iter().partition(|c| c.contains(&state_ns));
    assert_eq!(object_writes.len(), 2, "{writes:#?}");
    assert_eq!(state_writes.len(), 2, "{writes:#?}");
    assert!(
        state_writes[0].starts_with("POST ") && state_writes[0].contains("/leases"),
        "the Lease is created first: {writes:#?}"
    );
    assert!(
        state_writes[1].starts_with("POST ") && state_writes[1].contains("/configmaps"),
        "the state is created once, with the record: {writes:#?}"
    );
    let lease_at = writes.iter().position(|c| c.contains("/leases")).unwrap();
    assert_eq!(
        lease_at, 0,
        "an object written before the Lease: {writes:#?}"
    );

    let leases: Api<Lease> = Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    let lease = leases.get(LEASE).await.unwrap();
    let intent = lease.metadata.annotations.unwrap_or_default()[ANNOTATION_INTENT].clone();
    for name in ["a", "b"] {
        assert!(intent.contains(&format!("\"name\":\"{name}\"")), "{intent}");
    }
    let st = state::load(&env.ns.client, &env.state_ns.name, "demo")
        .await
        .unwrap();
    assert_eq!(st.revision.as_deref(), Some(first.as_str()));
    assert_eq!(st.inventory.len(), 2);
    assert!(st.inventory.iter().all(|i| !i.hash.is_empty()));
    // The record released the Lease: another replica takes it at once.
    replica_b_takes_at_once(&env)
        .await
        .expect("the first run's record released its Lease")
        .release()
        .await;
    env.cleanup().await;
}
