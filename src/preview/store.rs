//! The full previews behind `<public_url>/previews/<forge>/<repo>/<number>`, and the page that
//! shows one in HTML or JSON. `serve` keeps each request's latest preview in the cluster, a
//! gzip-compressed ConfigMap in the state namespace, so every replica serves the page and a
//! restart loses none; a request's close deletes it. Without a cluster (the receiver's own
//! tests) they live in this process's memory. Both are bounded to [`STORE_CAPACITY`]
//! previews, the oldest going first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use actix_web::{web, HttpRequest, HttpResponse};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::report::{AppOutcome, PullRequestPreview};
use crate::reconcile::{state, LABEL_MANAGED_BY};
use crate::status_pages::{esc, page, wants_json};

/// Previews kept at once; the oldest goes first. A preview is bounded by its apps'
/// diffs, so this bounds the memory (or the cluster storage) previews take.
const STORE_CAPACITY: usize = 256;
/// Label of the ConfigMaps holding previews.
const LABEL_PREVIEW: &str = "driftless.dev/preview";
/// Annotation naming the request a preview ConfigMap belongs to (its name is a hash).
const ANNOTATION_KEY: &str = "driftless.dev/preview-of";
/// `binaryData` key of the compressed preview.
const DATA_KEY: &str = "preview.json.gz";
/// Compressed bytes one preview may take in its ConfigMap (which holds 1 MiB); a larger one
/// is kept with its diffs cut.
const MAX_STORED_BYTES: usize = 900 * 1024;
/// Bytes a stored preview may expand to when read back.
const MAX_EXPANDED_BYTES: usize = 64 << 20;
/// Lines each diff keeps when a preview is cut to fit, tried in turn.
const CUT_LINES: [usize; 3] = [200, 20, 0];

/// The latest preview of each open request.
#[derive(Default)]
pub struct PreviewStore {
    inner: Mutex<Stored>,
    cluster: Option<(Client, String)>,
}

#[derive(Default)]
struct Stored {
    by_key: HashMap<String, Arc<PullRequestPreview>>,
    order: VecDeque<String>,
}

impl PreviewStore {
    /// Previews kept in ConfigMaps of `namespace`, seen by every replica.
    pub fn in_cluster(client: Client, namespace: impl Into<String>) -> Self {
        Self {
            inner: Mutex::default(),
            cluster: Some((client, namespace.into())),
        }
    }

    /// Keeps `p` as the preview of request `key`. A failure to write it to the cluster is
    /// logged: the statuses and the comment still go out, and the page answers 404.
    pub async fn put(&self, key: String, p: PullRequestPreview) {
        let Some((client, ns)) = &self.cluster else {
            let mut s = self.inner.lock().expect("preview store");
            if s.by_key.insert(key.clone(), Arc::new(p)).is_none() {
                s.order.push_back(key);
            }
            while s.order.len() > STORE_CAPACITY {
                if let Some(old) = s.order.pop_front() {
                    s.by_key.remove(&old);
                }
            }
            return;
        };
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let Some(packed) = pack(&p) else {
            warn!(preview = %key, "preview not kept: it does not fit a ConfigMap even without its diffs");
            return;
        };
        let cm = serde_json::json!({
            "metadata": {
                "name": object_name(&key),
                "labels": {LABEL_MANAGED_BY: "driftless", LABEL_PREVIEW: "true"},
                "annotations": {ANNOTATION_KEY: key},
            },
            "binaryData": {DATA_KEY: ByteString(packed)},
        });
        if let Err(e) = state::merge_or_create(&api, &object_name(&key), &cm).await {
            warn!(preview = %key, error = %e, "preview not kept in the cluster");
            return;
        }
        // Off the preview's path: its statuses wait for the write above, not for this.
        tokio::spawn(async move {
            if let Err(e) = drop_oldest(&api).await {
                warn!(error = %e, "old previews not dropped");
            }
        });
    }

    /// The preview of request `key`, read from the cluster when it is kept there.
    pub async fn get(&self, key: &str) -> Option<Arc<PullRequestPreview>> {
        let Some((client, ns)) = &self.cluster else {
            return self
                .inner
                .lock()
                .expect("preview store")
                .by_key
                .get(key)
                .cloned();
        };
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let cm = match api.get_opt(&object_name(key)).await {
            Ok(cm) => cm?,
            Err(e) => {
                warn!(preview = %key, error = %e, "preview not read");
                return None;
            }
        };
        let of = cm.metadata.annotations.as_ref()?.get(ANNOTATION_KEY)?;
        if of != key {
            return None;
        }
        let bytes = cm.binary_data?.remove(DATA_KEY)?;
        match unpack(&bytes.0) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                warn!(preview = %key, error = %e, "kept preview unreadable");
                None
            }
        }
    }

    /// Drops the preview of request `key` (it closed).
    pub async fn remove(&self, key: &str) {
        let Some((client, ns)) = &self.cluster else {
            let mut s = self.inner.lock().expect("preview store");
            if s.by_key.remove(key).is_some() {
                s.order.retain(|k| k != key);
            }
            return;
        };
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        match api
            .delete(&object_name(key), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => warn!(preview = %key, error = %e, "closed request's preview not deleted"),
        }
    }
}

