//! The drift check of one app: compare the live objects with the desired set of the last
//! applied revision, cheaply (one LIST per kind and namespace with the app's label selector,
//! a dry-run only for suspects), then heal (re-apply the drifted objects) or only report.

use std::collections::HashMap;

use kube::api::{ApiResource, ListParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::desired::{self, DesiredError};
use super::plan::Prepared;
use super::state::{self, AppState, DriftRecord, DriftedObject};
use super::{kube_message, live, now_rfc3339, short, Engine, ReconcileError, LABEL_APP};
use crate::drift::{differing_fields, dotted, normalized};
use crate::forge::AppFile;
use crate::forge::StatusState;
use crate::manifest::{Object, ObjectRef};
use crate::render::{Plan, SourceVersion};
use crate::settings::AppSettings;

/// What one drift check found and did.
#[derive(Debug, Clone, Default)]
pub struct DriftReport {
    pub app: String,
    /// The applied revision compared against; `None` when the app was never applied.
    pub revision: Option<String>,
    pub checked: usize,
    pub drifted: Vec<DriftedObject>,
    pub healed: bool,
    /// Why the heal left drift in place: the first object the API server refused to write,
    /// with its reason (a field another manager owns under `force_conflicts = false`).
    pub heal_error: Option<String>,
    /// Kubernetes API requests the check cost (LISTs, GETs, dry-runs, heals). A request
    /// shared by the apps checked together in a sweep (the bulk read of their states, the
    /// LISTs of their live objects) is shared out among their reports, so the reports of a
    /// sweep add up to the requests its checks made.
    pub api_requests: usize,
}

/// A desired object that looks drifted: its live value (none when missing) and the fields
/// that differ.
type Suspect<'p> = (&'p Prepared, Option<Value>, Vec<String>);

/// `("<apiVersion>/<plural>", namespace)`: what one LIST reads.
pub(super) type GroupKey = (String, Option<String>);

pub(super) fn group_key(p: &Prepared) -> GroupKey {
    group_key_of(&p.resource, p.id.namespace.clone())
}

/// The [`GroupKey`] of objects of `resource` in `namespace` (none: cluster-scoped).
pub(super) fn group_key_of(resource: &ApiResource, namespace: Option<String>) -> GroupKey {
    (
        format!("{}/{}", resource.api_version, resource.plural),
        namespace,
    )
}

/// Live objects listed once for many apps' drift checks: by [`GroupKey`], each object by
/// name. A group not in it is listed by the check itself.
#[derive(Default)]
pub(super) struct LiveIndex(pub(super) HashMap<GroupKey, live::ByName>);

impl DriftReport {
    /// A one-line summary: `Drifted: 2 objects (apps/v1 Deployment demo/web: spec.replicas; ...)`.
    pub fn summary(&self) -> String {
        if self.drifted.is_empty() {
            return "In sync".into();
        }
        let parts: Vec<String> = self
            .drifted
            .iter()
            .map(|d| {
                if d.missing {
                    format!("{}: missing", d.id)
                } else {
                    format!("{}: {}", d.id, d.fields.join(", "))
                }
            })
            .collect();
        format!(
            "Drifted: {} objects ({})",
            self.drifted.len(),
            parts.join("; ")
        )
    }
}

impl Engine {
    /// Checks one app for drift against its last applied revision; heals when `heal` is set
    /// (the caller passes the app's policy, or false for `diff`). The comparison takes no
    /// Lease, so a sweep of apps in sync costs no writes; a heal takes it (see [`Self::heal`]).
    pub async fn check_drift(
        &self,
        app_name: &str,
        heal: bool,
    ) -> Result<DriftReport, ReconcileError> {
        let app = self
            .settings
            .app(app_name)
            .cloned()
            .ok_or_else(|| ReconcileError::UnknownApp(app_name.to_string()))?;
        let ns = self.settings.kubernetes.state_namespace.clone();
        let (st, stored) = match self.take_prefetched(&app.name) {
            Some(kept) => kept,
            None => state::load_with_desired(&self.client, &ns, &app.name).await?,
        };
        let mut report = DriftReport {
            app: app.name.clone(),
            api_requests: 1,
            ..Default::default()
        };
        let Some(revision) = st.revision.clone() else {
            return Ok(report);
        };
        report.revision = Some(revision.clone());
        let desired = self.desired_objects(&app, &st, stored).await?;
        self.check_against(&app, &st, desired, heal, &LiveIndex::default(), report)
            .await
    }

