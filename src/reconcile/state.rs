//! Per-app state kept in the cluster, so any replica can pick up any app after a restart:
//! a ConfigMap `driftless-app-<app>` in the state namespace holding the last applied revision,
//! the app's subtree SHA, the inventory of applied objects (with a hash of what was applied,
//! for incremental pushes), the last result and the last ten runs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::desired::{self, Stored};
use super::lease;
use crate::manifest::ObjectRef;
use crate::render::SourceVersion;

/// Field manager of the state objects (kept apart from the one applying app objects).
const STATE_MANAGER: &str = "driftless-state";
const KEY: &str = "state.json";
const DRIFT_KEY: &str = "drift.json";
/// Runs kept for the status pages.
pub const RUNS_KEPT: usize = 10;
/// Characters kept of a run's message (an API server's rejection can quote a whole object).
pub const MAX_MESSAGE_CHARS: usize = 1024;
/// Bytes the drift finding may take; objects beyond it are left out of the record.
pub const MAX_DRIFT_BYTES: usize = 64 * 1024;
/// Bytes the run record may take: a ConfigMap holds at most 1 MiB of keys and values, shared
/// with the drift finding, the desired manifests kept inline (see `desired`) and a little room
/// for the keys.
pub const MAX_STATE_BYTES: usize =
    1024 * 1024 - MAX_DRIFT_BYTES - super::desired::MAX_INLINE_BYTES * 4 / 3 - 1024;
/// Bytes a packed inventory may expand to (its JSON) when read; [`check_fits`] refuses a
/// state whose inventory would expand further, so every state written can be read back.
pub const MAX_INVENTORY_JSON_BYTES: usize = 32 << 20;
/// State ConfigMaps read per page of a bulk read: a page of small apps is a few MiB.
pub const LIST_PAGE: u32 = 250;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppState {
    /// The last revision applied successfully (or found unchanged).
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub tree_sha: Option<String>,
    /// A Kustomize app's inputs when last applied: every directory its render read, with its
    /// subtree SHA (empty for a plain app). A push changes the app when any of them changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, String>,
    /// RFC 3339 time of the last successful apply.
    #[serde(default)]
    pub applied_at: Option<String>,
    #[serde(default)]
    pub inventory: Vec<InventoryItem>,
    #[serde(default)]
    pub last_result: Option<RunRecord>,
    #[serde(default)]
    pub runs: Vec<RunRecord>,
    /// What the last drift check found.
    #[serde(default)]
    pub drift: Option<DriftRecord>,
    /// Part ConfigMaps of the desired manifests kept beside the state (see `desired`), as
    /// last read or written with it; not part of the stored record (the parts record beside
    /// it says so), only so that a write needing fewer parts deletes the rest.
    #[serde(skip)]
    pub desired_parts: usize,
    /// There was no state when the run began: a sweep's bulk read found none, and the run did
    /// not read it again under the Lease. The first write then creates the ConfigMap, and
    /// fails rather than overwrite one that appeared since (written by a run this one knows
    /// nothing of). Cleared by that first write.
    #[serde(skip)]
    pub absent: bool,
    /// The run's Lease, released by its final record (see [`ANNOTATION_RELEASED`]); not part
    /// of the stored record.
    #[serde(skip)]
    pub release: Release,
}

/// A run's Lease as its final record releases it: the record is the run's last write under
/// the Lease, so it carries the Lease's token ([`super::lease::token`]) in
/// [`ANNOTATION_RELEASED`], and a replica waiting for the Lease that finds the two equal
/// takes it at once. The holder then spends no write handing the Lease back.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Release {
    /// Nothing to release with the next write (a dry run, the intent, a drift check).
    #[default]
    None,
    /// The token the next record write carries.
    Pending(String),
    /// A record carrying this token was written: the Lease is released.
    Written(String),
}

impl Release {
    /// The token a record write carries now, if any.
    fn pending(&self) -> Option<&str> {
        match self {
            Release::Pending(token) => Some(token),
            _ => None,
        }
    }

