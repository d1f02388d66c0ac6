//! Acceptance: the whole story of `driftless::story` (the one `scripts/demo` shows) against the
//! real `driftless serve` binary, the test control plane and the forge simulator, once per
//! forge. Each step checks what it promises and the test fails naming the step that did not
//! happen.

use driftless::settings::ForgeKind;
use driftless::story::{self, StoryOptions, STEPS};

async fn story_on(forge: ForgeKind) {
    // Fails with instructions when there is no control plane: never a silent skip.
    crate::support::cluster::client().await;
    let kubeconfig = std::env::var(crate::support::cluster::KUBECONFIG_ENV).unwrap();
    let opts = StoryOptions {
        forge,
        kubeconfig: kubeconfig.into(),
        driftless_bin: env!("CARGO_BIN_EXE_driftless").into(),
    };
    let reports = story::run(&opts, |step| eprintln!("{step}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let titles: Vec<&str> = reports.iter().map(|r| r.title).collect();
    assert_eq!(titles, STEPS, "every step ran, in order");
}

#[tokio::test]
async fn the_story_on_github() {
    story_on(ForgeKind::Github).await;
}

#[tokio::test]
async fn the_story_on_gitlab() {
    story_on(ForgeKind::Gitlab).await;
}
