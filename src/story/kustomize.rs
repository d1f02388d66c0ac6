//! The story's Kustomize step: two overlays (`shop-prod`, `shop-staging`) of one base, each an
//! app of its own. A commit adds them and both are applied; a change to the base alone then
//! reconciles both overlays, each with its own commit status, while the plain `shop` app,
//! whose directory did not change, gets no status at all.

use std::time::Instant;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

use super::{short, Stage, Verdict, POLL, PUSH_DEADLINE, REPO};
use crate::simulator::RecordedStatus;

/// The overlay apps, in the order the settings list them.
pub const OVERLAYS: [&str; 2] = ["prod", "staging"];
/// Where the base and the overlays live in the repository.
const ROOT: &str = "kustomize";

/// The `[[apps]]` entries of the overlays, for the story's settings.
pub fn apps_toml(forge: &str, repo: &str, branch: &str, namespace: &str) -> String {
    OVERLAYS
        .iter()
        .map(|env| {
            format!(
                "[[apps]]\nname = \"{}\"\nforge = \"{forge}\"\nrepo = \"{repo}\"\nbranch = \"{branch}\"\npath = \"{ROOT}/envs/{env}\"\nnamespace = \"{namespace}\"\nhealth_timeout = \"30s\"\n",
                app_name(env)
            )
        })
        .collect()
}

/// The `[render]` section: the story renders with kubectl's bundled Kustomize v5, which this
/// machine has (the container image ships `kustomize` itself).
pub const RENDER_TOML: &str = "[render]\nkustomize_command = [\"kubectl\", \"kustomize\"]\n";

fn app_name(env: &str) -> String {
    format!("shop-{env}")
}

impl Stage {
    /// 6. Two overlays of one base: added, then a change to the base alone reconciles both.
    pub(super) async fn kustomize_base_change(&mut self) -> Result<String, String> {
        self.write_base("welcome")?;
        for env in OVERLAYS {
            self.repo.write(
                &format!("{ROOT}/envs/{env}/kustomization.yaml"),
                &format!(
                    "resources:\n- ../../base\nnamePrefix: {env}-\nnamespace: {}\nlabels:\n- pairs:\n    env: {env}\n",
                    self.app_ns
                ),
            )?;
        }
        let added = self
            .repo
            .commit("Add prod and staging overlays of one base")
            .await?;
        self.send_push(&added).await?;
        for env in OVERLAYS {
            self.wait_app_status(&app_name(env), &added).await?;
            self.check_banner(env, "welcome").await?;
        }

        self.write_base("welcome back")?;
        let changed = self.repo.commit("Change the base's banner").await?;
        let started = Instant::now();
        self.send_push(&changed).await?;
        for env in OVERLAYS {
            self.wait_app_status(&app_name(env), &changed).await?;
            self.check_banner(env, "welcome back").await?;
        }
        let took = started.elapsed();
        let shop = self.statuses(&changed);
        if !shop.is_empty() {
            return Err(format!(
                "the base change posted a status for the plain app, whose directory did not change: {shop:?}"
            ));
        }
        Ok(format!(
            "{} added two overlays of one base (rendered by kustomize); {} changed only the base: \
             both overlays reconciled in {:.1}s, each with its own success, the plain app untouched",
            short(&added),
            short(&changed),
            took.as_secs_f64()
        ))
    }

    fn write_base(&self, banner: &str) -> Result<(), String> {
        self.repo.write(
            &format!("{ROOT}/base/kustomization.yaml"),
            "resources:\n- banner.yaml\n",
        )?;
        self.repo.write(
            &format!("{ROOT}/base/banner.yaml"),
            &format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: banner\ndata:\n  message: \"{banner}\"\n"
            ),
        )
    }

    async fn check_banner(&self, env: &str, want: &str) -> Result<(), String> {
        let name = format!("{env}-banner");
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.app_ns);
        let cm = cms
            .get_opt(&name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("ConfigMap {}/{name} was not applied", self.app_ns))?;
        let got = cm.data.unwrap_or_default().remove("message");
        if got.as_deref() != Some(want) {
            return Err(format!(
                "ConfigMap {}/{name} says {got:?}, the base says {want:?}",
                self.app_ns
            ));
        }
        Ok(())
    }

    /// Waits for `app`'s final status on `sha` and checks it is `success`.
    async fn wait_app_status(&self, app: &str, sha: &str) -> Result<RecordedStatus, String> {
        let context = format!("driftless/{app}");
        let deadline = Instant::now() + PUSH_DEADLINE;
        loop {
            let last = self
                .sim
                .statuses(REPO, sha)
                .into_iter()
                .rfind(|s| s.context == context);
            if let Some(last) = last {
                match Verdict::of(&last.state) {
                    Some(Verdict::Success) => return Ok(last),
                    Some(Verdict::Failure) => {
                        return Err(format!(
                            "{app}: commit {} got {} ({:?})",
                            short(sha),
                            last.state,
                            last.description.unwrap_or_default()
                        ))
                    }
                    None => {}
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{app}: no final status on {} within {PUSH_DEADLINE:?}",
                    short(sha)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
