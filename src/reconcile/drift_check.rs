//! The drift check of one app: compare the live objects with the desired set of the last
//! applied revision, cheaply (one LIST per kind and namespace with the app's label selector,
//! a dry-run only for suspects), then heal (re-apply the drifted objects) or only report.

use std::collections::HashMap;

use kube::api::{DynamicObject, ListParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::plan::Prepared;
use super::state::{self, DriftRecord, DriftedObject};
use super::{kube_message, now_rfc3339, short, Engine, ReconcileError, LABEL_APP};
use crate::drift::{differing_fields, dotted, normalized};
use crate::forge::StatusState;
use crate::manifest::{self, ObjectRef};
use crate::render::Plan;
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
    /// Kubernetes API requests the check cost (LISTs, GETs, dry-runs, heals).
    pub api_requests: usize,
}

/// A desired object that looks drifted: its live value (none when missing) and the fields
/// that differ.
type Suspect<'p> = (&'p Prepared, Option<Value>, Vec<String>);

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
        let mut report = DriftReport {
            app: app.name.clone(),
            ..Default::default()
        };
        let st = state::load(&self.client, &ns, &app.name).await?;
        report.api_requests += 1;
        let Some(revision) = st.revision.clone() else {
            return Ok(report);
        };
        let mut desired = self.find_drift(&app, &revision, &mut report).await?;
        let mut healed = Vec::new();
        if heal && !report.drifted.is_empty() {
            healed = self.heal(&app, &mut desired, &mut report).await?;
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
            state::save_drift(&self.client, &ns, &app.name, &record).await?;
            report.api_requests += 1;
            if self.settings.drift.report_status {
                self.post_drift_status(&app, &revision, st.drift.as_ref(), &report)
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

    /// Compares the live objects with the desired set at `revision`, filling `report` (its
    /// revision, the objects checked and drifted, the requests made). Returns the desired set.
    async fn find_drift(
        &self,
        app: &AppSettings,
        revision: &str,
        report: &mut DriftReport,
    ) -> Result<Vec<Prepared>, ReconcileError> {
        report.revision = Some(revision.to_string());
        let forge = self.forge(app)?;
        let Plan::Changed { files, .. } = self.fetch(forge.as_ref(), app, revision, None).await?
        else {
            unreachable!("a plan without a known version always renders")
        };
        let objects =
            manifest::parse_files(files.iter().map(|f| (f.path.as_str(), f.content.as_ref())))?;
        let mut desired = Vec::with_capacity(objects.len());
        for obj in &objects {
            desired.push(self.prepare(app, obj).await?);
        }
        report.checked = desired.len();
        let suspects = self.suspects(app, &desired, report).await?;

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
    ) -> Result<Vec<Suspect<'p>>, ReconcileError> {
        let mut groups: HashMap<(String, Option<String>), Vec<&Prepared>> = HashMap::new();
        for p in desired {
            let key = (
                format!("{}/{}", p.resource.api_version, p.resource.plural),
                p.id.namespace.clone(),
            );
            groups.entry(key).or_default().push(p);
        }
        let selector = ListParams::default().labels(&format!("{LABEL_APP}={}", app.name));
        let mut suspects = Vec::new();
        for members in groups.values() {
            let api = self.api(members[0]);
            let list = api
                .list(&selector)
                .await
                .map_err(|e| ReconcileError::Discovery {
                    what: format!("live {}", members[0].id.kind),
                    message: kube_message(&e),
                })?;
            report.api_requests += 1;
            let live: HashMap<String, DynamicObject> = list
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name.clone().map(|n| (n, o)))
                .collect();
            for p in members {
                let live_obj = match live.get(&p.id.name) {
                    Some(o) => Some(o.clone()),
                    // Not selected: deleted, or our label was taken off.
                    None => {
                        report.api_requests += 1;
                        api.get_opt(&p.id.name)
                            .await
                            .map_err(|e| ReconcileError::Discovery {
                                what: p.id.to_string(),
                                message: kube_message(&e),
                            })?
                    }
                };
                match live_obj {
                    None => suspects.push((*p, None, Vec::new())),
                    Some(o) => {
                        let value = serde_json::to_value(&o).unwrap_or(Value::Null);
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
