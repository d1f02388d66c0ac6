//! Record, the last stage of a run: what it leaves behind whatever happened. The app's state
//! in the cluster (applied revision, tree, inventory, the run's record) and the commit status
//! on the forge, for a run that applied, changed nothing, or failed; and the check, made
//! before anything is written, that the state a run could leave fits in its ConfigMap.

use std::collections::HashSet;

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::phases::Phase;
use super::plan::Wanted;
use super::revision;
use super::state::{self, AppState, InventoryItem, RunRecord};
use super::{now_rfc3339, short, Attempt, Engine, Outcome, ReconcileError, RunReport};
use crate::forge::{CommitStatus, Forge, StatusState};
use crate::manifest::{self, ObjectRef};
use crate::render::SourceVersion;
use crate::settings::AppSettings;

/// What an applied run says on the commit and in its record: counts first (the forge keeps
/// 140 characters), then each object left in place and why (the record keeps 1,024).
pub(super) fn applied_message(report: &RunReport) -> String {
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
pub(super) fn check_state_fits<'a>(
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

/// The inventory an applied run leaves: every desired object with its hash, and each
/// Namespace or CRD kept for what it still holds (with an empty hash), so that a later run
/// deletes it once it holds nothing else.
pub(super) fn inventory_after(desired: &[Wanted], report: &RunReport) -> Vec<InventoryItem> {
    let retried = report
        .kept
        .iter()
        .filter(|k| k.retry)
        .map(|k| InventoryItem {
            id: k.id.clone(),
            hash: String::new(),
        });
    desired
        .iter()
        .map(|w| InventoryItem {
            id: w.id().clone(),
            hash: w.hash().to_string(),
        })
        .chain(retried)
        .collect()
}

/// Keeps in the inventory what was applied before plus anything a failed run did write, so a
/// later run can still prune it. What it wrote is no longer what the recorded hashes and tree
/// say: the next run (say, the revert of this commit, whose tree is the applied one) rewrites
/// those objects instead of finding them unchanged.
fn forget_written_hashes(st: &mut AppState, report: &RunReport) {
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
        st.set_version(None);
    }
}

/// What an applied run leaves in the state.
pub(super) struct Applied {
    pub(super) version: SourceVersion,
    pub(super) inventory: Vec<InventoryItem>,
    /// The rendered manifests, compressed (see `desired`); `None` when they cannot be kept.
    pub(super) packed: Option<Vec<u8>>,
}

impl Engine {
    /// Ends a run that applied: saves the new applied revision, tree and inventory with the
    /// run's record and the manifests it rendered, and posts `success` on the commit. A dry
    /// run records nothing.
    pub(super) async fn finish_applied(
        &self,
        forge: &dyn Forge,
        at: &Attempt<'_>,
        st: &mut AppState,
        applied: Applied,
        mut report: RunReport,
    ) -> Result<RunReport, ReconcileError> {
        let Applied {
            version,
            inventory,
            packed,
        } = applied;
        let (app, revision) = (at.app, at.revision);
        report.outcome = Outcome::Applied;
        report.duration = at.started.elapsed();
        if at.opts.dry_run {
            return Ok(report);
        }
        let changed = report.applied.len();
        let message = applied_message(&report);
        st.revision = Some(revision.to_string());
        st.set_version(Some(version));
        st.inventory = inventory;
        st.applied_at = Some(now_rfc3339());
        st.record(RunRecord {
            revision: Some(revision.to_string()),
            reason: at.job.reason.as_str().to_string(),
            started_at: at.started_at.to_string(),
            duration_ms: report.duration.as_millis() as u64,
            outcome: "applied".into(),
            message: message.clone(),
            applied: changed,
            pruned: report.pruned.len(),
        });
        // Every object of the app was just written, so the cluster matches the revision: that
        // is the drift finding until a check finds otherwise (a sweep reports it so without
        // checking). A run that wrote some objects leaves the finding alone: the others may
        // still differ.
        let all_written = changed == report.objects && report.kept.is_empty();
        if all_written {
            st.drift = Some(state::DriftRecord {
                checked_at: now_rfc3339(),
                revision: Some(revision.to_string()),
                objects: Vec::new(),
                healed: false,
            });
        }
        let save = state::save_with_desired(
            &self.client,
            at.state_ns,
            &app.name,
            st,
            packed.as_deref(),
            all_written,
        );
        let (saved, ()) = tokio::join!(
            self.phases.time(Phase::State, save),
            self.post_status(forge, app, revision, StatusState::Success, &message)
        );
        saved?;
        info!(app = %app.name, revision = short(revision), %message, "applied");
        Ok(report)
    }