    /// After a successful record write: a pending token is now written.
    fn written(&mut self) {
        if let Release::Pending(token) = self {
            *self = Release::Written(std::mem::take(token));
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DriftRecord {
    pub checked_at: String,
    pub revision: Option<String>,
    /// Objects that differed from Git (before any heal).
    pub objects: Vec<DriftedObject>,
    pub healed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftedObject {
    #[serde(flatten)]
    pub id: ObjectRef,
    pub missing: bool,
    /// Dotted field paths (`spec.replicas`); never values.
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryItem {
    #[serde(flatten)]
    pub id: ObjectRef,
    /// The first 128 bits of the SHA-256 of the object as applied (labels included), in hex.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub revision: Option<String>,
    pub reason: String,
    pub started_at: String,
    pub duration_ms: u64,
    /// `applied`, `unchanged`, `failed` (a verdict on the commit), `error` (a passing fault,
    /// retried by the drift timer) or `interrupted`.
    pub outcome: String,
    pub message: String,
    #[serde(default)]
    pub applied: usize,
    #[serde(default)]
    pub pruned: usize,
}

impl AppState {
    /// What the applied revision was rendered from, if anything was applied.
    pub fn version(&self) -> Option<SourceVersion> {
        self.tree_sha.as_ref().map(|tree_sha| SourceVersion {
            tree_sha: tree_sha.clone(),
            inputs: self.inputs.clone(),
        })
    }

    /// Records what the applied revision was rendered from (`None`: forget it, so the next
    /// run renders again).
    pub fn set_version(&mut self, v: Option<SourceVersion>) {
        let (tree_sha, inputs) =
            v.map_or((None, BTreeMap::new()), |v| (Some(v.tree_sha), v.inputs));
        self.tree_sha = tree_sha;
        self.inputs = inputs;
    }

    /// Whether any of `paths` (from the repository root) lies in an input of the app at
    /// `app_path` as last applied: its path, and for a Kustomize app every directory its
    /// render read.
    pub fn inputs_touched(&self, app_path: &str, paths: &[String]) -> bool {
        std::iter::once(app_path)
            .chain(self.inputs.keys().map(String::as_str))
            .any(|dir| touches(paths, dir))
    }

    /// Records a run, its message cut to [`MAX_MESSAGE_CHARS`].
    pub fn record(&mut self, mut run: RunRecord) {
        run.message = clip(&run.message, MAX_MESSAGE_CHARS);
        self.runs.insert(0, run.clone());
        self.runs.truncate(RUNS_KEPT);
        self.last_result = Some(run);
    }

    /// The state without its run history, as a sweep keeps it for every app: its catch-up
    /// and drift check read the revision, inputs, inventory and last result (a run or heal
    /// reads the whole state again under the app's Lease, and a check writes only its own
    /// key), and the history is most of a state's size.
    pub fn without_history(mut self) -> AppState {
        self.runs = Vec::new();
        self
    }
}

/// `text` cut to `max` characters, marked with an ellipsis when cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let kept: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{kept}…")
}

/// Whether any of `paths` (from the repository root) is `dir` or below it; `""` is the root.
pub fn touches(paths: &[String], dir: &str) -> bool {
    paths.iter().any(|path| {
        dir.is_empty()
            || path
                .strip_prefix(dir)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

pub fn object_name(app: &str) -> String {
    format!("driftless-app-{app}")
}

#[derive(Debug, thiserror::Error)]
#[error("state of app {app} ({step}): {message}")]
pub struct StateError {
    pub app: String,
    pub step: &'static str,
    pub message: String,
}

/// The step of a [`StateError`] saying the state would not fit: a verdict on the commit.
pub const STEP_SIZE: &str = "size";

/// Fails unless `state`, as stored, fits in its ConfigMap beside the largest drift finding.
/// Called before a run writes anything, with the largest state the run could leave behind, so
/// no object is ever applied that could not then be recorded (and so never pruned).
pub fn check_fits(app: &str, state: &AppState) -> Result<(), StateError> {
    let error = |step, message: String| StateError {
        app: app.to_string(),
        step,
        message,
    };
    let encoding = |e: serde_json::Error| error("encode", e.to_string());
    let objects = state.inventory.len();
    let expanded = serde_json::to_vec(&state.inventory)
        .map_err(encoding)?
        .len();
    if expanded > MAX_INVENTORY_JSON_BYTES {
        return Err(error(
            STEP_SIZE,
            format!(
                "the inventory of {objects} objects would expand to {expanded} bytes, over the \
                 {MAX_INVENTORY_JSON_BYTES} bytes a read unpacks; nothing was applied (split \
                 the app into smaller apps)"
            ),
        ));
    }
    let size = encode(&AppState {
        drift: None,
        ..state.clone()
    })
    .map_err(|e| error("encode", e.to_string()))?
    .len();
    if size > MAX_STATE_BYTES {
        return Err(error(
            STEP_SIZE,
            format!(
                "the state of {objects} objects would take {size} bytes, over the \
                 {MAX_STATE_BYTES} bytes one ConfigMap can hold beside the drift record; \
                 nothing was applied (split the app into smaller apps)"
            ),
        ));
    }
    Ok(())
}

/// Saves a failure of the next [`save`] of an app's run record, for tests of what a run does
/// when its state cannot be written after it applied (the write-ahead [`save_intent`] is not
/// affected). Keyed by state namespace and app, so parallel tests do not interfere.
#[doc(hidden)]
pub fn fail_next_save(namespace: &str, app: &str) {
    failing_saves()
        .lock()
        .expect("failing saves")
        .push((namespace.to_string(), app.to_string()));
}

fn failing_saves() -> &'static std::sync::Mutex<Vec<(String, String)>> {
    static FAILING: std::sync::OnceLock<std::sync::Mutex<Vec<(String, String)>>> =
        std::sync::OnceLock::new();
    FAILING.get_or_init(Default::default)
}

fn take_injected_failure(namespace: &str, app: &str) -> bool {
    let mut failing = failing_saves().lock().expect("failing saves");
    match failing.iter().position(|(n, a)| n == namespace && a == app) {
        Some(i) => {
            failing.remove(i);
            true
        }
        None => false,
    }
}

/// Reads an app's state; an app never reconciled has the default (empty) state.
pub async fn load(client: &Client, namespace: &str, app: &str) -> Result<AppState, StateError> {
    Ok(load_with_desired(client, namespace, app).await?.0)
}

/// Reads an app's state and the desired manifests kept beside it.
pub async fn load_with_desired(
    client: &Client,
    namespace: &str,
    app: &str,
) -> Result<(AppState, Option<Stored>), StateError> {
    Ok(load_found(client, namespace, app)
        .await?
        .unwrap_or_default())
}

/// Reads an app's state and the desired manifests kept with it; `None` when it has no state.
pub async fn load_found(
    client: &Client,
    namespace: &str,
    app: &str,
) -> Result<Option<(AppState, Option<Stored>)>, StateError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(&object_name(app)).await {
        Ok(Some(cm)) => Ok(Some((
            from_config_map(app, &cm)?,
            desired::from_config_map(&cm),
        ))),
        Ok(None) => Ok(None),
        Err(e) => Err(StateError {
            app: app.to_string(),
            step: "read",
            message: e.to_string(),
        }),
    }
}

/// The state of every app in the namespace with the desired manifests kept beside it, by app
/// (see [`Kept`]): one paged LIST by label instead of a GET per app; and the requests that
/// took (its pages). A state that cannot be parsed is left out (logged); reading that app
/// alone reports the error.
pub async fn load_all(
    client: &Client,
    namespace: &str,
) -> Result<(std::collections::HashMap<String, Kept>, usize), StateError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().labels(LABEL_STATE_OF);
    let mut requests = 0;
    let mut all = std::collections::HashMap::new();
    // Page by page: only one page of ConfigMaps is held beside what was taken from them.
    let list = |p: ListParams| {
        let api = &api;
        async move { api.list(&p).await }
    };
    let read = for_each_page(params, &mut requests, list, |page: Vec<ConfigMap>| {
        for cm in page {
            let Some(app) = cm.labels().get(LABEL_STATE_OF).cloned() else {
                continue;
            };
            match packed_from_config_map(&app, &cm) {
                Ok((st, inventory_gz)) => {
                    let kept = Kept {
                        state: st.without_history(),
                        inventory_gz,
                        stored: desired::from_config_map(&cm),
                    };
                    all.insert(app, kept);
                }
                Err(e) => {
                    tracing::warn!(%app, error = %e, "unreadable state left out of the bulk read")
                }
            }
        }
    });
    read.await.map_err(|e| StateError {
        app: "*".into(),
        step: "read",
        message: e.to_string(),
    })?;
    Ok((all, requests))
}

/// Every object of a LIST, page by page.
pub async fn list_all<K>(api: &Api<K>, params: ListParams) -> Result<Vec<K>, kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    list_all_counted(api, params, &mut 0).await
}

/// [`list_all`], adding each request it makes (one per page, a failed one too) to
/// `requests`.
pub async fn list_all_counted<K>(
    api: &Api<K>,
    params: ListParams,
    requests: &mut usize,
) -> Result<Vec<K>, kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut all = Vec::new();
    let list = |p: ListParams| async move { api.list(&p).await };
    for_each_page(params, requests, list, |page| all.extend(page)).await?;
    Ok(all)
}

/// A LIST page by page (pages of `params.limit` objects, else 250): `list` asks for one page,
/// each page's objects are handed to `take`; each request made (one per page, a failed one
/// too) is added to `requests`.
pub(super) async fn for_each_page<T, Page>(
    params: ListParams,
    requests: &mut usize,
    mut list: impl FnMut(ListParams) -> Page,
    mut take: impl FnMut(Vec<T>),
) -> Result<(), kube::Error>
where
    T: Clone,
    Page: std::future::Future<Output = Result<kube::core::ObjectList<T>, kube::Error>>,
{
    // A page size the caller chose stands.
    let mut params = match params.limit {
        Some(_) => params,
        None => params.limit(LIST_PAGE),
    };
    loop {
        *requests += 1;
        let page = list(params.clone()).await?;
        take(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(()),
        }
    }
}

/// The state held by an app's ConfigMap: the run record under `state.json`, the last drift
/// finding under `drift.json` (written separately, so neither writer can undo the other).
pub fn from_config_map(app: &str, cm: &ConfigMap) -> Result<AppState, StateError> {
    let (st, packed) = packed_from_config_map(app, cm)?;
    with_inventory(st, packed).map_err(|message| parse_error(app, message))
}

fn parse_error(app: &str, message: String) -> StateError {
    StateError {
        app: app.to_string(),
        step: "parse",
        message,
    }
}

/// [`from_config_map`] with the inventory left packed when it was stored packed.
fn packed_from_config_map(
    app: &str,
    cm: &ConfigMap,
) -> Result<(AppState, PackedInventory), StateError> {
    let data = cm.data.as_ref();
    let (mut st, packed) = match data.and_then(|d| d.get(KEY)) {
        Some(text) => decode_packed(text).map_err(|message| parse_error(app, message))?,
        None => (AppState::default(), None),
    };
    if let Some(text) = data.and_then(|d| d.get(DRIFT_KEY)) {
        st.drift = Some(serde_json::from_str(text).map_err(|e| parse_error(app, e.to_string()))?);
    }
    st.desired_parts = desired::parts_of(cm);
    Ok((st, packed))
}

/// An inventory as stored under `inventory_gz` (gzip-compressed JSON), if it was.
type PackedInventory = Option<Box<[u8]>>;

/// An app's state as a sweep's bulk read keeps it until the app's run or drift check takes
/// it, without its run history. Decoded, an inventory costs a few hundred bytes per object
/// (five strings each), most of what a sweep holds per app; it is kept as stored (gzip-packed
/// JSON, tens of bytes per object) and unpacked when taken.
pub struct Kept {
    /// The state; its inventory is empty while it is packed in `inventory_gz`.
    state: AppState,
    inventory_gz: PackedInventory,
    /// The desired manifests kept beside the state.
    stored: Option<Stored>,
}

impl Kept {
    /// The state but for its inventory, which may be left out (packed): enough to tell
    /// whether the app is at its branch head.
    pub fn without_inventory(&self) -> AppState {
        AppState {
            inventory: Vec::new(),
            ..self.state.clone()
        }
    }

    /// The whole state and the desired manifests kept beside it; fails, naming the app, when
    /// the packed inventory cannot be read.
    pub fn unpack(self, app: &str) -> Result<(AppState, Option<Stored>), StateError> {
        let st = with_inventory(self.state, self.inventory_gz)
            .map_err(|message| parse_error(app, message))?;
        Ok((st, self.stored))
    }
}

/// `value` as JSON, gzip-compressed. The JSON is made whole before it is compressed:
/// serde_json writes in small pieces, and flate2 initializes its encoder's 32 KiB output
/// buffer on every write, which was a sixth of a cold start's own CPU when the packing of
/// each app's objects (`desired::pack`) wrote straight into the encoder.
pub(crate) fn gzip_json<T: Serialize + ?Sized>(value: &T) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let json = serde_json::to_vec(value)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&json)?;
    gz.finish()
}

