//! Task policy: whether and how an instance may run tasks.
//!
//! Pure rules over values, applied before any task exists: who may declare
//! a task, how long it may live, how many may run at once, how fast they may
//! begin, and which ids and attributes are acceptable. Each refusal names the
//! rule, so an agent author can tell which line of the entry to change, and
//! quotes client input only through [`Echo`], so a refusal stays short
//! whatever the client sent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::rate::{BeginRate, TokenBucket};
use crate::ids::{Echo, is_path_segment};

/// Default for `tasks.max_ttl`.
pub const DEFAULT_MAX_TASK_TTL: Duration = Duration::from_secs(60 * 60); // 1 hour
/// Default for `tasks.max_concurrent`.
pub const DEFAULT_MAX_CONCURRENT_TASKS: usize = 16;
/// Longest task id (it becomes a SPIFFE path segment).
pub const MAX_TASK_ID_LEN: usize = 128;
/// Most attributes on one task (they are stored and audited).
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute key, in bytes.
pub const MAX_ATTRIBUTE_KEY: usize = 64;
/// Longest attribute value, in bytes.
pub const MAX_ATTRIBUTE_VALUE: usize = 1024;

/// The `[entry.tasks]` table of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskPolicy {
    /// May the agent start and end its own tasks over the workload socket?
    /// Operators (admin API) may always.
    pub self_declare: bool,
    /// Longest task lifetime.
    pub max_ttl: Duration,
    /// Most live tasks per instance.
    pub max_concurrent: usize,
    /// Glob a task id must match, if set.
    pub id_pattern: Option<glob::Pattern>,
    /// How fast one instance may begin tasks (`tasks.begin_burst`,
    /// `tasks.begin_per_second`).
    pub begin_rate: BeginRate,
}

impl Default for TaskPolicy {
    fn default() -> Self {
        Self {
            self_declare: false,
            max_ttl: DEFAULT_MAX_TASK_TTL,
            max_concurrent: DEFAULT_MAX_CONCURRENT_TASKS,
            id_pattern: None,
            begin_rate: BeginRate::default(),
        }
    }
}

/// Who asks for a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requester {
    /// The attested agent itself, over the workload socket.
    Agent,
    /// An operator or orchestrator, over the admin API.
    Operator,
}

/// Why a task was refused. `InvalidRequest` variants are the caller's input;
/// `Denied` variants are the entry's policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskRefusal {
    /// `tasks.self_declare` is off.
    #[error(
        "entry {entry:?} does not let agents declare their own tasks (tasks.self_declare = false)"
    )]
    SelfDeclareOff {
        /// The entry.
        entry: String,
    },
    /// Too many live tasks.
    #[error(
        "entry {entry:?} allows at most {max} concurrent tasks (tasks.max_concurrent); end one first"
    )]
    TooManyTasks {
        /// The entry.
        entry: String,
        /// The limit.
        max: usize,
    },
    /// The id does not match `tasks.id_pattern`.
    #[error("task id {id} does not match entry {entry:?}'s tasks.id_pattern {pattern:?}")]
    PatternMismatch {
        /// The entry.
        entry: String,
        /// The id asked for.
        id: Echo,
        /// The pattern.
        pattern: String,
    },
    /// The TTL is longer than `tasks.max_ttl`.
    #[error("task ttl {asked} exceeds entry {entry:?}'s tasks.max_ttl {max}")]
    TtlTooLong {
        /// The entry.
        entry: String,
        /// The TTL asked for.
        asked: String,
        /// The limit.
        max: String,
    },
    /// The id is not a SPIFFE path segment.
    #[error(
        "task id {0} is not valid: use 1 to {MAX_TASK_ID_LEN} bytes of letters, digits, '-', '.', '_' (not '.' or '..')"
    )]
    BadTaskId(Echo),
    /// Too many or too large attributes.
    #[error(
        "task attributes: {0} (at most {MAX_ATTRIBUTES} attributes, keys of 1 to {MAX_ATTRIBUTE_KEY} bytes, values up to {MAX_ATTRIBUTE_VALUE} bytes)"
    )]
    BadAttributes(String),
    /// A live task already has this id.
    #[error("task {0} is already running for this instance")]
    DuplicateTask(Echo),
    /// The instance began tasks faster than its entry allows.
    #[error(
        "entry {entry:?} allows {burst} task begins at once and then one every {every} per instance (tasks.begin_burst, tasks.begin_per_second); retry in {retry_in}"
    )]
    BeginRateExceeded {
        /// The entry.
        entry: String,
        /// `tasks.begin_burst`.
        burst: u32,
        /// `1 / tasks.begin_per_second`, for people.
        every: String,
        /// When a Begin would next be allowed, for people.
        retry_in: String,
        /// When a Begin would next be allowed.
        retry_after: Duration,
    },
}

