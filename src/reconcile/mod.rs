//! The reconcile engine: a queued [`Job`] becomes cluster state. Resolve the revision (never
//! rolling back to an older one), fetch the app's subtree (nothing when it is unchanged), parse
//! the manifests, validate every write with a server-side dry-run, server-side apply in stages
//! (Namespaces and CRDs, other cluster-scoped objects, namespaced objects), prune what left Git
//! (only what our inventory and labels say is ours), wait for health, record the state in the
//! cluster and post the commit status.

pub mod drift_check;
pub mod health;
pub mod lease;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use kube::{Api, Client};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::forge::{
    fetch_app, BlobCache, CommitStatus, Comparison, Fetched, Forge, ForgeError, Forges, StatusState,
};
use crate::manifest::{self, ManifestError, Object, ObjectRef, Stage};
use crate::queue::{Job, JobReason};
use crate::settings::{AppSettings, Settings};
use health::Health;
use state::{AppState, InventoryItem, RunRecord};

/// Field manager of every object driftless applies.
pub const FIELD_MANAGER: &str = "driftless";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_APP: &str = "driftless.dev/app";
pub const ANNOTATION_PRUNE: &str = "driftless.dev/prune";
/// Objects applied (or dry-run) at once within one stage.
const APPLY_CONCURRENCY: usize = 8;
/// How long a CRD may take to become Established.
const CRD_ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a run waits for another replica to finish the same app.
pub(crate) const LEASE_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("no app named {0:?} in the settings")]
    UnknownApp(String),
    #[error("forge {0} is not configured")]
    ForgeNotConfigured(String),
    #[error(transparent)]
    Forge(#[from] ForgeError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{source_file}: {object}: unknown kind (not served by the API server and no CRD for it in this app)")]
    UnknownKind { object: String, source_file: String },
    #[error("{source_file}: {object} has no namespace and the app sets none (apps[].namespace)")]
    NoNamespace { object: String, source_file: String },
    #[error("{object}: rejected by the API server: {message}")]
    Rejected { object: String, message: String },
    #[error("{object}: apply failed: {message}")]
    Apply { object: String, message: String },
    #[error("{object}: prune failed: {message}")]
    Prune { object: String, message: String },
    #[error("the app has no objects at this revision; refusing to prune everything (set apps[].allow_empty = true if this is intended)")]
    EmptySet,
    #[error("{object} is not healthy: {reason}")]
    Unhealthy { object: String, reason: String },
    #[error("discovery of {what}: {message}")]
    Discovery { what: String, message: String },
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Applied,
    /// The app's subtree did not change: nothing applied, no status posted.
    Unchanged,
    /// Not run (e.g. the revision is behind the applied one).
    Skipped(String),
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct RunReport {
    pub app: String,
    pub revision: Option<String>,
    pub outcome: Outcome,
    /// Objects in the app at this revision.
    pub objects: usize,
    /// Objects written (created or changed).
    pub applied: Vec<ObjectRef>,
    pub pruned: Vec<ObjectRef>,
    pub duration: Duration,
}

/// Options of a run that only the CLI sets.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Validate and report; write nothing (no apply, no prune, no state, no status).
    pub dry_run: bool,
}

/// A desired object made ready to apply.
#[derive(Debug, Clone)]
struct Prepared {
    id: ObjectRef,
    body: Value,
    hash: String,
    stage: Stage,
    resource: ApiResource,
    namespaced: bool,
}

/// The run in progress, as far as recording its failure needs it.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    app: &'a AppSettings,
    job: &'a Job,
    revision: &'a str,
    started_at: &'a str,
    started: Instant,
    state_ns: &'a str,
    opts: RunOptions,
}

/// `(group, version, kind)`.
type KindKey = (String, String, String);

pub struct Engine {
    client: Client,
    forges: Forges,
    blobs: BlobCache,
    settings: Arc<Settings>,
    kinds: Mutex<HashMap<KindKey, (ApiResource, bool)>>,
    identity: String,
    state_ns_ready: std::sync::atomic::AtomicBool,
}

fn kube_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

