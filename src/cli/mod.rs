//! The `sigil` command line: the daemon and its clients.
//!
//! `anyhow` lives here and in `main.rs` only: this is the edge where errors
//! become messages for a person.

mod admin;
mod client;
mod config_check;
mod fetch;
mod files;
mod gate;
mod helper;
mod run;
mod verify;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Sigil: SPIFFE workload identities for AI agents, on one node.
#[derive(Debug, Parser)]
#[command(name = "sigil", version, about, long_about = None)]
pub struct Cli {
    /// Log as JSON lines instead of text (RUST_LOG sets the level).
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (embedded defaults for the current user without --config).
    Run(run::RunArgs),
    /// Fetch from the Workload API, as an agent would.
    #[command(subcommand)]
    Fetch(fetch::FetchCommand),
    /// Check a config file without starting the daemon.
    #[command(subcommand)]
    Config(config_check::ConfigCommand),
    /// Exit 0 when a daemon serves the Workload API on the socket.
    Healthcheck(fetch::HealthcheckArgs),
    /// Print the Workload API endpoint clients of this user default to
    /// (`unix:///...`), e.g. `export SPIFFE_ENDPOINT_SOCKET=$(sigil endpoint)`.
    Endpoint(EndpointArg),
    /// An mTLS reverse proxy enforcing agent identity and revocation.
    Gate(gate::GateArgs),
    /// Keep SVID, key, bundle and CRL files current (spiffe-helper's job).
    Helper(helper::HelperArgs),
    /// Would a service accept this certificate? (chain, CRL, SPIFFE ID)
    #[command(subcommand)]
    Verify(verify::VerifyCommand),
    /// The operators' commands, over the admin API.
    #[command(flatten)]
    Admin(admin::AdminCommand),
}

/// Where the Workload API is.
#[derive(Debug, clap::Args)]
pub struct EndpointArg {
    /// Socket path or unix:// URI; default: SPIFFE_ENDPOINT_SOCKET, then the
    /// default socket for this user.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<String>,
}

impl EndpointArg {
    fn resolve(&self) -> anyhow::Result<PathBuf> {
        client::resolve_endpoint(self.socket.as_deref())
    }
}

impl Cli {
    /// Whether this runs a long-lived process (the daemon, the gate, the
    /// helper) rather than a one-shot client.
    pub fn is_daemon(&self) -> bool {
        matches!(
            self.command,
            Command::Run(_) | Command::Gate(_) | Command::Helper(_)
        )
    }

    /// The level logs default to for this command: the daemon says what it
    /// does; clients stay quiet unless something is wrong.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Run(_) | Command::Gate(_) | Command::Helper(_) => "info",
            _ => "warn",
        }
    }
}

/// Runs the command; the exit code is the process's.
///
/// # Errors
/// Whatever stopped the command, with context for a person.
pub async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args).await,
        Command::Fetch(cmd) => fetch::run(cmd).await,
        Command::Healthcheck(args) => fetch::healthcheck(&args).await,
        Command::Endpoint(endpoint) => {
            println!("unix://{}", endpoint.resolve()?.display());
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Verify(cmd) => verify::run(cmd).await,
        Command::Helper(args) => helper::run(args).await,
        Command::Gate(args) => gate::run(args).await,
        Command::Config(cmd) => config_check::run(cmd),
        Command::Admin(cmd) => admin::run(cmd, &mut std::io::stdout()).await,
    }
}

/// An error and its causes on one line for the terminal, like anyhow's
/// `{:#}`, but naming each cause once: many messages already quote their
/// source (an I/O error, the TOML parser's snippet) and keep it as
/// `source()` too, so the chain is whole for code that walks it.
pub fn report(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let line = cause.to_string();
        if text.contains(&line) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&line);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_the_message_already_quotes_is_not_repeated() {
        let config = crate::config::Config::parse(
            "not toml [",
            "/etc/sigil.toml",
            &crate::config::Overrides::default(),
        )
        .unwrap_err();
        let parser = std::error::Error::source(&config)
            .expect("the parser's error is kept")
            .to_string();
        let e = anyhow::Error::new(config).context("the configuration is invalid");
        let text = report(&e);
        assert!(
            text.starts_with("the configuration is invalid: /etc/sigil.toml: "),
            "{text}"
        );
        assert_eq!(text.matches(parser.as_str()).count(), 1, "{text}");
    }
}