impl TaskRefusal {
    /// True when the refusal is about the request itself (InvalidArgument),
    /// false when the entry's policy forbids it (PermissionDenied).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::TtlTooLong { .. }
                | Self::BadTaskId(_)
                | Self::BadAttributes(_)
                | Self::DuplicateTask(_)
        )
    }

    /// True when the caller should slow down and retry (ResourceExhausted).
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Self::BeginRateExceeded { .. })
    }
}

/// Checks a task id on its own: a SPIFFE path segment of bounded length.
///
/// # Errors
/// [`TaskRefusal::BadTaskId`].
pub fn check_task_id(id: &str) -> Result<(), TaskRefusal> {
    if id.len() <= MAX_TASK_ID_LEN && is_path_segment(id) {
        Ok(())
    } else {
        Err(TaskRefusal::BadTaskId(Echo::new(id)))
    }
}

/// Checks the size of a task's attributes: they go to disk and to the audit
/// log, so an agent must not be able to fill either.
///
/// # Errors
/// [`TaskRefusal::BadAttributes`].
pub fn check_attributes(attributes: &BTreeMap<String, String>) -> Result<(), TaskRefusal> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(TaskRefusal::BadAttributes(format!(
            "{} attributes",
            attributes.len()
        )));
    }
    for (key, value) in attributes {
        if key.is_empty() || key.len() > MAX_ATTRIBUTE_KEY {
            return Err(TaskRefusal::BadAttributes(format!(
                "key of {} bytes",
                key.len()
            )));
        }
        if value.len() > MAX_ATTRIBUTE_VALUE {
            return Err(TaskRefusal::BadAttributes(format!(
                "value of {} has {} bytes",
                Echo::new(key),
                value.len()
            )));
        }
    }
    Ok(())
}

impl TaskPolicy {
    /// Applies every rule about the request itself (who asks, id, TTL,
    /// attributes, live tasks) before anything is stored or audited.
    ///
    /// # Errors
    /// The first rule that refuses it.
    pub fn check(
        &self,
        entry: &str,
        requester: Requester,
        id: &str,
        ttl: Duration,
        attributes: &BTreeMap<String, String>,
        live_tasks: usize,
    ) -> Result<(), TaskRefusal> {
        if requester == Requester::Agent && !self.self_declare {
            return Err(TaskRefusal::SelfDeclareOff {
                entry: entry.to_owned(),
            });
        }
        check_task_id(id)?;
        check_attributes(attributes)?;
        if let Some(pattern) = &self.id_pattern
            && !pattern.matches(id)
        {
            return Err(TaskRefusal::PatternMismatch {
                entry: entry.to_owned(),
                id: Echo::new(id),
                pattern: pattern.as_str().to_owned(),
            });
        }
        if ttl > self.max_ttl {
            return Err(TaskRefusal::TtlTooLong {
                entry: entry.to_owned(),
                asked: humantime::format_duration(ttl).to_string(),
                max: humantime::format_duration(self.max_ttl).to_string(),
            });
        }
        if live_tasks >= self.max_concurrent {
            return Err(TaskRefusal::TooManyTasks {
                entry: entry.to_owned(),
                max: self.max_concurrent,
            });
        }
        Ok(())
    }

