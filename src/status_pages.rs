//! Status pages: `GET /apps` and `GET /apps/<name>`, as JSON (`Accept: application/json`) or
//! as a plain HTML page. Read from the per-app state objects in the cluster, so every replica
//! shows the same thing. Shows revisions, results, object identities, drift field paths and
//! the last runs, and on an app's page the live health verdict of each object that reports one:
//! never object contents, so no Secret data can appear.

use std::collections::HashMap;

use actix_web::http::header::ACCEPT;
use actix_web::{web, HttpRequest, HttpResponse};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::{json, Value};

use crate::manifest::ObjectRef;
use crate::reconcile::health::{self, Health};
use crate::reconcile::state::{self, AppState};

/// Most objects whose live health one `/apps/<name>` request reads.
const HEALTH_LIMIT: usize = 500;
/// The health shown for kinds that report none (ConfigMaps, Services, RBAC, ...).
const NO_HEALTH: &str = "no health to report";
use crate::settings::AppSettings;

/// Where the pages read app state from.
#[derive(Clone)]
pub struct StateSource {
    pub client: Client,
    pub namespace: String,
}

impl StateSource {
    /// Every app's state in one LIST.
    async fn all(&self) -> Result<HashMap<String, AppState>, String> {
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

    /// Live health of each object that reports one (read now, never the object's contents
    /// into the page: only the verdict), at most [`HEALTH_LIMIT`] objects.
    async fn health(&self, ids: &[&ObjectRef]) -> HashMap<ObjectRef, String> {
        use futures::StreamExt;
        use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
        let checked: Vec<&ObjectRef> = ids
            .iter()
            .copied()
            .filter(|id| health::may_report_health(id))
            .take(HEALTH_LIMIT)
            .collect();
        let mut kinds: HashMap<(String, String), Option<ApiResource>> = HashMap::new();
        for id in &checked {
            let key = (id.api_version.clone(), id.kind.clone());
            if kinds.contains_key(&key) {
                continue;
            }
            let (group, version) = id.group_version();
            let gvk = GroupVersionKind::gvk(group, version, &id.kind);
            let found = kube::discovery::pinned_kind(&self.client, &gvk)
                .await
                .ok()
                .map(|(ar, _)| ar);
            kinds.insert(key, found);
        }
        let kinds = &kinds;
        futures::stream::iter(checked)
            .map(|id| async move {
                let Some(Some(ar)) = kinds.get(&(id.api_version.clone(), id.kind.clone())) else {
                    return (id.clone(), "unknown kind".to_string());
                };
                let api: Api<DynamicObject> = match &id.namespace {
                    Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
                    None => Api::all_with(self.client.clone(), ar),
                };
                let verdict = match api.get_opt(&id.name).await {
                    Ok(Some(live)) => {
                        let value = serde_json::to_value(&live).unwrap_or(Value::Null);
                        match health::health(id, &value) {
                            Health::Healthy => "healthy".to_string(),
                            Health::Progressing(why) => format!("progressing: {why}"),
                            Health::Failed(why) => format!("failed: {why}"),
                        }
                    }
                    Ok(None) => "missing".to_string(),
                    Err(e) => format!("unknown: {e}"),
                };
                (id.clone(), verdict)
            })
            .buffer_unordered(8)
            .collect()
            .await
    }

    async fn one(&self, app: &str) -> Result<AppState, String> {
        state::load(&self.client, &self.namespace, app)
            .await
            .map_err(|e| e.to_string())
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

fn wants_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

fn esc(s: &str) -> String {
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

fn page(title: &str, body: &str) -> HttpResponse {
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

pub async fn apps(req: HttpRequest, rx: web::Data<crate::server::Receiver>) -> HttpResponse {
    let states = match &rx.state_source {
        Some(src) => match src.all().await {
            Ok(s) => s,
            Err(e) => {
                return HttpResponse::ServiceUnavailable()
                    .json(json!({"error": format!("reading app state: {e}")}))
            }
        },
        None => HashMap::new(),
    };
    let docs: Vec<Value> = rx
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

pub async fn app(
    req: HttpRequest,
    path: web::Path<String>,
    rx: web::Data<crate::server::Receiver>,
) -> HttpResponse {
    let name = path.into_inner();
    let Some(app) = rx.apps().iter().find(|a| a.name == name) else {
        return HttpResponse::NotFound().json(json!({"error": format!("no app named {name:?}")}));
    };
    let st = match &rx.state_source {
        Some(src) => match src.one(&name).await {
            Ok(s) => Some(s),
            Err(e) => {
                return HttpResponse::ServiceUnavailable()
                    .json(json!({"error": format!("reading app state: {e}")}))
            }
        },
        None => None,
    };
    let health = match (&rx.state_source, &st) {
        (Some(src), Some(st)) => {
            let ids: Vec<&ObjectRef> = st.inventory.iter().map(|i| &i.id).collect();
            src.health(&ids).await
        }
        _ => HashMap::new(),
    };
    let doc = app_json(app, st.as_ref(), Some(&health));
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
    body.push_str("<h2>Objects</h2><table><tr><th>object</th><th>health</th></tr>");
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
