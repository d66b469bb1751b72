//! Conversions between the admin API's protobuf messages and Sigil's
//! records; nothing here decides anything.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::Status;

use crate::config::{EntrySpec, TaskSpec};
use crate::identity::{EntryDef, EntrySource, IdentitySet, TaskInfo};
use crate::ids::InstanceId;
use crate::proto::sigil::admin::v1 as pb;
use crate::store::{AuditEvent, InstanceRecord, SvidRecord, TaskRecord};

/// A time as a protobuf Timestamp (the one conversion, shared with the
/// task service).
pub(super) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    crate::workload_api::task::timestamp(t)
}

/// A time the daemon holds in memory (a live SVID's validity, a task just
/// begun or ended, an entry just created) as the store keeps it, to the
/// millisecond, so one fact has one time whichever call reports it and
/// after a restart.
pub(super) fn stored_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let mut ts = timestamp(t);
    ts.nanos -= ts.nanos % 1_000_000;
    ts
}

/// A protobuf Timestamp as a time (one before 1970 is taken as 1970).
pub(super) fn system_time(t: &prost_types::Timestamp) -> SystemTime {
    let secs = u64::try_from(t.seconds).unwrap_or(0);
    let nanos = u32::try_from(t.nanos).unwrap_or(0).min(999_999_999);
    SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
}

fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn selector(text: &str) -> pb::Selector {
    let mut parts = text.splitn(3, ':');
    pb::Selector {
        r#type: parts.next().unwrap_or_default().to_owned(),
        key: parts.next().unwrap_or_default().to_owned(),
        value: parts.next().unwrap_or_default().to_owned(),
    }
}

/// An instance as the store has it, with what its actor serves now when
/// it is live.
pub(super) fn instance(r: &InstanceRecord, live: Option<&IdentitySet>) -> pb::Instance {
    let exe = r
        .selectors
        .iter()
        .find_map(|s| s.strip_prefix("unix:path:"))
        .unwrap_or_default()
        .to_owned();
    let (entries, owners, svids) = match live {
        Some(set) => (
            set.entries.iter().map(|e| e.name.clone()).collect(),
            set.entries
                .iter()
                .map(|e| e.owner.clone().unwrap_or_default())
                .collect(),
            set.svids
                .iter()
                .map(|s| pb::Svid {
                    serial: s.serial.clone(),
                    spiffe_id: s.spiffe_id.to_string(),
                    hint: s.hint.clone(),
                    not_before: Some(stored_timestamp(s.not_before)),
                    not_after: Some(stored_timestamp(s.not_after)),
                    revoked_at: None,
                    revoke_reason: String::new(),
                    instance_id: r.instance_id.clone(),
                    task_id: s.hint.strip_prefix("task:").unwrap_or_default().to_owned(),
                })
                .collect(),
        ),
        None => (r.entries.clone(), Vec::new(), Vec::new()),
    };
    pb::Instance {
        instance_id: r.instance_id.clone(),
        pid: r.pid,
        uid: r.uid,
        entries,
        owners,
        svids,
        selectors: r.selectors.iter().map(|s| selector(s)).collect(),
        parent_instance_id: String::new(),
        tasks: Vec::new(),
        started_at: Some(timestamp(r.first_seen)),
        last_seen: Some(timestamp(r.last_seen)),
        ended_at: r.ended_at.map(timestamp),
        end_kind: r
            .end_reason
            .as_ref()
            .map(|e| e.kind().to_owned())
            .unwrap_or_default(),
        end_reason: r
            .end_reason
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        exe,
    }
}

pub(super) fn svid_record(s: &SvidRecord) -> pb::Svid {
    pb::Svid {
        serial: s.serial.clone(),
        spiffe_id: s.spiffe_id.clone(),
        hint: s
            .task_id
            .as_ref()
            .map_or_else(|| "instance".to_owned(), |t| format!("task:{t}")),
        not_before: Some(timestamp(s.not_before)),
        not_after: Some(timestamp(s.not_after)),
        revoked_at: s.revoked_at.map(timestamp),
        revoke_reason: s.revoke_reason.clone().unwrap_or_default(),
        instance_id: s.instance_id.clone(),
        task_id: s.task_id.clone().unwrap_or_default(),
    }
}

pub(super) fn task_record(t: &TaskRecord) -> pb::Task {
    pb::Task {
        instance_id: t.instance_id.clone(),
        task_id: t.task_id.clone(),
        spiffe_id: t.spiffe_id.clone(),
        started_at: Some(timestamp(t.started_at)),
        expires_at: Some(timestamp(t.expires_at)),
        attributes: t.attributes.clone().into_iter().collect(),
        started_by: t.started_by.clone(),
    }
}

