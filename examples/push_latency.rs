//! Benchmark: push-to-applied latency for a one-file change in apps of 10, 100 and 1,000
//! objects, side by side in one run with
//!   (a) `kubectl apply --server-side -f <app dir>` of the same files, and
//!   (b) the floor: a minimal client doing only the unavoidable round trips back to back (one
//!       tree read and one blob read from the forge simulator, one server-side apply, one
//!       status post).
//! driftless is timed from the start of the job (the webhook's ack is measured separately in
//! the webhook benchmark) to the success status being posted. Needs the test control plane:
//! DRIFTLESS_TEST_KUBECONFIG (scripts/bench starts it). Prints Markdown table rows.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use support::{git, ms, namespace, percentile};

use driftless::queue::{Job, JobReason};
use driftless::reconcile::{Engine, Outcome, RunOptions};
use driftless::settings::Settings;
use driftless::simulator::{ForgeSimulator, SimConfig};
use kube::api::{Patch, PatchParams};
use kube::Api;

fn cm(i: usize, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i:04}\ndata:\n  value: \"{value}\"\n")
}

#[tokio::main]
async fn main() {
    let kubeconfig = std::env::var("DRIFTLESS_TEST_KUBECONFIG")
        .expect("DRIFTLESS_TEST_KUBECONFIG: start the test control plane (scripts/bench does)");
    let client = support::kube_client(&kubeconfig).await;
    let pushes: usize = std::env::var("BENCH_PUSHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let sim = ForgeSimulator::start(SimConfig {
        github_token: "t".into(),
        gitlab_token: "t".into(),
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("t");
    std::fs::write(&token, "t").unwrap();

    // BENCH_SIZES=100,1000 measures only those app sizes (all three by default).
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().parse().expect("BENCH_SIZES: numbers"))
                .collect()
        })
        .unwrap_or_else(|_| vec![10, 100, 1000]);
    for (size, kubectl_runs) in [(10usize, 20usize), (100, 10), (1000, 3)] {
        if !sizes.contains(&size) {
            continue;
        }
        let repo = tempfile::tempdir().unwrap();
        let dir = repo.path();
        git(dir, &["init", "-q", "-b", "main"]);
        for i in 0..size {
            let p = dir.join(format!("app/cm-{i:04}.yaml"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, cm(i, "v0")).unwrap();
        }
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-q", "-m", "initial"]);
        let name = format!("bench{size}-{run_id}");
        sim.add_repo(&format!("bench/{name}"), dir);
        let (ns_app, ns_kubectl, ns_floor, ns_state) = (
            format!("{name}-app"),
            format!("{name}-kubectl"),
            format!("{name}-floor"),
            format!("{name}-state"),
        );
        for ns in [&ns_app, &ns_kubectl, &ns_floor] {
            namespace(&client, ns).await;
        }
        let settings = Settings::from_toml_str(&format!(
            "[server]\npublic_url = \"https://driftless.example.com\"\n[kubernetes]\nstate_namespace = \"{ns_state}\"\n[forges.github]\napi_url = \"{}\"\ntoken_file = \"{t}\"\nwebhook_secret_file = \"{t}\"\n[[apps]]\nname = \"{name}\"\nforge = \"github\"\nrepo = \"bench/{name}\"\npath = \"app\"\nnamespace = \"{ns_app}\"\n",
            sim.github_api_url(),
            t = token.display()
        ))
        .unwrap();
        let engine = Engine::new(
            client.clone(),
            driftless::forge::from_settings(&settings).unwrap(),
            Arc::new(settings),
        );
        // As from a webhook: the revision pushed and the one the branch held before.
        let push = |rev: String, before: String| {
            Job::new(
                name.clone(),
                Some(rev),
                JobReason::Push {
                    delivery: None,
                    before,
                },
            )
        };
        let mut head = git(dir, &["rev-parse", "HEAD"]);
        assert_eq!(
            engine
                .run(&push(head.clone(), String::new()), RunOptions::default())
                .await
                .unwrap()
                .outcome,
            Outcome::Applied
        );
        // kubectl's first apply (and discovery cache) outside the measurement.
        let kubectl = |ns: &str| {
            let started = Instant::now();
            let out = Command::new("kubectl")
                .args([
                    "--kubeconfig",
                    &kubeconfig,
                    "apply",
                    "--server-side",
                    "--field-manager",
                    "kubectl-bench",
                    "-n",
                    ns,
                    "-f",
                ])
                .arg(dir.join("app"))
                .output()
                .expect("running kubectl");
            assert!(
                out.status.success(),
                "kubectl: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            started.elapsed()
        };
        kubectl(&ns_kubectl);

        let mut ours = Vec::new();
        let mut kube_times = Vec::new();
        let mut floor = Vec::new();
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(client.clone(), &ns_floor);
        for n in 0..pushes {
            let i = n % size;
            std::fs::write(
                dir.join(format!("app/cm-{i:04}.yaml")),
                cm(i, &format!("v{}", n + 1)),
            )
            .unwrap();
            git(dir, &["commit", "-q", "-am", "one file"]);
            let rev = git(dir, &["rev-parse", "HEAD"]);

            let started = Instant::now();
            let r = engine
                .run(&push(rev.clone(), head.clone()), RunOptions::default())
                .await
                .unwrap();
            head = rev.clone();
            ours.push(started.elapsed());
            assert_eq!(r.applied.len(), 1, "{:?}", r.applied);

            if n < kubectl_runs {
                kube_times.push(kubectl(&ns_kubectl));
            }

            // The floor: tree, blob, one apply, one status; back to back, nothing else.
            let blob_sha = git(dir, &["rev-parse", &format!("{rev}:app/cm-{i:04}.yaml")]);
            let started = Instant::now();
            let tree = http
                .get(format!(
                    "{}/repos/bench/{name}/git/trees/{rev}?recursive=1",
                    sim.github_api_url()
                ))
                .bearer_auth("t")
                .send()
                .await
                .unwrap();
            assert!(tree.status().is_success());
            let _ = tree.bytes().await.unwrap();
            let blob: serde_json::Value = http
                .get(format!(
                    "{}/repos/bench/{name}/git/blobs/{blob_sha}",
                    sim.github_api_url()
                ))
                .bearer_auth("t")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert!(blob["content"].is_string());
            let obj: serde_json::Value =
                serde_yaml::from_str(&cm(i, &format!("v{}", n + 1))).unwrap();
            cms.patch(
                &format!("cm-{i:04}"),
                &PatchParams::apply("floor").force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap();
            let st = http
                .post(format!(
                    "{}/repos/bench/{name}/statuses/{rev}",
                    sim.github_api_url()
                ))
                .bearer_auth("t")
                .json(&serde_json::json!({"state": "success", "context": "floor"}))
                .send()
                .await
                .unwrap();
            assert!(st.status().is_success());
            floor.push(started.elapsed());
        }
        let (o50, o95) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.95));
        let (f50, f95) = (percentile(&mut floor, 0.5), percentile(&mut floor, 0.95));
        let (k50, k95) = (
            percentile(&mut kube_times, 0.5),
            percentile(&mut kube_times, 0.95),
        );
        println!(
            "| push-to-applied, 1-file change in a {size}-object app: p50 / p95 over {pushes} pushes | {} / {} | floor: {} / {}; kubectl apply --server-side (whole app, {} runs): {} / {} | {:.2}× floor, {:.1}× faster than kubectl at p50 | ConfigMaps; status posted before the clock stops |",
            ms(o50), ms(o95), ms(f50), ms(f95), kube_times.len(), ms(k50), ms(k95),
            o50.as_secs_f64() / f50.as_secs_f64(),
            k50.as_secs_f64() / o50.as_secs_f64(),
        );
        let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        for ns in [&ns_app, &ns_kubectl, &ns_floor, &ns_state] {
            let _ = nsapi.delete(ns, &Default::default()).await;
        }
    }
    sim.stop().await;
}
