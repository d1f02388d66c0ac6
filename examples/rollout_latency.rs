//! Benchmark: push to applied measured to pods Ready on the real node (tests/cluster/up.sh
//! --with-node). Each push changes the image of a 2-replica Deployment of busybox web servers
//! (local registry, HTTP readiness probe every second), alternating between two tags;
//! driftless's run (tree and blob read, server-side apply, health wait, status) is set against
//! `kubectl apply --server-side -f <app dir>` followed by `kubectl rollout status` on a copy
//! of the app in another namespace, alternately in the same run. Needs
//! DRIFTLESS_TEST_NODE_KUBECONFIG and DRIFTLESS_TEST_REGISTRY (scripts/bench sets both).
//! Prints one Markdown table row.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::git;

use driftless::queue::{Job, JobReason};
use driftless::reconcile::{Engine, Outcome, RunOptions};
use driftless::settings::Settings;
use driftless::simulator::{ForgeSimulator, SimConfig};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;

fn deployment(registry: &str, tag: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  \
         selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    \
         spec:\n      containers:\n      - name: web\n        image: {registry}/busybox-httpd:{tag}\n        \
         readinessProbe: {{httpGet: {{path: /, port: 80}}, periodSeconds: 1}}\n"
    )
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// `kubectl apply --server-side` of the app directory, then `kubectl rollout status`.
fn kubectl_rollout(kubeconfig: &str, ns: &str, app: &Path) -> Duration {
    let started = Instant::now();
    let kubectl = |args: &[&str]| {
        let out = Command::new("kubectl")
            .args(["--kubeconfig", kubeconfig, "-n", ns])
            .args(args)
            .output()
            .expect("running kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let dir = app.display().to_string();
    kubectl(&[
        "apply",
        "--server-side",
        "--field-manager",
        "kubectl-bench",
        "-f",
        &dir,
    ]);
    kubectl(&["rollout", "status", "deployment/web", "--timeout", "120s"]);
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let kubeconfig = std::env::var("DRIFTLESS_TEST_NODE_KUBECONFIG").expect(
        "DRIFTLESS_TEST_NODE_KUBECONFIG: start the node cluster (tests/cluster/up.sh --with-node)",
    );
    let registry = std::env::var("DRIFTLESS_TEST_REGISTRY")
        .expect("DRIFTLESS_TEST_REGISTRY: the node cluster's registry, 127.0.0.1:25000");
    let client = support::kube_client(&kubeconfig).await;
    let pushes: u32 = std::env::var("BENCH_ROLLOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let sim = ForgeSimulator::start(SimConfig {
        github_token: "t".into(),
        gitlab_token: "t".into(),
    })
    .await
    .unwrap();
    let id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (ns_app, ns_kubectl, ns_state) = (
        format!("rollout-{id}-app"),
        format!("rollout-{id}-kubectl"),
        format!("rollout-{id}-state"),
    );
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    for ns in [&ns_app, &ns_kubectl] {
        let obj =
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        namespaces
            .patch(ns, &PatchParams::apply("bench"), &Patch::Apply(&obj))
            .await
            .unwrap();
    }

    let repo = tempfile::tempdir().unwrap();
    let dir = repo.path();
    let app = dir.join("app");
    std::fs::create_dir_all(&app).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    std::fs::write(app.join("web.yaml"), deployment(&registry, 1)).unwrap();
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "initial"]);
    sim.add_repo("bench/rollout", dir);
    let token = dir.join(".token");
    std::fs::write(&token, "t").unwrap();
    let settings = Settings::from_toml_str(&format!(
        "[server]\npublic_url = \"https://driftless.example.com\"\n[kubernetes]\nstate_namespace = \"{ns_state}\"\n[forges.github]\napi_url = \"{}\"\ntoken_file = \"{t}\"\nwebhook_secret_file = \"{t}\"\n[[apps]]\nname = \"rollout\"\nforge = \"github\"\nrepo = \"bench/rollout\"\npath = \"app\"\nnamespace = \"{ns_app}\"\nhealth_timeout = \"120s\"\n",
        sim.github_api_url(),
        t = token.display()
    ))
    .unwrap();
    let engine = Engine::new(
        client.clone(),
        driftless::forge::from_settings(&settings).unwrap(),
        Arc::new(settings),
    );
    let push = |rev: String, before: String| {
        Job::new(
            "rollout",
            Some(rev),
            JobReason::Push {
                delivery: None,
                before,
            },
        )
    };
    // The first rollout of each (pods created, images pulled once) is not measured.
    let mut head = git(dir, &["rev-parse", "HEAD"]);
    let first = engine
        .run(&push(head.clone(), String::new()), RunOptions::default())
        .await
        .unwrap();
    assert_eq!(first.outcome, Outcome::Applied);
    kubectl_rollout(&kubeconfig, &ns_kubectl, &app);

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for n in 0..pushes {
        let tag = if n % 2 == 0 { 2 } else { 1 };
        std::fs::write(app.join("web.yaml"), deployment(&registry, tag)).unwrap();
        git(dir, &["commit", "-q", "-am", "new image"]);
        let rev = git(dir, &["rev-parse", "HEAD"]);
        let started = Instant::now();
        let report = engine
            .run(&push(rev.clone(), head.clone()), RunOptions::default())
            .await
            .unwrap();
        ours.push(started.elapsed());
        assert_eq!(report.outcome, Outcome::Applied);
        head = rev;
        theirs.push(kubectl_rollout(&kubeconfig, &ns_kubectl, &app));
    }
    let (o, k) = (median(&mut ours), median(&mut theirs));
    println!(
        "| push-to-applied to pods Ready on a real node: image change of a 2-replica Deployment, median of {pushes} | {} | kubectl apply --server-side + kubectl rollout status: {} | {:.2}× kubectl | busybox httpd from the local registry, readiness probe every 1 s; clock to the success status (driftless) or rollout status's exit (kubectl) |",
        secs(o),
        secs(k),
        o.as_secs_f64() / k.as_secs_f64(),
    );
    for ns in [&ns_app, &ns_kubectl, &ns_state] {
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
    sim.stop().await;
}
