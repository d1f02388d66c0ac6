//! The GitHub REST API as the simulator speaks it: the operations of GitHub's OpenAPI
//! description that driftless calls (git refs, trees, blobs, compare, commit statuses, repository
//! webhooks), with GitHub's shapes, status codes and headers: token authentication, the
//! primary rate limit headers on every answer, ETags with `304 Not Modified` (the commit's SHA
//! as the ETag of `commits/{ref}` in the `application/vnd.github.sha` media type, as GitHub
//! documents it), and the error bodies GitHub sends.

use actix_web::http::{Method, StatusCode};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::git::{self, CommitInfo, FileChange, GitError, TreeEntry};
use super::requests::StoredComment;
use super::wire::{encode_path, now_unix, page_url, random_uuid, rfc3339, Incoming, Reply};
use super::{
    lock, repo_key, FaultKind, RateWindow, RecordedStatus, RepoEntry, SimState, StoredHook,
    UNKNOWN_ROUTE,
};

const FORGE: &str = "github";
const DOCS: &str = "https://docs.github.com/rest";
/// GitHub's primary rate limit for a token, per hour.
pub(super) const RATE_LIMIT: u64 = 5000;
const RATE_WINDOW_SECS: i64 = 3600;
/// GitHub truncates recursive tree listings beyond 100,000 entries.
const TREE_ENTRY_LIMIT: usize = 100_000;
/// GitHub's compare answers list at most 250 commits and 300 files.
const COMPARE_COMMIT_LIMIT: usize = 250;
const COMPARE_FILE_LIMIT: usize = 300;
/// The login the simulator acts as (status creator, push sender).
pub(super) const SIM_LOGIN: &str = "driftless-sim";

/// An endpoint, with its path parameters after `/repos/{owner}/{repo}`.
enum Op {
    GetRef(String),
    GetCommit(String),
    GetTree(String),
    GetBlob(String),
    Compare(String),
    CreateStatus(String),
    ListHooks,
    CreateHook,
    GetHook(String),
    UpdateHook(String),
    DeleteHook(String),
    ListComments(u64),
    CreateComment(u64),
    UpdateComment(u64),
}

impl Op {
    /// The path template, exactly as in GitHub's OpenAPI description.
    fn template(&self) -> &'static str {
        match self {
            Op::GetRef(_) => "/repos/{owner}/{repo}/git/ref/{ref}",
            Op::GetCommit(_) => "/repos/{owner}/{repo}/commits/{ref}",
            Op::GetTree(_) => "/repos/{owner}/{repo}/git/trees/{tree_sha}",
            Op::GetBlob(_) => "/repos/{owner}/{repo}/git/blobs/{file_sha}",
            Op::Compare(_) => "/repos/{owner}/{repo}/compare/{basehead}",
            Op::CreateStatus(_) => "/repos/{owner}/{repo}/statuses/{sha}",
            Op::ListHooks | Op::CreateHook => "/repos/{owner}/{repo}/hooks",
            Op::GetHook(_) | Op::UpdateHook(_) | Op::DeleteHook(_) => {
                "/repos/{owner}/{repo}/hooks/{hook_id}"
            }
            Op::ListComments(_) | Op::CreateComment(_) => {
                "/repos/{owner}/{repo}/issues/{issue_number}/comments"
            }
            Op::UpdateComment(_) => "/repos/{owner}/{repo}/issues/comments/{comment_id}",
        }
    }
}

struct Route {
    repo: String,
    op: Op,
}

/// Matches decoded segments after `/github`. Parameters GitHub lets span slashes (`ref`,
/// `tree_sha`, `basehead`, `sha`) take the rest of the path.
fn route(method: &Method, segments: &[String]) -> Option<Route> {
    let [repos, owner, name, rest @ ..] = segments else {
        return None;
    };
    if repos != "repos" {
        return None;
    }
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let tail = |s: &[&str]| (!s.is_empty()).then(|| s.join("/"));
    let op = match (method.as_str(), rest.as_slice()) {
        ("GET", ["git", "ref", r @ ..]) => Op::GetRef(tail(r)?),
        ("GET", ["commits", r @ ..]) => Op::GetCommit(tail(r)?),
        ("GET", ["git", "trees", t @ ..]) => Op::GetTree(tail(t)?),
        ("GET", ["git", "blobs", sha]) => Op::GetBlob(sha.to_string()),
        ("GET", ["compare", b @ ..]) => Op::Compare(tail(b)?),
        ("POST", ["statuses", s @ ..]) => Op::CreateStatus(tail(s)?),
        ("GET", ["hooks"]) => Op::ListHooks,
        ("POST", ["hooks"]) => Op::CreateHook,
        ("GET", ["hooks", id]) => Op::GetHook(id.to_string()),
        ("PATCH", ["hooks", id]) => Op::UpdateHook(id.to_string()),
        ("DELETE", ["hooks", id]) => Op::DeleteHook(id.to_string()),
        ("GET", ["issues", n, "comments"]) => Op::ListComments(n.parse().ok()?),
        ("POST", ["issues", n, "comments"]) => Op::CreateComment(n.parse().ok()?),
        ("PATCH", ["issues", "comments", id]) => Op::UpdateComment(id.parse().ok()?),
        _ => return None,
    };
    Some(Route {
        repo: format!("{owner}/{name}"),
        op,
    })
}

