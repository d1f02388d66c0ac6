//! Fleet scale: a sweep with nothing changed, in a fresh process, reads no file from the forge
//! and spends none of its rate limit (one conditional head request per branch, answered 304),
//! and writes nothing; drift found from the desired manifests kept in the cluster is the drift
//! found from Git; kept manifests that are missing, corrupt or of other inputs fall back to
//! the forge, never to a wrong verdict.

use std::collections::BTreeMap;

use driftless::reconcile::Outcome;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::reconcile::{Env, REPO};

/// Three apps on one branch of one repository, each two ConfigMaps, applied by pushes.
async fn three_apps() -> Env {
    let (env, head) = three_apps_committed().await;
    let engine = env.engine();
    for a in ["a", "b", "c"] {
        let r = push(&engine, a, &head).await;
        assert_eq!(r.outcome, Outcome::Applied, "{a}");
    }
    engine.settle().await;
    env
}

/// A push of `head` to app `app`, run by `engine`.
async fn push(
    engine: &driftless::reconcile::Engine,
    app: &str,
    head: &str,
) -> driftless::reconcile::RunReport {
    let job = driftless::queue::Job::new(
        app,
        Some(head.to_string()),
        driftless::queue::JobReason::Push {
            delivery: None,
            before: String::new(),
        },
    );
    engine
        .run(&job, driftless::reconcile::RunOptions::default())
        .await
        .unwrap()
}

/// The three apps of [`three_apps`] in Git (and the head), none applied yet.
async fn three_apps_committed() -> (Env, String) {
    let mut apps = String::new();
    for a in ["a", "b", "c"] {
        apps.push_str(&format!(
            "[[apps]]\nname = \"{a}\"\nforge = \"github\"\nrepo = \"{REPO}\"\npath = \"apps/{a}\"\nnamespace = \"{{ns}}\"\ndrift = \"alert\"\n"
        ));
    }
    let env = Env::with_apps(&apps).await;
    for a in ["a", "b", "c"] {
        env.repo.write(
            &format!("apps/{a}/all.yaml"),
            &format!(
                "{}---\n{}",
                env.cm(&format!("{a}-one"), "1"),
                env.cm(&format!("{a}-two"), "2")
            ),
        );
    }
    let head = env.repo.commit("three apps");
    (env, head)
}

