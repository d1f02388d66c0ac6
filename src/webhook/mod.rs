//! Webhooks turned into domain events: signature checks, payload parsing, matching a push to
//! the apps it affects, and remembering deliveries already seen. Nothing here knows about HTTP
//! frameworks, forge APIs or Kubernetes; the server module feeds raw headers and bytes in.

pub mod dedup;
pub mod github;
pub mod gitlab;

use crate::settings::{AppSettings, ForgeKind};

/// The all-zero object name Git uses for "no commit" (a created or deleted ref).
pub const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// What a verified delivery means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Push(PushEvent),
    /// A pull request (GitHub) or merge request (GitLab) opened, updated or closed.
    PullRequest(PullRequestEvent),
    /// GitHub's `ping` on webhook creation.
    Ping {
        hook_id: Option<u64>,
    },
    /// A verified event driftless does not act on; the name is for logs and metrics.
    Ignored {
        event: String,
    },
}

/// A ref update on a forge, independent of which forge sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEvent {
    pub forge: ForgeKind,
    /// `owner/name` (GitHub `repository.full_name`, GitLab `project.path_with_namespace`).
    pub repo: String,
    pub git_ref: GitRef,
    /// Commit the ref pointed at before the push (all zeros when it was created).
    pub before: String,
    /// Commit the ref points at now (all zeros when it was deleted).
    pub after: String,
    pub created: bool,
    pub deleted: bool,
    /// GitHub says so explicitly; GitLab does not tell, so this is false there.
    pub forced: bool,
}

/// A pull or merge request event, independent of which forge sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestEvent {
    pub forge: ForgeKind,
    /// The base (target) repository, `owner/name` or the GitLab project path.
    pub repo: String,
    /// GitHub's pull request number, GitLab's merge request `iid`.
    pub number: u64,
    pub action: PullRequestAction,
    /// The branch the request would merge into.
    pub base_branch: String,
    /// The commit the request's head points at.
    pub head_sha: String,
    /// The head lives in another repository (or one that was deleted).
    pub from_fork: bool,
}

/// What happened to a pull or merge request, as far as previews care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullRequestAction {
    /// Opened, reopened, or a new head pushed (GitHub `synchronize`, GitLab `update`).
    Updated,
    Closed,
    Merged,
}

/// Which apps a pull request previews: same forge, its base repository (case-insensitive)
/// and the app's branch is the request's base branch.
pub fn match_pull_request<'a>(
    apps: &'a [AppSettings],
    pr: &PullRequestEvent,
) -> Vec<&'a AppSettings> {
    apps.iter()
        .filter(|a| {
            a.forge == pr.forge
                && a.repo.eq_ignore_ascii_case(&pr.repo)
                && a.branch == pr.base_branch
        })
        .collect()
}

/// The ref a push updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitRef {
    Branch(String),
    Tag(String),
    /// Any other ref (e.g. `refs/notes/...`), kept as written.
    Other(String),
}

impl GitRef {
    pub fn parse(full: &str) -> GitRef {
        if let Some(b) = full.strip_prefix("refs/heads/") {
            GitRef::Branch(b.to_string())
        } else if let Some(t) = full.strip_prefix("refs/tags/") {
            GitRef::Tag(t.to_string())
        } else {
            GitRef::Other(full.to_string())
        }
    }
}

impl std::fmt::Display for GitRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitRef::Branch(b) => write!(f, "refs/heads/{b}"),
            GitRef::Tag(t) => write!(f, "refs/tags/{t}"),
            GitRef::Other(o) => f.write_str(o),
        }
    }
}

/// Why a delivery was refused. The HTTP status follows from the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("missing {header} header")]
    MissingSignature { header: &'static str },
    #[error("malformed {header} header: {reason}")]
    MalformedSignature {
        header: &'static str,
        reason: &'static str,
    },
    #[error("signature does not match the configured secret")]
    BadSignature,
    #[error("webhook-timestamp {timestamp} is more than 5 minutes from now")]
    StaleTimestamp { timestamp: i64 },
    #[error("X-Gitlab-Token does not match the configured token")]
    BadToken,
    #[error("invalid payload: {0}")]
    InvalidPayload(String),
}

