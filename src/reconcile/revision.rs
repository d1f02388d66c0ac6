//! Which revision a run may apply, and whether a push that changes nothing touched the app:
//! the branch head is authoritative (a force push applies), a late delivery never rolls the app
//! back, a catch-up does not retry a head that already failed, and a push that touched the app
//! always ends with a terminal commit status (posted by `record`).

use tracing::warn;

use super::state::AppState;
use super::{short, Engine, ReconcileError};
use crate::forge::{Comparison, Forge, ForgeError};
use crate::queue::{Job, JobReason};
use crate::render::{self, SourceVersion};
use crate::settings::AppSettings;

/// Run outcome recorded for a failure that is a verdict on the commit (refused, unhealthy):
/// the drift timer does not try that revision again.
pub(super) const OUTCOME_FAILED: &str = "failed";
/// Run outcome recorded for a failure of the moment (the forge or the API server): the drift
/// timer tries that revision again.
pub(super) const OUTCOME_ERROR: &str = "error";

/// Whether the newest run recorded for `revision` failed on the commit's own account.
fn already_failed(st: &AppState, revision: &str) -> bool {
    st.runs
        .iter()
        .find(|r| r.revision.as_deref() == Some(revision))
        .is_some_and(|r| r.outcome == OUTCOME_FAILED)
}

/// A push's `before` when it names a commit (not a branch creation, not unknown).
fn known_before(job: &Job) -> Option<&str> {
    match &job.reason {
        JobReason::Push { before, .. } if !before.bytes().all(|b| b == b'0') => Some(before),
        _ => None,
    }
}

impl Engine {
    /// Why the run must not apply `revision`, or `None` when it goes ahead. An explicit manual
    /// revision does what it is told; a push whose `before` is the applied revision moves
    /// forward by definition (no compare round trip on the common path), and so does a head
    /// the branch heads know to descend from it; otherwise the forge says how `revision`
    /// relates to the applied one.
    pub(super) async fn held_back(
        &self,
        forge: &dyn Forge,
        app: &AppSettings,
        job: &Job,
        st: &AppState,
        revision: &str,
    ) -> Result<Option<String>, ReconcileError> {
        let Some(applied) = st.revision.as_deref() else {
            return Ok(None);
        };
        let explicit = matches!(job.reason, JobReason::Manual) && job.revision.is_some();
        if applied == revision || explicit || known_before(job) == Some(applied) {
            return Ok(None);
        }
        // The timer and the start-up catch-up look at the branch head every time; a head that
        // failed is left alone until a new commit or a `sync` (its status already says why).
        if job.reason == JobReason::MissedPush && already_failed(st, revision) {
            return Ok(Some(format!(
                "revision {} failed already; a new commit or `driftless sync {}` tries again",
                short(revision),
                app.name
            )));
        }
        // What changed between the two, kept exactly beside the branch head, says `revision`
        // descends from the applied one (a compare from the merge base is exact only from
        // an ancestor): the sweep that found the app behind its head asked already.
        let key = (forge.kind(), app.repo.as_str(), app.branch.as_str());
        if self.heads.descends_from(key, applied, revision).await {
            return Ok(None);
        }
        match forge.compare(&app.repo, applied, revision).await {
            Ok(Comparison::Identical | Comparison::Ahead) => Ok(None),
            // A run without a revision (the timer, the catch-up) runs the head it just read: a
            // branch moved back to an ancestor (a force push undoing commits) is what Git says.
            Ok(Comparison::Behind) if job.revision.is_none() => Ok(None),
            Ok(Comparison::Behind) => Ok(Some(format!(
                "revision {} is behind the applied {}",
                short(revision),
                short(applied)
            ))),
            // Not a descendant of the applied revision (a force push), or no history in common
            // with it at all (the forges answer that with a 404): the branch decides.
            Ok(Comparison::Diverged) | Err(ForgeError::NotFound { .. }) => {
                self.off_branch(forge, app, job, revision).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `None` when `revision` is on the app's branch (its head or an ancestor of it), else why
    /// it is skipped: a commit a force push left behind must never be applied over the branch.
    async fn off_branch(
        &self,
        forge: &dyn Forge,
        app: &AppSettings,
        job: &Job,
        revision: &str,
    ) -> Result<Option<String>, ReconcileError> {
        // A job without a revision runs the head it just read.
        if job.revision.is_none() {
            return Ok(None);
        }
        let head = forge.branch_head(&app.repo, &app.branch).await?;
        if head == revision {
            return Ok(None);
        }
        match forge.compare(&app.repo, revision, &head).await {
            Ok(Comparison::Identical | Comparison::Ahead) => Ok(None),
            Ok(Comparison::Behind | Comparison::Diverged) | Err(ForgeError::NotFound { .. }) => {
                Ok(Some(format!(
                    "revision {} is not on branch {} (its head is {}; a force push left it behind)",
                    short(revision),
                    app.branch,
                    short(&head)
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a push changed the app's inputs since its `before`, when they equal the applied
    /// ones (the `git revert` of a failed commit does). Costs one forge request per input
    /// (GitHub reads `before`'s tree once), only when `before` is not the applied revision. A forge error counts as untouched (logged):
    /// the app is in sync either way, only the status is at stake.
    pub(super) async fn push_touched_app(
        &self,
        forge: &dyn Forge,
        app: &AppSettings,
        job: &Job,
        applied: Option<&str>,
        version: &SourceVersion,
    ) -> bool {
        let Some(before) = known_before(job) else {
            return false;
        };
        if Some(before) == applied {
            return false;
        }
        // An input that did not exist at `before` counts as changed: the push brought it back.
        match render::changed_since(forge, app, before, version).await {
            Ok(changed) => changed,
            Err(e) => {
                warn!(app = %app.name, error = %e, "cannot tell whether the push touched the app; no status posted");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::state::RunRecord;

    fn run(revision: &str, outcome: &str) -> RunRecord {
        RunRecord {
            revision: Some(revision.into()),
            reason: "push".into(),
            started_at: String::new(),
            duration_ms: 0,
            outcome: outcome.into(),
            message: String::new(),
            applied: 0,
            pruned: 0,
        }
    }

    #[test]
    fn only_the_newest_run_of_a_revision_counts() {
        let mut st = AppState::default();
        st.record(run("a", OUTCOME_FAILED));
        assert!(already_failed(&st, "a"));
        assert!(!already_failed(&st, "b"));
        // Retried by a sync and applied: no longer failed.
        st.record(run("a", "applied"));
        assert!(!already_failed(&st, "a"));
        // A failure of the moment is retried.
        st.record(run("b", OUTCOME_ERROR));
        assert!(!already_failed(&st, "b"));
        st.record(run("c", "interrupted"));
        assert!(!already_failed(&st, "c"));
    }

    #[test]
    fn before_is_known_only_for_pushes_of_existing_commits() {
        let push = |before: &str| {
            Job::new(
                "a",
                Some("f".repeat(40)),
                JobReason::Push {
                    delivery: None,
                    before: before.into(),
                },
            )
        };
        let sha = "1".repeat(40);
        assert_eq!(known_before(&push(&sha)), Some(sha.as_str()));
        assert_eq!(known_before(&push(&"0".repeat(40))), None);
        assert_eq!(known_before(&push("")), None);
        assert_eq!(
            known_before(&Job::new("a", None, JobReason::MissedPush)),
            None
        );
    }
}
