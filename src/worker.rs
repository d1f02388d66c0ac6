//! Workers: take jobs from the queue and run them through the reconcile engine, a bounded
//! number at a time, one per app (the queue guarantees that in this process; the engine's
//! Lease across replicas). They stop when the queue is closed and drained.

use std::sync::Arc;

use tracing::{error, info, Instrument};

use crate::metrics::{Metrics, RunLabels};
use crate::queue::{Job, JobQueue, JobReason};
use crate::reconcile::{Engine, Outcome, RunOptions};

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
                    run_one(&engine, &metrics, &job)
                        .instrument(tracing::info_span!("reconcile", app = %app))
                        .await;
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

async fn run_one(engine: &Engine, metrics: &Metrics, job: &Job) {
    let outcome = match engine.run(job, RunOptions::default()).await {
        Ok(report) => {
            let label = match &report.outcome {
                Outcome::Applied => "applied",
                Outcome::Unchanged => "unchanged",
                Outcome::Skipped(_) => "skipped",
                Outcome::Failed(_) => "failed",
            };
            metrics
                .reconcile_seconds
                .observe(report.duration.as_secs_f64());
            label
        }
        Err(e) => {
            error!(app = %job.app, reason = job.reason.as_str(), error = %e, "reconcile failed");
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
}

/// Queues every app once, to catch up with pushes made while no receiver was running.
pub fn catch_up(queue: &JobQueue, apps: impl IntoIterator<Item = String>) {
    for app in apps {
        info!(%app, "startup: checking the branch head");
        let _ = queue.enqueue(Job::new(app, None, JobReason::MissedPush));
    }
}