/// `bytes` gzip-decompressed, failing once they expand past `limit` bytes: everything read
/// back from the cluster is bounded, so a corrupt or hostile copy cannot fill memory.
pub(crate) fn gunzip_bounded(bytes: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if out.len() > limit {
        return Err(format!("expands to more than {limit} bytes"));
    }
    Ok(out)
}

/// The stored form of a run record: the inventory (one entry per object, the bulk of the
/// state of a large app) gzip-compressed and base64-encoded under `inventory_gz`, so a push
/// to a 1,000-object app writes tens of KiB instead of hundreds.
fn encode(st: &AppState) -> Result<String, std::io::Error> {
    use base64::Engine as _;
    let mut v = serde_json::to_value(st)?;
    let inventory = v
        .as_object_mut()
        .and_then(|o| o.remove("inventory"))
        .unwrap_or_default();
    let packed = gzip_json(&inventory)?;
    v["inventory_gz"] = serde_json::json!(base64::engine::general_purpose::STANDARD.encode(packed));
    Ok(serde_json::to_string(&v)?)
}

/// Reads a stored run record; also the plain `inventory` list of earlier versions.
#[cfg(test)]
fn decode(text: &str) -> Result<AppState, String> {
    let (st, packed) = decode_packed(text)?;
    with_inventory(st, packed)
}

