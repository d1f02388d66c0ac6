//! Status pages: `GET /apps` and `GET /apps/<name>`, as JSON (`Accept: application/json`) or
//! as a plain HTML page. Read from the per-app state objects in the cluster, so every replica
//! shows the same thing. Shows revisions, results, object identities, drift field paths and
//! the last runs, and on an app's page the live health verdict of each object that reports one:
//! never object contents, so no Secret data can appear. A page costs the API server one read
//! of the state plus one LIST per kind and namespace, shared by all requests of a few seconds.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::header::ACCEPT;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, Client};
use serde_json::{json, Value};

use crate::manifest::ObjectRef;
use crate::reconcile::health::{self, Health};
use crate::reconcile::state::{self, AppState};
use crate::reconcile::LABEL_APP;
use crate::settings::AppSettings;

/// How long what a page shows (app state, live health) is reused by later requests. The pages
/// are read by people and by commit status links, at most a few times a second; reading the
/// cluster once per few seconds keeps a burst of them from costing the API server anything.
pub const PAGE_TTL: Duration = Duration::from_secs(5);
/// Most objects whose live health one app's page shows by default; the page says when there
/// are more. Their LISTs are one per kind and namespace, but every listed object is read into
/// memory and judged.
const HEALTH_LIMIT: usize = 500;
/// Kinds listed at once while reading live health.
const LIST_CONCURRENCY: usize = 4;
/// The health shown for kinds that report none (ConfigMaps, Services, RBAC, ...).
const NO_HEALTH: &str = "no health to report";
/// The health shown for objects past the page's limit.
const NOT_READ: &str = "not read (over the page's limit)";

/// A value read from the cluster and shared for a while: one read at a time, and a request
/// arriving during a read waits for it instead of starting its own, so any number of requests
/// within `ttl` cost one read. Failures are kept as long, so an unreachable API server is not
/// asked again by every request either.
struct Shared<T> {
    ttl: Duration,
    slot: tokio::sync::Mutex<Option<Read<T>>>,
}

/// When a value was read, and what the read gave.
type Read<T> = (Instant, Result<Arc<T>, String>);

impl<T> Shared<T> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            slot: tokio::sync::Mutex::new(None),
        }
    }

    async fn get<F: Future<Output = Result<T, String>>>(
        &self,
        read: impl FnOnce() -> F,
    ) -> Result<Arc<T>, String> {
        let mut slot = self.slot.lock().await;
        if let Some((at, value)) = slot.as_ref() {
            if at.elapsed() < self.ttl {
                return value.clone();
            }
        }
        let value = read().await.map(Arc::new);
        *slot = Some((Instant::now(), value.clone()));
        value
    }
}

/// What one app's page shows from the cluster.
struct AppPage {
    state: AppState,
    /// Live health verdict by object, for the objects that report one.
    health: HashMap<ObjectRef, String>,
    /// Set when more objects report health than the page reads.
    health_note: Option<String>,
}

/// What the pages are given to read: the configured apps and where their state is read from.
/// `serve`'s receiver is one; the pages know nothing else of it.
pub trait PageSource: 'static {
    /// The configured apps, in the order `/apps` lists them.
    fn apps(&self) -> &[AppSettings];
    /// Where app state and live health are read; `None` without a cluster.
    fn state_source(&self) -> Option<&StateSource>;
}

/// Where the pages read app state and live health from, shared by all requests.
#[derive(Clone)]
pub struct StateSource {
    client: Client,
    namespace: String,
    all: Arc<Shared<HashMap<String, AppState>>>,
    /// One entry per configured app at most: unknown names are answered 404 before this.
    pages: Arc<Mutex<HashMap<String, Arc<Shared<AppPage>>>>>,
    /// Kinds resolved through discovery, kept for the life of the process (a served kind
    /// does not change resource); kinds not found are asked again at the next read.
    kinds: Arc<Mutex<HashMap<(String, String), ApiResource>>>,
    health_limit: usize,
}

