//! The story on a cluster with a real node (tests/cluster/up.sh --with-node): the Deployment
//! controller, the scheduler and the kubelet are real, the workload is a busybox web server
//! from the local registry behind an HTTP readiness probe, and "the pods are up" is checked by
//! asking each pod over the pod network from the host.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};

/// A cluster whose pods really run, and where its images come from.
#[derive(Debug, Clone)]
pub struct RealNode {
    /// `host:port` of the registry the node pulls from (tests/cluster/images.sh's images).
    pub registry: String,
}

/// The Deployment's `progressDeadlineSeconds` on a real node: short, so that a bad image
/// fails the run well within the story's deadlines, and shorter than the app's
/// `health_timeout` so that the verdict is the controller's, not driftless's patience.
pub const PROGRESS_DEADLINE_SECONDS: u64 = 15;
/// The app's `health_timeout` on a real node: pods are pulled and started first.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(90);
/// The tag tests/cluster/images.sh never pushes.
const MISSING_TAG: &str = "missing";

impl RealNode {
    /// The web server image the story starts with (its page says `busybox-httpd 1`).
    pub fn good_image(&self) -> String {
        format!("{}/busybox-httpd:1", self.registry)
    }

    /// An image whose tag is not in the registry: the kubelet reports `ErrImagePull`.
    pub fn bad_image(&self) -> String {
        format!("{}/busybox-httpd:{MISSING_TAG}", self.registry)
    }
}

/// The lines the story's `web` Deployment gains on a real node: the progress deadline (in
/// its spec), and the readiness probe the pods must pass with a short grace period (in its
/// container: busybox's httpd as PID 1 ignores SIGTERM, and the story deletes its pods
/// several times).
pub fn deployment_extras() -> (String, String) {
    (
        format!("  progressDeadlineSeconds: {PROGRESS_DEADLINE_SECONDS}\n"),
        "        readinessProbe: {httpGet: {path: /, port: 80}, periodSeconds: 1}\n      \
         terminationGracePeriodSeconds: 1\n"
            .to_string(),
    )
}

/// Waits until `app=web` in `ns` has exactly `want` pods not being deleted, all running
/// `image` and Ready, and each answers `GET /` on its pod IP from this host; returns their IPs. Fails after `within`
/// saying what it saw last.
pub async fn pods_answering(
    client: &Client,
    ns: &str,
    image: &str,
    want: usize,
    within: Duration,
) -> Result<Vec<String>, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + within;
    loop {
        let seen = web_pods(client, ns).await?;
        // A pod being deleted no longer counts, as for the Deployment controller: the kubelet
        // can take a while to give up on one stuck pulling an image.
        let live: Vec<&PodView> = seen.iter().filter(|p| !p.terminating).collect();
        let ready: Vec<&PodView> = live
            .iter()
            .copied()
            .filter(|p| p.ready && p.image == image)
            .collect();
        let mut answered = Vec::new();
        if ready.len() == want && live.len() == want {
            for pod in &ready {
                let url = format!("http://{}/", pod.ip);
                match http.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {
                        let body = r.text().await.unwrap_or_default();
                        if body.starts_with("busybox-httpd") {
                            answered.push(pod.ip.clone());
                        }
                    }
                    _ => {}
                }
            }
            if answered.len() == want {
                return Ok(answered);
            }
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = seen.iter().map(PodView::summary).collect();
            return Err(format!(
                "{within:?} on, {ns} does not have {want} Ready pods of {image} answering on \
                 their pod IPs; pods: [{}]",
                seen.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The kubelet's reason (`ErrImagePull`, `ImagePullBackOff`) for a pod of `app=web` in `ns`
/// waiting on `image`, if one is waiting on it.
pub async fn image_pull_failure(
    client: &Client,
    ns: &str,
    image: &str,
) -> Result<Option<String>, String> {
    Ok(web_pods(client, ns)
        .await?
        .into_iter()
        .filter(|p| p.image == image)
        .find_map(|p| p.waiting.filter(|w| w.contains("Image"))))
}

/// Deletes every pod of `ns` without a grace period, before the namespace goes: the kubelet
/// 1.20 of the test node takes minutes to let go of a pod stuck in `ImagePullBackOff` (step 3
/// leaves one), and the namespace is not deleted before its pods are. The kubelet removes the
/// containers afterwards.
pub async fn force_delete_pods(client: &Client, ns: &str) -> Result<(), String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match pods.delete_collection(&now, &ListParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(format!("deleting the pods of {ns}: {e}")),
    }
}

/// What the story needs to know of one pod.
struct PodView {
    name: String,
    image: String,
    ip: String,
    ready: bool,
    terminating: bool,
    /// The first container's waiting reason.
    waiting: Option<String>,
}

impl PodView {
    fn summary(&self) -> String {
        format!(
            "{} {} ip={} ready={} terminating={} waiting={}",
            self.name,
            self.image,
            self.ip,
            self.ready,
            self.terminating,
            self.waiting.as_deref().unwrap_or("-")
        )
    }
}

async fn web_pods(client: &Client, ns: &str) -> Result<Vec<PodView>, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .map_err(|e| format!("listing the pods of {ns}: {e}"))?;
    Ok(list
        .items
        .into_iter()
        .map(|p| {
            let status = p.status.unwrap_or_default();
            let ready = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let waiting = status
                .container_statuses
                .unwrap_or_default()
                .into_iter()
                .next()
                .and_then(|c| c.state)
                .and_then(|s| s.waiting)
                .and_then(|w| w.reason);
            PodView {
                name: p.metadata.name.unwrap_or_default(),
                image: p
                    .spec
                    .and_then(|s| s.containers.into_iter().next())
                    .and_then(|c| c.image)
                    .unwrap_or_default(),
                ip: status.pod_ip.unwrap_or_default(),
                ready,
                terminating: p.metadata.deletion_timestamp.is_some(),
                waiting,
            }
        })
        .collect())
}
