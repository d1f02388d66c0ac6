//! The reconcile engine: a queued [`Job`] becomes cluster state. A run passes through stages,
//! each in a module of its own: `plan` (resolve the revision, never rolling back to an older
//! one, with `revision`; fetch the app's subtree, nothing when it is unchanged; parse and
//! prepare the manifests), `apply` (validate every write with a server-side dry-run,
//! server-side apply in stages: Namespaces and CRDs, other cluster-scoped objects, namespaced
//! objects; wait for health), `prune` (delete what left Git, only what our inventory and labels
//! say is ours) and `record` (the app's state in the cluster and the commit status). The run
//! holds the app's Lease throughout (`run_lease`).

mod apply;
pub mod desired;
pub mod drift_check;
pub mod dry_run;
pub mod heads;
pub mod health;
pub mod lease;
mod live;
pub mod phases;
mod plan;
pub mod prune;
mod record;
mod revision;
mod run_lease;
pub mod state;
mod sweep;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::core::ApiResource;
use kube::Client;
use tracing::{debug, info, warn};

use crate::forge::{BlobCache, Forge, ForgeError, Forges};
use crate::manifest::{ManifestError, ObjectRef};
use crate::queue::{Job, JobReason};
use crate::render::{Plan, RenderError, Renderer};
use crate::settings::{AppSettings, Settings};
use plan::{FileMemos, KindKey};
use run_lease::{AppSlot, RunLease};
use state::AppState;

/// Field manager of every object driftless applies.
pub const FIELD_MANAGER: &str = "driftless";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_APP: &str = "driftless.dev/app";
pub const ANNOTATION_PRUNE: &str = "driftless.dev/prune";

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
    /// The app could not be rendered (a Kustomize app's inputs or build).
    #[error(transparent)]
    Render(RenderError),
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
            ReconcileError::Render(e) => e.is_passing(),
            // A state too large to record is the commit's doing; a failed write is not.
            ReconcileError::State(e) => e.step != state::STEP_SIZE,
            ReconcileError::Discovery { .. } | ReconcileError::Lease(_) => true,
            _ => false,
        }
    }
}