/// Answers one request under `/github`; returns the route template and the reply.
pub(super) async fn serve(state: &SimState, req: &Incoming) -> (&'static str, Reply) {
    let route = route(&req.method, &req.segments);
    let template = route.as_ref().map_or(UNKNOWN_ROUTE, |r| r.op.template());
    let token = presented_token(req);
    let reply = answer(state, req, route, token.as_deref())
        .await
        .unwrap_or_else(|e| e);
    (template, finish(state, req, reply, token.as_deref()))
}

/// `Authorization: Bearer <t>` or `Authorization: token <t>`.
fn presented_token(req: &Incoming) -> Option<String> {
    let value = req.header("authorization")?.trim();
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token"))
        .then(|| token.trim().to_string())
}

async fn answer(
    state: &SimState,
    req: &Incoming,
    route: Option<Route>,
    token: Option<&str>,
) -> Result<Reply, Reply> {
    if let Some(fault) = state.interfere(FORGE, req).await {
        return Err(fault_reply(&fault, state));
    }
    let Some(token) = token.filter(|t| *t == state.config.github_token) else {
        return Err(error(StatusCode::UNAUTHORIZED, "Bad credentials"));
    };
    let window = rate_window(state, token, false);
    if window.used >= window.limit {
        return Err(rate_limited(window.reset, window.limit));
    }
    let route = route.ok_or_else(not_found)?;
    let repo = state.repo(&route.repo).ok_or_else(not_found)?;
    let api = Api::new(state, &repo);
    match route.op {
        Op::GetRef(reference) => get_ref(&api, &reference).await,
        Op::GetCommit(reference) => get_commit(&api, req, &reference).await,
        Op::GetTree(tree) => get_tree(&api, req, &tree).await,
        Op::GetBlob(sha) => get_blob(&api, req, &sha).await,
        Op::Compare(basehead) => compare(&api, &basehead).await,
        Op::CreateStatus(sha) => create_status(&api, req, &sha).await,
        Op::ListHooks => list_hooks(&api, req),
        Op::CreateHook => create_hook(&api, req),
        Op::GetHook(id) => {
            let hook = find_hook(&api, &id)?;
            Ok(Reply::json(StatusCode::OK, &hook_json(&api, &hook)))
        }
        Op::UpdateHook(id) => update_hook(&api, req, &id),
        Op::DeleteHook(id) => delete_hook(&api, &id),
        Op::ListComments(n) => {
            let rows = api
                .state
                .list_comments(FORGE, &api.repo.full_name, n)
                .iter()
                .map(|c| comment_json(&api, c))
                .collect();
            Ok(paginated(&api, req, rows))
        }
        Op::CreateComment(n) => {
            let body = comment_body(req)?;
            let c = api.state.add_comment(FORGE, &api.repo.full_name, n, body);
            Ok(Reply::json(StatusCode::CREATED, &comment_json(&api, &c)))
        }
        Op::UpdateComment(id) => {
            let body = comment_body(req)?;
            let c = api
                .state
                .edit_comment(FORGE, &api.repo.full_name, None, id, body)
                .ok_or_else(not_found)?;
            Ok(Reply::json(StatusCode::OK, &comment_json(&api, &c)))
        }
    }
}

/// Conditional GETs, the rate limit headers and GitHub's standard headers.
fn finish(state: &SimState, req: &Incoming, mut reply: Reply, token: Option<&str>) -> Reply {
    if req.method == Method::GET && reply.status == StatusCode::OK {
        // An answer may name its own ETag (the SHA media type's is the commit SHA).
        let etag = reply
            .header("etag")
            .map(str::to_string)
            .unwrap_or_else(|| format!("\"{}\"", hex::encode(Sha256::digest(&reply.body))));
        if matches_etag(req.header("if-none-match"), &etag) {
            reply = Reply::empty(StatusCode::NOT_MODIFIED);
        }
        if !reply.has_header("etag") {
            reply = reply.with_header("etag", etag);
        }
        reply = reply
            .with_header("cache-control", "private, max-age=60, s-maxage=60")
            .with_header("vary", "Accept, Authorization, Cookie, X-GitHub-OTP");
    }
    if !reply.has_header("x-ratelimit-remaining") {
        // A 304 costs nothing: that is what makes conditional polling cheap.
        let spend = reply.status != StatusCode::NOT_MODIFIED;
        let window = rate_window(state, token.unwrap_or(""), spend);
        reply = rate_headers(reply, window);
    }
    reply
        .with_header("x-github-api-version-selected", "2022-11-28")
        .with_header("x-github-media-type", "github.v3; format=json")
        .with_header("x-github-request-id", random_uuid().to_uppercase())
}

/// `If-None-Match` holds the ETag (weak comparison; `*` matches anything).
fn matches_etag(if_none_match: Option<&str>, etag: &str) -> bool {
    if_none_match.is_some_and(|v| {
        v.split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t == etag)
    })
}

