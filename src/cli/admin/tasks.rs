//! `sigil tasks` and `sigil task start|end`: the orchestrator's view of
//! tasks, for any live instance.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use super::render::{self, non_empty, or_dash, short_id};
use super::{AdminOpts, refused};
use crate::proto::sigil::admin::v1::{
    BeginTaskRequest, EndTaskRequest, ListTasksRequest, Task, begin_task_request,
};

/// `sigil tasks`.
#[derive(Debug, clap::Args)]
pub struct TasksArgs {
    /// Only this instance's tasks.
    #[arg(long, value_name = "ID")]
    instance: Option<String>,
    #[command(flatten)]
    opts: AdminOpts,
}

/// `sigil task ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TaskCommand {
    /// Start a task (with its own SVID) in a live instance.
    Start(StartArgs),
    /// End a task; its SVID is revoked.
    End(EndArgs),
}

/// `sigil task start`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["instance", "pid"])))]
pub struct StartArgs {
    /// The instance to start it in.
    #[arg(long, value_name = "ID")]
    instance: Option<String>,
    /// The live instance of this process.
    #[arg(long)]
    pid: Option<u32>,
    /// The task id (generated when absent).
    #[arg(long, value_name = "T")]
    task: Option<String>,
    /// Its lifetime, e.g. 10m [default: the daemon's svid.task_ttl].
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// An attribute recorded with the task, KEY=VALUE (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
    attrs: Vec<(String, String)>,
    #[command(flatten)]
    opts: AdminOpts,
}

/// `sigil task end`.
#[derive(Debug, clap::Args)]
pub struct EndArgs {
    /// The instance the task runs in.
    #[arg(long, value_name = "ID")]
    instance: String,
    /// The task id.
    #[arg(long, value_name = "T")]
    task: String,
    #[command(flatten)]
    opts: AdminOpts,
}

/// A task in JSON.
#[derive(Debug, Serialize)]
pub struct TaskJson {
    pub instance_id: String,
    pub task_id: String,
    pub spiffe_id: String,
    pub started_at: Option<String>,
    pub expires_at: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub started_by: Option<String>,
}

impl From<&Task> for TaskJson {
    fn from(t: &Task) -> Self {
        Self {
            instance_id: t.instance_id.clone(),
            task_id: t.task_id.clone(),
            spiffe_id: t.spiffe_id.clone(),
            started_at: render::rfc3339(t.started_at.as_ref()),
            expires_at: render::rfc3339(t.expires_at.as_ref()),
            attributes: t
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            started_by: non_empty(&t.started_by),
        }
    }
}

