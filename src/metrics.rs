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

/// All metrics of one process.
pub struct Metrics {
    registry: Registry,
    pub webhook_deliveries: Family<DeliveryLabels, Counter>,
    pub webhook_ack_seconds: Family<ForgeLabels, Histogram>,
    pub jobs_queued: Family<ForgeLabels, Counter>,
    pub queue_pending: Gauge,
    pub reconcile_runs: Family<RunLabels, Counter>,
    pub reconcile_seconds: Histogram,
    pub forge_rate_limit_remaining: Family<ForgeLabels, Gauge>,
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
        let reconcile_runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "reconcile_runs",
            "Reconcile runs by app and outcome",
            reconcile_runs.clone(),
        );
        // 10 ms .. ~5 min.
        let reconcile_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 15));
        registry.register(
            "reconcile_seconds",
            "Duration of reconcile runs",
            reconcile_seconds.clone(),
        );
        let forge_rate_limit_remaining = Family::<ForgeLabels, Gauge>::default();
        registry.register(
            "forge_rate_limit_remaining",
            "Requests left in the forge's current rate-limit window (-1 unknown)",
            forge_rate_limit_remaining.clone(),
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
            forge_rate_limit_remaining,
            webhook_deliveries,
            webhook_ack_seconds,
            jobs_queued,
            queue_pending,
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
