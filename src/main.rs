//! The `sigil` binary: parse the command line, set up logs, run.

use std::process::ExitCode;

use clap::Parser;

use sigil::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    sigil::telemetry::init(cli.default_log_level(), cli.log_json);
    match cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sigil: {}", cli::report(&e));
            ExitCode::FAILURE
        }
    }
}
