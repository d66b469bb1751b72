//! `sigil config check`: validate a config file without starting anything.
//!
//! Prints every problem, one per line with the file, the entry and the
//! field, and exits 1; or prints a one-line summary and exits 0. Binds no
//! socket and reads no state: only the file (and the group database, for
//! `admin_api.group`).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, Overrides};

/// `sigil config` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file (or the embedded defaults) and print every
    /// problem; exit 1 if there is any.
    Check(CheckArgs),
}

/// Arguments of `sigil config check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Config file (TOML) to check; without it, the embedded defaults.
    #[arg(long, short, value_name = "FILE", env = "SIGIL_CONFIG")]
    config: Option<PathBuf>,
}

/// Runs a `sigil config` subcommand.
///
/// # Errors
/// None today: a bad config is reported on stderr with exit code 1.
pub fn run(cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCommand::Check(args) => Ok(check(&args)),
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    match Config::load(args.config.as_deref(), &Overrides::default()) {
        Ok(config) => {
            println!("{}", summary(&config));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let problems = e.problems();
            for line in &problems {
                eprintln!("{line}");
            }
            let source = args.config.as_ref().map_or_else(
                || "<embedded defaults>".to_owned(),
                |p| p.display().to_string(),
            );
            let count = problems.len();
            let noun = if count == 1 { "problem" } else { "problems" };
            eprintln!("{source}: invalid: {count} {noun}");
            ExitCode::FAILURE
        }
    }
}

/// `FILE: valid: trust domain TD, N entries, workload socket P, admin
/// socket Q, metrics off`.
fn summary(config: &Config) -> String {
    let count = config.entries.len();
    let entries = if count == 1 { "entry" } else { "entries" };
    let metrics = config
        .metrics_listen
        .map_or_else(|| "metrics off".to_owned(), |a| format!("metrics on {a}"));
    format!(
        "{}: valid: trust domain {}, {count} {entries}, workload socket {}, admin socket {}, {metrics}",
        config.source,
        config.trust_domain,
        config.workload_socket.display(),
        config.admin.socket.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_the_file_the_domain_and_both_sockets() {
        let config = Config::parse(
            "trust_domain = \"agents.example.org\"\n[workload_api]\nsocket = \"/run/sigil/workload.sock\"\n[[entry]]\nname = \"a\"\nselectors = [\"unix:uid:1\"]\n",
            "/etc/sigil/sigil.toml",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            summary(&config),
            "/etc/sigil/sigil.toml: valid: trust domain agents.example.org, 1 entry, workload socket /run/sigil/workload.sock, admin socket /run/sigil/admin.sock, metrics off"
        );
    }
}
