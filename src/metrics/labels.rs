//! The label values the daemon's metrics may carry: small closed sets.
//!
//! Every label value is a variant of an enum here, never a string a client
//! sent, so no request can add a series: the number of series is fixed by
//! these types (bounded cardinality). Values are written `snake_case` (the
//! Prometheus convention), except gRPC's method and status code names, which
//! keep the spelling the gRPC ecosystem's dashboards expect (`OK`,
//! `PermissionDenied`, `SpiffeWorkloadAPI/FetchX509SVID`).
//!
//! Does not own: the metric families (`super`), or which error maps to which
//! reason (the callers: `workload_api::status` for refusals).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

/// Declares a label-value enum with its exact spelling on the wire. The
/// derive in `prometheus-client` writes the variant's Rust name
/// (`Instance`), which is not the `snake_case` Prometheus expects; this
/// writes the given string instead.
macro_rules! label_values {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $value:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value as exported.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $value,)+
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

label_values! {
    /// Which kind of SVID: an instance's own, or one of its tasks'.
    pub enum SvidKind {
        /// An instance SVID (one per matching entry).
        Instance => "instance",
        /// A task SVID.
        Task => "task",
    }
}

label_values! {
    /// What `sigil gate` did with a TLS handshake.
    pub enum Handshake {
        /// The client's SVID verified and some rule allows its ID.
        Accepted => "accepted",
        /// Refused with a TLS alert: no certificate, an untrusted or
        /// revoked one, another trust domain, an ID no rule allows, or a
        /// TLS failure.
        Refused => "refused",
        /// The client did not finish within the handshake timeout.
        TimedOut => "timed_out",
    }
}

label_values! {
    /// What `sigil gate` did with a request.
    pub enum GateOutcome {
        /// A rule allowed it and it was forwarded (whatever the upstream
        /// answered).
        Forwarded => "forwarded",
        /// No rule allowed it: 403.
        Denied => "denied",
        /// The upstream could not be reached or failed: 502.
        UpstreamFailed => "upstream_failed",
        /// Its body was too large to read the MCP method from: 413.
        TooLarge => "too_large",
        /// Its method, path or MCP call could not be read the way the
        /// service would read it: 400 or 415.
        Unreadable => "unreadable",
        /// A path the gate cannot forward: 400.
        BadRequest => "bad_request",
    }
}

label_values! {
    /// Why `sigil gate` closed a live client connection itself.
    pub enum GateClose {
        /// The CRL revoked the client's certificate.
        Revoked => "revoked",
        /// The client's certificate expired.
        Expired => "expired",
    }
}

label_values! {
    /// Why SVIDs were revoked (added to the CRL).
    pub enum RevokeReason {
        /// The task ended (End, TTL, or its instance went with it).
        TaskEnded => "task_ended",
        /// The instance ended (its process exited or exec'd another program).
        InstanceEnded => "instance_ended",
        /// An operator revoked them.
        Revoked => "revoked",
        /// The registration entry that admitted them changed or went away.
        EntryChanged => "entry_changed",
        /// Anything else.
        Other => "other",
    }
}

label_values! {
    /// Why a caller on the workload socket got no identity.
    pub enum RefusalReason {
        /// Attested, but no registration entry matches it.
        NoMatchingEntry => "no_matching_entry",
        /// This process's identity was revoked.
        Revoked => "revoked",
        /// The process exited, or its pid was reused, before or while it was
        /// attested.
        ProcessGone => "process_gone",
        /// The connection failed a check: the program changed, another
        /// process holds the connection, or it could not be pinned.
        ConnectionCheck => "connection_check",
        /// Anything else (no peer credentials, /proc unreadable, the CA or
        /// the store failed).
        Other => "other",
    }
}

label_values! {
    /// A gRPC method on the workload socket; anything else is `Unknown`.
    pub enum Method {
        /// `FetchX509SVID` (server streaming).
        FetchX509Svid => "SpiffeWorkloadAPI/FetchX509SVID",
        /// `FetchX509Bundles` (server streaming).
        FetchX509Bundles => "SpiffeWorkloadAPI/FetchX509Bundles",
        /// `FetchJWTSVID` (unary).
        FetchJwtSvid => "SpiffeWorkloadAPI/FetchJWTSVID",
        /// `FetchJWTBundles` (server streaming).
        FetchJwtBundles => "SpiffeWorkloadAPI/FetchJWTBundles",
        /// `ValidateJWTSVID` (unary).
        ValidateJwtSvid => "SpiffeWorkloadAPI/ValidateJWTSVID",
        /// `FetchWITSVID` (server streaming).
        FetchWitSvid => "SpiffeWorkloadAPI/FetchWITSVID",
        /// `FetchWITBundles` (server streaming).
        FetchWitBundles => "SpiffeWorkloadAPI/FetchWITBundles",
        /// The task extension's `Begin` (unary).
        TaskBegin => "sigil.workload.v1.Tasks/Begin",
        /// The task extension's `End` (unary).
        TaskEnd => "sigil.workload.v1.Tasks/End",
        /// The task extension's `List` (unary).
        TaskList => "sigil.workload.v1.Tasks/List",
        /// A path no service on the socket serves.
        Unknown => "unknown",
    }
}

