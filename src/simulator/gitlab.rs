//! The GitLab REST API v4 as the simulator speaks it: branches, repository trees (offset and
//! keyset pagination), raw blobs, merge bases, commit statuses and project webhooks, with
//! GitLab's shapes, status codes, pagination headers and error bodies. A project is named by
//! its numeric id or its URL-encoded path (`acme%2Fplatform%2Fdeploy`), matched on the raw
//! request path so an encoded slash never splits it.

use super::wire::rfc3339;
use actix_web::http::header::HttpDate;
use actix_web::http::{Method, StatusCode};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::git::{self, CommitInfo, GitError};
use super::github::ceil_secs;
use super::requests::StoredComment;
use super::wire::{
    encode_path, now_unix, page_url, parse_query, random_uuid, rfc3339_millis, Incoming, Reply,
};
use super::{
    lock, repo_key, FaultKind, RecordedStatus, RepoEntry, SimState, StoredHook, UNKNOWN_ROUTE,
};

const FORGE: &str = "gitlab";
const DEFAULT_PER_PAGE: usize = 20;
const MAX_PER_PAGE: usize = 100;
/// GitLab.com's authenticated API limit per minute, shown in `RateLimit-Limit`.
const RATE_LIMIT_PER_MINUTE: u64 = 2000;
/// The hook flags GitLab accepts and returns, each `<event>_events`.
const HOOK_EVENTS: &[&str] = &[
    "push",
    "tag_push",
    "issues",
    "confidential_issues",
    "merge_requests",
    "note",
    "confidential_note",
    "job",
    "pipeline",
    "wiki_page",
    "deployment",
    "releases",
    "milestone",
    "feature_flag",
    "emoji",
    "resource_access_token",
    "member",
    "repository_update",
];

/// An endpoint, with its path parameters after `/projects/:id`.
enum Op {
    Branch(String),
    Tree,
    BlobRaw(String),
    MergeBase,
    CreateStatus(String),
    ListHooks,
    CreateHook,
    GetHook(String),
    UpdateHook(String),
    DeleteHook(String),
    Compare,
    ListNotes(u64),
    CreateNote(u64),
    UpdateNote(u64, u64),
}

impl Op {
    /// The path template, as GitLab's API documentation writes it.
    fn template(&self) -> &'static str {
        match self {
            Op::Branch(_) => "/projects/:id/repository/branches/:branch",
            Op::Tree => "/projects/:id/repository/tree",
            Op::BlobRaw(_) => "/projects/:id/repository/blobs/:sha/raw",
            Op::MergeBase => "/projects/:id/repository/merge_base",
            Op::CreateStatus(_) => "/projects/:id/statuses/:sha",
            Op::ListHooks | Op::CreateHook => "/projects/:id/hooks",
            Op::GetHook(_) | Op::UpdateHook(_) | Op::DeleteHook(_) => {
                "/projects/:id/hooks/:hook_id"
            }
            Op::Compare => "/projects/:id/repository/compare",
            Op::ListNotes(_) | Op::CreateNote(_) => {
                "/projects/:id/merge_requests/:merge_request_iid/notes"
            }
            Op::UpdateNote(..) => "/projects/:id/merge_requests/:merge_request_iid/notes/:note_id",
        }
    }
}

struct Route {
    /// A numeric id or a decoded `path_with_namespace`.
    project: String,
    op: Op,
}

fn route(method: &Method, segments: &[String]) -> Option<Route> {
    let [projects, project, rest @ ..] = segments else {
        return None;
    };
    if projects != "projects" {
        return None;
    }
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let op = match (method.as_str(), rest.as_slice()) {
        // A branch name should arrive with its slashes encoded; accept them raw as well.
        ("GET", ["repository", "branches", b @ ..]) if !b.is_empty() => Op::Branch(b.join("/")),
        ("GET", ["repository", "tree"]) => Op::Tree,
        ("GET", ["repository", "blobs", sha, "raw"]) => Op::BlobRaw(sha.to_string()),
        ("GET", ["repository", "merge_base"]) => Op::MergeBase,
        ("POST", ["statuses", sha]) => Op::CreateStatus(sha.to_string()),
        ("GET", ["hooks"]) => Op::ListHooks,
        ("POST", ["hooks"]) => Op::CreateHook,
        ("GET", ["hooks", id]) => Op::GetHook(id.to_string()),
        ("PUT", ["hooks", id]) => Op::UpdateHook(id.to_string()),
        ("DELETE", ["hooks", id]) => Op::DeleteHook(id.to_string()),
        ("GET", ["repository", "compare"]) => Op::Compare,
        ("GET", ["merge_requests", iid, "notes"]) => Op::ListNotes(iid.parse().ok()?),
        ("POST", ["merge_requests", iid, "notes"]) => Op::CreateNote(iid.parse().ok()?),
        ("PUT", ["merge_requests", iid, "notes", id]) => {
            Op::UpdateNote(iid.parse().ok()?, id.parse().ok()?)
        }
        _ => return None,
    };
    Some(Route {
        project: project.clone(),
        op,
    })
}

