//! The one path all work takes: a webhook, a drift tick or a manual sync becomes a [`Job`].
//! At most one job is pending per app (the newest revision wins; a request to consider every
//! object is kept when jobs merge), and an app is handed to one worker at a time. A job that
//! could not get its app's Lease is put back to run again after a backoff, never dropped.
//! Memory is bounded by the number of configured apps, so no producer can flood it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Backoff of a job put back with [`JobQueue::retry`]: 1s after the first attempt, doubling,
/// at most 30s, so a busy app is looked at again soon but a lasting problem (no permission
/// on Leases) costs one attempt per app every half minute.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long a job waits before its `retries`-th retry (1-based).
pub fn retry_delay(retries: u32) -> Duration {
    let doublings = retries.saturating_sub(1).min(16);
    RETRY_FIRST.saturating_mul(1 << doublings).min(RETRY_MAX)
}

/// Why a job was queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobReason {
    /// A push webhook, with the forge's delivery id when it sent one and the revision the
    /// branch pointed at before the push.
    Push {
        delivery: Option<String>,
        before: String,
    },
    /// The drift timer's periodic check.
    DriftCheck,
    /// The branch head moved without a webhook (caught by the timer or at start-up).
    MissedPush,
    /// `driftless sync` or an operator request.
    Manual,
}

impl JobReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobReason::Push { .. } => "push",
            JobReason::DriftCheck => "drift",
            JobReason::MissedPush => "missed_push",
            JobReason::Manual => "manual",
        }
    }
}

/// One unit of work for one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub app: String,
    /// The commit to reconcile to; `None` means "the branch head when the job runs".
    pub revision: Option<String>,
    pub reason: JobReason,
    /// Consider every object, not only those that changed since the last applied revision.
    pub full: bool,
    /// When the first of the requests merged into this job was received.
    pub queued_at: Instant,
    /// How many times the job was put back because its app's Lease was busy; sets its
    /// backoff.
    pub retries: u32,
}

impl Job {
    pub fn new(app: impl Into<String>, revision: Option<String>, reason: JobReason) -> Self {
        let full = !matches!(reason, JobReason::Push { .. } | JobReason::MissedPush);
        Self {
            app: app.into(),
            revision,
            reason,
            full,
            queued_at: Instant::now(),
            retries: 0,
        }
    }
}

/// What happened to an enqueued job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A new pending job.
    New,
    /// Merged into the job already pending for the app.
    Coalesced,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("the queue is shut down")]
    Closed,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Job>,
    order: VecDeque<String>,
    running: HashSet<String>,
    /// Apps whose pending job was put back by [`JobQueue::retry`], and when it may run.
    not_before: HashMap<String, tokio::time::Instant>,
    closed: bool,
}

/// Per-app coalescing queue shared by producers (webhook, timer, CLI) and workers.
#[derive(Default)]
pub struct JobQueue {
    state: Mutex<State>,
    wake: Notify,
}

impl JobQueue {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn enqueue(&self, job: Job) -> Result<Enqueued, QueueError> {
        let mut st = self.state.lock().expect("queue lock poisoned");
        if st.closed {
            return Err(QueueError::Closed);
        }
        let outcome = match st.pending.get_mut(&job.app) {
            Some(existing) => {
                let full = existing.full || job.full;
                let (queued_at, retries) = (existing.queued_at, existing.retries);
                // The newest request names the revision to apply; a drift check that carries
                // no revision does not undo a push's revision.
                let revision = job.revision.clone().or_else(|| existing.revision.clone());
                *existing = Job {
                    revision,
                    full,
                    queued_at,
                    retries,
                    ..job
                };
                Enqueued::Coalesced
            }
            None => {
                st.order.push_back(job.app.clone());
                st.pending.insert(job.app.clone(), job);
                Enqueued::New
            }
        };
        drop(st);
        self.wake.notify_waiters();
        self.wake.notify_one();
        Ok(outcome)
    }

    /// Puts back a job that could not run because its app's Lease was busy (its worker still
    /// has the app), to run after a backoff that grows with each retry. A request for the
    /// app that arrived meanwhile is newer: its revision stands, merged as [`enqueue`] merges.
    /// Returns the backoff; fails only when the queue is closed (the next start catches the
    /// app up from Git).
    ///
    /// [`enqueue`]: JobQueue::enqueue
    pub fn retry(&self, job: Job) -> Result<Duration, QueueError> {
        let mut st = self.state.lock().expect("queue lock poisoned");
        if st.closed {
            return Err(QueueError::Closed);
        }
        let retries = job.retries.saturating_add(1);
        let delay = retry_delay(retries);
        let app = job.app.clone();
        match st.pending.get_mut(&app) {
            Some(newer) => {
                newer.revision = newer.revision.take().or(job.revision);
                newer.full |= job.full;
                newer.queued_at = newer.queued_at.min(job.queued_at);
                newer.retries = retries;
            }
            None => {
                st.order.push_back(app.clone());
                st.pending.insert(app.clone(), Job { retries, ..job });
            }
        }
        st.not_before
            .insert(app, tokio::time::Instant::now() + delay);
        drop(st);
        self.wake.notify_waiters();
        Ok(delay)
    }

