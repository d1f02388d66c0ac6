//! GitLab deliveries: the signing token (Standard Webhooks: HMAC-SHA256 over
//! `{webhook-id}.{webhook-timestamp}.{body}`, any of several `v1,<base64>` values may match,
//! timestamp within five minutes), required whenever a signing key is configured; else the
//! plain `X-Gitlab-Token`, compared as fixed-size digests in constant time; and the
//! `Push Hook` / `Tag Push Hook` payloads.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::github::check_sha;
use super::{
    payload_error, Event, GitRef, PullRequestAction, PullRequestEvent, PushEvent, WebhookError,
    ZERO_SHA,
};
use crate::settings::{ForgeKind, Secret};

pub const EVENT_HEADER: &str = "X-Gitlab-Event";
pub const TOKEN_HEADER: &str = "X-Gitlab-Token";
pub const SIGNATURE_HEADER: &str = "webhook-signature";
pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
pub const UUID_HEADER: &str = "X-Gitlab-Event-UUID";

/// How far `webhook-timestamp` may be from now: GitLab names no window, five minutes is the
/// Standard Webhooks recommendation and bounds how long a captured delivery can be replayed.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 300;

/// The secrets a GitLab delivery is checked against. Plain tokens are kept only as SHA-256
/// digests, so a comparison always runs over 32 bytes and its time tells nothing about the
/// length of the token configured or presented; `Debug` shows neither tokens nor keys.
#[derive(Clone, Default)]
pub struct GitlabSecrets {
    /// Digests of the plain tokens (current, then previous during a rotation).
    tokens: Vec<[u8; 32]>,
    /// Decoded signing keys (the bytes after `whsec_`), never empty.
    signing_keys: Vec<Vec<u8>>,
}

impl GitlabSecrets {
    /// The plain tokens and decoded signing keys (see [`signing_key`]) a delivery may prove.
    pub fn new(tokens: &[Secret], signing_keys: Vec<Vec<u8>>) -> Self {
        Self {
            tokens: tokens
                .iter()
                .map(|t| Sha256::digest(t.expose().as_bytes()).into())
                .collect(),
            signing_keys,
        }
    }
}

impl std::fmt::Debug for GitlabSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitlabSecrets")
            .field("tokens", &self.tokens.len())
            .field("signing_keys", &self.signing_keys.len())
            .finish()
    }
}

/// Decodes a `whsec_<base64>` signing token into its key bytes. An empty key is refused: an
/// HMAC under it proves nothing, anyone can compute it.
pub fn signing_key(token: &str) -> Result<Vec<u8>, String> {
    let b64 = token.strip_prefix("whsec_").unwrap_or(token);
    let key = BASE64
        .decode(b64)
        .map_err(|_| "a signing token is \"whsec_\" followed by base64".to_string())?;
    if key.is_empty() {
        return Err(
            "the signing key is empty: a signing token is \"whsec_\" followed by the base64 of \
             the key GitLab shows for the webhook"
                .to_string(),
        );
    }
    Ok(key)
}

/// The headers that carry GitLab's proof, as raw bytes. `Debug` shows whether the token and
/// signature were sent, never their values.
#[derive(Default, Clone, Copy)]
pub struct ProofHeaders<'a> {
    pub token: Option<&'a [u8]>,
    pub signature: Option<&'a [u8]>,
    pub id: Option<&'a [u8]>,
    pub timestamp: Option<&'a [u8]>,
}

impl std::fmt::Debug for ProofHeaders<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |v: Option<&[u8]>| v.map(|b| String::from_utf8_lossy(b).into_owned());
        f.debug_struct("ProofHeaders")
            .field("token", &self.token.map(|_| "<redacted>"))
            .field("signature", &self.signature.map(|_| "<redacted>"))
            .field("id", &shown(self.id))
            .field("timestamp", &shown(self.timestamp))
            .finish()
    }
}

