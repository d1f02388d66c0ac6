//! Branch heads for the drift timer, the start-up catch-up and `drift --once`: each (forge,
//! repo, branch) is resolved once per round however many apps share it, conditionally, from
//! the head last seen. That head is kept in the cluster (a ConfigMap per branch beside the app
//! states), so a fresh process asks conditionally too and GitHub answers an unmoved branch with
//! a 304, which costs no rate limit.
//!
//! When a head moved, what changed since an app's applied revision is kept beside the head:
//! an app none of whose inputs changed is at the head already, so a commit to one app of a
//! thousand costs the others nothing, in this sweep and every later one, in this process or
//! the next. It takes one compare per head move, however many applied revisions the apps are
//! left at: what changed up to the head before is kept too, and the compare of the two heads
//! adds what changed since. Only a revision the head before knows nothing of (or a history
//! rewritten between the two heads) costs a compare of its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
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

/// The paths changed between an earlier commit and a branch's head, or `None` when the forge
/// could not list them exactly (any path may have changed).
pub(super) type Changes = Option<Arc<Vec<String>>>;

/// `(branch, earlier commit, head)`: a compare asked in the current round.
type CompareKey = (HeadKey, String, String);

/// Data key of a head's ConfigMap holding [`Since`].
const CHANGES_KEY: &str = "changes";
/// Beyond this many bytes of changed paths kept per branch, the largest lists are not kept
/// (their compare is asked again by the next process).
const MAX_CHANGES_BYTES: usize = 256 * 1024;

/// What changed up to a head, by earlier commit, as kept in the head's ConfigMap, and the same
/// for the head seen before it. It names the head it holds for: a record of another head is
/// stale and ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Since {
    head: String,
    since: BTreeMap<String, Option<Vec<String>>>,
    /// The same for the head before (itself without a `previous`; absent from the records
    /// of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<Box<Since>>,
}

/// The head last seen of a branch, and what changed up to it since earlier commits.
#[derive(Debug, Clone, Default)]
struct Known {
    sha: String,
    since: HashMap<String, Changes>,
    /// The head seen before `sha`, and what changed up to it since earlier commits.
    previous: Option<(String, HashMap<String, Changes>)>,
}

/// Branch heads of one engine: resolved at most once per round, asked from the head last seen.
pub(super) struct BranchHeads {
    client: Client,
    namespace: String,
    /// The heads resolved in the round in progress; `None` outside a round, when every
    /// request for a head asks the forge (conditionally: the drift timer's ticks, spread over
    /// the interval, each want the head of their moment).
    round: Mutex<Option<Asked>>,
    /// The head last seen of each branch, read from the cluster once per process.
    known: OnceCell<Mutex<HashMap<HeadKey, Known>>>,
    /// Serialises this process's writes of the compares it keeps.
    keeping: tokio::sync::Mutex<()>,
}