impl StateSource {
    /// Reads from the state ConfigMaps in `namespace`, sharing each read for [`PAGE_TTL`].
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        Self::with_ttl(client, namespace, PAGE_TTL)
    }

    /// As [`StateSource::new`], sharing each read for `ttl` (zero: every request reads).
    pub fn with_ttl(client: Client, namespace: impl Into<String>, ttl: Duration) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            all: Arc::new(Shared::new(ttl)),
            pages: Arc::new(Mutex::new(HashMap::new())),
            kinds: Arc::new(Mutex::new(HashMap::new())),
            health_limit: HEALTH_LIMIT,
        }
    }

    /// Reads the live health of at most `limit` objects per page (default 500).
    pub fn with_health_limit(mut self, limit: usize) -> Self {
        self.health_limit = limit;
        self
    }

    /// Every app's state in one LIST.
    async fn all(&self) -> Result<Arc<HashMap<String, AppState>>, String> {
        self.all.get(|| self.read_all()).await
    }

    async fn read_all(&self) -> Result<HashMap<String, AppState>, String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = api
            .list(&ListParams::default().labels("driftless.dev/state-of"))
            .await
            .map_err(|e| e.to_string())?;
        let mut out = HashMap::new();
        for cm in list.items {
            let Some(app) = cm
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("driftless.dev/state-of"))
                .cloned()
            else {
                continue;
            };
            if let Ok(st) = state::from_config_map(&app, &cm) {
                out.insert(app, st);
            }
        }
        Ok(out)
    }

    /// One app's state and the live health of its objects.
    async fn page(&self, app: &str) -> Result<Arc<AppPage>, String> {
        let shared = {
            let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
            pages
                .entry(app.to_string())
                .or_insert_with(|| Arc::new(Shared::new(self.all.ttl)))
                .clone()
        };
        shared.get(|| self.read_page(app)).await
    }

    async fn read_page(&self, app: &str) -> Result<AppPage, String> {
        let state = state::load(&self.client, &self.namespace, app)
            .await
            .map_err(|e| e.to_string())?;
        let ids: Vec<&ObjectRef> = state
            .inventory
            .iter()
            .map(|i| &i.id)
            .filter(|id| health::may_report_health(id))
            .collect();
        let limit = self.health_limit;
        let read = ids.len().min(limit);
        let health_note = (ids.len() > limit).then(|| {
            format!(
                "live health shown for the first {limit} of the {} objects that report one",
                ids.len()
            )
        });
        let mut health = self.health(app, &ids[..read]).await;
        for id in &ids[read..] {
            health.insert((*id).clone(), NOT_READ.to_string());
        }
        Ok(AppPage {
            state,
            health,
            health_note,
        })
    }

    /// Live health of each object (only the verdict reaches the page, never the object's
    /// contents): one LIST per kind and namespace, selecting the app's objects by label, so
    /// the cost follows the kinds an app uses, not its number of objects.
    async fn health(&self, app: &str, ids: &[&ObjectRef]) -> HashMap<ObjectRef, String> {
        let mut groups: HashMap<(&str, &str, Option<&str>), Vec<&ObjectRef>> = HashMap::new();
        for id in ids {
            let key = (
                id.api_version.as_str(),
                id.kind.as_str(),
                id.namespace.as_deref(),
            );
            groups.entry(key).or_default().push(id);
        }
        let selector = ListParams::default().labels(&format!("{LABEL_APP}={app}"));
        let selector = &selector;
        futures::stream::iter(groups.into_values())
            .map(|members| async move {
                let verdicts = self.group_health(app, &members, selector).await;
                members
                    .into_iter()
                    .cloned()
                    .zip(verdicts)
                    .collect::<Vec<_>>()
            })
            .buffer_unordered(LIST_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The verdicts of objects of one kind in one namespace, in order.
    async fn group_health(
        &self,
        app: &str,
        members: &[&ObjectRef],
        selector: &ListParams,
    ) -> Vec<String> {
        let first = members[0];
        let Some(ar) = self.resolve(first).await else {
            return vec!["unknown kind".to_string(); members.len()];
        };
        let api: Api<DynamicObject> = match &first.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        };
        let live: HashMap<String, DynamicObject> = match api.list(selector).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name.clone().map(|n| (n, o)))
                .collect(),
            Err(e) => return vec![format!("unknown: {e}"); members.len()],
        };
        members
            .iter()
            .map(|id| match live.get(&id.name) {
                Some(obj) => {
                    let value = serde_json::to_value(obj).unwrap_or(Value::Null);
                    match health::health(id, &value) {
                        Health::Healthy => "healthy".to_string(),
                        Health::Progressing(why) => format!("progressing: {why}"),
                        Health::Failed(why) => format!("failed: {why}"),
                    }
                }
                None => format!("missing (no such object labelled {LABEL_APP}={app})"),
            })
            .collect()
    }

    /// The resource serving an object's kind, through discovery the first time.
    async fn resolve(&self, id: &ObjectRef) -> Option<ApiResource> {
        let key = (id.api_version.clone(), id.kind.clone());
        if let Some(ar) = self
            .kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Some(ar.clone());
        }
        let (group, version) = id.group_version();
        let gvk = GroupVersionKind::gvk(group, version, &id.kind);
        let (ar, _) = kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .ok()?;
        self.kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, ar.clone());
        Some(ar)
    }
}

