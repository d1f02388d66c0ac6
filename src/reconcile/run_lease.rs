//! A run's hold on its app: the app's Lease (taken alongside the fetch, checked at every safe
//! point, released by the run's final record, or handed back when the run records nothing)
//! and what this replica remembers of the app between runs,
//! so that a push takes the lease back with one write and reads no state.

use std::sync::Arc;

use super::plan::FileMemos;
use super::state::{self, AppState};
use super::{lease, Engine, ReconcileError, RunReport};

/// What one replica keeps of an app between runs, so a push costs no lease or state reads.
/// Locked for the whole run (and the lease release after it). Nothing here is needed: a
/// replica that starts empty reads it all back from the cluster.
#[derive(Default)]
pub(super) struct AppSlot {
    /// The resourceVersion of the app's Lease as this replica wrote it when it last released
    /// it: the next run takes it with one write conditional on it, which fails if anyone else
    /// has written it since. Only the version is kept: the Lease as the API server answered
    /// (managedFields, a new app's intent annotation) is a few KB an app that no take reads.
    pub(super) lease: Option<String>,
    /// The app's state as this replica last saved it. Only this replica's runs write it while
    /// the lease above is unchanged, so it is current whenever that lease is taken back.
    pub(super) state: Option<AppState>,
    /// What the app's last run here prepared, file by file: no objects, only what tells
    /// whether a file is applied as it is (see [`super::plan::FileMemo`]).
    pub(super) files: FileMemos,
}

impl AppSlot {
    /// Bytes this slot keeps, estimated: the structs themselves, the memos' own count (see
    /// [`super::plan::FileMemo::bytes`]), the lease's version, and for the state (a struct of
    /// short strings) its JSON length.
    pub(super) fn bytes(&self) -> usize {
        let json_len = |v: serde_json::Result<Vec<u8>>| v.map_or(0, |v| v.len());
        std::mem::size_of::<Self>()
            + self.lease.as_ref().map_or(0, String::capacity)
            + self
                .state
                .as_ref()
                .map_or(0, |s| json_len(serde_json::to_vec(s)))
            + self
                .files
                .iter()
                .map(|(path, memo)| std::mem::size_of::<String>() + path.capacity() + memo.bytes())
                .sum::<usize>()
    }
}

/// The lease of a run: being taken in the background (the quick path, alongside the fetch),
/// held, to be created at the run's first write (a new app's, see [`Engine::hold_deferred`]),
/// or none (a dry run, or a take that failed).
pub(super) enum RunLease {
    Taking(tokio::task::JoinHandle<Result<lease::LeaseGuard, lease::LeaseError>>),
    Held(Box<lease::LeaseGuard>),
    Deferred,
    None,
}

impl RunLease {
    /// Waits until the lease is held, unless it is deferred; every write of a run comes
    /// after this, and after [`Engine::hold_deferred`].
    pub(super) async fn held(&mut self) -> Result<(), ReconcileError> {
        let RunLease::Taking(task) = self else {
            return Ok(());
        };
        let taken = task.await;
        *self = RunLease::None;
        let guard = taken.map_err(|join| ReconcileError::Discovery {
            what: "lease".into(),
            message: join.to_string(),
        })??;
        *self = RunLease::Held(Box::new(guard));
        Ok(())
    }

    /// The held lease's token (see [`lease::token`]); `None` unless held.
    pub(super) fn token(&self) -> Option<String> {
        match self {
            RunLease::Held(g) => g.token(),
            _ => None,
        }
    }

    async fn into_guard(mut self) -> Option<lease::LeaseGuard> {
        let _ = self.held().await;
        match self {
            RunLease::Held(g) => Some(*g),
            _ => None,
        }
    }
}

/// Whether the run's record released the lease `guard` holds: it was written with the
/// guard's token.
fn released_by(release: &state::Release, guard: &lease::LeaseGuard) -> bool {
    matches!((release, guard.token()), (state::Release::Written(w), Some(t)) if *w == t)
}

impl Engine {
    /// The leases of this replica (its identity) in the state namespace.
    pub(crate) fn leases(&self) -> lease::Leases {
        lease::Leases::new(
            &self.client,
            &self.settings.kubernetes.state_namespace,
            &self.identity,
            self.lease_timing,
        )
    }

    /// Stops every running reconcile at its next safe point (between apply stages, before
    /// pruning, while waiting for health). Each records the interruption in its app's state,
    /// without advancing the applied revision, so the next start runs it again.
    pub fn interrupt(&self) {
        self.interrupt.cancel();
    }

    /// A safe point of a run: stop here on a shutdown's interrupt or when the run's lease is
    /// no longer its own.
    pub(super) fn check_interrupt(&self, report: &RunReport) -> Result<(), ReconcileError> {
        if self.interrupt.is_cancelled() {
            return Err(ReconcileError::Interrupted {
                written: report.applied.len() + report.pruned.len(),
            });
        }
        self.check_lease(report)
    }

