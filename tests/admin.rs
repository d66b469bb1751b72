//! The operators' admin API, through its socket: listing attested agents
//! (another process each, see `common::agent`), the orchestrator's tasks,
//! revocation of an instance, an SVID and an entry, stored entries across a
//! restart, and the audit trail with its hash chain.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::agent::Agent;
use common::{TestDaemon, admin_client, config_for_me, crl_serials};
use serde_json::Value;
use sigil::proto::sigil::admin::v1 as pb;

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

/// Waits until the CRL the daemon publishes (what every bundle stream
/// carries) lists every serial of `wanted`.
async fn crl_lists(daemon: &TestDaemon, wanted: &BTreeSet<String>, limit: Duration) -> bool {
    let mut bundle = daemon.identity().bundle();
    tokio::time::timeout(limit, async {
        loop {
            let listed: BTreeSet<String> = bundle
                .borrow_and_update()
                .crls
                .first()
                .map(|c| crl_serials(c))
                .unwrap_or_default()
                .into_iter()
                .collect();
            if wanted.is_subset(&listed) {
                return true;
            }
            if bundle.changed().await.is_err() {
                return false;
            }
        }
    })
    .await
    .unwrap_or(false)
}

fn instance_id_of(list: &[pb::Instance], pid: u32) -> String {
    list.iter()
        .find(|i| i.pid == pid)
        .unwrap_or_else(|| panic!("pid {pid} listed in {list:?}"))
        .instance_id
        .clone()
}

