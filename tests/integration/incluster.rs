//! driftless itself in the node cluster, installed from deploy/ as a user would: the image
//! tests/cluster/driftless-image.sh built from this checkout, `kubectl apply -k` of an overlay
//! of deploy/ that only swaps the image, the settings (pointing at the forge simulator, bound on
//! the node's IP so that pods reach it) and two API versions this 1.20 cluster lacks. Every
//! write then happens with the ServiceAccount's least-privilege rights from deploy/base/rbac.yaml.
//!
//! One test, in stages, because the install owns fixed names (namespaces `driftless` and
//! `demo`, cluster-wide RBAC) that two tests cannot share; a lock file next to the node
//! cluster's kubeconfig keeps two test processes on one machine from installing at once.

use std::path::Path;
use std::time::{Duration, Instant};

use driftless::reconcile::state::{self, AppState};
use driftless::simulator::{ForgeSimulator, SimConfig};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;

use crate::support::cluster::{self, Cluster, TestNamespace};
use crate::support::git::GitRepo;

/// The image reference tests/cluster/driftless-image.sh printed.
const IMAGE_ENV: &str = "DRIFTLESS_TEST_IMAGE";
const REPO: &str = "acme/deploy";
/// The receiver's pods.
const RECEIVER: &str = "app.kubernetes.io/name=driftless,app.kubernetes.io/component=receiver";
/// Generous: pulling the image and starting pods on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(180);

fn image() -> String {
    std::env::var(IMAGE_ENV).unwrap_or_else(|_| {
        panic!(
            "{IMAGE_ENV} is not set: run the suite with scripts/test, or build and push the image \
             with tests/cluster/driftless-image.sh and export {IMAGE_ENV} to the reference it prints"
        )
    })
}

/// `kubectl` against the node cluster; panics with its output when it fails.
fn kubectl(args: &[&str]) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cluster::node_kubeconfig())
        .args(args)
        .output()
        .expect("running kubectl (it must be on PATH)");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The last lines each driftless container logged, for failure messages. Read from the
