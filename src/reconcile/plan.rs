//! Plan, the first stage of a run: which revision to run, the app's files at it (nothing when
//! its subtree is unchanged), and each manifest object made ready to apply (kind and scope
//! looked up, namespace defaulted, our labels set, content hashed), or, in a file the app's
//! last run here left applied as it is, named from the inventory without parsing it. Nothing
//! here writes.

use std::collections::{HashMap, HashSet};

use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::state::InventoryItem;
use super::{kube_message, Engine, ReconcileError, LABEL_APP, LABEL_MANAGED_BY};
use crate::forge::{AppFile, Forge};
use crate::manifest::{self, ManifestError, Object, ObjectRef, Stage};
use crate::queue::Job;
use crate::render::{Plan, RenderError, SourceVersion};
use crate::settings::AppSettings;

/// A desired object made ready to apply.
#[derive(Debug, Clone)]
pub(super) struct Prepared {
    pub(super) id: ObjectRef,
    pub(super) source: manifest::Source,
    pub(super) body: Value,
    pub(super) hash: String,
    pub(super) stage: Stage,
    pub(super) resource: ApiResource,
    pub(super) namespaced: bool,
}

/// An object of an app's desired set.
pub(super) enum Wanted {
    /// Parsed and prepared by this run.
    Prepared(Prepared),
    /// Applied before exactly as it is now (its file's blob and its hash unchanged, see
    /// [`FileMemo`]): named, not prepared, so not validated or written again.
    Known(InventoryItem),
}

impl Wanted {
    pub(super) fn id(&self) -> &ObjectRef {
        match self {
            Wanted::Prepared(p) => &p.id,
            Wanted::Known(i) => &i.id,
        }
    }

    pub(super) fn hash(&self) -> &str {
        match self {
            Wanted::Prepared(p) => &p.hash,
            Wanted::Known(i) => &i.hash,
        }
    }

    pub(super) fn prepared(&self) -> Option<&Prepared> {
        match self {
            Wanted::Prepared(p) => Some(p),
            Wanted::Known(_) => None,
        }
    }
}

/// An app's objects at a revision, ready to apply.
pub(super) struct Desired {
    /// In the order of their files (by path) and documents.
    pub(super) wanted: Vec<Wanted>,
    /// Objects of kinds that a CRD of the same set defines, prepared after it is established.
    pub(super) after_crds: Vec<Object>,
}

/// `(group, version, kind)`.
pub(super) type KindKey = (String, String, String);

/// What a replica remembers of a manifest file between an app's runs, instead of its objects:
/// its blob SHA and, per object, a digest of its reference and hash. The next run takes the
/// file's objects from the inventory, unparsed, when the blob is the same and the inventory
/// holds every one of them with that hash (nothing of the file to write); otherwise it parses
/// the file again from its content, which every fetch brings (through the blob cache).
#[derive(Debug)]
pub(super) struct FileMemo {
    sha: String,
    /// Per object in document order: [`object_digest`] and the document's index.
    objects: Vec<([u8; 16], u32)>,
    /// `(group, kind)` each CRD of the file defines.
    defines: Vec<(String, String)>,
}

/// [`FileMemo`] of each manifest file by path.
pub(super) type FileMemos = HashMap<String, FileMemo>;

/// 128 bits of SHA-256 of an object's reference and content hash: one digest names both.
fn object_digest(id: &ObjectRef, hash: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    for part in [
        id.api_version.as_str(),
        &id.kind,
        id.namespace.as_deref().unwrap_or(""),
        &id.name,
        hash,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize()[..16].try_into().expect("16 bytes")
}

/// The inventory's objects by [`object_digest`], for [`FileMemo::reuse`].
pub(super) type InventoryIndex<'a> = HashMap<[u8; 16], &'a InventoryItem>;

pub(super) fn inventory_index(inventory: &[InventoryItem]) -> InventoryIndex<'_> {
    inventory
        .iter()
        // An empty hash was recorded ahead of a write: the object must be written again.
        .filter(|i| !i.hash.is_empty())
        .map(|i| (object_digest(&i.id, &i.hash), i))
        .collect()
}

