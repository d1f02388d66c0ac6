//! The webhook receiver over HTTP (actix's test service): signatures checked before anything
//! else, matching, deduplication, limits, and the responses a forge sees.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{test, web, App};
use driftless::metrics::Metrics;
use driftless::queue::{JobQueue, JobReason};
use driftless::server::{routes, Receiver};
use driftless::settings::Settings;
use driftless::webhook::{github, gitlab};
use serde_json::Value;

use crate::support::fixture;

const GH_SECRET: &str = "gh-secret-for-tests";
const GH_OLD_SECRET: &str = "gh-old-secret";
const GL_TOKEN: &str = "gl-token-for-tests";
const GL_SIGNING: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

struct Harness {
    _dir: tempfile::TempDir,
    queue: Arc<JobQueue>,
    receiver: web::Data<Receiver>,
}

/// A receiver for the three apps; GitLab deliveries prove the plain token, or with `signing`
/// the Standard Webhooks signature (then required).
fn harness_with(server: &str, signing: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, value: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        p.display().to_string()
    };
    let text = format!(
        r#"
[server]
{server}
[forges.github]
token_file = "{gh_token}"
webhook_secret_file = "{gh_secret}"
previous_webhook_secret_file = "{gh_old}"
[forges.gitlab]
token_file = "{gl_api}"
webhook_token_file = "{gl_token}"
{signing}
[[apps]]
name = "hello"
forge = "github"
repo = "Codertocat/Hello-World"
branch = "master"
[[apps]]
name = "hello-api"
forge = "github"
repo = "codertocat/hello-world"
branch = "master"
path = "api"
[[apps]]
name = "diaspora"
forge = "gitlab"
repo = "mike/diaspora"
branch = "master"
"#,
        gh_token = write("gh-token", "ghp_x"),
        gh_secret = write("gh-secret", GH_SECRET),
        gh_old = write("gh-old", GH_OLD_SECRET),
        gl_api = write("gl-api", "glpat-x"),
        gl_token = write("gl-token", GL_TOKEN),
        signing = if signing {
            format!(
                "signing_token_file = \"{}\"",
                write("gl-signing", GL_SIGNING)
            )
        } else {
            String::new()
        },
    );
    let settings = Settings::from_toml_str(&text).unwrap();
    let queue = Arc::new(JobQueue::new());
    let receiver =
        web::Data::new(Receiver::new(&settings, queue.clone(), Arc::new(Metrics::new())).unwrap());
    Harness {
        _dir: dir,
        queue,
        receiver,
    }
}

fn harness() -> Harness {
    harness_with("", false)
}

/// GitLab deliveries must carry a signature made with [`GL_SIGNING`].
fn signing_harness() -> Harness {
    harness_with("", true)
}

macro_rules! app {
    ($h:expr) => {
        test::init_service(App::new().app_data($h.receiver.clone()).configure(routes)).await
    };
}

/// A push to refs/heads/master of Codertocat/Hello-World (fixture push-5, a branch creation).
fn branch_push() -> Vec<u8> {
    fixture("github/push-5.json")
}

fn github_request(event: &str, body: &[u8], signature: Option<String>) -> test::TestRequest {
    let mut req = test::TestRequest::post()
        .uri("/hooks/github")
        .insert_header(("Content-Type", "application/json"))
        .insert_header(("X-GitHub-Event", event))
        .insert_header(("X-GitHub-Delivery", format!("{:x}", rand::random::<u128>())))
        .set_payload(body.to_vec());
    if let Some(sig) = signature {
        req = req.insert_header(("X-Hub-Signature-256", sig));
    }
    req
}

/// A correctly signed push delivery carrying the delivery id `id`, as a forge repeats it.
fn signed_push_with_id(body: &[u8], id: &str) -> test::TestRequest {
    github_request("push", body, Some(github::sign(GH_SECRET, body)))
        .insert_header(("X-GitHub-Delivery", id.to_string()))
}

async fn json_body(resp: actix_web::dev::ServiceResponse) -> Value {
    let bytes = test::read_body(resp).await;
    serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {bytes:?}"))
}

#[actix_web::test]
async fn signed_github_push_queues_the_matching_apps() {
    let h = harness();
    let app = app!(h);
    let body = branch_push();
    let req = github_request("push", &body, Some(github::sign(GH_SECRET, &body))).to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let json = json_body(resp).await;
    assert_eq!(json["status"], "queued");
    assert_eq!(json["apps"], serde_json::json!(["hello", "hello-api"]));
    assert_eq!(h.queue.pending_len(), 2);
    let job = h.queue.pending("hello").unwrap();
    assert_eq!(
        job.revision.as_deref(),
        Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246")
    );
    assert!(matches!(
        &job.reason,
        JobReason::Push { delivery: Some(_), before } if before == "0000000000000000000000000000000000000000"
    ));
    assert!(!job.full, "a push reconciles incrementally");
}

