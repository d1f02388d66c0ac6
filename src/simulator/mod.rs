//! A forge simulator for tests and the local demo. GitHub and GitLab cannot be reached from
//! CI, and canned JSON would not catch a client that asks for the wrong tree or mis-pages a
//! listing, so this is an HTTP server on loopback that speaks the part of the GitHub REST API
//! and GitLab REST API v4 that driftless uses, answers from real git repositories on disk,
//! records every request, fails on demand ([`Fault`]), and sends signed push webhooks.
//!
//! GitHub lives under `/github` (a GitHub Enterprise style API root), GitLab under
//! `/gitlab/api/v4`. One map of repositories serves both: `acme/deploy` is a GitHub
//! `owner/repo` and a GitLab project path at the same time.

mod git;
mod github;
mod gitlab;
mod push;
mod requests;
mod wire;

pub use requests::{RequestAction, RequestHook, SimComment};

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use serde_json::json;

use self::wire::{Incoming, Reply};

/// Request bodies the simulator accepts: far above any hook or status body.
const BODY_LIMIT: usize = 1 << 20;
/// The route template recorded for a request no endpoint matched.
pub const UNKNOWN_ROUTE: &str = "(unknown)";

/// The API tokens the simulator accepts. `Debug` never shows them.
#[derive(Clone)]
pub struct SimConfig {
    /// Required as `Authorization: Bearer <t>` or `Authorization: token <t>`.
    pub github_token: String,
    /// Required as `PRIVATE-TOKEN: <t>` (or `Authorization: Bearer <t>`, as GitLab allows).
    pub gitlab_token: String,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("github_token", &"<redacted>")
            .field("gitlab_token", &"<redacted>")
            .finish()
    }
}

/// One request the simulator answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `"github"`, `"gitlab"`, or `"unknown"` for a path under neither API root.
    pub forge: &'static str,
    pub method: String,
    /// The endpoint's template, e.g. `/repos/{owner}/{repo}/git/trees/{tree_sha}` (GitHub,
    /// as in its OpenAPI description) or `/projects/:id/repository/tree` (GitLab, as in its
    /// docs); [`UNKNOWN_ROUTE`] when none matched.
    pub route: String,
    /// The path as sent, still percent-encoded, API root included.
    pub path: String,
    /// The query string as sent, without `?`.
    pub query: String,
    pub status: u16,
    pub response_bytes: usize,
}

/// A commit status posted through either forge's API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedStatus {
    pub forge: &'static str,
    /// The full commit SHA.
    pub sha: String,
    /// The forge's state string (GitHub `success`, GitLab `success`, `failed`, ...).
    pub state: String,
    /// GitHub `context` or GitLab `name`.
    pub context: String,
    pub description: Option<String>,
    pub target_url: Option<String>,
}

/// A webhook registered through either forge's API, as it stands now. `Debug` shows whether
/// a secret is set, never the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SimHook {
    pub id: u64,
    pub url: String,
    /// GitHub event names, or for GitLab each enabled `<name>_events` flag as `<name>`
    /// (`push`, `tag_push`, ...).
    pub events: Vec<String>,
    /// GitHub `config.secret` or GitLab `token`, as last set.
    pub secret: Option<String>,
    /// GitHub `config.content_type`; `None` for GitLab.
    pub content_type: Option<String>,
    pub active: bool,
}

impl std::fmt::Debug for SimHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHook")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("content_type", &self.content_type)
            .field("active", &self.active)
            .finish()
    }
}

/// A failure to inject into the next `times` matching requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// `Some("github")` or `Some("gitlab")`; `None` matches both.
    pub forge: Option<&'static str>,
    /// Matched against the request's path and query as sent (`/github/repos/a/b/git/trees/..`);
    /// the empty string matches every request.
    pub path_contains: String,
    pub kind: FaultKind,
    /// How many matching requests get the fault before normal service resumes.
    pub times: u32,
}

/// What a [`Fault`] does to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// The request is answered normally after this delay.
    Latency(Duration),
    /// This status with the forge's JSON error body.
    Status(u16),
    /// GitHub: 403 with `x-ratelimit-remaining: 0` and `x-ratelimit-reset`; GitLab: 429 with
    /// `Retry-After` and `RateLimit-Reset`.
    RateLimited { reset_after: Duration },
    /// GitHub: 429 with `Retry-After` (the secondary, abuse-detection limit); GitLab: 429 with
    /// `Retry-After`.
    SecondaryRateLimit { retry_after: Duration },
    /// Recursive GitHub tree listings answer `truncated: true` with only the top level. Only
    /// recursive `git/trees` requests consume it.
    TruncateTrees,
}

