//! Prune: delete what left Git, and nothing else. Only objects in the app's inventory are
//! candidates (the caller passes those whose identity, group + kind + namespace + name, is no
//! longer desired); each must still carry the app's labels and no `driftless.dev/prune:
//! disabled`, and is deleted with a `uid` precondition, so the object deleted is the object
//! seen. A Namespace or a CRD takes everything in it along, so it is deleted only when all it
//! holds is this run's own prunes (and what the cluster makes by itself for them); otherwise
//! it is kept, with the reason in the run's report.

use std::collections::{HashMap, HashSet};

use kube::api::{DeleteParams, DynamicObject, ListParams, Preconditions};
use kube::core::ApiResource;
use kube::discovery::{verbs, Scope};
use kube::{Api, Discovery};
use serde_json::Value;
use tracing::{info, warn};

use super::plan::Wanted;
use super::state::AppState;
use super::{kube_message, Engine, ReconcileError, RunReport, ANNOTATION_PRUNE};
use super::{LABEL_APP, LABEL_MANAGED_BY};
use crate::manifest::{self, Identity, ObjectRef};
use crate::settings::AppSettings;

/// An inventory object a run decided not to delete, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub id: ObjectRef,
    pub reason: String,
    /// Whether the object stays in the inventory, so a later run tries again (a Namespace or
    /// CRD that still holds something else); otherwise driftless lets go of it.
    pub retry: bool,
}

/// Objects listed while deciding whether a Namespace or CRD may go; a bound on what one prune
/// reads (each page is 500 objects).
const MAX_CONTENTS: usize = 50_000;
/// The foreign objects named in a kept Namespace's or CRD's reason.
const NAMED_IN_REASON: usize = 1;

/// Deletes `live` only if it is still the very object read (same `uid`). `Ok(false)` when it is
/// gone or was replaced in between.
pub async fn delete_seen(
    api: &Api<DynamicObject>,
    live: &DynamicObject,
) -> Result<bool, kube::Error> {
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: live.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    let name = live.metadata.name.as_deref().unwrap_or_default();
    match api.delete(name, &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

fn annotated_disabled(obj: &DynamicObject) -> bool {
    obj.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_PRUNE))
        .is_some_and(|v| v == "disabled")
}

impl Engine {
    /// Prunes what left Git: the inventory objects whose identity no desired object has, when
    /// the app prunes at all.
    pub(super) async fn prune_gone(
        &self,
        app: &AppSettings,
        st: &AppState,
        desired: &[Wanted],
        report: &mut RunReport,
    ) -> Result<(), ReconcileError> {
        // By identity: an object whose apiVersion changed is still wanted, never pruned.
        let keep: HashSet<Identity> = desired.iter().map(|w| w.id().identity()).collect();
        let gone: Vec<&ObjectRef> = st
            .inventory
            .iter()
            .map(|i| &i.id)
            .filter(|id| !keep.contains(&id.identity()))
            .collect();
        if app.prune && !gone.is_empty() {
            self.check_interrupt(report)?;
            self.prune(app, &gone, report).await?;
        }
        Ok(())
    }