/// Parses `--attr KEY=VALUE`.
///
/// # Errors
/// When there is no `=` or the key is empty.
pub fn parse_attr(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// The tasks table: INSTANCE, TASK, SPIFFE ID, STARTED, EXPIRES, STARTED
/// BY, ATTRIBUTES.
pub fn table(tasks: &[Task], now: OffsetDateTime) -> comfy_table::Table {
    let mut table = render::table(&[
        "INSTANCE",
        "TASK",
        "SPIFFE ID",
        "STARTED",
        "EXPIRES",
        "STARTED BY",
        "ATTRIBUTES",
    ]);
    for t in tasks {
        let mut attrs: Vec<_> = t.attributes.iter().collect();
        attrs.sort();
        let attrs: Vec<_> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        table.add_row(vec![
            short_id(&t.instance_id),
            t.task_id.clone(),
            t.spiffe_id.clone(),
            render::relative_or_dash(t.started_at.as_ref(), now),
            render::relative_or_dash(t.expires_at.as_ref(), now),
            or_dash(&t.started_by),
            or_dash(&attrs.join(",")),
        ]);
    }
    table
}

/// Runs `sigil tasks`.
///
/// # Errors
/// When the daemon cannot be reached or refuses.
pub async fn run_list(args: TasksArgs, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let mut client = args.opts.connect().await?;
    let tasks = client
        .list_tasks(ListTasksRequest {
            instance_id: args.instance.unwrap_or_default(),
        })
        .await
        .map_err(refused)?
        .into_inner()
        .tasks;
    if args.opts.json {
        let json: Vec<TaskJson> = tasks.iter().map(TaskJson::from).collect();
        render::write_json(out, &json)?;
    } else {
        render::write_table(out, &table(&tasks, OffsetDateTime::now_utc()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `sigil task start|end`.
///
/// # Errors
/// When the arguments are inconsistent, or the daemon cannot be reached or
/// refuses.
pub async fn run(cmd: TaskCommand, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let (opts, task) = match cmd {
        TaskCommand::Start(args) => {
            let request = begin_request(&args)?;
            let mut client = args.opts.connect().await?;
            let task = client.begin_task(request).await.map_err(refused)?;
            (args.opts, task.into_inner())
        }
        TaskCommand::End(args) => {
            let mut client = args.opts.connect().await?;
            let task = client
                .end_task(EndTaskRequest {
                    instance_id: args.instance,
                    task_id: args.task,
                })
                .await
                .map_err(refused)?;
            (args.opts, task.into_inner())
        }
    };
    if opts.json {
        render::write_json(out, &TaskJson::from(&task))?;
    } else {
        render::write_table(out, &table(&[task], OffsetDateTime::now_utc()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn begin_request(args: &StartArgs) -> anyhow::Result<BeginTaskRequest> {
    let mut attributes = std::collections::HashMap::new();
    for (k, v) in &args.attrs {
        if attributes.insert(k.clone(), v.clone()).is_some() {
            anyhow::bail!("--attr {k} is given twice; give each key once");
        }
    }
    let instance = match (&args.instance, args.pid) {
        (Some(id), _) => begin_task_request::Instance::InstanceId(id.clone()),
        (None, Some(pid)) => begin_task_request::Instance::Pid(pid),
        (None, None) => anyhow::bail!("give --instance ID or --pid PID"),
    };
    let ttl = args
        .ttl
        .map(|d| {
            prost_types::Duration::try_from(d)
                .map_err(|_| anyhow::anyhow!("--ttl {d:?} is too long"))
        })
        .transpose()?;
    Ok(BeginTaskRequest {
        instance: Some(instance),
        task_id: args.task.clone().unwrap_or_default(),
        ttl,
        attributes,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::admin::render::tests::{header_cells, now, ts};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: TaskCommand,
    }

    fn sample() -> Task {
        Task {
            instance_id: "0123456789abcdef0123".into(),
            task_id: "ticket-42".into(),
            spiffe_id: "spiffe://sigil.local/agent/bot/instance/0123/task/ticket-42".into(),
            started_at: ts(1_700_000_000 - 120),
            expires_at: ts(1_700_000_000 + 600),
            attributes: [("repo".to_owned(), "sigil".to_owned())].into(),
            started_by: "uid:0".into(),
        }
    }

    #[test]
    fn attributes_must_be_key_equals_value() {
        assert_eq!(parse_attr("k=v").unwrap(), ("k".into(), "v".into()));
        assert_eq!(parse_attr("k=a=b").unwrap(), ("k".into(), "a=b".into()));
        assert_eq!(parse_attr("k=").unwrap(), ("k".into(), String::new()));
        assert!(parse_attr("kv").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_attr("=v").is_err());
    }

    #[test]
    fn task_start_parses_ttl_attrs_and_needs_a_target() {
        let cli = Cli::try_parse_from([
            "t", "start", "--pid", "42", "--ttl", "10m", "--attr", "a=1", "--attr", "b=2",
        ])
        .unwrap();
        let TaskCommand::Start(args) = cli.cmd else {
            panic!("start")
        };
        let request = begin_request(&args).unwrap();
        assert_eq!(
            request.instance,
            Some(begin_task_request::Instance::Pid(42))
        );
        assert_eq!(request.ttl.unwrap().seconds, 600);
        assert_eq!(request.attributes.len(), 2);

        let usage = |argv: &[&str]| Cli::try_parse_from(argv).unwrap_err().exit_code();
        assert_eq!(usage(&["t", "start", "--ttl", "10m"]), 2, "no target");
        assert_eq!(usage(&["t", "start", "--pid", "1", "--attr", "nope"]), 2);
        assert_eq!(usage(&["t", "start", "--pid", "1", "--ttl", "ten"]), 2);
        assert_eq!(usage(&["t", "start", "--pid", "1", "--instance", "x"]), 2);
    }

    #[test]
    fn a_repeated_attribute_key_is_an_error() {
        let cli =
            Cli::try_parse_from(["t", "start", "--pid", "1", "--attr", "a=1", "--attr", "a=2"])
                .unwrap();
        let TaskCommand::Start(args) = cli.cmd else {
            panic!("start")
        };
        assert!(begin_request(&args).is_err());
    }

    #[test]
    fn the_tasks_table_has_its_columns() {
        let text = table(&[sample()], now()).trim_fmt();
        assert_eq!(
            header_cells(&text),
            [
                "INSTANCE",
                "TASK",
                "SPIFFE ID",
                "STARTED",
                "EXPIRES",
                "STARTED BY",
                "ATTRIBUTES"
            ]
        );
        let row = text.lines().nth(1).unwrap();
        assert!(row.starts_with("0123456789ab  ticket-42"), "{row}");
        assert!(row.contains("2m ago") && row.contains("in 10m") && row.contains("repo=sigil"));
    }

    #[test]
    fn a_task_in_json_has_these_fields() {
        let json = serde_json::to_value(TaskJson::from(&sample())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "instance_id": "0123456789abcdef0123",
                "task_id": "ticket-42",
                "spiffe_id": "spiffe://sigil.local/agent/bot/instance/0123/task/ticket-42",
                "started_at": "2023-11-14T22:11:20Z",
                "expires_at": "2023-11-14T22:23:20Z",
                "attributes": {"repo": "sigil"},
                "started_by": "uid:0",
            })
        );
    }
}
