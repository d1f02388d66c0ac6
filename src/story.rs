//! The story driftless exists for, as code: push an app and see it applied, scale it by hand
//! and see it healed, ship a bad image and revert it, push an invalid manifest and see it
//! refused, lose a webhook and see the timer apply the commit anyway, change a Kustomize base
//! and see both overlays on it reconciled. `examples/demo.rs` and
//! the acceptance tests both run [`run`], so what the demo shows is exactly what CI checks.
//!
//! Everything is real except the forge: the `driftless serve` binary runs as a child process
//! against a real Kubernetes API server, over a real git repository served by the
//! [forge simulator](crate::simulator), which sends the signed push webhooks. On a cluster
//! with a real node ([`RealNode`], tests/cluster/up.sh --with-node) the pods really run: the
//! app is a web server from the local registry behind a readiness probe, a bad image tag
//! fails the commit once the Deployment's progress deadline passes, and its `git revert`
//! succeeds once the pods answer again. On the control plane alone, which has no node and no
//! workload controllers, the story plays the Deployment controller ([`PlayedController`]):
//! whenever a Deployment's spec changes it reports the rollout complete through the status
//! subresource, so there the bad image is applied and reported a success.
//!
//! Each run uses namespaces of its own (`shop-<id>` for the app, `driftless-story-<id>` for
//! driftless's state), so runs can go on in parallel and repeatedly; they are deleted at the
//! end, whatever happened.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{json, Value};

use crate::reconcile::state::{DriftRecord, RunRecord};
use crate::settings::ForgeKind;
use crate::simulator::{ForgeSimulator, RecordedStatus, SimConfig};

mod kustomize;
mod node;
mod rollout;
pub use node::RealNode;
pub use rollout::{PlayedController, Reported, RolloutStep, Workload};

/// The app the story deploys.
pub const APP: &str = "shop";
/// The repository on the simulated forge (a GitHub `owner/repo`, a GitLab project path).
const REPO: &str = "acme/deploy";
const BRANCH: &str = "main";
/// Where the app lives in the repository.
const APP_PATH: &str = "apps/shop";
/// The image on the control plane alone, where no pod runs.
const PLAYED_GOOD_IMAGE: &str = "nginx:1.27";
/// A tag nginx never published.
const PLAYED_BAD_IMAGE: &str = "nginx:1.27-typo";
const REPLICAS: i64 = 2;
/// What "someone" scales the Deployment to by hand in step 2.
const HAND_SCALED: i64 = 5;
/// The drift timer's period: the smallest `drift.interval` the settings accept, so the two
/// timer-driven steps wait at most this long for their tick.
const DRIFT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a webhook-driven step may take. A push is applied in well under a second; the
/// margin is for a loaded CI machine.
const PUSH_DEADLINE: Duration = Duration::from_secs(30);
/// How long a timer-driven step may take: one full interval plus the same margin.
const TICK_DEADLINE: Duration = Duration::from_secs(DRIFT_INTERVAL.as_secs() + 30);
/// How often the story looks at the cluster, the forge and the status page while waiting.
const POLL: Duration = Duration::from_millis(50);
/// Lines of the `driftless serve` log quoted when a step fails.
const LOG_TAIL_LINES: usize = 40;
/// How long a deleted namespace of the story may take to go.
const NAMESPACE_GONE: Duration = Duration::from_secs(180);

/// What to run the story against.
#[derive(Debug, Clone)]
pub struct StoryOptions {
    /// The forge whose webhooks, API and commit statuses the story goes through.
    pub forge: ForgeKind,
    /// The kubeconfig of the cluster to deploy to (the test control plane).
    pub kubeconfig: PathBuf,
    /// The `driftless` binary to run as `driftless serve`.
    pub driftless_bin: PathBuf,
    /// The cluster's node, if pods run there; `None` plays the Deployment controller.
    pub node: Option<RealNode>,
}

/// One step of the story that happened as it should.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub forge: ForgeKind,
    /// 1 to [`STEPS`].len().
    pub number: usize,
    pub title: &'static str,
    /// From the step's first action (the commit, the hand edit) to the last check passing.
    pub took: Duration,
    /// What was observed, in a sentence.
    pub detail: String,
}

impl fmt::Display for StepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] {}/{} {:<28} {:>6.2}s  {}",
            self.forge,
            self.number,
            STEPS.len(),
            self.title,
            self.took.as_secs_f64(),
            self.detail
        )
    }
}