/// kubelet's log files on this host: `kubectl logs` cannot reach this kubelet (the API server
/// cannot resolve the node's name).
fn logs() -> String {
    let mut out = String::new();
    let Ok(pods) = std::fs::read_dir("/var/log/pods") else {
        return "(no /var/log/pods)".into();
    };
    for pod in pods.flatten() {
        if !pod.file_name().to_string_lossy().starts_with("driftless_") {
            continue;
        }
        for container in std::fs::read_dir(pod.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for file in std::fs::read_dir(container.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let text = std::fs::read_to_string(file.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!("== {}\n", file.path().display()));
                for line in &lines[lines.len().saturating_sub(30)..] {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// Polls `check` until it yields a value; panics after [`WAIT`] naming `what`, with the logs.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < WAIT,
            "{what}: not seen within {WAIT:?}; driftless logs:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The node's InternalIP: the simulator listens there, where both pods and the host reach it.
async fn node_ip(client: &Client) -> std::net::IpAddr {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    nodes
        .items
        .iter()
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())
        .expect("the node cluster's node has an InternalIP")
}

/// Deletes a namespace a previous, interrupted run left behind.
async fn remove_leftover(client: &Client, name: &str) {
    cluster::delete_namespace_and_wait(client, name, WAIT).await;
}

/// The settings the pods get: deploy/base/driftless.toml's receiver and state namespace, the
/// simulator as GitHub, a short drift interval, the base's app "demo" in its bound namespace,
/// a Kustomize app there too (rendered by the image's kubectl), and optionally one more app in
/// a namespace nothing grants driftless.
fn settings(github_api: &str, unbound_ns: Option<&str>) -> String {
    let mut text = format!(
        r#"[server]
listen = "0.0.0.0:8080"
public_url = "https://driftless.example.com"
shutdown_grace = "45s"
[kubernetes]
state_namespace = "driftless"
[forges.github]
api_url = "{github_api}"
token_env = "GITHUB_TOKEN"
webhook_secret_env = "GITHUB_WEBHOOK_SECRET"
[drift]
interval = "10s"
jitter = "0s"
[render]
kustomize_command = ["kubectl", "kustomize"]
[[apps]]
name = "demo"
forge = "github"
repo = "{REPO}"
branch = "main"
path = "apps/demo"
namespace = "demo"
[[apps]]
name = "kustom"
forge = "github"
repo = "{REPO}"
path = "apps/kustom"
namespace = "demo"
"#
    );
    if let Some(ns) = unbound_ns {
        text.push_str(&format!(
            "[[apps]]\nname = \"unbound\"\nforge = \"github\"\nrepo = \"{REPO}\"\n\
             path = \"apps/unbound\"\nnamespace = \"{ns}\"\n"
        ));
    }
    text
}

/// `../..` up to `/` from `from`, then `to`: kustomize accepts only relative bases.
fn relative(from: &Path, to: &Path) -> String {
    let ups = from.components().count() - 1;
    format!(
        "{}{}",
        "../".repeat(ups),
        to.strip_prefix("/").unwrap().display()
    )
}

/// An overlay of `deploy/<what>` in `dir` with the local image and the test settings. This
/// cluster is Kubernetes 1.20: PodDisruptionBudget and CronJob are served as v1beta1 only (same
/// fields as the v1 that deploy/ uses for current clusters), so the overlay renames them.
fn write_overlay(dir: &Path, what: &str, settings: &str) {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(what);
    let (name, tag) = image()
        .rsplit_once(':')
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .expect("image reference name:tag");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("driftless.toml"), settings).unwrap();
    let kustomization = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {base}\n\
         images:\n  - name: ghcr.io/driftless-dev/driftless\n    newName: {name}\n    newTag: \"{tag}\"\n\
         configMapGenerator:\n  - name: driftless-settings\n    namespace: driftless\n    behavior: replace\n    files: [driftless.toml]\n\
         patches:\n{pdb}{cron}",
        base = relative(dir, &deploy),
        pdb = api_version_patch("policy", "PodDisruptionBudget", "policy/v1beta1"),
        cron = api_version_patch("batch", "CronJob", "batch/v1beta1"),
    );
    std::fs::write(dir.join("kustomization.yaml"), kustomization).unwrap();
}

fn api_version_patch(group: &str, kind: &str, api_version: &str) -> String {
    format!(
        "  - target: {{group: {group}, kind: {kind}}}\n    patch: |-\n      - op: replace\n        \
         path: /apiVersion\n        value: {api_version}\n"
    )
}

fn configmap(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n"
    )
}

async fn value_of(client: &Client, ns: &str, name: &str) -> Option<String> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
        .and_then(|c| c.data)
        .and_then(|d| d.get("value").cloned())
}

/// That the app's run history holds a run of `sha` for a push that applied: its last run may
/// be a later drift tick that found it unchanged.
fn assert_push_applied(st: &AppState, sha: &str) {
    assert!(
        st.runs.iter().any(|r| r.revision.as_deref() == Some(sha)
            && r.reason == "push"
            && r.outcome == "applied"),
        "no push run that applied {sha}: {:?} (last: {:?})",
        st.runs,
        st.last_result
    );
}

/// The app's state record in the `driftless` namespace, once its last run was for `sha`.
async fn state_at(client: &Client, app: &str, sha: &str) -> Option<AppState> {
    let st = state::load(client, "driftless", app).await.ok()?;
    let last = st.last_result.as_ref()?;
    (last.revision.as_deref() == Some(sha)).then_some(st)
}

/// Holds the lock of the node cluster's install slot while alive (released on drop, also
/// when the process dies).
fn lock_install_slot() -> std::fs::File {
    let kubeconfig = cluster::node_kubeconfig();
    let path = Path::new(&kubeconfig)
        .parent()
        .expect("kubeconfig in a directory")
        .join("incluster.lock");
    let file =
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
    file
}

struct Install {
    _slot: std::fs::File,
    client: Client,
    sim: ForgeSimulator,
    repo: GitRepo,
    unbound: TestNamespace,
    dir: tempfile::TempDir,
}

