//! The `sigil` binary: parse the command line, set up logs, build the
//! runtime, run.

use std::process::ExitCode;

use clap::Parser;

use sigil::cli::{self, Cli};

/// jemalloc, configured in `sys::JEMALLOC_CONF`: glibc's malloc kept 118 to
/// 190 MiB after 10,000 streams closed (5 MiB of it live), jemalloc 28 MiB
/// (BENCHMARKS.md "Memory after load").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Keeps jemalloc's options (`sys::JEMALLOC_CONF`) linked into the binary.
    std::hint::black_box(sigil::sys::JEMALLOC_CONF);
    let cli = Cli::parse();
    if !cli.is_daemon() {
        sigil::sys::default_sigpipe();
    }
    sigil::telemetry::init(cli.default_log_level(), cli.log_json);
    let runtime = match sigil::app::runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sigil: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(cli::run(cli));
    // Blocking work stuck on a hung /proc read must not keep the process
    // from exiting once everything else has stopped.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sigil: {}", cli::report(&e));
            ExitCode::FAILURE
        }
    }
}
