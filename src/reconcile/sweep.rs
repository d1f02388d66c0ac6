//! Drift checks of many apps at once (`drift --once`): the apps whose state was read in bulk
//! are checked a namespace at a time, their live objects read with one LIST per kind and
//! namespace for all of them (instead of one per app), against the desired manifests kept
//! beside their states. What a check finds is what [`Engine::check_drift`] finds.

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;
use kube::api::ListParams;

use super::drift_check::{group_key_of, DriftReport, LiveIndex};
use super::phases::Phase;
use super::{kube_message, live, state, Engine, ReconcileError, LABEL_APP};
use crate::settings::AppSettings;

/// Objects per page of a batch's LIST of live objects: a whole batch of the fleet benchmark
/// (100 apps, 1,200 ConfigMaps) in one page: the API server answers a page of 250 in about as
/// long as all 1,200 (measured on the test control plane: ~100 ms against ~120 ms).
const LIVE_LIST_PAGE: u32 = 2_000;
/// LISTs of one batch in flight at once (one per kind and namespace).
const LISTS_IN_FLIGHT: usize = 4;
/// Checks in flight within a batch: each mostly waits on the API server (suspects only).
const CHECKS_IN_FLIGHT: usize = 4;

impl Engine {
    /// Checks every app of `apps` (name, heal) for drift, as [`Self::check_drift`] would, in
    /// the order given. Apps whose state was read in bulk (see [`Self::prefetch_states`]) and
    /// not changed by a run since (the sweep reads them again after its runs that applied),
    /// are checked in batches sharing their LISTs; the others one by one.
    pub async fn check_drift_all(
        &self,
        apps: &[(String, bool)],
    ) -> Vec<(String, Result<DriftReport, ReconcileError>)> {
        let mut batches: BTreeMap<Option<String>, Vec<(AppSettings, bool)>> = BTreeMap::new();
        let mut alone = Vec::new();
        for (name, heal) in apps {
            match self.settings.app(name) {
                Some(app) if self.is_prefetched(name) => batches
                    .entry(app.namespace.clone())
                    .or_default()
                    .push((app.clone(), *heal)),
                _ => alone.push((name.clone(), *heal)),
            }
        }
        let mut results = std::collections::HashMap::new();
        let all: Vec<&[(AppSettings, bool)]> = batches
            .values()
            .flat_map(|group| group.chunks(self.settings.drift.sweep_batch.max(1)))
            .collect();
        for (name, r) in self.check_batches(&all).await {
            results.insert(name, r);
        }
        for (name, heal) in alone {
            let r = self.check_drift(&name, heal).await;
            results.insert(name, r);
        }
        apps.iter()
            .map(|(name, _)| {
                let r = results
                    .remove(name)
                    .unwrap_or_else(|| Err(ReconcileError::UnknownApp(name.clone())));
                (name.clone(), r)
            })
            .collect()
    }

    /// The batches in turn, each listing the live objects of all its apps with one LIST per
    /// kind and namespace their inventories name, then checking them a few at a time. The
    /// next batch's LISTs run while this one's checks do (the API server encodes while this
    /// process compares), so two batches' live objects are held at most. Each app's desired
    /// objects (kept beside its state, or from the forge) are made only while its check is in
    /// flight: a batch never holds all of them.
    async fn check_batches(
        &self,
        batches: &[&[(AppSettings, bool)]],
    ) -> Vec<(String, Result<DriftReport, ReconcileError>)> {
        let mut results = Vec::new();
        let mut listed: Option<(Vec<Ready<'_>>, Listed)> = None;
        for batch in batches {
            let (ready, done) = self.take_batch(batch).await;
            results.extend(done);
            let listing = self.list_batch(&ready);
            let index = match listed.take() {
                Some((before, index)) => {
                    let (next, checked) = futures::join!(listing, self.check_ready(before, &index));
                    results.extend(checked);
                    next
                }
                None => listing.await,
            };
            listed = Some((ready, index));
        }
        if let Some((ready, index)) = listed {
            results.extend(self.check_ready(ready, &index).await);
        }
        results
    }

    /// The apps of a batch whose states were read in bulk, ready for their checks; the
    /// others' results (checked alone, or with no revision applied yet).
    async fn take_batch<'a>(
        &self,
        batch: &'a [(AppSettings, bool)],
    ) -> (
        Vec<Ready<'a>>,
        Vec<(String, Result<DriftReport, ReconcileError>)>,
    ) {
        let mut done = Vec::new();
        let mut ready = Vec::new();
        for (app, heal) in batch {
            let Some((st, stored)) = self.take_prefetched(&app.name) else {
                done.push((app.name.clone(), self.check_drift(&app.name, *heal).await));
                continue;
            };
            let report = DriftReport {
                app: app.name.clone(),
                revision: st.revision.clone(),
                ..Default::default()
            };
            if st.revision.is_none() {
                done.push((app.name.clone(), Ok(report)));
                continue;
            }
            ready.push(Ready {
                app,
                heal: *heal,
                st,
                stored,
                report,
            });
        }
        (ready, done)
    }