/// `driftless drift --once` in a process of its own; its exit code and stdout.
async fn drift_once(env: &Env) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_driftless"))
        .args(["drift", "--once", "--config"])
        .arg(&env.config_file)
        .env(
            "KUBECONFIG",
            std::env::var(crate::support::cluster::KUBECONFIG_ENV).unwrap(),
        )
        .output()
        .await
        .unwrap();
    assert!(
        out.status.code().is_some(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The resourceVersion of every ConfigMap and Lease in the state namespace and every
/// ConfigMap of the apps: a write anywhere changes one.
async fn versions(env: &Env) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    let lp = ListParams::default();
    for (ns, what) in [(&env.state_ns.name, "state"), (&env.ns.name, "app")] {
        let cms: Api<ConfigMap> = Api::namespaced(env.ns.client.clone(), ns);
        for cm in cms.list(&lp).await.unwrap() {
            let name = cm.metadata.name.clone().unwrap();
            all.insert(
                format!("{what} ConfigMap {name}"),
                cm.metadata.resource_version.unwrap(),
            );
        }
    }
    let leases: Api<Lease> = Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    for l in leases.list(&lp).await.unwrap() {
        all.insert(
            format!("Lease {}", l.metadata.name.unwrap()),
            l.metadata.resource_version.unwrap(),
        );
    }
    all
}

/// Each forge request since the requests were last cleared: its route and status.
fn routes(env: &Env) -> Vec<(String, u16)> {
    env.sim
        .requests()
        .iter()
        .map(|r| (r.route.clone(), r.status))
        .collect()
}

#[tokio::test]
async fn a_steady_sweep_in_a_fresh_process_reads_no_file_spends_no_budget_and_writes_nothing() {
    let env = three_apps().await;
    // The first sweep keeps the branch head in the cluster (no process has seen it yet).
    let (code, out) = drift_once(&env).await;
    assert_eq!(code, Some(0), "{out}");

    let before = versions(&env).await;
    env.sim.clear_requests();
    let (code, out) = drift_once(&env).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches(": in sync").count(), 3, "{out}");
    assert_eq!(
        routes(&env),
        [("/repos/{owner}/{repo}/commits/{ref}".to_string(), 304)],
        "one conditional head request for the one branch, nothing else"
    );
    assert_eq!(
        versions(&env).await,
        before,
        "a sweep with everything in sync wrote something"
    );

    // A commit to one app: the sweep applies it (reading that app only) and is in sync. The
    // other apps cost one compare between them and write nothing: no Lease, no state, no
    // object.
    env.repo
        .write("apps/b/all.yaml", &env.cm("b-one", "changed"));
    env.repo.commit("b changes");
    env.sim.clear_requests();
    let (code, out) = drift_once(&env).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(env.cm_value("b-one").await.as_deref(), Some("changed"));
    assert!(env.cm_value("b-two").await.is_none(), "b-two not pruned");
    let requests = env.sim.requests();
    let count = |route: &str| requests.iter().filter(|r| r.route.contains(route)).count();
    assert_eq!(count("git/blobs"), 1, "only the changed app's file is read");
    // One for the branch (what changed since the applied revision), which also tells b's run
    // that the head moves forward; not one per app.
    assert_eq!(count("/compare/"), 1, "compares");
    let after = versions(&env).await;
    let written: Vec<&String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .collect();
    let of_a_or_c = |k: &str| {
        ["a", "c"].iter().any(|a| {
            k.ends_with(&format!("driftless-app-{a}"))
                || k.contains(&format!("driftless-app-{a}-"))
                || k.contains(&format!("ConfigMap {a}-"))
        })
    };
    assert!(
        !written.iter().any(|k| of_a_or_c(k)),
        "the sweep wrote to apps the commit did not touch: {written:?}"
    );

    // The next process knows what changed up to the head: one 304, nothing written.
    env.sim.clear_requests();
    let (code, out) = drift_once(&env).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches(": in sync").count(), 3, "{out}");
    assert_eq!(
        routes(&env),
        [("/repos/{owner}/{repo}/commits/{ref}".to_string(), 304)],
        "one conditional head request after the commit, nothing else"
    );
    assert_eq!(
        versions(&env).await,
        after,
        "a steady sweep wrote something"
    );
    env.cleanup().await;
}

/// Apps left at different applied revisions (each commit touches another app) cost one
/// compare per move of the head, not one per applied revision: what changed up to the head
/// before is kept, and one compare of the two heads adds what changed since.
#[tokio::test]
async fn commits_to_different_apps_cost_one_compare_per_head_move() {
    let env = three_apps().await;
    let (code, out) = drift_once(&env).await;
    assert_eq!(code, Some(0), "{out}");
    for (app, value) in [("b", "b2"), ("c", "c3"), ("a", "a4")] {
        env.repo.write(
            &format!("apps/{app}/all.yaml"),
            &env.cm(&format!("{app}-one"), value),
        );
        env.repo.commit(&format!("{app} changes"));
        env.sim.clear_requests();
        let (code, out) = drift_once(&env).await;
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(out.matches(": in sync").count(), 3, "{out}");
        assert_eq!(
            env.cm_value(&format!("{app}-one")).await.as_deref(),
            Some(value)
        );
        let requests = env.sim.requests();
        let count = |route: &str| requests.iter().filter(|r| r.route.contains(route)).count();
        assert_eq!(count("git/blobs"), 1, "after {app}'s commit: {requests:?}");
        // One between the two heads; the changed app's run knows from it that the head
        // descends from its applied revision.
        assert_eq!(
            count("/compare/"),
            1,
            "after {app}'s commit, with the apps at {} applied revisions: {requests:?}",
            if app == "b" { 1 } else { 2 }
        );
    }
    env.cleanup().await;
}

