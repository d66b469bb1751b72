//! The README's five-minute walk-through, run as written so the docs
//! cannot rot: the first `sh` block under "A five-minute walk-through" is
//! extracted from README.md and run with `bash -euo pipefail` against a
//! fresh daemon. The one line changed is the build: `cargo build
//! --release && export PATH=…` becomes a PATH export of the binary this
//! test suite built.
//!
//! As root it runs twice: as root, in a private mount namespace whose
//! `/run/sigil` and `/var/lib/sigil` are fresh tmpfs (root's default
//! paths, left untouched on the machine); and as `nobody` (uid 65534, no
//! home, no `XDG_RUNTIME_DIR`: the `/tmp/sigil-65534` fallback) with a
//! minimal environment. Otherwise it runs once as the current user, with
//! its XDG directories in a temp dir. Needs python3 with venv, openssl and
//! PyPI (step 4 installs py-spiffe).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const README: &str = include_str!("../README.md");
const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");
const BUILD_LINE: &str = "cargo build --release && export PATH=\"$PWD/target/release:$PATH\"";

/// The walk-through's shell block, with the build line replaced by a PATH
/// export of `bin_dir`.
fn walkthrough(bin_dir: &Path) -> String {
    let section = README
        .split("## A five-minute walk-through")
        .nth(1)
        .expect("README has the walk-through section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the section has an sh block");
    assert!(
        block.lines().any(|l| l == BUILD_LINE),
        "the walk-through builds with: {BUILD_LINE}"
    );
    block.replace(
        BUILD_LINE,
        &format!("export PATH=\"{}:$PATH\"", bin_dir.display()),
    )
}

/// A directory everyone may use, holding a copy of the binary and the
/// script (`nobody` cannot be relied on to reach the build tree).
fn stage() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(SIGIL, bin.join("sigil")).unwrap();
    let script = dir.path().join("walkthrough.sh");
    std::fs::write(&script, walkthrough(&bin)).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    (dir, script.display().to_string())
}

fn check(who: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the walk-through failed as {who}:\n{stdout}\n{stderr}"
    );
    for expected in [
        "endpoint=unix://",
        "ca=/",
        "store=/",
        "SPIFFE ID:  spiffe://sigil.local/agent/",
        "URI:spiffe://sigil.local/agent/",
        "svid/svid.pem: OK",
    ] {
        assert!(
            stdout.contains(expected),
            "as {who}, no {expected:?} in:\n{stdout}\n{stderr}"
        );
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("spiffe://sigil.local/agent/") && l.contains(" 0x")),
        "as {who}, py-spiffe printed no SVID:\n{stdout}\n{stderr}"
    );
}

fn run_with_timeout(mut cmd: Command, who: &str) -> Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &id.to_string()]).status();
            panic!("the walk-through as {who} did not finish within 5 minutes");
        }
    }
}

#[test]
fn the_readme_walkthrough_works_as_written() {
    let (dir, script) = stage();
    let tmp = dir.path().display().to_string();
    if !nix::unistd::geteuid().is_root() {
        let xdg = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("bash");
        cmd.args(["-euo", "pipefail", &script])
            .env("TMPDIR", &tmp)
            .env("XDG_RUNTIME_DIR", xdg.path())
            .env("XDG_STATE_HOME", xdg.path().join("state"))
            .env_remove("SPIFFE_ENDPOINT_SOCKET");
        check("this user", &run_with_timeout(cmd, "this user"));
        return;
    }

    // As root, in a mount namespace of its own with fresh default dirs.
    for d in ["/run/sigil", "/var/lib/sigil"] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs -o mode=0755 tmpfs /run/sigil && \
         mount -t tmpfs -o mode=0700 tmpfs /var/lib/sigil && \
         exec bash -euo pipefail \"$0\"",
        &script,
    ])
    .env("TMPDIR", &tmp)
    .env_remove("SPIFFE_ENDPOINT_SOCKET")
    .env_remove("XDG_RUNTIME_DIR");
    check("root", &run_with_timeout(cmd, "root"));

    // As nobody: no home, no runtime dir, a minimal environment.
    if let Some(why) = common::cannot_run_as_nobody() {
        eprintln!("{why}: the walk-through as nobody is skipped");
        return;
    }
    let _ = std::fs::remove_dir_all("/tmp/sigil-65534");
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "env",
        "-i",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "HOME=/nonexistent",
        "LANG=C.UTF-8",
        &format!("TMPDIR={tmp}"),
        "bash",
        "-euo",
        "pipefail",
        &script,
    ]);
    let out = run_with_timeout(cmd, "nobody");
    let _ = std::fs::remove_dir_all("/tmp/sigil-65534");
    check("nobody", &out);
}
