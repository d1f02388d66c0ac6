//! One reconcile at a time per app, across replicas and within one process: a
//! `coordination.k8s.io/v1` Lease `driftless-app-<app>` in the state namespace, held the way
//! client-go's leader election holds one. It is short (15 s by default) and renewed every few
//! seconds; a holder that cannot renew gives it up before anyone may take it over; another
//! replica judges it expired by its own clock (unchanged for a whole duration since it first
//! saw it), never by comparing the holder's `renewTime` with its clock. Every write is
//! conditional on the resourceVersion last seen, and a conflict is answered by reading again.
//!
//! A run's final record releases the lease without a write of it: the record carries the
//! lease's token (holder and acquire time, [`token`]), and a replica that finds a held lease
//! whose token the app's state says was released takes it at once (see
//! [`state::Release`]). A guard that records nothing hands the lease back with a write.
//!
//! A new app's Lease also carries its first run's intent: the run creates it only once its
//! set is validated, just before its first write, with the objects it is about to apply
//! ([`ANNOTATION_INTENT`]), so a cold start writes no separate intent. Every later take
//! carries the annotation forward, and a run that finds no state reads it: should the first
//! run die before its record, the next one still knows what it may have applied.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio_util::sync::CancellationToken;

use super::state::{self, object_name};

/// Annotation of an app's Lease: the objects its first run was about to apply (a JSON array
/// of object references), written when the run created the Lease instead of a separate
/// write-ahead intent in the app's state, and carried forward by every later take. Read only
/// while the app has no state; a state, once written, knows more.
pub const ANNOTATION_INTENT: &str = "driftless.dev/intent";
/// The largest intent the Lease carries; a larger one is written to the state as before.
pub const MAX_INTENT_BYTES: usize = 64 * 1024;

/// The default lease duration: client-go's leader election default. A crashed holder blocks
/// its app for at most this long.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often a waiting acquisition looks at the lease again.
const POLL: Duration = Duration::from_millis(200);
/// Bounds on the duration another holder writes into a lease: a record claiming more than an
/// hour would block the app for that long on a typo.
const RECORD_DURATION_MAX: Duration = Duration::from_secs(3600);

/// How a lease is held and waited for, all derived from its duration in client-go's
/// proportions (15 s duration, 10 s renew deadline, a renewal every 3 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long the lease stays valid without renewal, as other replicas judge it.
    pub duration: Duration,
    /// How often the holder renews it.
    pub renew_every: Duration,
    /// How long the holder may go without a successful renewal before it takes the lease as
    /// lost. Shorter than `duration`, so a holder stops writing before anyone may take over.
    pub renew_deadline: Duration,
    /// How long an acquisition waits for another holder: two durations, so the lease of a
    /// crashed holder is always taken over within one wait.
    pub wait: Duration,
}

impl LeaseTiming {
    pub fn new(duration: Duration) -> Self {
        Self {
            duration,
            renew_every: duration / 5,
            renew_deadline: duration * 2 / 3,
            wait: duration * 2,
        }
    }

    /// Pause between two attempts of one renewal.
    fn retry(&self) -> Duration {
        self.duration / 15
    }
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self::new(DEFAULT_LEASE_DURATION)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("app {app} is being reconciled by {holder}; gave up waiting after {waited:?}")]
    Held {
        app: String,
        holder: String,
        waited: Duration,
    },
    #[error("lease of app {app}: {message}")]
    Api { app: String, message: String },
    /// The lease changed since this replica last wrote it (the quick path), or a new app's
    /// Lease exists after all: the run, which wrote nothing, starts again the ordinary way.
    #[error("lease of app {app} changed since this replica released it")]
    Moved { app: String },
}

