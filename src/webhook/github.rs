//! GitHub deliveries: `X-Hub-Signature-256` verification (HMAC-SHA256 of the raw body, checked
//! in constant time before any parsing) and the `push` / `ping` payloads.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{
    payload_error, Event, GitRef, PullRequestAction, PullRequestEvent, PushEvent, WebhookError,
    ZERO_SHA,
};
use crate::settings::{ForgeKind, Secret};

pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
pub const EVENT_HEADER: &str = "X-GitHub-Event";
pub const DELIVERY_HEADER: &str = "X-GitHub-Delivery";

/// Checks `X-Hub-Signature-256` against each accepted secret (current, then previous during a
/// rotation). Only the SHA-256 form is accepted; the legacy SHA-1 header alone is refused.
pub fn verify_signature(
    secrets: &[Secret],
    header: Option<&[u8]>,
    body: &[u8],
) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::MissingSignature {
        header: SIGNATURE_HEADER,
    })?;
    let hex_digest = header
        .strip_prefix(b"sha256=")
        .ok_or(WebhookError::MalformedSignature {
            header: SIGNATURE_HEADER,
            reason: "expected sha256=<hex>",
        })?;
    let digest = hex::decode(hex_digest).map_err(|_| WebhookError::MalformedSignature {
        header: SIGNATURE_HEADER,
        reason: "the digest is not hexadecimal",
    })?;
    if digest.len() != 32 {
        return Err(WebhookError::MalformedSignature {
            header: SIGNATURE_HEADER,
            reason: "the digest is not 32 bytes",
        });
    }
    let mut ok = false;
    for secret in secrets {
        // Every secret is tried so the time taken does not tell which one matched.
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(body);
        ok |= mac.verify_slice(&digest).is_ok();
    }
    if ok {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// `sha256=<hex>` for a body, as GitHub computes it (used by tests and the forge simulator).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    forced: bool,
    repository: Repository,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
}

#[derive(Deserialize)]
struct PullRequestPayload {
    action: String,
    number: u64,
    pull_request: PullRequest,
}

#[derive(Deserialize)]
struct PullRequest {
    #[serde(default)]
    merged: bool,
    head: PullRequestEnd,
    base: PullRequestEnd,
}

#[derive(Deserialize)]
struct PullRequestEnd {
    #[serde(rename = "ref")]
    branch: String,
    sha: String,
    /// `null` when the head's fork was deleted.
    repo: Option<Repository>,
}

/// A `pull_request` delivery: the actions that change what a preview shows become an event,
/// the others (labels, reviews, edits of the title) are ignored.
fn pull_request(body: &[u8]) -> Result<Event, WebhookError> {
    let p: PullRequestPayload = from_slice(body)?;
    let action = match p.action.as_str() {
        "opened" | "reopened" | "synchronize" => PullRequestAction::Updated,
        "closed" if p.pull_request.merged => PullRequestAction::Merged,
        "closed" => PullRequestAction::Closed,
        other => {
            return Ok(Event::Ignored {
                event: format!("pull_request.{other}"),
            })
        }
    };
    check_sha("pull_request.head.sha", &p.pull_request.head.sha)?;
    let base_repo =
        p.pull_request.base.repo.ok_or_else(|| {
            WebhookError::InvalidPayload("pull_request.base.repo: missing".into())
        })?;
    let from_fork = p
        .pull_request
        .head
        .repo
        .as_ref()
        .is_none_or(|h| !h.full_name.eq_ignore_ascii_case(&base_repo.full_name));
    Ok(Event::PullRequest(PullRequestEvent {
        forge: ForgeKind::Github,
        repo: base_repo.full_name,
        number: p.number,
        action,
        base_branch: p.pull_request.base.branch,
        head_sha: p.pull_request.head.sha,
        from_fork,
    }))
}

#[derive(Deserialize)]
struct PingPayload {
    #[serde(default)]
    hook_id: Option<u64>,
}