impl Engine {
    pub fn new(client: Client, forges: Forges, settings: Arc<Settings>) -> Self {
        let identity = format!(
            "{}-{}-{:06x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "driftless".into()),
            std::process::id(),
            rand::random::<u32>() & 0xff_ffff
        );
        Self {
            client,
            forges,
            blobs: BlobCache::new(settings.fetch.blob_cache_bytes),
            settings,
            kinds: Mutex::new(HashMap::new()),
            identity,
            state_ns_ready: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn forge(&self, app: &AppSettings) -> Result<Arc<dyn Forge>, ReconcileError> {
        self.forges
            .get(app.forge)
            .cloned()
            .ok_or_else(|| ReconcileError::ForgeNotConfigured(app.forge.to_string()))
    }

    fn status_url(&self, app: &str) -> Option<String> {
        self.settings
            .server
            .public_url
            .as_ref()
            .map(|u| format!("{u}/apps/{app}"))
    }

    /// Runs one job under the app's lease and records the result in the app's state.
    pub async fn run(&self, job: &Job, opts: RunOptions) -> Result<RunReport, ReconcileError> {
        let app = self
            .settings
            .app(&job.app)
            .cloned()
            .ok_or_else(|| ReconcileError::UnknownApp(job.app.clone()))?;
        let ns = self.settings.kubernetes.state_namespace.clone();
        if !opts.dry_run
            && !self
                .state_ns_ready
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            state::ensure_namespace(&self.client, &ns)
                .await
                .map_err(|e| ReconcileError::Discovery {
                    what: format!("state namespace {ns}"),
                    message: kube_message(&e),
                })?;
            self.state_ns_ready
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let guard = if opts.dry_run {
            None
        } else {
            Some(lease::acquire(&self.client, &ns, &app.name, &self.identity, LEASE_WAIT).await?)
        };
        let result = self.run_locked(&app, job, opts, &ns).await;
        if let Some(g) = guard {
            // Handing the lease back is not on the push's critical path; until it lands, the
            // lease only makes another replica wait a moment longer.
            tokio::spawn(g.release());
        }
        result
    }

    async fn run_locked(
        &self,
        app: &AppSettings,
        job: &Job,
        opts: RunOptions,
        state_ns: &str,
    ) -> Result<RunReport, ReconcileError> {
        let started = Instant::now();
        let started_at = now_rfc3339();
        let forge = self.forge(app)?;
        let mut st = state::load(&self.client, state_ns, &app.name).await?;
        let mut report = RunReport {
            app: app.name.clone(),
            revision: None,
            outcome: Outcome::Unchanged,
            objects: 0,
            applied: Vec::new(),
            pruned: Vec::new(),
            duration: Duration::ZERO,
        };

        let revision = match &job.revision {
            Some(r) => r.clone(),
            None => forge.branch_head(&app.repo, &app.branch).await?,
        };
        report.revision = Some(revision.clone());

        // A delayed or replayed delivery never rolls the app back; an explicit manual
        // revision does what it is told.
        if let Some(applied) = &st.revision {
            let explicit = matches!(job.reason, JobReason::Manual) && job.revision.is_some();
            // A push whose `before` is the applied revision moves forward by definition: no
            // compare round trip on the common path.
            let follows =
                matches!(&job.reason, JobReason::Push { before, .. } if before == applied);
            if applied != &revision
                && !explicit
                && !follows
                && forge.compare(&app.repo, applied, &revision).await? == Comparison::Behind
            {
                let why = format!(
                    "revision {} is behind the applied {}",
                    short(&revision),
                    short(applied)
                );
                info!(app = %app.name, %why, "skipped");
                report.outcome = Outcome::Skipped(why);
                report.duration = started.elapsed();
                return Ok(report);
            }
        }

        let known = if job.full {
            None
        } else {
            st.tree_sha.as_deref()
        };
        let fetched = fetch_app(
            forge.as_ref(),
            &self.blobs,
            &self.settings.fetch,
            &app.repo,
            &revision,
            &app.path,
            known,
        )
        .await;
        let (tree_sha, files) = match fetched {
            Ok(Fetched::Unchanged { tree_sha }) => {
                if !opts.dry_run && st.revision.as_deref() != Some(revision.as_str()) {
                    st.revision = Some(revision.clone());
                    st.tree_sha = Some(tree_sha);
                    state::save(&self.client, state_ns, &app.name, &st).await?;
                }
                info!(app = %app.name, revision = short(&revision), "subtree unchanged; nothing to apply");
                report.duration = started.elapsed();
                return Ok(report);
            }
            Ok(Fetched::Changed { tree_sha, files }) => (tree_sha, files),
            Err(e) => {
                // Nothing was written; report the failure where the user looks.
                let err = ReconcileError::from(e);
                self.finish_failed(
                    &Attempt {
                        app,
                        job,
                        revision: &revision,
                        started_at: &started_at,
                        started,
                        state_ns,
                        opts,
                    },
                    &mut st,
                    &err,
                    &mut report,
                )
                .await?;
                return Err(err);
            }
        };

        // The pending status goes out while the manifests are parsed and validated.
        let pending = async {
            if opts.dry_run {
                return;
            }
            let status = CommitStatus {
                context: format!("driftless/{}", app.name),
                state: StatusState::Pending,
                description: format!("Applying revision {}", short(&revision)),
                target_url: self.status_url(&app.name),
            };
            if let Err(e) = forge.set_status(&app.repo, &revision, &status).await {
                warn!(app = %app.name, error = %e, "cannot post the pending status");
            }
        };
        let work = self.apply_files(app, job, opts, &st, &files, &mut report);
        let (result, ()) = tokio::join!(work, pending);

        match result {
            Ok(inventory) => {
                report.outcome = Outcome::Applied;
                report.duration = started.elapsed();
                if opts.dry_run {
                    return Ok(report);
                }
                let changed = report.applied.len();
                let message = format!(
                    "Applied {} objects ({} changed{}), healthy in {:.1}s",
                    report.objects,
                    changed,
                    if report.pruned.is_empty() {
                        String::new()
                    } else {
                        format!(", {} pruned", report.pruned.len())
                    },
                    report.duration.as_secs_f64()
                );
                st.revision = Some(revision.clone());
                st.tree_sha = Some(tree_sha);
                st.inventory = inventory;
                st.applied_at = Some(now_rfc3339());
                st.record(RunRecord {
                    revision: Some(revision.clone()),
                    reason: job.reason.as_str().to_string(),
                    started_at,
                    duration_ms: report.duration.as_millis() as u64,
                    outcome: "applied".into(),
                    message: message.clone(),
                    applied: changed,
                    pruned: report.pruned.len(),
                });
                let (saved, ()) = tokio::join!(
                    state::save(&self.client, state_ns, &app.name, &st),
                    self.post_status(
                        forge.as_ref(),
                        app,
                        &revision,
                        StatusState::Success,
                        &message
                    )
                );
                saved?;
                info!(app = %app.name, revision = short(&revision), %message, "applied");
                Ok(report)
            }
            Err(err) => {
                self.finish_failed(
                    &Attempt {
                        app,
                        job,
                        revision: &revision,
                        started_at: &started_at,
                        started,
                        state_ns,
                        opts,
                    },
                    &mut st,
                    &err,
                    &mut report,
                )
                .await?;
                Err(err)
            }
        }
    }

    async fn finish_failed(
        &self,
        at: &Attempt<'_>,
        st: &mut AppState,
        err: &ReconcileError,
        report: &mut RunReport,
    ) -> Result<(), ReconcileError> {
        let Attempt {
            app,
            job,
            revision,
            started_at,
            started,
            state_ns,
            opts,
        } = *at;
        report.outcome = Outcome::Failed(err.to_string());
        report.duration = started.elapsed();
        warn!(app = %app.name, revision = short(revision), error = %err, "reconcile failed");
        if opts.dry_run {
            return Ok(());
        }
        // The inventory keeps what was applied before plus anything this run did write, so a
        // later run can still prune it.
        for id in &report.applied {
            if !st.inventory.iter().any(|i| &i.id == id) {
                st.inventory.push(InventoryItem {
                    id: id.clone(),
                    hash: String::new(),
                });
            }
        }
        st.record(RunRecord {
            revision: Some(revision.to_string()),
            reason: job.reason.as_str().to_string(),
            started_at: started_at.to_string(),
            duration_ms: report.duration.as_millis() as u64,
            outcome: "failed".into(),
            message: err.to_string(),
            applied: report.applied.len(),
            pruned: report.pruned.len(),
        });
        state::save(&self.client, state_ns, &app.name, st).await?;
        if let Ok(forge) = self.forge(app) {
            self.post_status(
                forge.as_ref(),
                app,
                revision,
                StatusState::Failure,
                &err.to_string(),
            )
            .await;
        }
        Ok(())
    }

    async fn post_status(
        &self,
        forge: &dyn Forge,
        app: &AppSettings,
        revision: &str,
        state: StatusState,
        description: &str,
    ) {
        let status = CommitStatus {
            context: format!("driftless/{}", app.name),
            state,
            description: description.to_string(),
            target_url: self.status_url(&app.name),
        };
        if let Err(e) = forge.set_status(&app.repo, revision, &status).await {
            warn!(app = %app.name, error = %e, "cannot post the commit status");
        }
    }

    /// Parse, validate, apply, prune, wait for health. Fills `report` as it goes and returns
    /// the new inventory.
    async fn apply_files(
        &self,
        app: &AppSettings,
        job: &Job,
        opts: RunOptions,
        st: &AppState,
        files: &[crate::forge::AppFile],
        report: &mut RunReport,
    ) -> Result<Vec<InventoryItem>, ReconcileError> {
        let objects =
            manifest::parse_files(files.iter().map(|f| (f.path.as_str(), f.content.as_ref())))?;
        if objects.is_empty() && !app.allow_empty {
            return Err(ReconcileError::EmptySet);
        }
        let defined_by_crds: HashSet<(String, String)> =
            objects.iter().filter_map(manifest::crd_defines).collect();

        // Objects whose kind exists only once a CRD of this set is applied wait for stage 2.
        let mut ready = Vec::new();
        let mut after_crds = Vec::new();
        for obj in objects {
            match self.prepare(app, &obj).await {
                Ok(p) => ready.push(p),
                Err(ReconcileError::UnknownKind { .. })
                    if defined_by_crds
                        .contains(&(obj.id.group_version().0.to_string(), obj.id.kind.clone())) =>
                {
                    after_crds.push(obj)
                }
                Err(e) => return Err(e),
            }
        }
        report.objects = ready.len() + after_crds.len();

        let previous: HashMap<&ObjectRef, &str> = st
            .inventory
            .iter()
            .map(|i| (&i.id, i.hash.as_str()))
            .collect();
        let needs_write =
            |p: &Prepared| job.full || previous.get(&p.id).copied() != Some(p.hash.as_str());

        // Validate every write first (a single write validates itself). Objects in namespaces
        // this run creates are validated once those namespaces exist.
        let creating: HashSet<&str> = ready
            .iter()
            .filter(|p| manifest::is_namespace(&p.id))
            .map(|p| p.id.name.as_str())
            .collect();
        let mut writes: Vec<&Prepared> = ready.iter().filter(|p| needs_write(p)).collect();
        writes.sort_by_key(|p| p.stage);
        let total_writes = writes.len() + after_crds.len();
        let mut missing_ns = HashSet::new();
        for ns in creating {
            if !self.namespace_exists(ns).await? {
                missing_ns.insert(ns);
            }
        }
        let (now, later): (Vec<&Prepared>, Vec<&Prepared>) = writes.iter().partition(|p| {
            p.id.namespace
                .as_deref()
                .is_none_or(|ns| !missing_ns.contains(ns))
        });
        if total_writes > 1 || opts.dry_run {
            self.dry_run_all(&now, app).await?;
        }

        if opts.dry_run {
            report.applied = writes.iter().map(|p| p.id.clone()).collect();
            return Ok(Vec::new());
        }

        // Stage 1: Namespaces and CRDs.
        let foundation: Vec<&Prepared> = writes
            .iter()
            .copied()
            .filter(|p| p.stage == Stage::Foundation)
            .collect();
        self.apply_all(&foundation, app, report).await?;
        if !after_crds.is_empty() || foundation.iter().any(|p| manifest::is_crd(&p.id)) {
            for crd in foundation.iter().filter(|p| manifest::is_crd(&p.id)) {
                self.wait_established(&crd.id.name).await?;
            }
        }
        let mut late = Vec::new();
        for obj in &after_crds {
            self.forget_kind(&obj.id);
            late.push(self.prepare(app, obj).await?);
        }
        let late_refs: Vec<&Prepared> = late.iter().collect();
        let pending_validation: Vec<&Prepared> = later
            .iter()
            .copied()
            .filter(|p| p.stage != Stage::Foundation)
            .chain(late_refs.iter().copied())
            .collect();
        if !pending_validation.is_empty() && total_writes > 1 {
            self.dry_run_all(&pending_validation, app).await?;
        }

        // Stages 2 and 3.
        for stage in [Stage::Cluster, Stage::Namespaced] {
            let batch: Vec<&Prepared> = writes
                .iter()
                .copied()
                .chain(late_refs.iter().copied())
                .filter(|p| p.stage == stage)
                .collect();
            self.apply_all(&batch, app, report).await?;
        }

        // Prune what left Git.
        let mut desired: Vec<Prepared> = ready;
        desired.extend(late);
        let keep: HashSet<&ObjectRef> = desired.iter().map(|p| &p.id).collect();
        let gone: Vec<&ObjectRef> = st
            .inventory
            .iter()
            .map(|i| &i.id)
            .filter(|id| !keep.contains(id))
            .collect();
        if app.prune && !gone.is_empty() {
            self.prune(app, &gone, report).await?;
        }

        // Wait for what was written to become healthy.
        let written: HashSet<&ObjectRef> = report.applied.iter().collect();
        let watch: Vec<&Prepared> = desired
            .iter()
            .filter(|p| written.contains(&p.id) && health::may_report_health(&p.id))
            .collect();
        self.wait_healthy(app, &watch).await?;

        report.objects = desired.len();
        Ok(desired
            .iter()
            .map(|p| InventoryItem {
                id: p.id.clone(),
                hash: p.hash.clone(),
            })
            .collect())
    }

    async fn namespace_exists(&self, name: &str) -> Result<bool, ReconcileError> {
        use k8s_openapi::api::core::v1::Namespace;
        Api::<Namespace>::all(self.client.clone())
            .get_opt(name)
            .await
            .map(|n| n.is_some())
            .map_err(|e| ReconcileError::Discovery {
                what: format!("namespace {name}"),
                message: kube_message(&e),
            })
    }

    /// Looks up (and caches) the API resource and scope of an object's kind.
    async fn resolve(&self, id: &ObjectRef) -> Result<(ApiResource, bool), ReconcileError> {
        let (group, version) = id.group_version();
        let key = (group.to_string(), version.to_string(), id.kind.clone());
        if let Some(found) = self.kinds.lock().expect("kinds cache").get(&key) {
            return Ok(found.clone());
        }
        let gvk = GroupVersionKind::gvk(group, version, &id.kind);
        match kube::discovery::pinned_kind(&self.client, &gvk).await {
            Ok((ar, caps)) => {
                let found = (ar, caps.scope == Scope::Namespaced);
                self.kinds
                    .lock()
                    .expect("kinds cache")
                    .insert(key, found.clone());
                Ok(found)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Err(ReconcileError::UnknownKind {
                object: id.to_string(),
                source_file: String::new(),
            }),
            Err(kube::Error::Discovery(_)) => Err(ReconcileError::UnknownKind {
                object: id.to_string(),
                source_file: String::new(),
            }),
            Err(e) => Err(ReconcileError::Discovery {
                what: format!("{} {}", id.api_version, id.kind),
                message: kube_message(&e),
            }),
        }
    }

    fn forget_kind(&self, id: &ObjectRef) {
        let (group, version) = id.group_version();
        self.kinds.lock().expect("kinds cache").remove(&(
            group.to_string(),
            version.to_string(),
            id.kind.clone(),
        ));
    }

    /// Scope, namespace defaulting, our labels, and the content hash.
    async fn prepare(&self, app: &AppSettings, obj: &Object) -> Result<Prepared, ReconcileError> {
        let (resource, namespaced) = self.resolve(&obj.id).await.map_err(|e| match e {
            ReconcileError::UnknownKind { object, .. } => ReconcileError::UnknownKind {
                object,
                source_file: obj.source.to_string(),
            },
            other => other,
        })?;
        let mut id = obj.id.clone();
        let mut body = obj.body.clone();
        if namespaced {
            if id.namespace.is_none() {
                let ns = app
                    .namespace
                    .clone()
                    .ok_or_else(|| ReconcileError::NoNamespace {
                        object: id.to_string(),
                        source_file: obj.source.to_string(),
                    })?;
                body["metadata"]["namespace"] = json!(ns);
                id.namespace = Some(ns);
            }
        } else if id.namespace.is_some() {
            // A namespace on a cluster-scoped object is meaningless; the API server would
            // refuse the apply.
            id.namespace = None;
            if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("namespace");
            }
        }
        manifest::fill_port_protocols(&id.kind, &mut body);
        let labels = body["metadata"]
            .as_object_mut()
            .expect("metadata checked by the manifest parser")
            .entry("labels")
            .or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        labels[LABEL_MANAGED_BY] = json!("driftless");
        labels[LABEL_APP] = json!(app.name);
        let hash = hex::encode(Sha256::digest(
            serde_json::to_vec(&body).expect("JSON value"),
        ));
        Ok(Prepared {
            stage: manifest::stage_of(&id, namespaced),
            id,
            body,
            hash,
            resource,
            namespaced,
        })
    }

    fn api(&self, p: &Prepared) -> Api<DynamicObject> {
        match (&p.id.namespace, p.namespaced) {
            (Some(ns), true) => Api::namespaced_with(self.client.clone(), ns, &p.resource),
            _ => Api::all_with(self.client.clone(), &p.resource),
        }
    }

    fn params(&self, app: &AppSettings, dry_run: bool) -> PatchParams {
        let mut pp = PatchParams::apply(FIELD_MANAGER);
        pp.force = app.force_conflicts;
        pp.dry_run = dry_run;
        pp
    }

    /// Server-side applies (or dry-runs) objects, a bounded number at once.
    async fn patch_all(
        &self,
        objects: &[&Prepared],
        pp: &PatchParams,
    ) -> Vec<(ObjectRef, Result<(), String>)> {
        let calls: Vec<_> = objects
            .iter()
            .map(|p| {
                let (api, id, body, pp) = (self.api(p), p.id.clone(), p.body.clone(), pp.clone());
                async move {
                    let r = api
                        .patch(&id.name, &pp, &Patch::Apply(&body))
                        .await
                        .map(|_| ())
                        .map_err(|e| kube_message(&e));
                    (id, r)
                }
                .boxed()
            })
            .collect();
        futures::stream::iter(calls)
            .buffer_unordered(APPLY_CONCURRENCY)
            .collect()
            .await
    }

    async fn dry_run_all(
        &self,
        objects: &[&Prepared],
        app: &AppSettings,
    ) -> Result<(), ReconcileError> {
        let mut results = self.patch_all(objects, &self.params(app, true)).await;
        results.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, r) in results {
            if let Err(message) = r {
                return Err(ReconcileError::Rejected {
                    object: id.to_string(),
                    message,
                });
            }
        }
        Ok(())
    }

    async fn apply_all(
        &self,
        objects: &[&Prepared],
        app: &AppSettings,
        report: &mut RunReport,
    ) -> Result<(), ReconcileError> {
        let mut results = self.patch_all(objects, &self.params(app, false)).await;
        results.sort_by(|a, b| a.0.cmp(&b.0));
        let mut first_error = None;
        for (id, r) in results {
            match r {
                Ok(()) => report.applied.push(id),
                Err(message) if first_error.is_none() => {
                    first_error = Some(ReconcileError::Apply {
                        object: id.to_string(),
                        message,
                    })
                }
                Err(_) => {}
            }
        }
        report.applied.sort();
        first_error.map_or(Ok(()), Err)
    }

    async fn wait_established(&self, name: &str) -> Result<(), ReconcileError> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let started = Instant::now();
        loop {
            if let Ok(crd) = api.get(name).await {
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    return Ok(());
                }
            }
            if started.elapsed() > CRD_ESTABLISH_TIMEOUT {
                return Err(ReconcileError::Unhealthy {
                    object: format!("apiextensions.k8s.io/v1 CustomResourceDefinition {name}"),
                    reason: "not Established after 30s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes objects that left Git, only when they are in the inventory (the caller passes
    /// only those) and still carry this app's labels and no `driftless.dev/prune: disabled`.
    /// Namespaces go last.
    async fn prune(
        &self,
        app: &AppSettings,
        gone: &[&ObjectRef],
        report: &mut RunReport,
    ) -> Result<(), ReconcileError> {
        let mut ordered: Vec<&ObjectRef> = gone.to_vec();
        ordered.sort_by_key(|id| manifest::is_namespace(id));
        for id in ordered {
            let (resource, namespaced) = match self.resolve(id).await {
                Ok(found) => found,
                Err(ReconcileError::UnknownKind { .. }) => {
                    warn!(app = %app.name, object = %id, "kind no longer served; not pruned");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let api: Api<DynamicObject> = match (&id.namespace, namespaced) {
                (Some(ns), true) => Api::namespaced_with(self.client.clone(), ns, &resource),
                _ => Api::all_with(self.client.clone(), &resource),
            };
            let live = api
                .get_opt(&id.name)
                .await
                .map_err(|e| ReconcileError::Prune {
                    object: id.to_string(),
                    message: kube_message(&e),
                })?;
            let Some(live) = live else { continue };
            let labels = live.metadata.labels.clone().unwrap_or_default();
            let ours = labels.get(LABEL_APP).map(String::as_str) == Some(app.name.as_str())
                && labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some("driftless");
            let disabled = live
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_PRUNE))
                .is_some_and(|v| v == "disabled");
            if !ours || disabled {
                info!(app = %app.name, object = %id, ours, disabled, "left in place");
                continue;
            }
            match api.delete(&id.name, &DeleteParams::background()).await {
                Ok(_) => report.pruned.push(id.clone()),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(ReconcileError::Prune {
                        object: id.to_string(),
                        message: kube_message(&e),
                    })
                }
            }
        }
        Ok(())
    }

    async fn wait_healthy(
        &self,
        app: &AppSettings,
        objects: &[&Prepared],
    ) -> Result<(), ReconcileError> {
        let deadline = Instant::now() + app.health_timeout;
        let mut waiting: Vec<&Prepared> = objects.to_vec();
        loop {
            let mut still = Vec::new();
            let mut last = None;
            for p in waiting {
                let live = self.api(p).get_opt(&p.id.name).await.map_err(|e| {
                    ReconcileError::Discovery {
                        what: p.id.to_string(),
                        message: kube_message(&e),
                    }
                })?;
                let Some(live) = live else {
                    last = Some((p, "not found after apply".to_string()));
                    still.push(p);
                    continue;
                };
                let value = serde_json::to_value(&live).unwrap_or(Value::Null);
                match health::health(&p.id.kind, &value) {
                    Health::Healthy => {}
                    Health::Failed(reason) => {
                        return Err(ReconcileError::Unhealthy {
                            object: p.id.to_string(),
                            reason,
                        })
                    }
                    Health::Progressing(reason) => {
                        last = Some((p, reason));
                        still.push(p);
                    }
                }
            }
            if still.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let (p, reason) = last.expect("something is still waiting");
                return Err(ReconcileError::Unhealthy {
                    object: p.id.to_string(),
                    reason: format!(
                        "{reason} (after {})",
                        humantime::format_duration(app.health_timeout)
                    ),
                });
            }
            waiting = still;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