impl FileMemo {
    fn new(sha: &str, prepared: &[Prepared]) -> Self {
        Self {
            sha: sha.to_string(),
            objects: prepared
                .iter()
                .map(|p| (object_digest(&p.id, &p.hash), p.source.document as u32))
                .collect(),
            defines: prepared
                .iter()
                .filter_map(|p| manifest::crd_defines_body(&p.id, &p.body))
                .collect(),
        }
    }

    /// The file's objects as the inventory holds them, with their sources, when its blob is
    /// still `sha` and every one of them is in `inventory` with the hash it was prepared with;
    /// `None` when the file must be parsed again.
    fn reuse(
        &self,
        path: &str,
        sha: &str,
        inventory: &InventoryIndex<'_>,
    ) -> Option<Vec<(InventoryItem, manifest::Source)>> {
        if self.sha != sha {
            return None;
        }
        self.objects
            .iter()
            .map(|(digest, document)| {
                let item = inventory.get(digest)?;
                let source = manifest::Source {
                    file: path.to_string(),
                    document: *document as usize,
                };
                Some(((*item).clone(), source))
            })
            .collect()
    }

    /// Bytes this memo keeps (its strings' capacities and its lists' slots).
    pub(super) fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.sha.capacity()
            + self.objects.capacity() * std::mem::size_of::<([u8; 16], u32)>()
            + self.defines.capacity() * std::mem::size_of::<(String, String)>()
            + self
                .defines
                .iter()
                .map(|(g, k)| g.capacity() + k.capacity())
                .sum::<usize>()
    }
}

/// `(group, kind)` of each custom resource a CRD of the set defines.
type CrdKinds = HashSet<(String, String)>;

/// A manifest file of the set: applied before as it is (see [`FileMemo`]), or parsed now.
enum Entry {
    Known(Vec<(InventoryItem, manifest::Source)>),
    Parsed(Vec<Object>),
}

/// The source of each object identity seen so far in a set: an identity twice is an error
/// naming both places.
#[derive(Default)]
struct Seen(HashMap<manifest::Identity, manifest::Source>);

impl Seen {
    fn check(&mut self, id: &ObjectRef, source: &manifest::Source) -> Result<(), ManifestError> {
        match self.0.insert(id.identity(), source.clone()) {
            Some(first) => Err(ManifestError::Duplicate {
                id: id.to_string(),
                first: first.to_string(),
                second: source.to_string(),
            }),
            None => Ok(()),
        }
    }
}

/// Parses the files (in the order given) that `memos` cannot vouch for (see
/// [`FileMemo::reuse`]; none when `inventory` is `None`), and collects the `(group, kind)`
/// every CRD of the set defines.
fn parse_or_reuse(
    files: &[&AppFile],
    memos: &FileMemos,
    inventory: Option<&InventoryIndex<'_>>,
) -> Result<(Vec<Entry>, CrdKinds), ReconcileError> {
    let mut entries = Vec::with_capacity(files.len());
    let mut defined_by_crds = CrdKinds::new();
    // Shared by the files parsed in this run, so together they stay within the limits.
    let mut budget = manifest::Budget::default();
    for f in files {
        let known = memos
            .get(&f.path)
            .zip(inventory)
            .and_then(|(memo, inventory)| {
                let known = memo.reuse(&f.path, &f.sha, inventory)?;
                defined_by_crds.extend(memo.defines.iter().cloned());
                Some(known)
            });
        let entry = match known {
            Some(known) => Entry::Known(known),
            None => {
                let objs = manifest::parse_file(&f.path, &f.content, &mut budget)?;
                defined_by_crds.extend(objs.iter().filter_map(manifest::crd_defines));
                Entry::Parsed(objs)
            }
        };
        entries.push(entry);
    }
    Ok((entries, defined_by_crds))
}

impl Engine {
    /// The revision a job runs: the one it names, or the branch head (asked once per round).
    pub(super) async fn revision_to_run(
        &self,
        forge: &dyn Forge,
        app: &AppSettings,
        job: &Job,
    ) -> Result<String, ReconcileError> {
        Ok(match &job.revision {
            Some(r) => r.clone(),
            None => self.heads.head(forge, &app.repo, &app.branch).await?,
        })
    }