/// The forge compares from the merge base: after a force push back to an older commit, the
/// compare of the applied revision with the head lists nothing, yet the app must go back.
#[tokio::test]
async fn a_force_push_behind_the_applied_revision_is_applied_not_taken_as_unchanged() {
    let env = three_apps().await;
    let first = env.repo.head();
    env.repo.write("apps/a/all.yaml", &env.cm("a-one", "later"));
    env.repo.commit("a changes");
    let (code, out) = drift_once(&env).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(env.cm_value("a-one").await.as_deref(), Some("later"));

    env.repo.git(&["reset", "--hard", &first]);
    let (code, out) = drift_once(&env).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        env.cm_value("a-one").await.as_deref(),
        Some("1"),
        "the force push was taken for no change: {out}"
    );
    assert_eq!(env.cm_value("a-two").await.as_deref(), Some("2"), "{out}");
    env.cleanup().await;
}

/// The desired-state copy of app `a` beside its state, made unusable in the way `how` says.
async fn spoil_kept_desired(env: &Env, how: &str) {
    let cms: Api<ConfigMap> = Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    let name = "driftless-app-a";
    let patch = match how {
        "missing" => json!({"binaryData": {"desired.gz": null}}),
        "corrupt" => json!({"binaryData": {"desired.gz": "H4sIAAAAAAAA/w=="}}),
        // A valid copy of another app's manifests: its address names other inputs.
        _ => {
            let other = cms.get("driftless-app-b").await.unwrap();
            let bytes = other.binary_data.unwrap()["desired.gz"].clone();
            json!({"binaryData": {"desired.gz": bytes}})
        }
    };
    cms.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn drift_from_kept_manifests_equals_drift_from_git_and_spoiled_ones_fall_back() {
    let env = three_apps().await;
    let cms = env.configmaps();
    cms.patch(
        "a-one",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"value": "by hand"}})),
    )
    .await
    .unwrap();
    cms.delete("a-two", &Default::default()).await.unwrap();
    // Not drift: a key someone else added.
    cms.patch(
        "b-one",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"extra": "x"}})),
    )
    .await
    .unwrap();

    let engine = env.engine();
    env.sim.clear_requests();
    let kept = engine.check_drift("a", false).await.unwrap();
    assert!(
        env.sim.requests().is_empty(),
        "the check read the forge: {:?}",
        env.sim.request_counts()
    );
    assert_eq!(
        kept.summary(),
        format!(
            "Drifted: 2 objects (v1 ConfigMap {ns}/a-one: data.value; v1 ConfigMap {ns}/a-two: missing)",
            ns = env.ns.name
        )
    );
    assert!(engine
        .check_drift("b", false)
        .await
        .unwrap()
        .drifted
        .is_empty());

    for how in ["missing", "corrupt", "other inputs"] {
        spoil_kept_desired(&env, how).await;
        env.sim.clear_requests();
        let fresh = env.engine().check_drift("a", false).await.unwrap();
        assert_eq!(fresh.drifted, kept.drifted, "{how}: another verdict");
        assert!(
            env.sim
                .requests()
                .iter()
                .any(|r| r.route.contains("git/blobs")),
            "{how}: the forge was not read"
        );
        // The fallback kept the manifests again: the next check needs no forge.
        env.sim.clear_requests();
        let again = env.engine().check_drift("a", false).await.unwrap();
        assert_eq!(again.drifted, kept.drifted, "{how}");
        assert!(env.sim.requests().is_empty(), "{how}: kept again");
    }
    env.cleanup().await;
}

/// The fleet benchmark's app of 20 objects in two files: `config.yaml` with 12 ConfigMaps
/// (`value` in each), `rest.yaml` with 4 Secrets, 2 headless Services and 2 ServiceAccounts.
fn fleet_app(a: &str, value: &str) -> [(String, String); 2] {
    let mut config = String::new();
    for i in 0..12 {
        config += &format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {a}-cm{i}\n  labels: {{tier: backend}}\ndata:\n  value: \"{value}\"\n  endpoint: \"http://{a}-svc0:80/v{i}\"\n");
    }
    let mut rest = String::new();
    for i in 0..4 {
        rest += &format!("---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {a}-secret{i}\ntype: Opaque\ndata:\n  token: c2VjcmV0LXRva2Vu\n");
    }
    for i in 0..2 {
        rest += &format!("---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {a}-svc{i}\n  annotations: {{owner: team-{a}}}\nspec:\n  clusterIP: None\n  selector: {{app: {a}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n");
        rest +=
            &format!("---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {a}-sa{i}\n");
    }
    [
        (format!("apps/{a}/config.yaml"), config),
        (format!("apps/{a}/rest.yaml"), rest),
    ]
}

