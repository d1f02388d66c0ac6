//! Prometheus metrics, served as text on `GET /metrics`. Label values come from fixed sets
//! (or from configured app names), never straight from a request, so cardinality is bounded.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub forge: &'static str,
    /// `push`, `ping`, `ignored` or `unknown` (before the event header was trusted).
    pub event: &'static str,
    /// `accepted` (jobs queued), `no_match`, `deleted`, `duplicate`, `ignored`, `pong`,
    /// `unauthorized`, `invalid`, `too_large`, `unsupported_media_type`, `timeout`,
    /// `forge_not_configured` or `unavailable`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    /// A configured app name (bounded by the settings).
    pub app: String,
    /// `applied`, `unchanged`, `skipped` or `failed`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    pub app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForgeLabels {
    pub forge: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForgeRequestLabels {
    pub forge: &'static str,
    /// `ok`, `not_modified` (a conditional request answered 304: no rate limit spent), `not_found`, `unauthorized`, `rate_limited`, `server_error`, `client_error` or
    /// `network_error` (one per attempt, retries included).
    pub outcome: &'static str,
}

/// Forge API requests of this process. Process-wide, since every forge client of the process
/// counts into them; each [`Metrics`] registry exposes the same families.
pub static FORGE_REQUESTS: std::sync::LazyLock<Family<ForgeRequestLabels, Counter>> =
    std::sync::LazyLock::new(Family::default);
/// Requests left in each forge's rate-limit window, as it last reported.
pub static FORGE_RATE_LIMIT_REMAINING: std::sync::LazyLock<Family<ForgeLabels, Gauge>> =
    std::sync::LazyLock::new(Family::default);

/// All metrics of one process.
pub struct Metrics {
    registry: Registry,
    pub webhook_deliveries: Family<DeliveryLabels, Counter>,
    pub webhook_ack_seconds: Family<ForgeLabels, Histogram>,
    pub jobs_queued: Family<ForgeLabels, Counter>,
    pub queue_pending: Gauge,
    /// Bytes of webhook bodies reserved by requests being read (see `server.body_budget`).
    pub webhook_body_bytes_reserved: Gauge,
    pub reconcile_runs: Family<RunLabels, Counter>,
    pub reconcile_seconds: Family<RunLabels, Histogram>,
    pub objects_applied: Family<AppLabels, Counter>,
    pub objects_pruned: Family<AppLabels, Counter>,
    pub queue_wait_seconds: Histogram,
    pub drift_objects: Family<AppLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("driftless");
        let webhook_deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by forge, event and outcome",
            webhook_deliveries.clone(),
        );
        let webhook_ack_seconds = Family::<ForgeLabels, Histogram>::new_with_constructor(|| {
            // 50 µs .. ~0.8 s: an acknowledgement should take well under a millisecond.
            Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
        });
        registry.register(
            "webhook_ack_seconds",
            "Time from a webhook request's body being read to its response",
            webhook_ack_seconds.clone(),
        );
        let jobs_queued = Family::<ForgeLabels, Counter>::default();
        registry.register(
            "webhook_jobs_queued",
            "App reconcile jobs queued from webhooks",
            jobs_queued.clone(),
        );
        let queue_pending = Gauge::default();
        registry.register(
            "queue_pending",
            "Jobs waiting in the queue",
            queue_pending.clone(),
        );
        let webhook_body_bytes_reserved = Gauge::default();
        registry.register(
            "webhook_body_bytes_reserved",
            "Bytes of the webhook body budget held by requests whose bodies are being read",
            webhook_body_bytes_reserved.clone(),
        );
        let reconcile_runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "reconcile_runs",
            "Reconcile runs by app and outcome",
            reconcile_runs.clone(),
        );
        // 10 ms .. ~5 min.
        let reconcile_seconds = Family::<RunLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 15))
        });
        registry.register(
            "reconcile_seconds",
            "Duration of reconcile runs by app and outcome",
            reconcile_seconds.clone(),
        );
        let objects_applied = Family::<AppLabels, Counter>::default();
        registry.register(
            "objects_applied",
            "Objects written by server-side apply (created or changed), by app",
            objects_applied.clone(),
        );
        let objects_pruned = Family::<AppLabels, Counter>::default();
        registry.register(
            "objects_pruned",
            "Objects deleted because they left Git, by app",
            objects_pruned.clone(),
        );
        // 1 ms .. ~16 s.
        let queue_wait_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "queue_wait_seconds",
            "Time a job waited in the queue before a worker took it",
            queue_wait_seconds.clone(),
        );
        registry.register(
            "forge_requests",
            "Forge API requests by forge and outcome (each attempt)",
            FORGE_REQUESTS.clone(),
        );
        registry.register(
            "forge_rate_limit_remaining",
            "Requests left in the forge's current rate-limit window, as last reported",
            FORGE_RATE_LIMIT_REMAINING.clone(),
        );
        let drift_objects = Family::<AppLabels, Gauge>::default();
        registry.register(
            "drift_objects",
            "Objects found drifted at the app's last check and not healed",
            drift_objects.clone(),
        );
        Self {
            drift_objects,
            registry,
            reconcile_runs,
            reconcile_seconds,
            objects_applied,
            objects_pruned,
            queue_wait_seconds,
            webhook_deliveries,
            webhook_ack_seconds,
            jobs_queued,
            queue_pending,
            webhook_body_bytes_reserved,
        }
    }

    pub fn delivery(&self, forge: &'static str, event: &'static str, outcome: &'static str) {
        self.webhook_deliveries
            .get_or_create(&DeliveryLabels {
                forge,
                event,
                outcome,
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
