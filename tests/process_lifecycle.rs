//! Processes that come and go: a process that exits loses its instance at
//! once, and one that execs another binary loses its identity.
//!
//! The agent here is a child process that makes its own requests on its own
//! connections, as a real agent does (the daemon refuses a connection used by
//! any process but the one that opened it): `common::agent::Agent`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::agent::{AGENT_TEST, Agent};
use common::{TestDaemon, config_for_me, crl_serials, eventually, raw_client, with_header};
use serde_json::{Value, json};
use sigil::proto::workload::{X509BundlesRequest, X509BundlesResponse};
use sigil::store::{AuditKind, AuditQuery};
use tokio_stream::StreamExt;

/// The agent child (see `common::agent`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the agent child the other tests run; does nothing on its own"]
async fn agent_child_obeys_commands_on_stdin() {
    common::agent::child_main().await;
}

/// The serials of a list of reported SVIDs.
fn serials(svids: &[Value]) -> BTreeSet<String> {
    svids
        .iter()
        .map(|s| s["serial"].as_str().unwrap().to_owned())
        .collect()
}

/// The SPIFFE IDs of a list of reported SVIDs.
fn spiffe_ids(svids: &[Value]) -> Vec<String> {
    svids
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The real path of this test binary, as /proc/<pid>/exe names it.
fn this_exe() -> String {
    std::fs::read_link("/proc/self/exe")
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// A config with one entry per `(name, program path)`, admitting by path.
fn config_by_path(instance_ttl: &str, entries: &[(&str, &str)]) -> String {
    let mut config =
        format!("trust_domain = \"sigil.test\"\n[svid]\ninstance_ttl = \"{instance_ttl}\"\n");
    for (name, path) in entries {
        config.push_str(&format!(
            "[[entry]]\nname = \"{name}\"\nselectors = [\"unix:path:{path}\"]\n[entry.tasks]\nself_declare = true\n"
        ));
    }
    config
}

/// Waits until the child `pid` runs a program whose path ends with `suffix`.
async fn wait_for_exec(pid: u32, suffix: &str) {
    let exec_done = eventually(Duration::from_secs(5), || {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|p| p.to_string_lossy().ends_with(suffix))
    })
    .await;
    assert!(exec_done, "the child exec'd {suffix}");
}

/// The instance the daemon tracks for `pid`, if any.
fn instance_of(daemon: &TestDaemon, pid: u32) -> Option<String> {
    daemon
        .identity()
        .instances()
        .into_iter()
        .find(|i| i.pid == pid)
        .map(|i| i.instance_id.to_string())
}

/// Opens a verifier's FetchX509Bundles stream from this process.
async fn bundles_stream(daemon: &TestDaemon) -> tonic::Streaming<X509BundlesResponse> {
    raw_client(&daemon.socket)
        .await
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
}

/// Reads the bundles stream until its CRL lists every serial in `wanted`,
/// within `limit`; returns the serials it lists.
async fn wait_for_crl(
    bundles: &mut tonic::Streaming<X509BundlesResponse>,
    wanted: &BTreeSet<String>,
    limit: Duration,
) -> BTreeSet<String> {
    let listed = tokio::time::timeout(limit, async {
        loop {
            let msg = bundles
                .next()
                .await
                .expect("the bundles stream stays open")
                .unwrap();
            let listed: BTreeSet<String> = msg
                .crl
                .first()
                .map(|c| crl_serials(c))
                .unwrap_or_default()
                .into_iter()
                .collect();
            if wanted.is_subset(&listed) {
                return listed;
            }
        }
    })
    .await;
    listed.unwrap_or_else(|_| panic!("{wanted:?} on the CRL within {limit:?}"))
}

/// Every SVID serial the daemon ever minted for `instance` (issued or rotated).
fn minted_for(daemon: &TestDaemon, instance: &str) -> Vec<(SystemTime, String)> {
    [AuditKind::Issuance, AuditKind::Rotation]
        .into_iter()
        .flat_map(|kind| {
            let query = AuditQuery {
                instance_id: Some(instance.to_owned()),
                kind: Some(kind),
                ..Default::default()
            };
            daemon.store().audit(&query).expect("the audit trail reads")
        })
        .filter_map(|e| Some((e.at, e.serial?)))
        .collect()
}

/// How many connections the daemon listening on `socket` holds open: its
/// accepted sockets carry the listener's path, so /proc/net/unix lists them
/// under it, connected (state 03), until the daemon closes them.
fn daemon_connections(socket: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let path = socket.to_string_lossy();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() == 8 && fields[5] == "03" && fields[7] == path
        })
        .count()
}

