//! The HTTP receiver (actix-web): webhook routes, health, readiness and metrics. A webhook
//! request is verified, parsed, matched and enqueued, and answered at once; it never calls a
//! forge or Kubernetes. Bodies are read under a size limit, a deadline and a byte budget
//! shared by all connections, so neither a large, a slow nor a crowd of unauthenticated
//! clients can hold a worker or grow memory past the budget.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::{ForgeLabels, Metrics};
use crate::preview::queue::PreviewQueue;
use crate::preview::store::{self, PreviewSource, PreviewStore};
use crate::queue::{Job, JobQueue, JobReason};
use crate::settings::{
    AppSettings, ForgeKind, GithubSettings, GitlabSettings, Secret, Settings, SettingsError,
};
use crate::status_pages::{self, PageSource, StateSource};
use crate::webhook::dedup::DeliveryCache;
use crate::webhook::gitlab::{GitlabSecrets, ProofHeaders};
use crate::webhook::{self, github, gitlab, Event, GitRef, PullRequestEvent, WebhookError};

/// How long a delivery id is remembered: GitHub and GitLab retry within minutes, and a manual
/// "Redeliver" an hour later is rare enough to apply (applying is idempotent anyway).
const DEDUP_WINDOW: Duration = Duration::from_secs(3600);
/// Delivery ids remembered at most: ~100k ids is ~25 MiB worst case and covers over 25
/// deliveries a second for the whole window.
const DEDUP_CAPACITY: usize = 100_000;

/// Everything a request handler needs, shared by all workers of the server.
pub struct Receiver {
    apps: Vec<AppSettings>,
    github: Option<Vec<Secret>>,
    gitlab: Option<GitlabSecrets>,
    pub queue: Arc<JobQueue>,
    deliveries: DeliveryCache,
    pub metrics: Arc<Metrics>,
    body_limit: usize,
    /// Bytes of request bodies that may be buffered at once, across all connections: a body
    /// is buffered before its signature can be checked, so without this bound any client
    /// could make the process hold (connections × `body_limit`) bytes.
    body_budget: Semaphore,
    body_budget_bytes: usize,
    read_timeout: Duration,
    /// Whether the API server answered the last check; `None` when this receiver runs without
    /// a cluster (tests of the HTTP surface).
    pub kubernetes_ready: Option<Arc<AtomicBool>>,
    /// Where the status pages read app state; `None` without a cluster.
    pub state_source: Option<StateSource>,
    /// Pull request events for the preview worker; `None` unless `previews.enabled`.
    pub previews: Option<Arc<PreviewQueue>>,
    /// The previews made, for their pages; `None` unless `previews.enabled`.
    pub preview_store: Option<Arc<PreviewStore>>,
    previews_from_forks: bool,
}

impl Receiver {
    /// The configured apps.
    pub fn apps(&self) -> &[AppSettings] {
        &self.apps
    }

    /// Bytes of the body budget reserved now by requests whose bodies are being read.
    pub fn body_bytes_reserved(&self) -> usize {
        self.body_budget_bytes - self.body_budget.available_permits()
    }

    /// Resolves the webhook secrets. Fails, naming the setting, when one cannot be read: there
    /// is no unsigned mode.
    pub fn new(
        settings: &Settings,
        queue: Arc<JobQueue>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SettingsError> {
        let github = settings
            .forges
            .github
            .as_ref()
            .map(github_secrets)
            .transpose()?;
        let gitlab = settings
            .forges
            .gitlab
            .as_ref()
            .map(gitlab_secrets)
            .transpose()?;
        Ok(Self {
            apps: settings.apps.clone(),
            github,
            gitlab,
            queue,
            deliveries: DeliveryCache::new(DEDUP_WINDOW, DEDUP_CAPACITY),
            metrics,
            body_limit: settings.server.body_limit,
            body_budget: Semaphore::new(settings.server.body_budget),
            body_budget_bytes: settings.server.body_budget,
            read_timeout: settings.server.read_timeout,
            kubernetes_ready: None,
            state_source: None,
            previews: settings
                .previews
                .enabled
                .then(|| Arc::new(PreviewQueue::new())),
            preview_store: settings
                .previews
                .enabled
                .then(|| Arc::new(PreviewStore::default())),
            previews_from_forks: settings.previews.from_forks,
        })
    }
}

impl PageSource for Receiver {
    fn apps(&self) -> &[AppSettings] {
        &self.apps
    }

