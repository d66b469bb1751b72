//! `sigil gate`'s metrics: its own registry (prefix `sigil_gate`), served
//! on the gate's `--metrics` listener by the same `http` module as the
//! daemon's. A gate is a separate process from the daemon, so it exports
//! only these families, never the daemon's.
//!
//! Every label value is a closed enum (`labels`); the rule label is the
//! index of a rule in the operator's file (or `none`), so the number of
//! series is bounded by the rules file, never by what clients send.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use super::labels::{GateClose, GateOutcome, Handshake};
use super::labels::{GateCloseLabel, HandshakeLabel};

/// A request's outcome and the rule that decided it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    outcome: GateOutcome,
    /// The deciding rule's index in the rules file, or `none`.
    rule: String,
}

/// The gate's metrics. See the module docs.
pub struct GateMetrics {
    registry: Registry,
    handshakes: Family<HandshakeLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    closed: Family<GateCloseLabel, Counter>,
    open_connections: Gauge,
}

impl std::fmt::Debug for GateMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateMetrics").finish_non_exhaustive()
    }
}

impl Default for GateMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's gate metrics.
pub fn global() -> &'static GateMetrics {
    static GLOBAL: LazyLock<GateMetrics> = LazyLock::new(GateMetrics::new);
    &GLOBAL
}

impl GateMetrics {
    /// A registry with every family registered; the series whose labels
    /// are known in advance start at zero.
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("sigil_gate"),
            handshakes: Family::default(),
            requests: Family::default(),
            closed: Family::default(),
            open_connections: Gauge::default(),
        };
        let r = &mut m.registry;
        let help = "TLS handshakes with clients, by outcome";
        r.register("handshakes", help, m.handshakes.clone());
        let help = "Requests from verified clients, by outcome and the rule that decided (index in the rules file, or none)";
        r.register("requests", help, m.requests.clone());
        let help = "Client connections the gate closed itself, by reason";
        r.register("connections_closed", help, m.closed.clone());
        let help = "Verified client connections open now";
        r.register("open_connections", help, m.open_connections.clone());
        for outcome in Handshake::ALL {
            drop(
                m.handshakes
                    .get_or_create(&HandshakeLabel { outcome: *outcome }),
            );
        }
        for reason in GateClose::ALL {
            drop(m.closed.get_or_create(&GateCloseLabel { reason: *reason }));
        }
        // The outcomes no rule decides; the others appear with their rule.
        for outcome in [GateOutcome::Denied, GateOutcome::Unreadable] {
            drop(m.requests.get_or_create(&RequestLabels {
                outcome,
                rule: "none".into(),
            }));
        }
        m
    }

    /// A handshake ended with `outcome`.
    pub fn handshake(&self, outcome: Handshake) {
        self.handshakes
            .get_or_create(&HandshakeLabel { outcome })
            .inc();
    }

    /// A request ended with `outcome`, decided by rule `rule` (if any).
    pub fn request(&self, outcome: GateOutcome, rule: Option<usize>) {
        let rule = rule.map_or_else(|| "none".to_owned(), |r| r.to_string());
        self.requests
            .get_or_create(&RequestLabels { outcome, rule })
            .inc();
    }

    /// The gate closed a connection for `reason`.
    pub fn closed(&self, reason: GateClose) {
        self.closed.get_or_create(&GateCloseLabel { reason }).inc();
    }

    /// A verified connection opened; it counts as open until the guard is
    /// dropped.
    #[must_use = "the connection counts as open only while the guard lives"]
    pub fn connection_opened(&self) -> super::OpenStream {
        self.open_connections.inc();
        super::OpenStream {
            gauge: self.open_connections.clone(),
        }
    }

    /// Every metric in the OpenMetrics text format.
    ///
    /// # Errors
    /// When a metric cannot be encoded (not expected).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(4 << 10);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_series_start_at_zero_and_counts_show() {
        let m = GateMetrics::new();
        let text = m.encode().unwrap();
        assert!(
            text.contains("sigil_gate_handshakes_total{outcome=\"refused\"} 0"),
            "{text}"
        );
        m.handshake(Handshake::Refused);
        m.request(GateOutcome::Denied, None);
        m.request(GateOutcome::Forwarded, Some(2));
        m.closed(GateClose::Revoked);
        let open = m.connection_opened();
        let text = m.encode().unwrap();
        for line in [
            "sigil_gate_handshakes_total{outcome=\"refused\"} 1",
            "sigil_gate_requests_total{outcome=\"denied\",rule=\"none\"} 1",
            "sigil_gate_requests_total{outcome=\"forwarded\",rule=\"2\"} 1",
            "sigil_gate_connections_closed_total{reason=\"revoked\"} 1",
            "sigil_gate_open_connections 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        drop(open);
        assert!(
            m.encode()
                .unwrap()
                .contains("sigil_gate_open_connections 0")
        );
    }
}
