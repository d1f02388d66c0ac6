//! Benchmark: previews of pull requests. The real `driftless serve` with previews on, the forge
//! simulator sending `pull_request` webhooks and recording the statuses, the real control plane.
//! The clock runs from sending the webhook to the last `driftless/preview/<app>` status of the
//! request's head being recorded by the forge. Two requests: a one-file change in an app of 100
//! objects, and a change to one file of each of 20 apps of 20 objects. Each round pushes a new
//! head to the request (the first opens it). The baseline, in the same run: what a CI job does
//! for the same head, `kubectl diff --server-side` of each affected app's directory, one after
//! the other (the checkout is not timed, which favours the baseline).
//!
//! Needs the test control plane (DRIFTLESS_TEST_KUBECONFIG; scripts/bench starts it) and the
//! `driftless` binary beside this example (`cargo build --release --bins --examples`).
//! Prints Markdown table rows. BENCH_ROUNDS sets the rounds per request (default 5).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use driftless::simulator::{ForgeSimulator, RequestAction, RequestHook, SimConfig};
use support::{git, ms, namespace, percentile};

const REPO: &str = "bench/previews";
const SECRET: &str = "bench-secret";
/// The large app's objects, in files of ten.
const BIG_OBJECTS: usize = 100;
/// The small apps, and the objects of each (in two files of ten).
const SMALL_APPS: usize = 20;
const SMALL_OBJECTS: usize = 20;
/// How long one step may take before the benchmark gives up.
const STEP_DEADLINE: Duration = Duration::from_secs(120);

/// Ten objects of app `app`, file `file`: six ConfigMaps (the first holds `value`), two
/// Secrets, a headless Service and a ServiceAccount.
fn ten_objects(app: &str, file: usize, value: &str) -> String {
    let mut docs = Vec::new();
    for i in 0..6 {
        let v = if i == 0 { value } else { "fixed" };
        docs.push(format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {app}-f{file}-cm{i}\n  labels: {{app: {app}}}\ndata:\n  value: \"{v}\"\n  other: \"{i}\"\n"
        ));
    }
    for i in 0..2 {
        docs.push(format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {app}-f{file}-secret{i}\ntype: Opaque\ndata:\n  token: c2VjcmV0\n"
        ));
    }
    docs.push(format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {app}-f{file}-svc\nspec:\n  clusterIP: None\n  selector: {{app: {app}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n"
    ));
    docs.push(format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {app}-f{file}-sa\n"
    ));
    docs.join("---\n")
}

/// The repository and its apps: `big` of 100 objects, `s00`..`s19` of 20.
struct Layout {
    apps: Vec<(String, usize)>,
}

impl Layout {
    fn new() -> Layout {
        let mut apps = vec![("big".to_string(), BIG_OBJECTS / 10)];
        apps.extend((0..SMALL_APPS).map(|i| (format!("s{i:02}"), SMALL_OBJECTS / 10)));
        Layout { apps }
    }

    fn write(&self, repo: &Path) {
        for (app, files) in &self.apps {
            std::fs::create_dir_all(repo.join(app)).unwrap();
            for f in 0..*files {
                std::fs::write(
                    repo.join(app).join(format!("part-{f}.yaml")),
                    ten_objects(app, f, "0"),
                )
                .unwrap();
            }
        }
    }

    fn settings(&self, ns: &str) -> String {
        self.apps
            .iter()
            .map(|(app, _)| {
                format!("[[apps]]\nname = \"{app}\"\nforge = \"github\"\nrepo = \"{REPO}\"\npath = \"{app}\"\nnamespace = \"{ns}\"\n")
            })
            .collect()
    }
}

/// One request measured over rounds: its number, branch and the apps each head changes.
struct Request {
    number: u64,
    branch: &'static str,
    apps: Vec<String>,
}

struct Bench {
    sim: ForgeSimulator,
    dir: tempfile::TempDir,
    kubeconfig: String,
    ns: String,
    base: String,
    rounds: usize,
}

impl Bench {
    fn repo(&self) -> std::path::PathBuf {
        self.dir.path().join("repo")
    }

