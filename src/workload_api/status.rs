//! The one mapping from identity errors to gRPC status on the workload
//! socket, for the Workload API and the task service alike, and how a
//! refusal is logged and counted (`sigil_attestation_refusals_total`).
//!
//! Clients key their behaviour on the code and on the [`NO_IDENTITY_ISSUED`]
//! prefix (see `header`): the rust `spiffe` client retries a PermissionDenied
//! with that prefix slowly and withdraws its SVIDs meanwhile. So every
//! refusal of an identity carries the prefix, while a refused task does not:
//! the agent keeps its instance identity.
//!
//! Does not own: the messages themselves (the errors' `Display`), or the
//! security header's InvalidArgument (`header`).

use tonic::Status;

use super::header::NO_IDENTITY_ISSUED;
use crate::metrics::{self, RefusalReason};
use crate::{attest, identity};

/// The gRPC status for an identity error.
pub(crate) fn status(e: &identity::Error) -> Status {
    use identity::Error as E;
    match e {
        E::Attest(_) | E::NoMatchingEntry { .. } | E::InstanceEnded | E::Revoked(_) => {
            no_identity(e)
        }
        E::ShuttingDown => Status::unavailable(e.to_string()),
        E::Task(refusal) if refusal.is_rate_limited() => Status::resource_exhausted(e.to_string()),
        E::Task(refusal) if refusal.is_invalid_request() => Status::invalid_argument(e.to_string()),
        E::Task(_) => Status::permission_denied(e.to_string()),
        E::UnknownTask(_) | E::UnknownInstance(_) | E::UnknownEntry(_) | E::UnknownSvid(_) => {
            Status::not_found(e.to_string())
        }
        E::EntryExists(_) => Status::already_exists(e.to_string()),
        E::ConfigEntry(_) | E::SvidNotLive { .. } => Status::failed_precondition(e.to_string()),
        E::Template { .. } | E::Ca(_) | E::Store(_) => {
            Status::internal(format!("cannot issue an SVID: {e}"))
        }
    }
}

/// The status that ends a stream whose instance was revoked: the reason
/// the operator gave, behind the prefix clients match on.
pub(crate) fn revoked(reason: &str) -> Status {
    no_identity(&reason)
}

fn no_identity(why: &dyn std::fmt::Display) -> Status {
    Status::permission_denied(format!("{NO_IDENTITY_ISSUED}: {why}"))
}

/// Logs a refusal once, at a level that fits it: an unmatched process at
/// info with what it was attested as; a task Begin over its rate at debug,
/// since a client that ignores it repeats it at will; shutdown not at all;
/// anything else at warn. A caller refused an identity is counted under its
/// [`refusal_reason`].
pub(crate) fn log_refusal(e: &identity::Error, pid: u32) {
    if let Some(reason) = refusal_reason(e) {
        metrics::global().refusal(reason);
    }
    match e {
        identity::Error::NoMatchingEntry { selectors, .. } => {
            let selectors: Vec<String> = selectors.iter().map(ToString::to_string).collect();
            tracing::info!(pid, selectors = %selectors.join(","), "refused: no entry matches");
        }
        identity::Error::Task(refusal) if refusal.is_rate_limited() => {
            tracing::debug!(pid, error = %e, "refused");
        }
        identity::Error::ShuttingDown => {}
        other => tracing::warn!(pid, error = %other, "refused"),
    }
}

/// Why a caller got no identity, as the metrics count it; `None` for what
/// is not a refused identity (a task refused by policy, an unknown task,
/// shutdown). Exhaustive, so a new error has to be placed.
pub(crate) fn refusal_reason(e: &identity::Error) -> Option<RefusalReason> {
    use identity::Error as E;
    Some(match e {
        E::NoMatchingEntry { .. } => RefusalReason::NoMatchingEntry,
        E::Revoked(_) => RefusalReason::Revoked,
        E::Attest(a) => attest_reason(a),
        E::InstanceEnded | E::Template { .. } | E::Ca(_) | E::Store(_) => RefusalReason::Other,
        E::Task(_)
        | E::UnknownTask(_)
        | E::UnknownInstance(_)
        | E::ShuttingDown
        | E::EntryExists(_)
        | E::UnknownEntry(_)
        | E::ConfigEntry(_)
        | E::UnknownSvid(_)
        | E::SvidNotLive { .. } => return None,
    })
}

