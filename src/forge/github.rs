//! GitHub through octocrab: git trees (recursive, walking subtrees when GitHub truncates),
//! git blobs, branch heads with conditional requests (`commits/{branch}` in the SHA media type,
//! the SHA known as the ETag: an unchanged head is a 304, which costs no rate limit),
//! compare, commit statuses and repository webhooks. Works against github.com, GitHub
//! Enterprise Server (`https://HOST/api/v3`) and the test simulator.
//!
//! octocrab supplies authentication (token, or GitHub App JWT exchanged for an installation
//! token it caches and renews) and the HTTP stack; responses are read raw so that rate-limit
//! headers, ETags and 304s are handled here, under the shared request policy.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use octocrab::service::middleware::retry::RetryConfig;
use octocrab::Octocrab;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, IF_NONE_MATCH};
use serde::Deserialize;
use serde_json::json;

use super::http::{all_pages, Policy, RawResponse};
use super::{
    ChangedPaths, Comment, CommitStatus, Comparison, EntryKind, Forge, ForgeError, Hook, HookSpec,
    StatusState, TreeEntry,
};
use crate::settings::{FetchSettings, ForgeKind, GithubAuth, GithubSettings, SettingsError};

const FORGE: ForgeKind = ForgeKind::Github;
/// Tree listings kept (commit or tree SHA → entries). Listings are immutable, so they are
/// shared by every app of a push and by the next push; 64 bounds memory to a few MB even for
/// large repos.
const TREE_CACHE_LISTINGS: usize = 64;

/// Characters escaped in a path segment (branch names may hold `/`, which GitHub takes raw).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');

pub struct GithubForge {
    client: Octocrab,
    api_url: String,
    policy: Policy,
    trees: Mutex<TreeCache>,
    /// The last head seen of each (repo, branch): the ETag of the next conditional request.
    heads: Mutex<HashMap<(String, String), String>>,
}

/// `commits/{ref}` answers with the bare commit SHA in this media type, and its ETag is that
/// SHA quoted: sending the SHA one knows as `If-None-Match` gets a 304 while the ref has not
/// moved, and a 304 costs no rate limit.
const SHA_MEDIA_TYPE: &str = "application/vnd.github.sha";

#[derive(Default)]
struct TreeCache {
    listings: HashMap<(String, bool), Arc<Listing>>,
    order: VecDeque<(String, bool)>,
}

/// One git trees response.
#[derive(Debug, Deserialize)]
struct Listing {
    sha: String,
    tree: Vec<GhEntry>,
    #[serde(default)]
    truncated: bool,
}

#[derive(Debug, Deserialize)]
struct GhEntry {
    path: String,
    mode: String,
    #[serde(rename = "type")]
    kind: String,
    sha: String,
    #[serde(default)]
    size: Option<u64>,
}

impl GhEntry {
    fn entry_kind(&self) -> Result<EntryKind, ForgeError> {
        EntryKind::from_mode(&self.mode).ok_or_else(|| ForgeError::InvalidResponse {
            forge: FORGE,
            request: "git trees".into(),
            message: format!("unknown mode {:?} for {}", self.mode, self.path),
        })
    }
}

impl GithubForge {
    pub fn new(settings: &GithubSettings, fetch: &FetchSettings) -> Result<Self, SettingsError> {
        let key_err = |message: String| SettingsError {
            key: "forges.github.api_url".into(),
            message,
        };
        let builder = Octocrab::builder()
            .base_uri(settings.api_url.as_str())
            .map_err(|e| key_err(format!("not a usable URL: {e}")))?
            // Retries, rate-limit waits and their accounting are ours (see forge::http).
            .add_retry_config(RetryConfig::None)
            .set_connect_timeout(Some(std::time::Duration::from_secs(10)))
            .set_read_timeout(Some(fetch.request_timeout));
        let client =
            match &settings.auth {
                GithubAuth::Token(token) => builder
                    .personal_token(token.resolve()?.expose().to_string())
                    .build(),
                GithubAuth::App {
                    app_id,
                    private_key,
                    installation_id,
                } => {
                    let pem = private_key.resolve()?;
                    let key = octocrab::EncodingKey::from_rsa_pem(pem.expose().as_bytes())
                        .map_err(|e| SettingsError {
                            key: private_key.key().to_string(),
                            message: format!("not an RSA private key in PEM form: {e}"),
                        })?;
                    builder
                        .app((*app_id).into(), key)
                        .build()
                        .and_then(|app| app.installation((*installation_id).into()))
                }
            }
            .map_err(|e| key_err(format!("cannot build the GitHub client: {e}")))?;
        Ok(Self {
            client,
            api_url: settings.api_url.trim_end_matches('/').to_string(),
            policy: Policy::new(FORGE, fetch.max_rate_limit_wait),
            trees: Mutex::new(TreeCache::default()),
            heads: Mutex::new(HashMap::new()),
        })
    }

