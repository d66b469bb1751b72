//! `sigil entries list|show|create|delete`: registration entries, the
//! config file's (read-only) and stored ones.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use super::entry_file::read_entry_file;
use super::render::{self, non_empty, or_dash};
use super::revoke::{RevokedJson, write_revoked};
use super::{AdminOpts, refused};
use crate::proto::sigil::admin::v1::{
    CreateEntryRequest, DeleteEntryRequest, Entry, GetEntryRequest, ListEntriesRequest, TaskPolicy,
};

/// `sigil entries ...`.
#[derive(Debug, clap::Subcommand)]
pub enum EntriesCommand {
    /// Every entry, from the config file and stored.
    List(ListArgs),
    /// One entry in full.
    Show(NameArgs),
    /// Store a new entry (validated like a config entry; survives restarts).
    Create(Box<CreateArgs>),
    /// Delete a stored entry; what was issued under it is revoked.
    Delete(NameArgs),
}

/// `sigil entries list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    opts: AdminOpts,
}

/// An entry named on the command line.
#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// The entry's name.
    name: String,
    #[command(flatten)]
    opts: AdminOpts,
}

/// `sigil entries create`: from flags, or from a file with `--file`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// A TOML file holding one entry, as a config file's `[[entry]]` table
    /// (or the same keys at the top level).
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "name", "selectors", "spiffe_id", "ttl", "dns_names", "owner",
        "self_declare_tasks", "task_max_ttl", "task_max_concurrent", "task_id_pattern",
    ])]
    file: Option<PathBuf>,
    /// The entry's name (a SPIFFE path segment).
    #[arg(long, value_name = "N", required_unless_present = "file")]
    name: Option<String>,
    /// A selector, type:key:value (repeatable; all must match).
    #[arg(long = "selector", value_name = "S", required_unless_present = "file")]
    selectors: Vec<String>,
    /// A SPIFFE ID template [default: the daemon's].
    #[arg(long, value_name = "TEMPLATE")]
    spiffe_id: Option<String>,
    /// The instance SVID lifetime, e.g. 1h [default: the daemon's].
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// An extra DNS SAN (repeatable).
    #[arg(long = "dns-name", value_name = "D")]
    dns_names: Vec<String>,
    /// The team or person accountable for the agent.
    #[arg(long, value_name = "O")]
    owner: Option<String>,
    /// Let the agent begin and end its own tasks.
    #[arg(long)]
    self_declare_tasks: bool,
    /// The longest task lifetime, e.g. 10m.
    #[arg(long, value_parser = humantime::parse_duration)]
    task_max_ttl: Option<Duration>,
    /// Live tasks per instance, at most.
    #[arg(long, value_name = "N")]
    task_max_concurrent: Option<u32>,
    /// A glob task ids must match.
    #[arg(long, value_name = "GLOB")]
    task_id_pattern: Option<String>,
    #[command(flatten)]
    opts: AdminOpts,
}

/// An entry's task policy in JSON.
#[derive(Debug, Serialize)]
pub struct TaskPolicyJson {
    pub self_declare: bool,
    pub max_ttl_seconds: Option<u64>,
    pub max_concurrent: u32,
    pub id_pattern: Option<String>,
    pub begin_burst: u32,
    pub begin_per_second: f64,
}

/// An entry in JSON.
#[derive(Debug, Serialize)]
pub struct EntryJson {
    pub name: String,
    /// "config" or "stored".
    pub source: String,
    pub owner: Option<String>,
    pub selectors: Vec<String>,
    /// The template; null for the daemon's default.
    pub spiffe_id: Option<String>,
    pub ttl_seconds: Option<u64>,
    pub dns_names: Vec<String>,
    pub tasks: Option<TaskPolicyJson>,
    pub created_at: Option<String>,
    pub created_by: Option<String>,
    pub live_instances: u32,
}

impl From<&Entry> for EntryJson {
    fn from(e: &Entry) -> Self {
        Self {
            name: e.name.clone(),
            source: e.source.clone(),
            owner: non_empty(&e.owner),
            selectors: e.selectors.clone(),
            spiffe_id: non_empty(&e.spiffe_id),
            ttl_seconds: render::seconds(e.ttl.as_ref()),
            dns_names: e.dns_names.clone(),
            tasks: e.tasks.as_ref().map(|t| TaskPolicyJson {
                self_declare: t.self_declare,
                max_ttl_seconds: render::seconds(t.max_ttl.as_ref()),
                max_concurrent: t.max_concurrent,
                id_pattern: non_empty(&t.id_pattern),
                begin_burst: t.begin_burst,
                begin_per_second: t.begin_per_second,
            }),
            created_at: render::rfc3339(e.created_at.as_ref()),
            created_by: non_empty(&e.created_by),
            live_instances: e.live_instances,
        }
    }
}