async fn list(daemon: &TestDaemon) -> Vec<pb::Instance> {
    admin_client(daemon)
        .await
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .instances
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_listed_with_their_selectors_and_ids_a_child_under_its_parent_and_a_task_ended_by_the_operator_leaves_the_stream_and_enters_the_crl()
 {
    let daemon = TestDaemon::start_with(&config_for_me("[svid]\ninstance_ttl = \"1h\"")).await;
    let mut a = Agent::start(&daemon).await;
    let mut b = Agent::start(&daemon).await;
    let a_pid = a.pid();
    a.fetch().await;
    b.fetch().await;
    a.say("spawn");
    let child = a.event("spawned", Duration::from_secs(10)).await["child"]
        .as_u64()
        .unwrap() as u32;
    // The child agent's first SVIDs, on the stdout it shares with `a`.
    a.find(Duration::from_secs(10), |e| {
        e["event"] == "svids" && e["from"] == child
    })
    .await;

    let instances = list(&daemon).await;
    assert_eq!(instances.len(), 3, "{instances:?}");
    let (a_id, b_id, child_id) = (
        instance_id_of(&instances, a_pid),
        instance_id_of(&instances, b.pid()),
        instance_id_of(&instances, child),
    );
    for i in &instances {
        assert_eq!(i.entries, ["tester"]);
        assert!(
            i.selectors
                .iter()
                .any(|s| s.r#type == "unix" && s.key == "uid"),
            "{i:?}"
        );
        assert!(
            i.svids[0]
                .spiffe_id
                .ends_with(&format!("/instance/{}", i.instance_id)),
            "{i:?}"
        );
        assert!(i.ended_at.is_none());
    }
    let by_id = |id: &str| instances.iter().find(|i| i.instance_id == id).unwrap();
    assert_eq!(
        by_id(&child_id).parent_instance_id,
        a_id,
        "the child is under a"
    );
    assert_eq!(
        by_id(&a_id).parent_instance_id,
        "",
        "a has no attested parent"
    );
    assert_eq!(by_id(&b_id).parent_instance_id, "");

    // The orchestrator starts a task on `a` and ends it.
    let mut admin = admin_client(&daemon).await;
    let task = admin
        .begin_task(pb::BeginTaskRequest {
            instance: Some(pb::begin_task_request::Instance::Pid(a_pid)),
            task_id: "summarize-42".into(),
            ttl: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            attributes: [("ticket".to_owned(), "42".to_owned())].into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(task.instance_id, a_id);
    assert!(task.started_by.starts_with("admin uid:"), "{task:?}");
    let with_task = a
        .find(Duration::from_secs(5), |e| {
            e["event"] == "svids" && e["from"] == a_pid && e["svids"].as_array().unwrap().len() == 2
        })
        .await;
    let task_serial = with_task["svids"][1]["serial"].as_str().unwrap().to_owned();
    let tasks = admin
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].task_id, "summarize-42");
    assert_eq!(tasks[0].attributes["ticket"], "42");

    let ended_at = std::time::Instant::now();
    admin
        .end_task(pb::EndTaskRequest {
            instance_id: a_id.clone(),
            task_id: "summarize-42".into(),
        })
        .await
        .unwrap();
    a.find(Duration::from_secs(1), |e| {
        e["event"] == "svids" && e["from"] == a_pid && e["svids"].as_array().unwrap().len() == 1
    })
    .await;
    assert!(ended_at.elapsed() < Duration::from_secs(1));
    assert!(
        crl_lists(
            &daemon,
            &BTreeSet::from([task_serial]),
            Duration::from_secs(2)
        )
        .await,
        "the ended task's SVID is on the CRL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_instance_svid_or_entry_ends_the_stream_with_permission_denied_lists_its_serials_and_refuses_the_next_request()
 {
    let me = nix::unistd::geteuid();
    let daemon = TestDaemon::start_with(&format!(
        "trust_domain = \"sigil.test\"\n[[entry]]\nname = \"tester\"\nselectors = [\"unix:uid:{me}\"]\n"
    ))
    .await;
    let mut admin = admin_client(&daemon).await;
    for how in ["instance", "svid", "entry"] {
        let mut agent = Agent::start(&daemon).await;
        let svids = agent.fetch().await;
        let id = instance_id_of(&list(&daemon).await, agent.pid());
        let revoked = match how {
            "instance" => {
                admin
                    .revoke_instance(pb::RevokeInstanceRequest {
                        instance: Some(pb::revoke_instance_request::Instance::InstanceId(
                            id.clone(),
                        )),
                        reason: "compromised".into(),
                    })
                    .await
            }
            "svid" => {
                admin
                    .revoke_svid(pb::RevokeSvidRequest {
                        serial: svids[0]["serial"].as_str().unwrap().to_owned(),
                        reason: String::new(),
                    })
                    .await
            }
            _ => {
                admin
                    .revoke_entry(pb::RevokeEntryRequest {
                        name: "tester".into(),
                        reason: String::new(),
                    })
                    .await
            }
        }
        .unwrap_or_else(|e| panic!("revoke {how}: {e}"))
        .into_inner();
        assert!(revoked.instance_ids.contains(&id), "{how}: {revoked:?}");
        let end = agent.event("stream_end", Duration::from_secs(2)).await;
        assert_eq!(end["code"], "PermissionDenied", "{how}: {end}");
        assert!(
            crl_lists(&daemon, &serials(&svids), Duration::from_secs(2)).await,
            "{how}: its serials are on the CRL"
        );
        agent.say("fetch");
        let again = agent.event("stream_end", Duration::from_secs(5)).await;
        assert_eq!(again["code"], "PermissionDenied", "{how}: refused again");
        assert!(
            again["message"].as_str().unwrap().contains("revoked"),
            "{how}: {again}"
        );
    }
    // Unknown things are named, not crashed on.
    let missing = admin
        .revoke_svid(pb::RevokeSvidRequest {
            serial: "00ff".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let bad = admin
        .revoke_instance(pb::RevokeInstanceRequest {
            instance: Some(pb::revoke_instance_request::Instance::InstanceId(
                "../x".into(),
            )),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

fn stored_entry(name: &str, uid: u32) -> pb::Entry {
    pb::Entry {
        name: name.into(),
        selectors: vec![format!("unix:uid:{uid}")],
        owner: "team-research".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_entry_admits_a_new_process_without_restart_survives_a_restart_and_deleting_it_revokes()
 {
    let me = nix::unistd::geteuid().as_raw();
    // The config admits nobody this test runs as.
    let config = "trust_domain = \"sigil.test\"\n[[entry]]\nname = \"others\"\nselectors = [\"unix:uid:4242\"]\n";
    let daemon = TestDaemon::start_with(config).await;
    let mut refused = Agent::start(&daemon).await;
    refused.say("fetch");
    let end = refused.event("stream_end", Duration::from_secs(5)).await;
    assert_eq!(end["code"], "PermissionDenied");

    let mut admin = admin_client(&daemon).await;
    let invalid = admin
        .create_entry(pb::CreateEntryRequest {
            entry: Some(pb::Entry {
                selectors: vec!["unix:uid:bob".into()],
                ..stored_entry("bad entry", me)
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert!(invalid.message().contains("name"), "{}", invalid.message());
    assert!(
        invalid.message().contains("selectors[0]"),
        "every problem: {}",
        invalid.message()
    );
    let taken = admin
        .create_entry(pb::CreateEntryRequest {
            entry: Some(stored_entry("others", me)),
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), tonic::Code::AlreadyExists);

    let created = admin
        .create_entry(pb::CreateEntryRequest {
            entry: Some(stored_entry("agents", me)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (created.source.as_str(), created.owner.as_str()),
        ("stored", "team-research")
    );
    let mut agent = Agent::start(&daemon).await;
    let svids = agent.fetch().await;
    assert!(
        svids[0]["spiffe_id"]
            .as_str()
            .unwrap()
            .contains("/agent/agents/")
    );
    let deleting_config = admin
        .delete_entry(pb::DeleteEntryRequest {
            name: "others".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(deleting_config.code(), tonic::Code::FailedPrecondition);
    drop(agent);

    // A restart keeps it.
    let dir = daemon.stop().await;
    let daemon = TestDaemon::start_in(dir, config).await;
    let mut admin = admin_client(&daemon).await;
    let entries = admin
        .list_entries(pb::ListEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    let names: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.source.as_str()))
        .collect();
    assert_eq!(names, [("others", "config"), ("agents", "stored")]);
    let mut agent = Agent::start(&daemon).await;
    let svids = agent.fetch().await;

    // Deleting it revokes what was issued under it.
    let deleted = admin
        .delete_entry(pb::DeleteEntryRequest {
            name: "agents".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .revoked
        .unwrap();
    assert!(serials(&svids).is_subset(&deleted.serials.iter().cloned().collect()));
    let end = agent.event("stream_end", Duration::from_secs(2)).await;
    assert_eq!(end["code"], "PermissionDenied", "{end}");
    assert!(crl_lists(&daemon, &serials(&svids), Duration::from_secs(2)).await);
    agent.say("fetch");
    let again = agent.event("stream_end", Duration::from_secs(5)).await;
    assert_eq!(again["code"], "PermissionDenied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_shows_each_event_in_order_and_a_tampered_row_is_named() {
    let daemon = TestDaemon::start_with(&config_for_me("")).await;
    let mut agent = Agent::start(&daemon).await;
    agent.fetch().await;
    let mut admin = admin_client(&daemon).await;
    let id = instance_id_of(&list(&daemon).await, agent.pid());
    admin
        .revoke_instance(pb::RevokeInstanceRequest {
            instance: Some(pb::revoke_instance_request::Instance::InstanceId(
                id.clone(),
            )),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let events = admin
        .list_audit(pb::ListAuditRequest {
            instance_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["attestation", "issuance", "instance_end"],
        "{events:?}"
    );
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let admin_calls = admin
        .list_audit(pb::ListAuditRequest {
            kind: "admin".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        admin_calls
            .iter()
            .any(|e| e.detail_json.contains("RevokeInstance") && e.actor.starts_with("admin uid:")),
        "{admin_calls:?}"
    );
    let verdict = admin
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.intact, "{verdict:?}");

    // Tamper with the issuance row behind the daemon's back.
    let victim = events[1].seq;
    let db = daemon.state_dir.join("sigil.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(&format!(
        "DROP TRIGGER audit_no_update; UPDATE audit SET actor = 'nobody' WHERE seq = {victim};"
    ))
    .unwrap();
    drop(conn);
    let verdict = admin
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!verdict.intact);
    assert_eq!(verdict.first_bad_seq, victim, "{verdict:?}");
}
