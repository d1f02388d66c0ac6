//! Workers: take jobs from the queue and run them through the reconcile engine, a bounded
//! number at a time, one per app (the queue guarantees that in this process; the engine's
//! Lease across replicas). A job whose app's Lease is busy goes back to the queue with a
//! backoff. They stop when the queue is closed and drained.

use std::sync::Arc;

use tracing::{error, info, warn, Instrument};

use crate::metrics::{AppLabels, Metrics, RunLabels};
use crate::queue::{Job, JobQueue, JobReason};
use futures::StreamExt;

use crate::reconcile::drift_check::DriftReport;
use crate::reconcile::{Engine, Outcome, ReconcileError, RunOptions};

/// Reconciles running at once. Each mostly waits on the API server and the forge; four keeps
/// a 2-core receiver responsive while several apps apply.
pub const WORKERS: usize = 4;

pub async fn run(queue: Arc<JobQueue>, engine: Arc<Engine>, metrics: Arc<Metrics>, workers: usize) {
    let mut tasks = Vec::new();
    for n in 0..workers.max(1) {
        let (queue, engine, metrics) = (queue.clone(), engine.clone(), metrics.clone());
        tasks.push(tokio::spawn(
            async move {
                while let Some(job) = queue.next().await {
                    let app = job.app.clone();
                    let span = tracing::info_span!("reconcile", app = %app);
                    let retry = run_one(&engine, &metrics, &job)
                        .instrument(span.clone())
                        .await;
                    if retry {
                        span.in_scope(|| requeue(&queue, job));
                    }
                    queue.done(&app);
                }
            }
            .instrument(tracing::info_span!("worker", n)),
        ));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// One drift tick for an app: catch a missed push (the branch head moved without a webhook),
/// then compare the cluster with the applied revision, healing under `drift = "heal"`. The
/// comparison runs even when the catch-up fails (a red branch head leaves the applied revision
/// in place, and its drift must still be found). Returns whether drift remains (found and not
/// healed); an error when the catch-up failed or a heal was refused, after the check.
pub async fn drift_tick(engine: &Engine, metrics: &Metrics, app: &str) -> Result<bool, String> {
    let catch_up = Job::new(app, None, JobReason::MissedPush);
    let caught_up = engine.run(&catch_up, RunOptions::default()).await;
    let report = engine.check_drift(app, heals(engine, app)).await;
    drift_verdict(metrics, app, caught_up.map(|_| ()), report)
}

/// Whether the app's drift policy heals.
fn heals(engine: &Engine, app: &str) -> bool {
    engine
        .settings()
        .app(app)
        .is_some_and(|a| a.drift == crate::settings::DriftPolicy::Heal)
}

/// What a drift tick says of an app, from its catch-up and its drift check (recorded in the
/// metrics): whether drift remains, or the error of the check, the catch-up or the heal.
fn drift_verdict(
    metrics: &Metrics,
    app: &str,
    caught_up: Result<(), ReconcileError>,
    report: Result<DriftReport, ReconcileError>,
) -> Result<bool, String> {
    let report = report.map_err(|e| e.to_string())?;
    metrics
        .drift_objects
        .get_or_create(&crate::metrics::AppLabels {
            app: app.to_string(),
        })
        .set(if report.healed {
            0
        } else {
            report.drifted.len() as i64
        });
    info!(%app, checked = report.checked, drifted = report.drifted.len(), healed = report.healed,
        api_requests = report.api_requests, "drift check");
    caught_up.map_err(|e| format!("catching up with the branch head: {e}"))?;
    if let Some(e) = report.heal_error {
        return Err(e);
    }
    Ok(!report.drifted.is_empty() && !report.healed)
}

/// One sweep of every app (`drift --once`, a process of its own): the drift tick of each, with every app state read
/// in one LIST, each branch head asked once (conditionally), the catch-ups `in_flight` at a
/// time (an app at its head costs nothing), then the drift checks in batches sharing their
/// LISTs. Returns each app's verdict as [`drift_tick`] would, in the order given.
pub async fn sweep(
    engine: &Engine,
    metrics: &Metrics,
    apps: Vec<String>,
    in_flight: usize,
) -> Vec<(String, Result<bool, String>)> {
    let _round = engine.begin_round();
    let states = match engine.prefetch_states().await {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "cannot read the app states in bulk; reading them one by one");
            0
        }
    };
    let catch_ups = futures::stream::iter(apps.clone())
        .map(|app: String| catch_up_one(engine, app))
        .buffered(in_flight.max(1))
        .collect::<Vec<Result<CaughtUp, ReconcileError>>>();
    let caught_up = engine
        .phase_times()
        .time(crate::reconcile::phases::Phase::CatchUp, catch_ups)
        .await;
    // An app whose run just wrote every object matches what it applied: checking it again
    // would read back what was written (at a cold start, every object of the fleet). The
    // others are checked, those a run wrote in part included (drift in the rest is theirs).
    let checks: Vec<(String, bool)> = apps
        .iter()
        .zip(&caught_up)
        .filter(|(_, c)| !matches!(c, Ok(CaughtUp::WroteAll { .. })))
        .map(|(a, _)| (a.clone(), heals(engine, a)))
        .collect();
    // Runs that applied wrote new states. Many of them checked (a cold start that wrote part
    // of some apps): read every state again in one paged LIST, so their checks share the
    // batch LISTs too. A few (a commit to one app): each is checked alone, which costs less
    // than reading every state again. What the runs kept for a next push goes first: a sweep
    // makes no next push.
    engine.forget_run_memory();
    let applied = caught_up
        .iter()
        .filter(|c| matches!(c, Ok(CaughtUp::WrotePart)))
        .count();
    if reread_states(applied, states) {
        if let Err(e) = engine.prefetch_states().await {
            warn!(error = %e, "cannot read the app states in bulk again; checking the applied apps one by one");
        }
    }
    let mut reports: std::collections::HashMap<_, _> =
        engine.check_drift_all(&checks).await.into_iter().collect();
    engine.forget_prefetched();
    apps.into_iter()
        .zip(caught_up)
        .map(|(app, caught_up)| {
            let (caught_up, report) = match caught_up {
                Ok(CaughtUp::WroteAll { revision, objects }) => {
                    (Ok(()), Ok(written_whole(&app, revision, objects)))
                }
                // `check_drift_all` answers for each app it was asked about.
                other => (
                    other.map(|_| ()),
                    reports
                        .remove(&app)
                        .unwrap_or_else(|| Err(ReconcileError::UnknownApp(app.clone()))),
                ),
            };
            let verdict = drift_verdict(metrics, &app, caught_up, report);
            (app, verdict)
        })
        .collect()
}