/// A running simulator. Clones share the server; it stops when the last clone is dropped.
#[derive(Clone)]
pub struct ForgeSimulator {
    inner: Arc<Running>,
}

struct Running {
    state: web::Data<SimState>,
    addr: SocketAddr,
    server: ServerHandle,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Sends the stop command at once; the returned future only waits for completion.
        drop(self.server.stop(false));
    }
}

impl ForgeSimulator {
    /// Starts the server on `127.0.0.1` on a free port, on the current tokio runtime.
    pub async fn start(config: SimConfig) -> std::io::Result<ForgeSimulator> {
        Self::start_on(config, std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// The same on `ip`: an address that pods reach too (the test node's own IP), for a
    /// driftless running in the cluster. The URLs it answers with name `ip`.
    pub async fn start_on(
        config: SimConfig,
        ip: std::net::IpAddr,
    ) -> std::io::Result<ForgeSimulator> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        let state = web::Data::new(SimState::new(config, format!("http://{addr}")));
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .app_data(web::PayloadConfig::new(BODY_LIMIT))
                .default_service(web::to(dispatch))
        })
        // Handlers never block (git runs as async child processes), so one worker serves
        // concurrent requests and keeps the thread count of parallel tests low.
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
        let handle = server.handle();
        tokio::spawn(async move {
            if let Err(error) = server.await {
                tracing::error!(%error, "forge simulator stopped");
            }
        });
        Ok(ForgeSimulator {
            inner: Arc::new(Running {
                state,
                addr,
                server: handle,
            }),
        })
    }

    fn state(&self) -> &SimState {
        &self.inner.state
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Serves the git repository at `git_dir` (a work tree or a bare repository) as
    /// `full_name`: a GitHub `owner/repo` and a GitLab `path_with_namespace`. Names are
    /// case-insensitive; adding a name again points it at the new directory.
    pub fn add_repo(&self, full_name: &str, git_dir: &Path) {
        self.state().add_repo(full_name, git_dir);
    }

    /// The numeric GitLab project id assigned to a repository.
    pub fn gitlab_project_id(&self, full_name: &str) -> Option<u64> {
        self.state().repo(full_name).map(|r| r.project_id)
    }

    /// `http://127.0.0.1:PORT/github`, the API root a GitHub client is given.
    pub fn github_api_url(&self) -> String {
        format!("{}/github", self.state().base_url)
    }

    /// `http://127.0.0.1:PORT/gitlab/api/v4`, the API root a GitLab client is given.
    pub fn gitlab_api_url(&self) -> String {
        format!("{}/gitlab/api/v4", self.state().base_url)
    }

    /// Every request so far, in the order answered.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state().requests).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state().requests).clear();
    }

    /// Sets the requests a GitHub rate limit window allows, from the next window on (a token's
    /// is 5,000 an hour; a GitHub App installation's grows with its repositories and users up
    /// to 12,500, 15,000 on Enterprise Cloud). For a benchmark whose set-up alone needs more
    /// than one token's hour, and says so.
    pub fn set_github_rate_limit(&self, limit: u64) {
        self.state()
            .github_rate_limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// Requests per `"<forge> <METHOD> <route template>"`.
    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for r in lock(&self.state().requests).iter() {
            *counts
                .entry(format!("{} {} {}", r.forge, r.method, r.route))
                .or_insert(0) += 1;
        }
        counts
    }

    /// Statuses posted for a commit of a repository, in the order posted, from both forges.
    /// `sha` may be abbreviated.
    pub fn statuses(&self, repo: &str, sha: &str) -> Vec<RecordedStatus> {
        let key = repo_key(repo);
        let sha = sha.to_ascii_lowercase();
        lock(&self.state().statuses)
            .iter()
            .filter(|s| s.repo == key && !sha.is_empty() && s.recorded.sha.starts_with(&sha))
            .map(|s| s.recorded.clone())
            .collect()
    }

    /// The webhooks registered on a repository, in the order created.
    pub fn hooks(&self, repo: &str) -> Vec<SimHook> {
        let key = repo_key(repo);
        lock(&self.state().hooks)
            .iter()
            .filter(|h| h.repo == key)
            .map(StoredHook::public)
            .collect()
    }

    /// Queues a fault; the first queued fault matching a request is applied to it.
    pub fn inject(&self, fault: Fault) {
        if fault.times > 0 {
            lock(&self.state().faults).push(fault);
        }
    }

    /// Drops the queued faults no request has used up; returns how many were left.
    pub fn clear_faults(&self) -> usize {
        std::mem::take(&mut *lock(&self.state().faults)).len()
    }

    /// Sends a signed GitHub `push` delivery for `refs/heads/<branch>` of `repo` to
    /// `{receiver_base_url}/hooks/github`, built from the repository's real commits.
    pub async fn send_github_push(
        &self,
        receiver_base_url: &str,
        repo: &str,
        branch: &str,
        before: &str,
        after: &str,
        secret: &str,
    ) -> Result<reqwest::StatusCode, reqwest::Error> {
        let delivery =
            push::github_delivery(self.state(), repo, branch, before, after, secret).await;
        delivery
            .send(&format!(
                "{}/hooks/github",
                receiver_base_url.trim_end_matches('/')
            ))
            .await
    }

    /// Sends a GitLab `Push Hook` delivery carrying `X-Gitlab-Token: <token>` for
    /// `refs/heads/<branch>` of `repo` to `{receiver_base_url}/hooks/gitlab`.
    pub async fn send_gitlab_push(
        &self,
        receiver_base_url: &str,
        repo: &str,
        branch: &str,
        before: &str,
        after: &str,
        token: &str,
    ) -> Result<reqwest::StatusCode, reqwest::Error> {
        let delivery =
            push::gitlab_delivery(self.state(), repo, branch, before, after, token).await;
        delivery
            .send(&format!(
                "{}/hooks/gitlab",
                receiver_base_url.trim_end_matches('/')
            ))
            .await
    }

    /// The comments (GitHub) or notes (GitLab) on request `number` of `repo`, oldest first.
    pub fn comments(&self, repo: &str, number: u64) -> Vec<SimComment> {
        self.state().sim_comments(repo, number)
    }

    /// Sends a signed GitHub `pull_request` delivery for `repo` to
    /// `{receiver_base_url}/hooks/github`.
    pub async fn send_github_pull_request(
        &self,
        receiver_base_url: &str,
        repo: &str,
        hook: &RequestHook,
        secret: &str,
    ) -> Result<reqwest::StatusCode, reqwest::Error> {
        requests::github_delivery(self.state(), repo, hook, secret)
            .await
            .send(&format!(
                "{}/hooks/github",
                receiver_base_url.trim_end_matches('/')
            ))
            .await
    }

    /// Sends a GitLab `Merge Request Hook` delivery carrying `X-Gitlab-Token: <token>` to
    /// `{receiver_base_url}/hooks/gitlab`.
    pub async fn send_gitlab_merge_request(
        &self,
        receiver_base_url: &str,
        repo: &str,
        hook: &RequestHook,
        token: &str,
    ) -> Result<reqwest::StatusCode, reqwest::Error> {
        requests::gitlab_delivery(self.state(), repo, hook, token)
            .await
            .send(&format!(
                "{}/hooks/gitlab",
                receiver_base_url.trim_end_matches('/')
            ))
            .await
    }

    /// Stops the server and waits until it has.
    pub async fn stop(&self) {
        self.inner.server.stop(false).await;
    }
}

