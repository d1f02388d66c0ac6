//! Where the runs of a process spend their time, by phase, summed over every run: fetching
//! from the forge, validating with a dry-run, applying, writing states and posting statuses;
//! and where a sweep's drift checks spend theirs (bulk state reads, desired objects, LISTs,
//! comparisons).
//! Runs overlap (a sweep runs several at once), so the sums can exceed the wall time; their
//! shares say where the time goes. `drift --once` logs them at the end ("time by phase").

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A phase of a run that [`PhaseTimes`] accounts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the revision's files from the forge (blob cache hits included).
    Fetch,
    /// The server-side dry-run of every object written.
    DryRun,
    /// The server-side applies.
    Apply,
    /// Writing the app's state (the write-ahead intent and the record of the run).
    State,
    /// Posting commit statuses.
    Status,
    /// A sweep's bulk reads of the app states.
    States,
    /// Drift checks: the desired objects from the kept manifests (inflated, parsed, prepared),
    /// summed over the checks in flight; a sweep makes them within [`Self::CheckCompare`].
    CheckDesired,
    /// Drift checks: listing the live objects.
    CheckList,
    /// Drift checks: wall time of the checks after their LISTs (each app's desired objects
    /// made, compared, suspects confirmed by a dry-run).
    CheckCompare,
    /// A sweep's catch-ups, wall time: each app's branch head asked, and a run of each app
    /// whose inputs changed since its applied revision.
    CatchUp,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::Fetch,
        Phase::DryRun,
        Phase::Apply,
        Phase::State,
        Phase::Status,
        Phase::States,
        Phase::CheckDesired,
        Phase::CheckList,
        Phase::CheckCompare,
        Phase::CatchUp,
    ];
}

/// Time spent per [`Phase`], summed over runs.
#[derive(Debug, Default)]
pub struct PhaseTimes {
    micros: [AtomicU64; Phase::ALL.len()],
}

impl PhaseTimes {
    pub fn add(&self, phase: Phase, spent: Duration) {
        self.micros[phase as usize].fetch_add(spent.as_micros() as u64, Ordering::Relaxed);
    }

    /// Runs `work`, adding its time to `phase`.
    pub async fn time<T>(&self, phase: Phase, work: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = work.await;
        self.add(phase, started.elapsed());
        out
    }

    pub fn get(&self, phase: Phase) -> Duration {
        Duration::from_micros(self.micros[phase as usize].load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_add_up_separately() {
        let t = PhaseTimes::default();
        t.add(Phase::Apply, Duration::from_millis(3));
        t.add(Phase::Apply, Duration::from_millis(4));
        let out = t
            .time(Phase::Status, async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                7
            })
            .await;
        assert_eq!(out, 7);
        assert_eq!(t.get(Phase::Apply), Duration::from_millis(7));
        assert!(t.get(Phase::Status) >= Duration::from_millis(2));
        assert_eq!(t.get(Phase::Fetch), Duration::ZERO);
    }
}