impl Method {
    /// The method an HTTP/2 request path names (`/Service/Method`).
    pub fn from_path(path: &str) -> Self {
        let name = path.strip_prefix('/').unwrap_or(path);
        Self::ALL
            .iter()
            .copied()
            .find(|m| *m != Self::Unknown && m.as_str() == name)
            .unwrap_or(Self::Unknown)
    }

    /// Whether the method answers with a stream of messages: its duration is
    /// measured to the first message, and it is counted once, when that
    /// message (or the status that ends it) goes out.
    pub fn streaming(self) -> bool {
        matches!(
            self,
            Self::FetchX509Svid
                | Self::FetchX509Bundles
                | Self::FetchJwtBundles
                | Self::FetchWitSvid
                | Self::FetchWitBundles
        )
    }
}

/// A gRPC status code as a label value, spelt as grpc-go spells it (`OK`,
/// `InvalidArgument`, ...), the names gRPC dashboards match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Code(pub tonic::Code);

impl Code {
    /// The label value as exported.
    pub fn as_str(self) -> &'static str {
        use tonic::Code as C;
        match self.0 {
            C::Ok => "OK",
            C::Cancelled => "Canceled",
            C::Unknown => "Unknown",
            C::InvalidArgument => "InvalidArgument",
            C::DeadlineExceeded => "DeadlineExceeded",
            C::NotFound => "NotFound",
            C::AlreadyExists => "AlreadyExists",
            C::PermissionDenied => "PermissionDenied",
            C::ResourceExhausted => "ResourceExhausted",
            C::FailedPrecondition => "FailedPrecondition",
            C::Aborted => "Aborted",
            C::OutOfRange => "OutOfRange",
            C::Unimplemented => "Unimplemented",
            C::Internal => "Internal",
            C::Unavailable => "Unavailable",
            C::DataLoss => "DataLoss",
            C::Unauthenticated => "Unauthenticated",
        }
    }
}

impl EncodeLabelValue for Code {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// `{kind}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct KindLabel {
    pub(super) kind: SvidKind,
}

/// `{reason}` of a revocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RevokeLabel {
    pub(super) reason: RevokeReason,
}

/// `{reason}` of a refusal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RefusalLabel {
    pub(super) reason: RefusalReason,
}

/// `{method, code}` of a finished request.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RpcLabels {
    pub(super) method: Method,
    pub(super) code: Code,
}

/// `{method}` of a request's duration.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct MethodLabel {
    pub(super) method: Method,
}

/// A `sigil gate` handshake's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct HandshakeLabel {
    pub(super) outcome: Handshake,
}

/// Why `sigil gate` closed a connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct GateCloseLabel {
    pub(super) reason: GateClose,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_socket_path_maps_to_its_method_and_others_to_unknown() {
        assert_eq!(
            Method::from_path("/SpiffeWorkloadAPI/FetchX509SVID"),
            Method::FetchX509Svid
        );
        assert_eq!(
            Method::from_path("/sigil.workload.v1.Tasks/Begin"),
            Method::TaskBegin
        );
        for m in Method::ALL {
            if *m != Method::Unknown {
                assert_eq!(Method::from_path(&format!("/{}", m.as_str())), *m);
            }
        }
        for path in [
            "/unknown",
            "unknown",
            "/",
            "",
            "/SpiffeWorkloadAPI/Nope",
            "/x/../y",
        ] {
            assert_eq!(Method::from_path(path), Method::Unknown, "{path}");
        }
    }

    #[test]
    fn only_the_streaming_methods_are_streaming() {
        assert!(Method::FetchX509Svid.streaming());
        assert!(Method::FetchX509Bundles.streaming());
        assert!(!Method::FetchJwtSvid.streaming());
        assert!(!Method::TaskBegin.streaming());
        assert!(!Method::Unknown.streaming());
    }

    #[test]
    fn status_codes_are_spelt_as_grpc_go_spells_them() {
        assert_eq!(Code(tonic::Code::Ok).as_str(), "OK");
        assert_eq!(Code(tonic::Code::Cancelled).as_str(), "Canceled");
        assert_eq!(
            Code(tonic::Code::PermissionDenied).as_str(),
            "PermissionDenied"
        );
    }

    #[test]
    fn label_values_are_snake_case() {
        let values = SvidKind::ALL
            .iter()
            .map(|v| v.as_str())
            .chain(RevokeReason::ALL.iter().map(|v| v.as_str()))
            .chain(RefusalReason::ALL.iter().map(|v| v.as_str()))
            .chain(Handshake::ALL.iter().map(|v| v.as_str()))
            .chain(GateOutcome::ALL.iter().map(|v| v.as_str()))
            .chain(GateClose::ALL.iter().map(|v| v.as_str()));
        for v in values {
            assert!(
                v.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{v}"
            );
        }
    }
}
