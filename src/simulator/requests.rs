//! Pull requests (GitHub) and merge requests (GitLab) as the simulator plays them: the
//! comments and notes posted on them, kept with each forge's size limit, and the request
//! webhooks (`pull_request`, `Merge Request Hook`) in the shapes the forges document, built
//! from the repository's real commits and signed (or tokened) as pushes are.

use serde_json::{json, Value};

use super::github::{node_id, stable_id, user_json, SIM_LOGIN};
use super::push::{gitlab_signed, hmac_sha256, Delivery};
use super::wire::{now_unix, random_uuid, rfc3339};
use super::{lock, repo_key, SimState};

/// A comment or note as stored.
#[derive(Debug, Clone)]
pub(super) struct StoredComment {
    pub forge: &'static str,
    pub repo: String,
    pub number: u64,
    pub id: u64,
    pub body: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A comment on a request, as tests read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimComment {
    pub id: u64,
    pub body: String,
    /// How many times it was edited after being created.
    pub edits: u32,
}

/// What happens to a request in a webhook the simulator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestAction {
    Opened,
    /// A new head pushed (GitHub `synchronize`, GitLab `update`).
    Pushed,
    Reopened,
    Closed,
    Merged,
}

/// A pull or merge request webhook to send.
#[derive(Debug, Clone)]
pub struct RequestHook {
    pub number: u64,
    pub action: RequestAction,
    /// The branch it merges into.
    pub base: String,
    /// The branch it merges from.
    pub head_branch: String,
    pub head_sha: String,
    /// The head lives in `<login>/<name>` (GitHub) or another project (GitLab).
    pub fork: bool,
}

impl SimState {
    /// Stores a new comment; `None` with the forge's refusal when the body is over `limit`.
    pub(super) fn add_comment(
        &self,
        forge: &'static str,
        repo: &str,
        number: u64,
        body: String,
    ) -> StoredComment {
        let now = now_unix();
        let c = StoredComment {
            forge,
            repo: repo_key(repo),
            number,
            id: self.next_id(),
            body,
            created_at: now,
            updated_at: now,
        };
        lock(&self.comments).push((c.clone(), 0));
        c
    }