#[tokio::test]
async fn a_replica_remembers_hashes_and_identities_of_its_apps_not_their_objects() {
    const APPS: [&str; 4] = ["a", "b", "c", "d"];
    let mut apps = String::new();
    for a in APPS {
        apps.push_str(&format!(
            "[[apps]]\nname = \"{a}\"\nforge = \"github\"\nrepo = \"{REPO}\"\npath = \"apps/{a}\"\nnamespace = \"{{ns}}\"\n"
        ));
    }
    let env = Env::with_apps(&apps).await;
    let push = |revision: String, a: &'static str| {
        driftless::queue::Job::new(
            a,
            Some(revision),
            driftless::queue::JobReason::Push {
                delivery: None,
                before: String::new(),
            },
        )
    };
    for a in APPS {
        for (path, text) in fleet_app(a, "1") {
            env.repo.write(&path, &text);
        }
    }
    let first = env.repo.commit("four apps");
    let engine = env.engine();
    for a in APPS {
        let r = engine
            .run(&push(first.clone(), a), Default::default())
            .await
            .unwrap();
        assert_eq!((r.outcome, r.applied.len()), (Outcome::Applied, 20), "{a}");
    }
    engine.settle().await;
    // The issue's bound on peak RSS is 20 KB per app; what a replica keeps of an app between
    // runs takes at most half of it, the rest is for file contents in the blob cache.
    let per_app = engine.remembered_bytes().await / APPS.len();
    assert!(per_app <= 10 * 1024, "{per_app} bytes kept per app");

    // A push changing one ConfigMap of `a`: only that object is written, only the changed file
    // is read from the forge, and the objects of the unchanged file stay wanted (not pruned).
    let [(config_path, config), _] = fleet_app("a", "1");
    env.repo.write(
        &config_path,
        &config.replacen("value: \"1\"", "value: \"2\"", 1),
    );
    let second = env.repo.commit("a-cm0 changes");
    env.sim.clear_requests();
    let r = engine
        .run(&push(second.clone(), "a"), Default::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    assert_eq!(r.applied, [env.id("ConfigMap", "a-cm0")]);
    assert_eq!((r.objects, r.pruned.len()), (20, 0));
    let blobs = env
        .sim
        .requests()
        .iter()
        .filter(|r| r.route.contains("git/blobs"))
        .count();
    assert_eq!(blobs, 1, "only the changed file is read");
    // A full run writes every object again, unchanged files included.
    let mut full = push(second, "a");
    full.full = true;
    let r = engine.run(&full, Default::default()).await.unwrap();
    assert_eq!((r.applied.len(), r.pruned.len()), (20, 0));
    engine.settle().await;
    let per_app = engine.remembered_bytes().await / APPS.len();
    assert!(per_app <= 10 * 1024, "{per_app} bytes kept per app");
    env.cleanup().await;
}

/// A ConfigMap of about `kib` KiB that gzip cannot shrink much (base64 of random bytes).
fn incompressible_cm(name: &str, kib: usize) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = (0..kib * 768).map(|_| rand::random::<u8>()).collect();
    let value = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n"
    )
}