/// Answers one request under `/gitlab/api/v4`; returns the route template and the reply.
pub(super) async fn serve(state: &SimState, req: &Incoming) -> (&'static str, Reply) {
    let route = route(&req.method, &req.segments);
    let template = route.as_ref().map_or(UNKNOWN_ROUTE, |r| r.op.template());
    let reply = answer(state, req, route).await.unwrap_or_else(|e| e);
    (template, reply.with_header("x-request-id", random_uuid()))
}

async fn answer(state: &SimState, req: &Incoming, route: Option<Route>) -> Result<Reply, Reply> {
    if let Some(fault) = state.interfere(FORGE, req).await {
        return Err(fault_reply(&fault));
    }
    if !authorized(state, req) {
        return Err(message(StatusCode::UNAUTHORIZED, "401 Unauthorized"));
    }
    let route = route
        .ok_or_else(|| Reply::json(StatusCode::NOT_FOUND, &json!({"error": "404 Not Found"})))?;
    let repo = project(state, &route.project)
        .ok_or_else(|| message(StatusCode::NOT_FOUND, "404 Project Not Found"))?;
    let p = Project::new(state, &repo);
    match route.op {
        Op::Branch(name) => branch(&p, &name).await,
        Op::Tree => tree(&p, req).await,
        Op::BlobRaw(sha) => blob_raw(&p, &sha).await,
        Op::MergeBase => merge_base(&p, req).await,
        Op::CreateStatus(sha) => create_status(&p, req, &sha).await,
        Op::ListHooks => {
            let key = repo_key(&repo.full_name);
            let hooks: Vec<Value> = lock(&state.hooks)
                .iter()
                .filter(|h| h.repo == key)
                .map(|h| hook_json(&p, h))
                .collect();
            Ok(paginate_offset(&p, req, hooks))
        }
        Op::CreateHook => create_hook(&p, req),
        Op::GetHook(id) => {
            let hook = find_hook(&p, &id)?;
            Ok(Reply::json(StatusCode::OK, &hook_json(&p, &hook)))
        }
        Op::UpdateHook(id) => update_hook(&p, req, &id),
        Op::DeleteHook(id) => {
            let hook = find_hook(&p, &id)?;
            lock(&state.hooks).retain(|h| h.id != hook.id);
            Ok(Reply::empty(StatusCode::NO_CONTENT))
        }
        Op::Compare => compare(&p, req).await,
        Op::ListNotes(iid) => {
            let rows = state
                .list_comments(FORGE, &repo.full_name, iid)
                .iter()
                .map(|n| note_json(&p, n))
                .collect();
            Ok(paginate_offset(&p, req, rows))
        }
        Op::CreateNote(iid) => {
            let body = note_body(req)?;
            let n = state.add_comment(FORGE, &repo.full_name, iid, body);
            Ok(Reply::json(StatusCode::CREATED, &note_json(&p, &n)))
        }
        Op::UpdateNote(iid, id) => {
            let body = note_body(req)?;
            let n = state
                .edit_comment(FORGE, &repo.full_name, Some(iid), id, body)
                .ok_or_else(|| message(StatusCode::NOT_FOUND, "404 Not found"))?;
            Ok(Reply::json(StatusCode::OK, &note_json(&p, &n)))
        }
    }
}

/// `PRIVATE-TOKEN: <t>`, or `Authorization: Bearer <t>` as GitLab also accepts.
fn authorized(state: &SimState, req: &Incoming) -> bool {
    let expected = state.config.gitlab_token.as_str();
    req.header("private-token").is_some_and(|t| t == expected)
        || req
            .header("authorization")
            .and_then(|v| v.split_once(' '))
            .is_some_and(|(scheme, t)| {
                scheme.eq_ignore_ascii_case("bearer") && t.trim() == expected
            })
}

