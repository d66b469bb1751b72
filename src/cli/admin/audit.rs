//! `sigil audit [--follow]` and `sigil audit verify`: the audit trail,
//! oldest first, and its hash chain.

use std::io::Write;
use std::process::ExitCode;

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_stream::StreamExt;

use super::render::{self, non_empty, short_id};
use super::{AdminOpts, refused};
use crate::proto::sigil::admin::v1::{
    AuditEvent, ListAuditRequest, VerifyAuditRequest, VerifyAuditResponse,
};

/// The most events the daemon returns per page.
const PAGE: u32 = 1000;

/// `sigil audit`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: Option<AuditCommand>,
    #[command(flatten)]
    list: ListArgs,
}

/// `sigil audit verify`.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain: exit 0 when intact, 1 naming the first bad row.
    Verify(VerifyArgs),
}

/// Filters for reading the trail.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only events since then: a duration ago (10m) or an RFC 3339 time.
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    since: Option<Since>,
    /// Only events of this instance.
    #[arg(long, value_name = "ID")]
    instance: Option<String>,
    /// Only events of this task.
    #[arg(long, value_name = "T")]
    task: Option<String>,
    /// Only events of this kind (attestation, refusal, issuance, rotation,
    /// task_begin, task_end, revocation, instance_end, admin).
    #[arg(long, value_name = "K")]
    kind: Option<String>,
    /// At most this many events (the oldest that match).
    #[arg(long, value_name = "N", conflicts_with = "follow")]
    limit: Option<u32>,
    /// Keep printing new events until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    #[command(flatten)]
    opts: AdminOpts,
}

/// `sigil audit verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    opts: AdminOpts,
}

/// `--since`: a time, or a span before now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    At(OffsetDateTime),
    Ago(std::time::Duration),
}

impl Since {
    fn resolve(self, now: OffsetDateTime) -> OffsetDateTime {
        match self {
            Self::At(t) => t,
            // A span longer than the calendar allows means "everything".
            Self::Ago(d) => time::Duration::try_from(d)
                .ok()
                .and_then(|d| now.checked_sub(d))
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        }
    }
}

/// Parses `--since`: `10m` (humantime) or an RFC 3339 time.
///
/// # Errors
/// When it is neither.
pub fn parse_since(s: &str) -> Result<Since, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(Since::At(t));
    }
    humantime::parse_duration(s)
        .map(Since::Ago)
        .map_err(|_| format!("{s:?} is neither a duration like 10m nor an RFC 3339 time"))
}

/// An audit event in JSON (one object per line).
#[derive(Debug, Serialize)]
pub struct EventJson {
    pub seq: i64,
    pub at: Option<String>,
    pub kind: String,
    pub actor: String,
    pub instance_id: Option<String>,
    pub task_id: Option<String>,
    pub spiffe_id: Option<String>,
    pub serial: Option<String>,
    /// The kind-specific facts, as the daemon wrote them (null when none).
    pub detail: serde_json::Value,
    pub hash: String,
}

impl From<&AuditEvent> for EventJson {
    fn from(e: &AuditEvent) -> Self {
        Self {
            seq: e.seq,
            at: render::rfc3339(e.at.as_ref()),
            kind: e.kind.clone(),
            actor: e.actor.clone(),
            instance_id: non_empty(&e.instance_id),
            task_id: non_empty(&e.task_id),
            spiffe_id: non_empty(&e.spiffe_id),
            serial: non_empty(&e.serial),
            detail: detail(e),
            hash: e.hash.clone(),
        }
    }
}

fn detail(e: &AuditEvent) -> serde_json::Value {
    if e.detail_json.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_str(&e.detail_json)
        .unwrap_or_else(|_| serde_json::Value::String(e.detail_json.clone()))
}

/// The result of `audit verify` in JSON.
#[derive(Debug, Serialize)]
pub struct VerifyJson {
    pub intact: bool,
    pub rows: u64,
    pub head: Option<String>,
    pub first_bad_seq: Option<i64>,
    pub problem: Option<String>,
}

/// Runs `sigil audit [verify]`.
///
/// # Errors
/// When the daemon cannot be reached or refuses, or the follow stream
/// breaks.
pub async fn run(args: AuditArgs, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    if let Some(AuditCommand::Verify(verify)) = args.command {
        let mut client = verify.opts.connect().await?;
        let response = client
            .verify_audit(VerifyAuditRequest {})
            .await
            .map_err(refused)?
            .into_inner();
        return write_verify(out, &response, verify.opts.json);
    }
    let list = args.list;
    let mut request = ListAuditRequest {
        since: list
            .since
            .map(|s| timestamp(s.resolve(OffsetDateTime::now_utc()))),
        instance_id: list.instance.clone().unwrap_or_default(),
        task_id: list.task.clone().unwrap_or_default(),
        kind: list.kind.clone().unwrap_or_default(),
        after_seq: 0,
        limit: 0,
    };
    let mut client = list.opts.connect().await?;
    if list.follow {
        let mut stream = client
            .watch_audit(request)
            .await
            .map_err(refused)?
            .into_inner();
        while let Some(event) = stream.next().await {
            write_event(out, &event.map_err(refused)?, list.opts.json)?;
            out.flush()?;
        }
        anyhow::bail!("the daemon closed the audit stream (did it stop?)");
    }
    let mut remaining = list.limit;
    loop {
        request.limit = remaining.map_or(0, |n| n.min(PAGE));
        if request.limit == 0 && remaining.is_some() {
            break;
        }
        let page = client
            .list_audit(request.clone())
            .await
            .map_err(refused)?
            .into_inner();
        for event in &page.events {
            write_event(out, event, list.opts.json)?;
        }
        if let Some(n) = remaining.as_mut() {
            *n = n.saturating_sub(u32::try_from(page.events.len()).unwrap_or(u32::MAX));
        }
        match page.events.last() {
            Some(last) if page.truncated => request.after_seq = last.seq,
            _ => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

fn write_event(out: &mut impl Write, e: &AuditEvent, json: bool) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, &EventJson::from(e))?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", event_line(e))?;
    }
    Ok(())
}

