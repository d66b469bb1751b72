//! The daemon's Prometheus metrics: the registry, its typed families, and
//! the small methods the rest of the daemon calls to update them.
//!
//! One [`Metrics`] per process, reached through [`global`] (a `LazyLock`).
//! A daemon is one per process, and the places that count (the store's
//! writer thread, the Workload API's tower layer, the identity actors) are
//! far apart: threading a handle through every constructor would touch each
//! of them and their tests for no gain, since a second registry in the same
//! process would only ever be a test's. Unit tests that check values build
//! their own with [`Metrics::new`]; in-process integration tests share the
//! global one and so look at deltas, or run alone in their binary.
//!
//! Every label value is a closed enum (`labels`), so the number of series is
//! bounded whatever clients send. Families whose label sets are known in
//! advance are created at zero, so `rate()` sees their first increment; the
//! request families (keyed by method and code) appear with the first
//! request. Help texts carry no final period: the encoder adds one.
//!
//! Does not own: the HTTP listener and the health checks (`http`), which
//! error maps to which reason (the callers), or when anything is counted.

pub mod gate;
pub mod http;
mod labels;

use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

pub use labels::{Code, Method, RefusalReason, RevokeReason, SvidKind};
use labels::{KindLabel, MethodLabel, RefusalLabel, RevokeLabel, RpcLabels};

/// Prefix of every metric name.
pub const PREFIX: &str = "sigil";

/// The content type of [`Metrics::encode`]'s output: OpenMetrics text, what
/// `prometheus-client` writes (it ends with `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A histogram family keyed by method, built by a plain fn pointer.
type MethodHistograms = Family<MethodLabel, Histogram, fn() -> Histogram>;