#[actix_web::test]
async fn previous_secret_is_accepted_during_rotation() {
    let h = harness();
    let app = app!(h);
    let body = branch_push();
    let req = github_request("push", &body, Some(github::sign(GH_OLD_SECRET, &body))).to_request();
    assert_eq!(
        test::call_service(&app, req).await.status(),
        StatusCode::ACCEPTED
    );
}

#[actix_web::test]
async fn unsigned_or_badly_signed_github_deliveries_are_refused_and_do_nothing() {
    let h = harness();
    let app = app!(h);
    let body = branch_push();
    let sha1_only = test::TestRequest::post()
        .uri("/hooks/github")
        .insert_header(("Content-Type", "application/json"))
        .insert_header(("X-GitHub-Event", "push"))
        .insert_header((
            "X-Hub-Signature",
            "sha1=0123456789abcdef0123456789abcdef01234567",
        ))
        .set_payload(body.clone())
        .to_request();
    let cases = vec![
        ("missing", github_request("push", &body, None).to_request()),
        ("sha1 only", sha1_only),
        (
            "malformed",
            github_request("push", &body, Some("sha256=nothex".into())).to_request(),
        ),
        (
            "wrong secret",
            github_request("push", &body, Some(github::sign("guess", &body))).to_request(),
        ),
        (
            "signature of another body",
            github_request("push", &body, Some(github::sign(GH_SECRET, b"{}"))).to_request(),
        ),
    ];
    for (what, req) in cases {
        let resp = test::call_service(&app, req).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
        let json = json_body(resp).await;
        assert!(json["error"].as_str().is_some(), "{what}");
    }
    assert_eq!(h.queue.pending_len(), 0);
}

