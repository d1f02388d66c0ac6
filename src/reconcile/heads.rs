//! Branch heads for the drift timer, the start-up catch-up and `drift --once`: each (forge,
//! repo, branch) is resolved once per round however many apps share it, conditionally, from
//! the head last seen. That head is kept in the cluster (a ConfigMap per branch beside the app
//! states), so a fresh process asks conditionally too and GitHub answers an unmoved branch with
//! a 304, which costs no rate limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tracing::{debug, warn};

use super::state;
use crate::forge::{Forge, ForgeError};
use crate::settings::ForgeKind;

/// Label of the ConfigMaps holding a known branch head; its value is the forge.
pub const LABEL_BRANCH_HEAD: &str = "driftless.dev/branch-head";

/// `(forge, repo, branch)`.
type HeadKey = (ForgeKind, String, String);

/// A head resolved in the current round (shared by every app of the branch), or the error
/// the forge gave for it.
type Resolved = Arc<OnceCell<Result<String, ForgeError>>>;

/// Branch heads of one engine: resolved at most once per round, asked from the head last seen.
pub(super) struct BranchHeads {
    client: Client,
    namespace: String,
    /// The heads resolved in the round in progress; `None` outside a round, when every
    /// request for a head asks the forge (conditionally: the drift timer's ticks, spread over
    /// the interval, each want the head of their moment).
    round: Mutex<Option<HashMap<HeadKey, Resolved>>>,
    /// The head last seen of each branch, read from the cluster once per process.
    known: OnceCell<Mutex<HashMap<HeadKey, String>>>,
}

/// The name of the ConfigMap keeping a branch's head: a hash, since repos and branches may hold
/// characters no object name can.
fn object_name(key: &HeadKey) -> String {
    let mut h = Sha256::new();
    for part in [key.0.as_str(), key.1.as_str(), key.2.as_str()] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    format!("driftless-head-{}", &hex::encode(h.finalize())[..20])
}

impl BranchHeads {
    pub(super) fn new(client: Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            round: Mutex::new(None),
            known: OnceCell::new(),
        }
    }

    /// Starts a round, which lasts until the returned guard is dropped.
    pub(super) fn begin_round(&self) -> Round<'_> {
        *self.round.lock().expect("round") = Some(HashMap::new());
        Round(self)
    }

    /// The head of `branch` of `repo`: the one resolved this round, or asked from the forge
    /// (conditionally, from the head last seen) once for every app that shares the branch.
    pub(super) async fn head(
        &self,
        forge: &dyn Forge,
        repo: &str,
        branch: &str,
    ) -> Result<String, ForgeError> {
        let key = (forge.kind(), repo.to_string(), branch.to_string());
        let cell = self
            .round
            .lock()
            .expect("round")
            .as_mut()
            .map(|resolved| resolved.entry(key.clone()).or_default().clone());
        match cell {
            Some(cell) => cell.get_or_init(|| self.ask(forge, &key)).await.clone(),
            None => self.ask(forge, &key).await,
        }
    }

    /// Asks the forge for a branch's head, from the one last seen; keeps it when it moved.
    async fn ask(&self, forge: &dyn Forge, key: &HeadKey) -> Result<String, ForgeError> {
        let known = self.known(key).await;
        let sha = forge
            .branch_head_since(&key.1, &key.2, known.as_deref())
            .await?;
        if known.as_deref() != Some(sha.as_str()) {
            self.remember(key, &sha).await;
        }
        Ok(sha)
    }

    /// The head last seen of a branch, as kept in the cluster (read once per process).
    async fn known(&self, key: &HeadKey) -> Option<String> {
        let known = self
            .known
            .get_or_init(|| async { Mutex::new(self.load().await) })
            .await;
        known.lock().expect("known heads").get(key).cloned()
    }

    /// Every branch head kept in the state namespace: one LIST. A failure only costs the
    /// conditional requests of this process (logged).
    async fn load(&self) -> HashMap<HeadKey, String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = ListParams::default().labels(LABEL_BRANCH_HEAD);
        let list = match state::list_all(&api, params).await {
            Ok(list) => list,
            Err(e) => {
                warn!(namespace = %self.namespace, error = %e, "cannot read the known branch heads; asking the forge unconditionally");
                return HashMap::new();
            }
        };
        list.into_iter()
            .filter_map(|cm| {
                let d = cm.data?;
                let forge = match d.get("forge")?.as_str() {
                    "github" => ForgeKind::Github,
                    "gitlab" => ForgeKind::Gitlab,
                    _ => return None,
                };
                let key = (forge, d.get("repo")?.clone(), d.get("branch")?.clone());
                Some((key, d.get("sha")?.clone()))
            })
            .collect()
    }

    /// Keeps a branch's new head in the cluster (only when it moved). A failure is logged:
    /// it costs the next process one counted request, nothing else.
    async fn remember(&self, key: &HeadKey, sha: &str) {
        if let Some(known) = self.known.get() {
            known
                .lock()
                .expect("known heads")
                .insert(key.clone(), sha.to_string());
        }
        let name = object_name(key);
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "labels": {
                    super::LABEL_MANAGED_BY: "driftless",
                    LABEL_BRANCH_HEAD: key.0.as_str(),
                },
            },
            "data": {"forge": key.0.as_str(), "repo": key.1, "branch": key.2, "sha": sha},
        });
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        match state::merge_or_create(&api, &name, &cm).await {
            Ok(()) => debug!(repo = %key.1, branch = %key.2, sha, "branch head kept"),
            Err(e) => {
                warn!(repo = %key.1, branch = %key.2, error = %e, "cannot keep the branch head in the cluster")
            }
        }
    }
}

/// A round of [`BranchHeads`]: each head is asked once while it lives.
pub struct Round<'a>(&'a BranchHeads);

impl Drop for Round<'_> {
    fn drop(&mut self) {
        *self.0.round.lock().expect("round") = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_tell_branches_apart_and_are_valid() {
        let a = object_name(&(ForgeKind::Github, "acme/deploy".into(), "main".into()));
        let b = object_name(&(ForgeKind::Gitlab, "acme/deploy".into(), "main".into()));
        let c = object_name(&(ForgeKind::Github, "acme/deploy".into(), "ma/in".into()));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(
            a.len() <= 63
                && a.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
}