/// Buckets of a Workload API request's duration: 0.5 ms doubling to about
/// 16 s (attestation reads /proc and may hash an executable; the request
/// timeout is 30 s).
fn rpc_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Buckets of a store commit: 0.1 ms doubling to about 3 s (one fsync on a
/// quiet disk is well under a millisecond; a busy one takes tens).
fn commit_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The daemon's metrics. See the module docs.
pub struct Metrics {
    registry: Registry,
    live_instances: Gauge,
    live_tasks: Gauge,
    open_streams: Gauge,
    crl_entries: Gauge,
    crl_bytes: Gauge,
    ca_expiry_seconds: Gauge,
    /// The CA certificate's notAfter (Unix seconds); `i64::MIN` until set.
    /// [`Self::encode`] turns it into seconds left at scrape time.
    ca_not_after: AtomicI64,
    svids_issued: Family<KindLabel, Counter>,
    svids_rotated: Family<KindLabel, Counter>,
    svids_revoked: Family<RevokeLabel, Counter>,
    refusals: Family<RefusalLabel, Counter>,
    requests: Family<RpcLabels, Counter>,
    request_duration: MethodHistograms,
    commit_duration: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &GLOBAL
}

impl Metrics {
    /// A registry with every family registered, at zero.
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix(PREFIX),
            live_instances: Gauge::default(),
            live_tasks: Gauge::default(),
            open_streams: Gauge::default(),
            crl_entries: Gauge::default(),
            crl_bytes: Gauge::default(),
            ca_expiry_seconds: Gauge::default(),
            ca_not_after: AtomicI64::new(i64::MIN),
            svids_issued: Family::default(),
            svids_rotated: Family::default(),
            svids_revoked: Family::default(),
            refusals: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(rpc_histogram),
            commit_duration: commit_histogram(),
        };
        metrics.register();
        metrics.create_known_series();
        metrics
    }

    /// Registers every family (the registry holds clones: they share their
    /// values with the fields).
    fn register(&mut self) {
        let r = &mut self.registry;
        let help = "Live instances (attested processes with SVIDs)";
        r.register("live_instances", help, self.live_instances.clone());
        let help = "Live tasks, across all instances";
        r.register("live_tasks", help, self.live_tasks.clone());
        let help = "Workload API streams open now";
        r.register("open_streams", help, self.open_streams.clone());
        let help = "Revoked serial numbers in the published CRL";
        r.register("crl_entries", help, self.crl_entries.clone());
        let help = "Size of the published CRL (DER)";
        r.register_with_unit("crl", help, Unit::Bytes, self.crl_bytes.clone());
        let help = "Seconds until the CA certificate expires (negative once expired)";
        let ca = self.ca_expiry_seconds.clone();
        r.register_with_unit("ca_expiry", help, Unit::Seconds, ca);
        let help = "SVIDs minted (first issue and rotation alike), by kind";
        r.register("svids_issued", help, self.svids_issued.clone());
        let help = "SVIDs minted to replace an ageing one, by kind";
        r.register("svids_rotated", help, self.svids_rotated.clone());
        let help = "SVIDs added to the CRL, by reason";
        r.register("svids_revoked", help, self.svids_revoked.clone());
        let help = "Callers on the workload socket refused an identity, by reason";
        r.register("attestation_refusals", help, self.refusals.clone());
        let help = "Workload socket gRPC requests by method and status code; a stream counts once, at its first message";
        r.register("workload_api_requests", help, self.requests.clone());
        let help = "Time to answer a workload socket request (a stream: to its first message)";
        let durations = self.request_duration.clone();
        r.register_with_unit(
            "workload_api_request_duration",
            help,
            Unit::Seconds,
            durations,
        );
        let help = "Time of one store group commit (the COMMIT and its fsync)";
        let commits = self.commit_duration.clone();
        r.register_with_unit("store_commit_duration", help, Unit::Seconds, commits);
    }

    /// Creates every series whose labels are known in advance, at zero.
    fn create_known_series(&self) {
        for kind in SvidKind::ALL {
            let label = KindLabel { kind: *kind };
            drop(self.svids_issued.get_or_create(&label));
            drop(self.svids_rotated.get_or_create(&label));
        }
        for reason in RevokeReason::ALL {
            drop(
                self.svids_revoked
                    .get_or_create(&RevokeLabel { reason: *reason }),
            );
        }
        for reason in RefusalReason::ALL {
            drop(
                self.refusals
                    .get_or_create(&RefusalLabel { reason: *reason }),
            );
        }
    }

    /// One SVID of `kind` was minted (first issue or rotation alike).
    pub fn svid_issued(&self, kind: SvidKind) {
        self.svids_issued.get_or_create(&KindLabel { kind }).inc();
    }

    /// One SVID of `kind` was minted to replace an ageing one (counted in
    /// addition to [`Self::svid_issued`]).
    pub fn svid_rotated(&self, kind: SvidKind) {
        self.svids_rotated.get_or_create(&KindLabel { kind }).inc();
    }

    /// `n` SVIDs were revoked for `reason`.
    pub fn svids_revoked(&self, reason: RevokeReason, n: u64) {
        self.svids_revoked
            .get_or_create(&RevokeLabel { reason })
            .inc_by(n);
    }

    /// A caller was refused an identity for `reason`.
    pub fn refusal(&self, reason: RefusalReason) {
        self.refusals.get_or_create(&RefusalLabel { reason }).inc();
    }

    /// How many instances and tasks are live now.
    pub fn set_live(&self, instances: usize, tasks: usize) {
        self.live_instances.set(saturating(instances));
        self.live_tasks.set(saturating(tasks));
    }

    /// The published CRL's entry count and DER size.
    pub fn set_crl(&self, entries: usize, bytes: usize) {
        self.crl_entries.set(saturating(entries));
        self.crl_bytes.set(saturating(bytes));
    }

    /// The CA certificate's notAfter. The gauge is seconds left, computed at
    /// each scrape, so it needs setting only when the CA changes.
    pub fn set_ca_expiry(&self, not_after: SystemTime) {
        let secs = match not_after.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN + 1, |s| -s),
        };
        self.ca_not_after.store(secs, Ordering::Relaxed);
    }

    /// A Workload API stream opened; it counts as open until the guard is
    /// dropped.
    #[must_use = "the stream counts as open only while the guard lives"]
    pub fn stream_opened(&self) -> OpenStream {
        self.open_streams.inc();
        OpenStream {
            gauge: self.open_streams.clone(),
        }
    }

    /// A request to `method` finished with `code` after `elapsed` (a
    /// stream: its first message went out).
    pub fn rpc(&self, method: Method, code: tonic::Code, elapsed: Duration) {
        self.requests
            .get_or_create(&RpcLabels {
                method,
                code: Code(code),
            })
            .inc();
        self.request_duration
            .get_or_create(&MethodLabel { method })
            .observe(elapsed.as_secs_f64());
    }

    /// How many requests to `method` were counted with `code` (for tests
    /// and status pages; Prometheus reads [`Self::encode`]).
    pub fn request_count(&self, method: Method, code: tonic::Code) -> u64 {
        let labels = RpcLabels {
            method,
            code: Code(code),
        };
        self.requests.get(&labels).map_or(0, |c| c.get())
    }

    /// One store group commit took `elapsed`.
    pub fn commit(&self, elapsed: Duration) {
        self.commit_duration.observe(elapsed.as_secs_f64());
    }

    /// Every metric in the OpenMetrics text format ([`CONTENT_TYPE`]).
    ///
    /// # Errors
    /// When a metric cannot be encoded (not expected: every label value is
    /// one of this module's enums).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        self.refresh_ca_expiry(SystemTime::now());
        let mut out = String::with_capacity(8 << 10);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Sets the CA expiry gauge to the seconds from `now` to notAfter (left
    /// at zero until [`Self::set_ca_expiry`] was called).
    fn refresh_ca_expiry(&self, now: SystemTime) {
        let not_after = self.ca_not_after.load(Ordering::Relaxed);
        if not_after == i64::MIN {
            return;
        }
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.ca_expiry_seconds.set(not_after.saturating_sub(now));
    }
}