/// The titles of the six steps, in order.
pub const STEPS: [&str; 6] = [
    "push -> applied",
    "hand scale -> healed",
    "bad image -> git revert",
    "invalid manifest -> refused",
    "lost webhook -> timer",
    "kustomize base change -> both overlays",
];

#[derive(Debug, thiserror::Error)]
pub enum StoryError {
    /// The stage could not be set up (cluster, simulator, git, the binary).
    #[error("[{forge}] setup: {what}: {message}")]
    Setup {
        forge: ForgeKind,
        what: String,
        message: String,
    },
    /// A step did not happen as it should; `message` says what did not happen.
    #[error("[{forge}] step {number} ({title}): {message}{log}")]
    Step {
        forge: ForgeKind,
        number: usize,
        title: &'static str,
        message: String,
        /// The end of the `driftless serve` log, preceded by a heading, or empty.
        log: String,
    },
    /// The steps passed but the namespaces or the process could not be cleaned up.
    #[error("[{forge}] cleanup: {message}")]
    Cleanup { forge: ForgeKind, message: String },
}

/// Sets up the stage, walks the six steps (calling `on_step` after each one that passes),
/// and tears the stage down whatever happened. Stops at the first step that fails.
pub async fn run(
    opts: &StoryOptions,
    mut on_step: impl FnMut(&StepReport),
) -> Result<Vec<StepReport>, StoryError> {
    let mut stage = Stage::start(opts).await?;
    let mut reports = Vec::new();
    let mut result = Ok(());
    for number in 1..=STEPS.len() {
        let started = Instant::now();
        let outcome = match number {
            1 => stage.push_applied().await,
            2 => stage.hand_scale_healed().await,
            3 => stage.bad_image_reverted().await,
            4 => stage.invalid_manifest_refused().await,
            5 => stage.lost_webhook_applied_by_timer().await,
            _ => stage.kustomize_base_change().await,
        };
        match outcome {
            Ok(detail) => {
                let report = StepReport {
                    forge: opts.forge,
                    number,
                    title: STEPS[number - 1],
                    took: started.elapsed(),
                    detail,
                };
                on_step(&report);
                reports.push(report);
            }
            Err(message) => {
                result = Err(StoryError::Step {
                    forge: opts.forge,
                    number,
                    title: STEPS[number - 1],
                    message,
                    log: stage.log_tail(),
                });
                break;
            }
        }
    }
    let cleaned = stage.finish(result.is_err()).await;
    result?;
    cleaned.map_err(|message| StoryError::Cleanup {
        forge: opts.forge,
        message,
    })?;
    Ok(reports)
}

/// The app as one commit has it.
struct AppVersion {
    image: String,
    /// As written in the YAML, so a step can write an invalid value.
    replicas: &'static str,
    greeting: &'static str,
}

/// The greeting of the first version.
const FIRST_GREETING: &str = "hello";

/// Everything one run of the story uses.
struct Stage {
    forge: ForgeKind,
    client: Client,
    sim: ForgeSimulator,
    /// The working directory: the git work tree, the settings, the secrets and the log.
    dir: PathBuf,
    repo: WorkTree,
    app_ns: String,
    state_ns: String,
    /// `http://127.0.0.1:PORT` of the receiver.
    base: String,
    http: reqwest::Client,
    serve: Option<tokio::process::Child>,
    log: PathBuf,
    /// The played Deployment controller, when there is no real node.
    controller: Option<PlayedController>,
    node: Option<RealNode>,
    good_image: String,
    bad_image: String,
    /// The branch head the forge last announced in a webhook (the next push's `before`).
    announced: String,
}

const SECRET: &str = "story-webhook-secret";
const GITHUB_TOKEN: &str = "ghp_story";
const GITLAB_TOKEN: &str = "glpat_story";