/// The JSON document of one app; `health` (live, by object) only for the detail page.
pub fn app_json(
    app: &AppSettings,
    st: Option<&AppState>,
    health: Option<&HashMap<ObjectRef, String>>,
) -> Value {
    let mut v = json!({
        "name": app.name,
        "forge": app.forge.as_str(),
        "repo": app.repo,
        "branch": app.branch,
        "path": app.path,
        "namespace": app.namespace,
        "drift_policy": app.drift.to_string(),
        "revision": st.and_then(|s| s.revision.clone()),
        "applied_at": st.and_then(|s| s.applied_at.clone()),
        "last_result": st.and_then(|s| s.last_result.clone()),
        "objects_count": st.map_or(0, |s| s.inventory.len()),
        "drift": st.and_then(|s| s.drift.clone()),
    });
    if let Some(health) = health {
        let objects: Vec<Value> = st
            .map(|s| s.inventory.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|i| {
                let mut o = json!(i.id);
                o["health"] = json!(health.get(&i.id).map_or(NO_HEALTH, String::as_str));
                o
            })
            .collect();
        v["objects"] = json!(objects);
        v["runs"] = json!(st.map(|s| s.runs.clone()).unwrap_or_default());
    }
    v
}

pub(crate) fn wants_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    }
}

pub(crate) fn page(title: &str, body: &str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head>\
         <body><h1>{t}</h1>{body}</body></html>\n",
            t = esc(title)
        ))
}

/// `GET /apps`: every configured app with its applied revision, last result and drift.
pub async fn apps<S: PageSource>(req: HttpRequest, src: web::Data<S>) -> HttpResponse {
    let states = match src.state_source() {
        Some(src) => match src.all().await {
            Ok(s) => s,
            Err(e) => {
                return HttpResponse::ServiceUnavailable()
                    .json(json!({"error": format!("reading app state: {e}")}))
            }
        },
        None => Arc::default(),
    };
    let docs: Vec<Value> = src
        .apps()
        .iter()
        .map(|a| app_json(a, states.get(&a.name), None))
        .collect();
    if wants_json(&req) {
        return HttpResponse::Ok().json(json!({ "apps": docs }));
    }
    let mut rows = String::new();
    for d in &docs {
        let name = d["name"].as_str().unwrap_or_default();
        rows.push_str(&format!(
            "<tr><td><a href=\"/apps/{n}\">{n}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&d["repo"]),
            text(&d["revision"]),
            text(&d["applied_at"]),
            text(&d["last_result"]["outcome"]),
            d["drift"]["objects"].as_array().map_or(0, Vec::len),
            n = esc(name),
        ));
    }
    page(
        "driftless apps",
        &format!("<table><tr><th>app</th><th>repo</th><th>revision applied</th><th>applied at</th><th>last result</th><th>drifted objects</th></tr>{rows}</table>"),
    )
}