    /// Commits round `round`'s change on the request's branch (made from `main` first):
    /// the first ConfigMap of `part-0.yaml` of each of its apps gets a new value.
    fn head(&self, req: &Request, round: usize) -> String {
        let repo = self.repo();
        if round == 0 {
            git(&repo, &["checkout", "-q", "-b", req.branch, "main"]);
        } else {
            git(&repo, &["checkout", "-q", req.branch]);
        }
        for app in &req.apps {
            let value = format!("r{round}");
            std::fs::write(
                repo.join(app).join("part-0.yaml"),
                ten_objects(app, 0, &value),
            )
            .unwrap();
        }
        git(&repo, &["commit", "-q", "-am", &format!("round {round}")]);
        git(&repo, &["rev-parse", "HEAD"])
    }

    /// Statuses of `sha` under `driftless/preview/`, as `context state: description`.
    fn previews(&self, sha: &str) -> Vec<String> {
        self.sim
            .statuses(REPO, sha)
            .into_iter()
            .filter(|s| s.context.starts_with("driftless/preview/"))
            .map(|s| {
                format!(
                    "{} {}: {}",
                    s.context,
                    s.state,
                    s.description.unwrap_or_default()
                )
            })
            .collect()
    }

    /// Sends the request's webhook for `head` and times it to its last preview status; checks
    /// that each app's preview is exactly the one changed ConfigMap.
    async fn preview(&self, req: &Request, round: usize, head: &str) -> Duration {
        let hook = RequestHook {
            number: req.number,
            action: if round == 0 {
                RequestAction::Opened
            } else {
                RequestAction::Pushed
            },
            base: "main".into(),
            head_branch: req.branch.into(),
            head_sha: head.into(),
            fork: false,
        };
        let started = Instant::now();
        let code = self
            .sim
            .send_github_pull_request(&self.base, REPO, &hook, SECRET)
            .await
            .unwrap();
        assert_eq!(code.as_u16(), 202, "pull_request webhook of {head}");
        loop {
            if self.previews(head).len() >= req.apps.len() {
                break;
            }
            self.give_up_after(started, "the preview statuses");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = started.elapsed();
        let mut got = self.previews(head);
        got.sort();
        let want: Vec<String> = req
            .apps
            .iter()
            .map(|a| format!("driftless/preview/{a} success: 1 changed, 0 added, 0 pruned"))
            .collect();
        assert_eq!(got, want, "preview statuses of {head}");
        took
    }

    /// What a CI job does for the same head: `kubectl diff --server-side` of each app's
    /// directory in turn (each must find a difference).
    fn kubectl(&self, req: &Request) -> Duration {
        let started = Instant::now();
        for app in &req.apps {
            let code = support::kubectl_diff(&self.kubeconfig, &self.ns, &self.repo().join(app));
            assert_eq!(code, 1, "kubectl diff of {app}: 1 (differences) expected");
        }
        started.elapsed()
    }

    fn give_up_after(&self, started: Instant, what: &str) {
        if started.elapsed() > STEP_DEADLINE {
            let log =
                std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default();
            panic!("timed out waiting for {what}; serve log:\n{log}");
        }
    }

    /// Every round of one request: driftless's times and kubectl's, for the same heads.
    async fn request(&self, req: &Request) -> (Vec<Duration>, Vec<Duration>) {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..self.rounds {
            let head = self.head(req, round);
            ours.push(self.preview(req, round, &head).await);
            // The working tree is at the head: kubectl diffs the same files.
            theirs.push(self.kubectl(req));
        }
        git(&self.repo(), &["checkout", "-q", "main"]);
        (ours, theirs)
    }
}

#[tokio::main]
async fn main() {
    let kubeconfig = std::env::var("DRIFTLESS_TEST_KUBECONFIG")
        .expect("DRIFTLESS_TEST_KUBECONFIG: start the test control plane (scripts/bench does)");
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let client = support::kube_client(&kubeconfig).await;
    let id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (ns, state_ns) = (format!("previews-{id}"), format!("previews-{id}-state"));
    namespace(&client, &ns).await;

    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let layout = Layout::new();
    layout.write(&repo);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "apps"]);
    let main_head = git(&repo, &["rev-parse", "HEAD"]);
    let sim = ForgeSimulator::start(SimConfig {
        github_token: "t".into(),
        gitlab_token: "t".into(),
    })
    .await
    .unwrap();
    sim.add_repo(REPO, &repo);

    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let token = write("token", "t");
    let secret = write("secret", SECRET);
    let port = support::free_port();
    let settings = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"https://driftless.example.com\"\n\
         [kubernetes]\nstate_namespace = \"{state_ns}\"\n\
         [forges.github]\napi_url = \"{}\"\ntoken_file = \"{}\"\nwebhook_secret_file = \"{}\"\n\
         [previews]\nenabled = true\n{}",
        sim.github_api_url(),
        token.display(),
        secret.display(),
        layout.settings(&ns)
    );
    let config = write("driftless.toml", &settings);
    let base = format!("http://127.0.0.1:{port}");
    let mut serve =
        support::serve(&config, &kubeconfig, &dir.path().join("serve.log"), &base).await;
    let bench = Bench {
        sim,
        dir,
        kubeconfig,
        ns: ns.clone(),
        base,
        rounds,
    };
    // The start-up catch-up applies every app from `main`.
    let started = Instant::now();
    while bench
        .sim
        .statuses(REPO, &main_head)
        .iter()
        .filter(|s| s.state == "success")
        .count()
        < layout.apps.len()
    {
        bench.give_up_after(started, "the start-up catch-up of every app");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let one = Request {
        number: 1,
        branch: "one-file",
        apps: vec!["big".into()],
    };
    let twenty = Request {
        number: 2,
        branch: "twenty-apps",
        apps: (0..SMALL_APPS).map(|i| format!("s{i:02}")).collect(),
    };
    for (req, what) in [
        (
            &one,
            format!("a 1-file change in an app of {BIG_OBJECTS} objects"),
        ),
        (
            &twenty,
            format!("a change to {SMALL_APPS} apps of {SMALL_OBJECTS} objects (one file each)"),
        ),
    ] {
        let (mut ours, mut theirs) = bench.request(req).await;
        let (p50, p90) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.9));
        let k50 = percentile(&mut theirs, 0.5);
        let objects: usize = req.apps.len()
            * if req.number == 1 {
                BIG_OBJECTS
            } else {
                SMALL_OBJECTS
            };
        let log = std::fs::read_to_string(bench.dir.path().join("serve.log")).unwrap_or_default();
        println!(
            "| pull request preview, {what}: webhook to last preview status, median of {rounds} heads | {} (p90 {}) | `kubectl diff --server-side` of the {} app director{} in sequence: {} | {:.1}× faster | the real `serve`; each head renders all {objects} objects of the affected apps and dry-runs those the merge would write (the changed ConfigMap of each app: the others are what was applied) against the live cluster, posts one status per app, then the comment; kubectl diffs every object; the first round opens the request, the others push to it; median by step: {} |",
            ms(p50),
            ms(p90),
            req.apps.len(),
            if req.apps.len() == 1 { "y" } else { "ies" },
            ms(k50),
            k50.as_secs_f64() / p50.as_secs_f64(),
            step_medians(&log, req.number),
        );
    }
    serve.kill().await.expect("stopping serve");
    bench.sim.stop().await;
    let nsapi: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    for n in [&ns, &state_ns] {
        let _ = nsapi.delete(n, &Default::default()).await;
    }
}

/// The median of each step of the request's previews, from serve's "preview steps" lines.
fn step_medians(log: &str, number: u64) -> String {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("preview steps"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["number"].as_u64() == Some(number))
        .collect();
    if lines.is_empty() {
        return "not logged".into();
    }
    [
        ("compare and states", "affected_ms"),
        ("fetch, render and dry-run", "dry_run_ms"),
        ("keeping the preview", "store_ms"),
        ("statuses", "statuses_ms"),
        ("comment (after the last status)", "comment_ms"),
    ]
    .iter()
    .map(|(name, key)| {
        let mut v: Vec<Duration> = lines
            .iter()
            .filter_map(|l| l["fields"][*key].as_f64())
            .map(|m| Duration::from_secs_f64(m / 1e3))
            .collect();
        format!("{name} {}", ms(percentile(&mut v, 0.5)))
    })
    .collect::<Vec<_>>()
    .join(", ")
}