/// An open Workload API stream, as [`Metrics::stream_opened`] counts it
/// (or a gate connection, as [`gate::GateMetrics::connection_opened`]
/// does); dropping it takes it off the gauge.
#[derive(Debug)]
pub struct OpenStream {
    gauge: Gauge,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

fn saturating(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
    }

    #[test]
    fn a_fresh_registry_exports_every_family_at_zero() {
        let text = Metrics::new().encode().unwrap();
        for name in [
            "sigil_live_instances",
            "sigil_live_tasks",
            "sigil_open_streams",
            "sigil_crl_entries",
            "sigil_crl_bytes",
            "sigil_ca_expiry_seconds",
            "sigil_svids_issued",
            "sigil_svids_rotated",
            "sigil_svids_revoked",
            "sigil_attestation_refusals",
            "sigil_store_commit_duration_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} in\n{text}"
            );
        }
        // Families keyed by method appear with the first request.
        assert!(!text.contains("sigil_workload_api_request"), "{text}");
        assert!(!text.contains(".."), "help texts end with one period");
        assert_eq!(
            line(&text, "sigil_svids_issued_total{kind=\"task\"}"),
            "sigil_svids_issued_total{kind=\"task\"} 0"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn counters_count_under_their_typed_labels() {
        let m = Metrics::new();
        m.svid_issued(SvidKind::Instance);
        m.svid_issued(SvidKind::Instance);
        m.svid_rotated(SvidKind::Task);
        m.svids_revoked(RevokeReason::TaskEnded, 3);
        m.refusal(RefusalReason::NoMatchingEntry);
        let text = m.encode().unwrap();
        assert!(text.contains("sigil_svids_issued_total{kind=\"instance\"} 2\n"));
        assert!(text.contains("sigil_svids_rotated_total{kind=\"task\"} 1\n"));
        assert!(text.contains("sigil_svids_revoked_total{reason=\"task_ended\"} 3\n"));
        assert!(
            text.contains("sigil_attestation_refusals_total{reason=\"no_matching_entry\"} 1\n")
        );
        assert!(text.contains("sigil_attestation_refusals_total{reason=\"other\"} 0\n"));
    }

    #[test]
    fn a_request_counts_by_method_and_code_and_observes_its_duration() {
        let m = Metrics::new();
        m.rpc(
            Method::FetchX509Svid,
            tonic::Code::PermissionDenied,
            Duration::from_millis(3),
        );
        let text = m.encode().unwrap();
        assert!(text.contains(
            "sigil_workload_api_requests_total{method=\"SpiffeWorkloadAPI/FetchX509SVID\",code=\"PermissionDenied\"} 1\n"
        ), "{text}");
        assert!(text.contains(
            "sigil_workload_api_request_duration_seconds_count{method=\"SpiffeWorkloadAPI/FetchX509SVID\"} 1\n"
        ), "{text}");
    }

    #[test]
    fn the_open_streams_gauge_falls_when_a_guard_is_dropped() {
        let m = Metrics::new();
        let a = m.stream_opened();
        let b = m.stream_opened();
        assert_eq!(m.open_streams.get(), 2);
        drop(a);
        assert_eq!(m.open_streams.get(), 1);
        drop(b);
        assert_eq!(m.open_streams.get(), 0);
    }

    #[test]
    fn ca_expiry_is_the_seconds_left_at_scrape_time_and_negative_after() {
        let m = Metrics::new();
        let now = SystemTime::now();
        m.set_ca_expiry(now + Duration::from_secs(3600));
        m.refresh_ca_expiry(now);
        assert_eq!(m.ca_expiry_seconds.get(), 3600);
        m.refresh_ca_expiry(now + Duration::from_secs(3601));
        assert_eq!(m.ca_expiry_seconds.get(), -1);
    }

    #[test]
    fn gauges_and_commit_observations_reach_the_text() {
        let m = Metrics::new();
        m.set_live(4, 7);
        m.set_crl(2, 345);
        m.commit(Duration::from_micros(250));
        let text = m.encode().unwrap();
        assert!(text.contains("sigil_live_instances 4\n"));
        assert!(text.contains("sigil_live_tasks 7\n"));
        assert!(text.contains("sigil_crl_entries 2\n"));
        assert!(text.contains("sigil_crl_bytes 345\n"));
        assert!(text.contains("sigil_store_commit_duration_seconds_count 1\n"));
        assert!(text.contains("# UNIT sigil_store_commit_duration_seconds seconds\n"));
    }
}