    /// Requests left in the current rate-limit window, as GitHub last reported (-1 unknown).
    pub fn rate_limit_remaining(&self) -> i64 {
        self.policy
            .remaining
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn url(&self, repo: &str, rest: &str) -> String {
        format!("{}/repos/{repo}/{rest}", self.api_url)
    }

    async fn send(
        &self,
        method: http::Method,
        url: &str,
        headers: Option<HeaderMap>,
        body: Option<serde_json::Value>,
    ) -> Result<RawResponse, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
        let mut builder = http::Request::builder().method(method).uri(uri);
        if !headers.as_ref().is_some_and(|h| h.contains_key(ACCEPT)) {
            builder = builder.header("accept", "application/vnd.github+json");
        }
        builder = builder.header("x-github-api-version", "2022-11-28");
        for (k, v) in headers.iter().flatten() {
            builder = builder.header(k, v);
        }
        let request = self
            .client
            .build_request(builder, body.as_ref())
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(RawResponse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    async fn get(&self, request: &str, url: &str) -> Result<RawResponse, ForgeError> {
        self.policy
            .run(request, || self.send(http::Method::GET, url, None, None))
            .await
    }

    /// A git trees listing of `sha` (a commit or tree), cached by SHA.
    async fn listing(
        &self,
        repo: &str,
        sha: &str,
        recursive: bool,
    ) -> Result<Arc<Listing>, ForgeError> {
        let key = (format!("{repo}@{sha}"), recursive);
        if let Some(l) = self.trees.lock().expect("tree cache").listings.get(&key) {
            return Ok(l.clone());
        }
        let mut url = self.url(repo, &format!("git/trees/{sha}"));
        if recursive {
            url.push_str("?recursive=1");
        }
        let request = format!("tree {sha} of {repo}");
        let listing: Arc<Listing> =
            Arc::new(self.get(&request, &url).await?.json(FORGE, &request)?);
        let mut cache = self.trees.lock().expect("tree cache");
        if cache.order.len() >= TREE_CACHE_LISTINGS {
            if let Some(old) = cache.order.pop_front() {
                cache.listings.remove(&old);
            }
        }
        cache.order.push_back(key.clone());
        cache.listings.insert(key, listing.clone());
        Ok(listing)
    }

    /// Walks from the commit's root tree down to `path` one level at a time (used when the
    /// recursive listing was truncated).
    async fn walk_to(&self, repo: &str, commit: &str, path: &str) -> Result<String, ForgeError> {
        let mut sha = self.listing(repo, commit, false).await?.sha.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let level = self.listing(repo, &sha, false).await?;
            sha = level
                .tree
                .iter()
                .find(|e| e.path == part && e.kind == "tree")
                .map(|e| e.sha.clone())
                .ok_or_else(|| not_found(repo, commit, path))?;
        }
        Ok(sha)
    }

    /// Every entry below the tree `sha`, recursively; walks subtrees when truncated.
    async fn entries_below(
        &self,
        repo: &str,
        sha: &str,
        prefix: &str,
        out: &mut Vec<TreeEntry>,
    ) -> Result<(), ForgeError> {
        let listing = self.listing(repo, sha, true).await?;
        if !listing.truncated {
            for e in &listing.tree {
                let kind = e.entry_kind()?;
                if kind != EntryKind::Tree {
                    out.push(entry(prefix, e, kind));
                }
            }
            return Ok(());
        }
        let level = self.listing(repo, sha, false).await?;
        for e in &level.tree {
            let kind = e.entry_kind()?;
            if kind == EntryKind::Tree {
                let sub = join(prefix, &e.path);
                Box::pin(self.entries_below(repo, &e.sha, &sub, out)).await?;
            } else {
                out.push(entry(prefix, e, kind));
            }
        }
        Ok(())
    }
}

fn join(prefix: &str, path: &str) -> String {
    if prefix.is_empty() {
        path.to_string()
    } else {
        format!("{prefix}/{path}")
    }
}

fn entry(prefix: &str, e: &GhEntry, kind: EntryKind) -> TreeEntry {
    TreeEntry {
        path: join(prefix, &e.path),
        sha: e.sha.clone(),
        kind,
        size: e.size,
    }
}

fn not_found(repo: &str, commit: &str, path: &str) -> ForgeError {
    ForgeError::NotFound {
        forge: FORGE,
        what: format!("directory {path:?} in {repo} at {commit}"),
    }
}

fn invalid(request: &str, message: impl Into<String>) -> ForgeError {
    ForgeError::InvalidResponse {
        forge: FORGE,
        request: request.to_string(),
        message: message.into(),
    }
}

#[derive(Deserialize)]
struct GhBlob {
    content: String,
    encoding: String,
}

#[derive(Deserialize)]
struct GhComparison {
    status: String,
}

/// A compare answer as `changed_paths` reads it.
#[derive(Deserialize)]
struct GhFileComparison {
    merge_base_commit: GhSha,
    #[serde(default)]
    files: Vec<GhDiffEntry>,
}

#[derive(Deserialize)]
struct GhSha {
    sha: String,
}

#[derive(Deserialize)]
struct GhDiffEntry {
    filename: String,
    #[serde(default)]
    previous_filename: Option<String>,
}

#[derive(Deserialize)]
struct GhComment {
    id: u64,
    #[serde(default)]
    body: Option<String>,
}

impl From<GhComment> for Comment {
    fn from(c: GhComment) -> Comment {
        Comment {
            id: c.id,
            body: c.body.unwrap_or_default(),
        }
    }
}

/// GitHub's compare lists at most this many files; a list this long may be cut short.
const COMPARE_FILES_LISTED: usize = 300;
/// The longest issue comment GitHub accepts (it answers 422 beyond).
pub const COMMENT_LIMIT: usize = 65_536;

#[derive(Deserialize)]
struct GhHook {
    id: u64,
    #[serde(default)]
    active: bool,
    #[serde(default)]
    events: Vec<String>,
    config: GhHookConfig,
}

#[derive(Deserialize)]
struct GhHookConfig {
    #[serde(default)]
    url: Option<String>,
}

impl From<GhHook> for Hook {
    fn from(h: GhHook) -> Hook {
        Hook {
            id: h.id,
            url: h.config.url.unwrap_or_default(),
            push_events: h.events.iter().any(|e| e == "push" || e == "*"),
            pull_request_events: h.events.iter().any(|e| e == "pull_request" || e == "*"),
            active: h.active,
        }
    }
}

fn hook_body(spec: &HookSpec) -> serde_json::Value {
    json!({
        "name": "web",
        "active": true,
        // Tags arrive as push events too.
        "events": if spec.pull_requests { json!(["push", "pull_request"]) } else { json!(["push"]) },
        "config": {
            "url": spec.url,
            "content_type": "json",
            "secret": spec.secret,
            "insecure_ssl": "0",
        },
    })
}

#[async_trait]
impl Forge for GithubForge {
    fn kind(&self) -> ForgeKind {
        FORGE
    }