    /// Deletes objects that left Git (the caller passes only inventory objects). Ordinary
    /// objects first, then CRDs, then Namespaces, so a container is judged after its contents
    /// went. What is left in place is in `report.kept`.
    pub(super) async fn prune(
        &self,
        app: &AppSettings,
        gone: &[&ObjectRef],
        report: &mut RunReport,
    ) -> Result<(), ReconcileError> {
        let mut ordered: Vec<&ObjectRef> = gone.to_vec();
        ordered.sort_by_key(|id| (manifest::is_namespace(id), manifest::is_crd(id)));
        // uids of what this run deleted: their dependents go with them.
        let mut deleted: HashMap<Identity, String> = HashMap::new();
        for id in ordered {
            let (resource, namespaced) = match self.resolve_any_version(id).await {
                Ok(found) => found,
                Err(ReconcileError::UnknownKind { .. }) => {
                    warn!(app = %app.name, object = %id, "kind no longer served; not pruned");
                    report.keep(id, "its kind is no longer served", false);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let api: Api<DynamicObject> = match (&id.namespace, namespaced) {
                (Some(ns), true) => Api::namespaced_with(self.client.clone(), ns, &resource),
                _ => Api::all_with(self.client.clone(), &resource),
            };
            let prune_err = |e: kube::Error| ReconcileError::Prune {
                object: id.to_string(),
                message: kube_message(&e),
            };
            let Some(live) = api.get_opt(&id.name).await.map_err(prune_err)? else {
                continue;
            };
            let labels = live.metadata.labels.clone().unwrap_or_default();
            let ours = labels.get(LABEL_APP).map(String::as_str) == Some(app.name.as_str())
                && labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some("driftless");
            if !ours {
                info!(app = %app.name, object = %id, "no longer labelled as this app's; left in place");
                report.keep(id, "no longer labelled as this app's", false);
                continue;
            }
            if annotated_disabled(&live) {
                info!(app = %app.name, object = %id, "prune disabled by annotation; left in place");
                report.keep(
                    id,
                    &format!("annotated {ANNOTATION_PRUNE}: disabled"),
                    false,
                );
                continue;
            }
            let holds = if manifest::is_namespace(id) {
                self.foreign_in_namespace(&id.name, &deleted).await?
            } else if manifest::is_crd(id) {
                self.foreign_of_crd(&live, &deleted).await?
            } else {
                Vec::new()
            };
            if !holds.is_empty() {
                let reason = holds_reason(&holds);
                info!(app = %app.name, object = %id, %reason, "left in place");
                report.keep(id, &reason, true);
                continue;
            }
            if delete_seen(&api, &live).await.map_err(prune_err)? {
                deleted.insert(id.identity(), live.metadata.uid.clone().unwrap_or_default());
                report.pruned.push(id.clone());
            } else {
                info!(app = %app.name, object = %id, "gone or replaced since it was read; not deleted");
            }
        }
        Ok(())
    }

    /// Finds the kind's API resource, in the recorded version if it is still served, else in
    /// the group's preferred version (an inventory written before an upgrade that dropped a
    /// version still prunes).
    async fn resolve_any_version(
        &self,
        id: &ObjectRef,
    ) -> Result<(ApiResource, bool), ReconcileError> {
        match self.resolve(id).await {
            Err(ReconcileError::UnknownKind { .. }) => {}
            other => return other,
        }
        let (group, _) = id.group_version();
        let Ok(found) = kube::discovery::group(&self.client, group).await else {
            return Err(ReconcileError::UnknownKind {
                object: id.to_string(),
                source_file: String::new(),
            });
        };
        match found.recommended_kind(&id.kind) {
            Some((ar, caps)) => Ok((ar, caps.scope == Scope::Namespaced)),
            None => Err(ReconcileError::UnknownKind {
                object: id.to_string(),
                source_file: String::new(),
            }),
        }
    }

    /// What a Namespace holds that deleting it would take along without this app having
    /// decided so: anything but this run's prunes, what they own, and what the cluster
    /// puts in every namespace.
    async fn foreign_in_namespace(
        &self,
        namespace: &str,
        deleted: &HashMap<Identity, String>,
    ) -> Result<Vec<ObjectRef>, ReconcileError> {
        let discovery = Discovery::new(self.client.clone())
            .run()
            .await
            .map_err(|e| ReconcileError::Discovery {
                what: format!("the kinds held by namespace {namespace}"),
                message: kube_message(&e),
            })?;
        let mut held = Vec::new();
        for group in discovery.groups() {
            for (ar, caps) in group.resources_by_stability() {
                if caps.scope != Scope::Namespaced
                    || !caps.supports_operation(verbs::LIST)
                    || is_event(&ar)
                {
                    continue;
                }
                let api = Api::namespaced_with(self.client.clone(), namespace, &ar);
                held.extend(list_all(&api, &ar, &format!("namespace {namespace}")).await?);
                if held.len() > MAX_CONTENTS {
                    return Err(ReconcileError::Prune {
                        object: format!("v1 Namespace {namespace}"),
                        message: format!(
                            "holds more than {MAX_CONTENTS} objects; not checked, not deleted"
                        ),
                    });
                }
            }
        }
        Ok(foreign(&held, deleted))
    }

    /// The custom resources of a CRD that this run did not prune itself, in every namespace.
    async fn foreign_of_crd(
        &self,
        crd: &DynamicObject,
        deleted: &HashMap<Identity, String>,
    ) -> Result<Vec<ObjectRef>, ReconcileError> {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let Some(ar) = crd_resource(&crd.data) else {
            return Err(ReconcileError::Prune {
                object: format!("apiextensions.k8s.io/v1 CustomResourceDefinition {name}"),
                message: "has no served version to list its objects with; not deleted".into(),
            });
        };
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let held = list_all(&api, &ar, &format!("CustomResourceDefinition {name}")).await?;
        Ok(foreign(&held, deleted))
    }
}

impl RunReport {
    fn keep(&mut self, id: &ObjectRef, reason: &str, retry: bool) {
        self.kept.push(Kept {
            id: id.clone(),
            reason: reason.to_string(),
            retry,
        });
    }
}

fn is_event(ar: &ApiResource) -> bool {
    ar.kind == "Event" && (ar.group.is_empty() || ar.group == "events.k8s.io")
}

/// The API resource of a CRD's objects, in its storage version (or any served one).
fn crd_resource(data: &Value) -> Option<ApiResource> {
    let spec = data.get("spec")?;
    let group = spec.get("group")?.as_str()?;
    let names = spec.get("names")?;
    let versions = spec.get("versions")?.as_array()?;
    let served = |v: &&Value| v.get("served").and_then(Value::as_bool) == Some(true);
    let version = versions
        .iter()
        .filter(served)
        .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .or_else(|| versions.iter().find(served))?
        .get("name")?
        .as_str()?;
    Some(ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: format!("{group}/{version}"),
        kind: names.get("kind")?.as_str()?.to_string(),
        plural: names.get("plural")?.as_str()?.to_string(),
    })
}

/// One object found inside a Namespace or of a CRD.
struct Held {
    id: ObjectRef,
    uid: String,
    owners: Vec<String>,
    disabled: bool,
    /// A ServiceAccount token Secret: the ServiceAccount it belongs to.
    token_of: Option<String>,
}

async fn list_all(
    api: &Api<DynamicObject>,
    ar: &ApiResource,
    within: &str,
) -> Result<Vec<Held>, ReconcileError> {
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api
            .list(&params)
            .await
            .map_err(|e| ReconcileError::Discovery {
                what: format!("{} in {within}", ar.plural),
                message: kube_message(&e),
            })?;
        for obj in &page.items {
            out.push(held(ar, obj));
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) if out.len() <= MAX_CONTENTS => params = params.continue_token(&token),
            _ => return Ok(out),
        }
    }
}