/// Parses a verified delivery. `event` is the `X-GitHub-Event` header.
pub fn parse(event: &str, body: &[u8]) -> Result<Event, WebhookError> {
    match event {
        "push" => {
            let p: PushPayload = from_slice(body)?;
            check_sha("before", &p.before)?;
            check_sha("after", &p.after)?;
            let deleted = p.deleted || p.after == ZERO_SHA;
            Ok(Event::Push(PushEvent {
                forge: ForgeKind::Github,
                repo: p.repository.full_name,
                git_ref: GitRef::parse(&p.git_ref),
                created: p.created || p.before == ZERO_SHA,
                deleted,
                forced: p.forced,
                before: p.before,
                after: p.after,
            }))
        }
        "ping" => {
            let p: PingPayload = from_slice(body)?;
            Ok(Event::Ping { hook_id: p.hook_id })
        }
        "pull_request" => pull_request(body),
        other => Ok(Event::Ignored {
            event: other.to_string(),
        }),
    }
}

fn from_slice<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, WebhookError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(payload_error)
}

pub(super) fn check_sha(field: &str, sha: &str) -> Result<(), WebhookError> {
    if sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(WebhookError::InvalidPayload(format!(
            "{field}: expected a 40-character commit SHA"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/github/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
    }

    fn secrets(s: &[&str]) -> Vec<Secret> {
        s.iter().map(|s| Secret::new(*s)).collect()
    }

    #[test]
    fn signature_checks() {
        let body = fixture("push-5.json");
        let good = sign("topsecret", &body);
        let keys = secrets(&["topsecret"]);
        assert_eq!(
            verify_signature(&keys, Some(good.as_bytes()), &body),
            Ok(())
        );
        // Rotation: the previous secret is still accepted.
        let both = secrets(&["new", "topsecret"]);
        assert_eq!(
            verify_signature(&both, Some(good.as_bytes()), &body),
            Ok(())
        );

        let mut tampered = body.clone();
        tampered[10] ^= 1;
        assert_eq!(
            verify_signature(&keys, Some(good.as_bytes()), &tampered),
            Err(WebhookError::BadSignature)
        );
        assert!(matches!(
            verify_signature(&keys, None, &body),
            Err(WebhookError::MissingSignature { .. })
        ));
        let sha1 = b"sha1=0123456789abcdef0123456789abcdef01234567";
        assert!(matches!(
            verify_signature(&keys, Some(sha1), &body),
            Err(WebhookError::MalformedSignature { .. })
        ));
        assert!(matches!(
            verify_signature(&keys, Some(b"sha256=zz"), &body),
            Err(WebhookError::MalformedSignature { .. })
        ));
        assert!(matches!(
            verify_signature(&keys, Some(b"sha256=abcd"), &body),
            Err(WebhookError::MalformedSignature { .. })
        ));
        let wrong = sign("other", &body);
        assert_eq!(
            verify_signature(&keys, Some(wrong.as_bytes()), &body),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn every_fixture_parses() {
        for n in 1..=7 {
            let body = fixture(&format!("push-{n}.json"));
            let Event::Push(p) = parse("push", &body).unwrap() else {
                panic!("push-{n} is not a push")
            };
            assert_eq!(p.repo, "Codertocat/Hello-World");
            assert_eq!(p.deleted, p.after == ZERO_SHA, "push-{n}");
        }
        for n in 1..=4 {
            let body = fixture(&format!("ping-{n}.json"));
            assert_eq!(
                parse("ping", &body).unwrap(),
                Event::Ping {
                    hook_id: Some(109948940)
                }
            );
        }
    }

    #[test]
    fn push_fields() {
        let Event::Push(p) = parse("push", &fixture("push-5.json")).unwrap() else {
            panic!()
        };
        assert_eq!(p.git_ref, GitRef::Branch("master".into()));
        assert!(p.created && !p.deleted && !p.forced);
        let Event::Push(p) = parse("push", &fixture("push-2.json")).unwrap() else {
            panic!()
        };
        assert_eq!(p.git_ref, GitRef::Tag("simple-tag".into()));
        assert!(p.deleted);
    }

    #[test]
    fn forced_push_is_reported() {
        let mut v: serde_json::Value = serde_json::from_slice(&fixture("push-5.json")).unwrap();
        v["forced"] = true.into();
        v["created"] = false.into();
        v["before"] = "1".repeat(40).into();
        let Event::Push(p) = parse("push", &serde_json::to_vec(&v).unwrap()).unwrap() else {
            panic!()
        };
        assert!(p.forced && !p.created);
    }

    #[test]
    fn bad_payloads_name_the_field() {
        let e = parse("push", br#"{"ref": 5}"#).unwrap_err();
        assert!(e.to_string().contains("ref"), "{e}");
        let e = parse("push", b"not json").unwrap_err();
        assert!(matches!(e, WebhookError::InvalidPayload(_)));
        let mut v: serde_json::Value = serde_json::from_slice(&fixture("push-5.json")).unwrap();
        v["after"] = "xyz".into();
        let e = parse("push", &serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(e.to_string().contains("after"), "{e}");
        let e = parse(
            "push",
            br#"{"ref":"refs/heads/x","before":"0","after":"0"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("repository"), "{e}");
    }

    /// Every real `pull_request` example of the actions driftless handles (the file number is
    /// the example's position in `@octokit/webhooks-examples`), and the event it must become.
    const PULL_REQUEST_FIXTURES: [(u32, &str, PullRequestAction); 9] = [
        (1, "opened", PullRequestAction::Updated),
        (4, "closed", PullRequestAction::Closed),
        (5, "closed", PullRequestAction::Closed),
        (13, "opened", PullRequestAction::Updated),
        (14, "opened", PullRequestAction::Updated),
        (15, "opened", PullRequestAction::Updated),
        (19, "reopened", PullRequestAction::Updated),
        (20, "reopened", PullRequestAction::Updated),
        (23, "synchronize", PullRequestAction::Updated),
    ];

    fn pull_request_fixture(n: u32) -> serde_json::Value {
        serde_json::from_slice(&fixture(&format!("pull_request-{n}.json"))).unwrap()
    }

    fn parse_pull_request(v: &serde_json::Value) -> PullRequestEvent {
        match parse("pull_request", &serde_json::to_vec(v).unwrap()).unwrap() {
            Event::PullRequest(pr) => pr,
            other => panic!("not a pull request event: {other:?}"),
        }
    }

    #[test]
    fn every_pull_request_fixture_parses() {
        for (n, action, expected) in PULL_REQUEST_FIXTURES {
            let body = fixture(&format!("pull_request-{n}.json"));
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["action"], action, "pull_request-{n}");
            let Event::PullRequest(pr) = parse("pull_request", &body).unwrap() else {
                panic!("pull_request-{n} is not a pull request event")
            };
            assert_eq!(
                pr,
                PullRequestEvent {
                    forge: ForgeKind::Github,
                    repo: "Codertocat/Hello-World".into(),
                    number: 2,
                    action: expected,
                    base_branch: "master".into(),
                    head_sha: "ec26c3e57ca3a959ca5aad62de7213c562f8c821".into(),
                    from_fork: false,
                },
                "pull_request-{n}"
            );
            // The head branch is not what the base branch is: the right `ref` was read.
            assert_eq!(v["pull_request"]["head"]["ref"], "changes");
        }
    }

    /// No example of 7.6.1 is merged or comes from a fork: these flip exactly the field
    /// GitHub sets in those cases on a real example, nothing else.
    #[test]
    fn merged_and_fork_pull_requests_from_real_examples() {
        let mut merged = pull_request_fixture(4);
        merged["pull_request"]["merged"] = true.into();
        assert_eq!(
            parse_pull_request(&merged).action,
            PullRequestAction::Merged
        );

        let mut fork = pull_request_fixture(1);
        fork["pull_request"]["head"]["repo"]["full_name"] = "someone/Hello-World".into();
        let pr = parse_pull_request(&fork);
        assert!(pr.from_fork);
        // The base repository is the one apps are matched against, not the head's.
        assert_eq!(pr.repo, "Codertocat/Hello-World");

        // A head whose fork was deleted: `repo` is null, and it counts as a fork.
        let mut deleted = pull_request_fixture(23);
        deleted["pull_request"]["head"]["repo"] = serde_json::Value::Null;
        assert!(parse_pull_request(&deleted).from_fork);

        // The same repository spelled in another case is no fork.
        let mut case = pull_request_fixture(19);
        case["pull_request"]["head"]["repo"]["full_name"] = "codertocat/hello-world".into();
        assert!(!parse_pull_request(&case).from_fork);
    }

    #[test]
    fn other_pull_request_actions_are_ignored() {
        let mut labeled = pull_request_fixture(1);
        labeled["action"] = "labeled".into();
        assert_eq!(
            parse("pull_request", &serde_json::to_vec(&labeled).unwrap()).unwrap(),
            Event::Ignored {
                event: "pull_request.labeled".into()
            }
        );
    }

    #[test]
    fn other_events_are_ignored() {
        assert_eq!(
            parse("issues", b"{}").unwrap(),
            Event::Ignored {
                event: "issues".into()
            }
        );
    }
}
