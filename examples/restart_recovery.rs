//! Benchmark: crash recovery. The real `driftless serve` is `kill -9`ed right after it
//! acknowledged a push (202) and took the app's Lease for the run; it is restarted at once, and
//! the clock runs from the restart to the pushed commit's `success` status. The restarted
//! process finds the dead holder's Lease and takes it over once it has stayed unchanged for
//! one Lease duration by its own clock, then applies. Baseline, in the same run and through
//! the same binary: a plain push to applied (webhook sent to `success` status).
//!
//! Needs the test control plane (DRIFTLESS_TEST_KUBECONFIG; scripts/bench starts it) and the
//! `driftless` binary beside this example (`cargo build --release --bins --examples`).
//! Prints Markdown table rows. BENCH_KILLS sets the number of kill rounds (default 5).

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use driftless::simulator::{Fault, FaultKind, ForgeSimulator, SimConfig};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use support::git;

const REPO: &str = "bench/restart";
const SECRET: &str = "bench-secret";
/// Plain pushes measured for the baseline.
const BASELINE_PUSHES: usize = 10;
/// How long one step may take before the benchmark gives up: far beyond one Lease duration.
const STEP_DEADLINE: Duration = Duration::from_secs(180);

fn cm(value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  value: \"{value}\"\n")
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The stage: a git repository on the forge simulator, settings for one app, and the
/// `serve` processes started over it.
struct Bench {
    client: Client,
    sim: ForgeSimulator,
    dir: tempfile::TempDir,
    config: PathBuf,
    kubeconfig: String,
    base: String,
    state_ns: String,
    namespaces: Vec<String>,
    head: String,
    pushes: usize,
}