pub(super) fn task_info(instance: &InstanceId, t: &TaskInfo, started_by: &str) -> pb::Task {
    pb::Task {
        instance_id: instance.to_string(),
        task_id: t.task_id.clone(),
        spiffe_id: t.spiffe_id.to_string(),
        started_at: Some(stored_timestamp(t.started_at)),
        expires_at: Some(stored_timestamp(t.expires_at)),
        attributes: t.attributes.clone().into_iter().collect(),
        started_by: started_by.to_owned(),
    }
}

/// An entry in force, with how many live instances hold one of its SVIDs.
pub(super) fn entry(def: &EntryDef, live: &[Arc<IdentitySet>]) -> pb::Entry {
    let e = &def.entry;
    let holders = live
        .iter()
        .filter(|set| set.entries.iter().any(|x| x.name == e.name))
        .count();
    let (source, created_at, created_by) = match &def.source {
        EntrySource::Config => ("config", None, String::new()),
        EntrySource::Stored {
            created_at,
            created_by,
        } => (
            "stored",
            Some(stored_timestamp(*created_at)),
            created_by.clone(),
        ),
    };
    pb::Entry {
        name: e.name.clone(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        spiffe_id: e.spiffe_id.to_string(),
        ttl: e.ttl.map(pb_duration),
        dns_names: e.dns_names.clone(),
        tasks: Some(pb::TaskPolicy {
            self_declare: e.tasks.self_declare,
            max_ttl: Some(pb_duration(e.tasks.max_ttl)),
            max_concurrent: u32::try_from(e.tasks.max_concurrent).unwrap_or(u32::MAX),
            id_pattern: e
                .tasks
                .id_pattern
                .as_ref()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            begin_burst: e.tasks.begin_rate.burst,
            begin_per_second: 1.0 / e.tasks.begin_rate.every.as_secs_f64(),
        }),
        owner: e.owner.clone().unwrap_or_default(),
        source: source.to_owned(),
        created_at,
        created_by,
        live_instances: u32::try_from(holders).unwrap_or(u32::MAX),
    }
}

fn duration_text(d: &prost_types::Duration, field: &str) -> Result<String, Status> {
    let d = crate::workload_api::task::duration(d)
        .map_err(|e| Status::invalid_argument(format!("{field}: {}", e.message())))?;
    Ok(humantime::format_duration(d).to_string())
}

/// A requested entry as the spec the config module validates (the same
/// text a `[[entry]]` table would hold).
pub(super) fn entry_spec(e: &pb::Entry) -> Result<EntrySpec, Status> {
    let tasks = match &e.tasks {
        None => None,
        Some(t) => Some(TaskSpec {
            self_declare: t.self_declare,
            max_ttl: t
                .max_ttl
                .as_ref()
                .map(|d| duration_text(d, "tasks.max_ttl"))
                .transpose()?,
            max_concurrent: (t.max_concurrent > 0).then_some(t.max_concurrent),
            id_pattern: Some(t.id_pattern.clone()).filter(|p| !p.is_empty()),
            begin_burst: (t.begin_burst > 0).then_some(t.begin_burst),
            begin_per_second: (t.begin_per_second != 0.0).then_some(t.begin_per_second),
        }),
    };
    Ok(EntrySpec {
        name: e.name.clone(),
        selectors: e.selectors.clone(),
        spiffe_id: Some(e.spiffe_id.clone()).filter(|s| !s.is_empty()),
        ttl: e
            .ttl
            .as_ref()
            .map(|d| duration_text(d, "ttl"))
            .transpose()?,
        dns_names: e.dns_names.clone(),
        tasks,
        owner: Some(e.owner.clone()).filter(|o| !o.is_empty()),
    })
}

pub(super) fn audit_event(ev: &AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        seq: ev.seq,
        at: Some(timestamp(ev.at)),
        kind: ev.kind.to_string(),
        actor: ev.actor.clone(),
        instance_id: ev.instance_id.clone().unwrap_or_default(),
        task_id: ev.task_id.clone().unwrap_or_default(),
        spiffe_id: ev.spiffe_id.clone().unwrap_or_default(),
        serial: ev.serial.clone().unwrap_or_default(),
        detail_json: ev.detail.to_string(),
        hash: ev.hash.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selector_value_may_hold_colons() {
        let s = selector("unix:path:/opt/a:b");
        assert_eq!((s.r#type.as_str(), s.key.as_str()), ("unix", "path"));
        assert_eq!(s.value, "/opt/a:b");
    }

    #[test]
    fn times_held_in_memory_are_reported_as_the_store_keeps_them() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let ts = stored_timestamp(t);
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_000_000));
    }

    #[test]
    fn timestamps_round_trip_to_the_nanosecond() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123);
        assert_eq!(system_time(&timestamp(t)), t);
    }
}
