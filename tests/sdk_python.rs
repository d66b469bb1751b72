//! The Python SDK (`clients/python`, the `sigil-agent` package) against the
//! real daemon. The test builds a virtualenv under Cargo's target tmp dir
//! from `clients/python/requirements-test.txt` (python3 and PyPI needed on
//! the first run), installs the package into it from source as a user
//! would (`pip install`, no editable mode, so what is tested is what ships),
//! and runs the package's pytest suite with `SIGIL_BIN` set to the `sigil`
//! binary Cargo built. The suite starts its own daemons (`sigil run`), a
//! `sigil gate` and an MCP server; see `clients/python/tests/`. It checks:
//! - the shipped gRPC stubs match `proto/sigil/workload/v1/tasks.proto`, and
//!   the package type-checks with `mypy --strict`;
//! - task lifecycle: the task SVID is on the stream when the block starts;
//!   End on normal exit, on an exception and on a real SIGINT; refusals
//!   raise `TaskRefused` with the daemon's reason; the async variant, also
//!   when its block is cancelled;
//! - `ssl_context` keeps working across three rotations of 4 s SVIDs while
//!   an HTTPS server checks the client's SPIFFE ID; the CRL is enforced by
//!   the SDK's server and client contexts (an ended task's key is refused);
//! - the private key never reaches a file: a child agent serving and making
//!   a TLS call under strace opens nothing for writing (strace is installed
//!   with apt-get when the suite runs as root on Debian and it is missing;
//!   otherwise that one test is skipped, and nothing else may be);
//! - the MCP example: agent → `sigil gate` → MCP server, each job's tool
//!   call arrives as that job's task.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::path::Path;
use std::process::Command;

const PACKAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python");
const REQUIREMENTS: &str = include_str!("../clients/python/requirements-test.txt");
const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");

#[test]
fn the_python_sdk_suite_passes_against_the_daemon() {
    let python = common::venv::python("sdk-venv", REQUIREMENTS);
    common::venv::apt_install_if_missing("/usr/bin/strace", "strace");
    let install = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--no-deps",
            "--no-build-isolation",
            "--force-reinstall",
            PACKAGE,
        ])
        .status()
        .expect("pip runs");
    assert!(install.success(), "pip install {PACKAGE} failed");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"])
        .arg(Path::new(PACKAGE).join("tests"))
        .current_dir(PACKAGE)
        .env("SIGIL_BIN", SIGIL)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .expect("pytest runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "the sigil-agent suite failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed"), "no test ran: {stdout}");
    for skip in stdout.lines().filter(|l| l.starts_with("SKIPPED")) {
        assert!(
            skip.contains("strace"),
            "only the strace test may skip: {skip}"
        );
    }
}
