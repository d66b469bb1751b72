//! Unmodified Go clients against the daemon: go-spiffe v2.9.0 (the
//! reference SPIFFE library) and spiffe-helper v0.11.0 (the standard tool
//! that writes SVIDs to files), both from the Go module registry, pinned in
//! `tests/interop/go/go.mod` and `go.sum`. The Go tests
//! (`tests/interop/go/interop_test.go`) check:
//! - `workloadapi.FetchX509Context`: one instance SVID (hint `instance`),
//!   chain verified by `x509svid.Verify`, key matching the leaf, the same
//!   bundle from `FetchX509Bundles`;
//! - an `X509Source` sees a rotation of 4 s SVIDs before the first expires;
//! - FetchJWTSVID, FetchJWTBundles and ValidateJWTSVID answer Unimplemented
//!   at once (Sigil serves X.509-SVIDs only);
//! - `spiffetls` mTLS between this test binary and a child process (two
//!   instances, two SVIDs): `AuthorizeID` on the client and
//!   `AuthorizeMemberOf` on the server authenticate each other, and an
//!   `AuthorizeID` of another ID is refused on either side;
//! - spiffe-helper in daemon mode writes the SVID, key (0600) and bundle,
//!   rewrites them on two rotations, starts its command and signals it with
//!   SIGUSR1 after each rewrite, and the files pass `openssl verify`.
//!
//! Needs Go (on PATH or /usr/local/go/bin) and the module registry on the
//! first run; builds go into Go's own caches.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TestDaemon, config_for_me};

const GO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/go");

/// The `go` command: on PATH, or where the official tarball installs it.
fn go() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("go"))
            .find(|go| go.is_file())
    });
    on_path
        .or_else(|| Some(PathBuf::from("/usr/local/go/bin/go")).filter(|go| go.is_file()))
        .expect("the Go interop tests need Go 1.26 or newer: install it from https://go.dev/dl (to /usr/local/go) or put `go` on PATH")
}

#[tokio::test(flavor = "multi_thread")]
async fn go_spiffe_and_spiffe_helper_work_unmodified() {
    let daemon = TestDaemon::start().await;
    let rotating = TestDaemon::start_with(&config_for_me("[svid]\ninstance_ttl = \"4s\"\n")).await;
    let (socket, rotation_socket) = (daemon.endpoint(), rotating.endpoint());
    let out = tokio::task::spawn_blocking(move || {
        let go = go();
        // Go finds its own tools (and spiffe-helper's build) through PATH.
        let path = std::env::join_paths(std::iter::once(go.parent().unwrap().to_owned()).chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ))
        .unwrap();
        Command::new(&go)
            .args(["test", "-count=1", "-v", "-timeout=5m", "./..."])
            .current_dir(Path::new(GO_DIR))
            .env("PATH", path)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=readonly -buildvcs=false")
            .env("SIGIL_SOCKET", socket)
            .env("SIGIL_ROTATION_SOCKET", rotation_socket)
            .output()
            .expect("go test runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "the Go interop tests failed:\n{stdout}\n{stderr}"
    );
    for test in [
        "TestFetchX509Context",
        "TestX509SourceSeesARotation",
        "TestJWTCallsAnswerUnimplemented",
        "TestSpiffeTLSMutualAuthentication",
        "TestSpiffeHelperDaemonMode",
    ] {
        assert!(
            stdout.contains(&format!("--- PASS: {test} ")),
            "{test} did not pass (skipped?):\n{stdout}"
        );
    }
}