impl Install {
    /// Starts the simulator, writes the repository's first commit, and installs deploy/.
    async fn new() -> Install {
        let slot = lock_install_slot();
        let client = cluster::client_of(Cluster::WithNode).await;
        for leftover in ["driftless", "demo"] {
            remove_leftover(&client, leftover).await;
        }
        let sim = ForgeSimulator::start_on(
            SimConfig {
                github_token: "ghp_t".into(),
                gitlab_token: "glpat_t".into(),
            },
            node_ip(&client).await,
        )
        .await
        .unwrap();
        let repo = GitRepo::new();
        sim.add_repo(REPO, repo.path());
        repo.write("apps/demo/greeting.yaml", &configmap("greeting", "v1"));
        repo.write("apps/unbound/greeting.yaml", &configmap("greeting", "v1"));
        repo.write(
            "apps/kustom/kustomization.yaml",
            "resources: [greeting.yaml]\nnamePrefix: k-\n",
        );
        repo.write("apps/kustom/greeting.yaml", &configmap("greeting", "v1"));
        repo.commit("two apps");
        let unbound = TestNamespace::new_in(Cluster::WithNode, "it-unbound").await;
        let dir = tempfile::tempdir().unwrap();
        let install = Install {
            _slot: slot,
            client,
            sim,
            repo,
            unbound,
            dir,
        };
        install.apply_base();
        install
    }

    fn settings(&self) -> String {
        settings(&self.sim.github_api_url(), Some(&self.unbound.name))
    }

    /// As deploy/README.md says: the app namespace, the Secret, then `kubectl apply -k`.
    fn apply_base(&self) {
        kubectl(&["create", "namespace", "demo"]);
        kubectl(&["create", "namespace", "driftless"]);
        kubectl(&[
            "-n",
            "driftless",
            "create",
            "secret",
            "generic",
            "driftless",
            "--from-literal=GITHUB_TOKEN=ghp_t",
            "--from-literal=GITHUB_WEBHOOK_SECRET=s",
        ]);
        let overlay = self.dir.path().join("base");
        write_overlay(&overlay, "", &self.settings());
        kubectl(&["apply", "-k", overlay.to_str().unwrap()]);
    }

    /// Waits for the Deployment's replicas to be Ready; their pods' IPs.
    async fn ready_pods(&self) -> Vec<String> {
        let deployments = Api::<Deployment>::namespaced(self.client.clone(), "driftless");
        let pods = Api::<Pod>::namespaced(self.client.clone(), "driftless");
        eventually("the driftless Deployment's 2 replicas Ready", || async {
            let d = deployments.get("driftless").await.ok()?;
            let status = d.status?;
            (status.ready_replicas == Some(2)
                && status.updated_replicas == Some(2)
                && status.replicas == Some(2))
            .then_some(())
        })
        .await;
        let list = pods
            .list(&ListParams::default().labels(RECEIVER))
            .await
            .unwrap();
        list.items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .collect()
    }

    /// `http://<ClusterIP>`: the Service, reached from the host through kube-proxy's rules.
    async fn service_url(&self) -> String {
        let svc = Api::<Service>::namespaced(self.client.clone(), "driftless")
            .get("driftless")
            .await
            .unwrap();
        let ip = svc.spec.and_then(|s| s.cluster_ip).expect("a ClusterIP");
        format!("http://{ip}")
    }

    /// Sends the signed push `before..after` to the Service; the HTTP status it answered.
    async fn push(&self, before: &str, after: &str) -> Result<u16, reqwest::Error> {
        let url = self.service_url().await;
        let code = self
            .sim
            .send_github_push(&url, REPO, "main", before, after, "s")
            .await?;
        Ok(code.as_u16())
    }

    async fn cleanup(self) {
        let _ = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(cluster::node_kubeconfig())
            .args(["delete", "--ignore-not-found", "--wait=false", "-k"])
            .arg(self.dir.path().join("base"))
            .output();
        for ns in ["driftless", "demo"] {
            remove_leftover(&self.client, ns).await;
        }
        self.unbound.cleanup().await;
        self.sim.stop().await;
    }
}