/// What a sweep's catch-up of one app did.
enum CaughtUp {
    /// Nothing written: the app was at its head, or its run did not apply.
    Nothing,
    /// Wrote some of the app's objects, left the rest as the inventory had them.
    WrotePart,
    /// Wrote every object of the app at `revision`.
    WroteAll {
        revision: Option<String>,
        objects: usize,
    },
}

/// A sweep's catch-up of one app. A named function, not a closure's async block, so that the
/// sweep's future is `Send` and can run as a spawned task on a multi-threaded runtime
/// (checked by `tests::sweep_is_send`).
async fn catch_up_one(engine: &Engine, app: String) -> Result<CaughtUp, ReconcileError> {
    let job = Job::new(app, None, JobReason::MissedPush);
    let report = engine.run(&job, RunOptions::default()).await?;
    Ok(match report.outcome {
        Outcome::Applied if report.applied.len() >= report.objects => CaughtUp::WroteAll {
            revision: report.revision,
            objects: report.objects,
        },
        Outcome::Applied => CaughtUp::WrotePart,
        _ => CaughtUp::Nothing,
    })
}

/// The drift report of an app whose run just wrote each of its `objects`: nothing drifted,
/// and no request made to say so.
fn written_whole(app: &str, revision: Option<String>, objects: usize) -> DriftReport {
    DriftReport {
        app: app.to_string(),
        revision,
        checked: objects,
        ..Default::default()
    }
}

/// Whether a sweep reads every state again after its runs, `applied` of which applied, the
/// bulk read having found `states`: when the applied apps outnumber twice the pages that read
/// takes. In the fleet benchmark a page of 250 states takes about 30 ms; an app checked alone
/// makes a state GET and one LIST per kind of a few milliseconds each, and holds none of the
/// other apps' states.
fn reread_states(applied: usize, states: usize) -> bool {
    let pages = (states + applied).div_ceil(crate::reconcile::state::LIST_PAGE as usize);
    applied > 2 * pages
}

/// Puts a job whose app's Lease was busy back in the queue, to run after a backoff.
fn requeue(queue: &JobQueue, job: Job) {
    let (app, revision) = (job.app.clone(), job.revision.clone());
    match queue.retry(job) {
        Ok(delay) => {
            info!(%app, ?revision, delay = %humantime::format_duration(delay), "lease busy; job requeued")
        }
        Err(_) => warn!(%app, ?revision,
            "lease busy and the queue is closed; the next start catches the app up from Git"),
    }
}

