//! The operators' commands as operators run them: the real `sigil` binary
//! with `--admin-socket` against a daemon in process (`TestDaemon`) with
//! agent children (`common::agent`).
//!
//! The rule: each command's human output is checked once (exit 0,
//! the header row's column names, one real value), its JSON output fully
//! (every field's name, and its value checked against what the gRPC API or
//! the daemon says; times are RFC 3339 or null). The behaviour behind the
//! commands is tested through the gRPC client in tests/admin.rs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the test failing"
)]

mod common;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::Agent;
use common::{TRUST_DOMAIN, TestDaemon, admin_client};
use serde_json::{Value, json};
use sigil::proto::sigil::admin::v1 as pb;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const SIGIL: &str = env!("CARGO_BIN_EXE_sigil");

/// The agent child (see `common::agent`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the agent child the other tests run; does nothing on its own"]
async fn agent_child_obeys_commands_on_stdin() {
    common::agent::child_main().await;
}

// --- Running the binary ----------------------------------------------------------------

/// What one `sigil` run printed and how it exited.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts exit 0 and returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "{self:?}");
        &self.stdout
    }

    /// Asserts exit 0 and parses stdout as one JSON value.
    fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// The command line for `sigil args... --admin-socket socket`.
fn command(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(SIGIL);
    cmd.args(args)
        .arg("--admin-socket")
        .arg(socket)
        .env_remove("SIGIL_ADMIN_SOCKET")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs `sigil args...` on `socket` to its end, off the runtime the
/// daemon serves on.
async fn sigil_on(socket: &Path, args: &[&str]) -> Run {
    let mut cmd = command(socket, args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("sigil runs"))
        .await
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs `sigil args...` against `daemon`.
async fn sigil(daemon: &TestDaemon, args: &[&str]) -> Run {
    sigil_on(&daemon.admin_socket, args).await
}

/// Runs `sigil args... --json` against `daemon`; exit 0 and JSON.
async fn sigil_json(daemon: &TestDaemon, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    sigil(daemon, &args).await.json()
}

/// A table's header names (columns are two or more spaces apart).
fn header_cells(text: &str) -> Vec<String> {
    text.lines()
        .next()
        .unwrap_or_default()
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

// --- Checking JSON ---------------------------------------------------------------------

/// The object's field names, sorted.
fn keys(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("an object: {v}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

/// Asserts `v` has exactly these fields.
fn assert_fields(v: &Value, expected: &[&str]) {
    let mut expected: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
    expected.sort();
    assert_eq!(keys(v), expected, "{v:#}");
}

/// An RFC 3339 time in JSON.
fn time_of(v: &Value) -> OffsetDateTime {
    let text = v
        .as_str()
        .unwrap_or_else(|| panic!("an RFC 3339 string: {v}"));
    OffsetDateTime::parse(text, &Rfc3339).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// Asserts the JSON time is the protobuf one (null for unset), exactly.
fn assert_time(v: &Value, ts: Option<&prost_types::Timestamp>, what: &str) {
    match ts.filter(|t| t.seconds != 0 || t.nanos != 0) {
        None => assert!(v.is_null(), "{what}: {v}"),
        Some(t) => assert_eq!(
            time_of(v).unix_timestamp_nanos(),
            i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
            "{what}: {v}"
        ),
    }
}

/// An empty string is null in the CLI's JSON.
fn opt(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

const SVID_FIELDS: &[&str] = &[
    "serial",
    "spiffe_id",
    "hint",
    "not_before",
    "not_after",
    "revoked_at",
    "revoke_reason",
    "instance_id",
    "task_id",
];

fn assert_svid(v: &Value, s: &pb::Svid) {
    assert_fields(v, SVID_FIELDS);
    assert_eq!(v["serial"], s.serial);
    assert_eq!(v["spiffe_id"], s.spiffe_id);
    assert_eq!(v["hint"], s.hint);
    assert_time(&v["not_before"], s.not_before.as_ref(), "not_before");
    assert_time(&v["not_after"], s.not_after.as_ref(), "not_after");
    assert!(time_of(&v["not_before"]) < time_of(&v["not_after"]), "{v}");
    assert_time(&v["revoked_at"], s.revoked_at.as_ref(), "revoked_at");
    assert_eq!(v["revoke_reason"], opt(&s.revoke_reason));
    assert_eq!(v["instance_id"], s.instance_id);
    assert_eq!(v["task_id"], opt(&s.task_id));
}

const TASK_FIELDS: &[&str] = &[
    "instance_id",
    "task_id",
    "spiffe_id",
    "started_at",
    "expires_at",
    "attributes",
    "started_by",
];

fn assert_task(v: &Value, t: &pb::Task) {
    assert_fields(v, TASK_FIELDS);
    assert_eq!(v["instance_id"], t.instance_id);
    assert_eq!(v["task_id"], t.task_id);
    assert_eq!(v["spiffe_id"], t.spiffe_id);
    assert_time(&v["started_at"], t.started_at.as_ref(), "started_at");
    assert_time(&v["expires_at"], t.expires_at.as_ref(), "expires_at");
    assert_eq!(v["attributes"], json!(t.attributes));
    assert_eq!(v["started_by"], opt(&t.started_by));
}

const INSTANCE_FIELDS: &[&str] = &[
    "instance_id",
    "pid",
    "uid",
    "exe",
    "state",
    "entries",
    "owners",
    "selectors",
    "parent_instance_id",
    "svids",
    "tasks",
    "started_at",
    "last_seen",
    "ended_at",
    "end_kind",
    "end_reason",
];

/// Asserts an instance in the CLI's JSON is the gRPC API's, field by field.
fn assert_instance(v: &Value, i: &pb::Instance) {
    assert_fields(v, INSTANCE_FIELDS);
    assert_eq!(v["instance_id"], i.instance_id);
    assert_eq!(v["pid"], i.pid);
    assert_eq!(v["uid"], i.uid);
    assert_eq!(v["exe"], i.exe);
    assert!(!i.exe.is_empty(), "{i:?}");
    assert_eq!(
        v["state"],
        if i.ended_at.is_some() {
            "ended"
        } else {
            "live"
        }
    );
    assert_eq!(v["entries"], json!(i.entries));
    assert_eq!(v["owners"], json!(i.owners));
    let selectors: Vec<String> = i
        .selectors
        .iter()
        .map(|s| format!("{}:{}:{}", s.r#type, s.key, s.value))
        .collect();
    assert_eq!(v["selectors"], json!(selectors));
    assert_eq!(v["parent_instance_id"], opt(&i.parent_instance_id));
    let svids = v["svids"].as_array().expect("svids is a list");
    assert_eq!(svids.len(), i.svids.len(), "{v:#}");
    for (json, svid) in svids.iter().zip(&i.svids) {
        assert_svid(json, svid);
    }
    let tasks = v["tasks"].as_array().expect("tasks is a list");
    assert_eq!(tasks.len(), i.tasks.len(), "{v:#}");
    for (json, task) in tasks.iter().zip(&i.tasks) {
        assert_task(json, task);
    }
    assert_time(&v["started_at"], i.started_at.as_ref(), "started_at");
    // Refreshed while the instance is live: a time, at or after its start.
    assert!(time_of(&v["last_seen"]) >= time_of(&v["started_at"]), "{v}");
    assert_time(&v["ended_at"], i.ended_at.as_ref(), "ended_at");
    assert_eq!(v["end_kind"], opt(&i.end_kind));
    assert_eq!(v["end_reason"], opt(&i.end_reason));
}

const REVOKED_FIELDS: &[&str] = &["instance_ids", "task_ids", "serials"];

const ENTRY_FIELDS: &[&str] = &[
    "name",
    "source",
    "owner",
    "selectors",
    "spiffe_id",
    "ttl_seconds",
    "dns_names",
    "tasks",
    "created_at",
    "created_by",
    "live_instances",
];

/// Asserts an entry in the CLI's JSON is the gRPC API's, field by field.
fn assert_entry(v: &Value, e: &pb::Entry) {
    assert_fields(v, ENTRY_FIELDS);
    assert_eq!(v["name"], e.name);
    assert_eq!(v["source"], e.source);
    assert_eq!(v["owner"], opt(&e.owner));
    assert_eq!(v["selectors"], json!(e.selectors));
    assert_eq!(v["spiffe_id"], opt(&e.spiffe_id));
    assert_eq!(v["ttl_seconds"], json!(e.ttl.as_ref().map(|d| d.seconds)));
    assert_eq!(v["dns_names"], json!(e.dns_names));
    match &e.tasks {
        None => assert!(v["tasks"].is_null(), "{v}"),
        Some(t) => {
            let j = &v["tasks"];
            assert_fields(
                j,
                &[
                    "self_declare",
                    "max_ttl_seconds",
                    "max_concurrent",
                    "id_pattern",
                    "begin_burst",
                    "begin_per_second",
                ],
            );
            assert_eq!(j["self_declare"], t.self_declare);
            assert_eq!(
                j["max_ttl_seconds"],
                json!(t.max_ttl.as_ref().map(|d| d.seconds))
            );
            assert_eq!(j["max_concurrent"], t.max_concurrent);
            assert_eq!(j["id_pattern"], opt(&t.id_pattern));
            assert_eq!(j["begin_burst"], t.begin_burst);
            assert_eq!(j["begin_per_second"].as_f64(), Some(t.begin_per_second));
        }
    }
    assert_time(&v["created_at"], e.created_at.as_ref(), "created_at");
    assert_eq!(v["created_by"], opt(&e.created_by));
    assert_eq!(v["live_instances"], e.live_instances);
}

const EVENT_FIELDS: &[&str] = &[
    "seq",
    "at",
    "kind",
    "actor",
    "instance_id",
    "task_id",
    "spiffe_id",
    "serial",
    "detail",
    "hash",
];

/// Asserts an audit event in the CLI's JSON is the gRPC API's.
fn assert_event(v: &Value, e: &pb::AuditEvent) {
    assert_fields(v, EVENT_FIELDS);
    assert_eq!(v["seq"], e.seq);
    assert_time(&v["at"], e.at.as_ref(), "at");
    assert_eq!(v["kind"], e.kind);
    assert_eq!(v["actor"], e.actor);
    assert_eq!(v["instance_id"], opt(&e.instance_id));
    assert_eq!(v["task_id"], opt(&e.task_id));
    assert_eq!(v["spiffe_id"], opt(&e.spiffe_id));
    assert_eq!(v["serial"], opt(&e.serial));
    let detail: Value = if e.detail_json.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&e.detail_json).unwrap()
    };
    assert_eq!(v["detail"], detail);
    assert_eq!(v["hash"], e.hash);
    let hash = e.hash.as_str();
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{v}"
    );
}

/// One JSON object a line (the audit commands' format).
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

// --- The daemon's side -----------------------------------------------------------------

async fn list(daemon: &TestDaemon) -> Vec<pb::Instance> {
    admin_client(daemon)
        .await
        .list_instances(pb::ListInstancesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .instances
}

fn by_pid(list: &[pb::Instance], pid: u32) -> &pb::Instance {
    list.iter()
        .find(|i| i.pid == pid)
        .unwrap_or_else(|| panic!("pid {pid} listed in {list:?}"))
}

async fn tasks(daemon: &TestDaemon) -> Vec<pb::Task> {
    admin_client(daemon)
        .await
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks
}

async fn audit(daemon: &TestDaemon, request: pb::ListAuditRequest) -> Vec<pb::AuditEvent> {
    admin_client(daemon)
        .await
        .list_audit(request)
        .await
        .unwrap()
        .into_inner()
        .events
}

async fn entry(daemon: &TestDaemon, name: &str) -> pb::Entry {
    admin_client(daemon)
        .await
        .get_entry(pb::GetEntryRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

fn short(id: &str) -> &str {
    &id[..12]
}

// --- The tests -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_lists_two_agents_and_a_child_drawn_under_its_parent_and_shows_one_by_pid() {
    let daemon = TestDaemon::start().await;
    let me = nix::unistd::geteuid().as_raw();
    let mut a = Agent::start(&daemon).await;
    let mut b = Agent::start(&daemon).await;
    let a_svids = a.fetch().await;
    b.fetch().await;
    a.say("spawn");
    let child = a.event("spawned", Duration::from_secs(10)).await["child"]
        .as_u64()
        .unwrap() as u32;
    a.find(Duration::from_secs(10), |e| {
        e["event"] == "svids" && e["from"] == child
    })
    .await;
    let instances = list(&daemon).await;
    assert_eq!(instances.len(), 3, "{instances:?}");
    let a_id = by_pid(&instances, a.pid()).instance_id.clone();
    let b_id = by_pid(&instances, b.pid()).instance_id.clone();
    let child_id = by_pid(&instances, child).instance_id.clone();
    assert_eq!(by_pid(&instances, child).parent_instance_id, a_id);

    // People: the columns, and each instance's short id and entry.
    let run = sigil(&daemon, &["instances"]).await;
    let text = run.ok();
    assert_eq!(
        header_cells(text),
        [
            "INSTANCE",
            "PID",
            "UID",
            "ENTRY",
            "SPIFFE ID",
            "TASKS",
            "EXPIRES",
            "STARTED"
        ],
        "{text}"
    );
    assert_eq!(text.lines().count(), 4, "a header and three rows:\n{text}");
    let a_row = text
        .lines()
        .find(|l| l.starts_with(short(&a_id)))
        .unwrap_or_else(|| panic!("a's row in\n{text}"));
    assert!(
        a_row.contains(&a.pid().to_string()) && a_row.contains("tester"),
        "{a_row}"
    );
    assert!(a_row.contains(&format!("/instance/{a_id}")), "{a_row}");

    // The tree: the child's line indented under its parent's.
    let run = sigil(&daemon, &["instances", "--tree"]).await;
    let lines: Vec<&str> = run.ok().lines().collect();
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let a_at = lines
        .iter()
        .position(|l| l.starts_with(&format!("{} ", short(&a_id))))
        .unwrap_or_else(|| panic!("a as a root in {lines:#?}"));
    assert!(
        lines[a_at + 1].starts_with(&format!("└─ {} ", short(&child_id))),
        "the child right under a: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{} ", short(&b_id)))),
        "b is a root: {lines:#?}"
    );

    // JSON: every field of every instance, as the gRPC API has it.
    let json = sigil_json(&daemon, &["instances"]).await;
    let array = json.as_array().expect("a list of instances");
    let instances = list(&daemon).await;
    assert_eq!(array.len(), instances.len());
    for (v, i) in array.iter().zip(&instances) {
        assert_instance(v, i);
        assert_eq!(v["entries"], json!(["tester"]));
        assert!(
            v["selectors"]
                .as_array()
                .unwrap()
                .contains(&json!(format!("unix:uid:{me}"))),
            "{v}"
        );
        let svid = &v["svids"][0];
        assert_eq!(
            svid["spiffe_id"],
            format!(
                "spiffe://{TRUST_DOMAIN}/agent/tester/instance/{}",
                i.instance_id
            )
        );
        assert_eq!(svid["hint"], "instance");
        assert_eq!(v["state"], "live");
    }
    let a_json = array.iter().find(|v| v["instance_id"] == a_id).unwrap();
    assert_eq!(a_json["svids"][0]["serial"], a_svids[0]["serial"]);
    assert_eq!(a_json["pid"], a.pid());
    assert_eq!(a_json["uid"], me);
    assert_eq!(a_json["parent_instance_id"], Value::Null);
    let child_json = array.iter().find(|v| v["instance_id"] == child_id).unwrap();
    assert_eq!(child_json["parent_instance_id"], a_id);
    assert_eq!(child_json["pid"], child);

    // Filters reach the daemon.
    let none = sigil_json(&daemon, &["instances", "--uid", "4242"]).await;
    assert_eq!(none, json!([]));
    let all = sigil_json(&daemon, &["instances", "--entry", "tester", "--all"]).await;
    assert_eq!(all.as_array().unwrap().len(), 3);

    // `instances show --pid`: people get every fact, then the SVIDs and tasks.
    let pid = a.pid().to_string();
    let run = sigil(&daemon, &["instances", "show", "--pid", &pid]).await;
    let text = run.ok();
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("instance:") && first.ends_with(&a_id),
        "{text}"
    );
    for header in [
        "SERIAL",
        "HINT",
        "SPIFFE ID",
        "EXPIRES",
        "TASK",
        "ATTRIBUTES",
    ] {
        assert!(text.contains(header), "{header} in\n{text}");
    }
    assert!(
        text.contains(a_svids[0]["serial"].as_str().unwrap()),
        "{text}"
    );
    let shown = sigil_json(&daemon, &["instances", "show", "--pid", &pid]).await;
    let from_api = admin_client(&daemon)
        .await
        .get_instance(pb::GetInstanceRequest {
            selector: Some(pb::get_instance_request::Selector::Pid(a.pid())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_instance(&shown, &from_api);
    assert_eq!(shown["instance_id"], a_id);
    // The same facts as the listing's, to the nanosecond (the show reads
    // every SVID from the store, the listing the live ones).
    for field in ["started_at", "pid", "uid", "exe", "selectors", "entries"] {
        assert_eq!(shown[field], a_json[field], "{field}");
    }
    assert_eq!(shown["svids"][0], a_json["svids"][0]);
    let by_id = sigil_json(&daemon, &["instances", "show", &a_id]).await;
    assert_eq!(by_id["instance_id"], a_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_started_and_ended_revocations_and_the_audit_trail_of_them_in_order() {
    let daemon = TestDaemon::start().await;
    let mut a = Agent::start(&daemon).await;
    a.fetch().await;
    let a_id = by_pid(&list(&daemon).await, a.pid()).instance_id.clone();
    let pid = a.pid().to_string();

    // `task start`, for people, then in JSON.
    let start = |task: &'static str| {
        vec![
            "task", "start", "--pid", &pid, "--task", task, "--ttl", "10m", "--attr", "k=v",
        ]
    };
    let run = sigil(&daemon, &start("t1")).await;
    let text = run.ok();
    assert_eq!(
        header_cells(text),
        [
            "INSTANCE",
            "TASK",
            "SPIFFE ID",
            "STARTED",
            "EXPIRES",
            "STARTED BY",
            "ATTRIBUTES"
        ],
        "{text}"
    );
    let row = text.lines().nth(1).unwrap();
    assert!(row.starts_with(&format!("{}  t1", short(&a_id))), "{row}");
    assert!(row.contains("k=v") && row.contains("admin uid:0"), "{row}");
    let started = Instant::now();
    let t2 = sigil_json(&daemon, &start("t2")).await;
    let live = tasks(&daemon).await;
    let t2_api = live.iter().find(|t| t.task_id == "t2").unwrap();
    assert_task(&t2, t2_api);
    assert_eq!(t2["instance_id"], a_id);
    assert_eq!(t2["attributes"], json!({"k": "v"}));
    assert_eq!(
        t2["spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/agent/tester/instance/{a_id}/task/t2")
    );
    assert!(
        t2["started_by"]
            .as_str()
            .unwrap()
            .starts_with("admin uid:0 pid:"),
        "{t2}"
    );
    let lifetime = time_of(&t2["expires_at"]) - time_of(&t2["started_at"]);
    assert_eq!(lifetime.whole_seconds(), 600, "{t2}");
    // The agent got both task SVIDs on its stream.
    let with_tasks = a
        .find(Duration::from_secs(5), |e| {
            e["event"] == "svids" && e["svids"].as_array().unwrap().len() == 3
        })
        .await;
    assert_eq!(with_tasks["svids"][2]["spiffe_id"], t2["spiffe_id"]);
    assert!(started.elapsed() < Duration::from_secs(5));

    // `tasks`.
    let run = sigil(&daemon, &["tasks"]).await;
    let text = run.ok();
    assert_eq!(header_cells(text)[..3], ["INSTANCE", "TASK", "SPIFFE ID"]);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains("/task/t1"), "{text}");
    let json = sigil_json(&daemon, &["tasks"]).await;
    let array = json.as_array().unwrap();
    assert_eq!(array.len(), 2);
    for (v, t) in array.iter().zip(&live) {
        assert_task(v, t);
    }
    let only_a = sigil_json(&daemon, &["tasks", "--instance", &a_id]).await;
    assert_eq!(only_a.as_array().unwrap().len(), 2);

    // `task end`.
    let run = sigil(
        &daemon,
        &["task", "end", "--instance", &a_id, "--task", "t1"],
    )
    .await;
    let text = run.ok();
    assert_eq!(header_cells(text)[..2], ["INSTANCE", "TASK"]);
    assert!(text.lines().nth(1).unwrap().contains("t1"), "{text}");
    let ended = sigil_json(
        &daemon,
        &["task", "end", "--instance", &a_id, "--task", "t2"],
    )
    .await;
    assert_fields(&ended, TASK_FIELDS);
    assert_eq!(ended["instance_id"], a_id);
    assert_eq!(ended["task_id"], "t2");
    assert_eq!(ended["spiffe_id"], t2["spiffe_id"]);
    assert_eq!(ended["attributes"], json!({"k": "v"}));
    for field in ["started_at", "expires_at"] {
        assert_eq!(ended[field], t2[field], "{field}: {ended}");
    }
    assert!(
        ended["started_by"].is_null() || ended["started_by"] == t2["started_by"],
        "{ended}"
    );
    assert!(tasks(&daemon).await.is_empty());
    a.find(Duration::from_secs(5), |e| {
        e["event"] == "svids" && e["svids"].as_array().unwrap().len() == 1
    })
    .await;

    // `revoke svid` of a task's SVID: the task is named.
    sigil(&daemon, &start("t3")).await.ok();
    let shown = sigil_json(&daemon, &["instances", "show", &a_id]).await;
    let t3_serial = shown["svids"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["task_id"] == "t3")
        .unwrap_or_else(|| panic!("t3's SVID in {shown:#}"))["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked = sigil_json(&daemon, &["revoke", "svid", &t3_serial]).await;
    assert_fields(&revoked, REVOKED_FIELDS);
    assert_eq!(
        revoked,
        json!({"instance_ids": [a_id], "task_ids": ["t3"], "serials": [t3_serial]})
    );

    // `revoke instance ID`, for people.
    let mut c = Agent::start(&daemon).await;
    let c_svids = c.fetch().await;
    let c_id = by_pid(&list(&daemon).await, c.pid()).instance_id.clone();
    let run = sigil(&daemon, &["revoke", "instance", &c_id, "--reason", "leak"]).await;
    let text = run.ok();
    let (summary, table) = text.split_once('\n').unwrap();
    assert!(summary.contains("revoked"), "{text}");
    assert_eq!(header_cells(table), ["KIND", "ID"], "{text}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("instance") && l.ends_with(&c_id)),
        "{text}"
    );
    let c_serial = c_svids[0]["serial"].as_str().unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("serial") && l.ends_with(c_serial)),
        "{text}"
    );
    let end = c.event("stream_end", Duration::from_secs(2)).await;
    assert_eq!(end["code"], "PermissionDenied");

    // `revoke instance --pid` in JSON: the instance and its serials.
    let mut d = Agent::start(&daemon).await;
    let d_svids = d.fetch().await;
    let d_id = by_pid(&list(&daemon).await, d.pid()).instance_id.clone();
    let revoked = sigil_json(
        &daemon,
        &["revoke", "instance", "--pid", &d.pid().to_string()],
    )
    .await;
    assert_eq!(
        revoked,
        json!({
            "instance_ids": [d_id],
            "task_ids": [],
            "serials": [d_svids[0]["serial"]],
        })
    );
    d.event("stream_end", Duration::from_secs(2)).await;

    // `revoke entry` in JSON: every live instance of it, with its serials.
    let live = list(&daemon).await;
    assert_eq!(live.len(), 1, "only a is left: {live:?}");
    let a_serials: Vec<String> = live[0].svids.iter().map(|s| s.serial.clone()).collect();
    let revoked = sigil_json(&daemon, &["revoke", "entry", "tester"]).await;
    assert_fields(&revoked, REVOKED_FIELDS);
    assert_eq!(revoked["instance_ids"], json!([a_id]));
    assert_eq!(revoked["task_ids"], json!([]));
    assert_eq!(revoked["serials"], json!(a_serials));
    let end = a.event("stream_end", Duration::from_secs(2)).await;
    assert_eq!(end["code"], "PermissionDenied");

    // `audit --json`: a's events, oldest first, each as the gRPC API has it.
    let run = sigil(&daemon, &["audit", "--instance", &a_id, "--json"]).await;
    let events = json_lines(run.ok());
    let from_api = audit(
        &daemon,
        pb::ListAuditRequest {
            instance_id: a_id.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(events.len(), from_api.len());
    for (v, e) in events.iter().zip(&from_api) {
        assert_event(v, e);
        assert_eq!(v["instance_id"], a_id);
    }
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    // Each task's SVID is issued after its begin; an end revokes it (both
    // the operator's `task end` and the revocation of its SVID); the
    // entry's revocation ends the instance, its serials in that row.
    assert_eq!(
        kinds,
        [
            "attestation",
            "issuance",
            "task_begin",
            "issuance",
            "task_begin",
            "issuance",
            "task_end",
            "revocation",
            "task_end",
            "revocation",
            "task_begin",
            "issuance",
            "task_end",
            "revocation",
            "instance_end",
        ],
        "{events:#?}"
    );
    let last = events.last().unwrap();
    assert_eq!(
        last["detail"]["revoked_serials"],
        json!(a_serials),
        "{last}"
    );
    let tasks_in_order: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "task_begin" || e["kind"] == "task_end")
        .map(|e| &e["task_id"])
        .collect();
    assert_eq!(
        tasks_in_order,
        [
            &json!("t1"),
            &json!("t2"),
            &json!("t1"),
            &json!("t2"),
            &json!("t3"),
            &json!("t3")
        ]
    );
    assert!(
        events
            .windows(2)
            .all(|w| w[0]["seq"].as_i64() < w[1]["seq"].as_i64()),
        "oldest first"
    );
    // Order is by seq. (`at` is not checked for order: an issuance row may
    // carry the millisecond before its attestation row's, seen 1 run in 20.)

    // For people: one line an event, oldest first.
    let run = sigil(&daemon, &["audit", "--instance", &a_id]).await;
    let lines: Vec<&str> = run.ok().lines().collect();
    assert_eq!(lines.len(), events.len(), "{lines:#?}");
    assert!(
        lines[0].contains(&format!("#{} attestation ", events[0]["seq"])),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(&format!("instance={}", short(&a_id))),
        "{}",
        lines[0]
    );

    // --since: the last ten minutes hold them all; a time to come holds none.
    let since = json_lines(
        sigil(&daemon, &["audit", "--since", "10m", "--json"])
            .await
            .ok(),
    );
    let everything = json_lines(sigil(&daemon, &["audit", "--json"]).await.ok());
    assert!(since.len() >= events.len() + 10, "{}", since.len());
    assert_eq!(since[0], everything[0], "the first event is within 10m");
    let future = (OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&Rfc3339)
        .unwrap();
    let run = sigil(&daemon, &["audit", "--since", &future, "--json"]).await;
    assert_eq!(run.ok(), "", "nothing happened after {future}");
    // --kind and --limit.
    let admin = json_lines(
        sigil(
            &daemon,
            &["audit", "--kind", "admin", "--limit", "3", "--json"],
        )
        .await
        .ok(),
    );
    assert_eq!(admin.len(), 3);
    for e in &admin {
        assert_eq!(e["kind"], "admin");
        assert!(
            e["actor"].as_str().unwrap().starts_with("admin uid:0 pid:"),
            "{e}"
        );
        assert_eq!(e["detail"]["admitted"], true, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_created_from_flags_and_a_file_listed_shown_and_deleted() {
    let me = nix::unistd::geteuid().as_raw();
    // The config admits nobody this test runs as.
    let config = "trust_domain = \"sigil.test\"\n[[entry]]\nname = \"others\"\nselectors = [\"unix:uid:4242\"]\n";
    let daemon = TestDaemon::start_with(config).await;

    // From flags, in JSON.
    let selector = format!("unix:uid:{me}");
    let created = sigil_json(
        &daemon,
        &[
            "entries",
            "create",
            "--name",
            "mine",
            "--selector",
            &selector,
            "--ttl",
            "30m",
            "--dns-name",
            "mine.local",
            "--owner",
            "team-a",
            "--self-declare-tasks",
            "--task-max-ttl",
            "10m",
            "--task-max-concurrent",
            "4",
            "--task-id-pattern",
            "ticket-*",
        ],
    )
    .await;
    assert_entry(&created, &entry(&daemon, "mine").await);
    assert_eq!(created["name"], "mine");
    assert_eq!(created["source"], "stored");
    assert_eq!(created["owner"], "team-a");
    assert_eq!(created["selectors"], json!([selector]));
    assert_eq!(
        created["spiffe_id"], "spiffe://{trust_domain}/agent/{entry}/instance/{instance}",
        "the daemon's default template, spelled out"
    );
    assert_eq!(created["ttl_seconds"], 1800);
    assert_eq!(created["dns_names"], json!(["mine.local"]));
    assert_eq!(created["tasks"]["self_declare"], true);
    assert_eq!(created["tasks"]["max_ttl_seconds"], 600);
    assert_eq!(created["tasks"]["max_concurrent"], 4);
    assert_eq!(created["tasks"]["id_pattern"], "ticket-*");
    assert!(created["tasks"]["begin_burst"].is_u64(), "{created}");
    assert!(
        created["tasks"]["begin_per_second"].is_number(),
        "{created}"
    );
    let at = time_of(&created["created_at"]);
    assert!((OffsetDateTime::now_utc() - at).whole_seconds().abs() < 60);
    assert!(
        created["created_by"]
            .as_str()
            .unwrap()
            .starts_with("admin uid:0 pid:"),
        "{created}"
    );
    assert_eq!(created["live_instances"], 0);

    // From a file, for people.
    let file = daemon.dir.path().join("entry.toml");
    std::fs::write(
        &file,
        "[[entry]]\nname = \"filed\"\nselectors = [\"unix:uid:4343\"]\nttl = \"1h\"\nowner = \"team-b\"\n",
    )
    .unwrap();
    let run = sigil(
        &daemon,
        &["entries", "create", "--file", file.to_str().unwrap()],
    )
    .await;
    let text = run.ok();
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("name:") && first.ends_with("filed"),
        "{text}"
    );
    assert!(
        text.contains("source:") && text.contains("stored"),
        "{text}"
    );
    assert!(text.contains("team-b") && text.contains("1h"), "{text}");

    // `entries list`.
    let run = sigil(&daemon, &["entries", "list"]).await;
    let text = run.ok();
    assert_eq!(
        header_cells(text),
        [
            "NAME",
            "SOURCE",
            "OWNER",
            "SELECTORS",
            "SPIFFE ID",
            "TTL",
            "LIVE"
        ],
        "{text}"
    );
    assert!(
        text.lines().nth(1).unwrap().starts_with("others  config"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 4, "{text}");
    let json = sigil_json(&daemon, &["entries", "list"]).await;
    let from_api = admin_client(&daemon)
        .await
        .list_entries(pb::ListEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    let array = json.as_array().unwrap();
    assert_eq!(array.len(), 3);
    for (v, e) in array.iter().zip(&from_api) {
        assert_entry(v, e);
    }
    let names: Vec<(&str, &str)> = array
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["source"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("others", "config"),
            ("mine", "stored"),
            ("filed", "stored")
        ]
    );
    let others = &array[0];
    assert_eq!(
        others["created_at"],
        Value::Null,
        "config entries have none"
    );
    assert_eq!(others["created_by"], Value::Null);

    // A restart keeps them, as they were (to the nanosecond).
    let dir = daemon.stop().await;
    let daemon = TestDaemon::start_in(dir, config).await;
    let again = sigil_json(&daemon, &["entries", "list"]).await;
    assert_eq!(again, json, "the same entries after a restart");

    // An agent admitted by the stored entry at once.
    let mut agent = Agent::start(&daemon).await;
    let svids = agent.fetch().await;
    let id = by_pid(&list(&daemon).await, agent.pid())
        .instance_id
        .clone();

    // `entries show`.
    let run = sigil(&daemon, &["entries", "show", "mine"]).await;
    let text = run.ok();
    assert!(text.lines().next().unwrap().ends_with("mine"), "{text}");
    assert!(text.contains("live instances:"), "{text}");
    assert!(text.contains("ticket-*"), "{text}");
    let shown = sigil_json(&daemon, &["entries", "show", "filed"]).await;
    assert_entry(&shown, &entry(&daemon, "filed").await);
    assert_eq!(shown["ttl_seconds"], 3600);
    assert_eq!(shown["owner"], "team-b");
    assert_eq!(shown["tasks"]["self_declare"], false, "the default policy");
    let mine = sigil_json(&daemon, &["entries", "show", "mine"]).await;
    assert_eq!(mine["live_instances"], 1);

    // `entries delete`, for people, then in JSON with what it revoked.
    let run = sigil(&daemon, &["entries", "delete", "filed"]).await;
    let text = run.ok();
    assert_eq!(
        text, "deleted entry filed\nnothing was revoked\n",
        "no live instance held it"
    );
    let deleted = sigil_json(&daemon, &["entries", "delete", "mine"]).await;
    assert_fields(&deleted, &["name", "revoked"]);
    assert_eq!(deleted["name"], "mine");
    assert_fields(&deleted["revoked"], REVOKED_FIELDS);
    assert_eq!(deleted["revoked"]["instance_ids"], json!([id]));
    assert_eq!(deleted["revoked"]["task_ids"], json!([]));
    let serials: BTreeSet<&str> = deleted["revoked"]["serials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        serials.contains(svids[0]["serial"].as_str().unwrap()),
        "{deleted}"
    );
    let end = agent.event("stream_end", Duration::from_secs(2)).await;
    assert_eq!(end["code"], "PermissionDenied");
    let left = sigil_json(&daemon, &["entries", "list"]).await;
    assert_eq!(left.as_array().unwrap().len(), 1);
}

/// Starts `sigil args...` and hands its stdout lines over a channel; the
/// child is killed when the guard drops.
struct Follower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    fn start(socket: &Path, args: &[&str]) -> Self {
        let mut child = command(socket, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sigil starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line within `limit`, without blocking the daemon's runtime.
    async fn line(&mut self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            match self.lines.try_recv() {
                Ok(line) => return Some(line),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_follow_prints_a_new_event_verify_names_a_tampered_row_and_status_counts() {
    let daemon = TestDaemon::start().await;
    let mut a = Agent::start(&daemon).await;
    a.fetch().await;
    let mut b = Agent::start(&daemon).await;
    b.fetch().await;
    let a_id = by_pid(&list(&daemon).await, a.pid()).instance_id.clone();

    // `status`.
    let run = sigil(&daemon, &["status"]).await;
    let text = run.ok();
    let row = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .unwrap_or_else(|| panic!("{key} in\n{text}"))
            .trim()
            .to_owned()
    };
    assert_eq!(row("live instances"), "2");
    assert_eq!(row("trust domain"), TRUST_DOMAIN);
    assert_eq!(
        row("admin socket"),
        daemon.admin_socket.display().to_string()
    );
    let status = sigil_json(&daemon, &["status"]).await;
    assert_fields(
        &status,
        &[
            "version",
            "started_at",
            "uptime_seconds",
            "trust_domain",
            "ca_not_after",
            "live_instances",
            "live_tasks",
            "live_svids",
            "crl_number",
            "crl_entries",
            "crl_bytes",
            "last_rotation",
            "store_bytes",
            "workload_socket",
            "admin_socket",
            "config_source",
            "entries",
        ],
    );
    let now = OffsetDateTime::now_utc();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    let started = time_of(&status["started_at"]);
    assert!(started <= now && now - started < time::Duration::minutes(5));
    assert!(status["uptime_seconds"].as_u64().unwrap() < 300, "{status}");
    assert_eq!(status["trust_domain"], TRUST_DOMAIN);
    assert!(time_of(&status["ca_not_after"]) > now);
    assert_eq!(status["live_instances"], list(&daemon).await.len());
    assert_eq!(status["live_instances"], 2);
    assert_eq!(status["live_tasks"], 0);
    assert_eq!(status["live_svids"], 2);
    assert!(status["crl_number"].is_u64(), "{status}");
    assert_eq!(status["crl_entries"], 0);
    assert!(status["crl_bytes"].is_u64(), "{status}");
    assert!(
        status["last_rotation"].is_null() || time_of(&status["last_rotation"]) <= now,
        "{status}"
    );
    assert!(status["store_bytes"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(
        status["workload_socket"],
        daemon.socket.display().to_string()
    );
    assert_eq!(
        status["admin_socket"],
        daemon.admin_socket.display().to_string()
    );
    assert_eq!(status["config_source"], "test.toml");
    assert_eq!(status["entries"], 1);

    // `audit --follow --json`: the trail so far (no instance has ended
    // yet), then a new event as it happens.
    let ended = audit(
        &daemon,
        pb::ListAuditRequest {
            kind: "instance_end".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(ended.is_empty(), "{ended:?}");
    let mut follower = Follower::start(
        &daemon.admin_socket,
        &["audit", "--follow", "--json", "--kind", "instance_end"],
    );
    let c_svids = {
        let mut c = Agent::start(&daemon).await;
        let svids = c.fetch().await;
        // The follower is on its stream once its WatchAudit call is audited
        // (the row is written before the stream starts); nothing yet, as no
        // instance has ended.
        let watching = common::eventually(Duration::from_secs(10), || {
            let query = sigil::store::AuditQuery {
                kind: Some(sigil::store::AuditKind::Admin),
                ..Default::default()
            };
            daemon
                .store()
                .audit(&query)
                .unwrap()
                .iter()
                .any(|e| e.detail["call"] == "WatchAudit")
        })
        .await;
        assert!(watching, "the follower called WatchAudit");
        assert_eq!(follower.line(Duration::from_millis(300)).await, None);
        let before = Instant::now();
        sigil(
            &daemon,
            &["revoke", "instance", "--pid", &c.pid().to_string()],
        )
        .await
        .ok();
        let line = follower
            .line(Duration::from_secs(2))
            .await
            .expect("the instance's end within 2 s");
        assert!(before.elapsed() < Duration::from_secs(5));
        let event: Value = serde_json::from_str(&line).unwrap();
        assert_fields(&event, EVENT_FIELDS);
        assert_eq!(event["kind"], "instance_end");
        assert_eq!(
            event["detail"]["revoked_serials"],
            json!([svids[0]["serial"]])
        );
        let from_api = audit(
            &daemon,
            pb::ListAuditRequest {
                kind: "instance_end".into(),
                ..Default::default()
            },
        )
        .await;
        assert_event(&event, from_api.last().unwrap());
        svids
    };
    drop(follower);
    assert_eq!(c_svids.len(), 1);

    // `audit verify`: intact, for people and in JSON.
    let run = sigil(&daemon, &["audit", "verify"]).await;
    let text = run.ok();
    assert!(text.starts_with("intact: "), "{text}");
    let verdict = sigil_json(&daemon, &["audit", "verify"]).await;
    assert_fields(
        &verdict,
        &["intact", "rows", "head", "first_bad_seq", "problem"],
    );
    assert_eq!(verdict["intact"], true);
    assert!(verdict["rows"].as_u64().unwrap() > 5, "{verdict}");
    let head = verdict["head"].as_str().unwrap();
    assert!(head.len() == 64 && head.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(verdict["first_bad_seq"], Value::Null);
    assert_eq!(verdict["problem"], Value::Null);

    // Tamper with a's issuance row behind the daemon's back.
    let events = audit(
        &daemon,
        pb::ListAuditRequest {
            instance_id: a_id.clone(),
            kind: "issuance".into(),
            ..Default::default()
        },
    )
    .await;
    let victim = events[0].seq;
    let conn = rusqlite::Connection::open(daemon.state_dir.join("sigil.db")).unwrap();
    conn.execute_batch(&format!(
        "DROP TRIGGER audit_no_update; UPDATE audit SET actor = 'x' WHERE seq = {victim};"
    ))
    .unwrap();
    drop(conn);
    let run = sigil(&daemon, &["audit", "verify"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stdout.starts_with(&format!("broken at seq {victim}: ")),
        "{run:?}"
    );
    let run = sigil(&daemon, &["audit", "verify", "--json"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    let verdict: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_fields(
        &verdict,
        &["intact", "rows", "head", "first_bad_seq", "problem"],
    );
    assert_eq!(verdict["intact"], false);
    assert_eq!(verdict["first_bad_seq"], victim);
    assert!(verdict["problem"].is_string(), "{verdict}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_socket_and_an_unknown_instance_are_one_clear_message_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("admin.sock");
    let path = missing.display().to_string();
    for args in [
        &["status"][..],
        &["instances", "--json"],
        &["audit", "verify"],
    ] {
        let run = sigil_on(&missing, args).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert_eq!(run.stdout, "", "{args:?}");
        assert!(
            run.stderr
                .starts_with(&format!("sigil: no socket at {path}")),
            "{args:?}: {run:?}"
        );
        assert_eq!(run.stderr.lines().count(), 1, "one line: {run:?}");
        assert_eq!(run.stderr.matches(&path).count(), 1, "said once: {run:?}");
        assert!(run.stderr.contains("SIGIL_ADMIN_SOCKET"), "{run:?}");
    }

    let daemon = TestDaemon::start().await;
    let mut agent = Agent::start(&daemon).await;
    agent.fetch().await;
    let id = by_pid(&list(&daemon).await, agent.pid())
        .instance_id
        .clone();
    let unknown = "0".repeat(id.len());
    let run = sigil(&daemon, &["instances", "show", &unknown]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stdout, "");
    assert_eq!(run.stderr, format!("sigil: no instance {unknown}\n"));
    let run = sigil(&daemon, &["revoke", "instance", &unknown, "--json"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stdout, "");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains(&unknown), "{run:?}");
    // Nothing was revoked.
    assert_eq!(list(&daemon).await.len(), 1);
}