/// Everything the request handlers share.
struct SimState {
    config: SimConfig,
    /// `http://127.0.0.1:PORT`, for the URLs written into bodies and headers.
    base_url: String,
    repos: RwLock<BTreeMap<String, RepoEntry>>,
    requests: Mutex<Vec<RecordedRequest>>,
    statuses: Mutex<Vec<StoredStatus>>,
    hooks: Mutex<Vec<StoredHook>>,
    /// Comments (GitHub) and notes (GitLab) on requests, each with how often it was edited.
    comments: Mutex<Vec<(requests::StoredComment, u32)>>,
    faults: Mutex<Vec<Fault>>,
    /// GitHub's primary rate limit window per presented token.
    rate: Mutex<HashMap<String, RateWindow>>,
    /// Requests a GitHub rate limit window allows (5,000 an hour, a token's; see
    /// [`ForgeSimulator::set_github_rate_limit`]).
    github_rate_limit: AtomicU64,
    /// Ids of hooks and statuses (and GitLab projects), unique across the simulator.
    next_id: AtomicU64,
}

#[derive(Debug, Clone)]
struct RepoEntry {
    /// As given to `add_repo`: the canonical spelling used in URLs.
    full_name: String,
    project_id: u64,
    git: git::Repo,
}

struct StoredStatus {
    repo: String,
    recorded: RecordedStatus,
}

/// A webhook as stored; each forge's API renders it its own way.
#[derive(Clone)]
struct StoredHook {
    repo: String,
    id: u64,
    url: String,
    events: Vec<String>,
    secret: Option<String>,
    content_type: Option<String>,
    /// GitHub `insecure_ssl == "0"`, GitLab `enable_ssl_verification`.
    verify_tls: bool,
    active: bool,
    /// GitLab `push_events_branch_filter`.
    branch_filter: String,
    /// GitLab `name` and `description`.
    name: String,
    description: String,
    created_at: i64,
    updated_at: i64,
}

