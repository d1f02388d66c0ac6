//! Pull requests (GitHub) and merge requests (GitLab) as the simulator plays them: the
//! comments and notes posted on them, kept with each forge's size limit, and the request
//! webhooks (`pull_request`, `Merge Request Hook`) in the shapes the forges document, built
//! from the repository's real commits and signed (or tokened) as pushes are.

use serde_json::{json, Value};

use super::git::CommitInfo;
use super::github::{node_id, stable_id, user_json, SIM_LOGIN};
use super::push::{gitlab_signed, hmac_sha256, Delivery};
use super::wire::{now_unix, random_uuid, rfc3339};
use super::{lock, repo_key, SimState};

/// A commit that is not known (GitHub's and GitLab's "no commit").
const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

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
pub(super) async fn github_delivery(
    state: &SimState,
    repo: &str,
    hook: &RequestHook,
    secret: &str,
) -> Delivery {
    let payload = github_payload(state, repo, hook).await;
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

/// What the simulator knows of a request's commits from the repository: the base branch's
/// head, and the head's first parent (a `synchronize`'s `before`; the simulator keeps no
/// earlier head, so this is exact for a push of one commit). `None` when unknown.
async fn request_commits(state: &SimState, repo: &str, hook: &RequestHook) -> RequestCommits {
    let Some(entry) = state.repo(repo) else {
        return RequestCommits::default();
    };
    let git = &entry.git;
    let base = format!("refs/heads/{}", hook.base);
    RequestCommits {
        base_sha: git.resolve(&base, "commit").await.ok().flatten(),
        parent: git
            .resolve(&format!("{}^", hook.head_sha), "commit")
            .await
            .ok()
            .flatten(),
        head: git.commit(&hook.head_sha).await.ok().flatten(),
    }
}

#[derive(Default)]
struct RequestCommits {
    base_sha: Option<String>,
    parent: Option<String>,
    head: Option<CommitInfo>,
}

/// The `pull_request` event payload, with every field of GitHub's examples
/// (`tests/fixtures/github/pull_request-*.json`): `action`, `number`, `pull_request` (with
/// `head` and `base`, each with `ref`, `sha` and `repo`), `repository`, `sender`, and
/// `before` / `after` on `synchronize`. Counts the simulator does not compute (additions,
/// deletions, changed files) are 0.
async fn github_payload(state: &SimState, repo: &str, hook: &RequestHook) -> Value {
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
    let commits = request_commits(state, repo, hook).await;
    let action = match hook.action {
        RequestAction::Opened => "opened",
        RequestAction::Pushed => "synchronize",
        RequestAction::Reopened => "reopened",
        RequestAction::Closed | RequestAction::Merged => "closed",
    };
    let closed = matches!(hook.action, RequestAction::Closed | RequestAction::Merged);
    let merged = hook.action == RequestAction::Merged;
    let now = rfc3339(now_unix());
    let n = hook.number;
    let html_url = format!("{}/{full_name}/pull/{n}", state.base_url);
    let api = format!("{}/github/repos/{full_name}", state.base_url);
    let pull_api = format!("{api}/pulls/{n}");
    let issue_api = format!("{api}/issues/{n}");
    let statuses_url = format!("{api}/statuses/{}", hook.head_sha);
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
    let href = |url: &str| json!({ "href": url });
    let base_sha = commits.base_sha.unwrap_or_else(|| ZERO_SHA.to_string());
    let links = json!({
        "self": href(&pull_api),
        "html": href(&html_url),
        "issue": href(&issue_api),
        "comments": href(&format!("{issue_api}/comments")),
        "review_comments": href(&format!("{pull_api}/comments")),
        "review_comment": href(&format!("{api}/pulls/comments{{/number}}")),
        "commits": href(&format!("{pull_api}/commits")),
        "statuses": href(&statuses_url),
    });
    let mut payload = json!({
        "action": action,
        "number": n,
        "pull_request": {
            "url": pull_api,
            "id": stable_id(&format!("{full_name}#{n}")),
            "node_id": node_id("PullRequest", &format!("{full_name}#{n}")),
            "html_url": html_url,
            "diff_url": format!("{html_url}.diff"),
            "patch_url": format!("{html_url}.patch"),
            "issue_url": issue_api,
            "number": n,
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
            "assignee": null,
            "assignees": [],
            "requested_reviewers": [],
            "requested_teams": [],
            "labels": [],
            "milestone": null,
            "draft": false,
            "commits_url": format!("{pull_api}/commits"),
            "review_comments_url": format!("{pull_api}/comments"),
            "review_comment_url": format!("{api}/pulls/comments{{/number}}"),
            "comments_url": format!("{issue_api}/comments"),
            "statuses_url": statuses_url,
            "head": end(&hook.head_branch, &hook.head_sha, &head_repo),
            "base": end(&hook.base, &base_sha, &full_name),
            "_links": links,
        },
        "repository": github_repo_json(state, &full_name),
        "sender": user_json(&state.base_url, SIM_LOGIN),
    });
    let activity = json!({
        "author_association": "OWNER",
        "auto_merge": null,
        "active_lock_reason": null,
        "merged": merged,
        "mergeable": null,
        "rebaseable": null,
        "mergeable_state": "unknown",
        "merged_by": if merged { user_json(&state.base_url, SIM_LOGIN) } else { Value::Null },
        "comments": 0,
        "review_comments": 0,
        "maintainer_can_modify": false,
        "commits": 1,
        "additions": 0,
        "deletions": 0,
        "changed_files": 0,
    });
    if let (Some(pr), Value::Object(more)) = (payload["pull_request"].as_object_mut(), activity) {
        pr.extend(more);
    }
    if hook.action == RequestAction::Pushed {
        payload["before"] = commits
            .parent
            .unwrap_or_else(|| ZERO_SHA.to_string())
            .into();
        payload["after"] = hook.head_sha.clone().into();
    }
    payload
}

/// A GitLab `Merge Request Hook` delivery carrying `X-Gitlab-Token`.
pub(super) async fn gitlab_delivery(
    state: &SimState,
    repo: &str,
    hook: &RequestHook,
    token: &str,
) -> Delivery {
    let payload = gitlab_payload(state, repo, hook).await;
    gitlab_signed(state, "Merge Request Hook", &payload, token)
}

/// The merge request event payload, with every field of GitLab's documented example
/// (`tests/fixtures/gitlab/merge_request.json`): `object_kind`, `user`, `project`,
/// `object_attributes` (`iid`, `target_branch`, `source_branch`, `source_project_id`,
/// `target_project_id`, `state`, `action`, `last_commit` read from the repository, `source`,
/// `target`, ...), `repository`, `labels`, `changes`, `assignees`, `reviewers`.
async fn gitlab_payload(state: &SimState, repo: &str, hook: &RequestHook) -> Value {
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
    let commits = request_commits(state, repo, hook).await;
    // GitLab's `state_id`: 1 opened, 2 closed, 3 merged.
    let (action, state_name, state_id) = match hook.action {
        RequestAction::Opened => ("open", "opened", 1),
        RequestAction::Pushed => ("update", "opened", 1),
        RequestAction::Reopened => ("reopen", "opened", 1),
        RequestAction::Closed => ("close", "closed", 2),
        RequestAction::Merged => ("merge", "merged", 3),
    };
    let web = |p: &str| format!("{}/gitlab/{p}", state.base_url);
    let host = state
        .base_url
        .split_once("://")
        .map_or(state.base_url.as_str(), |(_, rest)| rest);
    let project = |id: u64, p: &str| {
        let name = p.rsplit('/').next().unwrap_or(p);
        let ssh = format!("git@{host}:{p}.git");
        json!({
            "id": id, "name": name, "description": "", "web_url": web(p), "avatar_url": null,
            "git_ssh_url": ssh, "git_http_url": format!("{}.git", web(p)),
            "namespace": p.split('/').next().unwrap_or(p), "visibility_level": 0,
            "path_with_namespace": p, "default_branch": "main", "ci_config_path": "",
            "homepage": web(p), "url": format!("{}.git", web(p)), "ssh_url": ssh,
            "http_url": format!("{}.git", web(p)),
        })
    };
    let source_path = if hook.fork {
        format!("{path}-fork")
    } else {
        path.clone()
    };
    let now = rfc3339(now_unix());
    let (message, title, timestamp, author) = match &commits.head {
        Some(c) => (
            c.message.clone(),
            c.title().to_string(),
            c.committer.iso.clone(),
            json!({"name": c.author.name, "email": c.author.email}),
        ),
        None => (
            "change".to_string(),
            "change".to_string(),
            now.clone(),
            json!({"name": "Test", "email": "test@example.com"}),
        ),
    };
    let attributes = json!({
        "id": stable_id(&format!("{path}!{}", hook.number)),
        "iid": hook.number,
        "target_branch": hook.base,
        "source_branch": hook.head_branch,
        "source_project_id": source_id,
        "target_project_id": project_id,
        "author_id": 1,
        "assignee_ids": [],
        "assignee_id": null,
        "reviewer_ids": [],
        "title": format!("Change {}", hook.head_branch),
        "description": "",
        "created_at": now,
        "updated_at": now,
        "last_edited_at": null,
        "last_edited_by_id": null,
        "prepared_at": now,
        "milestone_id": null,
        "state_id": state_id,
        "state": state_name,
        "blocking_discussions_resolved": true,
        "work_in_progress": false,
        "draft": false,
        "first_contribution": false,
        "merge_status": "can_be_merged",
        "detailed_merge_status": "mergeable",
        "total_time_spent": 0,
        "time_change": 0,
        "human_total_time_spent": null,
        "human_time_change": null,
        "human_time_estimate": null,
        "url": format!("{}/-/merge_requests/{}", web(&path), hook.number),
        "source": project(source_id, &source_path),
        "target": project(project_id, &path),
        "last_commit": {
            "id": hook.head_sha,
            "message": message,
            "title": title,
            "timestamp": timestamp,
            "url": format!("{}/-/commit/{}", web(&source_path), hook.head_sha),
            "author": author,
        },
        "labels": [],
        "action": action,
    });
    json!({
        "object_kind": "merge_request",
        "event_type": "merge_request",
        "user": {
            "id": 1, "name": "Simulator", "username": SIM_LOGIN, "avatar_url": null,
            "email": "simulator@example.com",
        },
        "project": project(project_id, &path),
        "object_attributes": attributes,
        "labels": [],
        "changes": {},
        "repository": {
            "name": path.rsplit('/').next().unwrap_or(&path),
            "url": format!("{}.git", web(&path)),
            "description": "",
            "homepage": web(&path),
        },
        "assignees": [],
        "reviewers": [],
    })
}