/// Runs one job; returns whether it must run again later (its app's Lease was busy or lost).
async fn run_one(engine: &Engine, metrics: &Metrics, job: &Job) -> bool {
    metrics
        .queue_wait_seconds
        .observe(job.queued_at.elapsed().as_secs_f64());
    if job.reason == JobReason::DriftCheck && job.revision.is_none() {
        let outcome = match drift_tick(engine, metrics, &job.app).await {
            Ok(true) => "drifted",
            Ok(false) => "in_sync",
            Err(e) => {
                error!(app = %job.app, error = %e, "drift check failed");
                "failed"
            }
        };
        metrics
            .reconcile_runs
            .get_or_create(&RunLabels {
                app: job.app.clone(),
                outcome,
            })
            .inc();
        return false;
    }
    let started = std::time::Instant::now();
    let mut retry = false;
    let (outcome, applied, pruned) = match engine.run(job, RunOptions::default()).await {
        Ok(report) => {
            let label = match &report.outcome {
                Outcome::Applied => "applied",
                Outcome::Unchanged => "unchanged",
                Outcome::Skipped(_) => "skipped",
                Outcome::Failed(_) => "failed",
            };
            (label, report.applied.len(), report.pruned.len())
        }
        Err(e) if e.retry_later() => {
            warn!(app = %job.app, reason = job.reason.as_str(), error = %e, "reconcile did not get through its lease");
            retry = true;
            ("requeued", 0, 0)
        }
        Err(e) => {
            error!(app = %job.app, reason = job.reason.as_str(), error = %e, "reconcile failed");
            ("failed", 0, 0)
        }
    };
    let run = RunLabels {
        app: job.app.clone(),
        outcome,
    };
    metrics.reconcile_runs.get_or_create(&run).inc();
    metrics
        .reconcile_seconds
        .get_or_create(&run)
        .observe(started.elapsed().as_secs_f64());
    let app = AppLabels {
        app: job.app.clone(),
    };
    metrics
        .objects_applied
        .get_or_create(&app)
        .inc_by(applied as u64);
    metrics
        .objects_pruned
        .get_or_create(&app)
        .inc_by(pruned as u64);
    retry
}

/// The drift timer: every `interval`, queue a drift check for each app at its slot in the
/// interval (spread evenly, plus jitter). Stops when `shutdown` is cancelled.
pub async fn drift_timer(
    queue: Arc<JobQueue>,
    apps: Vec<String>,
    interval: std::time::Duration,
    jitter: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if interval.is_zero() || apps.is_empty() {
        return;
    }
    loop {
        let round = tokio::time::Instant::now();
        let mut slots: Vec<(std::time::Duration, &String)> = apps
            .iter()
            .enumerate()
            .map(|(i, a)| (crate::drift::slot(interval, i, apps.len(), jitter), a))
            .collect();
        slots.sort();
        for (at, app) in slots {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(round + at) => {}
            }
            if queue
                .enqueue(Job::new(app.clone(), None, JobReason::DriftCheck))
                .is_err()
            {
                return;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(round + interval) => {}
        }
    }
}

/// Queues every app whose branch head is not its applied revision, to catch up with pushes
/// made while no receiver was running. The states are read in one LIST and each branch head
/// asked once (conditionally), so a restart with every app in sync writes nothing and costs
/// one forge request per branch.
pub async fn catch_up(queue: &JobQueue, engine: &Engine, apps: impl IntoIterator<Item = String>) {
    let round = engine.begin_round();
    if let Err(e) = engine.prefetch_states().await {
        warn!(error = %e, "cannot read the app states in bulk; reading them one by one");
    }
    let mut in_sync = 0;
    for app in apps {
        if !engine.needs_catch_up(&app).await {
            in_sync += 1;
            continue;
        }
        info!(%app, "startup: catching up with the branch head");
        let _ = queue.enqueue(Job::new(app, None, JobReason::MissedPush));
    }
    drop(round);
    engine.forget_prefetched();
    info!(in_sync, "startup: apps already at their branch head");
}

#[cfg(test)]
mod tests {
    use super::reread_states;

    /// Compiles only while a sweep's future is `Send`: `sweep` is public, and a caller may
    /// spawn it on a multi-threaded runtime (`drift --once` awaits it on the main thread).
    #[allow(dead_code)]
    fn sweep_is_send(engine: &'static super::Engine, metrics: &'static super::Metrics) {
        fn spawnable<F: std::future::Future + Send>(_: F) {}
        spawnable(super::sweep(engine, metrics, Vec::new(), 1));
    }

    #[test]
    fn states_are_read_again_only_when_many_apps_applied() {
        // A cold start of three apps: one page, all three applied.
        assert!(reread_states(3, 0));
        // One commit in a fleet of 1,000 (four pages): checked alone.
        assert!(!reread_states(1, 1_000));
        assert!(!reread_states(10, 1_000));
        assert!(reread_states(11, 1_000));
        // A cold start of 1,000 apps.
        assert!(reread_states(1_000, 0));
        assert!(!reread_states(0, 0));
    }
}
