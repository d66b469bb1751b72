//! `sigil verify x509`, the real binary: valid, revoked, expired, another
//! trust domain, not matching `--allow`, from files; and from the Workload
//! API, an SVID that is valid while its process runs and revoked once the
//! one-shot `sigil fetch` that got it has exited.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{TestDaemon, config_for_me, first_x509, raw_client};
use serde_json::Value;
use sigil::ca::crl::RevokedEntry;
use sigil::ca::{Ca, Svid, SvidRequest};
use sigil::ids::{SpiffeId, TrustDomain};

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

fn new_ca(dir: &Path, td: &str) -> Ca {
    Ca::load_or_create(dir, &TrustDomain::new(td).unwrap()).unwrap()
}

fn svid(ca: &Ca, id: &str, ttl: Duration) -> Svid {
    ca.sign_svid(&SvidRequest {
        spiffe_id: SpiffeId::new(id).unwrap(),
        dns_names: vec![],
        ttl,
        hint: "instance".into(),
    })
    .unwrap()
}

fn write_svid(dir: &Path, name: &str, svid: &Svid) -> String {
    let path = dir.join(name);
    let text: String = svid
        .cert_chain
        .iter()
        .map(|c| pem("CERTIFICATE", c))
        .collect();
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Runs `sigil verify x509 args... --json`: (exit code, report).
fn verify(args: &[&str]) -> (i32, Value) {
    let out = Command::new(SIGIL)
        .args(["verify", "x509"])
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

#[test]
fn files_valid_revoked_expired_foreign_and_not_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = new_ca(&d.join("ca"), "sigil.test");
    let other = new_ca(&d.join("other"), "other.test");
    let bundle = d.join("bundle.pem");
    std::fs::write(&bundle, pem("CERTIFICATE", ca.certificate_der())).unwrap();
    let bundle = bundle.display().to_string();

    let id = "spiffe://sigil.test/agent/bot/instance/1";
    let good = svid(&ca, id, Duration::from_secs(600));
    let revoked = svid(&ca, id, Duration::from_secs(600));
    let short = svid(&ca, id, Duration::from_secs(1));
    let foreign = svid(
        &other,
        "spiffe://other.test/agent/bot",
        Duration::from_secs(600),
    );
    let now = SystemTime::now();
    let crl = ca
        .sign_crl(
            7,
            &[RevokedEntry {
                serial_hex: revoked.serial.clone(),
                revoked_at: now - Duration::from_secs(1),
            }],
            now - Duration::from_secs(60),
            now + Duration::from_secs(600),
        )
        .unwrap();
    let crl_path = d.join("crl.pem");
    std::fs::write(&crl_path, pem("X509 CRL", &crl)).unwrap();
    let crl_path = crl_path.display().to_string();
    let files = |name: &str, s: &Svid| write_svid(d, name, s);
    let (good, revoked, short, foreign) = (
        files("good.pem", &good),
        files("revoked.pem", &revoked),
        files("short.pem", &short),
        files("foreign.pem", &foreign),
    );

    let (code, report) = verify(&[&good, "--bundle", &bundle, "--crl", &crl_path]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["spiffe_id"], id);
    assert_eq!(report["crl_checked"], true);
    assert_eq!(
        report["trust_domain"], "sigil.test",
        "read from the CA's URI SAN"
    );

    let (code, report) = verify(&[&revoked, "--bundle", &bundle, "--crl", &crl_path]);
    assert_eq!(code, 1);
    assert!(
        report["problem"].as_str().unwrap().contains("revoked"),
        "{report}"
    );

    // Past its 1 s lifetime, whole seconds as X.509 keeps them, with room.
    std::thread::sleep(Duration::from_millis(3000));
    let (code, report) = verify(&[&short, "--bundle", &bundle]);
    assert_eq!(code, 1);
    assert!(
        report["problem"].as_str().unwrap().contains("expired"),
        "{report}"
    );

    let (code, report) = verify(&[&foreign, "--bundle", &bundle]);
    assert_eq!(code, 1);
    assert!(
        report["problem"]
            .as_str()
            .unwrap()
            .contains("not in trust domain sigil.test"),
        "{report}"
    );

    let (code, report) = verify(&[
        &good,
        "--bundle",
        &bundle,
        "--allow",
        "spiffe://sigil.test/agent/other/**",
    ]);
    assert_eq!(code, 1);
    assert!(
        report["problem"].as_str().unwrap().contains("not allowed"),
        "{report}"
    );
    let (code, _) = verify(&[
        &good,
        "--bundle",
        &bundle,
        "--allow",
        "spiffe://sigil.test/agent/*/**",
    ]);
    assert_eq!(code, 0);

    // A bad pattern or file is an error with its reason, not a verdict.
    let out = Command::new(SIGIL)
        .args([
            "verify",
            "x509",
            &good,
            "--bundle",
            &bundle,
            "--allow",
            "spiffe://td/**/x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'**' may only be the last segment"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_the_workload_api_an_svid_is_valid_while_its_process_runs_and_revoked_after() {
    let daemon = TestDaemon::start_with(&config_for_me("")).await;
    let socket = daemon.socket.display().to_string();
    let dir = tempfile::tempdir().unwrap();

    // This process's own SVID: valid while it runs.
    let mine = first_x509(&mut raw_client(&daemon.socket).await).await;
    let chain_pem: String = pem("CERTIFICATE", &mine.svids[0].x509_svid);
    let mine_path = dir.path().join("mine.pem");
    std::fs::write(&mine_path, chain_pem).unwrap();
    let mine_path = mine_path.display().to_string();
    // (Subprocesses block a worker; the daemon has the other.)
    let (code, report) = verify(&[&mine_path, "--socket", &socket]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        report["crl_checked"], true,
        "the CRL came from the Workload API"
    );

    // A one-shot `sigil fetch` writes its SVID and exits: revoked with it.
    let out_dir = dir.path().join("fetched");
    let fetched = Command::new(SIGIL)
        .args(["fetch", "x509", "--socket", &socket, "--write"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(fetched.status.success(), "{fetched:?}");
    let svid = out_dir.join("svid.pem").display().to_string();
    let revoked = common::eventually(Duration::from_secs(5), || {
        let (code, report) = verify(&[&svid, "--socket", &socket]);
        code == 1
            && report["problem"]
                .as_str()
                .is_some_and(|p| p.contains("revoked"))
    })
    .await;
    assert!(revoked, "the exited fetch's SVID is reported revoked");
    daemon.stop().await;
}