/// The token's rate limit window, spending one request from it when `spend`.
fn rate_window(state: &SimState, token: &str, spend: bool) -> RateWindow {
    let now = now_unix();
    let mut windows = lock(&state.rate);
    let fresh = RateWindow {
        used: 0,
        reset: now + RATE_WINDOW_SECS,
        limit: state.github_rate_limit(),
    };
    let window = windows.entry(token.to_string()).or_insert(fresh);
    if now >= window.reset {
        *window = fresh;
    }
    if spend {
        window.used = (window.used + 1).min(window.limit);
    }
    *window
}

fn rate_headers(reply: Reply, window: RateWindow) -> Reply {
    reply
        .with_header("x-ratelimit-limit", window.limit.to_string())
        .with_header(
            "x-ratelimit-remaining",
            (window.limit - window.used).to_string(),
        )
        .with_header("x-ratelimit-reset", window.reset.to_string())
        .with_header("x-ratelimit-used", window.used.to_string())
        .with_header("x-ratelimit-resource", "core")
}

fn error(status: StatusCode, message: &str) -> Reply {
    Reply::json(
        status,
        &json!({
            "message": message,
            "documentation_url": DOCS,
            "status": status.as_u16().to_string(),
        }),
    )
}

fn not_found() -> Reply {
    error(StatusCode::NOT_FOUND, "Not Found")
}

fn server_error(e: GitError) -> Reply {
    tracing::error!(error = %e, "forge simulator: git failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, "Server Error")
}

fn validation_failed(resource: &str, field: Option<&str>, message: &str) -> Reply {
    let mut detail = json!({"resource": resource, "code": "custom", "message": message});
    if let Some(field) = field {
        detail["field"] = field.into();
    }
    Reply::json(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({
            "message": "Validation Failed",
            "errors": [detail],
            "documentation_url": DOCS,
            "status": "422",
        }),
    )
}

fn rate_limited(reset: i64, limit: u64) -> Reply {
    let reply = error(
        StatusCode::FORBIDDEN,
        "API rate limit exceeded for user ID 1. If you reach out to GitHub Support for help, \
         please include the request ID.",
    );
    rate_headers(
        reply,
        RateWindow {
            used: limit,
            reset,
            limit,
        },
    )
}

/// Whole seconds, rounded up: a client told to wait 0 s would retry at once.
pub(super) fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The reply to an injected fault; a rate limit reports the limit the simulator enforces.
fn fault_reply(kind: &FaultKind, state: &SimState) -> Reply {
    match kind {
        FaultKind::RateLimited { reset_after } => rate_limited(
            now_unix() + ceil_secs(*reset_after) as i64,
            state.github_rate_limit(),
        ),
        FaultKind::SecondaryRateLimit { retry_after } => error(
            StatusCode::TOO_MANY_REQUESTS,
            "You have exceeded a secondary rate limit. Please wait a few minutes before you \
             try again.",
        )
        .with_header("retry-after", ceil_secs(*retry_after).to_string()),
        FaultKind::Status(code) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let message = match status.as_u16() {
                500 => "Server Error",
                _ => status.canonical_reason().unwrap_or("Server Error"),
            };
            error(status, message)
        }
        FaultKind::Latency(_) | FaultKind::TruncateTrees => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "Server Error")
        }
    }
}

/// URLs of one repository, as GitHub writes them into bodies.
struct Api<'a> {
    state: &'a SimState,
    repo: &'a RepoEntry,
    /// `{api}/repos/{owner}/{repo}`.
    root: String,
    /// `{web}/{owner}/{repo}`.
    html: String,
}

impl<'a> Api<'a> {
    fn new(state: &'a SimState, repo: &'a RepoEntry) -> Self {
        Self {
            state,
            repo,
            root: format!("{}/github/repos/{}", state.base_url, repo.full_name),
            html: format!("{}/{}", state.base_url, repo.full_name),
        }
    }

    fn git(&self) -> &git::Repo {
        &self.repo.git
    }
}

/// A GraphQL-style node id: opaque to clients, stable for the same object.
pub(super) fn node_id(kind: &str, key: &str) -> String {
    BASE64.encode(format!("{kind}:{key}"))
}

/// A stable positive id for a name (user, repository) the simulator has no database for.
pub(super) fn stable_id(name: &str) -> u64 {
    let digest = Sha256::digest(name.to_ascii_lowercase().as_bytes());
    u64::from_be_bytes([
        0, 0, 0, digest[0], digest[1], digest[2], digest[3], digest[4],
    ])
}