/// A stored run record with its packed inventory left packed: the state (its inventory empty,
/// or the plain list of earlier versions) and the gzip-compressed JSON of `inventory_gz`.
fn decode_packed(text: &str) -> Result<(AppState, PackedInventory), String> {
    use base64::Engine as _;
    let mut v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let packed = match v.as_object_mut().and_then(|o| o.remove("inventory_gz")) {
        Some(packed) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(packed.as_str().ok_or("inventory_gz: not a string")?)
                .map_err(|e| format!("inventory_gz: {e}"))?
                .into_boxed_slice(),
        ),
        None => None,
    };
    let st = serde_json::from_value(v).map_err(|e| e.to_string())?;
    Ok((st, packed))
}

/// `st` with the inventory packed in `packed` (`inventory_gz`, base64-decoded), if any,
/// unpacked into it.
fn with_inventory(mut st: AppState, packed: PackedInventory) -> Result<AppState, String> {
    let Some(packed) = packed else {
        return Ok(st);
    };
    let json = gunzip_bounded(&packed, MAX_INVENTORY_JSON_BYTES)
        .map_err(|e| format!("inventory_gz: {e}"))?;
    st.inventory = serde_json::from_slice(&json).map_err(|e| format!("inventory_gz: {e}"))?;
    Ok(st)
}

/// Writes an app's run record (everything but the drift finding).
pub async fn save(
    client: &Client,
    namespace: &str,
    app: &str,
    state: &mut AppState,
) -> Result<(), StateError> {
    if take_injected_failure(namespace, app) {
        return Err(StateError {
            app: app.to_string(),
            step: "write",
            message: "failure injected by a test".into(),
        });
    }
    let mut patch = json!({});
    add_record(&mut patch, app, state)?;
    add_release(&mut patch, state);
    write_keys(client, namespace, app, patch, state.absent).await?;
    state.absent = false;
    state.release.written();
    Ok(())
}

/// Writes an app's run record before a run applies objects the inventory does not know yet
/// (they are listed with an empty hash): should the run die or its final save fail, the next
/// run still knows them and can prune them.
pub async fn save_intent(
    client: &Client,
    namespace: &str,
    app: &str,
    state: &AppState,
) -> Result<(), StateError> {
    let mut patch = json!({});
    add_record(&mut patch, app, state)?;
    write_keys(client, namespace, app, patch, state.absent).await
}

