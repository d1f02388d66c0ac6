//! Push webhooks as the forges deliver them, built from the repository's real history: GitHub's
//! `push` event signed with `X-Hub-Signature-256`, GitLab's `Push Hook` carrying
//! `X-Gitlab-Token`. The signature is computed here, independently of driftless's verifier, so
//! a test of the receiver is not checking the verifier against itself.

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use super::git::{CommitInfo, FileChange, Signature};
use super::github::{node_id, stable_id, user_json, SIM_LOGIN};
use super::wire::{now_unix, random_uuid, rfc3339};
use super::{RepoEntry, SimState};

/// Git's name for "no commit": the `before` of a created ref, the `after` of a deleted one.
const ZERO_SHA: &str = "0000000000000000000000000000000000000000";
/// GitHub lists at most 2048 commits in a push payload.
const GITHUB_COMMIT_LIMIT: usize = 2048;
/// GitLab lists the newest 20 commits and counts the rest in `total_commits_count`.
const GITLAB_COMMIT_LIMIT: usize = 20;

/// A delivery ready to send.
pub(super) struct Delivery {
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

impl Delivery {
    pub(super) fn new(body: Vec<u8>, headers: Vec<(&'static str, String)>) -> Self {
        Self { body, headers }
    }

    pub async fn send(self, url: &str) -> Result<reqwest::StatusCode, reqwest::Error> {
        let mut request = reqwest::Client::new().post(url).body(self.body);
        for (name, value) in self.headers {
            request = request.header(name, value);
        }
        Ok(request.send().await?.status())
    }
}

/// A pushed commit and the paths it changed against its first parent.
struct Pushed {
    commit: CommitInfo,
    added: Vec<String>,
    removed: Vec<String>,
    modified: Vec<String>,
}

/// What a push of `before` → `after` on `branch` brought, read from the repository: the
/// newest `limit` commits oldest first, how many there were, and the head commit. A repository
/// the simulator does not serve, or SHAs it does not have, give an empty history.
async fn history(
    repo: Option<&RepoEntry>,
    branch: &str,
    before: &str,
    after: &str,
    limit: usize,
) -> (Vec<Pushed>, usize, Option<CommitInfo>) {
    let Some(repo) = repo.filter(|_| after != ZERO_SHA) else {
        return (Vec::new(), 0, None);
    };
    let git = &repo.git;
    let head = git.commit(after).await.ok().flatten();
    let exclude = format!("--exclude=refs/heads/{branch}");
    let range = format!("{before}..{after}");
    // A new branch brings the commits no other branch has.
    let selection: Vec<&str> = if before == ZERO_SHA {
        vec![after, "--not", &exclude, "--branches"]
    } else {
        vec![&range]
    };
    let shas = git.rev_list(&selection).await.unwrap_or_default();
    let total = shas.len();
    let mut pushed = Vec::new();
    // rev-list lists newest first; keep the newest `limit`, then report oldest first.
    for sha in shas.iter().take(limit).rev() {
        let Ok(Some(commit)) = git.commit(sha).await else {
            continue;
        };
        let changes: Vec<FileChange> = git
            .diff(commit.parents.first().map(String::as_str), &commit.sha)
            .await
            .unwrap_or_default();
        let paths = |status: char| {
            changes
                .iter()
                .filter(|c| c.status == status)
                .map(|c| c.path.clone())
                .collect::<Vec<_>>()
        };
        pushed.push(Pushed {
            added: paths('A'),
            removed: paths('D'),
            modified: changes
                .iter()
                .filter(|c| !matches!(c.status, 'A' | 'D'))
                .map(|c| c.path.clone())
                .collect(),
            commit,
        });
    }
    (pushed, total, head)
}

pub(super) fn hmac_sha256(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

pub(super) async fn github_delivery(
    state: &SimState,
    repo: &str,
    branch: &str,
    before: &str,
    after: &str,
    secret: &str,
) -> Delivery {
    let payload = github_payload(state, repo, branch, before, after).await;
    let body = serde_json::to_vec(&payload).unwrap_or_default();
    let signature = hex::encode(hmac_sha256(secret.as_bytes(), &body));
    Delivery {
        body,
        headers: vec![
            ("content-type", "application/json".to_string()),
            ("user-agent", "GitHub-Hookshot/sim".to_string()),
            ("x-github-event", "push".to_string()),
            ("x-github-delivery", random_uuid()),
            (
                "x-github-hook-installation-target-type",
                "repository".to_string(),
            ),
            ("x-hub-signature-256", format!("sha256={signature}")),
        ],
    }
}

async fn github_payload(
    state: &SimState,
    repo: &str,
    branch: &str,
    before: &str,
    after: &str,
) -> Value {
    let entry = state.repo(repo);
    let full_name = entry
        .as_ref()
        .map_or_else(|| repo.to_string(), |e| e.full_name.clone());
    let (owner, name) = full_name.split_once('/').unwrap_or(("", &full_name));
    let base = &state.base_url;
    let html = format!("{base}/{full_name}");
    let api = format!("{base}/github/repos/{full_name}");
    let default_branch = match &entry {
        Some(e) => e.git.default_branch().await.ok().flatten(),
        None => None,
    }
    .unwrap_or_else(|| "main".to_string());
    let (pushed, _, head) =
        history(entry.as_ref(), branch, before, after, GITHUB_COMMIT_LIMIT).await;
    let commit_json =
        |c: &CommitInfo, added: &[String], removed: &[String], modified: &[String]| {
            let person = |s: &Signature| json!({"name": s.name, "email": s.email});
            json!({
                "id": c.sha,
                "tree_id": c.tree,
                "distinct": true,
                "message": c.message,
                "timestamp": c.committer.iso,
                "url": format!("{html}/commit/{}", c.sha),
                "author": person(&c.author),
                "committer": person(&c.committer),
                "added": added,
                "removed": removed,
                "modified": modified,
            })
        };
    let commits: Vec<Value> = pushed
        .iter()
        .map(|p| commit_json(&p.commit, &p.added, &p.removed, &p.modified))
        .collect();
    let head_commit = head
        .as_ref()
        .map(|h| match pushed.iter().find(|p| p.commit.sha == h.sha) {
            Some(p) => commit_json(h, &p.added, &p.removed, &p.modified),
            None => commit_json(h, &[], &[], &[]),
        });
    let created = before == ZERO_SHA;
    let deleted = after == ZERO_SHA;
    let forced = match (&entry, created || deleted) {
        (Some(e), false) => !e.git.is_ancestor(before, after).await.unwrap_or(false),
        _ => false,
    };
    let compare = if created {
        format!("{html}/commit/{after}")
    } else {
        format!("{html}/compare/{}...{}", short(before), short(after))
    };
    let mut owner_json = user_json(base, owner);
    owner_json["name"] = owner.into();
    owner_json["email"] = Value::Null;
    let now = now_unix();
    let mut repository = json!({
        "id": stable_id(&full_name),
        "node_id": node_id("Repository", &full_name),
        "name": name,
        "full_name": full_name,
        "private": true,
        "owner": owner_json,
        "html_url": html,
        "description": null,
        "fork": false,
        "url": html,
        "forks_url": format!("{api}/forks"),
        "hooks_url": format!("{api}/hooks"),
        "branches_url": format!("{api}/branches{{/branch}}"),
        "tags_url": format!("{api}/tags"),
        "blobs_url": format!("{api}/git/blobs{{/sha}}"),
        "git_refs_url": format!("{api}/git/refs{{/sha}}"),
        "trees_url": format!("{api}/git/trees{{/sha}}"),
        "statuses_url": format!("{api}/statuses/{{sha}}"),
        "commits_url": format!("{api}/commits{{/sha}}"),
        "git_commits_url": format!("{api}/git/commits{{/sha}}"),
        "contents_url": format!("{api}/contents/{{+path}}"),
        "compare_url": format!("{api}/compare/{{base}}...{{head}}"),
        "archive_url": format!("{api}/{{archive_format}}{{/ref}}"),
        "created_at": now,
        "updated_at": rfc3339(now),
        "pushed_at": now,
    });
    let details = json!({
        "git_url": format!("git://127.0.0.1/{full_name}.git"),
        "ssh_url": format!("git@127.0.0.1:{full_name}.git"),
        "clone_url": format!("{html}.git"),
        "svn_url": html,
        "homepage": null,
        "size": 0,
        "stargazers_count": 0,
        "watchers_count": 0,
        "language": null,
        "has_issues": true,
        "has_projects": false,
        "has_downloads": true,
        "has_wiki": false,
        "has_pages": false,
        "forks_count": 0,
        "mirror_url": null,
        "archived": false,
        "disabled": false,
        "open_issues_count": 0,
        "license": null,
        "forks": 0,
        "open_issues": 0,
        "watchers": 0,
        "default_branch": default_branch,
        "stargazers": 0,
        "master_branch": default_branch,
        "is_template": false,
        "topics": [],
        "visibility": "private",
        "web_commit_signoff_required": false,
        "custom_properties": {},
    });
    if let (Value::Object(repository), Value::Object(details)) = (&mut repository, details) {
        repository.extend(details);
    }
    json!({
        "ref": format!("refs/heads/{branch}"),
        "before": before,
        "after": after,
        "repository": repository,
        "pusher": {"name": SIM_LOGIN, "email": format!("{SIM_LOGIN}@users.noreply.github.com")},
        "sender": user_json(base, SIM_LOGIN),
        "created": created,
        "deleted": deleted,
        "forced": forced,
        "base_ref": null,
        "compare": compare,
        "commits": commits,
        "head_commit": head_commit,
    })
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

pub(super) async fn gitlab_delivery(
    state: &SimState,
    repo: &str,
    branch: &str,
    before: &str,
    after: &str,
    token: &str,
) -> Delivery {
    let payload = gitlab_payload(state, repo, branch, before, after).await;
    gitlab_signed(state, "Push Hook", &payload, token)
}

/// A GitLab delivery of `event` with the headers GitLab sends, carrying `X-Gitlab-Token`
/// unless `token` is empty.
pub(super) fn gitlab_signed(
    state: &SimState,
    event: &str,
    payload: &Value,
    token: &str,
) -> Delivery {
    let body = serde_json::to_vec(payload).unwrap_or_default();
    let mut headers = vec![
        ("content-type", "application/json".to_string()),
        ("user-agent", "GitLab/19.0.0".to_string()),
        ("x-gitlab-event", event.to_string()),
        ("idempotency-key", random_uuid()),
        ("x-gitlab-event-uuid", random_uuid()),
        ("x-gitlab-webhook-uuid", random_uuid()),
        ("x-gitlab-instance", format!("{}/gitlab", state.base_url)),
    ];
    if !token.is_empty() {
        headers.push(("x-gitlab-token", token.to_string()));
    }
    Delivery { body, headers }
}

async fn gitlab_payload(
    state: &SimState,
    repo: &str,
    branch: &str,
    before: &str,
    after: &str,
) -> Value {
    let entry = state.repo(repo);
    let path = entry
        .as_ref()
        .map_or_else(|| repo.to_string(), |e| e.full_name.clone());
    let project_id = entry.as_ref().map_or(0, |e| e.project_id);
    let (namespace, name) = path.rsplit_once('/').unwrap_or(("", &path));
    let web = format!("{}/gitlab/{path}", state.base_url);
    let ssh = format!("git@127.0.0.1:{path}.git");
    let default_branch = match &entry {
        Some(e) => e.git.default_branch().await.ok().flatten(),
        None => None,
    }
    .unwrap_or_else(|| "main".to_string());
    let (pushed, total, _) =
        history(entry.as_ref(), branch, before, after, GITLAB_COMMIT_LIMIT).await;
    let commits: Vec<Value> = pushed
        .iter()
        .map(|p| {
            let c = &p.commit;
            json!({
                "id": c.sha,
                "message": c.message,
                "title": c.title(),
                "timestamp": c.committer.iso,
                "url": format!("{web}/-/commit/{}", c.sha),
                "author": {"name": c.author.name, "email": c.author.email},
                "added": p.added,
                "modified": p.modified,
                "removed": p.removed,
            })
        })
        .collect();
    let deleted = after == ZERO_SHA;
    json!({
        "object_kind": "push",
        "event_name": "push",
        "before": before,
        "after": after,
        "ref": format!("refs/heads/{branch}"),
        "ref_protected": branch == default_branch,
        "checkout_sha": if deleted { Value::Null } else { after.into() },
        "message": null,
        "user_id": 1,
        "user_name": "driftless simulator",
        "user_username": "driftless-sim",
        "user_email": "",
        "user_avatar": format!("{}/gitlab/uploads/avatar.png", state.base_url),
        "project_id": project_id,
        "project": {
            "id": project_id,
            "name": name,
            "description": "",
            "web_url": web,
            "avatar_url": null,
            "git_ssh_url": ssh,
            "git_http_url": format!("{web}.git"),
            "namespace": namespace,
            "visibility_level": 0,
            "path_with_namespace": path,
            "default_branch": default_branch,
            "ci_config_path": null,
            "homepage": web,
            "url": ssh,
            "ssh_url": ssh,
            "http_url": format!("{web}.git"),
        },
        "commits": commits,
        "total_commits_count": total,
        "push_options": {},
        "repository": {
            "name": name,
            "url": ssh,
            "description": "",
            "homepage": web,
            "git_http_url": format!("{web}.git"),
            "git_ssh_url": ssh,
            "visibility_level": 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_the_rfc_4231_vector() {
        // RFC 4231, test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