/// The ConfigMap of request `key`: a hash, since a repository path may hold characters (and
/// lengths) an object name cannot.
fn object_name(key: &str) -> String {
    format!(
        "driftless-preview-{}",
        &hex::encode(Sha256::digest(key))[..32]
    )
}

/// The preview compressed, cut down until it fits [`MAX_STORED_BYTES`]; `None` if even
/// without diffs it does not.
fn pack(p: &PullRequestPreview) -> Option<Vec<u8>> {
    let whole = state::gzip_json(p).ok()?;
    if whole.len() <= MAX_STORED_BYTES {
        return Some(whole);
    }
    CUT_LINES.iter().find_map(|&lines| {
        let mut cut = p.clone();
        for o in cut.apps.iter_mut().flat_map(|a| a.objects.iter_mut()) {
            let total = o.diff.lines().count();
            if total > lines {
                let mut kept: String = o.diff.lines().take(lines).flat_map(|l| [l, "\n"]).collect();
                kept.push_str(&format!(
                    "... {} more lines not kept: the preview is larger than a ConfigMap holds\n",
                    total - lines
                ));
                o.diff = kept;
            }
        }
        state::gzip_json(&cut)
            .ok()
            .filter(|b| b.len() <= MAX_STORED_BYTES)
    })
}

fn unpack(bytes: &[u8]) -> Result<PullRequestPreview, String> {
    let json = state::gunzip_bounded(bytes, MAX_EXPANDED_BYTES)?;
    serde_json::from_slice(&json).map_err(|e| e.to_string())
}

/// Deletes the oldest preview ConfigMaps beyond [`STORE_CAPACITY`] (requests whose close
/// was never delivered).
async fn drop_oldest(api: &Api<ConfigMap>) -> Result<(), kube::Error> {
    let mut kept = api
        .list_metadata(&ListParams::default().labels(&format!("{LABEL_PREVIEW}=true")))
        .await?
        .items;
    if kept.len() <= STORE_CAPACITY {
        return Ok(());
    }
    kept.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
    });
    for old in &kept[..kept.len() - STORE_CAPACITY] {
        if let Some(name) = &old.metadata.name {
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
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
    let found = match src.previews() {
        Some(s) => s.get(&key).await,
        None => None,
    };
    let Some(p) = found else {
        return HttpResponse::NotFound().json(serde_json::json!({
            "error": format!("no preview of {forge} {repo} #{number} (closed, or never previewed)")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preview::diff::{ChangeKind, ObjectChange};
    use crate::preview::report::{AppPreview, RequestState};
    use crate::settings::ForgeKind;

    /// A preview whose one diff is `lines` lines of incompressible text.
    fn preview(lines: usize) -> PullRequestPreview {
        let mut diff = String::new();
        let mut h = Sha256::digest(b"seed");
        for _ in 0..lines {
            h = Sha256::digest(h);
            diff.push_str(&format!("+  {}\n", hex::encode(h)));
        }
        let mut app = AppPreview::failed("web", "abc", String::new());
        app.outcome = AppOutcome::Previewed;
        app.objects.push(ObjectChange {
            object: "v1 ConfigMap demo/big".into(),
            source: "big.yaml (document 1)".into(),
            change: ChangeKind::Changed,
            diff,
            note: None,
        });
        PullRequestPreview {
            forge: ForgeKind::Github,
            repo: "acme/deploy".into(),
            number: 7,
            head_sha: "abc".into(),
            state: RequestState::Open,
            apps: vec![app],
            not_previewed: Vec::new(),
            max_apps: 20,
            page_url: None,
        }
    }

    #[test]
    fn a_preview_comes_back_whole_when_it_fits_and_cut_when_it_does_not() {
        let small = preview(100);
        assert_eq!(unpack(&pack(&small).unwrap()).unwrap(), small);

        // About 2.2 MB of diff that does not compress below a ConfigMap's size.
        let big = preview(30_000);
        let packed = pack(&big).unwrap();
        assert!(packed.len() <= MAX_STORED_BYTES, "{}", packed.len());
        let back = unpack(&packed).unwrap();
        let diff = &back.apps[0].objects[0].diff;
        assert_eq!(diff.lines().count(), 201, "200 lines and the note");
        assert!(diff.ends_with(
            "... 29800 more lines not kept: the preview is larger than a ConfigMap holds\n"
        ));
        assert_eq!(back.apps[0].objects[0].object, "v1 ConfigMap demo/big");
    }

    #[test]
    fn request_keys_map_to_valid_distinct_object_names() {
        let a = object_name("github/acme/deploy/7");
        let b = object_name("gitlab/group/sub/project/7");
        assert_ne!(a, b);
        for n in [a, b] {
            assert!(n.len() <= 63, "{n}");
            assert!(n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        }
    }
}
