//! `sigil run` reloads its config file's entries on SIGHUP: a new entry
//! admits at once, a removed one is revoked (its instances get SVIDs under
//! the entries they still match, the old ones revoked), and an invalid file
//! is refused with every problem logged while the running config stays.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::Agent;
use common::channel;
use sigil::proto::sigil::admin::v1 as pb;
use sigil::proto::sigil::admin::v1::admin_client::AdminClient;

/// The agent child (see `common::agent`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the agent child the other tests run; does nothing on its own"]
async fn agent_child_obeys_commands_on_stdin() {
    common::agent::child_main().await;
}

/// A daemon process started from the binary; killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(entries: &str) -> String {
    format!("trust_domain = \"sigil.test\"\n{entries}")
}

fn entry(name: &str, selectors: &str) -> String {
    format!("[[entry]]\nname = \"{name}\"\nselectors = [{selectors}]\n")
}

async fn entry_names(admin: &mut AdminClient<tonic::transport::Channel>) -> Vec<(String, String)> {
    admin
        .list_entries(pb::ListEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| (e.name, e.source))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_admits_a_new_entry_revokes_a_removed_one_and_keeps_the_running_config_when_the_file_is_invalid()
 {
    let me = nix::unistd::geteuid().as_raw();
    let dir = tempfile::tempdir().unwrap();
    let (file, socket, state, log) = (
        dir.path().join("sigil.toml"),
        dir.path().join("workload.sock"),
        dir.path().join("state"),
        dir.path().join("daemon.log"),
    );
    let uid = format!("\"unix:uid:{me}\"");
    std::fs::write(&file, config(&entry("first", &uid))).unwrap();
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_sigil"))
            .args(["run", "--config"])
            .arg(&file)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let admin_socket = dir.path().join("admin.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin_socket.exists() {
        assert!(Instant::now() < deadline, "the daemon serves");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hangup = || {
        let pid = rustix::process::Pid::from_raw(daemon.0.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    };
    let mut admin = AdminClient::new(channel(&admin_socket).await);

    let mut agent = Agent::start_on(&socket).await;
    let first = agent.fetch().await;
    let old_serial = first[0]["serial"].as_str().unwrap().to_owned();
    assert!(
        first[0]["spiffe_id"]
            .as_str()
            .unwrap()
            .contains("/agent/first/")
    );

    // "first" goes, "second" comes: the agent is reissued under "second" and
    // its "first" SVID is revoked.
    std::fs::write(&file, config(&entry("second", &uid))).unwrap();
    hangup();
    let reissued = agent
        .find(Duration::from_secs(5), |e| {
            e["event"] == "svids"
                && e["svids"][0]["spiffe_id"]
                    .as_str()
                    .is_some_and(|id| id.contains("/agent/second/"))
        })
        .await;
    assert_ne!(reissued["svids"][0]["serial"], old_serial.as_str());
    assert_eq!(
        entry_names(&mut admin).await,
        [("second".to_owned(), "config".to_owned())]
    );
    let revocations = admin
        .list_audit(pb::ListAuditRequest {
            kind: "revocation".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        revocations
            .iter()
            .any(|e| e.detail_json.contains(&old_serial)),
        "the removed entry's SVID is revoked: {revocations:?}"
    );

    // An invalid file: refused, every problem logged, "second" stays.
    std::fs::write(
        &file,
        config(&format!(
            "{}{}",
            entry("third", "\"unix:uid:bob\""),
            entry("fourth fifth", &uid)
        )),
    )
    .unwrap();
    hangup();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("selectors[0]") && text.contains("entry[1].name") {
            assert!(text.contains("the running config stays"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "the problems are logged: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        entry_names(&mut admin).await,
        [("second".to_owned(), "config".to_owned())]
    );
    let mut other = Agent::start_on(&socket).await;
    let svids = other.fetch().await;
    assert!(
        svids[0]["spiffe_id"]
            .as_str()
            .unwrap()
            .contains("/agent/second/")
    );
    drop(daemon);
}