/// Names of the part ConfigMaps of app `demo`'s kept desired state.
async fn desired_parts(env: &Env) -> Vec<String> {
    let cms: Api<ConfigMap> = Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    let mut names: Vec<String> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .into_iter()
        .filter_map(|cm| cm.metadata.name)
        .filter(|n| n.starts_with("driftless-app-demo-desired-"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn parts_of_the_kept_desired_state_go_when_the_render_shrinks() {
    let env = crate::reconcile::Env::new("github", "drift = \"alert\"").await;
    let engine = env.engine();
    // About 1.6 MB of manifests, 1.2 MB compressed: two parts of 700 KiB.
    for i in 0..4 {
        env.repo.write(
            &format!("app/big{i}.yaml"),
            &incompressible_cm(&format!("big{i}"), 400),
        );
    }
    let r = env.push(&engine, &env.repo.commit("large")).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    assert_eq!(
        desired_parts(&env).await,
        [
            "driftless-app-demo-desired-0",
            "driftless-app-demo-desired-1"
        ]
    );

    // One part's worth: the second part goes.
    for i in 1..4 {
        env.repo.remove(&format!("app/big{i}.yaml"));
    }
    let r = env
        .push(&engine, &env.repo.commit("smaller"))
        .await
        .unwrap();
    assert_eq!((r.outcome, r.pruned.len()), (Outcome::Applied, 3));
    assert_eq!(desired_parts(&env).await, ["driftless-app-demo-desired-0"]);
    // What is kept is still the applied set: the drift check needs no forge.
    env.sim.clear_requests();
    let drift = env.engine().check_drift("demo", false).await.unwrap();
    assert_eq!((drift.checked, drift.drifted.len()), (1, 0));
    assert!(env.sim.requests().is_empty(), "the check read the forge");

    // Small enough to sit in the state ConfigMap: no part is left.
    env.repo.remove("app/big0.yaml");
    env.repo.write("app/small.yaml", &env.cm("small", "1"));
    let r = env.push(&engine, &env.repo.commit("small")).await.unwrap();
    assert_eq!(r.outcome, Outcome::Applied);
    assert!(desired_parts(&env).await.is_empty());
    env.cleanup().await;
}

/// An engine for the env's settings whose every API request is recorded.
async fn counting_engine(
    env: &Env,
) -> (
    driftless::reconcile::Engine,
    crate::support::api_calls::ApiCalls,
) {
    let (client, calls) = crate::support::api_calls::counting_client().await;
    let forges = driftless::forge::from_settings(&env.settings).unwrap();
    let settings = std::sync::Arc::new(env.settings.clone());
    (
        driftless::reconcile::Engine::new(client, forges, settings),
        calls,
    )
}

#[tokio::test]
async fn a_sweeps_reports_count_every_api_request_it_made_bulk_lists_included() {
    let env = three_apps().await;
    let (engine, calls) = counting_engine(&env).await;
    // Kinds are looked up once per process, not by a check: out of the count.
    engine.check_drift("a", false).await.unwrap();
    calls.take();

    engine.prefetch_states().await.unwrap();
    let apps: Vec<(String, bool)> = ["a", "b", "c"].map(|a| (a.to_string(), false)).into();
    let reports = engine.check_drift_all(&apps).await;
    let counted: usize = reports
        .iter()
        .map(|(_, r)| r.as_ref().unwrap().api_requests)
        .sum();
    let made = calls.take();
    assert!(
        made.iter()
            .any(|c| c.starts_with("GET ") && c.contains("labelSelector")),
        "{made:#?}"
    );
    assert_eq!(counted, made.len(), "{made:#?}");
    env.cleanup().await;
}

/// Batches of a sweep: each batch lists its own apps' objects once (the next batch's LISTs
/// running beside the checks of the one before), and drift in any batch is found with the
/// app that has it, none in the apps beside it.
#[tokio::test]
async fn a_sweep_in_batches_lists_once_per_batch_and_finds_drift_in_each() {
    let mut env = three_apps().await;
    let cms = env.configmaps();
    for (name, value) in [("a-one", "by hand"), ("c-two", "also by hand")] {
        cms.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"value": value}})),
        )
        .await
        .unwrap();
    }
    env.settings.drift.sweep_batch = 2;
    let (engine, calls) = counting_engine(&env).await;
    // Kinds are looked up once per process, not by a check: out of the count.
    engine.check_drift("b", false).await.unwrap();
    calls.take();

    engine.prefetch_states().await.unwrap();
    let apps: Vec<(String, bool)> = ["a", "b", "c"].map(|a| (a.to_string(), false)).into();
    let reports = engine.check_drift_all(&apps).await;
    let drifted: Vec<(String, Vec<String>)> = reports
        .iter()
        .map(|(app, r)| {
            let r = r.as_ref().unwrap();
            (
                app.clone(),
                r.drifted.iter().map(|d| d.id.name.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        drifted,
        [
            ("a".to_string(), vec!["a-one".to_string()]),
            ("b".to_string(), vec![]),
            ("c".to_string(), vec!["c-two".to_string()]),
        ]
    );
    let made = calls.take();
    let lists: Vec<&String> = made
        .iter()
        .filter(|c| c.starts_with("GET ") && c.contains("labelSelector"))
        .filter(|c| c.contains(&format!("/namespaces/{}/configmaps?", env.ns.name)))
        .collect();
    assert_eq!(
        lists.len(),
        2,
        "one LIST per batch (a, b) and (c): {lists:#?}"
    );
    let counted: usize = reports
        .iter()
        .map(|(_, r)| r.as_ref().unwrap().api_requests)
        .sum();
    assert_eq!(counted, made.len(), "{made:#?}");
    env.cleanup().await;
}

/// A cold start: the sweep's catch-ups write every object of every app, so the cluster
/// matches what was just applied and the sweep checks none of them again: no second read of
/// the states, no LIST of the apps' objects (at 1,000 apps that check read 20,000 objects back).
#[tokio::test]
async fn a_cold_sweep_does_not_check_again_the_apps_it_wrote_whole() {
    let (env, _) = three_apps_committed().await;
    let (engine, calls) = counting_engine(&env).await;
    let metrics = driftless::metrics::Metrics::new();
    let apps: Vec<String> = ["a", "b", "c"].map(String::from).into();
    let verdicts = driftless::worker::sweep(&engine, &metrics, apps, 4).await;
    for (app, v) in &verdicts {
        assert_eq!(v, &Ok(false), "{app}: applied and in sync");
    }
    engine.settle().await;
    let made = calls.take();
    let app_lists: Vec<&String> = made
        .iter()
        .filter(|c| {
            c.starts_with("GET ")
                && c.contains(&format!("/namespaces/{}/configmaps?", env.ns.name))
                && c.contains("labelSelector")
        })
        .collect();
    assert!(app_lists.is_empty(), "no drift-check LIST: {app_lists:#?}");
    let state_reads: Vec<&String> = made
        .iter()
        .filter(|c| {
            c.starts_with("GET ")
                && c.contains(&format!("/namespaces/{}/configmaps", env.state_ns.name))
                && !c.contains("labelSelector=driftless.dev%2Fbranch-head")
        })
        .collect();
    assert_eq!(
        state_reads.len(),
        1,
        "the one bulk read, which found no state: {state_reads:#?}"
    );
    let state_cms = format!("/api/v1/namespaces/{}/configmaps", env.state_ns.name);
    let calls_to = |start: String| made.iter().filter(|c| c.starts_with(&start)).count();
    // The three app states, each created by its run's record, which says the cluster
    // matches (every object was just written), and the branch head's record. The runs'
    // intents went on the Leases they created: no other state write.
    let state_creations = calls_to(format!("POST {state_cms}"));
    assert_eq!(state_creations, 4, "each state created once: {made:#?}");
    let state_writes = calls_to(format!("PATCH {state_cms}/driftless-app-"));
    assert_eq!(state_writes, 0, "one write per app's state: {made:#?}");
    let leases = format!(
        "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
        env.state_ns.name
    );
    assert_eq!(
        calls_to(format!("POST {leases}")),
        3,
        "one Lease created per app: {made:#?}"
    );
    assert_eq!(
        made.iter()
            .filter(|c| c.contains(&leases) && !c.starts_with("POST "))
            .count(),
        0,
        "no other Lease request: {made:#?}"
    );
    // What the next sweep finds: the same, from the states the runs recorded.
    let verdicts = driftless::worker::sweep(
        &engine,
        &metrics,
        verdicts.into_iter().map(|(a, _)| a).collect(),
        4,
    )
    .await;
    for (app, v) in &verdicts {
        assert_eq!(v, &Ok(false), "{app}: in sync");
    }
    env.cleanup().await;
}

/// A sweep's catch-up that writes only part of an app (a commit to one of its objects) is
/// still followed by the app's drift check: an object edited by hand beside the commit, which
/// the run did not write, is found.
#[tokio::test]
async fn a_catch_up_that_writes_part_of_an_app_still_finds_drift_in_the_rest() {
    let env = three_apps().await;
    env.configmaps()
        .patch(
            "b-two",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"value": "by hand"}})),
        )
        .await
        .unwrap();
    env.repo.write(
        "apps/b/all.yaml",
        &format!(
            "{}---\n{}",
            env.cm("b-one", "changed"),
            env.cm("b-two", "2")
        ),
    );
    env.repo.commit("b-one changes");
    let engine = env.engine();
    let metrics = driftless::metrics::Metrics::new();
    let apps: Vec<String> = ["a", "b", "c"].map(String::from).into();
    let verdicts = driftless::worker::sweep(&engine, &metrics, apps, 4).await;
    engine.settle().await;
    assert_eq!(env.cm_value("b-one").await.as_deref(), Some("changed"));
    let drifted: Vec<(String, Result<bool, String>)> = verdicts;
    assert_eq!(
        drifted,
        [
            ("a".to_string(), Ok(false)),
            ("b".to_string(), Ok(true)),
            ("c".to_string(), Ok(false)),
        ]
    );
    env.cleanup().await;
}