impl StoredHook {
    fn public(&self) -> SimHook {
        SimHook {
            id: self.id,
            url: self.url.clone(),
            events: self.events.clone(),
            secret: self.secret.clone(),
            content_type: self.content_type.clone(),
            active: self.active,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct RateWindow {
    used: u64,
    /// Unix seconds.
    reset: i64,
    /// Requests the window allows.
    limit: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn repo_key(name: &str) -> String {
    name.trim_matches('/').to_ascii_lowercase()
}

impl SimState {
    fn new(config: SimConfig, base_url: String) -> Self {
        Self {
            config,
            base_url,
            repos: RwLock::default(),
            requests: Mutex::default(),
            statuses: Mutex::default(),
            hooks: Mutex::default(),
            comments: Mutex::default(),
            faults: Mutex::default(),
            rate: Mutex::default(),
            github_rate_limit: AtomicU64::new(github::RATE_LIMIT),
            next_id: AtomicU64::new(1),
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Requests a GitHub rate limit window allows now.
    fn github_rate_limit(&self) -> u64 {
        self.github_rate_limit.load(Ordering::Relaxed)
    }

    fn add_repo(&self, full_name: &str, git_dir: &Path) {
        let key = repo_key(full_name);
        let mut repos = self.repos.write().unwrap_or_else(PoisonError::into_inner);
        let project_id = repos
            .get(&key)
            .map(|r| r.project_id)
            .unwrap_or_else(|| self.next_id());
        repos.insert(
            key,
            RepoEntry {
                full_name: full_name.trim_matches('/').to_string(),
                project_id,
                git: git::Repo::new(git_dir),
            },
        );
    }

    fn repo(&self, full_name: &str) -> Option<RepoEntry> {
        self.repos
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&repo_key(full_name))
            .cloned()
    }

    fn repo_by_project_id(&self, id: u64) -> Option<RepoEntry> {
        self.repos
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .find(|r| r.project_id == id)
            .cloned()
    }

    /// Takes one use of the first queued fault for this request that `wanted` accepts.
    fn take_fault(
        &self,
        forge: &'static str,
        target: &str,
        wanted: impl Fn(&FaultKind) -> bool,
    ) -> Option<FaultKind> {
        let mut faults = lock(&self.faults);
        let i = faults.iter().position(|f| {
            f.forge.is_none_or(|x| x == forge)
                && target.contains(f.path_contains.as_str())
                && wanted(&f.kind)
        })?;
        let kind = faults[i].kind.clone();
        faults[i].times -= 1;
        if faults[i].times == 0 {
            faults.remove(i);
        }
        Some(kind)
    }

    /// Applies the request's fault, if any: a latency fault delays and lets the request
    /// through (`None`); any other is returned for the forge to answer with.
    async fn interfere(&self, forge: &'static str, req: &Incoming) -> Option<FaultKind> {
        let kind = self.take_fault(forge, &req.target(), |k| {
            !matches!(k, FaultKind::TruncateTrees)
        })?;
        if let FaultKind::Latency(delay) = kind {
            tokio::time::sleep(delay).await;
            return None;
        }
        Some(kind)
    }

    fn record_status(&self, repo: &str, recorded: RecordedStatus) {
        lock(&self.statuses).push(StoredStatus {
            repo: repo_key(repo),
            recorded,
        });
    }
}

/// Every request lands here: split off the API root, let the forge answer, record.
async fn dispatch(req: HttpRequest, body: Bytes, state: web::Data<SimState>) -> HttpResponse {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let (forge, rest) = if let Some(rest) = under(&path, "/github") {
        ("github", rest.to_string())
    } else if let Some(rest) = under(&path, "/gitlab/api/v4") {
        ("gitlab", rest.to_string())
    } else {
        ("unknown", String::new())
    };
    let incoming = Incoming::new(
        req.method().clone(),
        path,
        query,
        &rest,
        req.headers().clone(),
        body,
    );
    let (route, reply) = match forge {
        "github" => github::serve(&state, &incoming).await,
        "gitlab" => gitlab::serve(&state, &incoming).await,
        _ => (
            UNKNOWN_ROUTE,
            Reply::json(
                actix_web::http::StatusCode::NOT_FOUND,
                &json!({"message": "Not Found: the simulator serves /github and /gitlab/api/v4"}),
            ),
        ),
    };
    lock(&state.requests).push(RecordedRequest {
        forge,
        method: incoming.method.to_string(),
        route: route.to_string(),
        path: incoming.path,
        query: incoming.query,
        status: reply.status.as_u16(),
        response_bytes: reply.body.len(),
    });
    reply.into_response()
}

/// The rest of `path` when it lies under `root` (`/github` or `/github/...`).
fn under<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(root)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}