/// The `simple-user` schema for a login.
pub(super) fn user_json(base_url: &str, login: &str) -> Value {
    let api = format!("{base_url}/github/users/{login}");
    json!({
        "login": login,
        "id": stable_id(login),
        "node_id": node_id("User", login),
        "avatar_url": format!("{base_url}/avatars/{login}"),
        "gravatar_id": "",
        "url": api,
        "html_url": format!("{base_url}/{login}"),
        "followers_url": format!("{api}/followers"),
        "following_url": format!("{api}/following{{/other_user}}"),
        "gists_url": format!("{api}/gists{{/gist_id}}"),
        "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{api}/subscriptions"),
        "organizations_url": format!("{api}/orgs"),
        "repos_url": format!("{api}/repos"),
        "events_url": format!("{api}/events{{/privacy}}"),
        "received_events_url": format!("{api}/received_events"),
        "type": "User",
        "user_view_type": "public",
        "site_admin": false,
    })
}

async fn get_ref(api: &Api<'_>, reference: &str) -> Result<Reply, Reply> {
    let full = format!("refs/{reference}");
    let (sha, kind) = api
        .git()
        .show_ref(&full)
        .await
        .map_err(server_error)?
        .ok_or_else(not_found)?;
    Ok(Reply::json(
        StatusCode::OK,
        &json!({
            "ref": full,
            "node_id": node_id("Ref", &format!("{}:{full}", api.repo.full_name)),
            "url": format!("{}/git/refs/{}", api.root, encode_path(reference)),
            "object": {
                "type": kind,
                "sha": sha,
                // `git/commits/{sha}` or, for an annotated tag, `git/tags/{sha}`.
                "url": format!("{}/git/{kind}s/{sha}", api.root),
            },
        }),
    ))
}

/// Media type of `commits/{ref}` answering with the bare commit SHA.
const SHA_MEDIA_TYPE: &str = "application/vnd.github.sha";

/// `commits/{ref}`: a branch, tag or commit SHA resolved to its commit. With `Accept:
/// application/vnd.github.sha` the body is the bare SHA and the ETag is that SHA quoted, so a
/// client sending the SHA it knows as `If-None-Match` gets a 304 (which costs no rate limit)
/// while the ref has not moved. Otherwise the `commit` schema, with no file list.
async fn get_commit(api: &Api<'_>, req: &Incoming, reference: &str) -> Result<Reply, Reply> {
    let git = api.git();
    let mut sha = None;
    for full in [
        format!("refs/heads/{reference}"),
        format!("refs/tags/{reference}"),
    ] {
        if let Some(found) = git.resolve(&full, "commit").await.map_err(server_error)? {
            sha = Some(found);
            break;
        }
    }
    let sha = match sha {
        Some(sha) => sha,
        None => git
            .resolve(reference, "commit")
            .await
            .map_err(server_error)?
            .ok_or_else(|| {
                error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &format!("No commit found for SHA: {reference}"),
                )
            })?,
    };
    let wants_sha = req
        .header("accept")
        .is_some_and(|a| a.split(',').any(|t| t.trim().starts_with(SHA_MEDIA_TYPE)));
    if wants_sha {
        return Ok(Reply::bytes(
            StatusCode::OK,
            "application/vnd.github.sha; charset=utf-8",
            sha.clone().into_bytes(),
        )
        .with_header("etag", format!("\"{sha}\"")));
    }
    let info = git
        .commit(&sha)
        .await
        .map_err(server_error)?
        .ok_or_else(not_found)?;
    let mut body = commit_json(api, &info);
    body["stats"] = json!({"additions": 0, "deletions": 0, "total": 0});
    body["files"] = json!([]);
    Ok(Reply::json(StatusCode::OK, &body))
}

fn tree_entry_json(api: &Api<'_>, e: &TreeEntry) -> Value {
    let mut v = json!({"path": e.path, "mode": e.mode, "type": e.kind, "sha": e.sha});
    match e.kind.as_str() {
        "blob" => {
            v["size"] = e.size.unwrap_or(0).into();
            v["url"] = format!("{}/git/blobs/{}", api.root, e.sha).into();
        }
        "tree" => v["url"] = format!("{}/git/trees/{}", api.root, e.sha).into(),
        // Submodules (`commit`) carry neither size nor url.
        _ => {}
    }
    v
}

async fn get_tree(api: &Api<'_>, req: &Incoming, tree_sha: &str) -> Result<Reply, Reply> {
    // Any non-empty value asks for a recursive listing, even "0" or "false".
    let recursive = req.param("recursive").is_some_and(|v| !v.is_empty());
    let tree = api
        .git()
        .resolve(tree_sha, "tree")
        .await
        .map_err(server_error)?
        .ok_or_else(not_found)?;
    let forced_truncation = recursive
        && api
            .state
            .take_fault(FORGE, &req.target(), |k| {
                matches!(k, FaultKind::TruncateTrees)
            })
            .is_some();
    let mut entries = api
        .git()
        .ls_tree(&tree, recursive && !forced_truncation)
        .await
        .map_err(server_error)?;
    let mut truncated = forced_truncation;
    if entries.len() > TREE_ENTRY_LIMIT {
        entries.truncate(TREE_ENTRY_LIMIT);
        truncated = true;
    }
    let tree_json: Vec<Value> = entries.iter().map(|e| tree_entry_json(api, e)).collect();
    Ok(Reply::json(
        StatusCode::OK,
        &json!({
            "sha": tree,
            "url": format!("{}/git/trees/{tree}", api.root),
            "tree": tree_json,
            "truncated": truncated,
        }),
    ))
}