/// A sweep found no state for an app, but another replica ran it before this one's run
/// wrote anything: the Lease that run would create exists, so it starts again the ordinary
/// way, reads the state that appeared and finds the app in sync, leaving that state as it
/// is instead of replacing it with a record that knows nothing of what the other applied.
#[tokio::test]
async fn a_state_that_appears_after_the_bulk_read_is_never_overwritten() {
    let (env, head) = three_apps_committed().await;
    let engine = env.engine();
    engine.prefetch_states().await.unwrap();
    // The other replica: applies app a and records it.
    let other = env.engine();
    let r = push(&other, "a", &head).await;
    assert_eq!(r.outcome, Outcome::Applied);
    other.settle().await;
    let client = env.ns.client.clone();
    let written = driftless::reconcile::state::load(&client, &env.state_ns.name, "a")
        .await
        .unwrap();

    let job = driftless::queue::Job::new("a", None, driftless::queue::JobReason::MissedPush);
    let r = engine
        .run(&job, driftless::reconcile::RunOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Unchanged, "{r:?}");
    engine.settle().await;
    let after = driftless::reconcile::state::load(&client, &env.state_ns.name, "a")
        .await
        .unwrap();
    assert_eq!(after, written, "the other replica's state was changed");
    env.cleanup().await;
}