    async fn branch_head(&self, repo: &str, branch: &str) -> Result<String, ForgeError> {
        self.branch_head_since(repo, branch, None).await
    }

    async fn branch_head_since(
        &self,
        repo: &str,
        branch: &str,
        known: Option<&str>,
    ) -> Result<String, ForgeError> {
        let key = (repo.to_string(), branch.to_string());
        let remembered = self.heads.lock().expect("heads cache").get(&key).cloned();
        let known = known.map(str::to_string).or(remembered);
        let url = self.url(
            repo,
            &format!("commits/{}", utf8_percent_encode(branch, SEGMENT)),
        );
        let request = format!("branch {branch} of {repo}");
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(SHA_MEDIA_TYPE));
        if let Some(sha) = known.as_deref().filter(|s| is_sha(s)) {
            let etag = HeaderValue::from_str(&format!("\"{sha}\"")).expect("hex is a header value");
            headers.insert(IF_NONE_MATCH, etag);
        }
        let resp = self
            .policy
            .run(&request, || {
                self.send(http::Method::GET, &url, Some(headers.clone()), None)
            })
            .await?;
        let sha = match (resp.status, known) {
            (304, Some(sha)) => sha,
            (304, None) => return Err(invalid(&request, "304 Not Modified without a known head")),
            _ => {
                let sha = String::from_utf8_lossy(&resp.body).trim().to_string();
                if !is_sha(&sha) {
                    return Err(invalid(&request, "the answer is not a commit SHA"));
                }
                sha
            }
        };
        self.heads
            .lock()
            .expect("heads cache")
            .insert(key, sha.clone());
        Ok(sha)
    }

