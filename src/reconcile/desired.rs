//! The rendered manifests of an app's applied revision, kept in the cluster beside its state,
//! so a drift check of an app whose branch has not moved compares the live objects against
//! them without reading the forge or rendering. They are kept parsed, as the JSON body of each
//! object and the file and document it came from: reading JSON back costs a fraction of
//! parsing YAML, the largest part of a steady sweep's own work. (Copies of earlier versions
//! hold the files' text; they are still read.) They are gzip-compressed and addressed by what
//! they were rendered from (the app's path and renderer, and the SHA of every input tree): a
//! copy made from anything else is never used. Up to [`MAX_INLINE_BYTES`] they sit in the
//! app's state ConfigMap (read with it, written with it); larger, in parts of their own.

use std::ops::Range;

use base64::Engine as _;
use bytes::Bytes;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::ByteString;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::state;
use crate::forge::AppFile;
use crate::manifest::{self, Identity, Object, Source};
use crate::render::SourceVersion;
use crate::settings::{AppSettings, RenderMode};

/// `binaryData` key of the state ConfigMap holding the compressed manifests.
const INLINE_KEY: &str = "desired.gz";
/// `data` key of the state ConfigMap describing them when they are kept in parts.
const PARTS_KEY: &str = "desired-parts.json";
/// Compressed bytes kept in the state ConfigMap itself; `state::MAX_STATE_BYTES` leaves room
/// for them, so the state's own bound is unchanged by them.
pub const MAX_INLINE_BYTES: usize = 64 * 1024;
/// Compressed bytes in each part ConfigMap (one holds 1 MiB; base64 adds a third).
const PART_BYTES: usize = 700 * 1024;
/// Parts at most: a render larger than this many compressed bytes is not kept (its drift check
/// reads the forge).
const MAX_PARTS: usize = 64;

/// The manifests kept for an app, as found beside its state (not yet read, for parts).
#[derive(Debug, Clone)]
pub enum Stored {
    Inline(Bytes),
    Parts(PartsRecord),
}

/// Where the parts of a large set are and what they must add up to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartsRecord {
    pub parts: usize,
    /// SHA-256 of the concatenated parts, in hex: a part left from another write is caught.
    pub sha256: String,
}

/// Why kept manifests cannot be used; the drift check then reads the forge.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("none kept")]
    Missing,
    #[error("kept for other inputs")]
    OtherInputs,
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("cannot read part {part}: {message}")]
    ReadPart { part: usize, message: String },
}

/// A kept copy as read back ([`Packing`] writes it).
#[derive(Deserialize)]
struct Packed {
    address: String,
    /// The parsed objects.
    #[serde(default)]
    objects: Vec<PackedObject>,
    /// The files' text, as earlier versions kept them (none in a copy of this one).
    #[serde(default)]
    files: Vec<PackedFile>,
}

#[derive(Deserialize)]
struct PackedObject {
    file: String,
    document: usize,
    body: Value,
}

/// A [`PackedObject`] as written, borrowing the parsed object.
#[derive(Serialize)]
struct PackingObject<'a> {
    file: &'a str,
    document: usize,
    body: &'a Value,
}

/// What [`pack`] writes: a [`Packed`] borrowing the parsed objects.
#[derive(Serialize)]
struct Packing<'a> {
    address: &'a str,
    objects: Vec<PackingObject<'a>>,
}

/// A file as earlier versions kept it (with its blob SHA too, which reading needs not).
#[derive(Deserialize)]
struct PackedFile {
    path: String,
    content: String,
}