/// Base64 in lines of 60 characters, each ending in a newline, as GitHub sends blobs.
fn base64_lines(bytes: &[u8]) -> String {
    let encoded = BASE64.encode(bytes);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 60 + 1);
    for (i, c) in encoded.chars().enumerate() {
        out.push(c);
        if i % 60 == 59 {
            out.push('\n');
        }
    }
    if !encoded.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

async fn get_blob(api: &Api<'_>, req: &Incoming, sha: &str) -> Result<Reply, Reply> {
    let (full, bytes) = api
        .git()
        .blob(sha)
        .await
        .map_err(server_error)?
        .ok_or_else(not_found)?;
    // `Accept: application/vnd.github.raw+json` asks for the bytes themselves.
    let wants_raw = req.headers.get_all("accept").any(|v| {
        v.to_str()
            .is_ok_and(|a| a.contains("application/vnd.github.raw"))
    });
    if wants_raw {
        return Ok(Reply::bytes(
            StatusCode::OK,
            "application/vnd.github.raw",
            bytes,
        ));
    }
    Ok(Reply::json(
        StatusCode::OK,
        &json!({
            "sha": full,
            "node_id": node_id("Blob", &format!("{}:{full}", api.repo.full_name)),
            "size": bytes.len(),
            "url": format!("{}/git/blobs/{full}", api.root),
            "content": base64_lines(&bytes),
            "encoding": "base64",
        }),
    ))
}

/// The `commit` schema.
fn commit_json(api: &Api<'_>, c: &CommitInfo) -> Value {
    let sha = &c.sha;
    let person =
        |s: &git::Signature| json!({"name": s.name, "email": s.email, "date": rfc3339(s.time)});
    let parents: Vec<Value> = c
        .parents
        .iter()
        .map(|p| {
            json!({
                "sha": p,
                "url": format!("{}/commits/{p}", api.root),
                "html_url": format!("{}/commit/{p}", api.html),
            })
        })
        .collect();
    json!({
        "url": format!("{}/commits/{sha}", api.root),
        "sha": sha,
        "node_id": node_id("Commit", &format!("{}:{sha}", api.repo.full_name)),
        "html_url": format!("{}/commit/{sha}", api.html),
        "comments_url": format!("{}/commits/{sha}/comments", api.root),
        "commit": {
            "url": format!("{}/git/commits/{sha}", api.root),
            "author": person(&c.author),
            "committer": person(&c.committer),
            "message": c.message,
            "comment_count": 0,
            "tree": {"sha": c.tree, "url": format!("{}/git/trees/{}", api.root, c.tree)},
            "verification": {
                "verified": false,
                "reason": "unsigned",
                "signature": null,
                "payload": null,
                "verified_at": null,
            },
        },
        // The commit emails belong to no GitHub account.
        "author": null,
        "committer": null,
        "parents": parents,
    })
}

/// The `diff-entry` schema.
fn file_json(api: &Api<'_>, head: &str, f: &FileChange) -> Value {
    let status = match f.status {
        'A' => "added",
        'D' => "removed",
        'M' => "modified",
        _ => "changed",
    };
    let (additions, deletions) = (f.additions.unwrap_or(0), f.deletions.unwrap_or(0));
    let blob_sha = if f.status == 'D' {
        &f.old_sha
    } else {
        &f.new_sha
    };
    let path = encode_path(&f.path);
    json!({
        "sha": blob_sha,
        "filename": f.path,
        "status": status,
        "additions": additions,
        "deletions": deletions,
        "changes": additions + deletions,
        "blob_url": format!("{}/blob/{head}/{path}", api.html),
        "raw_url": format!("{}/raw/{head}/{path}", api.html),
        "contents_url": format!("{}/contents/{path}?ref={head}", api.root),
    })
}