    /// Ends a run that failed with `err`: the report says so, and (unless it is a dry run or
    /// the lease is lost) the state keeps what the run wrote and its record, and the commit
    /// gets `failure`, or `pending` when a shutdown interrupted the run. Returns the error the
    /// run ends with: `err`, or the failure to save its record.
    pub(super) async fn finish_failed(
        &self,
        at: &Attempt<'_>,
        st: &mut AppState,
        err: ReconcileError,
        report: &mut RunReport,
    ) -> ReconcileError {
        match self.record_failure(at, st, &err, report).await {
            Ok(()) => err,
            Err(unsaved) => unsaved,
        }
    }

    async fn record_failure(
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
        forget_written_hashes(st, report);
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
        let save = state::save(&self.client, state_ns, &app.name, st);
        self.phases.time(Phase::State, save).await?;
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

    /// Ends a run whose app subtree equals the applied one's: nothing to write. The applied
    /// revision moves forward; a push that touched the app (its subtree differs from
    /// `before`'s) gets its run recorded and `success` "In sync with <applied>", so the revert
    /// of a failed commit turns green while the failed commit stays red.
    pub(super) async fn finish_unchanged(
        &self,
        forge: &dyn Forge,
        at: &Attempt<'_>,
        st: &mut AppState,
        version: SourceVersion,
        mut report: RunReport,
    ) -> Result<RunReport, ReconcileError> {
        self.record_unchanged(forge, at, st, version).await?;
        info!(app = %at.app.name, revision = short(at.revision), "subtree unchanged; nothing to apply");
        report.duration = at.started.elapsed();
        Ok(report)
    }

    async fn record_unchanged(
        &self,
        forge: &dyn Forge,
        at: &Attempt<'_>,
        st: &mut AppState,
        version: SourceVersion,
    ) -> Result<(), ReconcileError> {
        let (app, job, revision) = (at.app, at.job, at.revision);
        if at.opts.dry_run {
            return Ok(());
        }
        let applied = st.revision.clone();
        let touched = self
            .push_touched_app(forge, app, job, applied.as_deref(), &version)
            .await;
        if !touched && applied.as_deref() == Some(revision) {
            return Ok(());
        }
        st.revision = Some(revision.to_string());
        st.set_version(Some(version));
        let message = format!(
            "In sync with {}",
            short(applied.as_deref().unwrap_or(revision))
        );
        if touched {
            st.record(RunRecord {
                revision: Some(revision.to_string()),
                reason: job.reason.as_str().to_string(),
                started_at: at.started_at.to_string(),
                duration_ms: at.started.elapsed().as_millis() as u64,
                outcome: "unchanged".into(),
                message: message.clone(),
                applied: 0,
                pruned: 0,
            });
        }
        let save = state::save(&self.client, at.state_ns, &app.name, st);
        self.phases.time(Phase::State, save).await?;
        if touched {
            self.post_status(forge, app, revision, StatusState::Success, &message)
                .await;
        }
        Ok(())
    }

    /// Says on the commit that the run is applying it (not in a dry run). A status that
    /// cannot be posted is logged, never a reason to stop.
    pub(super) async fn post_pending(
        &self,
        forge: &dyn Forge,
        app: &AppSettings,
        revision: &str,
        opts: super::RunOptions,
    ) {
        if opts.dry_run {
            return;
        }
        let description = format!("Applying revision {}", short(revision));
        self.post_status(forge, app, revision, StatusState::Pending, &description)
            .await;
    }

    pub(super) async fn post_status(
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
        let post = forge.set_status(&app.repo, revision, &status);
        if let Err(e) = self.phases.time(Phase::Status, post).await {
            warn!(app = %app.name, ?state, error = %e, "cannot post the commit status");
        }
    }

    fn status_url(&self, app: &str) -> Option<String> {
        self.settings
            .server
            .public_url
            .as_ref()
            .map(|u| format!("{u}/apps/{app}"))
    }
}
