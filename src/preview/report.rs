//! A preview as data: per app, what the merge would change (from the engine's dry-run), and
//! per pull request, every app's preview. The comment, the status, the page and the CLI all
//! read these, so they never disagree.

use serde::{Deserialize, Serialize};

use super::diff::{object_change, ChangeKind, ObjectChange};
use crate::reconcile::dry_run::DryRunSet;
use crate::settings::ForgeKind;

/// How an app's preview ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AppOutcome {
    /// Every object was accepted by the API server's dry-run (or could not be validated yet).
    Previewed,
    /// The API server refused an object: the first one, by its position in the files.
    Rejected { object: String, message: String },
    /// The revision could not be rendered or read (names the file or the failing step).
    Failed { message: String },
}

/// What merging would do to one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppPreview {
    pub app: String,
    pub revision: String,
    pub outcome: AppOutcome,
    /// Objects added, changed or rejected (unchanged ones are only counted).
    pub objects: Vec<ObjectChange>,
    pub unchanged: usize,
    /// Objects the merge would prune.
    pub prune: Vec<String>,
}

impl AppPreview {
    /// From the engine's dry-run of the revision.
    pub fn from_dry_run(set: &DryRunSet) -> AppPreview {
        let mut objects = Vec::new();
        let mut unchanged = 0;
        for o in &set.objects {
            let c = object_change(o);
            if c.change == ChangeKind::Unchanged {
                unchanged += 1;
            } else {
                objects.push(c);
            }
        }
        let outcome = objects
            .iter()
            .find(|c| c.change == ChangeKind::Rejected)
            .map_or(AppOutcome::Previewed, |c| AppOutcome::Rejected {
                object: c.object.clone(),
                message: c.note.clone().unwrap_or_default(),
            });
        AppPreview {
            app: set.app.clone(),
            revision: set.revision.clone(),
            outcome,
            objects,
            unchanged,
            prune: set.prune.iter().map(ToString::to_string).collect(),
        }
    }

    /// A preview that could not be made.
    pub fn failed(app: &str, revision: &str, message: String) -> AppPreview {
        AppPreview {
            app: app.to_string(),
            revision: revision.to_string(),
            outcome: AppOutcome::Failed { message },
            objects: Vec::new(),
            unchanged: 0,
            prune: Vec::new(),
        }
    }

    fn count(&self, kind: ChangeKind) -> usize {
        self.objects.iter().filter(|c| c.change == kind).count()
    }

    /// `3 changed, 1 added, 0 pruned`, or what stopped the preview.
    pub fn summary(&self) -> String {
        match &self.outcome {
            AppOutcome::Previewed => format!(
                "{} changed, {} added, {} pruned",
                self.count(ChangeKind::Changed),
                self.count(ChangeKind::Added),
                self.prune.len()
            ),
            AppOutcome::Rejected { object, message } => format!("{object}: {message}"),
            AppOutcome::Failed { message } => message.clone(),
        }
    }

    /// Whether merging would change anything in the cluster.
    pub fn has_changes(&self) -> bool {
        !self.objects.is_empty() || !self.prune.is_empty()
    }

    /// Every object's diff, headed by the object, then the prune list: the text a reviewer
    /// reads (the comment folds it, the CLI prints it).
    pub fn diff_text(&self) -> String {
        let mut out = String::new();
        for c in &self.objects {
            let what = match c.change {
                ChangeKind::Added => "added",
                ChangeKind::Changed => "changed",
                ChangeKind::Unchanged => "unchanged",
                ChangeKind::Rejected => "REJECTED",
            };
            out.push_str(&format!("# {} ({what}, {})\n", c.object, c.source));
            if let Some(note) = &c.note {
                out.push_str(&format!("# {note}\n"));
            }
            out.push_str(&c.diff);
        }
        for p in &self.prune {
            out.push_str(&format!("# {p} (pruned)\n"));
        }
        out
    }
}

/// The state of the request a preview belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    Open,
    Closed,
    Merged,
}

/// Every app's preview for one head of one pull or merge request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestPreview {
    pub forge: ForgeKind,
    pub repo: String,
    pub number: u64,
    pub head_sha: String,
    pub state: RequestState,
    /// Affected apps, by name.
    pub apps: Vec<AppPreview>,
    /// Affected apps beyond `previews.max_apps`, not previewed.
    pub not_previewed: Vec<String>,
    pub max_apps: usize,
    /// `<public_url>/previews/<forge>/<repo>/<number>`, when `server.public_url` is set.
    pub page_url: Option<String>,
}

/// Where a request's full preview is served, below the public URL.
pub fn page_path(forge: ForgeKind, repo: &str, number: u64) -> String {
    format!("/previews/{forge}/{repo}/{number}")
}

/// The key a preview is stored under: forge, repository (forges treat it case-insensitively)
/// and number.
pub fn key(forge: ForgeKind, repo: &str, number: u64) -> String {
    format!("{forge}/{}/{number}", repo.to_ascii_lowercase())
}
