//! The operators' commands: clients of the admin API (`sigil.admin.v1`) on
//! the admin socket. `instances`, `tasks`/`task`, `revoke`, `entries`,
//! `audit` and `status`.
//!
//! This module owns connecting, turning refusals into messages, and the
//! clap definitions; each command group renders its own tables and JSON
//! (with [`render`]'s helpers). It owns no policy: the daemon decides and
//! explains, and the commands print its message.

mod audit;
mod entries;
mod entry_file;
#[cfg(test)]
mod fake;
mod instances;
mod render;
mod revoke;
mod status;
mod tasks;
mod tree;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tonic::transport::Channel;

use crate::proto::sigil::admin::v1::admin_client::AdminClient;

/// The environment variable naming the admin socket.
pub const ADMIN_SOCKET_ENV: &str = "SIGIL_ADMIN_SOCKET";

/// A connected admin API client.
pub type Client = AdminClient<Channel>;

/// The operators' subcommands, flattened into `sigil`'s own.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// List attested instances (live ones; --all for ended too), or show one.
    Instances(instances::InstancesArgs),
    /// List live tasks.
    Tasks(tasks::TasksArgs),
    /// Start or end a task for a live instance.
    #[command(subcommand)]
    Task(tasks::TaskCommand),
    /// Revoke an instance, an SVID, or everything issued under an entry.
    #[command(subcommand)]
    Revoke(revoke::RevokeCommand),
    /// List, show, create and delete registration entries.
    #[command(subcommand)]
    Entries(entries::EntriesCommand),
    /// Read, follow or verify the audit trail.
    Audit(audit::AuditArgs),
    /// The daemon at a glance.
    Status(status::StatusArgs),
}

/// Options every admin command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminOpts {
    /// Print JSON (snake_case fields, RFC 3339 UTC times) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The daemon's admin socket [default: admin.sock beside this user's
    /// default workload socket].
    #[arg(long, env = ADMIN_SOCKET_ENV, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
}

impl AdminOpts {
    /// The socket to connect to.
    pub fn socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(default_admin_socket)
    }

    /// Connects to the admin socket.
    ///
    /// # Errors
    /// When the socket is missing, not accessible, or nothing answers on it.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        connect(&self.socket()).await
    }
}

/// The system daemon's admin socket, where `sigil run` as root puts it.
const SYSTEM_ADMIN_SOCKET: &str = "/run/sigil/admin.sock";

/// `admin.sock` in the directory of this user's default workload socket;
/// for a user with no daemon of their own there, the system daemon's (an
/// operator in the admin group or `allowed_uids` talks to root's daemon).
pub fn default_admin_socket() -> PathBuf {
    let own = crate::config::default_paths()
        .1
        .with_file_name("admin.sock");
    let system = PathBuf::from(SYSTEM_ADMIN_SOCKET);
    if !own.exists() && system.exists() {
        system
    } else {
        own
    }
}

/// Runs an admin command, writing its output to `out`.
///
/// # Errors
/// When the daemon cannot be reached or refuses, with what to do about it.
pub async fn run(cmd: AdminCommand, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    match cmd {
        AdminCommand::Instances(args) => instances::run(args, out).await,
        AdminCommand::Tasks(args) => tasks::run_list(args, out).await,
        AdminCommand::Task(cmd) => tasks::run(cmd, out).await,
        AdminCommand::Revoke(cmd) => revoke::run(cmd, out).await,
        AdminCommand::Entries(cmd) => entries::run(cmd, out).await,
        AdminCommand::Audit(args) => audit::run(args, out).await,
        AdminCommand::Status(args) => status::run(args, out).await,
    }
}

/// Connects to the admin API on `socket`.
///
/// # Errors
/// When the socket is missing, not accessible, or nothing answers on it,
/// each with what to do.
pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    let channel = crate::connect::channel(socket, crate::connect::Which::Admin).await?;
    Ok(AdminClient::new(channel))
}

/// A refused or failed admin call as a message for a person. Refusals
/// (permission, not found, invalid, precondition) carry the daemon's own
/// explanation, printed as it is.
pub fn refused(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let message = status.message();
    match status.code() {
        Code::PermissionDenied
        | Code::NotFound
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::ResourceExhausted
        | Code::OutOfRange
            if !message.is_empty() =>
        {
            anyhow::anyhow!("{message}")
        }
        Code::Unimplemented => anyhow::anyhow!(
            "the daemon does not serve this admin call ({message}): is it an older sigil than \
             this command?"
        ),
        Code::Unavailable => {
            anyhow::anyhow!("the admin API is unavailable ({message}): is `sigil run` running?")
        }
        code => anyhow::anyhow!("the admin API failed: {code}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<AdminCommand, clap::Error> {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(argv)?;
        match cli.command {
            crate::cli::Command::Admin(cmd) => Ok(cmd),
            other => panic!("not an admin command: {other:?}"),
        }
    }

    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory;
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn every_command_takes_json_and_admin_socket() {
        for argv in [
            &["sigil", "instances"][..],
            &["sigil", "instances", "--all", "--tree"],
            &["sigil", "instances", "show", "abc"],
            &["sigil", "instances", "show", "--pid", "1"],
            &["sigil", "tasks", "--instance", "abc"],
            &["sigil", "task", "start", "--pid", "1"],
            &["sigil", "task", "end", "--instance", "abc", "--task", "t"],
            &["sigil", "revoke", "instance", "abc"],
            &["sigil", "revoke", "svid", "0a"],
            &["sigil", "revoke", "entry", "bot"],
            &["sigil", "entries", "list"],
            &["sigil", "entries", "show", "bot"],
            &["sigil", "entries", "create", "--file", "e.toml"],
            &["sigil", "entries", "delete", "bot"],
            &["sigil", "audit", "--since", "10m"],
            &["sigil", "audit", "verify"],
            &["sigil", "status"],
        ] {
            let mut argv = argv.to_vec();
            argv.extend(["--json", "--admin-socket", "/tmp/a.sock"]);
            let cmd = parse(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let text = format!("{cmd:?}");
            assert!(
                text.contains("json: true") && text.contains("/tmp/a.sock"),
                "{text}"
            );
        }
    }

    #[test]
    fn instances_show_conflicts_with_the_list_flags() {
        let e = parse(&["sigil", "instances", "--all", "show", "abc"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn the_default_admin_socket_is_beside_the_workload_socket() {
        let workload = crate::config::default_paths().1;
        let admin = default_admin_socket();
        assert_eq!(admin.parent(), workload.parent());
        assert_eq!(admin.file_name().unwrap(), "admin.sock");
    }

    #[test]
    fn refusals_print_the_daemons_message() {
        let e = refused(tonic::Status::permission_denied(
            "uid 1000 may not use the admin API",
        ));
        assert_eq!(e.to_string(), "uid 1000 may not use the admin API");
        let e = refused(tonic::Status::not_found("no instance abc"));
        assert_eq!(e.to_string(), "no instance abc");
        let e = refused(tonic::Status::internal("boom"));
        assert!(e.to_string().contains("boom"));
    }
}