    fn state_source(&self) -> Option<&StateSource> {
        self.state_source.as_ref()
    }
}

impl PreviewSource for Receiver {
    fn previews(&self) -> Option<&PreviewStore> {
        self.preview_store.as_deref()
    }
}

fn github_secrets(gh: &GithubSettings) -> Result<Vec<Secret>, SettingsError> {
    let mut secrets = vec![gh.webhook_secret.resolve()?];
    if let Some(prev) = &gh.previous_webhook_secret {
        secrets.push(prev.resolve()?);
    }
    Ok(secrets)
}

fn gitlab_secrets(gl: &GitlabSettings) -> Result<GitlabSecrets, SettingsError> {
    let tokens = [&gl.webhook_token, &gl.previous_webhook_token]
        .into_iter()
        .flatten()
        .map(|r| r.resolve())
        .collect::<Result<Vec<_>, _>>()?;
    let mut keys = Vec::new();
    if let Some(r) = &gl.signing_token {
        let key = webhook::gitlab::signing_key(r.resolve()?.expose()).map_err(|message| {
            SettingsError {
                key: r.key().to_string(),
                message,
            }
        })?;
        keys.push(key);
    }
    Ok(GitlabSecrets::new(&tokens, keys))
}

/// Registers the routes; used by `serve` and by tests through actix's test service.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/hooks/github", web::post().to(github_hook))
        .route("/hooks/gitlab", web::post().to(gitlab_hook))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/apps", web::get().to(status_pages::apps::<Receiver>))
        .route("/apps/{name}", web::get().to(status_pages::app::<Receiver>))
        .route(
            "/previews/{forge}/{rest:.*}",
            web::get().to(store::preview_page::<Receiver>),
        );
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "alive"}))
}

async fn readyz(rx: web::Data<Receiver>) -> HttpResponse {
    let queue_open = !rx.queue.is_closed();
    let kube = rx
        .kubernetes_ready
        .as_ref()
        .map(|k| k.load(Ordering::Relaxed));
    let ready = queue_open && kube != Some(false);
    let body = json!({
        "ready": ready,
        "checks": {"settings": true, "queue_accepting": queue_open, "kubernetes_reachable": kube},
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(rx: web::Data<Receiver>) -> HttpResponse {
    rx.metrics.queue_pending.set(rx.queue.pending_len() as i64);
    rx.metrics
        .webhook_body_bytes_reserved
        .set(rx.body_bytes_reserved() as i64);
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(rx.metrics.render())
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::build(status).json(json!({"error": message.to_string()}))
}

/// A refused request: its status, what the sender is told, the metric label, and when to
/// try again (a `Retry-After` header) if that can help.
#[derive(Debug)]
struct Rejection {
    status: StatusCode,
    message: String,
    label: &'static str,
    retry_after: Option<Duration>,
}

impl Rejection {
    fn new(status: StatusCode, label: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            label,
            retry_after: None,
        }
    }

    fn response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(after) = self.retry_after {
            response.insert_header((RETRY_AFTER, after.as_secs().max(1).to_string()));
        }
        response.json(json!({"error": self.message}))
    }
}

impl From<WebhookError> for Rejection {
    fn from(e: WebhookError) -> Self {
        let status = if e.is_unauthorized() {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        Rejection::new(status, e.metric_label(), e.to_string())
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get(name).map(|v| v.as_bytes())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Cuts a sender-supplied string before it goes into a response or a log line.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Refuses anything but JSON (GitHub can be set to send form-encoded bodies).
fn check_content_type(req: &HttpRequest) -> Result<(), Rejection> {
    let ct = header_str(req.headers(), CONTENT_TYPE.as_str()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content type must be application/json, got {:?}; set the webhook's content type to JSON",
                clip(ct)
            ),
        ))
    }
}

/// The body length the request declares: `None` without a Content-Length (chunked), a 413
/// when it is over `limit`, so a large body is refused before any of it is read.
fn declared_length(req: &HttpRequest, limit: usize) -> Result<Option<usize>, Rejection> {
    let Some(len) = header_str(req.headers(), CONTENT_LENGTH.as_str()) else {
        return Ok(None);
    };
    match len.trim().parse::<u64>() {
        Ok(n) if n > limit as u64 => Err(too_large(limit)),
        // Not over the limit, so it fits in usize.
        Ok(n) => Ok(Some(n as usize)),
        Err(_) => Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "invalid Content-Length",
        )),
    }
}

