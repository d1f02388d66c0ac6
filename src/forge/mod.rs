//! Forges (GitHub, GitLab) behind one small [`Forge`] trait, so reconcile and drift never know
//! which one they talk to; plus what is common to both: typed errors callers can act on,
//! the content-addressed blob cache, and [`fetch_app`], which turns "app at commit" into files
//! while fetching only what changed.

pub mod blob_cache;
pub mod github;
pub mod gitlab;
pub mod hooks;
mod http;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt};

pub use blob_cache::BlobCache;

use crate::settings::{FetchSettings, ForgeKind};

/// A failure talking to a forge, typed so a caller can decide to retry, wait or give up.
/// Messages never contain a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgeError {
    #[error("{what} not found on {forge}")]
    NotFound { forge: ForgeKind, what: String },
    #[error(
        "{forge} refused the credentials ({status}): {message}; check the token and its scopes"
    )]
    Unauthorized {
        forge: ForgeKind,
        status: u16,
        message: String,
    },
    #[error("{forge} rate limit exhausted until {}", humantime::format_rfc3339_seconds(*until))]
    RateLimited { forge: ForgeKind, until: SystemTime },
    #[error("{forge} is unavailable: {message}")]
    Transient { forge: ForgeKind, message: String },
    #[error("{forge} sent an unexpected response to {request}: {message}")]
    InvalidResponse {
        forge: ForgeKind,
        request: String,
        message: String,
    },
    #[error("{path}: {reason}")]
    Refused { path: String, reason: String },
    #[error("{what} exceeds the limit {setting} = {limit}")]
    TooLarge {
        what: String,
        setting: &'static str,
        limit: usize,
    },
}

impl ForgeError {
    /// Worth retrying later (the forge or the network had a passing fault).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ForgeError::Transient { .. } | ForgeError::RateLimited { .. }
        )
    }
}

/// What a tree entry is. Only regular files are applied; links and submodules are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Executable,
    Symlink,
    Submodule,
    Tree,
}

impl EntryKind {
    /// From git's octal mode string (`100644`, `120000`, ...).
    pub fn from_mode(mode: &str) -> Option<EntryKind> {
        match mode.trim_start_matches('0') {
            "100644" | "100664" => Some(EntryKind::File),
            "100755" => Some(EntryKind::Executable),
            "120000" => Some(EntryKind::Symlink),
            "160000" => Some(EntryKind::Submodule),
            "40000" => Some(EntryKind::Tree),
            _ => None,
        }
    }
}

/// One entry below an app path; `path` is relative to the app path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub path: String,
    pub sha: String,
    pub kind: EntryKind,
    /// Size in bytes when the forge tells it (GitHub does, GitLab does not).
    pub size: Option<u64>,
}

/// How `head` relates to `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Identical,
    /// `head` contains `base` and more.
    Ahead,
    /// `head` is an ancestor of `base`.
    Behind,
    Diverged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusState {
    Pending,
    Running,
    Success,
    Failure,
    Error,
}

/// A commit status as driftless posts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStatus {
    /// `driftless/<app>`.
    pub context: String,
    pub state: StatusState,
    pub description: String,
    pub target_url: Option<String>,
}

/// A webhook as driftless wants it on a repository. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct HookSpec {
    pub url: String,
    pub secret: String,
    /// Also subscribe to pull/merge request events (`previews.enabled`).
    pub pull_requests: bool,
}

impl std::fmt::Debug for HookSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookSpec")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("pull_requests", &self.pull_requests)
            .finish()
    }
}

/// A webhook as the forge reports it (secrets are never reported back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub id: u64,
    pub url: String,
    /// The push events are on (GitHub `push`; GitLab push and tag push).
    pub push_events: bool,
    /// Pull request events (GitHub `pull_request`; GitLab merge request events) are on.
    pub pull_request_events: bool,
    pub active: bool,
}

