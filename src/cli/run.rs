//! `sigil run`: load the config, build the daemon, serve until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::app::App;
use crate::config::{self, Config, Overrides};
use crate::shutdown::{GRACE_PERIOD, Shutdown};

/// Arguments of `sigil run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Config file (TOML); see config/sigil.toml. Without it, embedded
    /// defaults admit the current user.
    #[arg(long, short, value_name = "FILE", env = "SIGIL_CONFIG")]
    config: Option<PathBuf>,
    /// Workload API socket path (overrides the file).
    #[arg(long, value_name = "PATH", env = "SIGIL_SOCKET")]
    socket: Option<PathBuf>,
    /// Admin API socket path (overrides the file; default: admin.sock beside
    /// the workload socket).
    #[arg(long, value_name = "PATH", env = "SIGIL_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// State directory (overrides the file).
    #[arg(long, value_name = "DIR", env = "SIGIL_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

/// Runs the daemon until SIGINT or SIGTERM.
///
/// # Errors
/// A config, start-up or server error, with context.
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        socket: args.socket,
        state_dir: args.state_dir,
        admin_socket: args.admin_socket,
    };
    let config = Config::load(args.config.as_deref(), &overrides).map_err(invalid_config)?;
    raise_fd_limit();
    let shutdown = Shutdown::new();
    shutdown.cancel_on_signals();
    let app = match App::build(config, &shutdown).await {
        Ok(app) => app,
        Err(e) => {
            // Tasks already started (the CRL publisher, restored instances)
            // must end before the runtime does, or they panic as it goes.
            shutdown.drain(GRACE_PERIOD).await;
            return Err(anyhow::Error::new(e).context("the daemon could not start"));
        }
    };
    let result = app.run(shutdown.clone()).await;
    shutdown.drain(GRACE_PERIOD).await;
    result.context("the Workload API server failed")?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// A config error for the terminal: one problem alone on the line after
/// the context, several each on a line of their own.
fn invalid_config(e: config::Error) -> anyhow::Error {
    let context = "the configuration is invalid; the daemon did not start";
    let count = e.invalid().len();
    if count > 1 {
        // The error's text (one problem per line) follows verbatim, so
        // `cli::report` does not repeat it as the cause.
        let text = format!("{context} ({count} problems):\n{e}");
        anyhow::Error::new(e).context(text)
    } else {
        anyhow::Error::new(e).context(context)
    }
}

/// Raises the soft limit on open files to the hard limit: every client
/// connection and stream costs a descriptor, and the usual soft limit of
/// 1024 is soon reached by idle connections alone. Logs the figure; a
/// failure is logged and start-up goes on with the old limit.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit cannot be the soft one (the kernel caps it at
    // fs.nr_open): keep the soft limit then.
    let Some(hard) = limit.maximum else {
        tracing::info!(soft = ?limit.current, "open file limit left as it is (no hard limit)");
        return;
    };
    if limit.current == Some(hard) {
        tracing::info!(limit = hard, "open file limit");
        return;
    }
    let raised = Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(limit = hard, was = ?limit.current, "raised the open file limit to the hard limit")
        }
        Err(e) => {
            tracing::warn!(error = %e, soft = ?limit.current, hard, "cannot raise the open file limit")
        }
    }
}