    /// Takes one Begin from an instance's `bucket` at `now`, by the entry's
    /// `tasks.begin_burst` and `tasks.begin_per_second`. Call it last, once
    /// every other rule has passed, so only a Begin that will be recorded
    /// costs a token.
    ///
    /// # Errors
    /// [`TaskRefusal::BeginRateExceeded`], saying when to retry.
    pub fn take_begin(
        &self,
        entry: &str,
        bucket: &mut TokenBucket,
        now: Instant,
    ) -> Result<(), TaskRefusal> {
        bucket.try_take(self.begin_rate, now).map_err(|wait| {
            // Whole milliseconds, rounded up: retrying at the time said works.
            let retry_after = Duration::from_millis(
                u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX),
            );
            TaskRefusal::BeginRateExceeded {
                entry: entry.to_owned(),
                burst: self.begin_rate.burst,
                every: humantime::format_duration(self.begin_rate.every).to_string(),
                retry_in: humantime::format_duration(retry_after).to_string(),
                retry_after,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> TaskPolicy {
        TaskPolicy {
            self_declare: true,
            max_ttl: Duration::from_secs(600),
            max_concurrent: 2,
            id_pattern: Some(glob::Pattern::new("ticket-*").unwrap()),
            begin_rate: BeginRate::new(2, 1.0).unwrap(),
        }
    }

    fn no_attributes() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn a_task_within_every_rule_is_allowed() {
        assert_eq!(
            policy().check(
                "bot",
                Requester::Agent,
                "ticket-42",
                TTL,
                &no_attributes(),
                1
            ),
            Ok(())
        );
    }

    #[test]
    fn each_rule_refuses_with_its_own_reason() {
        let off = TaskPolicy {
            self_declare: false,
            ..policy()
        };
        assert!(matches!(
            off.check(
                "bot",
                Requester::Agent,
                "ticket-1",
                TTL,
                &no_attributes(),
                0
            ),
            Err(TaskRefusal::SelfDeclareOff { .. })
        ));
        assert_eq!(
            off.check(
                "bot",
                Requester::Operator,
                "ticket-1",
                TTL,
                &no_attributes(),
                0
            ),
            Ok(())
        );
        let p = policy();
        assert!(matches!(
            p.check("bot", Requester::Agent, "other-1", TTL, &no_attributes(), 0),
            Err(TaskRefusal::PatternMismatch { .. })
        ));
        assert!(matches!(
            p.check(
                "bot",
                Requester::Agent,
                "ticket-1",
                Duration::from_secs(601),
                &no_attributes(),
                0
            ),
            Err(TaskRefusal::TtlTooLong { .. })
        ));
        assert!(matches!(
            p.check(
                "bot",
                Requester::Agent,
                "ticket-1",
                TTL,
                &no_attributes(),
                2
            ),
            Err(TaskRefusal::TooManyTasks { max: 2, .. })
        ));
        assert!(matches!(
            p.check(
                "bot",
                Requester::Agent,
                "ticket/1",
                TTL,
                &no_attributes(),
                0
            ),
            Err(TaskRefusal::BadTaskId(_))
        ));
    }

    #[test]
    fn refusal_messages_name_the_rule() {
        let err = policy()
            .check(
                "bot",
                Requester::Agent,
                "ticket-1",
                TTL,
                &no_attributes(),
                2,
            )
            .unwrap_err();
        assert!(err.to_string().contains("tasks.max_concurrent"), "{err}");
        assert!(!err.is_invalid_request());
        let err = check_task_id("..").unwrap_err();
        assert!(err.is_invalid_request());
    }

    #[test]
    fn attributes_are_bounded_in_number_and_size() {
        let ok: BTreeMap<_, _> = [("ticket".to_owned(), "42".to_owned())].into();
        assert!(check_attributes(&ok).is_ok());
        let many: BTreeMap<_, _> = (0..=MAX_ATTRIBUTES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(check_attributes(&many).is_err());
        let long_value: BTreeMap<_, _> =
            [("k".to_owned(), "v".repeat(MAX_ATTRIBUTE_VALUE + 1))].into();
        assert!(
            check_attributes(&long_value)
                .unwrap_err()
                .is_invalid_request()
        );
        let empty_key: BTreeMap<_, _> = [(String::new(), "v".to_owned())].into();
        assert!(check_attributes(&empty_key).is_err());
    }

    #[test]
    fn task_ids_must_be_short_path_segments() {
        assert!(check_task_id("a-b_c.1").is_ok());
        assert!(check_task_id(&"a".repeat(MAX_TASK_ID_LEN)).is_ok());
        assert!(check_task_id(&"a".repeat(MAX_TASK_ID_LEN + 1)).is_err());
        for bad in ["", ".", "..", "a b", "a/b", "ü"] {
            assert!(check_task_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refusals_quote_client_input_cut_short() {
        let huge = "x".repeat(60_000);
        let refusals = [
            check_task_id(&huge).unwrap_err(),
            policy()
                .check(
                    "bot",
                    Requester::Agent,
                    &"y".repeat(100),
                    TTL,
                    &no_attributes(),
                    0,
                )
                .unwrap_err(),
            check_attributes(&BTreeMap::from([(huge.clone(), String::new())])).unwrap_err(),
            check_attributes(&BTreeMap::from([(huge.clone(), huge.clone())])).unwrap_err(),
            check_attributes(&BTreeMap::from([("k".to_owned(), huge.clone())])).unwrap_err(),
        ];
        for refusal in refusals {
            let message = refusal.to_string();
            assert!(message.len() < 400, "{} bytes: {message}", message.len());
            assert!(message.contains(" bytes"), "{message}");
        }
    }

    #[test]
    fn attributes_are_checked_with_the_request_before_anything_else_happens() {
        let many: BTreeMap<_, _> = (0..=MAX_ATTRIBUTES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        let err = policy()
            .check("bot", Requester::Agent, "ticket-1", TTL, &many, 0)
            .unwrap_err();
        assert!(matches!(err, TaskRefusal::BadAttributes(_)), "{err}");
        assert!(err.is_invalid_request());
        assert!(err.to_string().contains("at most 32 attributes"), "{err}");
        // An operator is held to the same sizes: the rows are the same.
        assert!(
            policy()
                .check("bot", Requester::Operator, "ticket-1", TTL, &many, 0)
                .is_err()
        );
    }

    #[test]
    fn begins_beyond_the_burst_are_refused_with_the_rule_and_the_wait() {
        let p = policy();
        let mut bucket = TokenBucket::default();
        let t0 = Instant::now();
        assert_eq!(p.take_begin("bot", &mut bucket, t0), Ok(()));
        assert_eq!(p.take_begin("bot", &mut bucket, t0), Ok(()));
        let err = p.take_begin("bot", &mut bucket, t0).unwrap_err();
        assert!(err.is_rate_limited());
        assert!(!err.is_invalid_request());
        let message = err.to_string();
        for part in [
            "\"bot\"",
            "tasks.begin_burst",
            "tasks.begin_per_second",
            "retry in 1s",
        ] {
            assert!(message.contains(part), "{part:?} not in {message}");
        }
        let later = t0 + Duration::from_micros(999_999);
        match p.take_begin("bot", &mut bucket, later).unwrap_err() {
            TaskRefusal::BeginRateExceeded { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_millis(1));
            }
            other => panic!("{other}"),
        }
        assert_eq!(
            p.take_begin("bot", &mut bucket, t0 + Duration::from_secs(1)),
            Ok(())
        );
    }
}
