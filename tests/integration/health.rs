//! Health against the real control plane: a played workload controller reports each rollout
//! step by step, and a reconcile waits while a step says the new generation is not observed,
//! old pods remain or a pod is not available, succeeds only once the rollout is complete, and
//! fails at once on a Deployment past its progress deadline, as `kubectl rollout status`
//! decides.
//!
//! Each step but the last is held until driftless has read the workload twice while it
//! showed that step (its client counts its reads): the second read proves it judged the first
//! and went on waiting. So a run that ends early fails the test whatever the machine's speed,
//! and none of these tests depends on timing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use driftless::forge;
use driftless::queue::{Job, JobReason};
use driftless::reconcile::{Engine, Outcome, ReconcileError, RunOptions, RunReport};
use driftless::story::{PlayedController, RolloutStep, Workload};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::reconcile::Env;
use crate::support::api_calls::{counting_client, ApiCalls};

use RolloutStep::{Complete, DeadlineExceeded, OldPodsRemain, Unobserved, UpdatedNotAvailable};

const REPO: &str = "acme/deploy";
/// Long enough that a run ending before it ended on a verdict: a timeout says "(after 2m)".
const HEALTH_TIMEOUT: &str = "health_timeout = \"2m\"";
/// How long the played controller or driftless may take to make a move before the test
/// fails (a guard against hanging, never a measure).
const WITHIN: Duration = Duration::from_secs(60);
/// A full rollout: every state short of complete, in the order the real controllers go.
const ROLLOUT: [RolloutStep; 4] = [Unobserved, OldPodsRemain, UpdatedNotAvailable, Complete];

/// One app holding one workload named `web`, driftless's engine on a read-counting client,
/// and the workload's played controller.
struct Rig {
    env: Env,
    engine: Arc<Engine>,
    reads: ApiCalls,
    controller: PlayedController,
    /// `/apis/apps/v1/namespaces/<ns>/<plural>/web`: where driftless reads the workload.
    path: String,
}

type Run = JoinHandle<Result<RunReport, ReconcileError>>;

impl Rig {
    async fn new(
        workload: Workload,
        script: impl Fn(&Value) -> Vec<RolloutStep> + Send + Sync + 'static,
    ) -> Rig {
        let env = Env::new("github", HEALTH_TIMEOUT).await;
        let (client, reads) = counting_client().await;
        let engine = Arc::new(Engine::new(
            client,
            forge::from_settings(&env.settings).unwrap(),
            Arc::new(env.settings.clone()),
        ));
        let controller =
            PlayedController::start(env.ns.client.clone(), &env.ns.name, workload, script);
        let plural = match workload {
            Workload::Deployment => "deployments",
            Workload::StatefulSet => "statefulsets",
            Workload::DaemonSet => "daemonsets",
        };
        let path = format!("/apis/apps/v1/namespaces/{}/{plural}/web", env.ns.name);
        Rig {
            env,
            engine,
            reads,
            controller,
            path,
        }
    }

    /// Commits `manifest` as the app's only file and starts reconciling the commit, as its
    /// push would. Returns the commit and the run.
    fn push(&self, manifest: &str, message: &str) -> (String, Run) {
        self.env.repo.write("app/web.yaml", manifest);
        let sha = self.env.repo.commit(message);
        (sha.clone(), self.run(sha))
    }

    fn run(&self, sha: String) -> Run {
        let engine = self.engine.clone();
        let job = Job::new(
            "demo",
            Some(sha),
            JobReason::Push {
                delivery: None,
                before: String::new(),
            },
        );
        tokio::spawn(async move { engine.run(&job, RunOptions::default()).await })
    }