/// What a round asked the forge: each head and each compare once.
#[derive(Default)]
struct Asked {
    heads: HashMap<HeadKey, Resolved>,
    compares: HashMap<CompareKey, Arc<OnceCell<Changes>>>,
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
            keeping: tokio::sync::Mutex::new(()),
        }
    }

    /// Starts a round, which lasts until the returned guard is dropped.
    pub(super) fn begin_round(&self) -> Round<'_> {
        *self.round.lock().expect("round") = Some(Asked::default());
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
        let cell = self.in_round(|asked| asked.heads.entry(key.clone()).or_default().clone());
        match cell {
            Some(cell) => cell.get_or_init(|| self.ask(forge, &key)).await.clone(),
            None => self.ask(forge, &key).await,
        }
    }

    /// The paths changed on `branch` of `repo` between commit `from` and its head `to`: kept
    /// beside the head when an earlier round (of any process) asked; else, when what changed
    /// from `from` up to the head before is kept, that and the changes between the two heads
    /// (one compare for every applied revision); else one compare of its own. Each compare is
    /// asked once per round, and every answer kept. A compare the forge refuses counts as
    /// "anything changed".
    pub(super) async fn changes_since(
        &self,
        forge: &dyn Forge,
        repo: &str,
        branch: &str,
        from: &str,
        to: &str,
    ) -> Changes {
        let key = (forge.kind(), repo.to_string(), branch.to_string());
        if let Some(kept) = self.kept_changes(&key, from, to).await {
            return kept;
        }
        if let Some((previous, before)) = self.kept_before(&key, from, to).await {
            let between = self.compare_once(forge, &key, &previous, to).await;
            if let Some(changes) = union(before, between) {
                let changes = Some(Arc::new(changes));
                self.keep_changes(&key, from, to, changes.clone()).await;
                return changes;
            }
        }
        self.compare_once(forge, &key, from, to).await
    }

    /// The compare of `from` with head `to`, asked once per round (and kept).
    async fn compare_once(
        &self,
        forge: &dyn Forge,
        key: &HeadKey,
        from: &str,
        to: &str,
    ) -> Changes {
        let compare = (key.clone(), from.to_string(), to.to_string());
        let cell = self.in_round(|asked| asked.compares.entry(compare).or_default().clone());
        let ask = || self.compare(forge, key, from, to);
        match cell {
            Some(cell) => cell.get_or_init(ask).await.clone(),
            None => ask().await,
        }
    }

    /// The round's cell for one question (`pick` finds or adds it); `None` outside a round.
    fn in_round<T>(
        &self,
        pick: impl FnOnce(&mut Asked) -> Arc<OnceCell<T>>,
    ) -> Option<Arc<OnceCell<T>>> {
        self.round.lock().expect("round").as_mut().map(pick)
    }

    /// What changed between `from` and head `to`, if kept.
    async fn kept_changes(&self, key: &HeadKey, from: &str, to: &str) -> Option<Changes> {
        let known = self.known_heads().await.lock().expect("known heads");
        let k = known.get(key).filter(|k| k.sha == to)?;
        k.since.get(from).cloned()
    }

    /// Whether head `to` of a GitHub branch is known to descend from `from`: what changed
    /// between them is kept exactly, and GitHub's compare (from the merge base) is exact only
    /// from an ancestor. GitLab's straight compare is exact between any two commits, so it
    /// says nothing of their order.
    pub(super) async fn descends_from(
        &self,
        (forge, repo, branch): (ForgeKind, &str, &str),
        from: &str,
        to: &str,
    ) -> bool {
        if forge != ForgeKind::Github {
            return false;
        }
        let key = (forge, repo.to_string(), branch.to_string());
        matches!(self.kept_changes(&key, from, to).await, Some(Some(_)))
    }

    /// The head seen before `to` and what changed from `from` up to it, when `to` is the head
    /// last seen and that is kept exactly (`from` is not the head before itself).
    async fn kept_before(
        &self,
        key: &HeadKey,
        from: &str,
        to: &str,
    ) -> Option<(String, Arc<Vec<String>>)> {
        let known = self.known_heads().await.lock().expect("known heads");
        let (previous, since) = known.get(key).filter(|k| k.sha == to)?.previous.as_ref()?;
        let before = since.get(from)?.clone()?;
        Some((previous.clone(), before))
    }

    /// Asks the forge what changed between `from` and head `to`, and keeps the answer.
    async fn compare(&self, forge: &dyn Forge, key: &HeadKey, from: &str, to: &str) -> Changes {
        let changes = match forge.changed_since(&key.1, from, to).await {
            Ok(c) if c.complete => Some(Arc::new(c.paths)),
            Ok(_) => None,
            Err(e) => {
                warn!(repo = %key.1, from, to, error = %e, "cannot compare the applied revision with the branch head; reading the app from the forge");
                return None;
            }
        };
        self.keep_changes(key, from, to, changes.clone()).await;
        changes
    }

    /// Adds a compare to what is kept beside head `to` (in memory and in the cluster), when
    /// `to` is still the head last seen.
    async fn keep_changes(&self, key: &HeadKey, from: &str, to: &str, changes: Changes) {
        let _one_at_a_time = self.keeping.lock().await;
        let record = {
            let mut known = self.known_heads().await.lock().expect("known heads");
            let Some(k) = known.get_mut(key).filter(|k| k.sha == to) else {
                return;
            };
            k.since.insert(from.to_string(), changes);
            since_record(k)
        };
        let data = json!({ "data": { CHANGES_KEY: record } });
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = kube::api::Patch::Merge(&data);
        let name = object_name(key);
        if let Err(e) = api.patch(&name, &Default::default(), &patch).await {
            warn!(repo = %key.1, branch = %key.2, error = %e, "cannot keep what changed up to the branch head in the cluster");
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
        let known = self.known_heads().await.lock().expect("known heads");
        known.get(key).map(|k| k.sha.clone())
    }

    /// The heads last seen, read from the cluster on first use.
    async fn known_heads(&self) -> &Mutex<HashMap<HeadKey, Known>> {
        self.known
            .get_or_init(|| async { Mutex::new(self.load().await) })
            .await
    }

    /// Every branch head kept in the state namespace: one LIST. A failure only costs the
    /// conditional requests of this process (logged).
    async fn load(&self) -> HashMap<HeadKey, Known> {
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
                let sha = d.get("sha")?.clone();
                // A record of another head, or one that does not parse, is only stale.
                let record = d
                    .get(CHANGES_KEY)
                    .and_then(|s| serde_json::from_str::<Since>(s).ok())
                    .filter(|s| s.head == sha)
                    .unwrap_or_default();
                Some((
                    key,
                    Known {
                        sha,
                        since: from_record(record.since),
                        previous: record.previous.map(|p| (p.head, from_record(p.since))),
                    },
                ))
            })
            .collect()
    }

    /// Keeps a branch's new head in the cluster (only when it moved). A failure is logged:
    /// it costs the next process one counted request, nothing else.
    async fn remember(&self, key: &HeadKey, sha: &str) {
        let changes = {
            let known = self.known_heads().await;
            let mut known = known.lock().expect("known heads");
            let head = Known {
                sha: sha.to_string(),
                since: HashMap::new(),
                previous: known.remove(key).map(|k| (k.sha, k.since)),
            };
            let changes = since_record(&head);
            known.insert(key.clone(), head);
            changes
        };
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
            "data": {
                "forge": key.0.as_str(), "repo": key.1, "branch": key.2, "sha": sha,
                CHANGES_KEY: changes,
            },
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

/// The record of what changed up to a head (and up to the head before), as kept in its
/// ConfigMap: the largest lists of changed paths are left out past [`MAX_CHANGES_BYTES`]
/// (those of the head itself first in line).
fn since_record(k: &Known) -> String {
    let mut budget = MAX_CHANGES_BYTES;
    let since = bounded(&k.since, &mut budget);
    let previous = k.previous.as_ref().map(|(head, since)| {
        Box::new(Since {
            head: head.clone(),
            since: bounded(since, &mut budget),
            previous: None,
        })
    });
    let record = Since {
        head: k.sha.clone(),
        since,
        previous,
    };
    serde_json::to_string(&record).expect("a changes record")
}

/// The smallest entries of `since` that fit in `budget` bytes (which they use up).
fn bounded(
    since: &HashMap<String, Changes>,
    budget: &mut usize,
) -> BTreeMap<String, Option<Vec<String>>> {
    let mut by_size: Vec<(&String, &Changes)> = since.iter().collect();
    by_size.sort_by_key(|(from, c)| (c.as_ref().map_or(0, |p| p.len()), *from));
    let mut kept = BTreeMap::new();
    for (from, changes) in by_size {
        let size = from.len()
            + changes
                .as_ref()
                .map_or(0, |p| p.iter().map(|p| p.len() + 3).sum());
        if size > *budget {
            break;
        }
        *budget -= size;
        kept.insert(from.clone(), changes.as_ref().map(|p| p.to_vec()));
    }
    kept
}

fn from_record(since: BTreeMap<String, Option<Vec<String>>>) -> HashMap<String, Changes> {
    since
        .into_iter()
        .map(|(from, paths)| (from, paths.map(Arc::new)))
        .collect()
}

/// The paths of both lists, or `None` when either is not exact.
fn union(a: Arc<Vec<String>>, b: Changes) -> Option<Vec<String>> {
    let mut all: Vec<String> = a.iter().chain(b?.iter()).cloned().collect();
    all.sort();
    all.dedup();
    Some(all)
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
    fn the_record_keeps_the_head_before_and_reads_records_without_it() {
        let paths = |p: &[&str]| Some(Arc::new(p.iter().map(|s| s.to_string()).collect()));
        let k = Known {
            sha: "c3".into(),
            since: [("c2".to_string(), paths(&["apps/c/x.yaml"]))].into(),
            previous: Some((
                "c2".into(),
                [("c1".to_string(), paths(&["apps/b/x.yaml"]))].into(),
            )),
        };
        let record: Since = serde_json::from_str(&since_record(&k)).unwrap();
        let previous = record.previous.unwrap();
        assert_eq!(previous.head, "c2");
        assert_eq!(
            previous.since["c1"],
            Some(vec!["apps/b/x.yaml".to_string()])
        );
        let old: Since = serde_json::from_str(r#"{"head":"c3","since":{"c2":null}}"#).unwrap();
        assert!(old.previous.is_none());
        assert_eq!(old.since["c2"], None);
        assert_eq!(
            union(paths(&["b", "a"]).unwrap(), paths(&["a", "c"])),
            Some(vec!["a".to_string(), "b".into(), "c".into()])
        );
        assert_eq!(union(paths(&["a"]).unwrap(), None), None);
    }

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