    /// Waits for a job whose app is not running elsewhere and whose backoff is over. `None`
    /// once the queue is closed and drained of runnable work.
    pub async fn next(&self) -> Option<Job> {
        loop {
            let notified = self.wake.notified();
            let backoff_over = {
                let mut st = self.state.lock().expect("queue lock poisoned");
                if let Some(job) = take_runnable(&mut st) {
                    return Some(job);
                }
                if st.closed {
                    return None;
                }
                st.not_before.values().min().copied()
            };
            match backoff_over {
                Some(at) => tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep_until(at) => {}
                },
                None => notified.await,
            }
        }
    }

    /// Marks the app's job finished so its next pending job can run.
    pub fn done(&self, app: &str) {
        self.state
            .lock()
            .expect("queue lock poisoned")
            .running
            .remove(app);
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// Refuses new jobs and wakes waiting workers so they can finish.
    pub fn close(&self) {
        self.state.lock().expect("queue lock poisoned").closed = true;
        self.wake.notify_waiters();
    }

    /// Closes the queue and drops the jobs not started yet; returns their apps. Nothing is
    /// lost: at the next start every app whose branch moved past its applied revision is
    /// caught up from Git.
    pub fn abandon(&self) -> Vec<String> {
        let mut st = self.state.lock().expect("queue lock poisoned");
        st.closed = true;
        let apps = st.pending.keys().cloned().collect();
        st.pending.clear();
        st.not_before.clear();
        drop(st);
        self.wake.notify_waiters();
        apps
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().expect("queue lock poisoned").closed
    }

    /// Jobs waiting to run (not counting running ones).
    pub fn pending_len(&self) -> usize {
        self.state
            .lock()
            .expect("queue lock poisoned")
            .pending
            .len()
    }

    /// A copy of the pending job for an app, if any.
    pub fn pending(&self, app: &str) -> Option<Job> {
        self.state
            .lock()
            .expect("queue lock poisoned")
            .pending
            .get(app)
            .cloned()
    }
}

fn take_runnable(st: &mut State) -> Option<Job> {
    let now = tokio::time::Instant::now();
    let pos = st.order.iter().position(|a| {
        !st.running.contains(a) && st.not_before.get(a).is_none_or(|at| *at <= now)
    })?;
    let app = st.order.remove(pos)?;
    st.not_before.remove(&app);
    let job = st.pending.remove(&app)?;
    st.running.insert(app);
    Some(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(app: &str, rev: &str) -> Job {
        Job::new(
            app,
            Some(rev.into()),
            JobReason::Push {
                delivery: None,
                before: String::new(),
            },
        )
    }

    #[tokio::test]
    async fn newest_revision_wins_and_full_is_kept() {
        let q = JobQueue::new();
        assert_eq!(
            q.enqueue(Job::new("a", None, JobReason::DriftCheck)),
            Ok(Enqueued::New)
        );
        assert_eq!(q.enqueue(push("a", "r1")), Ok(Enqueued::Coalesced));
        assert_eq!(q.enqueue(push("a", "r2")), Ok(Enqueued::Coalesced));
        assert_eq!(q.pending_len(), 1);
        let job = q.next().await.unwrap();
        assert_eq!(job.revision.as_deref(), Some("r2"));
        assert!(job.full, "the drift check asked for every object");
    }

    #[tokio::test]
    async fn drift_check_keeps_a_pending_push_revision() {
        let q = JobQueue::new();
        q.enqueue(push("a", "r1")).unwrap();
        q.enqueue(Job::new("a", None, JobReason::DriftCheck))
            .unwrap();
        assert_eq!(q.next().await.unwrap().revision.as_deref(), Some("r1"));
    }

    #[tokio::test]
    async fn one_job_per_app_at_a_time() {
        let q = JobQueue::new();
        q.enqueue(push("a", "r1")).unwrap();
        q.enqueue(push("b", "r1")).unwrap();
        let first = q.next().await.unwrap();
        assert_eq!(first.app, "a");
        q.enqueue(push("a", "r2")).unwrap();
        // "a" is running, so "b" comes next even though "a" was queued again.
        assert_eq!(q.next().await.unwrap().app, "b");
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), q.next()).await;
        assert!(
            waiting.is_err(),
            "a second job for a running app was handed out"
        );
        q.done("a");
        assert_eq!(q.next().await.unwrap().revision.as_deref(), Some("r2"));
    }

    #[test]
    fn retry_backoff_doubles_up_to_its_cap() {
        let delays: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_job_runs_after_its_backoff_and_never_undoes_a_newer_push() {
        let q = JobQueue::new();
        q.enqueue(push("a", "r1")).unwrap();
        let job = q.next().await.unwrap();
        // Its lease was busy: put back while its worker still has the app.
        assert_eq!(q.retry(job), Ok(Duration::from_secs(1)));
        // A newer push arrives during the backoff; the retry does not undo its revision.
        assert_eq!(q.enqueue(push("a", "r2")), Ok(Enqueued::Coalesced));
        q.done("a");
        q.enqueue(push("b", "r1")).unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(q.next().await.unwrap().app, "b", "b is not backing off");
        let again = q.next().await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "handed out at once"
        );
        assert_eq!(again.revision.as_deref(), Some("r2"));
        assert_eq!(again.retries, 1);
        // Busy again: the backoff doubles.
        assert_eq!(q.retry(again), Ok(Duration::from_secs(2)));
        q.done("a");
        assert_eq!(q.next().await.unwrap().retries, 2);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_retry_into_a_closed_queue_is_refused() {
        let q = JobQueue::new();
        q.enqueue(push("a", "r1")).unwrap();
        let job = q.next().await.unwrap();
        q.close();
        assert_eq!(q.retry(job), Err(QueueError::Closed));
    }

    #[tokio::test]
    async fn close_stops_workers() {
        let q = std::sync::Arc::new(JobQueue::new());
        let q2 = q.clone();
        let worker = tokio::spawn(async move { q2.next().await });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(worker.await.unwrap(), None);
        assert_eq!(q.enqueue(push("a", "r")), Err(QueueError::Closed));
    }
}
