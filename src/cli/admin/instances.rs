//! `sigil instances [--tree]` and `sigil instances show`: attested
//! instances, their SVIDs and tasks.

use std::io::Write;
use std::process::ExitCode;

use serde::Serialize;
use time::OffsetDateTime;

use super::render::{self, non_empty, or_dash, short_id};
use super::tasks::{self, TaskJson};
use super::tree::tree_order;
use super::{AdminOpts, refused};
use crate::proto::sigil::admin::v1::{
    GetInstanceRequest, Instance, ListInstancesRequest, Svid, get_instance_request,
};

/// `sigil instances`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct InstancesArgs {
    #[command(subcommand)]
    command: Option<InstancesCommand>,
    #[command(flatten)]
    list: ListArgs,
}

/// `sigil instances show`.
#[derive(Debug, clap::Subcommand)]
pub enum InstancesCommand {
    /// Every fact about one instance, its SVIDs and its tasks.
    Show(ShowArgs),
}

/// Filters for the list.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only instances holding an SVID of this entry.
    #[arg(long, value_name = "E")]
    entry: Option<String>,
    /// Only instances of this uid.
    #[arg(long, value_name = "U")]
    uid: Option<u32>,
    /// Ended instances too (the newest 1000).
    #[arg(long)]
    all: bool,
    /// Draw instances under their parent instance.
    #[arg(long)]
    tree: bool,
    #[command(flatten)]
    opts: AdminOpts,
}

/// `sigil instances show ID | --pid PID`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The instance id.
    #[arg(required_unless_present = "pid", conflicts_with = "pid")]
    id: Option<String>,
    /// The live instance of this process.
    #[arg(long)]
    pid: Option<u32>,
    #[command(flatten)]
    opts: AdminOpts,
}

/// An SVID in JSON.
#[derive(Debug, Serialize)]
pub struct SvidJson {
    pub serial: String,
    pub spiffe_id: String,
    pub hint: String,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub revoked_at: Option<String>,
    pub revoke_reason: Option<String>,
    pub instance_id: String,
    pub task_id: Option<String>,
}

impl From<&Svid> for SvidJson {
    fn from(s: &Svid) -> Self {
        Self {
            serial: s.serial.clone(),
            spiffe_id: s.spiffe_id.clone(),
            hint: s.hint.clone(),
            not_before: render::rfc3339(s.not_before.as_ref()),
            not_after: render::rfc3339(s.not_after.as_ref()),
            revoked_at: render::rfc3339(s.revoked_at.as_ref()),
            revoke_reason: non_empty(&s.revoke_reason),
            instance_id: s.instance_id.clone(),
            task_id: non_empty(&s.task_id),
        }
    }
}

/// An instance in JSON.
#[derive(Debug, Serialize)]
pub struct InstanceJson {
    pub instance_id: String,
    pub pid: u32,
    pub uid: u32,
    pub exe: String,
    /// "live" or "ended".
    pub state: &'static str,
    pub entries: Vec<String>,
    pub owners: Vec<String>,
    /// "type:key:value".
    pub selectors: Vec<String>,
    pub parent_instance_id: Option<String>,
    pub svids: Vec<SvidJson>,
    pub tasks: Vec<TaskJson>,
    pub started_at: Option<String>,
    pub last_seen: Option<String>,
    pub ended_at: Option<String>,
    pub end_kind: Option<String>,
    pub end_reason: Option<String>,
}

impl From<&Instance> for InstanceJson {
    fn from(i: &Instance) -> Self {
        Self {
            instance_id: i.instance_id.clone(),
            pid: i.pid,
            uid: i.uid,
            exe: i.exe.clone(),
            state: state(i),
            entries: i.entries.clone(),
            owners: i.owners.clone(),
            selectors: selectors(i),
            parent_instance_id: non_empty(&i.parent_instance_id),
            svids: i.svids.iter().map(SvidJson::from).collect(),
            tasks: i.tasks.iter().map(TaskJson::from).collect(),
            started_at: render::rfc3339(i.started_at.as_ref()),
            last_seen: render::rfc3339(i.last_seen.as_ref()),
            ended_at: render::rfc3339(i.ended_at.as_ref()),
            end_kind: non_empty(&i.end_kind),
            end_reason: non_empty(&i.end_reason),
        }
    }
}

fn state(i: &Instance) -> &'static str {
    if render::time_of(i.ended_at.as_ref()).is_some() {
        "ended"
    } else {
        "live"
    }
}