async fn compare(api: &Api<'_>, basehead: &str) -> Result<Reply, Reply> {
    let (base, head) = basehead.split_once("...").ok_or_else(not_found)?;
    // `USER:branch` names a branch of a fork; the simulator only has the repository itself.
    let strip_owner = |s: &'_ str| s.rsplit_once(':').map_or(s, |(_, b)| b).to_string();
    let (base, head) = (strip_owner(base), strip_owner(head));
    let git = api.git();
    let resolve = |rev: String| async move {
        git.resolve(&rev, "commit")
            .await
            .map_err(server_error)?
            .ok_or_else(not_found)
    };
    // Independent git calls at once: the simulator's own latency is not driftless's.
    let (base_sha, head_sha) = tokio::try_join!(resolve(base.clone()), resolve(head.clone()))?;
    let (merge_base, ahead_by, behind_by, commits, base_commit) = tokio::try_join!(
        async {
            git.merge_base(&[&base_sha, &head_sha])
                .await
                .map_err(server_error)?
                .ok_or_else(|| {
                    error(
                        StatusCode::NOT_FOUND,
                        &format!("No common ancestor between {base} and {head}."),
                    )
                })
        },
        async {
            git.count(&format!("{base_sha}..{head_sha}"))
                .await
                .map_err(server_error)
        },
        async {
            git.count(&format!("{head_sha}..{base_sha}"))
                .await
                .map_err(server_error)
        },
        async {
            git.log(&[
                "--reverse",
                &format!("--max-count={COMPARE_COMMIT_LIMIT}"),
                &format!("{base_sha}..{head_sha}"),
            ])
            .await
            .map_err(server_error)
        },
        async {
            git.commit(&base_sha)
                .await
                .map_err(server_error)?
                .ok_or_else(not_found)
        },
    )?;
    let status = match (ahead_by, behind_by) {
        (0, 0) => "identical",
        (_, 0) => "ahead",
        (0, _) => "behind",
        _ => "diverged",
    };
    let (merge_base_commit, mut files) = tokio::try_join!(
        async {
            git.commit(&merge_base)
                .await
                .map_err(server_error)?
                .ok_or_else(not_found)
        },
        async {
            git.diff(Some(&merge_base), &head_sha)
                .await
                .map_err(server_error)
        },
    )?;
    files.truncate(COMPARE_FILE_LIMIT);
    let owner = api.repo.full_name.split('/').next().unwrap_or_default();
    let html_url = format!("{}/compare/{}", api.html, encode_path(basehead));
    Ok(Reply::json(
        StatusCode::OK,
        &json!({
            "url": format!("{}/compare/{}", api.root, encode_path(basehead)),
            "html_url": html_url,
            "permalink_url": format!(
                "{}/compare/{owner}:{base_sha}...{owner}:{head_sha}", api.html
            ),
            "diff_url": format!("{html_url}.diff"),
            "patch_url": format!("{html_url}.patch"),
            "base_commit": commit_json(api, &base_commit),
            "merge_base_commit": commit_json(api, &merge_base_commit),
            "status": status,
            "ahead_by": ahead_by,
            "behind_by": behind_by,
            "total_commits": ahead_by,
            "commits": commits.iter().map(|c| commit_json(api, c)).collect::<Vec<_>>(),
            "files": files.iter().map(|f| file_json(api, &head_sha, f)).collect::<Vec<_>>(),
        }),
    ))
}

fn parse_json_body(req: &Incoming) -> Result<Value, Reply> {
    if req.body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&req.body)
        .map_err(|_| error(StatusCode::BAD_REQUEST, "Problems parsing JSON"))
}

fn optional_string(body: &Value, key: &str) -> Option<String> {
    body.get(key).and_then(Value::as_str).map(str::to_string)
}

async fn create_status(api: &Api<'_>, req: &Incoming, sha: &str) -> Result<Reply, Reply> {
    let body = parse_json_body(req)?;
    let state = match body.get("state").and_then(Value::as_str) {
        Some(s @ ("error" | "failure" | "pending" | "success")) => s.to_string(),
        _ => {
            return Err(validation_failed(
                "Status",
                Some("state"),
                "state is not included in the list",
            ))
        }
    };
    let no_commit = || {
        Reply::json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({
                "message": format!("No commit found for SHA: {sha}"),
                "documentation_url": DOCS,
                "status": "422",
            }),
        )
    };
    if !git::is_hex(sha) {
        return Err(no_commit());
    }
    let full = api
        .git()
        .resolve(sha, "commit")
        .await
        .map_err(server_error)?
        .ok_or_else(no_commit)?;
    let context = optional_string(&body, "context").unwrap_or_else(|| "default".to_string());
    let description = optional_string(&body, "description");
    let target_url = optional_string(&body, "target_url");
    let id = api.state.next_id();
    api.state.record_status(
        &api.repo.full_name,
        RecordedStatus {
            forge: FORGE,
            sha: full.clone(),
            state: state.clone(),
            context: context.clone(),
            description: description.clone(),
            target_url: target_url.clone(),
        },
    );
    let now = rfc3339(now_unix());
    let url = format!("{}/statuses/{full}", api.root);
    let base = &api.state.base_url;
    Ok(Reply::json(
        StatusCode::CREATED,
        &json!({
            "url": url,
            "avatar_url": format!("{base}/avatars/{SIM_LOGIN}"),
            "id": id,
            "node_id": node_id("StatusContext", &id.to_string()),
            "state": state,
            "description": description,
            "target_url": target_url,
            "context": context,
            "created_at": now,
            "updated_at": now,
            "creator": user_json(base, SIM_LOGIN),
        }),
    )
    .with_header("location", url))
}

/// The `hook` schema; a set secret is shown masked, never as set.
fn hook_json(api: &Api<'_>, h: &StoredHook) -> Value {
    let mut config = json!({
        "content_type": h.content_type.as_deref().unwrap_or("form"),
        "insecure_ssl": if h.verify_tls { "0" } else { "1" },
        "url": h.url,
    });
    if h.secret.is_some() {
        config["secret"] = "********".into();
    }
    let url = format!("{}/hooks/{}", api.root, h.id);
    json!({
        "type": "Repository",
        "id": h.id,
        "name": "web",
        "active": h.active,
        "events": h.events,
        "config": config,
        "updated_at": rfc3339(h.updated_at),
        "created_at": rfc3339(h.created_at),
        "url": url,
        "test_url": format!("{url}/test"),
        "ping_url": format!("{url}/pings"),
        "deliveries_url": format!("{url}/deliveries"),
        "last_response": {"code": null, "status": "unused", "message": null},
    })
}