// --- The tests --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_exits_is_gone_from_the_daemon_within_a_second_and_its_stream_ends() {
    let daemon = TestDaemon::start().await;
    let mut agent = Agent::start(&daemon).await;
    let pid = agent.pid();
    let svids = agent.fetch().await;
    assert!(svids[0]["has_key"].as_bool().unwrap(), "{svids:?}");
    assert!(
        instance_of(&daemon, pid).is_some(),
        "the child is an instance"
    );
    assert_eq!(
        daemon_connections(&daemon.socket),
        1,
        "the daemon holds the child's connection while its stream is open"
    );

    agent.say("exit");
    agent.wait_exit(Duration::from_secs(5)).await;
    let exited = std::time::Instant::now();
    let gone = eventually(Duration::from_secs(1), || {
        instance_of(&daemon, pid).is_none()
    })
    .await;
    assert!(
        gone,
        "instance still there {:?} after exit",
        exited.elapsed()
    );
    // Its stream has ended and the daemon has closed its end of the
    // connection: nothing of the process is left being served.
    let closed = eventually(Duration::from_secs(1), || {
        daemon_connections(&daemon.socket) == 0
    })
    .await;
    assert!(
        closed,
        "the daemon still holds {} connections {:?} after exit",
        daemon_connections(&daemon.socket),
        exited.elapsed()
    );
    drop(agent);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_exit_revokes_its_task_and_instance_svids_and_another_agent_cannot_end_its_task()
{
    let daemon = TestDaemon::start_with(&format!(
        "{}[entry.tasks]\nself_declare = true\n",
        config_for_me("")
    ))
    .await;
    // The child agent, on its own connections, starts a task.
    let mut agent = Agent::start(&daemon).await;
    let pid = agent.pid();
    let first = agent.fetch().await;
    assert_eq!(first.len(), 1);
    assert_eq!(agent.task_command("begin child-job 600").await, "Ok");
    let with_task = agent
        .find(Duration::from_secs(5), |e| {
            e["event"] == "svids" && e["svids"].as_array().is_some_and(|s| s.len() == 2)
        })
        .await;
    let with_task = with_task["svids"].as_array().unwrap().clone();
    assert!(
        with_task[1]["spiffe_id"]
            .as_str()
            .unwrap()
            .ends_with("/task/child-job"),
        "{with_task:?}"
    );
    let child_serials = serials(&with_task);

    // Another agent (another process, so another instance) cannot see or
    // end the child's task.
    let mut other = Agent::start(&daemon).await;
    assert_eq!(other.task_command("end child-job").await, "NotFound");
    other.say("list");
    let listed = other.event("list", Duration::from_secs(5)).await;
    assert_eq!(listed["code"], "Ok");
    assert_eq!(listed["tasks"], json!([]), "the other agent sees no task");
    // ... and the child's task is still there.
    agent.say("list");
    let listed = agent.event("list", Duration::from_secs(5)).await;
    assert_eq!(listed["tasks"], json!(["child-job"]));

    // The child exits: its task ends and every SVID it held is revoked.
    let mut bundles = bundles_stream(&daemon).await;
    agent.say("exit");
    agent.wait_exit(Duration::from_secs(5)).await;
    let revoked = wait_for_crl(&mut bundles, &child_serials, Duration::from_secs(2)).await;
    assert!(revoked.len() >= 2);
    assert!(instance_of(&daemon, pid).is_none());
    // The other agent's identity is untouched.
    assert!(instance_of(&daemon, other.pid()).is_some());
    drop(other);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_execs_another_binary_is_revoked_at_rotation_and_gets_no_further_svid() {
    // Rotation between 50% and 60% of 4s: 2s at the earliest, time enough
    // to fetch, begin a task and exec before it.
    let daemon = TestDaemon::start_with(&config_by_path("4s", &[("agent", &this_exe())])).await;
    let mut agent = Agent::start(&daemon).await;
    let pid = agent.pid();
    let first = agent.fetch().await;
    assert!(
        spiffe_ids(&first)[0].starts_with("spiffe://sigil.test/agent/agent/instance/"),
        "{first:?}"
    );
    assert_eq!(agent.task_command("begin job 600").await, "Ok");
    let with_task = agent
        .find(Duration::from_secs(5), |e| {
            e["event"] == "svids" && e["svids"].as_array().is_some_and(|s| s.len() == 2)
        })
        .await;
    let instance = instance_of(&daemon, pid).expect("the child is an instance");
    let mut bundles = bundles_stream(&daemon).await;

    agent.say("exec /bin/sleep 30"); // same pid, same start time, another program
    wait_for_exec(pid, "/sleep").await;
    let exec_seen = SystemTime::now();
    // Everything the agent printed, it printed before the exec (sleep prints
    // nothing): the SVIDs it held last, and every SVID it ever saw.
    let mut held = serials(with_task["svids"].as_array().unwrap());
    let mut seen = held.clone();
    for event in agent.drain(Duration::from_millis(300)).await {
        if event["event"] == "svids" {
            held = serials(event["svids"].as_array().unwrap());
            seen.extend(held.iter().cloned());
        }
    }

    // At rotation the daemon re-attests, finds /bin/sleep matching no entry,
    // ends the instance and revokes every SVID it held.
    let revoked = wait_for_crl(&mut bundles, &held, Duration::from_secs(8)).await;
    assert!(revoked.len() >= 2);
    let gone = eventually(Duration::from_secs(1), || {
        instance_of(&daemon, pid).is_none()
    })
    .await;
    assert!(gone, "the instance ended");
    // No SVID was minted for it after the exec, so none can have been
    // delivered to anyone: every SVID it ever had is one the agent saw before.
    let minted = minted_for(&daemon, &instance);
    assert!(!minted.is_empty());
    for (at, serial) in &minted {
        assert!(
            seen.contains(serial),
            "SVID {serial} minted at {at:?} for the instance after the exec ({exec_seen:?}); the agent saw {seen:?}"
        );
    }
    // Still nothing later (the daemon has forgotten it, but check anyway).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(minted_for(&daemon, &instance).len(), minted.len());
    assert!(instance_of(&daemon, pid).is_none());
    drop(agent);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_exec_a_new_connection_of_the_new_program_is_attested_as_that_program() {
    // The new program is this test binary under another path (a hard link
    // beside it, or a copy): it speaks the agent protocol, yet its path
    // selector is another one's.
    let exe = this_exe();
    let scratch = tempfile::tempdir_in(Path::new(&exe).parent().unwrap()).unwrap();
    let other_path = scratch.path().join("other-agent");
    if std::fs::hard_link(&exe, &other_path).is_err() {
        std::fs::copy(&exe, &other_path).unwrap();
    }
    let other = other_path.to_string_lossy().into_owned();
    let daemon = TestDaemon::start_with(&config_by_path(
        "1h",
        &[("before", &exe), ("after", &other)],
    ))
    .await;
    let mut agent = Agent::start(&daemon).await;
    let pid = agent.pid();
    let before = agent.fetch().await;
    assert!(
        spiffe_ids(&before)[0].starts_with("spiffe://sigil.test/agent/before/instance/"),
        "{before:?}"
    );
    let before_serials = serials(&before);
    let mut bundles = bundles_stream(&daemon).await;

    // Same pid, another program, which starts afresh and says it is ready.
    agent.say(&format!(
        "exec {other} --exact {AGENT_TEST} --ignored --nocapture"
    ));
    let ready = agent.event("ready", Duration::from_secs(10)).await;
    assert_eq!(ready["pid"], pid);
    assert_eq!(ready["exe"], other.as_str());

    // A request on a new connection of the new program gets the new
    // program's identity, never the old one's SVIDs.
    let after = agent.fetch().await;
    assert!(
        spiffe_ids(&after)
            .iter()
            .all(|id| id.starts_with("spiffe://sigil.test/agent/after/instance/")),
        "the exec'd program got {after:?} (before the exec: {before:?})"
    );
    assert!(
        serials(&after).is_disjoint(&before_serials),
        "the exec'd program was given the old program's SVIDs: {after:?}"
    );
    // And the old program's SVIDs are revoked: it no longer runs.
    wait_for_crl(&mut bundles, &before_serials, Duration::from_secs(2)).await;
    drop(agent);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_of_the_same_uid_does_not_get_a_fresh_begin_burst() {
    // Begin churn by exiting and starting again: the allowance belongs to
    // the entry and the uid, not to one process.
    let exe = std::env::current_exe().unwrap();
    let exe = exe.to_string_lossy().into_owned();
    let config = config_by_path("1h", &[("worker", &exe)]).replace(
        "self_declare = true\n",
        "self_declare = true\nbegin_burst = 3\nbegin_per_second = 0.01\n",
    );
    let daemon = TestDaemon::start_with(&config).await;
    let mut first = Agent::start(&daemon).await;
    for i in 0..3 {
        first.say(&format!("begin job-{i} 60"));
        let done = first.event("begin", Duration::from_secs(10)).await;
        assert_eq!(done["code"], "Ok", "begin {i} within the burst: {done}");
    }
    first.say("exit");
    drop(first);
    let mut second = Agent::start(&daemon).await;
    second.say("begin job-again 60");
    let refused = second.event("begin", Duration::from_secs(10)).await;
    assert_eq!(
        refused["code"], "ResourceExhausted",
        "a new process of the same uid shares the spent burst: {refused}"
    );
    daemon.stop().await;
}
