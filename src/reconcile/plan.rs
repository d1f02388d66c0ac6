//! Plan, the first stage of a run: which revision to run, the app's files at it (nothing when
//! its subtree is unchanged), and each manifest object made ready to apply (kind and scope
//! looked up, namespace defaulted, our labels set, content hashed). Nothing here writes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

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

/// An app's objects at a revision, ready to apply.
pub(super) struct Desired {
    pub(super) ready: Vec<Arc<Prepared>>,
    /// Objects of kinds that a CRD of the same set defines, prepared after it is established.
    pub(super) after_crds: Vec<Object>,
}

/// `(group, version, kind)`.
pub(super) type KindKey = (String, String, String);

/// Prepared objects of each manifest file by path, valid for the file's blob SHA.
pub(super) type FileCache = HashMap<String, (String, Vec<Arc<Prepared>>)>;

/// `(group, kind)` of each custom resource a CRD of the set defines.
type CrdKinds = HashSet<(String, String)>;

/// A manifest file of the set: prepared before from the same blob, or parsed now.
enum Entry {
    Cached(Vec<Arc<Prepared>>),
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

/// Parses the files (in the order given) that `cache` holds no preparation of for the same
/// blob, and collects the `(group, kind)` every CRD of the set defines.
fn parse_or_reuse(
    files: &[&AppFile],
    cache: &FileCache,
) -> Result<(Vec<Entry>, CrdKinds), ReconcileError> {
    let mut entries = Vec::with_capacity(files.len());
    let mut defined_by_crds = CrdKinds::new();
    // Shared by the files parsed in this run, so together they stay within the limits.
    let mut budget = manifest::Budget::default();
    for f in files {
        let entry = match cache.get(&f.path) {
            Some((sha, prepared)) if *sha == f.sha => Entry::Cached(prepared.clone()),
            _ => Entry::Parsed(manifest::parse_file(&f.path, &f.content, &mut budget)?),
        };
        match &entry {
            Entry::Cached(ps) => defined_by_crds.extend(
                ps.iter()
                    .filter_map(|p| manifest::crd_defines_body(&p.id, &p.body)),
            ),
            Entry::Parsed(objs) => {
                defined_by_crds.extend(objs.iter().filter_map(manifest::crd_defines))
            }
        }
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

    /// Parses and prepares every manifest file in path order, reusing what this replica
    /// prepared before from the same blob (`cache`, replaced by this set's files). Objects whose
    /// kind only a CRD of this set defines come back unprepared, for after the CRD is
    /// established.
    pub(super) async fn prepare_files(
        &self,
        app: &AppSettings,
        files: &[AppFile],
        cache: &mut FileCache,
    ) -> Result<Desired, ReconcileError> {
        let mut sorted: Vec<&AppFile> = files.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        let (entries, defined_by_crds) = parse_or_reuse(&sorted, cache)?;

        let mut out = Desired {
            ready: Vec::new(),
            after_crds: Vec::new(),
        };
        let mut fresh = FileCache::new();
        let mut seen = Seen::default();
        for (f, entry) in sorted.iter().zip(entries) {
            let (prepared, complete) = match entry {
                Entry::Cached(ps) => (ps, true),
                Entry::Parsed(objs) => {
                    self.prepare_parsed(app, objs, &defined_by_crds, &mut seen, &mut out)
                        .await?
                }
            };
            for p in &prepared {
                seen.check(&p.id, &p.source)?;
            }
            if complete {
                fresh.insert(f.path.clone(), (f.sha.clone(), prepared.clone()));
            }
            out.ready.extend(prepared);
        }
        *cache = fresh;
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
    ) -> Result<(Vec<Arc<Prepared>>, bool), ReconcileError> {
        let mut ps = Vec::with_capacity(objs.len());
        let mut complete = true;
        for obj in objs {
            match self.prepare(app, &obj).await {
                Ok(p) => ps.push(Arc::new(p)),
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