    /// The drift check of an app whose state `st` was read and whose desired objects at the
    /// applied revision are `desired`; `live` holds objects already listed for many apps.
    pub(super) async fn check_against(
        &self,
        app: &AppSettings,
        st: &AppState,
        desired: Vec<Prepared>,
        heal: bool,
        live: &LiveIndex,
        mut report: DriftReport,
    ) -> Result<DriftReport, ReconcileError> {
        let ns = self.settings.kubernetes.state_namespace.as_str();
        let mut desired = self.compare(app, desired, &mut report, live).await?;
        let mut healed = Vec::new();
        let heal = heal && !head_written_then_failed(st);
        if !heal && head_written_then_failed(st) && !report.drifted.is_empty() {
            info!(app = %app.name, "drift reported, not healed: the branch head's run wrote these objects and then failed");
        }
        if heal && !report.drifted.is_empty() {
            healed = self.heal(app, &mut desired, &mut report).await?;
        }
        let Some(revision) = report.revision.clone() else {
            return Ok(report);
        };
        if !report.drifted.is_empty() {
            warn!(app = %app.name, revision = short(&revision), drift = %report.summary(), "drift found");
            for d in &report.drifted {
                report.api_requests += 1;
                self.emit_event(&app.name, d, healed.contains(&d.id)).await;
            }
        }
        // The state is written only when the finding changes, so a sweep of apps in sync
        // costs no writes; `checked_at` is when the current finding was first made.
        let unchanged = st.drift.as_ref().is_some_and(|d| {
            d.revision.as_deref() == Some(revision.as_str())
                && d.objects == report.drifted
                && d.healed == report.healed
        });
        if !unchanged {
            let record = DriftRecord {
                checked_at: now_rfc3339(),
                revision: Some(revision.clone()),
                objects: report.drifted.clone(),
                healed: report.healed,
            };
            state::save_drift(&self.client, ns, &app.name, &record).await?;
            report.api_requests += 1;
            if self.settings.drift.report_status {
                self.post_drift_status(app, &revision, st.drift.as_ref(), &report)
                    .await;
            }
        }
        Ok(report)
    }

    /// Under `drift.report_status`, the applied commit's status follows the drift finding:
    /// `failure` naming what drifted while drift remains (found and not healed), `success`
    /// once the cluster matches that revision again. Called only when the finding changed
    /// (`before` is the previous one), so a tick that finds what the last found posts nothing.
    async fn post_drift_status(
        &self,
        app: &AppSettings,
        revision: &str,
        before: Option<&DriftRecord>,
        report: &DriftReport,
    ) {
        let remains = !report.drifted.is_empty() && !report.healed;
        let remained = before.is_some_and(|d| {
            d.revision.as_deref() == Some(revision) && !d.objects.is_empty() && !d.healed
        });
        let (state, description) = match (remains, remained) {
            (true, _) => (StatusState::Failure, report.summary()),
            (false, true) => (
                StatusState::Success,
                format!("In sync again with {}", short(revision)),
            ),
            (false, false) => return,
        };
        match self.forge(app) {
            Ok(forge) => {
                self.post_status(forge.as_ref(), app, revision, state, &description)
                    .await
            }
            Err(e) => warn!(app = %app.name, error = %e, "cannot post the drift status"),
        }
    }