/// A sweep after a commit to one app applies that app and checks it alone: reading every
/// state again would cost more than the one app's own reads. The others are checked from the
/// one bulk read, with shared LISTs, and the commit is found in sync.
#[tokio::test]
async fn a_sweep_that_applies_one_app_reads_the_states_in_bulk_only_once() {
    let env = three_apps().await;
    env.repo
        .write("apps/b/all.yaml", &env.cm("b-one", "changed"));
    env.repo.commit("b changes");
    let (engine, calls) = counting_engine(&env).await;
    let metrics = driftless::metrics::Metrics::new();
    let apps: Vec<String> = ["a", "b", "c"].map(String::from).into();
    let verdicts = driftless::worker::sweep(&engine, &metrics, apps, 4).await;
    for (app, v) in &verdicts {
        assert_eq!(v, &Ok(false), "{app}: in sync");
    }
    engine.settle().await;
    assert_eq!(env.cm_value("b-one").await.as_deref(), Some("changed"));
    let made = calls.take();
    let bulk_reads: Vec<&String> = made
        .iter()
        .filter(|c| {
            c.starts_with("GET ")
                && c.contains(&format!("/namespaces/{}/configmaps?", env.state_ns.name))
                && c.contains("labelSelector=driftless.dev%2Fstate-of")
        })
        .collect();
    assert_eq!(
        bulk_reads.len(),
        1,
        "one bulk read of the states: {bulk_reads:#?}"
    );
    env.cleanup().await;
}

/// A state the sweep's bulk read cannot parse is left out of it, yet never taken for no
/// state: the app's run fails naming the parse error, and the ConfigMap is left as it is.
#[tokio::test]
async fn an_unreadable_state_fails_the_apps_run_by_name_and_is_left_alone() {
    a_spoiled_state_fails_the_apps_run_by_name("{not json").await;
}