impl Stage {
    async fn start(opts: &StoryOptions) -> Result<Stage, StoryError> {
        let forge = opts.forge;
        let setup = |what: &str, message: String| StoryError::Setup {
            forge,
            what: what.to_string(),
            message,
        };
        let id = format!("{:08x}", rand::random::<u32>());
        let client = kube_client(&opts.kubeconfig)
            .await
            .map_err(|m| setup("the cluster", m))?;
        if !opts.driftless_bin.is_file() {
            return Err(setup(
                "the driftless binary",
                format!(
                    "{} does not exist; build it with `cargo build --bin driftless`",
                    opts.driftless_bin.display()
                ),
            ));
        }

        let dir = std::env::temp_dir().join(format!("driftless-story-{forge}-{id}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| setup(&dir.display().to_string(), e.to_string()))?;
        let repo = WorkTree {
            dir: dir.join("deploy"),
        };
        let seed = async {
            std::fs::create_dir_all(&repo.dir).map_err(|e| e.to_string())?;
            repo.git(&["init", "-q", "-b", BRANCH]).await?;
            repo.write(
                "README.md",
                "Kubernetes manifests, one directory per app, applied by driftless.\n",
            )?;
            repo.commit("Start the deploy repository").await
        };
        let seed = seed.await.map_err(|m| setup("the git repository", m))?;

        let sim = ForgeSimulator::start(SimConfig {
            github_token: GITHUB_TOKEN.into(),
            gitlab_token: GITLAB_TOKEN.into(),
        })
        .await
        .map_err(|e| setup("the forge simulator", e.to_string()))?;
        sim.add_repo(REPO, &repo.dir);

        let port = free_port().map_err(|e| setup("a free port", e.to_string()))?;
        let base = format!("http://127.0.0.1:{port}");
        let app_ns = format!("shop-{id}");
        let state_ns = format!("driftless-story-{id}");
        let config = dir.join("driftless.toml");
        let write = |name: &str, text: &str| -> Result<String, StoryError> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| setup(&p.display().to_string(), e.to_string()))?;
            Ok(p.display().to_string())
        };
        let secret = write("webhook-secret", SECRET)?;
        let forge_section = match forge {
            ForgeKind::Github => format!(
                "[forges.github]\napi_url = \"{}\"\ntoken_file = \"{}\"\nwebhook_secret_file = \"{secret}\"\n",
                sim.github_api_url(),
                write("github-token", GITHUB_TOKEN)?,
            ),
            ForgeKind::Gitlab => format!(
                "[forges.gitlab]\napi_url = \"{}\"\ntoken_file = \"{}\"\nwebhook_token_file = \"{secret}\"\n",
                sim.gitlab_api_url(),
                write("gitlab-token", GITLAB_TOKEN)?,
            ),
        };
        let settings = format!(
            r#"# Written by driftless::story for one run of the story.
[server]
listen = "127.0.0.1:{port}"
public_url = "{base}"
shutdown_grace = "5s"

[kubernetes]
state_namespace = "{state_ns}"

{forge_section}
[drift]
interval = "{interval}s"
jitter = "0s"

[[apps]]
name = "{APP}"
forge = "{forge}"
repo = "{REPO}"
branch = "{BRANCH}"
path = "{APP_PATH}"
namespace = "{app_ns}"
drift = "heal"
health_timeout = "{health_timeout}s"

{overlays}
{render}"#,
            overlays = kustomize::apps_toml(&forge.to_string(), REPO, BRANCH, &app_ns),
            render = kustomize::RENDER_TOML,
            interval = DRIFT_INTERVAL.as_secs(),
            health_timeout = match opts.node {
                Some(_) => node::HEALTH_TIMEOUT.as_secs(),
                None => 30,
            },
        );
        write("driftless.toml", &settings)?;

        let log = dir.join("serve.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|e| setup(&log.display().to_string(), e.to_string()))?;
        let serve = tokio::process::Command::new(&opts.driftless_bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("KUBECONFIG", &opts.kubeconfig)
            .env("RUST_LOG", "info")
            // The log is a file, quoted in errors: no colour codes.
            .env("NO_COLOR", "1")
            .env_remove("DRIFTLESS_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| setup(&opts.driftless_bin.display().to_string(), e.to_string()))?;

        let controller = match opts.node {
            Some(_) => None,
            None => Some(play_deployment_controller(Api::namespaced(
                client.clone(),
                &app_ns,
            ))),
        };
        let (good_image, bad_image) = match &opts.node {
            Some(node) => (node.good_image(), node.bad_image()),
            None => (PLAYED_GOOD_IMAGE.into(), PLAYED_BAD_IMAGE.into()),
        };
        let mut stage = Stage {
            forge,
            client,
            sim,
            dir,
            repo,
            app_ns,
            state_ns,
            base,
            http: reqwest::Client::new(),
            serve: Some(serve),
            log,
            controller,
            node: opts.node.clone(),
            good_image,
            bad_image,
            announced: seed.clone(),
        };
        if let Err(message) = stage.wait_serving().await {
            let log = stage.log_tail();
            let _ = stage.finish(true).await;
            return Err(setup("driftless serve", format!("{message}{log}")));
        }
        // At start `serve` checks the branch head once; the seed commit has no app yet, so
        // that run fails (and says so on the seed commit). Let it finish before the story.
        let deadline = Instant::now() + PUSH_DEADLINE;
        while stage.statuses(&seed).iter().all(|s| s.state == "pending")
            && Instant::now() < deadline
        {
            tokio::time::sleep(POLL).await;
        }
        Ok(stage)
    }

    /// Waits for `/healthz`, failing at once if the process exits.
    async fn wait_serving(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + PUSH_DEADLINE;
        loop {
            if let Some(child) = self.serve.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("exited at start ({status})"));
                }
            }
            let healthz = self.http.get(format!("{}/healthz", self.base)).send().await;
            if healthz.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not answering on {}/healthz after {PUSH_DEADLINE:?}",
                    self.base
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    // ---- the steps: each returns what it observed, or what did not happen ----

    /// 1. A commit adds the app; its push webhook gets it applied and the commit a `success`.
    async fn push_applied(&mut self) -> Result<String, String> {
        self.write_app(&self.first())?;
        let c1 = self.repo.commit("Add the shop app").await?;
        self.send_push(&c1).await?;
        let status = self
            .wait_status(&c1, Verdict::Success, self.rollout_deadline())
            .await?;

        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let ns = namespaces
            .get_opt(&self.app_ns)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("Namespace {} was not created", self.app_ns))?;
        let labels = ns.metadata.labels.unwrap_or_default();
        if labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            != Some("driftless")
        {
            return Err(format!(
                "Namespace {} lacks the label app.kubernetes.io/managed-by=driftless: {labels:?}",
                self.app_ns
            ));
        }
        let (image, replicas) = self.deployment_spec().await?;
        if image != self.good_image || replicas != REPLICAS {
            return Err(format!(
                "Deployment {}/web runs {image} x{replicas}, Git says {} x{REPLICAS}",
                self.app_ns, self.good_image
            ));
        }
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.app_ns);
        if services
            .get_opt("web")
            .await
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Err(format!("Service {}/web was not created", self.app_ns));
        }
        let greeting = self.greeting().await?;
        if greeting.as_deref() != Some(FIRST_GREETING) {
            return Err(format!(
                "ConfigMap {}/settings has greeting {greeting:?}, Git says {FIRST_GREETING:?}",
                self.app_ns
            ));
        }
        let pods = self.pods_answering(&self.good_image).await?;
        Ok(format!(
            "{} pushed, webhook 202; Namespace, Deployment, Service, ConfigMap applied{pods}; {} \"{}\"",
            short(&c1),
            status.state,
            status.description.unwrap_or_default()
        ))
    }

    /// 2. Someone scales the Deployment by hand; the next drift tick reports and heals it.
    async fn hand_scale_healed(&mut self) -> Result<String, String> {
        let edited = Instant::now();
        let kubectl = PatchParams {
            field_manager: Some("kubectl-edit".into()),
            ..Default::default()
        };
        self.deployments()
            .patch(
                "web",
                &kubectl,
                &Patch::Merge(json!({"spec": {"replicas": HAND_SCALED}})),
            )
            .await
            .map_err(|e| format!("scaling {}/web by hand: {e}", self.app_ns))?;

        let deadline = Instant::now() + TICK_DEADLINE;
        let (healed_after, record) = loop {
            let (_, replicas) = self.deployment_spec().await?;
            let page = self.status_page().await?;
            let record: Option<DriftRecord> = serde_json::from_value(page["drift"].clone())
                .map_err(|e| {
                    format!("the status page's drift record does not parse: {e}: {page}")
                })?;
            let reported = record.as_ref().is_some_and(|r| {
                r.healed
                    && r.objects.iter().any(|o| {
                        o.id.kind == "Deployment"
                            && o.id.name == "web"
                            && o.fields.iter().any(|f| f == "spec.replicas")
                    })
            });
            if replicas == REPLICAS && reported {
                break (edited.elapsed(), record.unwrap_or_default());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{TICK_DEADLINE:?} after scaling {}/web to {HAND_SCALED} by hand it has {replicas} \
                     replicas (Git says {REPLICAS}) and the status page's drift record is {}",
                    self.app_ns, page["drift"]
                ));
            }
            tokio::time::sleep(POLL).await;
        };
        let fields: Vec<String> = record
            .objects
            .iter()
            .map(|o| format!("{} {}", o.id, o.fields.join(",")))
            .collect();
        Ok(format!(
            "scaled web to {HAND_SCALED} by hand; drift tick found {} and healed it to {REPLICAS} \
             after {:.1}s",
            fields.join("; "),
            healed_after.as_secs_f64()
        ))
    }

    /// 3. A commit with a bad image tag is applied; its `git revert` brings the old image back.
    async fn bad_image_reverted(&mut self) -> Result<String, String> {
        let bad_image = self.bad_image.clone();
        self.write_app(&AppVersion {
            image: bad_image.clone(),
            ..self.first()
        })?;
        let bad = self
            .repo
            .commit(&format!("Bump web to {bad_image}"))
            .await?;
        self.send_push(&bad).await?;
        // A real node cannot pull the image: the Deployment's progress deadline passes and the
        // commit fails. The played controller reports every rollout complete.
        let expected = match self.node {
            Some(_) => Verdict::Failure,
            None => Verdict::Success,
        };
        let bad_status = self
            .wait_status(&bad, expected, self.rollout_deadline())
            .await?;
        let (image, _) = self.deployment_spec().await?;
        if image != bad_image {
            return Err(format!(
                "{} reported {} but {}/web runs {image}, not {bad_image}",
                short(&bad),
                bad_status.state,
                self.app_ns
            ));
        }
        let bad_detail = match self.node {
            Some(_) => self.bad_image_failure(&bad_status).await?,
            None => format!("applied, {}", bad_status.state),
        };

        self.repo.git(&["revert", "--no-edit", "HEAD"]).await?;
        let revert = self.repo.git(&["rev-parse", "HEAD"]).await?;
        self.send_push(&revert).await?;
        let revert_status = self
            .wait_status(&revert, Verdict::Success, self.rollout_deadline())
            .await?;
        let (image, _) = self.deployment_spec().await?;
        if image != self.good_image {
            return Err(format!(
                "the revert {} reported applied but {}/web runs {image}, not {}",
                short(&revert),
                self.app_ns,
                self.good_image
            ));
        }
        let pods = self.pods_answering(&self.good_image).await?;
        Ok(format!(
            "{} ({bad_image}) {bad_detail}; revert {} put {} back{pods}, {}",
            short(&bad),
            short(&revert),
            self.good_image,
            revert_status.state
        ))
    }

    /// On a real node: the bad commit's failure names the Deployment and its progress deadline,
    /// and its new pod is waiting on the image pull. Returns what was seen.
    async fn bad_image_failure(&self, status: &RecordedStatus) -> Result<String, String> {
        let description = status.description.clone().unwrap_or_default();
        let deployment = format!("Deployment {}/web", self.app_ns);
        if !description.contains(&deployment) || !description.contains("progress deadline") {
            return Err(format!(
                "the bad image's failure {description:?} does not name {deployment} and its \
                 progress deadline"
            ));
        }
        let pull = node::image_pull_failure(&self.client, &self.app_ns, &self.bad_image)
            .await?
            .ok_or_else(|| {
                format!(
                    "{deployment} failed but no pod of it waits on pulling {}",
                    self.bad_image
                )
            })?;
        Ok(format!(
            "{}: its pod waits with {pull}, the 2 old pods keep serving; \"{description}\"",
            status.state
        ))
    }

    /// 4. A commit with an invalid manifest changes nothing and fails, naming the object.
    async fn invalid_manifest_refused(&mut self) -> Result<String, String> {
        let generation_before = self.deployment_generation().await?;
        let greeting_before = self.greeting().await?;
        // The ConfigMap changes too, so "nothing applied" covers the valid object as well.
        self.write_app(&AppVersion {
            replicas: "\"two\"",
            greeting: "hello from an invalid commit",
            ..self.first()
        })?;
        let invalid = self.repo.commit("Scale web to two").await?;
        self.send_push(&invalid).await?;
        let status = self
            .wait_status(&invalid, Verdict::Failure, PUSH_DEADLINE)
            .await?;
        let description = status.description.clone().unwrap_or_default();
        let object = format!("apps/v1 Deployment {}/web", self.app_ns);
        if !description.contains(&object) {
            return Err(format!(
                "the failure status of {} does not name {object}: {description:?}",
                short(&invalid)
            ));
        }
        let generation_after = self.deployment_generation().await?;
        let greeting_after = self.greeting().await?;
        if generation_after != generation_before || greeting_after != greeting_before {
            return Err(format!(
                "the cluster changed although {} was refused: Deployment generation \
                 {generation_before} -> {generation_after}, greeting {greeting_before:?} -> \
                 {greeting_after:?}",
                short(&invalid)
            ));
        }
        Ok(format!(
            "{} refused, nothing applied; {} \"{description}\"",
            short(&invalid),
            status.state
        ))
    }

    /// 5. A commit whose webhook never arrives is applied by the drift timer anyway.
    async fn lost_webhook_applied_by_timer(&mut self) -> Result<String, String> {
        let fixed = AppVersion {
            greeting: "hello again",
            ..self.first()
        };
        self.write_app(&fixed)?;
        let lost = self.repo.commit("Fix the replicas, new greeting").await?;
        // No webhook: the forge lost it.
        let status = self
            .wait_status(&lost, Verdict::Success, TICK_DEADLINE)
            .await?;
        let greeting = self.greeting().await?;
        if greeting.as_deref() != Some(fixed.greeting) {
            return Err(format!(
                "{} reported applied but ConfigMap {}/settings has greeting {greeting:?}",
                short(&lost),
                self.app_ns
            ));
        }
        let page = self.status_page().await?;
        let runs: Vec<RunRecord> = serde_json::from_value(page["runs"].clone())
            .map_err(|e| format!("the status page's runs do not parse: {e}: {page}"))?;
        let run = runs
            .iter()
            .find(|r| r.revision.as_deref() == Some(lost.as_str()) && r.outcome == "applied")
            .ok_or_else(|| {
                format!(
                    "the status page lists no applied run of {}: {}",
                    short(&lost),
                    page["runs"]
                )
            })?;
        if run.reason != "missed_push" {
            return Err(format!(
                "{} was applied by a {:?} run, not by the timer's missed-push check",
                short(&lost),
                run.reason
            ));
        }
        Ok(format!(
            "{} committed, webhook lost; drift timer applied it ({}), {} \"{}\"",
            short(&lost),
            run.reason,
            status.state,
            status.description.unwrap_or_default()
        ))
    }

    // ---- helpers ----

    /// The app's first version, which steps 3 to 5 go back to.
    fn first(&self) -> AppVersion {
        AppVersion {
            image: self.good_image.clone(),
            replicas: "2",
            greeting: FIRST_GREETING,
        }
    }

    /// How long a pushed rollout may take: on a real node, pods are pulled and started (and a
    /// bad one runs into its progress deadline) before the verdict.
    fn rollout_deadline(&self) -> Duration {
        match self.node {
            Some(_) => PUSH_DEADLINE + node::HEALTH_TIMEOUT,
            None => PUSH_DEADLINE,
        }
    }

    /// On a real node, waits until the app's pods of `image` are Ready and answer on their pod
    /// IPs, and says so (", 2/2 pods Ready at ..."); nothing to check when the controller is
    /// played.
    async fn pods_answering(&self, image: &str) -> Result<String, String> {
        if self.node.is_none() {
            return Ok(String::new());
        }
        let want = REPLICAS as usize;
        let ips =
            node::pods_answering(&self.client, &self.app_ns, image, want, PUSH_DEADLINE).await?;
        Ok(format!(
            ", {want}/{want} pods Ready and answering at {}",
            ips.join(", ")
        ))
    }

    fn write_app(&self, v: &AppVersion) -> Result<(), String> {
        let (deadline, probe) = match self.node {
            Some(_) => node::deployment_extras(),
            None => Default::default(),
        };
        let files = [
            (
                "namespace.yaml",
                format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n", self.app_ns),
            ),
            (
                "deployment.yaml",
                format!(
                    r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {{app: web}}
spec:
  replicas: {replicas}
{deadline}  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: web
        image: {image}
        ports: [{{containerPort: 80}}]
{probe}"#,
                    replicas = v.replicas,
                    image = v.image
                ),
            ),
            (
                "service.yaml",
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 80}]\n".to_string(),
            ),
            (
                "configmap.yaml",
                format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  greeting: \"{}\"\n",
                    v.greeting
                ),
            ),
        ];
        for (name, text) in files {
            self.repo.write(&format!("{APP_PATH}/{name}"), &text)?;
        }
        Ok(())
    }

    /// Sends the forge's signed push webhook for the branch moving to `after`.
    async fn send_push(&mut self, after: &str) -> Result<(), String> {
        let sent = match self.forge {
            ForgeKind::Github => {
                self.sim
                    .send_github_push(&self.base, REPO, BRANCH, &self.announced, after, SECRET)
                    .await
            }
            ForgeKind::Gitlab => {
                self.sim
                    .send_gitlab_push(&self.base, REPO, BRANCH, &self.announced, after, SECRET)
                    .await
            }
        };
        let code =
            sent.map_err(|e| format!("sending the push webhook for {}: {e}", short(after)))?;
        if code.as_u16() != 202 {
            return Err(format!(
                "the receiver answered the push webhook for {} with {code}, not 202 (queued)",
                short(after)
            ));
        }
        self.announced = after.to_string();
        Ok(())
    }

    fn statuses(&self, sha: &str) -> Vec<RecordedStatus> {
        let context = format!("driftless/{APP}");
        self.sim
            .statuses(REPO, sha)
            .into_iter()
            .filter(|s| s.context == context)
            .collect()
    }

    /// Waits until the latest `driftless/shop` status of `sha` is final, and checks it is the
    /// wanted one.
    async fn wait_status(
        &self,
        sha: &str,
        want: Verdict,
        within: Duration,
    ) -> Result<RecordedStatus, String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(last) = self.statuses(sha).pop() {
                if let Some(verdict) = Verdict::of(&last.state) {
                    if verdict == want {
                        return Ok(last);
                    }
                    return Err(format!(
                        "commit {} got status {} ({:?}), expected {want:?}",
                        short(sha),
                        last.state,
                        last.description.unwrap_or_default()
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no final commit status on {} within {within:?} (expected {want:?}); \
                     statuses so far: {:?}",
                    short(sha),
                    self.statuses(sha)
                        .iter()
                        .map(|s| s.state.as_str())
                        .collect::<Vec<_>>()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `GET /apps/shop` as JSON, from the running receiver.
    async fn status_page(&self) -> Result<Value, String> {
        let url = format!("{}/apps/{APP}", self.base);
        let resp = self
            .http
            .get(&url)
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: {}", resp.status()));
        }
        resp.json().await.map_err(|e| format!("GET {url}: {e}"))
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.app_ns)
    }

    /// The first container's image and the replicas of `web`.
    async fn deployment_spec(&self) -> Result<(String, i64), String> {
        let d = self.web().await?;
        let spec = d.spec.unwrap_or_default();
        let image = spec
            .template
            .spec
            .and_then(|s| s.containers.into_iter().next())
            .and_then(|c| c.image)
            .unwrap_or_default();
        Ok((image, spec.replicas.map(i64::from).unwrap_or(1)))
    }

    async fn deployment_generation(&self) -> Result<i64, String> {
        Ok(self.web().await?.metadata.generation.unwrap_or(0))
    }

    async fn web(&self) -> Result<Deployment, String> {
        self.deployments()
            .get_opt("web")
            .await
            .map_err(|e| format!("reading Deployment {}/web: {e}", self.app_ns))?
            .ok_or_else(|| format!("Deployment {}/web does not exist", self.app_ns))
    }

    async fn greeting(&self) -> Result<Option<String>, String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.app_ns);
        Ok(api
            .get_opt("settings")
            .await
            .map_err(|e| format!("reading ConfigMap {}/settings: {e}", self.app_ns))?
            .and_then(|c| c.data)
            .and_then(|d| d.get("greeting").cloned()))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "\n--- last lines of the driftless serve log ({}) ---\n{}",
            self.log.display(),
            tail.join("\n")
        )
    }

    /// Stops `serve` (SIGTERM, as Kubernetes would), the played controller and the simulator,
    /// deletes both namespaces and the working directory. Keeps the directory (the git
    /// repository, the settings and the serve log) when something went wrong, or `failed`.
    async fn finish(&mut self, failed: bool) -> Result<(), String> {
        let mut problems = Vec::new();
        if let Some(mut child) = self.serve.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => problems.push(format!("driftless serve exited with {status}")),
                Ok(Err(e)) => problems.push(format!("waiting for driftless serve: {e}")),
                Err(_) => {
                    let _ = child.kill().await;
                    problems.push("driftless serve did not stop within 15s of SIGTERM".into());
                }
            }
        }
        if let Some(controller) = &self.controller {
            controller.abort();
        }
        self.sim.stop().await;
        if self.node.is_some() {
            if let Err(e) = node::force_delete_pods(&self.client, &self.app_ns).await {
                problems.push(e);
            }
        }
        // Both at once: the namespace controller takes a few seconds to empty each.
        let (app, state) = tokio::join!(
            delete_namespace(&self.client, &self.app_ns),
            delete_namespace(&self.client, &self.state_ns)
        );
        problems.extend(app.err().into_iter().chain(state.err()));
        if problems.is_empty() {
            if !failed {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
            Ok(())
        } else {
            Err(format!(
                "{} (files kept in {})",
                problems.join("; "),
                self.dir.display()
            ))
        }
    }
}