/// What this process knows of leases beyond what the API server says.
#[derive(Default)]
struct Local {
    /// `(namespace, name, identity)` of every lease a guard of this process holds: the API
    /// server cannot tell two guards of one identity apart, so this process must.
    held: HashSet<(String, String, String)>,
    /// `(namespace, name)` → the lease's spec as last seen and when this process first saw
    /// it so: expiry is judged from then, by this process's monotonic clock.
    observed: HashMap<(String, String), (LeaseSpec, Instant)>,
}

static LOCAL: LazyLock<Mutex<Local>> = LazyLock::new(Mutex::default);

fn local() -> std::sync::MutexGuard<'static, Local> {
    LOCAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// This process's claim on a lease for one identity; given up when dropped.
struct Claim((String, String, String));

impl Claim {
    fn take(namespace: &str, name: &str, identity: &str) -> Option<Claim> {
        let key = (
            namespace.to_string(),
            name.to_string(),
            identity.to_string(),
        );
        // Built only once inserted: a Claim dropped here would give up the holder's claim.
        let inserted = local().held.insert(key.clone());
        inserted.then(|| Claim(key))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        local().held.remove(&self.0);
    }
}

/// The first run's intent on `lease` (see [`ANNOTATION_INTENT`]).
fn intent_of(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_INTENT)
        .map(String::as_str)
}

/// A held lease's token: its holder and when that holder took it (`acquireTime`, which a
/// renewal leaves alone and every take writes anew), so it names one holding of the lease.
/// A run's final record carries it to release the lease (see [`state::Release`]). `None`
/// for a lease no one holds.
pub fn token(lease: &Lease) -> Option<String> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty())?;
    let acquired = spec.acquire_time.as_ref()?;
    Some(format!("{holder} {}", acquired.0))
}

fn holder_of(lease: &Lease) -> &str {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or("")
}

/// Whether another holder's lease has expired as this process sees it: its spec has not
/// changed for the duration it states, counted from when this process first saw that spec.
/// A process that has just started therefore waits a whole duration, as client-go does.
fn expired(namespace: &str, lease: &Lease, ours: Duration) -> bool {
    let spec = lease.spec.clone().unwrap_or_default();
    let duration = spec
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .map_or(ours, |s| Duration::from_secs(s as u64))
        .min(RECORD_DURATION_MAX);
    let key = (
        namespace.to_string(),
        lease.metadata.name.clone().unwrap_or_default(),
    );
    let now = Instant::now();
    let mut local = local();
    let seen_since = match local.observed.get(&key) {
        Some((seen, since)) if *seen == spec => *since,
        _ => {
            local.observed.insert(key, (spec, now));
            now
        }
    };
    now.duration_since(seen_since) >= duration
}

/// Whether a held lease is still this guard's. Cloned into whatever must stop writing when it
/// is not: the run checks it at its safe points.
#[derive(Clone)]
pub struct LeaseWatch {
    inner: Arc<WatchState>,
}

struct WatchState {
    lost: CancellationToken,
    why: Mutex<Option<String>>,
    /// When the last successful write of the lease was sent.
    renewed: Mutex<Instant>,
    renew_deadline: Duration,
}

impl LeaseWatch {
    fn new(renewed: Instant, renew_deadline: Duration) -> Self {
        Self {
            inner: Arc::new(WatchState {
                lost: CancellationToken::new(),
                why: Mutex::new(None),
                renewed: Mutex::new(renewed),
                renew_deadline,
            }),
        }
    }

    /// Why the lease is no longer ours (taken over, deleted, not renewed in time), or `None`
    /// while it is. Judged also by the clock, so a renewer starved of CPU cannot make a
    /// holder write on a lease it may have lost.
    pub fn lost(&self) -> Option<String> {
        if let Some(why) = self.inner.why.lock().expect("lease watch").clone() {
            return Some(why);
        }
        let since = self.inner.renewed.lock().expect("lease watch").elapsed();
        if since > self.inner.renew_deadline {
            let why = format!("not renewed for {}s", since.as_secs());
            self.mark_lost(why.clone());
            return Some(why);
        }
        None
    }