#[actix_web::test]
async fn signature_is_checked_before_the_json() {
    let h = harness();
    let app = app!(h);
    // Garbage with no valid signature is 401, not 400: nothing reads an unauthenticated body.
    let req = github_request(
        "push",
        b"{not json",
        Some(github::sign("guess", b"{not json")),
    )
    .to_request();
    assert_eq!(
        test::call_service(&app, req).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // Signed garbage is 400 with a short reason.
    let req = github_request(
        "push",
        b"{not json",
        Some(github::sign(GH_SECRET, b"{not json")),
    )
    .to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(json_body(resp).await["error"]
        .as_str()
        .unwrap()
        .starts_with("invalid payload"));
    // Signed JSON with a wrong field type names the field.
    let body = br#"{"ref": 12, "before": "x", "after": "y", "repository": {"full_name": "a/b"}}"#;
    let req = github_request("push", body, Some(github::sign(GH_SECRET, body))).to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(json_body(resp).await["error"]
        .as_str()
        .unwrap()
        .contains("ref"));
}

#[actix_web::test]
async fn duplicate_delivery_is_answered_but_not_queued_twice() {
    let h = harness();
    let app = app!(h);
    let body = branch_push();
    let send = || signed_push_with_id(&body, "72d3162e-cc78-11e3-81ab-4c9367dc0958").to_request();
    assert_eq!(
        test::call_service(&app, send()).await.status(),
        StatusCode::ACCEPTED
    );
    let job = h.queue.next().await.unwrap();
    h.queue.done(&job.app);
    let _ = h.queue.next().await.unwrap();
    assert_eq!(h.queue.pending_len(), 0);
    let resp = test::call_service(&app, send()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_body(resp).await["status"], "duplicate");
    assert_eq!(h.queue.pending_len(), 0, "a redelivery queued work again");
}

#[actix_web::test]
async fn ping_other_events_tags_deletions_and_strangers() {
    let h = harness();
    let app = app!(h);
    let ping = fixture("github/ping-1.json");
    let resp = test::call_service(
        &app,
        github_request("ping", &ping, Some(github::sign(GH_SECRET, &ping))).to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_body(resp).await["hook_id"], 109948940);

    let issue = br#"{"action":"opened"}"#;
    let resp = test::call_service(
        &app,
        github_request("issues", issue, Some(github::sign(GH_SECRET, issue))).to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(json_body(resp).await["status"], "ignored");

    let tag = fixture("github/push-1.json");
    let resp = test::call_service(
        &app,
        github_request("push", &tag, Some(github::sign(GH_SECRET, &tag))).to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_body(resp).await["apps"], serde_json::json!([]));

    let deleted = fixture("github/push-2.json");
    let resp = test::call_service(
        &app,
        github_request("push", &deleted, Some(github::sign(GH_SECRET, &deleted))).to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_body(resp).await["status"], "deleted");

    let mut other: Value = serde_json::from_slice(&branch_push()).unwrap();
    other["repository"]["full_name"] = "someone/else".into();
    let other = serde_json::to_vec(&other).unwrap();
    let resp = test::call_service(
        &app,
        github_request("push", &other, Some(github::sign(GH_SECRET, &other))).to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_body(resp).await["status"], "no_match");
    assert_eq!(h.queue.pending_len(), 0);
}

#[actix_web::test]
async fn content_type_and_size_limits() {
    let h = harness_with(r#"body_limit = "4KiB""#, false);
    let app = app!(h);
    let body = branch_push();
    let form = test::TestRequest::post()
        .uri("/hooks/github")
        .insert_header(("Content-Type", "application/x-www-form-urlencoded"))
        .insert_header(("X-GitHub-Event", "push"))
        .insert_header(("X-Hub-Signature-256", github::sign(GH_SECRET, &body)))
        .set_payload(body.clone())
        .to_request();
    assert_eq!(
        test::call_service(&app, form).await.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );

    assert!(body.len() > 4096, "fixture is {} bytes", body.len());
    let big = github_request("push", &body, Some(github::sign(GH_SECRET, &body))).to_request();
    assert_eq!(
        test::call_service(&app, big).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(h.queue.pending_len(), 0);
}

fn gitlab_request(event: &str, body: &[u8]) -> test::TestRequest {
    test::TestRequest::post()
        .uri("/hooks/gitlab")
        .insert_header(("Content-Type", "application/json"))
        .insert_header(("X-Gitlab-Event", event))
        .set_payload(body.to_vec())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[actix_web::test]
async fn gitlab_token_and_signature() {
    let h = harness();
    let app = app!(h);
    let body = fixture("gitlab/push.json");

    let resp = test::call_service(
        &app,
        gitlab_request("Push Hook", &body)
            .insert_header(("X-Gitlab-Token", GL_TOKEN))
            .insert_header(("Idempotency-Key", "idem-1"))
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(
        json_body(resp).await["apps"],
        serde_json::json!(["diaspora"])
    );
    assert_eq!(
        h.queue.pending("diaspora").unwrap().revision.as_deref(),
        Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7")
    );

    // Same Idempotency-Key again: duplicate.
    let resp = test::call_service(
        &app,
        gitlab_request("Push Hook", &body)
            .insert_header(("X-Gitlab-Token", GL_TOKEN))
            .insert_header(("Idempotency-Key", "idem-1"))
            .to_request(),
    )
    .await;
    assert_eq!(json_body(resp).await["status"], "duplicate");

    for (what, req) in [
        (
            "wrong token",
            with_token("Push Hook", &body, "nope").to_request(),
        ),
        ("no token", gitlab_request("Push Hook", &body).to_request()),
    ] {
        assert_eq!(
            test::call_service(&app, req).await.status(),
            StatusCode::UNAUTHORIZED,
            "{what}"
        );
    }

    // With a signing token configured, the Standard Webhooks signature is the proof.
    let h = signing_harness();
    let app = app!(h);
    let key = gitlab::signing_key(GL_SIGNING).unwrap();
    let ts = now();
    let signed = |id: &str, ts: i64, sig: String| {
        gitlab_request("Push Hook", &body)
            .insert_header(("webhook-id", id.to_string()))
            .insert_header(("webhook-timestamp", ts.to_string()))
            .insert_header(("webhook-signature", sig))
            .to_request()
    };
    let resp = test::call_service(
        &app,
        signed("msg-2", ts, gitlab::sign(&key, "msg-2", ts, &body)),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);

    let stale = ts - 600;
    let resp = test::call_service(
        &app,
        signed("msg-3", stale, gitlab::sign(&key, "msg-3", stale, &body)),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(json_body(resp).await["error"]
        .as_str()
        .unwrap()
        .contains("5 minutes"));

    // A signature made for another delivery id does not verify.
    let resp = test::call_service(
        &app,
        signed("msg-4", ts, gitlab::sign(&key, "msg-5", ts, &body)),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[actix_web::test]
async fn gitlab_tag_pushes_and_other_events() {
    let h = harness();
    let app = app!(h);
    let tag = fixture("gitlab/tag_push.json");
    let resp = test::call_service(
        &app,
        with_token("Tag Push Hook", &tag, GL_TOKEN).to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_body(resp).await["status"], "no_match");
    let resp =
        test::call_service(&app, with_token("Note Hook", b"{}", GL_TOKEN).to_request()).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(json_body(resp).await["status"], "ignored");
    // Merge request events are read (for previews), so a malformed one is refused.
    let resp = test::call_service(
        &app,
        with_token("Merge Request Hook", b"{}", GL_TOKEN).to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[actix_web::test]
async fn health_readiness_and_metrics() {
    let h = harness();
    let app = app!(h);
    let resp =
        test::call_service(&app, test::TestRequest::get().uri("/healthz").to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);

    let body = branch_push();
    test::call_service(
        &app,
        github_request("push", &body, Some(github::sign(GH_SECRET, &body))).to_request(),
    )
    .await;
    test::call_service(&app, github_request("push", &body, None).to_request()).await;
    let resp =
        test::call_service(&app, test::TestRequest::get().uri("/metrics").to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
    assert!(
        text.contains(
            r#"driftless_webhook_deliveries_total{forge="github",event="push",outcome="accepted"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"driftless_webhook_deliveries_total{forge="github",event="unknown",outcome="unauthorized"} 1"#),
        "{text}"
    );
    assert!(text.contains("driftless_queue_pending 2"), "{text}");
    assert!(
        text.contains("driftless_webhook_ack_seconds_count{forge=\"github\"} 1"),
        "{text}"
    );

    h.queue.close();
    let resp = test::call_service(&app, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    // A push while shutting down is a 503 (retry later), never a 4xx.
    let body = fixture("gitlab/push.json");
    let resp =
        test::call_service(&app, with_token("Push Hook", &body, GL_TOKEN).to_request()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// Every real payload, signed correctly, is accepted; one changed byte or another secret is 401.
#[actix_web::test]
async fn every_fixture_is_accepted_signed_and_refused_tampered() {
    let h = signing_harness();
    let app = app!(h);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/github");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(names.len() >= 11, "{names:?}");
    for name in &names {
        let event = name.split('-').next().unwrap();
        let body = fixture(&format!("github/{name}"));
        let resp = test::call_service(
            &app,
            github_request(event, &body, Some(github::sign(GH_SECRET, &body))).to_request(),
        )
        .await;
        assert!(resp.status().is_success(), "{name}: {}", resp.status());
        let json = json_body(resp).await;
        let branch_push = name == "push-5.json" || name == "push-6.json";
        if branch_push {
            assert_eq!(
                json["apps"],
                serde_json::json!(["hello", "hello-api"]),
                "{name}"
            );
        } else if event == "push" {
            assert_eq!(json["apps"], serde_json::json!([]), "{name}");
        }
        let mut tampered = body.clone();
        let mid = tampered.len() / 2;
        tampered[mid] ^= 0x01;
        let resp = test::call_service(
            &app,
            github_request(event, &tampered, Some(github::sign(GH_SECRET, &body))).to_request(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{name} tampered");
        let resp = test::call_service(
            &app,
            github_request(event, &body, Some(github::sign("another", &body))).to_request(),
        )
        .await;
        assert_eq!(
            resp.status(),
            StatusCode::UNAUTHORIZED,
            "{name} other secret"
        );
    }

    let key = gitlab::signing_key(GL_SIGNING).unwrap();
    for (file, event) in [
        ("push.json", "Push Hook"),
        ("tag_push.json", "Tag Push Hook"),
    ] {
        let body = fixture(&format!("gitlab/{file}"));
        let ts = now();
        let id = format!("{file}-{ts}");
        // The signature is always made over the real payload; what is sent may differ.
        let signed = |sent: &[u8], key: &[u8]| {
            gitlab_request(event, sent)
                .insert_header(("webhook-id", id.clone()))
                .insert_header(("webhook-timestamp", ts.to_string()))
                .insert_header((
                    "webhook-signature",
                    gitlab::sign(key, &id, ts, &body_of(file)),
                ))
                .to_request()
        };
        let resp = test::call_service(&app, signed(&body, &key)).await;
        assert!(resp.status().is_success(), "{file}: {}", resp.status());
        let mut tampered = body.clone();
        tampered[body.len() / 2] ^= 0x01;
        assert_eq!(
            test::call_service(&app, signed(&tampered, &key))
                .await
                .status(),
            StatusCode::UNAUTHORIZED,
            "{file} tampered"
        );
        assert_eq!(
            test::call_service(&app, signed(&body, b"another-key"))
                .await
                .status(),
            StatusCode::UNAUTHORIZED,
            "{file} other key"
        );
        // The plain token alone does not stand in for the signature.
        let resp = test::call_service(&app, with_token(event, &body, GL_TOKEN).to_request()).await;
        assert_eq!(
            resp.status(),
            StatusCode::UNAUTHORIZED,
            "{file} with the token only"
        );
    }
}

fn body_of(file: &str) -> Vec<u8> {
    fixture(&format!("gitlab/{file}"))
}

#[actix_web::test]
async fn two_quick_pushes_make_one_job_with_the_newer_revision() {
    let h = harness();
    let app = app!(h);
    let mut first: Value = serde_json::from_slice(&fixture("gitlab/push.json")).unwrap();
    let mut second = first.clone();
    first["after"] = "1111111111111111111111111111111111111111".into();
    second["before"] = "1111111111111111111111111111111111111111".into();
    second["after"] = "2222222222222222222222222222222222222222".into();
    for (id, body) in [("one", first), ("two", second)] {
        let body = serde_json::to_vec(&body).unwrap();
        let req = gitlab_request("Push Hook", &body)
            .insert_header(("X-Gitlab-Token", GL_TOKEN))
            .insert_header(("X-Gitlab-Event-UUID", id))
            .to_request();
        assert_eq!(
            test::call_service(&app, req).await.status(),
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(h.queue.pending_len(), 1);
    let job = h.queue.next().await.unwrap();
    assert_eq!(
        job.revision.as_deref(),
        Some("2222222222222222222222222222222222222222")
    );
    assert!(
        matches!(&job.reason, JobReason::Push { delivery: Some(d), before } if d == "two" && before.starts_with('1'))
    );
}

/// The default limit is 1 MiB: a body of exactly that is read (and here refused for its
/// signature), one byte more is refused with 413 before it is read, signed or not.
#[actix_web::test]
async fn a_body_over_the_default_1_mib_limit_is_refused() {
    let h = harness();
    let app = app!(h);
    let at_limit = vec![b' '; 1 << 20];
    let req = github_request("push", &at_limit, Some(github::sign("guess", &at_limit)));
    let resp = test::call_service(&app, req.to_request()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let over = vec![b' '; (1 << 20) + 1];
    let req = github_request("push", &over, Some(github::sign(GH_SECRET, &over))).to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        json_body(resp).await["error"],
        "body larger than the limit of 1048576 bytes"
    );
    assert_eq!(h.queue.pending_len(), 0);
}

/// A delivery refused with 503 while shutting down is not remembered: its redelivery is
/// refused the same way (never answered "duplicate", which would tell the forge it landed),
/// and reaches a fresh receiver as new.
#[actix_web::test]
async fn a_delivery_refused_during_shutdown_is_not_taken_for_a_duplicate() {
    let body = branch_push();
    let send = || signed_push_with_id(&body, "5f1c3a2e-0d6b-11ef-9a7e-refused").to_request();
    let h = harness();
    let app = app!(h);
    h.queue.close();
    for attempt in ["first", "redelivery"] {
        let resp = test::call_service(&app, send()).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{attempt}");
        assert!(
            json_body(resp).await["error"]
                .as_str()
                .is_some_and(|e| e.contains("shutting down")),
            "{attempt}"
        );
    }
    let fresh = harness();
    let app = app!(fresh);
    let resp = test::call_service(&app, send()).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(json_body(resp).await["status"], "queued");
    assert_eq!(fresh.queue.pending_len(), 2);
}

/// A GitLab delivery whose only proof is the plain token `token`.
fn with_token(event: &str, body: &[u8], token: &str) -> test::TestRequest {
    gitlab_request(event, body).insert_header(("X-Gitlab-Token", token))
}

/// With a signing token configured, a GitLab delivery must carry a valid signature: a correct
/// plain token alone does not stand in for it. Without one, the token is the proof, and a
/// wrong one fails whatever its length.
#[actix_web::test]
async fn gitlab_signing_key_makes_the_signature_required() {
    let body = fixture("gitlab/push.json");
    let signing = signing_harness();
    let app = app!(signing);
    let resp =
        test::call_service(&app, with_token("Push Hook", &body, GL_TOKEN).to_request()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let error = json_body(resp).await["error"].as_str().unwrap().to_string();
    assert!(error.contains("webhook-signature"), "{error}");
    assert_eq!(signing.queue.pending_len(), 0);

    let token_only = harness();
    let app = app!(token_only);
    for (what, token, status) in [
        ("the token", GL_TOKEN, StatusCode::ACCEPTED),
        ("shorter", &GL_TOKEN[..4], StatusCode::UNAUTHORIZED),
        (
            "same length",
            "gl-token-for-tesTS",
            StatusCode::UNAUTHORIZED,
        ),
        (
            "longer",
            "gl-token-for-tests-and-more",
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        let resp =
            test::call_service(&app, with_token("Push Hook", &body, token).to_request()).await;
        assert_eq!(resp.status(), status, "{what}");
    }
}

/// `whsec_` with nothing after it would make every delivery's HMAC key empty: refused at
/// start, naming the setting.
#[actix_web::test]
async fn an_empty_gitlab_signing_key_is_a_settings_error() {
    let dir = tempfile::tempdir().unwrap();
    let signing = dir.path().join("gl-signing");
    let api = dir.path().join("gl-api");
    std::fs::write(&api, "glpat-x\n").unwrap();
    for empty in ["whsec_", "whsec_\n"] {
        std::fs::write(&signing, empty).unwrap();
        let settings = Settings::from_toml_str(&format!(
            "[forges.gitlab]\ntoken_file = {:?}\nsigning_token_file = {:?}\n",
            api.display().to_string(),
            signing.display().to_string()
        ))
        .unwrap();
        let Err(error) = Receiver::new(
            &settings,
            Arc::new(JobQueue::new()),
            Arc::new(Metrics::new()),
        ) else {
            panic!("{empty:?} was accepted as a signing token");
        };
        assert_eq!(error.key, "forges.gitlab.signing_token_file", "{empty:?}");
        assert!(
            error.message.contains("empty"),
            "{empty:?}: {}",
            error.message
        );
    }
}

/// No type that holds a secret prints it in `Debug` output, plain or pretty.
#[actix_web::test]
async fn secrets_never_appear_in_debug_output() {
    use driftless::forge::HookSpec;
    use driftless::settings::Secret;
    use driftless::webhook::gitlab::{GitlabSecrets, ProofHeaders};

    let token = "gl-tok-7f3a9c";
    let key = gitlab::signing_key(GL_SIGNING).unwrap();
    let key_b64 = GL_SIGNING.trim_start_matches("whsec_");
    let secrets = GitlabSecrets::new(&[Secret::new(token)], vec![key.clone()]);
    let proof = ProofHeaders {
        token: Some(token.as_bytes()),
        signature: Some(b"v1,c2lnbmF0dXJl"),
        id: Some(b"msg-1"),
        timestamp: Some(b"1744578123"),
    };
    let spec = HookSpec {
        url: "https://d.example.com/hooks/github?s=0a1b2c3d".into(),
        secret: token.into(),
        pull_requests: false,
    };
    let sim = driftless::simulator::SimConfig {
        github_token: token.into(),
        gitlab_token: token.into(),
    };
    let sim_hook = driftless::simulator::SimHook {
        id: 7,
        url: "https://d.example.com/hooks/gitlab".into(),
        events: vec!["push".into()],
        secret: Some(token.into()),
        content_type: None,
        active: true,
    };
    let shown = [
        format!("{:?}", Secret::new(token)),
        format!("{sim:?}"),
        format!("{sim_hook:#?}"),
        format!("{secrets:?}"),
        format!("{secrets:#?}"),
        format!("{proof:?}"),
        format!("{proof:#?}"),
        format!("{spec:?}"),
        format!("{spec:#?}"),
    ];
    // The key bytes as Debug would print a Vec<u8>: "[0, 1, 2, ...]" and "0,\n 1,".
    let key_plain = format!("{key:?}");
    let key_inner = key_plain.trim_matches(|c| c == '[' || c == ']');
    let key_pretty = format!("{key:#?}");
    let key_pretty_inner = key_pretty.trim_matches(|c| c == '[' || c == ']').trim();
    for text in &shown {
        for secret in [token, key_b64, key_inner, key_pretty_inner] {
            assert!(!text.contains(secret), "{secret:?} shown in {text}");
        }
        assert!(!text.contains("c2lnbmF0dXJl"), "signature shown in {text}");
    }
    assert!(
        format!("{spec:?}").contains("d.example.com/hooks/github"),
        "the URL is not secret"
    );
}