    /// Follows the rollout the controller reports from log entry `from` on, expecting
    /// `steps`. Every step but the last is held until driftless has judged it and gone on
    /// waiting; a run that ends meanwhile fails the test. Returns the log index after the
    /// last step.
    async fn hold_each_step(&self, from: usize, steps: &[RolloutStep], run: &mut Run) -> usize {
        for (i, &step) in steps.iter().enumerate() {
            let reported = self
                .controller
                .wait_written(from + i, WITHIN)
                .await
                .unwrap();
            assert_eq!(reported.step, step, "{:?}", self.controller.reported());
            if i + 1 == steps.len() {
                break;
            }
            let before = self.reads.gets_of(&self.path);
            let guard = Instant::now() + WITHIN;
            while self.reads.gets_of(&self.path) < before + 2 {
                if run.is_finished() {
                    let result = run.await.unwrap();
                    panic!("the run ended while the controller reported {step:?}: {result:?}");
                }
                assert!(
                    Instant::now() < guard,
                    "driftless stopped reading {}",
                    self.path
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.controller.advance();
        }
        from + steps.len()
    }

    /// The last `driftless/demo` status of `sha`: (state, description).
    fn status(&self, sha: &str) -> (String, String) {
        let last = self.env.sim.statuses(REPO, sha).pop().expect("a status");
        (last.state, last.description.unwrap_or_default())
    }

    /// Pushes `manifest`, walks the controller through `steps` and checks the run applied it
    /// and posted `success` only after the last step. Returns the log index after it.
    async fn push_rolled_out(&self, manifest: &str, steps: &[RolloutStep], from: usize) -> usize {
        let (sha, mut run) = self.push(manifest, "roll out");
        let next = self.hold_each_step(from, steps, &mut run).await;
        let report = run.await.unwrap().unwrap();
        assert_eq!(report.outcome, Outcome::Applied);
        assert_eq!(self.status(&sha).0, "success");
        next
    }
}

fn deployment(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  \
         selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    \
         spec: {{containers: [{{name: web, image: \"{image}\"}}]}}\n"
    )
}

fn stateful_set(image: &str, partition: Option<i64>) -> String {
    let strategy = partition.map_or(String::new(), |p| {
        format!("  updateStrategy: {{type: RollingUpdate, rollingUpdate: {{partition: {p}}}}}\n")
    });
    format!(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: web\nspec:\n  serviceName: web\n  \
         replicas: 3\n{strategy}  selector: {{matchLabels: {{app: web}}}}\n  template:\n    \
         metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, image: \"{image}\"}}]}}\n"
    )
}

fn daemon_set(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: web\nspec:\n  \
         selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    \
         spec: {{containers: [{{name: web, image: \"{image}\"}}]}}\n"
    )
}

/// The first container's image of a workload.
fn image(obj: &Value) -> &str {
    obj["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or("")
}

/// A new Deployment, then an update of it: while the status is of the previous generation
/// (complete, for the update), while an old replica is pending termination and while a new
/// one is unavailable, the run waits; it succeeds only once the rollout is complete.
#[tokio::test]
async fn a_deployment_is_healthy_only_once_no_old_pod_is_left() {
    let rig = Rig::new(Workload::Deployment, |_| ROLLOUT.to_vec()).await;
    let next = rig
        .push_rolled_out(&deployment("nginx:1.27"), &ROLLOUT, 0)
        .await;
    rig.push_rolled_out(&deployment("nginx:1.28"), &ROLLOUT, next)
        .await;
    rig.env.cleanup().await;
}

/// A Deployment whose controller reports `ProgressDeadlineExceeded` fails the run at once
/// (not after `health_timeout`), naming it, and the commit gets `failure`. Its revert waits
/// while the deadline is the verdict on the replaced spec, and succeeds.
#[tokio::test]
async fn a_deployment_past_its_progress_deadline_fails_the_run_at_once() {
    const BAD: &str = "nginx:1.27-typo";
    let rig = Rig::new(Workload::Deployment, |obj| {
        if image(obj) == BAD {
            vec![Unobserved, DeadlineExceeded]
        } else {
            vec![Unobserved, Complete]
        }
    })
    .await;
    let next = rig
        .push_rolled_out(&deployment("nginx:1.27"), &[Unobserved, Complete], 0)
        .await;

    let (bad, mut run) = rig.push(&deployment(BAD), "bad image");
    let next = rig
        .hold_each_step(next, &[Unobserved, DeadlineExceeded], &mut run)
        .await;
    let object = format!("apps/v1 Deployment {}/web", rig.env.ns.name);
    match run.await.unwrap() {
        Err(ReconcileError::Unhealthy { object: o, reason }) => {
            assert_eq!(o, object);
            assert!(
                reason.starts_with("exceeded its progress deadline: ") && !reason.contains("after"),
                "{reason}"
            );
        }
        other => panic!("expected the deadline to fail the run, got {other:?}"),
    }
    let (state, description) = rig.status(&bad);
    assert_eq!(state, "failure");
    assert!(
        description.starts_with(&format!(
            "{object} is not healthy: exceeded its progress deadline"
        )),
        "{description}"
    );
    // The drift timer does not roll the failed commit back behind Git's back: the Deployment
    // keeps the head's image (what Git says) until the fix or the revert is pushed.
    let report = rig.engine.check_drift("demo", true).await.unwrap();
    assert!(!report.healed, "{}", report.summary());
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(rig.env.ns.client.clone(), &rig.env.ns.name);
    let live = serde_json::to_value(deployments.get("web").await.unwrap()).unwrap();
    assert_eq!(
        image(&live),
        BAD,
        "a drift heal rolled the failed commit back"
    );

    let revert = rig.env.repo.revert(&bad);
    let mut run = rig.run(revert.clone());
    rig.hold_each_step(next, &[Unobserved, Complete], &mut run)
        .await;
    assert_eq!(run.await.unwrap().unwrap().outcome, Outcome::Applied);
    assert_eq!(rig.status(&revert).0, "success");
    rig.env.cleanup().await;
}

/// A StatefulSet is waited on through its whole rolling update (revisions apart, a pod not
/// ready); a partitioned update is done once the pods above the partition are updated, as
/// kubectl decides, while the others stay at the old revision.
#[tokio::test]
async fn a_stateful_set_mid_update_is_waited_for() {
    const PARTITIONED: [RolloutStep; 3] = [Unobserved, OldPodsRemain, Complete];
    let rig = Rig::new(Workload::StatefulSet, |obj| {
        if obj["spec"]["updateStrategy"]["rollingUpdate"]["partition"].as_i64() > Some(0) {
            PARTITIONED.to_vec()
        } else {
            ROLLOUT.to_vec()
        }
    })
    .await;
    let next = rig
        .push_rolled_out(&stateful_set("nginx:1.27", None), &ROLLOUT, 0)
        .await;
    let next = rig
        .push_rolled_out(&stateful_set("nginx:1.28", None), &ROLLOUT, next)
        .await;
    rig.push_rolled_out(&stateful_set("nginx:1.29", Some(2)), &PARTITIONED, next)
        .await;
    rig.env.cleanup().await;
}

/// A DaemonSet is waited on while a node still runs the old pod and while a new pod is not
/// available.
#[tokio::test]
async fn a_daemon_set_mid_update_is_waited_for() {
    let rig = Rig::new(Workload::DaemonSet, |_| ROLLOUT.to_vec()).await;
    let next = rig
        .push_rolled_out(&daemon_set("nginx:1.27"), &ROLLOUT, 0)
        .await;
    rig.push_rolled_out(&daemon_set("nginx:1.28"), &ROLLOUT, next)
        .await;
    rig.env.cleanup().await;
}