/// The same for a state that parses but whose inventory, kept packed by the bulk read until
/// the app's run takes it, does not unpack ("not gzip", base64-encoded).
#[tokio::test]
async fn a_state_whose_packed_inventory_does_not_unpack_fails_the_run_by_name() {
    a_spoiled_state_fails_the_apps_run_by_name(
        r#"{"revision": null, "inventory_gz": "bm90IGd6aXA="}"#,
    )
    .await;
}

/// A state kept by the bulk read whose packed inventory does not unpack when the app's drift
/// check takes it: never checked as if it had no objects (that would say "in sync"), but
/// read alone, which fails naming the parse error; the other apps are checked as usual.
#[tokio::test]
async fn a_kept_state_whose_inventory_does_not_unpack_is_not_checked_as_empty() {
    let (env, _) = three_apps_committed().await;
    let apps: Vec<String> = ["a", "b", "c"].map(String::from).into();
    let metrics = driftless::metrics::Metrics::new();
    let engine = env.engine();
    let first = driftless::worker::sweep(&engine, &metrics, apps.clone(), 4).await;
    engine.settle().await;
    assert!(first.iter().all(|(_, v)| *v == Ok(false)), "{first:?}");
    let states: Api<ConfigMap> = Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    let name = driftless::reconcile::state::object_name("a");
    let stored = states.get(&name).await.unwrap().data.unwrap()["state.json"].clone();
    let mut spoiled: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert!(
        spoiled["inventory_gz"].is_string(),
        "stored packed: {stored}"
    );
    spoiled["inventory_gz"] = json!("bm90IGd6aXA=");
    let spoiled = spoiled.to_string();
    let patch = json!({"data": {"state.json": spoiled}});
    states
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();

    // A new process: its bulk read keeps a's state, at its head, with the spoiled inventory.
    let engine = env.engine();
    let verdicts = driftless::worker::sweep(&engine, &metrics, apps, 4).await;
    engine.settle().await;
    let message = only_a_failed_by_name_and_left_alone(&verdicts, &states, &spoiled).await;
    assert!(message.contains("inventory_gz"), "{message}");
    env.cleanup().await;
}

/// Asserts a sweep's verdicts over apps a, b and c when a's state was spoiled to `text`: a
/// failed naming the parse error, b and c are in sync, and a's state is left as it is.
/// Returns a's error.
async fn only_a_failed_by_name_and_left_alone(
    verdicts: &[(String, Result<bool, String>)],
    states: &Api<ConfigMap>,
    text: &str,
) -> String {
    let message = verdicts[0].1.clone().expect_err("a's spoiled state read");
    assert!(message.contains("state of app a (parse)"), "{message}");
    assert_eq!(verdicts[1].1, Ok(false), "b applied and in sync");
    assert_eq!(verdicts[2].1, Ok(false), "c applied and in sync");
    let kept = states
        .get(&driftless::reconcile::state::object_name("a"))
        .await
        .unwrap();
    assert_eq!(
        kept.data.unwrap()["state.json"],
        text,
        "the spoiled state was overwritten"
    );
    message
}

async fn a_spoiled_state_fails_the_apps_run_by_name(text: &str) {
    let (env, _) = three_apps_committed().await;
    let states: Api<ConfigMap> = Api::namespaced(env.ns.client.clone(), &env.state_ns.name);
    let spoiled: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": driftless::reconcile::state::object_name("a"),
            "labels": {driftless::reconcile::state::LABEL_STATE_OF: "a"},
        },
        "data": {"state.json": text},
    }))
    .unwrap();
    states.create(&Default::default(), &spoiled).await.unwrap();
    let engine = env.engine();
    let metrics = driftless::metrics::Metrics::new();
    let apps: Vec<String> = ["a", "b", "c"].map(String::from).into();
    let verdicts = driftless::worker::sweep(&engine, &metrics, apps, 4).await;
    engine.settle().await;
    only_a_failed_by_name_and_left_alone(&verdicts, &states, text).await;
    env.cleanup().await;
}