fn project(state: &SimState, id: &str) -> Option<RepoEntry> {
    match id.parse::<u64>() {
        Ok(n) => state.repo_by_project_id(n),
        Err(_) => state.repo(id),
    }
}

/// GitLab's `{"message": ...}` error body.
fn message(status: StatusCode, text: &str) -> Reply {
    Reply::json(status, &json!({"message": text}))
}

/// GitLab's parameter validation body, `{"error": "<param> is missing"}`.
fn bad_request(text: &str) -> Reply {
    Reply::json(StatusCode::BAD_REQUEST, &json!({"error": text}))
}

fn server_error(e: GitError) -> Reply {
    tracing::error!(error = %e, "forge simulator: git failed");
    message(
        StatusCode::INTERNAL_SERVER_ERROR,
        "500 Internal Server Error",
    )
}

fn fault_reply(kind: &FaultKind) -> Reply {
    // GitLab's rate limiter (Rack::Attack) answers in plain text.
    let throttled = |secs: u64| {
        Reply::bytes(
            StatusCode::TOO_MANY_REQUESTS,
            "text/plain; charset=utf-8",
            b"Retry later\n".to_vec(),
        )
        .with_header("retry-after", secs.to_string())
    };
    match kind {
        FaultKind::RateLimited { reset_after } => {
            let secs = ceil_secs(*reset_after);
            let reset = now_unix() + secs as i64;
            let reset_time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(reset as u64);
            throttled(secs)
                .with_header("ratelimit-name", "throttle_authenticated_api")
                .with_header("ratelimit-limit", RATE_LIMIT_PER_MINUTE.to_string())
                .with_header(
                    "ratelimit-observed",
                    (RATE_LIMIT_PER_MINUTE + 1).to_string(),
                )
                .with_header("ratelimit-remaining", "0")
                .with_header("ratelimit-reset", reset.to_string())
                .with_header(
                    "ratelimit-resettime",
                    HttpDate::from(reset_time).to_string(),
                )
        }
        FaultKind::SecondaryRateLimit { retry_after } => throttled(ceil_secs(*retry_after)),
        FaultKind::Status(code) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reason = status.canonical_reason().unwrap_or("Error");
            message(status, &format!("{} {reason}", status.as_u16()))
        }
        FaultKind::Latency(_) | FaultKind::TruncateTrees => message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "500 Internal Server Error",
        ),
    }
}

/// One project and the URLs GitLab writes for it.
struct Project<'a> {
    state: &'a SimState,
    repo: &'a RepoEntry,
    /// `{web}/{path_with_namespace}`.
    web: String,
}

impl<'a> Project<'a> {
    fn new(state: &'a SimState, repo: &'a RepoEntry) -> Self {
        Self {
            state,
            repo,
            web: format!("{}/gitlab/{}", state.base_url, repo.full_name),
        }
    }

    fn git(&self) -> &git::Repo {
        &self.repo.git
    }
}

/// GitLab's commit entity.
fn commit_json(p: &Project<'_>, c: &CommitInfo) -> Value {
    json!({
        "id": c.sha,
        "short_id": c.sha.get(..8).unwrap_or(&c.sha),
        "created_at": c.committer.iso,
        "parent_ids": c.parents,
        "title": c.title(),
        "message": c.message,
        "author_name": c.author.name,
        "author_email": c.author.email,
        "authored_date": c.author.iso,
        "committer_name": c.committer.name,
        "committer_email": c.committer.email,
        "committed_date": c.committer.iso,
        "trailers": {},
        "extended_trailers": {},
        "web_url": format!("{}/-/commit/{}", p.web, c.sha),
    })
}

