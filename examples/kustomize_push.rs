//! Benchmark: a one-file change in a Kustomize base shared by two overlays of 50 objects each,
//! side by side in one run with what a push pipeline does for the same change:
//! `git clone --depth 1` + `kubectl kustomize` (Kustomize v5, bundled) + `kubectl apply
//! --server-side` of both overlays. Also counts the forge requests of the push against their
//! floor, the render time per app, and the renders a push touching only `docs/` avoids.
//! driftless runs both apps' jobs at once, as two workers would, from the start of the jobs
//! to both success statuses posted and states saved. Needs the test control plane:
//! DRIFTLESS_TEST_KUBECONFIG (scripts/bench starts it). Prints Markdown table rows.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{git, ms, namespace, percentile};

use driftless::queue::{Job, JobReason};
use driftless::reconcile::{Engine, Outcome, RunOptions};
use driftless::settings::Settings;
use driftless::simulator::{ForgeSimulator, SimConfig};
use kube::Api;

const OBJECTS: usize = 50;
const OVERLAYS: [&str; 2] = ["prod", "staging"];

fn cm(i: usize, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i:02}\ndata:\n  value: \"{value}\"\n")
}

/// The pipeline's job for one push: a shallow clone, then build and apply each overlay.
fn pipeline(kubeconfig: &str, repo: &std::path::Path, namespaces: &[String]) -> Duration {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let clone = work.path().join("clone");
    let out = Command::new("git")
        .args(["clone", "-q", "--depth", "1"])
        .arg(format!("file://{}", repo.display()))
        .arg(&clone)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git clone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (overlay, ns) in OVERLAYS.iter().zip(namespaces) {
        let built = Command::new("kubectl")
            .arg("kustomize")
            .arg(clone.join("envs").join(overlay))
            .output()
            .expect("kubectl");
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let file = work.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &built.stdout).unwrap();
        let out = Command::new("kubectl")
            .args(["--kubeconfig", kubeconfig, "apply", "--server-side"])
            .args(["--field-manager", "pipeline-bench", "-n", ns, "-f"])
            .arg(&file)
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let kubeconfig = std::env::var("DRIFTLESS_TEST_KUBECONFIG")
        .expect("DRIFTLESS_TEST_KUBECONFIG: start the test control plane (scripts/bench does)");
    let client = support::kube_client(&kubeconfig).await;
    let pushes: usize = std::env::var("BENCH_PUSHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let pipeline_runs = 5.min(pushes);
    let sim = ForgeSimulator::start(SimConfig {
        github_token: "t".into(),
        gitlab_token: "t".into(),
    })
    .await
    .unwrap();
    let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("t");
    std::fs::write(&token, "t").unwrap();

    let repo = tempfile::tempdir().unwrap();
    let dir = repo.path();
    git(dir, &["init", "-q", "-b", "main"]);
    let write = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    let mut base = String::from("resources:\n");
    for i in 0..OBJECTS {
        write(&format!("base/shared/cm-{i:02}.yaml"), &cm(i, "v0"));
        base.push_str(&format!("- cm-{i:02}.yaml\n"));
    }
    write("base/shared/kustomization.yaml", &base);
    write("docs/README.md", "How we deploy.\n");
    let name = format!("kbench-{run_id}");
    let ns = |what: &str| format!("{name}-{what}");
    let mut apps = String::new();
    for overlay in OVERLAYS {
        write(
            &format!("envs/{overlay}/kustomization.yaml"),
            &format!("namePrefix: {overlay}-\nresources:\n- ../../base/shared\nlabels:\n- pairs:\n    env: {overlay}\n"),
        );
        apps.push_str(&format!(
            "[[apps]]\nname = \"{overlay}\"\nforge = \"github\"\nrepo = \"bench/{name}\"\npath = \"envs/{overlay}\"\nnamespace = \"{}\"\n",
            ns(overlay)
        ));
    }
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "initial"]);
    sim.add_repo(&format!("bench/{name}"), dir);
    let pipeline_ns: Vec<String> = OVERLAYS.iter().map(|o| ns(&format!("{o}-pipe"))).collect();
    for n in OVERLAYS.iter().map(|o| ns(o)).chain(pipeline_ns.clone()) {
        namespace(&client, &n).await;
    }
    let settings = Settings::from_toml_str(&format!(
        "[server]\npublic_url = \"https://driftless.example.com\"\n[kubernetes]\nstate_namespace = \"{}\"\n[forges.github]\napi_url = \"{}\"\ntoken_file = \"{t}\"\nwebhook_secret_file = \"{t}\"\n[render]\nkustomize_command = [\"kubectl\", \"kustomize\"]\n{apps}",
        ns("state"),
        sim.github_api_url(),
        t = token.display()
    ))
    .unwrap();
    let engine = Engine::new(
        client.clone(),
        driftless::forge::from_settings(&settings).unwrap(),
        Arc::new(settings),
    );
    let push = |app: &str, rev: &str, before: &str| {
        Job::new(
            app.to_string(),
            Some(rev.to_string()),
            JobReason::Push {
                delivery: None,
                before: before.to_string(),
            },
        )
    };
    let both = |rev: String, before: String| {
        let engine = &engine;
        async move {
            let (ja, jb) = (
                push(OVERLAYS[0], &rev, &before),
                push(OVERLAYS[1], &rev, &before),
            );
            let (a, b) = tokio::join!(
                engine.run(&ja, RunOptions::default()),
                engine.run(&jb, RunOptions::default())
            );
            [a.unwrap(), b.unwrap()]
        }
    };
    let mut head = git(dir, &["rev-parse", "HEAD"]);
    for r in both(head.clone(), String::new()).await {
        assert_eq!(r.outcome, Outcome::Applied);
        assert_eq!(r.objects, OBJECTS);
    }
    // The pipeline's first apply (and kubectl's discovery cache) outside the measurement.
    pipeline(&kubeconfig, dir, &pipeline_ns);

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut requests = Vec::new();
    let builds_before = engine.renderer().builds();
    for n in 0..pushes {
        let i = n % OBJECTS;
        write(
            &format!("base/shared/cm-{i:02}.yaml"),
            &cm(i, &format!("v{}", n + 1)),
        );
        git(dir, &["commit", "-q", "-am", "one file in the base"]);
        let rev = git(dir, &["rev-parse", "HEAD"]);
        sim.clear_requests();
        let started = Instant::now();
        for r in both(rev.clone(), head.clone()).await {
            assert_eq!(r.outcome, Outcome::Applied);
            assert_eq!(r.applied.len(), 1, "{:?}", r.applied);
        }
        ours.push(started.elapsed());
        requests.push(sim.requests().len());
        head = rev;
        if n < pipeline_runs {
            theirs.push(pipeline(&kubeconfig, dir, &pipeline_ns));
        }
    }
    let renders = engine.renderer().builds() - builds_before;
    let mut render_times = engine.renderer().build_times();
    let render_times = render_times.split_off(render_times.len() - renders as usize);
    let mut render_times = render_times;

    // A push touching only docs/: neither overlay renders or fetches a blob.
    write("docs/README.md", "How we deploy, with pictures.\n");
    git(dir, &["commit", "-q", "-am", "docs"]);
    let rev = git(dir, &["rev-parse", "HEAD"]);
    sim.clear_requests();
    let builds = engine.renderer().builds();
    for r in both(rev.clone(), head.clone()).await {
        assert_eq!(r.outcome, Outcome::Unchanged);
    }
    let docs_renders = engine.renderer().builds() - builds;
    let docs_requests = sim.requests();
    let docs_blobs = docs_requests
        .iter()
        .filter(|r| r.route.contains("/blobs/"))
        .count();

    let (o50, o95) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.95));
    let (p50, p95) = (percentile(&mut theirs, 0.5), percentile(&mut theirs, 0.95));
    let (r50, r95) = (
        percentile(&mut render_times, 0.5),
        percentile(&mut render_times, 0.95),
    );
    requests.sort();
    let req50 = requests[requests.len() / 2];
    println!(
        "| Kustomize push-to-applied: 1-file change in a base shared by two {OBJECTS}-object overlays, p50 / p95 over {pushes} pushes | {} / {} | push pipeline (`git clone --depth 1` + `kubectl kustomize` + `kubectl apply --server-side`, both overlays, {} runs): {} / {} | {:.1}× faster at p50 (goal ≥ 10×) | both apps' jobs at once; each renders its overlay with kubectl's Kustomize v5 and applies the 1 changed object; statuses posted and states saved before the clock stops |",
        ms(o50), ms(o95), theirs.len(), ms(p50), ms(p95),
        p50.as_secs_f64() / o50.as_secs_f64(),
    );
    println!(
        "| Kustomize push: forge requests and render time | {req50} requests per push (median); render p50 / p95: {} / {} per app ({renders} renders) | floor: 1 tree + 1 changed blob + 2 success statuses = 4 requests | {:.2}× floor | driftless also posts a pending status per app (2 more), and the two jobs, started together, each read the commit's tree and the changed blob before the other has cached them; the unchanged kustomization blobs come from the cache |",
        ms(r50), ms(r95),
        req50 as f64 / 4.0,
    );
    println!(
        "| Kustomize push touching only `docs/`, two overlays | {docs_renders} renders, {docs_blobs} blob requests, {} requests in all | floor: the commit's tree (1 request) | {} renders avoided | the worker compares each app's input SHAs with the applied ones and stops there (each job reads the commit's tree once) |",
        docs_requests.len(),
        OVERLAYS.len() as u64 - docs_renders,
    );
    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    for n in OVERLAYS
        .iter()
        .map(|o| ns(o))
        .chain(pipeline_ns)
        .chain([ns("state")])
    {
        let _ = nsapi.delete(&n, &Default::default()).await;
    }
    sim.stop().await;
}