    /// Re-applies the drifted objects of `report`, under the app's Lease and this replica's
    /// slot of the app, so no run of the app is in flight. The state is read again under
    /// them: when a run applied another revision since the comparison, the comparison is made
    /// again against that one (`desired` and `report` replaced), so a heal never writes an
    /// older revision over a newer apply. Applies as runs do, so with `force_conflicts =
    /// false` a field another manager owns is not taken: the conflict goes to
    /// `report.heal_error` and the rest is healed. Returns the objects healed.
    async fn heal(
        &self,
        app: &AppSettings,
        desired: &mut Vec<Prepared>,
        report: &mut DriftReport,
    ) -> Result<Vec<ObjectRef>, ReconcileError> {
        let ns = self.settings.kubernetes.state_namespace.as_str();
        let slot = self.slot(&app.name);
        let mut slot = slot.lock().await;
        // The Lease is written below, which voids what the slot remembers of it.
        slot.lease = None;
        slot.state = None;
        let guard = self.leases().acquire(&app.name).await?;
        let healed = async {
            let st = state::load(&self.client, ns, &app.name).await?;
            report.api_requests += 1;
            if st.revision != report.revision {
                info!(app = %app.name, revision = ?st.revision.as_deref().map(short), "applied revision moved since the comparison; comparing again");
                let requests = report.api_requests;
                *report = DriftReport {
                    app: app.name.clone(),
                    api_requests: requests,
                    ..Default::default()
                };
                desired.clear();
                if let Some(revision) = &st.revision {
                    *desired = self.find_drift(app, revision, report).await?;
                }
            }
            let drifted: Vec<&Prepared> = desired
                .iter()
                .filter(|p| report.drifted.iter().any(|d| d.id == p.id))
                .collect();
            if let Some(why) = guard.watch().lost() {
                return Err(ReconcileError::LeaseLost {
                    app: app.name.clone(),
                    why,
                    written: 0,
                });
            }
            let mut results = self.patch_all(&drifted, &self.params(app, false)).await;
            report.api_requests += results.len();
            results.sort_by(|a, b| a.0.cmp(&b.0));
            let mut healed = Vec::new();
            for (id, r) in results {
                match r {
                    Ok(()) => healed.push(id),
                    Err(message) if report.heal_error.is_none() => {
                        report.heal_error = Some(format!("{id}: not healed: {message}"));
                    }
                    Err(_) => {}
                }
            }
            report.healed = report.heal_error.is_none() && !report.drifted.is_empty();
            Ok::<_, ReconcileError>(healed)
        }
        .await;
        guard.release().await;
        drop(slot);
        let healed = healed?;
        match &report.heal_error {
            Some(e) => warn!(app = %app.name, error = %e, "drift not healed"),
            None if report.healed => {
                info!(app = %app.name, objects = report.drifted.len(), "drift healed")
            }
            None => {}
        }
        Ok(healed)
    }

    /// Compares the live objects with the desired set at `revision`, read from the forge,
    /// filling `report` (its revision, the objects checked and drifted, the requests made).
    /// Returns the desired set.
    async fn find_drift(
        &self,
        app: &AppSettings,
        revision: &str,
        report: &mut DriftReport,
    ) -> Result<Vec<Prepared>, ReconcileError> {
        report.revision = Some(revision.to_string());
        let (files, _) = self.render_from_forge(app, revision).await?;
        let desired = self.prepare_all(app, &files).await?;
        self.compare(app, desired, report, &LiveIndex::default())
            .await
    }

    /// The app's manifests at `revision`, read and rendered from the forge, with what they were
    /// rendered from.
    async fn render_from_forge(
        &self,
        app: &AppSettings,
        revision: &str,
    ) -> Result<(Vec<AppFile>, SourceVersion), ReconcileError> {
        let forge = self.forge(app)?;
        let Plan::Changed { files, version } =
            self.fetch(forge.as_ref(), app, revision, None).await?
        else {
            unreachable!("a plan without a known version always renders")
        };
        Ok((files, version))
    }

    /// Parses and prepares every object of `files`.
    pub(super) async fn prepare_all(
        &self,
        app: &AppSettings,
        files: &[AppFile],
    ) -> Result<Vec<Prepared>, ReconcileError> {
        self.prepare_objects(app, &desired::parse(files)?).await
    }