/// The intent of a new app's first run for its Lease (see [`lease::ANNOTATION_INTENT`]): the
/// objects of `items` as a JSON array of references; `None` when there are none or they do
/// not fit in [`lease::MAX_INTENT_BYTES`] (the run then saves its intent in the state).
pub fn intent_on_lease<'a>(items: impl Iterator<Item = &'a InventoryItem>) -> Option<String> {
    let ids: Vec<&ObjectRef> = items.map(|i| &i.id).collect();
    let text = serde_json::to_string(&ids).ok()?;
    (!ids.is_empty() && text.len() <= lease::MAX_INTENT_BYTES).then_some(text)
}

/// The state of an app that has none: empty, created by the run's first write, with the
/// intent of a first run that ended before its record (`intent`, from the app's Lease) in its
/// inventory, so the run knows what that one may have applied. An intent that cannot be read
/// fails the run: guessing could forget an object, and a state written from the guess would
/// keep it forgotten.
pub fn absent_with_intent(app: &str, intent: Option<String>) -> Result<AppState, StateError> {
    let mut st = AppState {
        absent: true,
        ..AppState::default()
    };
    let Some(text) = intent else {
        return Ok(st);
    };
    let unreadable = |why: String| StateError {
        app: app.to_string(),
        step: "intent",
        message: format!(
            "annotation {} of Lease {}: {why}",
            lease::ANNOTATION_INTENT,
            object_name(app)
        ),
    };
    if text.len() > lease::MAX_INTENT_BYTES {
        return Err(unreadable(format!(
            "{} bytes, more than the {} a run writes",
            text.len(),
            lease::MAX_INTENT_BYTES
        )));
    }
    let ids: Vec<ObjectRef> = serde_json::from_str(&text)
        .map_err(|e| unreadable(format!("not a list of objects: {e}")))?;
    st.inventory = ids
        .into_iter()
        .map(|id| InventoryItem {
            id,
            hash: String::new(),
        })
        .collect();
    Ok(st)
}

/// Annotation of an app's state ConfigMap: the directories its last render read (JSON array;
/// empty for a plain app, whose only input is its path), so a preview tells the apps a
/// change touches from one metadata-only LIST of the states.
pub const ANNOTATION_INPUTS: &str = "driftless.dev/inputs";

/// Adds the state's run record (everything but the drift finding) and its inputs annotation
/// to the merge patch `patch`.
fn add_record(
    patch: &mut serde_json::Value,
    app: &str,
    state: &AppState,
) -> Result<(), StateError> {
    let text = encode(&AppState {
        drift: None,
        ..state.clone()
    })
    .map_err(|e| StateError {
        app: app.to_string(),
        step: "encode",
        message: e.to_string(),
    })?;
    let dirs: Vec<&String> = state.inputs.keys().collect();
    patch["data"][KEY] = json!(text);
    patch["metadata"]["annotations"][ANNOTATION_INPUTS] =
        json!(serde_json::to_string(&dirs).unwrap_or_default());
    Ok(())
}

/// Annotation of an app's state ConfigMap: the token of the app's Lease as the run whose
/// record this is held it (holder and acquire time, see [`super::lease::token`]). Equal to
/// the Lease's own token, it says the Lease is free: that run has ended.
pub const ANNOTATION_RELEASED: &str = "driftless.dev/released-lease";

/// Adds the release of the run's Lease (see [`Release`]) to the record's merge patch.
fn add_release(patch: &mut serde_json::Value, state: &AppState) {
    if let Some(token) = state.release.pending() {
        patch["metadata"]["annotations"][ANNOTATION_RELEASED] = json!(token);
    }
}

/// The Lease token the app's last record released (see [`ANNOTATION_RELEASED`]), from its
/// metadata alone; `None` when there is no state, no such record, or it cannot be read.
pub async fn released_lease(client: &Client, namespace: &str, app: &str) -> Option<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let meta = api.get_metadata_opt(&object_name(app)).await.ok()??;
    meta.annotations().get(ANNOTATION_RELEASED).cloned()
}

/// Each app's recorded input directories, from one metadata-only LIST (paged) of the state
/// ConfigMaps: `Some(dirs)` from [`ANNOTATION_INPUTS`], `None` for a state written before it
/// (whose record must be read). An app with no state is not in the map.
pub async fn recorded_inputs(
    client: &Client,
    namespace: &str,
) -> Result<std::collections::HashMap<String, Option<Vec<String>>>, StateError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let (mut all, mut requests) = (std::collections::HashMap::new(), 0);
    let list = |p: ListParams| {
        let api = &api;
        async move { api.list_metadata(&p).await }
    };
    let read = for_each_page(
        ListParams::default().labels(LABEL_STATE_OF),
        &mut requests,
        list,
        |page| {
            for cm in page {
                let Some(app) = cm.labels().get(LABEL_STATE_OF).cloned() else {
                    continue;
                };
                let dirs = cm
                    .annotations()
                    .get(ANNOTATION_INPUTS)
                    .and_then(|a| serde_json::from_str::<Vec<String>>(a).ok());
                all.insert(app, dirs);
            }
        },
    );
    read.await.map_err(|e| StateError {
        app: "*".into(),
        step: "read",
        message: e.to_string(),
    })?;
    Ok(all)
}