#[tokio::test]
async fn deploy_base_runs_in_the_cluster_with_least_privilege() {
    let install = Install::new().await;
    pods_become_ready(&install).await;
    let c1 = webhook_applies_into_bound_namespace_only(&install).await;
    drift_is_healed(&install).await;
    restart_loses_no_push(&install, &c1).await;
    cronjob_runs_drift_once(&install).await;
    install.cleanup().await;
}

/// The probes answer on every pod: `/readyz` says ready, `/healthz` alive.
async fn pods_become_ready(install: &Install) {
    let http = reqwest::Client::new();
    for ip in install.ready_pods().await {
        for probe in ["healthz", "readyz"] {
            let res = http
                .get(format!("http://{ip}:8080/{probe}"))
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET /{probe} on pod {ip}: {e}"));
            assert_eq!(res.status().as_u16(), 200, "/{probe} on {ip}");
        }
    }
}

/// A signed push sent to the Service: "demo" is applied into `demo` (bound by
/// rolebinding-demo.yaml) and recorded in `driftless`; "unbound" fails, forbidden to the
/// ServiceAccount. Returns the pushed commit.
async fn webhook_applies_into_bound_namespace_only(install: &Install) -> String {
    let before = install.repo.head();
    install
        .repo
        .write("apps/demo/greeting.yaml", &configmap("greeting", "v2"));
    install
        .repo
        .write("apps/unbound/greeting.yaml", &configmap("greeting", "v2"));
    install
        .repo
        .write("apps/kustom/greeting.yaml", &configmap("greeting", "v2"));
    let c1 = install.repo.commit("v2 for every app");
    let code = install.push(&before, &c1).await.unwrap();
    assert!((200..300).contains(&code), "the push was answered {code}");
    let client = &install.client;
    let st = eventually("app demo applied at the pushed commit", || async {
        let st = state_at(client, "demo", &c1).await?;
        (st.revision.as_deref() == Some(c1.as_str())).then_some(st)
    })
    .await;
    // Applied for the delivery (the drift timer may also have looked at it since).
    assert_push_applied(&st, &c1);
    assert_eq!(
        value_of(client, "demo", "greeting").await.as_deref(),
        Some("v2")
    );
    // The Kustomize app rendered in the pod (a writable /tmp for its private copy, kubectl).
    let st = eventually("app kustom applied at the pushed commit", || async {
        state_at(client, "kustom", &c1).await
    })
    .await;
    // As for "demo": the drift timer may have found it unchanged since the push applied it.
    assert_push_applied(&st, &c1);
    assert_eq!(
        value_of(client, "demo", "k-greeting").await.as_deref(),
        Some("v2")
    );
    let demo = install.sim.statuses(REPO, &c1);
    assert!(
        demo.iter()
            .any(|s| s.context == "driftless/demo" && s.state == "success"),
        "{demo:?}"
    );

    let st = eventually("app unbound failed at the pushed commit", || async {
        state_at(client, "unbound", &c1).await
    })
    .await;
    let message = st.last_result.unwrap().message;
    assert!(
        message.contains("forbidden")
            && message.contains("system:serviceaccount:driftless:driftless"),
        "{message}"
    );
    let ns = &install.unbound.name;
    assert_eq!(value_of(client, ns, "greeting").await, None);
    let status = install.sim.statuses(REPO, &c1);
    let unbound = status
        .iter()
        .rfind(|s| s.context == "driftless/unbound")
        .unwrap_or_else(|| panic!("no status for unbound: {status:?}"));
    assert_eq!(unbound.state, "failure", "{unbound:?}");
    c1
}

