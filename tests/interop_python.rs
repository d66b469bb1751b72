//! Unmodified py-spiffe (PyPI `spiffe==0.3.2`, gRPC C-core underneath)
//! against the daemon. C-core sends the socket path as HTTP/2 `:authority`;
//! these tests are what proves the daemon's authority repair works.
//!
//! The test creates its own virtualenv under Cargo's target tmp dir on the
//! first run (python3 and access to PyPI needed; as root on Debian it also
//! installs python3-venv if missing), so `cargo test` on a fresh clone
//! installs what it needs by itself.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{TestDaemon, config_for_me};

/// The py-spiffe release under test.
const PY_SPIFFE: &str = "spiffe==0.3.2";
const CHECK_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/py_spiffe_check.py"
);

/// The virtualenv's python, created once per machine (and per release).
fn venv_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| common::venv::python("py-spiffe-0.3.2", &format!("{PY_SPIFFE}\n")))
}

/// Runs the py-spiffe check script against `daemon`, returning its JSON.
async fn py_spiffe(daemon: &TestDaemon, trust_domain: &str, rotation: bool) -> serde_json::Value {
    let mut args = vec![
        CHECK_SCRIPT.to_owned(),
        daemon.endpoint(),
        trust_domain.to_owned(),
    ];
    if rotation {
        args.push("--rotation".to_owned());
    }
    // The daemon runs in this test's runtime: install and wait off its threads.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(venv_python())
            .args(args)
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "py-spiffe failed:\n{stdout}\n{stderr}"
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetches_svid_bundles_and_context_and_sees_a_rotation() {
    let daemon = TestDaemon::start_with(&config_for_me("[svid]\ninstance_ttl = \"4s\"")).await;
    let result = py_spiffe(&daemon, "sigil.test", true).await;
    let id = result["spiffe_id"].as_str().unwrap();
    assert!(
        id.starts_with("spiffe://sigil.test/agent/tester/instance/"),
        "{id}"
    );
    assert_eq!(result["context_default"], result["spiffe_id"]);
    assert_eq!(result["context_svids"], 1);
    assert_eq!(result["bundle_authorities"], 1);
    assert_eq!(result["leaf_signed_by_bundle"], true);
    assert_ne!(
        result["source_first_serial"], result["source_rotated_serial"],
        "X509Source saw a rotation"
    );
    assert_eq!(result["source_rotated_spiffe_id"], result["spiffe_id"]);
    // py-spiffe is another process: the daemon attested it, not us.
    let instances = daemon.identity().instances();
    assert!(instances.iter().all(|i| i.pid != std::process::id()));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigil_fetch_and_py_spiffe_print_the_same_identity_and_bundle() {
    // Without {instance} in the template, every process of the user shares
    // one SPIFFE ID, so two different clients can be compared.
    let toml = format!(
        "trust_domain = \"sigil.test\"\n[[entry]]\nname = \"user\"\nselectors = [\"unix:uid:{}\"]\nspiffe_id = \"spiffe://{{trust_domain}}/user/{{uid}}\"\n",
        nix::unistd::geteuid()
    );
    let daemon = TestDaemon::start_with(&toml).await;
    let py = py_spiffe(&daemon, "sigil.test", false).await;
    let endpoint = daemon.endpoint();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_sigil"))
            .args(["fetch", "x509", "--json", "--socket", &endpoint])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ours[0]["spiffe_id"], py["spiffe_id"]);
    assert_eq!(
        py["spiffe_id"],
        format!("spiffe://sigil.test/user/{}", nix::unistd::geteuid())
    );
    daemon.stop().await;
}
