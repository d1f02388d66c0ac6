//! Benchmark: one drift sweep over 100 apps of 20 objects each, side by side in one run with
//! `kubectl diff --server-side -f <app dir>` over the same manifests, and the verdicts of both
//! on a seeded corpus of drifts (11 kinds of change, plus 2 edits that are not drift). Needs
//! the test control plane (DRIFTLESS_TEST_KUBECONFIG). Prints Markdown table rows.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;
use support::git;

use driftless::queue::{Job, JobReason};
use driftless::reconcile::{Engine, Outcome, RunOptions};
use driftless::settings::Settings;
use driftless::simulator::{ForgeSimulator, SimConfig};
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::Api;
use serde_json::json;

const APPS: usize = 100;

/// 20 objects: 12 ConfigMaps, 2 Secrets, 2 Services, 2 ServiceAccounts, a Role, a RoleBinding.
fn app_manifests(a: usize) -> String {
    let mut docs = Vec::new();
    for i in 0..12 {
        docs.push(format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a{a}-cm{i}\n  labels: {{tier: backend}}\ndata:\n  key: \"value-{i}\"\n  other: \"x\"\n"));
    }
    for i in 0..2 {
        docs.push(format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: a{a}-secret{i}\ntype: Opaque\ndata:\n  token: c2VjcmV0\n"));
        docs.push(format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: a{a}-svc{i}\n  annotations: {{owner: team-{a}}}\nspec:\n  clusterIP: None\n  selector: {{app: a{a}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n"));
        docs.push(format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a{a}-sa{i}\n"
        ));
    }
    docs.push(format!("apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: a{a}-reader\nrules:\n- apiGroups: [\"\"]\n  resources: [configmaps]\n  verbs: [get, list]\n"));
    docs.push(format!("apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: a{a}-reader\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: a{a}-reader}}\nsubjects:\n- {{kind: ServiceAccount, name: a{a}-sa0}}\n"));
    docs.join("---\n")
}

fn ar(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: if group.is_empty() {
            version.into()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.into(),
        plural: plural.into(),
    }
}

#[tokio::main]
async fn main() {
    let kubeconfig = std::env::var("DRIFTLESS_TEST_KUBECONFIG")
        .expect("DRIFTLESS_TEST_KUBECONFIG: start the test control plane (scripts/bench does)");
    let client = support::kube_client(&kubeconfig).await;
    let id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let ns = format!("sweep-{id}");
    let state_ns = format!("sweep-{id}-state");
    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    nsapi
        .patch(
            &ns,
            &PatchParams::apply("bench"),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            ),
        )
        .await
        .unwrap();

    let repo = tempfile::tempdir().unwrap();
    let dir = repo.path();
    git(dir, &["init", "-q", "-b", "main"]);
    for a in 0..APPS {
        let p = dir.join(format!("apps/a{a}/all.yaml"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, app_manifests(a)).unwrap();
    }
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "apps"]);
    let head = git(dir, &["rev-parse", "HEAD"]);
    let sim = ForgeSimulator::start(SimConfig {
        github_token: "t".into(),
        gitlab_token: "t".into(),
    })
    .await
    .unwrap();
    sim.add_repo("bench/sweep", dir);
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("t");
    std::fs::write(&token, "t").unwrap();
    let mut text = format!(
        "[kubernetes]\nstate_namespace = \"{state_ns}\"\n[forges.github]\napi_url = \"{}\"\ntoken_file = \"{t}\"\nwebhook_secret_file = \"{t}\"\n",
        sim.github_api_url(),
        t = token.display()
    );
    for a in 0..APPS {
        text.push_str(&format!("[[apps]]\nname = \"a{a}\"\nforge = \"github\"\nrepo = \"bench/sweep\"\npath = \"apps/a{a}\"\nnamespace = \"{ns}\"\ndrift = \"alert\"\n"));
    }
    let settings = Settings::from_toml_str(&text).unwrap();
    let engine = Engine::new(
        client.clone(),
        driftless::forge::from_settings(&settings).unwrap(),
        Arc::new(settings),
    );
    for a in 0..APPS {
        let job = Job::new(format!("a{a}"), Some(head.clone()), JobReason::Manual);
        assert_eq!(
            engine
                .run(&job, RunOptions::default())
                .await
                .unwrap()
                .outcome,
            Outcome::Applied
        );
    }

    // The seeded corpus: eleven kinds of drift in eleven apps, two edits that are not drift.
    let dynamic = |r: &ApiResource| Api::<DynamicObject>::namespaced_with(client.clone(), &ns, r);
    let cm = ar("", "v1", "ConfigMap", "configmaps");
    let secret = ar("", "v1", "Secret", "secrets");
    let svc = ar("", "v1", "Service", "services");
    let sa = ar("", "v1", "ServiceAccount", "serviceaccounts");
    let role = ar("rbac.authorization.k8s.io", "v1", "Role", "roles");
    let rb = ar(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
    );
    let edit = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    let merge = |r: &ApiResource, name: String, body: serde_json::Value| {
        let api = dynamic(r);
        let edit = edit.clone();
        async move {
            api.patch(&name, &edit, &Patch::Merge(body)).await.unwrap();
        }
    };
    merge(&cm, "a3-cm0".into(), json!({"data": {"key": "changed"}})).await;
    dynamic(&cm)
        .delete("a7-cm5", &DeleteParams::default())
        .await
        .unwrap();
    merge(
        &cm,
        "a11-cm2".into(),
        json!({"metadata": {"labels": {"tier": "frontend"}}}),
    )
    .await;
    merge(
        &secret,
        "a19-secret1".into(),
        json!({"data": {"token": "b3RoZXI="}}),
    )
    .await;
    merge(&svc, "a23-svc0".into(), json!({"spec": {"ports": [{"name": "http", "port": 81, "targetPort": 8080, "protocol": "TCP"}]}})).await;
    merge(
        &svc,
        "a31-svc1".into(),
        json!({"spec": {"selector": {"app": "intruder"}}}),
    )
    .await;
    dynamic(&sa)
        .delete("a42-sa1", &DeleteParams::default())
        .await
        .unwrap();
    merge(&role, "a55-reader".into(), json!({"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "delete"]}]})).await;
    merge(
        &rb,
        "a63-reader".into(),
        json!({"subjects": [{"kind": "ServiceAccount", "name": "a63-sa1"}]}),
    )
    .await;
    merge(&cm, "a77-cm9".into(), json!({"data": {"other": null}})).await;
    merge(
        &svc,
        "a88-svc0".into(),
        json!({"metadata": {"annotations": {"owner": "someone-else"}}}),
    )
    .await;
    // Not drift: fields driftless does not set, owned by someone else.
    merge(
        &cm,
        "a90-cm1".into(),
        json!({"metadata": {"labels": {"added-by": "oncall"}}}),
    )
    .await;
    merge(&cm, "a95-cm4".into(), json!({"data": {"extra": "kept"}})).await;
    let truth: BTreeSet<usize> = [3, 7, 11, 19, 23, 31, 42, 55, 63, 77, 88]
        .into_iter()
        .collect();

    // driftless: one sweep as `drift --once` runs it, four apps at a time (alert: nothing is
    // changed). A first sweep records the findings; the measured one is a steady-state sweep.
    let sweep = || async {
        use futures::StreamExt;
        let engine = &engine;
        let reports: Vec<_> = futures::stream::iter(0..APPS)
            .map(|a| async move {
                (
                    a,
                    engine.check_drift(&format!("a{a}"), false).await.unwrap(),
                )
            })
            .buffered(driftless::worker::WORKERS)
            .collect()
            .await;
        reports
    };
    let _ = sweep().await;
    let started = Instant::now();
    let reports = sweep().await;
    let ours_time = started.elapsed();
    let requests: usize = reports.iter().map(|(_, r)| r.api_requests).sum();
    let ours: BTreeSet<usize> = reports
        .iter()
        .filter(|(_, r)| !r.drifted.is_empty())
        .map(|(a, _)| *a)
        .collect();

    // kubectl diff --server-side over the same manifests, app by app.
    let started = Instant::now();
    let mut theirs = BTreeSet::new();
    let mut kubectl_errors = 0;
    for a in 0..APPS {
        match support::kubectl_diff(&kubeconfig, &ns, &dir.join(format!("apps/a{a}"))) {
            0 => {}
            1 => {
                theirs.insert(a);
            }
            // kubectl diff fails outright when the server rejects the dry-run (e.g. a port
            // list made invalid by the merge); a person would notice, so it counts as found.
            _ => {
                theirs.insert(a);
                kubectl_errors += 1;
            }
        }
    }
    let kubectl_time = started.elapsed();

    let verdict = |found: &BTreeSet<usize>| {
        let misses = truth.difference(found).count();
        let false_pos = found.difference(&truth).count();
        format!(
            "{} found, {misses} missed, {false_pos} false positives",
            found.intersection(&truth).count()
        )
    };
    println!(
        "| drift sweep: 100 apps × 20 objects, 11 seeded drifts + 2 non-drift edits | {:.2} s, {requests} API requests; {} | kubectl diff --server-side per app dir: {:.2} s; {} ({kubectl_errors} of them as errors) | {:.1}× faster | driftless: steady-state sweep, 4 apps at a time as `drift --once` runs; one LIST per kind and namespace, dry-run only for suspects |",
        ours_time.as_secs_f64(),
        verdict(&ours),
        kubectl_time.as_secs_f64(),
        verdict(&theirs),
        kubectl_time.as_secs_f64() / ours_time.as_secs_f64(),
    );
    for n in [&ns, &state_ns] {
        let _ = nsapi.delete(n, &Default::default()).await;
    }
    sim.stop().await;
}