    pub(super) fn list_comments(&self, forge: &str, repo: &str, number: u64) -> Vec<StoredComment> {
        let key = repo_key(repo);
        lock(&self.comments)
            .iter()
            .filter(|(c, _)| c.forge == forge && c.repo == key && c.number == number)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Replaces a comment's body; `None` when the forge, repository (and request, when
    /// given) have no comment of that id.
    pub(super) fn edit_comment(
        &self,
        forge: &str,
        repo: &str,
        number: Option<u64>,
        id: u64,
        body: String,
    ) -> Option<StoredComment> {
        let key = repo_key(repo);
        let mut all = lock(&self.comments);
        let (c, edits) = all.iter_mut().find(|(c, _)| {
            c.forge == forge && c.repo == key && c.id == id && number.is_none_or(|n| n == c.number)
        })?;
        c.body = body;
        c.updated_at = now_unix();
        *edits += 1;
        Some(c.clone())
    }

    pub(super) fn sim_comments(&self, repo: &str, number: u64) -> Vec<SimComment> {
        let key = repo_key(repo);
        lock(&self.comments)
            .iter()
            .filter(|(c, _)| c.repo == key && c.number == number)
            .map(|(c, edits)| SimComment {
                id: c.id,
                body: c.body.clone(),
                edits: *edits,
            })
            .collect()
    }
}

/// A signed GitHub `pull_request` delivery.
pub(super) fn github_delivery(
    state: &SimState,
    repo: &str,
    hook: &RequestHook,
    secret: &str,
) -> Delivery {
    let payload = github_payload(state, repo, hook);
    let body = serde_json::to_vec(&payload).unwrap_or_default();
    let signature = hex::encode(hmac_sha256(secret.as_bytes(), &body));
    Delivery::new(
        body,
        vec![
            ("content-type", "application/json".to_string()),
            ("user-agent", "GitHub-Hookshot/sim".to_string()),
            ("x-github-event", "pull_request".to_string()),
            ("x-github-delivery", random_uuid()),
            (
                "x-github-hook-installation-target-type",
                "repository".to_string(),
            ),
            ("x-hub-signature-256", format!("sha256={signature}")),
        ],
    )
}

fn github_repo_json(state: &SimState, full_name: &str) -> Value {
    let (owner, name) = full_name.split_once('/').unwrap_or((full_name, full_name));
    json!({
        "id": stable_id(full_name),
        "node_id": node_id("Repository", full_name),
        "name": name,
        "full_name": full_name,
        "private": false,
        "owner": user_json(&state.base_url, owner),
        "html_url": format!("{}/{full_name}", state.base_url),
        "url": format!("{}/github/repos/{full_name}", state.base_url),
        "default_branch": "main",
    })
}

/// The `pull_request` event payload: `action`, `number`, `pull_request` (with `head` and
/// `base`, each with `ref`, `sha` and `repo`), `repository` and `sender`.
fn github_payload(state: &SimState, repo: &str, hook: &RequestHook) -> Value {
    let full_name = state
        .repo(repo)
        .map_or_else(|| repo.to_string(), |e| e.full_name);
    let (owner, name) = full_name
        .split_once('/')
        .unwrap_or((&full_name, &full_name));
    let head_repo = if hook.fork {
        format!("{owner}-fork/{name}")
    } else {
        full_name.clone()
    };
    let action = match hook.action {
        RequestAction::Opened => "opened",
        RequestAction::Pushed => "synchronize",
        RequestAction::Reopened => "reopened",
        RequestAction::Closed | RequestAction::Merged => "closed",
    };
    let closed = matches!(hook.action, RequestAction::Closed | RequestAction::Merged);
    let merged = hook.action == RequestAction::Merged;
    let now = rfc3339(now_unix());
    let html_url = format!("{}/{full_name}/pull/{}", state.base_url, hook.number);
    let end = |branch: &str, sha: &str, of: &str| {
        let login = of.split('/').next().unwrap_or(of);
        json!({
            "label": format!("{login}:{branch}"),
            "ref": branch,
            "sha": sha,
            "user": user_json(&state.base_url, login),
            "repo": github_repo_json(state, of),
        })
    };
    json!({
        "action": action,
        "number": hook.number,
        "pull_request": {
            "url": format!("{}/github/repos/{full_name}/pulls/{}", state.base_url, hook.number),
            "id": stable_id(&format!("{full_name}#{}", hook.number)),
            "node_id": node_id("PullRequest", &format!("{full_name}#{}", hook.number)),
            "html_url": html_url,
            "number": hook.number,
            "state": if closed { "closed" } else { "open" },
            "locked": false,
            "title": format!("Change {}", hook.head_branch),
            "user": user_json(&state.base_url, SIM_LOGIN),
            "body": null,
            "created_at": now,
            "updated_at": now,
            "closed_at": if closed { json!(now) } else { Value::Null },
            "merged_at": if merged { json!(now) } else { Value::Null },
            "merge_commit_sha": null,
            "draft": false,
            "head": end(&hook.head_branch, &hook.head_sha, &head_repo),
            "base": end(&hook.base, "", &full_name),
            "merged": merged,
            "mergeable": null,
            "comments": 0,
            "commits": 1,
        },
        "repository": github_repo_json(state, &full_name),
        "sender": user_json(&state.base_url, SIM_LOGIN),
    })
}

/// A GitLab `Merge Request Hook` delivery carrying `X-Gitlab-Token`.
pub(super) fn gitlab_delivery(
    state: &SimState,
    repo: &str,
    hook: &RequestHook,
    token: &str,
) -> Delivery {
    gitlab_signed(
        state,
        "Merge Request Hook",
        &gitlab_payload(state, repo, hook),
        token,
    )
}

/// The merge request event payload: `object_kind`, `user`, `project`, `object_attributes`
/// (`iid`, `target_branch`, `source_branch`, `source_project_id`, `target_project_id`,
/// `state`, `action`, `last_commit`, `source`, `target`), `repository`, `labels`, `changes`.
fn gitlab_payload(state: &SimState, repo: &str, hook: &RequestHook) -> Value {
    let entry = state.repo(repo);
    let path = entry
        .as_ref()
        .map_or_else(|| repo.to_string(), |e| e.full_name.clone());
    let project_id = entry.as_ref().map_or(0, |e| e.project_id);
    let source_id = if hook.fork {
        project_id + 100_000
    } else {
        project_id
    };
    let (action, state_name) = match hook.action {
        RequestAction::Opened => ("open", "opened"),
        RequestAction::Pushed => ("update", "opened"),
        RequestAction::Reopened => ("reopen", "opened"),
        RequestAction::Closed => ("close", "closed"),
        RequestAction::Merged => ("merge", "merged"),
    };
    let web = |p: &str| format!("{}/gitlab/{p}", state.base_url);
    let project = |id: u64, p: &str| {
        let name = p.rsplit('/').next().unwrap_or(p);
        json!({
            "id": id, "name": name, "description": "", "web_url": web(p),
            "namespace": p.split('/').next().unwrap_or(p), "visibility_level": 0,
            "path_with_namespace": p, "default_branch": "main",
            "git_http_url": format!("{}.git", web(p)),
        })
    };
    let source_path = if hook.fork {
        format!("{path}-fork")
    } else {
        path.clone()
    };
    let now = rfc3339(now_unix());
    json!({
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {"id": 1, "name": "Simulator", "username": SIM_LOGIN, "avatar_url": null},
        "project": project(project_id, &path),
        "object_attributes": {
            "id": stable_id(&format!("{path}!{}", hook.number)),
            "iid": hook.number,
            "target_branch": hook.base,
            "source_branch": hook.head_branch,
            "source_project_id": source_id,
            "target_project_id": project_id,
            "author_id": 1,
            "title": format!("Change {}", hook.head_branch),
            "created_at": now,
            "updated_at": now,
            "state": state_name,
            "merge_status": "can_be_merged",
            "url": format!("{}/-/merge_requests/{}", web(&path), hook.number),
            "source": project(source_id, &source_path),
            "target": project(project_id, &path),
            "last_commit": {
                "id": hook.head_sha,
                "message": "change",
                "timestamp": now,
                "url": format!("{}/-/commit/{}", web(&source_path), hook.head_sha),
                "author": {"name": "Test", "email": "test@example.com"},
            },
            "work_in_progress": false,
            "draft": false,
            "action": action,
        },
        "labels": [],
        "changes": {},
        "repository": {"name": path.rsplit('/').next().unwrap_or(&path), "url": format!("{}.git", web(&path)), "homepage": web(&path)},
    })
}