    /// Prepares every object of `objects`.
    async fn prepare_objects(
        &self,
        app: &AppSettings,
        objects: &[Object],
    ) -> Result<Vec<Prepared>, ReconcileError> {
        let mut desired = Vec::with_capacity(objects.len());
        for obj in objects {
            desired.push(self.prepare(app, obj).await?);
        }
        Ok(desired)
    }

    /// The desired objects of the applied revision of `st`: from the manifests kept beside the
    /// state when they were rendered from the inputs the state records, without the forge;
    /// otherwise (none kept, corrupt, of other inputs) from the forge, with a log line, keeping
    /// them for the next check when they are what the state says was applied.
    pub(super) async fn desired_objects(
        &self,
        app: &AppSettings,
        st: &AppState,
        stored: Option<desired::Stored>,
    ) -> Result<Vec<Prepared>, ReconcileError> {
        let ns = self.settings.kubernetes.state_namespace.as_str();
        let kustomize = &self.settings.render.kustomize_command;
        let address = st.version().map(|v| desired::address(app, kustomize, &v));
        let unusable = match (&address, stored) {
            (None, _) => "the applied revision's inputs are not recorded".to_string(),
            (Some(_), None) => DesiredError::Missing.to_string(),
            (Some(address), Some(stored)) => {
                let limit = 2 * self
                    .settings
                    .fetch
                    .max_app_bytes
                    .max(self.settings.render.max_output_bytes)
                    + (1 << 20);
                let kept = desired::read(&self.client, ns, &app.name, stored)
                    .await
                    .and_then(|bytes| desired::unpack(&bytes, address, limit));
                match kept {
                    Ok(objects) => return self.prepare_objects(app, &objects).await,
                    Err(e) => e.to_string(),
                }
            }
        };
        let revision = st.revision.as_deref().unwrap_or_default();
        info!(app = %app.name, reason = %unusable, "stored desired state not usable; reading the forge");
        let (files, version) = self.render_from_forge(app, revision).await?;
        let objects = desired::parse(&files)?;
        if let (Some(address), true) = (&address, st.version().as_ref() == Some(&version)) {
            if let Some(packed) = desired::pack_objects(address, &objects) {
                if let Err(e) =
                    state::save_desired(&self.client, ns, &app.name, &packed, st.desired_parts)
                        .await
                {
                    warn!(app = %app.name, error = %e, "cannot keep the desired state");
                }
            }
        }
        self.prepare_objects(app, &objects).await
    }

    /// Compares the live objects with `desired`, filling `report` (the objects checked and
    /// drifted, the requests made). Returns the desired set.
    async fn compare(
        &self,
        app: &AppSettings,
        desired: Vec<Prepared>,
        report: &mut DriftReport,
        live: &LiveIndex,
    ) -> Result<Vec<Prepared>, ReconcileError> {
        report.checked = desired.len();
        let suspects = self.suspects(app, &desired, report, live).await?;

        // Confirm each suspect: would applying it change anything? Defaulting, quantity
        // formats and mutating admission make a field differ without it being drift.
        let dry = self.params(app, true);
        for (p, live, fields) in suspects {
            let Some(live) = live else {
                report.drifted.push(DriftedObject {
                    id: p.id.clone(),
                    missing: true,
                    fields: Vec::new(),
                });
                continue;
            };
            report.api_requests += 1;
            let after = self
                .api(p)
                .patch(&p.id.name, &dry, &kube::api::Patch::Apply(&p.body))
                .await;
            let drifted = match after {
                Ok(after) => {
                    let after = serde_json::to_value(&after).unwrap_or(Value::Null);
                    normalized(&after) != normalized(&live)
                }
                // Applying Git's version would not even be accepted as things are: certainly
                // drift (a heal then reports the API server's reason).
                Err(e) => {
                    warn!(app = %app.name, object = %p.id, error = %kube_message(&e), "dry-run of a drifted object rejected");
                    true
                }
            };
            if drifted {
                report.drifted.push(DriftedObject {
                    id: p.id.clone(),
                    missing: false,
                    fields: fields.iter().map(|f| dotted(f)).collect(),
                });
            }
        }
        report.drifted.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(desired)
    }