/// What a render depends on besides the input SHAs: the app's path, how it is rendered, and
/// the Kustomize command. Two equal addresses render the same manifests.
pub fn address(app: &AppSettings, kustomize_command: &[String], v: &SourceVersion) -> String {
    let mut h = Sha256::new();
    let mode = match app.render {
        RenderMode::Auto => "auto",
        RenderMode::Plain => "plain",
        RenderMode::Kustomize => "kustomize",
    };
    for part in [app.repo.as_str(), app.path.as_str(), mode, &v.tree_sha]
        .into_iter()
        .chain(kustomize_command.iter().map(String::as_str))
    {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for (dir, sha) in &v.inputs {
        h.update([1]);
        h.update(dir.as_bytes());
        h.update([0]);
        h.update(sha.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The objects of the app's rendered files, in path order.
pub fn parse(files: &[AppFile]) -> Result<Vec<Object>, manifest::ManifestError> {
    manifest::parse_files(files.iter().map(|f| (f.path.as_str(), f.content.as_ref())))
}

/// The objects of the files, compressed under their address; `None` when they do not parse
/// (the run refuses them anyway) or the whole is too large to keep.
pub fn pack(address: &str, files: &[AppFile]) -> Option<Vec<u8>> {
    pack_objects(address, &parse(files).ok()?)
}

/// `objects` (parsed from an app's files) compressed under their address; `None` when the
/// whole is too large to keep.
pub fn pack_objects(address: &str, objects: &[Object]) -> Option<Vec<u8>> {
    let packed = Packing {
        address,
        objects: objects
            .iter()
            .map(|o| PackingObject {
                file: &o.source.file,
                document: o.source.document,
                body: &o.body,
            })
            .collect(),
    };
    let bytes = state::gzip_json(&packed).ok()?;
    (bytes.len() <= PART_BYTES * MAX_PARTS).then_some(bytes)
}

/// The objects kept under `address`, decompressing at most `limit` bytes. A copy of an
/// earlier version (the files' text) is parsed as the files were.
pub fn unpack(bytes: &[u8], address: &str, limit: usize) -> Result<Vec<Object>, DesiredError> {
    let json = state::gunzip_bounded(bytes, limit).map_err(DesiredError::Corrupt)?;
    let packed: Packed =
        serde_json::from_slice(&json).map_err(|e| DesiredError::Corrupt(e.to_string()))?;
    if packed.address != address {
        return Err(DesiredError::OtherInputs);
    }
    let corrupt = |e: manifest::ManifestError| DesiredError::Corrupt(e.to_string());
    if !packed.files.is_empty() {
        let files = packed
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.content.as_bytes()));
        return manifest::parse_files(files).map_err(corrupt);
    }
    let mut seen = std::collections::HashSet::<Identity>::new();
    let mut objects = Vec::with_capacity(packed.objects.len());
    for o in packed.objects {
        let source = Source {
            file: o.file,
            document: o.document,
        };
        let object = manifest::object_from_body(source, o.body).map_err(corrupt)?;
        if !seen.insert(object.id.identity()) {
            return Err(DesiredError::Corrupt(format!("{} kept twice", object.id)));
        }
        objects.push(object);
    }
    Ok(objects)
}

/// The manifests kept in an app's state ConfigMap, if any.
pub fn from_config_map(cm: &ConfigMap) -> Option<Stored> {
    if let Some(bytes) = cm.binary_data.as_ref().and_then(|d| d.get(INLINE_KEY)) {
        return Some(Stored::Inline(Bytes::from(bytes.0.clone())));
    }
    let text = cm.data.as_ref()?.get(PARTS_KEY)?;
    serde_json::from_str(text).ok().map(Stored::Parts)
}

/// How many part ConfigMaps the parts record of an app's state ConfigMap points at (0 for a
/// copy kept inline, none, or an unreadable record).
pub fn parts_of(cm: &ConfigMap) -> usize {
    cm.data
        .as_ref()
        .and_then(|d| d.get(PARTS_KEY))
        .and_then(|text| serde_json::from_str::<PartsRecord>(text).ok())
        .map_or(0, |r| r.parts)
}

/// How many part ConfigMaps [`state_patch`] writes for `packed` (0 when it is kept inline).
pub fn parts_needed(packed: Option<&[u8]>) -> usize {
    match packed {
        Some(p) if p.len() > MAX_INLINE_BYTES => p.len().div_ceil(PART_BYTES),
        _ => 0,
    }
}

/// Deletes the app's part ConfigMaps numbered `parts` (once the state no longer points at
/// them). A part that is already gone is fine; one that cannot be deleted is left, logged:
/// an unused part is never read (the record's count and checksum say which parts are used).
pub async fn delete_parts(client: &Client, namespace: &str, app: &str, parts: Range<usize>) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    for part in parts {
        let name = part_name(app, part);
        match api.delete(&name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(%app, part = %name, error = %e, "cannot delete a desired-state part no longer used")
            }
        }
    }
}

fn part_name(app: &str, i: usize) -> String {
    format!("{}-desired-{i}", state::object_name(app))
}