/// Verifies a delivery. With a signing key configured the signature is required and is the
/// only proof accepted: a plain token (the weaker secret, perhaps still set on an old hook)
/// never stands in for a missing signature. Without one, the plain token is required.
pub fn verify(
    secrets: &GitlabSecrets,
    headers: ProofHeaders<'_>,
    body: &[u8],
    now_unix: i64,
) -> Result<(), WebhookError> {
    if !secrets.signing_keys.is_empty() {
        let signature = headers.signature.ok_or(WebhookError::MissingSignature {
            header: SIGNATURE_HEADER,
        })?;
        return verify_signature(&secrets.signing_keys, signature, headers, body, now_unix);
    }
    if secrets.tokens.is_empty() {
        return Err(WebhookError::MissingSignature {
            header: SIGNATURE_HEADER,
        });
    }
    let token = headers.token.ok_or(WebhookError::MissingSignature {
        header: TOKEN_HEADER,
    })?;
    let presented: [u8; 32] = Sha256::digest(token).into();
    let mut ok = subtle::Choice::from(0);
    for expected in &secrets.tokens {
        ok |= expected.ct_eq(&presented);
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(WebhookError::BadToken)
    }
}

fn verify_signature(
    keys: &[Vec<u8>],
    signature: &[u8],
    headers: ProofHeaders<'_>,
    body: &[u8],
    now_unix: i64,
) -> Result<(), WebhookError> {
    let malformed = |reason| WebhookError::MalformedSignature {
        header: SIGNATURE_HEADER,
        reason,
    };
    let id = headers
        .id
        .ok_or(WebhookError::MissingSignature { header: ID_HEADER })?;
    let ts_raw = headers.timestamp.ok_or(WebhookError::MissingSignature {
        header: TIMESTAMP_HEADER,
    })?;
    let timestamp: i64 = std::str::from_utf8(ts_raw)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or(WebhookError::MalformedSignature {
            header: TIMESTAMP_HEADER,
            reason: "expected Unix seconds",
        })?;
    if now_unix.saturating_sub(timestamp).saturating_abs() > TIMESTAMP_TOLERANCE_SECS {
        return Err(WebhookError::StaleTimestamp { timestamp });
    }
    let text = std::str::from_utf8(signature).map_err(|_| malformed("not ASCII"))?;
    let mut candidates = Vec::new();
    for part in text.split_ascii_whitespace() {
        // Other versions may be listed beside v1; only v1 (HMAC-SHA256) is defined.
        if let Some(b64) = part.strip_prefix("v1,") {
            if let Ok(d) = BASE64.decode(b64) {
                candidates.push(d);
            }
        }
    }
    if candidates.is_empty() {
        return Err(malformed("expected space-separated v1,<base64> values"));
    }
    let mut ok = false;
    for key in keys {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
        mac.update(id);
        mac.update(b".");
        mac.update(ts_raw);
        mac.update(b".");
        mac.update(body);
        for c in &candidates {
            ok |= mac.clone().verify_slice(c).is_ok();
        }
    }
    if ok {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// `v1,<base64>` for a delivery, as GitLab computes it (used by tests and the simulator).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

#[derive(Deserialize)]
struct PushPayload {
    object_kind: String,
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    project: Project,
}

#[derive(Deserialize)]
struct Project {
    path_with_namespace: String,
}

#[derive(Deserialize)]
struct MergeRequestPayload {
    object_kind: String,
    project: Project,
    object_attributes: MergeRequestAttributes,
}

#[derive(Deserialize)]
struct MergeRequestAttributes {
    iid: u64,
    target_branch: String,
    /// `null` when the source project was deleted.
    source_project_id: Option<u64>,
    target_project_id: u64,
    last_commit: Option<LastCommit>,
    /// Absent on some system-generated deliveries; those change nothing a preview shows.
    #[serde(default)]
    action: Option<String>,
}

#[derive(Deserialize)]
struct LastCommit {
    id: String,
}

/// A `Merge Request Hook` delivery: open, reopen, update (a new head, or an edit: the preview
/// is made again either way), close and merge become an event; approvals and the like are
/// ignored.
fn merge_request(body: &[u8]) -> Result<Event, WebhookError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let p: MergeRequestPayload = serde_path_to_error::deserialize(de).map_err(payload_error)?;
    if p.object_kind != "merge_request" {
        return Err(WebhookError::InvalidPayload(format!(
            "object_kind: Merge Request Hook carries \"merge_request\", got {:?}",
            p.object_kind
        )));
    }
    let a = p.object_attributes;
    let action = match a.action.as_deref().unwrap_or("") {
        "open" | "reopen" | "update" => PullRequestAction::Updated,
        "close" => PullRequestAction::Closed,
        "merge" => PullRequestAction::Merged,
        other => {
            return Ok(Event::Ignored {
                event: format!("merge_request.{other}"),
            })
        }
    };
    let head_sha = a.last_commit.map(|c| c.id).ok_or_else(|| {
        WebhookError::InvalidPayload("object_attributes.last_commit: missing".into())
    })?;
    check_sha("object_attributes.last_commit.id", &head_sha)?;
    Ok(Event::PullRequest(PullRequestEvent {
        forge: ForgeKind::Gitlab,
        repo: p.project.path_with_namespace,
        number: a.iid,
        action,
        base_branch: a.target_branch,
        head_sha,
        from_fork: a.source_project_id != Some(a.target_project_id),
    }))
}

/// Parses a verified delivery. `event` is the `X-Gitlab-Event` header.
pub fn parse(event: &str, body: &[u8]) -> Result<Event, WebhookError> {
    let expected_kind = match event {
        "Push Hook" => "push",
        "Tag Push Hook" => "tag_push",
        "Merge Request Hook" => return merge_request(body),
        other => {
            return Ok(Event::Ignored {
                event: other.to_string(),
            })
        }
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    let p: PushPayload = serde_path_to_error::deserialize(de).map_err(payload_error)?;
    if p.object_kind != expected_kind {
        return Err(WebhookError::InvalidPayload(format!(
            "object_kind: {event} carries {expected_kind:?}, got {:?}",
            p.object_kind
        )));
    }
    check_sha("before", &p.before)?;
    check_sha("after", &p.after)?;
    Ok(Event::Push(PushEvent {
        forge: ForgeKind::Gitlab,
        repo: p.project.path_with_namespace,
        git_ref: GitRef::parse(&p.git_ref),
        created: p.before == ZERO_SHA,
        deleted: p.after == ZERO_SHA,
        forced: false,
        before: p.before,
        after: p.after,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/gitlab/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
    }

    const VECTOR_TOKEN: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const VECTOR_ID: &str = "f5e5f430-f57b-4e6e-9fac-d9128cd7232f";
    const VECTOR_TS: i64 = 1744578123;
    const VECTOR_SIG: &str = "v1,JLr1TUpVl7HwcPinA5UmHsDYquXT9bJCMveVwM+wWTA=";

    fn signing() -> GitlabSecrets {
        GitlabSecrets::new(&[], vec![signing_key(VECTOR_TOKEN).unwrap()])
    }

    fn headers<'a>(sig: &'a str, ts: &'a str) -> ProofHeaders<'a> {
        ProofHeaders {
            token: None,
            signature: Some(sig.as_bytes()),
            id: Some(VECTOR_ID.as_bytes()),
            timestamp: Some(ts.as_bytes()),
        }
    }

    #[test]
    fn documented_test_vector() {
        let key = signing_key(VECTOR_TOKEN).unwrap();
        assert_eq!(key, (0u8..32).collect::<Vec<_>>());
        assert_eq!(
            sign(&key, VECTOR_ID, VECTOR_TS, b"Hello, World!"),
            VECTOR_SIG
        );
        let ts = VECTOR_TS.to_string();
        assert_eq!(
            verify(
                &signing(),
                headers(VECTOR_SIG, &ts),
                b"Hello, World!",
                VECTOR_TS + 10
            ),
            Ok(())
        );
        // Any one of several listed signatures may match.
        let several = format!("v1,AAAA v2,xyz {VECTOR_SIG}");
        assert_eq!(
            verify(
                &signing(),
                headers(&several, &ts),
                b"Hello, World!",
                VECTOR_TS
            ),
            Ok(())
        );
    }

    #[test]
    fn signature_failures() {
        let ts = VECTOR_TS.to_string();
        assert_eq!(
            verify(
                &signing(),
                headers(VECTOR_SIG, &ts),
                b"Hello, World?",
                VECTOR_TS
            ),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(
                &signing(),
                headers(VECTOR_SIG, &ts),
                b"Hello, World!",
                VECTOR_TS + 301
            ),
            Err(WebhookError::StaleTimestamp {
                timestamp: VECTOR_TS
            })
        );
        assert!(matches!(
            verify(
                &signing(),
                headers("garbage", &ts),
                b"Hello, World!",
                VECTOR_TS
            ),
            Err(WebhookError::MalformedSignature { .. })
        ));
        assert!(matches!(
            verify(
                &signing(),
                headers(VECTOR_SIG, "soon"),
                b"Hello, World!",
                VECTOR_TS
            ),
            Err(WebhookError::MalformedSignature { .. })
        ));
        // No signature and no token configured: nothing proves the sender.
        let none = ProofHeaders::default();
        assert!(matches!(
            verify(&signing(), none, b"x", VECTOR_TS),
            Err(WebhookError::MissingSignature { .. })
        ));
    }

    #[test]
    fn token_fallback() {
        let secrets = GitlabSecrets::new(&[Secret::new("tok-new"), Secret::new("tok-old")], vec![]);
        let with = |t: &'static str| ProofHeaders {
            token: Some(t.as_bytes()),
            ..Default::default()
        };
        assert_eq!(verify(&secrets, with("tok-old"), b"{}", 0), Ok(()));
        assert_eq!(verify(&secrets, with("tok-new"), b"{}", 0), Ok(()));
        assert_eq!(
            verify(&secrets, with("tok"), b"{}", 0),
            Err(WebhookError::BadToken)
        );
        assert!(matches!(
            verify(&secrets, ProofHeaders::default(), b"{}", 0),
            Err(WebhookError::MissingSignature { .. })
        ));
        // Tokens of any length that are not the token fail alike.
        for wrong in ["", "t", "tok-ne", "tok-nex", "tok-new-and-more"] {
            assert_eq!(
                verify(&secrets, with(wrong), b"{}", 0),
                Err(WebhookError::BadToken),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn a_signing_key_makes_the_signature_required() {
        let secrets = GitlabSecrets::new(
            &[Secret::new("tok")],
            vec![signing_key(VECTOR_TOKEN).unwrap()],
        );
        let token_only = ProofHeaders {
            token: Some(b"tok"),
            ..Default::default()
        };
        assert_eq!(
            verify(&secrets, token_only, b"Hello, World!", VECTOR_TS),
            Err(WebhookError::MissingSignature {
                header: SIGNATURE_HEADER
            })
        );
        let ts = VECTOR_TS.to_string();
        let signed = ProofHeaders {
            token: Some(b"not the token"),
            ..headers(VECTOR_SIG, &ts)
        };
        assert_eq!(
            verify(&secrets, signed, b"Hello, World!", VECTOR_TS),
            Ok(())
        );
    }

    #[test]
    fn empty_or_malformed_signing_keys_are_refused() {
        for bad in ["whsec_", "", "whsec_====", "whsec_not base64!"] {
            assert!(signing_key(bad).is_err(), "{bad:?}");
        }
        assert!(signing_key("whsec_")
            .unwrap_err()
            .contains("the signing key is empty"));
    }

    #[test]
    fn fixtures_parse() {
        let Event::Push(p) = parse("Push Hook", &fixture("push.json")).unwrap() else {
            panic!()
        };
        assert_eq!(p.repo, "mike/diaspora");
        assert_eq!(p.git_ref, GitRef::Branch("master".into()));
        assert!(!p.created && !p.deleted);
        let Event::Push(p) = parse("Tag Push Hook", &fixture("tag_push.json")).unwrap() else {
            panic!()
        };
        assert!(matches!(p.git_ref, GitRef::Tag(_)));
        // The event header and object_kind must agree.
        assert!(parse("Tag Push Hook", &fixture("push.json")).is_err());
        assert_eq!(
            parse("Issue Hook", b"{}").unwrap(),
            Event::Ignored {
                event: "Issue Hook".into()
            }
        );
    }

    fn merge_request_with(action: &str) -> serde_json::Value {
        let mut v: serde_json::Value =
            serde_json::from_slice(&fixture("merge_request.json")).unwrap();
        v["object_attributes"]["action"] = action.into();
        v
    }

    fn parse_merge_request(v: &serde_json::Value) -> Event {
        parse("Merge Request Hook", &serde_json::to_vec(v).unwrap()).unwrap()
    }

    #[test]
    fn documented_merge_request_parses() {
        let Event::PullRequest(pr) =
            parse("Merge Request Hook", &fixture("merge_request.json")).unwrap()
        else {
            panic!("the documented merge request is not a pull request event")
        };
        assert_eq!(
            pr,
            PullRequestEvent {
                forge: ForgeKind::Gitlab,
                repo: "gitlabhq/gitlab-test".into(),
                number: 1,
                action: PullRequestAction::Updated,
                base_branch: "master".into(),
                head_sha: "da1560886d4f094c3e6c9ef40349f7d38b5d27d7".into(),
                // source_project_id and target_project_id are both 14.
                from_fork: false,
            }
        );
        // The event header and object_kind must agree.
        assert!(parse("Push Hook", &fixture("merge_request.json")).is_err());
    }

    /// The documented example is an `open`; the other documented `action` values on the
    /// same payload.
    #[test]
    fn merge_request_actions() {
        for (action, expected) in [
            ("reopen", PullRequestAction::Updated),
            ("update", PullRequestAction::Updated),
            ("close", PullRequestAction::Closed),
            ("merge", PullRequestAction::Merged),
        ] {
            let Event::PullRequest(pr) = parse_merge_request(&merge_request_with(action)) else {
                panic!("{action} is not a pull request event")
            };
            assert_eq!(pr.action, expected, "{action}");
        }
        for action in ["approved", "unapproved", "approval", "unapproval"] {
            assert_eq!(
                parse_merge_request(&merge_request_with(action)),
                Event::Ignored {
                    event: format!("merge_request.{action}")
                }
            );
        }
    }

    #[test]
    fn merge_request_from_another_project_is_a_fork() {
        let mut v = merge_request_with("open");
        v["object_attributes"]["source_project_id"] = 15.into();
        let Event::PullRequest(pr) = parse_merge_request(&v) else {
            panic!()
        };
        assert!(pr.from_fork);
        v["object_attributes"]["source_project_id"] = serde_json::Value::Null;
        let Event::PullRequest(pr) = parse_merge_request(&v) else {
            panic!()
        };
        assert!(pr.from_fork, "a deleted source project counts as a fork");
    }

    #[test]
    fn older_payload_shape_without_new_fields() {
        let mut v: serde_json::Value = serde_json::from_slice(&fixture("push.json")).unwrap();
        for k in ["message", "push_options"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v["project"]
            .as_object_mut()
            .unwrap()
            .remove("ci_config_path");
        assert!(parse("Push Hook", &serde_json::to_vec(&v).unwrap()).is_ok());
    }
}