    /// Whether the run of `report.app` still holds its lease; every write of a run after the
    /// lease is taken comes after this check.
    pub(super) fn check_lease(&self, report: &RunReport) -> Result<(), ReconcileError> {
        let watch = self
            .run_leases
            .lock()
            .expect("run leases")
            .get(&report.app)
            .cloned();
        match watch.and_then(|w| w.lost()) {
            Some(why) => Err(ReconcileError::LeaseLost {
                app: report.app.clone(),
                why,
                written: report.applied.len() + report.pruned.len(),
            }),
            None => Ok(()),
        }
    }

    /// Resolves when the run of `app` must stop: a shutdown's interrupt, or its lease lost.
    pub(super) async fn stop_requested(&self, app: &str) {
        let watch = self
            .run_leases
            .lock()
            .expect("run leases")
            .get(app)
            .cloned();
        match watch {
            Some(watch) => tokio::select! {
                () = self.interrupt.cancelled() => {}
                () = watch.cancelled() => {}
            },
            None => self.interrupt.cancelled().await,
        }
    }

    /// Creates a new app's deferred lease (see [`RunLease::Deferred`]) before the run's first
    /// write, with the run's `intent` (see [`lease::ANNOTATION_INTENT`]); from then on the
    /// run's safe points check it and its record releases it. Nothing to do for a lease
    /// held already. Fails with [`lease::LeaseError::Moved`] when the Lease exists after all:
    /// the run, which has written nothing, starts again the ordinary way.
    pub(super) async fn hold_deferred(
        &self,
        app: &str,
        run_lease: &mut RunLease,
        st: &mut AppState,
        intent: Option<String>,
    ) -> Result<(), ReconcileError> {
        if !matches!(run_lease, RunLease::Deferred) {
            return Ok(());
        }
        let guard = self.leases().create_new(app, intent).await?;
        *run_lease = RunLease::Held(Box::new(guard));
        self.watch_run_lease(app, run_lease);
        if let Some(token) = run_lease.token() {
            st.release = state::Release::Pending(token);
        }
        Ok(())
    }

    /// From now on the safe points of the app's run check `run_lease`.
    pub(super) fn watch_run_lease(&self, app: &str, run_lease: &RunLease) {
        if let RunLease::Held(guard) = run_lease {
            self.run_leases
                .lock()
                .expect("run leases")
                .insert(app.to_string(), guard.watch());
        }
    }

    /// Waits until every lease this engine took is handed back (releases run in the
    /// background after each run). Call before the process exits.
    pub async fn settle(&self) {
        let slots: Vec<_> = self
            .slots
            .lock()
            .expect("slots")
            .values()
            .cloned()
            .collect();
        for slot in slots {
            drop(slot.lock().await);
        }
    }

    /// Bytes this replica keeps of its apps between runs (estimated, see [`AppSlot`]): what
    /// grows with the fleet. Waits for runs in progress.
    pub async fn remembered_bytes(&self) -> usize {
        let slots: Vec<_> = self
            .slots
            .lock()
            .expect("slots")
            .values()
            .cloned()
            .collect();
        let mut n = 0;
        for slot in slots {
            n += slot.lock().await.bytes();
        }
        n
    }

    /// The app's slot of this replica's memory.
    pub(super) fn slot(&self, app: &str) -> Arc<tokio::sync::Mutex<AppSlot>> {
        self.slots
            .lock()
            .expect("slots")
            .entry(app.to_string())
            .or_default()
            .clone()
    }

    /// Lets go of the lease (with no write when the run's record released it, see
    /// [`state::Release`]; else handing it back off the push's critical path) and remembers
    /// what the next run of the app can reuse. The app's slot stays locked until the lease is back, so that run
    /// takes it again with one write. A state whose saving failed is not remembered: the next
    /// run reads it from the cluster.
    pub(super) fn finish_run(
        &self,
        app: &str,
        run_lease: RunLease,
        mut slot: tokio::sync::OwnedMutexGuard<AppSlot>,
        result: &Result<RunReport, ReconcileError>,
        mut st: AppState,
    ) {
        self.run_leases.lock().expect("run leases").remove(app);
        let state_current = !matches!(
            result,
            Err(ReconcileError::State(_)
                | ReconcileError::Lease(_)
                | ReconcileError::LeaseLost { .. })
        );
        let release = std::mem::take(&mut st.release);
        tokio::spawn(async move {
            let released = match run_lease.into_guard().await {
                // The run's record released the lease: nothing to write.
                Some(guard) if released_by(&release, &guard) => guard.finish(),
                Some(guard) => guard.release().await,
                None => None,
            };
            slot.state = (released.is_some() && state_current).then_some(st);
            slot.lease = released;
        });
    }
}