fn held(ar: &ApiResource, obj: &DynamicObject) -> Held {
    let meta = &obj.metadata;
    let token_of = (ar.kind == "Secret"
        && obj.data.get("type").and_then(Value::as_str)
            == Some("kubernetes.io/service-account-token"))
    .then(|| {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get("kubernetes.io/service-account.name"))
            .cloned()
            .unwrap_or_default()
    });
    Held {
        id: ObjectRef {
            api_version: ar.api_version.clone(),
            kind: ar.kind.clone(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone().unwrap_or_default(),
        },
        uid: meta.uid.clone().unwrap_or_default(),
        owners: meta
            .owner_references
            .iter()
            .flatten()
            .map(|o| o.uid.clone())
            .collect(),
        disabled: annotated_disabled(obj),
        token_of,
    }
}

/// Of the objects found, those that deleting their Namespace or CRD would destroy although
/// this app did not decide to: not pruned by this run, not owned (transitively) by something
/// it pruned or by something already gone (the garbage collector takes those), not what the
/// cluster creates in every namespace (the `default` ServiceAccount and its token,
/// `kube-root-ca.crt`), not the Endpoints of a pruned Service. Any object annotated
/// `driftless.dev/prune: disabled` counts, whatever else holds.
fn foreign(found: &[Held], deleted: &HashMap<Identity, String>) -> Vec<ObjectRef> {
    let present: HashSet<&str> = found.iter().map(|h| h.uid.as_str()).collect();
    let mut accounted: HashSet<&str> = deleted.values().map(String::as_str).collect();
    let builtin = |h: &Held| match (h.id.group_version().0, h.id.kind.as_str()) {
        ("", "ServiceAccount") => h.id.name == "default",
        ("", "ConfigMap") => h.id.name == "kube-root-ca.crt",
        _ => false,
    };
    let pruned_service = |h: &Held| {
        h.id.group_version().0.is_empty()
            && h.id.kind == "Endpoints"
            && deleted.contains_key(&Identity {
                group: String::new(),
                kind: "Service".into(),
                namespace: h.id.namespace.clone(),
                name: h.id.name.clone(),
            })
    };
    let pruned_account = |h: &Held| {
        h.token_of.as_ref().is_some_and(|sa| {
            sa == "default"
                || deleted.contains_key(&Identity {
                    group: String::new(),
                    kind: "ServiceAccount".into(),
                    namespace: h.id.namespace.clone(),
                    name: sa.clone(),
                })
        })
    };
    // Ownership chains (Deployment → ReplicaSet → Pod) settle within a few rounds.
    let mut is_accounted = vec![false; found.len()];
    loop {
        let mut changed = false;
        for (i, h) in found.iter().enumerate() {
            if is_accounted[i] {
                continue;
            }
            let ok = deleted.contains_key(&h.id.identity())
                || builtin(h)
                || pruned_service(h)
                || pruned_account(h)
                || (!h.owners.is_empty()
                    && h.owners
                        .iter()
                        .all(|o| accounted.contains(o.as_str()) || !present.contains(o.as_str())));
            if ok {
                is_accounted[i] = true;
                accounted.insert(&h.uid);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    found
        .iter()
        .zip(is_accounted)
        .filter(|(h, ok)| h.disabled || !ok)
        .map(|(h, _)| h.id.clone())
        .collect()
}

fn holds_reason(holds: &[ObjectRef]) -> String {
    let named: Vec<String> = holds
        .iter()
        .take(NAMED_IN_REASON)
        .map(ToString::to_string)
        .collect();
    let more = holds.len().saturating_sub(NAMED_IN_REASON);
    if more == 0 {
        format!("holds {}, which this run does not prune", named.join(", "))
    } else {
        format!(
            "holds {} and {more} more objects this run does not prune",
            named.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(kind: &str, name: &str, uid: &str, owners: &[&str]) -> Held {
        Held {
            id: ObjectRef {
                api_version: if kind == "ReplicaSet" || kind == "Deployment" {
                    "apps/v1".into()
                } else {
                    "v1".into()
                },
                kind: kind.into(),
                namespace: Some("ns".into()),
                name: name.into(),
            },
            uid: uid.into(),
            owners: owners.iter().map(|o| o.to_string()).collect(),
            disabled: false,
            token_of: None,
        }
    }

    fn deleted(items: &[(&Held, &str)]) -> HashMap<Identity, String> {
        items
            .iter()
            .map(|(h, uid)| (h.id.identity(), uid.to_string()))
            .collect()
    }

    #[test]
    fn dependents_of_pruned_objects_and_namespace_defaults_are_not_foreign() {
        let web = h("Deployment", "web", "u-web", &[]);
        let rs = h("ReplicaSet", "web-1", "u-rs", &["u-web"]);
        let pod = h("Pod", "web-1-x", "u-pod", &["u-rs"]);
        let orphan = h("Pod", "old", "u-old", &["u-vanished"]);
        let sa = h("ServiceAccount", "default", "u-sa", &[]);
        let mut token = h("Secret", "default-token-abc", "u-tok", &[]);
        token.token_of = Some("default".into());
        let root_ca = h("ConfigMap", "kube-root-ca.crt", "u-ca", &[]);
        let found = [web, rs, pod, orphan, sa, token, root_ca];
        let d = deleted(&[(&found[0], "u-web")]);
        assert_eq!(foreign(&found, &d), Vec::<ObjectRef>::new());
    }

    #[test]
    fn anything_else_or_an_opted_out_object_is_foreign() {
        let web = h("Deployment", "web", "u-web", &[]);
        let other = h("ConfigMap", "other-app", "u-o", &[]);
        let mut keep = h("Pod", "keep", "u-k", &["u-web"]);
        keep.disabled = true;
        let owned_by_other = h("Pod", "p", "u-p", &["u-o"]);
        let found = [web, other, keep, owned_by_other];
        let d = deleted(&[(&found[0], "u-web")]);
        let names: Vec<String> = foreign(&found, &d).into_iter().map(|id| id.name).collect();
        assert_eq!(names, ["other-app", "keep", "p"]);
    }

    #[test]
    fn the_reason_names_one_object_and_counts_the_rest() {
        let ids: Vec<ObjectRef> = ["a", "b", "c"]
            .iter()
            .map(|n| h("ConfigMap", n, n, &[]).id)
            .collect();
        assert_eq!(
            holds_reason(&ids[..1]),
            "holds v1 ConfigMap ns/a, which this run does not prune"
        );
        assert_eq!(
            holds_reason(&ids),
            "holds v1 ConfigMap ns/a and 2 more objects this run does not prune"
        );
    }

    #[test]
    fn a_crd_is_listed_in_its_storage_version() {
        let crd = serde_json::json!({"spec": {"group": "example.com",
            "names": {"kind": "Widget", "plural": "widgets"},
            "versions": [{"name": "v1beta1", "served": true, "storage": false},
                         {"name": "v1", "served": true, "storage": true}]}});
        let ar = crd_resource(&crd).unwrap();
        assert_eq!(
            (ar.api_version.as_str(), ar.plural.as_str()),
            ("example.com/v1", "widgets")
        );
    }
}
