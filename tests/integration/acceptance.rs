//! Acceptance: the whole story of `driftless::story` (the one `scripts/demo` shows) against the
//! real `driftless serve` binary and the forge simulator: on the node cluster, where the pods
//! really run (a bad image fails for real and its revert succeeds once the pods answer), and
//! on the control plane alone with the Deployment controller played, once per forge. Each step
//! checks what it promises and the test fails naming the step that did not happen.

use driftless::settings::ForgeKind;
use driftless::story::{self, RealNode, StoryOptions, STEPS};

use crate::support::cluster::{self, Cluster};

async fn story_on(forge: ForgeKind, on: Cluster) {
    // Fails with instructions when there is no cluster: never a silent skip.
    cluster::client_of(on).await;
    let (kubeconfig, node) = match on {
        Cluster::ControlPlane => (std::env::var(cluster::KUBECONFIG_ENV).unwrap(), None),
        Cluster::WithNode => (
            cluster::node_kubeconfig(),
            Some(RealNode {
                registry: cluster::registry(),
            }),
        ),
    };
    let opts = StoryOptions {
        forge,
        kubeconfig: kubeconfig.into(),
        driftless_bin: env!("CARGO_BIN_EXE_driftless").into(),
        node,
    };
    let reports = story::run(&opts, |step| eprintln!("{step}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let titles: Vec<&str> = reports.iter().map(|r| r.title).collect();
    assert_eq!(titles, STEPS, "every step ran, in order");
}

#[tokio::test]
async fn the_story_on_github_with_a_real_node() {
    story_on(ForgeKind::Github, Cluster::WithNode).await;
}

#[tokio::test]
async fn the_story_on_github_with_the_controller_played() {
    story_on(ForgeKind::Github, Cluster::ControlPlane).await;
}

#[tokio::test]
async fn the_story_on_gitlab_with_the_controller_played() {
    story_on(ForgeKind::Gitlab, Cluster::ControlPlane).await;
}