impl From<RenderError> for ReconcileError {
    /// Forge and manifest faults met while rendering are those faults, handled as a plain
    /// app's would be.
    fn from(e: RenderError) -> Self {
        match e {
            RenderError::Forge(e) => ReconcileError::Forge(e),
            RenderError::Manifest(e) => ReconcileError::Manifest(e),
            e => ReconcileError::Render(e),
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

/// The run in progress, as far as recording its end needs it.
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

pub struct Engine {
    client: Client,
    forges: Forges,
    blobs: BlobCache,
    renderer: Renderer,
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
    /// Branch heads, resolved once per branch in a round, conditionally.
    heads: heads::BranchHeads,
    /// Time by phase over every run of this engine.
    phases: phases::PhaseTimes,
    /// App states (with their kept desired manifests) read in bulk for a sweep (`None` when
    /// no sweep is on); an entry is dropped once a run of the app may have changed it (the
    /// sweep reads them all again after runs that applied).
    prefetched: Mutex<Option<Prefetched>>,
    /// API requests the bulk read of [`Self::prefetched`] took, not yet counted in a drift
    /// report (the first batch of the sweep's checks counts them).
    prefetch_requests: std::sync::atomic::AtomicUsize,
}

/// App states by name, each with its kept desired manifests, as a sweep reads them in bulk.
type Prefetched = HashMap<String, state::Kept>;

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
        let lease_timing = lease::LeaseTiming::new(settings.kubernetes.lease_duration);
        let (client_for_heads, state_ns) =
            (client.clone(), settings.kubernetes.state_namespace.clone());
        Self {
            client,
            forges,
            blobs: BlobCache::new(settings.fetch.blob_cache_bytes),
            renderer: Renderer::new(settings.render.clone(), settings.fetch.clone()),
            settings,
            kinds: Mutex::new(HashMap::new()),
            identity,
            state_ns_ready: std::sync::atomic::AtomicBool::new(false),
            slots: Mutex::new(HashMap::new()),
            interrupt: tokio_util::sync::CancellationToken::new(),
            lease_timing,
            run_leases: Mutex::new(HashMap::new()),
            heads: heads::BranchHeads::new(client_for_heads, &state_ns),
            phases: phases::PhaseTimes::default(),
            prefetched: Mutex::new(None),
            prefetch_requests: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The renderer this engine's runs and drift checks share (and its counters).
    pub fn renderer(&self) -> &Renderer {
        &self.renderer
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

    /// Runs one job under the app's lease and records the result in the app's state.
    pub async fn run(&self, job: &Job, opts: RunOptions) -> Result<RunReport, ReconcileError> {
        let app = self
            .settings
            .app(&job.app)
            .cloned()
            .ok_or_else(|| ReconcileError::UnknownApp(job.app.clone()))?;
        let ns = self.settings.kubernetes.state_namespace.clone();
        if opts.dry_run {
            let mut st = state::load(&self.client, &ns, &app.name).await?;
            return self
                .run_locked(
                    &app,
                    job,
                    opts,
                    &mut st,
                    &mut RunLease::None,
                    &mut FileMemos::new(),
                )
                .await;
        }
        if job.reason == JobReason::MissedPush && job.revision.is_none() && !job.full {
            if let Some(report) = self.at_branch_head(&app).await? {
                return Ok(report);
            }
        }
        // The app has likely never run, nor had a Lease.
        let likely_new = self.found_no_state(&app.name);
        // The run may change the state: a sweep reads it again.
        self.take_prefetched(&app.name);
        self.ensure_state_namespace(&ns).await?;
        let mut slot_guard = self.slot(&app.name).lock_owned().await;

        // The quick path: this replica released the lease last, so taking it back is one
        // conditional write, made while the forge is read, and the state it saved is current.
        if let (Some(released), Some(st)) = (slot_guard.lease.take(), slot_guard.state.take()) {
            let take = {
                let (leases, app) = (self.leases(), app.name.clone());
                tokio::spawn(async move { leases.take_released(&app, released).await })
            };
            let run_lease = RunLease::Taking(take);
            match self
                .run_unless_moved(&app, job, opts, st, run_lease, slot_guard)
                .await
            {
                Ok(r) => return r,
                // Someone else held the app since; start again from the cluster's state.
                Err(slot) => slot_guard = slot,
            }
        }

        // No state a moment ago: not read again, and the Lease is created only at the run's
        // first write, carrying its intent (a cold start writes one Lease and one state per
        // app). Should the Lease exist after all, nothing was written: the ordinary path.
        if likely_new {
            let st = state::absent_with_intent(&app.name, None)?;
            match self
                .run_unless_moved(&app, job, opts, st, RunLease::Deferred, slot_guard)
                .await
            {
                Ok(r) => return r,
                Err(slot) => slot_guard = slot,
            }
        }

        let guard = self.leases().acquire(&app.name).await?;
        let intent = guard.intent();
        let mut run_lease = RunLease::Held(Box::new(guard));
        // No state: the first run's intent on the Lease, if it ended before its record.
        let loaded = match state::load_found(&self.client, &ns, &app.name).await {
            Ok(Some((st, _))) => Ok(st),
            Ok(None) => state::absent_with_intent(&app.name, intent),
            Err(e) => Err(e),
        };
        let mut st = match loaded {
            Ok(st) => st,
            Err(e) => {
                let r = Err(e.into());
                self.finish_run(&app.name, run_lease, slot_guard, &r, AppState::default());
                return r;
            }
        };
        let r = self
            .run_locked(
                &app,
                job,
                opts,
                &mut st,
                &mut run_lease,
                &mut slot_guard.files,
            )
            .await;
        self.finish_run(&app.name, run_lease, slot_guard, &r, st);
        r
    }

    /// One run that may find it must start again the ordinary way, having written nothing:
    /// the lease it took back moved, or the Lease it would create for a new app exists. Then
    /// the app's slot comes back; otherwise the run's result, its lease let go.
    async fn run_unless_moved(
        &self,
        app: &AppSettings,
        job: &Job,
        opts: RunOptions,
        mut st: AppState,
        mut run_lease: RunLease,
        mut slot: tokio::sync::OwnedMutexGuard<AppSlot>,
    ) -> Result<Result<RunReport, ReconcileError>, tokio::sync::OwnedMutexGuard<AppSlot>> {
        let r = self
            .run_locked(app, job, opts, &mut st, &mut run_lease, &mut slot.files)
            .await;
        if matches!(
            r,
            Err(ReconcileError::Lease(lease::LeaseError::Moved { .. }))
        ) {
            return Err(slot);
        }
        self.finish_run(&app.name, run_lease, slot, &r, st);
        Ok(r)
    }

    /// A catch-up's report when the app's applied revision is its branch head, or no input of
    /// the app changed between the two (one compare per branch and applied revision, kept
    /// beside the head), rendered from recorded inputs, and its last run was not interrupted:
    /// nothing to do, so no Lease is taken and nothing is written (a restart with every app in
    /// sync writes nothing, and a commit to one app costs the others nothing).
    async fn at_branch_head(&self, app: &AppSettings) -> Result<Option<RunReport>, ReconcileError> {
        let started = Instant::now();
        let prefetched = self
            .prefetched
            .lock()
            .expect("prefetched states")
            .as_ref()
            .map(|all| all.get(&app.name).map(state::Kept::without_inventory));
        let st = match prefetched {
            Some(Some(st)) => st,
            // Not in the sweep's bulk read: no state then (or a run took it since), so a run.
            Some(None) => return Ok(None),
            None => {
                let ns = &self.settings.kubernetes.state_namespace;
                state::load(&self.client, ns, &app.name).await?
            }
        };
        let interrupted = st
            .last_result
            .as_ref()
            .is_some_and(|r| r.outcome == "interrupted");
        let Some(applied) = st.revision.as_deref() else {
            return Ok(None);
        };
        if interrupted || st.version().is_none() {
            return Ok(None);
        }
        let forge = self.forge(app)?;
        let head = self
            .heads
            .head(forge.as_ref(), &app.repo, &app.branch)
            .await?;
        if head != applied {
            let changes = self
                .heads
                .changes_since(forge.as_ref(), &app.repo, &app.branch, applied, &head)
                .await;
            match changes {
                Some(paths) if !st.inputs_touched(&app.path, &paths) => {
                    debug!(app = %app.name, applied, %head, "no input of the app changed since its applied revision");
                }
                _ => return Ok(None),
            }
        }
        let mut report = RunReport::new(&app.name);
        report.revision = Some(head);
        report.duration = started.elapsed();
        Ok(Some(report))
    }

    /// Whether a catch-up of the app has anything to do: not when its applied revision is its
    /// branch head (see [`Self::at_branch_head`]); a failure to tell says yes.
    pub async fn needs_catch_up(&self, app: &str) -> bool {
        let Some(app) = self.settings.app(app) else {
            return true;
        };
        !matches!(self.at_branch_head(app).await, Ok(Some(_)))
    }

    /// Time by phase over every run of this engine so far.
    pub fn phase_times(&self) -> &phases::PhaseTimes {
        &self.phases
    }

    /// Starts a round: until it is dropped, each branch head is asked once, whatever the
    /// number of apps on it (`drift --once`, the start-up catch-up).
    pub fn begin_round(&self) -> heads::Round<'_> {
        self.heads.begin_round()
    }

    /// Reads every app's state in one paged LIST, for the runs and drift checks of a sweep.
    pub async fn prefetch_states(&self) -> Result<usize, ReconcileError> {
        let read = state::load_all(&self.client, &self.settings.kubernetes.state_namespace);
        let (all, requests) = self.phases.time(phases::Phase::States, read).await?;
        let n = all.len();
        *self.prefetched.lock().expect("prefetched states") = Some(all);
        self.prefetch_requests
            .store(requests, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }

    /// Drops what this engine keeps for the next run of each app (the blob cache, each app's
    /// remembered Lease, state and file digests): a one-shot sweep (`drift --once`) has no
    /// next run, and its drift checks should not hold it all through their own peak.
    pub fn forget_run_memory(&self) {
        self.blobs.clear();
        self.slots.lock().expect("app slots").clear();
    }

    /// Drops what [`Self::prefetch_states`] read: past its sweep it may be stale.
    pub fn forget_prefetched(&self) {
        *self.prefetched.lock().expect("prefetched states") = None;
        self.prefetch_requests
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The app's state read in bulk by the sweep on, taken out (a run or check uses it once).
    /// A state whose packed inventory cannot be read is dropped (logged): reading the app
    /// alone reports the error.
    fn take_prefetched(&self, app: &str) -> Option<(AppState, Option<desired::Stored>)> {
        let kept = self
            .prefetched
            .lock()
            .expect("prefetched states")
            .as_mut()
            .and_then(|all| all.remove(app))?;
        kept.unpack(app)
            .map_err(|e| warn!(%app, error = %e, "unreadable state left out of the bulk read"))
            .ok()
    }

    /// Whether the sweep on read the app's state in bulk (and no run took it since).
    fn is_prefetched(&self, app: &str) -> bool {
        self.prefetched
            .lock()
            .expect("prefetched states")
            .as_ref()
            .is_some_and(|all| all.contains_key(app))
    }

    /// Whether the sweep on read the states in bulk and found none for the app (or a run
    /// took it since).
    fn found_no_state(&self, app: &str) -> bool {
        self.prefetched
            .lock()
            .expect("prefetched states")
            .as_ref()
            .is_some_and(|all| !all.contains_key(app))
    }

    /// Creates the state namespace once per engine, before its first write.
    async fn ensure_state_namespace(&self, ns: &str) -> Result<(), ReconcileError> {
        use std::sync::atomic::Ordering;
        if self.state_ns_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        state::ensure_namespace(&self.client, ns)
            .await
            .map_err(|e| ReconcileError::Discovery {
                what: format!("state namespace {ns}"),
                message: kube_message(&e),
            })?;
        self.state_ns_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// One run under `run_lease` (awaited before the first write), from the state `st`, which
    /// it updates as it saves it. Reads as its stages: plan, apply, prune, wait for health,
    /// record.
    async fn run_locked(
        &self,
        app: &AppSettings,
        job: &Job,
        opts: RunOptions,
        st: &mut AppState,
        run_lease: &mut RunLease,
        memos: &mut FileMemos,
    ) -> Result<RunReport, ReconcileError> {
        let started = Instant::now();
        let started_at = now_rfc3339();
        let forge = self.forge(app)?;
        let mut report = RunReport::new(&app.name);

        // Plan: the revision, then its files, fetched while the lease is taken.
        let revision = self.revision_to_run(forge.as_ref(), app, job).await?;
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
        let known = if job.full { None } else { st.version() };
        // Nothing is written before the lease is held.
        let fetch = self.fetch(forge.as_ref(), app, &revision, known.as_ref());
        let (fetched, held) = tokio::join!(
            self.phases.time(phases::Phase::Fetch, fetch),
            run_lease.held()
        );
        held?;
        self.watch_run_lease(&app.name, run_lease);
        // The run's final record releases its lease (see `state::Release`).
        st.release = match run_lease.token() {
            Some(token) => state::Release::Pending(token),
            None => state::Release::None,
        };
        let attempt = Attempt {
            app,
            job,
            revision: &revision,
            started_at: &started_at,
            started,
            state_ns: self.settings.kubernetes.state_namespace.as_str(),
            opts,
        };
        let (version, files) = match fetched {
            Ok(Plan::Changed { version, files }) => (version, files),
            Ok(Plan::Unchanged(version)) => {
                self.hold_deferred(&app.name, run_lease, st, None).await?;
                return self
                    .finish_unchanged(forge.as_ref(), &attempt, st, version, report)
                    .await;
            }
            // Nothing was written; report the failure where the user looks.
            Err(e) => return Err(self.fail(&attempt, st, run_lease, e.into(), report).await),
        };

        // What was rendered, kept beside the state so drift checks need not render it again.
        let packed = (!opts.dry_run)
            .then(|| {
                let kustomize = &self.settings.render.kustomize_command;
                desired::pack(&desired::address(app, kustomize, &version), &files)
            })
            .flatten();
        // Prepare, apply, prune, wait for health; the pending status goes out meanwhile.
        let work = async {
            // A full run writes every object: no file is taken as applied.
            let inventory = (!job.full).then_some(st.inventory.as_slice());
            let desired = self.prepare_files(app, &files, memos, inventory).await?;
            let Some(desired) = self
                .apply(&attempt, st, run_lease, desired, &mut report)
                .await?
            else {
                // A dry run stops once everything is validated.
                return Ok(Vec::new());
            };
            self.prune_gone(app, st, &desired, &mut report).await?;
            self.wait_written_healthy(app, &desired, &report).await?;
            Ok::<_, ReconcileError>(record::inventory_after(&desired, &report))
        };
        let pending = self.post_pending(forge.as_ref(), app, &revision, opts);
        let (result, ()) = tokio::join!(work, pending);
        // Applied and healthy, but nothing is recorded on a lease that is no longer ours.
        let result = result.and_then(|inventory| self.check_lease(&report).map(|()| inventory));

        // Record.
        match result {
            Ok(inventory) => {
                let applied = record::Applied {
                    version,
                    inventory,
                    packed,
                };
                self.hold_deferred(&app.name, run_lease, st, None).await?;
                self.finish_applied(forge.as_ref(), &attempt, st, applied, report)
                    .await
            }
            Err(err) => Err(self.fail(&attempt, st, run_lease, err, report).await),
        }
    }

    /// Ends a run that failed with `err` (see [`Self::finish_failed`]), once it holds its
    /// lease: a new app's run that failed before its first write creates its Lease now, and
    /// ends with that error instead should it not get it (a Lease that exists after all
    /// sends the run the ordinary way, where it fails again and records why).
    async fn fail(
        &self,
        at: &Attempt<'_>,
        st: &mut AppState,
        run_lease: &mut RunLease,
        err: ReconcileError,
        mut report: RunReport,
    ) -> ReconcileError {
        if matches!(run_lease, RunLease::Deferred)
            && matches!(err, ReconcileError::Lease(lease::LeaseError::Moved { .. }))
        {
            return err;
        }
        if let Err(lease) = self.hold_deferred(&at.app.name, run_lease, st, None).await {
            warn!(app = %at.app.name, error = %err, "failed before taking its lease");
            return lease;
        }
        self.finish_failed(at, st, err, &mut report).await
    }
}