fn list_hooks(api: &Api<'_>, req: &Incoming) -> Result<Reply, Reply> {
    let key = repo_key(&api.repo.full_name);
    let hooks: Vec<Value> = lock(&api.state.hooks)
        .iter()
        .filter(|h| h.repo == key)
        .map(|h| hook_json(api, h))
        .collect();
    Ok(paginated(api, req, hooks))
}

/// One page of `rows` (`per_page`, at most 100, and `page`), with GitHub's `Link` header.
fn paginated(api: &Api<'_>, req: &Incoming, rows: Vec<Value>) -> Reply {
    let per_page = req
        .param("per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(30)
        .clamp(1, 100);
    let page = req
        .param("page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let last = rows.len().div_ceil(per_page).max(1);
    let body: Vec<Value> = rows
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let mut reply = Reply::json(StatusCode::OK, &Value::Array(body));
    let link = |p: usize, rel: &str| {
        let url = page_url(&api.state.base_url, req, &[("page", p.to_string())]);
        format!("<{url}>; rel=\"{rel}\"")
    };
    let mut links = Vec::new();
    if page > 1 {
        links.push(link(page - 1, "prev"));
    }
    if page < last {
        links.push(link(page + 1, "next"));
        links.push(link(last, "last"));
    }
    if page > 1 {
        links.push(link(1, "first"));
    }
    if !links.is_empty() {
        reply = reply.with_header("link", links.join(", "));
    }
    reply
}

/// The longest comment body GitHub accepts, in characters.
const COMMENT_LIMIT: usize = 65_536;

/// A comment's `body`, refused as GitHub does: missing (422 `missing_field`) or over
/// [`COMMENT_LIMIT`] characters (422 naming the limit).
fn comment_body(req: &Incoming) -> Result<String, Reply> {
    let body = parse_json_body(req)?;
    let Some(text) = optional_string(&body, "body") else {
        return Err(validation_failed(
            "IssueComment",
            Some("body"),
            "body wasn't supplied.",
        ));
    };
    if text.chars().count() > COMMENT_LIMIT {
        return Err(validation_failed(
            "IssueComment",
            Some("body"),
            &format!("body is too long (maximum is {COMMENT_LIMIT} characters)"),
        ));
    }
    Ok(text)
}

/// The `issue-comment` schema.
fn comment_json(api: &Api<'_>, c: &StoredComment) -> Value {
    json!({
        "id": c.id,
        "node_id": node_id("IssueComment", &c.id.to_string()),
        "url": format!("{}/issues/comments/{}", api.root, c.id),
        "html_url": format!("{}/pull/{}#issuecomment-{}", api.html, c.number, c.id),
        "issue_url": format!("{}/issues/{}", api.root, c.number),
        "body": c.body,
        "user": user_json(&api.state.base_url, SIM_LOGIN),
        "created_at": rfc3339(c.created_at),
        "updated_at": rfc3339(c.updated_at),
        "author_association": "OWNER",
    })
}

/// `insecure_ssl` as a string (`"0"`, `"1"`) or a number.
fn insecure_ssl(value: &Value) -> Option<bool> {
    match value {
        Value::String(s) => Some(s.trim() != "0"),
        Value::Number(n) => Some(n.as_f64() != Some(0.0)),
        _ => None,
    }
}

fn string_list(value: Option<&Value>) -> Option<Vec<String>> {
    value.and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    })
}

/// Applies `config` keys present in a create or update body.
fn apply_config(hook: &mut StoredHook, config: &Value) {
    if let Some(url) = config.get("url").and_then(Value::as_str) {
        hook.url = url.to_string();
    }
    if let Some(ct) = config.get("content_type").and_then(Value::as_str) {
        hook.content_type = Some(ct.to_string());
    }
    if let Some(secret) = config.get("secret").and_then(Value::as_str) {
        // An empty secret removes it, as on GitHub.
        hook.secret = (!secret.is_empty()).then(|| secret.to_string());
    }
    if let Some(insecure) = config.get("insecure_ssl").and_then(insecure_ssl) {
        hook.verify_tls = !insecure;
    }
}

