//! The full previews behind `<public_url>/previews/<forge>/<repo>/<number>`, kept in this
//! process's memory (bounded), and the page that shows one in HTML or JSON. A preview is
//! dropped when its request closes; a restart drops them all until the next webhook of each
//! request makes it again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use actix_web::{web, HttpRequest, HttpResponse};

use super::report::{AppOutcome, PullRequestPreview};
use crate::status_pages::{esc, page, wants_json};

/// Previews kept at once; the oldest goes first. A preview is bounded by its apps'
/// diffs, so this bounds the memory previews take.
const STORE_CAPACITY: usize = 256;

/// The latest preview of each open request.
#[derive(Default)]
pub struct PreviewStore {
    inner: Mutex<Stored>,
}

#[derive(Default)]
struct Stored {
    by_key: HashMap<String, Arc<PullRequestPreview>>,
    order: VecDeque<String>,
}

impl PreviewStore {
    pub fn put(&self, key: String, p: PullRequestPreview) {
        let mut s = self.inner.lock().expect("preview store");
        if s.by_key.insert(key.clone(), Arc::new(p)).is_none() {
            s.order.push_back(key);
        }
        while s.order.len() > STORE_CAPACITY {
            if let Some(old) = s.order.pop_front() {
                s.by_key.remove(&old);
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<PullRequestPreview>> {
        self.inner
            .lock()
            .expect("preview store")
            .by_key
            .get(key)
            .cloned()
    }

    pub fn remove(&self, key: &str) {
        let mut s = self.inner.lock().expect("preview store");
        if s.by_key.remove(key).is_some() {
            s.order.retain(|k| k != key);
        }
    }
}

/// What the page handler needs: the store, when previews are on.
pub trait PreviewSource: 'static {
    fn previews(&self) -> Option<&PreviewStore>;
}

/// `GET /previews/{forge}/{repo...}/{number}`: the whole preview, JSON when asked for
/// (`Accept: application/json`), else HTML.
pub async fn preview_page<S: PreviewSource>(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    src: web::Data<S>,
) -> HttpResponse {
    let (forge, rest) = path.into_inner();
    let Some((repo, number)) = rest.rsplit_once('/') else {
        return HttpResponse::NotFound().json(serde_json::json!({"error": "no such preview"}));
    };
    let key = format!("{forge}/{}/{number}", repo.to_ascii_lowercase());
    let Some(p) = src.previews().and_then(|s| s.get(&key)) else {
        return HttpResponse::NotFound().json(serde_json::json!({
            "error": format!("no preview of {forge} {repo} #{number} here (closed, never previewed, or made by another replica before a restart)")
        }));
    };
    if wants_json(&req) {
        return HttpResponse::Ok().json(&*p);
    }
    page(
        &format!("driftless preview: {} #{}", p.repo, p.number),
        &html(&p),
    )
}

fn html(p: &PullRequestPreview) -> String {
    let mut out = format!(
        "<p>{} {} #{} at <code>{}</code></p>",
        esc(p.forge.as_str()),
        esc(&p.repo),
        p.number,
        esc(&p.head_sha)
    );
    for a in &p.apps {
        let verdict = match &a.outcome {
            AppOutcome::Previewed => "previewed",
            AppOutcome::Rejected { .. } => "rejected",
            AppOutcome::Failed { .. } => "failed",
        };
        out.push_str(&format!(
            "<h2>{}</h2><p>{verdict}: {}; {} unchanged</p><pre>{}</pre>",
            esc(&a.app),
            esc(&a.summary()),
            a.unchanged,
            esc(&a.diff_text())
        ));
    }
    if !p.not_previewed.is_empty() {
        out.push_str(&format!(
            "<p>Not previewed (previews.max_apps = {}): {}</p>",
            p.max_apps,
            esc(&p.not_previewed.join(", "))
        ));
    }
    out
}