    /// The app's manifest files at `revision` (rendered by the renderer its path calls for), or
    /// nothing when every input still has the SHA `known` recorded.
    pub(super) async fn fetch(
        &self,
        forge: &dyn Forge,
        app: &AppSettings,
        revision: &str,
        known: Option<&SourceVersion>,
    ) -> Result<Plan, RenderError> {
        self.renderer
            .plan(forge, &self.blobs, app, revision, known)
            .await
    }

    /// Parses and prepares every manifest file in path order, except those that the app's
    /// last run on this replica left exactly as they are applied (see [`FileMemo`]; only when
    /// `inventory`, the state's, is given). `memos` is replaced by this set's files. Objects
    /// whose kind only a CRD of this set defines come back unprepared, for after the CRD is
    /// established.
    pub(super) async fn prepare_files(
        &self,
        app: &AppSettings,
        files: &[AppFile],
        memos: &mut FileMemos,
        inventory: Option<&[InventoryItem]>,
    ) -> Result<Desired, ReconcileError> {
        let mut sorted: Vec<&AppFile> = files.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        let index = inventory.map(inventory_index);
        let (entries, defined_by_crds) = parse_or_reuse(&sorted, memos, index.as_ref())?;

        let mut out = Desired {
            wanted: Vec::new(),
            after_crds: Vec::new(),
        };
        let mut fresh = FileMemos::new();
        let mut seen = Seen::default();
        for (f, entry) in sorted.iter().zip(entries) {
            match entry {
                Entry::Known(known) => {
                    for (item, source) in known {
                        seen.check(&item.id, &source)?;
                        out.wanted.push(Wanted::Known(item));
                    }
                    if let Some(memo) = memos.remove(&f.path) {
                        fresh.insert(f.path.clone(), memo);
                    }
                }
                Entry::Parsed(objs) => {
                    let (prepared, complete) = self
                        .prepare_parsed(app, objs, &defined_by_crds, &mut seen, &mut out)
                        .await?;
                    for p in &prepared {
                        seen.check(&p.id, &p.source)?;
                    }
                    if complete {
                        fresh.insert(f.path.clone(), FileMemo::new(&f.sha, &prepared));
                    }
                    out.wanted
                        .extend(prepared.into_iter().map(Wanted::Prepared));
                }
            }
        }
        *memos = fresh;
        Ok(out)
    }

    /// Prepares the objects of one parsed file. Those of a kind only a CRD of the set defines
    /// go to `out.after_crds` instead; the file is then not complete (not cached).
    async fn prepare_parsed(
        &self,
        app: &AppSettings,
        objs: Vec<Object>,
        defined_by_crds: &CrdKinds,
        seen: &mut Seen,
        out: &mut Desired,
    ) -> Result<(Vec<Prepared>, bool), ReconcileError> {
        let mut ps = Vec::with_capacity(objs.len());
        let mut complete = true;
        for obj in objs {
            match self.prepare(app, &obj).await {
                Ok(p) => ps.push(p),
                // Its kind exists once a CRD of this set is applied: stage 2.
                Err(ReconcileError::UnknownKind { .. })
                    if defined_by_crds
                        .contains(&(obj.id.group_version().0.to_string(), obj.id.kind.clone())) =>
                {
                    complete = false;
                    seen.check(&obj.id, &obj.source)?;
                    out.after_crds.push(obj);
                }
                Err(e) => return Err(e),
            }
        }
        Ok((ps, complete))
    }