    /// Objects that look drifted from one LIST per (resource, namespace) with the app's label
    /// selector: missing ones (with no live value) and those with differing fields.
    async fn suspects<'p>(
        &self,
        app: &AppSettings,
        desired: &'p [Prepared],
        report: &mut DriftReport,
        index: &LiveIndex,
    ) -> Result<Vec<Suspect<'p>>, ReconcileError> {
        let mut groups: HashMap<GroupKey, Vec<&Prepared>> = HashMap::new();
        for p in desired {
            groups.entry(group_key(p)).or_default().push(p);
        }
        let selector = ListParams::default().labels(&format!("{LABEL_APP}={}", app.name));
        let mut suspects = Vec::new();
        for (key, members) in &groups {
            let api = self.api(members[0]);
            let listed;
            let live: &live::ByName = match index.0.get(key) {
                Some(listed) => listed,
                None => {
                    let list = live::list(&api, selector.clone(), &mut report.api_requests);
                    listed = list.await.map_err(|e| ReconcileError::Discovery {
                        what: format!("live {}", members[0].id.kind),
                        message: kube_message(&e),
                    })?;
                    &listed
                }
            };
            for p in members {
                let ours = live::get(live, &p.id.name).filter(|o| {
                    o["metadata"]["labels"][LABEL_APP].as_str() == Some(app.name.as_str())
                });
                let live_obj = match ours {
                    Some(o) => Some(o),
                    // Not selected: deleted, or our label was taken off.
                    None => {
                        report.api_requests += 1;
                        api.get_opt(&p.id.name)
                            .await
                            .map_err(|e| ReconcileError::Discovery {
                                what: p.id.to_string(),
                                message: kube_message(&e),
                            })?
                            .map(|o| serde_json::to_value(&o).unwrap_or(Value::Null))
                    }
                };
                match live_obj {
                    None => suspects.push((*p, None, Vec::new())),
                    Some(value) => {
                        let fields = differing_fields(&p.id.kind, &p.body, &value, &app.ignore);
                        if !fields.is_empty() {
                            suspects.push((*p, Some(value), fields));
                        }
                    }
                }
            }
        }
        Ok(suspects)
    }

    /// A Kubernetes Event on the drifted object (best effort: a missing namespace or RBAC
    /// refusal only logs). Names the fields, never their values.
    async fn emit_event(&self, app: &str, d: &DriftedObject, healed: bool) {
        let ns = d.id.namespace.clone().unwrap_or_else(|| "default".into());
        let message = if d.missing {
            format!("driftless app {app}: object is missing from the cluster")
        } else {
            format!(
                "driftless app {app}: fields differ from Git: {}",
                d.fields.join(", ")
            )
        };
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "driftless-drift-", "namespace": ns},
            "involvedObject": {
                "apiVersion": d.id.api_version, "kind": d.id.kind, "name": d.id.name,
                "namespace": d.id.namespace,
            },
            "reason": if healed { "DriftHealed" } else { "DriftDetected" },
            "message": message,
            "type": "Warning",
            "source": {"component": "driftless"},
            "firstTimestamp": now_rfc3339(),
            "lastTimestamp": now_rfc3339(),
            "count": 1,
        });
        let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(self.client.clone(), &ns);
        let Ok(event) = serde_json::from_value(event) else {
            return;
        };
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            warn!(%app, object = %d.id, error = %kube_message(&e), "cannot record a drift event");
        }
    }
}

/// Whether the app's last run was of a newer revision and failed after writing objects (a
/// rollout past its deadline): the cluster then holds those objects as Git's head has them,
/// on purpose. Healing them back to the applied revision would roll the commit back behind
/// Git's back, so until the next commit (the fix or the revert) or a `sync`, drift is found
/// and reported but not healed.
fn head_written_then_failed(st: &AppState) -> bool {
    st.last_result.as_ref().is_some_and(|r| {
        r.outcome == super::revision::OUTCOME_FAILED && r.applied > 0 && r.revision != st.revision
    })
}