    async fn subtree_sha(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
    ) -> Result<String, ForgeError> {
        let root = self.listing(repo, commit, true).await?;
        if path.is_empty() {
            return Ok(root.sha.clone());
        }
        if root.truncated {
            return self.walk_to(repo, commit, path).await;
        }
        root.tree
            .iter()
            .find(|e| e.path == path && e.kind == "tree")
            .map(|e| e.sha.clone())
            .ok_or_else(|| not_found(repo, commit, path))
    }

    async fn subtree_entries(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
    ) -> Result<Vec<TreeEntry>, ForgeError> {
        let root = self.listing(repo, commit, true).await?;
        let mut out = Vec::new();
        if !root.truncated {
            let prefix = if path.is_empty() {
                String::new()
            } else {
                format!("{path}/")
            };
            let mut found_dir = path.is_empty();
            for e in &root.tree {
                if !path.is_empty() && e.path == path && e.kind == "tree" {
                    found_dir = true;
                }
                let Some(rel) = e.path.strip_prefix(&prefix) else {
                    continue;
                };
                let kind = e.entry_kind()?;
                if kind != EntryKind::Tree {
                    out.push(TreeEntry {
                        path: rel.to_string(),
                        sha: e.sha.clone(),
                        kind,
                        size: e.size,
                    });
                }
            }
            if !found_dir {
                return Err(not_found(repo, commit, path));
            }
            return Ok(out);
        }
        let sha = self.subtree_sha(repo, commit, path).await?;
        self.entries_below(repo, &sha, "", &mut out).await?;
        Ok(out)
    }

    async fn blob(&self, repo: &str, sha: &str) -> Result<Bytes, ForgeError> {
        let request = format!("blob {sha} of {repo}");
        let b: GhBlob = self
            .get(&request, &self.url(repo, &format!("git/blobs/{sha}")))
            .await?
            .json(FORGE, &request)?;
        if b.encoding != "base64" {
            return Err(invalid(
                &request,
                format!("unexpected encoding {:?}", b.encoding),
            ));
        }
        let compact: String = b
            .content
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        BASE64
            .decode(compact)
            .map(Bytes::from)
            .map_err(|e| invalid(&request, format!("content is not base64: {e}")))
    }

    async fn compare(&self, repo: &str, base: &str, head: &str) -> Result<Comparison, ForgeError> {
        let request = format!("compare {base}...{head} of {repo}");
        let c: GhComparison = self
            .get(
                &request,
                &self.url(repo, &format!("compare/{base}...{head}")),
            )
            .await?
            .json(FORGE, &request)?;
        match c.status.as_str() {
            "identical" => Ok(Comparison::Identical),
            "ahead" => Ok(Comparison::Ahead),
            "behind" => Ok(Comparison::Behind),
            "diverged" => Ok(Comparison::Diverged),
            other => Err(invalid(&request, format!("unknown status {other:?}"))),
        }
    }

    async fn set_status(
        &self,
        repo: &str,
        sha: &str,
        status: &CommitStatus,
    ) -> Result<(), ForgeError> {
        let state = match status.state {
            StatusState::Pending | StatusState::Running => "pending",
            StatusState::Success => "success",
            StatusState::Failure => "failure",
            StatusState::Error => "error",
        };
        let mut body = json!({
            "state": state,
            // GitHub cuts descriptions at 140 characters.
            "description": clip_chars(&status.description, 140),
            "context": status.context,
        });
        if let Some(url) = &status.target_url {
            body["target_url"] = json!(url);
        }
        let url = self.url(repo, &format!("statuses/{sha}"));
        let request = format!("status of {sha} in {repo}");
        self.policy
            .run(&request, || {
                self.send(http::Method::POST, &url, None, Some(body.clone()))
            })
            .await?;
        Ok(())
    }