fn too_large(limit: usize) -> Rejection {
    Rejection::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("body larger than the limit of {limit} bytes"),
    )
}

/// Reserves room in the body budget for a body of `declared` bytes, or of the largest
/// accepted size when its length is not declared (a chunked body may grow to it), before
/// anything of it is read. No room: 503 at once, with a Retry-After of one read deadline,
/// the longest any reservation is held.
fn reserve_body(rx: &Receiver, declared: Option<usize>) -> Result<SemaphorePermit<'_>, Rejection> {
    // Both sizes are at most body_budget, which settings bound to 1 GiB.
    let bytes = declared.unwrap_or(rx.body_limit) as u32;
    rx.body_budget
        .try_acquire_many(bytes)
        .map_err(|_| Rejection {
            retry_after: Some(rx.read_timeout),
            ..Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many webhook bodies being received at once; retry later",
            )
        })
}

/// Reads the body under the size limit (never buffering more than the limit, whatever the
/// framing) and the read deadline.
async fn read_body(
    mut payload: web::Payload,
    declared: Option<usize>,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, Rejection> {
    let read = async {
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| {
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("reading the body: {e}"),
                )
            })?;
            if buf.len() + chunk.len() > limit {
                return Err(too_large(limit));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or_else(|_| {
            Err(Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("body not received within {}s", deadline.as_secs()),
            ))
        })
}

/// The metric label for an event kind.
fn event_label(event: &Event) -> &'static str {
    match event {
        Event::Push(p) if matches!(p.git_ref, GitRef::Tag(_)) => "tag_push",
        Event::Push(_) => "push",
        Event::PullRequest(_) => "pull_request",
        Event::Ping { .. } => "ping",
        Event::Ignored { .. } => "ignored",
    }
}

/// The delivery id a forge repeats on retries and manual redeliveries.
fn delivery_id(forge: ForgeKind, headers: &HeaderMap) -> Option<String> {
    let candidates: &[&str] = match forge {
        ForgeKind::Github => &[github::DELIVERY_HEADER],
        ForgeKind::Gitlab => &[
            gitlab::ID_HEADER,
            gitlab::IDEMPOTENCY_HEADER,
            gitlab::UUID_HEADER,
        ],
    };
    candidates
        .iter()
        .find_map(|h| header_str(headers, h))
        .map(str::to_string)
}

async fn github_hook(
    req: HttpRequest,
    payload: web::Payload,
    rx: web::Data<Receiver>,
) -> HttpResponse {
    receive(ForgeKind::Github, req, payload, rx).await
}

async fn gitlab_hook(
    req: HttpRequest,
    payload: web::Payload,
    rx: web::Data<Receiver>,
) -> HttpResponse {
    receive(ForgeKind::Gitlab, req, payload, rx).await
}

/// One delivery: check the forge is configured and the content type, read the body under the
/// limits, verify, parse, then deduplicate, match and enqueue.
async fn receive(
    forge: ForgeKind,
    req: HttpRequest,
    payload: web::Payload,
    rx: web::Data<Receiver>,
) -> HttpResponse {
    let started = Instant::now();
    let delivery = delivery_id(forge, req.headers());
    let verified = async {
        let configured = match forge {
            ForgeKind::Github => rx.github.is_some(),
            ForgeKind::Gitlab => rx.gitlab.is_some(),
        };
        if !configured {
            return Err(Rejection::new(
                StatusCode::NOT_FOUND,
                "forge_not_configured",
                format!("{forge} is not configured on this receiver ([forges.{forge}])"),
            ));
        }
        check_content_type(&req)?;
        let declared = declared_length(&req, rx.body_limit)?;
        let _reserved = reserve_body(&rx, declared)?;
        let body = read_body(payload, declared, rx.body_limit, rx.read_timeout).await?;
        verify_and_parse(forge, &rx, req.headers(), &body)
    }
    .await;
    match verified {
        Ok(event) => {
            let resp = dispatch(&rx, forge, event, delivery);
            rx.metrics
                .webhook_ack_seconds
                .get_or_create(&ForgeLabels {
                    forge: forge.as_str(),
                })
                .observe(started.elapsed().as_secs_f64());
            resp
        }
        Err(rejection) => {
            warn!(forge = forge.as_str(), delivery = clip(delivery.as_deref().unwrap_or("-")),
                status = rejection.status.as_u16(), reason = %rejection.message, "webhook refused");
            rx.metrics
                .delivery(forge.as_str(), "unknown", rejection.label);
            rejection.response()
        }
    }
}

