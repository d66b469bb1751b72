//! `sigil run`: load the config, build the daemon, serve until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::app::App;
use crate::config::{Config, Overrides};
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
    };
    let config = Config::load(args.config.as_deref(), &overrides)
        .context("the configuration is invalid; the daemon did not start")?;
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