fn selectors(i: &Instance) -> Vec<String> {
    i.selectors
        .iter()
        .map(|s| format!("{}:{}:{}", s.r#type, s.key, s.value))
        .collect()
}

/// Runs `sigil instances [show]`.
///
/// # Errors
/// When the daemon cannot be reached or refuses.
pub async fn run(args: InstancesArgs, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let now = OffsetDateTime::now_utc();
    if let Some(InstancesCommand::Show(show)) = args.command {
        let selector = match (show.id, show.pid) {
            (Some(id), _) => get_instance_request::Selector::InstanceId(id),
            (None, Some(pid)) => get_instance_request::Selector::Pid(pid),
            (None, None) => anyhow::bail!("give an instance ID or --pid PID"),
        };
        let mut client = show.opts.connect().await?;
        let instance = client
            .get_instance(GetInstanceRequest {
                selector: Some(selector),
            })
            .await
            .map_err(refused)?
            .into_inner();
        if show.opts.json {
            render::write_json(out, &InstanceJson::from(&instance))?;
        } else {
            write_details(out, &instance, now)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let list = args.list;
    let mut client = list.opts.connect().await?;
    let instances = client
        .list_instances(ListInstancesRequest {
            entry: list.entry.unwrap_or_default(),
            uid: list.uid,
            include_ended: list.all,
        })
        .await
        .map_err(refused)?
        .into_inner()
        .instances;
    if list.opts.json {
        let json: Vec<InstanceJson> = instances.iter().map(InstanceJson::from).collect();
        render::write_json(out, &json)?;
    } else {
        let order = if list.tree {
            tree_order(&instances)
        } else {
            (0..instances.len()).map(|i| (i, String::new())).collect()
        };
        render::write_table(out, &table(&instances, &order, list.all, now))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The instances table, rows in `order` with each id after its prefix.
fn table(
    instances: &[Instance],
    order: &[(usize, String)],
    all: bool,
    now: OffsetDateTime,
) -> comfy_table::Table {
    let mut header = vec![
        "INSTANCE",
        "PID",
        "UID",
        "ENTRY",
        "SPIFFE ID",
        "TASKS",
        "EXPIRES",
        "STARTED",
    ];
    if all {
        header.extend(["STATE", "ENDED"]);
    }
    let mut table = render::table(&header);
    for (index, prefix) in order {
        let i = &instances[*index];
        let first = i.svids.first();
        let mut row = vec![
            format!("{prefix}{}", short_id(&i.instance_id)),
            i.pid.to_string(),
            i.uid.to_string(),
            or_dash(&i.entries.join(",")),
            or_dash(first.map_or("", |s| s.spiffe_id.as_str())),
            i.tasks.len().to_string(),
            render::relative_or_dash(first.and_then(|s| s.not_after.as_ref()), now),
            render::relative_or_dash(i.started_at.as_ref(), now),
        ];
        if all {
            let state = match state(i) {
                "ended" if !i.end_kind.is_empty() => i.end_kind.clone(),
                s => s.to_owned(),
            };
            row.push(state);
            row.push(render::relative_or_dash(i.ended_at.as_ref(), now));
        }
        table.add_row(row);
    }
    table
}

/// `instances show`: key/value lines, then the SVIDs and tasks tables.
fn write_details(out: &mut impl Write, i: &Instance, now: OffsetDateTime) -> anyhow::Result<()> {
    let when = |ts: Option<&prost_types::Timestamp>| match render::time_of(ts) {
        Some(_) => format!(
            "{} ({})",
            render::rfc3339_seconds(ts),
            render::relative_or_dash(ts, now)
        ),
        None => "-".to_owned(),
    };
    let rows = [
        ("instance", i.instance_id.clone()),
        ("state", state(i).to_owned()),
        ("pid", i.pid.to_string()),
        ("uid", i.uid.to_string()),
        ("exe", or_dash(&i.exe)),
        ("entries", or_dash(&i.entries.join(", "))),
        ("owners", or_dash(&i.owners.join(", "))),
        ("parent", or_dash(&i.parent_instance_id)),
        ("selectors", or_dash(&selectors(i).join(", "))),
        ("started", when(i.started_at.as_ref())),
        ("last seen", when(i.last_seen.as_ref())),
        ("ended", when(i.ended_at.as_ref())),
        ("end kind", or_dash(&i.end_kind)),
        ("end reason", or_dash(&i.end_reason)),
    ];
    render::write_table(out, &render::key_values(rows))?;
    writeln!(out)?;
    render::write_table(out, &svid_table(&i.svids, now))?;
    writeln!(out)?;
    render::write_table(out, &tasks::table(&i.tasks, now))?;
    Ok(())
}

/// An instance's SVIDs: SERIAL, HINT, SPIFFE ID, EXPIRES.
fn svid_table(svids: &[Svid], now: OffsetDateTime) -> comfy_table::Table {
    let mut table = render::table(&["SERIAL", "HINT", "SPIFFE ID", "EXPIRES"]);
    for s in svids {
        let expires = if render::time_of(s.revoked_at.as_ref()).is_some() {
            "revoked".to_owned()
        } else {
            render::relative_or_dash(s.not_after.as_ref(), now)
        };
        table.add_row(vec![
            s.serial.clone(),
            or_dash(&s.hint),
            s.spiffe_id.clone(),
            expires,
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::admin::render::tests::{header_cells, now, ts};
    use crate::proto::sigil::admin::v1::Selector;

    fn instance(id: &str, parent: &str) -> Instance {
        Instance {
            instance_id: id.into(),
            parent_instance_id: parent.into(),
            ..Instance::default()
        }
    }

    fn sample() -> Instance {
        Instance {
            instance_id: "0123456789abcdef0123".into(),
            pid: 4242,
            uid: 1000,
            entries: vec!["bot".into()],
            owners: vec!["team-a".into()],
            svids: vec![Svid {
                serial: "0a1b".into(),
                spiffe_id: "spiffe://sigil.local/agent/bot/instance/0123".into(),
                hint: "instance".into(),
                not_before: ts(1_700_000_000 - 180),
                not_after: ts(1_700_000_000 + 42 * 60),
                instance_id: "0123456789abcdef0123".into(),
                ..Svid::default()
            }],
            selectors: vec![Selector {
                r#type: "unix".into(),
                key: "uid".into(),
                value: "1000".into(),
            }],
            parent_instance_id: String::new(),
            tasks: vec![],
            started_at: ts(1_700_000_000 - 180),
            last_seen: ts(1_700_000_000),
            ended_at: None,
            end_kind: String::new(),
            end_reason: String::new(),
            exe: "/usr/bin/python3".into(),
        }
    }

    #[test]
    fn the_tree_prefixes_the_instance_column() {
        let instances = [instance("parent", ""), instance("child", "parent")];
        let text = table(&instances, &tree_order(&instances), false, now()).trim_fmt();
        let lines: Vec<_> = text.lines().collect();
        assert!(lines[1].starts_with("parent "), "{text}");
        assert!(lines[2].starts_with("└─ child "), "{text}");
    }

    #[test]
    fn the_instances_table_has_its_columns() {
        let instances = [sample()];
        let order = [(0, String::new())];
        let text = table(&instances, &order, false, now()).trim_fmt();
        assert_eq!(
            header_cells(&text),
            [
                "INSTANCE",
                "PID",
                "UID",
                "ENTRY",
                "SPIFFE ID",
                "TASKS",
                "EXPIRES",
                "STARTED"
            ]
        );
        let row = text.lines().nth(1).unwrap();
        assert!(row.starts_with("0123456789ab "), "{row}");
        assert!(row.contains("in 42m") && row.ends_with("3m ago"), "{row}");
        let text = table(&instances, &order, true, now()).trim_fmt();
        assert_eq!(header_cells(&text)[8..], ["STATE", "ENDED"]);
        let svids = svid_table(&instances[0].svids, now()).trim_fmt();
        assert_eq!(
            header_cells(&svids),
            ["SERIAL", "HINT", "SPIFFE ID", "EXPIRES"]
        );
    }

    #[test]
    fn an_instance_in_json_has_these_fields() {
        let json = serde_json::to_value(InstanceJson::from(&sample())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "instance_id": "0123456789abcdef0123",
                "pid": 4242,
                "uid": 1000,
                "exe": "/usr/bin/python3",
                "state": "live",
                "entries": ["bot"],
                "owners": ["team-a"],
                "selectors": ["unix:uid:1000"],
                "parent_instance_id": null,
                "svids": [{
                    "serial": "0a1b",
                    "spiffe_id": "spiffe://sigil.local/agent/bot/instance/0123",
                    "hint": "instance",
                    "not_before": "2023-11-14T22:10:20Z",
                    "not_after": "2023-11-14T22:55:20Z",
                    "revoked_at": null,
                    "revoke_reason": null,
                    "instance_id": "0123456789abcdef0123",
                    "task_id": null,
                }],
                "tasks": [],
                "started_at": "2023-11-14T22:10:20Z",
                "last_seen": "2023-11-14T22:13:20Z",
                "ended_at": null,
                "end_kind": null,
                "end_reason": null,
            })
        );
    }

    #[test]
    fn show_prints_every_field_then_svids_and_tasks() {
        let mut out = Vec::new();
        write_details(&mut out, &sample(), now()).unwrap();
        let text = String::from_utf8(out).unwrap();
        for key in [
            "instance:",
            "pid:",
            "exe:",
            "selectors:",
            "last seen:",
            "end reason:",
        ] {
            assert!(text.contains(key), "{key} in {text}");
        }
        assert!(
            text.contains("SERIAL") && text.contains("ATTRIBUTES"),
            "{text}"
        );
    }
}