/// A commit status as the story judges it; each forge spells the states its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Success,
    Failure,
}

impl Verdict {
    /// `None` while the status is not final (`pending`, GitLab `running`).
    fn of(state: &str) -> Option<Verdict> {
        match state {
            "success" => Some(Verdict::Success),
            "failure" | "error" | "failed" | "canceled" => Some(Verdict::Failure),
            _ => None,
        }
    }
}

/// A git work tree driven through the `git` CLI, as a developer would.
struct WorkTree {
    dir: PathBuf,
}

impl WorkTree {
    async fn git(&self, args: &[&str]) -> Result<String, String> {
        let out = tokio::process::Command::new("git")
            .args([
                "-c",
                "user.name=Dana Developer",
                "-c",
                "user.email=dana@example.com",
            ])
            .args(["-c", "commit.gpgsign=false"])
            .arg("-C")
            .arg(&self.dir)
            .args(args)
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env_remove("GIT_INDEX_FILE")
            .output()
            .await
            .map_err(|e| format!("running git {}: {e}", args.join(" ")))?;
        if !out.status.success() {
            return Err(format!(
                "git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn write(&self, rel: &str, text: &str) -> Result<(), String> {
        let path = self.dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Commits everything and returns the new commit's SHA.
    async fn commit(&self, message: &str) -> Result<String, String> {
        self.git(&["add", "-A"]).await?;
        self.git(&["commit", "-q", "-m", message]).await?;
        self.git(&["rev-parse", "HEAD"]).await
    }
}

/// Plays the Deployment controller the test control plane lacks, on the happy path: whenever
/// a Deployment's generation moves, it reports the rollout complete (all replicas updated and
/// available), as the real controller does once the new pods are ready. Scripted rollouts
/// (old pods left, a deadline exceeded) are [`PlayedController`]'s.
pub fn play_deployment_controller(api: Api<Deployment>) -> PlayedController {
    let namespace = api.namespace().unwrap_or("default").to_string();
    PlayedController::start(
        api.into_client(),
        &namespace,
        Workload::Deployment,
        |_: &Value| vec![RolloutStep::Complete],
    )
}

async fn kube_client(kubeconfig: &Path) -> Result<Client, String> {
    let at = kubeconfig.display();
    let parsed = Kubeconfig::read_from(kubeconfig).map_err(|e| format!("reading {at}: {e}"))?;
    let config = Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("{at}: {e}"))?;
    let client = Client::try_from(config).map_err(|e| format!("{at}: {e}"))?;
    client.apiserver_version().await.map_err(|e| {
        format!("the API server of {at} is not answering ({e}); start the test control plane with tests/cluster/up.sh")
    })?;
    Ok(client)
}

/// Deletes a namespace and waits until it is gone (the namespace controller empties it; on the
/// node the 1.20 kubelet can take well over a minute to confirm its pods are gone).
async fn delete_namespace(client: &Client, name: &str) -> Result<(), String> {
    let api: Api<Namespace> = Api::all(client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(format!("deleting namespace {name}: {e}")),
    }
    let deadline = Instant::now() + NAMESPACE_GONE;
    while Instant::now() < deadline {
        match api.get_opt(name).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Err(format!(
        "namespace {name} still exists {}s after its deletion",
        NAMESPACE_GONE.as_secs()
    ))
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}