/// Writes an app's run record and the desired manifests it was applied from (`packed`, see
/// `desired`; `None` forgets any kept before), in one write when they fit inline, with the
/// drift finding `state.drift` when `with_drift`, after deleting the parts kept before that
/// the new copy no longer needs (`state.desired_parts`, updated).
pub async fn save_with_desired(
    client: &Client,
    namespace: &str,
    app: &str,
    state: &mut AppState,
    packed: Option<&[u8]>,
    with_drift: bool,
) -> Result<(), StateError> {
    if take_injected_failure(namespace, app) {
        return Err(StateError {
            app: app.to_string(),
            step: "write",
            message: "failure injected by a test".into(),
        });
    }
    let err = |step, message: String| StateError {
        app: app.to_string(),
        step,
        message,
    };
    let mut patch = desired::state_patch(client, namespace, app, packed)
        .await
        .map_err(|e| err("write desired parts", e.to_string()))?;
    add_record(&mut patch, app, state)?;
    add_release(&mut patch, state);
    if let Some(drift) = state.drift.as_ref().filter(|_| with_drift) {
        patch["data"][DRIFT_KEY] =
            json!(bounded_drift(drift).map_err(|e| err("encode", e.to_string()))?);
    }
    // The parts no longer needed go before the record: a record that releases the Lease must
    // be the run's last write (a new holder's parts may reuse their names). Should the record
    // then fail, the old one names parts that are gone or rewritten, and a drift check falls
    // back to the forge.
    let parts = desired::parts_needed(packed);
    desired::delete_parts(client, namespace, app, parts..state.desired_parts).await;
    write_keys(client, namespace, app, patch, state.absent).await?;
    state.absent = false;
    state.release.written();
    state.desired_parts = parts;
    Ok(())
}

/// Keeps the desired manifests of the applied revision beside the app's state (after a drift
/// check had to read them from the forge), leaving the run record alone; then deletes the
/// parts of the copy kept before (`previous_parts` of them) that this one does not need.
pub async fn save_desired(
    client: &Client,
    namespace: &str,
    app: &str,
    packed: &[u8],
    previous_parts: usize,
) -> Result<(), StateError> {
    let patch = desired::state_patch(client, namespace, app, Some(packed))
        .await
        .map_err(|e| StateError {
            app: app.to_string(),
            step: "write desired parts",
            message: e.to_string(),
        })?;
    write_keys(client, namespace, app, patch, false).await?;
    let parts = desired::parts_needed(Some(packed));
    desired::delete_parts(client, namespace, app, parts..previous_parts).await;
    Ok(())
}

/// Writes an app's drift finding.
pub async fn save_drift(
    client: &Client,
    namespace: &str,
    app: &str,
    drift: &DriftRecord,
) -> Result<(), StateError> {
    let text = bounded_drift(drift).map_err(|e| StateError {
        app: app.to_string(),
        step: "encode",
        message: e.to_string(),
    })?;
    write_keys(
        client,
        namespace,
        app,
        json!({"data": {DRIFT_KEY: text}}),
        false,
    )
    .await
}

/// The drift finding as stored: objects past [`MAX_DRIFT_BYTES`] are left out (the counts a
/// user needs are in the run records and the live diff).
fn bounded_drift(drift: &DriftRecord) -> Result<String, serde_json::Error> {
    let mut drift = drift.clone();
    for obj in &mut drift.objects {
        obj.fields.truncate(32);
        for f in &mut obj.fields {
            *f = clip(f, 256);
        }
    }
    loop {
        let text = serde_json::to_string(&drift)?;
        if text.len() <= MAX_DRIFT_BYTES || drift.objects.is_empty() {
            return Ok(text);
        }
        let keep = drift.objects.len() * MAX_DRIFT_BYTES / text.len();
        drift.objects.truncate(keep.min(drift.objects.len() - 1));
    }
}

/// Label naming the app whose state a ConfigMap holds.
pub const LABEL_STATE_OF: &str = "driftless.dev/state-of";

/// Merges `keys` (`data` and `binaryData` entries; `null` removes one) into the app's
/// ConfigMap with a merge patch (cheap for the API server even with a large inventory, and
/// leaving the other keys alone), creating the ConfigMap first when there is none. With
/// `create_only` (see [`AppState::absent`]), creates it in one request and fails when it
/// exists.
async fn write_keys(
    client: &Client,
    namespace: &str,
    app: &str,
    keys: serde_json::Value,
    create_only: bool,
) -> Result<(), StateError> {
    let mut cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": object_name(app),
            "labels": {
                "app.kubernetes.io/managed-by": "driftless",
                LABEL_STATE_OF: app,
            },
        },
    });
    for part in ["data", "binaryData"] {
        if let Some(v) = keys.get(part) {
            cm[part] = v.clone();
        }
    }
    if let Some(a) = keys.pointer("/metadata/annotations") {
        cm["metadata"]["annotations"] = a.clone();
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let err = |message: String| StateError {
        app: app.to_string(),
        step: "write",
        message,
    };
    if create_only {
        let body = creation(&cm).map_err(|e| err(e.to_string()))?;
        return match api.create(&PostParams::default(), &body).await {
            Ok(_) => Ok(()),
            // Unreadable (so left out of the bulk read): that is the fault to name.
            Err(kube::Error::Api(e)) if e.code == 409 => match load(client, namespace, app).await {
                Err(unreadable) => Err(unreadable),
                Ok(_) => Err(err(format!(
                    "ConfigMap {namespace}/{} appeared after this run found no state (another replica ran the app meanwhile?); left as it is, the app's next run reads it",
                    object_name(app)
                ))),
            },
            Err(e) => Err(err(e.to_string())),
        };
    }
    merge_or_create(&api, &object_name(app), &cm)
        .await
        .map_err(|e| err(e.to_string()))
}

