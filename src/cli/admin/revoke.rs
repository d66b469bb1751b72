//! `sigil revoke instance|svid|entry`: revocation, printing what it
//! revoked.

use std::io::Write;
use std::process::ExitCode;

use serde::Serialize;

use super::render;
use super::{AdminOpts, refused};
use crate::proto::sigil::admin::v1::{
    RevokeEntryRequest, RevokeInstanceRequest, RevokeResponse, RevokeSvidRequest,
    revoke_instance_request,
};

/// What to revoke.
#[derive(Debug, clap::Subcommand)]
pub enum RevokeCommand {
    /// An instance: its streams end and its process is refused until it exits.
    Instance(InstanceArgs),
    /// An SVID by serial: an instance SVID revokes its instance, a task SVID
    /// ends its task.
    Svid(SvidArgs),
    /// Every live instance holding an SVID of the entry.
    Entry(EntryArgs),
}

/// `sigil revoke instance ID | --pid PID`.
#[derive(Debug, clap::Args)]
pub struct InstanceArgs {
    /// The instance id.
    #[arg(required_unless_present = "pid", conflicts_with = "pid")]
    id: Option<String>,
    /// The live instance of this process.
    #[arg(long)]
    pid: Option<u32>,
    #[command(flatten)]
    reason: Reason,
    #[command(flatten)]
    opts: AdminOpts,
}

/// `sigil revoke svid SERIAL`.
#[derive(Debug, clap::Args)]
pub struct SvidArgs {
    /// The certificate's serial number (hex).
    serial: String,
    #[command(flatten)]
    reason: Reason,
    #[command(flatten)]
    opts: AdminOpts,
}

/// `sigil revoke entry NAME`.
#[derive(Debug, clap::Args)]
pub struct EntryArgs {
    /// The entry's name.
    name: String,
    #[command(flatten)]
    reason: Reason,
    #[command(flatten)]
    opts: AdminOpts,
}

/// Why, for the audit trail and the instance's end reason.
#[derive(Debug, clap::Args)]
pub struct Reason {
    /// Why (kept in the audit trail and the instance's end reason).
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
}

/// What a revocation revoked, in JSON.
#[derive(Debug, Default, Serialize)]
pub struct RevokedJson {
    pub instance_ids: Vec<String>,
    pub task_ids: Vec<String>,
    pub serials: Vec<String>,
}

impl From<&RevokeResponse> for RevokedJson {
    fn from(r: &RevokeResponse) -> Self {
        Self {
            instance_ids: r.instance_ids.clone(),
            task_ids: r.task_ids.clone(),
            serials: r.serials.clone(),
        }
    }
}

/// Runs `sigil revoke ...`.
///
/// # Errors
/// When the daemon cannot be reached or refuses.
pub async fn run(cmd: RevokeCommand, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let (opts, response) = match cmd {
        RevokeCommand::Instance(args) => {
            let instance = match (args.id, args.pid) {
                (Some(id), _) => revoke_instance_request::Instance::InstanceId(id),
                (None, Some(pid)) => revoke_instance_request::Instance::Pid(pid),
                (None, None) => anyhow::bail!("give an instance ID or --pid PID"),
            };
            let mut client = args.opts.connect().await?;
            let request = RevokeInstanceRequest {
                instance: Some(instance),
                reason: args.reason.reason.unwrap_or_default(),
            };
            let response = client.revoke_instance(request).await.map_err(refused)?;
            (args.opts, response.into_inner())
        }
        RevokeCommand::Svid(args) => {
            let mut client = args.opts.connect().await?;
            let request = RevokeSvidRequest {
                serial: args.serial,
                reason: args.reason.reason.unwrap_or_default(),
            };
            let response = client.revoke_svid(request).await.map_err(refused)?;
            (args.opts, response.into_inner())
        }
        RevokeCommand::Entry(args) => {
            let mut client = args.opts.connect().await?;
            let request = RevokeEntryRequest {
                name: args.name,
                reason: args.reason.reason.unwrap_or_default(),
            };
            let response = client.revoke_entry(request).await.map_err(refused)?;
            (args.opts, response.into_inner())
        }
    };
    if opts.json {
        render::write_json(out, &RevokedJson::from(&response))?;
    } else {
        write_revoked(out, &response)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A summary line, then a KIND/ID table of what was revoked.
///
/// # Errors
/// When the output cannot be written.
pub fn write_revoked(out: &mut impl Write, r: &RevokeResponse) -> std::io::Result<()> {
    if r.instance_ids.is_empty() && r.task_ids.is_empty() && r.serials.is_empty() {
        return writeln!(out, "nothing was revoked");
    }
    writeln!(
        out,
        "revoked {} instance(s), ended {} task(s), {} serial(s) on the CRL",
        r.instance_ids.len(),
        r.task_ids.len(),
        r.serials.len()
    )?;
    let mut table = render::table(&["KIND", "ID"]);
    let rows = (r.instance_ids.iter().map(|id| ("instance", id)))
        .chain(r.task_ids.iter().map(|id| ("task", id)))
        .chain(r.serials.iter().map(|id| ("serial", id)));
    for (kind, id) in rows {
        table.add_row(vec![kind.to_owned(), id.clone()]);
    }
    render::write_table(out, &table)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::admin::render::tests::header_cells;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: RevokeCommand,
    }

    #[test]
    fn revoke_instance_takes_an_id_or_a_pid_not_both() {
        assert!(Cli::try_parse_from(["r", "instance", "abc", "--reason", "leak"]).is_ok());
        assert!(Cli::try_parse_from(["r", "instance", "--pid", "7"]).is_ok());
        for argv in [
            &["r", "instance"][..],
            &["r", "instance", "abc", "--pid", "7"],
        ] {
            let e = Cli::try_parse_from(argv).expect_err("a usage error");
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn what_was_revoked_is_listed_by_kind() {
        let response = RevokeResponse {
            instance_ids: vec!["abc".into()],
            task_ids: vec!["t1".into()],
            serials: vec!["0a".into(), "0b".into()],
        };
        let mut out = Vec::new();
        write_revoked(&mut out, &response).unwrap();
        let text = String::from_utf8(out).unwrap();
        let (summary, table) = text.split_once('\n').unwrap();
        assert_eq!(
            summary,
            "revoked 1 instance(s), ended 1 task(s), 2 serial(s) on the CRL"
        );
        assert_eq!(header_cells(table), ["KIND", "ID"]);
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("serial ") && l.ends_with(" 0b")),
            "{table}"
        );
        let json = serde_json::to_value(RevokedJson::from(&response)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"instance_ids": ["abc"], "task_ids": ["t1"], "serials": ["0a", "0b"]})
        );
    }
}