/// Verifies the sender's proof before anything in the body is looked at, then parses.
fn verify_and_parse(
    forge: ForgeKind,
    rx: &Receiver,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Event, Rejection> {
    let event_header = match forge {
        ForgeKind::Github => {
            let secrets = rx.github.as_deref().unwrap_or_default();
            github::verify_signature(secrets, header(headers, github::SIGNATURE_HEADER), body)?;
            github::EVENT_HEADER
        }
        ForgeKind::Gitlab => {
            let none = GitlabSecrets::default();
            let secrets = rx.gitlab.as_ref().unwrap_or(&none);
            let proof = ProofHeaders {
                token: header(headers, gitlab::TOKEN_HEADER),
                signature: header(headers, gitlab::SIGNATURE_HEADER),
                id: header(headers, gitlab::ID_HEADER),
                timestamp: header(headers, gitlab::TIMESTAMP_HEADER),
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            gitlab::verify(secrets, proof, body, now)?;
            gitlab::EVENT_HEADER
        }
    };
    let name = header_str(headers, event_header).ok_or_else(|| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("missing {event_header} header"),
        )
    })?;
    Ok(match forge {
        ForgeKind::Github => github::parse(name, body)?,
        ForgeKind::Gitlab => gitlab::parse(name, body)?,
    })
}

/// Acts on a verified, parsed event: deduplicate, match, enqueue, answer.
fn dispatch(
    rx: &Receiver,
    forge: ForgeKind,
    event: Event,
    delivery: Option<String>,
) -> HttpResponse {
    let forge_label = forge.as_str();
    let event_label = event_label(&event);
    if let Some(id) = &delivery {
        if rx.deliveries.seen(id, Instant::now()) {
            info!(forge = forge_label, delivery = %id, "duplicate delivery ignored");
            rx.metrics.delivery(forge_label, event_label, "duplicate");
            return HttpResponse::Ok().json(json!({"status": "duplicate", "delivery": id}));
        }
    }
    let response = act_on(rx, forge_label, event_label, event, &delivery);
    // Recorded only once acted on: a delivery refused with 503 (shutting down) must be
    // refused again, not answered "duplicate", when it comes back.
    if let (Some(id), false) = (&delivery, response.status().is_server_error()) {
        rx.deliveries.record(id, Instant::now());
    }
    response
}

/// Answers a verified, new delivery: pong, ignore, or match and enqueue a push.
fn act_on(
    rx: &Receiver,
    forge_label: &'static str,
    event_label: &'static str,
    event: Event,
    delivery: &Option<String>,
) -> HttpResponse {
    match event {
        Event::Ping { hook_id } => {
            info!(forge = forge_label, hook_id = ?hook_id, "webhook ping");
            rx.metrics.delivery(forge_label, event_label, "pong");
            HttpResponse::Ok().json(json!({"status": "pong", "hook_id": hook_id}))
        }
        Event::Ignored { event } => {
            info!(forge = forge_label, event = %clip(&event), "event ignored");
            rx.metrics.delivery(forge_label, event_label, "ignored");
            HttpResponse::Accepted().json(json!({"status": "ignored", "event": clip(&event)}))
        }
        Event::PullRequest(pr) => queue_preview(rx, forge_label, event_label, pr),
        Event::Push(push) => {
            if push.deleted {
                info!(forge = forge_label, repo = %push.repo, git_ref = %push.git_ref, "ref deleted; nothing to apply");
                rx.metrics.delivery(forge_label, event_label, "deleted");
                return HttpResponse::Ok().json(json!({"status": "deleted", "apps": []}));
            }
            let apps = webhook::match_apps(&rx.apps, &push);
            if apps.is_empty() {
                rx.metrics.delivery(forge_label, event_label, "no_match");
                return HttpResponse::Ok().json(json!({"status": "no_match", "apps": []}));
            }
            let mut queued = Vec::with_capacity(apps.len());
            for app in apps {
                let job = Job::new(
                    app.name.clone(),
                    Some(push.after.clone()),
                    JobReason::Push {
                        delivery: delivery.clone(),
                        before: push.before.clone(),
                    },
                );
                match rx.queue.enqueue(job) {
                    Ok(_) => queued.push(app.name.clone()),
                    Err(e) => {
                        warn!(app = %app.name, error = %e, "cannot queue");
                        rx.metrics.delivery(forge_label, event_label, "unavailable");
                        // 503, never 4xx: GitLab disables hooks after repeated 4xx answers.
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "shutting down; retry later",
                        );
                    }
                }
            }
            info!(forge = forge_label, repo = %push.repo, git_ref = %push.git_ref, after = %push.after, apps = ?queued, "push queued");
            rx.metrics.delivery(forge_label, event_label, "accepted");
            rx.metrics
                .jobs_queued
                .get_or_create(&ForgeLabels { forge: forge_label })
                .inc_by(queued.len() as u64);
            HttpResponse::Accepted().json(json!({
                "status": "queued",
                "apps": queued,
                "revision": push.after,
                "delivery": delivery,
            }))
        }
    }
}