async fn branch(p: &Project<'_>, name: &str) -> Result<Reply, Reply> {
    let git = p.git();
    let missing = || message(StatusCode::NOT_FOUND, "404 Branch Not Found");
    let (sha, _) = git
        .show_ref(&format!("refs/heads/{name}"))
        .await
        .map_err(server_error)?
        .ok_or_else(missing)?;
    let commit = git
        .commit(&sha)
        .await
        .map_err(server_error)?
        .ok_or_else(missing)?;
    let default = git.default_branch().await.map_err(server_error)?;
    let is_default = default.as_deref() == Some(name);
    let merged = match &default {
        Some(d) if !is_default => git
            .is_ancestor(&sha, &format!("refs/heads/{d}"))
            .await
            .map_err(server_error)?,
        _ => false,
    };
    Ok(Reply::json(
        StatusCode::OK,
        &json!({
            "name": name,
            "commit": commit_json(p, &commit),
            "merged": merged,
            // GitLab protects the default branch of a new project.
            "protected": is_default,
            "developers_can_push": false,
            "developers_can_merge": false,
            "can_push": true,
            "default": is_default,
            "web_url": format!("{}/-/tree/{}", p.web, encode_path(name)),
        }),
    ))
}

/// A GitLab boolean parameter (`true`/`false`, `1`/`0`); `Err` names the parameter.
fn boolean(value: Option<&str>, name: &str) -> Result<Option<bool>, Reply> {
    match value.map(str::trim) {
        None => Ok(None),
        Some("true" | "1" | "t" | "yes") => Ok(Some(true)),
        Some("false" | "0" | "f" | "no") => Ok(Some(false)),
        Some(_) => Err(bad_request(&format!("{name} is invalid"))),
    }
}

