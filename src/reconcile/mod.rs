//! The reconcile engine: a queued [`Job`] becomes cluster state. Resolve the revision (never
//! rolling back to an older one), fetch the app's subtree (nothing when it is unchanged), parse
//! the manifests, validate every write with a server-side dry-run, server-side apply in stages
//! (Namespaces and CRDs, other cluster-scoped objects, namespaced objects), prune what left Git
//! (only what our inventory and labels say is ours), wait for health, record the state in the
//! cluster and post the commit status.

pub mod drift_check;
pub mod health;
pub mod lease;
pub mod prune;
mod revision;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use kube::{Api, Client};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::forge::{
    fetch_app, BlobCache, CommitStatus, Fetched, Forge, ForgeError, Forges, StatusState,
};
use crate::manifest::{self, ManifestError, Object, ObjectRef, Stage};
use crate::queue::Job;
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
    #[error(
        "interrupted by a shutdown after writing {written} objects; the next start resumes the run"
    )]
    Interrupted { written: usize },
    /// The run's lease stopped being its own (taken over, deleted, or not renewed in time): it
    /// stopped at the next safe point and wrote nothing more, not even its state.
    #[error("lease of app {app} lost ({why}) after writing {written} objects; stopped there, the app's next run finishes the job")]
    LeaseLost {
        app: String,
        why: String,
        written: usize,
    },
}

impl ReconcileError {
    /// The job never got to run, or was cut short, because another holder had the app's
    /// lease (or the lease could not be read or kept): run it again later, never drop it.
    pub fn retry_later(&self) -> bool {
        matches!(
            self,
            ReconcileError::LeaseLost { .. }
                | ReconcileError::Lease(lease::LeaseError::Held { .. })
                | ReconcileError::Lease(lease::LeaseError::Api { .. })
        )
    }
}

impl ReconcileError {
    /// A fault of the moment (the forge or the API server unavailable), not a verdict on the
    /// commit: the drift timer tries the revision again.
    pub fn is_passing(&self) -> bool {
        match self {
            ReconcileError::Forge(e) => e.is_transient(),
            // A state too large to record is the commit's doing; a failed write is not.
            ReconcileError::State(e) => e.step != state::STEP_SIZE,
            ReconcileError::Discovery { .. } | ReconcileError::Lease(_) => true,
            _ => false,
        }
    }
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
    /// Inventory objects that left Git but were not deleted, with the reason.
    pub kept: Vec<prune::Kept>,
    pub duration: Duration,
}

impl RunReport {
    /// The report of a run that has done nothing yet.
    fn new(app: &str) -> Self {
        Self {
            app: app.to_string(),
            revision: None,
            outcome: Outcome::Unchanged,
            objects: 0,
            applied: Vec::new(),
            pruned: Vec::new(),
            kept: Vec::new(),
            duration: Duration::ZERO,
        }
    }
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
    source: manifest::Source,
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

/// An app's objects at a revision, ready to apply.
struct Desired {
    ready: Vec<Arc<Prepared>>,
    /// Objects of kinds that a CRD of the same set defines, prepared after it is established.
    after_crds: Vec<Object>,
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
    /// What this replica remembers of each app between runs; see [`AppSlot`].
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<AppSlot>>>>,
    /// Set when the grace period of a shutdown is over: runs stop at the next safe point.
    interrupt: tokio_util::sync::CancellationToken,
    lease_timing: lease::LeaseTiming,
    /// The lease of each app's run in progress, checked at the run's safe points.
    run_leases: Mutex<HashMap<String, lease::LeaseWatch>>,
}

/// Prepared objects of each manifest file by path, valid for the file's blob SHA.
type FileCache = HashMap<String, (String, Vec<Arc<Prepared>>)>;

/// What one replica keeps of an app between runs, so a push costs no lease or state reads.
/// Locked for the whole run (and the lease release after it). Nothing here is needed: a
/// replica that starts empty reads it all back from the cluster.
#[derive(Default)]
struct AppSlot {
    /// The app's Lease as this replica wrote it when it last released it: the next run takes
    /// it with one conditional write, which fails if anyone else has written it since.
    lease: Option<k8s_openapi::api::coordination::v1::Lease>,
    /// The app's state as this replica last saved it. Only this replica's runs write it while
    /// the lease above is unchanged, so it is current whenever that lease is taken back.
    state: Option<AppState>,
    files: FileCache,
}

/// The lease of a run: being taken in the background (the quick path, alongside the fetch),
/// held, or none (a dry run, or a take that failed).
enum RunLease {
    Taking(tokio::task::JoinHandle<Result<lease::LeaseGuard, lease::LeaseError>>),
    Held(Box<lease::LeaseGuard>),
    None,
}

impl RunLease {
    /// Waits until the lease is held; every write of a run comes after this.
    async fn held(&mut self) -> Result<(), ReconcileError> {
        let RunLease::Taking(task) = self else {
            return Ok(());
        };
        let taken = task.await;
        *self = RunLease::None;
        let guard = taken.map_err(|join| ReconcileError::Discovery {
            what: "lease".into(),
            message: join.to_string(),
        })??;
        *self = RunLease::Held(Box::new(guard));
        Ok(())
    }

