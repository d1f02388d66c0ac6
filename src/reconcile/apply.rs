//! Apply, the stage of a run that writes: validate every write with a server-side dry-run,
//! record in the inventory what the run is about to create, then server-side apply in stages
//! (Namespaces and CRDs, other cluster-scoped objects, namespaced objects), and afterwards wait
//! for what was written to become healthy.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Api, Resource};
use serde_json::Value;
use tracing::warn;

use super::health::{self, Health};
use super::phases::Phase;
use super::plan::{Desired, Prepared, Wanted};
use super::record::check_state_fits;
use super::run_lease::RunLease;
use super::state::{self, AppState, InventoryItem};
use super::{kube_message, Attempt, Engine, ReconcileError, RunReport, FIELD_MANAGER};
use crate::manifest::{self, Object, ObjectRef, Stage};
use crate::queue::Job;
use crate::settings::AppSettings;

/// Objects applied (or dry-run) at once within one stage. A write the API server throttles
/// (429 from API priority and fairness or max-in-flight; 503, 504) is tried again by the kube
/// client itself after the server's Retry-After or an exponential backoff, at most 15 times
/// (kube's `RetryPolicy::server_retry`, on in every client built from a `Config`), before
/// it fails the run.
const APPLY_CONCURRENCY: usize = 8;
/// How long a CRD may take to become Established.
const CRD_ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a kind an Established CRD defines may take to appear in discovery.
const DISCOVERY_LAG: Duration = Duration::from_secs(10);

/// What a run writes, and when each write can be validated.
struct Writes<'a> {
    /// The objects whose content differs from the inventory's (all of them on a full run), by
    /// stage.
    all: Vec<&'a Prepared>,
    /// Namespaces of the set that do not exist yet.
    missing_ns: HashSet<&'a str>,
    /// Writes validated before anything is written.
    now: Vec<&'a Prepared>,
    /// Writes into a namespace this run creates, validated once it exists.
    later: Vec<&'a Prepared>,
    /// Every write, those of kinds a CRD of the set defines included.
    total: usize,
}

impl Engine {
    /// Validates and writes the desired objects in stages. Before the first write, checks that
    /// the state the run would leave fits in the cluster and records any object the inventory
    /// does not know yet (`st` is updated and saved), so nothing it applies can be forgotten.
    /// Returns every desired object (those of kinds its CRDs define now prepared too), or
    /// `None` for a dry run, which stops after validation with the objects it would write in
    /// `report.applied`.
    pub(super) async fn apply(
        &self,
        at: &Attempt<'_>,
        st: &mut AppState,
        run_lease: &mut RunLease,
        desired: Desired,
        report: &mut RunReport,
    ) -> Result<Option<Vec<Wanted>>, ReconcileError> {
        let (app, job, opts) = (at.app, at.job, at.opts);
        let Desired { wanted, after_crds } = desired;
        if wanted.is_empty() && after_crds.is_empty() && !app.allow_empty {
            return Err(ReconcileError::EmptySet);
        }
        report.objects = wanted.len() + after_crds.len();
        check_state_fits(
            app,
            st,
            wanted
                .iter()
                .map(Wanted::id)
                .chain(after_crds.iter().map(|o| &o.id)),
        )?;
        let writes = self.writes(job, st, &wanted, after_crds.len()).await?;
        // A single write validates itself.
        if writes.total > 1 || opts.dry_run {
            let dry_run = self.dry_run_all(&writes.now, app);
            self.phases.time(Phase::DryRun, dry_run).await?;
        }
        if opts.dry_run {
            report.applied = writes.all.iter().map(|p| p.id.clone()).collect();
            return Ok(None);
        }
        self.record_intent(app, st, run_lease, writes.all.iter().map(|p| &p.id))
            .await?;

        let created = self
            .apply_foundation(app, &writes, !after_crds.is_empty(), report)
            .await?;
        let late = self
            .prepare_after_crds(app, st, run_lease, &after_crds)
            .await?;
        let late_refs: Vec<&Prepared> = late.iter().collect();
        self.validate_later(app, &writes, &late_refs, &created, report)
            .await?;

        // Stages 2 and 3.
        for stage in [Stage::Cluster, Stage::Namespaced] {
            self.check_interrupt(report)?;
            let batch: Vec<&Prepared> = writes
                .all
                .iter()
                .copied()
                .chain(late_refs.iter().copied())
                .filter(|p| p.stage == stage)
                .collect();
            let apply = self.apply_all(&batch, app, report);
            self.phases.time(Phase::Apply, apply).await?;
        }

        let mut desired = wanted;
        desired.extend(late.into_iter().map(Wanted::Prepared));
        Ok(Some(desired))
    }