/// An edit made behind driftless's back is put back by the drift timer.
async fn drift_is_healed(install: &Install) {
    let configmaps = Api::<ConfigMap>::namespaced(install.client.clone(), "demo");
    let edit = serde_json::json!({"data": {"value": "edited by hand"}});
    configmaps
        .patch("greeting", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    let client = &install.client;
    eventually("the hand edit healed", || async {
        (value_of(client, "demo", "greeting").await.as_deref() == Some("v2")).then_some(())
    })
    .await;
}

/// `kubectl rollout restart`: a push made while the pods are replaced (its webhook sent to
/// the Service mid-restart, whatever that answered) is applied.
async fn restart_loses_no_push(install: &Install, before: &str) {
    kubectl(&[
        "-n",
        "driftless",
        "rollout",
        "restart",
        "deployment/driftless",
    ]);
    install
        .repo
        .write("apps/demo/greeting.yaml", &configmap("greeting", "v3"));
    let c2 = install.repo.commit("v3 while driftless restarts");
    // Any answer, or none: a replica shutting down refuses it with 503.
    let _ = install.push(before, &c2).await;
    kubectl(&[
        "-n",
        "driftless",
        "rollout",
        "status",
        "deployment/driftless",
        "--timeout=180s",
    ]);
    install.ready_pods().await;
    let client = &install.client;
    eventually("the push made during the restart applied", || async {
        let st = state_at(client, "demo", &c2).await?;
        (st.revision.as_deref() == Some(c2.as_str())).then_some(())
    })
    .await;
    assert_eq!(
        value_of(client, "demo", "greeting").await.as_deref(),
        Some("v3")
    );
}

/// The serverless overlay's CronJob, with no receiver running: one Job made from its template
/// runs `driftless drift --once` to completion, which applies a push nobody delivered. (The
/// overlay's Knative Service is left out: Knative cannot run here.)
async fn cronjob_runs_drift_once(install: &Install) {
    kubectl(&[
        "-n",
        "driftless",
        "scale",
        "deployment/driftless",
        "--replicas=0",
    ]);
    let client = &install.client;
    let pods = Api::<Pod>::namespaced(client.clone(), "driftless");
    eventually("the receiver scaled to zero", || async {
        let list = pods
            .list(&ListParams::default().labels(RECEIVER))
            .await
            .ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
    install
        .repo
        .write("apps/demo/greeting.yaml", &configmap("greeting", "v4"));
    let c3 = install.repo.commit("v4, its webhook lost");
    let overlay = install.dir.path().join("serverless");
    // Only the bound app: the sweep fails (exit 1) while any app fails, as it should.
    let settings = settings(&install.sim.github_api_url(), None);
    write_overlay(&overlay, "serverless", &settings);
    let rendered = kubectl(&["kustomize", overlay.to_str().unwrap()]);
    let (objects, cronjob) = serverless_objects(&rendered);
    let applied = overlay.join("applied.json");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
    std::fs::write(&applied, list.to_string()).unwrap();
    kubectl(&["apply", "-f", applied.to_str().unwrap()]);
    let job = job_from(&cronjob);
    let jobs = Api::<Job>::namespaced(client.clone(), "driftless");
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let done = eventually("the drift --once Job finished", || async {
        let status = jobs.get("drift-once").await.ok()?.status?;
        let conditions = status.conditions?;
        conditions
            .iter()
            .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
            .map(|c| c.type_.clone())
    })
    .await;
    assert_eq!(done, "Complete", "the Job failed; logs:\n{}", logs());
    assert_eq!(
        value_of(client, "demo", "greeting").await.as_deref(),
        Some("v4")
    );
    let st = state_at(client, "demo", &c3)
        .await
        .expect("state at the lost push");
    assert_eq!(st.revision.as_deref(), Some(c3.as_str()));
}

/// The rendered serverless overlay without its Knative Service (no Knative here), and its
/// CronJob, checked to run `drift --once`.
fn serverless_objects(rendered: &str) -> (Vec<serde_json::Value>, serde_json::Value) {
    let objects: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(rendered)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|d| {
            !d["apiVersion"]
                .as_str()
                .unwrap_or("")
                .starts_with("serving.knative.dev/")
        })
        .collect();
    let cronjob = objects
        .iter()
        .find(|d| d["kind"] == "CronJob")
        .cloned()
        .expect("deploy/serverless renders a CronJob");
    let args = &cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args[0], "drift");
    assert_eq!(args[1], "--once");
    (objects, cronjob)
}

/// What the CronJob controller would create at its next slot, now.
fn job_from(cronjob: &serde_json::Value) -> Job {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "drift-once", "namespace": "driftless"},
        "spec": cronjob["spec"]["jobTemplate"]["spec"],
    }))
    .unwrap()
}