    /// Looks up (and caches) the API resource and scope of an object's kind.
    pub(super) async fn resolve(
        &self,
        id: &ObjectRef,
    ) -> Result<(ApiResource, bool), ReconcileError> {
        let (group, version) = id.group_version();
        let key = (group.to_string(), version.to_string(), id.kind.clone());
        if let Some(found) = self.kinds.lock().expect("kinds cache").get(&key) {
            return Ok(found.clone());
        }
        let gvk = GroupVersionKind::gvk(group, version, &id.kind);
        match kube::discovery::pinned_kind(&self.client, &gvk).await {
            Ok((ar, caps)) => {
                let found = (ar, caps.scope == Scope::Namespaced);
                self.kinds
                    .lock()
                    .expect("kinds cache")
                    .insert(key, found.clone());
                Ok(found)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Err(ReconcileError::UnknownKind {
                object: id.to_string(),
                source_file: String::new(),
            }),
            Err(kube::Error::Discovery(_)) => Err(ReconcileError::UnknownKind {
                object: id.to_string(),
                source_file: String::new(),
            }),
            Err(e) => Err(ReconcileError::Discovery {
                what: format!("{} {}", id.api_version, id.kind),
                message: kube_message(&e),
            }),
        }
    }

    pub(super) fn forget_kind(&self, id: &ObjectRef) {
        let (group, version) = id.group_version();
        self.kinds.lock().expect("kinds cache").remove(&(
            group.to_string(),
            version.to_string(),
            id.kind.clone(),
        ));
    }

    /// Scope, namespace defaulting, our labels, and the content hash.
    pub(super) async fn prepare(
        &self,
        app: &AppSettings,
        obj: &Object,
    ) -> Result<Prepared, ReconcileError> {
        let (resource, namespaced) = self.resolve(&obj.id).await.map_err(|e| match e {
            ReconcileError::UnknownKind { object, .. } => ReconcileError::UnknownKind {
                object,
                source_file: obj.source.to_string(),
            },
            other => other,
        })?;
        let mut id = obj.id.clone();
        let mut body = obj.body.clone();
        if namespaced {
            if id.namespace.is_none() {
                let ns = app
                    .namespace
                    .clone()
                    .ok_or_else(|| ReconcileError::NoNamespace {
                        object: id.to_string(),
                        source_file: obj.source.to_string(),
                    })?;
                body["metadata"]["namespace"] = json!(ns);
                id.namespace = Some(ns);
            }
        } else if id.namespace.is_some() {
            // A namespace on a cluster-scoped object is meaningless; the API server would
            // refuse the apply.
            id.namespace = None;
            if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("namespace");
            }
        }
        manifest::fill_port_protocols(&id.kind, &mut body);
        let labels = body["metadata"]
            .as_object_mut()
            .expect("metadata checked by the manifest parser")
            .entry("labels")
            .or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        labels[LABEL_MANAGED_BY] = json!("driftless");
        labels[LABEL_APP] = json!(app.name);
        // 128 bits of SHA-256 tell an edit apart; the rest would only make the state bigger.
        let hash =
            hex::encode(&Sha256::digest(serde_json::to_vec(&body).expect("JSON value"))[..16]);
        Ok(Prepared {
            source: obj.source.clone(),
            stage: manifest::stage_of(&id, namespaced),
            id,
            body,
            hash,
            resource,
            namespaced,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, hash: &str) -> InventoryItem {
        InventoryItem {
            id: ObjectRef {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: Some("web".into()),
                name: name.into(),
            },
            hash: hash.into(),
        }
    }

    fn memo(sha: &str, items: &[InventoryItem]) -> FileMemo {
        FileMemo {
            sha: sha.into(),
            objects: items
                .iter()
                .enumerate()
                .map(|(i, it)| (object_digest(&it.id, &it.hash), i as u32))
                .collect(),
            defines: Vec::new(),
        }
    }

    #[test]
    fn a_file_is_taken_from_the_inventory_only_when_applied_exactly_as_it_is() {
        let applied = [item("a", "h1"), item("b", "h2")];
        let m = memo("blob1", &applied);
        let inventory = applied.to_vec();
        let index = inventory_index(&inventory);
        let known = m.reuse("app/x.yaml", "blob1", &index).unwrap();
        assert_eq!(
            known.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>(),
            applied
        );
        assert_eq!(known[1].1.to_string(), "app/x.yaml (document 2)");

        // Another blob: parsed again.
        assert!(m.reuse("app/x.yaml", "blob2", &index).is_none());
        // An object applied with another hash (or only recorded ahead of its write, with an
        // empty one), or gone from the inventory: parsed again.
        for changed in [
            vec![item("a", "h1"), item("b", "other")],
            vec![item("a", "h1"), item("b", "")],
            vec![item("a", "h1")],
        ] {
            let index = inventory_index(&changed);
            assert!(m.reuse("app/x.yaml", "blob1", &index).is_none());
        }
        // Another version of the same object is another object.
        let mut moved = item("a", "h1");
        moved.id.api_version = "v2".into();
        let changed = [moved, item("b", "h2")];
        assert!(m
            .reuse("app/x.yaml", "blob1", &inventory_index(&changed))
            .is_none());
    }
}