fn per_page(req: &Incoming) -> usize {
    req.param("per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_PER_PAGE)
        .min(MAX_PER_PAGE)
}

/// The keyset cursor: opaque to clients, who follow the `Link` header; here the path of the
/// last entry served.
fn page_token(path: &str) -> String {
    URL_SAFE_NO_PAD.encode(json!({"file_name": path}).to_string())
}

fn page_token_path(token: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(token.trim()).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.get("file_name")?.as_str().map(str::to_string)
}

async fn tree(p: &Project<'_>, req: &Incoming) -> Result<Reply, Reply> {
    let git = p.git();
    let recursive = boolean(req.param("recursive"), "recursive")?.unwrap_or(false);
    let reference = match req.param("ref").filter(|r| !r.is_empty()) {
        Some(r) => r.to_string(),
        None => git
            .default_branch()
            .await
            .map_err(server_error)?
            .unwrap_or_else(|| "HEAD".to_string()),
    };
    let dir = req
        .param("path")
        .unwrap_or("")
        .trim_matches('/')
        .to_string();
    let spec = if dir.is_empty() {
        reference
    } else {
        format!("{reference}:{dir}")
    };
    let not_found = || message(StatusCode::NOT_FOUND, "404 Tree Not Found");
    let tree = git
        .resolve(&spec, "tree")
        .await
        .map_err(server_error)?
        .ok_or_else(not_found)?;
    let mut entries = git.ls_tree(&tree, recursive).await.map_err(server_error)?;
    if !recursive {
        // Directories first, then files, then submodules, as GitLab lists a directory.
        entries.sort_by_key(|e| match e.kind.as_str() {
            "tree" => 0,
            "blob" => 1,
            _ => 2,
        });
    }
    let rows: Vec<Value> = entries
        .iter()
        .map(|e| {
            let path = if dir.is_empty() {
                e.path.clone()
            } else {
                format!("{dir}/{}", e.path)
            };
            let name = path.rsplit('/').next().unwrap_or(&path).to_string();
            json!({"id": e.sha, "name": name, "type": e.kind, "path": path, "mode": e.mode})
        })
        .collect();
    if req.param("pagination") == Some("keyset") {
        paginate_keyset(p, req, rows)
    } else {
        Ok(paginate_offset(p, req, rows))
    }
}

/// Keyset pagination: `page_token` continues after the entry it names; a `Link: rel="next"`
/// is sent while entries remain, and nothing else.
fn paginate_keyset(p: &Project<'_>, req: &Incoming, rows: Vec<Value>) -> Result<Reply, Reply> {
    let per_page = per_page(req);
    let start = match req.param("page_token").filter(|t| !t.is_empty()) {
        None => 0,
        Some(token) => {
            let last =
                page_token_path(token).ok_or_else(|| bad_request("page_token is invalid"))?;
            rows.iter()
                .position(|r| r["path"] == last.as_str())
                .map(|i| i + 1)
                .ok_or_else(|| bad_request("page_token is invalid"))?
        }
    };
    let end = (start + per_page).min(rows.len());
    let page = rows.get(start..end).unwrap_or_default().to_vec();
    let next = (end < rows.len())
        .then(|| page.last().and_then(|r| r["path"].as_str()).map(page_token))
        .flatten();
    let mut reply = Reply::json(StatusCode::OK, &Value::Array(page));
    if let Some(token) = next {
        let url = page_url(&p.state.base_url, req, &[("page_token", token)]);
        reply = reply.with_header("link", format!("<{url}>; rel=\"next\""));
    }
    Ok(reply)
}

/// Offset pagination with GitLab's `X-Page`, `X-Per-Page`, `X-Next-Page`, `X-Prev-Page`,
/// `X-Total`, `X-Total-Pages` and `Link` headers.
fn paginate_offset(p: &Project<'_>, req: &Incoming, rows: Vec<Value>) -> Reply {
    let per_page = per_page(req);
    let page = req
        .param("page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let total = rows.len();
    let total_pages = total.div_ceil(per_page).max(1);
    let body: Vec<Value> = rows
        .into_iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .collect();
    let next = (page < total_pages).then_some(page + 1);
    let prev = (page > 1).then(|| (page - 1).min(total_pages));
    let link = |n: usize, rel: &str| {
        let url = page_url(&p.state.base_url, req, &[("page", n.to_string())]);
        format!("<{url}>; rel=\"{rel}\"")
    };
    let mut links = Vec::new();
    if let Some(n) = prev {
        links.push(link(n, "prev"));
    }
    if let Some(n) = next {
        links.push(link(n, "next"));
    }
    links.push(link(1, "first"));
    links.push(link(total_pages, "last"));
    let show = |n: Option<usize>| n.map(|n| n.to_string()).unwrap_or_default();
    Reply::json(StatusCode::OK, &Value::Array(body))
        .with_header("x-page", page.to_string())
        .with_header("x-per-page", per_page.to_string())
        .with_header("x-next-page", show(next))
        .with_header("x-prev-page", show(prev))
        .with_header("x-total", total.to_string())
        .with_header("x-total-pages", total_pages.to_string())
        .with_header("link", links.join(", "))
}

async fn blob_raw(p: &Project<'_>, sha: &str) -> Result<Reply, Reply> {
    let (_, bytes) = p
        .git()
        .blob(sha)
        .await
        .map_err(server_error)?
        .ok_or_else(|| message(StatusCode::NOT_FOUND, "404 Blob Not Found"))?;
    let text = !bytes.contains(&0) && std::str::from_utf8(&bytes).is_ok();
    let content_type = if text {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    Ok(Reply::bytes(StatusCode::OK, content_type, bytes)
        .with_header("x-content-type-options", "nosniff")
        .with_header("content-disposition", "inline"))
}

async fn merge_base(p: &Project<'_>, req: &Incoming) -> Result<Reply, Reply> {
    let refs: Vec<&str> = req.params_named("refs[]").collect();
    if refs.len() < 2 {
        return Err(bad_request("Provide at least 2 refs"));
    }
    let git = p.git();
    let mut shas = Vec::new();
    let mut unknown = Vec::new();
    for r in &refs {
        match git.resolve(r, "commit").await.map_err(server_error)? {
            Some(sha) => shas.push(sha),
            None => unknown.push(*r),
        }
    }
    if !unknown.is_empty() {
        let noun = if unknown.len() == 1 { "ref" } else { "refs" };
        return Err(message(
            StatusCode::BAD_REQUEST,
            &format!("Could not find {noun}: {}", unknown.join(", ")),
        ));
    }
    let sha_refs: Vec<&str> = shas.iter().map(String::as_str).collect();
    let not_found = || message(StatusCode::NOT_FOUND, "404 Merge Base Not Found");
    let base = git
        .merge_base(&sha_refs)
        .await
        .map_err(server_error)?
        .ok_or_else(not_found)?;
    let commit = git
        .commit(&base)
        .await
        .map_err(server_error)?
        .ok_or_else(not_found)?;
    Ok(Reply::json(StatusCode::OK, &commit_json(p, &commit)))
}

/// The longest note GitLab accepts, in characters.
const NOTE_LIMIT: usize = 1_000_000;

/// A note's `body`: missing is GitLab's 400 `body is missing`; over [`NOTE_LIMIT`] characters
/// is its 400 naming the limit.
fn note_body(req: &Incoming) -> Result<String, Reply> {
    let params = params(req)?;
    let body = text_param(&params, "body").ok_or_else(|| bad_request("body is missing"))?;
    if body.chars().count() > NOTE_LIMIT {
        return Err(Reply::json(
            StatusCode::BAD_REQUEST,
            &json!({"message": {"note": [format!("is too long (maximum is {NOTE_LIMIT} characters)")]}}),
        ));
    }
    Ok(body)
}

/// A merge request note, as GitLab's notes API returns it.
fn note_json(p: &Project<'_>, n: &StoredComment) -> Value {
    json!({
        "id": n.id,
        "type": null,
        "body": n.body,
        "attachment": null,
        "author": {"id": 1, "username": super::github::SIM_LOGIN, "name": "Simulator", "state": "active"},
        "created_at": rfc3339(n.created_at),
        "updated_at": rfc3339(n.updated_at),
        "system": false,
        "noteable_id": n.number,
        "noteable_type": "MergeRequest",
        "noteable_iid": n.number,
        "project_id": p.repo.project_id,
        "resolvable": false,
        "confidential": false,
        "internal": false,
    })
}

/// `GET /projects/:id/repository/compare?from=&to=&straight=`: with `straight=false` (the
/// default) the diff runs from the merge base of the two, as `git diff from...to`.
async fn compare(p: &Project<'_>, req: &Incoming) -> Result<Reply, Reply> {
    let from = req
        .param("from")
        .ok_or_else(|| bad_request("from is missing"))?;
    let to = req
        .param("to")
        .ok_or_else(|| bad_request("to is missing"))?;
    let straight = req.param("straight") == Some("true");
    let git = p.git();
    let not_found = || message(StatusCode::NOT_FOUND, "404 Ref Not Found");
    let from_sha = git
        .resolve(from, "commit")
        .await
        .map_err(server_error)?
        .ok_or_else(not_found)?;
    let to_sha = git
        .resolve(to, "commit")
        .await
        .map_err(server_error)?
        .ok_or_else(not_found)?;
    let start = if straight {
        from_sha.clone()
    } else {
        git.merge_base(&[&from_sha, &to_sha])
            .await
            .map_err(server_error)?
            .ok_or_else(not_found)?
    };
    let commits = git
        .log(&["--reverse", &format!("{start}..{to_sha}")])
        .await
        .map_err(server_error)?;
    let files = git
        .diff(Some(&start), &to_sha)
        .await
        .map_err(server_error)?;
    let head = git
        .commit(&to_sha)
        .await
        .map_err(server_error)?
        .ok_or_else(not_found)?;
    let diffs: Vec<Value> = files
        .iter()
        .map(|f| {
            json!({
                "old_path": f.path, "new_path": f.path,
                "a_mode": if f.status == 'A' { "0" } else { "100644" },
                "b_mode": if f.status == 'D' { "0" } else { "100644" },
                "diff": "", "new_file": f.status == 'A', "renamed_file": false,
                "deleted_file": f.status == 'D',
            })
        })
        .collect();
    Ok(Reply::json(
        StatusCode::OK,
        &json!({
            "commit": commit_json(p, &head),
            "commits": commits.iter().map(|c| commit_json(p, c)).collect::<Vec<_>>(),
            "diffs": diffs,
            "compare_timeout": false,
            "compare_same_ref": from_sha == to_sha,
            "web_url": format!("{}/-/compare/{from_sha}...{to_sha}", p.web),
        }),
    ))
}

/// Parameters from the query string, then the body (JSON object or form), later ones winning,
/// as GitLab's API merges them.
fn params(req: &Incoming) -> Result<Map<String, Value>, Reply> {
    let mut out: Map<String, Value> = req
        .params
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    if req.body.is_empty() {
        return Ok(out);
    }
    let content_type = req
        .header("content-type")
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.starts_with("application/x-www-form-urlencoded") {
        let text = String::from_utf8_lossy(&req.body);
        out.extend(
            parse_query(&text)
                .into_iter()
                .map(|(k, v)| (k, Value::String(v))),
        );
        return Ok(out);
    }
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(map)) => out.extend(map),
        _ => {
            return Err(bad_request(
                "The provided content-type is not supported or body is not valid JSON",
            ))
        }
    }
    Ok(out)
}

/// A parameter as text (strings as they are, numbers and booleans printed).
fn text_param(params: &Map<String, Value>, name: &str) -> Option<String> {
    match params.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn bool_param(params: &Map<String, Value>, name: &str) -> Result<Option<bool>, Reply> {
    match params.get(name) {
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => boolean(Some(s), name),
        Some(Value::Number(n)) => Ok(Some(n.as_f64() != Some(0.0))),
        Some(Value::Null) | None => Ok(None),
        Some(_) => Err(bad_request(&format!("{name} is invalid"))),
    }
}

async fn create_status(p: &Project<'_>, req: &Incoming, sha: &str) -> Result<Reply, Reply> {
    let params = params(req)?;
    let state = text_param(&params, "state").ok_or_else(|| bad_request("state is missing"))?;
    if !matches!(
        state.as_str(),
        "pending" | "running" | "success" | "failed" | "canceled" | "skipped"
    ) {
        return Err(bad_request("state does not have a valid value"));
    }
    let git = p.git();
    let missing = || message(StatusCode::NOT_FOUND, "404 Commit Not Found");
    if !git::is_hex(sha) {
        return Err(missing());
    }
    let full = git
        .resolve(sha, "commit")
        .await
        .map_err(server_error)?
        .ok_or_else(missing)?;
    let name = text_param(&params, "name")
        .or_else(|| text_param(&params, "context"))
        .unwrap_or_else(|| "default".to_string());
    let description = text_param(&params, "description");
    let target_url = text_param(&params, "target_url");
    let git_ref = match text_param(&params, "ref") {
        Some(r) => Some(r),
        None => git
            .branches_containing(&full)
            .await
            .map_err(server_error)?
            .into_iter()
            .next(),
    };
    let coverage = params.get("coverage").and_then(|v| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    });
    let id = p.state.next_id();
    p.state.record_status(
        &p.repo.full_name,
        RecordedStatus {
            forge: FORGE,
            sha: full.clone(),
            state: state.clone(),
            context: name.clone(),
            description: description.clone(),
            target_url: target_url.clone(),
        },
    );
    let now = rfc3339_millis(now_unix());
    let started = matches!(
        state.as_str(),
        "running" | "success" | "failed" | "canceled"
    );
    let finished = matches!(
        state.as_str(),
        "success" | "failed" | "canceled" | "skipped"
    );
    let base = &p.state.base_url;
    Ok(Reply::json(
        StatusCode::CREATED,
        &json!({
            "id": id,
            "sha": full,
            "ref": git_ref,
            "status": state,
            "name": name,
            "target_url": target_url,
            "description": description,
            "created_at": now,
            "started_at": started.then(|| now.clone()),
            "finished_at": finished.then(|| now.clone()),
            "allow_failure": false,
            "coverage": coverage,
            "pipeline_id": id,
            "author": {
                "id": 1,
                "username": "driftless-sim",
                "name": "driftless simulator",
                "state": "active",
                "locked": false,
                "avatar_url": format!("{base}/gitlab/uploads/avatar.png"),
                "web_url": format!("{base}/gitlab/driftless-sim"),
            },
        }),
    ))
}

/// GitLab's project hook entity; the token is never returned.
fn hook_json(p: &Project<'_>, h: &StoredHook) -> Value {
    let mut v = json!({
        "id": h.id,
        "url": h.url,
        "name": h.name,
        "description": h.description,
        "project_id": p.repo.project_id,
        "push_events_branch_filter": h.branch_filter,
        "branch_filter_strategy": if h.branch_filter.is_empty() { "all_branches" } else { "wildcard" },
        "enable_ssl_verification": h.verify_tls,
        "alert_status": if h.active { "executable" } else { "disabled" },
        "disabled_until": null,
        "url_variables": [],
        "custom_headers": [],
        "custom_webhook_template": null,
        "created_at": rfc3339_millis(h.created_at),
    });
    for event in HOOK_EVENTS {
        v[format!("{event}_events")] = Value::Bool(h.events.iter().any(|e| e == event));
    }
    v
}

/// Applies the hook parameters present in a create or update request.
fn apply_hook_params(hook: &mut StoredHook, params: &Map<String, Value>) -> Result<(), Reply> {
    if let Some(url) = text_param(params, "url") {
        hook.url = url;
    }
    if let Some(token) = text_param(params, "token") {
        hook.secret = (!token.is_empty()).then_some(token);
    }
    if let Some(verify) = bool_param(params, "enable_ssl_verification")? {
        hook.verify_tls = verify;
    }
    if let Some(filter) = text_param(params, "push_events_branch_filter") {
        hook.branch_filter = filter;
    }
    if let Some(name) = text_param(params, "name") {
        hook.name = name;
    }
    if let Some(description) = text_param(params, "description") {
        hook.description = description;
    }
    for event in HOOK_EVENTS {
        if let Some(on) = bool_param(params, &format!("{event}_events"))? {
            hook.events.retain(|e| e != event);
            if on {
                hook.events.push(event.to_string());
            }
        }
    }
    // Keep GitLab's field order, so the list reads the same however it was built.
    hook.events
        .sort_by_key(|e| HOOK_EVENTS.iter().position(|x| x == e));
    Ok(())
}

fn create_hook(p: &Project<'_>, req: &Incoming) -> Result<Reply, Reply> {
    let params = params(req)?;
    if text_param(&params, "url").is_none_or(|u| u.is_empty()) {
        return Err(bad_request("url is missing"));
    }
    let now = now_unix();
    let mut hook = StoredHook {
        repo: repo_key(&p.repo.full_name),
        id: p.state.next_id(),
        url: String::new(),
        // GitLab enables push events unless told otherwise.
        events: vec!["push".to_string()],
        secret: None,
        content_type: None,
        verify_tls: true,
        active: true,
        branch_filter: String::new(),
        name: String::new(),
        description: String::new(),
        created_at: now,
        updated_at: now,
    };
    apply_hook_params(&mut hook, &params)?;
    lock(&p.state.hooks).push(hook.clone());
    Ok(Reply::json(StatusCode::CREATED, &hook_json(p, &hook)))
}

fn find_hook(p: &Project<'_>, id: &str) -> Result<StoredHook, Reply> {
    let missing = || message(StatusCode::NOT_FOUND, "404 Not found");
    let key = repo_key(&p.repo.full_name);
    let id: u64 = id.parse().map_err(|_| missing())?;
    lock(&p.state.hooks)
        .iter()
        .find(|h| h.repo == key && h.id == id)
        .cloned()
        .ok_or_else(missing)
}

fn update_hook(p: &Project<'_>, req: &Incoming, id: &str) -> Result<Reply, Reply> {
    let params = params(req)?;
    let found = find_hook(p, id)?;
    let mut updated = found.clone();
    apply_hook_params(&mut updated, &params)?;
    updated.updated_at = now_unix();
    let mut hooks = lock(&p.state.hooks);
    if let Some(slot) = hooks.iter_mut().find(|h| h.id == found.id) {
        *slot = updated.clone();
    }
    drop(hooks);
    Ok(Reply::json(StatusCode::OK, &hook_json(p, &updated)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(path: &str) -> Vec<String> {
        path.split('/').map(str::to_string).collect()
    }

    #[test]
    fn routes_and_templates() {
        let r = route(
            &Method::GET,
            &segments("projects/acme/platform/deploy/repository/tree"),
        );
        assert!(r.is_none(), "an unencoded project path is not a project id");
        let r = route(
            &Method::GET,
            &segments("projects/acme%2Fdeploy/repository/branches/feature/x"),
        )
        .unwrap();
        assert!(matches!(&r.op, Op::Branch(b) if b == "feature/x"));
        let r = route(
            &Method::GET,
            &segments("projects/7/repository/blobs/abcd/raw"),
        )
        .unwrap();
        assert_eq!(r.project, "7");
        assert_eq!(r.op.template(), "/projects/:id/repository/blobs/:sha/raw");
        assert!(route(&Method::PATCH, &segments("projects/7/hooks/1")).is_none());
    }

    #[test]
    fn page_tokens_round_trip() {
        let token = page_token("dir/a b.yaml");
        assert!(!token.contains('/') && !token.contains('+'));
        assert_eq!(page_token_path(&token).as_deref(), Some("dir/a b.yaml"));
        assert_eq!(page_token_path("not a token"), None);
    }

    #[test]
    fn booleans() {
        assert_eq!(boolean(Some("true"), "x").ok(), Some(Some(true)));
        assert_eq!(boolean(Some("0"), "x").ok(), Some(Some(false)));
        assert_eq!(boolean(None, "x").ok(), Some(None));
        assert!(boolean(Some("maybe"), "x").is_err());
    }
}