/// The compressed bytes of `stored`, reading its parts when it has some.
pub async fn read(
    client: &Client,
    namespace: &str,
    app: &str,
    stored: Stored,
) -> Result<Bytes, DesiredError> {
    let record = match stored {
        Stored::Inline(bytes) => return Ok(bytes),
        Stored::Parts(record) => record,
    };
    if record.parts > MAX_PARTS {
        return Err(DesiredError::Corrupt(format!("{} parts", record.parts)));
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut all = Vec::new();
    for part in 0..record.parts {
        let cm = api
            .get_opt(&part_name(app, part))
            .await
            .map_err(|e| DesiredError::ReadPart {
                part,
                message: e.to_string(),
            })?
            .ok_or(DesiredError::ReadPart {
                part,
                message: "missing".into(),
            })?;
        let bytes =
            cm.binary_data
                .and_then(|mut d| d.remove("part"))
                .ok_or(DesiredError::ReadPart {
                    part,
                    message: "no data".into(),
                })?;
        all.extend_from_slice(&bytes.0);
    }
    if hex::encode(Sha256::digest(&all)) != record.sha256 {
        return Err(DesiredError::Corrupt(
            "its parts do not add up (written over meanwhile)".into(),
        ));
    }
    Ok(Bytes::from(all))
}

/// What to merge into the state ConfigMap to keep `packed`: inline, or a parts record after
/// writing the parts (before the record points at them; a part from an older write is caught
/// by the record's checksum). `None` forgets what was kept.
pub async fn state_patch(
    client: &Client,
    namespace: &str,
    app: &str,
    packed: Option<&[u8]>,
) -> Result<Value, kube::Error> {
    let Some(packed) = packed else {
        return Ok(json!({"binaryData": {INLINE_KEY: null}, "data": {PARTS_KEY: null}}));
    };
    if packed.len() <= MAX_INLINE_BYTES {
        let encoded = base64::engine::general_purpose::STANDARD.encode(packed);
        return Ok(json!({"binaryData": {INLINE_KEY: encoded}, "data": {PARTS_KEY: null}}));
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let chunks: Vec<&[u8]> = packed.chunks(PART_BYTES).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let name = part_name(app, i);
        let cm = ConfigMap {
            metadata: kube::core::ObjectMeta {
                name: Some(name.clone()),
                labels: Some(
                    [(super::LABEL_MANAGED_BY.to_string(), "driftless".to_string())].into(),
                ),
                ..Default::default()
            },
            binary_data: Some([("part".to_string(), ByteString(chunk.to_vec()))].into()),
            ..Default::default()
        };
        state::merge_or_create(&api, &name, &serde_json::to_value(&cm).unwrap_or_default()).await?;
    }
    let record = PartsRecord {
        parts: chunks.len(),
        sha256: hex::encode(Sha256::digest(packed)),
    };
    Ok(json!({
        "binaryData": {INLINE_KEY: null},
        "data": {PARTS_KEY: serde_json::to_string(&record).unwrap_or_default()},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<AppFile> {
        vec![AppFile {
            path: "a.yaml".into(),
            sha: "1".repeat(40),
            content: Bytes::from_static(
                b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n---\n",
            ),
        }]
    }

    fn gzip_json(v: Value) -> Vec<u8> {
        state::gzip_json(&v).unwrap()
    }

    #[test]
    fn a_copy_of_the_files_text_as_earlier_versions_kept_it_is_still_read() {
        let text = std::str::from_utf8(&files()[0].content)
            .unwrap()
            .to_string();
        let old = gzip_json(json!({"address": "addr",
            "files": [{"path": "a.yaml", "sha": "1".repeat(40), "content": text}]}));
        assert_eq!(unpack(&old, "addr", 1 << 20).unwrap(), parsed(&files()));
    }

    #[test]
    fn a_copy_holding_an_object_twice_or_one_without_a_name_is_corrupt() {
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}});
        let object = |body: &Value| json!({"file": "a.yaml", "document": 0, "body": body});
        let twice =
            gzip_json(json!({"address": "addr", "objects": [object(&body), object(&body)]}));
        assert!(matches!(
            unpack(&twice, "addr", 1 << 20),
            Err(DesiredError::Corrupt(m)) if m.contains("twice")
        ));
        let nameless = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}});
        let nameless = gzip_json(json!({"address": "addr", "objects": [object(&nameless)]}));
        assert!(matches!(
            unpack(&nameless, "addr", 1 << 20),
            Err(DesiredError::Corrupt(_))
        ));
    }

    #[test]
    fn parts_are_counted_as_written_and_as_recorded() {
        assert_eq!(parts_needed(None), 0);
        assert_eq!(parts_needed(Some(&vec![0; MAX_INLINE_BYTES])), 0);
        assert_eq!(parts_needed(Some(&vec![0; MAX_INLINE_BYTES + 1])), 1);
        assert_eq!(parts_needed(Some(&vec![0; PART_BYTES + 1])), 2);
        let record = PartsRecord {
            parts: 3,
            sha256: String::new(),
        };
        let cm = ConfigMap {
            data: Some([(PARTS_KEY.into(), serde_json::to_string(&record).unwrap())].into()),
            ..Default::default()
        };
        assert_eq!(parts_of(&cm), 3);
        assert_eq!(parts_of(&ConfigMap::default()), 0);
    }

    fn parsed(files: &[AppFile]) -> Vec<Object> {
        parse(files).unwrap()
    }

    #[test]
    fn packed_files_come_back_only_under_their_address() {
        let packed = pack("addr", &files()).unwrap();
        assert_eq!(unpack(&packed, "addr", 1 << 20).unwrap(), parsed(&files()));
        assert!(matches!(
            unpack(&packed, "other", 1 << 20),
            Err(DesiredError::OtherInputs)
        ));
        assert!(matches!(
            unpack(&packed[..packed.len() / 2], "addr", 1 << 20),
            Err(DesiredError::Corrupt(_))
        ));
        assert!(matches!(
            unpack(&packed, "addr", 10),
            Err(DesiredError::Corrupt(_))
        ));
        let binary = vec![AppFile {
            content: Bytes::from_static(b"\xff\xfe"),
            ..files()[0].clone()
        }];
        assert!(pack("addr", &binary).is_none());
    }
}