    /// Sorts out what to write (never an object known unchanged) and when it can be
    /// validated: objects in namespaces this run creates are validated once those namespaces
    /// exist.
    async fn writes<'a>(
        &self,
        job: &Job,
        st: &AppState,
        wanted: &'a [Wanted],
        after_crds: usize,
    ) -> Result<Writes<'a>, ReconcileError> {
        let previous: HashMap<manifest::Identity, String> = st
            .inventory
            .iter()
            .map(|i| (i.id.identity(), i.hash.clone()))
            .collect();
        let needs_write = |p: &Prepared| {
            job.full || previous.get(&p.id.identity()).map(String::as_str) != Some(p.hash.as_str())
        };
        let creating: HashSet<&str> = wanted
            .iter()
            .map(Wanted::id)
            .filter(|id| manifest::is_namespace(id))
            .map(|id| id.name.as_str())
            .collect();
        let mut all: Vec<&Prepared> = wanted
            .iter()
            .filter_map(Wanted::prepared)
            .filter(|p| needs_write(p))
            .collect();
        all.sort_by_key(|p| p.stage);
        let total = all.len() + after_crds;
        let mut missing_ns = HashSet::new();
        for ns in creating {
            if !self.namespace_exists(ns).await? {
                missing_ns.insert(ns);
            }
        }
        let (now, later): (Vec<&Prepared>, Vec<&Prepared>) = all.iter().partition(|p| {
            p.id.namespace
                .as_deref()
                .is_none_or(|ns| !missing_ns.contains(ns))
        });
        Ok(Writes {
            all,
            missing_ns,
            now,
            later,
            total,
        })
    }

    /// Stage 1: Namespaces and CRDs, then waits for the CRDs to be established. Returns what
    /// this stage created, to be deleted again if an object that could only be validated once
    /// it exists is rejected.
    async fn apply_foundation<'a>(
        &self,
        app: &AppSettings,
        writes: &Writes<'a>,
        crd_objects_follow: bool,
        report: &mut RunReport,
    ) -> Result<Vec<&'a ObjectRef>, ReconcileError> {
        self.check_interrupt(report)?;
        let foundation: Vec<&'a Prepared> = writes
            .all
            .iter()
            .copied()
            .filter(|p| p.stage == Stage::Foundation)
            .collect();
        let mut created: Vec<&'a ObjectRef> = foundation
            .iter()
            .copied()
            .filter(|p| {
                manifest::is_namespace(&p.id) && writes.missing_ns.contains(p.id.name.as_str())
            })
            .map(|p| &p.id)
            .collect();
        let crds = || {
            foundation
                .iter()
                .copied()
                .filter(|p| manifest::is_crd(&p.id))
        };
        if crd_objects_follow {
            for crd in crds() {
                if !self.exists(crd).await? {
                    created.push(&crd.id);
                }
            }
        }
        self.apply_all(&foundation, app, report).await?;
        if crd_objects_follow || crds().next().is_some() {
            for crd in crds() {
                self.wait_established(&crd.id.name).await?;
            }
        }
        Ok(created)
    }

    /// Prepares the objects whose kinds a CRD of the set defines (established by now) and
    /// records them in the inventory before they are written.
    async fn prepare_after_crds(
        &self,
        app: &AppSettings,
        st: &mut AppState,
        run_lease: &mut RunLease,
        after_crds: &[Object],
    ) -> Result<Vec<Prepared>, ReconcileError> {
        let mut late = Vec::new();
        for obj in after_crds {
            late.push(self.prepare_defined_kind(app, obj).await?);
        }
        self.record_intent(app, st, run_lease, late.iter().map(|p| &p.id))
            .await?;
        Ok(late)
    }

    /// Prepares an object of a kind that a CRD of this run defines and that is Established:
    /// the API server serves the kind in discovery a moment after the CRD's condition says so
    /// (more so under load), so an unknown kind is asked again for a few seconds before it
    /// fails the run.
    async fn prepare_defined_kind(
        &self,
        app: &AppSettings,
        obj: &Object,
    ) -> Result<Prepared, ReconcileError> {
        let deadline = tokio::time::Instant::now() + DISCOVERY_LAG;
        loop {
            self.forget_kind(&obj.id);
            match self.prepare(app, obj).await {
                Err(ReconcileError::UnknownKind { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    /// Validates the writes that stage 1 made possible to validate (into namespaces it
    /// created, of kinds its CRDs define); when one is rejected, deletes again what stage 1
    /// created.
    async fn validate_later(
        &self,
        app: &AppSettings,
        writes: &Writes<'_>,
        late: &[&Prepared],
        created: &[&ObjectRef],
        report: &mut RunReport,
    ) -> Result<(), ReconcileError> {
        let pending: Vec<&Prepared> = writes
            .later
            .iter()
            .copied()
            .filter(|p| p.stage != Stage::Foundation)
            .chain(late.iter().copied())
            .collect();
        if !pending.is_empty() && writes.total > 1 {
            if let Err(rejected) = self.dry_run_all(&pending, app).await {
                self.undo_created(app, created, report).await;
                return Err(rejected);
            }
        }
        Ok(())
    }

    /// Adds to the inventory, and saves before anything is written, the objects it does not
    /// know yet (by identity), with an empty hash: if the run dies or its final save fails,
    /// the next run still knows them, fetches the app again and can prune them. Costs no
    /// write when the run only changes known objects. A new app's first run (its lease
    /// deferred) saves them on the Lease it creates now instead, when they fit there.
    async fn record_intent<'a>(
        &self,
        app: &AppSettings,
        st: &mut AppState,
        run_lease: &mut RunLease,
        ids: impl Iterator<Item = &'a ObjectRef>,
    ) -> Result<(), ReconcileError> {
        let known: HashSet<manifest::Identity> =
            st.inventory.iter().map(|i| i.id.identity()).collect();
        let new: Vec<InventoryItem> = ids
            .filter(|id| !known.contains(&id.identity()))
            .map(|id| InventoryItem {
                id: id.clone(),
                hash: String::new(),
            })
            .collect();
        if matches!(run_lease, RunLease::Deferred) {
            let intent = state::intent_on_lease(st.inventory.iter().chain(&new));
            let on_lease = intent.is_some();
            let hold = self.hold_deferred(&app.name, run_lease, st, intent);
            self.phases.time(Phase::State, hold).await?;
            if on_lease {
                st.inventory.extend(new);
                return Ok(());
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        st.inventory.extend(new);
        // Stored without the recorded tree: should this run end with no chance to record
        // what it wrote, the next one must not find the app's tree "unchanged" and skip it.
        // The run itself keeps the tree, which its own failure record restores if it wrote
        // nothing.
        let ahead = AppState {
            tree_sha: None,
            ..st.clone()
        };
        let ns = &self.settings.kubernetes.state_namespace;
        let intent = state::save_intent(&self.client, ns, &app.name, &ahead);
        self.phases.time(Phase::State, intent).await?;
        st.absent = false;
        Ok(())
    }

    /// Deletes again the Namespaces and CRDs this run created, after an object that could only
    /// be validated once they existed was rejected; through prune, so nothing anyone put in
    /// them meanwhile goes with them. What cannot be deleted stays in `report.applied` (and so
    /// in the inventory, for a later run to prune).
    async fn undo_created(
        &self,
        app: &AppSettings,
        created: &[&ObjectRef],
        report: &mut RunReport,
    ) {
        if created.is_empty() {
            return;
        }
        let mut undo = RunReport::new(&app.name);
        if let Err(e) = self.prune(app, created, &mut undo).await {
            warn!(app = %app.name, error = %e, "cannot delete what the rejected run created");
        }
        report.applied.retain(|id| !undo.pruned.contains(id));
    }

    async fn exists(&self, p: &Prepared) -> Result<bool, ReconcileError> {
        self.api(p)
            .get_opt(&p.id.name)
            .await
            .map(|o| o.is_some())
            .map_err(|e| ReconcileError::Discovery {
                what: p.id.to_string(),
                message: kube_message(&e),
            })
    }

    pub(super) async fn namespace_exists(&self, name: &str) -> Result<bool, ReconcileError> {
        use k8s_openapi::api::core::v1::Namespace;
        Api::<Namespace>::all(self.client.clone())
            .get_opt(name)
            .await
            .map(|n| n.is_some())
            .map_err(|e| ReconcileError::Discovery {
                what: format!("namespace {name}"),
                message: kube_message(&e),
            })
    }

    pub(super) fn api(&self, p: &Prepared) -> Api<DynamicObject> {
        let namespace = p.id.namespace.as_deref().filter(|_| p.namespaced);
        self.api_in(&p.resource, namespace)
    }

    /// Objects of `resource` in `namespace`, or cluster-wide (cluster-scoped) when none.
    pub(super) fn api_in(
        &self,
        resource: &kube::api::ApiResource,
        namespace: Option<&str>,
    ) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, resource),
            None => Api::all_with(self.client.clone(), resource),
        }
    }

    pub(super) fn params(&self, app: &AppSettings, dry_run: bool) -> PatchParams {
        let mut pp = PatchParams::apply(FIELD_MANAGER);
        pp.force = app.force_conflicts;
        pp.dry_run = dry_run;
        pp
    }

    /// Server-side applies (or dry-runs) objects, a bounded number at once.
    pub(super) async fn patch_all(
        &self,
        objects: &[&Prepared],
        pp: &PatchParams,
    ) -> Vec<(ObjectRef, Result<(), String>)> {
        let calls: Vec<_> = objects
            .iter()
            .map(|p| {
                async move {
                    let r = self.apply_patch(p, pp).await.map_err(|e| kube_message(&e));
                    (p.id.clone(), r)
                }
                .boxed()
            })
            .collect();
        futures::stream::iter(calls)
            .buffer_unordered(APPLY_CONCURRENCY)
            .collect()
            .await
    }

    /// One server-side apply (or dry-run) of `p`. The answer (the whole object, managedFields
    /// and all) is only checked for an error, never parsed: nothing reads it, and parsing
    /// 40,000 of them is a good part of a cold start's own CPU.
    async fn apply_patch(&self, p: &Prepared, pp: &PatchParams) -> Result<(), kube::Error> {
        let namespace = p.id.namespace.as_deref().filter(|_| p.namespaced);
        let url = DynamicObject::url_path(&p.resource, namespace);
        let mut req = kube::core::Request::new(url)
            .patch(&p.id.name, pp, &Patch::Apply(&p.body))
            .map_err(kube::Error::BuildRequest)?;
        req.extensions_mut().insert("patch");
        self.client.request_text(req).await.map(drop)
    }

    async fn dry_run_all(
        &self,
        objects: &[&Prepared],
        app: &AppSettings,
    ) -> Result<(), ReconcileError> {
        let mut results = self.patch_all(objects, &self.params(app, true)).await;
        results.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, r) in results {
            if let Err(message) = r {
                return Err(ReconcileError::Rejected {
                    object: id.to_string(),
                    message,
                });
            }
        }
        Ok(())
    }

    async fn apply_all(
        &self,
        objects: &[&Prepared],
        app: &AppSettings,
        report: &mut RunReport,
    ) -> Result<(), ReconcileError> {
        let mut results = self.patch_all(objects, &self.params(app, false)).await;
        results.sort_by(|a, b| a.0.cmp(&b.0));
        let mut first_error = None;
        for (id, r) in results {
            match r {
                Ok(()) => report.applied.push(id),
                Err(message) if first_error.is_none() => {
                    first_error = Some(ReconcileError::Apply {
                        object: id.to_string(),
                        message,
                    })
                }
                Err(_) => {}
            }
        }
        report.applied.sort();
        first_error.map_or(Ok(()), Err)
    }

    async fn wait_established(&self, name: &str) -> Result<(), ReconcileError> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let started = Instant::now();
        loop {
            if let Ok(crd) = api.get(name).await {
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    return Ok(());
                }
            }
            if started.elapsed() > CRD_ESTABLISH_TIMEOUT {
                return Err(ReconcileError::Unhealthy {
                    object: format!("apiextensions.k8s.io/v1 CustomResourceDefinition {name}"),
                    reason: "not Established after 30s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for what this run wrote to become healthy; a shutdown's interrupt or a lost lease
    /// stops the wait.
    pub(super) async fn wait_written_healthy(
        &self,
        app: &AppSettings,
        desired: &[Wanted],
        report: &RunReport,
    ) -> Result<(), ReconcileError> {
        let written: HashSet<&ObjectRef> = report.applied.iter().collect();
        let watch: Vec<&Prepared> = desired
            .iter()
            .filter_map(Wanted::prepared)
            .filter(|p| written.contains(&p.id) && health::may_report_health(&p.id))
            .collect();
        self.check_interrupt(report)?;
        tokio::select! {
            r = self.wait_healthy(app, &watch) => r?,
            () = self.stop_requested(&report.app) => self.check_interrupt(report)?,
        }
        Ok(())
    }

    async fn wait_healthy(
        &self,
        app: &AppSettings,
        objects: &[&Prepared],
    ) -> Result<(), ReconcileError> {
        let deadline = Instant::now() + app.health_timeout;
        let mut waiting: Vec<&Prepared> = objects.to_vec();
        loop {
            let mut still = Vec::new();
            let mut last = None;
            for p in waiting {
                let live = self.api(p).get_opt(&p.id.name).await.map_err(|e| {
                    ReconcileError::Discovery {
                        what: p.id.to_string(),
                        message: kube_message(&e),
                    }
                })?;
                let Some(live) = live else {
                    last = Some((p, "not found after apply".to_string()));
                    still.push(p);
                    continue;
                };
                let value = serde_json::to_value(&live).unwrap_or(Value::Null);
                match health::health(&p.id, &value) {
                    Health::Healthy => {}
                    Health::Failed(reason) => {
                        return Err(ReconcileError::Unhealthy {
                            object: p.id.to_string(),
                            reason,
                        })
                    }
                    Health::Progressing(reason) => {
                        last = Some((p, reason));
                        still.push(p);
                    }
                }
            }
            if still.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let (p, reason) = last.expect("something is still waiting");
                return Err(ReconcileError::Unhealthy {
                    object: p.id.to_string(),
                    reason: format!(
                        "{reason} (after {})",
                        humantime::format_duration(app.health_timeout)
                    ),
                });
            }
            waiting = still;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    use super::*;
    use crate::settings::Settings;

    /// A local HTTP server that answers each request with the next of `answers` (status,
    /// extra header, body), the last one for good, and records the request lines. Not a
    /// Kubernetes: it only stands for an API server that throttles, for the client's retry.
    async fn answering(
        answers: Vec<(u16, &'static str, String)>,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, answers) = (seen.clone(), Arc::new(Mutex::new(answers)));
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                let (log, answers) = (log.clone(), answers.clone());
                tokio::spawn(async move {
                    let mut conn = BufReader::new(conn);
                    loop {
                        let mut line = String::new();
                        if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut length = 0;
                        loop {
                            let mut header = String::new();
                            conn.read_line(&mut header).await.unwrap();
                            if header.trim().is_empty() {
                                break;
                            }
                            if let Some((k, v)) = header.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    length = v.trim().parse().unwrap();
                                }
                            }
                        }
                        let mut body = vec![0; length];
                        conn.read_exact(&mut body).await.unwrap();
                        log.lock().unwrap().push(line.trim().to_string());
                        let (status, header, text) = {
                            let mut a = answers.lock().unwrap();
                            if a.len() > 1 {
                                a.remove(0)
                            } else {
                                a[0].clone()
                            }
                        };
                        let response = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{header}content-length: {}\r\n\r\n{text}",
                            text.len()
                        );
                        conn.get_mut().write_all(response.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (url, seen)
    }

    fn too_many() -> (u16, &'static str, String) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "Too many requests, please try again later.", "reason": "TooManyRequests",
            "code": 429});
        (429, "retry-after: 1\r\n", status.to_string())
    }

    fn engine_and_object(url: &str) -> (Engine, Prepared, AppSettings) {
        // Built as the binary builds its client (`Client::try_default` is this from a config).
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let settings = Settings::from_toml_str(
            "[forges.github]\ntoken_env = \"T\"\nwebhook_secret_env = \"S\"\n[[apps]]\nname = \"web\"\nforge = \"github\"\nrepo = \"acme/deploy\"\npath = \"web\"\nnamespace = \"web\"\n",
        )
        .unwrap();
        let app = settings.apps[0].clone();
        let engine = Engine::new(client, Default::default(), Arc::new(settings));
        let id = ObjectRef {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: Some("web".into()),
            name: "x".into(),
        };
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "namespace": "web"}, "data": {"k": "v"}});
        let prepared = Prepared {
            id,
            source: manifest::Source {
                file: "web/x.yaml".into(),
                document: 0,
            },
            body,
            hash: String::new(),
            stage: Stage::Namespaced,
            resource: kube::core::ApiResource {
                group: String::new(),
                version: "v1".into(),
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                plural: "configmaps".into(),
            },
            namespaced: true,
        };
        (engine, prepared, app)
    }

    /// The retry is the kube client's (see [`APPLY_CONCURRENCY`]); this pins it for the
    /// engine's writes and the client the binary builds: with `default_retry` off, both fail.
    #[tokio::test]
    async fn an_apply_and_a_dry_run_throttled_with_429_wait_and_are_tried_again() {
        let applied = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "namespace": "web"}, "data": {"k": "v"}});
        for dry_run in [false, true] {
            let (url, seen) = answering(vec![too_many(), (200, "", applied.to_string())]).await;
            let (engine, p, app) = engine_and_object(&url);
            let results = engine.patch_all(&[&p], &engine.params(&app, dry_run)).await;
            assert_eq!(results.len(), 1);
            assert_eq!(results[0].1, Ok(()), "dry run {dry_run}");
            let seen = seen.lock().unwrap().clone();
            assert_eq!(seen.len(), 2, "{seen:?}");
            assert!(
                seen.iter()
                    .all(|l| l.starts_with("PATCH /api/v1/namespaces/web/configmaps/x?")),
                "{seen:?}"
            );
        }
    }
}