fn attest_reason(e: &attest::Error) -> RefusalReason {
    use attest::Error as A;
    match e {
        A::ProcessGone { .. }
        | A::ProcessChanged { .. }
        | A::StartedAfterConnect { .. }
        | A::PidReused { .. } => RefusalReason::ProcessGone,
        A::CredentialsChanged { .. }
        | A::ExecutedAfterConnect { .. }
        | A::ForeignWriter { .. }
        | A::SharedConnection { .. }
        | A::HolderScanTooLong { .. }
        | A::NotPinned { .. }
        | A::NoClientEnd { .. }
        | A::NotHeldByCaller { .. } => RefusalReason::ConnectionCheck,
        A::NoPeerCredentials | A::ProcRead { .. } | A::BootId(_) => RefusalReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::time::Duration;

    use tonic::Code;

    use super::*;
    use crate::ids::Echo;
    use crate::policy::{TaskRefusal, TemplateError};
    use crate::{attest, ca, store};

    fn code_and_message(e: identity::Error) -> (Code, String) {
        let s = status(&e);
        (s.code(), s.message().to_owned())
    }

    #[test]
    fn every_refused_identity_is_permission_denied_with_the_prefix_clients_match() {
        let refusals = [
            identity::Error::Attest(attest::Error::NoPeerCredentials),
            identity::Error::NoMatchingEntry {
                pid: 42,
                selectors: BTreeSet::new(),
            },
            identity::Error::InstanceEnded,
            identity::Error::Revoked("operator said so".into()),
        ];
        for e in refusals {
            let shown = e.to_string();
            let (code, message) = code_and_message(e);
            assert_eq!(code, Code::PermissionDenied, "{shown}");
            assert_eq!(message, format!("no identity issued: {shown}"));
        }
    }

    #[test]
    fn a_revoked_stream_ends_with_the_prefix_and_the_reason() {
        let s = revoked("compromised");
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.message(), "no identity issued: compromised");
    }

    #[test]
    fn shutdown_is_unavailable_so_clients_reconnect() {
        let (code, message) = code_and_message(identity::Error::ShuttingDown);
        assert_eq!(code, Code::Unavailable);
        assert!(!message.contains(NO_IDENTITY_ISSUED), "{message}");
    }

    #[test]
    fn task_refusals_split_into_bad_requests_policy_and_rate() {
        let task = |r: TaskRefusal| code_and_message(identity::Error::Task(r));
        let (code, _) = task(TaskRefusal::BadTaskId(Echo::new("..")));
        assert_eq!(code, Code::InvalidArgument);
        let (code, _) = task(TaskRefusal::DuplicateTask(Echo::new("t1")));
        assert_eq!(code, Code::InvalidArgument);
        let (code, message) = task(TaskRefusal::SelfDeclareOff {
            entry: "bot".into(),
        });
        assert_eq!(code, Code::PermissionDenied);
        assert!(
            !message.contains(NO_IDENTITY_ISSUED),
            "a refused task leaves the instance identity: {message}"
        );
        let (code, message) = task(TaskRefusal::BeginRateExceeded {
            entry: "bot".into(),
            burst: 4,
            every: "250ms".into(),
            retry_in: "1s".into(),
            retry_after: Duration::from_secs(1),
        });
        assert_eq!(code, Code::ResourceExhausted);
        assert!(message.contains("retry in 1s"), "{message}");
    }

    #[test]
    fn unknown_tasks_and_instances_are_not_found() {
        let (code, _) = code_and_message(identity::Error::UnknownTask(Echo::new("t9")));
        assert_eq!(code, Code::NotFound);
        let (code, _) = code_and_message(identity::Error::UnknownInstance("i-1".into()));
        assert_eq!(code, Code::NotFound);
    }

    #[test]
    fn daemon_faults_are_internal_and_say_what_failed() {
        let faults = [
            identity::Error::Template {
                entry: "bot".into(),
                source: TemplateError::Unclosed,
            },
            identity::Error::Ca(ca::Error::Corrupt {
                dir: PathBuf::from("/state/ca"),
                reason: "test".into(),
                source: None,
            }),
            identity::Error::Store(store::Error::Open {
                path: PathBuf::from("/state/sigil.db"),
                message: "disk full".into(),
            }),
        ];
        for e in faults {
            let shown = e.to_string();
            let (code, message) = code_and_message(e);
            assert_eq!(code, Code::Internal, "{shown}");
            assert_eq!(message, format!("cannot issue an SVID: {shown}"));
        }
    }

    #[test]
    fn refused_identities_are_counted_under_a_reason_and_task_refusals_are_not() {
        let reason = |e: identity::Error| refusal_reason(&e);
        let no_entry = identity::Error::NoMatchingEntry {
            pid: 42,
            selectors: BTreeSet::new(),
        };
        assert_eq!(reason(no_entry), Some(RefusalReason::NoMatchingEntry));
        let revoked = identity::Error::Revoked("operator said so".into());
        assert_eq!(reason(revoked), Some(RefusalReason::Revoked));
        let gone = identity::Error::Attest(attest::Error::ProcessGone { pid: 42 });
        assert_eq!(reason(gone), Some(RefusalReason::ProcessGone));
        let moved = identity::Error::Attest(attest::Error::NotHeldByCaller { pid: 42 });
        assert_eq!(reason(moved), Some(RefusalReason::ConnectionCheck));
        let no_cred = identity::Error::Attest(attest::Error::NoPeerCredentials);
        assert_eq!(reason(no_cred), Some(RefusalReason::Other));
        let task = identity::Error::Task(TaskRefusal::BadTaskId(Echo::new("..")));
        assert_eq!(reason(task), None);
        assert_eq!(reason(identity::Error::ShuttingDown), None);
    }
}
