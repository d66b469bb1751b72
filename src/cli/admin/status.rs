//! `sigil status`: the daemon at a glance.

use std::io::Write;
use std::process::ExitCode;

use serde::Serialize;
use time::OffsetDateTime;

use super::render::{self, non_empty, or_dash};
use super::{AdminOpts, refused};
use crate::proto::sigil::admin::v1::{StatusRequest, StatusResponse};

/// `sigil status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    opts: AdminOpts,
}

/// The status in JSON.
#[derive(Debug, Serialize)]
pub struct StatusJson {
    pub version: String,
    pub started_at: Option<String>,
    pub uptime_seconds: Option<u64>,
    pub trust_domain: String,
    pub ca_not_after: Option<String>,
    pub live_instances: u64,
    pub live_tasks: u64,
    pub live_svids: u64,
    pub crl_number: u64,
    pub crl_entries: u64,
    pub crl_bytes: u64,
    pub last_rotation: Option<String>,
    pub store_bytes: u64,
    pub workload_socket: Option<String>,
    pub admin_socket: Option<String>,
    pub config_source: Option<String>,
    pub entries: u64,
}

impl StatusJson {
    fn new(s: &StatusResponse, now: OffsetDateTime) -> Self {
        Self {
            version: s.version.clone(),
            started_at: render::rfc3339(s.started_at.as_ref()),
            uptime_seconds: uptime(s, now).map(|d| d.as_secs()),
            trust_domain: s.trust_domain.clone(),
            ca_not_after: render::rfc3339(s.ca_not_after.as_ref()),
            live_instances: s.live_instances,
            live_tasks: s.live_tasks,
            live_svids: s.live_svids,
            crl_number: s.crl_number,
            crl_entries: s.crl_entries,
            crl_bytes: s.crl_bytes,
            last_rotation: render::rfc3339(s.last_rotation.as_ref()),
            store_bytes: s.store_bytes,
            workload_socket: non_empty(&s.workload_socket),
            admin_socket: non_empty(&s.admin_socket),
            config_source: non_empty(&s.config_source),
            entries: s.entries,
        }
    }
}

fn uptime(s: &StatusResponse, now: OffsetDateTime) -> Option<std::time::Duration> {
    let started = render::time_of(s.started_at.as_ref())?;
    let secs = u64::try_from((now - started).whole_seconds()).unwrap_or(0);
    Some(std::time::Duration::from_secs(secs))
}

/// Runs `sigil status`.
///
/// # Errors
/// When the daemon cannot be reached or refuses.
pub async fn run(args: StatusArgs, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let mut client = args.opts.connect().await?;
    let status = client
        .status(StatusRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    let now = OffsetDateTime::now_utc();
    if args.opts.json {
        render::write_json(out, &StatusJson::new(&status, now))?;
    } else {
        render::write_table(out, &table(&status, now))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The status as key/value rows.
fn table(s: &StatusResponse, now: OffsetDateTime) -> comfy_table::Table {
    let when = |ts: Option<&prost_types::Timestamp>, unset: &str| match render::time_of(ts) {
        Some(_) => format!(
            "{} ({})",
            render::rfc3339_seconds(ts),
            render::relative_or_dash(ts, now)
        ),
        None => unset.to_owned(),
    };
    let uptime = uptime(s, now).map_or_else(
        || "-".to_owned(),
        |d| humantime::format_duration(d).to_string(),
    );
    render::key_values([
        ("version", or_dash(&s.version)),
        ("uptime", uptime),
        ("trust domain", or_dash(&s.trust_domain)),
        ("CA expires", when(s.ca_not_after.as_ref(), "-")),
        ("live instances", s.live_instances.to_string()),
        ("live tasks", s.live_tasks.to_string()),
        ("live SVIDs", s.live_svids.to_string()),
        ("CRL number", s.crl_number.to_string()),
        (
            "CRL",
            format!("{} entries, {}", s.crl_entries, render::bytes(s.crl_bytes)),
        ),
        ("last rotation", when(s.last_rotation.as_ref(), "none yet")),
        ("store size", render::bytes(s.store_bytes)),
        ("workload socket", or_dash(&s.workload_socket)),
        ("admin socket", or_dash(&s.admin_socket)),
        ("config source", or_dash(&s.config_source)),
        ("entries", s.entries.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::admin::render::tests::{now, ts};

    fn sample() -> StatusResponse {
        StatusResponse {
            version: "0.1.0".into(),
            started_at: ts(1_700_000_000 - 3600),
            trust_domain: "sigil.local".into(),
            ca_not_after: ts(1_700_000_000 + 30 * 86_400),
            live_instances: 3,
            live_tasks: 1,
            live_svids: 4,
            crl_number: 9,
            crl_entries: 2,
            crl_bytes: 600,
            last_rotation: None,
            store_bytes: 2 * 1024 * 1024,
            workload_socket: "/run/sigil/workload.sock".into(),
            admin_socket: "/run/sigil/admin.sock".into(),
            config_source: "/etc/sigil/sigil.toml".into(),
            entries: 2,
        }
    }

    #[test]
    fn status_is_a_key_value_table() {
        let text = table(&sample(), now()).trim_fmt();
        let keys: Vec<_> = text
            .lines()
            .map(|l| l.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(
            keys,
            [
                "version",
                "uptime",
                "trust domain",
                "CA expires",
                "live instances",
                "live tasks",
                "live SVIDs",
                "CRL number",
                "CRL",
                "last rotation",
                "store size",
                "workload socket",
                "admin socket",
                "config source",
                "entries",
            ]
        );
        assert!(text.contains("1h"), "{text}");
        assert!(text.contains("(in 30d)"), "{text}");
        assert!(text.contains("none yet"), "{text}");
        assert!(text.contains("2 entries, 600 B"), "{text}");
    }

    #[test]
    fn status_in_json_has_these_fields() {
        let json = serde_json::to_value(StatusJson::new(&sample(), now())).unwrap();
        let keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        let mut expected = [
            "version",
            "started_at",
            "uptime_seconds",
            "trust_domain",
            "ca_not_after",
            "live_instances",
            "live_tasks",
            "live_svids",
            "crl_number",
            "crl_entries",
            "crl_bytes",
            "last_rotation",
            "store_bytes",
            "workload_socket",
            "admin_socket",
            "config_source",
            "entries",
        ];
        expected.sort_unstable();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, expected);
        assert_eq!(json["uptime_seconds"], 3600);
        assert_eq!(json["last_rotation"], serde_json::Value::Null);
    }
}