    async fn into_guard(mut self) -> Option<lease::LeaseGuard> {
        let _ = self.held().await;
        match self {
            RunLease::Held(g) => Some(*g),
            _ => None,
        }
    }
}

fn kube_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// What an applied run says on the commit and in its record: counts first (the forge keeps
/// 140 characters), then each object left in place and why (the record keeps 1,024).
fn applied_message(report: &RunReport) -> String {
    let mut counts = format!("{} changed", report.applied.len());
    if !report.pruned.is_empty() {
        counts += &format!(", {} pruned", report.pruned.len());
    }
    if !report.kept.is_empty() {
        counts += &format!(", {} kept", report.kept.len());
    }
    let mut message = format!(
        "Applied {} objects ({counts}), healthy in {:.1}s",
        report.objects,
        report.duration.as_secs_f64()
    );
    for kept in &report.kept {
        message += &format!("; kept {}: {}", kept.id, kept.reason);
    }
    message
}

/// Fails before anything is written when the state this run could leave behind (everything
/// the inventory knows plus every desired object, and a run message of the longest kind) would
/// not fit in the app's ConfigMap. Only a run that adds objects can grow the inventory, so a
/// run that adds none (the common push) is not checked: its state is the one last saved, which
/// fitted, plus at most one bounded run record.
fn check_state_fits<'a>(
    app: &AppSettings,
    st: &AppState,
    desired: impl Iterator<Item = &'a ObjectRef>,
) -> Result<(), ReconcileError> {
    let known: HashSet<manifest::Identity> = st.inventory.iter().map(|i| i.id.identity()).collect();
    let added: Vec<InventoryItem> = desired
        .filter(|id| !known.contains(&id.identity()))
        .map(|id| InventoryItem {
            id: id.clone(),
            // As long as a real hash, as random (so as incompressible) as one.
            hash: hex::encode(&Sha256::digest(id.to_string().as_bytes())[..16]),
        })
        .collect();
    if added.is_empty() {
        return Ok(());
    }
    let mut largest = st.clone();
    largest.inventory.extend(added);
    largest.record(RunRecord {
        revision: Some("f".repeat(40)),
        reason: "push".into(),
        started_at: now_rfc3339(),
        duration_ms: u64::MAX,
        outcome: "interrupted".into(),
        message: "x".repeat(state::MAX_MESSAGE_CHARS * 4),
        applied: usize::MAX,
        pruned: usize::MAX,
    });
    state::check_fits(&app.name, &largest)?;
    Ok(())
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
        let lease_timing = lease::LeaseTiming::new(settings.kubernetes.lease_duration);
        Self {
            client,
            forges,
            blobs: BlobCache::new(settings.fetch.blob_cache_bytes),
            settings,
            kinds: Mutex::new(HashMap::new()),
            identity,
            state_ns_ready: std::sync::atomic::AtomicBool::new(false),
            slots: Mutex::new(HashMap::new()),
            interrupt: tokio_util::sync::CancellationToken::new(),
            lease_timing,
            run_leases: Mutex::new(HashMap::new()),
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
        if opts.dry_run {
            let mut st = state::load(&self.client, &ns, &app.name).await?;
            return self
                .run_locked(
                    &app,
                    job,
                    opts,
                    &mut st,
                    &mut RunLease::None,
                    &mut FileCache::new(),
                )
                .await;
        }
        let mut slot_guard = self.slot(&app.name).lock_owned().await;
        let slot = &mut *slot_guard;

        // The quick path: this replica released the lease last, so taking it back is one
        // conditional write, made while the forge is read, and the state it saved is current.
        if let (Some(released), Some(mut st)) = (slot.lease.take(), slot.state.take()) {
            let take = {
                let (leases, app) = (self.leases(), app.name.clone());
                tokio::spawn(async move { leases.take_released(&app, released).await })
            };
            let mut run_lease = RunLease::Taking(take);
            let r = self
                .run_locked(&app, job, opts, &mut st, &mut run_lease, &mut slot.files)
                .await;
            // Moved: someone else held the app since; start again from the cluster's state.
            if !matches!(
                r,
                Err(ReconcileError::Lease(lease::LeaseError::Moved { .. }))
            ) {
                self.finish_run(&app.name, run_lease, slot_guard, &r, st);
                return r;
            }
        }

        let guard = self.leases().acquire(&app.name).await?;
        let mut run_lease = RunLease::Held(Box::new(guard));
        let mut st = match state::load(&self.client, &ns, &app.name).await {
            Ok(st) => st,
            Err(e) => {
                let r = Err(e.into());
                self.finish_run(&app.name, run_lease, slot_guard, &r, AppState::default());
                return r;
            }
        };
        let r = self
            .run_locked(&app, job, opts, &mut st, &mut run_lease, &mut slot.files)
            .await;
        self.finish_run(&app.name, run_lease, slot_guard, &r, st);
        r
    }

    /// The leases of this replica (its identity) in the state namespace.
    pub(crate) fn leases(&self) -> lease::Leases {
        lease::Leases::new(
            &self.client,
            &self.settings.kubernetes.state_namespace,
            &self.identity,
            self.lease_timing,
        )
    }

    /// Stops every running reconcile at its next safe point (between apply stages, before
    /// pruning, while waiting for health). Each records the interruption in its app's state,
    /// without advancing the applied revision, so the next start runs it again.
    pub fn interrupt(&self) {
        self.interrupt.cancel();
    }

    /// A safe point of a run: stop here on a shutdown's interrupt or when the run's lease is
    /// no longer its own.
    fn check_interrupt(&self, report: &RunReport) -> Result<(), ReconcileError> {
        if self.interrupt.is_cancelled() {
            return Err(ReconcileError::Interrupted {
                written: report.applied.len() + report.pruned.len(),
            });
        }
        self.check_lease(report)
    }

    /// Whether the run of `report.app` still holds its lease; every write of a run after the
    /// lease is taken comes after this check.
    fn check_lease(&self, report: &RunReport) -> Result<(), ReconcileError> {
        let watch = self
            .run_leases
            .lock()
            .expect("run leases")
            .get(&report.app)
            .cloned();
        match watch.and_then(|w| w.lost()) {
            Some(why) => Err(ReconcileError::LeaseLost {
                app: report.app.clone(),
                why,
                written: report.applied.len() + report.pruned.len(),
            }),
            None => Ok(()),
        }
    }

    /// Resolves when the run of `app` must stop: a shutdown's interrupt, or its lease lost.
    async fn stop_requested(&self, app: &str) {
        let watch = self
            .run_leases
            .lock()
            .expect("run leases")
            .get(app)
            .cloned();
        match watch {
            Some(watch) => tokio::select! {
                () = self.interrupt.cancelled() => {}
                () = watch.cancelled() => {}
            },
            None => self.interrupt.cancelled().await,
        }
    }

    /// From now on the safe points of the app's run check `run_lease`.
    fn watch_run_lease(&self, app: &str, run_lease: &RunLease) {
        if let RunLease::Held(guard) = run_lease {
            self.run_leases
                .lock()
                .expect("run leases")
                .insert(app.to_string(), guard.watch());
        }
    }

    /// Waits until every lease this engine took is handed back (releases run in the
    /// background after each run). Call before the process exits.
    pub async fn settle(&self) {
        let slots: Vec<_> = self
            .slots
            .lock()
            .expect("slots")
            .values()
            .cloned()
            .collect();
        for slot in slots {
            drop(slot.lock().await);
        }
    }

    /// The app's slot of this replica's memory.
    fn slot(&self, app: &str) -> Arc<tokio::sync::Mutex<AppSlot>> {
        self.slots
            .lock()
            .expect("slots")
            .entry(app.to_string())
            .or_default()
            .clone()
    }

    /// Hands the lease back off the push's critical path and remembers what the next run of
    /// the app can reuse. The app's slot stays locked until the lease is back, so that run
    /// takes it again with one write. A state whose saving failed is not remembered: the next
    /// run reads it from the cluster.
    fn finish_run(
        &self,
        app: &str,
        run_lease: RunLease,
        mut slot: tokio::sync::OwnedMutexGuard<AppSlot>,
        result: &Result<RunReport, ReconcileError>,
        st: AppState,
    ) {
        self.run_leases.lock().expect("run leases").remove(app);
        let state_current = !matches!(
            result,
            Err(ReconcileError::State(_)
                | ReconcileError::Lease(_)
                | ReconcileError::LeaseLost { .. })
        );
        tokio::spawn(async move {
            let released = match run_lease.into_guard().await {
                Some(guard) => guard.release().await,
                None => None,
            };
            slot.state = (released.is_some() && state_current).then_some(st);
            slot.lease = released;
        });
    }

    /// One run under `run_lease` (awaited before the first write), from the state `st`, which
    /// it updates as it saves it.
    async fn run_locked(
        &self,
        app: &AppSettings,
        job: &Job,
        opts: RunOptions,
        st: &mut AppState,
        run_lease: &mut RunLease,
        files_cache: &mut FileCache,
    ) -> Result<RunReport, ReconcileError> {
        let state_ns = self.settings.kubernetes.state_namespace.as_str();
        let started = Instant::now();
        let started_at = now_rfc3339();
        let forge = self.forge(app)?;
        let mut report = RunReport::new(&app.name);

        let revision = match &job.revision {
            Some(r) => r.clone(),
            None => forge.branch_head(&app.repo, &app.branch).await?,
        };
        report.revision = Some(revision.clone());

        if let Some(why) = self
            .held_back(forge.as_ref(), app, job, st, &revision)
            .await?
        {
            info!(app = %app.name, %why, "skipped");
            report.outcome = Outcome::Skipped(why);
            report.duration = started.elapsed();
            return Ok(report);
        }

        let known = if job.full {
            None
        } else {
            st.tree_sha.as_deref()
        };
        let fetch = fetch_app(
            forge.as_ref(),
            &self.blobs,
            &self.settings.fetch,
            &app.repo,
            &revision,
            &app.path,
            known,
        );
        // Nothing is written before the lease is held.
        let (fetched, held) = tokio::join!(fetch, run_lease.held());
        held?;
        self.watch_run_lease(&app.name, run_lease);
        let attempt = Attempt {
            app,
            job,
            revision: &revision,
            started_at: &started_at,
            started,
            state_ns,
            opts,
        };
        let (tree_sha, files) = match fetched {
            Ok(Fetched::Unchanged { tree_sha }) => {
                self.finish_unchanged(forge.as_ref(), &attempt, st, tree_sha)
                    .await?;
                info!(app = %app.name, revision = short(&revision), "subtree unchanged; nothing to apply");
                report.duration = started.elapsed();
                return Ok(report);
            }
            Ok(Fetched::Changed { tree_sha, files }) => (tree_sha, files),
            Err(e) => {
                // Nothing was written; report the failure where the user looks.
                let err = ReconcileError::from(e);
                self.finish_failed(&attempt, st, &err, &mut report).await?;
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
        let work = async {
            let desired = self.prepare_files(app, &files, files_cache).await?;
            self.apply_files(app, job, opts, st, desired, &mut report)
                .await
        };
        let (result, ()) = tokio::join!(work, pending);
        // Applied and healthy, but nothing is recorded on a lease that is no longer ours.
        let result = result.and_then(|inventory| self.check_lease(&report).map(|()| inventory));

        match result {
            Ok(inventory) => {
                report.outcome = Outcome::Applied;
                report.duration = started.elapsed();
                if opts.dry_run {
                    return Ok(report);
                }
                let changed = report.applied.len();
                let message = applied_message(&report);
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
                    state::save(&self.client, state_ns, &app.name, st),
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
                self.finish_failed(&attempt, st, &err, &mut report).await?;
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
        let interrupted = matches!(err, ReconcileError::Interrupted { .. });
        warn!(app = %app.name, revision = short(revision), error = %err, "reconcile failed");
        // Without the lease, a state write could undo the new holder's and a status could
        // overwrite its verdict: the run's record is its report and this log line.
        if opts.dry_run || self.check_lease(report).is_err() {
            return Ok(());
        }
        // The inventory keeps what was applied before plus anything this run did write, so a
        // later run can still prune it. What it wrote is no longer what the recorded hashes and
        // tree say: the next run (say, the revert of this commit, whose tree is the applied
        // one) rewrites those objects instead of finding them unchanged.
        for id in &report.applied {
            match st
                .inventory
                .iter_mut()
                .find(|i| i.id.identity() == id.identity())
            {
                Some(item) => {
                    // Kept in the version it was written in, the one prune will use.
                    item.id = id.clone();
                    item.hash.clear();
                }
                None => st.inventory.push(InventoryItem {
                    id: id.clone(),
                    hash: String::new(),
                }),
            }
        }
        if !report.applied.is_empty() || !report.pruned.is_empty() {
            st.tree_sha = None;
        }
        st.record(RunRecord {
            revision: Some(revision.to_string()),
            reason: job.reason.as_str().to_string(),
            started_at: started_at.to_string(),
            duration_ms: report.duration.as_millis() as u64,
            outcome: if interrupted {
                "interrupted"
            } else if err.is_passing() {
                revision::OUTCOME_ERROR
            } else {
                revision::OUTCOME_FAILED
            }
            .into(),
            message: err.to_string(),
            applied: report.applied.len(),
            pruned: report.pruned.len(),
        });
        state::save(&self.client, state_ns, &app.name, st).await?;
        if let Ok(forge) = self.forge(app) {
            // An interrupted run is not a verdict on the commit: it stays pending until the
            // next start finishes it.
            let state = if interrupted {
                StatusState::Pending
            } else {
                StatusState::Failure
            };
            self.post_status(forge.as_ref(), app, revision, state, &err.to_string())
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

    /// Parses and prepares every manifest file in path order, reusing what this replica
    /// prepared before from the same blob (`cache`, replaced by this set's files). Objects whose
    /// kind only a CRD of this set defines come back unprepared, for after the CRD is
    /// established.
    async fn prepare_files(
        &self,
        app: &AppSettings,
        files: &[crate::forge::AppFile],
        cache: &mut FileCache,
    ) -> Result<Desired, ReconcileError> {
        enum Entry {
            Cached(Vec<Arc<Prepared>>),
            Parsed(Vec<Object>),
        }
        let mut sorted: Vec<&crate::forge::AppFile> = files.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        let mut entries = Vec::with_capacity(sorted.len());
        let mut defined_by_crds: HashSet<(String, String)> = HashSet::new();
        // Shared by the files parsed in this run, so together they stay within the limits.
        let mut budget = manifest::Budget::default();
        for f in &sorted {
            let entry = match cache.get(&f.path) {
                Some((sha, prepared)) if *sha == f.sha => Entry::Cached(prepared.clone()),
                _ => Entry::Parsed(manifest::parse_file(&f.path, &f.content, &mut budget)?),
            };
            match &entry {
                Entry::Cached(ps) => defined_by_crds.extend(
                    ps.iter()
                        .filter_map(|p| manifest::crd_defines_body(&p.id, &p.body)),
                ),
                Entry::Parsed(objs) => {
                    defined_by_crds.extend(objs.iter().filter_map(manifest::crd_defines))
                }
            }
            entries.push(entry);
        }

        let mut out = Desired {
            ready: Vec::new(),
            after_crds: Vec::new(),
        };
        let mut fresh = FileCache::new();
        let mut seen: HashMap<manifest::Identity, manifest::Source> = HashMap::new();
        let mut check_unique = |id: &ObjectRef, source: &manifest::Source| match seen
            .insert(id.identity(), source.clone())
        {
            Some(first) => Err(ManifestError::Duplicate {
                id: id.to_string(),
                first: first.to_string(),
                second: source.to_string(),
            }),
            None => Ok(()),
        };
        for (f, entry) in sorted.iter().zip(entries) {
            let (prepared, complete) = match entry {
                Entry::Cached(ps) => (ps, true),
                Entry::Parsed(objs) => {
                    let mut ps = Vec::with_capacity(objs.len());
                    let mut complete = true;
                    for obj in objs {
                        match self.prepare(app, &obj).await {
                            Ok(p) => ps.push(Arc::new(p)),
                            // Its kind exists once a CRD of this set is applied: stage 2.
                            Err(ReconcileError::UnknownKind { .. })
                                if defined_by_crds.contains(&(
                                    obj.id.group_version().0.to_string(),
                                    obj.id.kind.clone(),
                                )) =>
                            {
                                complete = false;
                                check_unique(&obj.id, &obj.source)?;
                                out.after_crds.push(obj);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    (ps, complete)
                }
            };
            for p in &prepared {
                check_unique(&p.id, &p.source)?;
            }
            if complete {
                fresh.insert(f.path.clone(), (f.sha.clone(), prepared.clone()));
            }
            out.ready.extend(prepared);
        }
        *cache = fresh;
        Ok(out)
    }

    /// Parse, validate, apply, prune, wait for health. Fills `report` as it goes and returns
    /// the new inventory. Before its first write, the run checks that the state it would leave
    /// fits in the cluster and records any object the inventory does not know yet (`st` is
    /// updated and saved), so nothing it applies can be forgotten.
    async fn apply_files(
        &self,
        app: &AppSettings,
        job: &Job,
        opts: RunOptions,
        st: &mut AppState,
        desired: Desired,
        report: &mut RunReport,
    ) -> Result<Vec<InventoryItem>, ReconcileError> {
        let Desired { ready, after_crds } = desired;
        if ready.is_empty() && after_crds.is_empty() && !app.allow_empty {
            return Err(ReconcileError::EmptySet);
        }
        report.objects = ready.len() + after_crds.len();
        check_state_fits(
            app,
            st,
            ready
                .iter()
                .map(|p| &p.id)
                .chain(after_crds.iter().map(|o| &o.id)),
        )?;

        let previous: HashMap<manifest::Identity, String> = st
            .inventory
            .iter()
            .map(|i| (i.id.identity(), i.hash.clone()))
            .collect();
        let needs_write = |p: &Prepared| {
            job.full || previous.get(&p.id.identity()).map(String::as_str) != Some(p.hash.as_str())
        };

        // Validate every write first (a single write validates itself). Objects in namespaces
        // this run creates are validated once those namespaces exist.
        let creating: HashSet<&str> = ready
            .iter()
            .filter(|p| manifest::is_namespace(&p.id))
            .map(|p| p.id.name.as_str())
            .collect();
        let mut writes: Vec<&Prepared> = ready
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| needs_write(p))
            .collect();
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
        self.record_intent(app, st, writes.iter().map(|p| &p.id))
            .await?;

        // Stage 1: Namespaces and CRDs. What this stage creates is deleted again if an object
        // that could only be validated once it exists is rejected.
        self.check_interrupt(report)?;
        let foundation: Vec<&Prepared> = writes
            .iter()
            .copied()
            .filter(|p| p.stage == Stage::Foundation)
            .collect();
        let mut created: Vec<&ObjectRef> = foundation
            .iter()
            .filter(|p| manifest::is_namespace(&p.id) && missing_ns.contains(p.id.name.as_str()))
            .map(|p| &p.id)
            .collect();
        if !after_crds.is_empty() {
            for crd in foundation.iter().filter(|p| manifest::is_crd(&p.id)) {
                if !self.exists(crd).await? {
                    created.push(&crd.id);
                }
            }
        }
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
        self.record_intent(app, st, late.iter().map(|p| &p.id))
            .await?;
        let late_refs: Vec<&Prepared> = late.iter().collect();
        let pending_validation: Vec<&Prepared> = later
            .iter()
            .copied()
            .filter(|p| p.stage != Stage::Foundation)
            .chain(late_refs.iter().copied())
            .collect();
        if !pending_validation.is_empty() && total_writes > 1 {
            if let Err(rejected) = self.dry_run_all(&pending_validation, app).await {
                self.undo_created(app, &created, report).await;
                return Err(rejected);
            }
        }

        // Stages 2 and 3.
        for stage in [Stage::Cluster, Stage::Namespaced] {
            self.check_interrupt(report)?;
            let batch: Vec<&Prepared> = writes
                .iter()
                .copied()
                .chain(late_refs.iter().copied())
                .filter(|p| p.stage == stage)
                .collect();
            self.apply_all(&batch, app, report).await?;
        }

        // Prune what left Git.
        let mut desired: Vec<Arc<Prepared>> = ready;
        desired.extend(late.into_iter().map(Arc::new));
        // By identity: an object whose apiVersion changed is still wanted, never pruned.
        let keep: HashSet<manifest::Identity> = desired.iter().map(|p| p.id.identity()).collect();
        let gone: Vec<&ObjectRef> = st
            .inventory
            .iter()
            .map(|i| &i.id)
            .filter(|id| !keep.contains(&id.identity()))
            .collect();
        if app.prune && !gone.is_empty() {
            self.check_interrupt(report)?;
            self.prune(app, &gone, report).await?;
        }

        // Wait for what was written to become healthy.
        let written: HashSet<&ObjectRef> = report.applied.iter().collect();
        let watch: Vec<&Prepared> = desired
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| written.contains(&p.id) && health::may_report_health(&p.id))
            .collect();
        self.check_interrupt(report)?;
        tokio::select! {
            r = self.wait_healthy(app, &watch) => r?,
            () = self.stop_requested(&report.app) => self.check_interrupt(report)?,
        }

        report.objects = desired.len();
        // A Namespace or CRD kept for what it still holds stays in the inventory, so a later
        // run deletes it once it holds nothing else.
        let retried = report
            .kept
            .iter()
            .filter(|k| k.retry)
            .map(|k| InventoryItem {
                id: k.id.clone(),
                hash: String::new(),
            });
        Ok(desired
            .iter()
            .map(|p| InventoryItem {
                id: p.id.clone(),
                hash: p.hash.clone(),
            })
            .chain(retried)
            .collect())
    }

    /// Adds to the inventory, and saves before anything is written, the objects it does not
    /// know yet (by identity), with an empty hash: if the run dies or its final save fails,
    /// the next run still knows them, fetches the app again and can prune them. Costs no
    /// write when the run only changes known objects.
    async fn record_intent<'a>(
        &self,
        app: &AppSettings,
        st: &mut AppState,
        ids: impl Iterator<Item = &'a ObjectRef>,
    ) -> Result<(), ReconcileError> {
        let known: HashSet<manifest::Identity> =
            st.inventory.iter().map(|i| i.id.identity()).collect();
        let new: Vec<InventoryItem> = ids
            .filter(|id| !known.contains(&id.identity()))
            .map(|id| InventoryItem {
                id: id.clone(),
                hash: String::new(),
            })
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        st.inventory.extend(new);
        // Stored without the recorded tree: should this run end with no chance to record
        // what it wrote, the next one must not find the app's tree "unchanged" and skip it.
        // The run itself keeps the tree, which its own failure record restores if it wrote
        // nothing.
        let ahead = AppState {
            tree_sha: None,
            ..st.clone()
        };
        let ns = &self.settings.kubernetes.state_namespace;
        state::save_intent(&self.client, ns, &app.name, &ahead).await?;
        Ok(())
    }

    /// Deletes again the Namespaces and CRDs this run created, after an object that could only
    /// be validated once they existed was rejected; through prune, so nothing anyone put in
    /// them meanwhile goes with them. What cannot be deleted stays in `report.applied` (and so
    /// in the inventory, for a later run to prune).
    async fn undo_created(
        &self,
        app: &AppSettings,
        created: &[&ObjectRef],
        report: &mut RunReport,
    ) {
        if created.is_empty() {
            return;
        }
        let mut undo = RunReport::new(&app.name);
        if let Err(e) = self.prune(app, created, &mut undo).await {
            warn!(app = %app.name, error = %e, "cannot delete what the rejected run created");
        }
        report.applied.retain(|id| !undo.pruned.contains(id));
    }

    async fn exists(&self, p: &Prepared) -> Result<bool, ReconcileError> {
        self.api(p)
            .get_opt(&p.id.name)
            .await
            .map(|o| o.is_some())
            .map_err(|e| ReconcileError::Discovery {
                what: p.id.to_string(),
                message: kube_message(&e),
            })
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
        // 128 bits of SHA-256 tell an edit apart; the rest would only make the state bigger.
        let hash =
            hex::encode(&Sha256::digest(serde_json::to_vec(&body).expect("JSON value"))[..16]);
        Ok(Prepared {
            source: obj.source.clone(),
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
                match health::health(&p.id, &value) {
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
