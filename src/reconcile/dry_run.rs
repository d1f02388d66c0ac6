//! What applying a revision of an app would do, without writing anything: every object the
//! revision renders to is read live and server-side applied with `dryRun=All` under the run's
//! field manager (so the API server validates, defaults and runs admission exactly as for the
//! real apply), and the inventory says what would be pruned. Previews of pull requests and
//! `driftless preview` are built on it; nothing here writes to the cluster.

use std::collections::{HashMap, HashSet};

use futures::{FutureExt, StreamExt};
use kube::api::Patch;
use serde_json::Value;

use super::plan::Prepared;
use super::{kube_message, state, Engine, ReconcileError};
use crate::manifest::{self, ObjectRef};
use crate::render::Plan;
use crate::settings::AppSettings;

/// Dry-runs in flight at once for one app, as for a run's own validation.
const DRY_RUN_CONCURRENCY: usize = 8;

/// One object of the revision and what the API server made of it.
#[derive(Debug, Clone)]
pub struct DryRunObject {
    pub id: ObjectRef,
    /// The file (and document) it came from.
    pub source: String,
    /// The live object, when there is one.
    pub live: Option<Value>,
    pub outcome: DryRunOutcome,
}

/// Which objects of the revision are dry-run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every object, as a manual apply writes them all (`driftless preview`, like `kubectl
    /// diff`, so drift shows too).
    EveryObject,
    /// Only the objects a push of the revision would write: those whose content differs from
    /// what the app's last run applied, and new ones. The others are [`DryRunOutcome::Unchanged`]
    /// without a call: a merge leaves them as they are (a request's preview).
    PushWrites,
}

/// The API server's answer to one object's dry-run.
#[derive(Debug, Clone)]
pub enum DryRunOutcome {
    /// Not dry-run: the revision's object is what the last run applied, and a push leaves it
    /// ([`Scope::PushWrites`]).
    Unchanged,
    /// The object as the apply would leave it.
    Accepted(Value),
    /// The API server refused it; its message.
    Rejected(String),
    /// It cannot be dry-run before something else of the same revision exists (its namespace
    /// or its CRD); the object as written, and why.
    NotValidated { desired: Value, reason: String },
}

/// A revision of an app, dry-run against the cluster.
#[derive(Debug, Clone)]
pub struct DryRunSet {
    pub app: String,
    pub revision: String,
    /// The revision the cluster holds now, if the app was ever applied.
    pub applied_revision: Option<String>,
    /// In the order of their sources.
    pub objects: Vec<DryRunObject>,
    /// Objects of the app's inventory the revision no longer has (pruned by an apply, unless
    /// `prune = false` or a prune guard keeps one).
    pub prune: Vec<ObjectRef>,
}

