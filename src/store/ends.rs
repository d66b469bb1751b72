//! Why instances and tasks end, as types: each reason is stored as a kind
//! in its own column (`end_kind`) plus its detail (`end_reason`: who
//! revoked, why it stopped matching), and read back into the same value.
//! The one rule that depends on it: an instance that ended
//! [`EndReason::Revoked`] stays refused for the life of its process.

use std::fmt;

use rusqlite::types::Type;

/// Why an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// Its process exited.
    Exited,
    /// Its process executed another program (which is another instance).
    ExecutedAnotherProgram,
    /// An operator revoked it. Sticky: the same process is refused an
    /// identity for as long as it runs.
    Revoked {
        /// Who revoked it.
        by: String,
    },
    /// Its process no longer matches its registration entries.
    NoLongerMatches {
        /// What changed, for people.
        why: String,
    },
    /// Its process was gone when the daemon started again.
    GoneAcrossRestart,
}

impl EndReason {
    /// Whether the same process must stay refused after this end.
    pub fn is_sticky(&self) -> bool {
        matches!(self, EndReason::Revoked { .. })
    }

    /// The stored kind (the `end_kind` column).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            EndReason::Exited => "exited",
            EndReason::ExecutedAnotherProgram => "executed",
            EndReason::Revoked { .. } => "revoked",
            EndReason::NoLongerMatches { .. } => "no_longer_matches",
            EndReason::GoneAcrossRestart => "gone_across_restart",
        }
    }

    /// The stored detail (the `end_reason` column).
    pub(crate) fn detail(&self) -> String {
        match self {
            EndReason::Revoked { by } => by.clone(),
            EndReason::NoLongerMatches { why } => why.clone(),
            other => other.to_string(),
        }
    }

    /// Reads a stored (kind, detail) pair back.
    pub(crate) fn from_columns(kind: &str, detail: String) -> Option<Self> {
        Some(match kind {
            "exited" => EndReason::Exited,
            "executed" => EndReason::ExecutedAnotherProgram,
            "revoked" => EndReason::Revoked { by: detail },
            "no_longer_matches" => EndReason::NoLongerMatches { why: detail },
            "gone_across_restart" => EndReason::GoneAcrossRestart,
            _ => return None,
        })
    }
}

impl EndReason {
    /// Classifies the free text a version-1 store kept (fixed phrases), as
    /// the version-2 migration does: anything unknown is not a revocation.
    fn from_legacy_text(text: &str) -> Self {
        if let Some(by) = text.strip_prefix("revoked by ") {
            EndReason::Revoked { by: by.to_owned() }
        } else if text == "the process executed another program" {
            EndReason::ExecutedAnotherProgram
        } else if text == "process gone across a restart" {
            EndReason::GoneAcrossRestart
        } else if text.ends_with("any more") || text.starts_with("no longer matches") {
            EndReason::NoLongerMatches {
                why: text.to_owned(),
            }
        } else {
            EndReason::Exited
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::Exited => f.write_str("process exited"),
            EndReason::ExecutedAnotherProgram => {
                f.write_str("the process executed another program")
            }
            EndReason::Revoked { by } => write!(f, "revoked by {by}"),
            EndReason::NoLongerMatches { why } => write!(f, "no longer matches its entries: {why}"),
            EndReason::GoneAcrossRestart => f.write_str("process gone across a restart"),
        }
    }
}

/// Why a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEndReason {
    /// Its caller (the agent, or an operator) ended it.
    Requested {
        /// Who asked.
        by: String,
    },
    /// Its TTL ran out.
    TtlExpired,
    /// Its TTL ran out while the daemon was not running.
    ExpiredWhileAway,
    /// Its SVID could not be minted, so it never started.
    NotIssued,
    /// Its instance ended.
    InstanceEnded(EndReason),
}

