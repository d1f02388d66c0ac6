//! GitLab REST v4 (gitlab.com or self-managed `https://HOST/api/v4`): repository trees with
//! keyset pagination, raw blobs, branch heads, merge bases, commit statuses and project hooks,
//! authenticated with `PRIVATE-TOKEN`. Project paths are URL-encoded (`group%2Fsub%2Fproject`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::http::{all_pages, next_link, Policy, RawResponse};
use super::{
    ChangedPaths, Comment, CommitStatus, Comparison, EntryKind, Forge, ForgeError, Hook, HookSpec,
    StatusState, TreeEntry,
};
use crate::settings::{FetchSettings, ForgeKind, GitlabSettings, Secret, SettingsError};

const FORGE: ForgeKind = ForgeKind::Gitlab;
/// Directory listings kept (immutable per commit; see the GitHub client for the reasoning).
const DIR_CACHE_LISTINGS: usize = 64;
/// GitLab's largest page.
const PER_PAGE: u32 = 100;

pub struct GitlabForge {
    http: reqwest::Client,
    api_url: String,
    token: Secret,
    policy: Policy,
    dirs: Mutex<DirCache>,
}

#[derive(Default)]
struct DirCache {
    listings: HashMap<String, Arc<Vec<GlEntry>>>,
    order: VecDeque<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct GlEntry {
    id: String,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    path: String,
    mode: String,
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

fn invalid(request: &str, message: impl Into<String>) -> ForgeError {
    ForgeError::InvalidResponse {
        forge: FORGE,
        request: request.to_string(),
        message: message.into(),
    }
}

impl GitlabForge {
    /// The paths a repository compare lists (both names of a rename).
    async fn compare_paths(
        &self,
        repo: &str,
        from: &str,
        to: &str,
        straight: bool,
    ) -> Result<ChangedPaths, ForgeError> {
        let sep = if straight { ".." } else { "..." };
        let request = format!("compare {from}{sep}{to} of {repo}");
        let c: GlCompare = self
            .get(
                &request,
                &self.project_url(
                    repo,
                    &format!(
                        "repository/compare?from={}&to={}&straight={straight}",
                        enc(from),
                        enc(to)
                    ),
                ),
            )
            .await?
            .json(FORGE, &request)?;
        let mut paths = Vec::with_capacity(c.diffs.len());
        for d in c.diffs {
            if d.old_path != d.new_path {
                paths.push(d.old_path);
            }
            paths.push(d.new_path);
        }
        Ok(ChangedPaths {
            merge_base: None,
            paths,
            complete: !c.overflow,
        })
    }

    pub fn new(settings: &GitlabSettings, fetch: &FetchSettings) -> Result<Self, SettingsError> {
        let http = reqwest::Client::builder()
            .timeout(fetch.request_timeout)
            .connect_timeout(std::time::Duration::from_secs(10))
            .user_agent(concat!("driftless/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SettingsError {
                key: "forges.gitlab.api_url".into(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(Self {
            http,
            api_url: settings.api_url.trim_end_matches('/').to_string(),
            token: settings.token.resolve()?,
            policy: Policy::new(FORGE, fetch.max_rate_limit_wait),
            dirs: Mutex::new(DirCache::default()),
        })
    }

    fn project_url(&self, repo: &str, rest: &str) -> String {
        format!("{}/projects/{}/{rest}", self.api_url, enc(repo))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<RawResponse, String> {
        // Never send the token anywhere but the configured API (a Link header could point
        // elsewhere).
        if !url.starts_with(&self.api_url) {
            return Err(format!(
                "refusing to follow a link outside {}",
                self.api_url
            ));
        }
        let mut req = self
            .http
            .request(method, url)
            .header("PRIVATE-TOKEN", self.token.expose());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| e.without_url().to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| e.without_url().to_string())?;
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }

    async fn get(&self, request: &str, url: &str) -> Result<RawResponse, ForgeError> {
        self.policy
            .run(request, || self.send(reqwest::Method::GET, url, None))
            .await
    }

    /// A directory listing at a commit, all pages (keyset pagination).
    async fn list_tree(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Arc<Vec<GlEntry>>, ForgeError> {
        let key = format!("{repo}@{commit}:{path}:{recursive}");
        if let Some(l) = self.dirs.lock().expect("dir cache").listings.get(&key) {
            return Ok(l.clone());
        }
        let mut url = self.project_url(
            repo,
            &format!(
                "repository/tree?ref={}&recursive={recursive}&per_page={PER_PAGE}&pagination=keyset",
                enc(commit)
            ),
        );
        if !path.is_empty() {
            url.push_str(&format!("&path={}", enc(path)));
        }
        let request = format!("tree {path:?} of {repo} at {commit}");
        let mut all = Vec::new();
        loop {
            let resp = self.get(&request, &url).await.map_err(|e| match e {
                ForgeError::NotFound { .. } => ForgeError::NotFound {
                    forge: FORGE,
                    what: format!("directory {path:?} in {repo} at {commit}"),
                },
                other => other,
            })?;
            let page: Vec<GlEntry> = resp.json(FORGE, &request)?;
            all.extend(page);
            match next_link(resp.header("link")) {
                Some(next) => url = next,
                None => break,
            }
        }
        let listing = Arc::new(all);
        let mut cache = self.dirs.lock().expect("dir cache");
        if cache.order.len() >= DIR_CACHE_LISTINGS {
            if let Some(old) = cache.order.pop_front() {
                cache.listings.remove(&old);
            }
        }
        cache.order.push_back(key.clone());
        cache.listings.insert(key, listing.clone());
        Ok(listing)
    }
}

#[derive(Deserialize)]
struct Branch {
    commit: CommitRef,
}

#[derive(Deserialize)]
struct CommitRef {
    id: String,
}

#[derive(Deserialize)]
struct GlHook {
    id: u64,
    url: String,
    #[serde(default)]
    push_events: bool,
    #[serde(default)]
    tag_push_events: bool,
    #[serde(default)]
    merge_requests_events: bool,
    #[serde(default)]
    disabled_until: Option<String>,
}

/// A repository compare as `changed_paths` reads it.
#[derive(Deserialize)]
struct GlCompare {
    #[serde(default)]
    diffs: Vec<GlDiff>,
    /// Set when GitLab stopped listing diffs at its limits.
    #[serde(default)]
    overflow: bool,
}

#[derive(Deserialize)]
struct GlDiff {
    old_path: String,
    new_path: String,
}

#[derive(Deserialize)]
struct GlNote {
    id: u64,
    #[serde(default)]
    body: String,
}

impl From<GlNote> for Comment {
    fn from(n: GlNote) -> Comment {
        Comment {
            id: n.id,
            body: n.body,
        }
    }
}

/// The longest note GitLab accepts, in characters (it answers 400 beyond).
pub const NOTE_LIMIT: usize = 1_000_000;

impl From<GlHook> for Hook {
    fn from(h: GlHook) -> Hook {
        Hook {
            id: h.id,
            url: h.url,
            push_events: h.push_events && h.tag_push_events,
            pull_request_events: h.merge_requests_events,
            active: h.disabled_until.is_none(),
        }
    }
}

fn hook_body(spec: &HookSpec) -> serde_json::Value {
    json!({
        "url": spec.url,
        "push_events": true,
        "tag_push_events": true,
        "merge_requests_events": spec.pull_requests,
        "token": spec.secret,
        "enable_ssl_verification": true,
    })
}

#[async_trait]
impl Forge for GitlabForge {
    fn kind(&self) -> ForgeKind {
        FORGE
    }

    async fn branch_head(&self, repo: &str, branch: &str) -> Result<String, ForgeError> {
        let request = format!("branch {branch} of {repo}");
        let b: Branch = self
            .get(
                &request,
                &self.project_url(repo, &format!("repository/branches/{}", enc(branch))),
            )
            .await?
            .json(FORGE, &request)?;
        Ok(b.commit.id)
    }

    async fn subtree_sha(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
    ) -> Result<String, ForgeError> {
        if path.is_empty() {
            // GitLab's API does not expose a commit's root tree id; the top-level listing
            // (each entry's name, mode and object id) identifies it just as well.
            let top = self.list_tree(repo, commit, "", false).await?;
            let mut h = Sha256::new();
            for e in top.iter() {
                h.update(format!("{} {} {}\n", e.mode, e.id, e.name));
            }
            return Ok(format!("root-{}", hex::encode(h.finalize())));
        }
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        let dir = self.list_tree(repo, commit, parent, false).await?;
        dir.iter()
            .find(|e| e.name == name && e.kind == "tree")
            .map(|e| e.id.clone())
            .ok_or_else(|| ForgeError::NotFound {
                forge: FORGE,
                what: format!("directory {path:?} in {repo} at {commit}"),
            })
    }

    async fn subtree_entries(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
    ) -> Result<Vec<TreeEntry>, ForgeError> {
        let listing = self.list_tree(repo, commit, path, true).await?;
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let mut out = Vec::new();
        for e in listing.iter() {
            let kind = EntryKind::from_mode(&e.mode).ok_or_else(|| {
                invalid(
                    "repository tree",
                    format!("unknown mode {:?} for {}", e.mode, e.path),
                )
            })?;
            if kind == EntryKind::Tree {
                continue;
            }
            let rel = e.path.strip_prefix(&prefix).unwrap_or(&e.path);
            out.push(TreeEntry {
                path: rel.to_string(),
                sha: e.id.clone(),
                kind,
                size: None,
            });
        }
        Ok(out)
    }

    async fn blob(&self, repo: &str, sha: &str) -> Result<Bytes, ForgeError> {
        let request = format!("blob {sha} of {repo}");
        Ok(self
            .get(
                &request,
                &self.project_url(repo, &format!("repository/blobs/{sha}/raw")),
            )
            .await?
            .body)
    }

    async fn compare(&self, repo: &str, base: &str, head: &str) -> Result<Comparison, ForgeError> {
        if base == head {
            return Ok(Comparison::Identical);
        }
        let request = format!("merge base of {base} and {head} in {repo}");
        let mb: CommitRef = self
            .get(
                &request,
                &self.project_url(
                    repo,
                    &format!(
                        "repository/merge_base?refs[]={}&refs[]={}",
                        enc(base),
                        enc(head)
                    ),
                ),
            )
            .await?
            .json(FORGE, &request)?;
        Ok(if mb.id == base {
            Comparison::Ahead
        } else if mb.id == head {
            Comparison::Behind
        } else {
            Comparison::Diverged
        })
    }

    async fn set_status(
        &self,
        repo: &str,
        sha: &str,
        status: &CommitStatus,
    ) -> Result<(), ForgeError> {
        let state = match status.state {
            StatusState::Pending => "pending",
            StatusState::Running => "running",
            StatusState::Success => "success",
            StatusState::Failure | StatusState::Error => "failed",
        };
        let mut body = json!({
            "state": state,
            "name": status.context,
            "description": super::github::clip_chars(&status.description, 255),
        });
        if let Some(url) = &status.target_url {
            body["target_url"] = json!(url);
        }
        let url = self.project_url(repo, &format!("statuses/{sha}"));
        let request = format!("status of {sha} in {repo}");
        self.policy
            .run(&request, || {
                self.send(reqwest::Method::POST, &url, Some(&body))
            })
            .await?;
        Ok(())
    }

    async fn list_hooks(&self, repo: &str) -> Result<Vec<Hook>, ForgeError> {
        let request = format!("hooks of {repo}");
        let first = self.project_url(repo, &format!("hooks?per_page={PER_PAGE}"));
        let hooks: Vec<GlHook> = all_pages(FORGE, &request, &self.api_url, first, |url| {
            let request = &request;
            async move { self.get(request, &url).await }
        })
        .await?;
        Ok(hooks.into_iter().map(Hook::from).collect())
    }

    async fn create_hook(&self, repo: &str, spec: &HookSpec) -> Result<Hook, ForgeError> {
        let request = format!("create hook on {repo}");
        let url = self.project_url(repo, "hooks");
        let body = hook_body(spec);
        let h: GlHook = self
            .policy
            .run(&request, || {
                self.send(reqwest::Method::POST, &url, Some(&body))
            })
            .await?
            .json(FORGE, &request)?;
        Ok(h.into())
    }

    async fn changed_paths(
        &self,
        repo: &str,
        base: &str,
        head: &str,
    ) -> Result<ChangedPaths, ForgeError> {
        // `straight=false` compares from the merge base of the two (`from...to`): the
        // request's own diff, whatever the base branch did since.
        self.compare_paths(repo, base, head, false).await
    }

    /// `straight=true`: the diff from `from` to `to` themselves, exact whatever their history.
    async fn changed_since(
        &self,
        repo: &str,
        from: &str,
        to: &str,
    ) -> Result<ChangedPaths, ForgeError> {
        self.compare_paths(repo, from, to, true).await
    }

    async fn list_comments(&self, repo: &str, number: u64) -> Result<Vec<Comment>, ForgeError> {
        let request = format!("notes of {repo}!{number}");
        let first = self.project_url(
            repo,
            &format!("merge_requests/{number}/notes?per_page={PER_PAGE}"),
        );
        let notes: Vec<GlNote> = all_pages(FORGE, &request, &self.api_url, first, |url| {
            let request = &request;
            async move { self.get(request, &url).await }
        })
        .await?;
        Ok(notes.into_iter().map(Comment::from).collect())
    }

    async fn create_comment(
        &self,
        repo: &str,
        number: u64,
        body: &str,
    ) -> Result<Comment, ForgeError> {
        let request = format!("note on {repo}!{number}");
        let url = self.project_url(repo, &format!("merge_requests/{number}/notes"));
        let body = json!({ "body": body });
        let n: GlNote = self
            .policy
            .run(&request, || {
                self.send(reqwest::Method::POST, &url, Some(&body))
            })
            .await?
            .json(FORGE, &request)?;
        Ok(n.into())
    }

    async fn update_comment(
        &self,
        repo: &str,
        number: u64,
        id: u64,
        body: &str,
    ) -> Result<Comment, ForgeError> {
        let request = format!("note {id} on {repo}!{number}");
        let url = self.project_url(repo, &format!("merge_requests/{number}/notes/{id}"));
        let body = json!({ "body": body });
        let n: GlNote = self
            .policy
            .run(&request, || {
                self.send(reqwest::Method::PUT, &url, Some(&body))
            })
            .await?
            .json(FORGE, &request)?;
        Ok(n.into())
    }

    fn comment_limit(&self) -> usize {
        NOTE_LIMIT
    }

    async fn update_hook(&self, repo: &str, id: u64, spec: &HookSpec) -> Result<Hook, ForgeError> {
        let request = format!("update hook {id} on {repo}");
        let url = self.project_url(repo, &format!("hooks/{id}"));
        let body = hook_body(spec);
        let h: GlHook = self
            .policy
            .run(&request, || {
                self.send(reqwest::Method::PUT, &url, Some(&body))
            })
            .await?
            .json(FORGE, &request)?;
        Ok(h.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_paths_are_encoded() {
        assert_eq!(enc("acme/platform/deploy"), "acme%2Fplatform%2Fdeploy");
        assert_eq!(enc("release/1.2"), "release%2F1%2E2");
    }
}