/// Answers a verified pull request event: queued for a preview when previews are on, the
/// request is not from a fork (unless allowed) and some app follows its base branch.
fn queue_preview(
    rx: &Receiver,
    forge_label: &'static str,
    event_label: &'static str,
    pr: PullRequestEvent,
) -> HttpResponse {
    let answer = |outcome: &'static str, status: StatusCode| {
        rx.metrics.delivery(forge_label, event_label, outcome);
        HttpResponse::build(status).json(json!({"status": outcome, "apps": []}))
    };
    let Some(queue) = &rx.previews else {
        return answer("previews_disabled", StatusCode::ACCEPTED);
    };
    if pr.from_fork && !rx.previews_from_forks {
        info!(forge = forge_label, repo = %pr.repo, number = pr.number, "pull request from a fork not previewed (previews.from_forks = false)");
        return answer("fork_ignored", StatusCode::OK);
    }
    let apps: Vec<String> = webhook::match_pull_request(&rx.apps, &pr)
        .into_iter()
        .map(|a| a.name.clone())
        .collect();
    if apps.is_empty() {
        return answer("no_match", StatusCode::OK);
    }
    let number = pr.number;
    if let Err(e) = queue.push(pr) {
        warn!(forge = forge_label, error = %e, "cannot queue the preview");
        return answer("unavailable", StatusCode::SERVICE_UNAVAILABLE);
    }
    rx.metrics.delivery(forge_label, event_label, "accepted");
    HttpResponse::Accepted()
        .json(json!({"status": "preview_queued", "apps": apps, "number": number}))
}

/// The HTTP server `serve` runs, on an already bound listener: the routes, the receiver, and
/// the timeouts that keep a slow client from holding a connection (tests run exactly this).
pub fn listen(
    receiver: web::Data<Receiver>,
    server: &crate::settings::ServerSettings,
    listener: std::net::TcpListener,
) -> std::io::Result<actix_web::dev::Server> {
    let body_limit = server.body_limit;
    Ok(actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(receiver.clone())
            .app_data(web::PayloadConfig::new(body_limit))
            .configure(routes)
    })
    .client_request_timeout(server.header_timeout)
    .client_disconnect_timeout(Duration::from_secs(5))
    .shutdown_timeout(30)
    .disable_signals()
    .listen(listener)?
    .run())
}