    /// Resolves once the lease is known lost.
    pub async fn cancelled(&self) {
        self.inner.lost.cancelled().await
    }

    fn mark_lost(&self, why: String) {
        self.inner
            .why
            .lock()
            .expect("lease watch")
            .get_or_insert(why);
        self.inner.lost.cancel();
    }

    fn renewed(&self, sent: Instant) {
        *self.inner.renewed.lock().expect("lease watch") = sent;
    }

    fn renewed_at(&self) -> Instant {
        *self.inner.renewed.lock().expect("lease watch")
    }
}

/// The leases of one identity in one namespace.
#[derive(Clone)]
pub struct Leases {
    api: Api<Lease>,
    client: Client,
    namespace: String,
    identity: String,
    timing: LeaseTiming,
}

impl Leases {
    pub fn new(client: &Client, namespace: &str, identity: &str, timing: LeaseTiming) -> Self {
        Self {
            api: Api::namespaced(client.clone(), namespace),
            client: client.clone(),
            namespace: namespace.to_string(),
            identity: identity.to_string(),
            timing,
        }
    }

    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    /// The Lease this identity writes to take `name`: conditional on `resource_version`
    /// (`None` to create it), carrying a first run's `intent` (see [`ANNOTATION_INTENT`]).
    fn body(&self, name: &str, resource_version: Option<String>, intent: Option<&str>) -> Lease {
        let now = MicroTime(Timestamp::now());
        let mut lease: Lease = serde_json::from_value(serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "driftless"}},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.timing.duration.as_secs().max(1),
            },
        }))
        .expect("a static Lease");
        lease.metadata.resource_version = resource_version;
        if let Some(intent) = intent {
            lease.metadata.annotations =
                Some([(ANNOTATION_INTENT.to_string(), intent.to_string())].into());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.acquire_time = Some(now.clone());
            spec.renew_time = Some(now);
        }
        lease
    }

    fn api_error(&self, app: &str, e: kube::Error) -> LeaseError {
        LeaseError::Api {
            app: app.to_string(),
            message: e.to_string(),
        }
    }

    /// Takes the app's lease with a single write, conditional on the `resource_version` this
    /// replica's release of it last wrote (all a take needs of that copy). Fails with [`LeaseError::Moved`] when anyone has written the lease
    /// since (or another guard of this process holds it); the caller then takes the ordinary
    /// path ([`Leases::acquire`]).
    pub async fn take_released(
        &self,
        app: &str,
        resource_version: String,
    ) -> Result<LeaseGuard, LeaseError> {
        let name = object_name(app);
        let moved = || LeaseError::Moved {
            app: app.to_string(),
        };
        let claim = Claim::take(&self.namespace, &name, &self.identity).ok_or_else(moved)?;
        let body = self.body(&name, Some(resource_version), None);
        let sent = Instant::now();
        match self.api.replace(&name, &PostParams::default(), &body).await {
            Ok(lease) => Ok(self.hold(name, lease, sent, claim)),
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Err(moved()),
            Err(e) => Err(self.api_error(app, e)),
        }
    }

    /// Takes the app's lease, waiting up to [`LeaseTiming::wait`] while another holder (or
    /// another guard of this process) has it.
    pub async fn acquire(&self, app: &str) -> Result<LeaseGuard, LeaseError> {
        let name = object_name(app);
        let started = Instant::now();
        loop {
            let holder = match Claim::take(&self.namespace, &name, &self.identity) {
                None => format!("{} (another run in this process)", self.identity),
                Some(claim) => match self.try_take(app, &name, claim).await? {
                    Ok(guard) => return Ok(guard),
                    Err(holder) => holder,
                },
            };
            if started.elapsed() >= self.timing.wait {
                return Err(LeaseError::Held {
                    app: app.to_string(),
                    holder,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Takes the lease of an app that has likely never run (a sweep found no state for it)
    /// with one request: creates its Lease, carrying `intent` (the objects the run is about to
    /// apply, see [`ANNOTATION_INTENT`]) when there is one. Fails with [`LeaseError::Moved`]
    /// when the Lease exists after all (or another guard of this process holds it): the
    /// caller, which has written nothing, takes the ordinary path ([`Leases::acquire`]).
    pub async fn create_new(
        &self,
        app: &str,
        intent: Option<String>,
    ) -> Result<LeaseGuard, LeaseError> {
        let name = object_name(app);
        let moved = || LeaseError::Moved {
            app: app.to_string(),
        };
        let claim = Claim::take(&self.namespace, &name, &self.identity).ok_or_else(moved)?;
        let body = self.body(&name, None, intent.as_deref());
        let sent = Instant::now();
        match self.api.create(&PostParams::default(), &body).await {
            Ok(lease) => Ok(self.hold(name, lease, sent, claim)),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(moved()),
            Err(e) => Err(self.api_error(app, e)),
        }
    }

    /// One look at the lease with this process's claim on it: taken, or the holder to wait
    /// for. A write that meets a conflict (someone else wrote first) reads again. A first
    /// run's intent on the Lease is carried forward.
    async fn try_take(
        &self,
        app: &str,
        name: &str,
        claim: Claim,
    ) -> Result<Result<LeaseGuard, String>, LeaseError> {
        loop {
            let current = self
                .api
                .get_opt(name)
                .await
                .map_err(|e| self.api_error(app, e))?;
            let sent = Instant::now();
            let attempt = match &current {
                None => {
                    self.api
                        .create(&PostParams::default(), &self.body(name, None, None))
                        .await
                }
                Some(lease) => {
                    let holder = holder_of(lease);
                    let free = holder.is_empty()
                        // Ours from an earlier guard that could not hand it back.
                        || holder == self.identity
                        || expired(&self.namespace, lease, self.timing.duration)
                        || self.released_by_record(app, lease).await;
                    if !free {
                        return Ok(Err(holder.to_string()));
                    }
                    let version = lease.metadata.resource_version.clone();
                    let body = self.body(name, version, intent_of(lease));
                    self.api.replace(name, &PostParams::default(), &body).await
                }
            };
            match attempt {
                Ok(lease) => return Ok(Ok(self.hold(name.to_string(), lease, sent, claim))),
                // Someone else wrote first (409 conflict or 409 already exists): look again.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(self.api_error(app, e)),
            }
        }
    }

    /// Whether the app's state says the run holding `lease` has ended: its final record
    /// carries the lease's token (see [`state::Release`]). A state that cannot be read says
    /// no, and the lease is waited for as before.
    async fn released_by_record(&self, app: &str, lease: &Lease) -> bool {
        let Some(held) = token(lease) else {
            return false;
        };
        state::released_lease(&self.client, &self.namespace, app).await == Some(held)
    }

    /// Starts renewing `lease`, just written by us with a request sent at `sent`.
    fn hold(&self, name: String, lease: Lease, sent: Instant, claim: Claim) -> LeaseGuard {
        let watch = LeaseWatch::new(sent, self.timing.renew_deadline);
        let current = Arc::new(Mutex::new(lease));
        let renewer = tokio::spawn(
            Renewer {
                api: self.api.clone(),
                name: name.clone(),
                identity: self.identity.clone(),
                current: current.clone(),
                watch: watch.clone(),
                timing: self.timing,
            }
            .run(),
        );
        LeaseGuard {
            api: self.api.clone(),
            name,
            identity: self.identity.clone(),
            current,
            watch,
            renewer,
            _claim: claim,
        }
    }
}

/// The background task that keeps a held lease: a renewal every [`LeaseTiming::renew_every`],
/// each retried until it succeeds or the renew deadline passes.
struct Renewer {
    api: Api<Lease>,
    name: String,
    identity: String,
    current: Arc<Mutex<Lease>>,
    watch: LeaseWatch,
    timing: LeaseTiming,
}

impl Renewer {
    async fn run(self) {
        loop {
            tokio::time::sleep(self.timing.renew_every).await;
            if let Err(why) = self.renew().await {
                tracing::warn!(lease = %self.name, %why, "lease lost; the run stops at its next safe point");
                self.watch.mark_lost(why);
                return;
            }
        }
    }

    /// One renewal: `Err` with the reason when the lease is no longer ours.
    async fn renew(&self) -> Result<(), String> {
        let deadline = self.watch.renewed_at() + self.timing.renew_deadline;
        let mut last_error = String::from("no answer");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "not renewed for {}s: {last_error}",
                    self.timing.renew_deadline.as_secs_f64()
                ));
            }
            let mut lease = self.current.lock().expect("lease").clone();
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = Some(MicroTime(Timestamp::now()));
            }
            let sent = Instant::now();
            let replaced = tokio::time::timeout(
                left,
                self.api.replace(&self.name, &PostParams::default(), &lease),
            )
            .await;
            match replaced {
                Ok(Ok(renewed)) => {
                    *self.current.lock().expect("lease") = renewed;
                    self.watch.renewed(sent);
                    return Ok(());
                }
                // Written by someone since our last write: read it again, and carry on from
                // the fresh copy if it is still ours.
                Ok(Err(kube::Error::Api(e))) if e.code == 409 => {
                    match tokio::time::timeout(left, self.api.get_opt(&self.name)).await {
                        Ok(Ok(Some(fresh))) if holder_of(&fresh) == self.identity => {
                            *self.current.lock().expect("lease") = fresh;
                            continue;
                        }
                        Ok(Ok(Some(fresh))) => {
                            return Err(match holder_of(&fresh) {
                                "" => "released by someone else".to_string(),
                                other => format!("taken over by {other}"),
                            })
                        }
                        Ok(Ok(None)) => return Err("the Lease was deleted".into()),
                        Ok(Err(e)) => last_error = e.to_string(),
                        Err(_) => last_error = "reading it timed out".into(),
                    }
                }
                Ok(Err(kube::Error::Api(e))) if e.code == 404 => {
                    return Err("the Lease was deleted".into())
                }
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => {
                    last_error = "the renewal timed out".into();
                    continue;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(self.timing.retry().min(left)).await;
        }
    }
}

/// A held lease, renewed in the background while held; [`LeaseGuard::release`] hands it back.
/// Dropped without a release, it stops renewing and the lease expires.
pub struct LeaseGuard {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The lease as last written by us (its resourceVersion makes the next write conditional).
    current: Arc<Mutex<Lease>>,
    watch: LeaseWatch,
    renewer: tokio::task::JoinHandle<()>,
    _claim: Claim,
}

impl LeaseGuard {
    /// A handle telling whether the lease is still ours.
    pub fn watch(&self) -> LeaseWatch {
        self.watch.clone()
    }

    /// The lease's token (see [`token`]), for the run's final record to release it.
    pub fn token(&self) -> Option<String> {
        token(&self.current.lock().expect("lease"))
    }

    /// The first run's intent the lease carries (see [`ANNOTATION_INTENT`]), as written.
    pub fn intent(&self) -> Option<String> {
        intent_of(&self.current.lock().expect("lease")).map(str::to_string)
    }

    /// Stops holding a lease that the run's final record released (its token written with
    /// it): nothing is written, and anyone may take the lease now. Returns the resourceVersion
    /// of the lease as last written, for [`Leases::take_released`]; `None` if it was lost
    /// meanwhile.
    pub fn finish(self) -> Option<String> {
        self.renewer.abort();
        if self.watch.lost().is_some() {
            return None;
        }
        let current = self.current.lock().expect("lease");
        current.metadata.resource_version.clone()
    }

    /// Hands the lease back so the next holder does not wait for it to expire. Returns the
    /// resourceVersion of the released lease as written, for [`Leases::take_released`]. A
    /// lease already lost is not written: it may be someone else's now.
    pub async fn release(self) -> Option<String> {
        // A renewal cut off mid-flight leaves `current` stale; the replace below then meets a
        // conflict and looks again.
        self.renewer.abort();
        if self.watch.lost().is_some() {
            return None;
        }
        let mut lease = self.current.lock().expect("lease").clone();
        loop {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
            }
            match self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
            {
                Ok(released) => return released.metadata.resource_version,
                // Changed under us (a renewal racing the release): look again, and hand it
                // back only if it is still ours.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let Ok(Some(fresh)) = self.api.get_opt(&self.name).await else {
                        return None;
                    };
                    if holder_of(&fresh) != self.identity {
                        return None;
                    }
                    lease = fresh;
                }
                Err(_) => return None,
            }
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, holder: &str, renewed_secs: i64, duration: Option<i32>) -> Lease {
        let mut lease = Lease::default();
        lease.metadata.name = Some(name.into());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: duration,
            renew_time: Some(MicroTime(
                Timestamp::from_second(renewed_secs).expect("a valid time"),
            )),
            ..Default::default()
        });
        lease
    }

    #[test]
    fn timing_keeps_client_go_proportions() {
        let t = LeaseTiming::default();
        assert_eq!(t.duration, Duration::from_secs(15));
        assert_eq!(t.renew_every, Duration::from_secs(3));
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
        assert!(
            t.renew_deadline < t.duration,
            "a holder must stop before others take over"
        );
        assert!(
            t.wait > t.duration,
            "one wait must outlast a crashed holder's lease"
        );
    }

    #[test]
    fn expiry_counts_from_the_first_sight_of_a_record_whatever_its_renew_time() {
        // A renewTime an hour ago, as a holder with a slow clock writes: not expired on
        // first sight, however old it says it is.
        let old = lease("unit-expiry-a", "other", 0, Some(15));
        assert!(!expired("unit", &old, Duration::from_secs(15)));
        // A zero duration in the record is ignored for ours; a record that changes starts
        // the clock again.
        let zero = lease("unit-expiry-b", "other", 0, Some(0));
        assert!(!expired("unit", &zero, Duration::from_secs(1)));
        let immediate = lease("unit-expiry-c", "other", 0, Some(1));
        assert!(!expired("unit", &immediate, Duration::from_secs(15)));
        local()
            .observed
            .get_mut(&("unit".to_string(), "unit-expiry-c".to_string()))
            .expect("observed")
            .1 -= Duration::from_secs(2);
        assert!(expired("unit", &immediate, Duration::from_secs(15)));
        let renewed = lease("unit-expiry-c", "other", 1, Some(1));
        assert!(!expired("unit", &renewed, Duration::from_secs(15)));
    }

    #[test]
    fn one_claim_per_lease_and_identity_in_a_process() {
        let first = Claim::take("unit", "claim", "me").expect("free");
        assert!(Claim::take("unit", "claim", "me").is_none());
        let other = Claim::take("unit", "claim", "someone-else");
        assert!(other.is_some(), "other identities meet at the API server");
        drop(first);
        assert!(Claim::take("unit", "claim", "me").is_some());
    }

    #[tokio::test]
    async fn a_watch_is_lost_once_renewals_stop_for_the_deadline() {
        let started = Instant::now() - Duration::from_secs(11);
        let watch = LeaseWatch::new(started, Duration::from_secs(10));
        assert!(watch.lost().unwrap().starts_with("not renewed for"));
        // Known lost: whoever waits on it wakes.
        watch.cancelled().await;
        let fresh = LeaseWatch::new(Instant::now(), Duration::from_secs(10));
        assert_eq!(fresh.lost(), None);
        fresh.mark_lost("taken over by x".into());
        fresh.mark_lost("later reason".into());
        assert_eq!(fresh.lost().as_deref(), Some("taken over by x"));
    }
}