    async fn list_hooks(&self, repo: &str) -> Result<Vec<Hook>, ForgeError> {
        let request = format!("webhooks of {repo}");
        // 100 is GitHub's largest page; further pages are followed through `Link`.
        let first = self.url(repo, "hooks?per_page=100");
        let hooks: Vec<GhHook> = all_pages(FORGE, &request, &self.api_url, first, |url| {
            let request = &request;
            async move { self.get(request, &url).await }
        })
        .await?;
        Ok(hooks.into_iter().map(Hook::from).collect())
    }

    async fn create_hook(&self, repo: &str, spec: &HookSpec) -> Result<Hook, ForgeError> {
        let request = format!("create webhook on {repo}");
        let url = self.url(repo, "hooks");
        let body = hook_body(spec);
        let h: GhHook = self
            .policy
            .run(&request, || {
                self.send(http::Method::POST, &url, None, Some(body.clone()))
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
        let request = format!("compare {base}...{head} of {repo}");
        let c: GhFileComparison = self
            .get(
                &request,
                &self.url(
                    repo,
                    &format!("compare/{}...{head}", utf8_percent_encode(base, SEGMENT)),
                ),
            )
            .await?
            .json(FORGE, &request)?;
        let complete = c.files.len() < COMPARE_FILES_LISTED;
        let mut paths = Vec::with_capacity(c.files.len());
        for f in c.files {
            paths.extend(f.previous_filename);
            paths.push(f.filename);
        }
        Ok(ChangedPaths {
            merge_base: Some(c.merge_base_commit.sha),
            paths,
            complete,
        })
    }

    /// GitHub compares from the merge base only (`from...to`): exact when `from` is `to`'s
    /// ancestor, which the merge base it names tells.
    async fn changed_since(
        &self,
        repo: &str,
        from: &str,
        to: &str,
    ) -> Result<ChangedPaths, ForgeError> {
        let mut changed = self.changed_paths(repo, from, to).await?;
        if changed.merge_base.as_deref() != Some(from) {
            changed.complete = false;
        }
        Ok(changed)
    }

    async fn list_comments(&self, repo: &str, number: u64) -> Result<Vec<Comment>, ForgeError> {
        let request = format!("comments of {repo}#{number}");
        let first = self.url(repo, &format!("issues/{number}/comments?per_page=100"));
        let comments: Vec<GhComment> = all_pages(FORGE, &request, &self.api_url, first, |url| {
            let request = &request;
            async move { self.get(request, &url).await }
        })
        .await?;
        Ok(comments.into_iter().map(Comment::from).collect())
    }

    async fn create_comment(
        &self,
        repo: &str,
        number: u64,
        body: &str,
    ) -> Result<Comment, ForgeError> {
        let request = format!("comment on {repo}#{number}");
        let url = self.url(repo, &format!("issues/{number}/comments"));
        let body = json!({ "body": body });
        let c: GhComment = self
            .policy
            .run(&request, || {
                self.send(http::Method::POST, &url, None, Some(body.clone()))
            })
            .await?
            .json(FORGE, &request)?;
        Ok(c.into())
    }

    async fn update_comment(
        &self,
        repo: &str,
        number: u64,
        id: u64,
        body: &str,
    ) -> Result<Comment, ForgeError> {
        let request = format!("comment {id} on {repo}#{number}");
        let url = self.url(repo, &format!("issues/comments/{id}"));
        let body = json!({ "body": body });
        let c: GhComment = self
            .policy
            .run(&request, || {
                self.send(http::Method::PATCH, &url, None, Some(body.clone()))
            })
            .await?
            .json(FORGE, &request)?;
        Ok(c.into())
    }

    fn comment_limit(&self) -> usize {
        COMMENT_LIMIT
    }

    async fn update_hook(&self, repo: &str, id: u64, spec: &HookSpec) -> Result<Hook, ForgeError> {
        let request = format!("update webhook {id} on {repo}");
        let url = self.url(repo, &format!("hooks/{id}"));
        let body = hook_body(spec);
        let h: GhHook = self
            .policy
            .run(&request, || {
                self.send(http::Method::PATCH, &url, None, Some(body.clone()))
            })
            .await?
            .json(FORGE, &request)?;
        Ok(h.into())
    }
}

/// A full commit SHA in hex (SHA-1, or SHA-256 for repositories that use it).
fn is_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn clip_chars(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