/// Runs `sigil entries ...`.
///
/// # Errors
/// When an entry file is unreadable or invalid, or the daemon cannot be
/// reached or refuses.
pub async fn run(cmd: EntriesCommand, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let now = OffsetDateTime::now_utc();
    match cmd {
        EntriesCommand::List(args) => {
            let mut client = args.opts.connect().await?;
            let entries = client
                .list_entries(ListEntriesRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .entries;
            if args.opts.json {
                let json: Vec<_> = entries.iter().map(EntryJson::from).collect();
                render::write_json(out, &json)?;
            } else {
                render::write_table(out, &table(&entries))?;
            }
        }
        EntriesCommand::Show(args) => {
            let mut client = args.opts.connect().await?;
            let entry = client
                .get_entry(GetEntryRequest { name: args.name })
                .await
                .map_err(refused)?
                .into_inner();
            write_entry(out, &entry, args.opts.json, now)?;
        }
        EntriesCommand::Create(args) => {
            let entry = match &args.file {
                Some(path) => read_entry_file(path)?,
                None => entry_from_flags(&args)?,
            };
            let mut client = args.opts.connect().await?;
            let entry = client
                .create_entry(CreateEntryRequest { entry: Some(entry) })
                .await
                .map_err(refused)?
                .into_inner();
            write_entry(out, &entry, args.opts.json, now)?;
        }
        EntriesCommand::Delete(args) => {
            let mut client = args.opts.connect().await?;
            let response = client
                .delete_entry(DeleteEntryRequest {
                    name: args.name.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            let revoked = response.revoked.unwrap_or_default();
            if args.opts.json {
                #[derive(Serialize)]
                struct Deleted {
                    name: String,
                    revoked: RevokedJson,
                }
                let json = Deleted {
                    name: args.name,
                    revoked: RevokedJson::from(&revoked),
                };
                render::write_json(out, &json)?;
            } else {
                writeln!(out, "deleted entry {}", args.name)?;
                write_revoked(out, &revoked)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The entries table: NAME, SOURCE, OWNER, SELECTORS, SPIFFE ID, TTL, LIVE.
fn table(entries: &[Entry]) -> comfy_table::Table {
    let mut table = render::table(&[
        "NAME",
        "SOURCE",
        "OWNER",
        "SELECTORS",
        "SPIFFE ID",
        "TTL",
        "LIVE",
    ]);
    for e in entries {
        table.add_row(vec![
            e.name.clone(),
            or_dash(&e.source),
            or_dash(&e.owner),
            e.selectors.join(","),
            if e.spiffe_id.is_empty() {
                "(default)".to_owned()
            } else {
                e.spiffe_id.clone()
            },
            render::duration(e.ttl.as_ref(), "(default)"),
            e.live_instances.to_string(),
        ]);
    }
    table
}

fn write_entry(
    out: &mut impl Write,
    e: &Entry,
    json: bool,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    if json {
        return render::write_json(out, &EntryJson::from(e));
    }
    let created = match render::time_of(e.created_at.as_ref()) {
        Some(_) => format!(
            "{} ({}) by {}",
            render::rfc3339_seconds(e.created_at.as_ref()),
            render::relative_or_dash(e.created_at.as_ref(), now),
            or_dash(&e.created_by)
        ),
        None => "-".to_owned(),
    };
    let tasks = e.tasks.clone().unwrap_or_default();
    let rows = [
        ("name", e.name.clone()),
        ("source", or_dash(&e.source)),
        ("owner", or_dash(&e.owner)),
        ("selectors", e.selectors.join(", ")),
        (
            "spiffe id",
            if e.spiffe_id.is_empty() {
                "(default)".to_owned()
            } else {
                e.spiffe_id.clone()
            },
        ),
        ("ttl", render::duration(e.ttl.as_ref(), "(default)")),
        ("dns names", or_dash(&e.dns_names.join(", "))),
        ("live instances", e.live_instances.to_string()),
        ("created", created),
        ("tasks: self declare", tasks.self_declare.to_string()),
        (
            "tasks: max ttl",
            render::duration(tasks.max_ttl.as_ref(), "(default)"),
        ),
        (
            "tasks: max concurrent",
            count_or_default(tasks.max_concurrent),
        ),
        ("tasks: id pattern", or_dash(&tasks.id_pattern)),
        ("tasks: begin burst", count_or_default(tasks.begin_burst)),
        (
            "tasks: begins per second",
            if tasks.begin_per_second == 0.0 {
                "(default)".to_owned()
            } else {
                tasks.begin_per_second.to_string()
            },
        ),
    ];
    render::write_table(out, &render::key_values(rows))?;
    Ok(())
}

fn count_or_default(n: u32) -> String {
    if n == 0 {
        "(default)".to_owned()
    } else {
        n.to_string()
    }
}

pub(super) fn proto_duration(d: Duration, flag: &str) -> anyhow::Result<prost_types::Duration> {
    prost_types::Duration::try_from(d).map_err(|_| anyhow::anyhow!("{flag} is too long"))
}

fn entry_from_flags(args: &CreateArgs) -> anyhow::Result<Entry> {
    let tasks = args.self_declare_tasks
        || args.task_max_ttl.is_some()
        || args.task_max_concurrent.is_some()
        || args.task_id_pattern.is_some();
    Ok(Entry {
        name: args.name.clone().unwrap_or_default(),
        selectors: args.selectors.clone(),
        spiffe_id: args.spiffe_id.clone().unwrap_or_default(),
        ttl: args.ttl.map(|d| proto_duration(d, "--ttl")).transpose()?,
        dns_names: args.dns_names.clone(),
        owner: args.owner.clone().unwrap_or_default(),
        tasks: tasks
            .then(|| -> anyhow::Result<TaskPolicy> {
                Ok(TaskPolicy {
                    self_declare: args.self_declare_tasks,
                    max_ttl: args
                        .task_max_ttl
                        .map(|d| proto_duration(d, "--task-max-ttl"))
                        .transpose()?,
                    max_concurrent: args.task_max_concurrent.unwrap_or(0),
                    id_pattern: args.task_id_pattern.clone().unwrap_or_default(),
                    ..TaskPolicy::default()
                })
            })
            .transpose()?,
        ..Entry::default()
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::admin::render::tests::{header_cells, ts};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: EntriesCommand,
    }

    #[test]
    fn create_takes_flags_or_a_file_not_both() {
        let cli = Cli::try_parse_from([
            "e",
            "create",
            "--name",
            "a",
            "--selector",
            "unix:uid:0",
            "--selector",
            "unix:gid:0",
            "--ttl",
            "1h",
            "--task-max-ttl",
            "10m",
            "--dns-name",
            "a.local",
        ])
        .unwrap();
        let EntriesCommand::Create(args) = cli.cmd else {
            panic!("create")
        };
        let entry = entry_from_flags(&args).unwrap();
        assert_eq!(entry.selectors.len(), 2);
        assert_eq!(entry.ttl.unwrap().seconds, 3600);
        assert_eq!(entry.tasks.unwrap().max_ttl.unwrap().seconds, 600);

        assert!(Cli::try_parse_from(["e", "create", "--file", "x.toml"]).is_ok());
        for argv in [
            &["e", "create", "--file", "x.toml", "--name", "a"][..],
            &["e", "create", "--name", "a"],
            &["e", "create"],
        ] {
            let e = Cli::try_parse_from(argv).expect_err("a usage error");
            assert_eq!(e.exit_code(), 2, "{argv:?}");
        }
    }

    fn sample() -> Entry {
        Entry {
            name: "bot".into(),
            selectors: vec!["unix:uid:1000".into()],
            spiffe_id: String::new(),
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            dns_names: vec![],
            tasks: Some(TaskPolicy {
                self_declare: true,
                max_ttl: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                max_concurrent: 16,
                id_pattern: String::new(),
                begin_burst: 20,
                begin_per_second: 1.0,
            }),
            owner: "team-a".into(),
            source: "stored".into(),
            created_at: ts(1_700_000_000),
            created_by: "uid:0".into(),
            live_instances: 2,
        }
    }

    #[test]
    fn the_entries_table_has_its_columns() {
        let text = table(&[sample()]).trim_fmt();
        assert_eq!(
            header_cells(&text),
            [
                "NAME",
                "SOURCE",
                "OWNER",
                "SELECTORS",
                "SPIFFE ID",
                "TTL",
                "LIVE"
            ]
        );
        assert!(text.lines().nth(1).unwrap().contains("(default)"), "{text}");
    }

    #[test]
    fn an_entry_in_json_has_these_fields() {
        let json = serde_json::to_value(EntryJson::from(&sample())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "bot",
                "source": "stored",
                "owner": "team-a",
                "selectors": ["unix:uid:1000"],
                "spiffe_id": null,
                "ttl_seconds": 3600,
                "dns_names": [],
                "tasks": {
                    "self_declare": true,
                    "max_ttl_seconds": 600,
                    "max_concurrent": 16,
                    "id_pattern": null,
                    "begin_burst": 20,
                    "begin_per_second": 1.0,
                },
                "created_at": "2023-11-14T22:13:20Z",
                "created_by": "uid:0",
                "live_instances": 2,
            })
        );
    }
}