/// What a pull request changes: the paths that differ between the merge base of its base
/// branch and its head, and that head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedPaths {
    /// The merge base the paths are compared against, when the forge names it (GitHub does).
    pub merge_base: Option<String>,
    /// Every path added, modified, removed or renamed (both names of a rename).
    pub paths: Vec<String>,
    /// False when the forge cut the list short (GitHub lists at most 300 files): then any
    /// path may have changed.
    pub complete: bool,
}

/// A comment on a pull request (GitHub issue comment) or merge request (GitLab note).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comment {
    pub id: u64,
    pub body: String,
}

/// The operations driftless needs from a forge.
#[async_trait]
pub trait Forge: Send + Sync {
    fn kind(&self) -> ForgeKind;
    /// The commit a branch points at.
    async fn branch_head(&self, repo: &str, branch: &str) -> Result<String, ForgeError>;
    /// The commit a branch points at, `known` being the one last seen (say, kept in the
    /// cluster by an earlier process): a forge that can answers an unmoved head without
    /// spending its rate limit (GitHub's conditional request).
    async fn branch_head_since(
        &self,
        repo: &str,
        branch: &str,
        known: Option<&str>,
    ) -> Result<String, ForgeError> {
        let _ = known;
        self.branch_head(repo, branch).await
    }
    /// The SHA of the tree at `path` in `commit` (`""` is the root): the change detector.
    async fn subtree_sha(&self, repo: &str, commit: &str, path: &str)
        -> Result<String, ForgeError>;
    /// Every entry below `path` in `commit`, recursively, with paths relative to `path`.
    async fn subtree_entries(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
    ) -> Result<Vec<TreeEntry>, ForgeError>;
    /// A blob's bytes.
    async fn blob(&self, repo: &str, sha: &str) -> Result<Bytes, ForgeError>;
    async fn compare(&self, repo: &str, base: &str, head: &str) -> Result<Comparison, ForgeError>;
    async fn set_status(
        &self,
        repo: &str,
        sha: &str,
        status: &CommitStatus,
    ) -> Result<(), ForgeError>;
    async fn list_hooks(&self, repo: &str) -> Result<Vec<Hook>, ForgeError>;
    async fn create_hook(&self, repo: &str, spec: &HookSpec) -> Result<Hook, ForgeError>;
    async fn update_hook(&self, repo: &str, id: u64, spec: &HookSpec) -> Result<Hook, ForgeError>;
    /// The paths `head` changes against its merge base with `base` (a branch), in one request.
    async fn changed_paths(
        &self,
        repo: &str,
        base: &str,
        head: &str,
    ) -> Result<ChangedPaths, ForgeError>;
    /// The paths that differ between commit `from` (an earlier head of a branch) and commit
    /// `to`, in one request. `complete` is false when the list may miss a path: the forge cut
    /// it short, or `from` is not an ancestor of `to` (the branch was force-pushed), where a
    /// merge-base diff would hide what `from` has and `to` lost.
    async fn changed_since(
        &self,
        repo: &str,
        from: &str,
        to: &str,
    ) -> Result<ChangedPaths, ForgeError>;
    /// Every comment on pull/merge request `number`, all pages.
    async fn list_comments(&self, repo: &str, number: u64) -> Result<Vec<Comment>, ForgeError>;
    async fn create_comment(
        &self,
        repo: &str,
        number: u64,
        body: &str,
    ) -> Result<Comment, ForgeError>;
    async fn update_comment(
        &self,
        repo: &str,
        number: u64,
        id: u64,
        body: &str,
    ) -> Result<Comment, ForgeError>;
    /// The longest comment body the forge accepts, in characters.
    fn comment_limit(&self) -> usize;
}

/// A manifest file of an app at a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppFile {
    /// Relative to the app path.
    pub path: String,
    pub sha: String,
    pub content: Bytes,
}

