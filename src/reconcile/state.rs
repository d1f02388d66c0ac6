//! Per-app state kept in the cluster, so any replica can pick up any app after a restart:
//! a ConfigMap `driftless-app-<app>` in the state namespace holding the last applied revision,
//! the app's subtree SHA, the inventory of applied objects (with a hash of what was applied,
//! for incremental pushes), the last result and the last ten runs.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use crate::manifest::ObjectRef;

/// Field manager of the state objects (kept apart from the one applying app objects).
const STATE_MANAGER: &str = "driftless-state";
const KEY: &str = "state.json";
const DRIFT_KEY: &str = "drift.json";
/// Runs kept for the status pages.
pub const RUNS_KEPT: usize = 10;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppState {
    /// The last revision applied successfully (or found unchanged).
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub tree_sha: Option<String>,
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
    pub fn record(&mut self, run: RunRecord) {
        self.runs.insert(0, run.clone());
        self.runs.truncate(RUNS_KEPT);
        self.last_result = Some(run);
    }
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

/// Reads an app's state; an app never reconciled has the default (empty) state.
pub async fn load(client: &Client, namespace: &str, app: &str) -> Result<AppState, StateError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(&object_name(app)).await {
        Ok(Some(cm)) => from_config_map(app, &cm),
        Ok(None) => Ok(AppState::default()),
        Err(e) => Err(StateError {
            app: app.to_string(),
            step: "read",
            message: e.to_string(),
        }),
    }
}

/// The state held by an app's ConfigMap: the run record under `state.json`, the last drift
/// finding under `drift.json` (written separately, so neither writer can undo the other).
pub fn from_config_map(app: &str, cm: &ConfigMap) -> Result<AppState, StateError> {
    let parse_err = |e: serde_json::Error| StateError {
        app: app.to_string(),
        step: "parse",
        message: e.to_string(),
    };
    let data = cm.data.as_ref();
    let mut st: AppState = match data.and_then(|d| d.get(KEY)) {
        Some(text) => decode(text).map_err(|message| StateError {
            app: app.to_string(),
            step: "parse",
            message,
        })?,
        None => AppState::default(),
    };
    if let Some(text) = data.and_then(|d| d.get(DRIFT_KEY)) {
        st.drift = Some(serde_json::from_str(text).map_err(parse_err)?);
    }
    Ok(st)
}

/// The stored form of a run record: the inventory (one entry per object, the bulk of the
/// state of a large app) gzip-compressed and base64-encoded under `inventory_gz`, so a push
/// to a 1,000-object app writes tens of KiB instead of hundreds.
fn encode(st: &AppState) -> Result<String, std::io::Error> {
    use base64::Engine as _;
    use std::io::Write as _;
    let mut v = serde_json::to_value(st)?;
    let inventory = v
        .as_object_mut()
        .and_then(|o| o.remove("inventory"))
        .unwrap_or_default();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&serde_json::to_vec(&inventory)?)?;
    v["inventory_gz"] =
        serde_json::json!(base64::engine::general_purpose::STANDARD.encode(gz.finish()?));
    Ok(serde_json::to_string(&v)?)
}

/// Reads a stored run record; also the plain `inventory` list of earlier versions.
fn decode(text: &str) -> Result<AppState, String> {
    use base64::Engine as _;
    use std::io::Read as _;
    let mut v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if let Some(packed) = v.as_object_mut().and_then(|o| o.remove("inventory_gz")) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(packed.as_str().ok_or("inventory_gz: not a string")?)
            .map_err(|e| format!("inventory_gz: {e}"))?;
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut json)
            .map_err(|e| format!("inventory_gz: {e}"))?;
        v["inventory"] = serde_json::from_slice(&json).map_err(|e| format!("inventory_gz: {e}"))?;
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// Writes an app's run record (everything but the drift finding).
pub async fn save(
    client: &Client,
    namespace: &str,
    app: &str,
    state: &AppState,
) -> Result<(), StateError> {
    let record = AppState {
        drift: None,
        ..state.clone()
    };
    let text = encode(&record).map_err(|e| StateError {
        app: app.to_string(),
        step: "encode",
        message: e.to_string(),
    })?;
    write_key(client, namespace, app, KEY, Ok(text)).await
}

/// Writes an app's drift finding.
pub async fn save_drift(
    client: &Client,
    namespace: &str,
    app: &str,
    drift: &DriftRecord,
) -> Result<(), StateError> {
    write_key(
        client,
        namespace,
        app,
        DRIFT_KEY,
        serde_json::to_string(drift),
    )
    .await
}

/// Sets one data key of the app's ConfigMap with a merge patch (cheap for the API server even
/// with a large inventory, and leaving the other key alone), creating the ConfigMap first when
/// there is none.
async fn write_key(
    client: &Client,
    namespace: &str,
    app: &str,
    key: &str,
    text: Result<String, serde_json::Error>,
) -> Result<(), StateError> {
    let err = |step, message: String| StateError {
        app: app.to_string(),
        step,
        message,
    };
    let text = text.map_err(|e| err("encode", e.to_string()))?;
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": object_name(app),
            "labels": {
                "app.kubernetes.io/managed-by": "driftless",
                "driftless.dev/state-of": app,
            },
        },
        "data": { key: text },
    });
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let name = object_name(app);
    for _ in 0..3 {
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&cm))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                let body: ConfigMap =
                    serde_json::from_value(cm.clone()).map_err(|e| err("encode", e.to_string()))?;
                match api.create(&PostParams::default(), &body).await {
                    Ok(_) => return Ok(()),
                    // Created by another writer in between: patch it.
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(err("write", e.to_string())),
                }
            }
            Err(e) => return Err(err("write", e.to_string())),
        }
    }
    Err(err(
        "write",
        "the ConfigMap kept appearing and disappearing".into(),
    ))
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

    #[test]
    fn a_plain_inventory_of_earlier_versions_still_reads() {
        let st = sample(3);
        assert_eq!(decode(&serde_json::to_string(&st).unwrap()).unwrap(), st);
        assert!(decode(r#"{"inventory_gz": "not base64!"}"#)
            .unwrap_err()
            .contains("inventory_gz"));
    }
}