impl WebhookError {
    /// True when the sender could not prove it holds the secret (HTTP 401).
    pub fn is_unauthorized(&self) -> bool {
        !matches!(self, WebhookError::InvalidPayload(_))
    }

    /// Metric outcome: `unauthorized` (no proof of the secret) or `invalid` (bad payload).
    pub fn metric_label(&self) -> &'static str {
        if self.is_unauthorized() {
            "unauthorized"
        } else {
            "invalid"
        }
    }
}

/// Turns a serde error into a short reason naming the field at fault.
fn payload_error(e: serde_path_to_error::Error<serde_json::Error>) -> WebhookError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let reason = if path.is_empty() || path == "." {
        inner.to_string()
    } else {
        format!("{path}: {inner}")
    };
    WebhookError::InvalidPayload(truncate(&reason, 200))
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Which apps a push should reconcile: same forge, same repo (case-insensitive, as both forges
/// treat repo paths), and the app's branch is the pushed branch. Tags and other refs match no
/// app; a deleted branch matches none either (there is nothing to apply).
pub fn match_apps<'a>(apps: &'a [AppSettings], push: &PushEvent) -> Vec<&'a AppSettings> {
    let GitRef::Branch(branch) = &push.git_ref else {
        return Vec::new();
    };
    if push.deleted {
        return Vec::new();
    }
    apps.iter()
        .filter(|a| {
            a.forge == push.forge && a.repo.eq_ignore_ascii_case(&push.repo) && &a.branch == branch
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn apps() -> Vec<AppSettings> {
        Settings::from_toml_str(
            r#"
[forges.github]
token_env = "T"
webhook_secret_env = "S"
[forges.gitlab]
token_env = "T"
webhook_token_env = "S"
[[apps]]
name = "web"
forge = "github"
repo = "Acme/Deploy"
path = "web"
[[apps]]
name = "api"
forge = "github"
repo = "acme/deploy"
branch = "release/1"
[[apps]]
name = "lab"
forge = "gitlab"
repo = "acme/deploy"
"#,
        )
        .unwrap()
        .apps
    }

    fn push(forge: ForgeKind, repo: &str, git_ref: &str) -> PushEvent {
        PushEvent {
            forge,
            repo: repo.into(),
            git_ref: GitRef::parse(git_ref),
            before: ZERO_SHA.into(),
            after: "a".repeat(40),
            created: false,
            deleted: false,
            forced: false,
        }
    }

    fn names(apps: Vec<&AppSettings>) -> Vec<&str> {
        apps.into_iter().map(|a| a.name.as_str()).collect()
    }

    #[test]
    fn matches_forge_repo_and_branch() {
        let apps = apps();
        let p = push(ForgeKind::Github, "acme/deploy", "refs/heads/main");
        assert_eq!(names(match_apps(&apps, &p)), ["web"]);
        let p = push(ForgeKind::Github, "ACME/deploy", "refs/heads/release/1");
        assert_eq!(names(match_apps(&apps, &p)), ["api"]);
        let p = push(ForgeKind::Gitlab, "acme/deploy", "refs/heads/main");
        assert_eq!(names(match_apps(&apps, &p)), ["lab"]);
        let p = push(ForgeKind::Github, "acme/other", "refs/heads/main");
        assert!(match_apps(&apps, &p).is_empty());
    }

    #[test]
    fn tags_and_deletions_match_nothing() {
        let apps = apps();
        let p = push(ForgeKind::Github, "acme/deploy", "refs/tags/main");
        assert!(match_apps(&apps, &p).is_empty());
        let mut p = push(ForgeKind::Github, "acme/deploy", "refs/heads/main");
        p.deleted = true;
        assert!(match_apps(&apps, &p).is_empty());
    }

    #[test]
    fn refs_round_trip() {
        for r in ["refs/heads/a/b", "refs/tags/v1", "refs/notes/x"] {
            assert_eq!(GitRef::parse(r).to_string(), r);
        }
    }
}