/// One event for people: time, seq, kind, actor, instance, task, then the
/// detail's facts as key=value.
fn event_line(e: &AuditEvent) -> String {
    let mut fields = vec![
        render::rfc3339_seconds(e.at.as_ref()),
        format!("#{}", e.seq),
        e.kind.clone(),
        format!("actor={}", render::or_dash(&e.actor)),
    ];
    if !e.instance_id.is_empty() {
        fields.push(format!("instance={}", short_id(&e.instance_id)));
    }
    if !e.task_id.is_empty() {
        fields.push(format!("task={}", e.task_id));
    }
    match detail(e) {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let v = match v {
                    serde_json::Value::String(s) if !s.is_empty() && !s.contains(' ') => s,
                    other => other.to_string(),
                };
                fields.push(format!("{k}={v}"));
            }
        }
        serde_json::Value::Null => {}
        other => fields.push(other.to_string()),
    }
    fields.join(" ")
}

fn write_verify(
    out: &mut impl Write,
    r: &VerifyAuditResponse,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if json {
        render::write_json(
            out,
            &VerifyJson {
                intact: r.intact,
                rows: r.rows,
                head: non_empty(&r.head),
                first_bad_seq: (!r.intact).then_some(r.first_bad_seq),
                problem: non_empty(&r.problem),
            },
        )?;
    } else if r.intact {
        writeln!(
            out,
            "intact: {} rows, head {}",
            r.rows,
            render::or_dash(&r.head)
        )?;
    } else {
        writeln!(
            out,
            "broken at seq {}: {} ({} rows checked)",
            r.first_bad_seq,
            render::or_dash(&r.problem),
            r.rows
        )?;
    }
    Ok(if r.intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::admin::render::tests::{now, ts};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: AuditArgs,
    }

    fn sample() -> AuditEvent {
        AuditEvent {
            seq: 42,
            at: ts(1_700_000_000),
            kind: "issuance".into(),
            actor: "daemon".into(),
            instance_id: "0123456789abcdef0123".into(),
            task_id: String::new(),
            spiffe_id: "spiffe://sigil.local/agent/bot/instance/0123".into(),
            serial: "0a1b".into(),
            detail_json: r#"{"entry":"bot","ttl_seconds":3600,"note":"two words"}"#.into(),
            hash: "ab".repeat(32),
        }
    }

    #[test]
    fn since_takes_a_duration_or_an_rfc3339_time() {
        assert_eq!(
            parse_since("10m").unwrap().resolve(now()),
            now() - time::Duration::minutes(10)
        );
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z").unwrap().resolve(now()),
            now()
        );
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn a_span_longer_than_the_calendar_means_everything_not_a_panic() {
        let since = parse_since("20000y").unwrap().resolve(now());
        assert_eq!(since, OffsetDateTime::UNIX_EPOCH);
    }

    #[test]
    fn audit_flags_parse_and_verify_is_a_subcommand() {
        let cli = Cli::try_parse_from(["a", "--kind", "issuance", "--limit", "5"]).unwrap();
        assert_eq!(cli.args.list.limit, Some(5));
        let cli = Cli::try_parse_from(["a", "verify", "--json"]).unwrap();
        assert!(matches!(cli.args.command, Some(AuditCommand::Verify(ref v)) if v.opts.json));
        let e = Cli::try_parse_from(["a", "--follow", "--limit", "5"]).err();
        assert_eq!(e.map(|e| e.exit_code()), Some(2));
    }

    #[test]
    fn an_event_is_one_line_for_people() {
        assert_eq!(
            event_line(&sample()),
            "2023-11-14T22:13:20Z #42 issuance actor=daemon instance=0123456789ab \
             entry=bot note=\"two words\" ttl_seconds=3600"
        );
    }

    #[test]
    fn an_event_in_json_is_one_line_with_these_fields() {
        let mut out = Vec::new();
        write_event(&mut out, &sample(), true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "seq": 42,
                "at": "2023-11-14T22:13:20Z",
                "kind": "issuance",
                "actor": "daemon",
                "instance_id": "0123456789abcdef0123",
                "task_id": null,
                "spiffe_id": "spiffe://sigil.local/agent/bot/instance/0123",
                "serial": "0a1b",
                "detail": {"entry": "bot", "ttl_seconds": 3600, "note": "two words"},
                "hash": "ab".repeat(32),
            })
        );
    }

    #[test]
    fn verify_reports_intact_or_the_first_bad_row() {
        let mut out = Vec::new();
        let intact = VerifyAuditResponse {
            rows: 10,
            intact: true,
            first_bad_seq: 0,
            problem: String::new(),
            head: "ff00".into(),
        };
        assert_eq!(
            write_verify(&mut out, &intact, false).unwrap(),
            ExitCode::SUCCESS
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "intact: 10 rows, head ff00\n"
        );
        let mut out = Vec::new();
        let broken = VerifyAuditResponse {
            rows: 7,
            intact: false,
            first_bad_seq: 7,
            problem: "hash does not match the row".into(),
            head: "ff00".into(),
        };
        assert_eq!(
            write_verify(&mut out, &broken, false).unwrap(),
            ExitCode::FAILURE
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("broken at seq 7: hash does not match the row"),
            "{text}"
        );
    }
}