    /// The live objects of a batch's apps; each app's report counts its share of the LISTs
    /// (and of the sweep's bulk read of the states, with its first batch that checks an app).
    async fn list_batch(&self, ready: &[Ready<'_>]) -> Listed {
        let mut shared = if ready.is_empty() {
            0
        } else {
            self.prefetch_requests
                .swap(0, std::sync::atomic::Ordering::Relaxed)
        };
        let inventories: Vec<_> = ready.iter().map(|r| (r.app.name.as_str(), &r.st)).collect();
        let listed = self.list_live(&inventories, &mut shared);
        let index = match self.phases.time(Phase::CheckList, listed).await {
            Ok(index) => index,
            Err(e) => {
                // Each app lists for itself instead, and meets the error on its own.
                tracing::warn!(error = %e, "cannot list the live objects of a batch; checking its apps one by one");
                LiveIndex::default()
            }
        };
        (index, share_out(shared, ready.len()))
    }

    /// The checks of a listed batch, [`CHECKS_IN_FLIGHT`] at a time.
    async fn check_ready(
        &self,
        ready: Vec<Ready<'_>>,
        (index, shares): &Listed,
    ) -> Vec<(String, Result<DriftReport, ReconcileError>)> {
        let compared = std::time::Instant::now();
        // A loop, not a stream combinator: the sweep's future must stay `Send` (a caller may
        // spawn it on a multi-threaded runtime), and the compiler
        // cannot prove a closure over `Ready<'_>` gives a `Send` future for every lifetime.
        // Checks start as others end, so at most CHECKS_IN_FLIGHT futures exist at once.
        let mut waiting = ready.into_iter().zip(shares.iter().copied());
        let mut running = futures::stream::FuturesOrdered::new();
        let mut checked = Vec::with_capacity(waiting.len());
        for (r, share) in waiting.by_ref().take(CHECKS_IN_FLIGHT) {
            running.push_back(self.check_one(r, share, index));
        }
        while let Some(done) = running.next().await {
            checked.push(done);
            if let Some((r, share)) = waiting.next() {
                running.push_back(self.check_one(r, share, index));
            }
        }
        self.phases.add(Phase::CheckCompare, compared.elapsed());
        checked
    }

    /// One app's check of [`Self::check_ready`].
    async fn check_one(
        &self,
        ready: Ready<'_>,
        share: usize,
        index: &LiveIndex,
    ) -> (String, Result<DriftReport, ReconcileError>) {
        let Ready {
            app,
            heal,
            st,
            stored,
            mut report,
        } = ready;
        report.api_requests += share;
        let desired = self.desired_objects(app, &st, stored);
        let r = match self.phases.time(Phase::CheckDesired, desired).await {
            Ok(desired) => {
                self.check_against(app, &st, desired, heal, index, report)
                    .await
            }
            Err(e) => Err(e),
        };
        (app.name.clone(), r)
    }

    /// One LIST (paged) per kind and namespace of the objects the apps' states say were
    /// applied, selecting the apps by label; each request made is added to `requests`. An
    /// object of another kind or namespace (an inventory older than its desired set) is
    /// listed by its app's check itself.
    async fn list_live(
        &self,
        apps: &[(&str, &state::AppState)],
        requests: &mut usize,
    ) -> Result<LiveIndex, ReconcileError> {
        let mut index = LiveIndex::default();
        if apps.is_empty() {
            return Ok(index);
        }
        let names: Vec<&str> = apps.iter().map(|(name, _)| *name).collect();
        let selector = ListParams::default()
            .labels(&format!("{LABEL_APP} in ({})", names.join(",")))
            .limit(LIVE_LIST_PAGE);
        let mut seen = HashSet::new();
        let mut groups = Vec::new();
        for item in apps.iter().flat_map(|(_, st)| &st.inventory) {
            let kind = (&item.id.api_version, &item.id.kind, &item.id.namespace);
            if !seen.insert(kind) {
                continue;
            }
            // A kind the API server no longer serves is its apps' checks to report.
            if let Ok((resource, namespaced)) = self.resolve(&item.id).await {
                let namespace = item.id.namespace.clone().filter(|_| namespaced);
                groups.push((
                    group_key_of(&resource, namespace.clone()),
                    resource,
                    namespace,
                ));
            }
        }
        // A few kinds at once: the API server encodes one while this process decodes another.
        let lists = groups.into_iter().map(|(key, resource, namespace)| {
            let api = self.api_in(&resource, namespace.as_deref());
            let selector = selector.clone();
            async move {
                let mut made = 0;
                let listed = live::list(&api, selector, &mut made).await;
                let items = listed.map_err(|e| ReconcileError::Discovery {
                    what: format!("live {}", resource.kind),
                    message: kube_message(&e),
                });
                (key, items, made)
            }
        });
        let listed: Vec<_> = futures::stream::iter(lists)
            .buffer_unordered(LISTS_IN_FLIGHT)
            .collect()
            .await;
        let mut failed = None;
        for (key, items, made) in listed {
            *requests += made;
            match items {
                Ok(items) => {
                    index.0.insert(key, items);
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        failed.map_or(Ok(index), Err)
    }
}

/// An app of a batch ready for its check.
struct Ready<'a> {
    app: &'a AppSettings,
    heal: bool,
    /// Its state, read in bulk.
    st: state::AppState,
    /// Its desired manifests, kept beside the state.
    stored: Option<super::desired::Stored>,
    /// Its report, begun.
    report: DriftReport,
}

/// A batch's live objects, and each of its apps' share of the requests that read them.
type Listed = (LiveIndex, Vec<usize>);

/// `requests` shared out among `apps` as evenly as whole requests allow, the first apps taking
/// one more: the shares add up to `requests` (all of them to nobody when there is no app).
fn share_out(requests: usize, apps: usize) -> Vec<usize> {
    (0..apps)
        .map(|i| requests / apps + usize::from(i < requests % apps))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::share_out;

    #[test]
    fn shared_requests_are_shared_out_whole_and_add_up() {
        assert_eq!(share_out(7, 3), [3, 2, 2]);
        assert_eq!(share_out(2, 3), [1, 1, 0]);
        assert_eq!(share_out(0, 2), [0, 0]);
        assert!(share_out(5, 0).is_empty());
    }
}