impl Engine {
    /// Renders `app_name` at `revision` and dry-runs the objects of `scope` against the live
    /// cluster. Fails, naming the file, when the revision does not render or parse; an object
    /// the API server refuses is an outcome, not an error.
    pub async fn dry_run_revision(
        &self,
        app_name: &str,
        revision: &str,
        scope: Scope,
    ) -> Result<DryRunSet, ReconcileError> {
        let app = self
            .settings
            .app(app_name)
            .cloned()
            .ok_or_else(|| ReconcileError::UnknownApp(app_name.to_string()))?;
        let forge = self.forge(&app)?;
        let ns = self.settings.kubernetes.state_namespace.as_str();
        let (st, plan) = tokio::join!(
            state::load(&self.client, ns, &app.name),
            self.fetch(forge.as_ref(), &app, revision, None)
        );
        let (st, plan) = (st?, plan?);
        let Plan::Changed { files, .. } = plan else {
            unreachable!("a plan without a known version always renders");
        };
        let objects =
            manifest::parse_files(files.iter().map(|f| (f.path.as_str(), f.content.as_ref())))?;
        if objects.is_empty() && !app.allow_empty {
            return Err(ReconcileError::EmptySet);
        }
        let defined_by_crds: HashSet<(String, String)> =
            objects.iter().filter_map(manifest::crd_defines).collect();
        let created_ns = self.namespaces_created(&objects).await?;
        // What the last run applied, by identity, as a push compares it.
        let applied: HashMap<manifest::Identity, &str> = match scope {
            Scope::EveryObject => HashMap::new(),
            Scope::PushWrites => st
                .inventory
                .iter()
                .map(|i| (i.id.identity(), i.hash.as_str()))
                .collect(),
        };

        let mut ready = Vec::new();
        let mut out = Vec::with_capacity(objects.len());
        for obj in &objects {
            match self.prepare(&app, obj).await {
                Ok(p) if applied.get(&p.id.identity()) == Some(&p.hash.as_str()) => {
                    out.push(DryRunObject {
                        id: p.id.clone(),
                        source: p.source.to_string(),
                        live: None,
                        outcome: DryRunOutcome::Unchanged,
                    })
                }
                Ok(p) => match p
                    .id
                    .namespace
                    .as_deref()
                    .filter(|n| created_ns.contains(*n))
                {
                    Some(n) if p.namespaced => out.push(not_validated(
                        &p.id,
                        &p.source.to_string(),
                        p.body.clone(),
                        format!("namespace {n} is created by this change"),
                    )),
                    _ => ready.push(p),
                },
                Err(ReconcileError::UnknownKind { .. })
                    if defined_by_crds
                        .contains(&(obj.id.group_version().0.to_string(), obj.id.kind.clone())) =>
                {
                    out.push(not_validated(
                        &obj.id,
                        &obj.source.to_string(),
                        obj.body.clone(),
                        "its CustomResourceDefinition is created by this change".into(),
                    ))
                }
                Err(e) => return Err(e),
            }
        }
        out.extend(self.dry_run_each(&app, &ready).await?);
        out.sort_by(|a, b| a.source.cmp(&b.source).then_with(|| a.id.cmp(&b.id)));

        // By the identities the objects are applied under (namespaces defaulted), as the
        // inventory records them.
        let kept: HashSet<manifest::Identity> = out.iter().map(|o| o.id.identity()).collect();
        let prune = if app.prune {
            st.inventory
                .iter()
                .filter(|i| !kept.contains(&i.id.identity()))
                .map(|i| i.id.clone())
                .collect()
        } else {
            Vec::new()
        };
        Ok(DryRunSet {
            app: app.name.clone(),
            revision: revision.to_string(),
            applied_revision: st.revision.clone(),
            objects: out,
            prune,
        })
    }

    /// The Namespaces of `objects` that do not exist yet.
    async fn namespaces_created(
        &self,
        objects: &[manifest::Object],
    ) -> Result<HashSet<String>, ReconcileError> {
        let mut created = HashSet::new();
        for o in objects.iter().filter(|o| manifest::is_namespace(&o.id)) {
            if !self.namespace_exists(&o.id.name).await? {
                created.insert(o.id.name.clone());
            }
        }
        Ok(created)
    }

    /// Reads each object live and dry-runs its apply, a bounded number at once.
    async fn dry_run_each(
        &self,
        app: &AppSettings,
        objects: &[Prepared],
    ) -> Result<Vec<DryRunObject>, ReconcileError> {
        let params = self.params(app, true);
        let calls: Vec<_> = objects
            .iter()
            .map(|p| {
                let (api, params) = (self.api(p), params.clone());
                async move {
                    // Both read the live object; neither writes: at once.
                    let patch = Patch::Apply(&p.body);
                    let (live, after) = tokio::join!(
                        api.get_opt(&p.id.name),
                        api.patch(&p.id.name, &params, &patch)
                    );
                    let live = live.map_err(|e| ReconcileError::Discovery {
                        what: p.id.to_string(),
                        message: kube_message(&e),
                    })?;
                    let outcome = match after {
                        Ok(after) => DryRunOutcome::Accepted(to_value(&after)),
                        Err(e) => DryRunOutcome::Rejected(kube_message(&e)),
                    };
                    Ok::<_, ReconcileError>(DryRunObject {
                        id: p.id.clone(),
                        source: p.source.to_string(),
                        live: live.as_ref().map(to_value),
                        outcome,
                    })
                }
                .boxed()
            })
            .collect();
        futures::stream::iter(calls)
            .buffer_unordered(DRY_RUN_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }
}

fn to_value<T: serde::Serialize>(obj: &T) -> Value {
    serde_json::to_value(obj).unwrap_or(Value::Null)
}

fn not_validated(id: &ObjectRef, source: &str, desired: Value, reason: String) -> DryRunObject {
    DryRunObject {
        id: id.clone(),
        source: source.to_string(),
        live: None,
        outcome: DryRunOutcome::NotValidated { desired, reason },
    }
}