impl TaskEndReason {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            TaskEndReason::Requested { .. } => "requested",
            TaskEndReason::TtlExpired => "ttl_expired",
            TaskEndReason::ExpiredWhileAway => "expired_while_away",
            TaskEndReason::NotIssued => "not_issued",
            TaskEndReason::InstanceEnded(_) => "instance_ended",
        }
    }

    pub(crate) fn detail(&self) -> String {
        match self {
            TaskEndReason::Requested { by } => by.clone(),
            TaskEndReason::InstanceEnded(reason) => {
                format!("{}:{}", reason.kind(), reason.detail())
            }
            other => other.to_string(),
        }
    }

    pub(crate) fn from_columns(kind: &str, detail: String) -> Option<Self> {
        Some(match kind {
            "requested" => TaskEndReason::Requested { by: detail },
            "ttl_expired" => TaskEndReason::TtlExpired,
            "expired_while_away" => TaskEndReason::ExpiredWhileAway,
            "not_issued" => TaskEndReason::NotIssued,
            "instance_ended" => TaskEndReason::InstanceEnded(
                detail
                    .split_once(':')
                    .and_then(|(kind, rest)| EndReason::from_columns(kind, rest.to_owned()))
                    .unwrap_or_else(|| EndReason::from_legacy_text(&detail)),
            ),
            _ => return None,
        })
    }
}

impl fmt::Display for TaskEndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskEndReason::Requested { by } => write!(f, "ended by request of {by}"),
            TaskEndReason::TtlExpired => f.write_str("ttl expired"),
            TaskEndReason::ExpiredWhileAway => f.write_str("expired while the daemon was away"),
            TaskEndReason::NotIssued => f.write_str("could not issue its SVID"),
            TaskEndReason::InstanceEnded(reason) => write!(f, "its instance ended: {reason}"),
        }
    }
}

/// Reads an optional (kind, detail) pair of columns with `parse`.
pub(crate) fn end_columns<T>(
    row: &rusqlite::Row<'_>,
    kind_idx: usize,
    detail_idx: usize,
    parse: fn(&str, String) -> Option<T>,
) -> rusqlite::Result<Option<T>> {
    let kind: Option<String> = row.get(kind_idx)?;
    let Some(kind) = kind else {
        return Ok(None);
    };
    let detail: Option<String> = row.get(detail_idx)?;
    parse(&kind, detail.unwrap_or_default())
        .map(Some)
        .ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                kind_idx,
                Type::Text,
                format!("unknown end kind {kind:?}").into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_instance_end_reads_back_as_itself() {
        for reason in [
            EndReason::Exited,
            EndReason::ExecutedAnotherProgram,
            EndReason::Revoked {
                by: "admin uid:0".to_owned(),
            },
            EndReason::NoLongerMatches {
                why: "uid changed".to_owned(),
            },
            EndReason::GoneAcrossRestart,
        ] {
            let back = EndReason::from_columns(reason.kind(), reason.detail());
            assert_eq!(back.as_ref(), Some(&reason));
        }
    }

    #[test]
    fn only_a_revocation_is_sticky() {
        assert!(EndReason::Revoked { by: "x".into() }.is_sticky());
        assert!(!EndReason::Exited.is_sticky());
        assert!(!EndReason::NoLongerMatches { why: "x".into() }.is_sticky());
        assert!(!EndReason::GoneAcrossRestart.is_sticky());
    }

    #[test]
    fn task_ends_read_back_as_themselves() {
        for reason in [
            TaskEndReason::Requested {
                by: "pid:1 uid:2".to_owned(),
            },
            TaskEndReason::TtlExpired,
            TaskEndReason::ExpiredWhileAway,
            TaskEndReason::NotIssued,
            TaskEndReason::InstanceEnded(EndReason::Revoked {
                by: "admin uid:0".to_owned(),
            }),
            TaskEndReason::InstanceEnded(EndReason::NoLongerMatches {
                why: "a: b".to_owned(),
            }),
        ] {
            let back = TaskEndReason::from_columns(reason.kind(), reason.detail());
            assert_eq!(back.as_ref(), Some(&reason));
        }
    }

    #[test]
    fn a_task_ended_with_its_instance_by_a_version_1_store_keeps_a_revocation() {
        let legacy = TaskEndReason::from_columns("instance_ended", "revoked by admin".to_owned());
        assert_eq!(
            legacy,
            Some(TaskEndReason::InstanceEnded(EndReason::Revoked {
                by: "admin".to_owned()
            }))
        );
    }

    #[test]
    fn an_unknown_kind_is_not_read_as_some_other_end() {
        assert_eq!(
            EndReason::from_columns("revoked_maybe", String::new()),
            None
        );
        assert_eq!(TaskEndReason::from_columns("", String::new()), None);
    }
}