/// The result of [`fetch_app`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The app's subtree SHA equals the last applied one: nothing was downloaded.
    Unchanged { tree_sha: String },
    Changed {
        tree_sha: String,
        /// Manifest files (`*.yaml`, `*.yml`, `*.json`), sorted by path.
        files: Vec<AppFile>,
    },
}

/// Whether a path is a manifest file driftless reads.
pub fn is_manifest_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml") || lower.ends_with(".json")
}

/// Blob downloads in flight at once for one app.
const BLOB_CONCURRENCY: usize = 8;

/// Fetches the app at `path` in `commit`: nothing when its subtree SHA is `known_tree_sha`,
/// else every manifest file, taking unchanged blobs from the cache. Refuses symlinks and
/// submodules (naming the path) and apps over the configured size limits.
pub async fn fetch_app(
    forge: &dyn Forge,
    cache: &BlobCache,
    limits: &FetchSettings,
    repo: &str,
    commit: &str,
    path: &str,
    known_tree_sha: Option<&str>,
) -> Result<Fetched, ForgeError> {
    let tree_sha = forge.subtree_sha(repo, commit, path).await?;
    if known_tree_sha == Some(tree_sha.as_str()) {
        return Ok(Fetched::Unchanged { tree_sha });
    }
    let entries = list_entries(forge, repo, commit, path).await?;
    let files = fetch_manifests(forge, cache, limits, repo, path, &entries).await?;
    Ok(Fetched::Changed { tree_sha, files })
}

/// `rel` below `dir` as a path from the repository root.
pub fn repo_path(dir: &str, rel: &str) -> String {
    match (dir.is_empty(), rel.is_empty()) {
        (true, _) => rel.to_string(),
        (false, true) => dir.to_string(),
        (false, false) => format!("{dir}/{rel}"),
    }
}

/// Every entry below `path` in `commit` (paths relative to `path`), refusing symlinks and
/// submodules anywhere below it, each named by its path from the repository root.
pub async fn list_entries(
    forge: &dyn Forge,
    repo: &str,
    commit: &str,
    path: &str,
) -> Result<Vec<TreeEntry>, ForgeError> {
    let entries = forge.subtree_entries(repo, commit, path).await?;
    for e in &entries {
        let reason = match e.kind {
            EntryKind::Symlink => "is a symbolic link; driftless applies only regular files",
            EntryKind::Submodule => "is a git submodule; driftless does not follow submodules",
            _ => continue,
        };
        return Err(ForgeError::Refused {
            path: repo_path(path, &e.path),
            reason: reason.into(),
        });
    }
    Ok(entries)
}

/// The manifest files (`*.yaml`, `*.yml`, `*.json`) among `entries` of the directory `dir`,
/// downloaded (see [`fetch_files`]) and sorted by path.
pub async fn fetch_manifests(
    forge: &dyn Forge,
    cache: &BlobCache,
    limits: &FetchSettings,
    repo: &str,
    dir: &str,
    entries: &[TreeEntry],
) -> Result<Vec<AppFile>, ForgeError> {
    let wanted: Vec<&TreeEntry> = entries
        .iter()
        .filter(|e| {
            matches!(e.kind, EntryKind::File | EntryKind::Executable) && is_manifest_path(&e.path)
        })
        .collect();
    fetch_files(forge, cache, limits, repo, dir, "manifest", wanted).await
}