/// `GET /apps/<name>`: one app's state, the live health of its objects, drift and last runs.
pub async fn app<S: PageSource>(
    req: HttpRequest,
    path: web::Path<String>,
    src: web::Data<S>,
) -> HttpResponse {
    let name = path.into_inner();
    let Some(app) = src.apps().iter().find(|a| a.name == name) else {
        return HttpResponse::NotFound().json(json!({"error": format!("no app named {name:?}")}));
    };
    let live = match src.state_source() {
        Some(src) => match src.page(&name).await {
            Ok(page) => Some(page),
            Err(e) => {
                return HttpResponse::ServiceUnavailable()
                    .json(json!({"error": format!("reading app state: {e}")}))
            }
        },
        None => None,
    };
    let no_health = HashMap::new();
    let mut doc = app_json(
        app,
        live.as_ref().map(|p| &p.state),
        Some(live.as_ref().map_or(&no_health, |p| &p.health)),
    );
    let note = live.as_ref().and_then(|p| p.health_note.clone());
    if let Some(note) = &note {
        doc["health_note"] = json!(note);
    }
    if wants_json(&req) {
        return HttpResponse::Ok().json(doc);
    }
    let mut body = format!(
        "<p>{} {} branch {} path {}</p><p>Revision applied: {} at {}</p><p>Last result: {} — {}</p>",
        text(&doc["forge"]),
        text(&doc["repo"]),
        text(&doc["branch"]),
        text(&doc["path"]),
        text(&doc["revision"]),
        text(&doc["applied_at"]),
        text(&doc["last_result"]["outcome"]),
        text(&doc["last_result"]["message"]),
    );
    body.push_str("<h2>Objects</h2>");
    if let Some(note) = &note {
        body.push_str(&format!("<p>{}</p>", esc(note)));
    }
    body.push_str("<table><tr><th>object</th><th>health</th></tr>");
    for o in doc["objects"].as_array().into_iter().flatten() {
        let id: Option<ObjectRef> = serde_json::from_value(o.clone()).ok();
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(&id.map(|i| i.to_string()).unwrap_or_default()),
            text(&o["health"])
        ));
    }
    body.push_str("</table><h2>Drift at the last check</h2>");
    match doc["drift"]["objects"].as_array() {
        Some(objs) if !objs.is_empty() => {
            body.push_str(&format!(
                "<p>Checked {}; healed: {}</p><ul>",
                text(&doc["drift"]["checked_at"]),
                text(&doc["drift"]["healed"])
            ));
            for o in objs {
                body.push_str(&format!(
                    "<li>{} {} {}: {}</li>",
                    text(&o["kind"]),
                    text(&o["namespace"]),
                    text(&o["name"]),
                    if o["missing"] == json!(true) {
                        "missing".to_string()
                    } else {
                        text(&json!(o["fields"].as_array().map(|f| f
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", "))))
                    }
                ));
            }
            body.push_str("</ul>");
        }
        Some(_) => body.push_str(&format!(
            "<p>In sync (checked {})</p>",
            text(&doc["drift"]["checked_at"])
        )),
        None => body.push_str("<p>Not checked yet</p>"),
    }
    body.push_str("<h2>Last runs</h2><table><tr><th>started</th><th>reason</th><th>revision</th><th>outcome</th><th>duration</th><th>message</th></tr>");
    for r in doc["runs"].as_array().into_iter().flatten() {
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td></tr>",
            text(&r["started_at"]),
            text(&r["reason"]),
            text(&r["revision"]),
            text(&r["outcome"]),
            text(&r["duration_ms"]),
            text(&r["message"]),
        ));
    }
    body.push_str("</table>");
    page(&format!("driftless app {name}"), &body)
}
