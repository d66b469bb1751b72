//! The `sigil` binary: parse the command line, set up logs, build the
//! runtime, run.

use std::process::ExitCode;

use clap::Parser;

use sigil::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    sigil::telemetry::init(cli.default_log_level(), cli.log_json);
    let runtime = match sigil::app::runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sigil: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sigil: {}", cli::report(&e));
            ExitCode::FAILURE
        }
    }
}