/// Downloads `wanted` (entries of the directory `dir`), taking unchanged blobs from the cache,
/// within `fetch.max_app_files` and `fetch.max_app_bytes` (checked against the declared sizes
/// before any download, and against the bytes received while downloading). `what` names the
/// files in errors ("manifest", "input"). Sorted by path.
pub async fn fetch_files(
    forge: &dyn Forge,
    cache: &BlobCache,
    limits: &FetchSettings,
    repo: &str,
    dir: &str,
    what: &str,
    wanted: Vec<&TreeEntry>,
) -> Result<Vec<AppFile>, ForgeError> {
    let under = repo_path(dir, "");
    if wanted.len() > limits.max_app_files {
        return Err(ForgeError::TooLarge {
            what: format!("{} {what} files under {under}", wanted.len()),
            setting: "fetch.max_app_files",
            limit: limits.max_app_files,
        });
    }
    let declared: u64 = wanted.iter().filter_map(|e| e.size).sum();
    if declared > limits.max_app_bytes as u64 {
        return Err(ForgeError::TooLarge {
            what: format!("{declared} bytes of {what} files under {under}"),
            setting: "fetch.max_app_bytes",
            limit: limits.max_app_bytes,
        });
    }
    let total = std::sync::atomic::AtomicUsize::new(0);
    // The futures are built first and boxed, so the stream's type names no closure over a
    // borrowed entry (which would defeat the Send proof of the callers' spawned tasks).
    let calls: Vec<_> = wanted
        .into_iter()
        .map(|e| {
            let (total, under) = (&total, &under);
            async move {
                let content = match cache.get(&e.sha) {
                    Some(c) => c,
                    None => {
                        let c = forge.blob(repo, &e.sha).await?;
                        cache.insert(&e.sha, c.clone());
                        c
                    }
                };
                let sum = total.fetch_add(content.len(), std::sync::atomic::Ordering::Relaxed)
                    + content.len();
                if sum > limits.max_app_bytes {
                    return Err(ForgeError::TooLarge {
                        what: format!("more than {sum} bytes of {what} files under {under}"),
                        setting: "fetch.max_app_bytes",
                        limit: limits.max_app_bytes,
                    });
                }
                Ok(AppFile {
                    path: e.path.clone(),
                    sha: e.sha.clone(),
                    content,
                })
            }
            .boxed()
        })
        .collect();
    let mut files: Vec<AppFile> = futures::stream::iter(calls)
        .buffer_unordered(BLOB_CONCURRENCY)
        .try_collect()
        .await?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Builds the forge clients the settings configure.
pub fn from_settings(
    settings: &crate::settings::Settings,
) -> Result<Forges, crate::settings::SettingsError> {
    let github = match &settings.forges.github {
        Some(gh) => {
            Some(Arc::new(github::GithubForge::new(gh, &settings.fetch)?) as Arc<dyn Forge>)
        }
        None => None,
    };
    let gitlab = match &settings.forges.gitlab {
        Some(gl) => {
            Some(Arc::new(gitlab::GitlabForge::new(gl, &settings.fetch)?) as Arc<dyn Forge>)
        }
        None => None,
    };
    Ok(Forges { github, gitlab })
}

/// The configured forge clients.
#[derive(Clone, Default)]
pub struct Forges {
    pub github: Option<Arc<dyn Forge>>,
    pub gitlab: Option<Arc<dyn Forge>>,
}

impl Forges {
    pub fn get(&self, kind: ForgeKind) -> Option<&Arc<dyn Forge>> {
        match kind {
            ForgeKind::Github => self.github.as_ref(),
            ForgeKind::Gitlab => self.gitlab.as_ref(),
        }
    }
}

/// How long to wait before retry `attempt` (1-based) after a transient fault.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 * 2u64.pow(attempt.min(5)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(EntryKind::from_mode("100644"), Some(EntryKind::File));
        assert_eq!(EntryKind::from_mode("120000"), Some(EntryKind::Symlink));
        assert_eq!(EntryKind::from_mode("160000"), Some(EntryKind::Submodule));
        assert_eq!(EntryKind::from_mode("040000"), Some(EntryKind::Tree));
        assert_eq!(EntryKind::from_mode("junk"), None);
    }

    #[test]
    fn manifest_paths() {
        assert!(is_manifest_path("a/b.yaml"));
        assert!(is_manifest_path("B.YML"));
        assert!(is_manifest_path("x.json"));
        assert!(!is_manifest_path("README.md"));
    }
}