impl Bench {
    async fn start(kubeconfig: String) -> Bench {
        let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        let client = Client::try_from(config).unwrap();
        let id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let (app_ns, state_ns) = (format!("restart-{id}"), format!("restart-{id}-state"));
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": app_ns}});
        namespaces
            .patch(&app_ns, &PatchParams::apply("bench"), &Patch::Apply(&ns))
            .await
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(repo.join("app")).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("app/settings.yaml"), cm("0")).unwrap();
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", "start"]);
        let head = git(&repo, &["rev-parse", "HEAD"]);
        let sim = ForgeSimulator::start(SimConfig {
            github_token: "t".into(),
            gitlab_token: "t".into(),
        })
        .await
        .unwrap();
        sim.add_repo(REPO, &repo);
        let port = support::free_port();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let token = write("token", "t");
        let secret = write("secret", SECRET);
        // The default lease duration (15s): what a user gets.
        let settings = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"https://driftless.example.com\"\n\
             [kubernetes]\nstate_namespace = \"{state_ns}\"\n\
             [forges.github]\napi_url = \"{}\"\ntoken_file = \"{token}\"\nwebhook_secret_file = \"{secret}\"\n\
             [[apps]]\nname = \"app\"\nforge = \"github\"\nrepo = \"{REPO}\"\npath = \"app\"\nnamespace = \"{app_ns}\"\n",
            sim.github_api_url()
        );
        let config = PathBuf::from(write("driftless.toml", &settings));
        Bench {
            client,
            sim,
            dir,
            config,
            kubeconfig,
            base: format!("http://127.0.0.1:{port}"),
            state_ns: state_ns.clone(),
            namespaces: vec![app_ns, state_ns],
            head,
            pushes: 0,
        }
    }

    /// Starts `driftless serve` and waits until it answers.
    async fn serve(&self) -> tokio::process::Child {
        support::serve(
            &self.config,
            &self.kubeconfig,
            &self.dir.path().join("serve.log"),
            &self.base,
        )
        .await
    }

    /// Commits a one-file change and sends its push webhook; returns the commit.
    async fn push(&mut self) -> String {
        self.pushes += 1;
        let repo = self.dir.path().join("repo");
        std::fs::write(repo.join("app/settings.yaml"), cm(&self.pushes.to_string())).unwrap();
        git(&repo, &["commit", "-q", "-am", "one file"]);
        let rev = git(&repo, &["rev-parse", "HEAD"]);
        let code = self
            .sim
            .send_github_push(&self.base, REPO, "main", &self.head, &rev, SECRET)
            .await
            .unwrap();
        assert_eq!(code.as_u16(), 202, "push of {rev}");
        self.head = rev.clone();
        rev
    }

    async fn applied(&self, rev: &str) -> bool {
        self.sim
            .statuses(REPO, rev)
            .iter()
            .any(|s| s.state == "success")
    }

    async fn wait<F, Fut>(&self, what: &str, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + STEP_DEADLINE;
        while !done().await {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default();
                panic!("timed out waiting for {what}; serve log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Who holds the app's Lease (empty when nobody does: no holder, or one whose run's
    /// record released it).
    async fn lease_holder(&self) -> String {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.state_ns);
        let Some(lease) = leases.get_opt("driftless-app-app").await.unwrap() else {
            return String::new();
        };
        let released =
            driftless::reconcile::state::released_lease(&self.client, &self.state_ns, "app").await;
        if released.is_some() && released == driftless::reconcile::lease::token(&lease) {
            return String::new();
        }
        lease
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    }

    async fn cleanup(self) {
        self.sim.stop().await;
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        for ns in &self.namespaces {
            let _ = namespaces.delete(ns, &Default::default()).await;
        }
    }
}

#[tokio::main]
async fn main() {
    let kubeconfig = std::env::var("DRIFTLESS_TEST_KUBECONFIG")
        .expect("DRIFTLESS_TEST_KUBECONFIG: start the test control plane (scripts/bench does)");
    let kills: usize = std::env::var("BENCH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut bench = Bench::start(kubeconfig).await;
    let mut serve = bench.serve().await;
    let start = bench.head.clone();
    bench
        .wait("the start-up catch-up", || bench.applied(&start))
        .await;

    // Baseline: push to applied through the same binary, nothing killed.
    let mut plain = Vec::new();
    for _ in 0..BASELINE_PUSHES {
        let started = Instant::now();
        let rev = bench.push().await;
        bench.wait("a plain push", || bench.applied(&rev)).await;
        plain.push(started.elapsed());
    }

    let mut restarts = Vec::new();
    for _ in 0..kills {
        // The forge answers the run's blob read slowly, so the run is still going (holding
        // the Lease, nothing applied) when the process dies.
        bench.sim.inject(Fault {
            forge: Some("github"),
            path_contains: "/git/blobs/".into(),
            kind: FaultKind::Latency(Duration::from_secs(5)),
            times: 1,
        });
        let rev = bench.push().await;
        bench
            .wait("the run to take the Lease", || async {
                !bench.lease_holder().await.is_empty()
            })
            .await;
        serve.kill().await.expect("kill -9 serve");
        assert!(!bench.applied(&rev).await, "applied before the kill");
        // Killed before its blob read reached the forge: the slow answer is not for the
        // restarted process.
        bench.sim.clear_faults();
        let started = Instant::now();
        serve = bench.serve().await;
        bench
            .wait("the restarted serve to apply the push", || {
                bench.applied(&rev)
            })
            .await;
        restarts.push(started.elapsed());
    }
    serve.kill().await.expect("stopping serve");

    let (p, r) = (median(&mut plain), median(&mut restarts));
    let lease = Duration::from_secs(15);
    println!(
        "| restart after `kill -9` mid-run to applied (1-file push): median of {kills} | {:.1} s (max {:.1} s) | plain push to applied through the same binary, median of {BASELINE_PUSHES}: {:.0} ms | {:.0}× the plain push; {:.2}× the 15 s Lease duration | killed right after the 202 with the app's Lease held; the restarted process takes the dead holder's Lease over once it stayed unchanged for one duration by its own clock, then applies; clock from the restart to the `success` status |",
        r.as_secs_f64(),
        restarts.iter().max().unwrap().as_secs_f64(),
        p.as_secs_f64() * 1000.0,
        r.as_secs_f64() / p.as_secs_f64(),
        r.as_secs_f64() / lease.as_secs_f64(),
    );
    bench.cleanup().await;
}