/// The ConfigMap a merge patch `cm` creates when there is none: its `null` values, which only
/// remove keys, left out.
fn creation(cm: &serde_json::Value) -> Result<ConfigMap, kube::Error> {
    let mut body = cm.clone();
    for part in ["data", "binaryData"] {
        if let Some(map) = body.get_mut(part).and_then(|v| v.as_object_mut()) {
            map.retain(|_, v| !v.is_null());
        }
    }
    serde_json::from_value(body).map_err(kube::Error::SerdeError)
}

/// Merge-patches the ConfigMap `name` with `cm`, creating it when there is none (`null`
/// values, which only remove keys, are left out of a creation).
pub async fn merge_or_create(
    api: &Api<ConfigMap>,
    name: &str,
    cm: &serde_json::Value,
) -> Result<(), kube::Error> {
    for _ in 0..3 {
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(cm))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                match api.create(&PostParams::default(), &creation(cm)?).await {
                    Ok(_) => return Ok(()),
                    // Created by another writer in between: patch it.
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    // It kept appearing and disappearing: the last word is a plain patch's.
    api.patch(name, &PatchParams::default(), &Patch::Merge(cm))
        .await
        .map(|_| ())
}

/// Creates the state namespace when it does not exist yet.
pub async fn ensure_namespace(client: &Client, namespace: &str) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client.clone());
    if api.get_opt(namespace).await?.is_some() {
        return Ok(());
    }
    let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
    api.patch(
        namespace,
        &PatchParams::apply(STATE_MANAGER),
        &Patch::Apply(&ns),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_touched_by_paths_in_or_below_them() {
        let paths = |ps: &[&str]| ps.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let plain = AppState::default();
        assert!(plain.inputs_touched("app", &paths(&["app/a.yaml"])));
        assert!(plain.inputs_touched("app", &paths(&["app"])));
        assert!(!plain.inputs_touched("app", &paths(&["apps/a.yaml", "ap"])));
        assert!(plain.inputs_touched("", &paths(&["anything"])));
        assert!(!plain.inputs_touched("app", &[]));
        let mut kustomize = AppState::default();
        kustomize.inputs.insert("base/web".into(), "sha".into());
        assert!(kustomize.inputs_touched("overlays/prod", &paths(&["base/web/deploy.yaml"])));
        assert!(!kustomize.inputs_touched("overlays/prod", &paths(&["base/webs/x.yaml"])));
    }

    fn sample(n: usize) -> AppState {
        AppState {
            revision: Some("a".repeat(40)),
            inventory: (0..n)
                .map(|i| InventoryItem {
                    id: ObjectRef {
                        api_version: "v1".into(),
                        kind: "ConfigMap".into(),
                        namespace: Some("web".into()),
                        name: format!("cm-{i:04}"),
                    },
                    hash: format!(
                        "{:032x}",
                        (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
                    ),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_stored_form_round_trips_and_is_compact() {
        let st = sample(1000);
        let text = encode(&st).unwrap();
        assert_eq!(decode(&text).unwrap(), st);
        let plain = serde_json::to_string(&st).unwrap();
        assert!(
            text.len() * 3 < plain.len(),
            "{} bytes stored for {} plain",
            text.len(),
            plain.len()
        );
    }

    fn config_map(text: String) -> ConfigMap {
        ConfigMap {
            data: Some([(KEY.to_string(), text)].into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_kept_state_holds_its_inventory_packed_and_unpacks_to_the_stored_state() {
        let st = sample(20);
        let cm = config_map(encode(&st).unwrap());
        let (head, packed) = packed_from_config_map("web", &cm).unwrap();
        assert!(head.inventory.is_empty(), "the inventory is left packed");
        let packed = packed.expect("stored packed");
        // Packed, the 20 items take a fraction of the bytes their 100 strings would.
        let decoded: usize = st
            .inventory
            .iter()
            .map(|i| {
                5 * std::mem::size_of::<String>()
                    + i.id.api_version.len()
                    + i.id.kind.len()
                    + i.id.namespace.as_ref().map_or(0, String::len)
                    + i.id.name.len()
                    + i.hash.len()
            })
            .sum();
        assert!(
            packed.len() * 3 < decoded,
            "{} packed, {decoded} decoded",
            packed.len()
        );
        let kept = Kept {
            state: head,
            inventory_gz: Some(packed),
            stored: None,
        };
        assert_eq!(kept.without_inventory().revision, st.revision);
        let (back, _) = kept.unpack("web").unwrap();
        assert_eq!(back, from_config_map("web", &cm).unwrap());
        assert_eq!(back, st);

        // The plain inventory of earlier versions is kept as it is.
        let (old, packed) =
            packed_from_config_map("web", &config_map(serde_json::to_string(&st).unwrap()))
                .unwrap();
        assert!(packed.is_none());
        assert_eq!(old, st);

        // A packed inventory that does not unpack is an error naming the app.
        let broken = Kept {
            state: AppState::default(),
            inventory_gz: Some(b"not gzip".to_vec().into_boxed_slice()),
            stored: None,
        };
        let e = broken.unpack("web").unwrap_err();
        assert_eq!((e.app.as_str(), e.step), ("web", "parse"));
        assert!(e.message.contains("inventory_gz"), "{}", e.message);
    }

    #[test]
    fn messages_and_drift_findings_are_bounded() {
        let mut st = AppState::default();
        st.record(RunRecord {
            revision: None,
            reason: "push".into(),
            started_at: String::new(),
            duration_ms: 0,
            outcome: "failed".into(),
            message: "é".repeat(10_000),
            applied: 0,
            pruned: 0,
        });
        assert_eq!(st.runs[0].message.chars().count(), MAX_MESSAGE_CHARS);
        assert!(st.runs[0].message.ends_with('…'));
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("exactly10!", 10), "exactly10!");

        let drift = DriftRecord {
            checked_at: String::new(),
            revision: None,
            objects: (0..5000)
                .map(|i| DriftedObject {
                    id: ObjectRef {
                        api_version: "v1".into(),
                        kind: "ConfigMap".into(),
                        namespace: Some("ns".into()),
                        name: format!("cm-{i}"),
                    },
                    missing: false,
                    fields: vec!["data.x".repeat(100); 100],
                })
                .collect(),
            healed: false,
        };
        let text = bounded_drift(&drift).unwrap();
        assert!(text.len() <= MAX_DRIFT_BYTES, "{}", text.len());
        let back: DriftRecord = serde_json::from_str(&text).unwrap();
        assert!(!back.objects.is_empty());
    }

    #[test]
    fn a_state_too_large_for_a_config_map_is_refused_naming_app_and_size() {
        assert!(check_fits("small", &sample(1000)).is_ok());
        let mut st = sample(0);
        // Names of random letters barely compress: about 20,000 of them overflow.
        let mut x: u64 = 1;
        st.inventory = (0..20_000)
            .map(|i| {
                let name: String = (0..200)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (b'a' + (x % 26) as u8) as char
                    })
                    .collect();
                InventoryItem {
                    id: ObjectRef {
                        api_version: "v1".into(),
                        kind: "ConfigMap".into(),
                        namespace: Some("web".into()),
                        name: format!("{name}-{i}"),
                    },
                    hash: String::new(),
                }
            })
            .collect();
        let e = check_fits("big", &st).unwrap_err().to_string();
        assert!(
            e.starts_with("state of app big (size): the state of 20000 objects would take "),
            "{e}"
        );
        assert!(e.contains("nothing was applied"), "{e}");
    }

    #[test]
    fn a_packed_inventory_is_read_only_up_to_its_bound() {
        // A few KiB of gzip that expands past the bound (valid JSON: an empty list padded with
        // spaces) is refused, naming the key, before it can fill memory.
        let mut padded = vec![b' '; MAX_INVENTORY_JSON_BYTES];
        padded[0] = b'[';
        padded.push(b']');
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &padded).unwrap();
        let bomb = gz.finish().unwrap();
        assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
        let kept = Kept {
            state: AppState::default(),
            inventory_gz: Some(bomb.into_boxed_slice()),
            stored: None,
        };
        let e = kept.unpack("web").unwrap_err();
        assert_eq!((e.app.as_str(), e.step), ("web", "parse"));
        assert!(
            e.message.starts_with("inventory_gz: expands to more than "),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_state_whose_inventory_would_expand_past_the_read_bound_is_refused() {
        // Entries alike but for their names pack small enough for the ConfigMap, yet expand
        // past what a read unpacks: the run must refuse them before applying anything, or it
        // would leave a state no later run can read.
        let mut st = sample(0);
        let kind = "K".repeat(1400);
        let n = MAX_INVENTORY_JSON_BYTES / 1400 + 1;
        st.inventory = (0..n)
            .map(|i| InventoryItem {
                id: ObjectRef {
                    api_version: "v1".into(),
                    kind: kind.clone(),
                    namespace: Some("web".into()),
                    name: format!("n{i}"),
                },
                hash: String::new(),
            })
            .collect();
        assert!(encode(&st).unwrap().len() <= MAX_STATE_BYTES);
        let e = check_fits("big", &st).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "state of app big (size): the inventory of {n} objects would expand to "
            )),
            "{e}"
        );
        assert!(e.contains("nothing was applied"), "{e}");
    }

    #[test]
    fn a_plain_inventory_of_earlier_versions_still_reads() {
        let st = sample(3);
        assert_eq!(decode(&serde_json::to_string(&st).unwrap()).unwrap(), st);
        assert!(decode(r#"{"inventory_gz": "not base64!"}"#)
            .unwrap_err()
            .contains("inventory_gz"));
    }
}