/// How often `/readyz`'s view of the API server is refreshed.
const KUBE_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Runs the receiver, the workers and the start-up catch-up until SIGINT or SIGTERM.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let queue = Arc::new(JobQueue::new());
    let metrics = Arc::new(Metrics::new());
    let mut receiver = Receiver::new(&settings, queue.clone(), metrics.clone())?;
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "kubernetes: no usable credentials from KUBECONFIG, ~/.kube/config or the in-cluster service account: {e}"
        )
    })?;
    let forges = crate::forge::from_settings(&settings)?;
    let engine = Arc::new(crate::reconcile::Engine::new(
        client.clone(),
        forges.clone(),
        settings.clone(),
    ));
    let kube_ready = Arc::new(AtomicBool::new(false));
    receiver.kubernetes_ready = Some(kube_ready.clone());
    receiver.state_source = Some(StateSource::new(
        client.clone(),
        settings.kubernetes.state_namespace.clone(),
    ));
    // Previews live in the cluster, so every replica serves their pages.
    if receiver.preview_store.is_some() {
        receiver.preview_store = Some(Arc::new(PreviewStore::in_cluster(
            client.clone(),
            settings.kubernetes.state_namespace.clone(),
        )));
    }
    let shutdown = CancellationToken::new();
    let previews = match (&receiver.previews, &receiver.preview_store) {
        (Some(queue), Some(store)) => {
            let previewer = Arc::new(crate::preview::Previewer::new(
                engine.clone(),
                forges,
                settings.clone(),
                store.clone(),
            ));
            Some(tokio::spawn(crate::preview::run(
                queue.clone(),
                previewer,
                shutdown.clone(),
            )))
        }
        _ => None,
    };
    let receiver = web::Data::new(receiver);

    let probe = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let ok = client.apiserver_version().await.is_ok();
                kube_ready.store(ok, Ordering::Relaxed);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(KUBE_CHECK_INTERVAL) => {}
                }
            }
        })
    };
    // Only on the forges whose section asks for it.
    let mut register = Vec::new();
    if settings
        .forges
        .github
        .as_ref()
        .is_some_and(|g| g.register_webhooks)
    {
        register.push(ForgeKind::Github);
    }
    if settings
        .forges
        .gitlab
        .as_ref()
        .is_some_and(|g| g.register_webhooks)
    {
        register.push(ForgeKind::Gitlab);
    }
    if !register.is_empty() {
        match crate::forge::hooks::register_for_apps(&settings, &register, None, false).await {
            Ok(lines) => lines
                .iter()
                .for_each(|l| info!(result = %l, "webhook registration")),
            Err(e) => warn!(error = %e, "webhook registration failed; serving anyway"),
        }
    }
    // Pushes made while no receiver ran (or whose webhook was lost) are caught up at start.
    crate::worker::catch_up(
        &queue,
        &engine,
        settings.apps.iter().map(|a| a.name.clone()),
    )
    .await;
    let timer = tokio::spawn(crate::worker::drift_timer(
        queue.clone(),
        settings.apps.iter().map(|a| a.name.clone()).collect(),
        settings.drift.interval,
        settings.drift.jitter,
        shutdown.clone(),
    ));
    let mut workers = tokio::spawn(crate::worker::run(
        queue.clone(),
        engine.clone(),
        metrics,
        crate::worker::WORKERS,
    ));

    let listener = std::net::TcpListener::bind(settings.server.listen).map_err(|e| {
        anyhow::anyhow!(
            "server.listen: cannot listen on {}: {e}",
            settings.server.listen
        )
    })?;
    let server = listen(receiver, &settings.server, listener)
        .map_err(|e| anyhow::anyhow!("server.listen: {e}"))?;
    let handle = server.handle();
    info!(listen = %settings.server.listen, apps = settings.apps.len(), "driftless receiver started");

    // SIGTERM: keep serving, but refuse new webhooks with 503 (the forge retries them, on
    // another replica or later) and report not ready; let running reconciles finish within
    // the grace period, then interrupt them (their state records it and the next start resumes
    // them); let go of the leases (a run's final record releases its Lease; one that recorded
    // nothing hands it back); stop.
    let grace = settings.server.shutdown_grace;
    let drain = {
        let (shutdown, queue, engine) = (shutdown.clone(), queue.clone(), engine.clone());
        tokio::spawn(async move {
            wait_for_signal().await;
            info!(grace = %humantime::format_duration(grace), "shutdown requested: new webhooks get 503, running reconciles may finish");
            shutdown.cancel();
            let abandoned = queue.abandon();
            if !abandoned.is_empty() {
                info!(apps = ?abandoned, "queued jobs not started; the next start catches them up from Git");
            }
            if tokio::time::timeout(grace, &mut workers).await.is_err() {
                warn!("grace period over: interrupting running reconciles; the next start resumes them");
                engine.interrupt();
                let _ = tokio::time::timeout(INTERRUPT_WAIT, &mut workers).await;
            }
            engine.settle().await;
            info!("leases let go; stopping");
            handle.stop(true).await;
        })
    };
    let result = server.await;
    if !drain.is_finished() {
        // The server stopped on its own (an error): stop the rest as after a signal.
        drain.abort();
        shutdown.cancel();
        queue.abandon();
        engine.interrupt();
        engine.settle().await;
    }
    let _ = timer.await;
    let _ = probe.await;
    if let Some(previews) = previews {
        // A preview in flight only reads; it is cut short, the next event makes it again.
        previews.abort();
        let _ = previews.await;
    }
    result.map_err(|e| anyhow::anyhow!("HTTP server failed: {e}"))
}

/// After the grace period, how long interrupted reconciles get to record their state.
const INTERRUPT_WAIT: Duration = Duration::from_secs(15);

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