fn create_hook(api: &Api<'_>, req: &Incoming) -> Result<Reply, Reply> {
    let body = parse_json_body(req)?;
    if body
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n != "web")
    {
        return Err(validation_failed(
            "Hook",
            Some("name"),
            "Name must be \"web\" for repository webhooks",
        ));
    }
    let config = body.get("config").cloned().unwrap_or_else(|| json!({}));
    if config.get("url").and_then(Value::as_str).is_none() {
        return Err(validation_failed(
            "Hook",
            None,
            "Config must contain URL for webhooks",
        ));
    }
    let now = now_unix();
    let mut hook = StoredHook {
        repo: repo_key(&api.repo.full_name),
        id: api.state.next_id(),
        url: String::new(),
        events: string_list(body.get("events")).unwrap_or_else(|| vec!["push".to_string()]),
        secret: None,
        content_type: Some("form".to_string()),
        verify_tls: true,
        active: body.get("active").and_then(Value::as_bool).unwrap_or(true),
        branch_filter: String::new(),
        name: "web".to_string(),
        description: String::new(),
        created_at: now,
        updated_at: now,
    };
    apply_config(&mut hook, &config);
    let mut hooks = lock(&api.state.hooks);
    if hooks
        .iter()
        .any(|h| h.repo == hook.repo && h.url == hook.url)
    {
        return Err(validation_failed(
            "Hook",
            None,
            "Hook already exists on this repository",
        ));
    }
    hooks.push(hook.clone());
    drop(hooks);
    let json = hook_json(api, &hook);
    let location = format!("{}/hooks/{}", api.root, hook.id);
    Ok(Reply::json(StatusCode::CREATED, &json).with_header("location", location))
}

fn find_hook(api: &Api<'_>, id: &str) -> Result<StoredHook, Reply> {
    let key = repo_key(&api.repo.full_name);
    let id: u64 = id.parse().map_err(|_| not_found())?;
    lock(&api.state.hooks)
        .iter()
        .find(|h| h.repo == key && h.id == id)
        .cloned()
        .ok_or_else(not_found)
}

fn update_hook(api: &Api<'_>, req: &Incoming, id: &str) -> Result<Reply, Reply> {
    let body = parse_json_body(req)?;
    let found = find_hook(api, id)?;
    let mut hooks = lock(&api.state.hooks);
    let hook = hooks
        .iter_mut()
        .find(|h| h.id == found.id)
        .ok_or_else(not_found)?;
    if let Some(config) = body.get("config") {
        apply_config(hook, config);
    }
    if let Some(events) = string_list(body.get("events")) {
        hook.events = events;
    }
    for event in string_list(body.get("add_events")).unwrap_or_default() {
        if !hook.events.contains(&event) {
            hook.events.push(event);
        }
    }
    let remove = string_list(body.get("remove_events")).unwrap_or_default();
    hook.events.retain(|e| !remove.contains(e));
    if let Some(active) = body.get("active").and_then(Value::as_bool) {
        hook.active = active;
    }
    hook.updated_at = now_unix();
    let updated = hook.clone();
    drop(hooks);
    Ok(Reply::json(StatusCode::OK, &hook_json(api, &updated)))
}

fn delete_hook(api: &Api<'_>, id: &str) -> Result<Reply, Reply> {
    let found = find_hook(api, id)?;
    lock(&api.state.hooks).retain(|h| h.id != found.id);
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(path: &str) -> Vec<String> {
        path.split('/').map(str::to_string).collect()
    }

    #[test]
    fn routes_and_templates() {
        let r = route(&Method::GET, &segments("repos/a/b/git/ref/heads/feature/x")).unwrap();
        assert_eq!(r.repo, "a/b");
        assert!(matches!(&r.op, Op::GetRef(x) if x == "heads/feature/x"));
        assert_eq!(r.op.template(), "/repos/{owner}/{repo}/git/ref/{ref}");
        let r = route(&Method::PATCH, &segments("repos/a/b/hooks/7")).unwrap();
        assert_eq!(r.op.template(), "/repos/{owner}/{repo}/hooks/{hook_id}");
        assert!(route(&Method::PUT, &segments("repos/a/b/hooks/7")).is_none());
        assert!(route(&Method::GET, &segments("repos/a/b/git/blobs/x/y")).is_none());
        assert!(route(&Method::GET, &segments("users/a")).is_none());
    }

    #[test]
    fn blob_content_is_wrapped_at_60_columns() {
        let text = base64_lines(&[7u8; 100]);
        let lengths: Vec<usize> = text.split_terminator('\n').map(str::len).collect();
        assert_eq!(lengths, [60, 60, 16]);
        assert!(text.ends_with('\n'));
        assert_eq!(base64_lines(b""), "");
    }

    #[test]
    fn etag_comparison_is_weak() {
        assert!(matches_etag(Some("W/\"abc\", \"def\""), "\"abc\""));
        assert!(matches_etag(Some("*"), "\"abc\""));
        assert!(!matches_etag(Some("\"abd\""), "\"abc\""));
        assert!(!matches_etag(None, "\"abc\""));
    }

    #[test]
    fn token_schemes() {
        let with = |v: &str| {
            let mut headers = actix_web::http::header::HeaderMap::new();
            headers.insert(actix_web::http::header::AUTHORIZATION, v.parse().unwrap());
            Incoming::new(
                Method::GET,
                String::new(),
                String::new(),
                "",
                headers,
                bytes::Bytes::new(),
            )
        };
        assert_eq!(presented_token(&with("Bearer t1")).as_deref(), Some("t1"));
        assert_eq!(presented_token(&with("token t2")).as_deref(), Some("t2"));
        assert_eq!(presented_token(&with("Basic eHg6eXk=")), None);
    }
}
